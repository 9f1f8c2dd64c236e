"""Trainer: schedules, metrics, dead features, normalization folding,
checkpoints (atomic), bit-exact resume, NaN handling."""

import json
import os

import numpy as np
import pytest

import fastsae
from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.data import synthetic
from fastsae.training import TrainingDiverged

from conftest import crash_at_step, small_train_config

USABLE = [s.name for s in fastsae.available_backends() if s.available]


@pytest.fixture(scope="module")
def problem():
    return synthetic(n_rows=4096, d_in=16, n_features=48, l0=3, seed=2)


_cfg = small_train_config


# ---------------------------------------------------------------- config
def test_schedules():
    c = TrainConfig(steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2,
                    l1_coefficient=2.0, l1_warmup_steps=20)
    assert c.lr_at(0) == pytest.approx(0.1)
    assert c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(50) == 1.0
    assert c.lr_at(79) == 1.0
    assert c.lr_at(80) == pytest.approx(1.0)  # decay starts: (100 - 80) / 20
    assert c.lr_at(90) == pytest.approx(0.5)
    assert c.lr_at(99) == pytest.approx(0.05)
    assert c.l1_at(0) == pytest.approx(0.1) and c.l1_at(19) == 2.0 and c.l1_at(60) == 2.0
    assert TrainConfig(total_tokens=1000, batch_size=300).total_steps == 4


def test_default_warmups_stay_inside_short_runs():
    """``None`` warm-ups: min(150 resp. 300, max(1, total_steps // 10))."""
    for steps, lr_w, l1_w in ((5, 1, 1), (100, 10, 10), (2000, 150, 200), (50000, 150, 300)):
        c = TrainConfig(steps=steps)
        assert (c.resolved_lr_warmup_steps(), c.resolved_l1_warmup_steps()) == (lr_w, l1_w)
    c = TrainConfig(steps=100, lr=1.0, l1_coefficient=2.0)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == 1.0
    assert c.l1_at(4) == pytest.approx(1.0) and c.l1_at(9) == 2.0
    c = TrainConfig(steps=100, lr=1.0, lr_warmup_steps=0, l1_warmup_steps=0)
    assert c.lr_at(0) == 1.0 and c.l1_at(0) == c.l1_coefficient
    assert TrainConfig(total_tokens=512 * 40).resolved_lr_warmup_steps() == 4
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        TrainConfig(lr_warmup_steps=-1).validate()


@pytest.mark.parametrize("field, value, err", [
    ("steps", 0, ValueError), ("batch_size", 1.5, TypeError), ("lr", -1.0, ValueError),
    ("lr", float("nan"), ValueError), ("beta1", 1.0, ValueError), ("eps", 0.0, ValueError),
    ("l1_coefficient", -0.1, ValueError), ("b_dec_init", "median", ValueError),
    ("lr_decay_fraction", 1.5, ValueError), ("total_tokens", 0, ValueError),
])
def test_config_validation(field, value, err):
    with pytest.raises(err, match=field):
        TrainConfig(**{field: value}).validate()


def test_data_dimension_mismatch(problem):
    with pytest.raises(ValueError, match="d_in = 16 but the model expects d_in = 8"):
        Trainer(SparseAutoencoder(8, 16), problem.x)


