"""Transcoder files (fastsae.io): SAELens's four transcoder architectures,
sparsify's transcoders and skip transcoders, Gemma Scope's npz layout.

Fixtures (tests/data/saelens/*transcoder, tests/data/sparsify/*transcoder,
copied from ../shared/fixtures) were written by SAELens 6.54.12 and
eai-sparsify 1.3.3 with their own ``encode`` (``f.npy``) and ``forward``
(``y_hat.npy``) outputs. The outputs are recomputed here from the loaded
arrays with the transcoder math (in float64):

    pre   = x @ W_enc + b_enc                      (x raw: no centering)
    f     = relu(pre)                              transcoder, skip_transcoder
          = relu(pre) * (pre > threshold)          jumprelu_*
          = top k of relu(pre) per row             sparsify (k from cfg)
    y_hat = f @ W_dec + b_dec [+ x @ W_skip.T]     skip variants

Nothing is unpickled.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastsae.io import (SAEFormatError, load_tensors, read_gemma_scope, read_sae_dir,
                        read_sparsify, save_tensors, write_sae_dir, write_sparsify)
from fastsae.params import SAEParams

DATA = Path(__file__).parent / "data"
SAELENS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SPARSIFY = ("transcoder", "skip_transcoder")
# The fixtures' outputs are float32 sums of at most d_sae + 2 * d_in = 96 products
# (pre: 16 terms; y_hat: 64 decoder terms, 16 skip terms, the bias), computed
# by torch in another order than this float64 recomputation: within 96 u of
# the sum of the terms' magnitudes (u = 2**-24, Higham ch. 3), which stays
# below 1.5 here: 96 * 6e-8 * 1.5 < 1e-5. (The READMEs measured <= 1e-6.)
TOL = dict(rtol=0, atol=1e-5)


def _forward(params, x, *, threshold=None, k=None):
    """(f, y_hat) in float64 from the transcoder math above."""
    x = x.astype(np.float64)
    pre = x @ params.W_enc.astype(np.float64) + params.b_enc
    f = np.maximum(pre, 0.0)
    if threshold is not None:
        f = f * (pre > threshold)
    if k is not None:
        drop = np.argsort(-f, axis=1, kind="stable")[:, k:]
        np.put_along_axis(f, drop, 0.0, axis=1)
    y = f @ params.W_dec.astype(np.float64) + params.b_dec
    if params.W_skip is not None:
        y = y + x @ params.W_skip.astype(np.float64).T
    return f, y


def _check_outputs(d, params, **kw):
    x, f_ref, y_ref = (np.load(d / n) for n in ("x.npy", "f.npy", "y_hat.npy"))
    f, y = _forward(params, x, **kw)
    np.testing.assert_array_equal(f > 0, f_ref > 0)  # the same active set
    np.testing.assert_allclose(f, f_ref, **TOL)
    np.testing.assert_allclose(y, y_ref, **TOL)


# ------------------------------------------------------------ SAELens reads
@pytest.mark.parametrize("arch", SAELENS)
def test_saelens_transcoders_match_saelens_outputs(arch):
    d = DATA / "saelens" / arch
    params, cfg, extras = read_sae_dir(d)
    assert cfg["architecture"] == arch and cfg["apply_b_dec_to_input"] is False
    assert extras["transcoder"] is True and extras["d_out"] == 24 == params.d_out
    assert params.W_enc.shape == (16, 64) and params.W_dec.shape == (64, 24)
    assert params.b_dec.shape == (24,)
    raw, _ = load_tensors(d / "sae_weights.safetensors")
    for name in raw:
        if name != "threshold":
            np.testing.assert_array_equal(getattr(params, name), raw[name])  # nothing folded
    if "skip" in arch:
        assert params.W_skip.shape == (24, 16) and params.W_skip.dtype == np.float32
    else:
        assert params.W_skip is None
    if arch.startswith("jumprelu"):
        assert extras["threshold"].shape == (64,) and extras["threshold"].dtype == np.float32
    else:
        assert "threshold" not in extras
    _check_outputs(d, params, threshold=extras.get("threshold"))


def test_saes_carry_no_transcoder_key():
    for name in ("standard", "topk", "gated"):
        _, _, extras = read_sae_dir(DATA / "saelens" / name)
        assert "transcoder" not in extras and "d_out" not in extras


# ----------------------------------------------------------- SAELens writes
@pytest.mark.parametrize("arch", SAELENS)
def test_saelens_fixture_read_write_read_is_unchanged(arch, tmp_path):
    src = DATA / "saelens" / arch
    params, cfg, extras = read_sae_dir(src)
    out = write_sae_dir(tmp_path / arch, params, cfg["metadata"], architecture=arch,
                        threshold=extras.get("threshold"))
    # the weights file is byte for byte SAELens's; cfg.json has its fields in its order
    assert ((out / "sae_weights.safetensors").read_bytes()
            == (src / "sae_weights.safetensors").read_bytes())
    written = json.loads((out / "cfg.json").read_text())
    assert list(written) == list(cfg)
    assert {k: v for k, v in written.items() if k != "metadata"} == {
        k: v for k, v in cfg.items() if k != "metadata"}
    assert written["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    p2, cfg2, extras2 = read_sae_dir(out)
    for name in params.names:
        np.testing.assert_array_equal(getattr(p2, name), getattr(params, name))
    assert p2.names == params.names and extras2.keys() == extras.keys()
    if "threshold" in extras:
        np.testing.assert_array_equal(extras2["threshold"], extras["threshold"])
    _check_outputs(src, p2, threshold=extras2.get("threshold"))


def _random(rng, d_in, d_sae, d_out, skip):
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return SAEParams(f32(d_in, d_sae), f32(d_sae), f32(d_sae, d_out), f32(d_out),
                     W_skip=f32(d_out, d_in) if skip else None)


@pytest.mark.parametrize("arch", SAELENS)
@pytest.mark.parametrize("d_in, d_sae, d_out", [(7, 5, 3), (3, 9, 11), (6, 1, 6), (4, 3, 1)])
def test_write_then_read_gives_identical_arrays(arch, d_in, d_sae, d_out, tmp_path):
    rng = np.random.default_rng(d_in * 100 + d_out)
    params = _random(rng, d_in, d_sae, d_out, "skip" in arch)
    thr = rng.uniform(0, 1, d_sae).astype(np.float32) if arch.startswith("jumprelu") else None
    write_sae_dir(tmp_path, params, {"hook_name_out": "h.out"}, architecture=arch,
                  threshold=thr)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_out"] == d_out and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name_out"] == "h.out"
    assert list(cfg) == list(json.loads((DATA / "saelens" / arch / "cfg.json").read_text()))
    p2, _, extras = read_sae_dir(tmp_path)
    assert p2.names == params.names and extras["d_out"] == d_out
    for name in params.names:
        np.testing.assert_array_equal(getattr(p2, name), getattr(params, name))
    if thr is not None:
        np.testing.assert_array_equal(extras["threshold"], thr)


def test_write_refuses_mismatched_skip_and_threshold(tmp_path):
    rng = np.random.default_rng(0)
    plain, skip = _random(rng, 4, 6, 5, False), _random(rng, 4, 6, 5, True)
    with pytest.raises(ValueError, match="skip_transcoder needs params.W_skip"):
        write_sae_dir(tmp_path, plain, architecture="skip_transcoder")
    for arch, p in (("transcoder", skip), ("standard", _random(rng, 4, 6, 4, True))):
        with pytest.raises(ValueError, match=f"architecture '{arch}' has no skip connection"):
            write_sae_dir(tmp_path, p, architecture=arch)
    bad = SAEParams(*skip.arrays()[:4], W_skip=skip.W_skip.T.copy())
    with pytest.raises(ValueError, match="W_skip has shape"):
        write_sae_dir(tmp_path, bad, architecture="skip_transcoder")
    with pytest.raises(ValueError, match="threshold of shape"):
        write_sae_dir(tmp_path, plain, architecture="jumprelu_transcoder")
    with pytest.raises(ValueError, match="W_dec has shape"):  # an SAE's W_dec is d_in wide
        write_sae_dir(tmp_path, plain, architecture="standard")


# ------------------------------------------------------- SAELens: bad files
def _variant(tmp_path, src, cfg_changes=None, tensors=None):
    """A copy of the fixture folder ``src`` with cfg fields changed (None:
    the field is absent) and the weights file's tensors mapped by ``tensors``."""
    d = tmp_path / "v"
    shutil.copytree(src, d)
    if cfg_changes:
        cfg = {**json.loads((d / "cfg.json").read_text()), **cfg_changes}
        (d / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if tensors is not None:
        wpath = next(d.glob("*.safetensors"))
        save_tensors(wpath, tensors(load_tensors(wpath)[0]))
    return d


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _set(name, fn):
    return lambda t: {**t, name: fn(t)}


_NAN = lambda t: np.full(24, np.nan, np.float32)  # noqa: E731


@pytest.mark.parametrize("arch, cfg, tensors, match", [
    ("skip_transcoder", None, _set("W_skip", lambda t: t["W_skip"].T.copy()),
     r"W_skip has shape \(16, 24\).*implies \(24, 16\)"),
    ("jumprelu_skip_transcoder", None, _drop("W_skip"),
     "no tensor 'W_skip', which a jumprelu_skip_transcoder holds"),
    ("transcoder", None, _set("W_skip", lambda t: np.zeros((24, 16), np.float32)),
     "holds a tensor 'W_skip' but architecture 'transcoder' has no skip connection"),
    ("skip_transcoder", {"architecture": "jumprelu_transcoder"}, None,
     "'jumprelu_transcoder' has no skip connection"),
    ("transcoder", {"d_out": 23}, None, r"W_dec has shape \(64, 24\).*d_out=23"),
    ("transcoder", {"d_out": None}, None, "missing the required field 'd_out'"),
    ("transcoder", {"d_out": 0}, None, "'d_out' must be a positive integer"),
    ("skip_transcoder", None, _set("W_skip", lambda t: t["W_skip"] * np.nan),
     "W_skip contains NaN"),
    ("transcoder", None, _set("b_dec", _NAN), "b_dec contains NaN"),
    ("jumprelu_transcoder", None, _set("threshold", lambda t: t["threshold"] * np.inf),
     "threshold contains NaN or infinite"),
    ("jumprelu_transcoder", None, _drop("threshold"), "no tensor 'threshold'"),
    ("skip_transcoder", None, _set("W_skip", lambda t: t["W_skip"].astype(np.int32)),
     "W_skip has dtype int32"),
    ("transcoder", {"apply_b_dec_to_input": True}, None,
     "transcoder must have apply_b_dec_to_input false"),
    ("jumprelu_skip_transcoder", {"apply_b_dec_to_input": True}, None,
     "jumprelu_skip_transcoder must have apply_b_dec_to_input false"),
])
def test_bad_saelens_transcoders_give_clear_errors(tmp_path, arch, cfg, tensors, match):
    with pytest.raises(SAEFormatError, match=match):
        read_sae_dir(_variant(tmp_path, DATA / "saelens" / arch, cfg, tensors))


def test_w_skip_in_an_sae_is_refused(tmp_path):
    d = tmp_path / "std"
    shutil.copytree(DATA / "saelens" / "standard", d)
    t, _ = load_tensors(d / "sae_weights.safetensors")
    save_tensors(d / "sae_weights.safetensors", {**t, "W_skip": np.eye(16, dtype=np.float32)})
    with pytest.raises(SAEFormatError, match="'standard' has no skip connection"):
        read_sae_dir(d)


def test_missing_apply_b_dec_reads_as_false_for_a_transcoder(tmp_path):
    d = _variant(tmp_path, DATA / "saelens" / "transcoder", {"apply_b_dec_to_input": None})
    params, _, _ = read_sae_dir(d)
    _check_outputs(d, params)


# ------------------------------------------------------------------ sparsify
@pytest.mark.parametrize("name", SPARSIFY)
def test_sparsify_transcoders_match_sparsify_outputs(name):
    d = DATA / "sparsify" / name
    params, cfg, extras = read_sparsify(d)
    assert cfg["architecture"] == "topk" and cfg["d_out"] == 16
    assert extras == {"k": 4, "transcoder": True, "d_out": 16}
    raw, _ = load_tensors(d / "sae.safetensors")
    np.testing.assert_array_equal(params.W_enc, raw["encoder.weight"].T)
    np.testing.assert_array_equal(params.b_enc, raw["encoder.bias"])  # nothing folded
    if name == "skip_transcoder":
        np.testing.assert_array_equal(params.W_skip, raw["W_skip"])
    else:
        assert params.W_skip is None
    _check_outputs(d, params, k=extras["k"])


def test_sparsify_sae_still_reads_as_an_sae():
    _, _, extras = read_sparsify(DATA / "sparsify" / "topk")
    assert extras == {"k": 4}


@pytest.mark.parametrize("name", ("topk",) + SPARSIFY)
def test_sparsify_fixture_read_write_read_is_unchanged(name, tmp_path):
    src = DATA / "sparsify" / name
    params, _, extras = read_sparsify(src)
    out = write_sparsify(tmp_path / name, params, extras["k"],
                         transcoder=extras.get("transcoder", False))
    for f in ("cfg.json", "sae.safetensors"):  # byte for byte what sparsify wrote
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    p2, _, extras2 = read_sparsify(out)
    assert extras2 == extras and p2.names == params.names
    for n in params.names:
        np.testing.assert_array_equal(getattr(p2, n), getattr(params, n))


@pytest.mark.parametrize("transcoder, skip, d_out", [
    (False, False, 6), (True, False, 6), (True, True, 6), (True, False, 3), (True, True, 9),
    (True, True, 1)])
def test_write_sparsify_round_trip(tmp_path, transcoder, skip, d_out):
    rng = np.random.default_rng(d_out + 10 * skip)
    params = _random(rng, 6, 5, d_out, skip)
    write_sparsify(tmp_path, params, 2, transcoder=transcoder, metadata={"run": "r1"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["transcode"] is transcoder and cfg["skip_connection"] is skip
    assert ("d_out" in cfg) == (d_out != 6)
    p2, info, extras = read_sparsify(tmp_path)
    assert info["metadata"]["run"] == "r1" and extras["k"] == 2
    assert extras.get("transcoder", False) is transcoder
    for n in params.names:
        np.testing.assert_array_equal(getattr(p2, n), getattr(params, n))
    assert p2.names == params.names


def test_write_sparsify_refuses_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="an SAE .transcoder=False. needs W_skip None"):
        write_sparsify(tmp_path, _random(rng, 6, 5, 6, True), 2, transcoder=False)
    with pytest.raises(ValueError, match="an SAE"):
        write_sparsify(tmp_path, _random(rng, 6, 5, 4, False), 2, transcoder=False)
    with pytest.raises(ValueError, match="k must be"):
        write_sparsify(tmp_path, _random(rng, 6, 5, 6, False), 6, transcoder=True)
    bad = _random(rng, 6, 5, 4, True)
    bad.W_skip = bad.W_skip.T.copy()
    with pytest.raises(ValueError, match="W_skip has shape"):
        write_sparsify(tmp_path, bad, 2, transcoder=True)
    with pytest.raises(TypeError, match="transcoder must be"):
        write_sparsify(tmp_path, _random(rng, 6, 5, 6, False), 2, transcoder=None)


@pytest.mark.parametrize("name, cfg, tensors, match", [
    ("skip_transcoder", None, _set("W_skip", lambda t: t["W_skip"][:, :8].copy()),
     r"W_skip has shape \(16, 8\)"),
    ("skip_transcoder", None, _drop("W_skip"), "skip transcoder .skip_connection true. holds"),
    ("transcoder", None, _set("W_skip", lambda t: np.eye(16, dtype=np.float32)),
     "a sparsify transcoder .skip_connection false. holds exactly"),
    ("transcoder", {"skip_connection": True}, None, "holds exactly W_dec, W_skip"),
    ("skip_transcoder", {"transcode": False}, None, "skip_connection true, transcode false"),
    ("skip_transcoder", None, _set("W_skip", lambda t: t["W_skip"] * np.nan),
     "W_skip contains NaN"),
    ("transcoder", {"transcode": "yes"}, None, "transcode must be true or false"),
    ("transcoder", {"d_out": 12}, None, r"W_dec has shape \(64, 16\)"),
    ("topk", {"d_out": 12}, None, "d_out = 12 differs from d_in = 16 but transcode is false"),
])
def test_bad_sparsify_transcoders_give_clear_errors(tmp_path, name, cfg, tensors, match):
    with pytest.raises(SAEFormatError, match=match):
        read_sparsify(_variant(tmp_path, DATA / "sparsify" / name, cfg, tensors))


# --------------------------------------------------------------- Gemma Scope
def _gemma(tmp_path, d_in, d_sae, d_out, **extra):
    """Gemma Scope's documented layout (W_enc [d_in, d_sae], W_dec [d_sae,
    d_out], b_enc, b_dec, threshold; float32) from seeded random weights."""
    rng = np.random.default_rng(7)
    params = _random(rng, d_in, d_sae, d_out, False)
    params.b_enc = (0.3 * params.b_enc).astype(np.float32)
    thr = rng.uniform(0.05, 0.6, d_sae).astype(np.float32)
    f = tmp_path / "params.npz"
    np.savez(f, W_enc=params.W_enc, W_dec=params.W_dec, b_enc=params.b_enc,
             b_dec=params.b_dec, threshold=thr, **extra)
    return f, params, thr


def test_gemma_scope_transcoder_by_width(tmp_path):
    f, ref, thr = _gemma(tmp_path, 8, 12, 5)
    params, cfg, extras = read_gemma_scope(f)
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["d_out"] == 5
    assert extras["transcoder"] is True and extras["d_out"] == 5
    np.testing.assert_array_equal(params.b_enc, ref.b_enc)  # not folded
    np.testing.assert_array_equal(extras["threshold"], thr)
    x = np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32)
    _, y = _forward(params, x, threshold=thr)
    pre = x.astype(np.float64) @ ref.W_enc + ref.b_enc  # Gemma Scope's own equations
    want = np.where(pre > thr, np.maximum(pre, 0), 0) @ ref.W_dec + ref.b_dec
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)
    with pytest.raises(SAEFormatError, match="a transcoder, but transcoder=False"):
        read_gemma_scope(f, transcoder=False)


