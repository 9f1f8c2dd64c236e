"""Numba backend, transcoders and skip transcoders (``y`` given): every
gradient and training function against the float64 oracle
(:mod:`fastsae.backends.reference` evaluated on the same float32 inputs).

A transcoder reads ``x [N, d_in]`` uncentered and fits ``y [N, d_out]``
with ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, for a skip
transcoder, ``x @ W_skip.T``. The numba kernels take the target (``y``, or
``y - x @ W_skip.T``) apart from the encoder input and a ``center`` flag,
so the checks here run ``d_out`` below, above and equal to ``d_in`` and 1,
one row, one feature and odd sizes, no and every feature active, the ReLU
and JumpReLU steps on both sides of their density switch, and three
consecutive steps (parameters, Adam moments with ``W_skip``'s, every step
result). ``y=None`` is covered by the backend's existing test files.

Tolerances: float32 against float64 on the same inputs. Gradients within
``2e-5`` of their largest entry (dot products of at most a few hundred
terms: ``K u`` is ~1e-5 at K = 300); after three Adam steps (``eps = 1e-3``
as in tests/test_topk.py, so a gradient entry near 0 does not turn its
rounding into a full ``lr`` step) parameters and moments within ``1e-4`` of
their largest entry; losses within ``1e-4`` relative. Selections (ReLU's
active set, TopK's, JumpReLU's windows) match exactly on these random
inputs: no pre-activation lies within float32 rounding of a decision.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R
import fastsae.backends.numba as NB
from fastsae.backends import tunables as TU
from fastsae.backends.numba import dense as DN
from fastsae.backends.numba import jumprelu as JR

be = fastsae.get_backend("numba")

# (N, d_in, d_out, d_sae): d_out < d_in, > d_in, == d_in and 1; one row, one
# feature, odd sizes; 300 rows span two ReLU encoder row blocks (256) and
# several 16-/64-feature tiles with remainders
SHAPES = [(1, 5, 3, 7), (6, 4, 9, 1), (37, 13, 13, 29), (40, 9, 1, 20), (300, 24, 11, 70),
          (129, 7, 40, 64)]
SHAPE_IDS = [f"{n}x{a}to{b}x{c}" for n, a, b, c in SHAPES]
SKIPS = [False, True]
SKIP_IDS = ["transcoder", "skip"]
# (shape, sparsity) edge cases: nothing / everything active
EDGES = [((37, 13, 6, 29), "none"), ((37, 13, 6, 29), "all"), ((1, 3, 5, 4), "all")]
EDGE_IDS = ["none", "all", "all-1row"]
ADAM = dict(lr=1e-3, eps=1e-3)


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _p64(p: SAEParams) -> SAEParams:
    return SAEParams(*(f64(getattr(p, n)) for n in SAEParams.NAMES), W_skip=f64(p.W_skip))


def _s64(s: AdamState) -> AdamState:
    return AdamState(_p64(s.m), _p64(s.v), s.step)


def _problem(shape, skip, sparsity="mixed", seed=0, unit=True):
    """Random float32 ``(x, y, params)``; ``sparsity`` sets ``b_enc``
    (``"mixed"``: about a third of ReLU codes active)."""
    n, d_in, d_out, d_sae = shape
    rng = np.random.default_rng(seed + 7 * n + 3 * d_out + d_sae)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    y = rng.standard_normal((n, d_out)).astype(np.float32)
    W_enc = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    W_dec = rng.standard_normal((d_sae, d_out)).astype(np.float32)
    if unit:
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_enc = {"mixed": 0.1 * rng.standard_normal(d_sae) - 0.4,
             "none": np.full(d_sae, -100.0), "all": np.full(d_sae, 100.0)}[sparsity]
    b_dec = 0.1 * rng.standard_normal(d_out)
    W_skip = (0.3 * rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)) if skip else None
    p = SAEParams(W_enc, b_enc.astype(np.float32), W_dec, b_dec.astype(np.float32),
                  None if W_skip is None else W_skip.astype(np.float32))
    return x, y, p


def _close(got, want, rtol, what, floor=0.0):
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, what
    scale = max(np.max(np.abs(want)) if want.size else 0.0, floor, 1e-30)
    err = np.max(np.abs(got - want)) if want.size else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: error {err:.3g}, scale {scale:.3g}"


def _dec_floor(codes, x, y_hat, y):
    """The size of ``W_dec``'s gradient before its unit-norm projection,
    ``max |f|.T @ |dL/dy_hat|``: the projected one can cancel to 0 (always
    when ``d_out`` is 1) while its float32 rounding is relative to this."""
    F = np.abs(codes.to_dense() if isinstance(codes, SparseCodes) else f64(codes))
    return float(np.max(F.T @ (2 * np.abs(f64(y_hat) - f64(y)) / x.shape[0]), initial=0.0))


def _check_grads(got: SAEParams, want: SAEParams, rtol=2e-5, dec_floor=0.0):
    assert got.names == want.names
    for name in want.names:
        g = getattr(got, name)
        assert g.dtype == np.float32, name
        _close(g, getattr(want, name), rtol, name, dec_floor if name == "W_dec" else 0.0)


def _check_state(p, s, p_ref, s_ref, rtol=1e-4, projected=True):
    """Parameters and moments against the oracle's. A projected ``W_dec``
    gradient of ``d_out = 1`` is 0 exactly (a unit row has no orthogonal
    direction), so its moments are float32 rounding noise: measured on the
    scale of ``W_enc``'s moments instead."""
    assert p.names == p_ref.names and s.step == s_ref.step
    for name in p_ref.names:
        _close(getattr(p, name), getattr(p_ref, name), rtol, name)
        for part in ("m", "v"):
            want = getattr(getattr(s_ref, part), name)
            floor = 0.0
            if name == "W_dec" and projected and p.d_out == 1:
                floor = np.max(np.abs(getattr(s_ref, part).W_enc))
            _close(getattr(getattr(s, part), name), want, rtol, f"{part}.{name}", floor)


