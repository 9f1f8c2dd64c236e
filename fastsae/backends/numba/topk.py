"""Numba CPU TopK-family encoders: TopK (:func:`encode_topk_csr`),
BatchTopK (:func:`encode_batchtopk_csr`), JumpReLU
(:func:`encode_jumprelu_csr`), and AuxK (fused with TopK in the training
step's :func:`encode_topk_train`, or via TopK on the columns
:func:`gather_columns` gathers).

Layouts as in :mod:`fastsae.backends.numba.encode`: ``xc = x - b_dec`` float32
``[N, d_in]``, ``W_enc`` float32 ``[d_in, d_sae]`` (C-contiguous), ``b_enc``
``[d_sae]``. Outputs are canonical CSR (``indptr`` int64 ``[N+1]``,
``indices`` int32 increasing per row, ``values`` float32 > 0).

Selection rule (see :mod:`fastsae.backends.reference`): larger pre-activation first,
ties broken by the lower feature index (BatchTopK: lower row-major flat
index); ReLU after the selection, zeroed entries dropped. Because ReLU drops
every non-positive selected entry, "the k largest, then ReLU" equals "the
min(k, #positive) largest positive entries": the kernels only ever keep
positive pre-activations, with 0 as the initial admission threshold.

Fusion: as in the ReLU encoder, each Numba thread owns whole row blocks of
a fixed ``row_block x NUMBA_TOPK_COL_BLOCK`` grid (the face passes
``row_block = NUMBA_TOPK_ROW_BLOCK``, see :mod:`fastsae.backends.tunables`),
runs one single-threaded sgemm per tile into a per-thread workspace and
selects while the tile is in cache; the ``N x d_sae`` pre-activations are
never written to main memory. AuxK (dead features only) is selected in the
same loop over each cached row (:func:`_select_blocks_train`).
Per row, a buffer of the ``K`` best entries so far is kept sorted (value
descending, index ascending); a column is inserted only when it beats the
buffer's last entry strictly (columns arrive in increasing index order, so
an equal value never displaces an earlier column: that is the tie rule).
The fixed block grid keeps results independent of the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import NUMBA_TOPK_COL_BLOCK
from .decode import csr_from_counts
from .encode import _part_bounds, gemm, warm_gemm

__all__ = ["topk_rows", "encode_topk_train", "encode_topk_csr", "encode_batchtopk_csr",
           "encode_jumprelu_csr", "gather_columns"]



@njit(inline="always")
def _insert(v, j, K, bv, bi, cnt):
    """Insert ``(v, j)`` into the sorted buffer (``v`` beats its last entry
    or the buffer is not full) after every entry with value ``>= v``;
    returns the new count."""
    q = cnt if cnt < K else K - 1
    while q > 0 and bv[q - 1] < v:
        if q < K:
            bv[q] = bv[q - 1]
            bi[q] = bi[q - 1]
        q -= 1
    bv[q] = v
    bi[q] = j
    return cnt + 1 if cnt < K else cnt


@njit(cache=True)
def _row_topk(Y, r, b_enc, c0, K, bv, bi, cnt):
    """Continue row ``r``'s selection over the block's columns: ``v = Y[r, jl]
    + b_enc[c0 + jl]`` for feature ``c0 + jl``; ``bv/bi[:cnt]`` hold the best
    positive entries so far (value desc, index asc), at most ``K``. Returns
    the new count.

    One plain loop with a rarely taken branch (~1.5 cycles per column): a
    per-64-column "any hit" pre-count, which LLVM turns into a short vector
    loop plus a horizontal reduction per chunk, measured 4x slower."""
    d = Y.shape[1]
    thr = bv[K - 1] if cnt == K else np.float32(0.0)
    for j in range(d):
        v = Y[r, j] + b_enc[c0 + j]
        if v > thr:
            cnt = _insert(v, c0 + j, K, bv, bi, cnt)
            if cnt == K:
                thr = bv[K - 1]
    return cnt


@njit(cache=True)
def _row_topk_aux(Y, r, b_enc, b_dead, c0, K, bv, bi, cnt, Ka, av, ai, acnt):
    """:func:`_row_topk` for TopK and AuxK in the same loop over the row:
    AuxK uses ``b_dead`` (``b_enc`` on dead features, ``-inf`` elsewhere)
    with its own buffers. A dead feature's value is the same in both, so one
    compare against the lower of the two thresholds filters the columns
    (the common path costs what TopK alone does). Returns ``(cnt, acnt)``."""
    d = Y.shape[1]
    thr = bv[K - 1] if cnt == K else np.float32(0.0)
    athr = av[Ka - 1] if acnt == Ka else np.float32(0.0)
    lo = min(thr, athr)
    for j in range(d):
        y = Y[r, j]
        v = y + b_enc[c0 + j]
        if v > lo:
            if v > thr:
                cnt = _insert(v, c0 + j, K, bv, bi, cnt)
                if cnt == K:
                    thr = bv[K - 1]
            va = y + b_dead[c0 + j]
            if va > athr:
                acnt = _insert(va, c0 + j, Ka, av, ai, acnt)
                if acnt == Ka:
                    athr = av[Ka - 1]
            lo = min(thr, athr)
    return cnt, acnt


@njit(cache=True)
def _row_npos(Y, r, b_enc, c0):
    """Number of positive ``Y[r, jl] + b_enc[c0 + jl]`` in the block's row."""
    c = 0
    for j in range(Y.shape[1]):
        c += 1 if Y[r, j] + b_enc[c0 + j] > 0 else 0
    return c


