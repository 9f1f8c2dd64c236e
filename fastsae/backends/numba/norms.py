"""Numba CPU kernels for the decoder norms and the L1 subgradient.

``W_dec`` float32 ``[d_sae, d_in]`` (feature ``j``'s decoder vector is row
``j``, contiguous); ``norms`` float32 ``[d_sae]``. CSR arrays as in
:mod:`fastsae.backends.numba.decode`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["row_norms", "l1_subgradient_csr", "l1_subgradient_dense"]


# fastmath reassociation only: a sum of squares (all terms >= 0) may be
# summed in any order within the float32 bound; it lets LLVM vectorize.
@njit(fastmath={"reassoc", "contract"}, cache=True)
def _sumsq(w):
    s = np.float32(0.0)
    for k in range(w.shape[0]):
        s += w[k] * w[k]
    return s


@njit(parallel=True, cache=True)
def row_norms(W_dec):
    """L2 norm of each row of ``W_dec`` -> float32 ``[d_sae]``; one pass over
    ``W_dec``, parallel over features."""
    d_sae = W_dec.shape[0]
    out = np.empty(d_sae, np.float32)
    for j in prange(d_sae):
        out[j] = np.sqrt(_sumsq(W_dec[j]))
    return out


@njit(parallel=True, cache=True)
def l1_subgradient_csr(indices, values, norms, coef):
    """Values of the L1 subgradient on the codes' pattern: ``coef * norms[j]``
    where the stored value is positive, 0 at a stored zero or negative value
    (the dense rule). Only the ``nnz`` stored entries are touched."""
    nnz = indices.shape[0]
    out = np.empty(nnz, np.float32)
    c = np.float32(coef)
    for p in prange(nnz):
        out[p] = c * norms[indices[p]] if values[p] > 0 else np.float32(0.0)
    return out


@njit(parallel=True, cache=True)
def l1_subgradient_dense(f, norms, coef):
    """``where(f > 0, coef * norms, 0)`` for dense ``f`` ``[N, d_sae]``."""
    n, d = f.shape
    out = np.empty((n, d), np.float32)
    c = np.float32(coef)
    for i in prange(n):
        for j in range(d):
            out[i, j] = c * norms[j] if f[i, j] > 0 else np.float32(0.0)
    return out
