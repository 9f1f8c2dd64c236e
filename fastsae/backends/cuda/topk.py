"""CUDA kernels of the TopK family: exact per-row / whole-batch selection.

The GEMM of :mod:`fastsae.backends.cuda.encode` writes the pre-activations
into the dense staging buffer (no ReLU); these kernels then select on it.

Selection works on *keys*: the float32 bit pattern mapped to an unsigned
integer whose order is the float order (sign bit set: all bits flipped;
else sign bit set), read through a ``uint32`` view of the same buffer. -0.0
is mapped to the key of +0.0, so equal floats have equal keys. A radix
select over the 4 bytes of the key (256-bin histograms) gives the key ``T``
of the k-th largest value exactly, and how many entries equal to ``T`` are
taken; the lower-index tie rule then fixes *which* ones: the first ``need``
entries with key ``T`` in column order (BatchTopK: in row-major flat order,
via an exclusive scan of the per-row tie counts). Each row's selection is
finally described by ``(thr_key[r], thr_col[r])``: keep column ``c`` iff
``key > thr_key[r]`` or (``key == thr_key[r]`` and ``c <= thr_col[r]``);
:func:`mask_kernel` applies it together with the ReLU (entries ``<= 0``
dropped) and the AuxK dead-feature mask, and the existing count/compact
kernels turn the result into canonical CSR. Everything is deterministic
(integer atomics only).

Keys are carried as int64 in ``[0, 2**32)``; ``NO_KEY = 2**32`` selects
nothing.

Host side: :func:`encode_topk`, :func:`encode_batchtopk`,
:func:`encode_jumprelu` and the selection steps the TopK training step
reuses (:func:`_pre`, :func:`_topk_codes`, :func:`_aux_codes`).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...sparse import SparseCodes
from .common import (BLOCK, SCAN_SHARED, _single_block, _zero, block_exclusive_scan,
                     exclusive_scan_kernel, flat_grid, grid_for)
from .encode import _compact, _fp32_only, _gemm, count_rows_kernel
from .placement import _any_device, _codes_out, _device, _work

NBINS = 256
NO_KEY = 1 << 32


@cuda.jit(device=True, inline=True)
def _key(b):
    """Order-preserving int64 key of float32 bits ``b`` (uint32); NaN gets
    key 0, below ``-inf``, so it is never selected (as on the CPU backends,
    whose ``v > threshold`` tests are false for NaN)."""
    k = np.int64(b)
    if (k & 2147483647) > 2139095040:  # exponent all ones, mantissa not 0: NaN
        return np.int64(0)
    if k >= 2147483648:
        k = 4294967295 - k
        if k == 2147483647:  # -0.0 -> key of +0.0
            k = 2147483648
    else:
        k = k + 2147483648
    return k


@cuda.jit(device=True)
def _nth_tied_column(bits, r, key_t, nth, dead, use_mask, sh, sel):
    """``sel[0] =`` the column of the ``nth`` (1-based) entry of row ``r``
    whose key is ``key_t`` (among the ``dead`` columns when ``use_mask``), in
    column order; ``sel[0]`` is left as it was when the row has fewer.

    A block scan over chunks of ``BLOCK`` columns (``sh``: the scan's shared
    int64 ``[SCAN_SHARED]``), stopping at the chunk that holds it. Must be
    reached by all threads of the block; ``sel[0]`` is written by one thread,
    so read it after a barrier.
    """
    t = cuda.threadIdx.x
    d = bits.shape[1]
    run = np.int64(0)
    for base in range(0, d, BLOCK):
        c = base + t
        flag = 0
        if c < d and (not use_mask or dead[c]) and _key(bits[r, c]) == key_t:
            flag = 1
        excl, total = block_exclusive_scan(sh, t, flag)
        if flag and run + excl + 1 == nth:
            sel[0] = c
        run += total
        if run >= nth:
            break


@cuda.jit(cache=True)
def row_select_kernel(bits, k, dead, use_mask, thr_key, thr_col):
    """Per row, the key of the ``k``-th largest (allowed) entry and the
    column of the last tied entry taken (lower index first).

    bits: uint32 ``[N, d]`` (float32 pre-activations viewed as bits); k:
    int, ``1 <= k <=`` allowed entries per row (``k == 0`` selects
    nothing); dead: bool ``[d]``, the allowed columns when ``use_mask``
    (AuxK), else unused; thr_key: int64 ``[N]``, thr_col: int32 ``[N]``
    (outputs). One block of ``BLOCK`` threads per row (grid-stride): four
    radix passes with a shared 256-bin histogram, then a chunked block scan
    that finds the ``need``-th tied column.
    """
    hist = cuda.shared.array(NBINS, np.int32)
    sel = cuda.shared.array(2, np.int64)
    sh = cuda.shared.array(SCAN_SHARED, np.int64)
    t = cuda.threadIdx.x
    n = bits.shape[0]
    d = bits.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        if k == 0:
            if t == 0:
                thr_key[r] = NO_KEY
                thr_col[r] = -1
            continue
        prefix = np.int64(0)
        remaining = np.int64(k)
        for p in range(4):
            shift = 24 - 8 * p
            for b in range(t, NBINS, BLOCK):
                hist[b] = 0
            cuda.syncthreads()
            for c in range(t, d, BLOCK):
                if use_mask and not dead[c]:
                    continue
                key = _key(bits[r, c])
                if (key >> (shift + 8)) == (prefix >> (shift + 8)):
                    cuda.atomic.add(hist, (key >> shift) & 255, 1)
            cuda.syncthreads()
            if t == 0:
                cum = np.int64(0)
                chosen = 0
                for bb in range(NBINS - 1, -1, -1):
                    h = np.int64(hist[bb])
                    if cum + h >= remaining:
                        chosen = bb
                        break
                    cum += h
                sel[0] = chosen
                sel[1] = remaining - cum
            cuda.syncthreads()
            prefix = prefix | (sel[0] << shift)
            remaining = sel[1]
            cuda.syncthreads()
        # the remaining-th entry with key == prefix, in column order
        _nth_tied_column(bits, r, prefix, remaining, dead, use_mask, sh, sel)
        cuda.syncthreads()
        found = np.int32(sel[0])
        if t == 0:
            thr_key[r] = prefix
            thr_col[r] = found
        cuda.syncthreads()


@cuda.jit(cache=True)
def hist_kernel(bits, prefix, shift, hist):
    """Whole-matrix radix pass: ``hist[(key >> shift) & 255] += 1`` over the
    entries whose key agrees with ``prefix`` above bit ``shift + 8``.

    bits: uint32 ``[M]`` (flat view); hist: int64 ``[256]``, zeroed by the
    caller. Any 1-D grid of ``BLOCK`` threads; a shared histogram per block,
    then one global atomic per bin.
    """
    local = cuda.shared.array(NBINS, np.int32)
    t = cuda.threadIdx.x
    for b in range(t, NBINS, BLOCK):
        local[b] = 0
    cuda.syncthreads()
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    hi = shift + 8
    for i in range(start, bits.shape[0], step):
        key = _key(bits[i])
        if (key >> hi) == (prefix >> hi):
            cuda.atomic.add(local, (key >> shift) & 255, 1)
    cuda.syncthreads()
    for b in range(t, NBINS, BLOCK):
        if local[b] > 0:
            cuda.atomic.add(hist, b, np.int64(local[b]))


@cuda.jit(cache=True)
def row_ties_kernel(bits, key_t, counts):
    """``counts[r]`` = entries of row ``r`` whose key is ``key_t``.

    bits: uint32 ``[N, d]``; counts: int32 ``[N]``. One block per row.
    """
    t = cuda.threadIdx.x
    n = bits.shape[0]
    d = bits.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        total = 0
        for base in range(0, d, BLOCK):
            c = base + t
            flag = 0
            if c < d and _key(bits[r, c]) == key_t:
                flag = 1
            total += cuda.syncthreads_count(flag)
        if t == 0:
            counts[r] = total


@cuda.jit(cache=True)
def batch_tie_cols_kernel(bits, key_t, need, tie_before, no_mask, thr_key, thr_col):
    """BatchTopK: each row's share of the ``need`` tied entries (row-major
    order) as the column of its last taken tie.

    tie_before: int64 ``[N + 1]`` (exclusive scan of the per-row tie
    counts); no_mask: any bool ``[>= 1]`` array, never read (the shared
    tie scan's mask argument); thr_key int64 / thr_col int32 ``[N]``
    (outputs; ``thr_col = -1``: no tie taken in the row). One block per row.
    """
    sh = cuda.shared.array(SCAN_SHARED, np.int64)
    sel = cuda.shared.array(1, np.int64)
    t = cuda.threadIdx.x
    n = bits.shape[0]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        take = need - tie_before[r]
        row_ties = tie_before[r + 1] - tie_before[r]
        if take > row_ties:
            take = row_ties
        if t == 0:
            sel[0] = -1
        cuda.syncthreads()
        if take > 0:
            _nth_tied_column(bits, r, key_t, take, no_mask, False, sh, sel)
        cuda.syncthreads()
        if t == 0:
            thr_key[r] = key_t
            thr_col[r] = np.int32(sel[0])
        cuda.syncthreads()


@cuda.jit(cache=True)
def mask_kernel(pre, bits, thr_key, thr_col, dead, use_mask, out):
    """``out[r, c] = pre[r, c]`` where selected and ``> 0``, else 0.

    pre: float32 ``[N, d]`` and bits its uint32 view; thr_key int64 /
    thr_col int32 ``[N]`` from a select kernel; dead: bool ``[d]`` (used
    when ``use_mask``); out: float32 ``[N, d]`` (may not alias pre).
    2-D grid-stride, columns fastest (coalesced).
    """
    n = pre.shape[0]
    d = pre.shape[1]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, n * d, step):
        r = e // d
        c = e - r * d
        v = pre[r, c]
        keep = v > 0
        if keep and use_mask and not dead[c]:
            keep = False
        if keep:
            key = _key(bits[r, c])
            tk = thr_key[r]
            keep = key > tk or (key == tk and c <= thr_col[r])
        out[r, c] = v if keep else np.float32(0.0)


@cuda.jit(cache=True)
def jumprelu_kernel(pre, threshold, out):
    """``out = pre if pre > threshold[c] and pre > 0 else 0``; pre/out
    float32 ``[N, d]`` (may alias), threshold float32 ``[d]``. Grid-stride."""
    n = pre.shape[0]
    d = pre.shape[1]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, n * d, step):
        r = e // d
        c = e - r * d
        v = pre[r, c]
        out[r, c] = v if (v > threshold[c] and v > 0) else np.float32(0.0)


@cuda.jit(cache=True)
def min_kernel(arr, out, slot):
    """``out[slot] = min(arr)`` (0.0 if empty) in float64; ONE block."""
    sh = cuda.shared.array(BLOCK, np.float64)
    t = cuda.threadIdx.x
    m = np.inf
    for i in range(t, arr.shape[0], BLOCK):
        v = np.float64(arr[i])
        if v < m:
            m = v
    sh[t] = m
    cuda.syncthreads()
    s = BLOCK // 2
    while s > 0:
        if t < s and sh[t + s] < sh[t]:
            sh[t] = sh[t + s]
        cuda.syncthreads()
        s //= 2
    if t == 0:
        out[slot] = sh[0] if arr.shape[0] > 0 else 0.0


# ------------------------------------------------------------ host side
# Forward: the GEMM writes pre-activations (no ReLU) into the staging buffer,
# a selection kernel describes each row's selection as (threshold key, last
# tied column), mask_kernel writes the selected positive entries into a
# second buffer, and the ReLU path's count/compact kernels make canonical
# CSR of it.

def _pre(x, W_enc, b_enc, b_dec):
    """The pre-activations ``(x - b_dec) @ W_enc + b_enc`` (a workspace;
    ``b_dec`` None: no centring, a transcoder's ``x @ W_enc + b_enc``)."""
    pre = _work("topk_pre", (x.shape[0], W_enc.shape[1]))
    _gemm(x, b_dec, W_enc, b_enc, False, pre)
    return pre


def _select_rows(pre, k, dead=None):
    """(thr_key int64 [N], thr_col int32 [N]) of the per-row top-k
    (among the ``dead`` columns when given); ``k`` already clipped."""
    n = pre.shape[0]
    bits = pre.view(np.uint32)
    thr_key = _work("thr_key", n, np.int64)
    thr_col = _work("thr_col", n, np.int32)
    mask = dead if dead is not None else _work("dummy_mask", 1, np.bool_)
    row_select_kernel[grid_for(n), BLOCK](bits, k, mask, dead is not None, thr_key, thr_col)
    return thr_key, thr_col


def _select_batch(pre, total):
    """BatchTopK selection of the ``total`` largest entries (flat tie rule)."""
    n, d = pre.shape
    bits = pre.view(np.uint32)
    flat = bits.reshape(n * d)
    hist = _work("topk_hist", NBINS, np.int64)
    prefix, remaining = 0, int(total)
    for p in range(4):
        shift = 24 - 8 * p
        _zero(hist)
        hist_kernel[flat_grid(n * d), BLOCK](flat, np.int64(prefix), shift, hist)
        h = hist.copy_to_host()  # 256 counts: the bin choice is made on the host
        cum = 0
        for b in range(NBINS - 1, -1, -1):
            if cum + int(h[b]) >= remaining:
                prefix |= b << shift
                remaining -= cum
                break
            cum += int(h[b])
    ties = _work("topk_ties", n, np.int32)
    row_ties_kernel[grid_for(n), BLOCK](bits, np.int64(prefix), ties)
    tie_before = _work("topk_tie_before", n + 1, np.int64)
    _single_block(exclusive_scan_kernel)(ties, tie_before)
    thr_key = _work("thr_key", n, np.int64)
    thr_col = _work("thr_col", n, np.int32)
    batch_tie_cols_kernel[grid_for(n), BLOCK](bits, np.int64(prefix), np.int64(remaining),
                                              tie_before, _work("dummy_mask", 1, np.bool_),
                                              thr_key, thr_col)
    return thr_key, thr_col


def _apply_selection(pre, thr_key, thr_col, dead, out_name, fresh):
    """``(codes, nnz)`` of the selected positive entries of ``pre``."""
    n, d = pre.shape
    out = _work(out_name, (n, d))
    mask = dead if dead is not None else _work("dummy_mask", 1, np.bool_)
    mask_kernel[flat_grid(n * d), BLOCK](pre, pre.view(np.uint32), thr_key, thr_col, mask,
                                         dead is not None, out)
    counts = _work("row_counts_" + out_name, n, np.int32)
    count_rows_kernel[grid_for(n), BLOCK](out, counts)
    indptr = None if fresh else _work("indptr_" + out_name, n + 1, np.int64)
    return _compact(out, counts, indptr=indptr, fresh=fresh, tag=out_name)


def _topk_codes(pre, k, activation, fresh, name="topk_dense"):
    """``(codes, nnz)`` of the TopK (``activation="topk"``) or BatchTopK
    selection on the staged pre-activations."""
    n, d = pre.shape
    if activation == "topk":
        thr = _select_rows(pre, min(k, d))
    else:
        thr = _select_batch(pre, min(k * n, n * d))
    return _apply_selection(pre, *thr, None, name, fresh)


def _aux_codes(pre, dead, n_dead, k_aux, fresh):
    """``(codes, nnz)`` of AuxK: per row the ``k_aux`` largest among the
    ``n_dead`` dead latents (``dead``: bool device mask)."""
    thr = _select_rows(pre, min(k_aux, n_dead), dead)
    return _apply_selection(pre, *thr, dead, "aux_dense", fresh)


def encode_topk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """Per row, the ``k`` largest pre-activations (ties: lower feature index),
    then ReLU, as canonical :class:`SparseCodes` (float32 only)."""
    _fp32_only(precision)
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _topk_codes(_pre(x, W_enc, b_enc, b_dec), k, "topk", fresh=True)
    return _codes_out(codes, dev)


def encode_batchtopk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: lower
    row-major index), then ReLU, as canonical :class:`SparseCodes` (float32 only)."""
    _fp32_only(precision)
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _topk_codes(_pre(x, W_enc, b_enc, b_dec), k, "batchtopk", fresh=True)
    return _codes_out(codes, dev)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, *, precision="fp32") -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` per feature, as :class:`SparseCodes`
    (float32 only)."""
    _fp32_only(precision)
    dev = _any_device(x, W_enc, b_enc, b_dec, threshold)
    x, W_enc, b_enc, b_dec, threshold = (_device(a) for a in (x, W_enc, b_enc, b_dec,
                                                              threshold))
    pre = _pre(x, W_enc, b_enc, b_dec)
    n, d = pre.shape
    jumprelu_kernel[flat_grid(n * d), BLOCK](pre, threshold, pre)
    counts = _work("row_counts_jump", n, np.int32)
    count_rows_kernel[grid_for(n), BLOCK](pre, counts)
    codes, _ = _compact(pre, counts, fresh=True)
    return _codes_out(codes, dev)
