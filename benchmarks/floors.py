"""Print each kernel's two floors at a benchmark size: FLOPs over this
machine's measured float32 GEMM rate, and bytes over its measured memory
bandwidth (a large array copy). Compare with the medians of the benchmark
suite to say how far from the floor each kernel is.

    python benchmarks/floors.py [--size paper] [--l0 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SIZES = {"small": (1024, 128, 1024), "paper": (4096, 512, 8192), "wide": (4096, 768, 24576)}


def _median_time(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n, d_in, d_sae):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    w = rng.standard_normal((d_in, d_sae), dtype=np.float32)
    out = np.empty((n, d_sae), np.float32)
    t_gemm = _median_time(lambda: np.matmul(x, w, out=out))
    gflops = 2.0 * n * d_in * d_sae / t_gemm / 1e9
    big = np.ones(64 * 2 ** 20 // 4, np.float32)  # 64 MiB, far beyond the caches
    dst = np.empty_like(big)
    t_copy = _median_time(lambda: np.copyto(dst, big))
    gbs = 2.0 * big.nbytes / t_copy / 1e9  # read + write
    return gflops, gbs, t_gemm


def floors(n, d_in, d_sae, l0):
    """(name, flops, bytes) per kernel; bytes count each array once, sparse
    codes as 8 bytes per entry (int32 index + float32 value)."""
    nnz = n * l0
    f4 = 4
    x_b, w_b = n * d_in * f4, d_in * d_sae * f4
    csr = nnz * 8 + (n + 1) * 8
    sparse_mm = 2.0 * nnz * d_in
    adam_bytes = 2 * w_b * 7  # W_enc and W_dec: read p, g, m, v; write p, m, v
    return [
        ("encode_relu (dense out)", 2.0 * n * d_in * d_sae, x_b + w_b + n * d_sae * f4),
        ("encode_relu_sparse", 2.0 * n * d_in * d_sae, x_b + w_b + csr),
        ("decode (sparse)", sparse_mm, csr + w_b + x_b),
        ("decoder_column_norms", 2.0 * d_sae * d_in, w_b),
        ("l1_subgradient (sparse)", nnz, 2 * csr + d_sae * f4),
        ("gradients (sparse)", 3 * sparse_mm, 2 * x_b + 4 * w_b + csr),
        ("train_step", 2.0 * n * d_in * d_sae + 4 * sparse_mm,
         2 * x_b + adam_bytes + csr),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="paper", choices=list(SIZES))
    ap.add_argument("--l0", type=float, default=48.0)
    a = ap.parse_args()
    n, d_in, d_sae = SIZES[a.size]
    gflops, gbs, t_gemm = measure(n, d_in, d_sae)
    print(f"size {a.size}: N={n} d_in={d_in} d_sae={d_sae} L0={a.l0:g}")
    print(f"measured: float32 GEMM {gflops:.0f} GFLOP/s (encoder matmul {t_gemm * 1e3:.1f} ms), "
          f"copy bandwidth {gbs:.1f} GB/s")
    print(f"{'kernel':28s} {'GFLOP':>8s} {'MB':>8s} {'compute ms':>11s} {'memory ms':>10s}")
    for name, fl, by in floors(n, d_in, d_sae, a.l0):
        print(f"{name:28s} {fl / 1e9:8.3f} {by / 1e6:8.1f} {fl / gflops / 1e6:11.3f} "
              f"{by / gbs / 1e6:10.3f}")


if __name__ == "__main__":
    main()
