"""JumpReLU training (issue 15): the oracle against finite differences, and
every backend's ``jumprelu_gradients`` / ``train_step_jumprelu`` against it.

1. The NumPy oracle (``fastsae.backends.reference``) in float64, by central
   finite differences: the four parameters' gradients are those of the true
   loss ``mse + l0_coefficient * mean_i sum_j H(pre_ij - theta_j)`` (the L0
   term is piecewise constant in the parameters: it adds nothing), at points
   where no pre-activation lies within the step of a threshold; the
   ``log_threshold`` pseudo-gradient is the exact derivative of the smoothed
   surrogate of the reference's comment (``H`` replaced by
   ``S(z) = clip(z / eps + 1/2, 0, 1)`` in the L0 term, and
   ``theta0 * (S(pre - theta) - S(pre - theta0))`` added to each code), at
   points where no pre-activation lies within the step of a window edge.
2. Every backend through the validating front (``fastsae.get_backend``) in
   float32 against that oracle evaluated in float64 on the same float32
   inputs, on shapes from one row / one feature to sizes that leave
   remainders in the kernels' row and feature blocks, in several regimes
   (see ``CASES``). Thresholds are drawn so that no pre-activation lies
   within its float32 error bound of ``theta``, ``lo`` or ``hi`` (computed in
   float32 as ``jumprelu_window`` does *and* in float64): there the active
   set and the window are the same for every correct backend, so they are
   compared exactly (``l0``, ``l0_loss``, ``fire_counts``); nearer entries
   may legitimately fall either way and are avoided by construction.
3. The front's validation (errors name the argument, nothing is written).
4. Finite or loud: a step that leaves a parameter or a threshold non-finite
   reports NaN losses.
5. numba and cython: bitwise the same results on 1 and on 2 threads.

Tolerances (float32 arithmetic). A float32 sum of ``K`` products computed in
any order is within ``(K + 2) u`` of its exact value relative to the sum of
the magnitudes of its terms (``u = 2**-24``, Higham ch. 3). Every quantity
here is a chain of such sums (pre: ``d_in`` terms, x_hat: ``d_sae``, d_f:
``d_in``, parameter gradients: ``N``); :func:`_bounds` propagates the
*magnitudes* (sums of absolute values of the terms, with the magnitude of
each input's own error folded in) through the chain in float64 and allows
``8 (k + 4) u`` of them with ``k = 2 max(N, d_in, d_sae)``, at least the
chain's total length (as ``tests/test_topk.py`` and ``test_density.py``).
A training step is checked one step at a time: the float64 reference step
starts from the backend's own float32 state (parameters, moments, thresholds,
step count), so errors do not compound and the bound of one step applies
(see :func:`_check_step`; Adam with ``eps = 1e-3`` as in the other step
tests, which makes the update Lipschitz in the gradient).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, JumpReLUSparsity, SAEParams
from fastsae import reference as R
from fastsae.backends import tunables as TU

from conftest import U32, f64, is_cuda_sim

# ------------------------------------------------------------------ backends
ALL_BACKENDS = ("numpy", "numba", "cython", "cuda")
_STATUS = {s.name: s for s in fastsae.available_backends()}


def _backend_names():
    """Every backend (skipped, with the reason, where unusable), or those in
    ``FASTSAE_TEST_BACKENDS`` (the CUDA simulator run sets ``cuda``)."""
    wanted = os.environ.get("FASTSAE_TEST_BACKENDS")
    return [n for n in wanted.split(",") if n] if wanted else list(ALL_BACKENDS)


def _get(name):
    s = _STATUS.get(name)
    if s is None or not s.available:
        pytest.skip(f"{name} backend unavailable: {s.reason if s else 'not registered'}")
    return fastsae.get_backend(name)


@pytest.fixture(params=_backend_names())
def be(request):
    return _get(request.param)


def _sim(be) -> bool:
    return be.name == "cuda" and is_cuda_sim()


# ------------------------------------------------------------------ problems
# (N, d_in, d_sae). CPU: one row, one feature, one of everything, odd sizes,
# and sizes with remainders in every block grid (numba's 256-row encoder
# blocks and 64-feature tiles: 300 = 256 + 44, 700 = 10 * 64 + 60; 129 rows
# and 65 features: one past a power of two)
SHAPES = [(1, 5, 7), (6, 4, 1), (1, 1, 1), (7, 5, 13), (33, 17, 65), (129, 24, 130),
          (300, 40, 700)]
# the CUDA simulator runs kernels as Python: tiny shapes only
SHAPES_CUDA_SIM = [(1, 1, 1), (1, 3, 7), (7, 5, 1), (7, 5, 13), (20, 8, 33)]

#: Regimes, each a way of drawing the thresholds (see :func:`_problem`):
#: mixed   about a quarter active, a window of +-0.2 holding ~15% of entries
#: window  bandwidth 4: most entries in the window, some active
#: none    thresholds above every pre-activation, the window below holding some
#: none_far thresholds far above: nothing active, nothing in the window
#: all     thresholds below every pre-activation, some active ones in the window
#: dense   a fresh SAE (W_enc = W_dec.T, b_enc = 0, threshold ~0.01,
#:         bandwidth 0.001): about half the features fire (above the CPU
#:         backends' density switch)
CASES = ("mixed", "window", "none", "none_far", "all", "dense")
L0C = 0.3
LR = 1e-3
ADAM_EPS = 1e-3


def shapes_for(be):
    return SHAPES_CUDA_SIM if _sim(be) else SHAPES


@dataclass
class JProblem:
    x: np.ndarray
    p: SAEParams
    log_threshold: np.ndarray
    bandwidth: float
    l0c: float


def _params(rng, d_in, d_sae, case):
    W_dec = rng.normal(size=(d_sae, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)  # unit-norm decoder
    if case == "dense":
        W_enc = W_dec.T.copy()
        b_enc = np.zeros(d_sae)
        b_dec = np.zeros(d_in)
    else:
        W_enc = rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)
        b_enc = rng.normal(size=d_sae) * 0.3 + (6.0 if case == "all" else 0.0)
        b_dec = rng.normal(size=d_in) * 0.1
    return SAEParams(*(np.ascontiguousarray(a, np.float32) for a in (W_enc, b_enc, W_dec, b_dec)))


def _draw(case, pre, bw):
    """``draw(rng, idx) -> theta[idx]``: the thresholds of ``case`` for the
    features ``idx`` (random each call, so a redraw moves them)."""
    def draw(rng, idx):
        col = pre[:, idx]
        m = len(idx)
        if case == "mixed":
            q = np.quantile(col, rng.uniform(0.55, 0.95, m).clip(0, 1), axis=0)
            q = np.diagonal(np.atleast_2d(q)) if m else q
            return np.maximum(q + rng.uniform(-0.05, 0.05, m), rng.uniform(0.03, 0.1, m))
        if case == "window":
            return np.maximum(np.median(col, axis=0) + rng.uniform(-0.3, 0.3, m),
                              rng.uniform(0.03, 0.1, m))
        if case == "none":
            return np.maximum(col.max(axis=0), 0.0) + rng.uniform(0.05, 0.3, m)
        if case == "none_far":
            return np.maximum(col.max(axis=0), 0.0) + bw + rng.uniform(1.0, 2.0, m)
        if case == "all":
            return col.min(axis=0) - rng.uniform(0.05, 0.3, m)
        if case == "dense":
            return 0.01 * np.exp(rng.uniform(-0.5, 0.5, m))
        raise ValueError(case)
    return draw


BANDWIDTH = {"mixed": 0.4, "window": 4.0, "none": 1.0, "none_far": 0.5, "all": 1.0,
             "dense": 0.001}


def _pre64(x, p):
    """float64 pre-activations of the float32 inputs, and the float32 error
    bound of each (conftest.encode_oracle's, doubled: a backend may fold
    ``b_dec`` into the bias, ``x @ W - b_dec @ W + b_enc``)."""
    x64, P = f64(x), _p64(p)
    xc = x64 - P.b_dec
    pre = xc @ P.W_enc + P.b_enc
    mag = (np.abs(x64) + np.abs(P.b_dec)) @ np.abs(P.W_enc) + np.abs(P.b_enc)
    return pre, 4.0 * (x.shape[1] + 4) * U32 * mag + 1e-30


def _clear(pre, bound, lt32, bw):
    """bool ``[d_sae]``: every pre-activation of the feature is farther than
    ``bound`` from its ``theta``, ``lo`` and ``hi``, both as float32
    computes them (``jumprelu_window`` on float32) and as float64 does, and
    on the same side of both: selection and window agree everywhere."""
    t32, lo32, hi32 = (f64(a) for a in R.jumprelu_window(lt32, bw))
    t64, lo64, hi64 = R.jumprelu_window(f64(lt32), bw)
    ok = np.isfinite(t32) & (t32 > 0)
    for b32, b64 in ((t32, t64), (lo32, lo64), (hi32, hi64)):
        d = np.minimum(np.abs(pre - b32), np.abs(pre - b64))
        ok &= np.all((d > bound) & ((pre > b32) == (pre > b64)), axis=0)
    return ok


def _p64(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


def _problem(shape, case, seed=0, steps=1, l0c=L0C):
    """A problem of ``case`` whose thresholds keep every pre-activation clear
    of theta/lo/hi (:func:`_clear`) at the start and, for ``steps > 1``, at
    each step of the float64 reference run from it (with a margin for the
    float32 run drifting from it: 2x the bound plus 1e-6 relative);
    features that are not clear get new thresholds until all are."""
    n, d_in, d_sae = shape
    rng = np.random.default_rng([seed, n, d_in, d_sae, CASES.index(case)])
    p = _params(rng, d_in, d_sae, case)
    x = np.ascontiguousarray(rng.normal(size=(n, d_in)), np.float32)
    bw = BANDWIDTH[case]
    pre, bound = _pre64(x, p)
    draw = _draw(case, pre, bw)
    idx = np.arange(d_sae)
    lt = np.log(draw(rng, idx)).astype(np.float32)
    for _ in range(200):
        bad = ~_clear(pre, bound, lt, bw)
        if steps > 1 and not bad.any():
            bad = _unclear_in_run(x, p, lt, bw, l0c, steps)
        if not bad.any():
            return JProblem(x, p, lt, bw, l0c)
        lt[bad] = np.log(draw(rng, idx[bad])).astype(np.float32)
    raise RuntimeError(f"no clear thresholds found for {shape} {case}")


def _unclear_in_run(x, p, lt, bw, l0c, steps):
    p64, s64 = _p64(p), _zero_state64(p)
    lt64, m64, v64 = f64(lt), np.zeros(p.d_sae), np.zeros(p.d_sae)
    bad = np.zeros(p.d_sae, bool)
    for s in range(steps):
        if s:
            pre, bound = _pre64(x, SAEParams(*(a.astype(np.float32) for a in p64.arrays())))
            pre = (f64(x) - p64.b_dec) @ p64.W_enc + p64.b_enc
            margin = 2 * bound + 1e-6 * (1 + np.abs(pre))
            bad |= ~_clear(pre, margin, lt64.astype(np.float32), bw)
        R.train_step_jumprelu(p64, s64, f64(x), log_threshold=lt64, threshold_m=m64,
                              threshold_v=v64, bandwidth=bw, l0_coefficient=l0c, lr=LR,
                              eps=ADAM_EPS)
    return bad


def _zero_state64(p):
    z = SAEParams(*(np.zeros(a.shape) for a in p.arrays()))
    return AdamState(z, z.copy(), 0)


# ------------------------------------------------------------------ bounds
@dataclass
class Bounds:
    loss: object            # float64 oracle Losses
    grads: SAEParams        # float64 oracle gradients
    g_lt: np.ndarray
    tol: dict               # name -> elementwise bound (W_enc, b_enc, W_dec, b_dec, lt)
    tol_mse: float
    active: np.ndarray
    window: np.ndarray


def _bounds(x, p, lt, bw, l0c) -> Bounds:
    """The float64 oracle at the float32 point ``(x, p, lt)`` and elementwise
    float32 error bounds of each output (see the module docstring):

    * ``Pm = |xc| @ |W_enc| + |b_enc|``: magnitude of pre's terms (``|f| <= Pm``);
    * ``Er = (active * Pm) @ |W_dec| + |b_dec| + |x|``: of ``r = x_hat - x``
      (it covers the codes' own error, which is a multiple of ``Pm``);
    * ``Dx = 2 Er / N`` (d_xhat), ``Df = Dx @ |W_dec|.T`` (d_f), ``Dp =
      active * Df`` (d_pre);
    * the gradients' magnitudes ``|xc|.T @ Dp``, ``sum_i Dp``, ``(active *
      Pm).T @ Dx``, ``sum_i Dx + |W_enc| @ sum_i Dp``; the projection of
      ``W_dec``'s gradient adds ``|w| (T . |w|) / |w|^2`` per row;
    * ``log_threshold``: ``theta^2 / eps * sum_window Df + theta * l0c *
      count / (N eps)`` (``theta`` itself is float32-rounded: a few u);
    * ``mse``: ``2 / N * sum |r| Er`` (first order in the error of ``r``).

    Each is multiplied by ``8 (k + 4) u``, ``k = 2 max(N, d_in, d_sae)``.
    """
    n, d_in = x.shape
    d_sae = p.d_sae
    k = 2 * max(n, d_in, d_sae)
    c = 8 * (k + 4) * U32
    x64, P, lt64 = f64(x), _p64(p), f64(lt)
    loss, g, g_lt = R.jumprelu_gradients(x64, P, lt64, bw, l0c)
    xc = x64 - P.b_dec
    pre = xc @ P.W_enc + P.b_enc
    theta, lo, hi = R.jumprelu_window(lt64, bw)
    act = pre > theta
    win = (pre > lo) & (pre < hi)
    Pm = np.abs(xc) @ np.abs(P.W_enc) + np.abs(P.b_enc)
    aW = np.abs(P.W_dec)
    fm = act * Pm
    Er = fm @ aW + np.abs(P.b_dec) + np.abs(x64)
    Dx = 2.0 / n * Er
    Df = Dx @ aW.T
    Dp = act * Df
    T = {"W_enc": c * (np.abs(xc).T @ Dp), "b_enc": c * Dp.sum(axis=0),
         "b_dec": c * (Dx.sum(axis=0) + np.abs(P.W_enc) @ Dp.sum(axis=0))}
    Tw = c * (fm.T @ Dx)
    sq = np.maximum(np.sum(P.W_dec ** 2, axis=1, keepdims=True), 1e-300)
    T["W_dec"] = Tw + aW * np.sum(Tw * aW, axis=1, keepdims=True) / sq
    M = theta ** 2 / bw * np.sum(win * Df, axis=0) + theta * l0c * win.sum(axis=0) / (n * bw)
    T["lt"] = c * M
    for key in T:
        T[key] = T[key] + 1e-30
    r = (act * pre) @ P.W_dec + P.b_dec - x64
    tol_mse = c * 2.0 / n * float(np.sum(np.abs(r) * Er)) + 1e-30
    return Bounds(loss, g, g_lt, T, tol_mse, act, win)


def _excess(got, want, tol):
    """Largest ``|got - want| - tol`` (<= 0 passes) and where."""
    e = np.abs(f64(got) - want) - tol
    i = np.unravel_index(int(np.argmax(e)), e.shape) if e.size else ()
    return float(e[i]) if e.size else 0.0, i


def _assert_close(got, want, tol, what):
    got = np.asarray(got)
    assert got.shape == np.shape(want), (what, got.shape, np.shape(want))
    assert got.dtype == np.float32, (what, got.dtype)
    assert np.all(np.isfinite(got)), what
    ex, i = _excess(got, want, tol)
    assert ex <= 0, (f"{what}: off by {abs(f64(got)[i] - np.asarray(want)[i]):.3g} at {i} "
                     f"(allowed {np.asarray(tol)[i]:.3g}; got {f64(got)[i]!r}, "
                     f"want {np.asarray(want)[i]!r})")


# ------------------------------------------------------------------ 1. the oracle
def _true_loss(x, p, lt, l0c):
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    act = pre > np.exp(lt)
    xh = np.where(act, pre, 0) @ p.W_dec + p.b_dec
    return np.sum((xh - x) ** 2) / x.shape[0] + l0c * act.sum() / x.shape[0]


def _surrogate_loss(x, p, lt, bw, l0c, theta0):
    """The reference comment's smoothed loss, exact derivative = the
    pseudo-gradient at ``theta = theta0``."""
    def S(z):
        return np.clip(z / bw + 0.5, 0.0, 1.0)
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    theta = np.exp(lt)
    f = np.where(pre > theta, pre, 0) + theta0 * (S(pre - theta) - S(pre - theta0))
    xh = f @ p.W_dec + p.b_dec
    return np.sum((xh - x) ** 2) / x.shape[0] + l0c * S(pre - theta).sum() / x.shape[0]


def _fd_point(seed, l0c):
    """float64 problem whose pre-activations are > 1e-3 from every threshold
    and window edge (the finite-difference steps move them by < 1e-5), with
    active entries and window entries on both sides of the threshold."""
    rng = np.random.default_rng(seed)
    n, d_in, d_sae = 6, 4, 9
    for _ in range(1000):
        W_enc = rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)
        W_dec = rng.normal(size=(d_sae, d_in)) / np.sqrt(d_in)
        p = SAEParams(W_enc, rng.normal(size=d_sae) * 0.3, W_dec, rng.normal(size=d_in) * 0.1)
        x = rng.normal(size=(n, d_in))
        bw = 0.6
        lt = np.log(rng.uniform(0.1, 1.0, d_sae))
        pre = (x - p.b_dec) @ p.W_enc + p.b_enc
        theta, lo, hi = R.jumprelu_window(lt, bw)
        gap = min(np.abs(pre - b[None, :]).min() for b in (theta, lo, hi))
        win = (pre > lo) & (pre < hi)
        if gap > 1e-3 and (win & (pre > theta)).any() and (win & (pre < theta)).any():
            return x, p, lt, bw
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


@pytest.mark.parametrize("l0c", [0.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_jumprelu_finite_differences(seed, l0c):
    """float64 oracle vs central differences (the losses are piecewise
    quadratic in the parameters and, in the surrogate, smooth in
    log_threshold away from the edges: central differences with h = 1e-6 are
    exact up to ~1e-10 rounding)."""
    x, p, lt, bw = _fd_point(seed, l0c)
    loss, g, g_lt = R.jumprelu_gradients(x, p, lt, bw, l0c)
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    act = pre > np.exp(lt)
    xh = np.where(act, pre, 0) @ p.W_dec + p.b_dec
    assert loss.mse == pytest.approx(np.sum((xh - x) ** 2) / x.shape[0], rel=1e-12)
    assert loss.l0_loss == pytest.approx(l0c * act.sum() / x.shape[0], rel=1e-12, abs=0)
    assert loss.total == pytest.approx(_true_loss(x, p, lt, l0c), rel=1e-12)
    assert loss.l1 == 0.0 and loss.aux == 0.0
    h = 1e-6
    for name in SAEParams.NAMES:
        fd = _fd(lambda: _true_loss(x, p, lt, l0c), getattr(p, name), h)
        if name == "W_dec":
            fd = R._project_out_parallel(fd, p.W_dec)
        np.testing.assert_allclose(getattr(g, name), fd, rtol=1e-6, atol=1e-8, err_msg=name)
    theta0 = np.exp(lt)
    fd = _fd(lambda: _surrogate_loss(x, p, lt, bw, l0c, theta0), lt, h)
    assert g_lt.shape == lt.shape and g_lt.dtype == lt.dtype
    np.testing.assert_allclose(g_lt, fd, rtol=1e-6, atol=1e-8, err_msg="log_threshold")
    # the surrogate's reconstruction term is the true mse at the current point
    assert _surrogate_loss(x, p, lt, bw, 0.0, theta0) == pytest.approx(loss.mse, rel=1e-12)


def test_reference_jumprelu_pieces():
    """The window is open and per feature; the pseudo-gradient's two terms by
    hand on a one-feature problem; only window entries count."""
    lt = np.log(np.array([0.5, 2.0], np.float32))
    theta, lo, hi = R.jumprelu_window(lt, 0.5)
    assert theta.dtype == lo.dtype == hi.dtype == np.float32
    np.testing.assert_array_equal(lo, theta - np.float32(0.25))
    np.testing.assert_array_equal(hi, theta + np.float32(0.25))
    # one feature, d_in = 1, W_enc = 1, W_dec = 1, biases 0: pre = x, x_hat = f
    p = SAEParams(np.ones((1, 1)), np.zeros(1), np.ones((1, 1)), np.zeros(1))
    x = np.array([[0.3], [0.45], [0.6], [0.9], [2.0]])  # theta 0.5, window (0.25, 0.75)
    bw, l0c = 0.5, 0.2
    loss, g, g_lt = R.jumprelu_gradients(x, p, np.log(np.array([0.5])), bw, l0c)
    f = np.where(x > 0.5, x, 0.0)
    d_f = 2 * (f - x) / 5
    win = (x > 0.25) & (x < 0.75)
    g_theta = -(0.5 / bw) * d_f[win].sum() - l0c / (5 * bw) * win.sum()
    np.testing.assert_allclose(g_lt, [g_theta * 0.5], rtol=1e-12)
    assert loss.l0_loss == pytest.approx(l0c * 3 / 5)
    assert loss.mse == pytest.approx(float(np.sum((f - x) ** 2) / 5))
    np.testing.assert_allclose(g.b_enc, [np.sum(np.where(x > 0.5, d_f, 0))], rtol=1e-12)


def test_reference_train_step_jumprelu_composition():
    """The oracle's step = its gradients, PyTorch Adam on the four parameters
    and on log_threshold at the same t, decoder rows renormalized, fire
    counts, losses measured before the update; t advances once per step."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5))
    p = SAEParams(rng.normal(size=(5, 11)) / 2, rng.normal(size=11) * 0.3,
                  rng.normal(size=(11, 5)), rng.normal(size=5) * 0.1)
    R.normalize_decoder_rows(p.W_dec)
    lt = np.log(rng.uniform(0.1, 0.8, 11))
    m, v = np.zeros(11), np.zeros(11)
    st = _zero_state64(p)
    counts = np.zeros(11, np.int64)
    b1, b2, eps, lr, bw, l0c = 0.8, 0.9, 1e-4, 1e-2, 0.3, 0.5
    want_p, want_lt, wm, wv = p.copy(), lt.copy(), m.copy(), v.copy()
    want_state = st.copy()
    for t in range(1, 4):
        loss, g, g_lt = R.jumprelu_gradients(x, want_p, want_lt, bw, l0c)
        pre = (x - want_p.b_dec) @ want_p.W_enc + want_p.b_enc
        act = pre > np.exp(want_lt)
        R.adam_update(want_p, g, want_state, lr, b1, b2, eps)
        wm = b1 * wm + (1 - b1) * g_lt
        wv = b2 * wv + (1 - b2) * g_lt ** 2
        want_lt = want_lt - lr * (wm / (1 - b1 ** t)) / (np.sqrt(wv / (1 - b2 ** t)) + eps)
        want_p.W_dec /= np.linalg.norm(want_p.W_dec, axis=1, keepdims=True)
        r = R.train_step_jumprelu(p, st, x, log_threshold=lt, threshold_m=m, threshold_v=v,
                                  bandwidth=bw, l0_coefficient=l0c, lr=lr, beta1=b1,
                                  beta2=b2, eps=eps, fire_counts=counts)
        assert st.step == t
        assert r.mse == pytest.approx(loss.mse) and r.l1 == 0.0 and r.aux == 0.0
        assert r.extra["l0_loss"] == pytest.approx(loss.l0_loss)
        assert r.total == pytest.approx(loss.mse + loss.l0_loss)
        assert r.l0 == pytest.approx(act.sum() / 8)
        assert r.explained_variance == pytest.approx(R.explained_variance(x, loss.mse))
        for name in SAEParams.NAMES:
            np.testing.assert_allclose(getattr(p, name), getattr(want_p, name), rtol=1e-12,
                                       atol=1e-14, err_msg=name)
        np.testing.assert_allclose(lt, want_lt, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m, wm, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(v, wv, rtol=1e-12, atol=1e-18)
    assert np.allclose(np.linalg.norm(p.W_dec, axis=1), 1.0)


# ------------------------------------------------------------------ 2. backends vs oracle
def _check_losses(loss, B: Bounds, n):
    assert loss.l1 == 0.0 and loss.aux == 0.0, loss
    assert abs(loss.mse - B.loss.mse) <= B.tol_mse, (loss.mse, B.loss.mse, B.tol_mse)
    # l0_loss = l0c * nnz / N: the active set is exact here (thresholds clear)
    assert loss.l0_loss == pytest.approx(B.loss.l0_loss, rel=1e-6, abs=1e-300), loss
    assert abs(loss.total - B.loss.total) <= B.tol_mse + 1e-6 * B.loss.l0_loss, loss


def _check_gradients(be, prob):
    B = _bounds(prob.x, prob.p, prob.log_threshold, prob.bandwidth, prob.l0c)
    args = [be.to_backend(a) for a in (prob.x, prob.p, prob.log_threshold)]
    loss, g, g_lt = be.jumprelu_gradients(*args, prob.bandwidth, prob.l0c)
    g, g_lt = be.to_numpy(g), np.asarray(be.to_numpy(g_lt))
    _check_losses(loss, B, prob.x.shape[0])
    for name in SAEParams.NAMES:
        _assert_close(getattr(g, name), getattr(B.grads, name), B.tol[name], name)
    _assert_close(g_lt, B.g_lt, B.tol["lt"], "g_log_threshold")
    return B


SIM_CASES = [(s, c) for s in SHAPES_CUDA_SIM for c in ("mixed", "none", "all", "window")] \
    + [((20, 8, 33), "dense"), ((7, 5, 13), "none_far")]
ALL_CASES = [(s, c) for s in SHAPES for c in CASES] \
    + [(s, c) for s in SHAPES_CUDA_SIM if s not in SHAPES for c in CASES]
ALL_IDS = [f"{n}x{d}x{k}-{c}" for (n, d, k), c in ALL_CASES]


def _select(be, case):
    """CPU backends and a real GPU take the CPU shapes; the simulator its
    tiny shapes and a few regimes."""
    if _sim(be):
        if case not in SIM_CASES:
            pytest.skip("CUDA simulator: tiny shapes and a few regimes only")
    elif case[0] not in SHAPES:
        pytest.skip("a CUDA-simulator shape")


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_jumprelu_gradients_match_oracle(be, case):
    _select(be, case)
    shape, kind = case
    prob = _problem(shape, kind, seed=1)
    B = _check_gradients(be, prob)
    # the regime is the one intended
    if kind in ("none", "none_far"):
        assert not B.active.any()
    if kind == "none_far":
        assert not B.window.any()
    if kind == "all":
        assert B.active.all()


@pytest.mark.parametrize("l0c", [0.0, 5.0])
def test_jumprelu_gradients_l0_coefficient(be, l0c):
    """No L0 term, and an L0 term that dominates the threshold gradient (a
    window entry missed or counted twice changes it by theta * l0c / (N eps),
    far above the bound)."""
    shape = (20, 8, 33) if _sim(be) else (129, 24, 130)
    _check_gradients(be, _problem(shape, "mixed", seed=2, l0c=l0c))


# --------------------------------------------------------------- train_step
def _host_state(be, bp, bs, blt, bm, bv, bc):
    hp, hs = be.to_numpy(bp), be.to_numpy(bs)
    out = [np.asarray(be.to_numpy(a)) for a in (blt, bm, bv)]
    counts = None if bc is None else np.asarray(be.to_numpy(bc))
    return hp, hs, out[0], out[1], out[2], counts


def _check_step(got, before, after, prob, kw, step):
    """One backend step against the float64 reference step from the same
    float32 state ``before`` (params, AdamState, lt, m, v, counts).

    Bounds (``g`` the reference gradient, ``T`` its bound from
    :func:`_bounds`): Adam's update ``u = m_hat / (sqrt(v_hat) + eps)`` moves
    by at most ``|du/dm_hat| dm_hat + |du/dv_hat| dv_hat <= (1 + 3.2) T /
    eps`` (``dm_hat <= T``; ``|m_hat| / sqrt(v_hat) <= 3.2`` for b1 = 0.9,
    b2 = 0.999), so a parameter moves by at most ``lr (5 T / eps + 64 u)``
    plus its own rounding ``4 u |p|``; renormalizing a (near-)unit decoder
    row adds at most its 2-norm error times ``|w|``. ``m = b1 m + (1 - b1)
    g`` is off by ``(1 - b1) T + 2 u |m|``, ``v`` by ``(1 - b2) (2 |g| T +
    T^2) + 3 u |v|``."""
    p0, s0, lt0, m0, v0, c0 = before
    hp, hs, lt1, m1, v1, c1 = after
    n = prob.x.shape[0]
    bw, l0c = prob.bandwidth, prob.l0c
    pre, bound = _pre64(prob.x, p0)
    assert _clear(pre, bound, lt0, bw).all(), \
        f"step {step}: a pre-activation came within float32 rounding of a threshold " \
        "(make _problem's margin larger)"
    B = _bounds(prob.x, p0, lt0, bw, l0c)
    p64, s64 = _p64(p0), AdamState(_p64(s0.m), _p64(s0.v), s0.step)
    lt64, m64, v64 = f64(lt0), f64(m0), f64(v0)
    c64 = None if c0 is None else c0.copy()
    want = R.train_step_jumprelu(p64, s64, f64(prob.x), log_threshold=lt64, threshold_m=m64,
                                 threshold_v=v64, bandwidth=bw, l0_coefficient=l0c,
                                 fire_counts=c64, **kw)
    # StepResult (before the update)
    assert got.l1 == 0.0 and got.aux == 0.0, got
    assert abs(got.mse - want.mse) <= B.tol_mse, (step, got.mse, want.mse)
    assert got.l0 == want.l0, (step, got.l0, want.l0)  # exact: selection is clear
    assert got.extra["l0_loss"] == pytest.approx(want.extra["l0_loss"], rel=1e-6,
                                                 abs=1e-300), step
    assert abs(got.total - want.total) <= B.tol_mse + 1e-6 * want.extra["l0_loss"], step
    var = float(np.sum((f64(prob.x) - f64(prob.x).mean(axis=0)) ** 2) / n)
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
    moments = {name: (getattr(s64.m, name), getattr(s64.v, name),
                      getattr(hs.m, name), getattr(hs.v, name)) for name in SAEParams.NAMES}
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


def _run_and_check(be, prob, steps, fire_counts=True):
    kw = dict(lr=LR, eps=ADAM_EPS, beta1=0.9, beta2=0.999)
    p = prob.p
    bp = be.to_backend(p.copy())
    bs = be.to_backend(AdamState.zeros_like(p))
    blt = be.to_backend(prob.log_threshold.copy())
    bm = be.to_backend(np.zeros(p.d_sae, np.float32))
    bv = be.to_backend(np.zeros(p.d_sae, np.float32))
    bc = be.to_backend(np.zeros(p.d_sae, np.int64)) if fire_counts else None
    bx = be.to_backend(prob.x)
    for step in range(steps):
        before = [_copy(a) for a in _host_state(be, bp, bs, blt, bm, bv, bc)]
        got = be.train_step_jumprelu(bp, bs, bx, log_threshold=blt, threshold_m=bm,
                                     threshold_v=bv, bandwidth=prob.bandwidth,
                                     l0_coefficient=prob.l0c, fire_counts=bc, **kw)
        be.synchronize()
        after = _host_state(be, bp, bs, blt, bm, bv, bc)
        _check_step(got, before, after, prob, kw, step)
    return _host_state(be, bp, bs, blt, bm, bv, bc)


def _copy(a):
    if a is None:
        return None
    return a.copy()


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_train_step_jumprelu_one_step(be, case):
    _select(be, case)
    _run_and_check(be, _problem(case[0], case[1], seed=3), steps=1)


MULTI = [((7, 5, 13), "mixed"), ((33, 17, 65), "mixed"), ((33, 17, 65), "window"),
         ((129, 24, 130), "mixed"), ((129, 24, 130), "dense"), ((33, 17, 65), "all"),
         ((33, 17, 65), "none")]
MULTI_SIM = [((7, 5, 13), "mixed"), ((20, 8, 33), "window")]
MULTI_ALL = MULTI + [c for c in MULTI_SIM if c not in MULTI]


@pytest.mark.parametrize("case", MULTI_ALL,
                         ids=[f"{n}x{d}x{k}-{c}" for (n, d, k), c in MULTI_ALL])
def test_train_step_jumprelu_several_steps(be, case):
    """Four steps in a row, each checked against the float64 reference step
    from the backend's state (Adam moments of the parameters and of
    log_threshold carried over, bias correction at t = 1..4, fire counts
    accumulated, state.step)."""
    if case not in (MULTI_SIM if _sim(be) else MULTI):
        pytest.skip("CUDA simulator: tiny shapes only" if _sim(be) else "a simulator case")
    steps = 4
    prob = _problem(case[0], case[1], seed=4, steps=steps)
    hp, hs, lt, m, v, c = _run_and_check(be, prob, steps)
    assert hs.step == steps
    assert int(c.sum()) > 0 or case[1] == "none"


def test_train_step_jumprelu_without_fire_counts(be):
    shape = (7, 5, 13) if _sim(be) else (33, 17, 65)
    _run_and_check(be, _problem(shape, "mixed", seed=5), steps=1, fire_counts=False)


# --------------------------------------------------------------- both sides of the switch
def _density_tunables(be):
    return [n for n in dir(TU) if n.startswith(be.name.upper() + "_JUMPRELU")
            and n.endswith("MIN_DENSITY")]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("case", [((300, 40, 700), "mixed"), ((300, 40, 700), "dense"),
                                  ((33, 17, 65), "window"), ((129, 24, 130), "all"),
                                  ((37, 13, 29), "none")],
                         ids=["300x40x700-mixed", "300x40x700-dense", "33x17x65-window",
                              "129x24x130-all", "37x13x29-none"])
def test_forced_paths_match_oracle(be, monkeypatch, case, mode):
    """The CPU backends' JumpReLU density switch (``*_JUMPRELU_*MIN_DENSITY``,
    read at call time) forced each way: 0.0 dense, 2.0 sparse; gradients and
    a two-step run (one step on the large shape) against the oracle."""
    names = _density_tunables(be)
    if not names:
        pytest.skip(f"{be.name} has no JumpReLU density switch")
    for name in names:
        monkeypatch.setattr(TU, name, 0.0 if mode == "dense" else 2.0)
    steps = 1 if case[0][0] >= 300 else 2  # (large: a clear 2-step run is hard to draw)
    prob = _problem(case[0], case[1], seed=6, steps=steps)
    _check_gradients(be, prob)
    _run_and_check(be, prob, steps=steps)


# ------------------------------------------------------------------ 3. validation
def _host_only(be):
    if be._device:
        pytest.skip("the front's checks are shared; these cases use host arrays")


def _step_inputs(seed=0):
    prob = _problem((9, 5, 12), "mixed", seed=seed)
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


def _snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, SAEParams):
            out += [a.tobytes() for a in o.arrays()]
        elif isinstance(o, AdamState):
            out += [a.tobytes() for a in o.m.arrays() + o.v.arrays()] + [o.step]
        elif isinstance(o, np.ndarray):
            out.append(o.tobytes())
    return out


