"""Data-parallel training over MPI (fastsae.distributed), with real mpiexec.

The in-process tests need nothing beyond NumPy (the rank's share of a
batch, the global BatchTopK selection on threads standing in for ranks).
The end-to-end ones run ``tests/distributed_worker.py`` under ``mpiexec``
and need ``pip install 'fastsae[mpi]'`` (mpi4py and the mpich wheel): they
are skipped without it, and CI installs it.

Tolerances against one process: the distributed step computes the same
gradients with the backend's unfused ``*_gradients`` kernels, sums the
ranks' float32 parts (weighted by their rows) and runs a separate Adam pass,
so its gradients differ from the fused step's by float32 rounding (relative
~1e-6). After one step Adam moves each element by ``lr * g / (|g| + eps)``
(bias-corrected moments of one gradient), which that rounding changes by
a relative ~1e-6 of ``lr`` = 4e-4, far below the ``atol`` 2e-6 we allow
beside ``rtol`` 1e-5 on the parameters themselves.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fastsae
from fastsae.backends import reference as R
from fastsae.data import ArraySource, BatchStream, ShardedSource
from fastsae.distributed.data_parallel import RankBatchStream, global_batchtopk, rank_rows

from conftest import CountingRows

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep
                       + os.environ.get("PATH", ""))


def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return MPIEXEC is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(), reason="needs pip install 'fastsae[mpi]'")


# ================================================================ the rank's rows
class CountingSource(CountingRows, ArraySource):
    pass


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch,ranks", [(64, 2), (61, 3), (5, 5), (128, 1)])
def test_rank_stream_is_a_slice_of_the_full_stream(shuffle, batch, ranks):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1000, 7)).astype(np.float32)
    full = BatchStream(a, batch, seed=3, shuffle=shuffle, block_rows=16, buffer_rows=200,
                       scale=1.5)
    parts = []
    for r in range(ranks):
        lo, hi = rank_rows(batch, r, ranks)
        parts.append(RankBatchStream(CountingSource(a), batch, lo=lo, hi=hi, seed=3,
                                     shuffle=shuffle, block_rows=16, buffer_rows=200,
                                     scale=1.5))
    for _ in range(40):  # several epochs and buffers
        want = full.next_batch()
        got = np.concatenate([p.next_batch() for p in parts])
        np.testing.assert_array_equal(got, want)
    for p in parts:  # each rank read its own rows only
        assert p.source.rows_read == 40 * (p.hi - p.lo)
        assert p.state_dict() == full.state_dict()


def test_rank_stream_on_shards_and_resume(tmp_path):
    rng = np.random.default_rng(1)
    for i, n in enumerate((300, 1, 157)):
        np.save(tmp_path / f"s{i}.npy", rng.standard_normal((n, 5)).astype(np.float32))
    src = ShardedSource(tmp_path)
    full = BatchStream(src, 50, seed=1)
    part = RankBatchStream(src, 50, lo=20, hi=37, seed=1)
    for _ in range(7):
        full.next_batch()
        part.next_batch()
    again = RankBatchStream(src, 50, lo=20, hi=37, seed=1)
    again.load_state_dict(part.state_dict())
    for _ in range(5):
        np.testing.assert_array_equal(again.next_batch(), full.next_batch()[20:37])


def test_rank_rows_cover_the_batch():
    for b in (1, 2, 7, 100, 4097):
        for size in range(1, min(b, 9) + 1):
            parts = [rank_rows(b, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == b
            assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1
    with pytest.raises(ValueError, match="not a part"):
        RankBatchStream(np.zeros((10, 2), np.float32), 4, lo=3, hi=6)


# ================================================================ global BatchTopK
class ThreadComm:
    """Ranks as threads: the two all-gathers global_batchtopk uses."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size

    def at(self, rank):
        outer = self

        class View:
            def __init__(self):
                self.rank, self.size = rank, outer.size

            def _gather(self, v):
                outer.slots[rank] = np.array(v)
                outer.barrier.wait()
                got = list(outer.slots)
                outer.barrier.wait()
                return got

            def allgather_ragged(self, v):
                return self._gather(v)

            def allgather_rows(self, v):
                return np.stack(self._gather(v))
        return View()


