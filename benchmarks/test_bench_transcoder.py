"""Transcoders (issue 15): a TopK transcoder's and skip transcoder's
``train_step_topk`` of every backend beside the same backend's TopK SAE
step, the NumPy reference's transcoder step, the bare encoder matmul and the
skip connection's two dense GEMMs, in one group per size:

``transcoder_k32[size]``  k = 32, ``d_out = d_in`` (an MLP's input to its
                          output), lr 1e-6, on :func:`conftest.make_problem`'s
                          problem (its ``x`` the input; the target a fixed
                          Gaussian ``[N, d_out]``)

Rows: ``bare_matmul`` (the encoder's GEMM); ``skip_gemms`` (``x @ W_skip.T``
and ``D.T @ x``, the skip's forward and gradient GEMMs, ``2 N d_in d_out``
multiply-adds: the floor a skip adds); ``numpy`` (the reference skip
transcoder step, dense, timed one round); ``<backend>_sae`` (its TopK SAE
step on ``x``); ``<backend>`` (its TopK transcoder step, no skip);
``<backend>_skip`` (its skip transcoder step). Issue 15's target: a
transcoder step at most the SAE step plus the skip GEMMs' share, so
``<backend>`` ~ ``<backend>_sae`` and ``<backend>_skip`` <= ``<backend>_sae``
+ ``skip_gemms``.

Run (what CI runs: each body once, small size):
    python -m pytest benchmarks/test_bench_transcoder.py --bench-size small --benchmark-disable -q
Measure (paper size):
    python -m pytest benchmarks/test_bench_transcoder.py --bench-size paper \\
        --benchmark-min-rounds=5 --benchmark-max-time=1.0
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams

K = 32
LR = 1e-6
KINDS = ("transcoder", "skip", "sae")


def _group(benchmark, size, label):
    benchmark.group = f"transcoder_k{K}[{size}]"
    benchmark.extra_info.update(backend=label, size=size, l0=float(K))


def _target(problem):
    n, d = problem.x.shape
    return np.random.default_rng(7).standard_normal((n, d)).astype(np.float32)


def test_transcoder_bare_matmul(benchmark, size, problem):
    """The floor the group's 'x matmul' divides by: float32 GEMM of the
    encoder's shapes into a preallocated output."""
    _group(benchmark, size, "bare_matmul")
    x, W = problem.x, problem.params.W_enc
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    benchmark(np.matmul, x, W, out=out)
    assert np.isfinite(out[0, 0])


def test_transcoder_skip_gemms(benchmark, size, problem):
    """The skip connection's dense work: its forward and gradient GEMMs."""
    _group(benchmark, size, "skip_gemms")
    x = problem.x
    n, d = x.shape
    W_skip = np.random.default_rng(8).standard_normal((d, d)).astype(np.float32)
    fwd, grad = np.empty((n, d), np.float32), np.empty((d, d), np.float32)

    def gemms():
        np.matmul(x, W_skip.T, out=fwd)
        np.matmul(fwd.T, x, out=grad)

    benchmark(gemms)
    assert np.isfinite(grad[0, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_transcoder(benchmark, size, backend_name, problem, kind):
    if backend_name == "numpy" and kind != "skip":
        pytest.skip("the NumPy reference: its skip transcoder step only")
    be = fastsae.get_backend(backend_name)
    label = backend_name if kind == "transcoder" else f"{backend_name}_{kind}"
    if backend_name == "numpy":
        label = "numpy"
    _group(benchmark, size, label)
    p = problem.params
    d_in = p.d_in
    host = SAEParams(p.W_enc.copy(), p.b_enc.copy(), p.W_dec.copy(), p.b_dec.copy(),
                     np.zeros((d_in, d_in), np.float32) if kind == "skip" else None)
    params = be.to_backend(host)
    state = be.to_backend(AdamState.zeros_like(host))
    x = be.to_backend(problem.x)
    y = None if kind == "sae" else be.to_backend(_target(problem))

    def step():
        r = be.train_step_topk(params, state, x, k=K, lr=LR, y=y)
        be.synchronize()
        return r

    if backend_name != "numpy":
        step()  # compile / warm the workspaces, not timed
        res = benchmark(step)
    else:  # dense: seconds a step at paper size on 2 cores, timed once
        res = benchmark.pedantic(step, rounds=1, iterations=1)
    benchmark.extra_info["l0"] = res.l0
    assert np.isfinite(res.total)
    assert res.l0 <= K
