"""Cython backend, JumpReLU training: both paths (sparse candidates' CSR and
dense ``pre``) against the NumPy oracle, the density switch, thread
independence, and the kernels' own argument checks (beyond the shared
``tests/test_jumprelu.py``, which checks every backend through the front).

Comparison rule: the kernels compute ``pre`` by a tiled float32 sgemm, the
oracle by NumPy's float32 matmul, so ``pre`` may differ in its last bits.
The problems are drawn so that no float64 pre-activation lies within
``AMBIG`` of its feature's ``theta``, ``lo`` or ``hi`` (then both sides put
every entry on the same side of every boundary). Gradients are sums of at
most ``N`` (or ``d_sae``) float32 products accumulated in different orders
(per-row dots with 16 lanes, float64 column sums, pairwise NumPy sums), so
they agree to a few ulps of the largest term times the sum length; at these
sizes (<= 300 terms) ``2**-24 * 300 * 8 ~ 1.5e-4`` relative to the largest
reference value is a safe bound, and the errors seen are ~1e-6. Steps use
Adam ``eps = 1e-3`` so that a gradient that is zero in one and 1e-12 in the
other cannot become a full ``lr`` step (as tests/test_topk.py does).

The sparsity modes (``JumpReLUSparsity``: "tanh", "quadratic", the
pre-activation loss over ``dead_mask``) are checked here on what is the
cython backend's own: both paths for SAEs and (skip) transcoders against the
oracle by the same rule, the default's bitwise identity whichever way it is
spelled (and that it reaches the step kernels with no mode argument), thread
independence, the pre-activation loss's GEMM over the dead features only on
the sparse path, and the kernels' checks of the new arguments. The shared
comparison through the front, with rigorous bounds, is
``tests/test_jumprelu_sparsity.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastsae
from fastsae.backends import tunables as TU
from fastsae.params import AdamState, JumpReLUSparsity, SAEParams

try:
    from fastsae.backends import cython as C

    C.check_available()
    from fastsae.backends.cython import _jumprelu
    from fastsae.backends.cython import jumprelu as CJ
    HAVE_CY = True
except ImportError:
    HAVE_CY = False

pytestmark = pytest.mark.skipif(not HAVE_CY, reason="Cython extensions not built")

AMBIG = 1e-5
RTOL = 1.5e-4
NAMES = SAEParams.NAMES


def _problem(n, d_in, d_sae, seed, bandwidth, q=0.8, scale=1.0, unambiguous=True):
    """A problem with about ``1 - q`` of each feature's entries active and
    (``unambiguous``) no pre-activation within AMBIG of a window bound
    (retries the seed)."""
    for s in range(seed, seed + 50):
        rng = np.random.default_rng(s)
        W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        W_enc = np.ascontiguousarray(
            (W_dec.T * 0.8 + 0.2 * rng.standard_normal((d_in, d_sae))).astype(np.float32))
        b_enc = (0.1 * rng.standard_normal(d_sae)).astype(np.float32)
        b_dec = (0.1 * rng.standard_normal(d_in)).astype(np.float32)
        x = (scale * rng.standard_normal((n, d_in))).astype(np.float32)
        p = SAEParams(W_enc, b_enc, W_dec, b_dec)
        pre64 = (x.astype(np.float64) - b_dec) @ W_enc + b_enc
        srt = np.sort(pre64, axis=0)  # thresholds halfway between two entries
        k = min(max(int(q * n), 1), n - 1)
        mid = (srt[k - 1] + srt[k]) / 2 if n > 1 else srt[0] + 0.1
        lt = np.log(np.maximum(mid, 0.02)).astype(np.float32)
        theta, lo, hi = CJ.window(lt, bandwidth)
        dist = min(np.min(np.abs(pre64 - b[None, :])) for b in (theta, lo, hi))
        if dist > AMBIG or not unambiguous:
            return x, p, lt
    raise AssertionError("no unambiguous problem found")


def _close(got, want, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = RTOL * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else 0.0)
    return request.param


SHAPES = [(1, 4, 1), (3, 5, 7), (33, 17, 70), (64, 32, 129), (130, 48, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bandwidth", [0.001, 0.1, 2.0])  # 2.0: lo < 0 for every feature
def test_gradients_match_oracle(path, shape, bandwidth):
    x, p, lt = _problem(*shape, seed=sum(shape), bandwidth=bandwidth)
    ref, cy = fastsae.get_backend("numpy"), fastsae.get_backend("cython")
    lr_, gr, gtr = ref.jumprelu_gradients(x, p, lt, bandwidth, 0.7)
    lc, gc, gtc = cy.jumprelu_gradients(x, p, lt, bandwidth, 0.7)
    for name in NAMES:
        _close(getattr(gc, name), getattr(gr, name), name)
    _close(gtc, gtr, "g_log_threshold")
    assert lc.l0_loss == pytest.approx(lr_.l0_loss, rel=1e-12, abs=0)  # same active set
    assert lc.mse == pytest.approx(lr_.mse, rel=1e-5)
    assert lc.total == pytest.approx(lc.mse + lc.l0_loss)
    assert lc.l1 == 0.0 and lc.aux == 0.0


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_steps_match_oracle(path, shape):
    bw = 0.1
    x, p, lt = _problem(*shape, seed=7 + sum(shape), bandwidth=bw)
    ref, cy = fastsae.get_backend("numpy"), fastsae.get_backend("cython")
    runs = []
    for be in (ref, cy):
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        fc = np.zeros(q.d_sae, np.int64)
        rs = [be.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                     bandwidth=bw, l0_coefficient=0.5, lr=1e-3, eps=1e-3,
                                     fire_counts=fc) for _ in range(3)]
        runs.append((q, st, t, m, v, fc, rs))
    (qr, sr, tr, mr, vr, fr, rr), (qc, sc, tc, mc, vc, fcc, rc) = runs
    assert sc.step == sr.step == 3
    for name in NAMES:
        _close(getattr(qc, name), getattr(qr, name), name)
        _close(getattr(sc.m, name), getattr(sr.m, name), "m." + name)
    _close(tc, tr, "log_threshold")
    _close(mc, mr, "threshold_m")
    _close(vc, vr, "threshold_v")
    assert np.array_equal(fcc, fr)
    for a, b in zip(rc, rr):
        assert a.l0 == b.l0
        assert a.mse == pytest.approx(b.mse, rel=1e-5)
        assert a.extra["l0_loss"] == pytest.approx(b.extra["l0_loss"], rel=1e-12)
        assert a.explained_variance == pytest.approx(b.explained_variance, rel=1e-5, abs=1e-6)
    norms = np.linalg.norm(qc.W_dec, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_none_active_and_all_active(path):
    x, p, _ = _problem(20, 8, 30, seed=3, bandwidth=0.1)
    ref, cy = fastsae.get_backend("numpy"), fastsae.get_backend("cython")
    for ltv in (8.0, -40.0):  # theta far above every pre; theta ~ 0 (pre > 0 active)
        lt = np.full(30, ltv, np.float32)
        lr_, gr, gtr = ref.jumprelu_gradients(x, p, lt, 0.1, 1.0)
        lc, gc, gtc = cy.jumprelu_gradients(x, p, lt, 0.1, 1.0)
        for name in NAMES:
            _close(getattr(gc, name), getattr(gr, name), name)
        _close(gtc, gtr, "g_log_threshold")
        assert lc.l0_loss == lr_.l0_loss


def _spy(monkeypatch):
    calls = []
    for name in ("_sparse_backward", "_dense_backward"):
        real = getattr(CJ, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(CJ, name, wrapped)
    return calls


def _fresh(n=300, d_in=32, d_sae=256, seed=0):
    """A fresh JumpReLU SAE (threshold 0.01, b_enc 0, W_enc = W_dec.T)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams(np.ascontiguousarray(W_dec.T), np.zeros(d_sae, np.float32), W_dec,
                  np.zeros(d_in, np.float32))
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    return x, p, np.full(d_sae, np.log(0.01), np.float32)


