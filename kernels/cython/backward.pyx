"""Sparse-aware loss and gradients (``fastsae.backends.cython._backward``).

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
   b_dec)``. ``g_b_enc`` is summed during the (serial) transpose, in the
   same row order. Features are processed in blocks of 16 in parallel: every
   output element has exactly one writer (race-free, deterministic for any
   thread count), and a block's ``g_W_enc`` columns are accumulated in a
   small ``[16, d_in]`` buffer and written out transposed, 64 contiguous
   bytes per row of ``g_W_enc``.
4. ``g_b_dec = sum_i d_xhat_i - W_enc @ g_b_enc`` (before the feature pass,
   so that a fused Adam there may overwrite ``W_enc``).

:func:`train_backward` runs the same passes but applies Adam to ``W_enc``,
``b_enc`` and ``W_dec`` (and renormalizes decoder rows in ``unit_norm``
mode) inside the feature pass, as each block's gradients are produced, so a
training step never stores the two big gradient matrices.

Transcoders (``target=``, ``center=False``, ``d_target=``): the residuals
are taken against ``target [N, d_out]`` instead of ``x`` (every loop over
the reconstruction runs over ``d_out = W_dec.shape[1]``, the encoder
input's over ``d_in``), the feature pass reads ``x`` itself instead of
``x - b_dec``, ``g_b_dec`` has no ``- W_enc @ g_b_enc`` term, and
``d_target`` receives ``dL/dx_hat`` (summed over the Matryoshka prefixes)
for the caller's skip-weight gradient.

Losses are accumulated in float64. Raw kernels: the validating front
guarantees the inputs (C-contiguous float32 of matching shapes, canonical CSR
with in-range int32 indices and ``indptr[N] == nnz``, Adam moments of the
parameters' shapes, ``fire_counts`` int64 ``[d_sae]``); the wrapper supplies
``norms [d_sae]`` and the gradient buffers, whose shapes are checked here,
as are every extent the loops index by (``d_in``, ``d_out``, ``d_sae``,
``N``: :func:`_check_shapes`) and the moments' shapes.
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from libc.math cimport sqrt
from libc.stdint cimport int64_t, int32_t, uint16_t

import numpy as np

from common cimport (AdamConsts, _adam, _adam_consts, _axpy, _dot, _dot_d, _write_copy,
                     fs_bf16_packed_size)

cdef enum:
    _FB = 16     # features per block in the per-feature pass
    _CB = 64     # columns per block in column sums


def _check_shapes(const float[:, ::1] x, const float[:, ::1] target,
                  const float[:, ::1] x_hat, const float[:, ::1] W_enc,
                  const float[:, ::1] W_dec, const float[::1] b_dec, const int64_t[::1] indptr,
                  bint center):
    """Every extent the row and feature passes index by, checked once before
    any nogil code: ``x [N, d_in]``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
    d_out]``, ``b_dec``, ``target`` and ``x_hat`` (None or) ``d_out`` wide,
    ``indptr [N + 1]``; centering subtracts ``b_dec`` from ``x``, so it needs
    ``d_out == d_in``."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    cdef Py_ssize_t d_out = W_dec.shape[1]
    if (W_enc.shape[0] != d_in or W_dec.shape[0] != d_sae or b_dec.shape[0] != d_out
            or target.shape[0] != n or target.shape[1] != d_out
            or (x_hat is not None and (x_hat.shape[0] != n or x_hat.shape[1] != d_out))
            or indptr.shape[0] != n + 1 or (center and d_out != d_in)):
        raise ValueError("backward: shape mismatch among x, target, x_hat, the parameters "
                         "and the codes")