def _step_call(be, p, st, x, lt, m, v, counts, **over):
    kw = dict(log_threshold=lt, threshold_m=m, threshold_v=v, bandwidth=0.4,
              l0_coefficient=0.3, lr=1e-3, fire_counts=counts)
    kw.update(over)
    return be.train_step_jumprelu(p, st, x, **kw)


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    b = np.zeros(2 * a.size, a.dtype)
    b[::2] = a
    return b[::2]


BAD_STEP = [
    # (id, what to replace, how, error, message fragment)
    ("lt-float64", "log_threshold", lambda a: a.astype(np.float64), TypeError, "log_threshold"),
    ("lt-shape", "log_threshold", lambda a: np.append(a, 0.0).astype(np.float32), ValueError,
     "log_threshold"),
    ("lt-2d", "log_threshold", lambda a: a[None, :].copy(), ValueError, "log_threshold"),
    ("lt-strided", "log_threshold", _strided, TypeError, "log_threshold"),
    ("lt-readonly", "log_threshold", _readonly, ValueError, "log_threshold"),
    ("lt-list", "log_threshold", lambda a: a.tolist(), TypeError, "log_threshold"),
    ("m-float64", "threshold_m", lambda a: a.astype(np.float64), TypeError, "threshold_m"),
    ("m-shape", "threshold_m", lambda a: a[:-1].copy(), ValueError, "threshold_m"),
    ("m-strided", "threshold_m", _strided, TypeError, "threshold_m"),
    ("m-readonly", "threshold_m", _readonly, ValueError, "threshold_m"),
    ("v-float16", "threshold_v", lambda a: a.astype(np.float16), TypeError, "threshold_v"),
    ("v-shape", "threshold_v", lambda a: np.zeros(1, np.float32), ValueError, "threshold_v"),
    ("v-strided", "threshold_v", _strided, TypeError, "threshold_v"),
    ("v-readonly", "threshold_v", _readonly, ValueError, "threshold_v"),
    ("v-none", "threshold_v", lambda a: None, TypeError, "threshold_v"),
]