def test_density_switch(monkeypatch):
    """A fresh SAE (about half its entries candidates) takes the dense path at
    the default threshold; high thresholds take the sparse one; 0.0 / 2.0
    force dense / sparse; both paths agree."""
    calls = _spy(monkeypatch)
    cy = fastsae.get_backend("cython")
    x, p, lt = _fresh()
    cy.jumprelu_gradients(x, p, lt, 0.05, 1.0)
    assert calls == ["_dense_backward"]
    calls.clear()
    cy.jumprelu_gradients(x, p, np.full_like(lt, np.log(3.0)), 0.05, 1.0)
    assert calls == ["_sparse_backward"]
    out = {}
    for thr, name in ((0.0, "_dense_backward"), (2.0, "_sparse_backward")):
        monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", thr)
        calls.clear()
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                   bandwidth=0.05, l0_coefficient=1.0, lr=1e-3, eps=1e-3)
        assert calls == [name]
        out[name] = (q, t, r)
    (qd, td, rd), (qs, ts, rs) = out["_dense_backward"], out["_sparse_backward"]
    assert rd.l0 == rs.l0 and rd.l0 > 0.3 * p.d_sae
    for name in NAMES:
        _close(getattr(qd, name), getattr(qs, name), name)
    _close(td, ts, "log_threshold")


