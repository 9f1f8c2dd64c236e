"""Matryoshka BatchTopK above the kernels: model, prefix decoding, SAELens's
``matryoshka_batchtopk`` files (training and inference saves), the trainer
(per-prefix metrics, exact resume), the CLI, and the quality bar of issue 15.
The kernels are tested against the oracle in tests/test_matryoshka.py.

Training runs on the fastest usable CPU backend (numba, then cython, else
the numpy reference).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastsae import SAEParams, SparseAutoencoder, SparseCodes, TrainConfig, Trainer
from fastsae import reference as R
from fastsae.cli import main as cli_main
from fastsae.data import synthetic
from fastsae.io import SAEFormatError
from fastsae.model import default_matryoshka_widths
from fastsae.training.state import MatryoshkaState

from conftest import crash_at_step, fast_cpu_backend

DATA = Path(__file__).parent / "data" / "saelens" / "matryoshka_batchtopk"
BE = fast_cpu_backend()


def _cfg(**kw):
    base = dict(steps=40, batch_size=128, lr=3e-3, lr_warmup_steps=5, progress=False,
                eval_rows=1024, log_every=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def problem():
    return synthetic(n_rows=16384, d_in=16, n_features=48, l0=3.0, seed=3)


# ------------------------------------------------------------------ model
def test_model_arguments():
    m = SparseAutoencoder(8, 64, activation="matryoshka_batchtopk", k=4)
    assert m.widths == [8, 16, 32, 64] == default_matryoshka_widths(64)
    assert (m.architecture, m.decoder_norm) == ("jumprelu", "unit_norm")
    assert m.threshold.shape == (64,)
    assert "widths=[8, 16, 32, 64]" in repr(m)
    assert SparseAutoencoder(8, 5, activation="matryoshka_batchtopk", k=1).widths == [1, 2, 5]
    assert SparseAutoencoder(8, 1, activation="matryoshka_batchtopk", k=1).widths == [1]
    m = SparseAutoencoder(8, 10, activation="matryoshka_batchtopk", k=2, widths=(3, 10))
    assert m.widths == [3, 10] and m.copy().widths == [3, 10]
    with pytest.raises(ValueError, match="needs k"):
        SparseAutoencoder(8, 10, activation="matryoshka_batchtopk")
    with pytest.raises(ValueError, match="widths are only used"):
        SparseAutoencoder(8, 10, activation="batchtopk", k=2, widths=[5, 10])
    for bad, match in (([5, 5, 10], "strictly increasing"), ([5, 9], "last width"),
                       ([0, 10], "strictly increasing"), ([], "non-empty")):
        with pytest.raises(ValueError, match=match):
            SparseAutoencoder(8, 10, activation="matryoshka_batchtopk", k=2, widths=bad)
    with pytest.raises(TypeError, match="integers"):
        SparseAutoencoder(8, 10, activation="matryoshka_batchtopk", k=2, widths=[2.5, 10])


def test_prefix_decode_matches_dense():
    rng = np.random.default_rng(0)
    m = SparseAutoencoder(6, 20, activation="relu", backend="numpy")
    m.params.b_dec[:] = rng.standard_normal(6)
    f = rng.standard_normal((5, 20)).clip(0).astype(np.float32)
    f[2] = 0  # an empty row
    codes = SparseCodes.from_dense(f)
    for w in (1, 7, 19, 20):
        want = f[:, :w] @ m.W_dec[:w] + m.b_dec
        np.testing.assert_allclose(m.decode(codes, width=w), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.decode(f, width=w), want, rtol=1e-5, atol=1e-6)
        p = codes.prefix(w)
        assert p.shape == codes.shape and np.all(p.to_dense() == np.where(
            np.arange(20) < w, f, 0))
    with pytest.raises(ValueError, match="at most d_sae"):
        m.decode(codes, width=21)


# ------------------------------------------------------------------ SAELens files
@pytest.mark.parametrize("save", ["save_model", "save_inference_model"])
def test_saelens_fixture(save):
    """Both of SAELens 6.54's saves load as a trainable Matryoshka SAE and
    reproduce SAELens's own outputs: the training save's f.npy is the
    training class's encode (BatchTopK over the 16-row batch), the
    inference save's the JumpReLU at the learned threshold."""
    d = DATA / save
    m = SparseAutoencoder.load(d, backend="numpy")
    assert (m.activation, m.k, m.widths, m.architecture) == (
        "matryoshka_batchtopk", 4, [8, 24, 64], "jumprelu")
    x, f, x_hat = (np.load(d / n) for n in ("x.npy", "f.npy", "x_hat.npy"))
    if save == "save_model":
        got = R.encode_batchtopk(x, m.W_enc, m.b_enc, m.b_dec, m.k).to_dense()
        inference = np.load(DATA / "save_inference_model" / "f.npy")
        # the training save run for inference: the inference save's answer
        np.testing.assert_allclose(m.encode(x), inference, rtol=1e-5, atol=1e-5)
    else:
        got = m.encode(x)
    assert np.array_equal(got != 0, f != 0)
    np.testing.assert_allclose(got, f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.decode(got), x_hat, rtol=1e-5, atol=1e-5)


