"""CUDA decoder-row norms and the L1 subgradient.

``W_dec`` is ``[d_sae, d_in]``: each feature's decoder vector is a
contiguous row, so one block per feature reads it coalesced and reduces in
shared memory (float32, like the reference's float32 sum). The L1
subgradient is elementwise: ``c * norms[j]`` at active entries. ``c`` is
passed as float32 so the product is rounded exactly like NumPy's
``python_float * float32_array``.

Host side: :func:`decoder_column_norms`, :func:`l1_subgradient` and
:func:`_norms` (the backward passes' norms, into a workspace).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...sparse import SparseCodes
from .common import BLOCK, block_sum, flat_grid, grid_for
from .placement import _any_device, _codes_device, _device, _empty, _out, _wrap


@cuda.jit(cache=True)
def row_norms_kernel(W, out):
    """``out[r] = sqrt(sum_k W[r, k]**2)``; W float32 ``[R, d]``, out float32 ``[R]``.

    Block: ``BLOCK`` threads, one row at a time (grid-stride over rows).
    """
    sh = cuda.shared.array(BLOCK, np.float32)
    t = cuda.threadIdx.x
    R = W.shape[0]
    d = W.shape[1]
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        acc = np.float32(0.0)
        for k in range(t, d, BLOCK):
            w = W[r, k]
            acc += w * w
        s = block_sum(sh, t, acc)
        if t == 0:
            out[r] = math.sqrt(s)


@cuda.jit(cache=True)
def l1_dense_kernel(codes, norms, c, out):
    """``out[i, j] = c * norms[j] if codes[i, j] > 0 else 0``.

    codes, out: float32 ``[N, d_sae]``; norms: float32 ``[d_sae]``; c:
    float32. 1-D grid-stride over the flattened entries.
    """
    n = codes.shape[0]
    d = codes.shape[1]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for idx in range(start, n * d, step):
        i = idx // d
        j = idx - i * d
        v = np.float32(0.0)
        if codes[i, j] > 0:
            v = c * norms[j]
        out[i, j] = v


@cuda.jit(cache=True)
def l1_sparse_kernel(indices, values, norms, c, out):
    """``out[p] = c * norms[indices[p]]`` where ``values[p] > 0``, else 0.

    indices: int32 ``[nnz]``; values, out: float32 ``[nnz]``; norms: float32
    ``[d_sae]``; c: float32. A stored zero or negative value gets 0, as in
    the dense rule (encoders only store positive values).
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for p in range(start, indices.shape[0], step):
        v = np.float32(0.0)
        if values[p] > 0:
            v = c * norms[indices[p]]
        out[p] = v


# ------------------------------------------------------------ host side
def _norms(W_dec, out):
    """``out[j] = ||W_dec[j]||`` (device arrays); returns ``out``."""
    row_norms_kernel[grid_for(W_dec.shape[0]), BLOCK](W_dec, out)
    return out


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row, float32 ``[d_sae]``."""
    dev = _any_device(W_dec)
    W_dec = _device(W_dec)
    return _out(_norms(W_dec, _empty(W_dec.shape[0])), dev)


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms[j]`` where ``codes[i, j] > 0``, else 0; same
    kind as ``codes`` (sparse codes keep their pattern)."""
    dev = _any_device(codes, norms)
    norms = _device(norms)
    c = np.float32(l1_coefficient)
    if isinstance(codes, SparseCodes):
        indptr, indices, values = _codes_device(codes)
        vals = _empty(max(indices.shape[0], 1))[:indices.shape[0]]
        l1_sparse_kernel[flat_grid(indices.shape[0]), BLOCK](indices, values, norms, c, vals)
        if not dev:
            h = codes.to_host()
            return SparseCodes(np.array(h.indptr, dtype=np.int64), np.array(h.indices, np.int32),
                               vals.copy_to_host(), tuple(codes.shape))
        out_ptr = _empty(indptr.shape[0], np.int64)
        out_idx = _empty(max(indices.shape[0], 1), np.int32)[:indices.shape[0]]
        out_ptr.copy_to_device(indptr)
        if indices.shape[0]:
            out_idx.copy_to_device(indices)
        return SparseCodes(out_ptr, out_idx, _wrap(vals), tuple(codes.shape))
    f = _device(codes)
    out = _empty(f.shape)
    l1_dense_kernel[flat_grid(f.shape[0] * f.shape[1]), BLOCK](f, norms, c, out)
    return _out(out, dev)
