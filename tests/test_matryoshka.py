"""Matryoshka BatchTopK training (issue 15): the oracle against finite
differences, and every backend's ``matryoshka_gradients`` /
``train_step_matryoshka`` against it.

1. The NumPy oracle (``fastsae.backends.reference``) in float64: central
   finite differences of ``total = sum_l prefix_mse_l + aux`` with the
   BatchTopK (and AuxK) selection held fixed, at points where the selection
   is stable (every cut clear of the step by 1e-3), AuxK on and off; its
   ``prefix_mse`` against a dense decode of each prefix; one width
   ``[d_sae]`` is exactly ``topk_gradients`` / ``train_step_topk(batchtopk)``.
2. Every backend through the validating front (``fastsae.get_backend``) in
   float32 against that oracle in float64 on the same float32 inputs, on
   the shapes and prefix layouts of ``CASES``: one row, one feature, one of
   everything, odd sizes leaving remainders in the kernels' row and feature
   blocks, a level no row activates, every entry active (``k = d_sae``), one
   level, every feature its own level; AuxK on and off. The selection is
   compared exactly (``l0``, ``fire_counts``) because the inputs are built
   so that no tie or near-tie is possible: at the first step every input of
   the pre-activations is on a binary grid (``x``, ``b_dec`` multiples of
   2**-6, ``W_enc`` of 2**-10, ``b_enc`` of 2**-16, all small), so every
   product and partial sum is exact in float32 whatever the order (fused or
   not, ``b_dec`` folded or not) and the pre-activations are exactly the
   float64 ones; problems are drawn until the BatchTopK cut (the ``kN``-th
   and the next value), the sign of every selected value and each row's
   AuxK cut are strict. Later steps are off the grid: there the cuts must
   clear the float32 error bound of the pre-activations (problems are drawn
   so the float64 run keeps twice that margin, and each step asserts it on
   the backend's own state, so a breach fails loudly rather than flakily).
3. The front's widths validation (errors name the argument; nothing is
   written), for both functions.
4. Finite or loud: a step that leaves a parameter non-finite reports NaN
   losses (``mse``, ``total``, every ``prefix_mse``).
5. numba and cython: bitwise the same results on 1 and on 2 threads.

Tolerances (float32 arithmetic), as ``tests/test_jumprelu.py``: a float32
sum of ``K`` products in any order is within ``(K + 2) u`` of the exact one
relative to the sum of the magnitudes of its terms (``u = 2**-24``, Higham
ch. 3). :func:`_bounds` propagates the magnitudes through the chain in
float64 -- pre (``d_in`` terms), each prefix residual (up to ``d_sae``),
the suffix sums over levels ``D_g = sum_{l >= g} 2 r_l / N`` (up to ``L``),
``d_pre = D_level(j) . W_dec[j]`` (``d_in``), the parameter gradients
(``N``), AuxK's residual and terms -- and allows ``8 (K + 4) u`` of them
with ``K = 2 max(N, d_in, d_sae) + 2 L``, at least the chain's length. A
training step is checked one step at a time from the backend's own float32
state (Adam with ``eps = 1e-3``, which makes the update Lipschitz in the
gradient; see test_jumprelu._check_step for the Adam bound, used here).
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

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R
from fastsae.backends import contract
from fastsae.backends.numerics import matryoshka_levels

from conftest import U32, f64, is_cuda_sim
# shared helpers of the JumpReLU suite: backends, comparisons, snapshots, threads
from test_jumprelu import (_assert_close, _get, _p64, _pre64, _readonly, _snapshot,
                           _zero_state64)
from test_jumprelu import cpu_be  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
ALL_BACKENDS = ("numpy", "numba", "cython", "cuda")
LR = 1e-3
ADAM_EPS = 1e-3
AUX_COEF = 1 / 32
K_AUX = 2

if is_cuda_sim():
    from test_cuda_backend import _lock_simulator_shared_arrays

    _lock_simulator_shared_arrays()


def _backend_names():
    wanted = os.environ.get("FASTSAE_TEST_BACKENDS")
    return [n for n in wanted.split(",") if n] if wanted else list(ALL_BACKENDS)


@pytest.fixture(params=_backend_names())
def be(request):
    return _get(request.param)


def _sim(be) -> bool:
    return be.name == "cuda" and is_cuda_sim()


# ------------------------------------------------------------------ problems
@dataclass(frozen=True)
class Case:
    id: str
    shape: tuple        # (N, d_in, d_sae)
    widths: tuple
    k: int
    regime: str = "mixed"  # mixed | empty (level 1 never fires) | all (every entry > 0)


# CPU (and a real GPU): one row, one feature, odd sizes and sizes with
# remainders in the block grids (numba's 256-row blocks and 64-feature tiles:
# 300 = 256 + 44, 700 = 10 * 64 + 60; 129 rows, 65/130 features: one past a
# power of two), widths that are not multiples of anything
CASES = [
    Case("1row", (1, 5, 7), (2, 7), 3),
    Case("1feat", (6, 4, 1), (1,), 1),
    Case("1x1x1", (1, 1, 1), (1,), 1),
    Case("odd", (7, 5, 13), (3, 8, 13), 2),
    Case("odd33", (33, 17, 65), (1, 16, 64, 65), 4),
    Case("odd129", (129, 24, 130), (10, 65, 129, 130), 5),
    Case("big", (300, 40, 700), (64, 100, 350, 700), 8),
    Case("empty-level", (33, 17, 65), (8, 20, 65), 4, "empty"),
    Case("all-active", (13, 9, 17), (5, 11, 17), 17, "all"),
    Case("L1", (33, 17, 65), (65,), 4),
    Case("every-level20", (9, 6, 20), tuple(range(1, 21)), 3),
    Case("every-level65", (33, 17, 65), tuple(range(1, 66)), 4),
]
# the CUDA simulator runs kernels as Python: tiny shapes only
SIM_CASES = [
    Case("sim-1x1x1", (1, 1, 1), (1,), 1),
    Case("sim-1row", (1, 3, 7), (2, 7), 2),
    Case("sim-odd", (7, 5, 13), (3, 8, 13), 2),
    Case("sim-20", (20, 8, 33), (4, 16, 33), 3),
    Case("sim-empty", (7, 5, 13), (3, 6, 13), 2, "empty"),
    Case("sim-all", (7, 5, 13), (3, 13), 13, "all"),
    Case("sim-every", (7, 5, 13), tuple(range(1, 14)), 2),
    Case("sim-L1", (7, 5, 13), (13,), 2),
]
ALL_CASES = CASES + SIM_CASES
MULTI = ("odd", "odd33", "odd129", "empty-level", "L1", "every-level20", "sim-odd")


#: simulator cases also run without AuxK (the others: with it, which runs
#: every kernel of the step without it too)
SIM_NOAUX = ("sim-1x1x1", "sim-odd")


def _select(be, case: Case, aux=True):
    if _sim(be) != case.id.startswith("sim-"):
        pytest.skip("CUDA simulator: tiny shapes only" if _sim(be) else "a simulator case")
    if _sim(be) and not aux and case.id not in SIM_NOAUX:
        pytest.skip("CUDA simulator: AuxK off on two cases only")


@dataclass
class MProblem:
    case: Case
    x: np.ndarray
    p: SAEParams
    dead: np.ndarray | None
    k_aux: int

    @property
    def widths(self):
        return list(self.case.widths)

    @property
    def aux_weight(self):
        return R.aux_scale(self.dead, self.k_aux, AUX_COEF) if self.dead is not None else 0.0


def _grid(a, bits, lim=None):
    a = np.asarray(a)
    if lim is not None:
        a = np.clip(a, -lim, lim)
    a = np.round(a * 2.0 ** bits) / 2.0 ** bits
    return np.ascontiguousarray(a, np.float32)


def _dead_mask(d_sae):
    dead = np.arange(d_sae) % 3 == 1
    if not dead.any():
        dead[-1] = True
    return dead


def _sorted_gap_ok(s, kk, margin):
    """Descending ``s`` (last axis): the top ``kk`` are clear of the rest
    and of 0 by more than ``margin`` (strictly: margin 0 means no tie)."""
    if kk == 0:
        return True
    top = s[..., :kk]
    ok = np.all(np.abs(top) > margin)
    if kk < s.shape[-1]:
        ok &= bool(np.all(s[..., kk - 1] - s[..., kk] > margin))
    return bool(ok)


def _selection_clear(pre, margin, k, dead, k_aux):
    """The BatchTopK selection (and each row's AuxK selection) of ``pre``
    is the same for every ``pre'`` within ``margin`` of it (``margin`` 0:
    no tie at a cut, no selected value exactly 0)."""
    flat = -np.sort(-pre.ravel())
    if not _sorted_gap_ok(flat, min(k * pre.shape[0], pre.size), margin):
        return False
    if dead is not None and k_aux:
        cols = np.flatnonzero(dead)
        rows = -np.sort(-pre[:, cols], axis=1)
        if not _sorted_gap_ok(rows, min(k_aux, cols.size), margin):
            return False
    return True


def _step_kw(prob, **over):
    kw = dict(k=prob.case.k, widths=prob.widths, lr=LR, eps=ADAM_EPS, beta1=0.9, beta2=0.999)
    if prob.dead is not None:
        kw.update(dead_mask=prob.dead, k_aux=prob.k_aux, aux_coefficient=AUX_COEF)
    kw.update(over)
    return kw


def _clear_in_run(prob, steps):
    """The float64 reference run from ``prob`` keeps every cut clear of
    twice the float32 bound (plus 1e-6 relative drift) at steps 2..steps."""
    p64, s64 = _p64(prob.p), _zero_state64(prob.p)
    for s in range(steps):
        if s:
            p32 = SAEParams(*(a.astype(np.float32) for a in p64.arrays()))
            _, bound = _pre64(prob.x, p32)
            pre = (f64(prob.x) - p64.b_dec) @ p64.W_enc + p64.b_enc
            margin = 2 * bound.max() + 1e-6 * (1 + np.abs(pre).max())
            if not _selection_clear(pre, margin, prob.case.k, prob.dead, prob.k_aux):
                return False
        R.train_step_matryoshka(p64, s64, f64(prob.x), **_step_kw(prob))
    return True


def _problem(case: Case, aux: bool, seed=0, steps=1) -> MProblem:
    """A problem of ``case`` on the exact grid (see the module docstring)
    with strict cuts, at least one active entry (unless ``regime`` says
    otherwise), and for ``steps > 1`` a float64 run that stays clear."""
    n, d_in, d_sae = case.shape
    for attempt in range(400):
        rng = np.random.default_rng([seed, attempt, n, d_in, d_sae, len(case.widths)])
        x = _grid(rng.normal(size=(n, d_in)), 6, 3.9)
        W_enc = _grid(rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in), 10, 1.9)
        b_dec = _grid(rng.normal(size=d_in) * 0.1, 6)
        b_enc = rng.normal(size=d_sae) * 0.1 - 0.2
        if case.regime == "all":
            b_enc += 6.0
        elif case.regime == "empty":
            b_enc[case.widths[0]:case.widths[1]] = -50.0
        b_enc = _grid(b_enc, 16)
        W_dec = rng.normal(size=(d_sae, d_in))
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        p = SAEParams(W_enc, b_enc, np.ascontiguousarray(W_dec, np.float32), b_dec)
        dead = _dead_mask(d_sae) if aux else None
        prob = MProblem(case, x, p, dead, K_AUX if aux else 0)
        pre = (f64(x) - f64(b_dec)) @ f64(W_enc) + f64(b_enc)
        # the grid makes float32 exact: the float32 reference agrees to the bit
        assert np.array_equal(R.pre_activations(x, W_enc, b_enc, b_dec), pre)
        if not _selection_clear(pre, 0.0, case.k, dead, prob.k_aux):
            continue
        if not np.any(pre > 0):
            continue
        if case.regime == "all" and not np.all(pre > 0):
            continue
        if steps > 1 and not _clear_in_run(prob, steps):
            continue
        return prob
    raise RuntimeError(f"no clear problem found for {case}")


def _codes64(c):
    return None if c is None else SparseCodes(c.indptr, c.indices, f64(c.values), c.shape)


def _oracle_codes(prob, p=None):
    """float32 BatchTopK codes and AuxK codes of the problem (at ``p``)."""
    p = prob.p if p is None else p
    codes = R.encode_batchtopk(prob.x, p.W_enc, p.b_enc, p.b_dec, prob.case.k)
    aux = None
    if prob.dead is not None:
        aux = R.encode_topk_aux(prob.x, p.W_enc, p.b_enc, p.b_dec, prob.dead, prob.k_aux)
    return codes, aux


# ------------------------------------------------------------------ bounds
@dataclass
class Bounds:
    loss: object            # float64 oracle Losses
    grads: SAEParams        # float64 oracle gradients
    tol: dict               # name -> elementwise bound
    tol_prefix: list        # per prefix mse
    tol_aux: float
    pre_bound: float        # largest float32 error of a pre-activation


def _bounds(x, p, codes, widths, aux_codes, w) -> Bounds:
    """The float64 oracle at the float32 point ``(x, p)`` with the float32
    selection ``codes`` / ``aux_codes`` and elementwise float32 error
    bounds of each output (module docstring):

    * ``Pm = |xc| @ |W_enc| + |b_enc|`` bounds each code and its terms;
    * ``Er_l = (act_l * Pm) @ |W_dec| + |b_dec| + |x|``: prefix l's residual;
    * ``DM_g = sum_{l >= g} 2 Er_l / N``: the suffix sums, ``Df = DM_level(j)
      @ |W_dec[j]|``, ``Dp = act * Df``; AuxK: ``ErA = (aux * Pm) @ |W_dec| +
      Er_{L-1}``, ``DA = 2 w ErA / N``, added where the AuxK codes are;
    * gradients: ``|xc|.T @ Dp``, ``sum_i Dp``, per level ``(act * Pm).T @
      DM_g`` (+ AuxK's), ``sum_i DM_0 + |W_enc| @ sum_i Dp``; the projection
      of ``W_dec``'s adds ``|w| (T . |w|) / |w|^2`` per row;
    * ``prefix_mse_l``: ``2 / N sum |r_l| Er_l``; aux: ``2 w / N sum |e| ErA``.
    """
    n, d_in = x.shape
    d_sae = p.d_sae
    L = len(widths)
    c = 8 * (2 * max(n, d_in, d_sae) + 2 * L + 4) * U32
    x64, P = f64(x), _p64(p)
    loss, g = R.matryoshka_gradients(x64, P, _codes64(codes), np.asarray(widths),
                                     _codes64(aux_codes), w)
    xc = x64 - P.b_dec
    Pm = np.abs(xc) @ np.abs(P.W_enc) + np.abs(P.b_enc)
    aW = np.abs(P.W_dec)
    f = f64(codes.to_dense())
    act = f != 0
    fm = act * Pm
    cols = np.arange(d_sae)
    lev = matryoshka_levels(widths, d_sae)
    base = np.abs(P.b_dec) + np.abs(x64)
    Er = [(fm * (cols < wd)) @ aW + base for wd in widths]
    r = [(f * (cols < wd)) @ P.W_dec + P.b_dec - x64 for wd in widths]
    tol_prefix = [c * 2.0 / n * float(np.sum(np.abs(rl) * el)) + 1e-30 for rl, el in zip(r, Er)]
    DM = [None] * L
    acc = np.zeros((n, d_in))
    for gi in range(L - 1, -1, -1):
        acc = acc + 2.0 / n * Er[gi]
        DM[gi] = acc
    Df = np.zeros((n, d_sae))
    Tw = np.zeros((d_sae, d_in))
    for gi in range(L):
        sel = lev == gi
        Df[:, sel] = DM[gi] @ aW[sel].T
        Tw[sel] = fm[:, sel].T @ DM[gi]
    Dp = act * Df
    tol_aux = 0.0
    if aux_codes is not None and w > 0:
        fa = f64(aux_codes.to_dense())
        acta = fa != 0
        fam = acta * Pm
        ErA = fam @ aW + Er[-1]
        DA = 2.0 * w / n * ErA
        Dp = Dp + acta * (DA @ aW.T)
        Tw = Tw + fam.T @ DA
        err = fa @ P.W_dec - (x64 - (f @ P.W_dec + P.b_dec))
        tol_aux = c * 2.0 * w / n * float(np.sum(np.abs(err) * ErA)) + 1e-30
    T = {"W_enc": c * (np.abs(xc).T @ Dp), "b_enc": c * Dp.sum(axis=0),
         "b_dec": c * (DM[0].sum(axis=0) + np.abs(P.W_enc) @ Dp.sum(axis=0))}
    Tw = c * Tw
    sq = np.maximum(np.sum(P.W_dec ** 2, axis=1, keepdims=True), 1e-300)
    T["W_dec"] = Tw + aW * np.sum(Tw * aW, axis=1, keepdims=True) / sq
    for key in T:
        T[key] = T[key] + 1e-30
    _, pb = _pre64(x, p)
    return Bounds(loss, g, T, tol_prefix, tol_aux, float(pb.max()))


def _check_losses(loss, B: Bounds, L):
    assert loss.l1 == 0.0 and loss.l0_loss == 0.0, loss
    assert isinstance(loss.prefix_mse, tuple) and len(loss.prefix_mse) == L, loss.prefix_mse
    for li, (got, want, tol) in enumerate(zip(loss.prefix_mse, B.loss.prefix_mse,
                                              B.tol_prefix)):
        assert abs(got - want) <= tol, (li, got, want, tol)
    assert abs(loss.mse - B.loss.mse) <= B.tol_prefix[-1], (loss.mse, B.loss.mse)
    assert abs(loss.aux - B.loss.aux) <= B.tol_aux + 1e-300, (loss.aux, B.loss.aux)
    assert abs(loss.total - B.loss.total) <= sum(B.tol_prefix) + B.tol_aux, \
        (loss.total, B.loss.total)


# ------------------------------------------------------------------ 1. the oracle
def _fixed_loss(x, p, mask, widths, amask, w, e0):
    """``sum_l prefix_mse_l + aux`` with the selections ``mask`` / ``amask``
    held fixed and AuxK's target ``e0`` held constant (as the oracle)."""
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    f = np.where(mask, pre, 0.0)
    n = x.shape[0]
    tot = 0.0
    for wd in widths:
        xh = f[:, :wd] @ p.W_dec[:wd] + p.b_dec
        tot += np.sum((xh - x) ** 2) / n
    if amask is not None:
        fa = np.where(amask, pre, 0.0)
        tot += w * np.sum((fa @ p.W_dec - e0) ** 2) / n
    return tot


def _fd_point(seed, aux):
    """float64 problem (6 rows, 4 inputs, 9 features, widths 2, 5, 9, k 3)
    whose BatchTopK cut, selected values and AuxK cuts are > 1e-3 clear (the
    steps move pre-activations by < 1e-5): the selection is locally fixed.
    Some features of every level fire."""
    rng = np.random.default_rng(seed)
    n, d_in, d_sae, k = 6, 4, 9, 3
    widths = [2, 5, 9]
    dead = _dead_mask(d_sae) if aux else None
    for _ in range(2000):
        p = SAEParams(rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in),
                      rng.normal(size=d_sae) * 0.3 + 0.3, rng.normal(size=(d_sae, d_in)),
                      rng.normal(size=d_in) * 0.1)
        R.normalize_decoder_rows(p.W_dec)
        x = rng.normal(size=(n, d_in))
        pre = (x - p.b_dec) @ p.W_enc + p.b_enc
        if not _selection_clear(pre, 1e-3, k, dead, K_AUX if aux else 0):
            continue
        f = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k).to_dense()
        lev = matryoshka_levels(widths, d_sae)
        if all((f[:, lev == gi] > 0).any() for gi in range(3)):
            return x, p, k, widths, dead
    raise RuntimeError("no finite-difference point found")


