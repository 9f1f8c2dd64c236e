"""Decoder of the ``cython`` backend (compiled ``_decode``):
``x_hat = codes @ W_dec + b_dec``, float32 ``[N, d_in]``.

Sparse codes: a gather-accumulate of the active decoder rows, parallel over
rows. Dense codes: the same gather (skipping zeros) when at most
:data:`~fastsae.backends.tunables.CYTHON_GATHER_MAX_DENSITY` of the entries
are nonzero, else one ``sgemm`` per row block. Arrays come from the
validating front (``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, C-contiguous
float32; canonical :class:`SparseCodes`).
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from ..tunables import (CYTHON_GATHER_MAX_DENSITY, CYTHON_RELU_MIN_ROW_BLOCKS,
                        CYTHON_RELU_TILE_ROWS)
from . import _decode
from ._threads import blas_single, row_tile, threads


def decode_csr(codes: SparseCodes, W_dec, b_dec):
    """:func:`decode` of sparse codes (also used inside the training steps)."""
    n, d_in = codes.shape[0], W_dec.shape[1]
    out = np.empty((n, d_in), dtype=np.float32)
    _decode.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec, out,
                       threads((codes.indices.shape[0] + n) * d_in))
    return out


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec``, float32 ``[N, d_in]``; codes dense or sparse."""
    if isinstance(codes, SparseCodes):
        return decode_csr(codes, W_dec, b_dec)
    f = codes
    nt = threads(f.size)
    out = np.empty((f.shape[0], W_dec.shape[1]), dtype=np.float32)
    nnz = _decode.count_nonzero(f, nt)
    if nnz <= CYTHON_GATHER_MAX_DENSITY * f.size:
        nt = threads(f.size + nnz * W_dec.shape[1])
        _decode.decode_dense_gather(f, W_dec, b_dec, out, nt)
    else:
        work = f.size * W_dec.shape[1]
        nt = threads(work)
        tm = row_tile(f.shape[0], CYTHON_RELU_TILE_ROWS, CYTHON_RELU_MIN_ROW_BLOCKS, work)
        with blas_single():
            _decode.decode_dense_gemm(f, W_dec, b_dec, out, tm, nt)
    return out
