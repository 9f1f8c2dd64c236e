"""Decoder of the ``cython`` backend (compiled ``_decode``):
``x_hat = codes @ W_dec + b_dec``, float32 ``[N, d_in]``.

Sparse codes: a gather-accumulate of the active decoder rows, parallel over
rows; codes with a density ``nnz / (N * d_sae)`` of at least
:data:`~fastsae.backends.tunables.CYTHON_DENSE_DECODE_MIN_DENSITY` (read at
call time) go to :func:`.dense.decode_csr` (row blocks scattered dense, one
sgemm each) instead. Dense codes: the same gather (skipping zeros) below
that density, else one ``sgemm`` per row block. Arrays come from the
validating front (``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, C-contiguous
float32; canonical :class:`SparseCodes`).
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from .. import tunables as TU
from ..tunables import CYTHON_RELU_MIN_ROW_BLOCKS, CYTHON_RELU_TILE_ROWS
from . import _decode, dense
from ._threads import blas_single, row_tile, threads


def decode_csr(codes: SparseCodes, W_dec, b_dec):
    """:func:`decode` of sparse codes by the gather (also used inside the
    training steps' sparse paths, which decided on sparse already)."""
    n, d_in = codes.shape[0], W_dec.shape[1]
    out = np.empty((n, d_in), dtype=np.float32)
    _decode.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec, out,
                       threads((codes.indices.shape[0] + n) * d_in))
    return out


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec``, float32 ``[N, d_in]``; codes dense or sparse."""
    if isinstance(codes, SparseCodes):
        cells = codes.shape[0] * codes.shape[1]
        if cells and codes.indices.shape[0] / cells >= TU.CYTHON_DENSE_DECODE_MIN_DENSITY:
            return dense.decode_csr(codes, W_dec, b_dec)
        return decode_csr(codes, W_dec, b_dec)
    f = codes
    nt = threads(f.size)
    out = np.empty((f.shape[0], W_dec.shape[1]), dtype=np.float32)
    nnz = _decode.count_nonzero(f, nt)
    if nnz < TU.CYTHON_DENSE_DECODE_MIN_DENSITY * f.size:
        nt = threads(f.size + nnz * W_dec.shape[1])
        _decode.decode_dense_gather(f, W_dec, b_dec, out, nt)
    else:
        work = f.size * W_dec.shape[1]
        nt = threads(work)
        tm = row_tile(f.shape[0], CYTHON_RELU_TILE_ROWS, CYTHON_RELU_MIN_ROW_BLOCKS, work)
        with blas_single():
            _decode.decode_dense_gemm(f, W_dec, b_dec, out, tm, nt)
    return out
