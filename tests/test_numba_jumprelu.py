"""Numba-only tests of JumpReLU training (fastsae/backends/numba/jumprelu.py):
both paths (sparse candidates and dense BLAS, forced through the density
tunable) against the float64 oracle on problems whose window membership is
exact, the density switch, the encoder's staging overflow, thread-count
independence, and "finite or loud"; for the sparsity modes of issue 15
(``JumpReLUSparsity``: "tanh", "quadratic", the pre-activation loss) which
kernels each configuration takes (the default ones, bit for bit, unless a
mode or the pre-activation loss acts), both paths against the oracle on
exact problems (the dead-column pass of the sparse path over several column
tasks and row blocks, dead features that fire), the paths' agreement and
thread-count independence. (tests/test_jumprelu.py and
tests/test_jumprelu_sparsity.py compare every backend with the oracle on
random data.)

Tolerances: every gradient entry is a float32 sum of at most ``K = 2 max(N,
d_in, d_sae)`` products of float32 values (the ``d_f`` dot products, the
row sums), so its error is at most about ``K u`` times the sum of the
magnitudes of its terms (``u = 2**-24``); the bound used is ``8 (K + 4) u``
times the larger of the result's largest entry and that magnitude scale
(computed in float64), as tests/test_topk.py does.
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
import pytest

import fastsae
from fastsae import AdamState, JumpReLUSparsity, SAEParams
from fastsae import reference as R
from fastsae.backends import tunables as TU
from fastsae.backends.numba import jumprelu as JR

be = fastsae.get_backend("numba")
U = 2.0 ** -24


def f64(a):
    return np.asarray(a, np.float64)


@pytest.fixture
def threads():
    old = numba.get_num_threads()
    yield numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(old)


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Force one path: the density tunable is read at call time."""
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else 0.0)
    return request.param


def _exact_problem(rng, n, d_in, d_sae, b_lo=-3, b_hi=3):
    """Small-integer x, W_enc, b_enc (every pre-activation exact in float32)
    and thresholds near 1.25 + integer with bandwidth 1: the window is
    ``(theta - 0.5, theta + 0.5)``, so no integer pre-activation lies within
    rounding of theta or of a window edge, and membership is exact."""
    x = rng.integers(-2, 3, (n, d_in)).astype(np.float32)
    W_enc = rng.integers(-1, 2, (d_in, d_sae)).astype(np.float32)
    b_enc = rng.integers(b_lo, b_hi + 1, d_sae).astype(np.float32)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = np.zeros(d_in, np.float32)
    theta = 1.25 + rng.integers(0, 2, d_sae)
    log_threshold = np.log(theta).astype(np.float32)
    return x, SAEParams(W_enc, b_enc, W_dec, b_dec), log_threshold


def _scales(x, p, lt, bw, l0c):
    """float64 magnitude scales of each gradient (sums of |terms|)."""
    x, W_enc, b_enc, W_dec, b_dec = f64(x), *(f64(a) for a in p.arrays())
    n = x.shape[0]
    theta = np.exp(f64(lt))
    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    act = pre > theta
    f = np.where(act, pre, 0)
    r = f @ W_dec + b_dec - x
    dx = 2 * np.abs(r) / n
    adf = dx @ np.abs(W_dec).T
    win = (pre > theta - bw / 2) & (pre < theta + bw / 2)
    s_dec = np.abs(f).T @ dx
    s_enc = np.abs(xc).T @ np.where(act, adf, 0)
    s_benc = np.where(act, adf, 0).sum(0)
    s_bdec = dx.sum(0) + np.abs(W_enc) @ s_benc
    s_lt = theta * (theta / bw * np.where(win, adf, 0).sum(0) + l0c / n / bw * win.sum(0))
    return {"W_enc": s_enc.max(), "b_enc": s_benc.max(), "W_dec": s_dec.max(),
            "b_dec": s_bdec.max(), "lt": s_lt.max()}