# ---------------------------------------------------------------- training
def test_training_improves_and_reports(problem, tmp_path, capsys):
    sae = SparseAutoencoder(16, 96, seed=0)
    res = Trainer(sae, problem.x, _cfg(steps=150), out_dir=tmp_path,
                  true_dictionary=problem.dictionary).train()
    h = res.history
    assert h[0]["step"] == 10 and h[-1]["step"] == 150
    assert h[-1]["mse"] < h[0]["mse"]
    for key in ("mse", "l1", "total", "l0", "explained_variance", "dead_fraction",
                "recovered", "mean_max_cosine", "lr", "l1_coefficient", "tokens"):
        assert key in h[-1], key
    m = res.metrics
    assert m["explained_variance"] > 0.5 and m["steps"] == 150 and m["tokens"] == 150 * 128
    assert m["backend"] == sae.backend.name and m["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in h]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 150
    dens = res.density
    assert sum(dens["counts"]) + dens["dead"] == 96
    assert dens["dead"] == round(m["dead_fraction"] * 96)
    # quiet when stderr is not a terminal: no progress bar
    assert "it/s" not in capsys.readouterr().err and "step/s" not in capsys.readouterr().err
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    np.testing.assert_array_equal(loaded.W_dec, sae.W_dec)


def test_normalization_is_folded_into_saved_sae(problem, tmp_path):
    raw = problem.x * 40.0 + 3.0  # far from unit scale
    sae = SparseAutoencoder(16, 96, seed=0)
    res = Trainer(sae, raw, _cfg(steps=150), out_dir=tmp_path).train()
    assert res.metrics["scale"] == pytest.approx(
        np.sqrt(16 / np.mean(np.sum(raw.astype(np.float64) ** 2, 1))), rel=1e-3)
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    x = raw[:2048]
    x_hat = loaded.reconstruct(x)
    ev = 1 - np.sum((x_hat - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert ev == pytest.approx(res.metrics["explained_variance"], abs=0.03)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["fastsae_activation_scale_folded"] == pytest.approx(res.metrics["scale"])


def test_unit_norm_mode_keeps_decoder_rows_unit(problem):
    sae = SparseAutoencoder(16, 64, decoder_norm="unit_norm")
    Trainer(sae, problem.x, _cfg(steps=30, normalize_activations=False)).train()
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, rtol=1e-4)


def test_dead_features_are_counted_and_resampled(problem):
    sae = SparseAutoencoder(16, 64, seed=1)
    sae.params.b_enc[:20] = -1e4  # these never fire
    cfg = _cfg(steps=40, lr=1e-4, l1_coefficient=0.0, b_dec_init="none")
    t = Trainer(sae, problem.x, cfg)
    t.train()
    assert t.dead_fraction() >= 20 / 64
    sae2 = SparseAutoencoder(16, 64, seed=1)
    sae2.params.b_enc[:20] = -1e4
    t2 = Trainer(sae2, problem.x, _cfg(steps=40, lr=1e-4, l1_coefficient=0.0, b_dec_init="none",
                                       resample_every=20, resample_until=0.6))
    res = t2.train()
    events = [h for h in res.history if h.get("event") == "resample"]
    assert events and events[0]["resampled"] >= 20
    assert (sae2.b_enc[:20] > -1e3).all()
    assert t2.dead_fraction() < 20 / 64


@pytest.mark.parametrize("name", USABLE)
def test_resume_equals_uninterrupted_run(problem, tmp_path, name):
    """Interrupted after a checkpoint at step 30, resumed: the final
    parameters equal an uninterrupted run's bit for bit (same backend).
    Resampling is on, so the saved RNG and firing windows matter too."""
    cfg = _cfg(steps=70, checkpoint_every=15, resample_every=20, resample_until=0.8,
               dead_window=8)

    def model():
        m = SparseAutoencoder(16, 64, seed=3, backend=name)
        m.params.b_enc[:10] = -1e4
        return m
    full = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "full").train()
    t = Trainer(model(), problem.x, cfg, out_dir=tmp_path / "cut")
    crash_at_step(t, 38)  # killed mid-run
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 30
    resumed = Trainer.resume(tmp_path / "cut", problem.x, backend=name).train()
    for n in fastsae.SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(resumed.model, n), getattr(full.model, n), n)
    strip = ("elapsed_s", "tokens_per_s")
    a = [{k: v for k, v in r.items() if k not in strip} for r in full.history]
    b = [{k: v for k, v in r.items() if k not in strip} for r in resumed.history]
    assert a == b  # the metrics log too
    logged = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [r["step"] for r in full.history]