@njit(cache=True)
def _sort_by_index(bv, bi, m):
    """Insertion sort of ``bi[:m]`` ascending, carrying ``bv`` (m is small)."""
    for a in range(1, m):
        ki = bi[a]
        kv = bv[a]
        q = a
        while q > 0 and bi[q - 1] > ki:
            bi[q] = bi[q - 1]
            bv[q] = bv[q - 1]
            q -= 1
        bi[q] = ki
        bv[q] = kv


@njit(inline="always")
def _grid(n, d_sae, row_block, n_threads):
    """The fixed block grid: ``(rows per block, columns per block, number of
    row blocks, number of thread parts)``; each part owns whole row blocks."""
    rb = max(1, min(row_block, max(n, 1)))
    cb = max(1, min(NUMBA_TOPK_COL_BLOCK, max(d_sae, 1)))
    nblk = (n + rb - 1) // rb
    return rb, cb, nblk, max(1, min(n_threads, nblk))


@njit(inline="always")
def _tile_product(xc, W_enc, i0, i1, c0, c1, ws):
    """Pre-activations of rows ``[i0, i1)`` x columns ``[c0, c1)`` (without
    ``b_enc``) as a C-contiguous tile in workspace ``ws`` (leading dimension =
    its width, so the scans vectorize): one single-threaded sgemm."""
    blk = ws[:(i1 - i0) * (c1 - c0)].reshape((i1 - i0, c1 - c0))
    gemm(xc[i0:i1], W_enc[:, c0:c1], blk, 1.0, 0.0, False, False)
    return blk


