"""SAE files fastsae reads beyond SAELens's standard / topk / jumprelu /
Matryoshka saves: SAELens's ``gated`` SAEs (load, run, save; not trained),
EleutherAI sparsify TopK SAEs, and clear errors for files fastsae cannot
run (transcoders: tests/test_transcoder_formats.py). Each fixture was
written by the other project's own code with its own outputs
(tests/data/*/<name>/, copied from ../shared/fixtures).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.io import SAEFormatError, load_tensors, save_tensors

DATA = Path(__file__).parent / "data"
# Each output is a float32 sum of at most d_sae = 64 products (pre: d_in = 16)
# computed in another order than the other project's: within (64 + 2) u of
# the sum of the terms' magnitudes (u = 2**-24, Higham ch. 3), which stays
# below 2.5 here: 66 * 6e-8 * 2.5 = 1e-5.
TOL = dict(rtol=0, atol=1e-5)


def _io(d, out="x_hat.npy"):
    return np.load(d / "x.npy"), np.load(d / "f.npy"), np.load(d / out)


# ------------------------------------------------------------------ gated
def test_gated_runs_as_saelens():
    d = DATA / "saelens" / "gated"
    m = SparseAutoencoder.load(d, backend="numpy")
    assert m.architecture == "gated" and m.activation is None
    x, f, x_hat = _io(d)
    got = m.encode(x)
    # both paths matter here: gate open with mag 0, and closed with mag > 0
    assert np.array_equal(got != 0, f != 0)
    np.testing.assert_allclose(got, f, **TOL)
    np.testing.assert_allclose(m.decode(got), x_hat, **TOL)
    # in batches of 5 rows (BLAS may round differently per batch shape)
    np.testing.assert_allclose(m.encode(x, sparse=True, batch_size=5).to_dense(), got, **TOL)


def test_gated_saves_in_saelens_layout(tmp_path):
    d = DATA / "saelens" / "gated"
    m = SparseAutoencoder.load(d)
    m.save(tmp_path / "g")
    t, _ = load_tensors(tmp_path / "g" / "sae_weights.safetensors")
    src, _ = load_tensors(d / "sae_weights.safetensors")
    assert set(t) == set(src) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
    for k in src:
        np.testing.assert_array_equal(t[k], src[k], k)
    assert json.loads((tmp_path / "g" / "cfg.json").read_text())["architecture"] == "gated"
    x, f, _ = _io(d)
    np.testing.assert_array_equal(SparseAutoencoder.load(tmp_path / "g").encode(x), m.encode(x))


def test_gated_not_trainable_and_b_dec_fold(tmp_path):
    d = DATA / "saelens" / "gated"
    with pytest.raises(ValueError, match="cannot train this 'gated' SAE"):
        Trainer(SparseAutoencoder.load(d), np.zeros((64, 16), np.float32), TrainConfig())
    # apply_b_dec_to_input false: b_dec is not subtracted, folded into both biases
    g = tmp_path / "nob"
    shutil.copytree(d, g)
    cfg = json.loads((g / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (g / "cfg.json").write_text(json.dumps(cfg))
    t, _ = load_tensors(d / "sae_weights.safetensors")
    x = np.load(d / "x.npy").astype(np.float64)
    W_mag = t["W_enc"] * np.exp(t["r_mag"])
    gate = x @ t["W_enc"] + t["b_gate"] > 0
    want = np.where(gate, np.maximum(x @ W_mag + t["b_mag"], 0), 0)
    got = SparseAutoencoder.load(g).encode(x.astype(np.float32))
    assert np.array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a gated file without its gate tensors
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    save_tensors(bad / "sae_weights.safetensors", {k: v for k, v in t.items() if k != "r_mag"})
    with pytest.raises(SAEFormatError, match="no tensor 'r_mag'"):
        SparseAutoencoder.load(bad)


# ------------------------------------------------------------------ sparsify
def test_sparsify_topk_runs_as_sparsify():
    d = DATA / "sparsify" / "topk"
    m = SparseAutoencoder.load(d, backend="numpy")
    assert (m.activation, m.k, m.d_sae) == ("topk", 4, 64)
    x, f, x_hat = _io(d)
    got = m.encode(x)
    # rows with fewer than k positive pre-activations: compare dense codes
    assert np.array_equal(got != 0, f != 0)
    np.testing.assert_allclose(got, f, **TOL)
    np.testing.assert_allclose(m.decode(got), x_hat, **TOL)
    # W_dec is used as stored (sparsify never renormalizes it)
    t, _ = load_tensors(d / "sae.safetensors")
    np.testing.assert_array_equal(m.W_dec, t["W_dec"])


def _sparsify_variant(tmp_path, name, cfg_changes=None, tensors=None):
    src = DATA / "sparsify" / "topk"
    d = tmp_path / name
    shutil.copytree(src, d)
    if cfg_changes:
        cfg = json.loads((d / "cfg.json").read_text())
        cfg.update(cfg_changes)
        (d / "cfg.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t, _ = load_tensors(src / "sae.safetensors")
        save_tensors(d / "sae.safetensors", tensors(t))
    return d


def test_sparsify_errors(tmp_path):
    # sparsify transcoders load now: tests/test_transcoder_formats.py
    cases = [
        ("groupmax", {"activation": "groupmax"}, None, "activation 'groupmax'"),
        ("skip", {"skip_connection": True}, None, "skip_connection true, transcode false"),
        ("bigk", {"k": 65}, None, "k = 65 exceeds"),
        ("extra", None, lambda t: {**t, "W_skip": np.eye(16, dtype=np.float32)},
         "holds exactly"),
        ("shape", None, lambda t: {**t, "encoder.weight": t["encoder.weight"].T.copy()},
         "encoder.weight has shape"),
        ("nan", None, lambda t: {**t, "b_dec": np.full(16, np.nan, np.float32)}, "NaN"),
        ("latents", {"num_latents": 0, "expansion_factor": 2}, None, "encoder.weight has shape"),
    ]
    for name, cfg, tensors, match in cases:
        with pytest.raises(SAEFormatError, match=match):
            SparseAutoencoder.load(_sparsify_variant(tmp_path, name, cfg, tensors))


def test_unrunnable_saelens_architecture_is_named_in_the_error(tmp_path):
    # transcoders load now (tests/test_transcoder_formats.py); others are named
    d = tmp_path / "temporal"
    shutil.copytree(DATA / "saelens" / "transcoder", d)
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    with pytest.raises(SAEFormatError, match="architecture 'temporal' is not supported"):
        SparseAutoencoder.load(d)
