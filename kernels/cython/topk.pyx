"""Fused top-m encoder (``fastsae.backends.cython._topk``): per row, the ``m`` largest
*positive* pre-activations ``pre = (x - b_dec) @ W_enc + b_enc``, never
forming the ``N x d_sae`` matrix; optionally, from the same tiles, the
``m_aux`` largest positive ones among a masked subset of the columns (AuxK's
dead latents).

Only positive entries are kept: every TopK-family encoder applies ReLU after
its selection, so "the m largest, then ReLU" is "the min(m, #positive)
largest positive ones" (the same argument as Numba's kernels). A row keeps
``cnt <= m`` entries.

A task is one block of ``tm`` rows (OpenMP threads take tasks dynamically).
Per task, ``x - b_dec`` is formed once in a thread-local buffer (the same
float32 subtraction as the reference), then for each tile of ``tn`` features
one BLAS ``sgemm`` computes the tile and the epilogue adds the bias and
merges the row's entries into its running top-``m`` buffer (a binary
min-heap of (value, column)) while the tile is in cache. The epilogue
filters first: per chunk of 64 columns a branch-free (vectorized) count of
the entries above the row's admission threshold (0 until the heap is full,
then the heap's worst value); chunks with none are skipped, which is almost
all of them.

Order: larger value first, ties to the lower column (the reference's rule).
Columns arrive in increasing order, so a new entry equal to the heap's
minimum loses the tie and only a strictly larger value enters. The heap's
root is the *worst* kept entry (smallest value; among equal values the
larger column).

Output per row: the ``cnt`` kept entries sorted by column (ascending) in the
first slots, then value 0 / column -1 in the unused ones, and ``cnt``.

BLAS must run single-threaded inside the parallel region (the Python wrapper
limits it). Raw kernel: the validating front guarantees the inputs
(C-contiguous, finite float32 of matching shapes); checked here is only what
the wrapper supplies (output buffers, ``m``, tiling) and BLAS's 32-bit sizes.
"""

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, int32_t

from common cimport _sgemm_rm, blas_int


cdef inline bint _worse(float va, int32_t ca, float vb, int32_t cb) noexcept nogil:
    """(va, ca) ranks below (vb, cb): smaller value, or equal value and larger column."""
    return va < vb or (va == vb and ca > cb)


