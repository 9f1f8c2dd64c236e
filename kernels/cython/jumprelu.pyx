"""JumpReLU training kernels (``fastsae.backends.cython._jumprelu``).

``theta = exp(log_threshold)``, ``lo = theta - bw/2``, ``hi = theta + bw/2``
per feature (float32, made by the wrapper exactly as the reference's
``jumprelu_window``). ``pre = (x - b_dec) @ W_enc + b_enc``; an entry is
*active* when ``pre > theta`` (``f = pre``) and in the *window* when
``lo < pre < hi``. Only *candidates*, ``pre > lo``, are ever needed: the
active entries and the window's.

Encoder (as the ReLU one in ``encode.pyx``: tiles of ``tm`` rows by ``tn``
features, one sgemm each, the epilogue run while the tile is in cache):

* :func:`encode_csr`: CSR of the candidates (``pre`` values, each row in
  feature order), the epilogue testing each entry once against its
  feature's ``lo``;
* :func:`encode_probe`: row block 0 alone, dense ``pre`` into the caller's
  rows (its tiles exactly as :func:`encode_csr` computes them), counting the
  candidates: the caller then goes on sparse (``encode_csr(..., probe=)``,
  row block 0 compacted from the probe, bit-identical) or dense
  (:func:`encode_dense` from ``row0``: ``pre`` in bigger tiles).

Sparse backward (:func:`sparse_backward`), ``nnz = N * (L0 + window)``:

1. row pass (rows in parallel): ``x_hat_i = b_dec + sum_active f W_dec[j]``,
   ``d_xhat_i = 2 (x_hat_i - x_i) / N``, the squared error (float64 per
   row), ``xc_i = x_i - b_dec`` (stored next to ``d_xhat_i``: one
   contiguous ``2 d_in`` run per row for the feature pass's gathers), and
   ``d_f = d_xhat_i . W_dec[j]`` at every candidate;
2. a serial stable transpose of the *active* entries to CSC (row order),
   summing per feature, in row order and float64: ``g_b_enc`` (``d_f`` over
   active entries), the window sums of ``d_f`` and the window counts (the
   threshold's gradient), and the fire counts;
3. ``g_b_dec = colsum(d_xhat) - W_enc @ g_b_enc`` (before ``W_enc`` changes);
4. the feature pass, blocks of 64 features in parallel (one writer per
   output): ``g_W_dec[j] = sum_active f d_xhat_i`` projected off ``W_dec[j]``,
   ``g_W_enc[:, j] = sum_active d_f xc_i``, then (``adam``) Adam on the
   decoder row (renormalized), ``b_enc[j]``, ``log_threshold[j]`` and the
   block's ``W_enc`` columns, or (gradients mode) the gradients written out.

Dense backward (:func:`dense_backward`): ``pre [N, d_sae]`` dense (a fresh
SAE fires about half its features). A row pass over row chunks forms ``f``
of the chunk in a thread buffer and makes ``x_hat = f @ W_dec + b_dec`` with
one sgemm, then as above ``d_xhat``, ``xc``, the squared error. The feature
pass (blocks of ``fb`` features, rows in chunks of ``rc``): ``d_f = d_xhat
@ W_dec[blk].T`` (sgemm) and while that tile is in cache the masks: window
sums and counts of ``d_f``, ``f`` into a buffer, ``d_pre = d_f`` on active
entries, ``g_b_enc`` and fire counts; then ``g_W_dec[blk] += f.T @ d_xhat``
and ``g_W_enc[:, blk] += xc.T @ d_pre`` (sgemm, over the chunks in order);
then projection and Adam as in the sparse pass.

Transcoders (``target=``, ``center=False``, ``d_target=`` of both
backwards): the reconstruction (``d_out = W_dec.shape[1]`` wide) fits
``target`` instead of ``x``, ``xc`` is ``x`` itself, ``g_b_dec`` has no
``- W_enc @ g_b_enc`` term and ``d_target`` receives ``d_xhat``.

Sparsity modes and the pre-activation loss (``mode=`` and friends of both
backwards; the default call runs the step code above unchanged, bit for
bit): "tanh" adds ``(c s / N)(1 - tanh(s f)^2)`` to ``d_f`` wherever it is
used and has no Step term; "quadratic" replaces the window count by the
window's sum of the rows' ``q_i = 4 c (L0_i - T) / (N T)`` (``L0_i`` counted
in the row pass); the pre-activation loss sets ``d_pre = -p/N`` at the dead
features' entries below theta. The sparse path keeps to the candidates for
both modes; its pre-activation loss is :func:`preact_dead` (two GEMMs over
the dead features' columns only, before any update), whose ``W_enc``
gradient, ``b_enc`` and threshold terms the feature pass adds. The dense
path does all of it in its feature pass's epilogue
(``fastsae_jr_dense_epilogue_ext``, one specialised loop per mode).
Reductions stay per row, per feature or per fixed block, in a fixed order.

Every grid is fixed by the wrapper from the shape only and every output has
one writer: results do not depend on the thread count. BLAS must run
single-threaded inside the parallel regions (the wrapper limits it).

Raw kernels: the validating front guarantees the inputs (C-contiguous
float32 of matching shapes, Adam moments of the parameters' shapes,
``fire_counts`` int64 ``[d_sae]``); checked here is what the wrapper
supplies: window vectors, CSR and output buffers' shapes, grid sizes, the
Adam constants' length, and that sizes fit BLAS's 32-bit integers; and every
extent the loops index by (``d_in``, ``d_out``, ``d_sae``, ``N``, the
moments: :func:`_check_model`).
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset
from libc.math cimport sqrt, tanhf
from libc.stdint cimport int64_t, int32_t, uint16_t

import numpy as np

from common cimport (AdamConsts, _adam, _adam_consts, _axpy, _dot, _dot_d, _sgemm_rm, sgemm,
                     blas_int, _write_copy, fs_bf16_packed_size)

cdef enum:
    _FB = 64     # features per block in the sparse feature pass (256 B per W_enc row)
    _CB = 64     # columns per block in column sums


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    /* Probe epilogue: out[r, j] = tile[r, j] + b[j] (row strides nc, ldo);
       returns how many exceed lo[j] (NaN does not). Branch-free so that GCC
       vectorizes it. */
    static int64_t fastsae_jr_probe_epilogue(const float* restrict tile,
                                             const float* restrict b,
                                             const float* restrict lo,
                                             float* restrict out, Py_ssize_t ldo,
                                             Py_ssize_t rows, Py_ssize_t nc) {
        Py_ssize_t r, j;
        int64_t cnt = 0;
        for (r = 0; r < rows; r++) {
            const float* restrict t = tile + r * nc;
            float* restrict o = out + r * ldo;
            int32_t c = 0;
            for (j = 0; j < nc; j++) {
                float v = t[j] + b[j];
                o[j] = v;
                c += v > lo[j];
            }
            cnt += c;
        }
        return cnt;
    }

    /* f of a chunk: fo[r, j] = p[r, j] > theta[j] ? p[r, j] : 0 (row strides
       ldp, ldf), as a bit mask so that GCC vectorizes it. */
    static void fastsae_jr_mask_f(const float* restrict p, Py_ssize_t ldp,
                                  const float* restrict theta, float* restrict fo,
                                  Py_ssize_t ldf, Py_ssize_t rows, Py_ssize_t nc) {
        Py_ssize_t r, j;
        for (r = 0; r < rows; r++) {
            const float* restrict pr = p + r * ldp;
            float* restrict fr = fo + r * ldf;
            for (j = 0; j < nc; j++) {
                float v = pr[j];
                int32_t act = v > theta[j];
                uint32_t bits;
                memcpy(&bits, &v, 4);
                bits &= (uint32_t)(-act);
                memcpy(&v, &bits, 4);
                fr[j] = v;
            }
        }
    }

    /* The dense feature pass's epilogue on one d_f chunk dp[rows, nb] (row
       stride nb) with pre's block p (row stride ldp): per column the window
       sum (float64) and count of d_f, f into fo[rows, nb], d_pre = d_f on
       active entries (in place), its column sum (float64) and the active
       count. */
    static void fastsae_jr_dense_epilogue(float* restrict dp, const float* restrict p,
                                          Py_ssize_t ldp, const float* restrict theta,
                                          const float* restrict lo,
                                          const float* restrict hi, float* restrict fo,
                                          double* restrict gbe, double* restrict gws,
                                          int64_t* restrict wcn, int64_t* restrict acn,
                                          Py_ssize_t rows, Py_ssize_t nb) {
        Py_ssize_t i, j;
        for (i = 0; i < rows; i++) {
            const float* restrict pr = p + i * ldp;
            float* restrict dr = dp + i * nb;
            float* restrict fr = fo + i * nb;
            for (j = 0; j < nb; j++) {
                float v = pr[j], d = dr[j], fv, dw;
                int32_t act = v > theta[j];
                int32_t win = (v > lo[j]) & (v < hi[j]);
                uint32_t bits, m;
                m = (uint32_t)(-win);
                memcpy(&bits, &d, 4);
                bits &= m;
                memcpy(&dw, &bits, 4);
                m = (uint32_t)(-act);
                memcpy(&bits, &d, 4);
                bits &= m;
                memcpy(&d, &bits, 4);
                memcpy(&bits, &v, 4);
                bits &= m;
                memcpy(&fv, &bits, 4);
                dr[j] = d;
                fr[j] = fv;
                gws[j] += dw;
                wcn[j] += win;
                gbe[j] += d;
                acn[j] += act;
            }
        }
    }

    /* Active entries of one row p[0:nc] (p[j] > theta[j]; NaN does not). */
    static int64_t fastsae_jr_count_active(const float* restrict p,
                                           const float* restrict theta, Py_ssize_t nc) {
        Py_ssize_t j;
        int64_t cnt = 0;
        for (j = 0; j < nc; j++)
            cnt += p[j] > theta[j];
        return cnt;
    }

    /* The dense epilogue of the other sparsity modes and the pre-activation
       loss (mode 0 "step", 1 "tanh", 2 "quadratic"; dead != NULL: the
       block's dead flags). As fastsae_jr_dense_epilogue, plus:
       tanh: d_f += ct * (1 - tanh(ts f)^2) (f = pre if active else 0) before
       any use, tsum[j] += tanh(ts f); quadratic: wq[j] += q[i] on window
       entries (q: the chunk's per-row weights); dead: at entries of a dead
       feature with pre < theta, d_pre = npn (= -p/N), bcn[j] += 1,
       asum[j] += theta - pre (float64). Always inlined into the dispatcher
       below with constant mode and dead, so each combination is its own
       loop. */
    static inline __attribute__((always_inline)) void fastsae_jr_ext_body(
            float* restrict dp, const float* restrict p, Py_ssize_t ldp,
            const float* restrict theta, const float* restrict lo,
            const float* restrict hi, float* restrict fo, double* restrict gbe,
            double* restrict gws, int64_t* restrict wcn, int64_t* restrict acn,
            double* restrict wq, int64_t* restrict bcn, double* restrict tsum,
            double* restrict asum, Py_ssize_t rows, Py_ssize_t nb, const int mode,
            float ts, float ct, const double* restrict q,
            const unsigned char* restrict dead, float npn) {
        Py_ssize_t i, j;
        for (i = 0; i < rows; i++) {
            const float* restrict pr = p + i * ldp;
            float* restrict dr = dp + i * nb;
            float* restrict fr = fo + i * nb;
            double qi = mode == 2 ? q[i] : 0.0;
            for (j = 0; j < nb; j++) {
                float v = pr[j], d = dr[j], dpre;
                int32_t act = v > theta[j];
                int32_t win = (v > lo[j]) & (v < hi[j]);
                if (mode == 1) {
                    float tv = act ? tanhf(ts * v) : 0.0f;
                    d = d + ct * (1.0f - tv * tv);
                    tsum[j] += tv;
                }
                gws[j] += win ? d : 0.0f;
                wcn[j] += win;
                if (mode == 2)
                    wq[j] += win ? qi : 0.0;
                dpre = act ? d : 0.0f;
                if (dead != NULL && dead[j] && v < theta[j]) {
                    dpre = npn;
                    bcn[j] += 1;
                    asum[j] += (double)theta[j] - (double)v;
                }
                dr[j] = dpre;
                fr[j] = act ? v : 0.0f;
                gbe[j] += dpre;
                acn[j] += act;
            }
        }
    }

    static void fastsae_jr_dense_epilogue_ext(
            float* dp, const float* p, Py_ssize_t ldp, const float* theta,
            const float* lo, const float* hi, float* fo, double* gbe, double* gws,
            int64_t* wcn, int64_t* acn, double* wq, int64_t* bcn, double* tsum,
            double* asum, Py_ssize_t rows, Py_ssize_t nb, int mode, float ts, float ct,
            const double* q, const unsigned char* dead, float npn) {
    #define FASTSAE_JR_EXT(M, D) fastsae_jr_ext_body(dp, p, ldp, theta, lo, hi, fo, gbe, \
            gws, wcn, acn, wq, bcn, tsum, asum, rows, nb, M, ts, ct, q, D, npn)
        if (dead != NULL) {
            if (mode == 1) FASTSAE_JR_EXT(1, dead);
            else if (mode == 2) FASTSAE_JR_EXT(2, dead);
            else FASTSAE_JR_EXT(0, dead);
        } else {
            if (mode == 1) FASTSAE_JR_EXT(1, NULL);
            else if (mode == 2) FASTSAE_JR_EXT(2, NULL);
            else FASTSAE_JR_EXT(0, NULL);
        }
    #undef FASTSAE_JR_EXT
    }

    /* Pre-activation loss on one tile t[rows, nc] of xc @ W_enc[:, dead]:
       v = t + b (pre, as the encoders add the bias); below = v < theta;
       t becomes d_pre's term (npn where below, else 0), cnt[j] += below,
       asum[j] += theta - v where below (float64). */
    static void fastsae_jr_preact_epilogue(float* restrict t, Py_ssize_t nc,
                                           const float* restrict b,
                                           const float* restrict theta, float npn,
                                           int64_t* restrict cnt, double* restrict asum,
                                           Py_ssize_t rows) {
        Py_ssize_t r, j;
        for (r = 0; r < rows; r++) {
            float* restrict tr = t + r * nc;
            for (j = 0; j < nc; j++) {
                float v = tr[j] + b[j];
                int32_t below = v < theta[j];
                tr[j] = below ? npn : 0.0f;
                cnt[j] += below;
                asum[j] += below ? (double)theta[j] - (double)v : 0.0;
            }
        }
    }

    """
    int64_t _count_active "fastsae_jr_count_active"(const float* p, const float* theta,
                                                    Py_ssize_t nc) noexcept nogil
    void _dense_epilogue_ext "fastsae_jr_dense_epilogue_ext"(
        float* dp, const float* p, Py_ssize_t ldp, const float* theta, const float* lo,
        const float* hi, float* fo, double* gbe, double* gws, int64_t* wcn, int64_t* acn,
        double* wq, int64_t* bcn, double* tsum, double* asum, Py_ssize_t rows,
        Py_ssize_t nb, int mode, float ts, float ct, const double* q,
        const unsigned char* dead, float npn) noexcept nogil
    void _preact_epilogue "fastsae_jr_preact_epilogue"(
        float* t, Py_ssize_t nc, const float* b, const float* theta, float npn,
        int64_t* cnt, double* asum, Py_ssize_t rows) noexcept nogil
    int64_t _probe_epilogue "fastsae_jr_probe_epilogue"(
        const float* tile, const float* b, const float* lo, float* out, Py_ssize_t ldo,
        Py_ssize_t rows, Py_ssize_t nc) noexcept nogil
    void _mask_f "fastsae_jr_mask_f"(const float* p, Py_ssize_t ldp, const float* theta,
                                     float* fo, Py_ssize_t ldf, Py_ssize_t rows,
                                     Py_ssize_t nc) noexcept nogil
    void _dense_epilogue "fastsae_jr_dense_epilogue"(
        float* dp, const float* p, Py_ssize_t ldp, const float* theta, const float* lo,
        const float* hi, float* fo, double* gbe, double* gws, int64_t* wcn, int64_t* acn,
        Py_ssize_t rows, Py_ssize_t nb) noexcept nogil