@njit(parallel=True, cache=True)
def _select_blocks(xc, W_enc, b_enc, row_block, n_threads, counts, vals, idx, npos, need_npos,
                   sort_rows):
    """The fused product + TopK selection over the fixed ``row_block x
    NUMBA_TOPK_COL_BLOCK`` grid: each thread owns a contiguous run of whole
    row blocks and walks their column blocks in order (one single-threaded
    sgemm per tile into a per-thread workspace). Fills ``counts/vals/idx``
    (top ``K = vals.shape[1]``) and, when ``need_npos``, ``npos`` (exact
    positive count). With ``sort_rows`` each row's buffer ends sorted by
    feature index (CSR order) instead of by value."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    K = vals.shape[1]
    rb, cb, nblk, parts = _grid(n, d_sae, row_block, n_threads)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        ws = np.empty(rb * cb, np.float32)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            for c0 in range(0, d_sae, cb):
                c1 = min(d_sae, c0 + cb)
                blk = _tile_product(xc, W_enc, i0, i1, c0, c1, ws)
                for r in range(i1 - i0):
                    row = i0 + r
                    c_in = counts[row]
                    c_out = _row_topk(blk, r, b_enc, c0, K, vals[row], idx[row], c_in)
                    counts[row] = c_out
                    if need_npos:
                        # not full after the block: every positive was taken
                        npos[row] += (c_out - c_in) if c_out < K else _row_npos(blk, r,
                                                                               b_enc, c0)
            if sort_rows:
                for row in range(i0, i1):
                    _sort_by_index(vals[row], idx[row], counts[row])


@njit(parallel=True, cache=True)
def _select_blocks_train(x, b_dec, xc, W_enc, b_enc, row_block, n_threads, counts, vals, idx,
                         dead, acounts, avals, aidx):
    """:func:`_select_blocks` for the training step: each thread first
    writes ``xc = x - b_dec`` (an output) for its row block; with ``dead``
    (uint8 ``[d_sae]``) non-empty the AuxK buffers ``acounts/avals/aidx``
    are filled in the same scan, with ``b_dead = b_enc`` on dead features
    and ``-inf`` elsewhere (a live feature never passes a threshold >= 0),
    so it vectorizes like the main one and reads the row from L1 right after
    it. Every row's buffers end sorted by feature index."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    K = vals.shape[1]
    has_aux = dead.shape[0] > 0
    K_aux = avals.shape[1]
    b_dead = np.empty(d_sae if has_aux else 0, np.float32)
    for j in range(b_dead.shape[0]):
        b_dead[j] = b_enc[j] if dead[j] != 0 else -np.inf
    rb, cb, nblk, parts = _grid(n, d_sae, row_block, n_threads)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        ws = np.empty(rb * cb, np.float32)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            for i in range(i0, i1):
                for k in range(xc.shape[1]):
                    xc[i, k] = x[i, k] - b_dec[k]
            for c0 in range(0, d_sae, cb):
                c1 = min(d_sae, c0 + cb)
                blk = _tile_product(xc, W_enc, i0, i1, c0, c1, ws)
                for r in range(i1 - i0):
                    row = i0 + r
                    if has_aux:
                        counts[row], acounts[row] = _row_topk_aux(
                            blk, r, b_enc, b_dead, c0, K, vals[row], idx[row], counts[row],
                            K_aux, avals[row], aidx[row], acounts[row])
                    else:
                        counts[row] = _row_topk(blk, r, b_enc, c0, K, vals[row], idx[row],
                                                counts[row])
            for row in range(i0, i1):
                _sort_by_index(vals[row], idx[row], counts[row])
                if has_aux:
                    _sort_by_index(avals[row], aidx[row], acounts[row])


@njit(cache=True)
def topk_rows(xc, W_enc, b_enc, row_block, K, n_threads, need_npos):
    """Per row, the ``K`` largest positive pre-activations, sorted by value
    (desc, ties: lower index first): ``(counts int64 [N], vals float32
    [N, K], idx int32 [N, K], npos int64 [N])``. ``npos`` (exact number of
    positive pre-activations per row) is only computed when ``need_npos``
    (else it equals ``counts``). Grid: ``row_block`` (normally
    ``NUMBA_TOPK_ROW_BLOCK``) x ``NUMBA_TOPK_COL_BLOCK``. Call with BLAS
    limited to one thread."""
    counts, vals, idx, npos = _select_main(xc, W_enc, b_enc, row_block, K, n_threads,
                                           need_npos, False)
    if not need_npos:
        npos[:] = counts
    return counts, vals, idx, npos


@njit(cache=True)
def _select_main(xc, W_enc, b_enc, row_block, K, n_threads, need_npos, sort_rows):
    """The selection of :func:`topk_rows` into fresh buffers: ``(counts,
    vals, idx, npos)``; each row's buffer is sorted by value, or by
    increasing column when ``sort_rows``. ``npos`` is only filled when
    ``need_npos``."""
    n = xc.shape[0]
    K = max(1, min(K, W_enc.shape[1]))
    warm_gemm()
    counts = np.zeros(n, np.int64)
    npos = np.zeros(n, np.int64)
    vals = np.zeros((n, K), np.float32)
    idx = np.zeros((n, K), np.int32)
    _select_blocks(xc, W_enc, b_enc, row_block, n_threads, counts, vals, idx, npos, need_npos,
                   sort_rows)
    return counts, vals, idx, npos


@njit(parallel=True, cache=True)
def _to_csr(take, vals, idx, colmap):
    """CSR from the first ``take[i]`` buffer entries of each row (sorted to
    increasing column); ``colmap`` (if non-empty) maps buffer columns to
    output columns (increasing, so order is preserved)."""
    n = take.shape[0]
    indptr, indices, values = csr_from_counts(take)
    mapped = colmap.shape[0] > 0
    for i in prange(n):
        m = take[i]
        bv = vals[i].copy()
        bi = idx[i].copy()
        _sort_by_index(bv, bi, m)
        o = indptr[i]
        for q in range(m):
            indices[o + q] = colmap[bi[q]] if mapped else bi[q]
            values[o + q] = bv[q]
    return indptr, indices, values


