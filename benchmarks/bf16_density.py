"""Where the bf16 ReLU encoder pays off: its time over code density, beside
numba's float32 ``encode_relu_sparse`` and the float32 bare matmul of the
same run.

Every selected entry of a bf16 encode costs one float32 dot product of length
``d_in`` (its value is recomputed exactly), so the bf16 path wins where codes
are sparse and loses where they are dense. The density is set with a uniform
encoder bias (the weights are random with unit-variance pre-activations).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bf16_density.py \
        [--size paper|small] [--threads 1] [--repeats 3]

Prints the CPU, the BLAS kernel, and a markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np

SIZES = {"paper": (2048, 512, 8192), "small": (256, 64, 512)}
#: Uniform biases that give densities from about 0.2% to 50% at unit-variance
#: pre-activations.
BIASES = (-100.0, -2.9, -2.6, -2.2, -1.6, -1.2, -0.8, 0.0)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return "unknown CPU"


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm: numba compilation, page faults of the outputs
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="paper")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import fastsae
    from threadpoolctl import threadpool_info, threadpool_limits

    from fastsae.backends import bf16

    if not bf16.available_paths():
        print("the compiled bf16 kernels are not built: nothing to measure")
        return 0
    n, d_in, d_sae = SIZES[args.size]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    W = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    b_dec = np.zeros(d_in, np.float32)
    out = np.empty((n, d_sae), np.float32)
    nb = fastsae.get_backend("numba")
    nb.set_num_threads(args.threads)
    blas = ", ".join(f"{i['internal_api']} {i.get('architecture') or ''}".strip()
                     for i in threadpool_info() if i.get("user_api") == "blas")
    print(f"CPU: {_cpu()}; BLAS: {blas}; bf16 path: {bf16.selected_path()}; "
          f"N={n}, d_in={d_in}, d_sae={d_sae}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    with threadpool_limits(args.threads):
        t_mm = _median_ms(lambda: np.matmul(x, W, out=out), args.repeats)
        print(f"float32 bare matmul: {t_mm:.1f} ms\n")
        print("| b_enc | density | L0 | bf16 ms | fp32 numba ms | bf16 / fp32 | bf16 / matmul |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for b in BIASES:
            b_enc = np.full(d_sae, b, np.float32)
            enc = bf16.BF16Encoder(W, b_enc, b_dec, threads=args.threads)
            nnz = enc.relu(x).nnz
            t_b = _median_ms(lambda: enc.relu(x), args.repeats)
            t_f = _median_ms(lambda: nb.encode_relu_sparse(x, W, b_enc, b_dec), args.repeats)
            print(f"| {b:g} | {nnz / (n * d_sae):.4f} | {nnz / n:.1f} | {t_b:.1f} | {t_f:.1f} "
                  f"| {t_b / t_f:.2f} | {t_b / t_mm:.2f} |")
        b_enc = np.full(d_sae, -2.6, np.float32)
        enc = bf16.BF16Encoder(W, b_enc, b_dec, threads=args.threads)
        t_b = _median_ms(lambda: enc.topk(x, 32), args.repeats)
        t_f = _median_ms(lambda: nb.encode_topk(x, W, b_enc, b_dec, 32), args.repeats)
        print(f"| topk k=32 | | 32 | {t_b:.1f} | {t_f:.1f} | {t_b / t_f:.2f} | {t_b / t_mm:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