def _check_gradients(x, p, lt, bw, l0c):
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    want_l, want_g, want_lt = R.jumprelu_gradients(f64(x), p64, f64(lt), bw, l0c)
    got_l, got_g, got_lt = be.jumprelu_gradients(x, p, lt, bw, l0c)
    assert got_lt.dtype == np.float32 and got_lt.shape == lt.shape
    sc = _scales(x, p, lt, bw, l0c)
    K = 2 * max(x.shape[0], p.d_in, p.d_sae)
    for name, got, want in [*((nm, getattr(got_g, nm), getattr(want_g, nm))
                              for nm in SAEParams.NAMES), ("lt", got_lt, want_lt)]:
        assert got.dtype == np.float32 and got.shape == want.shape, name
        tol = 8 * (K + 4) * U * max(np.max(np.abs(want)), sc[name], 1e-30)
        assert np.max(np.abs(f64(got) - want)) <= tol, name
    assert got_l.l0_loss == pytest.approx(want_l.l0_loss, rel=1e-12)  # exact count
    assert got_l.mse == pytest.approx(want_l.mse, rel=1e-5, abs=1e-7)
    assert got_l.total == pytest.approx(got_l.mse + got_l.l0_loss, rel=1e-12)
    assert got_l.l1 == 0.0 and got_l.aux == 0.0


# (N, d_in, d_sae): one row, one feature, odd sizes, several encoder row
# blocks (NUMBA_JUMPRELU_ROW_BLOCK) and feature tiles, remainders included
SHAPES = [(1, 3, 1), (1, 4, 7), (5, 3, 9), (37, 5, 70), (300, 4, 33), (600, 6, 130)]


@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
@pytest.mark.parametrize("l0c", [0.0, 0.7])
def test_gradients_against_oracle(path, n, d_in, d_sae, l0c):
    rng = np.random.default_rng(n + 13 * d_sae)
    x, p, lt = _exact_problem(rng, n, d_in, d_sae)
    _check_gradients(x, p, lt, 1.0, l0c)


@pytest.mark.parametrize("case", ["none_active", "all_active", "window_only", "lo_below_0"])
def test_gradients_edge_cases(path, case):
    rng = np.random.default_rng(5)
    x, p, lt = _exact_problem(rng, 40, 4, 50)
    bw = 1.0
    if case == "none_active":
        p.b_enc[:] = -100
    elif case == "all_active":
        p.b_enc[:] = 100
    elif case == "window_only":  # pre = 1 everywhere: inside every window, never active
        p.W_enc[:] = 0
        p.b_enc[:] = 1
        lt[:] = np.float32(np.log(1.25))
    else:  # a window reaching below 0: negative pre-activations are candidates
        bw = 3.0
    _check_gradients(x, p, lt, bw, 0.3)


def _train(x, p, lt, n_steps, bw=1.0, l0c=0.3, lr=1e-3, eps=1e-3, backend=be):
    p = p.copy()
    st = AdamState.zeros_like(p)
    lt = lt.copy()
    m, v = np.zeros_like(lt), np.zeros_like(lt)
    fc = np.zeros(p.d_sae, np.int64)
    res = [backend.train_step_jumprelu(p, st, x, log_threshold=lt, threshold_m=m,
                                       threshold_v=v, bandwidth=bw, l0_coefficient=l0c, lr=lr,
                                       eps=eps, fire_counts=fc) for _ in range(n_steps)]
    return p, st, lt, m, v, fc, res