@njit(cache=True)
def _gather_csr(take, vals, idx, colmap):
    """CSR from the first ``take[i]`` entries of each row's buffers, already
    in increasing column order (serial: a copy of ``nnz`` entries);
    ``colmap`` (if non-empty) maps buffer columns to output columns."""
    n = take.shape[0]
    indptr, indices, values = csr_from_counts(take)
    mapped = colmap.shape[0] > 0
    o = 0
    for i in range(n):
        for q in range(take[i]):
            indices[o] = colmap[idx[i, q]] if mapped else idx[i, q]
            values[o] = vals[i, q]
            o += 1
    return indptr, indices, values


@njit(cache=True)
def encode_topk_train(x, b_dec, W_enc, b_enc, row_block, k, n_threads, dead, k_aux):
    """The training step's encoder: ``xc = x - b_dec`` (returned, the
    backward needs it), TopK codes and, when ``dead`` (uint8 ``[d_sae]``)
    is non-empty, AuxK codes (top ``k_aux`` positive among the dead
    features), all from one parallel region with one product: ``(xc,
    (indptr, indices, values), (a_indptr, a_indices, a_values))``, the aux
    triple empty without AuxK. ``k >= 1``."""
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    K = max(1, min(k, d_sae))
    has_aux = dead.shape[0] > 0
    K_aux = max(1, min(k_aux, d_sae)) if has_aux else 1
    na = n if has_aux else 0
    warm_gemm()
    xc = np.empty((n, d_in), np.float32)
    counts = np.zeros(n, np.int64)
    vals = np.zeros((n, K), np.float32)
    idx = np.zeros((n, K), np.int32)
    acounts = np.zeros(na, np.int64)
    avals = np.zeros((na, K_aux), np.float32)
    aidx = np.zeros((na, K_aux), np.int32)
    _select_blocks_train(x, b_dec, xc, W_enc, b_enc, row_block, n_threads, counts, vals, idx,
                         dead, acounts, avals, aidx)
    none = np.empty(0, np.int32)
    main = _gather_csr(counts, vals, idx, none)
    if has_aux:
        aux = _gather_csr(acounts, avals, aidx, none)
    else:
        aux = (np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32))
    return xc, main, aux


@njit(cache=True)
def encode_topk_csr(xc, W_enc, b_enc, row_block, k, n_threads, colmap):
    """TopK codes as CSR ``(indptr, indices, values)``; ``colmap`` int32
    (empty: identity) renames the columns of ``W_enc`` (AuxK passes the dead
    features' indices with the gathered dead columns)."""
    counts, vals, idx, _ = _select_main(xc, W_enc, b_enc, row_block, k, n_threads, False,
                                        True)
    return _gather_csr(counts, vals, idx, colmap)


@njit(cache=True)
def batchtopk_select(counts, vals, idx, npos, total):
    """Global selection among per-row candidate buffers (see
    :func:`encode_batchtopk_csr`). Returns ``(ok, take int64 [N])``: ``ok``
    False when a row with positives beyond its buffer might hold selected
    entries (the caller retries with a larger buffer)."""
    n, K = vals.shape
    tot = 0
    for i in range(n):
        tot += counts[i]
    take = counts.copy()
    truncated = False
    for i in range(n):
        if npos[i] > counts[i]:
            truncated = True
    if tot <= total:
        return not truncated, take
    flat = np.empty(tot, np.float32)
    o = 0
    for i in range(n):
        for q in range(counts[i]):
            flat[o] = vals[i, q]
            o += 1
    # the total-th largest candidate value
    T = np.partition(flat, tot - total)[tot - total]
    for i in range(n):
        if npos[i] > counts[i] and vals[i, counts[i] - 1] >= T:
            return False, take
    n_gt = 0
    for i in range(n):
        c = 0
        while c < counts[i] and vals[i, c] > T:
            c += 1
        take[i] = c
        n_gt += c
    quota = total - n_gt
    # equal values: lower row first; within a row the buffer holds equal
    # values in increasing column order
    for i in range(n):
        if quota <= 0:
            break
        c = take[i]
        while c < counts[i] and vals[i, c] == T and quota > 0:
            c += 1
            quota -= 1
        take[i] = c
    return True, take


