"""Dense path of the ReLU family at high code density
(``fastsae.backends.cython._dense``).

A fresh ReLU SAE fires about half its features; there the sparse kernels
(gathers, scatters, a CSC transpose of ``N * d_sae / 2`` entries) cost far
more than dense BLAS products. These kernels take the codes as a dense
float32 ``f [N, d_sae]`` and do everything with ``sgemm`` (single-threaded
inside the OpenMP loops; the wrapper limits BLAS with threadpoolctl):

* :func:`step_backward`: the training step after the encoder. A row pass
  over a fixed grid of ``tm``-row blocks: ``x_hat = f @ W_dec + b_dec``
  (one sgemm per block), ``d_xhat = 2 (x_hat - x) / N``, the squared error
  (float64 per row) and ``xc = x - b_dec``. Then a feature pass over a fixed
  grid of ``fb``-feature blocks, each block's rows in fixed chunks of ``rc``:
  ``d_pre = d_xhat @ W_dec[blk].T`` (sgemm), then while that ``rc x fb``
  tile is in cache ``+ (l1c / N) pen_j`` and the ReLU mask ``f > 0``, the
  column sums of ``d_pre`` (``g_b_enc``, float64) and of ``f`` (the L1 term
  and the decoder-norm gradient, float64) and the fire counts; then
  ``g_W_dec[blk] += f[:, blk].T @ d_xhat`` and ``g_W_enc[:, blk] += xc.T @
  d_pre`` (sgemm, accumulated over the chunks in order). At the end of a
  block: the decoder-norm term (``weighted_l1``) or the projection
  (``unit_norm``), ``W_enc_old[:, blk] @ g_b_enc[blk]`` (the block's share
  of ``g_b_dec``, taken before ``W_enc`` is overwritten), and Adam on the
  block's ``W_dec`` rows (renormalized in ``unit_norm`` mode), ``b_enc`` and
  ``W_enc`` columns, counting non-finite updated parameters as the sparse
  path does. Last, ``g_b_dec = colsum(d_xhat) - sum_blocks W_enc_old @
  g_b_enc`` (blocks summed in order) and Adam on ``b_dec``.
* :func:`gradients`: the same passes writing the four gradients instead of
  updating (``x_hat`` given).
* :func:`decode_csr`: CSR codes scattered into a dense row block, one sgemm
  per block.
* :func:`csr_to_dense`: CSR codes into a dense ``[N, d_sae]`` array.

Transcoders (``target=``, ``center=False``, ``d_target=``): as in
``backward.pyx``, the residual is taken against ``target [N, d_out]``, the
feature pass multiplies by ``x`` itself (no ``xc`` is formed), the
``W_enc_old @ g_b_enc`` shares are skipped and ``d_target`` receives
``d_xhat``.

Every grid (row blocks, feature blocks, row chunks, column blocks) is fixed
by the wrapper from the problem's shape only, and every output element has
one writer, so results do not depend on the thread count. No gradient matrix
bigger than one block per thread is stored in the training step.

Raw kernels: the validating front guarantees the inputs (C-contiguous float32
of matching shapes, canonical CSR, Adam moments of the parameters' shapes,
``fire_counts`` int64 ``[d_sae]``); checked here (O(1)) is what the wrapper
supplies: output and work buffers' shapes, the grid sizes, the Adam
constants' length, and that sizes fit BLAS's 32-bit integers; and every
extent the loops index by (``d_in``, ``d_out``, ``d_sae``, ``N``, the
moments: :func:`_check_model`).
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport sqrt
from libc.stdint cimport int64_t, int32_t

import numpy as np

from common cimport AdamConsts, _adam, _adam_consts, _dot_d, _sgemm_rm, sgemm, blas_int

cdef enum:
    _CB = 64     # columns per block in column sums


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* The feature pass's epilogue on one d_pre chunk dp[rows, nb] (row stride
       nb) with the codes' block f (row stride ldf): d_pre = f > 0 ? dp + cpen
       : 0, and per column the sums of d_pre and f (float64) and the count of
       f > 0. Plain C with restrict, the select done as a bit mask (+0.0 where
       f <= 0, as the select would give), so GCC vectorizes it: it treats a
       conditional expression here as control flow. */
    static void fastsae_dense_epilogue(float* restrict dp, const float* restrict f,
                                       Py_ssize_t ldf, const float* restrict cpen,
                                       double* restrict gbe, double* restrict cs,
                                       int64_t* restrict cn, Py_ssize_t rows, Py_ssize_t nb) {
        Py_ssize_t i, j;
        for (i = 0; i < rows; i++) {
            const float* restrict fr = f + i * ldf;
            float* restrict dr = dp + i * nb;
            for (j = 0; j < nb; j++) {
                float fv = fr[j];
                int32_t pos = fv > 0;
                float dv = dr[j] + cpen[j];
                uint32_t bits;
                memcpy(&bits, &dv, 4);
                bits &= (uint32_t)(-pos);
                memcpy(&dv, &bits, 4);
                dr[j] = dv;
                gbe[j] += dv;
                cs[j] += fv;
                cn[j] += pos;
            }
        }
    }
    """
    void _epilogue "fastsae_dense_epilogue"(float* dp, const float* f, Py_ssize_t ldf,
                                            const float* cpen, double* gbe, double* cs,
                                            int64_t* cn, Py_ssize_t rows,
                                            Py_ssize_t nb) noexcept nogil