@pytest.mark.parametrize("n,d_in,d_sae", [(1, 3, 1), (37, 5, 70), (600, 6, 130)])
def test_train_step_against_oracle(path, n, d_in, d_sae):
    """Three steps against the float64 oracle (Adam eps 1e-3 as in
    tests/test_topk.py: a gradient entry near 0 would otherwise turn its
    rounding into a full +-lr step)."""
    rng = np.random.default_rng(n + d_sae)
    x, p, lt = _exact_problem(rng, n, d_in, d_sae)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    s64 = AdamState.zeros_like(p64)
    lt64 = f64(lt)
    m64, v64 = np.zeros_like(lt64), np.zeros_like(lt64)
    fc64 = np.zeros(d_sae, np.int64)
    want = [R.train_step_jumprelu(p64, s64, f64(x), log_threshold=lt64, threshold_m=m64,
                                  threshold_v=v64, bandwidth=1.0, l0_coefficient=0.3, lr=1e-3,
                                  eps=1e-3, fire_counts=fc64) for _ in range(3)]
    gp, gs, glt, gm, gv, gfc, got = _train(x, p, lt, 3)
    for a, b in zip(got, want):
        for part in ("mse", "total", "l0", "explained_variance"):
            assert getattr(a, part) == pytest.approx(getattr(b, part), rel=1e-4, abs=1e-6), part
        assert a.extra["l0_loss"] == pytest.approx(b.extra["l0_loss"], rel=1e-12)
        assert a.l1 == 0.0
    for name, a, b in [*((nm, getattr(gp, nm), getattr(p64, nm)) for nm in SAEParams.NAMES),
                       ("log_threshold", glt, lt64), ("threshold_m", gm, m64),
                       ("threshold_v", gv, v64)]:
        assert np.max(np.abs(f64(a) - b)) <= 1e-5 + 1e-5 * np.max(np.abs(b)), name
    assert np.array_equal(gfc, fc64)
    assert gs.step == 3
    np.testing.assert_allclose(np.linalg.norm(f64(gp.W_dec), axis=1), 1.0, rtol=1e-6)


def test_paths_agree_and_switch(monkeypatch):
    """The density decides the path (spied), and both paths compute the same
    step up to float32 reduction order."""
    calls = []
    for name in ("sparse_step_core", "dense_step_core"):
        real = getattr(JR, name)
        monkeypatch.setattr(JR, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    rng = np.random.default_rng(2)
    x, p, lt = _exact_problem(rng, 300, 6, 130)
    # candidates are entries with pre > theta - 0.5: about a quarter here
    dens = float(np.mean(x @ p.W_enc + p.b_enc > np.exp(lt) - 0.5))
    out = {}
    for label, thr in (("sparse", dens + 0.01), ("dense", dens - 0.01)):
        monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", thr)
        out[label] = _train(x, p, lt, 2)
    assert calls == ["sparse_step_core"] * 2 + ["dense_step_core"] * 2
    a, b = out["sparse"], out["dense"]
    for u, w in zip([*a[0].arrays(), a[2], a[3], a[4]], [*b[0].arrays(), b[2], b[3], b[4]]):
        np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-6)
    assert np.array_equal(a[5], b[5])
    assert [r.l0 for r in a[6]] == [r.l0 for r in b[6]]