def _split_batchtopk(x, W, b, c, k, ranks, be):
    out = [None] * ranks
    comm = ThreadComm(ranks)
    errors = []

    def run(r):
        lo, hi = rank_rows(x.shape[0], r, ranks)
        try:
            out[r] = global_batchtopk(comm.at(r), be, x[lo:hi], W, b, c, k, x.shape[0],
                                      row_offset=lo)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            comm.barrier.abort()
    th = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not errors, errors
    return np.concatenate([o.to_dense() for o in out])


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("n,d_sae,k,ranks", [(12, 40, 3, 2), (13, 17, 5, 3), (3, 8, 8, 3),
                                             (1, 9, 2, 1), (40, 64, 1, 4)])
@pytest.mark.parametrize("regime", ["random", "ties", "few_positive", "none_positive"])
def test_global_batchtopk_equals_one_process(backend, n, d_sae, k, ranks, regime):
    be = fastsae.get_backend(backend)
    rng = np.random.default_rng(n * 100 + d_sae + k)
    d_in = 6
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    W = rng.standard_normal((d_in, d_sae)).astype(np.float32)
    b = rng.standard_normal(d_sae).astype(np.float32)
    c = np.zeros(d_in, np.float32)
    if regime == "ties":  # every pre-activation one of a few exact values
        x = np.zeros((n, d_in), np.float32)
        x[:, 0] = 1.0
        W = np.zeros((d_in, d_sae), np.float32)
        b = rng.integers(-1, 3, d_sae).astype(np.float32)
    elif regime == "few_positive":
        b -= 4.0
    elif regime == "none_positive":
        b -= 100.0
    want = R.encode_batchtopk(x, W, b, c, k).to_dense()
    got = _split_batchtopk(x, W, b, c, k, ranks, be)
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


# ================================================================ under mpiexec
def _run(spec, tmp_path, ranks, name, timeout=240, expect_ok=True):
    spec = dict(spec)
    spec.setdefault("out", str(tmp_path / f"{name}.npz"))
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    if spec.get("distributed"):
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(WORKER), str(p)]
    else:
        cmd = [sys.executable, str(WORKER), str(p)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    r.wall = time.monotonic() - t0
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return dict(np.load(spec["out"]))
    return r


def _params(d):
    return {k: v for k, v in d.items() if k not in ("metrics", "history_mse")}


FAMILIES = [dict(family="relu"), dict(family="relu", decoder_norm="unit_norm"),
            dict(family="topk"), dict(family="batchtopk"),
            dict(family="matryoshka_batchtopk"), dict(family="jumprelu"),
            dict(family="jumprelu", mode="tanh"), dict(family="relu", transcoder=True)]


def _fam_id(f):
    return "-".join(str(v) for v in f.values())


@needs_mpi
@pytest.mark.parametrize("fam", FAMILIES, ids=_fam_id)
def test_one_step_matches_one_process(fam, tmp_path):
    base = dict(fam, backend="numba", steps=1, batch_size=257)
    one = _run(dict(base, distributed=None), tmp_path, 1, "single")
    for ranks in (2, 3):
        got = _run(dict(base, distributed="data"), tmp_path, ranks, f"dp{ranks}")
        for name, want in _params(one).items():
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=2e-6,
                                       err_msg=f"{name} on {ranks} ranks")


@needs_mpi
@pytest.mark.parametrize("fam", [dict(family="relu"), dict(family="batchtopk"),
                                 dict(family="jumprelu")], ids=_fam_id)
def test_200_steps_agree_and_reruns_are_bit_identical(fam, tmp_path):
    base = dict(fam, backend="numba", steps=200, batch_size=256, log_every=50)
    one = _run(dict(base, distributed=None), tmp_path, 1, "single")
    a = _run(dict(base, distributed="data", check_every=7), tmp_path, 2, "a")
    b = _run(dict(base, distributed="data"), tmp_path, 2, "b")
    for name in _params(a):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    m1, m2 = json.loads(str(one["metrics"])), json.loads(str(a["metrics"]))
    assert m2["ranks"] == 2
    print(f"\n{_fam_id(fam)}: EV {m1['explained_variance']:.5f} vs {m2['explained_variance']:.5f}"
          f", L0 {m1['l0']:.3f} vs {m2['l0']:.3f}")
    assert abs(m1["explained_variance"] - m2["explained_variance"]) <= 0.002
    assert abs(m1["l0"] - m2["l0"]) <= 0.02 * m1["l0"]


