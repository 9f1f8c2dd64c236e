"""bf16 training steps outside pytest-benchmark: the whole step in both
precisions at any shape, and where a numba step's time goes.

    python benchmarks/bf16_steps.py [--shape 4096,512,8192] [--backends numba,cython]
                                    [--repeats 8] [--parts] [--kinds relu,jumprelu]
                                    [--margin-cost]

Steps: ``train_step`` (ReLU, weighted L1, the shared encoder bias -2.6 so L0
is about 40 at paper size), ``train_step_topk`` (k 32, TopK and BatchTopK)
``train_step_matryoshka`` (k 32, widths d_sae/8, /4, /2, 1) and
``train_step_jumprelu`` (thresholds 0.1, bandwidth 0.05, L0 coefficient
1e-3, the same bias) on a random SAE,
``precision`` fp32 then bf16, parameters updated in place (lr 1e-4), the
first two steps dropped; each median beside the bare float32 matmul
``np.matmul(x, W_enc, out=preallocated)`` timed right after it.

``--margin-cost``: the bf16 JumpReLU step with its lowered candidate cut
against the earlier rule (the cut at the window's edge), alternating.

``--parts`` (numba): the pieces of the ReLU step after the bf16 encoder
(decode and residual, ``d_pre``, the CSR transpose, the weight pass with Adam
with and without writing the bf16 copy of ``W_enc``, the whole core) and of
the TopK step (``prefix_step_core`` with and without the copy), then a 64 MB
array copy, the memory rate the weight pass's floor is computed from.
Names the CPU, the BLAS and the bf16 path.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastsae  # noqa: E402
from fastsae import AdamState, SAEParams  # noqa: E402
from fastsae.backends import bf16 as BF  # noqa: E402
from fastsae.backends import numerics as NU  # noqa: E402

from conftest import blas_info, cpu_model  # noqa: E402

K = 32


def problem(n, d_in, d_sae, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    Wd = np.ascontiguousarray(W.T)
    Wd /= np.linalg.norm(Wd, axis=1, keepdims=True)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    return SAEParams(W, np.full(d_sae, -2.6, np.float32), Wd, np.zeros(d_in, np.float32)), x


def median_ms(fn, repeats, drop=1):
    ts = []
    for _ in range(repeats + drop):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[drop:]) * 1e3, out


def matmul_ms(x, W, repeats=5):
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    return median_ms(lambda: np.matmul(x, W, out=out), repeats)[0]


STEP_KINDS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


def steps(backends, shape, repeats, kinds=STEP_KINDS):
    p, x = problem(*shape)
    print("| backend | step | precision | median ms | bare matmul ms | x matmul | L0 |")
    print("|---|---|---|---|---|---|---|")
    for name in backends:
        be = fastsae.get_backend(name)
        for kind in kinds:
            for prec in ("fp32", "bf16"):
                q = p.copy()
                st = AdamState.zeros_like(q)
                if kind == "relu":
                    fn = lambda: be.train_step(q, st, x, l1_coefficient=1e-3, lr=1e-4,  # noqa
                                               precision=prec)
                elif kind == "jumprelu":
                    lt = np.full(p.d_sae, np.log(0.1), np.float32)
                    tm, tv = np.zeros_like(lt), np.zeros_like(lt)
                    fn = lambda: be.train_step_jumprelu(  # noqa
                        q, st, x, log_threshold=lt, threshold_m=tm, threshold_v=tv,
                        bandwidth=0.05, l0_coefficient=1e-3, lr=1e-4, precision=prec)
                elif kind == "matryoshka":
                    w = [p.d_sae // 8, p.d_sae // 4, p.d_sae // 2, p.d_sae]
                    fn = lambda: be.train_step_matryoshka(q, st, x, k=K, widths=w,  # noqa
                                                          lr=1e-4, precision=prec)
                else:
                    fn = lambda: be.train_step_topk(q, st, x, k=K, activation=kind,  # noqa
                                                    lr=1e-4, precision=prec)
                ms, r = median_ms(fn, repeats, drop=2)
                mm = matmul_ms(x, p.W_enc)
                print(f"| {name} | {kind} | {prec} | {ms:.1f} | {mm:.1f} | {ms / mm:.2f} | "
                      f"{r.l0:.1f} |", flush=True)


def parts(shape, repeats):
    NB = importlib.import_module("fastsae.backends.numba")
    B, D, NR, S, E = (importlib.import_module(f"fastsae.backends.numba.{m}")
                      for m in ("backward", "decode", "norms", "step", "encode"))
    p, x = problem(*shape)
    n, d_sae = x.shape[0], p.d_sae
    W, b, Wd, bd = p.W_enc, p.b_enc, p.W_dec, p.b_dec
    st = AdamState.zeros_like(p)
    nt = NB.get_num_threads()
    Wp, WT = BF.step_copy(st, W, nt)
    mom = AdamState.zeros_like(p)
    mo = (mom.m.W_enc, mom.v.W_enc, mom.m.b_enc, mom.v.b_enc, mom.m.W_dec, mom.v.W_dec,
          mom.m.b_dec, mom.v.b_dec)
    adam_c = NU.adam_constants(1e-7, 0.9, 0.999, 1e-8, 1)
    rows = []

    def t(name, fn):
        ms, out = median_ms(fn, repeats)
        rows.append((name, ms))
        return out
    with NB._blas_single():
        ip, ix, v = t("bf16 encoder, ReLU", lambda: BF.step_encode(x, bd, b, Wp, WT, 0, nt))
        xc = E.centered(x, bd)
        d_xhat, _ = t("decode + residual", lambda: D.decode_residual_csr(ip, ix, v, Wd, bd, x))
        norms = NR.row_norms(Wd)
        l1n = np.float32(1e-3 / n)
        d_pre, _ = t("d_pre", lambda: B.d_pre_csr(ip, ix, v, d_xhat, Wd, norms, l1n))
        colptr, rws, perm = t("CSR -> CSC", lambda: B.csr_to_csc(ip, ix, d_sae))
        g_b_enc = B.column_sums_csc(colptr, perm, d_pre)

        def fa(copy):
            return B.feature_adam(colptr, rws, perm, v, d_pre, d_xhat, xc, Wd, norms, l1n, False,
                                  W, b, g_b_enc, mo[0], mo[1], mo[2], mo[3], mo[4], mo[5],
                                  adam_c, *copy)
        t("weight pass + Adam", lambda: fa(B.NO_COPY))
        t("weight pass + Adam + bf16 copy", lambda: fa((Wp, WT)))
        t("ReLU core (all of the above after the encoder)", lambda: S.train_step_core(
            x, xc, ip, ix, v, W, b, Wd, bd, *mo, norms, 1e-3, False, adam_c,
            np.empty(0, np.int64), True, Wp, WT))
        tk = t("bf16 encoder, TopK", lambda: BF.step_encode(x, bd, b, Wp, WT, K, nt))
        empty = (np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32))
        levels = np.zeros(d_sae, np.int32)

        def core(copy):
            ws = np.empty((1, n, x.shape[1]), np.float32)
            return S.prefix_step_core(x, xc, *tk, *empty, W, b, Wd, bd, *mo, adam_c, 0.0,
                                      NB.NUMBA_TOPK_FEATURE_TILE, np.empty(0, np.int64),
                                      levels, ws, True, *copy)
        t("TopK core (prefix_step_core)", lambda: core(B.NO_COPY))
        t("TopK core + bf16 copy", lambda: core((Wp, WT)))
    a = np.ones(64 * 2 ** 20 // 4, np.float32)
    c = np.empty_like(a)
    t("np.copyto of 64 MB", lambda: np.copyto(c, a))
    t("bare matmul", lambda: np.matmul(x, W, out=np.empty((n, d_sae), np.float32)))
    print(f"L0 (ReLU) {ip[-1] / n:.1f}\n\n| part | median ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


def margin_cost(backends, shape, repeats):
    """The bf16 JumpReLU step with its lowered candidate cut (the margin of
    ``numerics.bf16_cut_margin``) against the same step with the cut at the
    window's edge itself (the earlier, biased rule: the encoder called
    without ``cut``), alternating in one process on the same SAE."""
    real = BF._C.encode
    use = {"margin": True}

    def encode(*a):
        if not use["margin"] and len(a) == 11:  # threshold mode with a cut: drop it
            a = a[:10] + (None,)
        return real(*a)
    BF._C.encode = encode
    p, x = problem(*shape)
    print("| backend | margin ms | old rule ms | ratio | margin x bare matmul | L0 |")
    print("|---|---|---|---|---|---|")
    try:
        for name in backends:
            be = fastsae.get_backend(name)
            q = p.copy()
            st = AdamState.zeros_like(q)
            lt = np.full(p.d_sae, np.log(0.1), np.float32)
            tm, tv = np.zeros_like(lt), np.zeros_like(lt)

            def fn():
                return be.train_step_jumprelu(q, st, x, log_threshold=lt, threshold_m=tm,
                                              threshold_v=tv, bandwidth=0.05,
                                              l0_coefficient=1e-3, lr=1e-4, precision="bf16")
            fn(), fn()
            ts = {True: [], False: []}
            for _ in range(repeats):
                for m in (True, False):
                    use["margin"] = m
                    t = time.perf_counter()
                    r = fn()
                    ts[m].append(time.perf_counter() - t)
            a, b = (statistics.median(ts[m]) * 1e3 for m in (True, False))
            mm = matmul_ms(x, p.W_enc)
            print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.3f} | {a / mm:.2f} | {r.l0:.1f} |",
                  flush=True)
    finally:
        BF._C.encode = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096,512,8192", help="N,d_in,d_sae")
    ap.add_argument("--backends", default="numba,cython")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--margin-cost", action="store_true",
                    help="the bf16 JumpReLU step with and without its lowered candidate cut")
    ap.add_argument("--kinds", default=",".join(STEP_KINDS),
                    help=f"steps to time, comma-separated from {','.join(STEP_KINDS)}")
    args = ap.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(STEP_KINDS):
        ap.error(f"--kinds: unknown {sorted(set(kinds) - set(STEP_KINDS))}")
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; {BF.path_report()}; shape {shape}\n")
    if args.parts:
        parts(shape, args.repeats)
    elif args.margin_cost:
        margin_cost(args.backends.split(","), shape, args.repeats)
    else:
        steps(args.backends.split(","), shape, args.repeats, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
