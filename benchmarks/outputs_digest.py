"""Digests of every contract function's outputs, to compare two versions bit for bit.

Runs every function of the kernel contract through the public front
(``fastsae.get_backend(name).<function>``) on fixed random inputs: the
contract test's shapes (1 row, 1 feature, odd sizes) at three densities
(none, mixed, all active), and one paper-size problem (N=4096, d_in=512,
d_sae=8192, about 48 active features per row), each at 1 and 2 threads so
row blocks and tiles are crossed. Every output array is hashed (SHA-256 of
dtype, shape and bytes); Python floats are recorded exactly (``float.hex``).
Training steps run twice in a row on copies of the parameters.

The script uses only the public API, so the same file runs against any
version of fastsae on ``sys.path``::

    # in a checkout of the old version (its Cython built in place):
    PYTHONPATH=/path/to/old python benchmarks/outputs_digest.py --out old.json
    python benchmarks/outputs_digest.py --out new.json
    python benchmarks/outputs_digest.py --compare old.json new.json

``--backends numpy,numba,cython`` (default: those three, when usable) and
``--no-paper`` (small shapes only, about a minute) narrow the run. The
compare step prints every differing entry and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import numpy as np


def _digest(obj) -> str:
    if isinstance(obj, float):
        return float(obj).hex()
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    a = np.ascontiguousarray(obj)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:24]


def _record(out: dict, key: str, value) -> None:
    """Store the digest(s) of ``value`` under ``key`` (SparseCodes, Losses,
    SAEParams, StepResult, tuples and arrays are taken apart)."""
    from fastsae import SAEParams, SparseCodes
    from fastsae.params import Losses, StepResult

    if isinstance(value, SparseCodes):
        h = value.to_host()
        for part in ("indptr", "indices", "values"):
            out[f"{key}.{part}"] = _digest(getattr(h, part))
    elif isinstance(value, SAEParams):
        for name in SAEParams.NAMES:
            out[f"{key}.{name}"] = _digest(np.asarray(getattr(value, name)))
    elif isinstance(value, (Losses, StepResult)):
        for name, v in vars(value).items():
            if name == "extra":
                for k2, v2 in sorted(v.items()):
                    out[f"{key}.extra.{k2}"] = _digest(float(v2))
            else:
                out[f"{key}.{name}"] = _digest(float(v))
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            _record(out, f"{key}[{i}]", v)
    else:
        out[key] = _digest(np.asarray(value))


def _problem(rng, n, d_in, d_sae, density):
    from fastsae import SAEParams

    W_enc = (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    W_dec = (rng.normal(size=(d_sae, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b_dec = (rng.normal(size=d_in) * 0.1).astype(np.float32)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    if density == "none":
        b_enc = np.full(d_sae, -100.0, np.float32)
    elif density == "all":
        b_enc = np.full(d_sae, 100.0, np.float32)
    elif density == "mixed":
        b_enc = (rng.normal(size=d_sae) * 0.1 - 0.4).astype(np.float32)
    else:  # a target L0 (paper size): one shared bias from a sample's quantile
        pre = (x[:256] - b_dec) @ W_enc
        b_enc = np.full(d_sae, -np.quantile(pre, 1.0 - float(density) / d_sae), np.float32)
    return x, SAEParams(W_enc, b_enc, W_dec, b_dec)


def _set_threads(be, n: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    if hasattr(be, "set_num_threads"):
        be.set_num_threads(n)
        return
    # versions before the backend thread API: the backends' own knobs
    if be.name == "numba":
        import numba
        numba.set_num_threads(n)
    elif be.name == "cython":
        import fastsae.cython_backend as cy
        cy.set_num_threads(n)


def _run_case(be, out: dict, tag: str, x, p, steps: int = 2) -> None:
    from fastsae import AdamState

    k = max(1, min(4, p.d_sae))
    enc = (x, p.W_enc, p.b_enc, p.b_dec)
    f = be.encode_relu(*enc)
    _record(out, f"{tag}/encode_relu", f)
    codes = be.encode_relu_sparse(*enc)
    _record(out, f"{tag}/encode_relu_sparse", codes)
    x_hat = be.decode(codes, p.W_dec, p.b_dec)
    _record(out, f"{tag}/decode.sparse", x_hat)
    _record(out, f"{tag}/decode.dense", be.decode(f, p.W_dec, p.b_dec))
    norms = be.decoder_column_norms(p.W_dec)
    _record(out, f"{tag}/decoder_column_norms", norms)
    _record(out, f"{tag}/l1_subgradient.sparse", be.l1_subgradient(codes, norms, 1e-3))
    _record(out, f"{tag}/l1_subgradient.dense", be.l1_subgradient(f, norms, 1e-3))
    for mode in ("weighted_l1", "unit_norm"):
        _record(out, f"{tag}/gradients.{mode}",
                be.gradients(x, p, codes, x_hat, 1e-3, mode))
        q, st = p.copy(), AdamState.zeros_like(p)
        fc = np.zeros(p.d_sae, np.int64)
        for s in range(steps):
            r = be.train_step(q, st, x, l1_coefficient=1e-3, lr=1e-3, decoder_norm=mode,
                              fire_counts=fc)
            _record(out, f"{tag}/train_step.{mode}.{s}", r)
        _record(out, f"{tag}/train_step.{mode}.params", q)
        _record(out, f"{tag}/train_step.{mode}.state", (st.m, st.v, st.step))
        _record(out, f"{tag}/train_step.{mode}.fire_counts", fc)
    top = be.encode_topk(*enc, k)
    _record(out, f"{tag}/encode_topk", top)
    _record(out, f"{tag}/encode_batchtopk", be.encode_batchtopk(*enc, k))
    thr = np.linspace(-0.5, 0.5, p.d_sae).astype(np.float32)
    _record(out, f"{tag}/encode_jumprelu", be.encode_jumprelu(*enc, thr))
    dead = np.zeros(p.d_sae, bool)
    dead[::3] = True
    from fastsae import reference as R
    aux = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 2 * k)
    top_hat = be.decode(top, p.W_dec, p.b_dec)
    _record(out, f"{tag}/topk_gradients", be.topk_gradients(x, p, top, top_hat))
    _record(out, f"{tag}/topk_gradients.aux",
            be.topk_gradients(x, p, top, top_hat, aux, 0.03))
    for act in ("topk", "batchtopk"):
        for use_aux in (False, True):
            q, st = p.copy(), AdamState.zeros_like(p)
            fc = np.zeros(p.d_sae, np.int64)
            kw = dict(dead_mask=dead, k_aux=2 * k, aux_coefficient=1 / 32) if use_aux else {}
            name = f"{tag}/train_step_topk.{act}{'.aux' if use_aux else ''}"
            for s in range(steps):
                r = be.train_step_topk(q, st, x, k=k, activation=act, lr=1e-3,
                                       fire_counts=fc, **kw)
                _record(out, f"{name}.{s}", r)
            _record(out, f"{name}.params", q)
            _record(out, f"{name}.state", (st.m, st.v, st.step))
            _record(out, f"{name}.fire_counts", fc)


SMALL = [(1, 1, 1), (1, 5, 1), (1, 3, 7), (3, 1, 4), (7, 5, 1), (13, 9, 17), (31, 16, 64),
         (64, 33, 129), (129, 48, 200), (300, 40, 1100)]


def collect(backends, paper: bool) -> dict:
    import fastsae

    out = {}
    usable = {s.name for s in fastsae.available_backends() if s.available}
    for name in backends:
        if name not in usable:
            raise SystemExit(f"backend {name} is not usable here")
        be = fastsae.get_backend(name)
        for threads in (1, 2):
            _set_threads(be, threads)
            t0 = time.perf_counter()
            for seed, (n, d_in, d_sae) in enumerate(SMALL):
                for density in ("none", "mixed", "all"):
                    rng = np.random.default_rng(1000 + seed)
                    x, p = _problem(rng, n, d_in, d_sae, density)
                    _run_case(be, out, f"{name}/t{threads}/{n}x{d_in}x{d_sae}/{density}", x, p)
            if paper:
                x, p = _problem(np.random.default_rng(7), 4096, 512, 8192, 48)
                _run_case(be, out, f"{name}/t{threads}/paper", x, p, steps=1)
            print(f"{name} threads={threads}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def compare(a_path, b_path) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    bad = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in bad:
        print(f"DIFFERS {k}: {a.get(k)} != {b.get(k)}")
    same = len(set(a) & set(b)) - len([k for k in bad if k in a and k in b])
    print(f"{same} identical, {len(bad)} different or missing, of {len(set(a) | set(b))}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--backends", default="numpy,numba,cython")
    ap.add_argument("--no-paper", action="store_true")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("--out or --compare is required")
    out = collect([b for b in args.backends.split(",") if b], not args.no_paper)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=0, sort_keys=True)
    print(f"{len(out)} digests -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