@needs_mpi
def test_resume_on_the_same_and_other_rank_counts(tmp_path):
    base = dict(family="topk", backend="numba", steps=40, batch_size=128,
                distributed="data")
    whole = _run(base, tmp_path, 2, "whole")
    run = tmp_path / "run"
    _run(dict(base, out_dir=str(run), checkpoint_every=20, fault=dict(rank=1, step=31,
                                                                   kind="kill")),
         tmp_path, 2, "killed", expect_ok=False)
    st = fastsae.training.Trainer.read_checkpoint(run)[1]
    assert st["step"] == 20 and st["distributed"] == {"mode": "data", "ranks": 2}
    again = _run(dict(base, resume=str(run)), tmp_path, 2, "resumed")
    for name in _params(whole):
        np.testing.assert_array_equal(again[name], whole[name], err_msg=name)
    # one process, or three ranks, continue the same run (not bit for bit)
    for ranks, dist in ((1, None), (3, "data")):
        other = _run(dict(base, resume=str(run), distributed=dist), tmp_path, ranks,
                     f"resumed{ranks}")
        np.testing.assert_allclose(other["W_dec"], whole["W_dec"], atol=2e-3)


@needs_mpi
@pytest.mark.parametrize("kind", ["kill", "raise", "hang", "perturb"])
def test_a_failing_rank_stops_every_rank(kind, tmp_path):
    run = tmp_path / "run"
    spec = dict(family="relu", backend="numba", steps=60, batch_size=64, distributed="data",
                out_dir=str(run), checkpoint_every=10, timeout=20.0, check_every=5,
                fault=dict(rank=1, step=25, kind=kind))
    r = _run(spec, tmp_path, 2, "fault", timeout=120, expect_ok=False)
    assert r.returncode != 0
    assert r.wall < 90, r.wall
    err = r.stdout + r.stderr
    if kind == "raise":
        assert "rank 1 of 2 failed: RuntimeError: injected failure" in err
    if kind == "hang":
        assert "no progress for" in err
    if kind == "perturb":
        assert "RanksDiverged" in err and "ranks 1 hold other values" in err
    # the last good checkpoint is whole and readable
    tensors, st = fastsae.training.Trainer.read_checkpoint(run)
    assert st["step"] == 20 and np.isfinite(tensors["param.W_enc"]).all()


@needs_mpi
@pytest.mark.parametrize("mode", ["data", "features"])
def test_cli_distributed(mode, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "fastsae", "train", "--distributed",
           mode, "--steps", "30", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("explained variance") == 1  # rank 0 alone prints
    what = "data-parallel" if mode == "data" else "feature-sharded"
    assert f"2 ranks ({what})" in r.stdout
    assert (out / "summary.json").is_file()
    assert (out / "sae").is_dir() == (mode == "data")
    st = fastsae.training.Trainer.read_checkpoint(out)[1]
    assert st["distributed"] == {"mode": mode, "ranks": 2}
    if mode == "features":
        sae = fastsae.distributed.load_sharded_sae(out)
        assert sae.d_sae == st["model"]["d_sae"]
        again = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "fastsae", "train",
                                "--distributed", mode, "--resume", str(out), "--steps", "30",
                                "--no-progress"],
                               capture_output=True, text=True, timeout=240, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "continuing on 3 rank(s), not the run's 2" in again.stderr


def test_cli_says_which_extra_is_missing(monkeypatch, capsys):
    from fastsae import cli
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    rc = cli.main(["train", "--distributed", "data", "--steps", "1"])
    assert rc != 0
    assert "pip install 'fastsae[mpi]'" in capsys.readouterr().err


def test_trainer_refuses_bad_distributed_arguments():
    m = fastsae.SparseAutoencoder(4, 8, backend="numpy")
    x = np.zeros((16, 4), np.float32)
    with pytest.raises(ValueError, match="distributed must be None, 'data' or 'features'"):
        fastsae.training.Trainer(m, x, distributed="model")


# ================================================================ feature sharding
from fastsae.distributed.features import (FeatureShardedSAE, feature_bounds,  # noqa: E402
                                         read_shards, sharded_init)


@pytest.mark.parametrize("kw", [dict(), dict(decoder_norm="unit_norm"),
                                dict(activation="topk", k=3),
                                dict(transcoder=True, d_out=5, skip=True)])
