"""ReLU encoders of the ``cython`` backend (compiled ``_encode``).

Tiled BLAS ``sgemm`` (``scipy.linalg.cython_blas``) with the bias, ReLU and,
for sparse output, the CSR compaction done on each tile while it is in cache
(``kernels/cython/encode.pyx``). Arrays come from the validating front:
``x [N, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
C-contiguous float32.
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from ..tunables import CYTHON_RELU_MIN_ROW_BLOCKS, CYTHON_RELU_TILE_ROWS, CYTHON_TILE_COLS
from . import _encode
from ._threads import blas_single, row_tile, threads


def _tiling(n: int, work: int, nthreads: int):
    """Row tile, feature tile and feature chunks per row block, so that
    there are at least ~4 tasks per thread when the batch allows it (the
    tiles depend on the problem, the chunks, which do not change any
    product, on the threads)."""
    tm = row_tile(n, CYTHON_RELU_TILE_ROWS, CYTHON_RELU_MIN_ROW_BLOCKS, work)
    nrb = -(-n // tm)
    chunks = max(1, -(-4 * nthreads // nrb)) if nthreads > 1 else 1
    return tm, CYTHON_TILE_COLS, chunks


def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense float32 ``[N, d_sae]``."""
    work = x.shape[0] * W_enc.shape[0] * W_enc.shape[1]
    nt = threads(work)
    out = np.empty((x.shape[0], W_enc.shape[1]), dtype=np.float32)
    tm, tn, chunks = _tiling(x.shape[0], work, nt)
    with blas_single():
        _encode.encode_dense(x, W_enc, b_enc, b_dec, out, tm, tn, chunks, nt)
    return out


def encode_relu_sparse(x, W_enc, b_enc, b_dec) -> SparseCodes:
    """:func:`encode_relu` as canonical :class:`SparseCodes`, without ever
    forming the dense ``[N, d_sae]`` matrix."""
    work = x.shape[0] * W_enc.shape[0] * W_enc.shape[1]
    nt = threads(work)
    tm, tn, chunks = _tiling(x.shape[0], work, nt)
    with blas_single():
        indptr, indices, values = _encode.encode_csr(x, W_enc, b_enc, b_dec, tm, tn,
                                                     chunks, nt)
    return SparseCodes(indptr, indices, values, (int(x.shape[0]), int(W_enc.shape[1])))


def csr_arrays(codes, nthreads):
    """``(indptr, indices, values)`` of dense float32 ``[N, d_sae]`` or
    :class:`SparseCodes` codes (the nonzero entries of dense ones, canonical)."""
    if isinstance(codes, SparseCodes):
        return codes.indptr, codes.indices, codes.values
    return _encode.dense_to_csr(codes, nthreads)