def _fd(fun, a, h):
    out = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        up = fun()
        a[idx] = old - h
        down = fun()
        a[idx] = old
        out[idx] = (up - down) / (2 * h)
    return out


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matryoshka_finite_differences(seed, aux):
    """The loss is piecewise quadratic in the parameters: central
    differences with h = 1e-6 are exact up to ~1e-10 rounding."""
    x, p, k, widths, dead = _fd_point(seed, aux)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    mask = codes.to_dense() > 0
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, K_AUX) if aux else None
    amask = aux_codes.to_dense() > 0 if aux else None
    w = R.aux_scale(dead, K_AUX, 0.5) if aux else 0.0
    loss, g = R.matryoshka_gradients(x, p, codes, np.array(widths), aux_codes, w)
    e0 = x - R.decode(codes, p.W_dec, p.b_dec)
    assert loss.total == pytest.approx(_fixed_loss(x, p, mask, widths, amask, w, e0),
                                       rel=1e-12)
    assert (loss.aux > 0) == aux
    h = 1e-6
    for name in SAEParams.NAMES:
        fd = _fd(lambda: _fixed_loss(x, p, mask, widths, amask, w, e0), getattr(p, name), h)
        if name == "W_dec":
            fd = R._project_out_parallel(fd, p.W_dec)
        np.testing.assert_allclose(getattr(g, name), fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("aux", [False, True])
def test_reference_prefix_mse_by_dense_decode(aux):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(11, 6))
    p = SAEParams(rng.normal(size=(6, 23)) / 2, rng.normal(size=23) * 0.2,
                  rng.normal(size=(23, 6)), rng.normal(size=6) * 0.1)
    R.normalize_decoder_rows(p.W_dec)
    widths = [1, 4, 5, 17, 23]
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 4)
    dead = _dead_mask(23)
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 3) if aux else None
    w = R.aux_scale(dead, 3, 0.25) if aux else 0.0
    loss, _ = R.matryoshka_gradients(x, p, codes, np.array(widths), aux_codes, w)
    f = codes.to_dense()
    want = []
    for wd in widths:
        xh = f[:, :wd] @ p.W_dec[:wd] + p.b_dec
        want.append(np.sum((xh - x) ** 2) / 11)
    np.testing.assert_allclose(loss.prefix_mse, want, rtol=1e-12)
    assert loss.mse == loss.prefix_mse[-1]
    assert loss.total == pytest.approx(sum(want) + loss.aux, rel=1e-12)
    assert loss.l1 == 0.0
    if aux:
        e = x - (f @ p.W_dec + p.b_dec)
        want_aux = w * np.sum((aux_codes.to_dense() @ p.W_dec - e) ** 2) / 11
        assert loss.aux == pytest.approx(want_aux, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("aux", [False, True])
def test_reference_one_width_is_batchtopk(aux, dtype):
    """widths = [d_sae]: the oracle's gradients and three steps are exactly
    (bitwise) those of topk_gradients / train_step_topk(batchtopk)."""
    rng = np.random.default_rng(9)
    d_sae = 19
    x = rng.normal(size=(12, 7)).astype(dtype)
    p = SAEParams(*(a.astype(dtype) for a in (rng.normal(size=(7, d_sae)) / 2,
                                              rng.normal(size=d_sae) * 0.2,
                                              rng.normal(size=(d_sae, 7)),
                                              rng.normal(size=7) * 0.1)))
    R.normalize_decoder_rows(p.W_dec)
    dead = _dead_mask(d_sae)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 2) if aux else None
    w = R.aux_scale(dead, 2, 0.25) if aux else 0.0
    x_hat = R.decode(codes, p.W_dec, p.b_dec)
    lt, gt = R.topk_gradients(x, p, codes, x_hat, aux_codes, w)
    lm, gm = R.matryoshka_gradients(x, p, codes, np.array([d_sae]), aux_codes, w)
    assert (lm.mse, lm.total, lm.aux, lm.l1) == (lt.mse, lt.total, lt.aux, lt.l1)
    assert lm.prefix_mse == (lt.mse,)
    for name in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(gm, name), getattr(gt, name), err_msg=name)
    kw = dict(k=3, lr=1e-2, dead_mask=dead if aux else None, k_aux=2 if aux else 0,
              aux_coefficient=0.25 if aux else 0.0)
    pa, pb = p.copy(), p.copy()
    sa, sb = AdamState.zeros_like(p), AdamState.zeros_like(p)
    ca, cb = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    for _ in range(3):
        ra = R.train_step_topk(pa, sa, x, activation="batchtopk", fire_counts=ca, **kw)
        rb = R.train_step_matryoshka(pb, sb, x, widths=np.array([d_sae]), fire_counts=cb, **kw)
        for part in ("mse", "total", "aux", "l0", "explained_variance"):
            assert getattr(rb, part) == getattr(ra, part), part
        assert rb.extra["min_active"] == ra.extra["min_active"]
        assert rb.extra["prefix_mse"] == (ra.mse,)
        assert rb.extra["prefix_explained_variance"] == (ra.explained_variance,)
    for name in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(pb, name), getattr(pa, name), err_msg=name)
        np.testing.assert_array_equal(getattr(sb.m, name), getattr(sa.m, name), err_msg=name)
        np.testing.assert_array_equal(getattr(sb.v, name), getattr(sa.v, name), err_msg=name)
    assert np.array_equal(ca, cb) and sa.step == sb.step == 3