@pytest.mark.parametrize("d_sae,ranks", [(1, 1), (7, 3), (40, 4), (9000, 2)])
def test_sharded_init_is_the_slice_of_the_models(kw, d_sae, ranks):
    if kw.get("k", 0) > d_sae:
        pytest.skip("k > d_sae")
    whole = fastsae.SparseAutoencoder(6, d_sae, seed=11, **kw).params
    spec = FeatureShardedSAE(6, d_sae, seed=11, **kw)
    parts = [sharded_init(spec, lo, hi) for lo, hi in feature_bounds(d_sae, ranks)]
    np.testing.assert_array_equal(np.concatenate([p.W_enc for p in parts], axis=1),
                                  whole.W_enc)
    np.testing.assert_array_equal(np.concatenate([p.W_dec for p in parts]), whole.W_dec)
    np.testing.assert_array_equal(np.concatenate([p.b_enc for p in parts]), whole.b_enc)
    for p in parts:
        np.testing.assert_array_equal(p.b_dec, whole.b_dec)
        assert (p.W_skip is None) == (whole.W_skip is None)


def test_feature_spec_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="not supported yet"):
        FeatureShardedSAE(4, 8, activation="matryoshka_batchtopk")
    with pytest.raises(ValueError, match="pre-activation loss"):
        fastsae.training.Trainer(FeatureShardedSAE(4, 8, activation="jumprelu"),
                                 np.zeros((16, 4), np.float32),
                                 fastsae.TrainConfig(pre_act_loss_coefficient=0.01),
                                 distributed="features")
    with pytest.raises(ValueError, match="k must be at most"):
        FeatureShardedSAE(4, 8, activation="topk", k=9)
    m = fastsae.SparseAutoencoder(4, 8, backend="numpy")
    with pytest.raises(TypeError, match="FeatureShardedSAE"):
        fastsae.training.Trainer(m, np.zeros((16, 4), np.float32), distributed="features")


FEATURE_FAMILIES = [dict(family="relu"), dict(family="relu", decoder_norm="unit_norm"),
                    dict(family="topk"), dict(family="batchtopk"),
                    dict(family="relu", transcoder=True, skip=True),
                    dict(family="topk", transcoder=True),
                    dict(family="jumprelu", pre_act=None),
                    dict(family="jumprelu", mode="tanh", pre_act=None),
                    dict(family="jumprelu", mode="quadratic", target_l0=8, pre_act=None),
                    # a window reaching below 0 (theta 0.1, bandwidth 0.3)
                    dict(family="jumprelu", bandwidth=0.3, pre_act=None),
                    dict(family="jumprelu", transcoder=True, skip=True, pre_act=None)]


@needs_mpi
@pytest.mark.parametrize("fam", FEATURE_FAMILIES, ids=_fam_id)
def test_feature_sharded_step_matches_one_process(fam, tmp_path):
    base = dict(fam, backend="numba", steps=1, batch_size=129)
    one = _run(dict(base, distributed=None), tmp_path, 1, "single")
    # Adam's first step moves a parameter by lr * g / (|g| + eps): where a gradient
    # is near eps = 1e-8, float32 rounding of g (tanh's encoder terms are summed in
    # another order here than in the fused kernel) moves it by up to lr / 4 * |dg| / eps
    atol = 1e-5 if fam.get("mode") == "tanh" else 2e-6
    for ranks in (2, 3):
        got = _run(dict(base, distributed="features"), tmp_path, ranks, f"fs{ranks}")
        for name, want in _params(one).items():
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=atol,
                                       err_msg=f"{name} on {ranks} ranks")
        # no rank holds more than its latents (and their moments, counts)
        d_in = 24
        for r, (lo, hi) in enumerate(feature_bounds(192, ranks)):
            sizes = np.load(str(tmp_path / f"fs{ranks}.npz") + f".rank{r}.npy")
            d_out = 20 if fam.get("transcoder") else d_in
            assert sizes.tolist() == [d_in * (hi - lo), d_in * (hi - lo),
                                      (hi - lo) * d_out, hi - lo]


@needs_mpi
@pytest.mark.parametrize("fam", [dict(family="relu"), dict(family="topk"),
                                 dict(family="batchtopk"), dict(family="jumprelu", pre_act=None),
                                 dict(family="jumprelu", mode="quadratic", target_l0=8,
                                      pre_act=None)], ids=_fam_id)