cdef inline void _sift_down(float* hv, int32_t* hc, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Restore the min-heap (root = worst) below position i."""
    cdef Py_ssize_t l, r, w
    cdef float tv
    cdef int32_t tc
    while True:
        l = 2 * i + 1
        if l >= n:
            return
        w = l
        r = l + 1
        if r < n and _worse(hv[r], hc[r], hv[l], hc[l]):
            w = r
        if _worse(hv[w], hc[w], hv[i], hc[i]):
            tv = hv[w]; hv[w] = hv[i]; hv[i] = tv
            tc = hc[w]; hc[w] = hc[i]; hc[i] = tc
            i = w
        else:
            return


cdef inline void _push(float* hv, int32_t* hc, Py_ssize_t n, float v, int32_t c) noexcept nogil:
    """Insert at position n (heap of n entries becomes n + 1)."""
    cdef Py_ssize_t i = n, p
    while i > 0:
        p = (i - 1) // 2
        if _worse(v, c, hv[p], hc[p]):
            hv[i] = hv[p]
            hc[i] = hc[p]
            i = p
        else:
            break
    hv[i] = v
    hc[i] = c


cdef void _sort_by_col(float* hv, int32_t* hc, Py_ssize_t n) noexcept nogil:
    """Insertion sort by column (n is small: the kept entries of one row)."""
    cdef Py_ssize_t i, j
    cdef float v
    cdef int32_t c
    for i in range(1, n):
        v = hv[i]
        c = hc[i]
        j = i - 1
        while j >= 0 and hc[j] > c:
            hv[j + 1] = hv[j]
            hc[j + 1] = hc[j]
            j -= 1
        hv[j + 1] = v
        hc[j + 1] = c


cdef enum:
    _CHUNK = 64   # columns per filter chunk in the epilogue


cdef inline Py_ssize_t _scan(const float* trow, const float* bb, const unsigned char* mask,
                             Py_ssize_t cs, Py_ssize_t nc, float* hv, int32_t* hc,
                             Py_ssize_t m, Py_ssize_t cnt) noexcept nogil:
    """Merge ``v = trow[j] + bb[j]`` (columns ``cs + j``, ``j < nc``; only
    where ``mask[j]`` when ``mask`` is not NULL) into the row's heap of
    ``cnt`` (<= m) positive entries; returns the new count."""
    cdef float thr = hv[0] if cnt == m else 0.0
    cdef Py_ssize_t c0 = 0, c1, j
    cdef int hits
    cdef float v
    while c0 < nc:
        c1 = min(c0 + <Py_ssize_t>_CHUNK, nc)
        hits = 0
        if mask == NULL:
            for j in range(c0, c1):
                hits += (trow[j] + bb[j]) > thr
        else:
            for j in range(c0, c1):
                hits += ((trow[j] + bb[j]) > thr) & (mask[j] != 0)
        if hits != 0:
            for j in range(c0, c1):
                v = trow[j] + bb[j]
                if v > thr and (mask == NULL or mask[j] != 0):
                    if cnt < m:
                        _push(hv, hc, cnt, v, <int32_t>(cs + j))
                        cnt += 1
                        if cnt == m:
                            thr = hv[0]
                    else:  # full: strictly larger than the worst (ties: lower column)
                        hv[0] = v
                        hc[0] = <int32_t>(cs + j)
                        _sift_down(hv, hc, m, 0)
                        thr = hv[0]
        c0 = c1
    return cnt


cdef inline void _finish_row(float* hv, int32_t* hc, Py_ssize_t cnt, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t q
    _sort_by_col(hv, hc, cnt)
    for q in range(cnt, m):
        hv[q] = 0
        hc[q] = -1


cdef void _topk_task(const float* x, const float* W, const float* b_enc, const float* b_dec,
                     Py_ssize_t d_in, Py_ssize_t d_sae, Py_ssize_t r0, Py_ssize_t mr,
                     Py_ssize_t tn, Py_ssize_t m, float* xc, float* tile,
                     float* out_v, int32_t* out_c, int64_t* out_n,
                     const unsigned char* mask, Py_ssize_t ma, float* aux_v,
                     int32_t* aux_c, int64_t* aux_n) noexcept nogil:
    """Top-m of rows r0:r0+mr into out_v/out_c rows (stride m) and out_n; with
    ``mask`` not NULL also the top-ma among the masked columns into aux_*."""
    cdef Py_ssize_t cs, nc, r, k
    cdef float* trow
    for r in range(mr):
        for k in range(d_in):
            xc[r * d_in + k] = x[(r0 + r) * d_in + k] - b_dec[k]
        out_n[r0 + r] = 0
        if mask != NULL:
            aux_n[r0 + r] = 0
    cs = 0
    while cs < d_sae:
        nc = min(tn, d_sae - cs)
        _sgemm_rm(<blas_int>mr, <blas_int>nc, <blas_int>d_in, 1.0, xc, <blas_int>d_in,
                  W + cs, <blas_int>d_sae, 0.0, tile, <blas_int>nc)
        for r in range(mr):
            trow = tile + r * nc
            out_n[r0 + r] = _scan(trow, b_enc + cs, NULL, cs, nc, out_v + (r0 + r) * m,
                                  out_c + (r0 + r) * m, m, out_n[r0 + r])
            if mask != NULL:
                aux_n[r0 + r] = _scan(trow, b_enc + cs, mask + cs, cs, nc,
                                      aux_v + (r0 + r) * ma, aux_c + (r0 + r) * ma, ma,
                                      aux_n[r0 + r])
        cs += tn
    for r in range(mr):
        _finish_row(out_v + (r0 + r) * m, out_c + (r0 + r) * m, out_n[r0 + r], m)
        if mask != NULL:
            _finish_row(aux_v + (r0 + r) * ma, aux_c + (r0 + r) * ma, aux_n[r0 + r], ma)


def topm_rows(const float[:, ::1] x, const float[:, ::1] W_enc, const float[::1] b_enc,
              const float[::1] b_dec, Py_ssize_t m, float[:, ::1] out_v, int32_t[:, ::1] out_c,
              int64_t[::1] out_n, Py_ssize_t tm, Py_ssize_t tn, int nthreads,
              const unsigned char[::1] aux_mask=None, float[:, ::1] aux_v=None,
              int32_t[:, ::1] aux_c=None, int64_t[::1] aux_n=None):
    """Per row of ``x [N, d_in]``, the ``m`` largest positive pre-activations
    with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.

    Fills ``out_v float32 [N, m]`` (values), ``out_c int32 [N, m]`` (columns)
    with each row's kept entries in increasing column order in its first
    ``out_n[i] <= m`` slots (the rest: 0 / -1). Tiles of ``tm`` rows x ``tn``
    features. With ``aux_mask`` (uint8 ``[d_sae]``) also ``aux_v/aux_c
    [N, m_aux]``, ``aux_n``: the same among the columns where the mask is set.
    """
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_sae = W_enc.shape[1]
    if (out_v.shape[0] != n or out_c.shape[0] != n or out_n.shape[0] != n
            or out_v.shape[1] != m or out_c.shape[1] != m):
        raise ValueError("topm_rows: output shape mismatch")
    if m < 1 or tm < 1 or tn < 1:
        raise ValueError("topm_rows: m and the tiling must be >= 1")
    if max(n, d_in, d_sae) >= 2**31 - 1:
        raise ValueError("dimensions must fit BLAS's 32-bit integers")
    cdef bint use_aux = aux_mask is not None
    cdef Py_ssize_t ma = 0
    if use_aux:
        if aux_v is None or aux_c is None or aux_n is None:
            raise ValueError("topm_rows: aux_mask needs aux_v, aux_c and aux_n")
        ma = aux_v.shape[1]
        if (aux_mask.shape[0] != d_sae or aux_v.shape[0] != n or aux_c.shape[0] != n
                or aux_c.shape[1] != ma or aux_n.shape[0] != n or ma < 1):
            raise ValueError("topm_rows: aux output shape mismatch")
    tn = min(tn, d_sae)
    cdef Py_ssize_t nrb = (n + tm - 1) // tm, rb, r0, mr
    cdef float* xc = NULL
    cdef float* tile = NULL
    cdef const unsigned char* mp = &aux_mask[0] if use_aux else NULL
    cdef float* avp = &aux_v[0, 0] if use_aux else NULL
    cdef int32_t* acp = &aux_c[0, 0] if use_aux else NULL
    cdef int64_t* anp = &aux_n[0] if use_aux else NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        xc = <float*>malloc(tm * d_in * sizeof(float))
        tile = <float*>malloc(tm * tn * sizeof(float))
        for rb in prange(nrb, schedule="dynamic"):
            if xc == NULL or tile == NULL:
                failed += 1  # a reduction: any thread's failure survives the loop
            else:
                r0 = rb * tm
                mr = min(tm, n - r0)
                _topk_task(&x[0, 0], &W_enc[0, 0], &b_enc[0], &b_dec[0], d_in, d_sae,
                           r0, mr, tn, m, xc, tile, &out_v[0, 0], &out_c[0, 0], &out_n[0],
                           mp, ma, avp, acp, anp)
        free(xc)
        free(tile)
    if failed:
        raise MemoryError("topm_rows: could not allocate a tile buffer")
