"""SparseAutoencoder: initialization, encode/decode against the reference, errors.

Tolerances: float32 dot products of d_in (encode) or d_sae (decode) terms
with O(1) operands; ``atol = 1e-4`` covers ``K * 2^-24 * sum|terms|`` for
these sizes with a wide margin. Sparse patterns must match exactly except
where the float64 pre-activation is within 1e-5 of 0.
"""

import numpy as np
import pytest
import scipy.sparse as sp

import fastsae
from fastsae import SparseAutoencoder
from fastsae import reference as R
from fastsae.model import geometric_median


def _trained_like(rng, d_in=24, d_sae=70, backend=None):
    sae = SparseAutoencoder(d_in, d_sae, backend=backend, seed=1)
    sae.params.b_enc[:] = rng.normal(-0.05, 0.05, d_sae).astype(np.float32)
    sae.params.b_dec[:] = rng.normal(0, 0.1, d_in).astype(np.float32)
    sae.params.W_enc[:] = rng.normal(size=(d_in, d_sae)).astype(np.float32) / np.sqrt(d_in)
    return sae


def test_initialization_follows_april_update():
    sae = SparseAutoencoder(32, 100, seed=4)
    norms = np.linalg.norm(sae.W_dec, axis=1)
    np.testing.assert_allclose(norms, 0.1, rtol=1e-5)
    np.testing.assert_array_equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    for a in sae.params.arrays():
        assert a.dtype == np.float32 and a.flags.c_contiguous
    assert sae.W_enc.shape == (32, 100) and sae.W_dec.shape == (100, 32)
    # random directions: not all alike, seeded
    assert np.abs(np.corrcoef(sae.W_dec)[np.triu_indices(100, 1)]).mean() < 0.3
    np.testing.assert_array_equal(SparseAutoencoder(32, 100, seed=4).W_dec, sae.W_dec)
    assert not np.array_equal(SparseAutoencoder(32, 100, seed=5).W_dec, sae.W_dec)


def test_unit_norm_initialization():
    sae = SparseAutoencoder(8, 20, decoder_norm="unit_norm")
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sae.W_enc, 0.1 * sae.W_dec.T, rtol=1e-5)


@pytest.mark.parametrize("args, err", [
    ((0, 4), ValueError), ((4, 0), ValueError), ((4.5, 4), TypeError),
])
def test_bad_sizes(args, err):
    with pytest.raises(err):
        SparseAutoencoder(*args)


def test_bad_decoder_norm():
    with pytest.raises(ValueError, match="decoder_norm"):
        SparseAutoencoder(4, 4, decoder_norm="l2")


def test_encode_decode_match_reference(backend):
    rng = np.random.default_rng(0)
    sae = _trained_like(rng, backend=backend)
    x = rng.normal(size=(37, 24)).astype(np.float32)
    p = sae.params
    pre = R.pre_activations(x.astype(np.float64), p.W_enc, p.b_enc, p.b_dec)
    f_ref = np.maximum(pre, 0)
    f = sae.encode(x)
    assert f.shape == (37, 70) and f.dtype == np.float32
    near = np.abs(pre) < 1e-5
    assert np.array_equal((f > 0) | near, (f_ref > 0) | near)
    np.testing.assert_allclose(f, f_ref, atol=1e-4)
    codes = sae.encode(x, sparse=True)
    assert isinstance(codes, fastsae.SparseCodes)
    np.testing.assert_array_equal(codes.to_dense(), f)
    assert isinstance(codes.to_scipy(), sp.csr_array)
    x_hat_ref = f_ref @ p.W_dec.astype(np.float64) + p.b_dec
    np.testing.assert_allclose(sae.decode(f), x_hat_ref, atol=1e-4)
    np.testing.assert_allclose(sae.decode(codes), x_hat_ref, atol=1e-4)
    np.testing.assert_allclose(sae.decode(codes.to_scipy()), x_hat_ref, atol=1e-4)
    np.testing.assert_allclose(sae.reconstruct(x), x_hat_ref, atol=1e-4)


def test_batched_encode_equals_whole(backend):
    rng = np.random.default_rng(1)
    sae = _trained_like(rng, backend=backend)
    x = rng.normal(size=(53, 24)).astype(np.float32)
    whole = sae.encode(x, sparse=True)
    parts = sae.encode(x, sparse=True, batch_size=10)
    # BLAS may pick another kernel for a 10-row product than for a 53-row one
    # (OpenBLAS does), so values agree to float32 rounding, not bit for bit;
    # no pre-activation here is within rounding of 0, so the pattern is exact.
    np.testing.assert_array_equal(parts.indptr, whole.indptr)
    np.testing.assert_array_equal(parts.indices, whole.indices)
    np.testing.assert_allclose(parts.values, whole.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.encode(x, batch_size=7), sae.encode(x), rtol=1e-5,
                               atol=1e-6)


def test_float64_and_noncontiguous_input():
    rng = np.random.default_rng(2)
    sae = _trained_like(rng)
    x = rng.normal(size=(24, 10)).T  # float64, Fortran order
    np.testing.assert_allclose(sae.encode(x), sae.encode(np.ascontiguousarray(x, np.float32)),
                               atol=0)


def test_bad_inputs_give_clear_errors():
    sae = SparseAutoencoder(6, 10)
    x = np.ones((3, 6), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(x)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        sae.encode(np.ones(6, np.float32))
    with pytest.raises(TypeError):
        sae.encode(np.ones((3, 6), dtype=np.int64))
    with pytest.raises(ValueError, match="d_sae"):
        sae.decode(np.ones((3, 11), np.float32))


def test_init_b_dec_mean_and_geometric_median():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 5)).astype(np.float32) + 2.0
    x[:10] += 1000.0  # outliers move the mean, barely the median
    sae = SparseAutoencoder(5, 8)
    sae.init_b_dec(x, "mean")
    np.testing.assert_allclose(sae.b_dec, x.astype(np.float64).mean(0), rtol=1e-5)
    sae.init_b_dec(x, "geometric_median")
    assert np.abs(sae.b_dec - 2.0).max() < 0.3
    gm = geometric_median(x)
    d = np.linalg.norm(x - gm, axis=1).sum()
    for delta in np.eye(5) * 0.05:  # a local minimum of the sum of distances
        assert d <= np.linalg.norm(x - gm - delta, axis=1).sum() + 1e-6
    with pytest.raises(ValueError, match="method"):
        sae.init_b_dec(x, "mode")


def test_set_params_and_copy():
    sae = SparseAutoencoder(4, 6)
    other = SparseAutoencoder(4, 6, seed=9)
    sae.set_params(other.params)
    np.testing.assert_array_equal(sae.W_dec, other.W_dec)
    assert sae.W_dec is not other.W_dec
    c = sae.copy()
    c.params.W_dec[0, 0] = 5
    assert sae.W_dec[0, 0] != 5
    with pytest.raises(ValueError, match="d_in"):
        sae.set_params(SparseAutoencoder(5, 6).params)
