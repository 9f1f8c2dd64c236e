"""One rank of a distributed-training test: ``mpiexec -n R python
distributed_worker.py SPEC.json`` (or plain ``python`` for one process).

SPEC keys: ``out`` (an ``.npz`` rank 0 writes: the trained parameters in
training units, JumpReLU's log-thresholds, the final metrics), ``family``,
``backend``, ``steps``, ``batch_size``, ``distributed`` (``"data"`` or
``null``), optional ``out_dir``, ``checkpoint_every``, ``resume`` (a run
directory), ``transcoder``, ``resample_every``, ``fault`` (below).

Faults, on rank ``fault["rank"]`` when it reads the batch of step
``fault["step"]`` (1-based; feature-sharded: when it starts that step,
every rank reading the whole batch): ``"kill"`` (SIGKILL itself), ``"raise"`` (a
``RuntimeError``), ``"hang"`` (sleep), ``"perturb"`` (change one parameter,
so the ranks' checksums differ). They live here, in the test's data
source, not in fastsae.
"""

import json
import os
import signal
import sys
import time

import numpy as np

import fastsae
import fastsae.distributed
from fastsae.data import ArraySource, PairedSource, synthetic, synthetic_pairs
from fastsae.training import TrainConfig, Trainer

HERE = {"trainer": None}


class FaultySource(ArraySource):
    """An in-memory source that misbehaves on one rank at one step."""

    def __init__(self, array, fault, batch_size, rank):
        super().__init__(array)
        self.fault, self.rank, self.calls = fault, rank, 0
        self.batch_size = batch_size

    def _take_sorted(self, rows):
        if rows.size <= self.batch_size:  # a batch (RankBatchStream takes its rows at once)
            self.calls += 1
        f = self.fault
        if f and self.rank == f["rank"] and self.calls == f["step"]:
            self._act(f)
        return super()._take_sorted(rows)

    @staticmethod
    def _act(f):
        if f["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if f["kind"] == "raise":
            raise RuntimeError("injected failure")
        if f["kind"] == "hang":
            time.sleep(600)
        if f["kind"] == "perturb":  # b_dec: replicated in both modes
            np.asarray(HERE["trainer"].state.params.b_dec)[0] += 1.0


def main(path):
    spec = json.load(open(path))
    fam = spec.get("family", "relu")
    rank = 0
    if spec.get("distributed"):
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    transcoder = bool(spec.get("transcoder"))
    if transcoder:
        dp = synthetic_pairs(n_rows=4096, d_in=24, d_out=20, n_features=96, seed=0)
        data = PairedSource(dp.x, dp.y)
        d_in, d_out = 24, 20
    else:
        ds = synthetic(n_rows=4096, d_in=24, n_features=96, l0=4.0, seed=0)
        data = FaultySource(ds.x, spec.get("fault"), spec["batch_size"], rank) \
            if spec.get("fault") else ds.x
        d_in, d_out = 24, None
    kw = {}
    if spec.get("distributed") == "features" and not spec.get("out_dir"):
        spec["out_dir"] = spec["out"] + ".run"  # the sharded checkpoint is the output
    if fam in ("topk", "batchtopk", "matryoshka_batchtopk"):
        kw["k"] = 6
    if fam == "matryoshka_batchtopk":
        kw["widths"] = [32, 96, 192]
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], seed=5,
                      progress=False, log_every=spec.get("log_every", 10),
                      checkpoint_every=spec.get("checkpoint_every", 0),
                      resample_every=spec.get("resample_every", 0),
                      # distributed runs are float32; the one-process runs they are
                      # compared with must not pick bf16 by "auto"
                      precision=spec.get("precision", "fp32"))
    if fam in ("topk", "batchtopk", "matryoshka_batchtopk"):
        cfg.dead_tokens = 2000  # so AuxK acts within a short test run
    if fam == "jumprelu":
        cfg.pre_act_loss_coefficient = spec.get("pre_act", 0.01)
        cfg.dead_tokens = 2000
        cfg.jumprelu_sparsity_loss_mode = spec.get("mode")
        if spec.get("target_l0") is not None:  # the quadratic mode's centre
            cfg.target_l0 = spec["target_l0"]
        if spec.get("bandwidth") is not None:
            cfg.jumprelu_bandwidth = spec["bandwidth"]
    dist = dict(distributed=spec.get("distributed"),
                distributed_timeout=spec.get("timeout", 600.0),
                check_every=spec.get("check_every", 100))
    if not spec.get("distributed"):
        dist = {}
    threads = spec.get("threads", 1)
    features = spec.get("distributed") == "features"
    if spec.get("resume"):
        t = Trainer.resume(spec["resume"], data, backend=spec.get("backend"), threads=threads,
                           **dist)
    else:
        cls = fastsae.distributed.FeatureShardedSAE if features else fastsae.SparseAutoencoder
        model = cls(
            d_in, spec.get("d_sae", 192), backend=spec.get("backend", "numba"),
            activation=fam, seed=2,
            decoder_norm=spec.get("decoder_norm", "unit_norm" if fam != "relu"
                                  else "weighted_l1"),
            transcoder=transcoder, d_out=d_out, skip=bool(spec.get("skip")), **kw)
        t = Trainer(model, data, cfg, out_dir=spec.get("out_dir"), threads=threads,
                    overwrite=True, **dist)
    HERE["trainer"] = t
    f = spec.get("fault")
    if features and f:  # every rank reads the whole batch: fault at the step instead
        inner = t._step

        def step(s, x):
            if t.comm.rank == f["rank"] and s + 1 == f["step"]:
                FaultySource._act(f)
            return inner(s, x)
        t._step = step
    r = t.train()
    if features:
        # every rank's latents, from the checkpoint the run just wrote
        from fastsae.distributed.features import read_shards
        if t.is_root:
            _, st = Trainer.read_checkpoint(t.run_dir)
            tens = read_shards(t.run_dir, st, 0, int(st["model"]["d_sae"]))
            arrays = {k.split(".", 1)[1]: v for k, v in tens.items() if k.startswith("param.")}
            if "jumprelu.log_threshold" in tens:
                arrays["log_threshold"] = tens["jumprelu.log_threshold"]
            arrays["history_mse"] = np.array([h["mse"] for h in r.history if "mse" in h])
            arrays["local_sizes"] = np.array(spec.get("_sizes", []))
            np.savez(spec["out"], **arrays, metrics=json.dumps(
                {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str))}))
        sizes = np.array([t.state.params.W_enc.size, t.state.state.m.W_enc.size,
                          t.state.params.W_dec.size, t.window.fire_counts.size], np.int64)
        np.save(spec["out"] + f".rank{t.comm.rank}.npy", sizes)
        return
    if t.is_root:
        st = t.state
        arrays = {n: np.asarray(a) for n, a in st.host_params().as_dict().items()}
        if hasattr(st, "log_threshold"):
            arrays["log_threshold"] = np.asarray(st.log_threshold)
        arrays["history_mse"] = np.array([h["mse"] for h in r.history if "mse" in h])
        np.savez(spec["out"], **arrays,
                 metrics=json.dumps({k: v for k, v in r.metrics.items()
                                     if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    main(sys.argv[1])