def _check_dims(*dims):
    if max(dims) >= 2**31 - 1:
        raise ValueError("dimensions must fit BLAS's 32-bit integers")


# ---------------------------------------------------------------- encoder
cdef struct _TaskOut:
    # Candidates of one task (rows r0:r0+mr, its feature chunk), row-major:
    # row r's entries are idx/val[start_r : start_r + rowcnt[r]], in column order.
    int32_t* idx
    float* val
    int64_t* rowcnt
    int64_t cursor      # read position while copying into the final arrays


cdef inline void _center_rows(const float* x, const float* b_dec, float* xc,
                              Py_ssize_t mr, Py_ssize_t d_in) noexcept nogil:
    """xc[r, :] = x[r, :] - b_dec for mr rows (both row-major, d_in wide)."""
    cdef Py_ssize_t r, k
    for r in range(mr):
        for k in range(d_in):
            xc[r * d_in + k] = x[r * d_in + k] - b_dec[k]


cdef int _sparse_task(const float* x, const float* W, const float* b_enc, const float* b_dec,
                      const float* lo, Py_ssize_t d_in, Py_ssize_t d_sae,
                      Py_ssize_t r0, Py_ssize_t mr, Py_ssize_t c0, Py_ssize_t c1,
                      Py_ssize_t tn, float* xc, float* tile, _TaskOut* res) noexcept nogil:
    """Candidates (pre > lo) for rows r0:r0+mr, features c0:c1, into res.
    Returns 0, or -1 when memory ran out (res then owns nothing)."""
    cdef Py_ssize_t ntiles = (c1 - c0 + tn - 1) // tn
    cdef Py_ssize_t cs, nc, r, j, t, cnt, cap, n = 0
    cdef float v
    cdef float* trow
    cdef int64_t* tcnt = <int64_t*>malloc(ntiles * mr * sizeof(int64_t))
    cdef int64_t* rowpos
    cdef int32_t* tidx
    cdef float* tval
    cdef void* p
    res.idx = NULL
    res.val = NULL
    res.rowcnt = NULL
    res.cursor = 0
    cap = mr * min(tn, c1 - c0)
    tidx = <int32_t*>malloc(cap * sizeof(int32_t))
    tval = <float*>malloc(cap * sizeof(float))
    if tcnt == NULL or tidx == NULL or tval == NULL:
        free(tcnt); free(tidx); free(tval)
        return -1

    _center_rows(x + r0 * d_in, b_dec, xc, mr, d_in)
    cs = c0
    t = 0
    while cs < c1:
        nc = min(tn, c1 - cs)
        _sgemm_rm(<blas_int>mr, <blas_int>nc, <blas_int>d_in, 1.0, xc, <blas_int>d_in,
                  W + cs, <blas_int>d_sae, 0.0, tile, <blas_int>nc)
        if n + mr * nc > cap:  # room for the worst case (every entry a candidate)
            cap = max(2 * cap, n + mr * nc)
            p = realloc(tidx, cap * sizeof(int32_t))
            if p == NULL:
                free(tcnt); free(tidx); free(tval)
                return -1
            tidx = <int32_t*>p
            p = realloc(tval, cap * sizeof(float))
            if p == NULL:
                free(tcnt); free(tidx); free(tval)
                return -1
            tval = <float*>p
        # epilogue: bias + the window's lower bound + compaction, rows in order
        for r in range(mr):
            trow = tile + r * nc
            cnt = 0
            for j in range(nc):
                v = trow[j] + b_enc[cs + j]
                if v > lo[cs + j]:
                    tidx[n + cnt] = <int32_t>(cs + j)
                    tval[n + cnt] = v
                    cnt += 1
            n += cnt
            tcnt[t * mr + r] = cnt
        cs += tn
        t += 1

    # regroup the entries tile-major -> row-major (columns stay in order)
    res.idx = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
    res.val = <float*>malloc(max(n, 1) * sizeof(float))
    res.rowcnt = <int64_t*>malloc(mr * sizeof(int64_t))
    rowpos = <int64_t*>malloc(mr * sizeof(int64_t))
    if res.idx == NULL or res.val == NULL or res.rowcnt == NULL or rowpos == NULL:
        free(res.idx); free(res.val); free(res.rowcnt); free(rowpos)
        res.idx = NULL
        res.val = NULL
        res.rowcnt = NULL
        free(tcnt); free(tidx); free(tval)
        return -1
    for r in range(mr):
        res.rowcnt[r] = 0
    for t in range(ntiles):
        for r in range(mr):
            res.rowcnt[r] += tcnt[t * mr + r]
    cnt = 0
    for r in range(mr):
        rowpos[r] = cnt
        cnt += res.rowcnt[r]
    j = 0  # read position in the tile-major buffer
    for t in range(ntiles):
        for r in range(mr):
            cnt = tcnt[t * mr + r]
            memcpy(res.idx + rowpos[r], tidx + j, cnt * sizeof(int32_t))
            memcpy(res.val + rowpos[r], tval + j, cnt * sizeof(float))
            rowpos[r] += cnt
            j += cnt
    free(rowpos); free(tcnt); free(tidx); free(tval)
    return 0


