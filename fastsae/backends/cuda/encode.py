"""CUDA encoder kernels: tiled GEMM with a fused epilogue, and CSR compaction.

Encoding a batch is

1. :func:`gemm_bias_act_kernel` -- ``C = act((A - shift) @ B + bias)``, a
   register-blocked shared-memory SGEMM (block tile ``GEMM_BM x GEMM_BN``,
   ``GEMM_TM x GEMM_TN`` outputs per thread, depth ``GEMM_BK`` per stage).
   The ``- b_dec`` shift is applied while the ``x`` tile is staged in shared
   memory; bias, ReLU and the per-row count of active features are the
   epilogue (row counts are reduced in shared memory first, so there is one
   global atomic per row per block tile, not one per thread).
2. :func:`~fastsae.backends.cuda.common.exclusive_scan_kernel` over the row
   counts gives ``indptr``.
3. :func:`compact_rows_kernel` writes each row's nonzeros at their final
   places. Positions come from a block-wide prefix sum over each chunk of
   columns, so the column indices of a row come out strictly increasing
   (canonical CSR) and the result is bit-for-bit deterministic, with no
   sort. Chunks without any nonzero (most of them at SAE sparsity) are
   skipped after a single ``syncthreads_or``.

The dense ``[N, d_sae]`` staging buffer costs one write and one read of
``N * d_sae`` floats, small next to the ``2 N d_in d_sae`` FLOPs of the
product; writing the compact form straight from the epilogue would need the
row counts before the product, i.e. a second product. The same GEMM kernel
serves the dense decode (no shift, no ReLU, no counts).

Host side: :func:`encode_relu`, :func:`encode_relu_sparse` and the helpers
the other families reuse (:func:`_gemm`, :func:`_compact`,
:func:`_encode_sparse`, :func:`_dense_to_sparse`).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...sparse import SparseCodes
from .common import (BLOCK, GEMM_BK, GEMM_BM, GEMM_BN, GEMM_THREADS, GEMM_TM, GEMM_TN,
                     GEMM_TX, GEMM_TY, SCAN_SHARED, _single_block, _zero,
                     block_exclusive_scan, exclusive_scan_kernel, grid_for)
from .placement import (_any_device, _device, _empty, _out, _work, _work_at_least, _wrap)

_PAD = 4  # shared A tile row padding: the transposed stores hit 32 distinct banks
_SA_COLS = GEMM_BM + _PAD  # shared-array shapes must be plain constants
_A_LOADS = GEMM_BM * GEMM_BK // GEMM_THREADS
_B_LOADS = GEMM_BN * GEMM_BK // GEMM_THREADS


@cuda.jit(cache=True)
def gemm_bias_act_kernel(A, shift, has_shift, B, bias, relu, C, row_counts, count):
    """``C = act((A - shift) @ B + bias)``; optionally count positives per row.

    A: float32 ``[M, K]``; shift: float32 ``[K]`` (read only if
    ``has_shift``); B: float32 ``[K, Nc]``; bias: float32 ``[Nc]``; C:
    float32 ``[M, Nc]``; row_counts: int32 ``[M]``, zeroed by the caller,
    incremented by the number of entries ``> 0`` in each row of C when
    ``count`` (else unused; pass any int32 array). ``relu``: apply
    ``max(., 0)``. All C-contiguous.

    Launch: grid ``(ceil(Nc / GEMM_BN), ceil(M / GEMM_BM))``, block
    ``(GEMM_TX, GEMM_TY)``. Thread ``(tx, ty)`` owns rows ``ty + i*GEMM_TY``
    and columns ``tx + j*GEMM_TX`` of the block tile: strided ownership makes
    the shared-memory reads conflict-free and the C stores coalesced.
    """
    sA = cuda.shared.array((GEMM_BK, _SA_COLS), np.float32)  # A tile, transposed
    sB = cuda.shared.array((GEMM_BK, GEMM_BN), np.float32)
    sCount = cuda.shared.array(GEMM_BM, np.int32)
    acc = cuda.local.array((GEMM_TM, GEMM_TN), np.float32)
    ra = cuda.local.array(GEMM_TM, np.float32)
    rb = cuda.local.array(GEMM_TN, np.float32)

    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = ty * GEMM_TX + tx
    row0 = cuda.blockIdx.y * GEMM_BM
    col0 = cuda.blockIdx.x * GEMM_BN
    M = A.shape[0]
    K = A.shape[1]
    Nc = B.shape[1]

    for i in range(GEMM_TM):
        for j in range(GEMM_TN):
            acc[i, j] = 0.0

    for k0 in range(0, K, GEMM_BK):
        # Stage A: consecutive threads read consecutive k of one row.
        for r in range(_A_LOADS):
            e = t + r * GEMM_THREADS
            kk = e % GEMM_BK
            mm = e // GEMM_BK
            gr = row0 + mm
            gk = k0 + kk
            v = np.float32(0.0)
            if gr < M and gk < K:
                v = A[gr, gk]
                if has_shift:
                    v = v - shift[gk]
            sA[kk, mm] = v
        # Stage B: consecutive threads read consecutive columns of one row.
        for r in range(_B_LOADS):
            e = t + r * GEMM_THREADS
            nn = e % GEMM_BN
            kk = e // GEMM_BN
            gk = k0 + kk
            gc = col0 + nn
            v = np.float32(0.0)
            if gk < K and gc < Nc:
                v = B[gk, gc]
            sB[kk, nn] = v
        cuda.syncthreads()
        for kk in range(GEMM_BK):
            for i in range(GEMM_TM):
                ra[i] = sA[kk, ty + i * GEMM_TY]
            for j in range(GEMM_TN):
                rb[j] = sB[kk, tx + j * GEMM_TX]
            for i in range(GEMM_TM):
                for j in range(GEMM_TN):
                    acc[i, j] += ra[i] * rb[j]
        cuda.syncthreads()

    # Epilogue: bias, activation, store, per-row positive counts.
    if count:
        for i in range(t, GEMM_BM, GEMM_THREADS):
            sCount[i] = 0
        cuda.syncthreads()
    for i in range(GEMM_TM):
        lr = ty + i * GEMM_TY
        r = row0 + lr
        if r < M:
            n_pos = 0
            for j in range(GEMM_TN):
                c = col0 + tx + j * GEMM_TX
                if c < Nc:
                    v = acc[i, j] + bias[c]
                    if relu and not v > 0:
                        v = np.float32(0.0)
                    C[r, c] = v
                    if v > 0:
                        n_pos += 1
            if count and n_pos > 0:
                cuda.atomic.add(sCount, lr, n_pos)
    if count:
        cuda.syncthreads()
        for i in range(t, GEMM_BM, GEMM_THREADS):
            if sCount[i] > 0:
                cuda.atomic.add(row_counts, row0 + i, sCount[i])


def gemm_launch(M: int, Nc: int):
    """``(grid, block)`` for :func:`gemm_bias_act_kernel` with output ``[M, Nc]``."""
    return ((-(-Nc // GEMM_BN), -(-M // GEMM_BM)), (GEMM_TX, GEMM_TY))


@cuda.jit(cache=True)
def count_rows_kernel(dense, counts):
    """``counts[r] = number of nonzeros in dense[r]``.

    dense: float32 ``[N, d]``; counts: int32 ``[N]``. One block of ``BLOCK``
    threads per row (grid-stride over rows).
    """
    t = cuda.threadIdx.x
    n = dense.shape[0]
    d = dense.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        total = 0
        for base in range(0, d, BLOCK):
            c = base + t
            flag = 0
            if c < d and dense[r, c] != 0:
                flag = 1
            total += cuda.syncthreads_count(flag)
        if t == 0:
            counts[r] = total


@cuda.jit(cache=True)
def compact_rows_kernel(dense, indptr, indices, values):
    """Write the nonzeros of ``dense`` as canonical CSR.

    dense: float32 ``[N, d]``; indptr: int64 ``[N + 1]`` (exclusive scan of
    the row counts); indices: int32 ``[nnz]`` and values: float32 ``[nnz]``
    (outputs). One block of ``BLOCK`` threads per row (grid-stride over
    rows); within a row, chunk by chunk of ``BLOCK`` columns, each nonzero
    goes to ``indptr[r] + (nonzeros before it in the row)``: increasing
    columns, deterministic, no atomics.
    """
    sh = cuda.shared.array(SCAN_SHARED, np.int64)
    t = cuda.threadIdx.x
    n = dense.shape[0]
    d = dense.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        pos = indptr[r]
        for base in range(0, d, BLOCK):
            c = base + t
            v = np.float32(0.0)
            flag = 0
            if c < d:
                v = dense[r, c]
                if v != 0:
                    flag = 1
            if cuda.syncthreads_or(flag):  # uniform: skip empty chunks
                excl, total = block_exclusive_scan(sh, t, flag)
                if flag:
                    indices[pos + excl] = c
                    values[pos + excl] = v
                pos += total


# ------------------------------------------------------------ host side
def _gemm(A, shift, B, bias, relu, out, row_counts=None):
    """``out = act((A - shift) @ B + bias)`` (no shift when ``shift`` is
    None), counting each row's positives into ``row_counts`` when given."""
    grid, block = gemm_launch(A.shape[0], B.shape[1])
    has_shift = shift is not None
    if shift is None:
        shift = bias  # never read
    counts = row_counts if row_counts is not None else _work("dummy_counts", 1, np.int32)
    gemm_bias_act_kernel[grid, block](A, shift, has_shift, B, bias, bool(relu), out, counts,
                                      row_counts is not None)


