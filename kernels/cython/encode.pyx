"""Fused encoder: tiled sgemm with a bias + ReLU (+ CSR compaction) epilogue
(``fastsae.backends.cython._encode``).

``pre = (x - b_dec) @ W_enc + b_enc``; ``f = relu(pre)``.

The product is cut into tiles of ``tm`` rows by ``tn`` features. A task is one
block of ``tm`` rows and a contiguous chunk of feature tiles; OpenMP threads
take tasks dynamically. Per task: ``x - b_dec`` for its rows is formed once in
a thread-local buffer (so no copy of ``x`` is made and the subtraction happens
exactly as in the reference), then for each feature tile one BLAS ``sgemm``
computes the tile and the epilogue (bias, ReLU, and for the sparse output the
compaction of the positive entries) runs on it while it is still in cache.
The dense ``N x d_sae`` pre-activation matrix is never written for the sparse
output, and never re-read for the dense one.

Density switch (``encode_probe``): the first row block of the grid is
computed alone (its feature tiles in parallel, each tile exactly as the CSR
task computes it) into dense rows while its positives are counted; the
caller then continues dense (``encode_dense`` from ``row0``, the probe rows
stay as they are) or sparse (``encode_csr`` with ``probe``: row block 0's
entries are compacted from the probe rows, no product is recomputed, and the
CSR is bit-identical to one built without a probe).

BLAS must run single-threaded inside the parallel region (the Python wrapper
limits it with threadpoolctl); without OpenMP the task loop is serial and BLAS
may use its own threads.

Raw kernels: the validating front guarantees the inputs (C-contiguous,
finite float32 of matching shapes); checked here is only what it cannot
know: the output buffer and tiling the wrapper supplies, and that the sizes
fit BLAS's 32-bit integers.
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from libc.stdint cimport int64_t, int32_t

import numpy as np

from common cimport _sgemm_rm, blas_int


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* The probe's tile epilogue: out[r, j] = relu(tile[r, j] + b[j]) for a
       rows x nc tile (row strides nc and ldo); returns the number of
       positives. The select is a bit mask (+0.0 where v <= 0 or NaN, as
       `v if v > 0 else 0` gives) so that GCC vectorizes the loop with the
       count in it. */
    static int64_t fastsae_probe_epilogue(const float* restrict tile, const float* restrict b,
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
                int32_t pos = v > 0;
                uint32_t bits;
                memcpy(&bits, &v, 4);
                bits &= (uint32_t)(-pos);
                memcpy(&v, &bits, 4);
                o[j] = v;
                c += pos;
            }
            cnt += c;
        }
        return cnt;
    }
    """
    int64_t _probe_epilogue "fastsae_probe_epilogue"(const float* tile, const float* b,
                                                     float* out, Py_ssize_t ldo,
                                                     Py_ssize_t rows,
                                                     Py_ssize_t nc) noexcept nogil


cdef struct _TaskOut:
    # Entries of one task (rows r0:r0+mr, its feature chunk), row-major:
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


cdef void _dense_task(const float* x, const float* W, const float* b_enc, const float* b_dec,
                      float* out, Py_ssize_t d_in, Py_ssize_t d_sae,
                      Py_ssize_t r0, Py_ssize_t mr, Py_ssize_t c0, Py_ssize_t c1,
                      Py_ssize_t tn, float* xc) noexcept nogil:
    """Dense relu(pre) for rows r0:r0+mr, features c0:c1, written into out."""
    cdef Py_ssize_t cs, nc, r, j
    cdef float v
    cdef float* row
    _center_rows(x + r0 * d_in, b_dec, xc, mr, d_in)
    cs = c0
    while cs < c1:
        nc = min(tn, c1 - cs)
        # product straight into the output tile (ldc = d_sae) ...
        _sgemm_rm(<blas_int>mr, <blas_int>nc, <blas_int>d_in, 1.0, xc, <blas_int>d_in,
                  W + cs, <blas_int>d_sae, 0.0, out + r0 * d_sae + cs, <blas_int>d_sae)
        # ... and bias + ReLU on it while it is in cache
        for r in range(mr):
            row = out + (r0 + r) * d_sae + cs
            for j in range(nc):
                v = row[j] + b_enc[cs + j]
                row[j] = v if v > 0 else 0
        cs += tn


cdef int _sparse_task(const float* x, const float* W, const float* b_enc, const float* b_dec,
                      Py_ssize_t d_in, Py_ssize_t d_sae,
                      Py_ssize_t r0, Py_ssize_t mr, Py_ssize_t c0, Py_ssize_t c1,
                      Py_ssize_t tn, float* xc, float* tile, _TaskOut* res) noexcept nogil:
    """Positive entries of relu(pre) for rows r0:r0+mr, features c0:c1, into res.

    Returns 0, or -1 when memory ran out (res then owns nothing).
    """
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
        if n + mr * nc > cap:  # room for the worst case (every entry positive)
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
        # epilogue: bias + ReLU + compaction of this tile, rows in order
        for r in range(mr):
            trow = tile + r * nc
            cnt = 0
            for j in range(nc):
                v = trow[j] + b_enc[cs + j]
                if v > 0:
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


