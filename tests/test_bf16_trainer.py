"""Training runs with ``precision``: ``TrainConfig.precision`` and how a run
resolves it (``auto``), what the run records (summary, checkpoint), bit-exact
resume of a bf16 run (the copy rebuilt, the last density kept), the resumed
run keeping its precision, resampling marking the copy stale, and
``fastsae train --precision``.

The bf16 runs here force the path they test with ``FASTSAE_BF16_PATH`` where
it matters: ``emulated`` runs on every CPU (the CI machine may lack
AVX512-BF16), ``avx512bf16`` only where this CPU has it (else skipped)."""

import json

import numpy as np
import pytest

import fastsae
from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.backends import bf16 as BF
from fastsae.cli import main
from fastsae.data import synthetic

from conftest import crash_at_step, small_train_config

COMPILED = [n for n in ("numba", "cython")
            if any(s.name == n and s.available for s in fastsae.available_backends())]
HAVE_KERNELS = bool(BF.available_paths())
HW = "avx512bf16" in BF.available_paths()

needs_kernels = pytest.mark.skipif(not (HAVE_KERNELS and COMPILED),
                                   reason="compiled bf16 kernels or numba/cython unavailable")


@pytest.fixture(autouse=True)
def _no_path_from_outside(monkeypatch):
    monkeypatch.delenv("FASTSAE_BF16_PATH", raising=False)


@pytest.fixture(scope="module")
def problem():
    return synthetic(n_rows=4096, d_in=16, n_features=48, l0=3, seed=2)


_cfg = small_train_config


# ---------------------------------------------------------------- resolution
def test_precision_field_is_validated():
    assert TrainConfig().precision == "auto"
    for bad in ("fp16", "BF16", None, 1):
        with pytest.raises(ValueError, match="precision"):
            TrainConfig(precision=bad).validate()


def test_resolve_precision_rules(monkeypatch):
    numpy_be = fastsae.get_backend("numpy")
    assert TrainConfig(precision="fp32").resolve_precision(numpy_be, "relu")[:2] == ("fp32", None)
    # auto never picks the numpy backend's slow emulation; explicit bf16 runs it
    assert TrainConfig().resolve_precision(numpy_be, "relu")[0] == "fp32"
    assert TrainConfig(precision="bf16").resolve_precision(numpy_be, "topk")[:2] == \
        ("bf16", "numpy")
    for act in ("batchtopk", "matryoshka_batchtopk", "jumprelu"):
        assert TrainConfig(precision="bf16").resolve_precision(numpy_be, act)[:2] == \
            ("bf16", "numpy")
    p, path, why = TrainConfig().resolve_precision(numpy_be, None)
    assert (p, path) == ("fp32", None) and "relu, topk, batchtopk" in why
    with pytest.raises(ValueError, match="relu, topk, batchtopk"):
        TrainConfig(precision="bf16").resolve_precision(numpy_be, None)
    # JumpReLU in bf16: its default sparsity mode only
    for kw in (dict(jumprelu_sparsity_loss_mode="tanh"), dict(pre_act_loss_coefficient=3e-6),
               dict(jumprelu_sparsity_loss_mode="quadratic", target_l0=8)):
        p, path, why = TrainConfig(**kw).resolve_precision(numpy_be, "jumprelu")
        assert (p, path) == ("fp32", None) and "default sparsity mode" in why, kw
        with pytest.raises(ValueError, match="default sparsity mode"):
            TrainConfig(precision="bf16", **kw).resolve_precision(numpy_be, "jumprelu")
    assert TrainConfig(precision="bf16", jumprelu_sparsity_loss_mode="step").resolve_precision(
        numpy_be, "jumprelu")[0] == "bf16"
    with pytest.raises(ValueError, match="distributed"):
        TrainConfig(precision="bf16").resolve_precision(numpy_be, "relu", "data")
    assert TrainConfig().resolve_precision(numpy_be, "relu", "data")[0] == "fp32"


@needs_kernels
@pytest.mark.parametrize("name", COMPILED)
def test_resolve_precision_on_compiled_backends(name, monkeypatch):
    be = fastsae.get_backend(name)
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    p, path, why = TrainConfig().resolve_precision(be, "relu")
    assert p == "fp32" and "no bfloat16 instructions" in why  # auto skips the slow path
    assert TrainConfig(precision="bf16").resolve_precision(be, "relu")[:2] == ("bf16", "emulated")
    monkeypatch.setenv("FASTSAE_BF16_PATH", "nonsense")
    assert TrainConfig().resolve_precision(be, "topk")[0] == "fp32"
    with pytest.raises(ValueError, match="FASTSAE_BF16_PATH"):
        TrainConfig(precision="bf16").resolve_precision(be, "topk")
    monkeypatch.delenv("FASTSAE_BF16_PATH")
    want = ("bf16", "avx512bf16") if HW else ("fp32", None)
    for act in ("relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"):
        assert TrainConfig().resolve_precision(be, act)[:2] == want
    # JumpReLU: bf16 in its default sparsity mode only
    assert TrainConfig(precision="bf16").resolve_precision(be, "jumprelu")[0] == "bf16"
    assert TrainConfig(jumprelu_sparsity_loss_mode="tanh").resolve_precision(
        be, "jumprelu")[0] == "fp32"