def test_crash_during_checkpoint_write_keeps_last_good_one(problem, tmp_path, monkeypatch):
    cfg = _cfg(steps=40, checkpoint_every=10)
    t = Trainer(SparseAutoencoder(16, 32), problem.x, cfg, out_dir=tmp_path)
    import fastsae.io as fio
    real_replace, n = os.replace, {"calls": 0}

    def failing_replace(src, dst):
        if str(dst).endswith("checkpoint.safetensors"):
            n["calls"] += 1
            if n["calls"] == 2:  # the second checkpoint: crash between write and rename
                raise OSError("simulated crash")
        return real_replace(src, dst)
    monkeypatch.setattr(fio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        t.train()
    monkeypatch.setattr(fio.os, "replace", real_replace)
    _, state = Trainer.read_checkpoint(tmp_path)
    assert state["step"] == 10
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    r = Trainer.resume(tmp_path, problem.x).train()
    assert r.metrics["steps"] == 40


def test_truncated_checkpoint_is_rejected(problem, tmp_path):
    t = Trainer(SparseAutoencoder(16, 32), problem.x, _cfg(steps=5), out_dir=tmp_path)
    t.train()
    p = tmp_path / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read"):
        Trainer.resume(tmp_path, problem.x)
    with pytest.raises(FileNotFoundError):
        Trainer.resume(tmp_path / "nothing", problem.x)


def test_nan_in_data_is_rejected_with_step(problem):
    x = problem.x.copy()
    x[1000, 3] = np.nan
    cfg = _cfg(steps=50, normalize_activations=False, b_dec_init="none")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(batch of step \d+"):
        Trainer(SparseAutoencoder(16, 32), x, cfg).train()
    with pytest.raises(ValueError, match="NaN or infinite"):
        Trainer(SparseAutoencoder(16, 32), x, _cfg(steps=5)).train()


def test_divergence_stops_with_step_and_keeps_checkpoint(problem, tmp_path):
    cfg = _cfg(steps=200, checkpoint_every=2, lr_warmup_steps=0, lr=1e-3)
    t = Trainer(SparseAutoencoder(16, 32), problem.x, cfg, out_dir=tmp_path)
    real = t.state.step

    def exploding(x, lr, l1c, fc):
        if t.step >= 5:
            lr = 1e38  # Adam moves every weight by ~lr: the loss overflows
        return real(x, lr, l1c, fc)
    t.state.step = exploding
    with pytest.raises(TrainingDiverged, match=r"at step \d+ .*last good checkpoint .*step \d+"):
        t.train()
    _, st = Trainer.read_checkpoint(tmp_path)
    assert st["step"] <= t.step
    tensors, _ = Trainer.read_checkpoint(tmp_path)
    assert all(np.isfinite(v).all() for k, v in tensors.items() if k.startswith("param."))
    assert not (tmp_path / "sae").exists()


def test_total_tokens_and_pretrained_model(problem):
    sae = SparseAutoencoder(16, 48, seed=0)
    Trainer(sae, problem.x, _cfg(total_tokens=128 * 20 + 1)).train()
    assert sae.backend is not None
    before = sae.encode(problem.x[:256])
    # continuing from a trained (raw-space) model starts where it left off
    t = Trainer(sae, problem.x, _cfg(steps=1, lr=1e-9))
    t.train()
    np.testing.assert_allclose(sae.encode(problem.x[:256]), before, atol=1e-3)


def test_resume_reopens_file_data_from_anywhere(problem, tmp_path, monkeypatch):
    np.save(tmp_path / "acts.npy", problem.x)
    monkeypatch.chdir(tmp_path)
    Trainer(SparseAutoencoder(16, 32), "acts.npy", _cfg(steps=10),
            out_dir=tmp_path / "run").train()
    monkeypatch.chdir("/")
    t = Trainer.resume(tmp_path / "run")  # data path taken from the checkpoint
    assert t.source.n_rows == problem.x.shape[0] and t.step == 10
    with pytest.raises(ValueError, match="pass the data explicitly"):
        Trainer(SparseAutoencoder(16, 32), problem.x, _cfg(steps=2),
                out_dir=tmp_path / "mem").train()
        Trainer.resume(tmp_path / "mem")
