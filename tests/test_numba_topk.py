"""Numba-specific tests of the TopK family: exact agreement with the
reference on data built so that float32 rounding cannot change the selection
(integer-valued pre-activations, exact in float32, with deliberate ties), edge
cases, the fused AuxK path, BatchTopK's candidate-buffer retry, and
determinism across repeats and thread counts. (tests/test_topk.py compares
with the float64 oracle on random data, up to float32 near-ties.)"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams
from fastsae import reference as R

be = fastsae.get_backend("numba")


def _int_problem(rng, n, d_in, d_sae, lo=-6, hi=7):
    """Small-integer x and W_enc: every product and sum is exact in float32,
    so the backend's pre-activations equal the reference's bit for bit and
    the selection (ties included) must match exactly."""
    x = rng.integers(-2, 3, (n, d_in)).astype(np.float32)
    W_enc = rng.integers(-2, 3, (d_in, d_sae)).astype(np.float32)
    b_enc = rng.integers(lo, hi, d_sae).astype(np.float32)
    b_dec = np.zeros(d_in, np.float32)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return x, SAEParams(W_enc, b_enc, W_dec, b_dec)


def _same(a, b):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.values, b.values)


# the last shape spans several tiles of the encoders' block grid
# (NUMBA_TOPK_ROW_BLOCK x NUMBA_TOPK_COL_BLOCK = 1024 x 2048), remainders included
SHAPES = [(1, 3, 1), (1, 4, 7), (5, 3, 9), (37, 5, 70), (300, 4, 33), (513, 6, 130),
          (1030, 4, 2100)]


@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 32, 10_000])
def test_topk_exact_with_ties(n, d_in, d_sae, k):
    rng = np.random.default_rng(n * 7 + d_sae + k)
    x, p = _int_problem(rng, n, d_in, d_sae)
    args = (x, p.W_enc, p.b_enc, p.b_dec)
    _same(be.encode_topk(*args, k), R.encode_topk(*args, k))
    _same(be.encode_batchtopk(*args, k), R.encode_batchtopk(*args, k))
    thr = rng.integers(-2, 3, d_sae).astype(np.float32)
    _same(be.encode_jumprelu(*args, thr), R.encode_jumprelu(*args, thr))


def test_rows_with_few_or_no_positives():
    rng = np.random.default_rng(3)
    x, p = _int_problem(rng, 40, 3, 50, lo=-30, hi=-5)  # mostly negative
    x[5] = 0  # a row with every pre-activation = b_enc < 0
    args = (x, p.W_enc, p.b_enc, p.b_dec)
    for k in (1, 8, 50):
        got = be.encode_topk(*args, k)
        _same(got, R.encode_topk(*args, k))
        assert got.indptr[6] == got.indptr[5]
        _same(be.encode_batchtopk(*args, k), R.encode_batchtopk(*args, k))


def test_batchtopk_all_ties_forces_full_buffer():
    """All pre-activations equal and positive: the candidate buffers are
    truncated at the threshold, so the kernel must grow them to d_sae; the
    selection is the first N*k entries in row-major order."""
    n, d_in, d_sae, k = 9, 2, 300, 5
    x = np.zeros((n, d_in), np.float32)
    W = np.zeros((d_in, d_sae), np.float32)
    b = np.ones(d_sae, np.float32)
    args = (x, W, b, np.zeros(d_in, np.float32))
    got = be.encode_batchtopk(*args, k)
    _same(got, R.encode_batchtopk(*args, k))
    assert got.indptr[1] == n * k  # all in row 0 (lower rows first)


def test_batchtopk_skewed_rows():
    """A few rows hold far more than k of the batch's top entries."""
    rng = np.random.default_rng(5)
    x, p = _int_problem(rng, 64, 4, 200)
    x[:3] *= 4
    args = (x, p.W_enc, p.b_enc, p.b_dec)
    for k in (1, 4, 16):
        _same(be.encode_batchtopk(*args, k), R.encode_batchtopk(*args, k))