cdef int _compact_task(const float* f, Py_ssize_t ld, Py_ssize_t mr, Py_ssize_t c0,
                       Py_ssize_t c1, _TaskOut* res) noexcept nogil:
    """The positive entries of dense rows ``f[0:mr, c0:c1]`` (row stride
    ``ld``) into res, row-major (the layout ``_sparse_task`` ends with).

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
        row = f + r * ld
        cnt = 0
        for j in range(c0, c1):
            cnt += row[j] > 0
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
        row = f + r * ld
        for j in range(c0, c1):
            if row[j] > 0:
                res.idx[n] = <int32_t>j
                res.val[n] = row[j]
                n += 1
    return 0


def _check_blas_dims(x, W):
    if max(x.shape[0], W.shape[0], W.shape[1]) >= 2**31 - 1:
        raise ValueError("dimensions must fit BLAS's 32-bit integers")


def encode_dense(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
                 const float[::1] b_dec, float[:, ::1] out, Py_ssize_t tm, Py_ssize_t tn,
                 Py_ssize_t chunks, int nthreads, Py_ssize_t row0=0):
    """relu((x - b_dec) @ W_enc + b_enc) into ``out [N, d_sae]``.

    ``x [N, d_in]``, ``W_enc [d_in, d_sae]``; tiles of ``tm`` rows by ``tn``
    features; each row block's features are split into ``chunks`` tasks.
    ``row0``: the row blocks start there (``row0, row0 + tm, ...``); rows
    before it are left as they are (``encode_probe`` made them).
    """
    _check_blas_dims(x, W_enc)
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if out.shape[0] != n or out.shape[1] != d_sae or tm < 1 or tn < 1 or chunks < 1:
        raise ValueError("bad output shape or tiling")
    if row0 < 0 or row0 > n:
        raise ValueError("row0 must be in [0, N]")
    cdef Py_ssize_t nrb = (n - row0 + tm - 1) // tm
    cdef Py_ssize_t ntiles = (d_sae + tn - 1) // tn
    chunks = min(chunks, ntiles)
    cdef Py_ssize_t per = (ntiles + chunks - 1) // chunks  # tiles per chunk
    chunks = (ntiles + per - 1) // per
    cdef Py_ssize_t ntasks = nrb * chunks, task, rb, cc, r0, mr, c0, c1
    cdef float* xc = NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        xc = <float*>malloc(tm * d_in * sizeof(float))
        for task in prange(ntasks, schedule="dynamic"):
            if xc == NULL:
                failed += 1  # a reduction: any thread's failure survives the loop
            else:
                rb = task // chunks
                cc = task % chunks
                r0 = row0 + rb * tm
                mr = min(tm, n - r0)
                c0 = cc * per * tn
                c1 = min(d_sae, (cc + 1) * per * tn)
                _dense_task(&x[0, 0], &W_enc[0, 0], &b_enc[0], &b_dec[0], &out[0, 0],
                            d_in, d_sae, r0, mr, c0, c1, tn, xc)
        free(xc)
    if failed:
        raise MemoryError("encode_dense: could not allocate a tile buffer")


def encode_probe(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
                 const float[::1] b_dec, float[:, ::1] out, Py_ssize_t tm, Py_ssize_t tn,
                 int nthreads):
    """Row block 0 of the encoder's grid (rows ``0 : min(tm, N)``), dense:
    ``relu`` of each ``tm x tn`` tile written into ``out[0:mr, :]``
    (``out [>= mr, d_sae]``); returns how many entries are positive.

    Each tile is one task (tiles in parallel) and is computed exactly as
    ``encode_csr``'s task computes it (same sgemm shapes into a tile buffer),
    so compacting these rows (``encode_csr(..., probe=out[:mr])``) gives the
    CSR's bits; ``encode_dense(..., row0=tm)`` continues the dense codes."""
    _check_blas_dims(x, W_enc)
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if tm < 1 or tn < 1:
        raise ValueError("bad tiling")
    cdef Py_ssize_t mr = min(tm, n)
    if out.shape[0] < mr or out.shape[1] != d_sae:
        raise ValueError("encode_probe: out must have at least min(tm, N) rows of d_sae")
    cdef Py_ssize_t ntiles = (d_sae + tn - 1) // tn, t, cs, nc
    xc_a = np.empty((max(mr, 1), d_in), dtype=np.float32)
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
                cnt += _probe_epilogue(tile, &b_enc[cs], &out[0, 0] + cs, d_sae, mr, nc)
        free(tile)
    if failed:
        raise MemoryError("encode_probe: could not allocate a tile buffer")
    return int(cnt)