cdef inline void _gemm(char ta, char tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                       const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                       float beta, float* C, Py_ssize_t ldc) noexcept nogil:
    """Column-major ``C[m, n] = op(A) @ op(B) + beta C`` (BLAS sgemm, alpha 1)."""
    cdef blas_int bm = <blas_int>m, bn = <blas_int>n, bk = <blas_int>k
    cdef blas_int la = <blas_int>lda, lb = <blas_int>ldb, lc = <blas_int>ldc
    cdef float alpha = 1.0
    sgemm(&ta, &tb, &bm, &bn, &bk, &alpha, <float*>A, &la, <float*>B, &lb, &beta, C, &lc)


def _check_dims(*dims):
    if max(dims) >= 2**31 - 1:
        raise ValueError("dimensions must fit BLAS's 32-bit integers")


def _check_grid(Py_ssize_t tm, Py_ssize_t fb, Py_ssize_t rc):
    if tm < 1 or fb < 1 or rc < 1:
        raise ValueError("dense: block sizes must be >= 1")


cdef void _row_pass(const float[:, ::1] target, const float[:, ::1] x, const float* f,
                    const float* x_hat, const float[:, ::1] W_dec, const float[::1] b_dec,
                    float[:, ::1] d_xhat, float* xc, double[::1] row_sq,
                    Py_ssize_t tm, int nthreads) noexcept nogil:
    """d_xhat (against ``target [N, d_out]``), xc and the squared error per
    row over row blocks of ``tm``. With ``f`` (``[N, d_sae]``): ``x_hat = f
    @ W_dec + b_dec`` is made here (one sgemm per block, into ``d_xhat``);
    else ``x_hat`` is given. ``xc`` (``[N, d_in]`` row-major) gets ``x -
    b_dec``; NULL: no centering (a transcoder's encoder reads ``x``)."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_dec.shape[0]
    cdef Py_ssize_t d_out = W_dec.shape[1]
    cdef Py_ssize_t nrb = (n + tm - 1) // tm, rb, r0, mr, i, k
    cdef float nf = <float>n
    for rb in prange(nrb, num_threads=nthreads, schedule="dynamic"):
        r0 = rb * tm
        mr = min(tm, n - r0)
        if f != NULL:
            _sgemm_rm(<blas_int>mr, <blas_int>d_out, <blas_int>d_sae, 1.0, f + r0 * d_sae,
                      <blas_int>d_sae, &W_dec[0, 0], <blas_int>d_out, 0.0, &d_xhat[r0, 0],
                      <blas_int>d_out)
        for i in range(r0, r0 + mr):
            if f != NULL:
                for k in range(d_out):
                    d_xhat[i, k] = (d_xhat[i, k] + b_dec[k]) - target[i, k]
            else:
                for k in range(d_out):
                    d_xhat[i, k] = x_hat[i * d_out + k] - target[i, k]
            row_sq[i] = _dot_d(&d_xhat[i, 0], &d_xhat[i, 0], d_out)
            for k in range(d_out):
                d_xhat[i, k] = (2.0 * d_xhat[i, k]) / nf
            if xc != NULL:
                for k in range(d_in):
                    xc[i * d_in + k] = x[i, k] - b_dec[k]


cdef int _column_sums(const float[:, ::1] a, double[::1] out, int nthreads) noexcept nogil:
    """``out[k] = sum_i a[i, k]`` in float64, rows in order (column blocks of
    ``_CB`` in parallel). Returns the number of failed buffer allocations."""
    cdef Py_ssize_t n = a.shape[0], d = a.shape[1], ncb = (d + _CB - 1) // _CB
    cdef Py_ssize_t cb, k0, nk, kk, i
    cdef double* cs = NULL
    cdef int failed = 0
    with parallel(num_threads=nthreads):
        cs = <double*>malloc(_CB * sizeof(double))
        for cb in prange(ncb, schedule="static"):
            if cs == NULL:
                failed += 1
            else:
                k0 = cb * _CB
                nk = min(<Py_ssize_t>_CB, d - k0)
                for kk in range(nk):
                    cs[kk] = 0
                for i in range(n):
                    for kk in range(nk):
                        cs[kk] += a[i, k0 + kk]
                for kk in range(nk):
                    out[k0 + kk] = cs[kk]
        free(cs)
    return failed


cdef struct _Bufs:
    # per-thread work buffers of the feature pass
    float* dp       # d_pre chunk [rc, fb]
    float* gd       # g_W_dec block [fb, d_out] (Adam mode)
    float* ge       # g_W_enc block, row-major [d_in, fb] (Adam mode)
    float* cpen     # (l1c / N) * pen_j of the block [fb]
    double* gbe     # column sums of d_pre [fb]
    double* cs      # column sums of f [fb]
    int64_t* cn     # positives per feature [fb]


cdef _Bufs _alloc(Py_ssize_t rc, Py_ssize_t fb, Py_ssize_t d_in, Py_ssize_t d_out,
                  bint adam) noexcept nogil:
    """A thread's buffers (any pointer NULL when out of memory, see _ok)."""
    cdef _Bufs b
    b.dp = <float*>malloc(rc * fb * sizeof(float))
    b.gd = <float*>malloc(fb * d_out * sizeof(float)) if adam else NULL
    b.ge = <float*>malloc(fb * d_in * sizeof(float)) if adam else NULL
    b.cpen = <float*>malloc(fb * sizeof(float))
    b.gbe = <double*>malloc(fb * sizeof(double))
    b.cs = <double*>malloc(fb * sizeof(double))
    b.cn = <int64_t*>malloc(fb * sizeof(int64_t))
    return b