cdef int _compact_task(const float* pre, Py_ssize_t ld, const float* lo, Py_ssize_t mr,
                       Py_ssize_t c0, Py_ssize_t c1, _TaskOut* res) noexcept nogil:
    """The candidates of dense rows ``pre[0:mr, c0:c1]`` (row stride ``ld``)
    into res, row-major (the layout ``_sparse_task`` ends with).
    Returns 0, or -1 when memory ran out (res then owns nothing)."""
    cdef Py_ssize_t r, j, cnt, n = 0
    cdef const float* row
    res.idx = NULL
    res.val = NULL
    res.cursor = 0
    res.rowcnt = <int64_t*>malloc(max(mr, 1) * sizeof(int64_t))
    if res.rowcnt == NULL:
        return -1
    for r in range(mr):
        row = pre + r * ld
        cnt = 0
        for j in range(c0, c1):
            cnt += row[j] > lo[j]
        res.rowcnt[r] = cnt
        n += cnt
    res.idx = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
    res.val = <float*>malloc(max(n, 1) * sizeof(float))
    if res.idx == NULL or res.val == NULL:
        free(res.idx); free(res.val); free(res.rowcnt)
        res.idx = NULL
        res.val = NULL
        res.rowcnt = NULL
        return -1
    n = 0
    for r in range(mr):
        row = pre + r * ld
        for j in range(c0, c1):
            if row[j] > lo[j]:
                res.idx[n] = <int32_t>j
                res.val[n] = row[j]
                n += 1
    return 0


def encode_probe(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
                 const float[::1] b_dec, const float[::1] lo, float[:, ::1] out,
                 Py_ssize_t tm, Py_ssize_t tn, int nthreads):
    """Row block 0 of the encoder's grid (rows ``0 : min(tm, N)``), dense
    ``pre`` of each ``tm x tn`` tile written into ``out[0:mr, :]`` (``out
    [>= mr, d_sae]``); returns how many entries are candidates (``pre >
    lo``). Tiles as :func:`encode_csr` computes them (same sgemm shapes)."""
    _check_dims(x.shape[0], W_enc.shape[0], W_enc.shape[1])
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if tm < 1 or tn < 1:
        raise ValueError("bad tiling")
    if lo.shape[0] != d_sae:
        raise ValueError("encode_probe: lo must have d_sae entries")
    cdef Py_ssize_t mr = min(tm, n)
    if out.shape[0] < mr or out.shape[1] != d_sae:
        raise ValueError("encode_probe: out must have at least min(tm, N) rows of d_sae")
    if mr == 0:
        return 0
    cdef Py_ssize_t ntiles = (d_sae + tn - 1) // tn, t, cs, nc
    xc_a = np.empty((mr, d_in), dtype=np.float32)
    cdef float[:, ::1] xc = xc_a
    cdef float* tile = NULL
    cdef int failed = 0
    cdef int64_t cnt = 0
    _center_rows(&x[0, 0], &b_dec[0], &xc[0, 0], mr, d_in)
    with nogil, parallel(num_threads=nthreads):
        tile = <float*>malloc(mr * min(tn, d_sae) * sizeof(float))
        for t in prange(ntiles, schedule="dynamic"):
            if tile == NULL:
                failed += 1
            else:
                cs = t * tn
                nc = min(tn, d_sae - cs)
                _sgemm_rm(<blas_int>mr, <blas_int>nc, <blas_int>d_in, 1.0, &xc[0, 0],
                          <blas_int>d_in, &W_enc[0, 0] + cs, <blas_int>d_sae, 0.0, tile,
                          <blas_int>nc)
                cnt += _probe_epilogue(tile, &b_enc[cs], &lo[cs], &out[0, 0] + cs, d_sae,
                                       mr, nc)
        free(tile)
    if failed:
        raise MemoryError("encode_probe: could not allocate a tile buffer")
    return int(cnt)


def encode_dense(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
                 const float[::1] b_dec, float[:, ::1] out, Py_ssize_t tm, Py_ssize_t tn,
                 int nthreads, Py_ssize_t row0=0):
    """``pre = (x - b_dec) @ W_enc + b_enc`` into ``out [N, d_sae]`` for rows
    ``row0:`` (rows before it are left as they are), one task per ``tm x
    tn`` tile: the product straight into ``out``, then the bias."""
    _check_dims(x.shape[0], W_enc.shape[0], W_enc.shape[1])
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if out.shape[0] != n or out.shape[1] != d_sae or tm < 1 or tn < 1:
        raise ValueError("bad output shape or tiling")
    if row0 < 0 or row0 > n:
        raise ValueError("row0 must be in [0, N]")
    cdef Py_ssize_t nrb = (n - row0 + tm - 1) // tm, ntiles = (d_sae + tn - 1) // tn
    cdef Py_ssize_t task, rb, r0, mr, c0, nc, r, j
    cdef float* xc = NULL
    cdef float* row
    cdef int failed = 0
    if nrb <= 0:
        return
    with nogil, parallel(num_threads=nthreads):
        xc = <float*>malloc(tm * d_in * sizeof(float))
        for task in prange(nrb * ntiles, schedule="dynamic"):
            if xc == NULL:
                failed += 1
            else:
                rb = task // ntiles
                r0 = row0 + rb * tm
                mr = min(tm, n - r0)
                c0 = (task % ntiles) * tn
                nc = min(tn, d_sae - c0)
                _center_rows(&x[0, 0] + r0 * d_in, &b_dec[0], xc, mr, d_in)
                _sgemm_rm(<blas_int>mr, <blas_int>nc, <blas_int>d_in, 1.0, xc,
                          <blas_int>d_in, &W_enc[0, 0] + c0, <blas_int>d_sae, 0.0,
                          &out[r0, c0], <blas_int>d_sae)
                for r in range(mr):
                    row = &out[r0 + r, c0]
                    for j in range(nc):
                        row[j] = row[j] + b_enc[c0 + j]
        free(xc)
    if failed:
        raise MemoryError("encode_dense: could not allocate a tile buffer")


def encode_csr(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
               const float[::1] b_dec, const float[::1] lo, Py_ssize_t tm, Py_ssize_t tn,
               Py_ssize_t chunks, int nthreads, const float[:, ::1] probe=None):
    """The candidates ``pre > lo`` (per feature) as canonical CSR:
    ``(indptr int64 [N+1], indices int32 [nnz], values float32 [nnz])``
    holding ``pre``. ``probe`` (``[min(tm, N), d_sae]`` from
    :func:`encode_probe` with the same ``tm, tn``): row block 0 compacted
    from it instead of computed."""
    _check_dims(x.shape[0], W_enc.shape[0], W_enc.shape[1])
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if tm < 1 or tn < 1 or chunks < 1:
        raise ValueError("bad tiling")
    if lo.shape[0] != d_sae:
        raise ValueError("encode_csr: lo must have d_sae entries")
    cdef bint use_probe = probe is not None
    if use_probe and (probe.shape[0] != min(tm, n) or probe.shape[1] != d_sae):
        raise ValueError("encode_csr: probe must have shape (min(tm, N), d_sae)")
    cdef const float* probe_p = &probe[0, 0] if use_probe and n > 0 else NULL
    cdef Py_ssize_t nrb = (n + tm - 1) // tm
    cdef Py_ssize_t ntiles = (d_sae + tn - 1) // tn
    chunks = min(chunks, ntiles)
    cdef Py_ssize_t per = (ntiles + chunks - 1) // chunks
    chunks = (ntiles + per - 1) // per
    cdef Py_ssize_t ntasks = nrb * chunks, task, rb, cc, r0, mr, c0, c1, r, cnt
    cdef _TaskOut* res = <_TaskOut*>malloc(max(ntasks, 1) * sizeof(_TaskOut))
    if res == NULL:
        raise MemoryError("encode_csr: out of memory")
    for task in range(ntasks):
        res[task].idx = NULL
        res[task].val = NULL
        res[task].rowcnt = NULL
    cdef float* xc = NULL
    cdef float* tile = NULL
    cdef int failed = 0
    cdef int64_t pos
    cdef int64_t[::1] indptr_v
    cdef int32_t[::1] idx_v
    cdef float[::1] val_v
    try:
        if ntasks:
            with nogil, parallel(num_threads=nthreads):
                xc = <float*>malloc(tm * d_in * sizeof(float))
                tile = <float*>malloc(tm * min(tn, d_sae) * sizeof(float))
                for task in prange(ntasks, schedule="dynamic"):
                    if xc == NULL or tile == NULL:
                        failed += 1
                    else:
                        rb = task // chunks
                        cc = task % chunks
                        r0 = rb * tm
                        mr = min(tm, n - r0)
                        c0 = cc * per * tn
                        c1 = min(d_sae, (cc + 1) * per * tn)
                        if rb == 0 and use_probe:
                            if _compact_task(probe_p, d_sae, &lo[0], mr, c0, c1,
                                             &res[task]) != 0:
                                failed += 1
                        elif _sparse_task(&x[0, 0], &W_enc[0, 0], &b_enc[0], &b_dec[0],
                                          &lo[0], d_in, d_sae, r0, mr, c0, c1, tn, xc, tile,
                                          &res[task]) != 0:
                            failed += 1
                free(xc)
                free(tile)
        if failed:
            raise MemoryError("encode_csr: out of memory")

        indptr = np.empty(n + 1, dtype=np.int64)
        indptr_v = indptr
        indptr_v[0] = 0
        for rb in range(nrb):
            r0 = rb * tm
            mr = min(tm, n - r0)
            for r in range(mr):
                cnt = 0
                for cc in range(chunks):
                    cnt += res[rb * chunks + cc].rowcnt[r]
                indptr_v[r0 + r + 1] = indptr_v[r0 + r] + cnt
        nnz = int(indptr_v[n])
        indices = np.empty(nnz, dtype=np.int32)
        values = np.empty(nnz, dtype=np.float32)
        idx_v = indices
        val_v = values
        if nnz:
            for rb in prange(nrb, nogil=True, num_threads=nthreads, schedule="dynamic"):
                r0 = rb * tm
                mr = min(tm, n - r0)
                for r in range(mr):
                    pos = indptr_v[r0 + r]
                    for cc in range(chunks):
                        task = rb * chunks + cc
                        cnt = res[task].rowcnt[r]
                        memcpy(&idx_v[0] + pos, res[task].idx + res[task].cursor,
                               cnt * sizeof(int32_t))
                        memcpy(&val_v[0] + pos, res[task].val + res[task].cursor,
                               cnt * sizeof(float))
                        res[task].cursor += cnt
                        pos = pos + cnt
        return indptr, indices, values
    finally:
        for task in range(ntasks):
            free(res[task].idx)
            free(res[task].val)
            free(res[task].rowcnt)
        free(res)