def encode_csr(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
               const float[::1] b_dec, Py_ssize_t tm, Py_ssize_t tn, Py_ssize_t chunks,
               int nthreads, const float[:, ::1] probe=None):
    """relu((x - b_dec) @ W_enc + b_enc) as canonical CSR.

    Returns ``(indptr int64 [N+1], indices int32 [nnz], values float32 [nnz])``
    with the positive entries of each row in increasing feature order.
    ``probe`` (``[min(tm, N), d_sae]``, from :func:`encode_probe` with the
    same ``tm, tn``): row block 0 is compacted from it instead of computed.
    """
    _check_blas_dims(x, W_enc)
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if tm < 1 or tn < 1 or chunks < 1:
        raise ValueError("bad tiling")
    cdef bint use_probe = probe is not None
    if use_probe and (probe.shape[0] != min(tm, n) or probe.shape[1] != d_sae):
        raise ValueError("encode_csr: probe must have shape (min(tm, N), d_sae)")
    cdef const float* probe_p = &probe[0, 0] if use_probe else NULL
    cdef Py_ssize_t nrb = (n + tm - 1) // tm
    cdef Py_ssize_t ntiles = (d_sae + tn - 1) // tn
    chunks = min(chunks, ntiles)
    cdef Py_ssize_t per = (ntiles + chunks - 1) // chunks
    chunks = (ntiles + per - 1) // per
    cdef Py_ssize_t ntasks = nrb * chunks, task, rb, cc, r0, mr, c0, c1, r, i, cnt
    cdef _TaskOut* res = <_TaskOut*>malloc(ntasks * sizeof(_TaskOut))
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
        with nogil, parallel(num_threads=nthreads):
            xc = <float*>malloc(tm * d_in * sizeof(float))
            tile = <float*>malloc(tm * min(tn, d_sae) * sizeof(float))
            for task in prange(ntasks, schedule="dynamic"):
                if xc == NULL or tile == NULL:
                    failed += 1  # a reduction: any thread's failure survives the loop
                else:
                    rb = task // chunks
                    cc = task % chunks
                    r0 = rb * tm
                    mr = min(tm, n - r0)
                    c0 = cc * per * tn
                    c1 = min(d_sae, (cc + 1) * per * tn)
                    if rb == 0 and use_probe:
                        if _compact_task(probe_p, d_sae, mr, c0, c1, &res[task]) != 0:
                            failed += 1
                    elif _sparse_task(&x[0, 0], &W_enc[0, 0], &b_enc[0], &b_dec[0], d_in,
                                      d_sae, r0, mr, c0, c1, tn, xc, tile, &res[task]) != 0:
                        failed += 1
            free(xc)
            free(tile)
        if failed:
            raise MemoryError("encode_csr: out of memory")

        # row pointers: row i's count is the sum over its row block's chunks
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
            # gather: each row's chunks in feature order (row blocks in parallel)
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


def dense_indptr(const float[:, ::1] f, int nthreads):
    """int64 ``[N + 1]``: the CSR row pointer of the nonzero entries of a
    dense ``f [N, d_sae]`` (its last element the count: callers that choose
    a path from the density pass it on to :func:`dense_to_csr`)."""
    cdef Py_ssize_t n = f.shape[0], d = f.shape[1], i, j
    indptr = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] ip = indptr
    cdef int64_t cnt
    ip[0] = 0
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        cnt = 0
        for j in range(d):
            if f[i, j] != 0:
                cnt = cnt + 1
        ip[i + 1] = cnt
    for i in range(n):
        ip[i + 1] += ip[i]
    return indptr


def dense_to_csr(const float[:, ::1] f, int nthreads, indptr=None):
    """Canonical CSR of the nonzero entries of a dense ``f [N, d_sae]``
    (what ``SparseCodes.from_dense`` builds), in two parallel passes, or one
    when ``indptr`` (:func:`dense_indptr` of this ``f``) is given. A row
    pointer that does not fit ``f`` is refused; each row's writes stop at its
    end of ``indptr`` whatever ``f`` holds, so a stale one cannot write out
    of bounds."""
    cdef Py_ssize_t n = f.shape[0], d = f.shape[1], i, j, pos, end
    if indptr is None:
        indptr = dense_indptr(f, nthreads)
    else:
        indptr = np.asarray(indptr)
        if (indptr.dtype != np.int64 or indptr.ndim != 1 or indptr.shape[0] != n + 1
                or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
                or np.any(np.diff(indptr) > d)):
            raise ValueError("dense_to_csr: indptr must be the int64 [N + 1] row pointer of f")
    cdef const int64_t[::1] ip = indptr
    indices = np.empty(ip[n], dtype=np.int32)
    values = np.empty(ip[n], dtype=np.float32)
    cdef int32_t[::1] iv = indices
    cdef float[::1] vv = values
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        pos = ip[i]
        end = ip[i + 1]
        for j in range(d):
            if f[i, j] != 0 and pos < end:
                iv[pos] = <int32_t>j
                vv[pos] = f[i, j]
                pos = pos + 1
    return indptr, indices, values
