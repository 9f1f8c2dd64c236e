"""CUDA sparse decode: ``x_hat = codes @ W_dec + b_dec`` from CSR codes.

One block per batch row (grid-stride over rows); the block's threads split
``d_in``, so each active feature's decoder row ``W_dec[j]`` (contiguous,
SAELens layout) is read with coalesced loads, and the row's few entries are
broadcast reads. Work is ``nnz * d_in`` multiply-adds instead of the dense
``N * d_sae * d_in``. No atomics: every output element has one owner, and
its terms are added in the row's (increasing feature) order, then the bias,
as ``f @ W_dec + b_dec`` does. The dense-codes decode reuses
:func:`fastsae.backends.cuda.encode.gemm_bias_act_kernel`.

Host side: :func:`decode` and :func:`_sparse_decode` (also used by the
training steps and the AuxK backward).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...sparse import SparseCodes
from .common import BLOCK, grid_for
from .encode import _gemm
from .placement import _any_device, _codes_device, _device, _empty, _out


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


# ------------------------------------------------------------ host side
def _sparse_decode(indptr, indices, values, W_dec, b_dec, out):
    """``out = codes @ W_dec + b_dec`` for device CSR arrays."""
    sparse_decode_kernel[grid_for(out.shape[0]), BLOCK](indptr, indices, values, W_dec, b_dec,
                                                        out)


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec``, float32 ``[N, d_in]``; codes dense or sparse."""
    dev = _any_device(codes, W_dec, b_dec)
    W_dec, b_dec = _device(W_dec), _device(b_dec)
    n = int(codes.shape[0])
    out = _empty((n, W_dec.shape[1]))
    if isinstance(codes, SparseCodes):
        _sparse_decode(*_codes_device(codes), W_dec, b_dec, out)
    else:
        _gemm(_device(codes), None, W_dec, b_dec, False, out)
    return _out(out, dev)