# ------------------------------------------------------------------ 2. backends vs oracle
def _check_gradients(be, prob: MProblem, dense=False):
    codes, aux_codes = _oracle_codes(prob)
    w = prob.aux_weight
    B = _bounds(prob.x, prob.p, codes, prob.widths, aux_codes, w)
    bx, bp = be.to_backend(prob.x), be.to_backend(prob.p)
    c_in, a_in = codes, aux_codes
    if dense:  # the contract's other form of codes: dense float32 [N, d_sae]
        c_in = be.to_backend(codes.to_dense())
        a_in = None if aux_codes is None else be.to_backend(aux_codes.to_dense())
    loss, g = be.matryoshka_gradients(bx, bp, c_in, prob.widths, a_in, w)
    g = be.to_numpy(g)
    _check_losses(loss, B, len(prob.widths))
    for name in SAEParams.NAMES:
        _assert_close(getattr(g, name), getattr(B.grads, name), B.tol[name], name)
    return B, codes


CASE_IDS = [c.id for c in ALL_CASES]


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_matryoshka_gradients_match_oracle(be, case, aux):
    _select(be, case, aux)
    prob = _problem(case, aux, seed=1)
    B, codes = _check_gradients(be, prob)
    # the regime is the one intended
    lev = matryoshka_levels(case.widths, case.shape[2])
    f = codes.to_dense()
    if case.regime == "empty":
        assert not (f[:, lev == 1] > 0).any()
    if case.regime == "all":
        assert np.all(f > 0)
    if aux:
        assert B.loss.aux > 0 or case.shape[2] == 1


