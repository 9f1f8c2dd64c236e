"""SAELens on-disk format: load SAELens's own files, write the same kind.

The fixtures in tests/data/saelens/ (standard, topk and a BatchTopK SAE saved
for inference as jumprelu) were written by SAELens 6.54.12's own
save code (see their README in the project's shared fixtures): ``x.npy`` is
an input, ``f.npy`` SAELens's ``encode(x)`` and ``x_hat.npy`` its
``decode(f)``.

Comparison rule: float32 dot products of 16 terms; SAELens computed in
float32 with torch, fastsae in float32 with its backend, so entries agree to
``atol=2e-5`` (values are O(1)); the set of nonzero codes must match exactly,
except for entries whose float64 pre-activation is within 1e-5 of 0.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import fastsae
from fastsae.io import SAEFormatError
from fastsae.model import SparseAutoencoder

DATA = Path(__file__).parent / "data" / "saelens"
STANDARD = DATA / "standard"


def _fixture(name="standard"):
    d = DATA / name
    return (np.load(d / "x.npy"), np.load(d / "f.npy"), np.load(d / "x_hat.npy"))


def _pre64(sae, x):
    p = sae.params
    return (x.astype(np.float64) - p.b_dec) @ p.W_enc.astype(np.float64) + p.b_enc


@pytest.mark.parametrize("name", [s.name for s in fastsae.available_backends() if s.available])
def test_load_standard_reproduces_saelens_encode_decode(name):
    x, f_ref, x_hat_ref = _fixture()
    sae = SparseAutoencoder.load(STANDARD, backend=name)
    assert (sae.d_in, sae.d_sae) == (16, 64)
    f = sae.encode(x)
    near_zero = np.abs(_pre64(sae, x)) < 1e-5
    assert np.array_equal((f > 0) | near_zero, (f_ref > 0) | near_zero)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(sae.decode(f_ref), x_hat_ref, rtol=0, atol=2e-5)
    # sparse path and scipy input give the same
    codes = sae.encode(x, sparse=True)
    np.testing.assert_allclose(codes.to_dense(), f, atol=0)
    np.testing.assert_allclose(sae.decode(codes.to_scipy()), x_hat_ref, atol=2e-5)
    np.testing.assert_allclose(sae.reconstruct(x), sae.decode(f), atol=1e-5)


def test_b_dec_is_subtracted_before_encoding():
    # README fact: skipping the subtraction changes f by up to 0.26
    x, f_ref, _ = _fixture()
    sae = SparseAutoencoder.load(STANDARD, backend="numpy")
    p = sae.params
    wrong = np.maximum(x @ p.W_enc + p.b_enc, 0)
    assert np.abs(wrong - f_ref).max() > 0.1
    assert np.abs(sae.encode(x) - f_ref).max() < 2e-5


def test_saved_directory_matches_saelens_layout(tmp_path):
    sae = SparseAutoencoder(16, 64, seed=3)
    sae.save(tmp_path / "mine")
    mine, ref = tmp_path / "mine", STANDARD
    assert {p.name for p in mine.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    cfg_m = json.loads((mine / "cfg.json").read_text())
    cfg_r = json.loads((ref / "cfg.json").read_text())
    assert set(cfg_m) == set(cfg_r)
    for key in ("architecture", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations"):
        assert cfg_m[key] == cfg_r[key], key
    assert isinstance(cfg_m["metadata"], dict)
    with safe_open(str(mine / "sae_weights.safetensors"), "np") as a, \
            safe_open(str(ref / "sae_weights.safetensors"), "np") as b:
        assert set(a.keys()) == set(b.keys()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
        assert a.metadata() == b.metadata()  # SAELens writes no __metadata__
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.shape == tb.shape and ta.dtype == tb.dtype == np.float32, k


def test_save_load_round_trip_is_exact(tmp_path):
    sae = SparseAutoencoder(12, 40, decoder_norm="unit_norm", seed=5)
    sae.params.b_enc[:] = np.linspace(-1, 1, 40, dtype=np.float32)
    sae.params.b_dec[:] = 0.25
    sae.save(tmp_path / "s", metadata={"hook_name": "blocks.3.hook_resid_post"})
    back = SparseAutoencoder.load(tmp_path / "s")
    for n in fastsae.SAEParams.NAMES:
        assert np.array_equal(getattr(back, n), getattr(sae, n)), n
    assert back.decoder_norm == "unit_norm"
    assert back.metadata["hook_name"] == "blocks.3.hook_resid_post"
    x = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
    np.testing.assert_array_equal(back.encode(x), sae.encode(x))


def _copy_standard(tmp_path, **cfg_changes):
    d = tmp_path / "sae"
    d.mkdir()
    cfg = json.loads((STANDARD / "cfg.json").read_text())
    for k, v in cfg_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "cfg.json").write_text(json.dumps(cfg))
    (d / "sae_weights.safetensors").write_bytes((STANDARD / "sae_weights.safetensors").read_bytes())
    return d


def test_unknown_cfg_fields_are_ignored(tmp_path):
    d = _copy_standard(tmp_path, some_future_field=[1, 2], hook_name="x", context_size=128)
    x, f_ref, _ = _fixture()
    np.testing.assert_allclose(SparseAutoencoder.load(d).encode(x), f_ref, atol=2e-5)


def test_apply_b_dec_false_is_folded_exactly(tmp_path):
    d = _copy_standard(tmp_path, apply_b_dec_to_input=False)
    x, _, _ = _fixture()
    sae = SparseAutoencoder.load(d, backend="numpy")
    ref = SparseAutoencoder.load(STANDARD, backend="numpy").params
    want = np.maximum(x.astype(np.float64) @ ref.W_enc + ref.b_enc, 0)  # SAELens' formula
    np.testing.assert_allclose(sae.encode(x), want, atol=2e-5)


@pytest.mark.parametrize("changes, match", [
    ({"d_in": None}, "missing the required field 'd_in'"),
    ({"d_sae": None}, "missing the required field 'd_sae'"),
    ({"d_sae": 65}, "W_enc has shape"),
    ({"d_in": "16"}, "positive integer"),
    ({"architecture": "matching_pursuit"},
     "architecture 'matching_pursuit' is not supported"),
    # a transcoder architecture on a centring cfg (and with d_in-wide W_dec)
    ({"architecture": "jumprelu_skip_transcoder"},
     "jumprelu_skip_transcoder must have apply_b_dec_to_input false"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
    ({"dtype": "int8"}, "unsupported dtype"),
])
def test_bad_cfg_gives_clear_error(tmp_path, changes, match):
    d = _copy_standard(tmp_path, **changes)
    with pytest.raises(SAEFormatError, match=match):
        SparseAutoencoder.load(d)


# Every usable backend: those without a TopK/JumpReLU encoder yet fall back
# to the NumPy reference inside SparseAutoencoder.encode.
USABLE = [s.name for s in fastsae.available_backends() if s.available]


@pytest.mark.parametrize("name", USABLE)
def test_load_topk_reproduces_saelens(name):
    """TopK on the raw pre-activations, then ReLU (README). Pattern rule: the
    fixture has no near-ties at the k-th largest pre-activation (checked)."""
    x, f_ref, x_hat_ref = _fixture("topk")
    sae = SparseAutoencoder.load(DATA / "topk", backend=name)
    assert sae.architecture == "topk" and sae.k == 4
    pre = np.sort(_pre64(sae, x), axis=1)
    assert (pre[:, -4] - pre[:, -5]).min() > 1e-5
    f = sae.encode(x)
    assert np.array_equal(f > 0, f_ref > 0)
    np.testing.assert_allclose(f, f_ref, atol=2e-5)
    np.testing.assert_allclose(sae.decode(f_ref), x_hat_ref, atol=2e-5)
    np.testing.assert_allclose(sae.encode(x, sparse=True).to_dense(), f, atol=0)


@pytest.mark.parametrize("name", USABLE)
def test_load_batchtopk_inference_as_jumprelu(name):
    """SAELens saves a BatchTopK SAE as "jumprelu" with a per-feature
    threshold and the decoder norms already folded in: no top-k, no extra
    rescaling at load. Pattern exact except where |pre - threshold| < 1e-5."""
    x, f_ref, x_hat_ref = _fixture("batchtopk_inference")
    sae = SparseAutoencoder.load(DATA / "batchtopk_inference", backend=name)
    assert sae.architecture == "jumprelu" and sae.threshold.shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, atol=1e-6)
    f = sae.encode(x)
    near = np.abs(_pre64(sae, x) - sae.threshold) < 1e-5
    assert np.array_equal((f > 0) | near, (f_ref > 0) | near)
    np.testing.assert_allclose(f, f_ref, atol=2e-5)
    np.testing.assert_allclose(sae.decode(f_ref), x_hat_ref, atol=2e-5)
    assert 1 <= (f > 0).sum(1).min() and (f > 0).sum(1).max() > 4  # not a per-row top-k


@pytest.mark.parametrize("name", ["topk", "batchtopk_inference"])
def test_topk_and_jumprelu_round_trip_in_saelens_layout(tmp_path, name):
    sae = SparseAutoencoder.load(DATA / name, backend="numpy")
    sae.save(tmp_path / "s")
    cfg_m = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg_r = json.loads((DATA / name / "cfg.json").read_text())
    assert set(cfg_m) == set(cfg_r)
    for key in set(cfg_r) - {"metadata"}:
        assert cfg_m[key] == cfg_r[key], key
    with safe_open(str(tmp_path / "s" / "sae_weights.safetensors"), "np") as a, \
            safe_open(str(DATA / name / "sae_weights.safetensors"), "np") as b:
        assert set(a.keys()) == set(b.keys())
        for k in b.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k))
    back = SparseAutoencoder.load(tmp_path / "s", backend="numpy")
    x = _fixture(name)[0]
    np.testing.assert_array_equal(back.encode(x), sae.encode(x))


def test_topk_rescale_by_decoder_norm_is_folded(tmp_path):
    """rescale_acts_by_decoder_norm: SAELens multiplies pre by ||W_dec[i]||
    before the top-k and divides f by it before decoding."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "sae"
    d.mkdir()
    cfg = json.loads((DATA / "topk" / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = True
    (d / "cfg.json").write_text(json.dumps(cfg))
    t = load_file(str(DATA / "topk" / "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"] * np.linspace(0.5, 2.0, 64, dtype=np.float32)[:, None]
    save_file(t, str(d / "sae_weights.safetensors"))
    x = _fixture("topk")[0].astype(np.float64)
    n = np.linalg.norm(t["W_dec"].astype(np.float64), axis=1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
    keep = np.argsort(-pre, axis=1)[:, :4]
    f = np.zeros_like(pre)
    np.put_along_axis(f, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    x_hat = (f / n) @ t["W_dec"] + t["b_dec"]
    sae = SparseAutoencoder.load(d, backend="numpy")
    np.testing.assert_allclose(sae.encode(x.astype(np.float32)), f, atol=5e-5)
    np.testing.assert_allclose(sae.reconstruct(x.astype(np.float32)), x_hat, atol=5e-5)


def test_plain_jumprelu_sae_trains_as_jumprelu(tmp_path):
    # BatchTopK-saved SAEs train further as BatchTopK; a jumprelu SAE without
    # training_architecture "batchtopk" (e.g. a published JumpReLU SAE) as JumpReLU
    import json
    import shutil

    d = tmp_path / "jr"
    shutil.copytree(DATA / "batchtopk_inference", d)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["metadata"].pop("training_architecture", None)
    (d / "cfg.json").write_text(json.dumps(cfg))
    sae = SparseAutoencoder.load(d)
    assert (sae.activation, sae.decoder_norm) == ("jumprelu", "unit_norm")
    assert SparseAutoencoder.load(DATA / "topk").activation == "topk"
    bt = SparseAutoencoder.load(DATA / "batchtopk_inference")
    assert (bt.activation, bt.k) == ("batchtopk", 4)


def test_bad_topk_and_jumprelu_files(tmp_path):
    from safetensors.numpy import load_file, save_file

    for name, change, match in [("topk", {"k": None}, "missing the required field 'k'"),
                                ("topk", {"k": 65}, "exceeds d_sae"),
                                ("batchtopk_inference", {}, "no tensor 'threshold'")]:
        d = tmp_path / f"{name}-{len(change)}-{match[:3]}"
        d.mkdir()
        cfg = json.loads((DATA / name / "cfg.json").read_text())
        for k, v in change.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (d / "cfg.json").write_text(json.dumps(cfg))
        t = load_file(str(DATA / name / "sae_weights.safetensors"))
        if not change:
            del t["threshold"]
        save_file(t, str(d / "sae_weights.safetensors"))
        with pytest.raises(SAEFormatError, match=match):
            SparseAutoencoder.load(d)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SparseAutoencoder.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SAEFormatError, match="no cfg.json"):
        SparseAutoencoder.load(empty)
    d = _copy_standard(tmp_path)
    (d / "sae_weights.safetensors").unlink()
    (d / "sae_weights.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SAEFormatError, match="pickled files are never loaded"):
        SparseAutoencoder.load(d)
    (d / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFormatError, match="cannot read"):
        SparseAutoencoder.load(d)
    (d / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        SparseAutoencoder.load(d)


def test_missing_or_nonfinite_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy_standard(tmp_path)
    t = load_file(str(d / "sae_weights.safetensors"))
    del t["b_enc"]
    save_file(t, str(d / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="no tensor 'b_enc'"):
        SparseAutoencoder.load(d)
    t = load_file(str(STANDARD / "sae_weights.safetensors"))
    t["W_dec"][0, 0] = np.nan
    save_file(t, str(d / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="NaN"):
        SparseAutoencoder.load(d)


def test_float64_weights_are_converted(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy_standard(tmp_path, dtype="torch.float64")
    t = {k: v.astype(np.float64) for k, v in load_file(str(STANDARD / "sae_weights.safetensors")).items()}
    save_file(t, str(d / "sae_weights.safetensors"))
    sae = SparseAutoencoder.load(d)
    assert sae.W_enc.dtype == np.float32
    x, f_ref, _ = _fixture()
    np.testing.assert_allclose(sae.encode(x), f_ref, atol=2e-5)


# ------------------------------------------- fastsae-written, read by SAELens
WRITTEN = Path(__file__).parent / "data" / "fastsae_written"
WRITTEN_NAMES = ("relu", "topk", "batchtopk")


def _roundtrip_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_roundtrip",
                                                  WRITTEN / "make_roundtrip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_fastsae_written_checkpoints_run_the_same_in_saelens(name, backend):
    """tests/data/fastsae_written/: files fastsae saved (relu as standard,
    topk, BatchTopK for inference as jumprelu), loaded by SAELens 6.54.12's
    ``SAE.load_from_disk``, with SAELens's encode/decode outputs stored
    beside them (see make_roundtrip.py). fastsae's outputs on its own files
    must match SAELens's (same comparison rule as above; 16-term dots)."""
    d = WRITTEN / name
    x = np.load(d / "x.npy")
    f_ref, x_hat_ref = np.load(d / "saelens_f.npy"), np.load(d / "saelens_x_hat.npy")
    sae = SparseAutoencoder.load(d, backend=backend.name)
    f = sae.encode(x)
    active = f_ref > 0
    assert active.any(axis=1).mean() > 0.6 and active.mean() < 0.5  # a real, sparse test
    pre = _pre64(sae, x)
    unsure = np.abs(pre) < 1e-5
    if name == "batchtopk":
        unsure |= np.abs(pre - sae.threshold) < 1e-5
    if name == "topk":
        kth = np.sort(pre, axis=1)[:, [-sae.k - 1, -sae.k]]
        unsure |= (np.abs(pre - kth[:, :1]) < 1e-5) | (np.abs(pre - kth[:, 1:]) < 1e-5)
    np.testing.assert_array_equal((f > 0) | unsure, active | unsure)
    np.testing.assert_allclose(f, f_ref, atol=2e-5)
    np.testing.assert_allclose(sae.decode(f_ref), x_hat_ref, atol=2e-5)
    np.testing.assert_allclose(sae.reconstruct(x), x_hat_ref, atol=1e-4)


def test_fastsae_still_writes_the_layout_saelens_read(tmp_path):
    """Regenerating the files with today's fastsae gives the same cfg.json
    (all fields, except fastsae's version) and the same tensor names, shapes
    and dtypes as the files SAELens loaded. (Values may differ in the last
    bits across BLAS builds, so they are not compared here.)"""
    _roundtrip_script().write(tmp_path)
    for name in WRITTEN_NAMES:
        new = json.loads((tmp_path / name / "cfg.json").read_text())
        old = json.loads((WRITTEN / name / "cfg.json").read_text())
        for c in (new, old):
            c["metadata"].pop("fastsae_version")
        assert new == old, name
        with safe_open(str(tmp_path / name / "sae_weights.safetensors"), "np") as a, \
                safe_open(str(WRITTEN / name / "sae_weights.safetensors"), "np") as b:
            assert set(a.keys()) == set(b.keys())
            for k in b.keys():
                ta, tb = a.get_tensor(k), b.get_tensor(k)
                assert (ta.shape, ta.dtype) == (tb.shape, tb.dtype), (name, k)