@pytest.mark.parametrize("bad", BAD_STEP, ids=[b[0] for b in BAD_STEP])
def test_train_step_jumprelu_refuses_bad_threshold_arrays(be, bad):
    _host_only(be)
    _, field, how, err, frag = bad
    prob, p, st, lt, m, v, counts = _step_inputs()
    arrays = {"log_threshold": lt, "threshold_m": m, "threshold_v": v}
    arrays[field] = how(arrays[field])
    snap = _snapshot(p, st, lt, m, v, counts)
    with pytest.raises(err, match=frag):
        be.train_step_jumprelu(p, st, prob.x, bandwidth=0.4, l0_coefficient=0.3, lr=1e-3,
                               fire_counts=counts, **arrays)
    assert _snapshot(p, st, lt, m, v, counts) == snap, "written before refusing"


BAD_SCALARS = [
    ("bw-zero", dict(bandwidth=0.0), ValueError, "bandwidth"),
    ("bw-negative", dict(bandwidth=-0.1), ValueError, "bandwidth"),
    ("bw-nan", dict(bandwidth=float("nan")), ValueError, "bandwidth"),
    ("bw-inf", dict(bandwidth=float("inf")), ValueError, "bandwidth"),
    ("bw-str", dict(bandwidth="0.1"), TypeError, "bandwidth"),
    ("bw-bool", dict(bandwidth=True), TypeError, "bandwidth"),
    ("l0c-negative", dict(l0_coefficient=-1e-3), ValueError, "l0_coefficient"),
    ("l0c-nan", dict(l0_coefficient=float("nan")), ValueError, "l0_coefficient"),
    ("l0c-none", dict(l0_coefficient=None), TypeError, "l0_coefficient"),
]
BAD_STEP_SCALARS = BAD_SCALARS + [
    ("lr-negative", dict(lr=-1e-3), ValueError, "lr"),
    ("beta1-one", dict(beta1=1.0), ValueError, "beta1"),
    ("beta2-over", dict(beta2=1.5), ValueError, "beta2"),
    ("eps-zero", dict(eps=0.0), ValueError, "eps"),
]