def test_cuda_backend_refuses_bf16_runs():
    try:
        be = fastsae.get_backend("cuda")
    except (ValueError, RuntimeError, ImportError) as exc:
        pytest.skip(f"cuda backend unavailable: {exc}")
    assert TrainConfig().resolve_precision(be, "relu")[0] == "fp32"
    with pytest.raises(ValueError, match="float32"):
        TrainConfig(precision="bf16").resolve_precision(be, "relu")


def test_trainer_refuses_bf16_where_it_cannot_run(problem):
    m = SparseAutoencoder(16, 64, seed=3, backend="numpy", activation="jumprelu")
    with pytest.raises(ValueError, match="default sparsity mode"):
        Trainer(m, problem.x, _cfg(precision="bf16", jumprelu_sparsity_loss_mode="tanh"))


# ---------------------------------------------------------------- runs
def _paths():
    return ["emulated"] + (["avx512bf16"] if HW else [])


@needs_kernels
@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "matryoshka_batchtopk",
                                        "jumprelu"])
def test_bf16_run_records_its_precision(problem, tmp_path, monkeypatch, name, path,
                                        activation):
    monkeypatch.setenv("FASTSAE_BF16_PATH", path)
    k = None if activation in ("relu", "jumprelu") else 4
    m = SparseAutoencoder(16, 64, seed=3, backend=name, activation=activation, k=k)
    t = Trainer(m, problem.x, _cfg(steps=30, precision="bf16", checkpoint_every=15),
                out_dir=tmp_path)
    r = t.train()
    assert (r.metrics["precision"], r.metrics["bf16_path"]) == ("bf16", path)
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert (summary["precision"], summary["bf16_path"]) == ("bf16", path)
    _, st = Trainer.read_checkpoint(tmp_path)
    assert (st["precision"], st["bf16_path"]) == ("bf16", path)
    assert st["bf16_density"] == pytest.approx(BF.last_density(t.state.state))
    assert np.isfinite(r.metrics["explained_variance"])


@needs_kernels
@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "matryoshka_batchtopk",
                                        "jumprelu"])
def test_bf16_resume_equals_uninterrupted_run(problem, tmp_path, monkeypatch, name,
                                              activation):
    """As test_trainer's exact-resume test, in bf16: the resumed run packs
    its copy afresh (equal to the fused one bit for bit) and reads the last
    density back, so a ReLU run takes the same path on every step. The ReLU
    problem crosses the dense-path threshold (fresh init: dense; later
    sparse), so both paths run, and resampling marks the copy stale."""
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    k = None if activation in ("relu", "jumprelu") else 4
    cfg = _cfg(steps=70, checkpoint_every=15, resample_every=20, resample_until=0.8,
               dead_window=8, precision="bf16")

    def model():
        m = SparseAutoencoder(16, 64, seed=3, backend=name, activation=activation, k=k)
        m.params.b_enc[:10] = -1e4
        return m
    paths = []
    full_t = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "full")
    real = full_t.state.step

    def spy(*a, **kw):  # which path each step took (copy written: bf16 encoder)
        out = real(*a, **kw)
        paths.append(full_t.state.state.bf16.key is not None)
        return out
    full_t.state.step = spy
    full = full_t.train()
    if activation == "relu":
        assert any(paths) and not all(paths), "the run must take both paths"
    t = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "cut")
    crash_at_step(t, 38)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    resumed = Trainer.resume(tmp_path / "cut", problem.x, backend=name).train()
    assert resumed.metrics["precision"] == "bf16"
    for n in fastsae.SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(resumed.model, n), getattr(full.model, n), n)
    strip = ("elapsed_s", "tokens_per_s")
    a = [{k_: v for k_, v in r.items() if k_ not in strip} for r in full.history]
    b = [{k_: v for k_, v in r.items() if k_ not in strip} for r in resumed.history]
    assert a == b