DENSE_CASES = [c for c in ALL_CASES if c.id in ("1x1x1", "odd", "empty-level", "every-level20",
                                                 "sim-odd")]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[c.id for c in DENSE_CASES])
def test_matryoshka_gradients_dense_codes(be, case):
    """Codes (and AuxK codes) given dense, as the contract allows."""
    _select(be, case)
    _check_gradients(be, _problem(case, True, seed=2), dense=True)


def _host_state(be, bp, bs, bc):
    hp, hs = be.to_numpy(bp), be.to_numpy(bs)
    counts = None if bc is None else np.asarray(be.to_numpy(bc))
    return hp, hs, counts


def _check_step(got, before, after, prob: MProblem, kw, step):
    """One backend step against the float64 reference step from the same
    float32 state ``before``; the Adam bound is test_jumprelu._check_step's
    (``lr (5 T / eps + 64 u) + 4 u |p|``, plus the renormalization's for
    ``W_dec``; moments ``(1 - b1) T + 2 u |m|`` and ``(1 - b2) (2 |g| T +
    T^2) + 3 u |v|``)."""
    p0, s0, c0 = before
    hp, hs, c1 = after
    x = prob.x
    n = x.shape[0]
    pre, bound = _pre64(x, p0)
    margin = 0.0 if step == 0 else bound.max()  # step 0: the exact grid
    assert _selection_clear(pre, margin, prob.case.k, prob.dead, prob.k_aux), \
        f"step {step}: a cut came within float32 rounding (draw problems with more margin)"
    codes = R.encode_batchtopk(x, p0.W_enc, p0.b_enc, p0.b_dec, prob.case.k)
    aux_codes = None
    if prob.dead is not None:
        aux_codes = R.encode_topk_aux(x, p0.W_enc, p0.b_enc, p0.b_dec, prob.dead, prob.k_aux)
    w = prob.aux_weight
    B = _bounds(x, p0, codes, prob.widths, aux_codes, w)
    p64, s64 = _p64(p0), AdamState(_p64(s0.m), _p64(s0.v), s0.step)
    c64 = None if c0 is None else c0.copy()
    want = R.train_step_matryoshka(p64, s64, f64(x), fire_counts=c64,
                                   **{**kw, "widths": np.asarray(kw["widths"])})
    # StepResult (before the update)
    L = len(prob.widths)
    assert got.l1 == 0.0, got
    assert got.l0 == want.l0, (step, got.l0, want.l0)  # exact: the selection is clear
    pm = got.extra["prefix_mse"]
    assert isinstance(pm, tuple) and len(pm) == L, pm
    for li in range(L):
        assert abs(pm[li] - want.extra["prefix_mse"][li]) <= B.tol_prefix[li], (step, li)
    assert abs(got.mse - want.mse) <= B.tol_prefix[-1], (step, got.mse, want.mse)
    assert got.mse == pm[-1], (got.mse, pm)
    assert abs(got.aux - want.aux) <= B.tol_aux + 1e-300, (step, got.aux, want.aux)
    assert (got.aux > 0) == (want.aux > 0), (step, got.aux, want.aux)
    assert abs(got.total - want.total) <= sum(B.tol_prefix) + B.tol_aux, (step, got.total)
    assert abs(got.extra["min_active"] - want.extra["min_active"]) <= B.pre_bound, step
    var = float(np.sum((f64(x) - f64(x).mean(axis=0)) ** 2) / n)
    pev = got.extra["prefix_explained_variance"]
    assert isinstance(pev, tuple) and len(pev) == L, pev
    for li in range(L):
        wv = want.extra["prefix_explained_variance"][li]
        if var > 0:
            assert abs(pev[li] - wv) <= B.tol_prefix[li] / var + 1e-5 * abs(1 - wv), (step, li)
        else:
            assert pev[li] == wv == 1.0
    assert got.explained_variance == pev[-1]
    assert hs.step == s0.step + 1 == s64.step, (step, hs.step)
    if c0 is not None:
        assert c1.dtype == np.int64 and np.array_equal(c1, c64), f"step {step}: fire_counts"
    lr, eps, b1, b2 = kw["lr"], kw["eps"], kw["beta1"], kw["beta2"]
    for name, T in B.tol.items():
        g = np.abs(getattr(B.grads, name))
        want_p = getattr(p64, name)
        tol = lr * (5 * T / eps + 64 * U32) + 4 * U32 * np.abs(want_p)
        if name == "W_dec":
            rn = np.sqrt(np.sum(tol ** 2, axis=1, keepdims=True))
            tol = tol + np.abs(want_p) * rn + 4 * (want_p.shape[1] + 2) * U32 * np.abs(want_p)
        _assert_close(getattr(hp, name), want_p, tol, f"step {step}: {name}")
        mw, vw = getattr(s64.m, name), getattr(s64.v, name)
        _assert_close(getattr(hs.m, name), mw, (1 - b1) * T + 2 * U32 * np.abs(mw) + 1e-38,
                      f"step {step}: m.{name}")
        _assert_close(getattr(hs.v, name), vw,
                      (1 - b2) * (2 * g * T + T * T) + 3 * U32 * np.abs(vw) + 1e-38,
                      f"step {step}: v.{name}")
    assert np.allclose(np.linalg.norm(f64(hp.W_dec), axis=1), 1.0, atol=1e-5)