def _compact(dense, counts, indptr=None, fresh=True, tag=""):
    """``(codes, nnz)``: the CSR of ``dense``'s nonzeros given per-row counts
    (int32 [N]); fresh arrays, or workspaces named by ``tag``."""
    n, d = dense.shape
    if indptr is None:
        indptr = _empty(n + 1, np.int64) if fresh else _work("indptr", n + 1, np.int64)
    _single_block(exclusive_scan_kernel)(counts, indptr)
    nnz = int(indptr[n:n + 1].copy_to_host()[0])  # one scalar read: sizes the output
    if fresh:
        indices = _empty(max(nnz, 1), np.int32)[:nnz]
        values = _empty(max(nnz, 1), np.float32)[:nnz]
    else:
        indices = _work_at_least("indices" + tag, nnz, np.int32)
        values = _work_at_least("values" + tag, nnz, np.float32)
    compact_rows_kernel[grid_for(n), BLOCK](dense, indptr, indices, values)
    return SparseCodes(_wrap(indptr), _wrap(indices), _wrap(values), (int(n), int(d))), nnz


def _encode_sparse(x, W_enc, b_enc, b_dec, fresh):
    """``(codes, nnz)`` of the ReLU encoder, through the staging buffer
    (``b_dec`` None: no input centring, as a transcoder encodes)."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    dense = _work("enc_dense", (n, d_sae))
    counts = _work("row_counts", n, np.int32)
    _zero(counts)
    _gemm(x, b_dec, W_enc, b_enc, True, dense, counts)
    return _compact(dense, counts, fresh=fresh)


def _dense_to_sparse(f, tag="_dense"):
    """``(codes, nnz)`` of dense device codes ``f``, in workspace arrays named
    by ``tag``: codes that must live at the same time (a TopK gradient's
    codes and AuxK codes) need different tags."""
    counts = _work("row_counts" + tag, f.shape[0], np.int32)
    count_rows_kernel[grid_for(f.shape[0]), BLOCK](f, counts)
    return _compact(f, counts, indptr=_work("indptr" + tag, f.shape[0] + 1, np.int64),
                    fresh=False, tag=tag)


def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense float32 ``[N, d_sae]``."""
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    out = _empty((x.shape[0], W_enc.shape[1]))
    _gemm(x, b_dec, W_enc, b_enc, True, out)
    return _out(out, dev)


def _fp32_only(precision) -> None:
    if precision != "fp32":
        raise ValueError("the cuda backend computes in float32 (precision='fp32')")


def encode_relu_sparse(x, W_enc, b_enc, b_dec, *, precision="fp32") -> SparseCodes:
    """:func:`encode_relu` as canonical :class:`SparseCodes` (float32 only:
    the front refuses ``precision="bf16"`` here)."""
    _fp32_only(precision)
    dev = _any_device(x, W_enc, b_enc, b_dec)
    args = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _encode_sparse(*args, fresh=True)
    return codes if dev else codes.to_host()