@needs_kernels
@pytest.mark.parametrize("name", COMPILED)
def test_resume_keeps_the_runs_precision(problem, tmp_path, monkeypatch, name):
    """A run resolved to bf16 resumes in bf16 even where ``auto`` would now
    give fp32 (the emulated path forced), and says the path changed; a
    resolved fp32 run stays fp32 where auto would give bf16."""
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    Trainer(SparseAutoencoder(16, 64, seed=3, backend=name), problem.x,
            _cfg(steps=20, precision="bf16"), out_dir=tmp_path / "b").train()
    r = Trainer.resume(tmp_path / "b", problem.x)
    assert (r.precision, r.bf16_path) == ("bf16", "emulated")
    Trainer(SparseAutoencoder(16, 64, seed=3, backend=name), problem.x,
            _cfg(steps=20), out_dir=tmp_path / "a").train()  # auto -> fp32 here
    monkeypatch.delenv("FASTSAE_BF16_PATH")
    r = Trainer.resume(tmp_path / "a", problem.x)
    assert r.precision == "fp32"
    if HW:  # the bf16 run moves from the emulated path to the hardware one
        with pytest.warns(fastsae.training.loop.NotBitExactWarning, match="bf16 path"):
            r = Trainer.resume(tmp_path / "b", problem.x)
        assert r.bf16_path == "avx512bf16"


@needs_kernels
@pytest.mark.parametrize("name", COMPILED)
def test_resampling_marks_the_copy_stale(problem, monkeypatch, name):
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    t = Trainer(SparseAutoencoder(16, 64, seed=3, backend=name), problem.x,
                _cfg(steps=5, precision="bf16"))
    t.train()
    st = t.state.state
    st.bf16.key = ("forged",)  # whatever it was: resampling must clear it
    density = BF.last_density(st)
    dead = np.zeros(64, bool)
    dead[:3] = True
    assert t.state.resample(dead, problem.x[:256], np.random.default_rng(0)) == 3
    assert st.bf16.key is None and BF.last_density(st) == density


# ---------------------------------------------------------------- command line
@needs_kernels
def test_cli_precision_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    out = tmp_path / "run"
    assert main(["train", "--steps", "12", "--precision", "bf16", "--out", str(out)]) == 0
    assert "bf16 (emulated path)" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["metrics"]["precision"] == "bf16"
    # resuming with the flag as given, or as resolved, works; another precision does not
    for ok in ("bf16", None):
        extra = [] if ok is None else ["--precision", ok]
        assert main(["train", "--resume", str(out), *extra]) == 0
    assert main(["train", "--resume", str(out), "--precision", "fp32"]) == 2
    assert "--precision fp32" in capsys.readouterr().err
    assert main(["train", "--steps", "12", "--precision", "fp32", "--out",
                 str(tmp_path / "f")]) == 0
    assert "fp32" in capsys.readouterr().out
    assert main(["train", "--steps", "12", "--precision", "bf16", "--activation", "batchtopk",
                 "--out", str(tmp_path / "g")]) == 0
    assert "bf16 (emulated path)" in capsys.readouterr().out
    assert main(["train", "--steps", "12", "--precision", "bf16", "--activation", "jumprelu",
                 "--out", str(tmp_path / "h")]) == 0
    assert "bf16 (emulated path)" in capsys.readouterr().out
    assert main(["train", "--steps", "12", "--precision", "bf16", "--activation", "jumprelu",
                 "--jumprelu-sparsity-loss-mode", "tanh", "--out", str(tmp_path / "i")]) != 0
    assert "default sparsity mode" in capsys.readouterr().err


# ---------------------------------------------------------------- the model's default
@pytest.mark.parametrize("name", ["numpy"] + COMPILED)
def test_model_precision_is_the_encode_default(name, tmp_path, monkeypatch):
    if name != "numpy" and not HAVE_KERNELS:
        pytest.skip("compiled bf16 kernels unavailable")
    monkeypatch.setenv("FASTSAE_BF16_PATH", "emulated")
    x = np.random.default_rng(0).standard_normal((37, 16)).astype(np.float32)
    m = SparseAutoencoder(16, 64, seed=3, backend=name, precision="bf16", activation="topk",
                          k=5)
    assert m.precision == "bf16" and m.copy().precision == "bf16"
    a, b = m.encode(x, sparse=True), m.encode(x, sparse=True, precision="bf16")
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())
    c = m.sparse_encoder()(x)
    np.testing.assert_array_equal(c.to_dense(), b.to_dense())
    f = m.encode(x, sparse=True, precision="fp32")  # an explicit argument wins
    np.testing.assert_array_equal(
        f.to_dense(), SparseAutoencoder(16, 64, seed=3, backend=name, activation="topk",
                                        k=5).encode(x, sparse=True).to_dense())
    assert SparseAutoencoder(16, 64).precision == "fp32"
    m.save(tmp_path / "sae")
    assert SparseAutoencoder.load(tmp_path / "sae").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        SparseAutoencoder(16, 64, precision="fp16")