def _run_and_check(be, prob: MProblem, steps, fire_counts=True):
    kw = _step_kw(prob)
    p = prob.p
    bp = be.to_backend(p.copy())
    bs = be.to_backend(AdamState.zeros_like(p))
    bc = be.to_backend(np.zeros(p.d_sae, np.int64)) if fire_counts else None
    bx = be.to_backend(prob.x)
    bkw = dict(kw)
    if prob.dead is not None:
        bkw["dead_mask"] = be.to_backend(prob.dead)
    for step in range(steps):
        before = [None if a is None else a.copy() for a in _host_state(be, bp, bs, bc)]
        got = be.train_step_matryoshka(bp, bs, bx, fire_counts=bc, **bkw)
        be.synchronize()
        _check_step(got, before, _host_state(be, bp, bs, bc), prob, kw, step)
    return _host_state(be, bp, bs, bc)


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_train_step_matryoshka_one_step(be, case, aux):
    _select(be, case, aux)
    _run_and_check(be, _problem(case, aux, seed=3), steps=1)


MULTI_CASES = [c for c in ALL_CASES if c.id in MULTI]


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
@pytest.mark.parametrize("case", MULTI_CASES, ids=[c.id for c in MULTI_CASES])
def test_train_step_matryoshka_several_steps(be, case, aux):
    """Three steps in a row (two in the simulator), each checked against the
    float64 reference step from the backend's state (moments carried over,
    bias correction at t = 1..3, fire counts accumulated, state.step)."""
    _select(be, case)
    if _sim(be) and not aux:
        pytest.skip("CUDA simulator: with AuxK only")
    steps = 2 if _sim(be) else 3
    prob = _problem(case, aux, seed=4, steps=steps)
    hp, hs, c = _run_and_check(be, prob, steps)
    assert hs.step == steps and int(c.sum()) > 0


