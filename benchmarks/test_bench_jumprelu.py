"""JumpReLU family (issue 15): ``train_step_jumprelu`` of every backend that
implements it beside the NumPy reference step, a lean dense BLAS step
(:class:`conftest.DenseStep`, five GEMMs and Adam: "never slower than a dense
step") and the bare encoder matmul of the same shapes, in two groups per
size:

``jumprelu_l0_48[size]``  thresholds exp(log_threshold) = 0.01 with the
                          encoder bias of :func:`conftest.make_problem` shifted
                          by them, so the active set is that problem's
                          (L0 about ``--bench-l0``, default 48)
``jumprelu_dense[size]``  a fresh JumpReLU SAE (W_enc = W_dec.T, b_enc = 0,
                          threshold 0.01): about half the features fire

Each group also times the step with the other sparsity penalties (rows
``<backend>+tanh``, ``+quadratic`` (target 48), ``+pre_act`` (10% of the
latents dead)). Bandwidth 0.001 (SAELens's default), l0_coefficient 1, lr 1e-6 (tiny: the
repeated rounds keep the density). The summary table (``conftest``) prints
each row's ratio to the NumPy reference ('vs numpy') and to the bare matmul
of its own group ('x matmul'; issue 15's target: <= 1.3 at L0 ~48, paper
size).

Run (what CI runs: each body once, small size):
    python -m pytest benchmarks/test_bench_jumprelu.py --bench-size small --benchmark-disable -q
Measure (paper size):
    python -m pytest benchmarks/test_bench_jumprelu.py --bench-size paper \\
        --benchmark-min-rounds=3 --benchmark-max-time=0.5
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState

from conftest import SIZES, DenseStep, make_problem, rows_of

THETA0 = 0.01
BANDWIDTH = 1e-3
L0_COEFFICIENT = 1.0
LR = 1e-6
REGIMES = ("l0_48", "dense")


class JProblem:
    """x, params, log_threshold of one regime (shared by a session)."""

    def __init__(self, x, params, log_threshold, l0):
        self.x, self.params, self.log_threshold, self.l0 = x, params, log_threshold, l0


_cache: dict = {}


def jumprelu_problem(size, regime, batch, target_l0) -> JProblem:
    key = (size, regime, rows_of(size, batch), float(target_l0))
    if key in _cache:
        return _cache[key]
    base = make_problem(size, target_l0, batch=batch)
    d_sae = SIZES[size][2]
    p = base.params.copy()
    if regime == "l0_48":
        # pre - theta = the ReLU problem's pre: the same active set
        p.b_enc += np.float32(THETA0)
    else:
        p.b_enc[:] = 0.0
        p.b_dec[:] = 0.0
    lt = np.full(d_sae, np.log(THETA0), np.float32)
    pre = (base.x[:512] - p.b_dec) @ p.W_enc + p.b_enc
    l0 = float(np.mean(np.sum(pre > np.float32(THETA0), axis=1)))
    _cache.clear()  # one regime's problem at a time (paper size: ~170 MB each)
    _cache[key] = JProblem(base.x, p, lt, l0)
    return _cache[key]


@pytest.fixture(params=REGIMES)
def regime(request):
    return request.param


def _group(benchmark, size, regime, backend, prob):
    benchmark.group = f"jumprelu_{regime}[{size}]"
    benchmark.extra_info.update(backend=backend, size=size, l0=prob.l0)


def _problem(request, size, batch, regime):
    return jumprelu_problem(size, regime, batch, request.config.getoption("--bench-l0"))


def test_jumprelu_bare_matmul(benchmark, request, size, batch, regime):
    """The floor each group's 'x matmul' divides by: float32 GEMM of the
    encoder's shapes into a preallocated output."""
    prob = _problem(request, size, batch, regime)
    _group(benchmark, size, regime, "bare_matmul", prob)
    x, W = prob.x, prob.params.W_enc
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    benchmark(np.matmul, x, W, out=out)
    assert np.isfinite(out[0, 0])