@pytest.mark.parametrize("dense", [False, True])
def test_thread_count_independent(monkeypatch, dense):
    """Bitwise the same results with 1, 2 and 3 threads (grids are shape-only),
    at a size above the parallel cut-off."""
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    cy = fastsae.get_backend("cython")
    x, p, lt = _problem(700, 64, 1100, seed=11, bandwidth=0.05, unambiguous=False)
    before = cy.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            cy.set_num_threads(nt)
            q = p.copy()
            st = AdamState.zeros_like(q)
            t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
            r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m,
                                       threshold_v=v, bandwidth=0.05, l0_coefficient=1.0,
                                       lr=1e-3)
            loss, g, gt = cy.jumprelu_gradients(x, p, lt, 0.05, 1.0)
            outs.append([*q.arrays(), t, m, v, *g.arrays(), gt,
                         np.array([r.mse, r.l0, loss.mse])])
    finally:
        cy.set_num_threads(before)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("what", ["threshold_m", "W_dec"])
def test_nonfinite_update_is_loud(path, what):
    """On both paths: a non-finite log_threshold update (through its moment)
    or decoder row, in a feature that never fires, makes the losses NaN."""
    cy = fastsae.get_backend("cython")
    x, p, lt = _problem(16, 8, 20, seed=5, bandwidth=0.1)
    q = p.copy()
    q.b_enc[3] = -1e6  # feature 3 never fires
    st = AdamState.zeros_like(q)
    t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
    if what == "threshold_m":
        m[3] = np.inf
    else:
        q.W_dec[3, 1] = np.inf
    with np.errstate(all="ignore"):
        r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                   bandwidth=0.1, l0_coefficient=1.0, lr=1e-3)
    assert np.isnan(r.mse) and np.isnan(r.total) and np.isnan(r.extra["l0_loss"])


def test_candidate_encoder_matches_numpy():
    """encode_candidates' CSR holds exactly the entries pre > lo, in row and
    feature order, with pre's values; the dense branch returns pre."""
    x, p, lt = _problem(90, 24, 200, seed=2, bandwidth=0.3)
    theta, lo, hi = CJ.window(lt, 0.3)
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    dense, csr = CJ.encode_candidates(x, p.W_enc, p.b_enc, p.b_dec, lo, 2.0)
    assert dense is None
    ip, ix, val = csr
    rows, cols = np.nonzero(pre > lo[None, :])
    assert np.array_equal(np.diff(ip), np.bincount(rows, minlength=90))
    assert np.array_equal(ix, cols)
    np.testing.assert_allclose(val, pre[rows, cols], rtol=1e-5, atol=1e-5)
    dense, csr = CJ.encode_candidates(x, p.W_enc, p.b_enc, p.b_dec, lo, 0.0)
    assert csr is None
    np.testing.assert_allclose(dense, pre, rtol=1e-5, atol=1e-5)