@pytest.mark.parametrize("bad", BAD_STEP_SCALARS, ids=[b[0] for b in BAD_STEP_SCALARS])
def test_train_step_jumprelu_refuses_bad_scalars(be, bad):
    _host_only(be)
    _, over, err, frag = bad
    prob, p, st, lt, m, v, counts = _step_inputs()
    snap = _snapshot(p, st, lt, m, v, counts)
    with pytest.raises(err, match=frag):
        _step_call(be, p, st, prob.x, lt, m, v, counts, **over)
    assert _snapshot(p, st, lt, m, v, counts) == snap


@pytest.mark.parametrize("bad", BAD_SCALARS, ids=[b[0] for b in BAD_SCALARS])
def test_jumprelu_gradients_refuses_bad_scalars(be, bad):
    _host_only(be)
    _, over, err, frag = bad
    prob = _problem((9, 5, 12), "mixed")
    kw = dict(bandwidth=0.4, l0_coefficient=0.3)
    kw.update(over)
    with pytest.raises(err, match=frag):
        be.jumprelu_gradients(prob.x, prob.p, prob.log_threshold, kw["bandwidth"],
                              kw["l0_coefficient"])


def test_jumprelu_gradients_refuses_bad_arrays(be):
    _host_only(be)
    prob = _problem((9, 5, 12), "mixed")
    x, p, lt = prob.x, prob.p, prob.log_threshold
    snap = _snapshot(x, p, lt)
    cases = [
        (dict(log_threshold=lt[:-1].copy()), ValueError, "log_threshold"),
        (dict(log_threshold=lt[None, :].copy()), ValueError, "log_threshold"),
        (dict(log_threshold=lt.astype(np.int32)), TypeError, "log_threshold"),
        (dict(log_threshold=np.where(np.arange(lt.size) == 2, np.nan, lt)), ValueError,
         "log_threshold"),
        (dict(x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x)), ValueError,
         "x"),
        (dict(x=np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x)), ValueError,
         "x"),
        (dict(x=x[:, :-1].copy()), ValueError, "x"),
        (dict(x=x.astype(np.int64)), TypeError, "x"),
        (dict(params=(p.W_enc, p.b_enc, p.W_dec, p.b_dec)), TypeError, "params"),
        (dict(params=SAEParams(p.W_enc, p.b_enc[:-1].copy(), p.W_dec, p.b_dec)), ValueError,
         "b_enc"),
    ]
    for over, err, frag in cases:
        kw = dict(x=x, params=p, log_threshold=lt)
        kw.update(over)
        with pytest.raises(err, match=frag):
            be.jumprelu_gradients(kw["x"], kw["params"], kw["log_threshold"], 0.4, 0.3)
    assert _snapshot(x, p, lt) == snap
    # float64 / non-contiguous inputs of the gradient are converted, not refused
    loss, _, g = be.jumprelu_gradients(f64(x), p, _strided(lt), 0.4, 0.3)
    assert np.isfinite(loss.total) and np.asarray(be.to_numpy(g)).dtype == np.float32