cdef inline bint _ok(const _Bufs* b, bint adam) noexcept nogil:
    return (b.dp != NULL and b.cpen != NULL and b.gbe != NULL and b.cs != NULL
            and b.cn != NULL and (not adam or (b.gd != NULL and b.ge != NULL)))


cdef void _free(_Bufs* b) noexcept nogil:
    free(b.dp); free(b.gd); free(b.ge); free(b.cpen); free(b.gbe); free(b.cs); free(b.cn)


cdef Py_ssize_t _feature_block(
        Py_ssize_t j0, Py_ssize_t nb, Py_ssize_t jb, _Bufs* b,
        const float[:, ::1] f, const float[:, ::1] d_xhat, const float[:, ::1] xc,
        float[:, ::1] W_enc, float[:, ::1] W_dec, const float[::1] norms, float coef,
        bint weighted, bint unit_norm, Py_ssize_t rc,
        double[::1] colsum_f, int64_t[::1] counts, float[::1] g_b_enc, double[:, ::1] part,
        bint center, bint adam, float[::1] b_enc, float[:, ::1] mW_enc, float[::1] mb_enc,
        float[:, ::1] mW_dec, float[:, ::1] vW_enc, float[::1] vb_enc, float[:, ::1] vW_dec,
        const AdamConsts* c, float[:, ::1] g_W_enc, float[:, ::1] g_W_dec) noexcept nogil:
    """One feature block ``j0 : j0 + nb`` (block number ``jb``) of the feature
    pass (see the module docstring); ``part`` (W_enc_old's share of g_b_dec)
    only when ``center``. Returns the Adam non-finite count."""
    cdef Py_ssize_t n = f.shape[0], d_sae = f.shape[1], d_out = d_xhat.shape[1]
    cdef Py_ssize_t d_in = xc.shape[1]
    cdef Py_ssize_t c0, rcn, i, jj, j, k
    cdef Py_ssize_t bad = 0
    cdef float* gd
    cdef float* ge
    cdef float* w
    cdef Py_ssize_t ldge
    cdef float t, nrm
    cdef double sq, gdot
    cdef float beta
    if adam:
        gd = b.gd
        ge = b.ge
        ldge = nb
    else:
        gd = &g_W_dec[j0, 0]
        ge = &g_W_enc[0, j0]
        ldge = d_sae
    for jj in range(nb):
        j = j0 + jj
        b.cpen[jj] = coef * (norms[j] if weighted else <float>1.0)
        b.gbe[jj] = 0
        b.cs[jj] = 0
        b.cn[jj] = 0
    c0 = 0
    while c0 < n:
        rcn = min(rc, n - c0)
        beta = 0.0 if c0 == 0 else 1.0
        # d_pre chunk [rcn, nb] = d_xhat[c0:] @ W_dec[blk].T (column-major nb x rcn)
        _gemm(b'T', b'N', nb, rcn, d_out, &W_dec[j0, 0], d_out, &d_xhat[c0, 0], d_out, 0.0,
              b.dp, nb)
        # + penalty, ReLU mask, column sums, fire counts, while in cache
        _epilogue(b.dp, &f[c0, 0] + j0, d_sae, b.cpen, b.gbe, b.cs, b.cn, rcn, nb)
        # g_W_dec[blk] (+)= f[c0:, blk].T @ d_xhat[c0:]  (column-major d_out x nb)
        _gemm(b'N', b'T', d_out, nb, rcn, &d_xhat[c0, 0], d_out, &f[c0, 0] + j0, d_sae, beta,
              gd, d_out)
        # g_W_enc[:, blk] (+)= xc[c0:].T @ d_pre  (column-major nb x d_in)
        _gemm(b'N', b'T', nb, d_in, rcn, b.dp, nb, &xc[c0, 0], d_in, beta, ge, ldge)
        c0 += rcn
    for jj in range(nb):
        j = j0 + jj
        g_b_enc[j] = <float>b.gbe[jj]
        colsum_f[j] = b.cs[jj]
        counts[j] = b.cn[jj]
    # this block's share of W_enc_old @ g_b_enc (before W_enc is updated)
    if center:
        for k in range(d_in):
            part[jb, k] = _dot_d(&W_enc[k, j0], &g_b_enc[j0], nb)
    for jj in range(nb):
        j = j0 + jj
        w = &W_dec[j, 0]
        if weighted:
            nrm = norms[j]
            t = coef * <float>b.cs[jj]
            if nrm > 0 and t != 0:
                for k in range(d_out):
                    gd[jj * d_out + k] += t * (w[k] / nrm)
        if unit_norm:
            sq = _dot_d(w, w, d_out)
            if sq > 0:
                gdot = _dot_d(gd + jj * d_out, w, d_out)
                t = <float>(gdot / sq)
                for k in range(d_out):
                    gd[jj * d_out + k] -= t * w[k]
        if adam:
            bad += _adam(w, gd + jj * d_out, &mW_dec[j, 0], &vW_dec[j, 0], d_out, c)
            if unit_norm:
                nrm = <float>sqrt(_dot_d(w, w, d_out))
                if nrm > 0:
                    for k in range(d_out):
                        w[k] = w[k] / nrm
            bad += _adam(&b_enc[j], &g_b_enc[j], &mb_enc[j], &vb_enc[j], 1, c)
    if adam:
        for k in range(d_in):
            bad += _adam(&W_enc[k, j0], ge + k * nb, &mW_enc[k, j0], &vW_enc[k, j0], nb, c)
    return bad