def test_gemma_scope_equal_widths(tmp_path):
    f, ref, _ = _gemma(tmp_path, 8, 12, 8)
    sae, cfg, extras = read_gemma_scope(f)  # an SAE unless told: b_dec @ W_enc folded
    assert cfg["architecture"] == "jumprelu" and "transcoder" not in extras
    fold = (ref.b_enc + ref.b_dec.astype(np.float64) @ ref.W_enc).astype(np.float32)
    np.testing.assert_array_equal(sae.b_enc, fold)
    tc, cfg, extras = read_gemma_scope(f, transcoder=True)
    assert cfg["architecture"] == "jumprelu_transcoder" and extras["d_out"] == 8
    np.testing.assert_array_equal(tc.b_enc, ref.b_enc)


def test_gemma_scope_skip_and_bad_shapes_are_refused(tmp_path):
    f, _, _ = _gemma(tmp_path, 8, 12, 5, W_skip=np.zeros((5, 8), np.float32))
    with pytest.raises(SAEFormatError, match="W_skip: a Gemma Scope transcoder with a skip"):
        read_gemma_scope(f)
    rng = np.random.default_rng(0)
    np.savez(f, W_enc=rng.standard_normal((8, 12)), W_dec=rng.standard_normal((12, 5)),
             b_enc=np.zeros(12), b_dec=np.zeros(8), threshold=np.zeros(12))
    with pytest.raises(SAEFormatError, match=r"b_dec has shape \(8,\), expected \(5,\)"):
        read_gemma_scope(f)
