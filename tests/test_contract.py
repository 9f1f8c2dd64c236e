"""The kernel contract, checked for every usable backend against the oracle.

The oracle is the NumPy reference evaluated in float64 on the same float32
inputs the backend gets; tolerances are the float32 error bounds from
``conftest.py``. Each check runs several times on the same inputs: a CPU
backend must give bitwise-identical answers every time (a race would not),
and every repetition must match the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R

from conftest import (U32, assert_codes_match, dot_bound, encode_oracle, f64, make_params,
                      make_x, shapes_for)

REPEATS = 3
SPARSITIES = ["mixed", "none", "all"]


def _host(backend, a):
    return backend.to_numpy(a)


def _case(backend, shape_idx, sparsity, seed=0):
    shapes = shapes_for(backend.name)
    if shape_idx >= len(shapes):
        pytest.skip("fewer shapes for this backend")
    n, d_in, d_sae = shapes[shape_idx]
    rng = np.random.default_rng(1000 * shape_idx + 7 * SPARSITIES.index(sparsity) + seed)
    p = make_params(rng, d_in, d_sae, sparsity)
    x = make_x(rng, n, d_in)
    if sparsity == "mixed" and n > 2:
        x[1] = p.b_dec  # pre = b_enc < 0 (mixed b_enc is about -0.4 +- 0.1): no active feature
    return x, p


def _assert_repeatable(backend, results):
    first = results[0]
    for r in results[1:]:
        assert np.array_equal(first, r), "result changed between identical calls (race?)"


def _check_canonical(codes: SparseCodes, n, d_sae):
    codes = codes.to_host()
    assert codes.shape == (n, d_sae)
    assert codes.indptr.dtype == np.int64 and codes.indptr.shape == (n + 1,)
    assert codes.indices.dtype == np.int32 and codes.values.dtype == np.float32
    assert codes.indptr[0] == 0 and codes.indptr[-1] == codes.indices.size == codes.values.size
    for i in range(n):
        row = codes.indices[codes.indptr[i]:codes.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), "indices not strictly increasing within a row"
    assert np.all(codes.values != 0), "stored zero in canonical codes"


SHAPE_IDS = list(range(9))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_encode_relu(backend, shape_idx, sparsity):
    x, p = _case(backend, shape_idx, sparsity)
    pre, bound = encode_oracle(x, p)
    outs = []
    for _ in range(REPEATS):
        f = _host(backend, backend.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))
        assert f.dtype == np.float32 and f.shape == pre.shape
        assert_codes_match(f, pre, bound, "encode_relu")
        outs.append(f)
    _assert_repeatable(backend, outs)
    if sparsity == "none":
        assert not np.any(outs[0])
    if sparsity == "all":
        assert np.all(outs[0] > 0)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_encode_relu_sparse(backend, shape_idx, sparsity):
    x, p = _case(backend, shape_idx, sparsity)
    pre, bound = encode_oracle(x, p)
    outs = []
    for _ in range(REPEATS):
        codes = backend.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
        assert isinstance(codes, SparseCodes)
        _check_canonical(codes, *pre.shape)
        dense = codes.to_dense()
        assert_codes_match(dense, pre, bound, "encode_relu_sparse")
        outs.append(dense)
    _assert_repeatable(backend, outs)
    if sparsity == "none":
        assert codes.nnz == 0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_decode(backend, shape_idx, sparsity, sparse):
    x, p = _case(backend, shape_idx, sparsity)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    codes = SparseCodes.from_dense(f) if sparse else f
    ref = f64(f) @ f64(p.W_dec) + f64(p.b_dec)
    bound = dot_bound(np.abs(f64(f)), np.abs(f64(p.W_dec)), f.shape[1], np.abs(f64(p.b_dec)))
    outs = []
    for _ in range(REPEATS):
        xh = _host(backend, backend.decode(codes, p.W_dec, p.b_dec))
        assert xh.dtype == np.float32 and xh.shape == x.shape
        assert np.all(np.abs(f64(xh) - ref) <= bound)
        outs.append(xh)
    _assert_repeatable(backend, outs)


@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_decoder_column_norms(backend, shape_idx):
    _, p = _case(backend, shape_idx, "mixed")
    W = p.W_dec.copy()
    W[0] = 0.0  # a dead feature with a zero decoder row
    ref = np.sqrt(np.sum(f64(W) ** 2, axis=1))
    for _ in range(REPEATS):
        got = _host(backend, backend.decoder_column_norms(W))
        assert got.dtype == np.float32 and got.shape == (W.shape[0],)
        # sum of d_in squares, then a square root (relative error halves)
        assert np.all(np.abs(f64(got) - ref) <= (W.shape[1] + 2) * U32 * ref + 1e-30)
    assert got[0] == 0.0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_l1_subgradient(backend, shape_idx, sparsity, sparse):
    x, p = _case(backend, shape_idx, sparsity)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    norms = R.decoder_column_norms(p.W_dec).astype(np.float32)
    coef = 0.37
    ref = np.where(f > 0, coef * f64(norms)[None, :], 0.0)
    codes = SparseCodes.from_dense(f) if sparse else f
    got = backend.l1_subgradient(codes, norms, coef)
    if sparse:
        assert isinstance(got, SparseCodes)
        got = got.to_host()
        assert np.array_equal(got.indptr, codes.indptr)
        assert np.array_equal(got.indices, codes.indices)
        got = got.to_dense()
    got = _host(backend, got)
    assert got.dtype == np.float32 and got.shape == f.shape
    assert np.all(np.abs(f64(got) - ref) <= 2 * U32 * ref + 1e-30)
    assert np.all((got != 0) == (f > 0))


def _grad_tolerance(ref: np.ndarray, k: int, scale: float = 0.0) -> float:
    """Each gradient entry is a sum of at most ``k`` float32 products (times
    a few elementwise factors): allow ``8 k u`` of the largest magnitude
    (or of ``scale``, the size of the terms before a cancellation such as
    the unit-norm projection)."""
    return 8 * (k + 4) * U32 * max(float(np.max(np.abs(ref))), scale, 1e-30)


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape_idx", SHAPE_IDS)
def test_gradients(backend, shape_idx, sparsity, sparse, decoder_norm):
    x, p = _case(backend, shape_idx, sparsity)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    x_hat = R.decode(f, p.W_dec, p.b_dec).astype(np.float32)
    codes = SparseCodes.from_dense(f) if sparse else f
    coef = 0.3
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    ref_loss, ref_g = R.gradients(f64(x), p64, f64(f), f64(x_hat), coef, decoder_norm)
    n, d_in = x.shape
    d_sae = f.shape[1]
    k = max(n, d_in, d_sae) * 2
    # W_dec's gradient before the unit-norm projection removes its parallel part
    raw_W_dec = np.max(np.abs(f64(f).T @ (2 * (f64(x_hat) - f64(x)) / n)), initial=0.0)
    prev = None
    for _ in range(REPEATS):
        loss, g = backend.gradients(x, p, codes, x_hat, coef, decoder_norm)
        g = _host(backend, g)
        for name in SAEParams.NAMES:
            got, want = getattr(g, name), getattr(ref_g, name)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            scale = raw_W_dec if name == "W_dec" else 0.0
            assert np.max(np.abs(f64(got) - want)) <= _grad_tolerance(want, k, scale), name
        for part in ("mse", "l1", "total"):
            want = getattr(ref_loss, part)
            assert abs(getattr(loss, part) - want) <= 8 * k * U32 * max(abs(want), 1e-30) + 1e-12
        cur = np.concatenate([a.ravel() for a in g.arrays()])
        if prev is not None:
            _assert_repeatable(backend, [prev, cur])
        prev = cur


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape_idx", [0, 2, 5, 6, 7])
def test_train_step(backend, shape_idx, decoder_norm):
    """Three full steps match the reference run in float64.

    Adam's eps is 1e-3 here so the update ``g / (sqrt(v) + eps)`` is
    Lipschitz in g with constant 1/eps: float32 gradient error then moves
    the parameters by at most lr * err / eps (with the default 1e-8 a
    gradient that is 0 up to rounding could move a weight by up to lr).
    """
    x, p = _case(backend, shape_idx, "mixed")
    if decoder_norm == "unit_norm":
        R.normalize_decoder_rows(p.W_dec)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    s64 = AdamState.zeros_like(p64)
    s64 = AdamState(SAEParams(*(f64(a) for a in s64.m.arrays())),
                    SAEParams(*(f64(a) for a in s64.v.arrays())), 0)
    kw = dict(l1_coefficient=0.2, lr=1e-3, decoder_norm=decoder_norm, beta1=0.9, beta2=0.999,
              eps=1e-3)
    be_p = backend.to_backend(p.copy())
    be_s = backend.to_backend(AdamState.zeros_like(p))
    counts_ref = np.zeros(p.d_sae, dtype=np.int64)
    counts = backend.to_backend(np.zeros(p.d_sae, dtype=np.int64))
    for step in range(3):
        ref = R.train_step(p64, s64, f64(x), fire_counts=counts_ref, **kw)
        got = backend.train_step(be_p, be_s, x, fire_counts=counts, **kw)
        assert abs(got.mse - ref.mse) <= 1e-4 * max(ref.mse, 1e-6) + 1e-6, step
        assert abs(got.l1 - ref.l1) <= 1e-4 * max(ref.l1, 1e-6) + 1e-6, step
        assert abs(got.total - ref.total) <= 1e-4 * max(ref.total, 1e-6) + 1e-6, step
        assert abs(got.l0 - ref.l0) <= 1.0 / x.shape[0] + 1e-9, step
        assert abs(got.explained_variance - ref.explained_variance) <= 1e-3, step
    hp = backend.to_numpy(be_p)
    hs = backend.to_numpy(be_s)
    assert hs.step == 3
    for name in SAEParams.NAMES:
        got, want = getattr(hp, name), getattr(p64, name)
        assert got.dtype == np.float32
        # parameters move by at most 3 * lr; float32 and gradient error are far below 1e-5
        assert np.max(np.abs(f64(got) - want)) <= 1e-5 + 1e-5 * np.max(np.abs(want)), name
    assert np.array_equal(backend.to_numpy(counts), counts_ref)
    if decoder_norm == "unit_norm":
        norms = np.linalg.norm(f64(hp.W_dec), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5)