def test_feature_sharded_200_steps_agree_and_rerun_bit_identical(fam, tmp_path):
    # topk and batchtopk: dead_tokens 2000 (distributed_worker), so AuxK acts
    base = dict(fam, backend="numba", steps=200, batch_size=256, log_every=50)
    one = _run(dict(base, distributed=None), tmp_path, 1, "single")
    a = _run(dict(base, distributed="features", check_every=9), tmp_path, 3, "a")
    b = _run(dict(base, distributed="features"), tmp_path, 3, "b")
    for name in _params(a):
        if name != "local_sizes":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    m1, m2 = json.loads(str(one["metrics"])), json.loads(str(a["metrics"]))
    assert m2["ranks"] == 3 and m2["distributed"] == "features"
    print(f"\nfeatures {_fam_id(fam)}: EV {m1['explained_variance']:.5f} vs "
          f"{m2['explained_variance']:.5f}, L0 {m1['l0']:.3f} vs {m2['l0']:.3f}, "
          f"dead {m1['dead_fraction']} vs {m2['dead_fraction']}")
    assert abs(m1["explained_variance"] - m2["explained_variance"]) <= 0.002
    assert abs(m1["l0"] - m2["l0"]) <= 0.02 * m1["l0"]
    assert abs(m1["dead_fraction"] - m2["dead_fraction"]) <= 0.02


@needs_mpi
def test_feature_sharded_resume_on_other_rank_counts_and_load(tmp_path):
    base = dict(family="batchtopk", backend="numba", steps=40, batch_size=128,
                distributed="features")
    whole = _run(base, tmp_path, 2, "whole")
    run = tmp_path / "run"
    _run(dict(base, out_dir=str(run), checkpoint_every=20, fault=dict(rank=1, step=31,
                                                                   kind="kill")),
         tmp_path, 2, "killed", expect_ok=False)
    st = fastsae.training.Trainer.read_checkpoint(run)[1]
    assert st["step"] == 20 and st["feature_shards"]["ranks"] == 2
    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    again = _run(dict(base, resume=str(run)), tmp_path, 2, "resumed")
    for name in _params(whole):
        if name != "local_sizes":
            np.testing.assert_array_equal(again[name], whole[name], err_msg=name)
    for ranks in (3, 1):
        r2 = tmp_path / f"r{ranks}"
        shutil.copytree(saved, r2)
        other = _run(dict(base, resume=str(r2), distributed="features" if ranks > 1 else None,
                          out_dir=str(r2)), tmp_path, ranks, f"resumed{ranks}")
        np.testing.assert_allclose(other["W_dec"], whole["W_dec"], atol=2e-3)
    # one process assembles the sharded run's SAE (folded to raw inputs)
    sae = fastsae.distributed.load_sharded_sae(run)
    assert sae.d_sae == 192 and sae.activation == "batchtopk"
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    assert sae.encode(x).shape == (5, 192)