def test_saelens_training_save_errors(tmp_path):
    src = DATA / "save_model"
    cfg = json.loads((src / "cfg.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(src, d)
        c = dict(cfg, **changes)
        (d / "cfg.json").write_text(json.dumps(c))
        return d

    # SAELens appends d_sae to widths that stop short of it
    assert SparseAutoencoder.load(variant("short", matryoshka_widths=[8, 24])).widths == [
        8, 24, 64]
    for name, bad, match in (("dup", [8, 8, 64], "strictly increasing"),
                             ("str", "8,24,64", "list of integers"),
                             ("big", [8, 128], "last width")):
        with pytest.raises(SAEFormatError, match=match):
            SparseAutoencoder.load(variant(name, matryoshka_widths=bad))
    with pytest.raises(SAEFormatError, match="k = 65 exceeds"):
        SparseAutoencoder.load(variant("k", k=65))
    # the threshold tensor: missing, or not one finite float
    from fastsae.io import load_tensors, save_tensors
    t, _ = load_tensors(src / "sae_weights.safetensors")
    for name, thr, match in (("nothr", None, "no tensor 'topk_threshold'"),
                             ("vec", np.ones(3), "must be one finite float"),
                             ("nan", np.array(np.nan), "must be one finite float")):
        d = variant(name)
        t2 = {k: v for k, v in t.items() if k != "topk_threshold"}
        if thr is not None:
            t2["topk_threshold"] = thr
        save_tensors(d / "sae_weights.safetensors", t2)
        with pytest.raises(SAEFormatError, match=match):
            SparseAutoencoder.load(d)


def test_save_load_roundtrip(tmp_path):
    m = SparseAutoencoder(8, 24, activation="matryoshka_batchtopk", k=3, widths=[6, 12, 24])
    m.threshold[:] = 0.25
    m.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    meta = cfg["metadata"]
    assert meta["training_architecture"] == "matryoshka_batchtopk"
    assert meta["training_architecture_details"]["matryoshka_widths"] == [6, 12, 24]
    back = SparseAutoencoder.load(tmp_path / "sae")
    assert (back.activation, back.k, back.widths) == ("matryoshka_batchtopk", 3, [6, 12, 24])
    assert np.all(back.threshold == np.float32(0.25))
    # SAELens's training layout: architecture matryoshka_batchtopk, a float64 scalar
    m.save(tmp_path / "train", layout="training")
    cfg_t = json.loads((tmp_path / "train" / "cfg.json").read_text())
    assert cfg_t["architecture"] == "matryoshka_batchtopk"
    assert (cfg_t["k"], cfg_t["matryoshka_widths"]) == (3, [6, 12, 24])
    from fastsae.io import load_tensors
    t, _ = load_tensors(tmp_path / "train" / "sae_weights.safetensors")
    assert t["topk_threshold"].shape == () and t["topk_threshold"].dtype == np.float64
    back = SparseAutoencoder.load(tmp_path / "train")
    assert (back.activation, back.k, back.widths) == ("matryoshka_batchtopk", 3, [6, 12, 24])
    assert np.all(back.threshold == np.float32(0.25))
    with pytest.raises(ValueError, match="layout must be"):
        m.save(tmp_path / "x", layout="train")
    with pytest.raises(ValueError, match="layout='training' is for"):
        SparseAutoencoder(8, 24, activation="topk", k=2).save(tmp_path / "y", layout="training")
    m.threshold[0] = 1.0
    with pytest.raises(ValueError, match="one threshold"):
        m.save(tmp_path / "z", layout="training")
    # metadata naming matryoshka with unusable widths: still loads, as JumpReLU
    meta["training_architecture_details"]["matryoshka_widths"] = [6, 30]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert SparseAutoencoder.load(tmp_path / "sae").activation == "jumprelu"


# ------------------------------------------------------------------ trainer
def test_trains_and_logs_prefixes(problem, tmp_path):
    m = SparseAutoencoder(16, 64, activation="matryoshka_batchtopk", k=3, backend=BE,
                          widths=[8, 16, 64])
    tr = Trainer(m, problem.x, _cfg(), out_dir=tmp_path / "run")
    assert isinstance(tr.state, MatryoshkaState)
    res = tr.train()
    rec = tr.history[-1]
    for key in ("explained_variance_8", "explained_variance_16"):
        assert key in rec and key in res.metrics
        assert -1.0 < rec[key] < rec["explained_variance"] + 0.05
    assert res.metrics["explained_variance_8"] < res.metrics["explained_variance_16"]
    back = SparseAutoencoder.load(tmp_path / "run" / "sae")
    assert (back.activation, back.widths) == ("matryoshka_batchtopk", [8, 16, 64])


def test_resume_is_exact(problem, tmp_path):
    """Interrupted after the step-20 checkpoint and resumed: bit-identical
    parameters, BatchTopK threshold and logged prefix metrics to an
    uninterrupted run."""
    cfg = _cfg(steps=45, checkpoint_every=10)

    def model():
        return SparseAutoencoder(16, 48, activation="matryoshka_batchtopk", k=3, seed=4,
                                 backend=BE, widths=[6, 12, 48])
    full_t = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "full")
    full = full_t.train()
    t = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "cut")
    crash_at_step(t, 27)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    rt = Trainer.resume(tmp_path / "cut", problem.x, backend=BE)
    assert rt.step == 20 and rt.model.widths == [6, 12, 48]
    resumed = rt.train()
    for n in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(resumed.model, n), getattr(full.model, n), n)
    np.testing.assert_array_equal(resumed.model.threshold, full.model.threshold)
    assert rt.history[-1]["explained_variance_6"] == full_t.history[-1]["explained_variance_6"]