def test_kernels_check_what_the_wrapper_supplies():
    x, p, lt = _problem(10, 8, 12, seed=1, bandwidth=0.1)
    theta, lo, hi = CJ.window(lt, 0.1)
    _, (ip, ix, val) = CJ.encode_candidates(x, p.W_enc, p.b_enc, p.b_dec, lo, 2.0)
    g = SAEParams(*(np.empty_like(a) for a in p.arrays()))
    grads = (g.W_enc, g.b_enc, g.W_dec, g.b_dec, np.empty(12, np.float32))
    args = (x, p.W_enc, p.b_enc, p.W_dec, p.b_dec, ip, ix, val, theta, hi, 0.1, 1.0, lt, False,
            (), None, None, None, None, 1)
    _jumprelu.sparse_backward(*args, grads)
    with pytest.raises(ValueError):  # short window vector
        _jumprelu.sparse_backward(*args[:8], theta[:5], *args[9:], grads)
    with pytest.raises(ValueError):  # indptr of another row count
        _jumprelu.sparse_backward(*args[:5], ip[:-1], *args[6:], grads)
    with pytest.raises(ValueError):  # gradient buffer of the wrong shape
        _jumprelu.sparse_backward(*args, (g.W_dec, g.b_enc, g.W_enc, g.b_dec, grads[4]))
    with pytest.raises(ValueError):  # adam without its 8 constants
        _jumprelu.sparse_backward(*args[:13], True, tuple(np.zeros_like(a) for a in
                                  p.arrays() * 2), np.zeros(3, np.float32), lt.copy(),
                                  lt.copy(), None, 1)
    with pytest.raises(ValueError):
        _jumprelu.encode_csr(x, p.W_enc, p.b_enc, p.b_dec, lo[:3], 16, 16, 1, 1)
    with pytest.raises(ValueError):
        _jumprelu.encode_probe(x, p.W_enc, p.b_enc, p.b_dec, lo, np.empty((1, 12), np.float32),
                               16, 16, 1)


# ------------------------------------------------------------ sparsity modes
MODES = {
    "tanh": JumpReLUSparsity("tanh"),
    "tanh_s0.7": JumpReLUSparsity("tanh", tanh_scale=0.7),
    "quadratic": JumpReLUSparsity("quadratic", target_l0=4.0),
    "quadratic_T30": JumpReLUSparsity("quadratic", target_l0=30.0),
    "preact": JumpReLUSparsity(pre_act_coefficient=0.3),
    "tanh_preact": JumpReLUSparsity("tanh", pre_act_coefficient=0.5),
    "quadratic_preact": JumpReLUSparsity("quadratic", target_l0=3.0, pre_act_coefficient=0.2),
}


def _problem_y(n, d_in, d_sae, seed, bandwidth, kind="sae", d_out=9, q=0.8,
               unambiguous=True):
    """``(x, params, log_threshold, y)``: as :func:`_problem` for an SAE
    (``y`` None), a ``"transcoder"`` or a ``"skip"`` transcoder (``d_out``
    wide, the encoder reading ``x`` uncentered)."""
    for s in range(seed, seed + 50):
        rng = np.random.default_rng(s)
        do = d_in if kind == "sae" else d_out
        W_dec = rng.standard_normal((d_sae, do)).astype(np.float32)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        W_enc = (0.3 * rng.standard_normal((d_in, d_sae))).astype(np.float32)
        if kind == "sae":
            W_enc = np.ascontiguousarray((0.8 * W_dec.T + 0.2 * W_enc).astype(np.float32))
        b_enc = (0.1 * rng.standard_normal(d_sae)).astype(np.float32)
        b_dec = (0.1 * rng.standard_normal(do)).astype(np.float32)
        W_skip = ((0.1 * rng.standard_normal((do, d_in))).astype(np.float32)
                  if kind == "skip" else None)
        x = rng.standard_normal((n, d_in)).astype(np.float32)
        y = None if kind == "sae" else rng.standard_normal((n, do)).astype(np.float32)
        p = SAEParams(W_enc, b_enc, W_dec, b_dec, W_skip)
        xc = x.astype(np.float64) - (b_dec if kind == "sae" else 0.0)
        pre64 = xc @ W_enc + b_enc
        srt = np.sort(pre64, axis=0)
        k = min(max(int(q * n), 1), n - 1)
        mid = (srt[k - 1] + srt[k]) / 2 if n > 1 else srt[0] + 0.1
        lt = np.log(np.maximum(mid, 0.02)).astype(np.float32)
        theta, lo, hi = CJ.window(lt, bandwidth)
        dist = min(np.min(np.abs(pre64 - b[None, :])) for b in (theta, lo, hi))
        if dist > AMBIG or not unambiguous:
            return x, p, lt, y
    raise AssertionError("no unambiguous problem found")


