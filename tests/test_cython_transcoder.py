"""Transcoders and skip transcoders on the ``cython`` backend (``y`` given
to every gradient and training function), compared with the NumPy oracle
through the validating front.

Shapes: ``d_out`` below, above and equal to ``d_in`` and 1; one row, one
feature, odd sizes; no feature active and every feature active; with and
without the skip term ``W_skip``. Steps run three times in a row and must
agree with the oracle's (parameters, Adam moments incl. ``W_skip``'s, step
results). The ReLU and JumpReLU families run on both the sparse and the
dense path (forced through the density tunables, as the backend's own
density tests do).

Tolerances as ``tests/test_cython_backend.py`` justifies them: ``rtol
1e-4`` with an absolute ``1e-5`` times the largest reference magnitude
(float32 sums of up to ~1000 terms); steps use ``eps = 1e-3`` so that
Adam's division does not blow the rounding of near-zero gradients up to a
whole step (as the JumpReLU and Matryoshka step tests do). With ``y=None``
the backend's existing suites are the check that nothing changed.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import reference as R
from fastsae.params import AdamState, SAEParams

try:
    from fastsae.backends import cython as C

    C.check_available()
    from fastsae.backends import tunables as TU
    from fastsae.backends.cython import _threads as T
except ImportError:  # pragma: no cover - not built here
    pytest.skip("Cython extensions not built", allow_module_level=True)

# (N, d_in, d_out, d_sae, b_enc shift): -50 nothing active, +50 everything active
CASES = [
    (1, 1, 1, 1, 0.5),        # one row, one feature, d_out = d_in = 1
    (7, 5, 3, 9, 0.0),        # d_out < d_in
    (13, 4, 11, 17, -0.3),    # d_out > d_in
    (33, 16, 16, 70, -0.5),   # d_out == d_in
    (9, 12, 1, 20, 0.0),      # d_out = 1
    (5, 8, 6, 1, 0.3),        # one feature
    (11, 6, 7, 24, -50.0),    # no feature active
    (10, 6, 5, 24, 50.0),     # every feature active
]
IDS = [f"N{c[0]}-in{c[1]}-out{c[2]}-sae{c[3]}-b{c[4]:g}" for c in CASES]
ADAM = dict(lr=1e-3, eps=1e-3)


@pytest.fixture(scope="module")
def be():
    return fastsae.get_backend("cython")


@pytest.fixture(scope="module")
def ref():
    return fastsae.get_backend("numpy")


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def nthreads(request, monkeypatch):
    """One thread and a team (with every kernel parallel even when small)."""
    monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)
    C.set_num_threads(request.param)
    yield request.param
    C.set_num_threads(None)


@pytest.fixture(params=["sparse", "dense"])
def relu_path(request, monkeypatch):
    monkeypatch.setattr(TU, "CYTHON_RELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else 0.0)
    return request.param


@pytest.fixture(params=["sparse", "dense"])
def jr_path(request, monkeypatch):
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else 0.0)
    return request.param


def _problem(n, d_in, d_out, d_sae, shift, skip, seed=0, unit=True):
    """``(x, y, params)``: a transcoder (``W_skip`` when ``skip``)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((n, d_in)).astype(f32)
    y = (rng.standard_normal((n, d_out)) + 0.5).astype(f32)
    W_dec = rng.standard_normal((d_sae, d_out)).astype(f32)
    if unit:
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams((rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(f32),
                  (shift + 0.2 * rng.standard_normal(d_sae)).astype(f32), W_dec,
                  (0.1 * rng.standard_normal(d_out)).astype(f32),
                  (0.2 * rng.standard_normal((d_out, d_in))).astype(f32) if skip else None)
    return x, y, p


def _close(got, want, name="", rtol=1e-4, atol_rel=1e-5):
    want = np.asarray(want, np.float64)
    atol = atol_rel * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol,
                               err_msg=name)


def _same_grads(gc: SAEParams, gr: SAEParams):
    assert gc.names == gr.names
    for name in gr.names:
        assert getattr(gc, name).dtype == np.float32, name
        _close(getattr(gc, name), getattr(gr, name), name)


def _same_state(pc, sc, pr, sr):
    assert sc.step == sr.step
    assert pc.names == pr.names == sc.m.names == sc.v.names
    for name in pr.names:
        _close(getattr(pc, name), getattr(pr, name), name)
        _close(getattr(sc.m, name), getattr(sr.m, name), "m." + name)
        _close(getattr(sc.v, name), getattr(sr.v, name), "v." + name, atol_rel=1e-6)