def test_fresh_sae_takes_the_dense_path(monkeypatch):
    """A fresh JumpReLU SAE (threshold 0.01, b_enc 0, W_enc = W_dec.T) fires
    about half its features: dense at the default tunable."""
    calls = []
    real = JR.dense_step_core
    monkeypatch.setattr(JR, "dense_step_core", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    W_dec = rng.standard_normal((64, 16)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams(np.ascontiguousarray(W_dec.T), np.zeros(64, np.float32), W_dec,
                  np.zeros(16, np.float32))
    x = rng.standard_normal((512, 16)).astype(np.float32)
    lt = np.full(64, np.log(0.01), np.float32)
    res = _train(x, p, lt, 1, bw=0.05)[6][0]
    assert calls == [1] and 20 < res.l0 < 44


def test_staging_overflow(monkeypatch):
    """Rows with more candidates than the learned staging width are
    recomputed into place: same result as with a wide staging area."""
    import fastsae.backends.numba as F
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    rng = np.random.default_rng(9)
    x, p, lt = _exact_problem(rng, 700, 5, 300)
    monkeypatch.setattr(F, "_jr_stage", {300: 300})
    wide = be.jumprelu_gradients(x, p, lt, 1.0, 0.3)
    for k in (1, 4):
        monkeypatch.setattr(F, "_jr_stage", {300: k})
        narrow = be.jumprelu_gradients(x, p, lt, 1.0, 0.3)
        for a, b in zip([*narrow[1].arrays(), narrow[2]], [*wide[1].arrays(), wide[2]]):
            assert np.array_equal(a, b)
        assert narrow[0] == wide[0]


@pytest.mark.parametrize("dense", [False, True])
def test_independent_of_thread_count(monkeypatch, threads, dense):
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    rng = np.random.default_rng(4)
    x, p, lt = _exact_problem(rng, 1100, 7, 200)
    outs = []
    for nt in sorted({1, min(threads, 3), threads}):
        numba.set_num_threads(nt)
        g = be.jumprelu_gradients(x, p, lt, 1.0, 0.3)
        t = _train(x, p, lt, 2)
        outs.append(list(g[1].arrays()) + [g[2]] + list(t[0].arrays()) + [t[2], t[3], t[4],
                                                                        t[5]])
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert np.array_equal(a, b), "depends on the thread count"


@pytest.mark.parametrize("where", ["b_enc", "log_threshold"])
def test_non_finite_update_is_loud(path, where):
    rng = np.random.default_rng(1)
    x, p, lt = _exact_problem(rng, 20, 4, 30)
    if where == "b_enc":
        p.b_enc[3] = np.inf  # its update stays inf
    else:
        lt[5] = np.inf  # theta inf: never active, never in a window; lt stays inf
    res = _train(x, p, lt, 1)[6][0]
    assert np.isnan(res.mse) and np.isnan(res.total) and np.isnan(res.extra["l0_loss"])


# ---------------------------------------------------------------- sparsity modes
def _modes_scales(x, p, lt, bw, l0c, sp, dead):
    """:func:`_scales` with the sparsity mode's and the pre-activation
    loss's terms (``tanh``: ``c s / N`` joins ``|d_f|`` at the active and
    window entries; ``quadratic``: ``theta / eps * sum_window |q_i|``;
    pre-activation: ``p / N`` at the below entries of the dead columns)."""
    sc = _scales(x, p, lt, bw, l0c)
    x, W_enc, b_enc, W_dec, b_dec = f64(x), *(f64(a) for a in p.arrays())
    n = x.shape[0]
    theta = np.exp(f64(lt))
    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    act = pre > theta
    win = (pre > theta - bw / 2) & (pre < theta + bw / 2)
    f = np.where(act, pre, 0)
    dx = 2 * np.abs(f @ W_dec + b_dec - x) / n
    adf = dx @ np.abs(W_dec).T
    if sp.mode == "tanh":
        adf = adf + l0c * sp.tanh_scale / n
    dp = np.where(act, adf, 0)
    lt_s = theta * theta / bw * np.where(win, adf, 0).sum(0)
    if sp.mode == "quadratic":
        q = 4 * l0c * (act.sum(1) + sp.target_l0) / (n * sp.target_l0)
        lt_s = lt_s + theta / bw * (win * q[:, None]).sum(0)
    if sp.pre_act_coefficient and dead is not None:
        below = dead[None, :] & (pre < theta)
        dp = dp + below * sp.pre_act_coefficient / n
        lt_s = lt_s + theta * sp.pre_act_coefficient / n * below.sum(0)
    s_benc = dp.sum(0)
    sc.update({"W_enc": max(sc["W_enc"], (np.abs(xc).T @ dp).max()),
               "b_enc": max(sc["b_enc"], s_benc.max()),
               "b_dec": max(sc["b_dec"], (dx.sum(0) + np.abs(W_enc) @ s_benc).max()),
               "lt": max(sc["lt"], lt_s.max())})
    return sc


def _check_modes(x, p, lt, bw, l0c, sp, dead):
    """Gradients and losses against the float64 oracle (the bound of
    :func:`_check_gradients`, magnitudes from :func:`_modes_scales`)."""
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    want_l, want_g, want_lt = R.jumprelu_gradients(f64(x), p64, f64(lt), bw, l0c, sp, dead)
    got_l, got_g, got_lt = be.jumprelu_gradients(x, p, lt, bw, l0c, sparsity=sp,
                                                 dead_mask=dead)
    sc = _modes_scales(x, p, lt, bw, l0c, sp, dead)
    K = 2 * max(x.shape[0], p.d_in, p.d_sae)
    for name, got, want in [*((nm, getattr(got_g, nm), getattr(want_g, nm))
                              for nm in SAEParams.NAMES), ("lt", got_lt, want_lt)]:
        assert got.dtype == np.float32 and got.shape == want.shape, name
        tol = 8 * (K + 4) * U * max(np.max(np.abs(want)), sc[name], 1e-30)
        assert np.max(np.abs(f64(got) - want)) <= tol, name
    for part in ("l0_loss", "aux"):  # exact sets: a few roundings of float64 sums
        assert getattr(got_l, part) == pytest.approx(getattr(want_l, part), rel=1e-5,
                                                     abs=1e-12), part
    assert got_l.mse == pytest.approx(want_l.mse, rel=1e-5, abs=1e-7)
    assert got_l.total == pytest.approx(got_l.mse + got_l.l0_loss + got_l.aux, rel=1e-12)


SPARSITIES = {"tanh": JumpReLUSparsity(mode="tanh", tanh_scale=3.0),
              "quadratic": JumpReLUSparsity(mode="quadratic", target_l0=4.0),
              "step+pre": JumpReLUSparsity(pre_act_coefficient=0.7),
              "tanh+pre": JumpReLUSparsity(mode="tanh", tanh_scale=0.5,
                                           pre_act_coefficient=0.3),
              "quadratic+pre": JumpReLUSparsity(mode="quadratic", target_l0=20.0,
                                                pre_act_coefficient=2.0)}


def _dead_mask(rng, d_sae, frac):
    return rng.random(d_sae) < frac


@pytest.mark.parametrize("sp", SPARSITIES, ids=list(SPARSITIES))
@pytest.mark.parametrize("n,d_in,d_sae", [(1, 3, 1), (37, 5, 70), (600, 6, 130)])
def test_modes_gradients_against_oracle(path, sp, n, d_in, d_sae):
    """Every mode on both paths, exact problems (window membership, L0 and
    the below set exact): dead features include firing ones."""
    rng = np.random.default_rng(3 * n + d_sae)
    x, p, lt = _exact_problem(rng, n, d_in, d_sae)
    sp = SPARSITIES[sp]
    if sp.target_l0 is not None:  # at most d_sae
        sp = dataclasses.replace(sp, target_l0=min(sp.target_l0, d_sae / 2))
    _check_modes(x, p, lt, 1.0, 0.4, sp, _dead_mask(rng, d_sae, 0.4))


@pytest.mark.parametrize("n,d_sae,frac", [(1100, 400, 0.75), (300, 40, 1.0), (257, 90, 0.05)])
def test_dead_column_pass_blocks(n, d_sae, frac, monkeypatch):
    """The sparse path's dead-column pass over several column tasks (300
    dead columns: 7 tasks of 48, the last of 12), two row blocks (1100 rows
    of 1024) and a single column: against the oracle, and bitwise the dense
    path's sets (counts, aux to rounding)."""
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    rng = np.random.default_rng(n + d_sae)
    x, p, lt = _exact_problem(rng, n, 5, d_sae)
    dead = _dead_mask(rng, d_sae, frac)
    dead[0] = True
    sp = JumpReLUSparsity(mode="tanh", pre_act_coefficient=0.5)
    _check_modes(x, p, lt, 1.0, 0.2, sp, dead)
    sparse = be.jumprelu_gradients(x, p, lt, 1.0, 0.2, sparsity=sp, dead_mask=dead)
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 0.0)
    dense = be.jumprelu_gradients(x, p, lt, 1.0, 0.2, sparsity=sp, dead_mask=dead)
    assert sparse[0].aux == pytest.approx(dense[0].aux, rel=1e-12)
    assert sparse[0].aux > 0


def _spy(monkeypatch):
    calls = []
    for name in ("sparse_step_core", "dense_step_core", "sparse_step_core_modes",
                 "dense_step_core_modes", "sparse_gradients", "dense_gradients",
                 "sparse_gradients_modes", "dense_gradients_modes"):
        real = getattr(JR, name)
        monkeypatch.setattr(JR, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    return calls


@pytest.mark.parametrize("dense", [False, True])
def test_default_configurations_take_the_default_kernels(monkeypatch, dense):
    """``None``, ``JumpReLUSparsity()``, a pre-activation coefficient with no
    dead feature (or no mask), and a mask with coefficient 0 all run the
    default kernels, bitwise as ``None``; a non-default mode or an acting
    pre-activation loss runs the ``*_modes`` ones."""
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(8)
    x, p, lt = _exact_problem(rng, 60, 5, 40)
    some = _dead_mask(rng, 40, 0.5)
    none = np.zeros(40, bool)
    pre = JumpReLUSparsity(pre_act_coefficient=0.5)
    default = [(None, None), (JumpReLUSparsity(), some), (pre, none), (pre, None),
               (JumpReLUSparsity(tanh_scale=2.0, target_l0=3.0), some)]
    ref = None
    for sp, mask in default:
        g = be.jumprelu_gradients(x, p, lt, 1.0, 0.3, sparsity=sp, dead_mask=mask)
        t = _train_modes(x, p, lt, 2, sp, mask)
        out = [*g[1].arrays(), g[2], *t[0].arrays(), t[2], t[3], t[4], t[5]]
        if ref is None:
            ref, ref_l, ref_r = out, g[0], [vars(r) for r in t[6]]
        for a, b in zip(out, ref):
            assert np.array_equal(a, b)
        assert g[0] == ref_l and [vars(r) for r in t[6]] == ref_r
    kind = "dense" if dense else "sparse"
    assert calls == [f"{kind}_gradients", *[f"{kind}_step_core"] * 2] * len(default)
    calls.clear()
    for sp, mask in [(JumpReLUSparsity(mode="tanh"), None), (pre, some),
                     (JumpReLUSparsity(mode="quadratic", target_l0=2.0), none)]:
        be.jumprelu_gradients(x, p, lt, 1.0, 0.3, sparsity=sp, dead_mask=mask)
        _train_modes(x, p, lt, 1, sp, mask)
    assert calls == [f"{kind}_gradients_modes", f"{kind}_step_core_modes"] * 3


def _train_modes(x, p, lt, n_steps, sp, dead, bw=1.0, l0c=0.3):
    p = p.copy()
    st = AdamState.zeros_like(p)
    lt = lt.copy()
    m, v = np.zeros_like(lt), np.zeros_like(lt)
    fc = np.zeros(p.d_sae, np.int64)
    res = [be.train_step_jumprelu(p, st, x, log_threshold=lt, threshold_m=m, threshold_v=v,
                                  bandwidth=bw, l0_coefficient=l0c, lr=1e-3, eps=1e-3,
                                  fire_counts=fc, sparsity=sp, dead_mask=dead)
           for _ in range(n_steps)]
    return p, st, lt, m, v, fc, res


@pytest.mark.parametrize("sp", SPARSITIES, ids=list(SPARSITIES))
def test_modes_paths_agree(monkeypatch, sp):
    """Both paths take the same two steps in every mode (to float32
    reduction order), the same L0, fire counts, l0_loss and aux."""
    rng = np.random.default_rng(6)
    x, p, lt = _exact_problem(rng, 300, 6, 130)
    dead = _dead_mask(rng, 130, 0.3)
    out = {}
    for label, thr in (("sparse", 2.0), ("dense", 0.0)):
        monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", thr)
        out[label] = _train_modes(x, p, lt, 2, SPARSITIES[sp], dead)
    a, b = out["sparse"], out["dense"]
    for u, w in zip([*a[0].arrays(), a[2], a[3], a[4]], [*b[0].arrays(), b[2], b[3], b[4]]):
        np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-6)
    assert np.array_equal(a[5], b[5])
    for ra, rb in zip(a[6], b[6]):
        assert ra.l0 == rb.l0
        assert ra.extra["l0_loss"] == pytest.approx(rb.extra["l0_loss"], rel=1e-6)
        assert ra.aux == pytest.approx(rb.aux, rel=1e-6, abs=1e-12)
        assert ra.total == pytest.approx(rb.total, rel=1e-5)


@pytest.mark.parametrize("dense", [False, True])
def test_modes_independent_of_thread_count(monkeypatch, threads, dense):
    """Every mode with the pre-activation loss (its dead-column pass over 8
    column tasks and two row blocks on the sparse path), bitwise the same
    on every thread count."""
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    rng = np.random.default_rng(4)
    x, p, lt = _exact_problem(rng, 1100, 7, 200)
    dead = _dead_mask(rng, 200, 0.6)
    for sp in (SPARSITIES["tanh+pre"], SPARSITIES["quadratic+pre"]):
        outs = []
        for nt in sorted({1, min(threads, 3), threads}):
            numba.set_num_threads(nt)
            g = be.jumprelu_gradients(x, p, lt, 1.0, 0.3, sparsity=sp, dead_mask=dead)
            t = _train_modes(x, p, lt, 2, sp, dead)
            outs.append((list(g[1].arrays()) + [g[2]] + list(t[0].arrays())
                         + [t[2], t[3], t[4], t[5]], g[0], [vars(r) for r in t[6]]))
        for o in outs[1:]:
            for a, b in zip(o[0], outs[0][0]):
                assert np.array_equal(a, b), "depends on the thread count"
            assert o[1] == outs[0][1] and o[2] == outs[0][2]


def test_modes_staging_overflow(monkeypatch):
    """The window's pre-activations (tanh reads them) survive the encoder's
    overflow path: narrow staging gives the wide one's result."""
    import fastsae.backends.numba as F
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    rng = np.random.default_rng(9)
    x, p, lt = _exact_problem(rng, 700, 5, 300)
    sp = JumpReLUSparsity(mode="tanh", pre_act_coefficient=0.2)
    dead = _dead_mask(rng, 300, 0.2)
    monkeypatch.setattr(F, "_jr_stage", {300: 300})
    wide = be.jumprelu_gradients(x, p, lt, 1.0, 0.3, sparsity=sp, dead_mask=dead)
    monkeypatch.setattr(F, "_jr_stage", {300: 2})
    narrow = be.jumprelu_gradients(x, p, lt, 1.0, 0.3, sparsity=sp, dead_mask=dead)
    for a, b in zip([*narrow[1].arrays(), narrow[2]], [*wide[1].arrays(), wide[2]]):
        assert np.array_equal(a, b)
    assert narrow[0] == wide[0]


@pytest.mark.parametrize("where", ["W_enc", "log_threshold"])
def test_modes_non_finite_update_is_loud(path, where):
    """A NaN in a dead feature's encoder column (its pre-activations all
    NaN: never below, never active) or threshold: the step is loud."""
    rng = np.random.default_rng(1)
    x, p, lt = _exact_problem(rng, 20, 4, 30)
    dead = np.zeros(30, bool)
    dead[[2, 5, 7]] = True
    if where == "W_enc":
        p.W_enc[1, 5] = np.nan
    else:
        lt[5] = np.nan
    res = _train_modes(x, p, lt, 1, SPARSITIES["tanh+pre"], dead)[6][0]
    assert np.isnan(res.mse) and np.isnan(res.total) and np.isnan(res.aux)
