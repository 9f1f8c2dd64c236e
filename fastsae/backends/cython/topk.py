"""TopK-family encoders of the ``cython`` backend (compiled ``_topk``):
TopK, BatchTopK, JumpReLU and the AuxK selection among dead latents.

The selection is fused into the tiled encoder (``kernels/cython/topk.pyx``:
per row the ``m`` largest *positive* pre-activations, kept in a heap while
each tile is in cache), so ``N x d_sae`` is never formed. Ties go to the
lower feature (BatchTopK: the lower row-major flat index); ReLU comes after
the selection. Arrays come from the validating front: ``x [N, d_in]``,
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` C-contiguous
float32, ``k >= 1``, ``dead_mask`` bool ``[d_sae]``, ``k_aux >= 0``.
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from ..tunables import CYTHON_TILE_COLS, CYTHON_TOPK_MIN_ROW_BLOCKS, CYTHON_TOPK_TILE_ROWS
from . import _topk
from .. import bf16 as BF
from ._threads import blas_single, get_num_threads, row_tile, threads
from .encode import encode_relu_sparse


def _topm(x, W_enc, b_enc, b_dec, m, aux_mask=None, m_aux=0):
    """Per row the ``m`` (<= d_sae) largest *positive* pre-activations, fused
    with the encoder matmul (``_topk.topm_rows``): ``(vals, cols, cnt)``,
    values/columns ``[N, m]`` with each row's ``cnt[i]`` kept entries first,
    in increasing column order. With ``aux_mask`` (uint8 ``[d_sae]``) also
    the top ``m_aux`` positive ones among the masked columns, from the same
    tiles: ``((vals, cols, cnt), (aux_vals, aux_cols, aux_cnt))``."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    vals = np.empty((n, m), dtype=np.float32)
    cols = np.empty((n, m), dtype=np.int32)
    cnt = np.empty(n, dtype=np.int64)
    aux = None
    if aux_mask is not None:
        aux = (np.empty((n, m_aux), dtype=np.float32), np.empty((n, m_aux), dtype=np.int32),
               np.empty(n, dtype=np.int64))
    work = n * W_enc.shape[0] * d_sae
    nt = threads(work)
    tm = row_tile(n, CYTHON_TOPK_TILE_ROWS, CYTHON_TOPK_MIN_ROW_BLOCKS, work)
    with blas_single():
        if aux is None:
            _topk.topm_rows(x, W_enc, b_enc, b_dec, m, vals, cols, cnt, tm, CYTHON_TILE_COLS,
                            nt)
        else:
            _topk.topm_rows(x, W_enc, b_enc, b_dec, m, vals, cols, cnt, tm, CYTHON_TILE_COLS,
                            nt, aux_mask, *aux)
            return (vals, cols, cnt), aux
    return vals, cols, cnt


def _kept(cnt, m):
    """Mask ``[N, m]`` of the filled candidate slots."""
    return np.arange(m)[None, :] < cnt[:, None]


def _csr_from_mask(vals, cols, keep, shape, colmap=None) -> SparseCodes:
    """Canonical CSR of the kept ``[N, m]`` candidates (rows already sorted
    by column; row-major boolean indexing keeps that order); ``colmap``
    renames columns (increasing, so the order is kept)."""
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(keep, axis=1), out=indptr[1:])
    idx = cols[keep]
    if colmap is not None:
        idx = colmap[idx]
    return SparseCodes(indptr, np.ascontiguousarray(idx, dtype=np.int32),
                       np.ascontiguousarray(vals[keep]), shape)


def encode_topk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """Per row the ``k`` largest pre-activations (ties: lower feature), then
    ReLU (entries it zeroes dropped): canonical :class:`SparseCodes`."""
    if precision == "bf16":
        return BF.encode_topk(x, W_enc, b_enc, b_dec, k, get_num_threads())
    shape = (int(x.shape[0]), int(W_enc.shape[1]))
    m = min(k, shape[1])
    vals, cols, cnt = _topm(x, W_enc, b_enc, b_dec, m)
    return _csr_from_mask(vals, cols, _kept(cnt, m), shape)


def _batch_select(vals, cols, kept, total):
    """Mask of the ``total`` best kept ``[N, m]`` candidates over the batch
    (value descending, ties to the lower row-major flat index: row, then
    column); every kept candidate when there are at most ``total``."""
    v = vals[kept]
    if v.size <= total:
        return kept.copy()
    kth = v.size - total  # ascending position of the total-th largest value
    vstar = np.partition(v, kth)[kth]
    keep = kept & (vals > vstar)
    need = total - int(np.count_nonzero(keep))
    eq_r, eq_c = np.nonzero(kept & (vals == vstar))
    order = np.lexsort((cols[eq_r, eq_c], eq_r))[:need]
    keep[eq_r[order], eq_c[order]] = True
    return keep


