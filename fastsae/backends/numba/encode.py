"""Numba CPU encoder kernels: ``relu((x - b_dec) @ W_enc + b_enc)``, dense
(:func:`encode_relu_dense`) or CSR (:func:`encode_relu_csr`), plus the BLAS
``sgemm`` binding (:func:`gemm`) and the centering ``x - b_dec``
(:func:`centered`) that every encoder of this backend uses.

Layouts: ``x`` float32 ``[N, d_in]``, ``W_enc`` float32 ``[d_in, d_sae]``,
``b_enc`` ``[d_sae]``, ``b_dec`` ``[d_in]``, all C-contiguous (the backend
module validates before calling). Outputs are float32 dense ``[N, d_sae]``
or CSR (``indptr`` int64 ``[N+1]``, ``indices`` int32, ``values`` float32)
in canonical form (strictly increasing indices per row, no stored zeros).

Where the time goes: the product is the only dense O(N d_in d_sae) work of
the whole SAE step, so it goes to BLAS ``sgemm`` (the one scipy ships, the
same one ``np.dot`` uses inside ``@njit``), called through Numba's own
``numba_xxgemm`` helper so that strides, ``beta`` and transposes are ours
and the functions stay cacheable. The rows are cut into a fixed grid of
``row_block``-row blocks (the face passes
:data:`~fastsae.backends.tunables.NUMBA_RELU_ROW_BLOCK`) and each Numba
thread takes a contiguous run of whole blocks: per block, one
single-threaded sgemm into a per-thread ``row_block x d_sae`` workspace
(the dense output's block, for ``encode_relu``) that stays in cache, then
bias, ReLU and (for CSR) the compaction on it right away. The N x d_sae pre-activations are never
written to or re-read from main memory, and there is one parallel region
per call (a thread barrier per block would cost more than the epilogue on a
busy 2-core machine).

Threads: the parallelism is Numba's (``NUMBA_NUM_THREADS`` /
``numba.set_num_threads``); the caller must limit BLAS to one thread while
these kernels run (:mod:`fastsae.backends.numba` does it with threadpoolctl),
so the process never runs more compute threads than Numba's count. The fixed
block grid makes the result independent of the thread count (BLAS rounds a
row identically only at the same position in a same-sized block).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (numba_xxgemm resolves sgemm from it)
from numba import njit, prange, types

__all__ = ["gemm", "warm_gemm", "centered", "encode_relu_dense", "encode_relu_csr",
           "encode_relu_adaptive"]

_F32P = types.CPointer(types.float32)
# int numba_xxgemm(kind, transa, transb, m, n, k, *alpha, *a, lda, *b, ldb,
#                  *beta, *c, ldc): Numba's C helper around scipy's
# cython_blas sgemm (column-major, Fortran conventions). Referenced by
# symbol name, so functions calling it can be cached on disk.
_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(types.char, types.char, types.char, types.intp, types.intp, types.intp,
               _F32P, _F32P, types.intp, _F32P, types.intp, _F32P, _F32P, types.intp))

_KIND_S = np.uint8(ord("s"))
_N = np.uint8(ord("n"))
_T = np.uint8(ord("t"))


@njit(cache=True)
def _ld(a):
    """Leading dimension (in elements) of a row-major 2-D array whose rows
    may be strided (a row block or column panel of a bigger array)."""
    if a.shape[0] > 1:
        return max(a.strides[0] // 4, 1)
    return max(a.shape[1], 1)


@njit(cache=True)
def gemm(A, B, C, alpha, beta, trans_a, trans_b):
    """``C = alpha * op(A) @ op(B) + beta * C`` in float32 via BLAS sgemm.

    Row-major arrays with unit stride along the last axis (rows may be
    strided); ``op(A)`` is ``A.T`` when ``trans_a``. ``C`` is ``[m, n]``.
    The first call in a process looks sgemm up under the GIL: make it (see
    :func:`warm_gemm`) from the calling thread before any ``prange`` does.
    """
    m, n = C.shape
    k = A.shape[0] if trans_a else A.shape[1]
    if m == 0 or n == 0:
        return
    ab = np.empty(2, np.float32)
    ab[0] = alpha
    ab[1] = beta
    # row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T; a
    # row-major array read column-major is its transpose, so the flags carry over.
    r = _xxgemm(_KIND_S, _T if trans_b else _N, _T if trans_a else _N, n, m, k,
                ab[0:1].ctypes, B.ctypes, _ld(B), A.ctypes, _ld(A), ab[1:2].ctypes,
                C.ctypes, _ld(C))
    return r  # 0, or -1 when scipy's BLAS could not be found


@njit(parallel=True, cache=True)
def centered(x, b_dec):
    """``x - b_dec`` as a new float32 ``[N, d_in]`` array (rounded exactly as
    the reference does, so no cancellation when ``b_dec`` is large)."""
    n, d = x.shape
    out = np.empty((n, d), np.float32)
    for i in prange(n):
        for k in range(d):
            out[i, k] = x[i, k] - b_dec[k]
    return out


@njit(cache=True)
def warm_gemm():
    """A 1x1 product from the calling thread: makes Numba's helper look up
    sgemm (which takes the GIL) before any ``prange`` worker calls it."""
    a = np.ones((1, 1), np.float32)
    c = np.zeros((1, 1), np.float32)
    gemm(a, a, c, 1.0, 0.0, False, False)


@njit(cache=True)
def _part_bounds(n, parts, p):
    """Rows ``[lo, hi)`` of part ``p`` of ``parts`` near-equal contiguous parts."""
    return (n * p) // parts, (n * (p + 1)) // parts


@njit(cache=True)
def _bias_relu_block(Y, b_enc):
    """``Y = max(Y + b_enc, 0)`` in place (one thread's cached block)."""
    nr, d = Y.shape
    for r in range(nr):
        for j in range(d):
            v = Y[r, j] + b_enc[j]
            Y[r, j] = v if v > 0 else np.float32(0.0)


@njit(parallel=True, cache=True)
def encode_relu_dense(xc, W_enc, b_enc, row_block, n_threads):
    """Dense codes ``relu(xc @ W_enc + b_enc)``, float32 ``[N, d_sae]``.

    ``xc = x - b_dec`` (see :func:`centered`). The rows are split into one
    contiguous part per Numba thread; each thread computes its part by
    blocks of ``row_block`` rows with a single-threaded sgemm straight into
    the output and applies bias and ReLU while the block is in its cache.
    Block boundaries are a fixed grid (parts own whole blocks): BLAS rounds a
    row the same way only at the same position in a same-sized block, so
    this keeps the result independent of the thread count.
    Call with BLAS limited to one thread (the backend module does this).
    """
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    out = np.empty((n, d_sae), np.float32)
    warm_gemm()
    rb = max(1, row_block)
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            blk = out[i0:i1]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            _bias_relu_block(blk, b_enc)
    return out


@njit(cache=True)
def _compact_row(Y, r, b_enc, idx_ws):
    """``v = Y[r] + b_enc``; the positive ``v`` are compacted in place to the
    front of ``Y[r]`` and their columns to ``idx_ws[r]``; returns how many.

    The row is scanned in chunks of 64 columns: a branch-free count of the
    positives (vectorized) skips the ~99% of chunks with none. The write
    position never passes the read position, so in place is safe.
    """
    d = Y.shape[1]
    cnt = 0
    for j0 in range(0, d, 64):
        j1 = min(d, j0 + 64)
        hits = 0
        for j in range(j0, j1):
            hits += 1 if Y[r, j] + b_enc[j] > 0 else 0
        if hits > 0:
            for j in range(j0, j1):
                v = Y[r, j] + b_enc[j]
                if v > 0:
                    Y[r, cnt] = v
                    idx_ws[r, cnt] = j
                    cnt += 1
    return cnt


@njit(cache=True)
def _todo_blocks(block_mask):
    """Indices of the row blocks with ``block_mask[b]`` set, int64."""
    todo = np.empty(block_mask.shape[0], np.int64)
    m = 0
    for b in range(block_mask.shape[0]):
        if block_mask[b]:
            todo[m] = b
            m += 1
    return todo[:m]


@njit(parallel=True, cache=True)
def _encode_blocks_stage(xc, W_enc, b_enc, rb, n_threads, b_first, counts, st_idx, st_val):
    """Pass 1 of :func:`encode_relu_csr` over the blocks ``b_first..`` of
    the fixed grid of ``rb`` rows (parts of whole blocks per thread,
    single-threaded sgemm into a per-thread workspace, compaction while
    cached): each row's count to ``counts[row]`` and its first ``K =
    st_idx.shape[1]`` entries to ``st_idx/st_val[row]``."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    K = st_idx.shape[1]
    nblk = (n + rb - 1) // rb - b_first
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        t0, t1 = _part_bounds(nblk, parts, p)
        t0 += b_first
        t1 += b_first
        Y = np.empty((rb, d_sae), np.float32)
        idx_ws = np.empty((rb, d_sae), np.int32)
        for b in range(t0, t1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            blk = Y[:i1 - i0]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                row = i0 + r
                cnt = _compact_row(blk, r, b_enc, idx_ws)
                counts[row] = cnt
                for q in range(min(cnt, K)):
                    st_idx[row, q] = idx_ws[r, q]
                    st_val[row, q] = blk[r, q]


@njit(parallel=True, cache=True)
def _encode_blocks_overflow(xc, W_enc, b_enc, rb, n_threads, todo, counts, K, indptr,
                            indices, values):
    """Pass 2 of :func:`encode_relu_csr`: recompute the row blocks ``todo``
    (same grid, so each row bitwise as in pass 1) and write the rows with
    more than ``K`` entries straight to ``indptr[row]`` onwards."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    m = todo.shape[0]
    parts = max(1, min(n_threads, m))
    for p in prange(parts):
        t0, t1 = _part_bounds(m, parts, p)
        Y = np.empty((rb, d_sae), np.float32)
        idx_ws = np.empty((rb, d_sae), np.int32)
        for t in range(t0, t1):
            i0 = todo[t] * rb
            i1 = min(n, i0 + rb)
            blk = Y[:i1 - i0]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                row = i0 + r
                if counts[row] > K:
                    cnt = _compact_row(blk, r, b_enc, idx_ws)
                    o = indptr[row]
                    for q in range(cnt):
                        indices[o + q] = idx_ws[r, q]
                        values[o + q] = blk[r, q]


@njit(parallel=True, cache=True)
def _unstage(counts, st_idx, st_val, indptr, indices, values):
    K = st_idx.shape[1]
    for i in prange(counts.shape[0]):
        c = counts[i]
        if c <= K:
            o = indptr[i]
            for t in range(c):
                indices[o + t] = st_idx[i, t]
                values[o + t] = st_val[i, t]


@njit(cache=True)
def encode_relu_csr(xc, W_enc, b_enc, row_block, k_stage, n_threads):
    """CSR codes of ``relu(xc @ W_enc + b_enc)``: ``(indptr, indices, values,
    max_row_count)``.

    No ``N x d_sae`` array is allocated. Pass 1 (parallel) computes every
    row's count and stages up to ``k_stage`` entries per row; the exact
    output is then allocated and filled from the staging area; rows with more
    than ``k_stage`` active features (rare when ``k_stage`` comes from the
    previous batch's maximum, see the backend) are recomputed straight into
    their final place. Call with BLAS limited to one thread.
    """
    n = xc.shape[0]
    K = max(1, min(k_stage, W_enc.shape[1]))
    warm_gemm()
    counts = np.zeros(n, np.int64)
    st_idx = np.empty((n, K), np.int32)
    st_val = np.empty((n, K), np.float32)
    rb = max(1, min(row_block, n))
    _encode_blocks_stage(xc, W_enc, b_enc, rb, n_threads, 0, counts, st_idx, st_val)
    return _finish_csr(xc, W_enc, b_enc, rb, n_threads, counts, st_idx, st_val)


@njit(cache=True)
def _finish_csr(xc, W_enc, b_enc, rb, n_threads, counts, st_idx, st_val):
    """After pass 1: the exact CSR from the staging area, rows that overflowed
    it recomputed (:func:`_encode_blocks_overflow`)."""
    n = xc.shape[0]
    K = st_idx.shape[1]
    nblk = (n + rb - 1) // rb
    indptr = np.empty(n + 1, np.int64)
    indptr[0] = 0
    n_over = 0
    max_cnt = 0
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
        if counts[i] > K:
            n_over += 1
        max_cnt = max(max_cnt, counts[i])
    nnz = indptr[n]
    indices = np.empty(nnz, np.int32)
    values = np.empty(nnz, np.float32)
    _unstage(counts, st_idx, st_val, indptr, indices, values)
    if n_over > 0 and nnz > 0:
        mask = np.zeros(nblk, np.uint8)
        for i in range(n):
            if counts[i] > K:
                mask[i // rb] = 1
        _encode_blocks_overflow(xc, W_enc, b_enc, rb, n_threads, _todo_blocks(mask), counts, K,
                                indptr, indices, values)
    return indptr, indices, values, max_cnt


@njit(parallel=True, cache=True)
def _probe_blocks(xc, W_enc, rb, b_enc, probe):
    """The first ``P = probe.shape[0]`` blocks of the grid, one per thread:
    ``xc @ W_enc`` into ``probe[p]`` (bias not added) and the count of
    positive ``pre + b_enc`` per block (int64 ``[P]``)."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    P = probe.shape[0]
    cnt = np.zeros(P, np.int64)
    for p in prange(P):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        blk = probe[p, :i1 - i0]
        gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
        c = 0
        for r in range(i1 - i0):
            for j in range(d_sae):
                c += 1 if blk[r, j] + b_enc[j] > 0 else 0
        cnt[p] = c
    return cnt


@njit(parallel=True, cache=True)
def _stage_probe(probe, b_enc, rb, counts, st_idx, st_val):
    """Pass 1 of the CSR encoder for the probed blocks (compacted in place)."""
    n = counts.shape[0]
    d_sae = probe.shape[2]
    K = st_idx.shape[1]
    for p in prange(probe.shape[0]):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        blk = probe[p, :i1 - i0]
        idx_ws = np.empty((i1 - i0, d_sae), np.int32)
        for r in range(i1 - i0):
            cnt = _compact_row(blk, r, b_enc, idx_ws)
            counts[i0 + r] = cnt
            for q in range(min(cnt, K)):
                st_idx[i0 + r, q] = idx_ws[r, q]
                st_val[i0 + r, q] = blk[r, q]


@njit(parallel=True, cache=True)
def _dense_rest(xc, W_enc, b_enc, rb, n_threads, probe, out):
    """Dense codes into ``out``: the probed blocks copied with bias and ReLU,
    the others computed as :func:`encode_relu_dense` does."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    P = probe.shape[0]
    for p in prange(P):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        for r in range(i1 - i0):
            src = probe[p, r]
            dst = out[i0 + r]
            for j in range(d_sae):
                v = src[j] + b_enc[j]
                dst[j] = v if v > 0 else np.float32(0.0)
    nblk = (n + rb - 1) // rb - P
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        for b in range(b0 + P, b1 + P):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            blk = out[i0:i1]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            _bias_relu_block(blk, b_enc)


@njit(cache=True)
def encode_relu_adaptive(xc, W_enc, b_enc, row_block, k_stage, n_threads, min_density,
                         probe_blocks):
    """``relu(xc @ W_enc + b_enc)`` as dense codes or CSR, whichever this
    batch's density calls for: ``(dense, f, indptr, indices, values,
    max_row_count)``, with ``f`` float32 ``[N, d_sae]`` when ``dense`` (the
    CSR arrays then empty) and the CSR of :func:`encode_relu_csr` otherwise
    (``f`` empty).

    The first ``probe_blocks`` blocks of the fixed grid are computed first
    (in parallel) and their density (positives over entries) decides: at
    least ``min_density`` -> dense, else CSR. Those blocks are reused either
    way, so the probe costs one thread barrier, not work. The decision
    depends on the inputs only: never on earlier calls nor on the thread
    count (the probe is a fixed number of blocks), and every value is what
    the dense or CSR encoder computes. Call with BLAS limited to one thread.
    """
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    warm_gemm()
    rb = max(1, min(row_block, n))
    nblk = (n + rb - 1) // rb
    P = max(1, min(probe_blocks, nblk))
    probe = np.empty((P, rb, d_sae), np.float32)
    pcnt = _probe_blocks(xc, W_enc, rb, b_enc, probe)
    rows = min(n, P * rb)
    no_idx = np.empty(0, np.int64)
    if pcnt.sum() >= min_density * rows * d_sae:
        f = np.empty((n, d_sae), np.float32)
        _dense_rest(xc, W_enc, b_enc, rb, n_threads, probe, f)
        return True, f, no_idx, np.empty(0, np.int32), np.empty(0, np.float32), 0
    K = max(1, min(k_stage, d_sae))
    counts = np.zeros(n, np.int64)
    st_idx = np.empty((n, K), np.int32)
    st_val = np.empty((n, K), np.float32)
    _stage_probe(probe, b_enc, rb, counts, st_idx, st_val)
    if nblk > P:
        _encode_blocks_stage(xc, W_enc, b_enc, rb, n_threads, P, counts, st_idx, st_val)
    indptr, indices, values, mx = _finish_csr(xc, W_enc, b_enc, rb, n_threads, counts, st_idx,
                                              st_val)
    return False, np.empty((0, 0), np.float32), indptr, indices, values, mx