# ---------------------------------------------------------------- shared pieces
cdef int _column_sums(const float* a, Py_ssize_t n, Py_ssize_t d, Py_ssize_t lda,
                      double* out, int nthreads) noexcept nogil:
    """``out[k] = sum_i a[i, k]`` (``a [n, d]`` row-major, row stride ``lda``)
    in float64, rows in order (column blocks of ``_CB`` in parallel). Returns
    the failed buffer allocations."""
    cdef Py_ssize_t ncb = (d + _CB - 1) // _CB, cb, k0, nk, kk, i
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
                        cs[kk] += a[i * lda + k0 + kk]
                for kk in range(nk):
                    out[k0 + kk] = cs[kk]
        free(cs)
    return failed


cdef struct _Thr:
    # what the threshold update of feature j needs
    const float* theta
    float c_df       # float32(1 / bandwidth)
    float c_cnt      # float32(l0_coefficient / (bandwidth N))
    float* lt        # log_threshold (updated in place with Adam)
    float* tm
    float* tv
    float* g_lt      # gradients mode: written here instead


cdef inline float _g_log_threshold(const _Thr* th, Py_ssize_t j, double wsum,
                                   int64_t wcnt) noexcept nogil:
    """``theta_j * (-(theta_j / bw) * wsum - (l0c / (bw N)) * wcnt)``."""
    cdef float theta = th.theta[j]
    cdef double g = <double>(-(theta * th.c_df)) * wsum - <double>th.c_cnt * <double>wcnt
    return <float>(g * theta)


cdef struct _Ext:
    # the other sparsity modes and the pre-activation loss (``ext`` calls)
    int mode         # 0 "step", 1 "tanh", 2 "quadratic"
    double inv_bw    # 1 / bandwidth: quadratic's Step term
    double pn        # pre_act_coefficient / N: the pre-activation loss's theta term


cdef inline float _g_lt_ext(const _Thr* th, const _Ext* ex, Py_ssize_t j, double wsum,
                            int64_t wcnt, double wq, int64_t bcnt) noexcept nogil:
    """``theta_j * (-(theta_j / bw) * wsum - S_j + (p / N) * bcnt)`` with the
    Step term ``S_j``: ``(l0c / (bw N)) * wcnt`` ("step", as
    :func:`_g_log_threshold`), 0 ("tanh", its term is in ``wsum``),
    ``wq / bw`` ("quadratic": ``wq`` the window's sum of the rows' ``q_i``);
    ``bcnt`` the entries below theta of a dead feature (else 0)."""
    cdef float theta = th.theta[j]
    cdef double s
    if ex.mode == 0:
        s = <double>th.c_cnt * <double>wcnt
    elif ex.mode == 1:
        s = 0
    else:
        s = wq * ex.inv_bw
    cdef double g = <double>(-(theta * th.c_df)) * wsum - s + ex.pn * <double>bcnt
    return <float>(g * theta)


def _check_ext(int mode, double tanh_scale, double target_l0, stats, bint ext):
    """The sparsity mode's arguments (0 "step", 1 "tanh" with ``tanh_scale >
    0``, 2 "quadratic" with ``target_l0 > 0``) and, for an ``ext`` call, the
    float64 ``stats [2]`` output."""
    if mode not in (0, 1, 2):
        raise ValueError("jumprelu backward: mode must be 0 (step), 1 (tanh) or 2 (quadratic)")
    if mode == 1 and not tanh_scale > 0:
        raise ValueError("jumprelu backward: tanh_scale must be > 0")
    if mode == 2 and not target_l0 > 0:
        raise ValueError("jumprelu backward: target_l0 must be > 0")
    if ext and (stats is None or stats.shape[0] != 2):
        raise ValueError("jumprelu backward: stats must be float64 [2] for the other modes "
                         "and the pre-activation loss")


def _row_weights(row_ext_a, int mode, double l0_coefficient, double target_l0, Py_ssize_t n,
                 double[::1] stats):
    """After the row pass: ``stats[0]`` the sparsity sum (tanh: of
    ``tanh(s f)`` over the active entries; quadratic: of ``(L0_i - T)**2``),
    and quadratic's per-row ``q_i = 4 c (L0_i - T) / (N T)`` (float64
    ``[N]``; a length-1 placeholder otherwise)."""
    if mode == 1:
        stats[0] = float(row_ext_a.sum())
    elif mode == 2:
        err = row_ext_a - target_l0
        stats[0] = float(np.sum(err * err))
        return (4.0 * l0_coefficient / (max(n, 1) * target_l0)) * err
    return np.zeros(1, dtype=np.float64)


cdef inline Py_ssize_t _finish_feature(Py_ssize_t j, float* gd, float* w, Py_ssize_t d_out,
                                       bint adam, float* b_enc, float gbe, float* mW_dec,
                                       float* vW_dec, float* mb_enc, float* vb_enc,
                                       float* g_b_enc, const _Thr* th, float glt,
                                       const AdamConsts* c) noexcept nogil:
    """Feature j after its gradients: ``gd`` (its decoder row's gradient,
    ``d_out`` wide) is
    projected off ``w = W_dec[j]``; then Adam on the row (renormalized),
    ``b_enc[j]`` and ``log_threshold[j]``, or the gradients written out.
    Returns the non-finite updated parameters."""
    cdef double sq, gdot
    cdef float t, nrm, g
    cdef Py_ssize_t k, bad = 0
    sq = _dot_d(w, w, d_out)
    if sq > 0:
        gdot = _dot_d(gd, w, d_out)
        t = <float>(gdot / sq)
        for k in range(d_out):
            gd[k] -= t * w[k]
    if adam:
        bad += _adam(w, gd, mW_dec + j * d_out, vW_dec + j * d_out, d_out, c)
        nrm = <float>sqrt(_dot_d(w, w, d_out))
        if nrm > 0:
            for k in range(d_out):
                w[k] = w[k] / nrm
        g = gbe
        bad += _adam(&b_enc[j], &g, &mb_enc[j], &vb_enc[j], 1, c)
        bad += _adam(&th.lt[j], &glt, &th.tm[j], &th.tv[j], 1, c)
    else:
        g_b_enc[j] = gbe
        th.g_lt[j] = glt
    return bad


def _check_model(const float[:, ::1] x, const float[:, ::1] target,
                 const float[:, ::1] W_enc, const float[::1] b_enc,
                 const float[:, ::1] W_dec, const float[::1] b_dec, bint center, d_target,
                 bint adam, tuple moments):
    """The extents the backward passes index by, checked before any nogil
    code: ``x [N, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``target`` and ``d_target``
    (None or) ``[N, d_out]``, in ``adam`` mode the 8 moments of those shapes;
    centering subtracts ``b_dec`` from ``x``, so it needs ``d_out == d_in``.
    Returns ``(n, d_in, d_sae, d_out)``."""
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    cdef Py_ssize_t d_out = W_dec.shape[1]
    _check_dims(n, d_in, d_sae, d_out)
    if (W_enc.shape[0] != d_in or b_enc.shape[0] != d_sae or W_dec.shape[0] != d_sae
            or b_dec.shape[0] != d_out or target.shape[0] != n or target.shape[1] != d_out
            or (d_target is not None and tuple(d_target.shape) != (n, d_out))
            or (center and d_out != d_in)):
        raise ValueError("jumprelu backward: shape mismatch among x, the target and the "
                         "parameters")
    shapes = ((d_in, d_sae), (d_sae,), (d_sae, d_out), (d_out,)) * 2
    if adam and (len(moments) != 8
                 or any(tuple(np.shape(m)) != sh for m, sh in zip(moments, shapes))):
        raise ValueError("jumprelu backward: Adam moments of other shapes than the parameters")
    return n, d_in, d_sae, d_out