def _dead(d_sae, seed, frac=0.3):
    dead = np.random.default_rng(seed).random(d_sae) < frac
    dead[d_sae // 2] = True
    return dead


def _p64(p):
    return SAEParams(*(None if a is None else a.astype(np.float64)
                       for a in (p.W_enc, p.b_enc, p.W_dec, p.b_dec, p.W_skip)))


MODE_SHAPES = [(1, 4, 1), (33, 17, 70), (130, 48, 300)]


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip"])
@pytest.mark.parametrize("shape", MODE_SHAPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_gradients_match_oracle(path, shape, mode, kind):
    """Both paths, every mode, SAE and transcoders: the float64 oracle at the
    float32 point, by the module's comparison rule."""
    sp = MODES[mode]
    bw = 0.1
    x, p, lt, y = _problem_y(*shape, seed=3 * sum(shape), bandwidth=bw, kind=kind)
    dead = _dead(p.d_sae, sum(shape))
    if sp.mode == "quadratic":  # the front wants target_l0 <= d_sae
        sp = dataclasses.replace(sp, target_l0=min(sp.target_l0, p.d_sae * 0.75))
    y64 = None if y is None else y.astype(np.float64)
    lr_, gr, gtr = fastsae.reference.jumprelu_gradients(
        x.astype(np.float64), _p64(p), lt.astype(np.float64), bw, 0.7, sp, dead, y64)
    lc, gc, gtc = fastsae.get_backend("cython").jumprelu_gradients(x, p, lt, bw, 0.7,
                                                                   sparsity=sp,
                                                                   dead_mask=dead, y=y)
    for name in p.names:
        _close(getattr(gc, name), getattr(gr, name), name)
    _close(gtc, gtr, "g_log_threshold")
    assert lc.mse == pytest.approx(lr_.mse, rel=1e-5)
    assert lc.l0_loss == pytest.approx(lr_.l0_loss, rel=1e-5, abs=1e-12)
    assert lc.aux == pytest.approx(lr_.aux, rel=1e-4, abs=1e-9)
    assert (lc.aux > 0) == (sp.pre_act_coefficient > 0 and lr_.aux > 0)
    assert lc.total == pytest.approx(lc.mse + lc.l0_loss + lc.aux)
    assert lc.l1 == 0.0


@pytest.mark.parametrize("kind", ["sae", "skip"])
@pytest.mark.parametrize("mode", ["tanh", "quadratic_T30", "preact", "quadratic_preact"])
def test_mode_steps_match_oracle(path, mode, kind):
    """Three fused steps (Adam in the feature pass) against the oracle's."""
    sp = MODES[mode]
    bw = 0.1
    x, p, lt, y = _problem_y(130, 48, 300, seed=17, bandwidth=bw, kind=kind, d_out=40)
    dead = _dead(p.d_sae, 4, 0.1)
    runs = []
    for be in (fastsae.get_backend("numpy"), fastsae.get_backend("cython")):
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        fc = np.zeros(q.d_sae, np.int64)
        rs = [be.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                     bandwidth=bw, l0_coefficient=0.5, lr=1e-3, eps=1e-3,
                                     fire_counts=fc, sparsity=sp, dead_mask=dead, y=y)
              for _ in range(3)]
        runs.append((q, st, t, m, v, fc, rs))
    (qr, sr, tr, mr, vr, fr, rr), (qc, sc, tc, mc, vc, fcc, rc) = runs
    for name in p.names:
        _close(getattr(qc, name), getattr(qr, name), name)
        _close(getattr(sc.m, name), getattr(sr.m, name), "m." + name)
    _close(tc, tr, "log_threshold")
    _close(mc, mr, "threshold_m")
    _close(vc, vr, "threshold_v")
    assert np.array_equal(fcc, fr)
    for a, b in zip(rc, rr):
        assert a.l0 == b.l0
        assert a.mse == pytest.approx(b.mse, rel=1e-5)
        assert a.extra["l0_loss"] == pytest.approx(b.extra["l0_loss"], rel=1e-5)
        assert a.aux == pytest.approx(b.aux, rel=1e-4, abs=1e-9)
        assert a.total == pytest.approx(b.total, rel=1e-5)


def _kernel_spy(monkeypatch):
    """Records each backward call's path and keywords."""
    calls = []
    for name in ("_sparse_backward", "_dense_backward"):
        real = getattr(CJ, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append((_name, dict(k)))
            return _real(*a, **k)
        monkeypatch.setattr(CJ, name, wrapped)
    return calls


@pytest.mark.parametrize("kind", ["sae", "skip"])
def test_default_spellings_are_the_step_kernels_bitwise(path, monkeypatch, kind):
    """``None``, ``JumpReLUSparsity()``, and a pre-activation loss with no
    dead feature (mask None or all False) all run the step kernels with no
    mode keyword and give bitwise the same gradients and steps."""
    calls = _kernel_spy(monkeypatch)
    cy = fastsae.get_backend("cython")
    x, p, lt, y = _problem_y(64, 32, 129, seed=2, bandwidth=0.05, kind=kind, d_out=20,
                             unambiguous=False)
    spellings = [(None, None), (JumpReLUSparsity(), None),
                 (JumpReLUSparsity(), np.ones(p.d_sae, bool)),
                 (JumpReLUSparsity(pre_act_coefficient=0.5), None),
                 (JumpReLUSparsity(pre_act_coefficient=0.5), np.zeros(p.d_sae, bool)),
                 (JumpReLUSparsity(tanh_scale=9.0, target_l0=3.0), None)]
    outs = []
    for sp, dead in spellings:
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                   bandwidth=0.05, l0_coefficient=0.8, lr=1e-3, sparsity=sp,
                                   dead_mask=dead, y=y)
        loss, g, gt = cy.jumprelu_gradients(x, p, lt, 0.05, 0.8, sparsity=sp,
                                            dead_mask=dead, y=y)
        assert r.aux == 0.0 and loss.aux == 0.0
        outs.append([*q.arrays(), t, m, v, *g.arrays(), gt,
                     np.array([r.mse, r.l0, r.total, r.extra["l0_loss"], loss.mse,
                               loss.l0_loss, loss.total])])
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert np.array_equal(a, b)
    assert len(calls) == 2 * len(spellings)
    want = "_sparse_backward" if path == "sparse" else "_dense_backward"
    for name, kw in calls:
        assert name == want
        assert not {"mode", "stats", "pre_act", "dead", "dead_idx"} & set(kw)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("mode", ["tanh", "quadratic", "preact", "quadratic_preact"])
def test_modes_thread_count_independent(monkeypatch, dense, mode):
    """Bitwise the same results with 1, 2 and 3 threads in every mode."""
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    sp = MODES[mode]
    cy = fastsae.get_backend("cython")
    x, p, lt = _problem(700, 64, 1100, seed=11, bandwidth=0.05, unambiguous=False)
    dead = _dead(p.d_sae, 1, 0.2)
    before = cy.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            cy.set_num_threads(nt)
            q = p.copy()
            st = AdamState.zeros_like(q)
            t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
            r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m,
                                       threshold_v=v, bandwidth=0.05, l0_coefficient=1.0,
                                       lr=1e-3, sparsity=sp, dead_mask=dead)
            loss, g, gt = cy.jumprelu_gradients(x, p, lt, 0.05, 1.0, sparsity=sp,
                                                dead_mask=dead)
            outs.append([*q.arrays(), t, m, v, *g.arrays(), gt,
                         np.array([r.mse, r.l0, r.aux, r.extra["l0_loss"], loss.mse,
                                   loss.aux, loss.l0_loss])])
    finally:
        cy.set_num_threads(before)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert np.array_equal(a, b)


