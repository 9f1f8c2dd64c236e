"""Matryoshka BatchTopK family (issue 15): ``train_step_matryoshka`` of every
backend that implements it beside the NumPy reference step, the same
backend's BatchTopK step (``train_step_topk(activation="batchtopk")``: what
Matryoshka should cost "plus a few percent") and the bare encoder matmul of
the same shapes, in one group per size:

``matryoshka_k32[size]``  k = 32, widths ``default_matryoshka_widths(d_sae)``
                          (``[d_sae/8, d_sae/4, d_sae/2, d_sae]``: paper size
                          ``[1024, 2048, 4096, 8192]``), AuxK off, lr 1e-6, on
                          :func:`conftest.make_problem`'s problem (about
                          ``--bench-l0`` positive pre-activations per row, so
                          the batch's top ``32 N`` are all active)

Rows: ``bare_matmul``; ``numpy`` (the reference Matryoshka step, dense over
every prefix, timed one round); ``<backend>``
(its Matryoshka step); ``<backend>_btk`` (its BatchTopK step, not for numpy).
The summary table (``conftest``) prints each row's ratio to the NumPy
reference ('vs numpy') and to the group's bare matmul ('x matmul'; issue 15's
targets at paper size: Matryoshka <= 1.3x matmul, Cython within 1.15x of
Numba); Matryoshka's cost over BatchTopK is the ratio of a backend's two rows.

Run (what CI runs: each body once, small size):
    python -m pytest benchmarks/test_bench_matryoshka.py --bench-size small --benchmark-disable -q
Measure (paper size):
    python -m pytest benchmarks/test_bench_matryoshka.py --bench-size paper \\
        --benchmark-min-rounds=5 --benchmark-max-time=1.0
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState
from fastsae.model import default_matryoshka_widths

K = 32
LR = 1e-6
STEPS = ("matryoshka", "batchtopk")


def _group(benchmark, size, label, problem):
    benchmark.group = f"matryoshka_k{K}[{size}]"
    benchmark.extra_info.update(backend=label, size=size, l0=float(K))


def test_matryoshka_bare_matmul(benchmark, size, problem):
    """The floor the group's 'x matmul' divides by: float32 GEMM of the
    encoder's shapes into a preallocated output."""
    _group(benchmark, size, "bare_matmul", problem)
    x, W = problem.x, problem.params.W_enc
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    benchmark(np.matmul, x, W, out=out)
    assert np.isfinite(out[0, 0])


@pytest.mark.parametrize("step_kind", STEPS)
def test_train_step_matryoshka(benchmark, size, backend_name, problem, step_kind):
    if step_kind == "batchtopk" and backend_name == "numpy":
        pytest.skip("the NumPy BatchTopK step: see test_bench_topk.py")
    be = fastsae.get_backend(backend_name)
    label = backend_name if step_kind == "matryoshka" else f"{backend_name}_btk"
    _group(benchmark, size, label, problem)
    d_sae = problem.params.d_sae
    widths = default_matryoshka_widths(d_sae)
    params = be.to_backend(problem.params.copy())
    state = be.to_backend(AdamState.zeros_like(problem.params))
    x = be.to_backend(problem.x)

    def step():
        if step_kind == "matryoshka":
            r = be.train_step_matryoshka(params, state, x, k=K, widths=widths, lr=LR)
        else:
            r = be.train_step_topk(params, state, x, k=K, activation="batchtopk", lr=LR)
        be.synchronize()
        return r

    if backend_name != "numpy":
        step()  # compile / warm the workspaces, not timed
        res = benchmark(step)
    else:  # dense over every prefix: ~20 s a step at paper size on 2 cores, timed once
        res = benchmark.pedantic(step, rounds=1, iterations=1)
    benchmark.extra_info["l0"] = res.l0  # measured by the step itself
    assert np.isfinite(res.total)
    assert res.l0 == pytest.approx(K, abs=1e-9)  # every one of the top 32 N is positive
    if step_kind == "matryoshka":
        pm = res.extra["prefix_mse"]
        assert len(pm) == len(widths) and pm[-1] == res.mse