def test_train_step_matryoshka_without_fire_counts(be):
    case = SIM_CASES[2] if _sim(be) else CASES[4]
    _run_and_check(be, _problem(case, True, seed=5), steps=1, fire_counts=False)


def test_one_width_matches_batchtopk_step(be):
    """On each backend, widths = [d_sae] trains as train_step_topk(batchtopk)
    (within float32 rounding; the spec hopes for bitwise, reported by
    tests/test_<backend>_matryoshka.py)."""
    if _sim(be):
        pytest.skip("CUDA simulator: tests/test_cuda_matryoshka.py's")
    case = Case("one", (7, 5, 13), (13,), 2) if _sim(be) else Case("one", (129, 24, 130),
                                                                       (130,), 5)
    prob = _problem(case, True, seed=6, steps=2)
    runs = []
    for which in ("batchtopk", "matryoshka"):
        bp = be.to_backend(prob.p.copy())
        bs = be.to_backend(AdamState.zeros_like(prob.p))
        bc = be.to_backend(np.zeros(prob.p.d_sae, np.int64))
        kw = _step_kw(prob, dead_mask=be.to_backend(prob.dead))
        res = []
        for _ in range(2):
            if which == "batchtopk":
                kw.pop("widths", None)
                res.append(be.train_step_topk(bp, bs, be.to_backend(prob.x), fire_counts=bc,
                                              activation="batchtopk", **kw))
            else:
                res.append(be.train_step_matryoshka(bp, bs, be.to_backend(prob.x),
                                                    fire_counts=bc, **kw))
        be.synchronize()
        runs.append((res, be.to_numpy(bp), be.to_numpy(bs), np.asarray(be.to_numpy(bc))))
    (ra, pa, sa, ca), (rb, pb, sb, cb) = runs
    assert np.array_equal(ca, cb)
    for a, b in zip(ra, rb):
        assert a.l0 == b.l0
        for part in ("mse", "total", "aux"):
            assert getattr(b, part) == pytest.approx(getattr(a, part), rel=1e-5, abs=1e-7), part
        assert b.extra["prefix_mse"] == (b.mse,)
        assert b.extra["min_active"] == pytest.approx(a.extra["min_active"], rel=1e-5,
                                                      abs=1e-6)
    for name in SAEParams.NAMES:
        A, Bm = f64(getattr(pa, name)), f64(getattr(pb, name))
        assert np.max(np.abs(A - Bm)) <= 1e-5 * max(1.0, np.max(np.abs(A))), name


# ------------------------------------------------------------------ 3. validation
def _host_only(be):
    if be._device:
        pytest.skip("the front's checks are shared; these cases use host arrays")


VAL_CASE = Case("val", (9, 5, 13), (3, 8, 13), 2)

BAD_WIDTHS = [
    # (id, widths, error, message fragment)
    ("repeated", [3, 3, 13], ValueError, "widths"),
    ("decreasing", [8, 3, 13], ValueError, "widths"),
    ("last-below-d_sae", [3, 12], ValueError, "width"),
    ("last-above-d_sae", [3, 14], ValueError, "width"),
    ("only-below", [5], ValueError, "width"),
    ("empty", [], ValueError, "widths"),
    ("empty-array", np.zeros(0, np.int64), ValueError, "widths"),
    ("float", [3.0, 13.0], TypeError, "widths"),
    ("float-array", np.array([3.5, 13.0]), TypeError, "widths"),
    ("2-D", [[3, 13]], ValueError, "widths"),
    ("2-D-array", np.array([[3, 8, 13]]), ValueError, "widths"),
    ("zero-first", [0, 13], ValueError, "widths"),
    ("negative-first", [-2, 13], ValueError, "widths"),
    ("str", "13", TypeError, "widths"),
    ("scalar", 13, TypeError, "widths"),
    ("none", None, TypeError, "widths"),
    ("bool-array", np.array([True]), TypeError, "widths"),
]