def test_modes_both_paths_agree(monkeypatch):
    """A fresh SAE (dense at the default switch) and a trained-looking one
    (sparse): every mode's step agrees between the forced paths."""
    cy = fastsae.get_backend("cython")
    x, p, lt = _fresh()
    dead = _dead(p.d_sae, 2, 0.1)
    for mode in ("tanh", "quadratic_T30", "tanh_preact", "quadratic_preact"):
        out = {}
        for thr in (0.0, 2.0):
            monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", thr)
            q = p.copy()
            st = AdamState.zeros_like(q)
            t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
            r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m,
                                       threshold_v=v, bandwidth=0.05, l0_coefficient=1.0,
                                       lr=1e-3, eps=1e-3, sparsity=MODES[mode],
                                       dead_mask=dead)
            out[thr] = (q, t, r)
        (qd, td, rd), (qs, ts, rs) = out[0.0], out[2.0]
        assert rd.l0 == rs.l0
        assert rd.extra["l0_loss"] == pytest.approx(rs.extra["l0_loss"], rel=1e-5)
        assert rd.aux == pytest.approx(rs.aux, rel=1e-4)
        for name in NAMES:
            _close(getattr(qd, name), getattr(qs, name), name)
        _close(td, ts, "log_threshold")


def test_preact_is_dense_over_the_dead_features_only(monkeypatch):
    """Sparse path with a pre-activation loss: the backward stays the sparse
    one, and the loss's GEMMs take W_enc's dead columns only (width n_dead)."""
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    calls = _kernel_spy(monkeypatch)
    widths = []
    real = _jumprelu.preact_dead

    def spy(xc, W_dead, *a):
        widths.append(W_dead.shape)
        return real(xc, W_dead, *a)
    monkeypatch.setattr(_jumprelu, "preact_dead", spy)
    cy = fastsae.get_backend("cython")
    x, p, lt = _problem(130, 48, 300, seed=9, bandwidth=0.1)
    dead = np.zeros(p.d_sae, bool)
    dead[[3, 77, 200]] = True
    loss, g, gt = cy.jumprelu_gradients(x, p, lt, 0.1, 0.5,
                                        sparsity=JumpReLUSparsity(pre_act_coefficient=0.4),
                                        dead_mask=dead)
    assert widths == [(48, 3)]
    assert [c[0] for c in calls] == ["_sparse_backward"]
    assert list(calls[0][1]["dead_idx"]) == [3, 77, 200]
    assert loss.aux > 0
    # only the dead features' threshold gradients change with the loss
    _, _, gt0 = cy.jumprelu_gradients(x, p, lt, 0.1, 0.5)
    changed = np.flatnonzero(gt != gt0)
    assert set(changed) <= {3, 77, 200} and len(changed) > 0


