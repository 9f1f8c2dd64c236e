"""JumpReLU's sparsity modes (issue 15, :class:`fastsae.JumpReLUSparsity`):
every backend's ``jumprelu_gradients`` / ``train_step_jumprelu`` through the
validating front (``fastsae.get_backend``) against the float64 NumPy oracle
(:mod:`fastsae.backends.reference`, JumpReLU section) on the same float32
inputs, in the style of ``tests/test_jumprelu.py`` (whose problems, regimes
and helpers this file reuses; the oracle's finite differences live there).

1. ``"tanh"`` (``tanh_scale`` 0.5, 4, 30), ``"quadratic"`` (``target_l0``
   below, near and above the batch's L0) and the pre-activation loss
   (``pre_act_coefficient > 0`` with ``dead_mask`` marking no feature, some,
   every one, and ``dead_mask=None``), the latter combined with each mode:
   gradients, ``l0_loss`` and ``aux`` against the oracle, on test_jumprelu's
   shapes and regimes (the CUDA simulator: its tiny shapes and a few cases),
   for SAEs and for transcoders (``y`` given) with and without ``W_skip``;
   both sides of the CPU backends' density switch.
2. ``train_step_jumprelu``: one step and several in a row, each checked
   against the float64 reference step from the backend's own float32 state
   (test_jumprelu's ``_check_step`` bound), with ``StepResult.aux`` and
   ``extra['l0_loss']``.
3. The default: ``sparsity=None`` and every default ``JumpReLUSparsity``
   (``JumpReLUSparsity()``, and the step mode with an ignored
   ``tanh_scale`` / ``target_l0`` or with a ``dead_mask`` but
   ``pre_act_coefficient = 0``) give bitwise the same results.
4. The front: a bad ``sparsity`` or ``dead_mask`` is a TypeError/ValueError
   naming the argument, raised before anything is written.

Problems. As test_jumprelu's ``_problem``: thresholds are redrawn until no
pre-activation lies within its float32 error bound of ``theta``, ``lo`` or
``hi`` (and, for several steps, along the float64 reference run with this
sparsity configuration), so the active set, the window, the per-row L0 and
the pre-activation loss's set ``below = dead & (pre < theta)`` are the same
for every correct backend: ``l0``, ``fire_counts`` and the set-valued parts
of the losses are compared exactly or to a few roundings.

Tolerances. :func:`_bounds` extends test_jumprelu's ``_bounds`` (magnitudes
of every sum's terms propagated in float64 through the chain pre -> x_hat ->
d_f -> d_pre -> gradients, times ``c = 8 (k + 4) u``, ``k = 2 max(N, d_in,
d_sae, d_out)``, ``u = 2**-24``) with the new terms (``c0`` the
l0_coefficient, ``s`` tanh_scale, ``p`` pre_act_coefficient, ``Pb`` the
float32 error bound of a pre-activation, ``Pm`` the magnitude of its terms):

* tanh: ``t = (c0 s / N) (1 - tanh(s f)^2)`` joins ``d_f`` wherever it is
  used (active entries' ``d_pre`` and the window's sum); ``0 <= t <= c0 s /
  N``, so ``c0 s / N`` is added to ``d_f``'s magnitude there (its own float32
  evaluation, ``1 - tanh^2`` included, is a few ``u`` of that). Through
  ``f``'s error: ``|dt/df| = (c0 s^2 / N) |2 tanh sech^2| <= c0 s^2 / N``, so
  ``c0 s^2 / N * Pb`` is added to ``d_f``'s absolute error at active entries
  (inactive entries have ``f = 0`` exactly); the chain is linear in ``d_f``'s
  error, so it is carried as ``Pb c0 s^2 / (N c)`` in the magnitude. No Step
  term in the threshold's gradient.
* quadratic: ``q_i = 4 c0 (L0_i - T) / (N T)`` with exact integer
  ``L0_i``; a backend computing it in float32 rounds ``T`` (a relative
  ``u``, relative to ``L0_i + T`` after the subtraction) and then a few
  products: the magnitude ``Q_i = 4 c0 (L0_i + T) / (N T)`` (times ``c``,
  many ``u``) covers it; the Step term's magnitude in ``log_threshold``'s
  gradient is ``theta / eps * sum_{i in window_j} Q_i``.
* pre-activation loss: ``d_pre`` gets ``-p / N`` at the below entries of the
  dead columns (magnitude ``p / N`` there, flowing to ``W_enc``'s, ``b_enc``'s
  and an SAE's ``b_dec``'s bounds like any ``d_pre``); the threshold's
  gradient gets ``theta * p / N * count_i(below_ij)`` in ``log_threshold``'s
  magnitude. The set is exact (thresholds clear).
* ``l0_loss``: step ``c0 nnz / N`` with an exact count: a few roundings,
  ``1e-6`` relative (as test_jumprelu). tanh ``c0 / N sum_active tanh(s
  pre)``: each term moves by at most ``s Pb`` through ``pre`` (``|tanh'| <=
  1``), its evaluation by a few ``u`` (``|tanh| <= 1``), the sum of ``nnz``
  terms by ``(nnz + 2) u nnz``: ``c0 / N (2 s sum Pb + 8 (nnz + 4) u nnz)``.
  quadratic ``c0 / N sum_i 2 / T (L0_i - T)^2``: every partial result is
  bounded by the magnitude ``2 / T (|L0_i - T| + L0_i + T)^2`` (which covers
  the rounding of ``T`` in the difference, to first order), and the
  ``N``-term sum of positive terms adds ``(N + 2) u``: ``8 (N + 8) u c0 / N
  sum_i 2 / T (|L0_i - T| + L0_i + T)^2``.
* ``aux = p / N sum_below (theta - pre)``: each term moves by ``Pb + 4 u
  theta`` (pre's error, theta's float32 rounding), and a sum of ``K <= N
  n_dead`` terms in any order by ``(K + 2) u`` of its magnitudes ``theta +
  |pre|``: ``p / N (2 sum_below (Pb + 4 u theta) + 4 (K + 4) u sum_below
  (theta + |pre|))``. Where no entry is below (no pre-activation loss, no
  dead feature, or none below its threshold) ``aux`` must be exactly 0.
* ``total = mse + l0_loss + aux``: the sum of the three bounds plus ``4 u``
  of their magnitudes.

A training step: test_jumprelu's ``_check_step`` Adam bound (``lr (5 T / eps
+ 64 u) + 4 u |p|`` per parameter, the renormalization's, the moments') with
these gradient bounds ``T``, W_skip included.

The CUDA simulator. Without a GPU, :func:`test_under_simulator` reruns this
file in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` and
``FASTSAE_TEST_BACKENDS=cuda`` (the simulator must be switched on before
numba is imported), as tests/test_cuda_jumprelu.py does; there only the
tiny shapes and a few cases of each test run (``_SIM_*``), the simulator
executing every kernel as Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastsae import AdamState, JumpReLUSparsity, SAEParams
from fastsae.backends import reference as R
from fastsae.backends import tunables as TU

from conftest import U32, f64, is_cuda_sim
from test_jumprelu import (ADAM_EPS, BANDWIDTH, CASES, L0C, LR, SHAPES, _STATUS, _assert_close,
                           _clear, _density_tunables, _draw, _host_only, _host_state, _sim,
                           _snapshot)
from test_jumprelu import _params as _sae_params
# the backend fixture: every backend, or those in FASTSAE_TEST_BACKENDS
from test_jumprelu import be  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SIM = is_cuda_sim()

if SIM:  # the simulator's shared arrays under short switch intervals (test_cuda_backend)
    from test_cuda_backend import _lock_simulator_shared_arrays

    _lock_simulator_shared_arrays()


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator_switches():
    """The simulator polls its threads: a short GIL switch interval makes
    each ``syncthreads`` take microseconds instead of ~5 ms."""
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


# ------------------------------------------------------------------ configurations
PRE_P = 0.5  # pre_act_coefficient of the pre-activation-loss configurations
TANH_SCALES = (0.5, 4.0, 30.0)
TARGETS = ("below", "near", "above")
DEADS = ("none", "some", "all", "nomask")


def _cfg_table():
    """name -> (mode, tanh_scale or target kind, dead kind or None)."""
    out = {"step": ("step", None, None)}
    for s in TANH_SCALES:
        out[f"tanh{s:g}"] = ("tanh", s, None)
    for t in TARGETS:
        out[f"quad-{t}"] = ("quadratic", t, None)
    for base, mode, arg in (("step", "step", None), ("tanh4", "tanh", 4.0),
                            ("quad-near", "quadratic", "near")):
        for d in DEADS:
            out[f"{base}+pre-{d}"] = (mode, arg, d)
    return out


CFGS = _cfg_table()
#: every non-default configuration
ALL_CFGS = [c for c in CFGS if c != "step"]
#: the configurations swept over every shape and regime: each mode, and the
#: pre-activation loss with each mode
MAIN_CFGS = ("tanh4", "quad-near", "step+pre-some", "tanh4+pre-some", "quad-near+pre-some")


def _sparsity(cfg, act, d_sae, rng):
    """``(JumpReLUSparsity, dead_mask)`` of ``cfg`` for a problem whose
    active set is ``act``: quadratic targets from the batch's mean L0
    (``below``: 0.4 L0, ``near``: L0 + 0.37, not a float32 number, ``above``:
    2 L0 + 1.3), clipped to ``[0.25, d_sae]``; dead masks ``none`` (all
    False), ``some`` (about a third, at least one True and, for d_sae > 1,
    one False), ``all``, ``nomask`` (None)."""
    mode, arg, dead = CFGS[cfg]
    kw = {}
    if mode == "tanh":
        kw["tanh_scale"] = float(arg)
    if mode == "quadratic":
        l0 = float(act.sum(axis=1).mean())
        t = {"below": 0.4 * l0, "near": l0 + 0.37, "above": 2 * l0 + 1.3}[arg]
        kw["target_l0"] = float(min(max(t, 0.25), d_sae))
    mask = None
    if dead is not None:
        kw["pre_act_coefficient"] = PRE_P
        if dead == "none":
            mask = np.zeros(d_sae, bool)
        elif dead == "all":
            mask = np.ones(d_sae, bool)
        elif dead == "some":
            mask = rng.random(d_sae) < 0.35
            mask[rng.integers(d_sae)] = True
            if d_sae > 1 and mask.all():
                mask[rng.integers(d_sae)] = False
    return JumpReLUSparsity(mode, **kw), mask


# ------------------------------------------------------------------ problems
@dataclass
class SProblem:
    x: np.ndarray
    p: SAEParams
    log_threshold: np.ndarray
    bandwidth: float
    l0c: float
    sparsity: JumpReLUSparsity
    dead_mask: object  # bool [d_sae] or None
    y: object = None   # a transcoder's target

    @property
    def n(self):
        return self.x.shape[0]


def _p64(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


def _tc_params(rng, d_in, d_out, d_sae, case, skip):
    """A transcoder's float32 parameters (unit-norm decoder rows of width
    ``d_out``; ``dense``: b_enc = 0 and small thresholds, about half fire)."""
    W_dec = rng.normal(size=(d_sae, d_out))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)
    if case == "dense":
        b_enc = np.zeros(d_sae)
    else:
        b_enc = rng.normal(size=d_sae) * 0.3 + (6.0 if case == "all" else 0.0)
    b_dec = rng.normal(size=d_out) * 0.1
    W_skip = 0.3 * rng.normal(size=(d_out, d_in)) / np.sqrt(d_in) if skip else None
    arrs = [np.ascontiguousarray(a, np.float32) for a in (W_enc, b_enc, W_dec, b_dec)]
    return SAEParams(*arrs, W_skip=None if W_skip is None else
                     np.ascontiguousarray(W_skip, np.float32))


def _pre64(x, p, y=None):
    """float64 pre-activations of the float32 inputs (an SAE centres ``x``
    by ``b_dec``, a transcoder does not) and the float32 error bound of each
    (test_jumprelu's ``_pre64``)."""
    x64, P = f64(x), _p64(p)
    xc = x64 if y is not None else x64 - P.b_dec
    pre = xc @ P.W_enc + P.b_enc
    centre = 0.0 if y is not None else np.abs(P.b_dec)
    mag = (np.abs(x64) + centre) @ np.abs(P.W_enc) + np.abs(P.b_enc)
    return pre, 4.0 * (x.shape[1] + 4) * U32 * mag + 1e-30


def _problem(shape, case, cfg="step", seed=0, steps=1, kind="sae", l0c=L0C):
    """A problem of regime ``case`` (test_jumprelu's ``CASES``) and sparsity
    configuration ``cfg`` whose thresholds keep every pre-activation clear
    of theta/lo/hi at the start and, for ``steps > 1``, along the float64
    reference run (with this configuration) from it. ``kind``: ``"sae"``
    (``shape = (N, d_in, d_sae)``), ``"transcoder"`` or ``"skip"`` (``shape
    = (N, d_in, d_out, d_sae)``). The quadratic target is set from the
    start's L0 and then held while thresholds are redrawn for the run."""
    if kind == "sae":
        n, d_in, d_sae = shape
        d_out = d_in
    else:
        n, d_in, d_out, d_sae = shape
    key = [seed, n, d_in, d_out, d_sae, CASES.index(case), ALL_CFGS.index(cfg) + 1
           if cfg in ALL_CFGS else 0, ("sae", "transcoder", "skip").index(kind)]
    rng = np.random.default_rng(key)
    if kind == "sae":
        p = _sae_params(rng, d_in, d_sae, case)
        y = None
    else:
        p = _tc_params(rng, d_in, d_out, d_sae, case, kind == "skip")
    x = np.ascontiguousarray(rng.normal(size=(n, d_in)), np.float32)
    if kind != "sae":
        y = np.ascontiguousarray(rng.normal(size=(n, d_out)), np.float32)
    bw = BANDWIDTH[case]
    pre, bound = _pre64(x, p, y)
    if case == "all":  # room below every column's smallest pre-activation for its threshold
        lift = np.maximum(0.5 - pre.min(axis=0), 0.0)
        if lift.any():
            p.b_enc[...] = (f64(p.b_enc) + lift).astype(np.float32)
            pre, bound = _pre64(x, p, y)
    draw = _draw(case, pre, bw)
    idx = np.arange(d_sae)
    lt = np.log(draw(rng, idx)).astype(np.float32)
    for _ in range(200):
        bad = ~_clear(pre, bound, lt, bw)
        if not bad.any():
            break
        lt[bad] = np.log(draw(rng, idx[bad])).astype(np.float32)
    else:
        raise RuntimeError(f"no clear thresholds found for {shape} {case}")
    theta = np.exp(f64(lt))
    sp, dead = _sparsity(cfg, pre > theta, d_sae, np.random.default_rng(key + [1]))
    prob = SProblem(x, p, lt, bw, l0c, sp, dead, y)
    if steps == 1:
        return prob
    for _ in range(200):
        bad = ~_clear(pre, bound, lt, bw)
        if not bad.any():
            bad = _unclear_in_run(prob, steps)
        if not bad.any():
            return prob
        lt[bad] = np.log(draw(rng, idx[bad])).astype(np.float32)
    raise RuntimeError(f"no clear {steps}-step run found for {shape} {case} {cfg}")


def _unclear_in_run(prob, steps):
    """Features whose pre-activations come within (2x the float32 bound
    plus 1e-6 relative: the float32 run drifts from the float64 one) of a
    threshold or window edge along ``steps`` float64 reference steps."""
    p64 = _p64(prob.p)
    s64 = AdamState(_zeros64(p64), _zeros64(p64), 0)
    lt64, m64, v64 = f64(prob.log_threshold), np.zeros(p64.d_sae), np.zeros(p64.d_sae)
    x64 = f64(prob.x)
    y64 = None if prob.y is None else f64(prob.y)
    bad = np.zeros(p64.d_sae, bool)
    for s in range(steps):
        if s:
            p32 = SAEParams(*(a.astype(np.float32) for a in p64.arrays()))
            _, bound = _pre64(prob.x, p32, prob.y)
            xc = x64 if y64 is not None else x64 - p64.b_dec
            pre = xc @ p64.W_enc + p64.b_enc
            margin = 2 * bound + 1e-6 * (1 + np.abs(pre))
            bad |= ~_clear(pre, margin, lt64.astype(np.float32), prob.bandwidth)
        R.train_step_jumprelu(p64, s64, x64, log_threshold=lt64, threshold_m=m64,
                              threshold_v=v64, bandwidth=prob.bandwidth,
                              l0_coefficient=prob.l0c, lr=LR, eps=ADAM_EPS,
                              sparsity=prob.sparsity, dead_mask=prob.dead_mask, y=y64)
    return bad


def _zeros64(p):
    return SAEParams(*(np.zeros(a.shape) for a in p.arrays()))


# ------------------------------------------------------------------ bounds
@dataclass
class Bounds:
    loss: object            # float64 oracle Losses
    grads: SAEParams        # float64 oracle gradients
    g_lt: np.ndarray
    tol: dict               # name -> elementwise bound (the parameters' names, and "lt")
    tol_mse: float
    tol_l0: float
    tol_aux: float
    tol_total: float
    active: np.ndarray
    window: np.ndarray
    below: np.ndarray       # the pre-activation loss's entries


def _bounds(x, p, lt, bw, l0c, sparsity, dead_mask, y=None) -> Bounds:
    """The float64 oracle at the float32 point and elementwise float32 error
    bounds of each output: test_jumprelu's ``_bounds`` (for an SAE or a
    transcoder) with the sparsity terms of the module docstring."""
    n, d_in = x.shape
    d_sae, d_out = p.d_sae, p.W_dec.shape[1]
    k = 2 * max(n, d_in, d_sae, d_out)
    c = 8 * (k + 4) * U32
    sp = sparsity if sparsity is not None else JumpReLUSparsity()
    x64, P, lt64 = f64(x), _p64(p), f64(lt)
    y64 = None if y is None else f64(y)
    loss, g, g_lt = R.jumprelu_gradients(x64, P, lt64, bw, l0c, sparsity, dead_mask, y64)
    xc = x64 if y is not None else x64 - P.b_dec
    tgt = x64 if y is None else y64
    pre = xc @ P.W_enc + P.b_enc
    theta, lo, hi = R.jumprelu_window(lt64, bw)
    act = pre > theta
    win = (pre > lo) & (pre < hi)
    Pm = np.abs(xc) @ np.abs(P.W_enc) + np.abs(P.b_enc)
    Pb = _pre64(x, p, y)[1]
    aW = np.abs(P.W_dec)
    fm = act * Pm
    Er = fm @ aW + np.abs(P.b_dec) + np.abs(tgt)
    if P.W_skip is not None:
        Er = Er + np.abs(x64) @ np.abs(P.W_skip).T
    Dx = 2.0 / n * Er
    Df = Dx @ aW.T
    if sp.mode == "tanh":
        s = sp.tanh_scale
        Df = Df + (act | win) * (l0c * s / n) + act * (l0c * s * s / n) * Pb / c
    Dp = act * Df
    below = np.zeros(pre.shape, bool)
    pa = sp.pre_act_coefficient
    if pa > 0 and dead_mask is not None:
        below = (pre < theta) & np.asarray(dead_mask)[None, :]
    Dp = Dp + below * (pa / n)
    T = {"W_enc": c * (np.abs(xc).T @ Dp), "b_enc": c * Dp.sum(axis=0)}
    T["b_dec"] = c * Dx.sum(axis=0)
    if y is None:
        T["b_dec"] = T["b_dec"] + c * (np.abs(P.W_enc) @ Dp.sum(axis=0))
    Tw = c * (fm.T @ Dx)
    sq = np.maximum(np.sum(P.W_dec ** 2, axis=1, keepdims=True), 1e-300)
    T["W_dec"] = Tw + aW * np.sum(Tw * aW, axis=1, keepdims=True) / sq
    if P.W_skip is not None:
        T["W_skip"] = c * (Dx.T @ np.abs(x64))
    M = theta ** 2 / bw * np.sum(win * Df, axis=0) + theta * (pa / n) * below.sum(axis=0)
    L0 = act.sum(axis=1).astype(np.float64)
    if sp.mode == "step":
        M = M + theta * l0c * win.sum(axis=0) / (n * bw)
    elif sp.mode == "quadratic":
        tl0 = float(sp.target_l0)
        Q = 4.0 * l0c * (L0 + tl0) / (n * tl0)
        M = M + theta / bw * np.sum(win * Q[:, None], axis=0)
    T["lt"] = c * M
    for key in T:
        T[key] = T[key] + 1e-30
    r = (act * pre) @ P.W_dec + P.b_dec - tgt
    if P.W_skip is not None:
        r = r + x64 @ P.W_skip.T
    tol_mse = c * 2.0 / n * float(np.sum(np.abs(r) * Er)) + 1e-30
    nnz = float(act.sum())
    if sp.mode == "step":
        tol_l0 = 1e-6 * abs(loss.l0_loss)
    elif sp.mode == "tanh":
        tol_l0 = l0c / n * (2 * sp.tanh_scale * float(np.sum(act * Pb))
                            + 8 * (nnz + 4) * U32 * nnz)
    else:
        tl0 = float(sp.target_l0)
        tol_l0 = 8 * (n + 8) * U32 * l0c / n * float(
            np.sum(2.0 / tl0 * (np.abs(L0 - tl0) + L0 + tl0) ** 2))
    tol_l0 += 1e-300
    K = n * (int(np.sum(dead_mask)) if dead_mask is not None else 0)
    th_b = np.broadcast_to(theta, pre.shape)
    tol_aux = pa / n * (2 * float(np.sum(below * (Pb + 4 * U32 * th_b)))
                        + 4 * (K + 4) * U32 * float(np.sum(below * (th_b + np.abs(pre)))))
    tol_total = tol_mse + tol_l0 + tol_aux + 4 * U32 * (abs(loss.mse) + abs(loss.l0_loss)
                                                         + abs(loss.aux)) + 1e-30
    return Bounds(loss, g, g_lt, T, tol_mse, tol_l0, tol_aux, tol_total, act, win, below)


def _prob_bounds(prob, p=None, lt=None) -> Bounds:
    return _bounds(prob.x, prob.p if p is None else p,
                   prob.log_threshold if lt is None else lt, prob.bandwidth, prob.l0c,
                   prob.sparsity, prob.dead_mask, prob.y)


# ------------------------------------------------------------------ checks
def _check_losses(loss, B: Bounds):
    want = B.loss
    assert loss.l1 == 0.0, loss
    assert abs(loss.mse - want.mse) <= B.tol_mse, ("mse", loss.mse, want.mse, B.tol_mse)
    assert abs(loss.l0_loss - want.l0_loss) <= B.tol_l0, \
        ("l0_loss", loss.l0_loss, want.l0_loss, B.tol_l0)
    if not B.below.any():
        assert want.aux == 0.0 and loss.aux == 0.0, ("aux must be exactly 0", loss.aux)
    else:
        assert abs(loss.aux - want.aux) <= B.tol_aux, ("aux", loss.aux, want.aux, B.tol_aux)
    assert abs(loss.total - want.total) <= B.tol_total, \
        ("total", loss.total, want.total, B.tol_total)


def _dev(be, a):
    return None if a is None else be.to_backend(a)


def _gradients(be, prob, **over):
    kw = dict(sparsity=prob.sparsity, dead_mask=_dev(be, prob.dead_mask), y=_dev(be, prob.y))
    kw.update(over)
    args = [be.to_backend(a) for a in (prob.x, prob.p, prob.log_threshold)]
    return be.jumprelu_gradients(*args, prob.bandwidth, prob.l0c, **kw)


def _check_gradients(be, prob) -> Bounds:
    B = _prob_bounds(prob)
    loss, g, g_lt = _gradients(be, prob)
    g, g_lt = be.to_numpy(g), np.asarray(be.to_numpy(g_lt))
    _check_losses(loss, B)
    assert g.names == prob.p.names, (g.names, prob.p.names)
    for name in prob.p.names:
        _assert_close(getattr(g, name), getattr(B.grads, name), B.tol[name], name)
    _assert_close(g_lt, B.g_lt, B.tol["lt"], "g_log_threshold")
    return B


def _check_step(got, before, after, prob, kw, step):
    """One backend step against the float64 reference step from the same
    float32 state ``before`` (test_jumprelu's ``_check_step``, with the
    sparsity terms, ``aux`` and a transcoder's ``W_skip`` and target)."""
    p0, s0, lt0, m0, v0, c0 = before
    hp, hs, lt1, m1, v1, c1 = after
    n = prob.n
    bw = prob.bandwidth
    pre, bound = _pre64(prob.x, p0, prob.y)
    assert _clear(pre, bound, lt0, bw).all(), \
        f"step {step}: a pre-activation came within float32 rounding of a threshold " \
        "(make _problem's margin larger)"
    B = _prob_bounds(prob, p0, lt0)
    p64 = _p64(p0)
    s64 = AdamState(_p64(s0.m), _p64(s0.v), s0.step)
    lt64, m64, v64 = f64(lt0), f64(m0), f64(v0)
    c64 = None if c0 is None else c0.copy()
    y64 = None if prob.y is None else f64(prob.y)
    want = R.train_step_jumprelu(p64, s64, f64(prob.x), log_threshold=lt64, threshold_m=m64,
                                 threshold_v=v64, bandwidth=bw, l0_coefficient=prob.l0c,
                                 fire_counts=c64, sparsity=prob.sparsity,
                                 dead_mask=prob.dead_mask, y=y64, **kw)
    # StepResult (before the update)
    assert got.l1 == 0.0, got
    assert abs(got.mse - want.mse) <= B.tol_mse, (step, got.mse, want.mse)
    assert got.l0 == want.l0, (step, got.l0, want.l0)  # exact: selection is clear
    assert abs(got.extra["l0_loss"] - want.extra["l0_loss"]) <= B.tol_l0, \
        (step, "l0_loss", got.extra["l0_loss"], want.extra["l0_loss"], B.tol_l0)
    if not B.below.any():
        assert want.aux == 0.0 and got.aux == 0.0, (step, "aux must be exactly 0", got.aux)
    else:
        assert abs(got.aux - want.aux) <= B.tol_aux, (step, "aux", got.aux, want.aux)
    assert abs(got.total - want.total) <= B.tol_total, (step, got.total, want.total)
    t64 = f64(prob.x if prob.y is None else prob.y)
    var = float(np.sum((t64 - t64.mean(axis=0)) ** 2) / n)
    if var > 0:
        assert abs(got.explained_variance - want.explained_variance) <= \
            B.tol_mse / var + 1e-5 * abs(1 - want.explained_variance), step
    else:
        assert got.explained_variance == want.explained_variance
    assert hs.step == s0.step + 1 == s64.step, (step, hs.step)
    if c0 is not None:
        assert c1.dtype == np.int64 and np.array_equal(c1, c64), f"step {step}: fire_counts"
    lr, eps, b1, b2 = kw["lr"], kw["eps"], kw.get("beta1", 0.9), kw.get("beta2", 0.999)
    grads = dict(B.grads.as_dict(), lt=B.g_lt)
    news = dict(p64.as_dict(), lt=lt64)
    gots = dict(hp.as_dict(), lt=lt1)
    assert hp.names == p64.names, (hp.names, p64.names)
    moments = {name: (getattr(s64.m, name), getattr(s64.v, name),
                      getattr(hs.m, name), getattr(hs.v, name)) for name in p64.names}
    moments["lt"] = (m64, v64, m1, v1)
    for name, T in B.tol.items():
        g = np.abs(grads[name])
        want_p = news[name]
        tol = lr * (5 * T / eps + 64 * U32) + 4 * U32 * np.abs(want_p)
        if name == "W_dec":
            rn = np.sqrt(np.sum(tol ** 2, axis=1, keepdims=True))
            tol = tol + np.abs(want_p) * rn + 4 * (want_p.shape[1] + 2) * U32 * np.abs(want_p)
        _assert_close(gots[name], want_p, tol, f"step {step}: {name}")
        mw, vw, mg, vg = moments[name]
        _assert_close(mg, mw, (1 - b1) * T + 2 * U32 * np.abs(mw) + 1e-38,
                      f"step {step}: m.{name}")
        _assert_close(vg, vw, (1 - b2) * (2 * g * T + T * T) + 3 * U32 * np.abs(vw) + 1e-38,
                      f"step {step}: v.{name}")
    assert np.allclose(np.linalg.norm(f64(hp.W_dec), axis=1), 1.0, atol=1e-5)
    return got


def _copy(a):
    return None if a is None else a.copy()


def _run_and_check(be, prob, steps, fire_counts=True):
    """``steps`` backend steps, each checked against the float64 reference
    step from the backend's state; returns the final host state and the
    step results."""
    kw = dict(lr=LR, eps=ADAM_EPS, beta1=0.9, beta2=0.999)
    p = prob.p
    bp = be.to_backend(p.copy())
    bs = be.to_backend(AdamState.zeros_like(p))
    blt = be.to_backend(prob.log_threshold.copy())
    bm = be.to_backend(np.zeros(p.d_sae, np.float32))
    bv = be.to_backend(np.zeros(p.d_sae, np.float32))
    bc = be.to_backend(np.zeros(p.d_sae, np.int64)) if fire_counts else None
    bx, by, bd = be.to_backend(prob.x), _dev(be, prob.y), _dev(be, prob.dead_mask)
    results = []
    for step in range(steps):
        before = [_copy(a) for a in _host_state(be, bp, bs, blt, bm, bv, bc)]
        got = be.train_step_jumprelu(bp, bs, bx, log_threshold=blt, threshold_m=bm,
                                     threshold_v=bv, bandwidth=prob.bandwidth,
                                     l0_coefficient=prob.l0c, fire_counts=bc,
                                     sparsity=prob.sparsity, dead_mask=bd, y=by, **kw)
        be.synchronize()
        after = _host_state(be, bp, bs, blt, bm, bv, bc)
        results.append(_check_step(got, before, after, prob, kw, step))
    return _host_state(be, bp, bs, blt, bm, bv, bc), results


# ------------------------------------------------------------------ selection
def _sim_cases(be, key, sim):
    """The CUDA simulator runs only the ``sim`` cases; every other backend
    (a real GPU included) runs all of them: the CPU cases and the
    simulator's odd tiny shapes."""
    if _sim(be) and key not in sim:
        pytest.skip("CUDA simulator: tiny shapes and a few cases only")


def _ids(cases):
    out = []
    for c in cases:
        parts = []
        for part in c:
            parts.append("x".join(map(str, part)) if isinstance(part, tuple) else str(part))
        out.append("-".join(parts))
    return out


# ------------------------------------------------------------------ 1. gradients
BIG = SHAPES[-1]  # (300, 40, 700): each regime once, the configurations in turn


def _sweep(cfgs):
    """Every CPU shape and regime with each of ``cfgs``; the largest shape
    with one configuration per regime (cycling), to keep the run short."""
    out = [(s, k, c) for s in SHAPES if s != BIG for k in CASES for c in cfgs]
    return out + [(BIG, k, cfgs[i % len(cfgs)]) for i, k in enumerate(CASES)]


GRAD_CPU = _sweep(MAIN_CFGS)
_SIM_GRAD = [((1, 1, 1), "mixed", "tanh4"), ((1, 3, 7), "mixed", "quad-near+pre-some"),
             ((7, 5, 1), "all", "step+pre-some"), ((7, 5, 13), "none", "tanh4+pre-some"),
             ((7, 5, 13), "window", "quad-near"), ((20, 8, 33), "dense", "tanh4+pre-some"),
             ((7, 5, 13), "none_far", "quad-near+pre-some"), ((1, 1, 1), "all", "quad-above"),
             ((1, 3, 7), "none", "step+pre-all"), ((20, 8, 33), "mixed", "quad-near+pre-some"),
             ((7, 5, 13), "all", "tanh4+pre-some"), ((7, 5, 1), "window", "tanh30")]
GRAD_ALL = GRAD_CPU + [c for c in _SIM_GRAD if c not in GRAD_CPU]


@pytest.mark.parametrize("case", GRAD_ALL, ids=_ids(GRAD_ALL))
def test_gradients_modes_match_oracle(be, case):
    """Each mode and the pre-activation loss with each mode, on every shape
    and regime: losses, the five gradients against the oracle."""
    _sim_cases(be, case, _SIM_GRAD)
    shape, kind, cfg = case
    prob = _problem(shape, kind, cfg, seed=1)
    B = _check_gradients(be, prob)
    if kind in ("none", "none_far"):
        assert not B.active.any()
    if kind == "all":
        assert B.active.all()
    if cfg.endswith("pre-some") and kind in ("none", "none_far"):
        assert B.below.any()  # nothing fires: every dead column's entries are below


_CFG_CASES = [((33, 17, 65), "mixed"), ((129, 24, 130), "window"), ((129, 24, 130), "dense"),
              ((31, 7, 3), "none")]
CFG_CPU = [(s, k, c) for s, k in _CFG_CASES for c in ALL_CFGS]
_SIM_CFG = [((7, 5, 13), "mixed", c) for c in ALL_CFGS]
CFG_ALL = CFG_CPU + _SIM_CFG


@pytest.mark.parametrize("case", CFG_ALL, ids=_ids(CFG_ALL))
def test_gradients_every_configuration(be, case):
    """Every configuration: tanh scales 0.5 / 4 / 30, quadratic targets
    below / near / above the L0, the pre-activation loss with no, some and
    every feature dead and without a mask, with each mode."""
    _sim_cases(be, case, _SIM_CFG)
    shape, kind, cfg = case
    prob = _problem(shape, kind, cfg, seed=2)
    B = _check_gradients(be, prob)
    mode, arg, dead = CFGS[cfg]
    if mode == "quadratic" and kind == "mixed":
        l0, t = B.active.sum(axis=1).mean(), prob.sparsity.target_l0
        assert {"below": t < l0, "near": abs(t - l0) < 1, "above": t > l0}[arg], (l0, t)
    if dead in ("none", "nomask") or dead is None:
        assert B.loss.aux == 0.0
    elif kind != "dense" or dead == "all":
        assert B.below.any() and B.loss.aux > 0


@pytest.mark.parametrize("l0c", [0.0, 5.0])
@pytest.mark.parametrize("cfg", ["tanh4", "quad-near", "quad-near+pre-all"])
def test_gradients_l0_coefficient(be, cfg, l0c):
    """No sparsity term (only the pre-activation loss, if any) and one that
    dominates the threshold gradient."""
    shape = (7, 5, 13) if _sim(be) else (129, 24, 130)
    if _sim(be) and (cfg, l0c) != ("quad-near+pre-all", 5.0):
        pytest.skip("CUDA simulator: one case")
    _check_gradients(be, _problem(shape, "mixed", cfg, seed=3, l0c=l0c))


# transcoders: (N, d_in, d_out, d_sae) with d_out below, above, equal to d_in and 1
TSHAPES = [(1, 5, 3, 7), (6, 4, 9, 1), (37, 13, 13, 29), (40, 9, 1, 20), (129, 7, 40, 64),
           (300, 24, 11, 70)]
TC_CFGS = ("step",) + MAIN_CFGS
TC_KINDS = ("transcoder", "skip")
TC_CPU = [(s, "mixed", c, k) for s in TSHAPES for c in TC_CFGS for k in TC_KINDS] \
    + [((37, 13, 6, 29), r, c, k) for r in ("none", "all", "window", "dense")
       for c in ("tanh4+pre-some", "quad-near+pre-all", "quad-above") for k in TC_KINDS]
_SIM_TC = [((1, 3, 2, 4), "mixed", "tanh4+pre-some", "skip"),
           ((7, 5, 3, 13), "mixed", "quad-near+pre-some", "transcoder"),
           ((7, 5, 3, 13), "window", "step+pre-all", "skip")]
TC_ALL = TC_CPU + _SIM_TC


@pytest.mark.parametrize("case", TC_ALL, ids=_ids(TC_ALL))
def test_gradients_transcoder_match_oracle(be, case):
    """Transcoders (``y`` given; the encoder reads ``x`` uncentred, no
    centring term in ``b_dec``'s gradient) and skip transcoders (``W_skip``'s
    gradient too) in each mode, with the pre-activation loss."""
    _sim_cases(be, case, _SIM_TC)
    shape, regime, cfg, kind = case
    prob = _problem(shape, regime, cfg, seed=4, kind=kind)
    _check_gradients(be, prob)


PATH_CFGS = ("tanh30", "quad-above", "step+pre-some", "tanh4+pre-all", "quad-near+pre-some")
PATHS_CPU = [(s, k, c) for s, k in [((129, 24, 130), "dense"), ((33, 17, 65), "window"),
                                    ((37, 13, 29), "none"), ((129, 24, 130), "all")]
             for c in PATH_CFGS] + [((300, 40, 700), "mixed", "quad-near+pre-some")]
_SIM_PATHS = [((7, 5, 13), "mixed", "quad-near+pre-some")]
PATHS = PATHS_CPU + _SIM_PATHS


@pytest.mark.parametrize("pmode", ["dense", "sparse"])
@pytest.mark.parametrize("case", PATHS, ids=_ids(PATHS))
def test_forced_paths_match_oracle(be, monkeypatch, case, pmode):
    """The density switch (``*_JUMPRELU_*MIN_DENSITY``, read at call time)
    forced each way (0: dense, 2: sparse): every mode on both paths,
    gradients and a one-step run (a skip transcoder too on the dense regime)."""
    shape, kind, cfg = case
    names = _density_tunables(be)
    if not names:
        pytest.skip(f"{be.name} has no JumpReLU density switch")
    _sim_cases(be, case, _SIM_PATHS)
    for name in names:
        monkeypatch.setattr(TU, name, 0.0 if pmode == "dense" else 2.0)
    prob = _problem(shape, kind, cfg, seed=5)
    _check_gradients(be, prob)
    _run_and_check(be, prob, steps=1)
    if kind == "dense" and not _sim(be):
        n, d_in, d_sae = shape
        tprob = _problem((n, d_in, 17, d_sae), "dense", cfg, seed=5, kind="skip")
        _check_gradients(be, tprob)
        _run_and_check(be, tprob, steps=1)


# ------------------------------------------------------------------ 2. train_step
STEP_CFGS = ("tanh4", "quad-near+pre-some", "step+pre-some")
STEP_CPU = _sweep(STEP_CFGS)
_SIM_STEP = [((1, 1, 1), "mixed", "quad-near+pre-some"), ((7, 5, 13), "mixed", "tanh4"),
             ((7, 5, 13), "none", "step+pre-some"), ((20, 8, 33), "window", "quad-near+pre-some")]
STEP_ALL = STEP_CPU + [c for c in _SIM_STEP if c not in STEP_CPU]


@pytest.mark.parametrize("case", STEP_ALL, ids=_ids(STEP_ALL))
def test_train_step_one_step(be, case):
    _sim_cases(be, case, _SIM_STEP)
    shape, kind, cfg = case
    _run_and_check(be, _problem(shape, kind, cfg, seed=6), steps=1)


STEPCFG_CPU = [((33, 17, 65), "mixed", c) for c in ALL_CFGS]
_SIM_STEPCFG = [((7, 5, 13), "mixed", "tanh4+pre-all")]
STEPCFG_ALL = STEPCFG_CPU + [c for c in _SIM_STEPCFG if c not in STEPCFG_CPU]


@pytest.mark.parametrize("case", STEPCFG_ALL, ids=_ids(STEPCFG_ALL))
def test_train_step_every_configuration(be, case):
    _sim_cases(be, case, _SIM_STEPCFG)
    shape, kind, cfg = case
    (_, _, _, _, _, counts), results = _run_and_check(be, _problem(shape, kind, cfg, seed=7),
                                                      steps=1)
    r = results[0]
    assert np.isfinite(r.total) and np.isfinite(r.aux) and np.isfinite(r.extra["l0_loss"])
    if CFGS[cfg][2] in ("some", "all"):
        assert r.aux > 0


MULTI = [((7, 5, 13), "mixed"), ((33, 17, 65), "mixed"), ((33, 17, 65), "window"),
         ((129, 24, 130), "mixed"), ((129, 24, 130), "dense"), ((33, 17, 65), "all"),
         ((33, 17, 65), "none")]
MULTI_CFGS = ("tanh4", "quad-near", "step+pre-some", "tanh4+pre-some", "quad-near+pre-some")
MULTI_CPU = [(s, k, c) for s, k in MULTI for c in MULTI_CFGS]
_SIM_MULTI = [((7, 5, 13), "mixed", "tanh4+pre-some"), ((7, 5, 13), "mixed", "quad-near")]
MULTI_ALL = MULTI_CPU + [c for c in _SIM_MULTI if c not in MULTI_CPU]


@pytest.mark.parametrize("case", MULTI_ALL, ids=_ids(MULTI_ALL))
def test_train_step_several_steps(be, case):
    """Four steps in a row, each against the float64 reference step from the
    backend's state (Adam moments carried over, bias correction at t = 1..4,
    fire counts accumulated, the quadratic's per-row L0 and the
    pre-activation loss's set recomputed at each step)."""
    _sim_cases(be, case, _SIM_MULTI)
    steps = 3 if _sim(be) else 4
    shape, kind, cfg = case
    prob = _problem(shape, kind, cfg, seed=8, steps=steps)
    (hp, hs, lt, m, v, c), results = _run_and_check(be, prob, steps)
    assert hs.step == steps
    assert int(c.sum()) > 0 or kind == "none"


TSTEP_CPU = [(s, "mixed", c, k) for s in [(37, 13, 6, 29), (129, 7, 40, 64)]
             for c in ("tanh4+pre-some", "quad-near+pre-some", "step+pre-all")
             for k in ("transcoder", "skip")]
_SIM_TSTEP = [((7, 5, 3, 13), "mixed", "tanh4+pre-some", "skip")]
TSTEP_ALL = TSTEP_CPU + _SIM_TSTEP


@pytest.mark.parametrize("case", TSTEP_ALL, ids=_ids(TSTEP_ALL))
def test_train_step_transcoder_several_steps(be, case):
    """Three transcoder steps (W_skip's parameter and moments checked too)."""
    _sim_cases(be, case, _SIM_TSTEP)
    shape, regime, cfg, kind = case
    steps = 2 if _sim(be) else 3
    prob = _problem(shape, regime, cfg, seed=9, steps=steps, kind=kind)
    (hp, hs, *_), _ = _run_and_check(be, prob, steps)
    assert hs.step == steps and (hp.W_skip is not None) == (kind == "skip")


def test_train_step_without_fire_counts(be):
    if _sim(be):
        pytest.skip("CUDA simulator: covered by the runs with fire counts")
    _run_and_check(be, _problem((33, 17, 65), "mixed", "tanh4+pre-some", seed=10), steps=1,
                   fire_counts=False)


@pytest.mark.parametrize("how", ["nan-W_enc-dead", "nan-log_threshold-dead"])
def test_train_step_finite_or_loud_with_pre_act(be, how):
    """A NaN in a dead feature (which the pre-activation loss reads densely)
    makes the step's losses NaN, ``aux`` included."""
    if _sim(be):
        pytest.skip("CUDA simulator: tests/test_cuda_jumprelu.py covers the rule")
    prob = _problem((7, 5, 13), "mixed", "tanh4+pre-some", seed=11)
    p, lt = prob.p.copy(), prob.log_threshold.copy()
    j = int(np.flatnonzero(prob.dead_mask)[0])
    p.b_enc[j] = -1e6  # the dead feature never fires
    if how == "nan-W_enc-dead":
        p.W_enc[0, j] = np.nan
    else:
        lt[j] = np.nan
    bp, bs = be.to_backend(p), be.to_backend(AdamState.zeros_like(p))
    blt, bm, bv = (be.to_backend(a) for a in (lt, np.zeros_like(lt), np.zeros_like(lt)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = be.train_step_jumprelu(bp, bs, be.to_backend(prob.x), log_threshold=blt,
                                   threshold_m=bm, threshold_v=bv, bandwidth=prob.bandwidth,
                                   l0_coefficient=prob.l0c, lr=1e-3, sparsity=prob.sparsity,
                                   dead_mask=be.to_backend(prob.dead_mask))
    assert np.isnan(r.total) and np.isnan(r.mse) and np.isnan(r.aux), r
    assert np.isnan(r.extra["l0_loss"]), r


# ------------------------------------------------------------------ 3. the default
def _default_variants(d_sae):
    """Every spelling of the default: ``(name, sparsity, dead_mask)``."""
    mask = np.zeros(d_sae, bool)
    mask[::3] = True
    return [("JumpReLUSparsity()", JumpReLUSparsity(), None),
            ("step-ignored-fields", JumpReLUSparsity("step", tanh_scale=7.5, target_l0=3.0),
             None),
            ("step-with-dead_mask", JumpReLUSparsity(), mask),
            ("None-with-dead_mask", None, mask)]


def _outputs(be, prob, sparsity, dead_mask, steps=2):
    """Every output of jumprelu_gradients and of ``steps`` train steps, on
    the host, in a list of arrays."""
    kw = dict(sparsity=sparsity, dead_mask=_dev(be, dead_mask), y=_dev(be, prob.y))
    loss, g, g_lt = _gradients(be, prob, **kw)
    out = [np.asarray(a) for a in be.to_numpy(g).arrays()]
    out += [np.asarray(be.to_numpy(g_lt)),
            np.array([loss.mse, loss.l0_loss, loss.aux, loss.total, loss.l1])]
    bp, bs = be.to_backend(prob.p.copy()), be.to_backend(AdamState.zeros_like(prob.p))
    blt = be.to_backend(prob.log_threshold.copy())
    bm, bv = (be.to_backend(np.zeros(prob.p.d_sae, np.float32)) for _ in range(2))
    bc = be.to_backend(np.zeros(prob.p.d_sae, np.int64))
    bx = be.to_backend(prob.x)
    for _ in range(steps):
        r = be.train_step_jumprelu(bp, bs, bx, log_threshold=blt, threshold_m=bm,
                                   threshold_v=bv, bandwidth=prob.bandwidth,
                                   l0_coefficient=prob.l0c, lr=1e-3, fire_counts=bc, **kw)
        out.append(np.array([r.mse, r.total, r.l0, r.explained_variance, r.aux, r.l1,
                             r.extra["l0_loss"]]))
    be.synchronize()
    hp, hs, lt, m, v, c = _host_state(be, bp, bs, blt, bm, bv, bc)
    return out + hp.arrays() + hs.m.arrays() + hs.v.arrays() + [lt, m, v, c,
                                                               np.array([hs.step])]


_DEFAULT_CASES = [((129, 24, 130), "mixed", "sae"), ((129, 24, 130), "dense", "sae"),
                  ((33, 17, 65), "window", "sae"), ((37, 13, 6, 29), "mixed", "skip"),
                  ((37, 13, 6, 29), "dense", "transcoder")]
_SIM_DEFAULT = [((7, 5, 13), "mixed", "sae")]


@pytest.mark.parametrize("pmode", ["auto", "dense", "sparse"])
@pytest.mark.parametrize("case", _DEFAULT_CASES + _SIM_DEFAULT,
                         ids=_ids(_DEFAULT_CASES + _SIM_DEFAULT))
def test_default_sparsity_is_bitwise_none(be, monkeypatch, case, pmode):
    """``sparsity=None`` and every default ``JumpReLUSparsity`` (``is_default``:
    the step mode with no pre-activation loss, whatever its unused fields or
    the ``dead_mask``) give bitwise-equal gradients, losses, step results
    and updated state, on each side of the density switch."""
    _sim_cases(be, case, _SIM_DEFAULT)
    if pmode != "auto":
        names = _density_tunables(be)
        if not names or _sim(be):
            pytest.skip("no JumpReLU density switch" if not names else
                        "CUDA simulator: the automatic path only")
        for name in names:
            monkeypatch.setattr(TU, name, 0.0 if pmode == "dense" else 2.0)
    shape, kind, model = case
    prob = _problem(shape, kind, "step", seed=12, kind=model)
    variants = _default_variants(prob.p.d_sae)
    if _sim(be):
        variants = [variants[0], variants[2]]
    for _, sp, _ in variants:
        assert sp is None or sp.is_default
    ref = _outputs(be, prob, None, None)
    for name, sp, mask in variants:
        got = _outputs(be, prob, sp, mask)
        assert len(got) == len(ref), name
        for i, (a, b) in enumerate(zip(ref, got)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
            assert np.array_equal(a, b, equal_nan=True), \
                f"{name}: output {i} differs from sparsity=None"


# ------------------------------------------------------------------ 4. the front
def _sp(**kw):
    """A JumpReLUSparsity (the dataclass checks nothing itself: the front
    must catch whatever its fields hold)."""
    return JumpReLUSparsity(**kw)


class _NotSparsity:
    mode, tanh_scale, target_l0, pre_act_coefficient = "tanh", 4.0, None, 0.0


BAD_SPARSITY = [
    # (id, sparsity, dead_mask kind, error, message fragment)
    ("type-str", "tanh", None, TypeError, "sparsity"),
    ("type-dict", {"mode": "tanh"}, None, TypeError, "sparsity"),
    ("type-duck", _NotSparsity(), None, TypeError, "sparsity"),
    ("mode-unknown", _sp(mode="l1"), None, ValueError, "sparsity.mode"),
    ("mode-case", _sp(mode="Tanh"), None, ValueError, "sparsity.mode"),
    ("mode-none", _sp(mode=None), None, ValueError, "sparsity.mode"),
    ("quad-no-target", _sp(mode="quadratic"), None, ValueError, "target_l0"),
    ("target-zero", _sp(mode="quadratic", target_l0=0.0), None, ValueError, "target_l0"),
    ("target-negative", _sp(mode="quadratic", target_l0=-2.0), None, ValueError, "target_l0"),
    ("target-over-d_sae", _sp(mode="quadratic", target_l0=12.5), None, ValueError, "target_l0"),
    ("target-nan", _sp(mode="quadratic", target_l0=float("nan")), None, ValueError,
     "target_l0"),
    ("target-inf", _sp(mode="quadratic", target_l0=float("inf")), None, ValueError,
     "target_l0"),
    ("target-str", _sp(mode="quadratic", target_l0="8"), None, TypeError, "target_l0"),
    ("target-bool", _sp(mode="quadratic", target_l0=True), None, TypeError, "target_l0"),
    ("scale-zero", _sp(mode="tanh", tanh_scale=0.0), None, ValueError, "tanh_scale"),
    ("scale-negative", _sp(mode="tanh", tanh_scale=-4.0), None, ValueError, "tanh_scale"),
    ("scale-nan", _sp(mode="tanh", tanh_scale=float("nan")), None, ValueError, "tanh_scale"),
    ("scale-inf", _sp(mode="tanh", tanh_scale=float("inf")), None, ValueError, "tanh_scale"),
    ("scale-str", _sp(mode="tanh", tanh_scale="4"), None, TypeError, "tanh_scale"),
    ("pre-negative", _sp(pre_act_coefficient=-0.1), "some", ValueError,
     "pre_act_coefficient"),
    ("pre-nan", _sp(pre_act_coefficient=float("nan")), "some", ValueError,
     "pre_act_coefficient"),
    ("pre-inf", _sp(mode="tanh", pre_act_coefficient=float("inf")), "some", ValueError,
     "pre_act_coefficient"),
    ("pre-none", _sp(pre_act_coefficient=None), "some", TypeError, "pre_act_coefficient"),
    ("dead-short", _sp(pre_act_coefficient=0.5), "short", ValueError, "dead_mask"),
    ("dead-long", _sp(pre_act_coefficient=0.5), "long", ValueError, "dead_mask"),
    ("dead-2d", _sp(pre_act_coefficient=0.5), "2d", ValueError, "dead_mask"),
    ("dead-int", _sp(pre_act_coefficient=0.5), "int", TypeError, "dead_mask"),
    ("dead-float", _sp(mode="tanh", pre_act_coefficient=0.5), "float", TypeError, "dead_mask"),
    ("dead-float-default", None, "float", TypeError, "dead_mask"),
]
D_SAE_V = 12  # the validation problem's d_sae (test_jumprelu's _step_inputs)


def _dead(kind):
    base = np.arange(D_SAE_V) % 3 == 0
    return {None: None, "some": base, "short": base[:-1].copy(),
            "long": np.append(base, True), "2d": base[None, :].copy(),
            "int": base.astype(np.int64), "float": base.astype(np.float32)}[kind]


def _step_inputs():
    prob = _problem((9, 5, D_SAE_V), "mixed", "step", seed=13)
    p = prob.p.copy()
    st = AdamState.zeros_like(p)
    st.m.W_enc += 0.5
    st.v.b_dec += 0.25
    st.step = 3
    lt = prob.log_threshold.copy()
    m = np.full(p.d_sae, 0.1, np.float32)
    v = np.full(p.d_sae, 0.2, np.float32)
    counts = np.arange(p.d_sae, dtype=np.int64)
    return prob, p, st, lt, m, v, counts


@pytest.mark.parametrize("bad", BAD_SPARSITY, ids=[b[0] for b in BAD_SPARSITY])
def test_train_step_refuses_bad_sparsity(be, bad):
    """A bad ``sparsity`` or ``dead_mask``: a clear error naming it, before
    anything (parameters, moments, thresholds, fire counts, step) is written."""
    _host_only(be)
    _, sp, dead, err, frag = bad
    prob, p, st, lt, m, v, counts = _step_inputs()
    mask = _dead(dead)
    snap = _snapshot(p, st, lt, m, v, counts)
    with pytest.raises(err, match=frag):
        be.train_step_jumprelu(p, st, prob.x, log_threshold=lt, threshold_m=m, threshold_v=v,
                               bandwidth=0.4, l0_coefficient=0.3, lr=1e-3, fire_counts=counts,
                               sparsity=sp, dead_mask=mask)
    assert _snapshot(p, st, lt, m, v, counts) == snap, "written before refusing"


@pytest.mark.parametrize("bad", BAD_SPARSITY, ids=[b[0] for b in BAD_SPARSITY])
def test_gradients_refuse_bad_sparsity(be, bad):
    _host_only(be)
    _, sp, dead, err, frag = bad
    prob, p, *_ = _step_inputs()
    snap = _snapshot(prob.x, p, prob.log_threshold)
    with pytest.raises(err, match=frag):
        be.jumprelu_gradients(prob.x, p, prob.log_threshold, 0.4, 0.3, sparsity=sp,
                              dead_mask=_dead(dead))
    assert _snapshot(prob.x, p, prob.log_threshold) == snap


@pytest.mark.parametrize("mask", [[True, False] * (D_SAE_V // 2), "dead", 3.0],
                         ids=["list", "str", "float"])
def test_dead_mask_not_an_array(be, mask):
    """A ``dead_mask`` that is not an array: refused with a TypeError or
    ValueError naming it (not an AttributeError from deep inside), or, a
    list of bools only, taken as the array it spells; nothing written
    before a refusal."""
    _host_only(be)
    prob, p, st, lt, m, v, counts = _step_inputs()
    sp = JumpReLUSparsity("tanh", pre_act_coefficient=0.5)
    snap = _snapshot(p, st, lt, m, v, counts)
    try:
        got = be.jumprelu_gradients(prob.x, p, lt, 0.4, 0.3, sparsity=sp, dead_mask=mask)
    except (TypeError, ValueError) as exc:
        assert "dead_mask" in str(exc), exc
        with pytest.raises((TypeError, ValueError), match="dead_mask"):
            be.train_step_jumprelu(p, st, prob.x, log_threshold=lt, threshold_m=m,
                                   threshold_v=v, bandwidth=0.4, l0_coefficient=0.3, lr=1e-3,
                                   fire_counts=counts, sparsity=sp, dead_mask=mask)
        assert _snapshot(p, st, lt, m, v, counts) == snap, "written before refusing"
        return
    assert isinstance(mask, list), f"dead_mask={mask!r} accepted"
    want = be.jumprelu_gradients(prob.x, p, lt, 0.4, 0.3, sparsity=sp,
                                 dead_mask=np.array(mask, bool))
    assert got[0] == want[0] and np.array_equal(got[2], want[2])


def test_front_accepts_edge_values(be):
    """The edges of what is allowed: ``target_l0 = d_sae`` and a tiny one,
    ``pre_act_coefficient = 0`` with a mask, integer fields (converted),
    ``target_l0`` ignored (not even required) outside the quadratic mode,
    and the aliasing check covering ``dead_mask``."""
    _host_only(be)
    prob, p, st, lt, m, v, counts = _step_inputs()
    mask = _dead("some")
    for sp in (JumpReLUSparsity("quadratic", target_l0=D_SAE_V),
               JumpReLUSparsity("quadratic", target_l0=1e-3, pre_act_coefficient=1),
               JumpReLUSparsity("tanh", tanh_scale=2, pre_act_coefficient=0.0),
               JumpReLUSparsity("step", target_l0=None, pre_act_coefficient=2)):
        loss, g, g_lt = be.jumprelu_gradients(prob.x, p, lt, 0.4, 0.3, sparsity=sp,
                                              dead_mask=mask)
        assert np.isfinite(loss.total) and np.all(np.isfinite(g_lt)), sp
        B = _bounds(prob.x, p, lt, 0.4, 0.3, sp, mask)
        _check_losses(loss, B)
        _assert_close(g_lt, B.g_lt, B.tol["lt"], f"g_log_threshold {sp}")
    # a dead_mask that is the fire counts' memory, viewed as bool, is refused
    buf = np.zeros(D_SAE_V, np.int64)
    alias = buf.view(np.bool_)[:D_SAE_V]
    snap = _snapshot(p, st, lt, m, v, buf)
    with pytest.raises(ValueError, match="share memory"):
        be.train_step_jumprelu(p, st, prob.x, log_threshold=lt, threshold_m=m, threshold_v=v,
                               bandwidth=0.4, l0_coefficient=0.3, lr=1e-3, fire_counts=buf,
                               sparsity=JumpReLUSparsity(pre_act_coefficient=0.5),
                               dead_mask=alias)
    assert _snapshot(p, st, lt, m, v, buf) == snap
    # the inputs that were refused train normally
    r = be.train_step_jumprelu(p, st, prob.x, log_threshold=lt, threshold_m=m, threshold_v=v,
                               bandwidth=0.4, l0_coefficient=0.3, lr=1e-3, fire_counts=counts,
                               sparsity=JumpReLUSparsity("tanh", pre_act_coefficient=0.5),
                               dead_mask=mask)
    assert np.isfinite(r.total) and r.aux > 0 and st.step == 4


# ------------------------------------------------------------------ the simulator
@pytest.mark.skipif(SIM or _STATUS.get("cuda") is None or _STATUS["cuda"].available,
                    reason="runs the file directly (simulator or GPU present), or no CUDA "
                           "backend registered")
def test_under_simulator():
    """This file's CUDA cases under the CUDA simulator, in a subprocess."""
    wanted = os.environ.get("FASTSAE_TEST_BACKENDS")
    if wanted and "cuda" not in wanted.split(","):
        pytest.skip("cuda not in FASTSAE_TEST_BACKENDS")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTSAE_TEST_BACKENDS="cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"),
                                                    env.get("PYTHONPATH")) if p)
    runner = ("import sys; sys.setswitchinterval(5e-5); import pytest; "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", runner, str(Path(__file__))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-40:])
    print(tail)
    assert proc.returncode == 0, f"simulated CUDA JumpReLU sparsity tests failed:\n{tail}"
    assert " passed" in out, tail
