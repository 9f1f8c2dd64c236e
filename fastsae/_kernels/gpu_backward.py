"""CUDA sparse-aware backward pass (both decoder-norm modes).

With ``d_xhat = 2 (x_hat - x) / N`` and CSR codes ``f`` (``nnz`` entries),
every gradient of the reference (:func:`fastsae.reference.gradients`) only
needs the active entries:

* :func:`residual_kernel`: ``d_xhat``, and per-row ``sum (x_hat - x)**2``
  (the MSE) and ``sum (x - mean)**2`` (for explained variance), float64.
* :func:`colsum_partial_kernel` + :func:`colsum_finish_kernel`: column
  sums in fixed row chunks (deterministic): ``g_b_dec = sum_i d_xhat_i``
  and the batch mean of ``x``.
* :func:`dpre_kernel`: ``d_pre[p] = d_xhat_i . W_dec[j] + (c/N) pen_j`` at
  each entry ``p = (i, j)`` with ``f > 0`` (0 elsewhere): a group of
  ``LANES`` threads per entry, coalesced over ``d_in``.
* A stable CSR -> CSC transposition (:func:`csc_count_kernel`,
  :func:`csc_offsets_kernel`, an exclusive scan, :func:`csc_fill_kernel`):
  the rows are cut into chunks of ``CHUNK_ROWS``; per (chunk, feature)
  counts and their prefix sums give every entry its place, and the fill
  walks each chunk's rows in order (entries of one row have distinct
  features, so a barrier per row is all the synchronization needed). Each
  feature's list of entries is sorted by row, so the per-feature sums below
  are deterministic: no float atomics anywhere.
* :func:`feature_grad_kernel`: one block per feature ``j``, threads over
  ``d_in``: ``g_W_dec[j] = sum f_ij d_xhat_i`` (+ the weighted-L1 norm term,
  or the unit-norm projection), ``g_W_enc^T[j] = sum d_pre_ij (x_i - b_dec)``,
  ``g_b_enc[j]``, ``sum_i f_ij`` and the feature's L1 term.
* :func:`transpose_kernel` turns ``g_W_enc^T`` into the ``[d_in, d_sae]``
  layout (both sides coalesced through a shared tile).
* :func:`matvec_sub_kernel`: ``g_b_dec -= W_enc @ g_b_enc``.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .gpu_common import BLOCK, GROUPS, LANES, TILE, TILE_ROWS, block_sum, block_sum2

_TILE_COLS = TILE + 1  # padded transpose tile (shared-array shapes must be constants)


@cuda.jit(cache=True)
def residual_kernel(x, x_hat, mean, nf, d_xhat, row_mse, row_var):
    """``d_xhat = (2 (x_hat - x)) / nf``; per-row sums of squares.

    x, x_hat, d_xhat: float32 ``[N, d_in]``; mean: float32 ``[d_in]`` (batch
    mean of x); nf: float32 N; row_mse, row_var: float64 ``[N]`` outputs
    (``sum_k (x_hat - x)**2`` and ``sum_k (x - mean)**2``). One block of
    ``BLOCK`` threads per row.
    """
    sh = cuda.shared.array((2, BLOCK), np.float64)
    t = cuda.threadIdx.x
    n = x.shape[0]
    d = x.shape[1]
    two = np.float32(2.0)
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        a = 0.0
        b = 0.0
        for k in range(t, d, BLOCK):
            xv = x[r, k]
            diff = x_hat[r, k] - xv
            d_xhat[r, k] = (two * diff) / nf
            a += np.float64(diff) * np.float64(diff)
            dv = np.float64(xv - mean[k])
            b += dv * dv
        sa, sb = block_sum2(sh, t, a, b)
        if t == 0:
            row_mse[r] = sa
            row_var[r] = sb


@cuda.jit(cache=True)
def colsum_partial_kernel(A, chunk_rows, partial):
    """``partial[c, k] = sum of A[r, k]`` over rows ``r`` of chunk ``c``.

    A: float32 ``[N, d]``; partial: float32 ``[ceil(N / chunk_rows), d]``.
    Grid ``(ceil(d / BLOCK), n_chunks)``, block ``BLOCK``: consecutive
    threads read consecutive columns.
    """
    k = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    c = cuda.blockIdx.y
    n = A.shape[0]
    if k < A.shape[1]:
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        acc = np.float32(0.0)
        for r in range(r0, r1):
            acc += A[r, k]
        partial[c, k] = acc


@cuda.jit(cache=True)
def colsum_finish_kernel(partial, div, out):
    """``out[k] = (sum_c partial[c, k]) / div`` (div float32; 1 for a sum).

    1-D grid over the columns.
    """
    k = cuda.grid(1)
    if k < out.shape[0]:
        acc = np.float32(0.0)
        for c in range(partial.shape[0]):
            acc += partial[c, k]
        out[k] = acc / div


@cuda.jit(cache=True)
def dpre_kernel(indptr, indices, values, d_xhat, W_dec, norms, weighted, l1_scale, dpre):
    """Gradient at each stored entry's pre-activation.

    ``dpre[p] = d_xhat[i] . W_dec[j] + l1_scale * pen_j`` if ``values[p] >
    0`` else 0, for entry ``p`` = (row i, feature j); ``pen_j = norms[j]``
    when ``weighted`` else 1. indptr int64 ``[N + 1]``, indices int32,
    values/dpre float32 ``[nnz]``, d_xhat float32 ``[N, d_in]``, W_dec
    float32 ``[d_sae, d_in]``, norms float32 ``[d_sae]``, l1_scale float32
    (``c / N``). Block ``(LANES, GROUPS)``: each group of LANES threads does
    one entry's dot product, GROUPS entries at a time; one row per block
    (grid-stride).
    """
    sh = cuda.shared.array((GROUPS, LANES), np.float32)
    lane = cuda.threadIdx.x
    grp = cuda.threadIdx.y
    n = d_xhat.shape[0]
    d_in = d_xhat.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        s = indptr[r]
        e = indptr[r + 1]
        for base in range(s, e, GROUPS):  # same trip count for the whole block
            p = base + grp
            acc = np.float32(0.0)
            if p < e:
                j = indices[p]
                for k in range(lane, d_in, LANES):
                    acc += d_xhat[r, k] * W_dec[j, k]
            sh[grp, lane] = acc
            cuda.syncthreads()
            w = LANES // 2
            while w > 0:
                if lane < w:
                    sh[grp, lane] += sh[grp, lane + w]
                cuda.syncthreads()
                w //= 2
            if lane == 0 and p < e:
                j = indices[p]
                pen = np.float32(1.0)
                if weighted:
                    pen = norms[j]
                df = sh[grp, 0] + l1_scale * pen
                if values[p] > 0:
                    dpre[p] = df
                else:
                    dpre[p] = 0.0
            cuda.syncthreads()


@cuda.jit(cache=True)
def csc_count_kernel(indptr, indices, chunk_rows, counts):
    """``counts[c, j] += number of entries of feature j in row chunk c``.

    counts: int32 ``[n_chunks, d_sae]``, zeroed by the caller. Integer
    atomics: the counts (not their order) are all that matters here.
    """
    t = cuda.threadIdx.x
    n = indptr.shape[0] - 1
    for c in range(cuda.blockIdx.x, counts.shape[0], cuda.gridDim.x):
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        for p in range(indptr[r0] + t, indptr[r1], BLOCK):
            cuda.atomic.add(counts, (c, indices[p]), 1)


@cuda.jit(cache=True)
def csc_offsets_kernel(counts, colcount):
    """Per feature j: ``counts[:, j]`` becomes its exclusive prefix sum over
    chunks, and ``colcount[j]`` (int64) the feature's total. 1-D grid over j.
    """
    j = cuda.grid(1)
    if j < counts.shape[1]:
        run = 0
        for c in range(counts.shape[0]):
            v = counts[c, j]
            counts[c, j] = run
            run += v
        colcount[j] = run


@cuda.jit(cache=True)
def csc_fill_kernel(indptr, indices, chunk_rows, colptr, offsets, entry_of, row_of):
    """Stable CSR -> CSC: list each feature's entries in row order.

    colptr: int64 ``[d_sae + 1]``; offsets: int32 ``[n_chunks, d_sae]`` from
    :func:`csc_offsets_kernel` (consumed: used as cursors); outputs
    entry_of int64 and row_of int32 ``[nnz]``: the CSR entry index and the
    row of the q-th CSC entry. One block per chunk, rows in order; the
    entries of a row have distinct features, so a barrier between rows
    suffices.
    """
    t = cuda.threadIdx.x
    n = indptr.shape[0] - 1
    for c in range(cuda.blockIdx.x, offsets.shape[0], cuda.gridDim.x):
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        for r in range(r0, r1):
            for p in range(indptr[r] + t, indptr[r + 1], BLOCK):
                j = indices[p]
                q = colptr[j] + offsets[c, j]
                offsets[c, j] += 1
                entry_of[q] = p
                row_of[q] = r
            cuda.syncthreads()


@cuda.jit(cache=True)
def feature_grad_kernel(colptr, entry_of, row_of, values, dpre, d_xhat, x, b_dec, W_dec,
                        norms, weighted, l1_scale, g_W_dec, g_W_encT, g_b_enc, l1_feat):
    """Per-feature gradients from the CSC lists; one block per feature.

    For feature j with entries (row i, value f, d_pre) in row order:
    ``g_W_dec[j] = sum f d_xhat[i]`` plus, if ``weighted``, ``(l1_scale *
    sum f) * W_dec[j] / norms[j]`` (norm 0: nothing), else (unit_norm) minus
    its component along ``W_dec[j]``; ``g_W_encT[j] = sum d_pre (x[i] -
    b_dec)``; ``g_b_enc[j] = sum d_pre``; ``l1_feat[j] = (sum f) * pen_j``
    (pen = norm or 1). Shapes: g_W_dec, g_W_encT, W_dec float32 ``[d_sae,
    d_in]``; x, d_xhat float32 ``[N, d_in]``; colptr int64 ``[d_sae + 1]``;
    entry_of int64, row_of int32 ``[nnz]``. Block ``BLOCK`` threads over
    d_in. Every thread walks the entry list itself (it is cached and short
    next to d_in) so no barrier is needed except the unit-norm reductions.
    """
    sh = cuda.shared.array((2, BLOCK), np.float32)
    t = cuda.threadIdx.x
    d_sae = W_dec.shape[0]
    d_in = W_dec.shape[1]
    for j in range(cuda.blockIdx.x, d_sae, cuda.gridDim.x):
        s = colptr[j]
        e = colptr[j + 1]
        fs = np.float32(0.0)
        ds = np.float32(0.0)
        for q in range(s, e):
            p = entry_of[q]
            fs += values[p]
            ds += dpre[p]
        nj = norms[j]
        coef = np.float32(0.0)
        if weighted and nj > 0:
            coef = l1_scale * fs
        dot = np.float32(0.0)
        sq = np.float32(0.0)
        for k in range(t, d_in, BLOCK):
            ad = np.float32(0.0)
            ae = np.float32(0.0)
            bk = b_dec[k]
            for q in range(s, e):
                p = entry_of[q]
                i = row_of[q]
                ad += values[p] * d_xhat[i, k]
                ae += dpre[p] * (x[i, k] - bk)
            w = W_dec[j, k]
            if weighted and nj > 0:
                ad += coef * (w / nj)
            g_W_dec[j, k] = ad
            g_W_encT[j, k] = ae
            dot += ad * w
            sq += w * w
        if t == 0:
            g_b_enc[j] = ds
            if weighted:
                l1_feat[j] = fs * nj
            else:
                l1_feat[j] = fs
        if not weighted:  # unit_norm: remove the component along W_dec[j]
            dsum, ssum = block_sum2(sh, t, dot, sq)
            if ssum > 0:
                proj = dsum / ssum
                for k in range(t, d_in, BLOCK):
                    g_W_dec[j, k] -= proj * W_dec[j, k]


@cuda.jit(cache=True)
def transpose_kernel(src, dst):
    """``dst = src.T``; src float32 ``[R, C]``, dst float32 ``[C, R]``.

    Grid ``(ceil(C / TILE), ceil(R / TILE))``, block ``(TILE, TILE_ROWS)``;
    the shared tile has one padding column against bank conflicts.
    """
    tile = cuda.shared.array((TILE, _TILE_COLS), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c0 = cuda.blockIdx.x * TILE
    r0 = cuda.blockIdx.y * TILE
    R = src.shape[0]
    C = src.shape[1]
    for yy in range(ty, TILE, TILE_ROWS):
        r = r0 + yy
        c = c0 + tx
        if r < R and c < C:
            tile[yy, tx] = src[r, c]
    cuda.syncthreads()
    for yy in range(ty, TILE, TILE_ROWS):
        r = c0 + yy  # row of dst = column of src
        c = r0 + tx
        if r < C and c < R:
            dst[r, c] = tile[tx, yy]


@cuda.jit(cache=True)
def matvec_sub_kernel(W, vec, out):
    """``out[k] -= W[k] . vec``; W float32 ``[d_in, d_sae]``, vec float32
    ``[d_sae]``, out float32 ``[d_in]``. One block per row of W.
    """
    sh = cuda.shared.array(BLOCK, np.float32)
    t = cuda.threadIdx.x
    d = W.shape[1]
    for k in range(cuda.blockIdx.x, W.shape[0], cuda.gridDim.x):
        acc = np.float32(0.0)
        for j in range(t, d, BLOCK):
            acc += W[k, j] * vec[j]
        s = block_sum(sh, t, acc)
        if t == 0:
            out[k] = out[k] - s