# ---------------------------------------------------------------- sparse backward
def sparse_backward(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
                    const float[:, ::1] W_dec, const float[::1] b_dec,
                    const int64_t[::1] indptr, const int32_t[::1] indices,
                    const float[::1] values, const float[::1] theta, const float[::1] hi,
                    double bandwidth, double l0_coefficient, const float[::1] log_threshold,
                    bint adam, tuple moments, const float[::1] adam_consts,
                    float[::1] threshold_m, float[::1] threshold_v,
                    int64_t[::1] fire_counts, int nthreads, tuple grads=None,
                    const float[:, ::1] target=None, bint center=True,
                    float[:, ::1] d_target=None, int mode=0, double tanh_scale=0.0,
                    double target_l0=0.0, const int64_t[::1] dead_idx=None,
                    const float[:, ::1] pa_g=None, const int64_t[::1] pa_cnt=None,
                    double pre_act=0.0, double[::1] stats=None,
                    uint16_t[::1] bf16_panels=None, float[:, ::1] bf16_transpose=None):
    """The JumpReLU backward on the candidates' CSR (``values`` = ``pre``,
    every entry ``pre > lo``; see the module docstring). ``bf16_panels``
    and ``bf16_transpose`` (both or neither; ``adam`` only): the bfloat16
    copy of ``W_enc`` (``kernels/c/bf16_encode.h``'s layout) that each
    feature block rewrites after its Adam update, as ``train_backward``.

    ``adam``: update ``W_enc, b_enc, W_dec, b_dec`` (``moments``: their 8
    Adam moments, ``m`` then ``v``) and ``log_threshold`` (``threshold_m``,
    ``threshold_v``) in place with ``adam_consts`` (float32 ``[8]``,
    ``numerics.adam_constants``), decoder rows renormalized; else write the
    gradients into ``grads`` = ``(g_W_enc, g_b_enc, g_W_dec, g_b_dec,
    g_log_threshold)``. ``fire_counts`` (int64 ``[d_sae]`` or None) gets the
    active rows of each feature. Returns ``(mse, nnz_active, bad)``.

    Transcoders: ``target [N, d_out]`` (None: ``x``) is what ``f @ W_dec +
    b_dec`` fits (``d_out = W_dec.shape[1]``); ``center`` False: the encoder
    read ``x`` uncentered (``xc = x``, no ``- W_enc @ g_b_enc`` in
    ``g_b_dec``); ``d_target`` (``[N, d_out]`` or None) receives
    ``dL/dx_hat``.

    Other sparsity modes (``mode`` 1 "tanh" with ``tanh_scale``, 2
    "quadratic" with ``target_l0``; 0, the default, is "step") and the
    pre-activation loss (``dead_idx`` int64 ``[n_dead]``, increasing, the
    dead features, with :func:`preact_dead`'s ``pa_g [n_dead, d_in]`` (its
    ``W_enc`` gradient) and ``pa_cnt [n_dead]`` (entries below theta), and
    ``pre_act`` the coefficient): tanh adds its term to ``d_f`` at the
    candidates in the row pass and drops the Step term; quadratic counts
    each row's active entries in the row pass and sums the rows' ``q_i``
    over each feature's window instead of counting it; the pre-activation
    loss adds ``-(p/N) * pa_cnt`` to ``g_b_enc`` (before ``g_b_dec``),
    ``(p/N) * pa_cnt`` to the threshold's gradient and ``pa_g`` to the
    feature's ``W_enc`` column. ``stats`` (float64 ``[2]``, required then)
    gets the sparsity sum in ``stats[0]`` (tanh: ``sum tanh(s f)``,
    quadratic: ``sum_i (L0_i - T)**2``) and 0 in ``stats[1]``. The default
    call runs exactly the step kernels."""
    if target is None:
        target = x
    cdef Py_ssize_t n, d_in, d_sae, d_out
    n, d_in, d_sae, d_out = _check_model(x, target, W_enc, b_enc, W_dec, b_dec, center,
                                         d_target, adam, moments)
    cdef bint has_pa = dead_idx is not None
    cdef bint ext = mode != 0 or has_pa
    _check_ext(mode, tanh_scale, target_l0, stats, ext)
    cdef Py_ssize_t nd = dead_idx.shape[0] if has_pa else 0
    if has_pa:
        dix = np.asarray(dead_idx)
        if (pa_g is None or pa_cnt is None or nd == 0 or pa_g.shape[0] != nd
                or pa_g.shape[1] != d_in or pa_cnt.shape[0] != nd or dix[0] < 0
                or dix[nd - 1] >= d_sae or (nd > 1 and not np.all(np.diff(dix) > 0))):
            raise ValueError("sparse_backward: dead_idx must be increasing feature indices "
                             "with pa_g [n_dead, d_in] and pa_cnt [n_dead]")
    if (indptr.shape[0] != n + 1 or theta.shape[0] != d_sae or hi.shape[0] != d_sae
            or log_threshold.shape[0] != d_sae):
        raise ValueError("sparse_backward: CSR or window shape mismatch")
    cdef bint copy = bf16_panels is not None
    if copy != (bf16_transpose is not None) or (copy and not adam):
        raise ValueError("sparse_backward: bf16_panels and bf16_transpose go together, "
                         "with adam")
    if copy and (bf16_panels.shape[0] != fs_bf16_packed_size(d_in, d_sae)
                 or bf16_transpose.shape[0] != d_sae or bf16_transpose.shape[1] != d_in):
        raise ValueError("sparse_backward: the bf16 copy does not match W_enc's shape")
    cdef uint16_t* pan = &bf16_panels[0] if copy else NULL
    cdef float* wtr = &bf16_transpose[0, 0] if copy else NULL
    cdef Py_ssize_t K2 = (d_in + 1) // 2, pb
    cdef Py_ssize_t nnz = indptr[n]
    if nnz < 0 or indices.shape[0] < nnz or values.shape[0] < nnz:
        raise ValueError("sparse_backward: CSR arrays shorter than indptr[N]")
    cdef AdamConsts c
    cdef float[:, ::1] mW_enc, mW_dec, vW_enc, vW_dec, gWe, gWd
    cdef float[::1] mb_enc, mb_dec, vb_enc, vb_dec, gbe_o, gbd_o, glt_o
    if adam:
        if adam_consts is None or adam_consts.shape[0] != 8:
            raise ValueError("sparse_backward: adam_consts must hold the 8 adam_constants")
        if threshold_m is None or threshold_v is None or threshold_m.shape[0] != d_sae \
                or threshold_v.shape[0] != d_sae:
            raise ValueError("sparse_backward: threshold moments must be [d_sae]")
        c = _adam_consts(&adam_consts[0])
        mW_enc, mb_enc, mW_dec, mb_dec, vW_enc, vb_enc, vW_dec, vb_dec = moments
    else:
        gWe, gbe_o, gWd, gbd_o, glt_o = grads
        if (gWe.shape[0] != d_in or gWe.shape[1] != d_sae or gWd.shape[0] != d_sae
                or gWd.shape[1] != d_out or gbe_o.shape[0] != d_sae
                or gbd_o.shape[0] != d_out or glt_o.shape[0] != d_sae):
            raise ValueError("sparse_backward: gradient buffer shape mismatch")
    # raw pointers (parameters written only in adam mode, where the front made
    # sure they are writeable)
    cdef float* pWe = <float*>&W_enc[0, 0]
    cdef float* pbe = <float*>&b_enc[0]
    cdef float* pWd = <float*>&W_dec[0, 0]
    cdef float* pbd = <float*>&b_dec[0]

    # row i: d_xhat_i then xc_i (one contiguous d_out + d_in run per row, gathered
    # together in the feature pass)
    dxc_a = np.empty((n, d_out + d_in), dtype=np.float32)
    row_sq_a = np.empty(n, dtype=np.float64)
    df_a = np.empty(max(nnz, 1), dtype=np.float32)
    cdef float[:, ::1] dxc = dxc_a
    cdef double[::1] row_sq = row_sq_a
    cdef float[::1] df = df_a
    cdef Py_ssize_t i, k, e, j, p
    cdef float nf = <float>n
    cdef float v, tv
    cdef float* xh
    # tanh: d_f += ct (1 - tanh(ts f)^2); row_ext: tanh's per-row sum, quadratic's L0_i
    cdef float ts = <float>tanh_scale
    cdef float ct = <float>(l0_coefficient * tanh_scale / n) if mode == 1 and n else 0
    row_ext_a = np.zeros(n if mode != 0 else 1, dtype=np.float64)
    cdef double[::1] row_ext = row_ext_a

    # 1. row pass: x_hat from the active entries, d_xhat, xc, d_f at candidates
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="guided"):
        xh = &dxc[i, 0]
        for k in range(d_out):
            xh[k] = b_dec[k]
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            v = values[e]
            if v > theta[j]:
                _axpy(v, &W_dec[j, 0], xh, d_out)
        for k in range(d_out):
            xh[k] = xh[k] - target[i, k]
        row_sq[i] = _dot_d(xh, xh, d_out)
        for k in range(d_out):
            xh[k] = (2.0 * xh[k]) / nf
        for k in range(d_in):
            xh[d_out + k] = x[i, k] - b_dec[k] if center else x[i, k]
        for e in range(indptr[i], indptr[i + 1]):
            df[e] = _dot(xh, &W_dec[indices[e], 0], d_out)
        if mode == 1:
            for e in range(indptr[i], indptr[i + 1]):
                v = values[e]
                if v > theta[indices[e]]:
                    tv = tanhf(ts * v)
                    row_ext[i] += tv
                else:
                    tv = 0
                df[e] = df[e] + ct * (1 - tv * tv)
        elif mode == 2:
            for e in range(indptr[i], indptr[i + 1]):
                if values[e] > theta[indices[e]]:
                    row_ext[i] += 1
    mse = float(row_sq_a.sum()) / n if n else 0.0
    q_a = _row_weights(row_ext_a, mode, l0_coefficient, target_l0, n, stats) if ext else None

    # 2. CSC of the active entries (stable: row order), per-feature sums
    colptr_a = np.zeros(d_sae + 1, dtype=np.int64)
    cdef int64_t[::1] colptr = colptr_a
    with nogil:
        for e in range(nnz):
            j = indices[e]
            if values[e] > theta[j]:
                colptr[j + 1] += 1
        for j in range(d_sae):
            colptr[j + 1] += colptr[j]
    cdef Py_ssize_t nact = colptr[d_sae]
    rows_a = np.empty(max(nact, 1), dtype=np.int32)
    cf_a = np.empty(max(nact, 1), dtype=np.float32)
    cdp_a = np.empty(max(nact, 1), dtype=np.float32)
    gbe_a = np.zeros(d_sae, dtype=np.float64)
    wsum_a = np.zeros(d_sae, dtype=np.float64)
    wcnt_a = np.zeros(d_sae, dtype=np.int64)
    fill_a = colptr_a[:d_sae].copy()
    cdef int32_t[::1] rows = rows_a
    cdef float[::1] cf = cf_a, cdp = cdp_a
    cdef double[::1] gbe = gbe_a, wsum = wsum_a
    cdef int64_t[::1] wcnt = wcnt_a, fill = fill_a
    # quadratic: the window's sums of q_i; the pre-activation loss: per feature, the
    # entries below theta (dead features) and the row of pa_g (-1: not dead)
    wq_a = np.zeros(d_sae if mode == 2 else 1, dtype=np.float64)
    bcnt_a = np.zeros(d_sae if has_pa else 1, dtype=np.int64)
    dpos_a = np.full(d_sae if has_pa else 1, -1, dtype=np.int32)
    cdef double[::1] wq = wq_a
    cdef const double[::1] qrow = q_a if mode == 2 else wq_a
    cdef int64_t[::1] bcnt = bcnt_a
    cdef int32_t[::1] dpos = dpos_a
    cdef double qi
    with nogil:
        for i in range(n):
            if mode == 2:  # the step's loop, plus q_i summed over the window
                qi = qrow[i]
                for e in range(indptr[i], indptr[i + 1]):
                    j = indices[e]
                    v = values[e]
                    if v > theta[j]:
                        p = fill[j]
                        rows[p] = <int32_t>i
                        cf[p] = v
                        cdp[p] = df[e]
                        fill[j] = p + 1
                        gbe[j] += df[e]
                    if v < hi[j]:
                        wsum[j] += df[e]
                        wcnt[j] += 1
                        wq[j] += qi
                continue
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                v = values[e]
                if v > theta[j]:
                    p = fill[j]
                    rows[p] = <int32_t>i
                    cf[p] = v
                    cdp[p] = df[e]
                    fill[j] = p + 1
                    gbe[j] += df[e]
                if v < hi[j]:
                    wsum[j] += df[e]
                    wcnt[j] += 1
        if fire_counts is not None:
            for j in range(d_sae):
                fire_counts[j] += colptr[j + 1] - colptr[j]
    cdef double pn = pre_act / n if has_pa and n else 0.0
    if has_pa:  # the pre-activation loss's d_pre in g_b_enc, before g_b_dec uses it
        cnt_np = np.asarray(pa_cnt)
        gbe_a[dix] -= pn * cnt_np
        bcnt_a[dix] = cnt_np
        dpos_a[dix] = np.arange(nd, dtype=np.int32)
    g_b_enc32_a = gbe_a.astype(np.float32)
    cdef float[::1] g_b_enc32 = g_b_enc32_a

    # 3. g_b_dec = colsum(d_xhat) - W_enc @ g_b_enc (W_enc before any update; the second
    #    term only when centering)
    cs_a = np.empty(d_out, dtype=np.float64)
    g_b_dec_a = np.empty(d_out, dtype=np.float32)
    cdef double[::1] cs = cs_a
    cdef float[::1] g_b_dec = g_b_dec_a
    cdef int failed = 0
    with nogil:
        if n:
            failed += _column_sums(&dxc[0, 0], n, d_out, d_out + d_in, &cs[0], nthreads)
        else:
            for k in range(d_out):
                cs[k] = 0
    if failed:
        raise MemoryError("sparse_backward: could not allocate a column buffer")
    if center:
        for k in prange(d_in, nogil=True, num_threads=nthreads, schedule="static"):
            g_b_dec[k] = <float>cs[k] - _dot(&W_enc[k, 0], &g_b_enc32[0], d_sae)
    else:
        for k in range(d_out):
            g_b_dec[k] = <float>cs[k]
    if d_target is not None:
        np.asarray(d_target)[...] = dxc_a[:, :d_out]

    # 4. feature pass
    cdef _Thr th
    th.theta = &theta[0]
    th.c_df = <float>(1.0 / bandwidth)
    th.c_cnt = <float>((1.0 / bandwidth) * l0_coefficient / n) if n else 0
    th.lt = <float*>&log_threshold[0]
    th.tm = &threshold_m[0] if adam else NULL
    th.tv = &threshold_v[0] if adam else NULL
    th.g_lt = &glt_o[0] if not adam else NULL
    cdef float* o_mWd = &mW_dec[0, 0] if adam else NULL
    cdef float* o_vWd = &vW_dec[0, 0] if adam else NULL
    cdef float* o_mbe = &mb_enc[0] if adam else NULL
    cdef float* o_vbe = &vb_enc[0] if adam else NULL
    cdef float* o_gbe = &gbe_o[0] if not adam else NULL
    cdef float* o_gWd = &gWd[0, 0] if not adam else NULL
    cdef float* o_gWe = &gWe[0, 0] if not adam else NULL
    cdef float* o_mWe = &mW_enc[0, 0] if adam else NULL
    cdef float* o_vWe = &vW_enc[0, 0] if adam else NULL
    cdef Py_ssize_t nblocks = (d_sae + _FB - 1) // _FB, jb, j0, nb, jj, q, r
    cdef float* acc = NULL
    cdef float* gd = NULL
    cdef float* g
    cdef float* w
    cdef float fv, dp, glt
    cdef Py_ssize_t bad = 0
    cdef _Ext ex
    ex.mode = mode
    ex.inv_bw = 1.0 / bandwidth
    ex.pn = pn
    cdef const float[:, ::1] pag = pa_g if has_pa else np.zeros((1, 1), dtype=np.float32)
    cdef int32_t dj
    with nogil, parallel(num_threads=nthreads):
        acc = <float*>malloc(_FB * d_in * sizeof(float))
        gd = <float*>malloc(max(d_out, <Py_ssize_t>_FB) * sizeof(float))
        for jb in prange(nblocks, schedule="dynamic"):
            if acc == NULL or gd == NULL:
                failed += 1
            else:
                j0 = jb * _FB
                nb = min(<Py_ssize_t>_FB, d_sae - j0)
                memset(acc, 0, _FB * d_in * sizeof(float))
                for jj in range(nb):
                    j = j0 + jj
                    g = gd if adam else o_gWd + j * d_out
                    memset(g, 0, d_out * sizeof(float))
                    for q in range(colptr[j], colptr[j + 1]):
                        r = rows[q]
                        _axpy(cf[q], &dxc[r, 0], g, d_out)
                        dp = cdp[q]
                        if dp != 0:
                            _axpy(dp, &dxc[r, d_out], acc + jj * d_in, d_in)
                    if ext:
                        if has_pa:  # the pre-activation loss's W_enc column
                            dj = dpos[j]
                            if dj >= 0:
                                _axpy(1.0, &pag[dj, 0], acc + jj * d_in, d_in)
                        glt = _g_lt_ext(&th, &ex, j, wsum[j], wcnt[j],
                                        wq[j] if mode == 2 else 0.0,
                                        bcnt[j] if has_pa else 0)
                    else:
                        glt = _g_log_threshold(&th, j, wsum[j], wcnt[j])
                    w = pWd + j * d_out
                    bad += _finish_feature(j, g, w, d_out, adam, pbe, g_b_enc32[j], o_mWd,
                                           o_vWd, o_mbe, o_vbe, o_gbe, &th, glt, &c)
                if adam:
                    for k in range(d_in):  # the block's W_enc columns (contiguous)
                        for jj in range(nb):
                            gd[jj] = acc[jj * d_in + k]
                        bad += _adam(pWe + k * d_sae + j0, gd, o_mWe + k * d_sae + j0,
                                     o_vWe + k * d_sae + j0, nb, &c)
                    if pan != NULL:  # the updated columns, 16 features per panel
                        for k in range(d_in):
                            for jj in range(nb):
                                acc[jj * d_in + k] = pWe[k * d_sae + j0 + jj]
                        for pb in range(0, nb, 16):
                            _write_copy(acc + pb * d_in, min(<Py_ssize_t>16, nb - pb), d_in,
                                        K2, pan + ((j0 + pb) // 16) * K2 * 32,
                                        wtr + (j0 + pb) * d_in)
                else:
                    for k in range(d_in):
                        for jj in range(nb):
                            o_gWe[k * d_sae + j0 + jj] = acc[jj * d_in + k]
        free(acc)
        free(gd)
    if failed:
        raise MemoryError("sparse_backward: could not allocate a block buffer "
                          "(parameters may be partly updated)")
    if adam:
        bad += _adam(pbd, &g_b_dec[0], &mb_dec[0], &vb_dec[0], d_out, &c)
    else:
        gbd_o[:] = g_b_dec
    if ext:
        stats[1] = 0.0
        if mode == 0:
            stats[0] = 0.0
    return mse, int(nact), int(bad)


# ---------------------------------------------------------------- dense backward
cdef struct _DBufs:
    float* dp      # [rc, fb] d_f then d_pre
    float* fo      # [rc, fb] f
    double* gbe    # [fb]
    double* gws    # [fb]
    int64_t* wcn   # [fb]
    int64_t* acn   # [fb]
    float* gd      # [fb, d_out] g_W_dec block (adam mode)
    float* ge      # [d_in, fb] g_W_enc block, column-major nb x d_in (adam mode)
    double* wq     # [fb] quadratic: window sums of q_i  (these four: ext calls only)
    int64_t* bcn   # [fb] pre-activation loss: entries below theta
    double* tsum   # [fb] tanh: sum of tanh(s f)
    double* asum   # [fb] pre-activation loss: sum of theta - pre below theta


cdef _DBufs _dalloc(Py_ssize_t rc, Py_ssize_t fb, Py_ssize_t d_in, Py_ssize_t d_out,
                    bint adam, bint ext) noexcept nogil:
    cdef _DBufs b
    b.wq = <double*>malloc(fb * sizeof(double)) if ext else NULL
    b.bcn = <int64_t*>malloc(fb * sizeof(int64_t)) if ext else NULL
    b.tsum = <double*>malloc(fb * sizeof(double)) if ext else NULL
    b.asum = <double*>malloc(fb * sizeof(double)) if ext else NULL
    b.dp = <float*>malloc(rc * fb * sizeof(float))
    b.fo = <float*>malloc(rc * fb * sizeof(float))
    b.gbe = <double*>malloc(fb * sizeof(double))
    b.gws = <double*>malloc(fb * sizeof(double))
    b.wcn = <int64_t*>malloc(fb * sizeof(int64_t))
    b.acn = <int64_t*>malloc(fb * sizeof(int64_t))
    b.gd = <float*>malloc(fb * d_out * sizeof(float)) if adam else NULL
    b.ge = <float*>malloc(fb * d_in * sizeof(float)) if adam else NULL
    return b


cdef bint _dok(const _DBufs* b, bint adam, bint ext) noexcept nogil:
    return (b.dp != NULL and b.fo != NULL and b.gbe != NULL and b.gws != NULL
            and b.wcn != NULL and b.acn != NULL
            and (not adam or (b.gd != NULL and b.ge != NULL))
            and (not ext or (b.wq != NULL and b.bcn != NULL and b.tsum != NULL
                             and b.asum != NULL)))


cdef void _dfree(_DBufs* b) noexcept nogil:
    free(b.dp); free(b.fo); free(b.gbe); free(b.gws); free(b.wcn); free(b.acn)
    free(b.gd); free(b.ge); free(b.wq); free(b.bcn); free(b.tsum); free(b.asum)


cdef inline void _gemm(char ta, char tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                       const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                       float beta, float* C, Py_ssize_t ldc) noexcept nogil:
    """Column-major ``C[m, n] = op(A) @ op(B) + beta C`` (BLAS sgemm, alpha 1)."""
    cdef blas_int bm = <blas_int>m, bn = <blas_int>n, bk = <blas_int>k
    cdef blas_int la = <blas_int>lda, lb = <blas_int>ldb, lc = <blas_int>ldc
    cdef float alpha = 1.0
    sgemm(&ta, &tb, &bm, &bn, &bk, &alpha, <float*>A, &la, <float*>B, &lb, &beta, C, &lc)


# ---------------------------------------------------------------- pre-activation loss
def preact_dead(const float[:, ::1] xc, const float[:, ::1] W_dead, const float[::1] b_dead,
                const float[::1] theta_dead, double pre_act, Py_ssize_t rc, Py_ssize_t nb,
                int nthreads):
    """The pre-activation loss of the sparse path, dense over the dead
    features only: ``xc [N, d_in]`` the encoder input (``x - b_dec``, a
    transcoder's ``x``), ``W_dead = W_enc[:, dead]`` (C-contiguous ``[d_in,
    n_dead]``), ``b_dead``, ``theta_dead`` their biases and thresholds. Per
    block of ``nb`` dead features (in parallel; rows in chunks of ``rc``, in
    order): ``P = xc @ W_dead[:, blk] + b_dead`` (sgemm), ``below = P <
    theta``, ``B = -(p/N) * below`` (float32, as the reference's ``d_pre``
    term) and ``G[blk] (+)= (xc.T @ B).T`` (sgemm). Returns ``(G float32
    [n_dead, d_in], cnt int64 [n_dead] (entries below theta), asum)``, with
    ``asum = sum (theta - P)`` over the entries below theta (float64, per
    feature then in order): the loss is ``p * asum / N``. Grid fixed by the
    caller from the shape: results do not depend on the threads."""
    cdef Py_ssize_t n = xc.shape[0], d_in = xc.shape[1], nd = W_dead.shape[1]
    _check_dims(n, d_in, nd)
    if (W_dead.shape[0] != d_in or b_dead.shape[0] != nd or theta_dead.shape[0] != nd
            or n < 1 or nd < 1 or d_in < 1):
        raise ValueError("preact_dead: shape mismatch (or no rows, features or inputs)")
    if rc < 1 or nb < 1:
        raise ValueError("preact_dead: block sizes must be >= 1")
    G_a = np.empty((nd, d_in), dtype=np.float32)
    cnt_a = np.zeros(nd, dtype=np.int64)
    asum_a = np.zeros(nd, dtype=np.float64)
    cdef float[:, ::1] G = G_a
    cdef int64_t[::1] cnt = cnt_a
    cdef double[::1] asum = asum_a
    cdef float npn = -<float>(pre_act / n)
    cdef Py_ssize_t nblocks = (nd + nb - 1) // nb, jb, j0, m, c0, rcn
    cdef Py_ssize_t rcb = min(rc, n), nbb = min(nb, nd)
    cdef float* buf = NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        buf = <float*>malloc(rcb * nbb * sizeof(float))
        for jb in prange(nblocks, schedule="dynamic"):
            if buf == NULL:
                failed += 1
            else:
                j0 = jb * nb
                m = min(nb, nd - j0)
                c0 = 0
                while c0 < n:
                    rcn = min(rc, n - c0)
                    _sgemm_rm(<blas_int>rcn, <blas_int>m, <blas_int>d_in, 1.0, &xc[c0, 0],
                              <blas_int>d_in, &W_dead[0, j0], <blas_int>nd, 0.0, buf,
                              <blas_int>m)
                    _preact_epilogue(buf, m, &b_dead[j0], &theta_dead[j0], npn, &cnt[j0],
                                     &asum[j0], rcn)
                    # G[blk] (+)= B.T @ xc[c0:]: column-major d_in x m (ld d_in)
                    _gemm(b'N', b'T', d_in, m, rcn, &xc[c0, 0], d_in, buf, m,
                          0.0 if c0 == 0 else 1.0, &G[j0, 0], d_in)
                    c0 = c0 + rcn
        free(buf)
    if failed:
        raise MemoryError("preact_dead: could not allocate a block buffer")
    return G_a, cnt_a, float(asum_a.sum())


def dense_backward(const float[:, ::1] x, const float[:, ::1] pre,
                   const float[:, ::1] W_enc, const float[::1] b_enc,
                   const float[:, ::1] W_dec, const float[::1] b_dec,
                   const float[::1] theta, const float[::1] lo, const float[::1] hi,
                   double bandwidth, double l0_coefficient, const float[::1] log_threshold,
                   bint adam, tuple moments, const float[::1] adam_consts,
                   float[::1] threshold_m, float[::1] threshold_v,
                   int64_t[::1] fire_counts, Py_ssize_t tm, Py_ssize_t fb, Py_ssize_t rc,
                   int nthreads, tuple grads=None, const float[:, ::1] target=None,
                   bint center=True, float[:, ::1] d_target=None, int mode=0,
                   double tanh_scale=0.0, double target_l0=0.0,
                   const unsigned char[::1] dead=None, double pre_act=0.0,
                   double[::1] stats=None):
    """:func:`sparse_backward` from the dense ``pre [N, d_sae]`` with BLAS
    products (see the module docstring); grid: row chunks of ``tm`` (row
    pass), feature blocks of ``fb`` with row chunks of ``rc`` (feature
    pass), fixed by the wrapper from the shape. Same arguments (transcoders'
    ``target``, ``center``, ``d_target`` included) and result otherwise.

    Other sparsity modes (``mode``, ``tanh_scale``, ``target_l0`` as
    :func:`sparse_backward`) and the pre-activation loss (``dead``: uint8
    ``[d_sae]``, nonzero for the dead features, or None; ``pre_act`` its
    coefficient): quadratic counts each row's active entries in the row
    pass; the feature pass then runs the other epilogue
    (``fastsae_jr_dense_epilogue_ext``: tanh's term in ``d_f``, quadratic's
    window sums of ``q_i``, ``d_pre = -p/N`` at a dead feature's entries
    below theta, in the same pass over ``pre``). ``stats`` (float64 ``[2]``,
    required then): the sparsity sum as :func:`sparse_backward`, and
    ``stats[1]`` the pre-activation loss's ``sum (theta - pre)`` below theta
    over the dead features."""
    if target is None:
        target = x
    cdef Py_ssize_t n, d_in, d_sae, d_out
    n, d_in, d_sae, d_out = _check_model(x, target, W_enc, b_enc, W_dec, b_dec, center,
                                         d_target, adam, moments)
    cdef bint has_pa = dead is not None
    cdef bint ext = mode != 0 or has_pa
    _check_ext(mode, tanh_scale, target_l0, stats, ext)
    if has_pa and dead.shape[0] != d_sae:
        raise ValueError("dense_backward: dead must have d_sae entries")
    if tm < 1 or fb < 1 or rc < 1:
        raise ValueError("dense_backward: block sizes must be >= 1")
    if (pre.shape[0] != n or pre.shape[1] != d_sae or theta.shape[0] != d_sae
            or lo.shape[0] != d_sae or hi.shape[0] != d_sae
            or log_threshold.shape[0] != d_sae):
        raise ValueError("dense_backward: pre or window shape mismatch")
    if n == 0:
        raise ValueError("dense_backward: no rows")
    cdef AdamConsts c
    cdef float[:, ::1] mW_enc, mW_dec, vW_enc, vW_dec, gWe, gWd
    cdef float[::1] mb_enc, mb_dec, vb_enc, vb_dec, gbe_o, gbd_o, glt_o
    if adam:
        if adam_consts is None or adam_consts.shape[0] != 8:
            raise ValueError("dense_backward: adam_consts must hold the 8 adam_constants")
        if threshold_m is None or threshold_v is None or threshold_m.shape[0] != d_sae \
                or threshold_v.shape[0] != d_sae:
            raise ValueError("dense_backward: threshold moments must be [d_sae]")
        c = _adam_consts(&adam_consts[0])
        mW_enc, mb_enc, mW_dec, mb_dec, vW_enc, vb_enc, vW_dec, vb_dec = moments
    else:
        gWe, gbe_o, gWd, gbd_o, glt_o = grads
        if (gWe.shape[0] != d_in or gWe.shape[1] != d_sae or gWd.shape[0] != d_sae
                or gWd.shape[1] != d_out or gbe_o.shape[0] != d_sae
                or gbd_o.shape[0] != d_out or glt_o.shape[0] != d_sae):
            raise ValueError("dense_backward: gradient buffer shape mismatch")
    cdef float* pWe = <float*>&W_enc[0, 0]
    cdef float* pbe = <float*>&b_enc[0]
    cdef float* pWd = <float*>&W_dec[0, 0]
    cdef float* pbd = <float*>&b_dec[0]
    cdef const float* P = &pre[0, 0]

    d_xhat_a = np.empty((n, d_out), dtype=np.float32)
    # x - b_dec, or a transcoder's encoder input x as it is
    xc_a = np.empty((n, d_in), dtype=np.float32) if center else np.asarray(x)
    row_sq_a = np.empty(n, dtype=np.float64)
    cdef float[:, ::1] d_xhat = d_xhat_a
    cdef const float[:, ::1] xc = xc_a
    cdef float* xcw = <float*>&xc[0, 0] if center else NULL
    cdef double[::1] row_sq = row_sq_a
    cdef float nf = <float>n
    cdef Py_ssize_t nrb = (n + tm - 1) // tm, rb, r0, mr, i, k
    cdef float* fbuf = NULL
    cdef int failed = 0
    cdef float* xh
    row_ext_a = np.zeros(n if mode == 2 else 1, dtype=np.float64)  # quadratic: L0_i
    cdef double[::1] row_ext = row_ext_a

    # 1. row pass: f of each row chunk in a buffer, x_hat = f @ W_dec + b_dec
    with nogil, parallel(num_threads=nthreads):
        fbuf = <float*>malloc(min(tm, n) * d_sae * sizeof(float))
        for rb in prange(nrb, schedule="dynamic"):
            if fbuf == NULL:
                failed += 1
            else:
                r0 = rb * tm
                mr = min(tm, n - r0)
                _mask_f(P + r0 * d_sae, d_sae, &theta[0], fbuf, d_sae, mr, d_sae)
                _sgemm_rm(<blas_int>mr, <blas_int>d_out, <blas_int>d_sae, 1.0, fbuf,
                          <blas_int>d_sae, &W_dec[0, 0], <blas_int>d_out, 0.0, &d_xhat[r0, 0],
                          <blas_int>d_out)
                for i in range(r0, r0 + mr):
                    xh = &d_xhat[i, 0]
                    for k in range(d_out):
                        xh[k] = (xh[k] + b_dec[k]) - target[i, k]
                    row_sq[i] = _dot_d(xh, xh, d_out)
                    for k in range(d_out):
                        xh[k] = (2.0 * xh[k]) / nf
                    if center:
                        for k in range(d_in):
                            xcw[i * d_in + k] = x[i, k] - b_dec[k]
                    if mode == 2:
                        row_ext[i] = <double>_count_active(P + i * d_sae, &theta[0], d_sae)
        free(fbuf)
    if failed:
        raise MemoryError("dense_backward: could not allocate a row buffer")
    mse = float(row_sq_a.sum()) / n
    q_a = _row_weights(row_ext_a, mode, l0_coefficient, target_l0, n, stats) if ext else None
    cdef const double[::1] qrow = q_a if mode == 2 else row_ext_a
    cdef const double* qp = &qrow[0] if mode == 2 else NULL
    cdef const unsigned char* deadp = &dead[0] if has_pa else NULL
    cdef float ts = <float>tanh_scale
    cdef float ct = <float>(l0_coefficient * tanh_scale / n) if mode == 1 else 0
    cdef float npn = -<float>(pre_act / n) if has_pa else 0
    cdef _Ext ex
    ex.mode = mode
    ex.inv_bw = 1.0 / bandwidth
    ex.pn = pre_act / n if has_pa else 0.0

    cs_a = np.empty(d_out, dtype=np.float64)
    cdef double[::1] cs = cs_a
    with nogil:
        failed += _column_sums(&d_xhat[0, 0], n, d_out, d_out, &cs[0], nthreads)
    if failed:
        raise MemoryError("dense_backward: could not allocate a column buffer")

    # 2. feature pass
    cdef _Thr th
    th.theta = &theta[0]
    th.c_df = <float>(1.0 / bandwidth)
    th.c_cnt = <float>((1.0 / bandwidth) * l0_coefficient / n)
    th.lt = <float*>&log_threshold[0]
    th.tm = &threshold_m[0] if adam else NULL
    th.tv = &threshold_v[0] if adam else NULL
    th.g_lt = &glt_o[0] if not adam else NULL
    cdef float* o_mWd = &mW_dec[0, 0] if adam else NULL
    cdef float* o_vWd = &vW_dec[0, 0] if adam else NULL
    cdef float* o_mbe = &mb_enc[0] if adam else NULL
    cdef float* o_vbe = &vb_enc[0] if adam else NULL
    cdef float* o_gbe = &gbe_o[0] if not adam else NULL
    cdef float* o_gWd = &gWd[0, 0] if not adam else NULL
    cdef float* o_gWe = &gWe[0, 0] if not adam else NULL
    cdef float* o_mWe = &mW_enc[0, 0] if adam else NULL
    cdef float* o_vWe = &vW_enc[0, 0] if adam else NULL
    cdef Py_ssize_t nblocks = (d_sae + fb - 1) // fb, jb, j0, nb, jj, j, c0, rcn
    counts_a = np.empty(d_sae, dtype=np.int64)
    part_a = np.empty((nblocks, d_in), dtype=np.float64)
    # ext: per feature block, the tanh sum and the pre-activation loss's sum
    bpart_a = np.zeros((nblocks if ext else 1, 2), dtype=np.float64)
    cdef double[:, ::1] bpart = bpart_a
    gb32_a = np.empty(d_sae, dtype=np.float32)
    cdef int64_t[::1] counts = counts_a
    cdef double[:, ::1] part = part_a
    cdef float[::1] gb32 = gb32_a
    cdef Py_ssize_t bad = 0
    cdef Py_ssize_t rcb = min(rc, n), fbb = min(fb, d_sae)
    cdef _DBufs b
    cdef float* gd
    cdef float* ge
    cdef Py_ssize_t ldge
    cdef float beta, glt
    with nogil, parallel(num_threads=nthreads):
        b = _dalloc(rcb, fbb, d_in, d_out, adam, ext)
        for jb in prange(nblocks, schedule="dynamic"):
            if not _dok(&b, adam, ext):
                failed += 1
            else:
                j0 = jb * fb
                nb = min(fb, d_sae - j0)
                if adam:
                    gd = b.gd
                    ge = b.ge
                    ldge = nb
                else:
                    gd = o_gWd + j0 * d_out
                    ge = o_gWe + j0
                    ldge = d_sae
                for jj in range(nb):
                    b.gbe[jj] = 0
                    b.gws[jj] = 0
                    b.wcn[jj] = 0
                    b.acn[jj] = 0
                if ext:
                    for jj in range(nb):
                        b.wq[jj] = 0
                        b.bcn[jj] = 0
                        b.tsum[jj] = 0
                        b.asum[jj] = 0
                c0 = 0
                while c0 < n:
                    rcn = min(rc, n - c0)
                    beta = 0.0 if c0 == 0 else 1.0
                    # d_f chunk [rcn, nb] = d_xhat[c0:] @ W_dec[blk].T
                    _gemm(b'T', b'N', nb, rcn, d_out, &W_dec[j0, 0], d_out, &d_xhat[c0, 0],
                          d_out, 0.0, b.dp, nb)
                    if ext:
                        _dense_epilogue_ext(b.dp, P + c0 * d_sae + j0, d_sae, &theta[j0],
                                            &lo[j0], &hi[j0], b.fo, b.gbe, b.gws, b.wcn,
                                            b.acn, b.wq, b.bcn, b.tsum, b.asum, rcn, nb, mode,
                                            ts, ct, qp + c0 if mode == 2 else NULL,
                                            deadp + j0 if has_pa else NULL, npn)
                    else:
                        _dense_epilogue(b.dp, P + c0 * d_sae + j0, d_sae, &theta[j0],
                                        &lo[j0], &hi[j0], b.fo, b.gbe, b.gws, b.wcn, b.acn,
                                        rcn, nb)
                    # g_W_dec[blk] (+)= f.T @ d_xhat[c0:]  (column-major d_out x nb)
                    _gemm(b'N', b'T', d_out, nb, rcn, &d_xhat[c0, 0], d_out, b.fo, nb, beta,
                          gd, d_out)
                    # g_W_enc[:, blk] (+)= xc[c0:].T @ d_pre  (column-major nb x d_in)
                    _gemm(b'N', b'T', nb, d_in, rcn, b.dp, nb, &xc[c0, 0], d_in, beta, ge,
                          ldge)
                    c0 = c0 + rcn
                for jj in range(nb):
                    gb32[j0 + jj] = <float>b.gbe[jj]
                    counts[j0 + jj] = b.acn[jj]
                # this block's share of W_enc_old @ g_b_enc (before W_enc changes)
                if center:
                    for k in range(d_in):
                        part[jb, k] = _dot_d(&W_enc[k, j0], &gb32[j0], nb)
                if ext:
                    for jj in range(nb):
                        bpart[jb, 0] += b.tsum[jj]
                        bpart[jb, 1] += b.asum[jj]
                for jj in range(nb):
                    j = j0 + jj
                    if ext:
                        glt = _g_lt_ext(&th, &ex, j, b.gws[jj], b.wcn[jj], b.wq[jj], b.bcn[jj])
                    else:
                        glt = _g_log_threshold(&th, j, b.gws[jj], b.wcn[jj])
                    bad += _finish_feature(j, gd + jj * d_out, pWd + j * d_out, d_out, adam,
                                           pbe, gb32[j], o_mWd, o_vWd, o_mbe, o_vbe, o_gbe,
                                           &th, glt, &c)
                if adam:
                    for k in range(d_in):
                        bad += _adam(pWe + k * d_sae + j0, ge + k * nb,
                                     o_mWe + k * d_sae + j0, o_vWe + k * d_sae + j0, nb, &c)
        _dfree(&b)
    if failed:
        raise MemoryError("dense_backward: could not allocate a block buffer "
                          "(parameters may be partly updated)")
    g_b_dec_a = np.empty(d_out, dtype=np.float32)
    cdef float[::1] g_b_dec = g_b_dec_a
    cdef double a
    for k in range(d_out):
        a = cs[k]
        if center:
            for jb in range(nblocks):
                a -= part[jb, k]
        g_b_dec[k] = <float>a
    if d_target is not None:
        d_target[:, :] = d_xhat
    if adam:
        bad += _adam(pbd, &g_b_dec[0], &mb_dec[0], &vb_dec[0], d_out, &c)
    else:
        gbd_o[:] = g_b_dec
    if fire_counts is not None:
        np.add(fire_counts, counts_a, out=np.asarray(fire_counts))
    if ext:
        if mode == 1:
            stats[0] = float(bpart_a[:, 0].sum())
        elif mode == 0:
            stats[0] = 0.0
        stats[1] = float(bpart_a[:, 1].sum())
    return mse, int(counts_a.sum()), int(bad)