def _check_result(r, rr, parts=("mse", "l1", "total", "l0", "explained_variance", "aux")):
    for part in parts:
        assert getattr(r, part) == pytest.approx(getattr(rr, part), rel=1e-4, abs=1e-7), part
    for key, want in rr.extra.items():
        assert np.allclose(r.extra[key], want, rtol=1e-4, atol=1e-7), key


def _three_steps(step, x, y, p, **kw):
    """Three steps of ``step`` on numba and the oracle; checks every result
    and the final parameters, moments and fire counts."""
    q, st = p.copy(), AdamState.zeros_like(p)
    q64, st64 = _p64(p), _s64(AdamState.zeros_like(p))
    fc, fc64 = np.zeros(p.d_sae, np.int64), np.zeros(p.d_sae, np.int64)
    for _ in range(3):
        r = getattr(be, step)(q, st, x, fire_counts=fc, y=y, **kw)
        rr = getattr(R, step)(q64, st64, f64(x), fire_counts=fc64, y=f64(y), **kw)
        _check_result(r, rr)
    _check_state(q, st, q64, st64, projected=kw.get("decoder_norm") != "weighted_l1")
    np.testing.assert_array_equal(fc, fc64)
    return q


def _force(request, monkeypatch, tunable, module, kernels):
    """Force a density switch (``tunable``, read at call time) to the side
    ``request.param`` and spy that the forced side runs (``kernels`` of
    ``module`` are the dense side's)."""
    monkeypatch.setattr(TU, tunable, 0.0 if request.param == "dense" else 2.0)
    calls = []
    for name in kernels:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real: calls.append(1) or _r(*a))
    yield request.param
    assert bool(calls) == (request.param == "dense")


@pytest.fixture(params=["sparse", "dense"])
def relu_path(request, monkeypatch):
    yield from _force(request, monkeypatch, "NUMBA_RELU_DENSE_MIN_DENSITY", DN,
                      ("step_core", "relu_gradients"))


@pytest.fixture(params=["sparse", "dense"])
def jr_path(request, monkeypatch):
    yield from _force(request, monkeypatch, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", JR,
                      ("dense_step_core", "dense_gradients"))


def _cases():
    return [pytest.param(s, sk, "mixed", id=f"{i}-{k}")
            for s, i in zip(SHAPES, SHAPE_IDS) for sk, k in zip(SKIPS, SKIP_IDS)] + \
           [pytest.param(s, sk, sp, id=f"{i}-{k}")
            for (s, sp), i in zip(EDGES, EDGE_IDS) for sk, k in zip(SKIPS, SKIP_IDS)]