def test_mode_nonfinite_update_is_loud(path):
    """The other modes keep "finite or loud": a non-finite threshold moment
    makes every loss NaN, the pre-activation loss included."""
    cy = fastsae.get_backend("cython")
    x, p, lt = _problem(16, 8, 20, seed=5, bandwidth=0.1)
    for mode in ("tanh", "quadratic", "preact"):
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        m[3] = np.inf
        with np.errstate(all="ignore"):
            r = cy.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m,
                                       threshold_v=v, bandwidth=0.1, l0_coefficient=1.0,
                                       lr=1e-3, sparsity=MODES[mode],
                                       dead_mask=np.ones(20, bool))
        assert np.isnan(r.mse) and np.isnan(r.total) and np.isnan(r.extra["l0_loss"])
        if mode == "preact":
            assert np.isnan(r.aux)


def test_kernels_check_the_mode_arguments():
    x, p, lt = _problem(10, 8, 12, seed=1, bandwidth=0.1)
    theta, lo, hi = CJ.window(lt, 0.1)
    _, (ip, ix, val) = CJ.encode_candidates(x, p.W_enc, p.b_enc, p.b_dec, lo, 2.0)
    g = SAEParams(*(np.empty_like(a) for a in p.arrays()))
    grads = (g.W_enc, g.b_enc, g.W_dec, g.b_dec, np.empty(12, np.float32))
    args = (x, p.W_enc, p.b_enc, p.W_dec, p.b_dec, ip, ix, val, theta, hi, 0.1, 1.0, lt, False,
            (), None, None, None, None, 1, grads)
    stats = np.zeros(2)
    _jumprelu.sparse_backward(*args, mode=1, tanh_scale=4.0, stats=stats)
    dix = np.array([2, 5], np.int64)
    pa = dict(dead_idx=dix, pa_g=np.zeros((2, 8), np.float32), pa_cnt=np.zeros(2, np.int64),
              pre_act=0.1, stats=stats)
    _jumprelu.sparse_backward(*args, **pa)
    bad = [dict(mode=3, stats=stats), dict(mode=1, tanh_scale=0.0, stats=stats),
           dict(mode=2, target_l0=0.0, stats=stats), dict(mode=1, tanh_scale=4.0),
           dict(mode=2, target_l0=2.0, stats=np.zeros(1)),
           {**pa, "dead_idx": np.array([5, 2], np.int64)},
           {**pa, "dead_idx": np.array([2, 12], np.int64)},
           {**pa, "dead_idx": np.array([-1, 2], np.int64)},
           {**pa, "pa_g": np.zeros((2, 7), np.float32)},
           {**pa, "pa_cnt": np.zeros(3, np.int64)},
           {**pa, "pa_g": None}]
    for kw in bad:
        with pytest.raises(ValueError):
            _jumprelu.sparse_backward(*args, **kw)
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    dargs = (x, pre, p.W_enc, p.b_enc, p.W_dec, p.b_dec, theta, lo, hi, 0.1, 1.0, lt, False,
             (), None, None, None, None, 4, 64, 4, 1, grads)
    _jumprelu.dense_backward(*dargs, dead=np.ones(12, np.uint8), pre_act=0.1, stats=stats)
    for kw in (dict(dead=np.ones(11, np.uint8), pre_act=0.1, stats=stats),
               dict(mode=2, target_l0=2.0), dict(mode=-1, stats=stats)):
        with pytest.raises(ValueError):
            _jumprelu.dense_backward(*dargs, **kw)
    xc = x - p.b_dec
    W_dead = np.ascontiguousarray(p.W_enc[:, :3])
    b3, t3 = p.b_enc[:3].copy(), theta[:3].copy()
    G, cnt, asum = _jumprelu.preact_dead(xc, W_dead, b3, t3, 0.5, 4, 2, 1)
    below = (xc @ W_dead + b3) < t3
    assert np.array_equal(cnt, below.sum(axis=0))
    np.testing.assert_allclose(G, (xc.T @ (-(0.5 / 10) * below)).T, rtol=1e-5, atol=1e-7)
    for a in ((xc, W_dead, b3[:2], t3, 0.5, 4, 2, 1), (xc, W_dead, b3, t3[:2], 0.5, 4, 2, 1),
              (xc[:, :5], W_dead, b3, t3, 0.5, 4, 2, 1), (xc, W_dead, b3, t3, 0.5, 0, 2, 1),
              (xc[:0], W_dead, b3, t3, 0.5, 4, 2, 1)):
        with pytest.raises(ValueError):
            _jumprelu.preact_dead(*a)
