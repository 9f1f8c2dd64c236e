"""Numba CPU backward kernels: the SAE loss's gradients, sparsity-aware.

What is here: the CSR->CSC transpose (:func:`csr_to_csc`), ``d_pre`` at the
active entries (:func:`d_pre_csr` for the ReLU loss, :func:`d_pre_topk_csr`
for TopK), column sums, ``g_b_dec``, the per-feature weight pass in its two
forms (:func:`feature_grads` writes the gradients, :func:`feature_adam`
consumes them with Adam), the stand-alone ReLU gradients
(:func:`relu_gradients`), the AuxK residual (:func:`aux_residual`) and the
TopK training step's two passes (:func:`topk_row_pass`,
:func:`topk_feature_adam`: :func:`prefix_row_pass` and
:func:`prefix_feature_adam` with one prefix; with several they are the
Matryoshka BatchTopK step's). The compiled training steps that chain them are
in :mod:`fastsae.backends.numba.step`.

Inputs: CSR codes ``f`` (``indptr`` int64 ``[N+1]``, ``indices`` int32,
``values`` float32), ``d_xhat = 2 (x_hat - t) / N`` float32 ``[N, d_out]``
against the target ``t`` (``x`` for an SAE, a transcoder's ``y``, less the
skip term for a skip transcoder), the encoder input ``xc`` float32 ``[N,
d_in]`` (``x - b_dec``, a transcoder's ``x``), parameters in SAELens layouts
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``), all C-contiguous.
Loops over the reconstruction run over ``d_out = W_dec.shape[1]``, loops
over the encoder's input over ``d_in = W_enc.shape[0]`` (equal for an SAE).

The gradient w.r.t. the pre-activations is zero wherever ``f`` is, so:

* ``d_pre`` is computed only at the ``nnz`` active entries
  (``N * L0 * d_in`` multiply-adds);
* ``g_W_dec[j] = sum_i f_ij d_xhat_i`` and ``g_W_enc[:, j] = sum_i d_pre_ij
  xc_i`` are sums over the rows where feature ``j`` is active: the CSR is
  transposed once (:func:`csr_to_csc`) and the weight pass runs parallel
  over tiles of features, each thread owning its features' rows (no races,
  no atomics, and a fixed summation order, so results do not depend on the
  thread count);
* in ``weighted_l1`` mode the norm term only scales each decoder row by its
  feature's total activation; in ``unit_norm`` mode the projection is done
  on each row as it is produced.

:func:`feature_adam` applies Adam to ``W_enc``, ``b_enc`` and ``W_dec`` (and
renormalizes decoder rows) as each gradient tile is produced, so the
training step never stores those gradients. The TopK step's weight pass
(:func:`topk_feature_adam`) is a separate kernel: it sums with the
vectorized :func:`_dot` (a different float32 rounding than the ReLU pass's
sequential sums) and handles the stacked AuxK rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import (NUMBA_COLUMN_SUM_BLOCK, NUMBA_RELU_FEATURE_TILE,
                         NUMBA_TOPK_ROW_SUM_BLOCK)
from . import norms as NR
from .adam import adam_elem, const_tuple, nonfinite_in
from .decode import _accumulate_row

__all__ = ["csr_to_csc", "d_pre_csr", "d_pre_topk_csr", "column_sums_csc", "column_sums_rows",
           "decoder_row_grad_tail", "decoder_row_adam", "b_dec_grad", "feature_grads",
           "feature_adam", "residual_grad", "relu_gradients", "aux_residual", "prefix_row_pass",
           "topk_row_pass", "stacked_csc", "prefix_feature_grad", "project_row", "prefix_feature_adam",
           "topk_feature_adam", "bf16_copy_tile", "NO_COPY"]

#: The empty ``(Wp, WT)`` of a weight pass that keeps no bfloat16 copy of
#: ``W_enc`` (see :func:`bf16_copy_tile`).
NO_COPY = (np.empty(0, np.uint16), np.empty((0, 0), np.float32))


@njit(inline="always")
def bf16_copy_tile(cols, j0, m, Wp, WT):
    """Write a tile's just-updated ``W_enc`` columns (``cols[jj]`` float32
    ``[d_in]``, C-contiguous: the column of feature ``j0 + jj`` for ``jj <
    m``) into the bfloat16 copy the ``precision="bf16"`` encoder reads
    (:mod:`fastsae.backends.bf16`), so the next step needs no packing pass:
    ``WT [d_sae, d_in]`` float32 (the transpose: one row copy per feature)
    and ``Wp`` uint16, the panels of ``kernels/c/bf16_encode.h`` (element
    ``(p, q, c, e)`` is ``W_enc[2q + e, 16p + c]``, ``K2 = ceil(d_in / 2)``
    pairs per panel), rounded to nearest even as ``fs_to_bf16`` does (a NaN
    stays a quiet NaN). The panels' padding (zeros past ``d_in`` and
    ``d_sae``) is never touched: it stays as packed."""
    d_in = cols.shape[1]
    K2 = (d_in + 1) // 2
    bits = cols.view(np.uint32)
    for jj in range(m):
        WT[j0 + jj, :] = cols[jj]
    for q in range(K2):
        for jj in range(m):
            j = j0 + jj
            base = (((j >> 4) * K2 + q) * 16 + (j & 15)) * 2
            for e in range(min(2, d_in - 2 * q)):
                u = np.int64(bits[jj, 2 * q + e])
                if (u & 0x7FFFFFFF) > 0x7F800000:
                    h = (u >> 16) | 0x40
                else:
                    h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                Wp[base + e] = np.uint16(h)


@njit(cache=True)
def csr_to_csc(indptr, indices, d_sae):
    """Transpose the pattern: ``(colptr [d_sae+1], rows int32 [nnz],
    perm int64 [nnz])`` with ``perm[q]`` the CSR position of CSC entry ``q``.
    Rows are increasing within each column (counting sort, O(nnz + d_sae))."""
    n = indptr.shape[0] - 1
    nnz = indices.shape[0]
    colptr = np.zeros(d_sae + 1, np.int64)
    for p in range(nnz):
        colptr[indices[p] + 1] += 1
    for j in range(d_sae):
        colptr[j + 1] += colptr[j]
    cursor = colptr[:-1].copy()
    rows = np.empty(nnz, np.int32)
    perm = np.empty(nnz, np.int64)
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            q = cursor[j]
            rows[q] = i
            perm[q] = p
            cursor[j] = q + 1
    return colptr, rows, perm


# reassociation lets LLVM vectorize the dot product; its float32 error bound
# is order-independent.
@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dot(a, b):
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@njit(parallel=True, cache=True)
def d_pre_csr(indptr, indices, values, d_xhat, W_dec, penalty, l1n):
    """``d_pre`` at the active entries, in CSR order, and the L1 term.

    ``d_pre_p = d_xhat_i . W_dec[j] + l1n * penalty_j`` where ``values_p >
    0`` (0 otherwise: ReLU derivative), ``l1n = l1_coefficient / N``.
    Returns ``(d_pre float32 [nnz], row_l1 float64 [N])`` with ``row_l1[i] =
    sum_p values_p * penalty_j``.
    """
    n = indptr.shape[0] - 1
    nnz = indices.shape[0]
    d_pre = np.empty(nnz, np.float32)
    row_l1 = np.empty(n, np.float64)
    c = np.float32(l1n)
    for i in prange(n):
        s = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = values[p]
            s += np.float64(v) * penalty[j]
            if v > 0:
                d_pre[p] = _dot(d_xhat[i], W_dec[j]) + c * penalty[j]
            else:
                d_pre[p] = 0.0
        row_l1[i] = s
    return d_pre, row_l1


@njit(parallel=True, cache=True)
def d_pre_topk_csr(indptr, indices, values, d_xhat, W_dec):
    """``d_pre`` of a TopK loss (no L1 term) at the active entries, in CSR
    order: ``d_xhat_i . W_dec[j]`` where ``values_p > 0``, else 0 (float32
    ``[nnz]``). The pattern may stack AuxK rows below the main ones
    (``d_xhat`` then holds ``d_ehat`` in those rows)."""
    n = indptr.shape[0] - 1
    d_pre = np.empty(indices.shape[0], np.float32)
    zero = np.float32(0.0)
    for i in prange(n):
        for p in range(indptr[i], indptr[i + 1]):
            if values[p] > 0:
                # "+ 0" as the ReLU kernel with a zero penalty adds (what the TopK
                # gradients used before): a -0.0 product becomes +0.0, same bits
                d_pre[p] = _dot(d_xhat[i], W_dec[indices[p]]) + zero
            else:
                d_pre[p] = 0.0
    return d_pre


@njit(cache=True)
def column_sums_csc(colptr, perm, vals):
    """``out[j] = sum over column j's entries of vals[perm[q]]`` (float32,
    rows in increasing order), e.g. ``g_b_enc`` from ``d_pre``. Serial, as
    :func:`column_sums_rows`: ``nnz`` additions cost less than a parallel
    region on a busy machine."""
    d_sae = colptr.shape[0] - 1
    out = np.empty(d_sae, np.float32)
    for j in range(d_sae):
        s = np.float32(0.0)
        for q in range(colptr[j], colptr[j + 1]):
            s += vals[perm[q]]
        out[j] = s
    return out


@njit(cache=True)
def column_sums_rows(A):
    """Column sums of ``A`` ``[N, d]`` in float64 over fixed blocks of
    :data:`~fastsae.backends.tunables.NUMBA_COLUMN_SUM_BLOCK` rows (summed in
    block order afterwards). Serial: vectorized across columns it takes a
    fraction of a millisecond at N x d_in, and a parallel region measured
    ~36 ms on a busy 2-core machine (a descheduled worker holds the team)."""
    n, d = A.shape
    RB = NUMBA_COLUMN_SUM_BLOCK
    nb = (n + RB - 1) // RB
    part = np.zeros((nb, d), np.float64)
    for b in range(nb):
        for i in range(b * RB, min(n, b * RB + RB)):
            for k in range(d):
                part[b, k] += A[i, k]
    out = np.zeros(d, np.float64)
    for b in range(nb):
        for k in range(d):
            out[k] += part[b, k]
    return out


@njit(cache=True)
def b_dec_grad(d_xhat_colsum, W_enc, g_b_enc, center):
    """``g_b_dec = sum_i d_xhat_i - W_enc @ g_b_enc`` (float32 ``[d_in]``;
    serial: one vectorized pass over ``W_enc``). ``center`` False (a
    transcoder, whose encoder does not subtract ``b_dec``): ``sum_i
    d_xhat_i`` alone, float32 ``[d_out]``."""
    d = d_xhat_colsum.shape[0]
    out = np.empty(d, np.float32)
    if center:
        for k in range(d):
            out[k] = np.float32(d_xhat_colsum[k]) - _dot(W_enc[k], g_b_enc)
    else:
        for k in range(d):
            out[k] = np.float32(d_xhat_colsum[k])
    return out


@njit(inline="always")
def _feature_grad(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm,
                  j, gd, gej):
    """Feature ``j``'s gradients, shared by :func:`feature_grads` and
    :func:`feature_adam`: ``gd = g_W_dec[j]`` (with the decoder-norm term)
    and ``gej += g_W_enc[:, j]`` (``gej`` starts zeroed), rows ``i``
    increasing. ``c = float32(l1n)``; ``norms`` is only read in
    ``weighted_l1`` mode (``unit_norm`` False). ``gd`` is ``d_out`` wide,
    ``gej`` ``d_in``: one fused loop when they are equal (an SAE), two
    otherwise (the same sums per element either way)."""
    d_out = gd.shape[0]
    d_in = gej.shape[0]
    gd[:] = 0.0
    csum = np.float32(0.0)
    for q in range(colptr[j], colptr[j + 1]):
        i = rows[q]
        p = perm[q]
        fv = values[p]
        dp = d_pre[p]
        csum += fv
        dx = d_xhat[i]
        xi = xc[i]
        if d_out == d_in:
            for k in range(d_in):
                gd[k] += fv * dx[k]
                gej[k] += dp * xi[k]
        else:
            for k in range(d_out):
                gd[k] += fv * dx[k]
            for k in range(d_in):
                gej[k] += dp * xi[k]
    nrm = np.float32(0.0) if unit_norm else norms[j]
    decoder_row_grad_tail(gd, W_dec[j], nrm, csum, c, unit_norm)


@njit(inline="always")
def decoder_row_grad_tail(gd, w, nrm, csum, c, unit_norm):
    """Finish decoder row ``w``'s gradient ``gd`` (``sum_i f_ij d_xhat_i``)
    in place: in ``unit_norm`` mode remove its component along ``w``; else
    add the L1 term ``c * csum * w / nrm`` (``csum = sum_i f_ij``, ``nrm =
    |w|``; nothing when either is 0). Shared by the sparse and dense
    (:mod:`.dense`) weight passes."""
    d_in = gd.shape[0]
    if unit_norm:
        # remove the component along the decoder row (sequential sums, as ever)
        sq = np.float32(0.0)
        gw = np.float32(0.0)
        for k in range(d_in):
            sq += w[k] * w[k]
            gw += gd[k] * w[k]
        if sq > 0:
            coef = gw / sq
            for k in range(d_in):
                gd[k] -= coef * w[k]
    else:
        if nrm > 0 and csum != 0:
            coef = c * csum
            for k in range(d_in):
                gd[k] += coef * (w[k] / nrm)


@njit(inline="always")
def decoder_row_adam(w, gd, mr, vr, cs, unit_norm):
    """Adam on decoder row ``w`` with gradient ``gd`` (moments ``mr``,
    ``vr``; constants tuple ``cs``), then in ``unit_norm`` mode its
    renormalization; returns 1 if the updated row holds an inf or NaN
    (checked before a renormalization could hide it), else 0."""
    d_in = w.shape[0]
    for k in range(d_in):
        w[k], mr[k], vr[k] = adam_elem(w[k], gd[k], mr[k], vr[k], cs)
    bad = nonfinite_in(w)
    if unit_norm:
        s = np.float32(0.0)
        for k in range(d_in):
            s += w[k] * w[k]
        nw = np.sqrt(s)
        if nw > 0:
            for k in range(d_in):
                w[k] = w[k] / nw
    return bad


@njit(parallel=True, cache=True)
def feature_grads(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n, unit_norm,
                  g_W_enc, g_W_dec):
    """Per-feature gradients of ``W_dec`` and ``W_enc`` into ``g_W_dec``
    ``[d_sae, d_in]`` and ``g_W_enc`` ``[d_in, d_sae]`` (float32, written
    whole), parallel over tiles of :data:`~fastsae.backends.tunables.NUMBA_RELU_FEATURE_TILE`
    features (each tile's rows are owned by one thread).

    ``g_W_dec[j] = sum_i f_ij d_xhat_i`` (+ ``l1n * sum_i f_ij * W_dec[j] /
    norms[j]`` in ``weighted_l1`` mode, i.e. ``unit_norm`` False; the
    component along ``W_dec[j]`` removed in ``unit_norm`` mode, where
    ``norms`` and ``l1n`` are not read: pass an empty array and 0) and
    ``g_W_enc[:, j] = sum_i d_pre_ij xc_i``, rows ``i`` increasing. The
    pattern's row ``i`` pairs ``d_xhat[i]`` with ``xc[i]``.
    """
    d_sae, d_out = W_dec.shape
    d_in = g_W_enc.shape[0]
    T = NUMBA_RELU_FEATURE_TILE
    ntiles = (d_sae + T - 1) // T
    c = np.float32(l1n)
    for t in prange(ntiles):
        j0 = t * T
        j1 = min(d_sae, j0 + T)
        ge = np.zeros((T, d_in), np.float32)
        gd = np.empty(d_out, np.float32)
        for j in range(j0, j1):
            _feature_grad(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, c,
                          unit_norm, j, gd, ge[j - j0])
            g_W_dec[j] = gd
        # the tile of W_enc's gradient, transposed: row k gets T contiguous values
        for k in range(d_in):
            for j in range(j0, j1):
                g_W_enc[k, j] = ge[j - j0, k]


@njit(parallel=True, cache=True, error_model="numpy")  # see adam.adam_elem
def feature_adam(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n, unit_norm,
                 W_enc, b_enc, g_b_enc, mW_enc, vW_enc, mb_enc, vb_enc, mW_dec, vW_dec, adam_c,
                 Wp, WT):
    """The gradients of :func:`feature_grads`, consumed by Adam as each is
    made (they are never stored): ``W_enc``, ``W_dec`` and, with the
    precomputed ``g_b_enc``, ``b_enc`` and their moments are updated in place
    (constants ``adam_c``, see :func:`fastsae.backends.numerics.adam_constants`);
    in ``unit_norm`` mode each decoder row is renormalized right after its
    update. ``W_dec``'s old rows are read before they are overwritten, and
    nothing else in this pass reads them. Returns a count that is nonzero
    exactly when an updated parameter is inf or NaN (each row or tile piece
    is checked right after its update, see :func:`.adam.nonfinite_in`).
    Where ``Wp`` is non-empty each updated row piece of ``W_enc`` is also
    written into the bfloat16 copy ``(Wp, WT)`` (:func:`bf16_copy_tile`;
    :data:`NO_COPY`: none).
    """
    d_sae, d_out = W_dec.shape
    d_in = W_enc.shape[0]
    copy = Wp.shape[0] > 0
    T = NUMBA_RELU_FEATURE_TILE
    ntiles = (d_sae + T - 1) // T
    c = np.float32(l1n)
    cs = const_tuple(adam_c)
    bad = 0
    for t in prange(ntiles):
        j0 = t * T
        j1 = min(d_sae, j0 + T)
        ge = np.zeros((T, d_in), np.float32)
        gd = np.empty(d_out, np.float32)
        tb = 0
        for j in range(j0, j1):
            _feature_grad(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, c,
                          unit_norm, j, gd, ge[j - j0])
            tb += decoder_row_adam(W_dec[j], gd, mW_dec[j], vW_dec[j], cs, unit_norm)
            b_enc[j], mb_enc[j], vb_enc[j] = adam_elem(b_enc[j], g_b_enc[j], mb_enc[j],
                                                      vb_enc[j], cs)
        tb += nonfinite_in(b_enc[j0:j1])
        # W_enc's tile row by row: row k gets T contiguous updates
        for k in range(d_in):
            for j in range(j0, j1):
                W_enc[k, j], mW_enc[k, j], vW_enc[k, j] = adam_elem(
                    W_enc[k, j], ge[j - j0, k], mW_enc[k, j], vW_enc[k, j], cs)
                ge[j - j0, k] = W_enc[k, j]  # the gradient is spent: ge keeps the columns
            tb += nonfinite_in(W_enc[k, j0:j1])
        if copy:
            bf16_copy_tile(ge, j0, j1 - j0, Wp, WT)
        bad += tb
    return bad


@njit(parallel=True, cache=True)
def residual_grad(x_hat, x):
    """``(d_xhat, row_sq)`` from a given ``x_hat`` and its target ``x``
    (a transcoder's ``y``): ``d_xhat = 2 (x_hat - x) / N`` float32 ``[N,
    d_out]`` and ``row_sq[i] = sum_k (x_hat - x)_ik**2``
    (float64). :func:`fastsae.backends.numba.decode.decode_residual_csr` fuses this
    with the decode in the training step."""
    n, d = x.shape
    d_xhat = np.empty((n, d), np.float32)
    row_sq = np.empty(n, np.float64)
    scale = np.float32(2.0 / n)
    for i in prange(n):
        s = 0.0
        for k in range(d):
            diff = x_hat[i, k] - x[i, k]
            s += np.float64(diff) * diff
            d_xhat[i, k] = scale * diff
        row_sq[i] = s
    return d_xhat, row_sq


@njit(cache=True)
def relu_gradients(t, xc, W_enc, W_dec, indptr, indices, values, x_hat, l1c, unit_norm,
                   center):
    """The ReLU loss's parts and gradients from given codes (CSR), their
    reconstruction ``x_hat`` and its target ``t`` ``[N, d_out]``, with the
    encoder input ``xc`` ``[N, d_in]``: ``(mse, l1, g_W_enc, g_b_enc,
    g_W_dec, g_b_dec, d_xhat)``, computed at the active entries only (see
    :func:`fastsae.backends.reference.gradients`). ``l1c`` is the L1
    coefficient; ``unit_norm`` selects the decoder-norm mode (penalty 1 and
    the projection) over ``weighted_l1``; ``center`` whether the encoder
    subtracted ``b_dec`` (an SAE: ``g_b_dec`` has its term, see
    :func:`b_dec_grad`). ``d_xhat = 2 (x_hat - t) / N`` is returned for a
    skip transcoder's ``W_skip`` gradient."""
    n = t.shape[0]
    d_sae = W_dec.shape[0]
    d_xhat, row_sq = residual_grad(x_hat, t)
    norms = NR.row_norms(W_dec)
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    l1n = l1c / n
    d_pre, row_l1 = d_pre_csr(indptr, indices, values, d_xhat, W_dec, penalty, l1n)
    colptr, rows, perm = csr_to_csc(indptr, indices, d_sae)
    g_b_enc = column_sums_csc(colptr, perm, d_pre)
    g_b_dec = b_dec_grad(column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    feature_grads(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n, unit_norm,
                  g_W_enc, g_W_dec)
    mse = row_sq.sum() / n
    l1 = l1c * row_l1.sum() / n
    return mse, l1, g_W_enc, g_b_enc, g_W_dec, g_b_dec, d_xhat


@njit(parallel=True, cache=True)
def aux_residual(e_hat, x, x_hat, scale):
    """AuxK's residual gradient: ``d_ehat = scale * (e_hat - (x - x_hat))``
    float32 ``[N, d_in]`` and the per-row squared error float64 ``[N]``."""
    n, d = x.shape
    out = np.empty((n, d), np.float32)
    row_sq = np.empty(n, np.float64)
    for i in prange(n):
        s = 0.0
        for k in range(d):
            err = e_hat[i, k] - (x[i, k] - x_hat[i, k])
            s += np.float64(err) * err
            out[i, k] = scale * err
        row_sq[i] = s
    return out, row_sq


@njit(parallel=True, cache=True)
def prefix_row_pass(indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x,
                    aux_scale, levels, D):
    """The TopK step's row pass, over nested prefixes of the dictionary:
    decode, residual gradients, ``d_pre`` and column sums in one parallel
    region over fixed blocks of rows.

    ``levels`` int32 ``[d_sae]`` is nondecreasing, each feature's prefix
    level (:func:`fastsae.backends.numerics.matryoshka_levels`), ``L =
    levels[-1] + 1`` prefixes; TopK/BatchTopK pass all zeros (one prefix:
    the TopK step, bit for bit). Per row ``i``, walking its entries in
    increasing feature order (canonical CSR), ``acc = sum_p f_p W_dec[j_p]``
    is stored as prefix ``l``'s partial reconstruction each time the entry
    level passes ``l`` (an empty level copies ``acc``: no prefix decodes on
    its own); then ``r_l = acc_l + b_dec - x_i`` and the suffix sums ``D_g =
    sum_{l >= g} 2 r_l / N`` are made in place, from the last level down.
    With AuxK codes (``a_indptr`` non-empty) ``err = fa_i @ W_dec - (x -
    x_hat)`` on the full reconstruction and ``d_ehat = aux_scale * err``;
    then ``d_pre`` at every selected entry, ``D_level(j)(i) . W_dec[j]``
    (main) and ``d_ehat_i . W_dec[j]`` (aux), while the decoder rows are
    still in cache from the decode.

    ``x`` is the reconstruction's target (``[N, d_out]``, ``d_out =
    W_dec.shape[1]``: a transcoder's ``y``, less its skip term); the
    variance sums are of it.

    ``D`` float32 ``[L, N, d_out]`` (C-contiguous) is the output, written
    whole: the caller's workspace, so a step can reuse it (a fresh array of
    ``L`` gradients is paged in by the kernel each time, measured ~20 ms at
    paper size with ``L = 4``).

    Returns ``(D, d_ehat, d_pre, a_d_pre, sq_err, a_sq_err, sum_dx, sum_x,
    sum_xx)``: ``D`` float32 ``[L, N, d_in]`` (``D[0]`` is ``d_xhat =
    2 (x_hat - x) / N`` with one prefix), ``d_ehat`` ``[N, d_in]`` (``[0,
    d_in]`` without AuxK), ``d_pre`` per entry in CSR order, ``sq_err``
    float64 ``[L]`` the per-prefix sums of squared errors, ``a_sq_err`` the
    aux one, float64 column sums of ``D_0`` (summed as ``sum_l 2 r_l / N``)
    and of ``x' = x - x[0]``
    ``[d_in]`` and the float64 sum of ``x'**2`` (the batch variance is
    ``(sum_xx - |sum_x|**2 / N) / N``).
    """
    n = indptr.shape[0] - 1
    d_in = W_dec.shape[1]
    nl = levels[levels.shape[0] - 1] + 1
    top = nl - 1
    has_aux = a_indptr.shape[0] > 0
    na = n if has_aux else 0
    d_ehat = np.empty((na, d_in), np.float32)
    d_pre = np.empty(indices.shape[0], np.float32)
    a_d_pre = np.empty(a_indices.shape[0], np.float32)
    scale = np.float32(2.0 / n)
    asc = np.float32(aux_scale)
    RB = NUMBA_TOPK_ROW_SUM_BLOCK
    nb = (n + RB - 1) // RB
    p_dx = np.zeros((nb, d_in), np.float64)
    p_x = np.zeros((nb, d_in), np.float64)
    # per block: each prefix's squared error, then aux squared error, sum x'**2
    p_sc = np.zeros((nb, nl + 2), np.float64)
    x0 = x[0]  # shift for the variance sums (x' = x - x[0]: no cancellation)
    for b in prange(nb):
        sdx = p_dx[b]
        sx = p_x[b]
        for i in range(b * RB, min(n, b * RB + RB)):
            acc = D[top, i]
            if top == 0:
                _accumulate_row(indptr, indices, values, W_dec, i, acc)
            else:
                acc[:] = 0.0
                lv = 0
                for p in range(indptr[i], indptr[i + 1]):
                    j = indices[p]
                    while lv < levels[j]:  # crossed a width: prefix lv is complete
                        D[lv, i] = acc
                        lv += 1
                    v = values[p]
                    w = W_dec[j]
                    for k in range(d_in):
                        acc[k] += v * w[k]
                while lv < top:
                    D[lv, i] = acc
                    lv += 1
            s = 0.0
            sxx = 0.0
            if has_aux:
                e = d_ehat[i]
                _accumulate_row(a_indptr, a_indices, a_values, W_dec, i, e)
                sa = 0.0
                for k in range(d_in):
                    xk = x[i, k]
                    xh = acc[k] + b_dec[k]
                    diff = xh - xk
                    s += np.float64(diff) * diff
                    g = scale * diff
                    acc[k] = g
                    sdx[k] += g
                    xs = np.float64(xk) - x0[k]
                    sx[k] += xs
                    sxx += xs * xs
                    err = e[k] - (xk - xh)
                    sa += np.float64(err) * err
                    e[k] = asc * err
                p_sc[b, nl] += sa
                for p in range(a_indptr[i], a_indptr[i + 1]):
                    a_d_pre[p] = _dot(e, W_dec[a_indices[p]]) if a_values[p] > 0 else 0.0
            else:
                for k in range(d_in):
                    xk = x[i, k]
                    diff = (acc[k] + b_dec[k]) - xk
                    s += np.float64(diff) * diff
                    g = scale * diff
                    acc[k] = g
                    sdx[k] += g
                    xs = np.float64(xk) - x0[k]
                    sx[k] += xs
                    sxx += xs * xs
            p_sc[b, top] += s
            p_sc[b, nl + 1] += sxx
            for lv in range(top - 1, -1, -1):  # D_lv = 2 r_lv / N + D_{lv+1}
                r = D[lv, i]
                nx = D[lv + 1, i]
                s = 0.0
                for k in range(d_in):
                    diff = (r[k] + b_dec[k]) - x[i, k]
                    s += np.float64(diff) * diff
                    g = scale * diff
                    r[k] = g + nx[k]
                    sdx[k] += g
                p_sc[b, lv] += s
            lv = 0
            dl = D[0, i]
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                if levels[j] != lv:
                    lv = levels[j]
                    dl = D[lv, i]
                d_pre[p] = _dot(dl, W_dec[j]) if values[p] > 0 else 0.0
    sum_dx = np.zeros(d_in, np.float64)
    sum_x = np.zeros(d_in, np.float64)
    sc = np.zeros(nl + 2, np.float64)
    for b in range(nb):
        for k in range(d_in):
            sum_dx[k] += p_dx[b, k]
            sum_x[k] += p_x[b, k]
        for q in range(nl + 2):
            sc[q] += p_sc[b, q]
    return D, d_ehat, d_pre, a_d_pre, sc[:nl], sc[nl], sum_dx, sum_x, sc[nl + 1]


@njit(cache=True)
def topk_row_pass(indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x,
                  aux_scale):
    """The TopK step's row pass: :func:`prefix_row_pass` with one prefix.
    Returns ``(d_xhat, d_ehat, d_pre, a_d_pre, sq_err, a_sq_err, sum_dx,
    sum_x, sum_xx)``, ``d_xhat = 2 (x_hat - x) / N`` float32 ``[N, d_in]``
    and ``sq_err`` a float64 (see there for the rest)."""
    D = np.empty((1, x.shape[0], W_dec.shape[1]), np.float32)
    D, d_ehat, d_pre, a_d_pre, sq, a_sq, sum_dx, sum_x, sum_xx = prefix_row_pass(
        indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x, aux_scale,
        np.zeros(W_dec.shape[0], np.int32), D)
    return D[0], d_ehat, d_pre, a_d_pre, sq[0], a_sq, sum_dx, sum_x, sum_xx


@njit(cache=True)
def stacked_csc(indptr, indices, values, d_pre, a_indptr, a_indices, a_values, a_d_pre, d_sae):
    """The weight pass's transposed pattern: the main codes' rows ``0..N-1``
    and, when ``a_indptr`` is non-empty, the AuxK codes' as rows
    ``N..2N-1``: ``(colptr, rows, perm, values, d_pre)`` with the values and
    ``d_pre`` of the stacked CSR (see :func:`csr_to_csc`)."""
    ip, ix, vv, dp = indptr, indices, values, d_pre
    if a_indptr.shape[0] > 0:
        n = indptr.shape[0] - 1
        ip = np.empty(2 * n + 1, np.int64)
        ip[:n + 1] = indptr
        ip[n + 1:] = indptr[n] + a_indptr[1:]
        ix = np.concatenate((indices, a_indices))
        vv = np.concatenate((values, a_values))
        dp = np.concatenate((d_pre, a_d_pre))
    colptr, rows, perm = csr_to_csc(ip, ix, d_sae)
    return colptr, rows, perm, vv, dp


@njit(inline="always")
def _axpy(a, x, y):
    """``y += a * x`` (1-D float32, separate loop so LLVM vectorizes it)."""
    for k in range(y.shape[0]):
        y[k] += a * x[k]


@njit(inline="always")
def prefix_feature_grad(colptr, rows, perm, values, d_pre, dx, d_ehat, xc, j, gd, gej):
    """Feature ``j``'s weight gradients in the TopK weight passes: ``gd =
    g_W_dec[j]`` (unit-norm projected: the component along ``W_dec[j]``
    removed by the caller, see :func:`project_row`) and ``gej += g_W_enc[:,
    j]`` (``gej`` starts zeroed); returns ``g_b_enc[j]``. ``dx`` is the
    ``[N, d_in]`` residual gradient of ``j``'s prefix level; pattern rows
    ``N + i`` are AuxK's, paired with ``d_ehat[i]`` and ``xc[i]``; rows in
    increasing order."""
    n = xc.shape[0]
    gd[:] = 0.0
    gb = np.float32(0.0)
    for q in range(colptr[j], colptr[j + 1]):
        i = rows[q]
        p = perm[q]
        dp = d_pre[p]
        gb += dp
        if i < n:
            _axpy(values[p], dx[i], gd)
            _axpy(dp, xc[i], gej)
        else:
            _axpy(values[p], d_ehat[i - n], gd)
            _axpy(dp, xc[i - n], gej)
    return gb


@njit(inline="always")
def project_row(gd, w):
    """Remove from ``gd`` its component along ``w`` (unit-norm decoder)."""
    sq = _dot(w, w)
    if sq > 0:
        coef = _dot(gd, w) / sq
        for k in range(gd.shape[0]):
            gd[k] -= coef * w[k]


@njit(parallel=True, cache=True, error_model="numpy")  # see adam.adam_elem
def prefix_feature_adam(colptr, rows, perm, values, d_pre, D, levels, d_ehat, xc, W_dec, W_enc,
                        b_enc, mW_enc, vW_enc, mb_enc, vb_enc, mW_dec, vW_dec, adam_c, tile,
                        ext_slot, ext_g, ext_b, Wp, WT):
    """TopK training step's weight pass, over nested prefixes: per feature
    ``j``, the gradients of ``W_dec`` (unit-norm projected), ``W_enc`` and
    ``b_enc`` (:func:`prefix_feature_grad` with ``D[levels[j]]``, the suffix
    sum of ``j``'s level from :func:`prefix_row_pass`), consumed by Adam at
    once, decoder rows renormalized after their update. Parallel over tiles
    of ``tile`` features (each thread owns its features; rows summed in
    increasing order, so the result does not depend on the thread count).

    ``W_dec`` rows are ``d_out`` wide, ``W_enc`` columns ``d_in`` (they
    differ for a transcoder). The pattern may have up to ``2N`` rows (``N =
    xc.shape[0]``): row ``i <
    N`` pairs ``D[levels[j], i]`` with ``xc[i]``, row ``N + i`` (AuxK codes)
    pairs ``d_ehat[i]`` with the same ``xc[i]``; nothing is stacked in
    memory. ``W_enc``'s tile gradient is transposed in cache and the tile
    updated row by row (``tile`` contiguous values per row of ``W_enc`` and
    of its moments): a wide tile keeps those strided accesses few and
    prefetchable.

    Extra gradient terms (JumpReLU's pre-activation loss, dense over a few
    features): where ``ext_slot`` (int64 ``[d_sae]``) is non-empty, a
    feature ``j`` with ``s = ext_slot[j] >= 0`` gets ``ext_g[s]`` (float32
    ``[n_ext, d_in]``) added to its ``W_enc`` column's gradient and
    ``ext_b[s]`` to its ``b_enc`` gradient before Adam; the TopK family
    passes empty arrays (nothing added, bit for bit as before).

    The bfloat16 copy of ``W_enc`` (``Wp`` non-empty): as
    :func:`feature_adam` writes it (:data:`NO_COPY`: none).

    Returns ``(g_b_enc float32 [d_sae], part float64 [n_tiles, d_in],
    bad)`` with ``part[t] = W_enc[:, tile t] @ g_b_enc[tile t]`` from the
    weights before the update (``g_b_dec`` needs ``W_enc @ g_b_enc``; sum
    ``part`` over tiles in order) and ``bad``, nonzero exactly when an
    updated parameter is inf or NaN.
    """
    d_sae, d_out = W_dec.shape
    d_in = W_enc.shape[0]
    T = max(1, tile)
    ntiles = (d_sae + T - 1) // T
    g_b_enc = np.empty(d_sae, np.float32)
    part = np.zeros((ntiles, d_in), np.float64)
    cs = const_tuple(adam_c)
    has_ext = ext_slot.shape[0] > 0
    copy = Wp.shape[0] > 0
    bad = 0
    for t in prange(ntiles):
        j0 = t * T
        j1 = min(d_sae, j0 + T)
        m = j1 - j0
        tb = 0
        ge = np.zeros((T, d_in), np.float32)
        geT = np.empty((d_in, T), np.float32)
        gd = np.empty(d_out, np.float32)
        for j in range(j0, j1):
            gb = prefix_feature_grad(colptr, rows, perm, values, d_pre, D[levels[j]], d_ehat,
                                     xc, j, gd, ge[j - j0])
            if has_ext:
                sl = ext_slot[j]
                if sl >= 0:
                    gb += ext_b[sl]
                    _axpy(np.float32(1.0), ext_g[sl], ge[j - j0])
            g_b_enc[j] = gb
            w = W_dec[j]
            project_row(gd, w)
            mr = mW_dec[j]
            vr = vW_dec[j]
            for k in range(d_out):
                w[k], mr[k], vr[k] = adam_elem(w[k], gd[k], mr[k], vr[k], cs)
            tb += nonfinite_in(w)  # before the renormalization could hide an inf
            nw = np.sqrt(_dot(w, w))
            if nw > 0:
                for k in range(d_out):
                    w[k] = w[k] / nw
            b_enc[j], mb_enc[j], vb_enc[j] = adam_elem(b_enc[j], gb, mb_enc[j], vb_enc[j],
                                                      cs)
        for jj in range(m):
            for k in range(d_in):
                geT[k, jj] = ge[jj, k]
        gbt = g_b_enc[j0:j1]
        pt = part[t]
        for k in range(d_in):
            wr = W_enc[k, j0:j1]
            mr = mW_enc[k, j0:j1]
            vr = vW_enc[k, j0:j1]
            gr = geT[k]
            pt[k] = _dot(wr, gbt)
            for jj in range(m):
                wr[jj], mr[jj], vr[jj] = adam_elem(wr[jj], gr[jj], mr[jj], vr[jj], cs)
            tb += nonfinite_in(wr)
            if copy:  # ge is spent (transposed above): it keeps the new columns
                for jj in range(m):
                    ge[jj, k] = wr[jj]
        if copy:
            bf16_copy_tile(ge, j0, m, Wp, WT)
        tb += nonfinite_in(b_enc[j0:j1])
        bad += tb
    return g_b_enc, part, bad


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def topk_feature_adam(colptr, rows, perm, values, d_pre, d_xhat, d_ehat, xc, W_dec, W_enc,
                      b_enc, mW_enc, vW_enc, mb_enc, vb_enc, mW_dec, vW_dec, adam_c, tile, Wp,
                      WT):
    """TopK training step's weight pass: :func:`prefix_feature_adam` with one
    prefix, ``d_xhat`` float32 ``[N, d_in]`` (C-contiguous) its residual
    gradient; ``Wp``, ``WT`` the bf16 copy it rewrites (:data:`NO_COPY`:
    none). Returns ``(g_b_enc, part, bad)`` as that does."""
    n, d_in = d_xhat.shape
    return prefix_feature_adam(colptr, rows, perm, values, d_pre,
                               d_xhat.reshape((1, n, d_in)),
                               np.zeros(W_dec.shape[0], np.int32), d_ehat, xc, W_dec, W_enc,
                               b_enc, mW_enc, vW_enc, mb_enc, vb_enc, mW_dec, vW_dec, adam_c,
                               tile, np.empty(0, np.int64),
                               np.empty((0, xc.shape[1]), np.float32), np.empty(0, np.float32),
                               Wp, WT)