def _step(backend, p, x, **kw):
    q = p.copy()
    st = AdamState.zeros_like(p)
    counts = np.zeros(p.d_sae, np.int64)
    r = backend.train_step_topk(q, st, x, lr=1e-3, fire_counts=counts, **kw)
    return q, st, counts, r


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("dead", ["none", "some", "all"])
@pytest.mark.parametrize("k_aux", [1, 4, 1000])
def test_train_step_auxk_masks(activation, dead, k_aux):
    rng = np.random.default_rng(11)
    n, d_in, d_sae = 33, 6, 40
    x, p = _int_problem(rng, n, d_in, d_sae)
    p.W_enc *= np.float32(0.25)
    p.b_dec[:] = 0.5
    mask = np.zeros(d_sae, bool)
    if dead == "some":
        mask[::3] = True
    elif dead == "all":
        mask[:] = True
    kw = dict(k=4, activation=activation, dead_mask=mask, k_aux=k_aux, aux_coefficient=0.5)
    q, st, counts, r = _step(be, p, x, **kw)
    qr, sr, cr, rr = _step(R, p, x, **kw)
    np.testing.assert_array_equal(counts, cr)
    assert r.l0 == rr.l0
    assert r.extra["min_active"] == pytest.approx(rr.extra["min_active"], rel=1e-6)
    for a, b in ((r.mse, rr.mse), (r.aux, rr.aux), (r.total, rr.total)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    if dead == "none":
        assert r.aux == 0.0
    for name in SAEParams.NAMES:
        np.testing.assert_allclose(getattr(q, name), getattr(qr, name), rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(getattr(st.v, name), getattr(sr.v, name), rtol=1e-3,
                                   atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(q.W_dec, axis=1), 1.0, rtol=1e-5)


def test_train_step_auxk_across_block_grid():
    """TopK + AuxK step at a size spanning several encoder tiles (the
    selection state carries across column blocks) and weight-pass tiles."""
    rng = np.random.default_rng(21)
    n, d_in, d_sae = 1030, 5, 2100
    x, p = _int_problem(rng, n, d_in, d_sae)
    p.W_enc *= np.float32(0.25)
    mask = np.zeros(d_sae, bool)
    mask[::3] = True
    kw = dict(k=6, activation="topk", dead_mask=mask, k_aux=40, aux_coefficient=0.5)
    q, st, counts, r = _step(be, p, x, **kw)
    qr, sr, cr, rr = _step(R, p, x, **kw)
    np.testing.assert_array_equal(counts, cr)
    assert r.l0 == rr.l0
    for a, b in ((r.mse, rr.mse), (r.aux, rr.aux), (r.total, rr.total),
                 (r.explained_variance, rr.explained_variance)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    for name in SAEParams.NAMES:
        np.testing.assert_allclose(getattr(q, name), getattr(qr, name), rtol=1e-4, atol=2e-5)


def test_topk_gradients_aux_matches_reference():
    rng = np.random.default_rng(2)
    x, p = _int_problem(rng, 20, 5, 30)
    mask = np.zeros(30, bool)
    mask[1::2] = True
    codes = R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    aux = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, mask, 4)
    x_hat = R.decode(codes, p.W_dec, p.b_dec)
    lg, gg = be.topk_gradients(x, p, codes, x_hat, aux, 0.3)
    lr_, gr = R.topk_gradients(x, p, codes, x_hat, aux, 0.3)
    assert lg.aux == pytest.approx(lr_.aux, rel=1e-5)
    assert lg.total == pytest.approx(lr_.total, rel=1e-5)
    for name in SAEParams.NAMES:
        np.testing.assert_allclose(getattr(gg, name), getattr(gr, name), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_deterministic_across_repeats_and_threads(activation):
    rng = np.random.default_rng(9)
    n, d_in, d_sae = 2500, 24, 4200  # several 1024 x 2048 encoder tiles, with remainders
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    W = rng.standard_normal((d_in, d_sae)).astype(np.float32) / 5
    W_dec = np.ascontiguousarray(W.T) / np.linalg.norm(W.T, axis=1, keepdims=True)
    p = SAEParams(W, np.full(d_sae, -0.5, np.float32), W_dec, np.zeros(d_in, np.float32))
    mask = np.zeros(d_sae, bool)
    mask[::5] = True
    enc = be.encode_topk if activation == "topk" else be.encode_batchtopk
    outs = []
    old = numba.get_num_threads()
    try:
        for t in sorted({1, old}):
            numba.set_num_threads(t)
            for _ in range(3):
                c = enc(x, p.W_enc, p.b_enc, p.b_dec, 7)
                q, st, counts, r = _step(be, p, x, k=7, activation=activation,
                                         dead_mask=mask, k_aux=16, aux_coefficient=0.1)
                outs.append((c, q, counts, r.total))
    finally:
        numba.set_num_threads(old)
    c0, q0, n0, t0 = outs[0]
    for c, q, counts, t in outs[1:]:
        _same(c, c0)
        for name in SAEParams.NAMES:
            np.testing.assert_array_equal(getattr(q, name), getattr(q0, name))
        np.testing.assert_array_equal(counts, n0)
        assert t == t0