def test_jumprelu_dense_blas(benchmark, request, size, batch, regime):
    """The dense step to stay below at any density (a ReLU step: same GEMMs)."""
    prob = _problem(request, size, batch, regime)
    _group(benchmark, size, regime, "dense_blas", prob)
    ds = DenseStep(prob.params, prob.x.shape[0], l1_coefficient=1e-4, lr=LR,
                   decoder_norm="unit_norm")
    benchmark(ds.step, prob.x)
    assert np.isfinite(ds.loss)


def test_train_step_jumprelu(benchmark, request, size, batch, regime, backend_name):
    prob = _problem(request, size, batch, regime)
    be = fastsae.get_backend(backend_name)
    _group(benchmark, size, regime, backend_name, prob)
    params = be.to_backend(prob.params.copy())
    state = be.to_backend(AdamState.zeros_like(prob.params))
    x = be.to_backend(prob.x)
    d_sae = prob.params.d_sae
    lt = be.to_backend(prob.log_threshold.copy())
    m = be.to_backend(np.zeros(d_sae, np.float32))
    v = be.to_backend(np.zeros(d_sae, np.float32))
    kw = dict(log_threshold=lt, threshold_m=m, threshold_v=v, bandwidth=BANDWIDTH,
              l0_coefficient=L0_COEFFICIENT, lr=LR)

    def step():
        r = be.train_step_jumprelu(params, state, x, **kw)
        be.synchronize()
        return r

    if backend_name != "numpy":
        step()  # compile / warm the workspaces, not timed
    res = benchmark(step)
    benchmark.extra_info["l0"] = res.l0  # measured by the step itself
    assert np.isfinite(res.total)
    assert abs(res.l0 - prob.l0) <= 0.05 * prob.l0 + 1.0, (res.l0, prob.l0)



#: the other sparsity penalties, timed in the same groups (issue 15's fourth
#: landing): the pre-activation loss with 10% of the latents dead
MODES = {"tanh": (fastsae.JumpReLUSparsity("tanh"), 0.0),
         "quadratic": (fastsae.JumpReLUSparsity("quadratic", target_l0=48.0), 0.0),
         "pre_act": (fastsae.JumpReLUSparsity(pre_act_coefficient=3e-6), 0.1)}


@pytest.mark.parametrize("mode", list(MODES))
def test_train_step_jumprelu_mode(benchmark, request, size, batch, regime, backend_name, mode):
    """``train_step_jumprelu`` with a non-default ``sparsity`` (row label
    ``<backend>+<mode>``), beside the default step of the same group."""
    prob = _problem(request, size, batch, regime)
    be = fastsae.get_backend(backend_name)
    _group(benchmark, size, regime, f"{backend_name}+{mode}", prob)
    sparsity, dead_fraction = MODES[mode]
    d_sae = prob.params.d_sae
    dead = np.zeros(d_sae, bool)
    dead[np.random.default_rng(0).permutation(d_sae)[:int(dead_fraction * d_sae)]] = True
    params = be.to_backend(prob.params.copy())
    state = be.to_backend(AdamState.zeros_like(prob.params))
    x = be.to_backend(prob.x)
    kw = dict(log_threshold=be.to_backend(prob.log_threshold.copy()),
              threshold_m=be.to_backend(np.zeros(d_sae, np.float32)),
              threshold_v=be.to_backend(np.zeros(d_sae, np.float32)), bandwidth=BANDWIDTH,
              l0_coefficient=L0_COEFFICIENT, lr=LR, sparsity=sparsity,
              dead_mask=be.to_backend(dead) if dead.any() else None)

    def step():
        r = be.train_step_jumprelu(params, state, x, **kw)
        be.synchronize()
        return r

    if backend_name != "numpy":
        step()  # compile / warm the workspaces, not timed
    res = benchmark(step)
    benchmark.extra_info["l0"] = res.l0
    assert np.isfinite(res.total)
    assert (res.aux > 0) == (mode == "pre_act" and bool(dead.any()))
