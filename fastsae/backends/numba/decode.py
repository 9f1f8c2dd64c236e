"""Numba CPU decoder kernels: ``x_hat = f @ W_dec + b_dec`` from CSR
(:func:`decode_csr`, and fused with the residual gradient in
:func:`decode_residual_csr`) or dense codes (:func:`decode_dense`), and the
dense-to-CSR compaction (:func:`dense_to_csr`).

Layouts: CSR codes (``indptr`` int64 ``[N+1]``, ``indices`` int32 ``[nnz]``,
``values`` float32 ``[nnz]``), ``W_dec`` float32 ``[d_sae, d_in]`` (one
contiguous row per feature), ``b_dec`` ``[d_in]``; output float32
``[N, d_in]``, C-contiguous.

From CSR the decode is a gather-accumulate of the active decoder rows:
``N * L0 * d_in`` multiply-adds instead of the dense ``N * d_sae * d_in``.
Each output row is owned by one thread (parallel over rows, no races) and
accumulated in the row's index order, so the result does not depend on the
thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .encode import gemm

__all__ = ["decode_csr", "decode_residual_csr", "row_nnz", "csr_from_counts", "csr_of_counts",
           "dense_to_csr", "decode_dense", "decode_dense_gemm"]


@njit(cache=True)
def _accumulate_row(indptr, indices, values, W_dec, i, acc):
    """``acc = sum_p values[p] * W_dec[indices[p]]`` over row ``i``'s entries."""
    acc[:] = 0.0
    for p in range(indptr[i], indptr[i + 1]):
        v = values[p]
        w = W_dec[indices[p]]
        for k in range(acc.shape[0]):
            acc[k] += v * w[k]


@njit(parallel=True, cache=True)
def decode_csr(indptr, indices, values, W_dec, b_dec):
    """``x_hat[i] = sum_p values[p] W_dec[indices[p]] + b_dec`` -> ``[N, d_in]``."""
    n = indptr.shape[0] - 1
    d_in = W_dec.shape[1]
    out = np.empty((n, d_in), np.float32)
    for i in prange(n):
        acc = out[i]
        _accumulate_row(indptr, indices, values, W_dec, i, acc)
        for k in range(d_in):
            acc[k] += b_dec[k]
    return out


@njit(parallel=True, cache=True)
def decode_residual_csr(indptr, indices, values, W_dec, b_dec, x):
    """Decode fused with the loss's first backward step.

    Returns ``(d_xhat, row_sq)``: ``d_xhat = 2 (x_hat - x) / N`` float32
    ``[N, d_in]`` (dL/dx_hat of the mean-over-rows squared error) and
    ``row_sq[i] = sum_k (x_hat - x)_ik**2`` in float64 ``[N]``; ``x_hat``
    itself is never stored.
    """
    n = indptr.shape[0] - 1
    d_in = W_dec.shape[1]
    d_xhat = np.empty((n, d_in), np.float32)
    row_sq = np.empty(n, np.float64)
    scale = np.float32(2.0 / n)
    for i in prange(n):
        acc = d_xhat[i]
        _accumulate_row(indptr, indices, values, W_dec, i, acc)
        s = 0.0
        for k in range(d_in):
            diff = (acc[k] + b_dec[k]) - x[i, k]
            s += np.float64(diff) * diff
            acc[k] = scale * diff
        row_sq[i] = s
    return d_xhat, row_sq


@njit(parallel=True, cache=True)
def row_nnz(f):
    """Nonzeros per row of dense ``f`` ``[N, d]`` (int64 ``[N]``)."""
    n, d = f.shape
    counts = np.empty(n, np.int64)
    for i in prange(n):
        c = 0
        for j in range(d):
            c += 1 if f[i, j] != 0 else 0
        counts[i] = c
    return counts


@njit(parallel=True, cache=True)
def _fill_csr(f, indptr, indices, values):
    n, d = f.shape
    for i in prange(n):
        o = indptr[i]
        for j in range(d):
            v = f[i, j]
            if v != 0:
                indices[o] = j
                values[o] = v
                o += 1


@njit(cache=True)
def csr_from_counts(counts):
    """Empty CSR buffers for rows holding ``counts[i]`` entries:
    ``indptr`` (int64, filled), ``indices`` (int32) and ``values`` (float32)
    of length ``sum(counts)``, to be filled by the caller."""
    n = counts.shape[0]
    indptr = np.empty(n + 1, np.int64)
    indptr[0] = 0
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
    return indptr, np.empty(indptr[n], np.int32), np.empty(indptr[n], np.float32)


@njit(cache=True)
def csr_of_counts(f, counts):
    """Canonical CSR ``(indptr, indices, values)`` of the nonzeros of dense
    ``f`` ``[N, d_sae]`` whose rows hold ``counts`` nonzeros (negative
    entries are kept, like the reference's dense formulas see them)."""
    indptr, indices, values = csr_from_counts(counts)
    _fill_csr(f, indptr, indices, values)
    return indptr, indices, values


@njit(cache=True)
def dense_to_csr(f):
    """:func:`csr_of_counts` of ``f``, counting its nonzeros first."""
    return csr_of_counts(f, row_nnz(f))


@njit(cache=True)
def decode_dense(f, W_dec, b_dec, min_density):
    """Decode dense codes ``f`` ``[N, d_sae]``: through CSR below
    ``min_density`` nonzeros per entry (the face passes
    :data:`~fastsae.backends.tunables.NUMBA_DENSE_DECODE_MIN_DENSITY`; one
    parallel scan of ``f``, then ``N * L0 * d_in`` work), else with BLAS
    (:func:`decode_dense_gemm`)."""
    n, d = f.shape
    counts = row_nnz(f)
    if counts.sum() >= min_density * n * d:
        return decode_dense_gemm(f, W_dec, b_dec)
    return decode_csr(*csr_of_counts(f, counts), W_dec, b_dec)


@njit(parallel=True, cache=True)
def _add_bias_rows(out, b):
    n, d = out.shape
    for i in prange(n):
        for k in range(d):
            out[i, k] += b[k]


@njit(cache=True)
def decode_dense_gemm(f, W_dec, b_dec):
    """``f @ W_dec + b_dec`` with BLAS (multi-threaded BLAS, called from the
    calling thread) for dense codes that are not sparse enough for CSR."""
    out = np.empty((f.shape[0], W_dec.shape[1]), np.float32)
    gemm(f, W_dec, out, 1.0, 0.0, False, False)
    _add_bias_rows(out, b_dec)
    return out