def test_train_step_jumprelu_refuses_bad_batch_and_params(be):
    _host_only(be)
    prob, p, st, lt, m, v, counts = _step_inputs()
    snap = _snapshot(p, st, lt, m, v, counts)
    x = prob.x
    bad_x = x.copy()
    bad_x[2, 1] = np.nan
    cases = [
        (dict(x=bad_x), ValueError, "x"),
        (dict(x=x[:, :-1].copy()), ValueError, "x"),
        (dict(fire_counts=counts.astype(np.int32)), TypeError, "fire_counts"),
        (dict(fire_counts=counts[:-1].copy()), ValueError, "fire_counts"),
        (dict(params=SAEParams(p.W_enc.astype(np.float64), p.b_enc, p.W_dec, p.b_dec)),
         TypeError, "W_enc"),
        (dict(params=SAEParams(p.W_enc, _readonly(p.b_enc), p.W_dec, p.b_dec)), ValueError,
         "b_enc"),
    ]
    for over, err, frag in cases:
        kw = dict(x=x, params=p, fire_counts=counts)
        kw.update(over)
        with pytest.raises(err, match=frag):
            be.train_step_jumprelu(kw["params"], st, kw["x"], log_threshold=lt, threshold_m=m,
                                   threshold_v=v, bandwidth=0.4, l0_coefficient=0.3, lr=1e-3,
                                   fire_counts=kw["fire_counts"])
        assert _snapshot(p, st, lt, m, v, counts) == snap, over