# ------------------------------------------------------------------ CLI
def test_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--activation", "matryoshka_batchtopk", "--k", "4", "--widths",
                   "16,64,512", "--steps", "20", "--batch-size", "128", "--backend", BE,
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "by the first 16 features" in text and "by the first 64 features" in text
    m = SparseAutoencoder.load(out / "sae")
    assert (m.activation, m.k, m.widths) == ("matryoshka_batchtopk", 4, [16, 64, 512])
    for args, match in ((["--activation", "batchtopk", "--widths", "8,512"], "--widths needs"),
                        (["--activation", "matryoshka_batchtopk", "--widths", "8,100"],
                         "last width")):
        assert cli_main(["train", *args, "--steps", "2", "--backend", BE]) != 0
        assert match in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(out), "--widths", "8,512"]) != 0
    assert "cannot change when resuming" in capsys.readouterr().err


# ------------------------------------------------------------------ quality bar
def _ev(x, x_hat):
    return 1.0 - np.sum((x_hat - x) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)


def test_smallest_prefix_beats_batchtopk_top_latents():
    """Issue 15's bar: the Matryoshka SAE's smallest prefix (d_sae/8 latents)
    alone explains more variance than the d_sae/8 most frequently firing
    latents of a BatchTopK SAE trained at the same k, steps and seed."""
    prob = synthetic(n_rows=32768, d_in=32, n_features=128, l0=4.0, seed=7)
    d_sae, k = 256, 4
    cfg = _cfg(steps=300, batch_size=256, eval_rows=4096)
    mat = SparseAutoencoder(32, d_sae, activation="matryoshka_batchtopk", k=k, backend=BE)
    Trainer(mat, prob.x, cfg).train()
    btk = SparseAutoencoder(32, d_sae, activation="batchtopk", k=k, backend=BE)
    Trainer(btk, prob.x, cfg).train()
    x = prob.x[-4096:]
    w = d_sae // 8
    ev_mat = _ev(x, mat.decode(mat.encode(x, sparse=True), width=w))
    codes = btk.encode(x, sparse=True)
    top = np.argsort(-np.bincount(codes.indices, minlength=d_sae), kind="stable")[:w]
    keep = np.zeros(d_sae, bool)
    keep[top] = True
    f = codes.to_dense()
    f[:, ~keep] = 0
    ev_btk = _ev(x, btk.decode(f))
    print(f"smallest prefix ({w} latents): matryoshka {ev_mat:.3f}, batchtopk top-{w} "
          f"{ev_btk:.3f}")
    assert ev_mat > ev_btk + 0.02