cdef Py_ssize_t _feature_pass(
        const float[:, ::1] f, const float[:, ::1] d_xhat, const float[:, ::1] xc,
        float[:, ::1] W_enc, float[:, ::1] W_dec, const float[::1] norms, float coef,
        bint weighted, bint unit_norm, Py_ssize_t fb, Py_ssize_t rc,
        double[::1] colsum_f, int64_t[::1] counts, float[::1] g_b_enc, double[:, ::1] part,
        bint center, bint adam, float[::1] b_enc, float[:, ::1] mW_enc, float[::1] mb_enc,
        float[:, ::1] mW_dec, float[:, ::1] vW_enc, float[::1] vb_enc, float[:, ::1] vW_dec,
        const AdamConsts* c, float[:, ::1] g_W_enc, float[:, ::1] g_W_dec, int nthreads,
        int* failed) noexcept nogil:
    """All feature blocks in parallel; returns the Adam non-finite count and
    adds the failed buffer allocations to ``failed``."""
    cdef Py_ssize_t d_sae = f.shape[1], d_out = d_xhat.shape[1], n = f.shape[0]
    cdef Py_ssize_t d_in = xc.shape[1]
    cdef Py_ssize_t nblocks = (d_sae + fb - 1) // fb, jb, j0, nb
    cdef Py_ssize_t bad = 0
    cdef int fail = 0
    cdef _Bufs b
    cdef Py_ssize_t rcb = min(rc, n), fbb = min(fb, d_sae)
    with parallel(num_threads=nthreads):
        b = _alloc(rcb, fbb, d_in, d_out, adam)  # assigned in the block: private to each thread
        for jb in prange(nblocks, schedule="dynamic"):
            if not _ok(&b, adam):
                fail += 1
            else:
                j0 = jb * fb
                nb = min(fb, d_sae - j0)
                bad += _feature_block(j0, nb, jb, &b, f, d_xhat, xc, W_enc, W_dec, norms,
                                      coef, weighted, unit_norm, rc, colsum_f, counts,
                                      g_b_enc, part, center, adam, b_enc, mW_enc, mb_enc, mW_dec,
                                      vW_enc, vb_enc, vW_dec, c, g_W_enc, g_W_dec)
        _free(&b)
    failed[0] += fail
    return bad