ALIASES = [
    ("m-is-v", lambda p, st, lt, m, v: dict(threshold_v=m)),
    ("lt-is-m", lambda p, st, lt, m, v: dict(threshold_m=lt)),
    ("lt-is-v", lambda p, st, lt, m, v: dict(threshold_v=lt)),
    ("lt-is-b_enc", lambda p, st, lt, m, v: dict(log_threshold=p.b_enc)),
    ("m-is-state.m.b_enc", lambda p, st, lt, m, v: dict(threshold_m=st.m.b_enc)),
    ("v-is-state.v.b_enc", lambda p, st, lt, m, v: dict(threshold_v=st.v.b_enc)),
    ("lt-in-W_enc", lambda p, st, lt, m, v: dict(log_threshold=p.W_enc.reshape(-1)[:lt.size])),
    ("lt-overlaps-m", lambda p, st, lt, m, v: _overlap()),
]


def _overlap():
    buf = np.zeros(2 * 12, np.float32)
    return dict(log_threshold=buf[:12], threshold_m=buf[6:18])


@pytest.mark.parametrize("alias", ALIASES, ids=[a[0] for a in ALIASES])
def test_train_step_jumprelu_refuses_aliasing(be, alias):
    """A threshold array sharing memory with its moments, a parameter or a
    parameter's moment would be updated twice (or read after being written):
    refused, naming both, before anything is written."""
    _host_only(be)
    prob, p, st, lt, m, v, counts = _step_inputs()
    arrays = {"log_threshold": lt, "threshold_m": m, "threshold_v": v}
    arrays.update(alias[1](p, st, lt, m, v))
    if alias[0] == "lt-in-W_enc" and not np.shares_memory(arrays["log_threshold"], p.W_enc):
        pytest.skip("reshape copied")
    snap = _snapshot(p, st, lt, m, v, counts, *arrays.values())
    with pytest.raises(ValueError, match="share memory"):
        be.train_step_jumprelu(p, st, prob.x, bandwidth=0.4, l0_coefficient=0.3, lr=1e-3,
                               fire_counts=counts, **arrays)
    assert _snapshot(p, st, lt, m, v, counts, *arrays.values()) == snap