# BatchTopK candidate width per (d_sae, k): the last call's, so that a
# training run settles on a width that needs a single pass (as Numba does).
_cand: dict = {}


def encode_batchtopk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: lower
    row-major flat index), then ReLU: canonical :class:`SparseCodes`
    (``precision="bf16"``: :func:`..bf16.encode_batchtopk`).

    Exact in a fused pass: per row the top ``m`` positive candidates are kept
    (``m = 4k`` at first, then the width the last call for this
    ``(d_sae, k)`` ended with); the batch selection is made among them, and
    it is proven complete when every row whose ``m`` slots are full has its
    worst candidate outside the selection (then nothing that row dropped
    could have been selected; rows with free slots dropped no positive
    entry). Otherwise ``m`` grows (x4, up to ``d_sae``, where it is exact by
    construction) and the pass is redone."""
    if precision == "bf16":
        return BF.encode_batchtopk(x, W_enc, b_enc, b_dec, k, get_num_threads())
    n, d_sae = int(x.shape[0]), int(W_enc.shape[1])
    shape = (n, d_sae)
    total = min(k * n, n * d_sae)
    key = (d_sae, k)
    m = min(d_sae, max(4 * k, _cand.get(key, 0)))
    while True:
        vals, cols, cnt = _topm(x, W_enc, b_enc, b_dec, m)
        kept = _kept(cnt, m)
        keep = _batch_select(vals, cols, kept, total)
        full = np.flatnonzero(cnt == m)
        if m >= d_sae or full.size == 0:
            break
        # each full row's worst candidate: smallest value, ties -> the larger column
        # (the last such slot, as slots are in column order)
        fv = vals[full]
        last_min = m - 1 - np.argmin(fv[:, ::-1], axis=1)
        if not np.any(keep[full, last_min]):
            break
        m = min(d_sae, 4 * m)
    _cand[key] = m
    return _csr_from_mask(vals, cols, keep, shape)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, *, precision="fp32") -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` per feature (``threshold [d_sae]``):
    the fused sparse ReLU encoder, then the positive entries at or below
    their feature's threshold are dropped (same float32 ``pre`` values, so
    the same result as the reference)."""
    if precision == "bf16":
        return BF.encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, get_num_threads())
    codes = encode_relu_sparse(x, W_enc, b_enc, b_dec)
    keep = codes.values > threshold[codes.indices]
    # kept entries before each position, read at the old row starts
    kept_before = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[codes.indptr]
    return SparseCodes(indptr, np.ascontiguousarray(codes.indices[keep]),
                       np.ascontiguousarray(codes.values[keep]), codes.shape)


def encode_aux(x, W_enc, b_enc, b_dec, dead_mask, k_aux) -> SparseCodes:
    """AuxK selection (top ``k_aux`` among dead latents, then ReLU): the
    fused top-m encoder on the gathered dead columns of ``W_enc`` (their order,
    hence the tie rule, is kept), indices mapped back."""
    dead = np.flatnonzero(dead_mask).astype(np.int32)
    shape = (int(x.shape[0]), int(W_enc.shape[1]))
    m = min(int(k_aux), dead.size)
    if m == 0:
        return SparseCodes(np.zeros(shape[0] + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.float32), shape)
    W_d = np.ascontiguousarray(W_enc[:, dead])
    b_d = np.ascontiguousarray(b_enc[dead])
    vals, cols, cnt = _topm(x, W_d, b_d, b_dec, m)
    return _csr_from_mask(vals, cols, _kept(cnt, m), shape, colmap=dead)


def encode_topk_with_aux(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux):
    """``(codes, aux_codes)``: :func:`encode_topk` and :func:`encode_aux` from
    one encoder product (the AuxK heap is fed from the same tiles, masked to
    the dead columns). ``dead_mask`` has at least one dead latent and
    ``k_aux >= 1`` (:func:`fastsae.backends.numerics.auxk_active`)."""
    shape = (int(x.shape[0]), int(W_enc.shape[1]))
    # the front checks the mask's dtype and shape, not its layout
    dead_u8 = np.ascontiguousarray(dead_mask, dtype=bool).view(np.uint8)
    m = min(k, shape[1])
    ma = min(int(k_aux), int(np.count_nonzero(dead_u8)))
    (vals, cols, cnt), (avals, acols, acnt) = _topm(x, W_enc, b_enc, b_dec, m, dead_u8, ma)
    return (_csr_from_mask(vals, cols, _kept(cnt, m), shape),
            _csr_from_mask(avals, acols, _kept(acnt, ma), shape))