def _prepare(const float[:, ::1] x, const float[:, ::1] x_hat,
             const float[:, ::1] W_enc, const float[:, ::1] W_dec, const float[::1] b_dec,
             const int64_t[::1] indptr, const int32_t[::1] indices, const float[::1] values,
             const float[::1] norms, double l1_coefficient, bint weighted,
             float[::1] g_b_enc, float[::1] g_b_dec, int64_t[::1] fire_counts, int nthreads,
             const int64_t[::1] aux_indptr=None, const int32_t[::1] aux_indices=None,
             const float[::1] aux_values=None, double aux_weight=0.0,
             const int64_t[::1] widths=None, double[::1] prefix_sq=None,
             const float[:, ::1] target=None, bint center=True, float[:, ::1] d_target=None):
    """Passes 1-4 (all but the feature pass). Fills ``g_b_enc``, ``g_b_dec``
    (and adds to ``fire_counts`` unless None); returns ``(mse, l1, aux, d_xhat,
    xc, d_pre, colptr, rows, perm, colsum_f, values)``.

    Matryoshka levels (``widths`` not None, int64 ``[L]``, strictly
    increasing, the last ``d_sae``; ``x_hat`` None): the row pass builds the
    prefix residuals itself, walking each row's entries (increasing feature
    order) as the decode does, ``acc = b_dec + sum f_ij W_dec[j]``, and
    storing ``r_l = acc - x_i`` each time the feature index reaches
    ``widths[l]`` (so no prefix needs its own pass over ``W_dec``). Then, in
    place, the suffix sums ``D_g = sum_{l >= g} 2 r_l / N``: ``d_xhat`` has
    ``L N`` level rows (row ``g N + i`` is ``D_g(i)``; the AuxK rows follow
    at ``L N + i``), ``d_pre`` of an entry of feature ``j`` (level ``g``,
    the first with ``j < widths[g]``) is ``D_g(i) . W_dec[j]``, and ``rows``
    names the level row, so the feature pass sums ``f_ij D_g(i)``.
    ``prefix_sq`` (float64 ``[L]``, or None) receives each prefix's sum of
    squared errors (not divided by N); ``mse`` is the full one's. Without
    ``widths`` this is the one-level case with the given ``x_hat``.

    With the AuxK codes (``aux_indptr`` not None; CSR ``(N, d_sae)``) the
    entries are *stacked* as Numba's backend does: rows ``N..2N-1`` (after
    the ``L N`` level rows with ``widths``: ``L N + i``) are the aux codes' rows, with ``d_ehat_i = aux_weight * 2 (e_hat_i - (x_i -
    x_hat_i)) / N`` (``e_hat = aux @ W_dec``, no bias) in place of
    ``d_xhat_i`` and the same ``xc_i``. The returned ``d_xhat`` then has
    ``2N`` rows, ``values``/``d_pre`` (and ``perm``) index the main entries
    then the aux ones, and ``rows`` holds stacked row numbers (the feature
    pass maps row ``N + i`` to ``xc_i``). ``g_b_enc`` sums both parts;
    ``g_b_dec``'s ``sum_i d_xhat_i`` and ``fire_counts`` take the main rows
    only. ``aux = aux_weight * mean_i ||e_hat_i - e_i||^2``.

    Transcoders: ``target [N, d_out]`` (None: ``x``) is what the
    reconstruction fits (residuals ``x_hat - target``; ``d_out =
    W_dec.shape[1]``), ``x [N, d_in]`` stays the encoder input; ``center``
    False drops the centering (``xc = x``, no ``- W_enc @ g_b_enc`` in
    ``g_b_dec``). ``d_target`` (float32 ``[N, d_out]`` or None) receives
    ``D_0``, ``dL/dx_hat`` summed over the prefixes (the skip weights'
    signal)."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    cdef Py_ssize_t d_out = W_dec.shape[1]
    if target is None:
        target = x
    _check_shapes(x, target, x_hat, W_enc, W_dec, b_dec, indptr, center)
    if d_target is not None and (d_target.shape[0] != n or d_target.shape[1] != d_out):
        raise ValueError("backward: d_target must be (N, d_out)")
    cdef Py_ssize_t nnz = indptr[n]
    cdef bint use_aux = aux_indptr is not None
    cdef Py_ssize_t nnz_aux = 0
    if use_aux:
        if aux_indices is None or aux_values is None:
            raise ValueError("backward: aux_indptr needs aux_indices and aux_values")
        nnz_aux = aux_indptr[n]
    cdef bint given = widths is None   # x_hat given: one level
    if given == (x_hat is None):
        raise ValueError("backward: pass x_hat or widths (Matryoshka), not both")
    one_width_a = np.full(1, d_sae, dtype=np.int64)
    cdef const int64_t[::1] wv = one_width_a if given else widths
    cdef Py_ssize_t n_lev = wv.shape[0], last = n_lev - 1
    if n_lev < 1 or (prefix_sq is not None and prefix_sq.shape[0] != n_lev):
        raise ValueError("backward: widths and prefix_sq must have the same length >= 1")
    cdef Py_ssize_t aux_row0 = n_lev * n    # first AuxK row of the stacked rows
    cdef Py_ssize_t n_rows = aux_row0 + n if use_aux else aux_row0, nnz_all = nnz + nnz_aux
    if n_rows >= 2**31 - 1:
        raise ValueError("backward: (levels + AuxK) * N rows must fit int32")
    if norms.shape[0] != d_sae or g_b_enc.shape[0] != d_sae or g_b_dec.shape[0] != d_out:
        raise ValueError("backward: norms or output shape mismatch")
    cdef Py_ssize_t i, k, e, j, p, cb, k0, kk, nk, g
    cdef float nf = <float>n
    cdef float coef = <float>(l1_coefficient / n)   # d(l1)/d(f_ij) per unit penalty
    cdef float pen
    cdef double acc_d
    cdef float* full
    cdef float* lev
    cdef const int64_t* wp = &wv[0]

    cdef float ascale = <float>(aux_weight * 2.0 / n) if n > 0 else 0
    cdef float err
    cdef double acc_a
    d_xhat_a = np.empty((n_rows, d_out), dtype=np.float32)
    # x - b_dec, gathered per feature later (a transcoder's encoder reads x itself)
    xc_a = np.empty((n, d_in), dtype=np.float32) if center else np.asarray(x)
    row_sq_a = np.empty((n_lev, n), dtype=np.float64)
    row_l1_a = np.empty(n, dtype=np.float64)
    row_aux_a = np.zeros(n, dtype=np.float64)
    d_pre_a = np.empty(max(nnz_all, 1), dtype=np.float32)
    if use_aux:
        values_all_a = np.concatenate([np.asarray(values[:nnz]), np.asarray(aux_values[:nnz_aux])])
    else:
        values_all_a = np.asarray(values)
    cdef float[:, ::1] d_xhat = d_xhat_a
    cdef float[:, ::1] xcw = xc_a if center else None   # written only when centering
    cdef double[:, ::1] row_sq = row_sq_a
    cdef double[::1] row_l1 = row_l1_a, row_aux = row_aux_a
    cdef float[::1] d_pre = d_pre_a
    cdef const float[::1] values_all = values_all_a
    cdef const int64_t[::1] a_ip
    cdef const int32_t[::1] a_ix
    cdef const float[::1] a_v
    if use_aux:
        a_ip = aux_indptr
        a_ix = aux_indices
        a_v = aux_values

    # 1 + 2. per row: the residuals r_l = x_hat_l - x (given, or the prefix ones from
    #    one walk over the row's entries), squared errors, AuxK's term (its residual is
    #    the full r), then the suffix sums D_g in place and x - b_dec; d_pre at stored
    #    entries (D of the entry's level), l1 per row. Assignments, not +=, inside the
    #    prange (Cython would make an in-place one a reduction).
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="guided"):
        full = &d_xhat[last * n + i, 0]
        if given:
            for k in range(d_out):
                full[k] = x_hat[i, k] - target[i, k]   # the difference, for now
        else:
            for k in range(d_out):
                full[k] = b_dec[k]
            g = 0
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                while g < last and j >= wp[g]:   # prefix g is complete
                    lev = &d_xhat[g * n + i, 0]
                    for k in range(d_out):
                        lev[k] = full[k] - target[i, k]
                    g = g + 1
                _axpy(values[e], &W_dec[j, 0], full, d_out)
            while g < last:   # levels no entry of this row reaches
                lev = &d_xhat[g * n + i, 0]
                for k in range(d_out):
                    lev[k] = full[k] - target[i, k]
                g = g + 1
            for k in range(d_out):
                full[k] = full[k] - target[i, k]
        for g in range(n_lev):
            lev = &d_xhat[g * n + i, 0]
            row_sq[g, i] = _dot_d(lev, lev, d_out)
        if use_aux:
            # e_hat_i gathered into its stacked row, then turned into d_ehat_i in
            # place; e_hat - (x - x_hat) = e_hat + r exactly (negation is exact)
            lev = &d_xhat[aux_row0 + i, 0]
            for k in range(d_out):
                lev[k] = 0
            for e in range(a_ip[i], a_ip[i + 1]):
                _axpy(a_v[e], &W_dec[a_ix[e], 0], lev, d_out)
            acc_a = 0
            for k in range(d_out):
                err = lev[k] + full[k]
                acc_a = acc_a + <double>err * err
                lev[k] = ascale * err
            row_aux[i] = acc_a
            for e in range(a_ip[i], a_ip[i + 1]):
                j = a_ix[e]
                if a_v[e] > 0:
                    d_pre[nnz + e] = _dot(lev, &W_dec[j, 0], d_out)
                else:
                    d_pre[nnz + e] = 0
        for k in range(d_out):
            full[k] = (2.0 * full[k]) / nf
        if center:
            for k in range(d_in):
                xcw[i, k] = x[i, k] - b_dec[k]
        for g in range(last - 1, -1, -1):   # D_g = D_{g+1} + 2 r_g / N
            lev = &d_xhat[g * n + i, 0]
            full = &d_xhat[(g + 1) * n + i, 0]
            for k in range(d_out):
                lev[k] = full[k] + (2.0 * lev[k]) / nf
        acc_d = 0
        g = 0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            while g < last and j >= wp[g]:
                g = g + 1
            pen = norms[j] if weighted else 1.0
            acc_d = acc_d + <double>values[e] * pen
            if values[e] > 0:
                d_pre[e] = _dot(&d_xhat[g * n + i, 0], &W_dec[j, 0], d_out) + coef * pen
            else:
                d_pre[e] = 0
        row_l1[i] = acc_d
    sq_a = row_sq_a.sum(axis=1)
    if prefix_sq is not None:
        for g in range(n_lev):
            prefix_sq[g] = sq_a[g]
    mse = float(sq_a[last]) / n
    l1 = l1_coefficient * float(row_l1_a.sum()) / n
    aux = aux_weight * float(row_aux_a.sum()) / n if use_aux else 0.0

    # 3. CSC by a stable counting sort (serial, O(nnz + d_sae)); g_b_enc and the
    #    column sums of f in the same (row) order the feature pass uses
    colptr_a = np.zeros(d_sae + 1, dtype=np.int64)
    rows_a = np.empty(max(nnz_all, 1), dtype=np.int32)
    perm_a = np.empty(max(nnz_all, 1), dtype=np.int64)
    colsum_a = np.zeros(d_sae, dtype=np.float32)
    cdef int64_t[::1] colptr = colptr_a, perm = perm_a
    cdef int32_t[::1] rows = rows_a
    cdef float[::1] colsum = colsum_a
    cdef int64_t[::1] fill
    with nogil:
        for e in range(nnz):
            colptr[indices[e] + 1] += 1
        if use_aux:
            for e in range(nnz_aux):
                colptr[a_ix[e] + 1] += 1
        for j in range(d_sae):
            colptr[j + 1] += colptr[j]
            g_b_enc[j] = 0
    fill_a = colptr_a[:d_sae].copy()
    fill = fill_a
    with nogil:
        for i in range(n):
            g = 0
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                while g < last and j >= wp[g]:
                    g += 1
                p = fill[j]
                rows[p] = <int32_t>(g * n + i)   # the entry's level row of d_xhat
                perm[p] = e
                fill[j] = p + 1
                g_b_enc[j] += d_pre[e]
                colsum[j] += values[e]
            if fire_counts is not None:
                for e in range(indptr[i], indptr[i + 1]):
                    if values[e] > 0:
                        fire_counts[indices[e]] += 1
        if use_aux:  # stacked rows n..2n-1 after the main ones (no colsum: unit norm)
            for i in range(n):
                for e in range(a_ip[i], a_ip[i + 1]):
                    j = a_ix[e]
                    p = fill[j]
                    rows[p] = <int32_t>(aux_row0 + i)
                    perm[p] = nnz + e
                    fill[j] = p + 1
                    g_b_enc[j] += d_pre[nnz + e]

    # 4. g_b_dec = column sums of d_xhat - W_enc @ g_b_enc (W_enc before any update; the
    #    second term only when centering)
    cdef Py_ssize_t ncb = (d_out + _CB - 1) // _CB
    cdef double* cs = NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        cs = <double*>malloc(_CB * sizeof(double))
        for cb in prange(ncb, schedule="static"):
            if cs == NULL:
                failed += 1
            else:
                k0 = cb * _CB
                nk = min(<Py_ssize_t>_CB, d_out - k0)
                for kk in range(nk):
                    cs[kk] = 0
                for i in range(n):
                    for kk in range(nk):
                        cs[kk] += d_xhat[i, k0 + kk]
                for kk in range(nk):
                    g_b_dec[k0 + kk] = <float>cs[kk]
        free(cs)
    if failed:
        raise MemoryError("backward: could not allocate a column buffer")
    if center:   # b_dec's share through the encoder's centering (SAEs only)
        for k in prange(d_in, nogil=True, num_threads=nthreads, schedule="static"):
            g_b_dec[k] = g_b_dec[k] - _dot(&W_enc[k, 0], &g_b_enc[0], d_sae)
    if d_target is not None:   # D_0: level 0's rows (the suffix sum over every prefix)
        d_target[:, :] = d_xhat[:n, :]
    return (mse, l1, aux, d_xhat_a, xc_a, d_pre_a, colptr_a, rows_a, perm_a, colsum_a,
            values_all_a)


cdef inline void _feature_grads(Py_ssize_t j, float* gd, float* acc_row, Py_ssize_t d_in,
                                Py_ssize_t d_out,
                                const int64_t* colptr, const int32_t* rows, const int64_t* perm,
                                const float* values, const float* d_pre, const float* d_xhat,
                                const float* xc, const float* w, float nrm, float colsum,
                                float coef, bint weighted, bint project,
                                Py_ssize_t n_x) noexcept nogil:
    """Feature j: gd = g_W_dec[j] (``d_out``, with the norm term /
    projection), acc_row += g_W_enc[:, j] (``d_in``; acc_row must start at 0). Stacked row i >= n_x
    (a Matryoshka level row, or AuxK's) reads xc row i mod n_x."""
    cdef Py_ssize_t p, i, e, k, ix
    cdef float fv, dp, t
    cdef double sq, gdot
    memset(gd, 0, d_out * sizeof(float))
    for p in range(colptr[j], colptr[j + 1]):
        i = rows[p]
        e = perm[p]
        fv = values[e]
        dp = d_pre[e]
        _axpy(fv, d_xhat + i * d_out, gd, d_out)
        if dp != 0:
            ix = i
            while ix >= n_x:   # (level or AuxK) * n_x + row: at most L steps
                ix -= n_x
            _axpy(dp, xc + ix * d_in, acc_row, d_in)
    if weighted:
        if nrm > 0 and colsum != 0:
            t = coef * colsum
            for k in range(d_out):
                gd[k] += t * (w[k] / nrm)
    if project:
        sq = _dot_d(w, w, d_out)
        if sq > 0:
            gdot = _dot_d(gd, w, d_out)
            t = <float>(gdot / sq)
            for k in range(d_out):
                gd[k] -= t * w[k]


def gradients_csr(const float[:, ::1] x, const float[:, ::1] x_hat,
                  const float[:, ::1] W_enc, const float[:, ::1] W_dec, const float[::1] b_dec,
                  const int64_t[::1] indptr, const int32_t[::1] indices, const float[::1] values,
                  const float[::1] norms, double l1_coefficient, bint weighted, bint project,
                  float[:, ::1] g_W_enc, float[::1] g_b_enc, float[:, ::1] g_W_dec,
                  float[::1] g_b_dec, int64_t[::1] fire_counts, int nthreads,
                  const int64_t[::1] aux_indptr=None, const int32_t[::1] aux_indices=None,
                  const float[::1] aux_values=None, double aux_weight=0.0,
                  const int64_t[::1] widths=None, double[::1] prefix_sq=None,
                  const float[:, ::1] target=None, bint center=True,
                  float[:, ::1] d_target=None):
    """Fill the four gradient arrays; return ``(mse, l1)`` as Python floats
    (``(mse, l1, aux)`` when the AuxK codes ``aux_*`` are given: their term's
    gradients are summed in, stacked rows as in :func:`train_backward`).

    ``x, x_hat [N, d_in]``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``, CSR codes of shape ``(N, d_sae)``, ``norms [d_sae]``
    (decoder row norms). ``weighted``: ``weighted_l1`` mode (penalty = norms,
    plus the norm's own gradient); else the penalty is 1. ``project``: remove
    from each ``g_W_dec`` row its component along ``W_dec``'s row
    (``unit_norm``). ``fire_counts`` (int64 ``[d_sae]`` or None) is
    incremented by each feature's number of positive entries. Matryoshka
    prefixes: ``widths`` (int64 ``[L]``, the last ``d_sae``) with ``x_hat``
    None, ``prefix_sq`` float64 ``[L]`` receives each prefix's sum of squared
    errors (see :func:`_prepare`). Transcoders (``target``, ``center``,
    ``d_target``): see :func:`_prepare`; ``x_hat`` and ``W_dec``'s rows are
    then ``d_out`` wide.
    """
    cdef Py_ssize_t d_in = W_enc.shape[0], d_sae = W_enc.shape[1], d_out = W_dec.shape[1]
    if (g_W_enc.shape[0] != d_in or g_W_enc.shape[1] != d_sae or g_W_dec.shape[0] != d_sae
            or g_W_dec.shape[1] != d_out):
        raise ValueError("gradients_csr: output shape mismatch")
    (mse, l1, aux, d_xhat_a, xc_a, d_pre_a, colptr_a, rows_a, perm_a, colsum_a,
     values_all_a) = _prepare(
        x, x_hat, W_enc, W_dec, b_dec, indptr, indices, values, norms, l1_coefficient,
        weighted, g_b_enc, g_b_dec, fire_counts, nthreads, aux_indptr, aux_indices,
        aux_values, aux_weight, widths, prefix_sq, target, center, d_target)
    cdef const float[::1] values_all = values_all_a
    cdef Py_ssize_t n = x.shape[0]
    cdef const float[:, ::1] d_xhat = d_xhat_a, xc = xc_a
    cdef const float[::1] d_pre = d_pre_a, colsum = colsum_a
    cdef const int64_t[::1] colptr = colptr_a, perm = perm_a
    cdef const int32_t[::1] rows = rows_a
    cdef float coef = <float>(l1_coefficient / n)
    cdef Py_ssize_t nblocks = (d_sae + _FB - 1) // _FB, jb, j0, nb, jj, j, k
    cdef float* acc = NULL
    cdef int failed = 0
    # no entries: nothing is read through it (and &values[0] would be out of bounds)
    cdef const float* vals = &values_all[0] if values_all.shape[0] > 0 else NULL
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
                    _feature_grads(j, &g_W_dec[j, 0], acc + jj * d_in, d_in, d_out, &colptr[0],
                                   &rows[0], &perm[0], vals, &d_pre[0], &d_xhat[0, 0],
                                   &xc[0, 0], &W_dec[j, 0], norms[j], colsum[j], coef,
                                   weighted, project, n)
                for k in range(d_in):  # the block's g_W_enc columns, transposed
                    for jj in range(nb):
                        g_W_enc[k, j0 + jj] = acc[jj * d_in + k]
        free(acc)
    if failed:
        raise MemoryError("gradients_csr: could not allocate a block buffer")
    if aux_indptr is not None:
        return mse, l1, aux
    return mse, l1


def train_backward(const float[:, ::1] x, const float[:, ::1] x_hat,
                   float[:, ::1] W_enc, float[::1] b_enc, float[:, ::1] W_dec, float[::1] b_dec,
                   const int64_t[::1] indptr, const int32_t[::1] indices,
                   const float[::1] values, const float[::1] norms, double l1_coefficient,
                   bint weighted, bint unit_norm,
                   float[:, ::1] mW_enc, float[::1] mb_enc, float[:, ::1] mW_dec,
                   float[::1] mb_dec, float[:, ::1] vW_enc, float[::1] vb_enc,
                   float[:, ::1] vW_dec, float[::1] vb_dec, const float[::1] adam_consts,
                   int64_t[::1] fire_counts, int nthreads,
                   const int64_t[::1] aux_indptr=None, const int32_t[::1] aux_indices=None,
                   const float[::1] aux_values=None, double aux_weight=0.0,
                   const int64_t[::1] widths=None, double[::1] prefix_sq=None,
                   const float[:, ::1] target=None, bint center=True,
                   float[:, ::1] d_target=None, uint16_t[::1] bf16_panels=None,
                   float[:, ::1] bf16_transpose=None):
    """Backward pass with Adam fused into the feature pass: updates all
    parameters and moments in place; returns ``(mse, l1, aux)`` measured
    before the update. ``unit_norm``: project the decoder gradient and
    renormalize each decoder row after its update. ``adam_consts``: float32
    ``[8]`` from ``fastsae.backends.numerics.adam_constants`` (``beta1,
    beta2, 1 - beta1, 1 - beta2, lr, eps, 1 - beta1**t, 1 - beta2**t``).
    With the AuxK codes (``aux_*``, CSR ``(N, d_sae)``) and ``aux_weight``
    the AuxK term's gradients are summed in the same feature pass (stacked
    rows, see :func:`_prepare`): one backward and one Adam update for both
    terms, no gradient matrices. Also returns ``bad``, how many updated
    parameters are inf or NaN: ``(mse, l1, aux, bad)``. Matryoshka prefixes
    (``widths``, ``x_hat`` None, ``prefix_sq``): see :func:`_prepare`; the
    step is then the BatchTopK one with each feature's signal its level's
    suffix sum ``D_g``. Transcoders (``target``, ``center``, ``d_target``):
    see :func:`_prepare` (the skip weights, not known here, are the
    caller's: their forward term is in ``target``, their gradient needs
    ``d_target``). ``bf16_panels`` and ``bf16_transpose`` (both or
    neither): the bfloat16 copy of ``W_enc`` of ``kernels/c/bf16_encode.h``
    (uint16 panels, float32 ``[d_sae, d_in]`` transpose), rewritten from each
    updated block of ``W_enc`` (one block of 16 features is one panel), so
    the next ``precision="bf16"`` encode needs no packing pass; the padding
    is left as packed."""
    cdef Py_ssize_t d_in = W_enc.shape[0], d_sae = W_enc.shape[1], d_out = W_dec.shape[1]
    cdef bint copy = bf16_panels is not None
    cdef Py_ssize_t K2 = (d_in + 1) // 2
    if copy and <int>_FB != 16:  # the copy's writes assume one feature block per panel
        raise ValueError("train_backward: the bf16 copy needs 16-feature blocks")
    if copy != (bf16_transpose is not None):
        raise ValueError("train_backward: bf16_panels and bf16_transpose go together")
    if copy and (bf16_panels.shape[0] != fs_bf16_packed_size(d_in, d_sae)
                 or bf16_transpose.shape[0] != d_sae or bf16_transpose.shape[1] != d_in):
        raise ValueError("train_backward: the bf16 copy is not of W_enc's shape")
    cdef uint16_t* pan = NULL
    cdef float* wtr = NULL
    if copy and d_sae > 0 and d_in > 0:
        pan = &bf16_panels[0]
        wtr = &bf16_transpose[0, 0]
    if adam_consts.shape[0] != 8:
        raise ValueError("train_backward: adam_consts must hold the 8 numerics.adam_constants")
    cdef AdamConsts c = _adam_consts(&adam_consts[0])
    g_b_enc_a = np.empty(d_sae, dtype=np.float32)
    g_b_dec_a = np.empty(d_out, dtype=np.float32)
    if (mW_enc.shape[0] != d_in or mW_enc.shape[1] != d_sae or vW_enc.shape[0] != d_in
            or vW_enc.shape[1] != d_sae or mW_dec.shape[0] != d_sae
            or mW_dec.shape[1] != d_out or vW_dec.shape[0] != d_sae
            or vW_dec.shape[1] != d_out or b_enc.shape[0] != d_sae
            or mb_enc.shape[0] != d_sae or vb_enc.shape[0] != d_sae
            or mb_dec.shape[0] != d_out or vb_dec.shape[0] != d_out):
        raise ValueError("train_backward: Adam moments of other shapes than the parameters")
    (mse, l1, aux, d_xhat_a, xc_a, d_pre_a, colptr_a, rows_a, perm_a, colsum_a,
     values_all_a) = _prepare(
        x, x_hat, W_enc, W_dec, b_dec, indptr, indices, values, norms, l1_coefficient,
        weighted, g_b_enc_a, g_b_dec_a, fire_counts, nthreads, aux_indptr, aux_indices,
        aux_values, aux_weight, widths, prefix_sq, target, center, d_target)
    cdef const float[::1] values_all = values_all_a
    cdef Py_ssize_t n = x.shape[0]
    cdef const float[:, ::1] d_xhat = d_xhat_a, xc = xc_a
    cdef const float[::1] d_pre = d_pre_a, colsum = colsum_a
    cdef const float[::1] g_b_enc = g_b_enc_a, g_b_dec = g_b_dec_a
    cdef const int64_t[::1] colptr = colptr_a, perm = perm_a
    cdef const int32_t[::1] rows = rows_a
    cdef float coef = <float>(l1_coefficient / n)
    cdef Py_ssize_t nblocks = (d_sae + _FB - 1) // _FB, jb, j0, nb, jj, j, k
    cdef float* acc = NULL
    cdef float* gd = NULL
    cdef float* w
    cdef float* we
    cdef float* me
    cdef float* ve
    cdef float nrm
    cdef int failed = 0
    cdef Py_ssize_t bad = 0
    # no entries: nothing is read through it (and &values[0] would be out of bounds)
    cdef const float* vals = &values_all[0] if values_all.shape[0] > 0 else NULL
    with nogil, parallel(num_threads=nthreads):
        acc = <float*>malloc(_FB * d_in * sizeof(float))
        gd = <float*>malloc(max(d_out, <Py_ssize_t>_FB) * sizeof(float))  # also a W_enc row piece
        for jb in prange(nblocks, schedule="dynamic"):
            if acc == NULL or gd == NULL:
                failed += 1
            else:
                j0 = jb * _FB
                nb = min(<Py_ssize_t>_FB, d_sae - j0)
                memset(acc, 0, _FB * d_in * sizeof(float))
                for jj in range(nb):
                    j = j0 + jj
                    w = &W_dec[j, 0]
                    _feature_grads(j, gd, acc + jj * d_in, d_in, d_out, &colptr[0], &rows[0],
                                   &perm[0], vals, &d_pre[0], &d_xhat[0, 0], &xc[0, 0],
                                   w, norms[j], colsum[j], coef, weighted, unit_norm, n)
                    # W_dec row j is read above and by nothing else in this pass
                    bad += _adam(w, gd, &mW_dec[j, 0], &vW_dec[j, 0], d_out, &c)
                    if unit_norm:
                        nrm = <float>sqrt(_dot_d(w, w, d_out))
                        if nrm > 0:
                            for k in range(d_out):
                                w[k] = w[k] / nrm
                    bad += _adam(&b_enc[j], &g_b_enc[j], &mb_enc[j], &vb_enc[j], 1, &c)
                for k in range(d_in):  # the block's W_enc columns (16 contiguous floats)
                    for jj in range(nb):
                        gd[jj] = acc[jj * d_in + k]
                    bad += _adam(&W_enc[k, j0], gd, &mW_enc[k, j0], &vW_enc[k, j0], nb, &c)
                    if pan != NULL:  # the gradient is spent: acc now keeps the new columns
                        for jj in range(nb):
                            acc[jj * d_in + k] = W_enc[k, j0 + jj]
                if pan != NULL:
                    _write_copy(acc, nb, d_in, K2, pan + jb * K2 * 32, wtr + j0 * d_in)
        free(acc)
        free(gd)
    if failed:
        raise MemoryError("train_backward: could not allocate a block buffer")
    bad += _adam(&b_dec[0], &g_b_dec[0], &mb_dec[0], &vb_dec[0], d_out, &c)
    return mse, l1, aux, bad


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