def _step_inputs():
    prob = _problem(VAL_CASE, True, seed=0)
    p = prob.p.copy()
    st = AdamState.zeros_like(p)
    st.m.W_enc += 0.5
    st.v.b_dec += 0.25
    st.step = 3
    counts = np.arange(p.d_sae, dtype=np.int64)
    return prob, p, st, counts


@pytest.mark.parametrize("bad", BAD_WIDTHS, ids=[b[0] for b in BAD_WIDTHS])
def test_train_step_matryoshka_refuses_bad_widths(be, bad):
    _host_only(be)
    _, widths, err, frag = bad
    prob, p, st, counts = _step_inputs()
    snap = _snapshot(p, st, counts)
    kw = _step_kw(prob, widths=widths)
    with pytest.raises(err, match=frag):
        be.train_step_matryoshka(p, st, prob.x, fire_counts=counts, **kw)
    assert _snapshot(p, st, counts) == snap, "written before refusing"


@pytest.mark.parametrize("bad", BAD_WIDTHS, ids=[b[0] for b in BAD_WIDTHS])
def test_matryoshka_gradients_refuses_bad_widths(be, bad):
    _host_only(be)
    _, widths, err, frag = bad
    prob = _problem(VAL_CASE, False, seed=0)
    codes, _ = _oracle_codes(prob)
    snap = _snapshot(prob.x, prob.p, codes.values, codes.indices, codes.indptr)
    with pytest.raises(err, match=frag):
        be.matryoshka_gradients(prob.x, prob.p, codes, widths)
    assert _snapshot(prob.x, prob.p, codes.values, codes.indices, codes.indptr) == snap


BAD_OTHER = [
    ("k-zero", dict(k=0), ValueError, "k"),
    ("k-float", dict(k=2.0), TypeError, "k"),
    ("k_aux-negative", dict(k_aux=-1), ValueError, "k_aux"),
    ("aux_coefficient-nan", dict(aux_coefficient=float("nan")), ValueError, "aux_coefficient"),
    ("lr-negative", dict(lr=-1e-3), ValueError, "lr"),
    ("eps-zero", dict(eps=0.0), ValueError, "eps"),
    ("dead_mask-shape", dict(dead_mask=np.zeros(12, bool)), ValueError, "dead_mask"),
]


@pytest.mark.parametrize("bad", BAD_OTHER, ids=[b[0] for b in BAD_OTHER])
def test_train_step_matryoshka_refuses_bad_arguments(be, bad):
    _host_only(be)
    _, over, err, frag = bad
    prob, p, st, counts = _step_inputs()
    snap = _snapshot(p, st, counts)
    with pytest.raises(err, match=frag):
        be.train_step_matryoshka(p, st, prob.x, fire_counts=counts, **_step_kw(prob, **over))
    assert _snapshot(p, st, counts) == snap


def test_train_step_matryoshka_refuses_bad_batch_and_params(be):
    _host_only(be)
    prob, p, st, counts = _step_inputs()
    snap = _snapshot(p, st, counts)
    bad_x = prob.x.copy()
    bad_x[2, 1] = np.nan
    cases = [
        (dict(x=bad_x), ValueError, "x"),
        (dict(x=prob.x[:, :-1].copy()), ValueError, "x"),
        (dict(fire_counts=counts.astype(np.int32)), TypeError, "fire_counts"),
        (dict(fire_counts=counts[:-1].copy()), ValueError, "fire_counts"),
        (dict(params=SAEParams(p.W_enc.astype(np.float64), p.b_enc, p.W_dec, p.b_dec)),
         TypeError, "W_enc"),
        (dict(params=SAEParams(p.W_enc, _readonly(p.b_enc), p.W_dec, p.b_dec)), ValueError,
         "b_enc"),
    ]
    for over, err, frag in cases:
        kw = dict(x=prob.x, params=p, fire_counts=counts)
        kw.update(over)
        with pytest.raises(err, match=frag):
            be.train_step_matryoshka(kw["params"], st, kw["x"], fire_counts=kw["fire_counts"],
                                     **_step_kw(prob))
        assert _snapshot(p, st, counts) == snap, over


def test_matryoshka_widths_accepted_forms(be):
    """Any integer sequence is accepted (tuple, int32 array, numpy scalars),
    gives the same result as a list, and is neither written nor kept."""
    _host_only(be)
    prob = _problem(VAL_CASE, False, seed=0)
    codes, _ = _oracle_codes(prob)
    ref_loss, ref_g = be.matryoshka_gradients(prob.x, prob.p, codes, [3, 8, 13])
    forms = [(3, 8, 13), np.array([3, 8, 13], np.int32), [np.int64(3), np.int16(8), 13],
             np.array([3, 8, 13], np.uint64)]
    for widths in forms:
        before = np.array(widths).copy()
        loss, g = be.matryoshka_gradients(prob.x, prob.p, codes, widths)
        assert loss.prefix_mse == ref_loss.prefix_mse, widths
        for name in SAEParams.NAMES:
            assert np.array_equal(getattr(g, name), getattr(ref_g, name)), (widths, name)
        assert np.array_equal(np.array(widths), before)
    # a widths array changed after a step does not change the next one
    wa = np.array([3, 8, 13], np.int64)
    p, st = prob.p.copy(), AdamState.zeros_like(prob.p)
    r = be.train_step_matryoshka(p, st, prob.x, **_step_kw(prob, widths=wa))
    assert np.array_equal(wa, [3, 8, 13]) and len(r.extra["prefix_mse"]) == 3


def test_matryoshka_gradients_refuses_bad_codes(be):
    _host_only(be)
    prob = _problem(VAL_CASE, True, seed=0)
    codes, aux_codes = _oracle_codes(prob)
    x, p = prob.x, prob.p
    wrong_rows = R.encode_batchtopk(x[:-1], p.W_enc, p.b_enc, p.b_dec, 2)
    cases = [
        (dict(codes=wrong_rows), ValueError, "codes"),
        (dict(aux_codes=wrong_rows), ValueError, "aux_codes"),
        (dict(aux_weight=-1.0), ValueError, "aux_weight"),
        (dict(aux_weight=float("nan")), ValueError, "aux_weight"),
    ]
    for over, err, frag in cases:
        kw = dict(codes=codes, aux_codes=aux_codes, aux_weight=prob.aux_weight)
        kw.update(over)
        with pytest.raises(err, match=frag):
            be.matryoshka_gradients(x, p, kw["codes"], prob.widths, kw["aux_codes"],
                                    kw["aux_weight"])