@needs_mpi
def test_feature_sharded_jumprelu_resumes_elsewhere_and_loads(tmp_path):
    base = dict(family="jumprelu", pre_act=None, backend="numba", steps=30, batch_size=128,
                distributed="features")
    whole = _run(base, tmp_path, 2, "whole")
    run = tmp_path / "run"
    _run(dict(base, out_dir=str(run), checkpoint_every=15, fault=dict(rank=0, step=21,
                                                                   kind="kill")),
         tmp_path, 2, "killed", expect_ok=False)
    st = fastsae.training.Trainer.read_checkpoint(run)[1]
    assert st["step"] == 15 and st["feature_shards"]["ranks"] == 2
    tens = read_shards(run, st, 0, 192)
    assert tens["jumprelu.log_threshold"].shape == (192,)
    # one process continues the sharded run (the thresholds and their moments too)
    other = _run(dict(base, resume=str(run), distributed=None), tmp_path, 1, "resumed1")
    np.testing.assert_allclose(other["W_dec"], whole["W_dec"], atol=2e-3)
    np.testing.assert_allclose(other["log_threshold"], whole["log_threshold"], atol=2e-3)
    sae = fastsae.distributed.load_sharded_sae(tmp_path / "whole.npz.run")
    assert sae.activation == "jumprelu" and sae.d_sae == 192
    np.testing.assert_allclose(sae.threshold, np.exp(whole["log_threshold"]), rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    assert sae.encode(x).shape == (5, 192)


class _OneRank:
    """The collectives of a one-rank run, in process (no MPI)."""
    size, rank = 1, 0

    def allreduce_sum(self, buf):
        return buf

    def allgather_rows(self, vec):
        return np.array(vec, copy=True)

    def allgather_ragged(self, vec):
        return [np.array(vec, copy=True)]


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("mode", [None, "tanh", "quadratic"])
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("window_path", ["dots", "product"])
def test_feature_sharded_jumprelu_gradients_match_the_reference(backend, mode, transcoder,
                                                                window_path, monkeypatch):
    """The sharded JumpReLU step's gradients (the backend's ReLU gradients at
    the active entries plus the window terms computed in features.py)
    against the reference's jumprelu_gradients in float64, on thresholds
    where some windows reach below 0 (bandwidth 0.4, thresholds 0.03 to 0.4)."""
    from fastsae.backends import reference as ref
    from fastsae.distributed.features import FeatureSharded
    from fastsae.params import SAEParams
    from fastsae.training.state import make_state

    rng = np.random.default_rng(4)
    n, d_in, d_sae, d_out = 61, 9, 23, (7 if transcoder else 9)
    bw, coef = 0.4, 0.7
    cfg = fastsae.TrainConfig(jumprelu_bandwidth=bw, jumprelu_sparsity_loss_mode=mode,
                              target_l0=5.0 if mode == "quadratic" else None)
    spec = FeatureShardedSAE(d_in, d_sae, activation="jumprelu", transcoder=transcoder,
                             d_out=d_out if transcoder else None, skip=transcoder,
                             backend=backend)
    st = make_state(spec.local_model(0, d_sae), cfg, spec.backend)
    W_dec = rng.standard_normal((d_sae, d_out)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams((0.3 * rng.standard_normal((d_in, d_sae))).astype(np.float32),
                  (0.1 * rng.standard_normal(d_sae)).astype(np.float32), W_dec,
                  (0.1 * rng.standard_normal(d_out)).astype(np.float32),
                  (0.1 * rng.standard_normal((d_out, d_in))).astype(np.float32)
                  if transcoder else None)
    st.params = p
    st.log_threshold = np.log(rng.uniform(0.03, 0.4, d_sae)).astype(np.float32)
    from fastsae.distributed import features
    # the window's dots one by one, or from one product (the rule's two sides)
    monkeypatch.setattr(features, "_WINDOW_DENSE_RATIO", 0 if window_path == "dots" else 10**9)
    fs = FeatureSharded(_OneRank(), st, spec, 0, d_sae)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    y = rng.standard_normal((n, d_out)).astype(np.float32) if transcoder else None
    t = x if y is None else y
    be, c = st.backend, st.centering()
    codes, window = fs._jumprelu_candidates(be, x, p, c)
    x_hat = fs._x_hat(be, codes, p, x)
    _, g = be.gradients(x, p, codes, x_hat, l1_coefficient=0.0, decoder_norm="unit_norm", y=y)
    g_lt, share, extra = fs._jumprelu_terms(x, t, x_hat, p, c, codes, window, coef)
    g_W_enc, g_b_enc = np.asarray(g.W_enc), np.asarray(g.b_enc)
    if extra is not None:
        g_W_enc, g_b_enc = g_W_enc + extra[0], g_b_enc + extra[1]

    p64 = SAEParams(*(a.astype(np.float64) for a in p.arrays()))
    loss, want, want_lt = ref.jumprelu_gradients(
        x.astype(np.float64), p64, st.log_threshold.astype(np.float64), bw, coef,
        cfg.jumprelu_sparsity(), None, None if y is None else y.astype(np.float64))
    assert window[0].size > 0 and np.any(window[2] <= 0)  # the below-zero window is used

    def close(got, w, name):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()),
                                   err_msg=name)
    close(g_lt, want_lt, "log_threshold")
    close(g_W_enc, want.W_enc, "W_enc")
    close(g_b_enc, want.b_enc, "b_enc")
    close(np.asarray(g.W_dec), want.W_dec, "W_dec")
    assert share == pytest.approx(loss.l0_loss, rel=1e-5)
