"""ReLU encoders of the ``cython`` backend (compiled ``_encode``).

Tiled BLAS ``sgemm`` (``scipy.linalg.cython_blas``) with the bias, ReLU and,
for sparse output, the CSR compaction done on each tile while it is in cache
(``kernels/cython/encode.pyx``). Arrays come from the validating front:
``x [N, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
C-contiguous float32.

:func:`encode_relu_switch` is the ReLU training step's encoder: it measures
the density of this batch on the grid's first row block and returns dense
codes (for the dense step) or CSR (for the sparse one) without building the
other (see ``kernels/cython/encode.pyx``, ``encode_probe``).
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from ..tunables import (CYTHON_DENSE_ENCODE_MAX_ROWS, CYTHON_DENSE_ENCODE_MIN_COLS,
                        CYTHON_DENSE_ENCODE_MIN_TASKS, CYTHON_RELU_MIN_ROW_BLOCKS,
                        CYTHON_RELU_TILE_ROWS, CYTHON_TILE_COLS)
from . import _encode
from .. import bf16 as BF
from ._threads import blas_single, get_num_threads, row_tile, threads


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


def encode_relu_sparse(x, W_enc, b_enc, b_dec, *, precision="fp32") -> SparseCodes:
    """:func:`encode_relu` as canonical :class:`SparseCodes`, without ever
    forming the dense ``[N, d_sae]`` matrix (``precision="bf16"``: the shared
    compiled kernels of :mod:`fastsae.backends.bf16`)."""
    if precision == "bf16":
        return BF.encode_relu_sparse(x, W_enc, b_enc, b_dec, get_num_threads())
    work = x.shape[0] * W_enc.shape[0] * W_enc.shape[1]
    nt = threads(work)
    tm, tn, chunks = _tiling(x.shape[0], work, nt)
    with blas_single():
        indptr, indices, values = _encode.encode_csr(x, W_enc, b_enc, b_dec, tm, tn,
                                                     chunks, nt)
    return SparseCodes(indptr, indices, values, (int(x.shape[0]), int(W_enc.shape[1])))


def dense_tiling(rows: int, cols: int):
    """``(tm, tn)`` of the dense encoder grid over ``rows x cols`` (see
    :data:`CYTHON_DENSE_ENCODE_MIN_TASKS`): depends on the shape only."""
    tm = max(1, min(CYTHON_DENSE_ENCODE_MAX_ROWS, rows))
    nrb = -(-rows // tm) if rows else 1
    nchunks = max(1, -(-CYTHON_DENSE_ENCODE_MIN_TASKS // nrb))
    tn = -(-cols // nchunks)
    tn = min(cols, max(CYTHON_DENSE_ENCODE_MIN_COLS, -(-tn // 64) * 64))
    return tm, max(1, tn)


def encode_relu_switch(x, W_enc, b_enc, b_dec, min_density):
    """The encoder of the ReLU ``train_step``, deciding dense or sparse from
    this batch alone. Returns ``(f, None)`` with dense codes ``f`` float32
    ``[N, d_sae]`` when the density of row block 0 of the encoder's grid
    (its positives over ``rows * d_sae``, a shape-only grid, so the choice
    does not depend on the thread count) is at least ``min_density``; else
    ``(None, codes)``, canonical :class:`SparseCodes` bit-identical to
    :func:`encode_relu_sparse`'s. Row block 0 is computed once either way;
    the dense rest uses the bigger tiles of :func:`dense_tiling`."""
    n, d_sae = int(x.shape[0]), int(W_enc.shape[1])
    work = n * W_enc.shape[0] * d_sae
    nt = threads(work)
    tm, tn, chunks = _tiling(n, work, nt)
    mr = min(tm, n)
    f = np.empty((n, d_sae), dtype=np.float32)
    with blas_single():
        nnz0 = _encode.encode_probe(x, W_enc, b_enc, b_dec, f, tm, tn, nt)
        if nnz0 / (mr * d_sae) >= min_density:
            if n > mr:  # the rest in big tiles (one per task)
                dtm, dtn = dense_tiling(n - mr, d_sae)
                _encode.encode_dense(x, W_enc, b_enc, b_dec, f, dtm, dtn, -(-d_sae // dtn), nt,
                                     mr)
            return f, None
        indptr, indices, values = _encode.encode_csr(x, W_enc, b_enc, b_dec, tm, tn, chunks,
                                                     nt, f[:mr])
    return None, SparseCodes(indptr, indices, values, (n, d_sae))


def csr_arrays(codes, nthreads, indptr=None):
    """``(indptr, indices, values)`` of dense float32 ``[N, d_sae]`` or
    :class:`SparseCodes` codes (the nonzero entries of dense ones, canonical;
    ``indptr``: their row pointer if already counted, ``_encode.dense_indptr``)."""
    if isinstance(codes, SparseCodes):
        return codes.indptr, codes.indices, codes.values
    return _encode.dense_to_csr(codes, nthreads, indptr)