def encode_batchtopk_csr(xc, W_enc, b_enc, row_block, k, n_threads, cand=None):
    """BatchTopK codes as CSR ``(indptr, indices, values, cand_used)``.

    Each row keeps its ``cand`` best positive candidates (one fused pass) and
    its exact positive count; the ``N*k``-th largest candidate ``T`` is found
    by partition. The candidates hold the whole selection unless a row with
    positives beyond its buffer has its last candidate ``>= T``; then the
    pass is rerun with a doubled buffer (``cand = d_sae`` is always exact).
    Ties at ``T`` are taken in row-major order. Call with BLAS limited to one
    thread."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    total = min(k * n, n * d_sae)
    K = min(d_sae, max(int(cand or 0), 4 * k))
    while True:
        counts, vals, idx, npos = topk_rows(xc, W_enc, b_enc, row_block, K, n_threads, True)
        ok, take = batchtopk_select(counts, vals, idx, npos, total)
        if ok or K >= d_sae:
            break
        K = min(d_sae, 2 * K)
    indptr, indices, values = _to_csr(take, vals, idx, np.empty(0, np.int32))
    return indptr, indices, values, K


@njit(inline="always")
def _jumprelu_keep(v, t):
    """JumpReLU keeps pre-activation ``v`` when above its threshold ``t`` and 0."""
    return v > t and v > 0


@njit(inline="always")
def _jumprelu_block(xc, W_enc, rb, b, Y):
    """Row block ``b`` of JumpReLU's grid: its first row and its products
    ``(x - b_dec) @ W_enc`` (no bias) in the leading rows of workspace ``Y``
    (one single-threaded sgemm; the same in both passes)."""
    i0 = b * rb
    i1 = min(xc.shape[0], i0 + rb)
    blk = Y[:i1 - i0]
    gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
    return i0, blk


@njit(parallel=True, cache=True)
def _jumprelu_count(xc, W_enc, b_enc, thr, row_block, n_threads, counts):
    """JumpReLU's counting pass: ``counts[row]`` = kept entries, by blocks of
    ``row_block`` rows (parts of whole blocks per thread, one sgemm each)."""
    d_sae = W_enc.shape[1]
    rb, _, nblk, parts = _grid(xc.shape[0], d_sae, row_block, n_threads)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        Y = np.empty((rb, d_sae), np.float32)
        for b in range(b0, b1):
            i0, blk = _jumprelu_block(xc, W_enc, rb, b, Y)
            for r in range(blk.shape[0]):
                c = 0
                for j in range(d_sae):
                    if _jumprelu_keep(blk[r, j] + b_enc[j], thr[j]):
                        c += 1
                counts[i0 + r] = c


@njit(parallel=True, cache=True)
def _jumprelu_fill(xc, W_enc, b_enc, thr, row_block, n_threads, indptr, indices, values):
    """JumpReLU's writing pass: the kept entries of each row to
    ``indptr[row]`` onwards (same grid and products as the counting pass)."""
    d_sae = W_enc.shape[1]
    rb, _, nblk, parts = _grid(xc.shape[0], d_sae, row_block, n_threads)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        Y = np.empty((rb, d_sae), np.float32)
        for b in range(b0, b1):
            i0, blk = _jumprelu_block(xc, W_enc, rb, b, Y)
            for r in range(blk.shape[0]):
                o = indptr[i0 + r]
                for j in range(d_sae):
                    v = blk[r, j] + b_enc[j]
                    if _jumprelu_keep(v, thr[j]):
                        indices[o] = j
                        values[o] = v
                        o += 1


@njit(cache=True)
def encode_jumprelu_csr(xc, W_enc, b_enc, threshold, row_block, n_threads):
    """JumpReLU codes ``relu(pre) * (pre > threshold)`` as CSR: a counting
    pass then a writing pass (two products; this encoder is for inference
    and has no speed target)."""
    n = xc.shape[0]
    warm_gemm()
    counts = np.zeros(n, np.int64)
    _jumprelu_count(xc, W_enc, b_enc, threshold, row_block, n_threads, counts)
    indptr, indices, values = csr_from_counts(counts)
    if indptr[n] > 0:
        _jumprelu_fill(xc, W_enc, b_enc, threshold, row_block, n_threads, indptr, indices,
                       values)
    return indptr, indices, values


@njit(parallel=True, cache=True)
def gather_columns(W_enc, b_enc, cols):
    """``(W_enc[:, cols], b_enc[cols])`` as new C-contiguous arrays."""
    d_in = W_enc.shape[0]
    m = cols.shape[0]
    W = np.empty((d_in, m), np.float32)
    b = np.empty(m, np.float32)
    for k in prange(d_in):
        for q in range(m):
            W[k, q] = W_enc[k, cols[q]]
    for q in range(m):
        b[q] = b_enc[cols[q]]
    return W, b
