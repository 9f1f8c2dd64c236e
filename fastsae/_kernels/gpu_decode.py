"""CUDA sparse decode: ``x_hat = codes @ W_dec + b_dec`` from CSR codes.

One block per batch row (grid-stride over rows); the block's threads split
``d_in``, so each active feature's decoder row ``W_dec[j]`` (contiguous,
SAELens layout) is read with coalesced loads, and the row's few entries are
broadcast reads. Work is ``nnz * d_in`` multiply-adds instead of the dense
``N * d_sae * d_in``. No atomics: every output element has one owner, and
its terms are added in the row's (increasing feature) order, then the bias,
as ``f @ W_dec + b_dec`` does. The dense-codes decode reuses
:func:`fastsae._kernels.gpu_encode.gemm_bias_act_kernel`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .gpu_common import BLOCK


@cuda.jit(cache=True)
def sparse_decode_kernel(indptr, indices, values, W_dec, b_dec, out):
    """``out[r] = sum_p values[p] * W_dec[indices[p]] + b_dec``, p over row r.

    indptr: int64 ``[N + 1]``; indices: int32 ``[nnz]``; values: float32
    ``[nnz]``; W_dec: float32 ``[d_sae, d_in]``; b_dec: float32 ``[d_in]``;
    out: float32 ``[N, d_in]``. Block: ``BLOCK`` threads; grid: any.
    """
    t = cuda.threadIdx.x
    n = out.shape[0]
    d_in = out.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        s = indptr[r]
        e = indptr[r + 1]
        for k in range(t, d_in, BLOCK):
            acc = np.float32(0.0)
            for p in range(s, e):
                acc += values[p] * W_dec[indices[p], k]
            out[r, k] = acc + b_dec[k]
