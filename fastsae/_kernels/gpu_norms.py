"""CUDA decoder-row norms and the L1 subgradient.

``W_dec`` is ``[d_sae, d_in]``: each feature's decoder vector is a
contiguous row, so one block per feature reads it coalesced and reduces in
shared memory (float32, like the reference's float32 sum). The L1
subgradient is elementwise: ``c * norms[j]`` at active entries. ``c`` is
passed as float32 so the product is rounded exactly like NumPy's
``python_float * float32_array``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .gpu_common import BLOCK, block_sum


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
def l1_sparse_kernel(indices, norms, c, out):
    """``out[p] = c * norms[indices[p]]`` for every stored entry p.

    indices: int32 ``[nnz]``; norms: float32 ``[d_sae]``; out: float32
    ``[nnz]``; c: float32. Like the reference, stored entries are treated as
    active whatever their sign (encoders only store positive values).
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for p in range(start, indices.shape[0], step):
        out[p] = c * norms[indices[p]]
