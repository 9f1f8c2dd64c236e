"""Sparse-aware loss and gradients (``fastsae._cy_backward``).

With ``f = relu(pre)`` in CSR form (``nnz = N * L0`` entries), every gradient
except the dense ``dL/dx_hat`` is a sparse product:

1. ``d_xhat = 2 (x_hat - x) / N`` and the squared error, parallel over rows.
2. ``d_pre`` only at stored entries: ``d_xhat_i . W_dec[j] + (c/N) pen_j``
   where ``f_ij > 0`` (ReLU derivative 0 elsewhere), parallel over rows;
   ``N * L0 * d_in`` multiply-adds instead of ``N * d_sae * d_in``.
3. The CSR is transposed once (CSC, a stable counting sort: entries of a
   feature stay in row order), so each feature's gradients are sums over its
   own active rows: ``g_W_dec[j] = sum_i f_ij d_xhat_i`` (+ the decoder-norm
   term in ``weighted_l1`` mode, projected in ``unit_norm`` mode),
   ``g_b_enc[j] = sum_i d_pre_ij`` and ``g_W_enc[:, j] = sum_i d_pre_ij (x_i -
   b_dec)``. Features are processed in blocks of 16 in parallel: every output
   element has exactly one writer (race-free, deterministic for any thread
   count), and a block's ``g_W_enc`` columns are accumulated in a small
   ``[16, d_in]`` buffer and written out transposed, 64 contiguous bytes per
   row of ``g_W_enc``.
4. ``g_b_dec = sum_i d_xhat_i - W_enc @ g_b_enc``.

Losses are accumulated in float64. Raw kernels: the caller has validated
shapes, dtypes and sparse indices.
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport int64_t, int32_t

import numpy as np

from _common cimport _axpy, _dot, _dot_d

cdef enum:
    _FB = 16     # features per block in the per-feature pass
    _CB = 64     # columns per block in column sums


def gradients_csr(const float[:, ::1] x, const float[:, ::1] x_hat,
                  const float[:, ::1] W_enc, const float[:, ::1] W_dec, const float[::1] b_dec,
                  const int64_t[::1] indptr, const int32_t[::1] indices, const float[::1] values,
                  const float[::1] norms, double l1_coefficient, bint weighted, bint project,
                  float[:, ::1] g_W_enc, float[::1] g_b_enc, float[:, ::1] g_W_dec,
                  float[::1] g_b_dec, int64_t[::1] fire_counts, int nthreads):
    """Fill the four gradient arrays; return ``(mse, l1)`` as Python floats.

    ``x, x_hat [N, d_in]``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``, CSR codes of shape ``(N, d_sae)``, ``norms [d_sae]``
    (decoder row norms). ``weighted``: ``weighted_l1`` mode (penalty = norms,
    plus the norm's own gradient); else the penalty is 1. ``project``: remove
    from each ``g_W_dec`` row its component along ``W_dec``'s row
    (``unit_norm``). ``fire_counts`` (int64 ``[d_sae]`` or None) is
    incremented by each feature's number of positive entries.
    """
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    cdef Py_ssize_t nnz = indptr[n] if indptr.shape[0] == n + 1 else -1
    if (x_hat.shape[0] != n or x_hat.shape[1] != d_in or W_enc.shape[0] != d_in
            or W_dec.shape[0] != d_sae or W_dec.shape[1] != d_in or b_dec.shape[0] != d_in
            or nnz < 0 or indices.shape[0] < nnz or values.shape[0] < nnz
            or norms.shape[0] != d_sae or g_W_enc.shape[0] != d_in
            or g_W_enc.shape[1] != d_sae or g_b_enc.shape[0] != d_sae
            or g_W_dec.shape[0] != d_sae or g_W_dec.shape[1] != d_in
            or g_b_dec.shape[0] != d_in
            or (fire_counts is not None and fire_counts.shape[0] != d_sae)):
        raise ValueError("gradients_csr: shape mismatch")

    cdef Py_ssize_t i, k, e, j, p, jb, jj, j0, nb, k0, kk, nk
    cdef float nf = <float>n
    cdef float coef = <float>(l1_coefficient / n)   # d(l1)/d(f_ij) per unit penalty
    cdef float diff, pen, dp, fv, t, nrm, xk
    cdef double acc_d, sq_d, gdot

    d_xhat_a = np.empty((n, d_in), dtype=np.float32)
    xc_a = np.empty((n, d_in), dtype=np.float32)   # x - b_dec, gathered per feature below
    row_sq_a = np.empty(n, dtype=np.float64)
    row_l1_a = np.empty(n, dtype=np.float64)
    d_pre_a = np.empty(max(nnz, 1), dtype=np.float32)
    cdef float[:, ::1] d_xhat = d_xhat_a, xc = xc_a
    cdef double[::1] row_sq = row_sq_a, row_l1 = row_l1_a
    cdef float[::1] d_pre = d_pre_a

    # 1 + 2. dL/dx_hat, squared error; d_pre at the stored entries, l1 per row
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="guided"):
        for k in range(d_in):
            d_xhat[i, k] = x_hat[i, k] - x[i, k]   # the difference, for now
        row_sq[i] = _dot_d(&d_xhat[i, 0], &d_xhat[i, 0], d_in)
        for k in range(d_in):
            d_xhat[i, k] = (2.0 * d_xhat[i, k]) / nf
            xc[i, k] = x[i, k] - b_dec[k]
        acc_d = 0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            pen = norms[j] if weighted else 1.0
            acc_d = acc_d + <double>values[e] * pen
            if values[e] > 0:
                d_pre[e] = _dot(&d_xhat[i, 0], &W_dec[j, 0], d_in) + coef * pen
            else:
                d_pre[e] = 0
        row_l1[i] = acc_d
    mse = float(row_sq_a.sum()) / n
    l1 = l1_coefficient * float(row_l1_a.sum()) / n

    # 3. CSC by a stable counting sort (serial: O(nnz + d_sae), cheap)
    colptr_a = np.zeros(d_sae + 1, dtype=np.int64)
    rows_a = np.empty(max(nnz, 1), dtype=np.int32)
    perm_a = np.empty(max(nnz, 1), dtype=np.int64)
    cdef int64_t[::1] colptr = colptr_a, perm = perm_a
    cdef int32_t[::1] rows = rows_a
    cdef int64_t[::1] fill
    with nogil:
        for e in range(nnz):
            colptr[indices[e] + 1] += 1
        for j in range(d_sae):
            colptr[j + 1] += colptr[j]
    fill_a = colptr_a[:d_sae].copy()
    fill = fill_a
    with nogil:
        for i in range(n):
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                p = fill[j]
                rows[p] = <int32_t>i
                perm[p] = e
                fill[j] = p + 1
            if fire_counts is not None:
                for e in range(indptr[i], indptr[i + 1]):
                    if values[e] > 0:
                        fire_counts[indices[e]] += 1

    # per feature block: g_W_dec rows, g_b_enc, g_W_enc columns
    cdef Py_ssize_t nblocks = (d_sae + _FB - 1) // _FB
    cdef float* acc = NULL
    cdef float* gw
    cdef const float* w
    cdef float colsum, gbe
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        acc = <float*>malloc(_FB * d_in * sizeof(float))
        for jb in prange(nblocks, schedule="dynamic"):
            if acc == NULL:
                failed += 1
            else:
                j0 = jb * _FB
                nb = min(<Py_ssize_t>_FB, d_sae - j0)
                memset(acc, 0, _FB * d_in * sizeof(float))
                for jj in range(nb):
                    j = j0 + jj
                    gw = &g_W_dec[j, 0]
                    w = &W_dec[j, 0]
                    memset(gw, 0, d_in * sizeof(float))
                    colsum = 0
                    gbe = 0
                    for p in range(colptr[j], colptr[j + 1]):
                        i = rows[p]
                        e = perm[p]
                        fv = values[e]
                        dp = d_pre[e]
                        colsum = colsum + fv
                        _axpy(fv, &d_xhat[i, 0], gw, d_in)
                        if dp != 0:
                            gbe = gbe + dp
                            _axpy(dp, &xc[i, 0], acc + jj * d_in, d_in)
                    g_b_enc[j] = gbe
                    if weighted:
                        nrm = norms[j]
                        if nrm > 0 and colsum != 0:
                            t = coef * colsum
                            for k in range(d_in):
                                gw[k] += t * (w[k] / nrm)
                    if project:
                        sq_d = _dot_d(w, w, d_in)
                        gdot = _dot_d(gw, w, d_in)
                        if sq_d > 0:
                            t = <float>(gdot / sq_d)
                            for k in range(d_in):
                                gw[k] -= t * w[k]
                for k in range(d_in):
                    for jj in range(nb):
                        g_W_enc[k, j0 + jj] = acc[jj * d_in + k]
        free(acc)
    if failed:
        raise MemoryError("gradients_csr: could not allocate a block buffer")

    # 4. g_b_dec = column sums of d_xhat - W_enc @ g_b_enc
    cdef Py_ssize_t ncb = (d_in + _CB - 1) // _CB
    cdef double* cs = NULL
    with nogil, parallel(num_threads=nthreads):
        cs = <double*>malloc(_CB * sizeof(double))
        for jb in prange(ncb, schedule="static"):
            if cs == NULL:
                failed += 1
            else:
                k0 = jb * _CB
                nk = min(<Py_ssize_t>_CB, d_in - k0)
                for kk in range(nk):
                    cs[kk] = 0
                for i in range(n):
                    for kk in range(nk):
                        cs[kk] += d_xhat[i, k0 + kk]
                for kk in range(nk):
                    g_b_dec[k0 + kk] = <float>cs[kk]
        free(cs)
    if failed:
        raise MemoryError("gradients_csr: could not allocate a column buffer")
    for k in prange(d_in, nogil=True, num_threads=nthreads, schedule="static"):
        g_b_dec[k] = g_b_dec[k] - _dot(&W_enc[k, 0], &g_b_enc[0], d_sae)
    return mse, l1


def batch_variance(const float[:, ::1] x, int nthreads):
    """``mean_i ||x_i - mean(x)||^2`` in float64 (the explained-variance
    denominator), two parallel passes over ``x [N, d_in]``."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], i, k
    mean_a = np.empty(d_in, dtype=np.float64)
    col_a = np.empty(d_in, dtype=np.float64)
    cdef double[::1] mean = mean_a, colv = col_a
    cdef double dlt
    cdef double* cs = NULL
    cdef Py_ssize_t ncb = (d_in + _CB - 1) // _CB, cb, k0, kk, nk
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        cs = <double*>malloc(_CB * sizeof(double))
        for cb in prange(ncb, schedule="static"):
            if cs == NULL:
                failed += 1
            else:
                k0 = cb * _CB
                nk = min(<Py_ssize_t>_CB, d_in - k0)
                for kk in range(nk):
                    cs[kk] = 0
                for i in range(n):
                    for kk in range(nk):
                        cs[kk] += x[i, k0 + kk]
                for kk in range(nk):
                    mean[k0 + kk] = cs[kk] / n
        free(cs)
    if failed:
        raise MemoryError("batch_variance: could not allocate a column buffer")
    # second pass, same blocking: squared deviations summed per column (each
    # column is its own accumulator, so the loop vectorizes across columns)
    with nogil, parallel(num_threads=nthreads):
        cs = <double*>malloc(_CB * sizeof(double))
        for cb in prange(ncb, schedule="static"):
            if cs == NULL:
                failed += 1
            else:
                k0 = cb * _CB
                nk = min(<Py_ssize_t>_CB, d_in - k0)
                for kk in range(nk):
                    cs[kk] = 0
                for i in range(n):
                    for kk in range(nk):
                        dlt = x[i, k0 + kk] - mean[k0 + kk]
                        cs[kk] += dlt * dlt
                for kk in range(nk):
                    colv[k0 + kk] = cs[kk]
        free(cs)
    if failed:
        raise MemoryError("batch_variance: could not allocate a column buffer")
    return float(col_a.sum()) / n