# ------------------------------------------------------------------ 4. finite or loud
LOUD = ["nan-W_enc", "inf-W_dec", "nan-b_enc", "nan-b_dec", "inf-m-W_enc", "overflow-x"]
LOUD_SIM = ("nan-W_enc", "inf-m-W_enc", "overflow-x")


@pytest.mark.parametrize("how", LOUD)
def test_train_step_matryoshka_finite_or_loud(be, how):
    """A step that leaves a parameter non-finite reports NaN losses (mse,
    total, aux, every prefix_mse), even when the NaN sits in a feature that
    never fires; rows of 1e30 overflow float32: the losses are not finite."""
    if _sim(be) and how not in LOUD_SIM:
        pytest.skip("CUDA simulator: three of the cases")
    case = SIM_CASES[2] if _sim(be) else CASES[3]
    prob = _problem(case, True, seed=7)
    p, x = prob.p.copy(), prob.x.copy()
    st = AdamState.zeros_like(p)
    p.b_enc[4] = -1e6  # feature 4 (level 1) never fires
    if how == "nan-W_enc":
        p.W_enc[0, 4] = np.nan
    elif how == "inf-W_dec":
        p.W_dec[4, 1] = np.inf
    elif how == "nan-b_enc":
        p.b_enc[4] = np.nan
    elif how == "nan-b_dec":
        st.m.b_dec[0] = np.nan  # its Adam update makes b_dec[0] NaN
    elif how == "inf-m-W_enc":
        st.m.W_enc[1, 4] = np.inf  # its Adam update makes W_enc[1, 4] non-finite
    else:
        x[:2] = 1e30
    bp, bs = be.to_backend(p), be.to_backend(st)
    kw = _step_kw(prob, dead_mask=be.to_backend(prob.dead))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = be.train_step_matryoshka(bp, bs, be.to_backend(x), **kw)
    assert not np.isfinite(r.total), r
    assert not np.isfinite(r.mse), r
    assert not np.isfinite(r.extra["prefix_mse"][-1]), r
    if how != "overflow-x":
        assert np.isnan(r.total) and np.isnan(r.mse) and np.isnan(r.aux), r
        assert all(np.isnan(v) for v in r.extra["prefix_mse"]), r
        assert all(np.isnan(v) for v in r.extra["prefix_explained_variance"]), r


def test_train_step_matryoshka_finite_stays_finite(be):
    if _sim(be):
        pytest.skip("CUDA simulator: the one-step tests check finite results")
    case = SIM_CASES[2] if _sim(be) else CASES[3]
    prob = _problem(case, True, seed=8)
    bp, bs = be.to_backend(prob.p.copy()), be.to_backend(AdamState.zeros_like(prob.p))
    kw = _step_kw(prob, dead_mask=be.to_backend(prob.dead))
    r = be.train_step_matryoshka(bp, bs, be.to_backend(prob.x), **kw)
    assert np.isfinite(r.total) and np.isfinite(r.mse) and np.isfinite(r.aux)
    assert all(np.isfinite(v) for v in r.extra["prefix_mse"])


# ------------------------------------------------------------------ 5. thread counts
@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
def test_matryoshka_independent_of_thread_count(cpu_be, aux):
    """matryoshka_gradients and two train_step_matryoshka steps give
    bitwise-equal results (every output array and loss) on 1 and on 2
    threads. 600 rows: three 256-row blocks (an uneven split over 2
    threads); 257 features: a remainder in every feature tiling; widths
    that split the tiles unevenly."""
    be, set_threads, top = cpu_be
    if top < 2:
        pytest.skip(f"{be.name}: only {top} thread available")
    case = Case("threads", (600, 40, 257), (16, 64, 200, 257), 6)
    prob = _problem(case, aux, seed=9)
    codes, aux_codes = _oracle_codes(prob)

    def outputs():
        loss, g = be.matryoshka_gradients(prob.x, prob.p, codes, prob.widths, aux_codes,
                                          prob.aux_weight)
        out = g.arrays() + [np.array([loss.mse, loss.total, loss.aux, *loss.prefix_mse])]
        pp, st = prob.p.copy(), AdamState.zeros_like(prob.p)
        counts = np.zeros(prob.p.d_sae, np.int64)
        for _ in range(2):
            r = be.train_step_matryoshka(pp, st, prob.x, fire_counts=counts, **_step_kw(prob))
            out.append(np.array([r.mse, r.total, r.aux, r.l0, r.explained_variance,
                                 r.extra["min_active"], *r.extra["prefix_mse"],
                                 *r.extra["prefix_explained_variance"]]))
        out += pp.arrays() + st.m.arrays() + st.v.arrays() + [counts]
        return out

    set_threads(1)
    one = outputs()
    set_threads(2)
    two = outputs()
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"output {i} depends on the thread count"


# ------------------------------------------------------------------ CUDA simulator
def _cuda_face_complete() -> str | None:
    try:
        import importlib
        mod = importlib.import_module("fastsae.backends.cuda")
    except Exception as exc:  # no numba.cuda at all
        return f"{type(exc).__name__}: {exc}"
    lacking = contract.missing(mod)
    return f"the cuda face lacks {', '.join(lacking)}" if lacking else None


def test_cuda_under_simulator():
    """Without a GPU: this file's cuda cases (tiny shapes) under
    ``NUMBA_ENABLE_CUDASIM=1``, in a subprocess (the simulator must be on
    before numba is imported)."""
    if is_cuda_sim():
        pytest.skip("already under the simulator")
    st = {s.name: s for s in fastsae.available_backends()}.get("cuda")
    if st is not None and st.available:
        pytest.skip("a GPU is here: the cuda cases run directly")
    why = _cuda_face_complete()
    if why:
        pytest.skip(why)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTSAE_TEST_BACKENDS="cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    runner = ("import sys; sys.setswitchinterval(5e-5); import pytest; "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", runner, str(Path(__file__)),
                           "-k", "not test_cuda_under_simulator and not reference"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-40:])
    print(tail)
    assert proc.returncode == 0, f"simulated CUDA Matryoshka tests failed:\n{tail}"
    assert " passed" in out, tail