def _penalty_sum(colsum, norms, bint weighted):
    """``sum_j colsum_j pen_j`` in float64 (pen = norms or 1)."""
    if weighted:
        return float(np.dot(colsum, np.asarray(norms, dtype=np.float64)))
    return float(colsum.sum())


def _check_model(const float[:, ::1] x, const float[:, ::1] target,
                 const float[:, ::1] W_enc, const float[:, ::1] W_dec, const float[::1] b_dec,
                 bint center, d_target):
    """The extents the passes index by, checked before any nogil code: ``x
    [N, d_in]``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec
    [d_out]``, ``target`` and ``d_target`` (None or) ``[N, d_out]``;
    centering subtracts ``b_dec`` from ``x``, so it needs ``d_out == d_in``.
    Returns ``(n, d_in, d_sae, d_out)``."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    cdef Py_ssize_t d_out = W_dec.shape[1]
    _check_dims(n, d_in, d_sae, d_out)
    if (W_enc.shape[0] != d_in or W_dec.shape[0] != d_sae or b_dec.shape[0] != d_out
            or target.shape[0] != n or target.shape[1] != d_out
            or (d_target is not None and tuple(d_target.shape) != (n, d_out))
            or (center and d_out != d_in)):
        raise ValueError("dense: shape mismatch among x, the target and the parameters")
    return n, d_in, d_sae, d_out


def _g_b_dec(double[::1] cs_dx, double[:, ::1] part, bint center, float[::1] out):
    """``out = colsum(d_xhat) - sum_blocks part`` (the centering's term,
    blocks summed in order; only when ``center``)."""
    cdef Py_ssize_t k, jb
    cdef double acc
    for k in range(out.shape[0]):
        acc = cs_dx[k]
        if center:
            for jb in range(part.shape[0]):
                acc -= part[jb, k]
        out[k] = <float>acc


def step_backward(const float[:, ::1] x, const float[:, ::1] f,
                  float[:, ::1] W_enc, float[::1] b_enc, float[:, ::1] W_dec, float[::1] b_dec,
                  const float[::1] norms, double l1_coefficient, bint weighted, bint unit_norm,
                  float[:, ::1] mW_enc, float[::1] mb_enc, float[:, ::1] mW_dec,
                  float[::1] mb_dec, float[:, ::1] vW_enc, float[::1] vb_enc,
                  float[:, ::1] vW_dec, float[::1] vb_dec, const float[::1] adam_consts,
                  int64_t[::1] fire_counts, Py_ssize_t tm, Py_ssize_t fb, Py_ssize_t rc,
                  int nthreads, const float[:, ::1] target=None, bint center=True,
                  float[:, ::1] d_target=None):
    """The dense training step after the encoder, Adam fused: updates the
    parameters and moments in place and adds to ``fire_counts`` (int64
    ``[d_sae]`` or None) the positives of each feature.

    ``x [N, d_in]``; ``f [N, d_sae]`` the ReLU codes of ``x`` under the
    parameters (dense, C-contiguous); ``norms [d_sae]`` the decoder row norms;
    ``weighted``: ``weighted_l1`` mode (penalty = norms, plus the norm's own
    gradient), else penalty 1; ``unit_norm``: project the decoder gradient
    and renormalize each decoder row after its update; ``adam_consts``:
    float32 ``[8]`` of ``numerics.adam_constants``. Grid: row blocks of
    ``tm``, feature blocks of ``fb``, row chunks of ``rc`` (the wrapper's,
    from the shape only). Returns ``(mse, l1, nnz, bad)``: losses measured
    before the update (float64 sums), the positives of ``f`` and how many
    updated parameters are inf or NaN.

    Transcoders: ``target [N, d_out]`` (None: ``x``) is what ``f @ W_dec +
    b_dec`` fits (``d_out = W_dec.shape[1]``); ``center`` False: the encoder
    read ``x`` uncentered (no ``- W_enc @ g_b_enc`` in ``g_b_dec``);
    ``d_target`` (``[N, d_out]`` or None) receives ``dL/dx_hat``."""
    if target is None:
        target = x
    cdef Py_ssize_t n, d_in, d_sae, d_out
    n, d_in, d_sae, d_out = _check_model(x, target, W_enc, W_dec, b_dec, center, d_target)
    _check_grid(tm, fb, rc)
    if f.shape[0] != n or f.shape[1] != d_sae or norms.shape[0] != d_sae:
        raise ValueError("step_backward: f must be (N, d_sae) and norms (d_sae,)")
    if (b_enc.shape[0] != d_sae or mb_enc.shape[0] != d_sae or vb_enc.shape[0] != d_sae
            or mb_dec.shape[0] != d_out or vb_dec.shape[0] != d_out
            or mW_enc.shape[0] != d_in or mW_enc.shape[1] != d_sae
            or vW_enc.shape[0] != d_in or vW_enc.shape[1] != d_sae
            or mW_dec.shape[0] != d_sae or mW_dec.shape[1] != d_out
            or vW_dec.shape[0] != d_sae or vW_dec.shape[1] != d_out):
        raise ValueError("step_backward: Adam moments of other shapes than the parameters")
    if adam_consts.shape[0] != 8:
        raise ValueError("step_backward: adam_consts must hold the 8 numerics.adam_constants")
    cdef AdamConsts c = _adam_consts(&adam_consts[0])
    cdef Py_ssize_t nblocks = (d_sae + fb - 1) // fb
    d_xhat_a = np.empty((n, d_out), dtype=np.float32)
    # x - b_dec, or a transcoder's encoder input x as it is
    xc_a = np.empty((n, d_in), dtype=np.float32) if center else np.asarray(x)
    row_sq_a = np.empty(n, dtype=np.float64)
    colsum_a = np.empty(d_sae, dtype=np.float64)
    counts_a = np.empty(d_sae, dtype=np.int64)
    g_b_enc_a = np.empty(d_sae, dtype=np.float32)
    part_a = np.empty((nblocks, d_in), dtype=np.float64)
    cs_dx_a = np.empty(d_out, dtype=np.float64)
    g_b_dec_a = np.empty(d_out, dtype=np.float32)
    cdef float[:, ::1] d_xhat = d_xhat_a
    cdef const float[:, ::1] xc = xc_a
    cdef float* xcw = <float*>&xc[0, 0] if center else NULL
    cdef double[::1] row_sq = row_sq_a, colsum = colsum_a, cs_dx = cs_dx_a
    cdef int64_t[::1] counts = counts_a
    cdef float[::1] g_b_enc = g_b_enc_a, g_b_dec = g_b_dec_a
    cdef double[:, ::1] part = part_a
    cdef float coef = <float>(l1_coefficient / n)
    cdef int failed = 0
    cdef Py_ssize_t bad = 0
    cdef float[:, ::1] none2 = None
    with nogil:
        _row_pass(target, x, &f[0, 0], NULL, W_dec, b_dec, d_xhat, xcw, row_sq, tm, nthreads)
        failed += _column_sums(d_xhat, cs_dx, nthreads)
        bad = _feature_pass(f, d_xhat, xc, W_enc, W_dec, norms, coef, weighted, unit_norm,
                            fb, rc, colsum, counts, g_b_enc, part, center, True, b_enc, mW_enc,
                            mb_enc, mW_dec, vW_enc, vb_enc, vW_dec, &c, none2, none2,
                            nthreads, &failed)
    if failed:
        raise MemoryError("dense.step_backward: could not allocate a block buffer "
                          "(parameters may be partly updated)")
    _g_b_dec(cs_dx, part, center, g_b_dec)
    bad += _adam(&b_dec[0], &g_b_dec[0], &mb_dec[0], &vb_dec[0], d_out, &c)
    if d_target is not None:
        d_target[:, :] = d_xhat
    mse = float(row_sq_a.sum()) / n
    l1 = l1_coefficient * _penalty_sum(colsum_a, norms, weighted) / n
    nnz = int(counts_a.sum())
    if fire_counts is not None:
        np.add(fire_counts, counts_a, out=np.asarray(fire_counts))
    return mse, l1, nnz, int(bad)


def gradients(const float[:, ::1] x, const float[:, ::1] x_hat, const float[:, ::1] f,
              const float[:, ::1] W_enc, const float[:, ::1] W_dec, const float[::1] b_dec,
              const float[::1] norms, double l1_coefficient, bint weighted, bint project,
              float[:, ::1] g_W_enc, float[::1] g_b_enc, float[:, ::1] g_W_dec,
              float[::1] g_b_dec, Py_ssize_t fb, Py_ssize_t rc, int nthreads,
              const float[:, ::1] target=None, bint center=True, float[:, ::1] d_target=None):
    """Fill the four gradient arrays (SAELens layouts) from dense codes
    ``f [N, d_sae]`` (any values: ``d_pre`` is masked by ``f > 0``, the
    products use ``f`` as given) and the given ``x_hat [N, d_out]``; return
    ``(mse, l1)`` as Python floats. ``weighted`` / ``project`` as
    :func:`step_backward`'s ``weighted`` / ``unit_norm``; ``target``,
    ``center``, ``d_target`` as there (``x_hat - target`` the residual)."""
    if target is None:
        target = x
    cdef Py_ssize_t n, d_in, d_sae, d_out
    n, d_in, d_sae, d_out = _check_model(x, target, W_enc, W_dec, b_dec, center, d_target)
    _check_grid(1, fb, rc)
    if (f.shape[0] != n or f.shape[1] != d_sae or norms.shape[0] != d_sae
            or x_hat.shape[0] != n or x_hat.shape[1] != d_out
            or g_W_enc.shape[0] != d_in or g_W_enc.shape[1] != d_sae
            or g_W_dec.shape[0] != d_sae or g_W_dec.shape[1] != d_out
            or g_b_enc.shape[0] != d_sae or g_b_dec.shape[0] != d_out):
        raise ValueError("dense.gradients: shape mismatch")
    cdef Py_ssize_t nblocks = (d_sae + fb - 1) // fb
    d_xhat_a = np.empty((n, d_out), dtype=np.float32)
    # x - b_dec, or a transcoder's encoder input x as it is
    xc_a = np.empty((n, d_in), dtype=np.float32) if center else np.asarray(x)
    row_sq_a = np.empty(n, dtype=np.float64)
    colsum_a = np.empty(d_sae, dtype=np.float64)
    counts_a = np.empty(d_sae, dtype=np.int64)
    part_a = np.empty((nblocks, d_in), dtype=np.float64)
    cs_dx_a = np.empty(d_out, dtype=np.float64)
    cdef float[:, ::1] d_xhat = d_xhat_a
    cdef const float[:, ::1] xc = xc_a
    cdef float* xcw = <float*>&xc[0, 0] if center else NULL
    cdef double[::1] row_sq = row_sq_a, colsum = colsum_a, cs_dx = cs_dx_a
    cdef int64_t[::1] counts = counts_a
    cdef double[:, ::1] part = part_a
    cdef float coef = <float>(l1_coefficient / n)
    cdef int failed = 0
    # the kernels share one signature with the step's (W_enc/W_dec are only
    # read when adam is off)
    cdef float[:, ::1] W_enc_rw = <float[:d_in, :d_sae]><float*>&W_enc[0, 0]
    cdef float[:, ::1] W_dec_rw = <float[:d_sae, :d_out]><float*>&W_dec[0, 0]
    cdef float[:, ::1] none2 = None
    cdef float[::1] none1 = None
    with nogil:
        _row_pass(target, x, NULL, &x_hat[0, 0], W_dec, b_dec, d_xhat, xcw, row_sq, 64,
                  nthreads)
        failed += _column_sums(d_xhat, cs_dx, nthreads)
        _feature_pass(f, d_xhat, xc, W_enc_rw, W_dec_rw, norms, coef, weighted, project,
                      fb, rc, colsum, counts, g_b_enc, part, center, False, none1, none2,
                      none1, none2, none2, none1, none2, NULL, g_W_enc, g_W_dec, nthreads,
                      &failed)
    if failed:
        raise MemoryError("dense.gradients: could not allocate a block buffer")
    _g_b_dec(cs_dx, part, center, g_b_dec)
    if d_target is not None:
        d_target[:, :] = d_xhat
    mse = float(row_sq_a.sum()) / n
    l1 = l1_coefficient * _penalty_sum(colsum_a, norms, weighted) / n
    return mse, l1


def csr_to_dense(const int64_t[::1] indptr, const int32_t[::1] indices,
                 const float[::1] values, float[:, ::1] out, int nthreads):
    """``out [N, d_sae]`` = the CSR codes as a dense array (rows in parallel)."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, d = out.shape[1], i, e
    if out.shape[0] != n:
        raise ValueError("csr_to_dense: out must have N rows")
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        memset(&out[i, 0], 0, d * sizeof(float))
        for e in range(indptr[i], indptr[i + 1]):
            out[i, indices[e]] = values[e]