def _same_result(c, r, fields=("mse", "total", "l1", "aux", "explained_variance")):
    for f in fields:
        assert getattr(c, f) == pytest.approx(getattr(r, f), rel=1e-4, abs=1e-6), f
    assert c.l0 == r.l0


def _codes(x, p, y):
    """The ReLU codes and full reconstruction of a transcoder (oracle's)."""
    f = R.encode_relu_sparse(x, p.W_enc, p.b_enc, R.input_centering(p, y))
    return f, R.reconstruct(f, p, x)


def _run_steps(backends, fn, p, x, y, n_steps=3, **kw):
    """Run ``n_steps`` steps of ``fn`` (a front method name) from the same
    start on each backend; returns ``[(params, state, fire_counts, results)]``."""
    out = []
    for b in backends:
        q = p.copy()
        st = AdamState.zeros_like(q)
        fc = np.zeros(q.d_sae, np.int64)
        rs = [getattr(b, fn)(q, st, x, fire_counts=fc, y=y, **kw) for _ in range(n_steps)]
        out.append((q, st, fc, rs))
    return out


# ---------------------------------------------------------------- ReLU family
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
def test_gradients(be, ref, relu_path, case, skip, mode):
    x, y, p = _problem(*case, skip, seed=1, unit=mode == "unit_norm")
    f, x_hat = _codes(x, p, y)
    for codes in (f, f.to_dense()):
        lc, gc = be.gradients(x, p, codes, x_hat, 0.3, mode, y=y)
        lr_, gr = ref.gradients(x, p, codes, x_hat, 0.3, mode, y=y)
        _same_grads(gc, gr)
        for k in ("mse", "l1", "total"):
            assert getattr(lc, k) == pytest.approx(getattr(lr_, k), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
def test_train_step(be, ref, relu_path, case, skip, mode):
    x, y, p = _problem(*case, skip, seed=2, unit=mode == "unit_norm")
    (pr, sr, fr, rr), (pc, sc, fcy, rc) = _run_steps(
        (ref, be), "train_step", p, x, y, l1_coefficient=0.2, decoder_norm=mode, **ADAM)
    _same_state(pc, sc, pr, sr)
    np.testing.assert_array_equal(fcy, fr)
    for c, r in zip(rc, rr):
        _same_result(c, r)


def test_paths_really_differ(be, monkeypatch):
    """The density tunables pick the path for transcoders too."""
    from fastsae.backends.cython import dense as CD

    x, y, p = _problem(40, 12, 9, 50, 0.0, True, seed=3)
    seen = []
    real = CD.step

    def spy(*a, **k):
        seen.append(k.get("y") is y)
        return real(*a, **k)
    monkeypatch.setattr(CD, "step", spy)
    for thr in (2.0, 0.0):
        monkeypatch.setattr(TU, "CYTHON_RELU_DENSE_MIN_DENSITY", thr)
        be.train_step(p.copy(), AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3,
                      y=y)
    assert seen == [True]


# ---------------------------------------------------------------- TopK family
@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "auxk"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_topk_gradients(be, ref, case, skip, aux):
    x, y, p = _problem(*case, skip, seed=4)
    c0 = R.input_centering(p, y)
    codes = R.encode_topk(x, p.W_enc, p.b_enc, c0, 3)
    x_hat = R.reconstruct(codes, p, x)
    aux_codes, w = None, 0.0
    if aux:
        dead = np.arange(p.d_sae) % 2 == 0
        aux_codes, w = R.encode_topk_aux(x, p.W_enc, p.b_enc, c0, dead, 2), 0.4
    lc, gc = be.topk_gradients(x, p, codes, x_hat, aux_codes, w, y=y)
    lr_, gr = ref.topk_gradients(x, p, codes, x_hat, aux_codes, w, y=y)
    _same_grads(gc, gr)
    for k in ("mse", "aux", "total"):
        assert getattr(lc, k) == pytest.approx(getattr(lr_, k), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "auxk"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_step_topk(be, ref, case, skip, activation, aux):
    x, y, p = _problem(*case, skip, seed=5)
    dead = (np.arange(p.d_sae) % 2 == 0) if aux else None
    (pr, sr, fr, rr), (pc, sc, fcy, rc) = _run_steps(
        (ref, be), "train_step_topk", p, x, y, k=3, activation=activation, dead_mask=dead,
        k_aux=2, aux_coefficient=0.5, **ADAM)
    _same_state(pc, sc, pr, sr)
    np.testing.assert_array_equal(fcy, fr)
    for c, r in zip(rc, rr):
        _same_result(c, r)
        assert c.extra["min_active"] == pytest.approx(r.extra["min_active"], rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pc.W_dec, axis=1), 1.0, rtol=1e-5)


def test_steps_do_not_depend_on_threads(nthreads):
    """Skip-transcoder steps of every family on a team give what one thread
    gives, bit for bit (each grid is fixed by the shape)."""
    be = fastsae.get_backend("cython")
    x, y, p = _problem(70, 24, 13, 90, -0.2, True, seed=6)
    out = []
    for n in (1, nthreads):
        C.set_num_threads(n)
        q = p.copy()
        st = AdamState.zeros_like(q)
        r1 = be.train_step_topk(q, st, x, k=4, lr=1e-3, y=y, dead_mask=np.ones(90, bool),
                                k_aux=3, aux_coefficient=0.5)
        r2 = be.train_step(q, st, x, l1_coefficient=0.1, lr=1e-3, y=y)
        out.append((q.arrays() + st.m.arrays() + st.v.arrays(), (r1.mse, r1.aux, r2.mse)))
    for a, b in zip(out[0][0], out[1][0]):
        assert np.array_equal(a, b)
    assert out[0][1] == out[1][1]


# ---------------------------------------------------------------- JumpReLU family
AMBIG = 1e-4


def _jr_problem(case, skip, bw, seed):
    """A transcoder with thresholds (and window edges) kept away from every
    pre-activation, so float32 rounding cannot flip an entry's class."""
    for s in range(seed, seed + 50):
        x, y, p = _problem(*case, skip, seed=s)
        pre = x.astype(np.float64) @ p.W_enc + p.b_enc   # a transcoder's: uncentered
        rng = np.random.default_rng(s)
        lt = np.log(np.clip(np.quantile(pre, 0.6, axis=0) + 0.01 * rng.random(p.d_sae),
                            0.05, None)).astype(np.float32)
        theta, lo, hi = R.jumprelu_window(lt, bw)
        if min(np.min(np.abs(pre - b[None, :])) for b in (theta, lo, hi)) > AMBIG:
            return x, y, p, lt
    raise AssertionError("no unambiguous problem found")


JR_CASES = [c for c in CASES if abs(c[4]) < 10]   # thresholds put entries on both sides


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", JR_CASES, ids=[i for c, i in zip(CASES, IDS) if c in JR_CASES])
def test_jumprelu_gradients(be, ref, jr_path, case, skip):
    bw = 0.1
    x, y, p, lt = _jr_problem(case, skip, bw, seed=7)
    lc, gc, tc = be.jumprelu_gradients(x, p, lt, bw, 0.7, y=y)
    lr_, gr, tr = ref.jumprelu_gradients(x, p, lt, bw, 0.7, y=y)
    _same_grads(gc, gr)
    _close(tc, tr, "g_log_threshold")
    assert lc.l0_loss == lr_.l0_loss
    assert lc.mse == pytest.approx(lr_.mse, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", JR_CASES, ids=[i for c, i in zip(CASES, IDS) if c in JR_CASES])
def test_train_step_jumprelu(be, ref, jr_path, case, skip):
    bw = 0.1
    x, y, p, lt = _jr_problem(case, skip, bw, seed=8)
    runs = []
    for b in (ref, be):
        q = p.copy()
        st = AdamState.zeros_like(q)
        t, m, v = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
        fc = np.zeros(q.d_sae, np.int64)
        rs = [b.train_step_jumprelu(q, st, x, log_threshold=t, threshold_m=m, threshold_v=v,
                                    bandwidth=bw, l0_coefficient=0.5, fire_counts=fc, y=y,
                                    **ADAM) for _ in range(3)]
        runs.append((q, st, t, m, v, fc, rs))
    (qr, sr, tr, mr, vr, fr, rr), (qc, sc, tc, mc, vc, fcc, rc) = runs
    _same_state(qc, sc, qr, sr)
    _close(tc, tr, "log_threshold")
    _close(mc, mr, "threshold_m")
    _close(vc, vr, "threshold_v", atol_rel=1e-6)
    np.testing.assert_array_equal(fcc, fr)
    for c, r in zip(rc, rr):
        _same_result(c, r, ("mse", "total", "explained_variance"))
        assert c.extra["l0_loss"] == pytest.approx(r.extra["l0_loss"], rel=1e-6)


def test_jumprelu_all_and_none_active(be, ref, jr_path):
    """Thresholds below every pre-activation (all active) and above them
    all (none active, so only the window's L0 term trains the threshold)."""
    x, y, p = _problem(12, 6, 9, 20, 0.0, True, seed=9)
    p.b_enc += np.float32(10.0)   # every pre-activation positive: thresholds can pass them
    pre = x.astype(np.float64) @ p.W_enc + p.b_enc
    assert pre.min() > 2.0
    for theta in (pre.min() - 1.0, pre.max() + 0.05):
        lt = np.full(p.d_sae, np.log(theta), np.float32)
        lc, gc, tc = be.jumprelu_gradients(x, p, lt, 0.2, 0.5, y=y)
        lr_, gr, tr = ref.jumprelu_gradients(x, p, lt, 0.2, 0.5, y=y)
        _same_grads(gc, gr)
        _close(tc, tr, "g_log_threshold")
        assert lc.l0_loss == lr_.l0_loss == (0.5 * p.d_sae if theta < pre.min() else 0.0)


# ---------------------------------------------------------------- Matryoshka family
def _widths(d_sae):
    return np.unique(np.array([max(1, d_sae // 3), max(1, (2 * d_sae) // 3), d_sae]))


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "auxk"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matryoshka_gradients(be, ref, case, skip, aux):
    x, y, p = _problem(*case, skip, seed=10)
    c0 = R.input_centering(p, y)
    widths = _widths(p.d_sae)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, c0, 4)
    aux_codes, w = None, 0.0
    if aux:
        aux_codes, w = R.encode_topk_aux(x, p.W_enc, p.b_enc, c0, np.ones(p.d_sae, bool),
                                         2), 0.3
    lc, gc = be.matryoshka_gradients(x, p, codes, widths, aux_codes, w, y=y)
    lr_, gr = ref.matryoshka_gradients(x, p, codes, widths, aux_codes, w, y=y)
    _same_grads(gc, gr)
    np.testing.assert_allclose(lc.prefix_mse, lr_.prefix_mse, rtol=1e-5, atol=1e-7)
    for k in ("mse", "aux", "total"):
        assert getattr(lc, k) == pytest.approx(getattr(lr_, k), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_step_matryoshka(be, ref, case, skip):
    x, y, p = _problem(*case, skip, seed=11)
    dead = np.arange(p.d_sae) % 3 == 0
    (pr, sr, fr, rr), (pc, sc, fcy, rc) = _run_steps(
        (ref, be), "train_step_matryoshka", p, x, y, k=4, widths=_widths(p.d_sae),
        dead_mask=dead, k_aux=2, aux_coefficient=0.5, **ADAM)
    _same_state(pc, sc, pr, sr)
    np.testing.assert_array_equal(fcy, fr)
    for c, r in zip(rc, rr):
        _same_result(c, r)
        np.testing.assert_allclose(c.extra["prefix_mse"], r.extra["prefix_mse"], rtol=1e-4,
                                   atol=1e-6)


# ---------------------------------------------------------------- finite or loud
def _blow_up_skip(p, st):
    """Adam state whose first moment drives ``W_skip[0, 0]`` past float32's
    range at the next update (the other parameters stay finite)."""
    st.m.W_skip[0, 0] = 3e38   # m / (1 - beta1) overflows


@pytest.mark.parametrize("family", ["relu-sparse", "relu-dense", "topk", "jumprelu",
                                    "matryoshka"])
def test_non_finite_skip_update_is_loud(be, family, monkeypatch):
    x, y, p = _problem(16, 6, 5, 12, 0.0, True, seed=12)
    monkeypatch.setattr(TU, "CYTHON_RELU_DENSE_MIN_DENSITY",
                        0.0 if family == "relu-dense" else 2.0)
    st = AdamState.zeros_like(p)
    _blow_up_skip(p, st)
    kw = dict(lr=1e-3, eps=1e-30, y=y)
    if family.startswith("relu"):
        r = be.train_step(p, st, x, l1_coefficient=0.1, **kw)
    elif family == "topk":
        r = be.train_step_topk(p, st, x, k=3, **kw)
    elif family == "matryoshka":
        r = be.train_step_matryoshka(p, st, x, k=3, widths=np.array([6, 12]), **kw)
    else:
        lt = np.full(p.d_sae, np.log(0.05), np.float32)
        r = be.train_step_jumprelu(p, st, x, log_threshold=lt, threshold_m=np.zeros_like(lt),
                                   threshold_v=np.zeros_like(lt), bandwidth=0.1,
                                   l0_coefficient=0.1, **kw)
    assert not np.isfinite(p.W_skip).all()
    assert all(np.isfinite(getattr(p, k)).all() for k in SAEParams.NAMES)
    assert np.isnan(r.mse) and np.isnan(r.total)
