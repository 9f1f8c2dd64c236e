"""CUDA sparse decode: ``x_hat = codes @ W_dec + b_dec`` from CSR codes.

One block per batch row (grid-stride over rows); the block's threads split
``d_in``, so each active feature's decoder row ``W_dec[j]`` (contiguous,
SAELens layout) is read with coalesced loads, and the row's few entries are
broadcast reads. Work is ``nnz * d_in`` multiply-adds instead of the dense
``N * d_sae * d_in``. No atomics: every output element has one owner, and
its terms are added in the row's (increasing feature) order, then the bias,
as ``f @ W_dec + b_dec`` does. The same walk gives the Matryoshka prefixes'
reconstructions (one output level per width). The dense-codes decode reuses
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
from .placement import _any_device, _codes_device, _device, _empty, _out, _work


@cuda.jit(cache=True)
def sparse_decode_kernel(indptr, indices, values, W_dec, b_dec, widths, out):
    """``out[l, r] = sum_p values[p] * W_dec[indices[p]] + b_dec`` over the
    entries ``p`` of row r with ``indices[p] < widths[l]`` (Matryoshka
    prefixes); with one level (``out.shape[0] == 1``) the whole row, and
    ``widths`` is not read.

    indptr: int64 ``[N + 1]``; indices: int32 ``[nnz]`` (increasing in each
    row); values: float32 ``[nnz]``; W_dec: float32 ``[d_sae, d_in]``;
    b_dec: float32 ``[d_in]``; widths: int64 ``[L]`` (increasing, the last
    ``d_sae``); out: float32 ``[L, N, d_in]``. Block: ``BLOCK`` threads;
    grid: any. The row's entries are walked once: each time an entry's
    feature crosses a width, the running sum so far is that prefix's
    reconstruction (empty levels repeat it).
    """
    t = cuda.threadIdx.x
    nl = out.shape[0]
    n = out.shape[1]
    d_in = out.shape[2]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        s = indptr[r]
        e = indptr[r + 1]
        for k in range(t, d_in, BLOCK):
            acc = np.float32(0.0)
            lev = 0
            for p in range(s, e):
                j = indices[p]
                while lev < nl - 1 and j >= widths[lev]:
                    out[lev, r, k] = acc + b_dec[k]
                    lev += 1
                acc += values[p] * W_dec[j, k]
            while lev < nl:
                out[lev, r, k] = acc + b_dec[k]
                lev += 1


# ------------------------------------------------------------ host side
def _sparse_decode(indptr, indices, values, W_dec, b_dec, out, widths=None):
    """``out = codes @ W_dec + b_dec`` for device CSR arrays; with
    ``widths`` (int64 device ``[L]``) and ``out`` ``[L, N, d_in]``, every
    prefix's reconstruction at once."""
    if widths is None:
        out, widths = _one_level(out), _no_widths()
    sparse_decode_kernel[grid_for(out.shape[1]), BLOCK](indptr, indices, values, W_dec, b_dec,
                                                        widths, out)


def _one_level(a):
    """An ``[N, d]`` device array as the single level ``[1, N, d]`` of the
    level-aware kernels (a view); ``[L, N, d]`` ones are returned as they are."""
    return a if len(a.shape) == 3 else a.reshape(1, *a.shape)


def _no_widths():
    """The ``widths`` argument of a one-level launch (never read there)."""
    return _work("no_widths", 1, np.int64)


def _widths_device(widths):
    """Matryoshka prefix widths (a host int64 ``[L]`` array, as the front
    passes them) in a device workspace: one small copy."""
    w = _work("widths", len(widths), np.int64)
    w.copy_to_device(np.ascontiguousarray(widths, np.int64))
    return w


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
