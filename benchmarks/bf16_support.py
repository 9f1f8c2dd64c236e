"""How often bf16 encoding changes the codes of a trained SAE (issue 13).

    python benchmarks/bf16_support.py [--size small|full] [--steps N] [--out-dir DIR]
                                      [--activations relu,topk,batchtopk,jumprelu]

The bf16 encoders (``precision="bf16"``) decide the support from a bfloat16
product (``pre_b``) and take the values from the float32 pre-activations
(``pre``), so only the support can differ from fp32, and only where ``pre``
and ``pre_b`` fall on different sides of a boundary (0, the JumpReLU
threshold, TopK's k-th value). This script counts those differences on data
and SAEs like the real ones:

1. Data: ``trainer_density.py``'s seeded activations (its generator, no
   download; d_in 384, written once to ``DIR`` and reused): the first rows
   train, the last ``eval`` rows are held out.
2. SAEs: one per activation, ReLU, TopK (k=32), BatchTopK (k=32; encoded
   with ``encode_batchtopk``, per chunk of rows, the same chunks in both
   precisions) and JumpReLU, trained from
   fresh for ``--steps`` numba steps by :class:`fastsae.Trainer` with
   :class:`fastsae.TrainConfig`'s defaults (lr 3e-3, L1 0.3 with warm-ups,
   batch 512, normalized activations; JumpReLU's thresholds learned from 0.1).
3. On the held-out rows, per activation, backend (numba, cython when built,
   and the NumPy oracle) and instruction path (``available_paths()``): the
   bf16 codes against the fp32 codes of the same backend: entries only in
   one support per million entries (of N x d_sae) and per thousand active
   entries, the max relative value difference on the common support (the
   values are float32's: about 1e-7 expected, 0 where the fp32 and bf16
   paths sum in the same order), and, for the compiled kernels, the support
   differences against the oracle's bf16 codes (float32 against float64
   accumulation of the same bf16 products: near zero).

Sizes: ``small`` (CI, under 20 s: d_sae 512, 6144 rows, 60 steps, 2048
held out); ``full`` (default: the trainer benchmark's d_sae 6144, 65536 rows,
400 steps, 16384 held out). Prints a markdown table, the CPU and the paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastsae  # noqa: E402
from fastsae import SparseAutoencoder, TrainConfig, Trainer  # noqa: E402

from conftest import blas_info, cpu_model  # noqa: E402
from trainer_density import D_IN, activations_file  # noqa: E402

K = 32
SIZES = {
    "small": dict(d_sae=512, rows=6144, eval_rows=2048, steps=60),
    "full": dict(d_sae=6144, rows=65536, eval_rows=16384, steps=400),
}
#: rows per encoder call (the row-wise encoders: chunks change nothing but the
#: memory the NumPy oracle's dense float64 products take; BatchTopK selects
#: per chunk, the same chunks for every precision and backend)
CHUNK = 4096
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


def train_sae(activation: str, x: np.ndarray, d_sae: int, steps: int) -> SparseAutoencoder:
    kw = {"k": K} if activation in ("topk", "batchtopk") else {}
    model = SparseAutoencoder(x.shape[1], d_sae, activation=activation, backend="numba",
                              **kw)
    cfg = TrainConfig(steps=steps, eval_rows=min(4096, x.shape[0]), log_every=steps,
                      progress=False, **({"activation": activation} if activation != "relu"
                                         else {}), **kw)
    Trainer(model, x, cfg, backend="numba").train()
    return model


def encode(be, activation, model, x, precision, with_scale=False):
    """Codes of ``x`` (in row chunks) as (linear keys int64, values float32,
    and with ``with_scale`` each entry's float32 rounding scale
    ``(|x - b_dec| @ |W_enc|)[i, j]``, else ``None``)."""
    p = model.params
    keys, vals, scales = [], [], []
    absW = np.abs(p.W_enc) if with_scale else None
    for lo in range(0, x.shape[0], CHUNK):
        xs = x[lo:lo + CHUNK]
        args = (xs, p.W_enc, p.b_enc, p.b_dec)
        if activation == "relu":
            c = be.encode_relu_sparse(*args, precision=precision)
        elif activation == "topk":
            c = be.encode_topk(*args, K, precision=precision)
        elif activation == "batchtopk":
            c = be.encode_batchtopk(*args, K, precision=precision)
        else:
            c = be.encode_jumprelu(*args, model.threshold, precision=precision)
        c = c.to_host()
        rows = np.repeat(np.arange(lo, lo + xs.shape[0], dtype=np.int64),
                         np.diff(np.asarray(c.indptr)))
        keys.append(rows * c.shape[1] + np.asarray(c.indices, np.int64))
        vals.append(np.asarray(c.values))
        if with_scale:
            S = np.abs(xs - p.b_dec) @ absW
            scales.append(S[rows - lo, np.asarray(c.indices, np.int64)])
    return (np.concatenate(keys), np.concatenate(vals),
            np.concatenate(scales) if with_scale else None)


def compare(a, b):
    """(only in a, only in b, max relative value difference on the common
    support, max value difference over a's scale there (``nan`` without one),
    fraction of the common entries whose values are bitwise equal)."""
    (ka, va, sa), (kb, vb, _) = a, b
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    d = np.abs(vb[ib].astype(np.float64) - va[ia])
    rel = d / np.maximum(np.abs(va[ia].astype(np.float64)), np.finfo(np.float32).tiny)
    scaled = d / np.maximum(sa[ia], np.finfo(np.float32).tiny) if sa is not None else None
    return (ka.size - common.size, kb.size - common.size,
            float(rel.max()) if rel.size else 0.0,
            float(scaled.max()) if scaled is not None and scaled.size else float("nan"),
            float(np.mean(vb[ib] == va[ia])) if common.size else 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=None, help="training steps per SAE")
    ap.add_argument("--out-dir", default=None, help="where the activations file goes "
                    "(default: TMPDIR/fastsae_bf16_support)")
    ap.add_argument("--activations", default=",".join(ACTIVATIONS),
                    help="comma-separated, of " + ", ".join(ACTIVATIONS))
    a = ap.parse_args(argv)
    acts_wanted = [s.strip() for s in a.activations.split(",") if s.strip()]
    bad = [s for s in acts_wanted if s not in ACTIVATIONS]
    if bad or not acts_wanted:
        ap.error(f"--activations: choose from {', '.join(ACTIVATIONS)} (got {a.activations!r})")
    t_start = time.perf_counter()
    from fastsae.backends import bf16

    sz = dict(SIZES[a.size])
    if a.steps:
        sz["steps"] = a.steps
    out_dir = Path(a.out_dir or Path(tempfile.gettempdir()) / "fastsae_bf16_support")
    out_dir.mkdir(parents=True, exist_ok=True)
    acts = np.load(activations_file(out_dir, sz["rows"]), mmap_mode="r")
    n_eval = sz["eval_rows"]
    x_train = np.ascontiguousarray(acts[:-n_eval])
    x_eval = np.ascontiguousarray(acts[-n_eval:])
    paths = tuple(bf16.available_paths())
    backends = ["numpy"] + [b for b in ("numba", "cython")
                            if any(s.name == b and s.available
                                   for s in fastsae.available_backends())]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs); BLAS: {blas_info()}")
    print(f"fastsae {fastsae.__version__}; bf16 paths here: {', '.join(paths)} (auto: "
          f"{bf16.selected_path()}); backends: {', '.join(backends)}; "
          f"numba threads {fastsae.get_backend('numba').get_num_threads()}")
    print(f"size {a.size}: d_in {D_IN}, d_sae {sz['d_sae']}, {x_train.shape[0]} training "
          f"rows, {sz['steps']} steps per SAE (numba, TrainConfig defaults), "
          f"{n_eval} held-out rows")

    saved = os.environ.get("FASTSAE_BF16_PATH")
    lines = []
    try:
        for act in acts_wanted:
            t = time.perf_counter()
            model = train_sae(act, x_train, sz["d_sae"], sz["steps"])
            t_train = time.perf_counter() - t
            entries = n_eval * sz["d_sae"]
            oracle = None
            for bname in backends:
                be = fastsae.get_backend(bname)
                fp32 = encode(be, act, model, x_eval, "fp32", with_scale=True)
                for path in (("oracle",) if bname == "numpy" else paths):
                    if path != "oracle":
                        os.environ["FASTSAE_BF16_PATH"] = path
                    b16 = encode(be, act, model, x_eval, "bf16")
                    if bname == "numpy":
                        oracle = b16
                    only_f, only_b, rel, scaled, same = compare(fp32, b16)
                    vs_or = "-"
                    if bname != "numpy" and oracle is not None:
                        of, ob = compare(oracle, b16)[:2]
                        vs_or = f"{(of + ob) / entries * 1e6:.2f}"
                    diff = only_f + only_b
                    lines.append(
                        f"| {act} | {bname} | {path} | {fp32[0].size / n_eval:.1f} | "
                        f"{b16[0].size / n_eval:.1f} | {diff / entries * 1e6:.2f} | "
                        f"{1e3 * diff / max(fp32[0].size, 1):.3f} | {only_f} / {only_b} | "
                        f"{rel:.1e} | {scaled:.1e} | {100 * same:.1f}% | {vs_or} |")
            print(f"  {act}: trained in {t_train:.1f} s")
    finally:
        if saved is None:
            os.environ.pop("FASTSAE_BF16_PATH", None)
        else:
            os.environ["FASTSAE_BF16_PATH"] = saved

    print()
    print("| activation | backend | path | L0 fp32 | L0 bf16 | support diffs / 1e6 entries | "
          "diffs / 1e3 active | only fp32 / only bf16 | max rel value diff | "
          "max value diff / scale | values bitwise equal | diffs vs oracle bf16 / 1e6 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)
    print()
    print(f"entries = {n_eval} rows x {sz['d_sae']} features; each bf16 row is compared "
          "with the same backend's fp32 codes (numpy: the oracle, float64 accumulation of "
          f"the bf16 products); TopK and BatchTopK k={K}. Value columns on the common "
          "support: 'max rel' "
          "= max |v_bf16 - v_fp32| / |v_fp32| (large only for values near 0, where "
          "float32 summed in another order differs relatively most); 'scale' = "
          "(|x - b_dec| @ |W_enc|)[i, j], the float32 rounding scale of the spec's "
          "tolerance (about 1e-7 expected); 'bitwise equal' = share of common entries "
          f"with identical values. Total {time.perf_counter() - t_start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