# ---------------------------------------------------------------- ReLU
@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
def test_gradients(relu_path, shape, skip, sparsity, mode):
    x, y, p = _problem(shape, skip, sparsity, unit=False)
    codes = R.encode_relu_sparse(x, p.W_enc, p.b_enc, R.input_centering(p, y))
    x_hat = R.reconstruct(codes, p, x).astype(np.float32)
    got_l, got_g = be.gradients(x, p, codes, x_hat, 0.3, mode, y=y)
    want_l, want_g = R.gradients(f64(x), _p64(p), codes.to_dense().astype(np.float64),
                                 f64(x_hat), 0.3, mode, y=f64(y))
    _check_grads(got_g, want_g, dec_floor=_dec_floor(codes, x, x_hat, y))
    for part in ("mse", "l1", "total"):
        assert getattr(got_l, part) == pytest.approx(getattr(want_l, part), rel=1e-5,
                                                     abs=1e-9), part


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
def test_train_step(relu_path, shape, skip, sparsity, mode):
    x, y, p = _problem(shape, skip, sparsity, unit=False)
    _three_steps("train_step", x, y, p, l1_coefficient=0.3, decoder_norm=mode, **ADAM)


# ---------------------------------------------------------------- TopK
def _dead(d_sae, seed=1):
    return np.random.default_rng(100 + seed + d_sae).random(d_sae) < 0.4


