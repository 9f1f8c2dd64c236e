"""Gemma Scope's published layout (``params.npz``): load, run, refuse bad
files. The fixture (tests/data/gemma_scope/, built by its make_fixture.py
from the documented layout and equations) holds the expected outputs."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import fastsae
from fastsae import SparseAutoencoder
from fastsae.io import SAEFormatError, is_gemma_scope, read_gemma_scope

DATA = Path(__file__).parent / "data" / "gemma_scope"
USABLE = [s.name for s in fastsae.available_backends() if s.available]


def _expected():
    return np.load(DATA / "x.npy"), np.load(DATA / "f.npy"), np.load(DATA / "x_hat.npy")


@pytest.mark.parametrize("target", ["dir", "file"])
@pytest.mark.parametrize("name", USABLE)
def test_load_reproduces_the_documented_equations(name, target):
    x, f_ref, x_hat_ref = _expected()
    path = DATA if target == "dir" else DATA / "params.npz"
    assert is_gemma_scope(path)
    sae = SparseAutoencoder.load(path, backend=name)
    assert (sae.architecture, sae.activation, sae.d_in, sae.d_sae) == ("jumprelu", "jumprelu",
                                                                        16, 64)
    raw = np.load(DATA / "params.npz")
    pre = x.astype(np.float64) @ raw["W_enc"] + raw["b_enc"]
    near = np.abs(pre - raw["threshold"]) < 1e-5
    f = sae.encode(x)
    assert np.array_equal((f > 0) | near, (f_ref > 0) | near)
    np.testing.assert_allclose(f, f_ref, atol=2e-5)
    np.testing.assert_allclose(sae.decode(f_ref), x_hat_ref, atol=2e-5)
    np.testing.assert_array_equal(sae.threshold, raw["threshold"])


def test_b_dec_is_not_subtracted():
    x, f_ref, _ = _expected()
    raw = np.load(DATA / "params.npz")
    pre_wrong = (x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]
    wrong = np.where(pre_wrong > raw["threshold"], pre_wrong, 0)
    assert np.abs(wrong - f_ref).max() > 0.1  # the fixture tells the two apart
    np.testing.assert_allclose(SparseAutoencoder.load(DATA).encode(x), f_ref, atol=2e-5)


def test_loaded_gemma_scope_sae_trains_and_saves_as_saelens(tmp_path):
    sae = SparseAutoencoder.load(DATA, backend="numpy")
    x = _expected()[0]
    fastsae.Trainer(sae, np.tile(x, (8, 1)), fastsae.TrainConfig(
        steps=2, batch_size=64, progress=False, eval_rows=64)).train()
    sae.save(tmp_path / "s")
    back = SparseAutoencoder.load(tmp_path / "s", backend="numpy")
    assert back.architecture == "jumprelu"
    np.testing.assert_allclose(back.encode(x), sae.encode(x), atol=1e-6)


def _write(tmp_path, **arrays):
    d = tmp_path / "gs"
    d.mkdir(exist_ok=True)
    np.savez(d / "params.npz", **arrays)
    return d


def test_bad_files_give_clear_errors(tmp_path):
    raw = dict(np.load(DATA / "params.npz"))
    cases = []
    cases.append(({k: v for k, v in raw.items() if k != "threshold"}, "lacks threshold"))
    bad = dict(raw)
    bad["W_dec"] = raw["W_dec"][:-1]
    cases.append((bad, "W_dec has shape"))
    bad = dict(raw)
    bad["b_enc"] = raw["b_enc"].astype(np.int32)
    cases.append((bad, "dtype int32"))
    bad = dict(raw)
    bad["threshold"] = raw["threshold"].copy()
    bad["threshold"][0] = np.nan
    cases.append((bad, "NaN"))
    bad = dict(raw)
    bad["W_enc"] = raw["W_enc"][0]
    cases.append((bad, "2-D"))
    for arrays, match in cases:
        d = _write(tmp_path, **arrays)
        with pytest.raises(SAEFormatError, match=match):
            SparseAutoencoder.load(d)
    # an object array needs pickle: refused, never unpickled
    obj = dict(raw)
    obj["W_enc"] = np.array([raw["W_enc"], None], dtype=object)
    d = _write(tmp_path, **obj)
    with pytest.raises(SAEFormatError, match="pickle"):
        read_gemma_scope(d)
    (d / "params.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(SAEFormatError, match="not a readable"):
        read_gemma_scope(d)
    with pytest.raises(FileNotFoundError):
        read_gemma_scope(tmp_path / "nothing.npz")


def test_a_directory_with_cfg_json_is_read_as_saelens(tmp_path):
    d = tmp_path / "both"
    shutil.copytree(DATA, d)
    (d / "cfg.json").write_text("{}")
    assert not is_gemma_scope(d)
    with pytest.raises(SAEFormatError, match="d_in"):
        SparseAutoencoder.load(d)