def test_train_step_jumprelu_accepts_a_good_call_after_refusals(be):
    """The same inputs that the refusals left untouched train normally."""
    _host_only(be)
    prob, p, st, lt, m, v, counts = _step_inputs()
    r = _step_call(be, p, st, prob.x, lt, m, v, counts)
    assert np.isfinite(r.total) and st.step == 4


# ------------------------------------------------------------------ 4. finite or loud
LOUD = ["nan-W_enc", "inf-W_dec", "nan-b_enc", "nan-log_threshold", "inf-log_threshold-m",
        "overflow-x"]


@pytest.mark.parametrize("how", LOUD)
def test_train_step_jumprelu_finite_or_loud(be, how):
    """A step that leaves a parameter or a threshold non-finite reports NaN
    losses (mse, total, extra['l0_loss']), even when the NaN sits in a
    feature that never fires; rows of 1e30 overflow float32 (squared errors
    of 1e60): the loss is not finite."""
    shape = (7, 5, 13)
    prob = _problem(shape, "mixed", seed=7)
    p, x = prob.p.copy(), prob.x.copy()
    lt, m, v = prob.log_threshold.copy(), np.zeros(13, np.float32), np.zeros(13, np.float32)
    p.b_enc[3] = -1e6  # feature 3 never fires
    if how == "nan-W_enc":
        p.W_enc[0, 3] = np.nan
    elif how == "inf-W_dec":
        p.W_dec[3, 1] = np.inf
    elif how == "nan-b_enc":
        p.b_enc[3] = np.nan
    elif how == "nan-log_threshold":
        lt[3] = np.nan
    elif how == "inf-log_threshold-m":
        m[3] = np.inf  # its Adam update makes log_threshold[3] non-finite
    else:
        x[:2] = 1e30
    bp, bs = be.to_backend(p), be.to_backend(AdamState.zeros_like(p))
    blt, bm, bv = (be.to_backend(a) for a in (lt, m, v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = be.train_step_jumprelu(bp, bs, be.to_backend(x), log_threshold=blt, threshold_m=bm,
                                   threshold_v=bv, bandwidth=prob.bandwidth, l0_coefficient=0.3,
                                   lr=1e-3)
    assert not np.isfinite(r.total), r
    assert not np.isfinite(r.mse), r
    if how != "overflow-x":
        assert np.isnan(r.total) and np.isnan(r.mse) and np.isnan(r.extra["l0_loss"]), r


def test_train_step_jumprelu_finite_stays_finite(be):
    """The rule changes nothing when everything stays finite."""
    prob = _problem((7, 5, 13), "mixed", seed=8)
    bp, bs = be.to_backend(prob.p.copy()), be.to_backend(AdamState.zeros_like(prob.p))
    blt = be.to_backend(prob.log_threshold.copy())
    bm, bv = (be.to_backend(np.zeros(13, np.float32)) for _ in range(2))
    r = be.train_step_jumprelu(bp, bs, be.to_backend(prob.x), log_threshold=blt,
                               threshold_m=bm, threshold_v=bv, bandwidth=prob.bandwidth,
                               l0_coefficient=0.3, lr=1e-3)
    assert np.isfinite(r.total) and np.isfinite(r.extra["l0_loss"]) and np.isfinite(r.mse)


# ------------------------------------------------------------------ 5. thread counts
@pytest.fixture(params=["numba", "cython"])
def cpu_be(request, monkeypatch):
    """(backend, set_threads, max threads); restores the thread setting.
    Cython kernels below CYTHON_PARALLEL_MIN_WORK run on one thread whatever
    the setting: that cut-off is set to 0 so the team really runs."""
    be = _get(request.param)
    if os.environ.get("FASTSAE_TEST_BACKENDS") and \
            request.param not in os.environ["FASTSAE_TEST_BACKENDS"].split(","):
        pytest.skip("not in FASTSAE_TEST_BACKENDS")
    if be.name == "numba":
        import numba
        from fastsae.backends import numba as NB
        old = numba.get_num_threads()
        yield be, NB.set_num_threads, numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(old)
    else:
        from fastsae.backends import cython as C
        from fastsae.backends.cython import _threads as T
        monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)
        old = T._num_threads
        yield be, C.set_num_threads, (max(1, T._runtime.max_threads()) if T.OPENMP else 1)
        C.set_num_threads(old)


@pytest.mark.parametrize("mode", ["default", "dense", "sparse"])
@pytest.mark.parametrize("kind", ["mixed", "dense"])
def test_jumprelu_independent_of_thread_count(cpu_be, monkeypatch, kind, mode):
    """jumprelu_gradients and two train_step_jumprelu steps give bitwise-equal
    results (every output array and loss) on 1 and on 2 threads. 600 rows:
    three 256-row blocks (an uneven split over 2 threads); 257 features: a
    remainder in every feature tiling."""
    be, set_threads, top = cpu_be
    if top < 2:
        pytest.skip(f"{be.name}: only {top} thread available")
    if mode != "default":
        names = _density_tunables(be)
        if not names:
            pytest.skip(f"{be.name} has no JumpReLU density switch")
        for name in names:
            monkeypatch.setattr(TU, name, 0.0 if mode == "dense" else 2.0)
    prob = _problem((600, 40, 257), kind, seed=9)

    def outputs():
        loss, g, g_lt = be.jumprelu_gradients(prob.x, prob.p, prob.log_threshold,
                                              prob.bandwidth, prob.l0c)
        out = g.arrays() + [g_lt, np.array([loss.mse, loss.l0_loss, loss.total])]
        pp, st = prob.p.copy(), AdamState.zeros_like(prob.p)
        lt = prob.log_threshold.copy()
        m, v = np.zeros_like(lt), np.zeros_like(lt)
        counts = np.zeros(prob.p.d_sae, np.int64)
        for _ in range(2):
            r = be.train_step_jumprelu(pp, st, prob.x, log_threshold=lt, threshold_m=m,
                                       threshold_v=v, bandwidth=prob.bandwidth,
                                       l0_coefficient=prob.l0c, lr=1e-3, fire_counts=counts)
            out.append(np.array([r.mse, r.total, r.l0, r.explained_variance,
                                 r.extra["l0_loss"]]))
        out += pp.arrays() + st.m.arrays() + st.v.arrays() + [lt, m, v, counts]
        return out

    set_threads(1)
    one = outputs()
    set_threads(2)
    two = outputs()
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"output {i} depends on the thread count"


# ------------------------------------------------------------- 1b. the other penalties
# JumpReLUSparsity: "tanh", "quadratic" and the pre-activation loss (the
# reference's section comment). Same method as above: the true loss's
# parameter gradients by central differences where no pre-activation is near
# a threshold or window edge, the log_threshold pseudo-gradient as the exact
# derivative of the smoothed surrogate (every H(pre - theta) and every code
# moved by the S-shift, evaluated through the mode's own penalty); the
# pre-activation loss is a true (piecewise linear) function of theta, so it
# enters both with its true value.

def _penalty(f, act_count, sp, l0c, n):
    if sp.mode == "tanh":
        return l0c * np.tanh(sp.tanh_scale * f).sum() / n
    if sp.mode == "quadratic":
        return l0c * np.sum(2.0 / sp.target_l0 * (act_count - sp.target_l0) ** 2) / n
    return l0c * act_count.sum() / n


def _sparsity_loss(x, p, lt, bw, l0c, sp, dead, theta0=None):
    """The true loss (``theta0`` None) or the surrogate at ``theta0``."""
    def S(z):
        return np.clip(z / bw + 0.5, 0.0, 1.0)
    n = x.shape[0]
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    theta = np.exp(lt)
    act = pre > theta
    f = np.where(act, pre, 0)
    count = act.sum(axis=1).astype(np.float64)
    if theta0 is not None:
        f = f + theta0 * (S(pre - theta) - S(pre - theta0))
        count = count + (S(pre - theta) - S(pre - theta0)).sum(axis=1)
    xh = f @ p.W_dec + p.b_dec
    loss = np.sum((xh - x) ** 2) / n + _penalty(f, count, sp, l0c, n)
    if sp.pre_act_coefficient and dead is not None:
        loss += sp.pre_act_coefficient * np.sum(dead * np.maximum(theta - pre, 0)) / n
    return loss


_SPARSITIES = [JumpReLUSparsity("tanh", tanh_scale=4.0), JumpReLUSparsity("tanh", tanh_scale=0.5),
               JumpReLUSparsity("quadratic", target_l0=2.0),
               JumpReLUSparsity("quadratic", target_l0=7.5),
               JumpReLUSparsity("step", pre_act_coefficient=0.8),
               JumpReLUSparsity("tanh", pre_act_coefficient=0.3),
               JumpReLUSparsity("quadratic", target_l0=3.0, pre_act_coefficient=2.0)]


@pytest.mark.parametrize("sp", _SPARSITIES, ids=lambda s: f"{s.mode}-{s.tanh_scale}-"
                         f"{s.target_l0}-{s.pre_act_coefficient}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_jumprelu_sparsity_finite_differences(seed, sp):
    x, p, lt, bw = _fd_point(seed, 0.7)
    l0c = 0.7
    dead = np.zeros(p.d_sae, bool)
    dead[np.random.default_rng(seed).permutation(p.d_sae)[:4]] = True
    loss, g, g_lt = R.jumprelu_gradients(x, p, lt, bw, l0c, sp, dead)
    n = x.shape[0]
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    theta = np.exp(lt)
    act = pre > theta
    f = np.where(act, pre, 0)
    xh = f @ p.W_dec + p.b_dec
    assert loss.mse == pytest.approx(np.sum((xh - x) ** 2) / n, rel=1e-12)
    assert loss.l0_loss == pytest.approx(_penalty(f, act.sum(axis=1), sp, l0c, n), rel=1e-12)
    want_aux = sp.pre_act_coefficient * np.sum(dead * np.maximum(theta - pre, 0)) / n
    assert loss.aux == pytest.approx(want_aux, rel=1e-12, abs=0)
    assert (loss.aux > 0) == (sp.pre_act_coefficient > 0)
    assert loss.total == pytest.approx(_sparsity_loss(x, p, lt, bw, l0c, sp, dead), rel=1e-12)
    h = 1e-6
    for name in SAEParams.NAMES:
        fd = _fd(lambda: _sparsity_loss(x, p, lt, bw, l0c, sp, dead), getattr(p, name), h)
        if name == "W_dec":
            fd = R._project_out_parallel(fd, p.W_dec)
        np.testing.assert_allclose(getattr(g, name), fd, rtol=1e-6, atol=1e-8, err_msg=name)
    fd = _fd(lambda: _sparsity_loss(x, p, lt, bw, l0c, sp, dead, theta0=theta), lt, h)
    np.testing.assert_allclose(g_lt, fd, rtol=1e-6, atol=1e-8, err_msg="log_threshold")
    # the surrogate is the true loss at the current point
    assert _sparsity_loss(x, p, lt, bw, l0c, sp, dead, theta0=theta) == pytest.approx(
        loss.total, rel=1e-12)


def test_reference_jumprelu_sparsity_defaults_and_dead_mask():
    """None, JumpReLUSparsity() and a zero pre-activation coefficient are the
    original step bit for bit; the pre-activation loss needs dead latents
    (no mask, an all-False mask: nothing); the tanh and quadratic modes
    change the threshold gradient but not the reconstruction's."""
    x, p, lt, bw = _fd_point(4, 0.7)
    base = R.jumprelu_gradients(x, p, lt, bw, 0.7)
    dead = np.ones(p.d_sae, bool)
    for sp, dm in ((JumpReLUSparsity(), None), (JumpReLUSparsity(), dead),
                   (JumpReLUSparsity(pre_act_coefficient=1.0), None),
                   (JumpReLUSparsity(pre_act_coefficient=1.0), np.zeros(p.d_sae, bool))):
        got = R.jumprelu_gradients(x, p, lt, bw, 0.7, sp, dm)
        assert got[0] == base[0]
        for a, b in zip(got[1].arrays(), base[1].arrays()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got[2], base[2])
    tanh = R.jumprelu_gradients(x, p, lt, bw, 0.7, JumpReLUSparsity("tanh"))
    np.testing.assert_array_equal(tanh[1].W_dec, base[1].W_dec)  # f's own gradient: same
    assert not np.array_equal(tanh[2], base[2])
    # quadratic centred on every row's own L0: no penalty and no Step term,
    # so the threshold gradient is the reconstruction's alone
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    rows = (pre > np.exp(lt)).sum(axis=1)
    i = int(np.argmax(np.bincount(rows)))
    keep = rows == i
    q = R.jumprelu_gradients(x[keep], p, lt, bw, 0.7,
                             JumpReLUSparsity("quadratic", target_l0=float(i)))
    z = R.jumprelu_gradients(x[keep], p, lt, bw, 0.0)
    np.testing.assert_allclose(q[2], z[2], rtol=1e-12, atol=1e-15)
    assert q[0].l0_loss == 0.0


def test_reference_train_step_jumprelu_reports_the_pre_activation_loss():
    x, p, lt, bw = _fd_point(5, 0.7)
    R.normalize_decoder_rows(p.W_dec)
    dead = np.zeros(p.d_sae, bool)
    dead[:3] = True
    sp = JumpReLUSparsity("quadratic", target_l0=2.0, pre_act_coefficient=0.5)
    want = R.jumprelu_gradients(x, p, lt, bw, 0.7, sp, dead)[0]
    st = _zero_state64(p)
    r = R.train_step_jumprelu(p, st, x, log_threshold=lt, threshold_m=np.zeros_like(lt),
                              threshold_v=np.zeros_like(lt), bandwidth=bw, l0_coefficient=0.7,
                              lr=1e-3, sparsity=sp, dead_mask=dead)
    assert r.aux == pytest.approx(want.aux) and r.aux > 0
    assert r.extra["l0_loss"] == pytest.approx(want.l0_loss)
    assert r.total == pytest.approx(want.mse + want.l0_loss + want.aux)