def decode_csr(const int64_t[::1] indptr, const int32_t[::1] indices, const float[::1] values,
               const float[:, ::1] W_dec, const float[::1] b_dec, float[:, ::1] out,
               Py_ssize_t tm, int nthreads):
    """``out [N, d_in] = codes @ W_dec + b_dec`` for CSR codes of ``N`` rows:
    each block of ``tm`` rows is scattered into a dense ``[tm, d_sae]``
    buffer and multiplied by one sgemm (blocks in parallel)."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, d_sae = W_dec.shape[0], d_in = W_dec.shape[1]
    if out.shape[0] != n or out.shape[1] != d_in or tm < 1:
        raise ValueError("decode_csr: out must have shape (N, d_in) and tm must be >= 1")
    _check_dims(n, d_sae, d_in)
    cdef Py_ssize_t nrb = (n + tm - 1) // tm, rb, r0, mr, i, k, e
    cdef float* buf = NULL
    cdef float* brow
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        buf = <float*>malloc(min(tm, n) * d_sae * sizeof(float))
        for rb in prange(nrb, schedule="dynamic"):
            if buf == NULL:
                failed += 1
            else:
                r0 = rb * tm
                mr = min(tm, n - r0)
                memset(buf, 0, mr * d_sae * sizeof(float))
                for i in range(mr):
                    brow = buf + i * d_sae
                    for e in range(indptr[r0 + i], indptr[r0 + i + 1]):
                        brow[indices[e]] = values[e]
                _sgemm_rm(<blas_int>mr, <blas_int>d_in, <blas_int>d_sae, 1.0, buf,
                          <blas_int>d_sae, &W_dec[0, 0], <blas_int>d_in, 0.0, &out[r0, 0],
                          <blas_int>d_in)
                for i in range(r0, r0 + mr):
                    for k in range(d_in):
                        out[i, k] = out[i, k] + b_dec[k]
        free(buf)
    if failed:
        raise MemoryError("dense.decode_csr: could not allocate a block buffer")