def _aux(x, y, p, dead, k_aux=3):
    codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, R.input_centering(p, y), dead, k_aux)
    return codes, R.aux_scale(dead, k_aux, 0.5)


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("auxk", [False, True])
def test_topk_gradients(shape, skip, sparsity, auxk):
    x, y, p = _problem(shape, skip, sparsity)
    codes = R.encode_topk(x, p.W_enc, p.b_enc, R.input_centering(p, y), 4)
    x_hat = R.reconstruct(codes, p, x).astype(np.float32)
    aux, w = _aux(x, y, p, _dead(p.d_sae)) if auxk else (None, 0.0)
    got_l, got_g = be.topk_gradients(x, p, codes, x_hat, aux, w, y=y)
    want_l, want_g = R.topk_gradients(f64(x), _p64(p), codes.to_dense().astype(np.float64),
                                      f64(x_hat), aux, w, y=f64(y))
    floor = _dec_floor(codes, x, x_hat, y)
    if aux is not None:  # AuxK's e_hat = aux_codes @ W_dec fits y - y_hat
        e = R.decode(aux, p.W_dec, np.zeros(p.d_out, np.float32)) - (y - x_hat)
        floor += w * _dec_floor(aux, x, e, 0.0)
    _check_grads(got_g, want_g, dec_floor=floor)
    for part in ("mse", "total", "aux"):
        assert getattr(got_l, part) == pytest.approx(getattr(want_l, part), rel=1e-5,
                                                     abs=1e-9), part


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("auxk", [False, True])
def test_train_step_topk(shape, skip, sparsity, activation, auxk):
    x, y, p = _problem(shape, skip, sparsity)
    kw = dict(dead_mask=_dead(p.d_sae), k_aux=3, aux_coefficient=0.5) if auxk else {}
    k = p.d_sae if sparsity == "all" else 4  # "all": every feature selected
    q = _three_steps("train_step_topk", x, y, p, k=k, activation=activation, **kw, **ADAM)
    np.testing.assert_allclose(np.linalg.norm(q.W_dec, axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- JumpReLU
def _log_threshold(d_sae, seed=2):
    rng = np.random.default_rng(seed + d_sae)
    theta = 0.05 + 0.2 * rng.random(d_sae)
    return np.log(theta).astype(np.float32)


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
def test_jumprelu_gradients(jr_path, shape, skip, sparsity):
    x, y, p = _problem(shape, skip, sparsity)
    lt = _log_threshold(p.d_sae)
    got_l, got_g, got_lt = be.jumprelu_gradients(x, p, lt, 0.1, 0.2, y=y)
    want_l, want_g, want_lt = R.jumprelu_gradients(f64(x), _p64(p), f64(lt), 0.1, 0.2,
                                                   y=f64(y))
    pre = f64(x) @ f64(p.W_enc) + f64(p.b_enc)
    f = np.where(pre > np.exp(f64(lt)), pre, 0.0)
    _check_grads(got_g, want_g, dec_floor=_dec_floor(f, x, R.reconstruct(f, _p64(p), f64(x)),
                                                     y))
    _close(got_lt, want_lt, 2e-5, "log_threshold")
    assert got_l.l0_loss == pytest.approx(want_l.l0_loss, rel=1e-12)
    for part in ("mse", "total"):
        assert getattr(got_l, part) == pytest.approx(getattr(want_l, part), rel=1e-5,
                                                     abs=1e-9), part


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
def test_train_step_jumprelu(jr_path, shape, skip, sparsity):
    x, y, p = _problem(shape, skip, sparsity)
    lt = _log_threshold(p.d_sae)
    q, st = p.copy(), AdamState.zeros_like(p)
    q64, st64 = _p64(p), _s64(AdamState.zeros_like(p))
    th = [lt.copy(), np.zeros_like(lt), np.zeros_like(lt)]
    th64 = [f64(lt), np.zeros(p.d_sae), np.zeros(p.d_sae)]
    fc, fc64 = np.zeros(p.d_sae, np.int64), np.zeros(p.d_sae, np.int64)
    kw = dict(bandwidth=0.1, l0_coefficient=0.2, **ADAM)
    for _ in range(3):
        r = be.train_step_jumprelu(q, st, x, log_threshold=th[0], threshold_m=th[1],
                                   threshold_v=th[2], fire_counts=fc, y=y, **kw)
        rr = R.train_step_jumprelu(q64, st64, f64(x), log_threshold=th64[0],
                                   threshold_m=th64[1], threshold_v=th64[2], fire_counts=fc64,
                                   y=f64(y), **kw)
        _check_result(r, rr)
    _check_state(q, st, q64, st64)
    for a, b, name in zip(th, th64, ("log_threshold", "threshold_m", "threshold_v")):
        _close(a, b, 1e-4, name)
    np.testing.assert_array_equal(fc, fc64)


# ---------------------------------------------------------------- Matryoshka
def _widths(d_sae):
    w = sorted({max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    return np.array(w, np.int64)


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("auxk", [False, True])
def test_matryoshka_gradients(shape, skip, sparsity, auxk):
    x, y, p = _problem(shape, skip, sparsity)
    widths = _widths(p.d_sae)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, R.input_centering(p, y), 4)
    aux, w = _aux(x, y, p, _dead(p.d_sae)) if auxk else (None, 0.0)
    got_l, got_g = be.matryoshka_gradients(x, p, codes, widths, aux, w, y=y)
    want_l, want_g = R.matryoshka_gradients(f64(x), _p64(p),
                                            codes.to_dense().astype(np.float64), widths, aux,
                                            w, y=f64(y))
    floor = len(widths) * _dec_floor(codes, x, R.reconstruct(codes, p, x), y)
    if aux is not None:
        e = R.decode(aux, p.W_dec, np.zeros(p.d_out, np.float32)) - (
            y - R.reconstruct(codes, p, x))
        floor += w * _dec_floor(aux, x, e, 0.0)
    _check_grads(got_g, want_g, dec_floor=floor)
    np.testing.assert_allclose(got_l.prefix_mse, want_l.prefix_mse, rtol=1e-5, atol=1e-9)
    for part in ("mse", "total", "aux"):
        assert getattr(got_l, part) == pytest.approx(getattr(want_l, part), rel=1e-5,
                                                     abs=1e-9), part


@pytest.mark.parametrize("shape,skip,sparsity", _cases())
@pytest.mark.parametrize("auxk", [False, True])
def test_train_step_matryoshka(shape, skip, sparsity, auxk):
    x, y, p = _problem(shape, skip, sparsity)
    kw = dict(dead_mask=_dead(p.d_sae), k_aux=3, aux_coefficient=0.5) if auxk else {}
    k = p.d_sae if sparsity == "all" else 4
    _three_steps("train_step_matryoshka", x, y, p, k=k, widths=_widths(p.d_sae), **kw, **ADAM)


# ---------------------------------------------------------------- rules
def test_skip_gradient_is_one_gemm():
    """``W_skip``'s gradient is ``dL/dy_hat.T @ x`` whatever the family:
    the same array from the ReLU (unit_norm, no L1), TopK and one-width
    Matryoshka gradients on the same codes."""
    x, y, p = _problem((37, 13, 6, 29), True)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, R.input_centering(p, y), 4)
    x_hat = R.reconstruct(codes, p, x).astype(np.float32)
    g_relu = be.gradients(x, p, codes, x_hat, 0.0, "unit_norm", y=y)[1].W_skip
    g_topk = be.topk_gradients(x, p, codes, x_hat, y=y)[1].W_skip
    g_mat = be.matryoshka_gradients(x, p, codes, np.array([p.d_sae]), y=y)[1].W_skip
    want = (2.0 * (f64(x_hat) - f64(y)) / x.shape[0]).T @ f64(x)
    for name, g in (("relu", g_relu), ("topk", g_topk), ("matryoshka", g_mat)):
        assert g.dtype == np.float32 and g.shape == (p.d_out, p.d_in), name
        _close(g, want, 2e-5, name)


@pytest.mark.parametrize("step", ["train_step", "train_step_topk", "train_step_jumprelu",
                                  "train_step_matryoshka"])
@pytest.mark.parametrize("dense", [False, True])
def test_non_finite_skip_makes_the_step_loud(step, dense, monkeypatch):
    """A W_skip that the update leaves non-finite makes the step's losses
    NaN, as for the other parameters: one NaN first moment of W_skip (the
    face called directly: the front would refuse it) spoils W_skip alone."""
    for name in ("NUMBA_RELU_DENSE_MIN_DENSITY", "NUMBA_JUMPRELU_DENSE_MIN_DENSITY"):
        monkeypatch.setattr(TU, name, 0.0 if dense else 2.0)
    x, y, p = _problem((37, 13, 6, 29), True)
    st = AdamState.zeros_like(p)
    st.m.W_skip[2, 3] = np.nan
    kw = {"train_step": dict(l1_coefficient=0.1),
          "train_step_topk": dict(k=4),
          "train_step_jumprelu": dict(log_threshold=_log_threshold(29),
                                      threshold_m=np.zeros(29, np.float32),
                                      threshold_v=np.zeros(29, np.float32), bandwidth=0.1,
                                      l0_coefficient=0.1),
          "train_step_matryoshka": dict(k=4, widths=_widths(29))}[step]
    r = getattr(NB, step)(p, st, x, lr=1e-3, y=y, **kw)
    assert np.isnan(p.W_skip[2, 3]) and np.isfinite(np.delete(p.W_skip.ravel(), 2 * 13 + 3)).all()
    assert all(np.isfinite(getattr(p, n)).all() for n in SAEParams.NAMES)
    assert np.isnan(r.mse) and np.isnan(r.total) and np.isnan(r.explained_variance)


def test_transcoder_without_skip_has_no_skip_gradient():
    x, y, p = _problem((6, 4, 9, 5), False)
    codes = R.encode_relu_sparse(x, p.W_enc, p.b_enc, R.input_centering(p, y))
    x_hat = R.reconstruct(codes, p, x).astype(np.float32)
    g = be.gradients(x, p, codes, x_hat, 0.1, "weighted_l1", y=y)[1]
    assert g.W_skip is None and g.names == SAEParams.NAMES


@pytest.mark.parametrize("dense", [False, True])
def test_independent_of_thread_count(dense, monkeypatch):
    """The skip kernels' fixed block grids: one thread and every thread give
    the same bits (ReLU and TopK skip-transcoder steps, and W_skip's
    gradient), at a shape spanning several skip blocks."""
    monkeypatch.setattr(TU, "NUMBA_RELU_DENSE_MIN_DENSITY", 0.0 if dense else 2.0)
    x, y, p = _problem((300, 24, 40, 70), True)
    out = []
    top = numba.config.NUMBA_NUM_THREADS
    old = numba.get_num_threads()
    try:
        for nt in (1, top):
            be.set_num_threads(nt)
            q, st = p.copy(), AdamState.zeros_like(p)
            be.train_step(q, st, x, l1_coefficient=0.2, y=y, **ADAM)
            be.train_step_topk(q, st, x, k=5, y=y, **ADAM)
            codes = R.encode_topk(x, q.W_enc, q.b_enc, R.input_centering(q, y), 5)
            g = be.topk_gradients(x, q, codes, R.reconstruct(codes, q, x), y=y)[1]
            out.append([*q.arrays(), *st.m.arrays(), *st.v.arrays(), *g.arrays()])
    finally:
        numba.set_num_threads(old)
    for a, b in zip(*out):
        assert a.tobytes() == b.tobytes()
