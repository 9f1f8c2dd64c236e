"""The target-L0 controller (``TrainConfig.target_l0``, ``--target-l0``):
the controller's law, its refusals, exact resume, and the issue's bar: on
the built-in synthetic problem a ReLU run ends within 10% of targets from 8
to 128."""

import json
import math

import numpy as np
import pytest

import fastsae
from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import DEFAULT_SYNTHETIC, main as cli_main
from fastsae.data import synthetic
from fastsae.training.controller import L0Controller

from conftest import crash_at_step, fast_cpu_backend

BE = fast_cpu_backend()


def test_controller_law():
    c = L0Controller(32.0, gain=0.1)
    assert c.factor == 1.0
    c.update(32.0)
    assert c.factor == 1.0  # on target: no change
    c.update(1e9)  # far above: one clipped step up
    assert c.factor == pytest.approx(math.exp(0.1))
    c.update(0.0)  # far below (log(1/33) < -1): one clipped step down
    assert c.factor == pytest.approx(1.0)
    c.update(float("nan"))  # ignored
    assert c.factor == pytest.approx(1.0)
    c.update(65.0)
    assert c.state == pytest.approx(0.1 * math.log(66 / 33))
    for _ in range(10_000):
        c.update(1e9)
    assert c.factor == pytest.approx(1e4)  # bounded
    d = L0Controller(32.0, gain=0.1)
    d.load_state_dict(c.state_dict())
    assert d.state == c.state


def test_refusals(tmp_path, capsys):
    x = np.ones((64, 8), np.float32)
    for act, k in (("topk", 2), ("batchtopk", 2), ("jumprelu", None)):
        m = SparseAutoencoder(8, 16, activation=act, k=k)
        with pytest.raises(ValueError, match="target_l0"):
            Trainer(m, x, TrainConfig(target_l0=4))
    with pytest.raises(ValueError, match="target_l0"):
        TrainConfig(target_l0=0.0).validate()
    with pytest.raises(ValueError, match="target_l0_gain"):
        TrainConfig(target_l0_gain=0.0).validate()
    np.save(tmp_path / "x.npy", x)
    for argv in (["--activation", "topk", "--target-l0", "4"],
                 ["--activation", "jumprelu", "--target-l0", "4"],
                 ["--target-l0", "0"]):
        assert cli_main(["train", "--data", str(tmp_path / "x.npy"), "--steps", "1",
                         "--no-progress"] + argv) != 0
        assert "target-l0" in capsys.readouterr().err


def test_coefficient_is_logged_and_resume_is_exact(tmp_path):
    ds = synthetic(n_rows=8192, d_in=16, n_features=48, l0=3.0, seed=2)
    cfg = TrainConfig(steps=45, batch_size=128, checkpoint_every=10, log_every=5,
                      target_l0=6.0, progress=False, eval_rows=1024)

    def model():
        return SparseAutoencoder(16, 64, seed=4, backend=BE)
    full_t = Trainer(model(), ds.x, cfg, out_dir=tmp_path / "full")
    full = full_t.train()
    coefs = [h["l1_coefficient"] for h in full.history if "l1_coefficient" in h]
    assert len(set(coefs)) > 2  # the controller moved it
    assert coefs[-1] == pytest.approx(cfg.l1_at(44) * full_t.controller.factor)
    t = Trainer(model(), ds.x, cfg, out_dir=tmp_path / "cut")
    crash_at_step(t, 27)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    rt = Trainer.resume(tmp_path / "cut", ds.x, backend=BE)
    assert rt.step == 20
    resumed = rt.train()
    assert rt.controller.state == full_t.controller.state
    for n in fastsae.SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(resumed.model, n), getattr(full.model, n), n)


def test_cli_target_l0(tmp_path, capsys):
    data = synthetic(n_rows=4096, d_in=16, n_features=32, l0=3.0, seed=0).x
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "run"
    assert cli_main(["train", "--data", str(tmp_path / "x.npy"), "--target-l0", "5",
                     "--d-sae", "64", "--steps", "20", "--batch-size", "128", "--backend", BE,
                     "--out", str(out), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert Trainer.read_checkpoint(out)[1]["config"]["target_l0"] == 5.0
    assert cli_main(["train", "--resume", str(out), "--target-l0", "6"]) != 0
    assert "cannot change" in capsys.readouterr().err


@pytest.mark.parametrize("target", [8, 32, 128])
def test_relu_run_ends_within_ten_percent_of_the_target(target, record_property):
    syn = dict(DEFAULT_SYNTHETIC)
    syn["magnitude"] = tuple(syn["magnitude"])
    ds = synthetic(**syn)
    m = SparseAutoencoder(syn["d_in"], 2 * syn["n_features"], backend=BE, seed=0,
                          decoder_norm="unit_norm")
    r = Trainer(m, ds.x, TrainConfig(steps=1000, target_l0=float(target), progress=False,
                                     eval_rows=16384), threads=1).train()
    l0 = r.metrics["l0"]
    print(f"\n[target L0 {target}, backend {BE}] final L0 {l0:.2f} "
          f"({100 * (l0 / target - 1):+.1f}%), EV {r.metrics['explained_variance']:.3f}")
    record_property("final_l0", l0)
    assert abs(l0 / target - 1) <= 0.10


def test_checkpoint_without_controller_state_is_refused(tmp_path):
    from fastsae.io import SAEFormatError
    from fastsae.training.checkpoint import read_checkpoint, write_checkpoint

    ds = synthetic(n_rows=2048, d_in=16, n_features=32, l0=3.0, seed=1)
    cfg = TrainConfig(steps=4, batch_size=64, target_l0=5.0, progress=False, eval_rows=256)
    Trainer(SparseAutoencoder(16, 32, backend="numpy"), ds.x, cfg,
            out_dir=tmp_path / "run").train()
    path = tmp_path / "run" / "checkpoint.safetensors"
    tensors, st = read_checkpoint(path)
    st["controller"] = None
    write_checkpoint(path, tensors, st)
    with pytest.raises(SAEFormatError, match="target-L0 controller"):
        Trainer.resume(tmp_path / "run", ds.x, backend="numpy")
