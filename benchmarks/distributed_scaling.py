"""Data-parallel step time and communication, measured under mpiexec.

    mpiexec -n R python benchmarks/distributed_scaling.py [--size paper] [--steps 7]
                                                          [--mode data|features]
                                                          [--activations topk,relu,jumprelu]

Each rank runs one thread (``--threads``). For R = 1 it also times the
single-process fused step (``state.step``) on the same batch, the reference
the distributed step is compared with. Reported (rank 0): median step time
of the data-parallel step on R ranks for a TopK SAE (k = 32, sparse codes)
and a fresh ReLU SAE (about half the features firing), bytes each rank sent
per step (measured by the communicator), and the bytes a step would send at
a 16M-latent, d_in 4096 shape (computed from the same formula: the gradient
buffer is ``2 d_in d_sae + d_sae + d_in`` float32 values, and a fixed-order
all-reduce sends ``2 (R - 1) / R`` of it per rank). ``--mode features``
times the feature-sharded step instead (each rank a slice of the latents,
the whole batch on every rank); its messages are the ``N x d_in``
reconstruction's all-reduce, TopK's all-gather of ``N x k`` candidates and
small ones, so the bytes it prints do not grow with ``d_sae``.
"""

import argparse
import statistics
import time

import numpy as np

import fastsae
from fastsae.distributed.comm import Communicator
from fastsae.distributed.data_parallel import DataParallel, rank_rows
from fastsae.distributed.features import FeatureSharded, FeatureShardedSAE
from fastsae.training import TrainConfig
from fastsae.training.state import make_state
from fastsae.training.threads import limit_threads

SIZES = {"small": (1024, 128, 2048), "paper": (4096, 512, 8192)}


def grad_bytes(d_in, d_sae, ranks):
    """Bytes one rank sends per step for the gradients (fixed-order all-reduce)."""
    n = 2 * d_in * d_sae + d_sae + d_in
    return 4 * n * 2 * (ranks - 1) / ranks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="paper")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--mode", choices=("data", "features"), default="data")
    ap.add_argument("--activations", default="topk,relu",
                    help="comma-separated, of topk (k 32), relu, jumprelu")
    a = ap.parse_args()
    comm = Communicator()
    N, d_in, d_sae = SIZES[a.size]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, d_in)).astype(np.float32)
    lo, hi = rank_rows(N, comm.rank, comm.size)
    rows = []
    with limit_threads(a.threads, fastsae.get_backend(a.backend)):
        for act in a.activations.split(","):
            k = 32 if act == "topk" else None
            cfg = TrainConfig(batch_size=N, steps=a.steps + 2, progress=False)
            if a.mode == "features":
                spec = FeatureShardedSAE(d_in, d_sae, backend=a.backend, activation=act, k=k,
                                         seed=1, decoder_norm="unit_norm")
                flo, fhi = rank_rows(d_sae, comm.rank, comm.size)
                m = spec.local_model(flo, fhi)
                st = make_state(m, cfg, m.backend)
                st.init_fresh(1.0, x)
                dp = FeatureSharded(comm, st, spec, flo, fhi)
                lo, hi = 0, N  # every rank the whole batch
            else:
                m = fastsae.SparseAutoencoder(d_in, d_sae, backend=a.backend, activation=act,
                                              k=k, seed=1, decoder_norm="unit_norm")
                st = make_state(m, cfg, m.backend)
                st.init_fresh(1.0, x)
                dp = DataParallel(comm, st, N)
            counts = np.zeros(m.d_sae, np.int64)
            times, sent = [], []
            for i in range(a.steps + 1):
                comm.barrier()
                b0, t0 = comm.bytes_sent, time.perf_counter()
                r = dp.step(x[lo:hi], 1e-4, 1e-3, counts)
                comm.barrier()
                if i:  # the first step compiles
                    times.append(time.perf_counter() - t0)
                    sent.append(comm.bytes_sent - b0)
            single = None
            if comm.size == 1:  # the fused single-process step, same batch
                st.init_fresh(1.0, x)
                ts = []
                for i in range(a.steps + 1):
                    t0 = time.perf_counter()
                    st.step(x, 1e-4, 1e-3, counts)
                    if i:
                        ts.append(time.perf_counter() - t0)
                single = statistics.median(ts)
            rows.append((act, r["l0"], statistics.median(times), single,
                         statistics.median(sent)))
    if comm.rank == 0:
        print(f"size {a.size} (N={N}, d_in={d_in}, d_sae={d_sae}), {comm.size} rank(s), "
              f"{a.threads} thread(s) each, backend {a.backend}, mode {a.mode}")
        for act, l0, t, single, sent in rows:
            extra = f", fused single-process step {1e3 * single:.0f} ms" if single else ""
            grads = (f" (gradients: {grad_bytes(d_in, d_sae, comm.size) / 1e6:.2f} MB)"
                     if a.mode == "data" else "")
            print(f"  {act:8s} L0 {l0:7.1f}: {a.mode} step {1e3 * t:.0f} ms (median of "
                  f"{a.steps}){extra}; sent {sent / 1e6:.2f} MB/rank/step{grads}")
        for R in (2, 8, 64) if a.mode == "data" else ():
            print(f"  16M latents, d_in 4096, {R} ranks: {grad_bytes(4096, 1 << 24, R) / 1e9:.1f}"
                  " GB/rank/step of gradients (data-parallel)")


if __name__ == "__main__":
    main()
