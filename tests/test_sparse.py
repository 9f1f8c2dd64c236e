"""SparseCodes conversions."""

import numpy as np
import pytest
import scipy.sparse as sp

from fastsae import SparseCodes


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (10, 1), (5, 40)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_dense_round_trip(shape, density):
    rng = np.random.default_rng(0)
    f = rng.random(shape).astype(np.float32)
    f[rng.random(shape) >= density] = 0
    c = SparseCodes.from_dense(f)
    assert c.indptr.dtype == np.int64 and c.indices.dtype == np.int32
    assert c.values.dtype == np.float32
    assert c.nnz == np.count_nonzero(f)
    assert np.array_equal(c.to_dense(), f)
    assert np.array_equal(c.row_counts(), np.count_nonzero(f, axis=1))
    assert c.l0 == pytest.approx(np.count_nonzero(f) / shape[0])
    s = c.to_scipy()
    assert isinstance(s, sp.csr_array) and s.shape == shape
    assert np.array_equal(s.toarray(), f)
    back = SparseCodes.from_scipy(sp.coo_matrix(f))
    assert np.array_equal(back.indptr, c.indptr) and np.array_equal(back.indices, c.indices)
    assert np.array_equal(back.values, c.values)


def test_from_scipy_canonicalizes():
    m = sp.csr_array((np.array([2.0, 0.0, 1.0]), np.array([3, 1, 0]), np.array([0, 3])),
                     shape=(1, 4))
    c = SparseCodes.from_scipy(m)
    assert c.indices.tolist() == [0, 3] and c.values.tolist() == [1.0, 2.0]


def test_from_dense_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        SparseCodes.from_dense(np.ones(3))


def test_repr():
    assert "nnz=2" in repr(SparseCodes.from_dense(np.array([[1.0, 0.0], [0.0, 2.0]])))
