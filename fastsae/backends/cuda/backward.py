"""CUDA sparse-aware backward pass (both decoder-norm modes).

With ``d_xhat = 2 (x_hat - x) / N`` and CSR codes ``f`` (``nnz`` entries),
every gradient of the reference (:func:`fastsae.backends.reference.gradients`) only
needs the active entries:

* :func:`residual_kernel`: ``d_xhat``, and per-row ``sum (x_hat - x)**2``
  (the MSE) and ``sum (x - mean)**2`` (for explained variance), float64.
* :func:`colsum_partial_kernel` + :func:`colsum_finish_kernel`: column
  sums in fixed row chunks (deterministic): ``g_b_dec = sum_i d_xhat_i``
  and the batch mean of ``x``.
* :func:`dpre_kernel`: ``d_pre[p] = d_xhat_i . W_dec[j] + (c/N) pen_j`` at
  each entry ``p = (i, j)`` with ``f > 0`` (0 elsewhere): a group of
  ``LANES`` threads per entry, coalesced over ``d_in``.
* A stable CSR -> CSC transposition (:func:`csc_count_kernel`,
  :func:`csc_offsets_kernel`, an exclusive scan, :func:`csc_fill_kernel`):
  the rows are cut into chunks of ``CHUNK_ROWS``; per (chunk, feature)
  counts and their prefix sums give every entry its place, and the fill
  walks each chunk's rows in order (entries of one row have distinct
  features, so a barrier per row is all the synchronization needed). Each
  feature's list of entries is sorted by row, so the per-feature sums below
  are deterministic: no float atomics anywhere.
* :func:`feature_grad_kernel`: one block per feature ``j``, threads over
  ``d_in``: ``g_W_dec[j] = sum f_ij d_xhat_i`` (+ the weighted-L1 norm term,
  or the unit-norm projection), ``g_W_enc^T[j] = sum d_pre_ij (x_i - b_dec)``,
  ``g_b_enc[j]``, ``sum_i f_ij`` and the feature's L1 term.
* :func:`~.common.transpose_kernel` turns ``g_W_enc^T`` into the ``[d_in,
  d_sae]`` layout (both sides coalesced through a shared tile).
* :func:`matvec_sub_kernel`: ``g_b_dec -= W_enc @ g_b_enc``.

Transcoders (``y`` given, see :mod:`.transcoder`): the target ``x`` above
is ``y`` and ``x_hat`` its full reconstruction (``d_out`` wide, the skip
term included); the encoder's input is ``x`` uncentred (``b_dec`` above
becomes zeros) and ``g_b_dec`` has no ``- W_enc @ g_b_enc`` term; a skip
transcoder's ``g_W_skip = d_xhat.T @ x`` is one GEMM.
* :func:`aux_residual_kernel`: the AuxK term's residual gradient
  ``d_ehat`` and its per-row squared error (TopK training).

Matryoshka levels. The residual, d_pre and per-feature kernels take
``d_xhat`` as ``[L, N, d_in]`` and the prefix widths (int64 ``[L]``): level
``l`` holds the suffix sum ``D_l = sum_{m >= l} 2 (x_hat_m - x) / N`` of the
prefixes' residual gradients, and feature ``j`` of level ``g`` (the first
``g`` with ``j < widths[g]``) reads ``D_g`` in place of ``d_xhat``. Every
other model is the one level ``L = 1`` (a ``[1, N, d_in]`` view; widths
unread), with the same arithmetic as before.

Host side: :func:`gradients` (ReLU/L1) and :func:`topk_gradients` (TopK,
optional AuxK) and the passes the training steps share with them
(:func:`_backward`, :func:`_topk_backward`, :func:`_feature_pass`).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...params import Losses, SAEParams
from ...sparse import SparseCodes
from .common import (BLOCK, CHUNK_ROWS, COLSUM_ROWS, GROUPS, LANES, TILE, TILE_ROWS,
                     _flat, _single_block, _zero, add_kernel, block_sum, block_sum2,
                     exclusive_scan_kernel, flat_grid, grid_for, sum_kernel,
                     transpose_kernel)
from .decode import _no_widths, _one_level, _sparse_decode
from .encode import _dense_to_sparse
from .norms import _norms
from .placement import (_any_device, _codes_device, _device, _empty_like_params,
                        _params_device, _params_out, _work, _work_at_least)
from .transcoder import _device_or_none, _input_shift, _skip_grad, _target, _zeros


@cuda.jit(device=True, inline=True)
def _level(widths, nl, j):
    """The Matryoshka level of feature ``j``: the first ``g`` with ``j <
    widths[g]`` among ``nl`` levels (0, and ``widths`` unread, when ``nl ==
    1``)."""
    g = 0
    while g < nl - 1 and j >= widths[g]:
        g += 1
    return g


@cuda.jit(cache=True)
def residual_kernel(x, x_hat, mean, nf, d_xhat, row_mse, row_var):
    """Per level ``l`` (from the last down): ``d_xhat[l] = d_xhat[l + 1] +
    (2 (x_hat[l] - x)) / nf`` (the last level: no first term), i.e. the
    suffix sums of the prefixes' residual gradients; per-row sums of squares.

    x: float32 ``[N, d_in]``; x_hat, d_xhat: float32 ``[L, N, d_in]`` (L = 1:
    one reconstruction, ``d_xhat = 2 (x_hat - x) / nf``); mean: float32
    ``[d_in]`` (batch mean of x); nf: float32 N; row_mse: float64 ``[L, N]``
    (``sum_k (x_hat[l] - x)**2``), row_var: float64 ``[N]`` (``sum_k (x -
    mean)**2``). One block of ``BLOCK`` threads per row; each thread owns
    its columns on every level, so the suffix needs no barrier.
    """
    sh = cuda.shared.array((2, BLOCK), np.float64)
    t = cuda.threadIdx.x
    nl = x_hat.shape[0]
    n = x.shape[0]
    d = x.shape[1]
    two = np.float32(2.0)
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        for lev in range(nl - 1, -1, -1):
            last = lev == nl - 1
            a = 0.0
            b = 0.0
            for k in range(t, d, BLOCK):
                xv = x[r, k]
                diff = x_hat[lev, r, k] - xv
                g = (two * diff) / nf
                if not last:
                    g = d_xhat[lev + 1, r, k] + g
                d_xhat[lev, r, k] = g
                a += np.float64(diff) * np.float64(diff)
                if last:
                    dv = np.float64(xv - mean[k])
                    b += dv * dv
            sa, sb = block_sum2(sh, t, a, b)
            if t == 0:
                row_mse[lev, r] = sa
                if last:
                    row_var[r] = sb


@cuda.jit(cache=True)
def colsum_partial_kernel(A, chunk_rows, partial):
    """``partial[c, k] = sum of A[r, k]`` over rows ``r`` of chunk ``c``.

    A: float32 ``[N, d]``; partial: float32 ``[ceil(N / chunk_rows), d]``.
    Grid ``(ceil(d / BLOCK), n_chunks)``, block ``BLOCK``: consecutive
    threads read consecutive columns.
    """
    k = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    c = cuda.blockIdx.y
    n = A.shape[0]
    if k < A.shape[1]:
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        acc = np.float32(0.0)
        for r in range(r0, r1):
            acc += A[r, k]
        partial[c, k] = acc


@cuda.jit(cache=True)
def colsum_finish_kernel(partial, div, out):
    """``out[k] = (sum_c partial[c, k]) / div`` (div float32; 1 for a sum).

    1-D grid over the columns.
    """
    k = cuda.grid(1)
    if k < out.shape[0]:
        acc = np.float32(0.0)
        for c in range(partial.shape[0]):
            acc += partial[c, k]
        out[k] = acc / div


@cuda.jit(cache=True)
def dpre_kernel(indptr, indices, values, d_xhat, widths, W_dec, norms, weighted, l1_scale,
                dpre):
    """Gradient at each stored entry's pre-activation.

    ``dpre[p] = d_xhat[g, i] . W_dec[j] + l1_scale * pen_j`` if ``values[p]
    > 0`` else 0, for entry ``p`` = (row i, feature j) and ``g`` the level of
    j (:func:`_level`; 0 with one level); ``pen_j = norms[j]`` when
    ``weighted`` else 1. indptr int64 ``[N + 1]``, indices int32,
    values/dpre float32 ``[nnz]``, d_xhat float32 ``[L, N, d_in]``, widths
    int64 ``[L]`` (unread when L = 1), W_dec
    float32 ``[d_sae, d_in]``, norms float32 ``[d_sae]``, l1_scale float32
    (``c / N``). Block ``(LANES, GROUPS)``: each group of LANES threads does
    one entry's dot product, GROUPS entries at a time; one row per block
    (grid-stride).
    """
    sh = cuda.shared.array((GROUPS, LANES), np.float32)
    lane = cuda.threadIdx.x
    grp = cuda.threadIdx.y
    nl = d_xhat.shape[0]
    n = d_xhat.shape[1]
    d_in = d_xhat.shape[2]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        s = indptr[r]
        e = indptr[r + 1]
        for base in range(s, e, GROUPS):  # same trip count for the whole block
            p = base + grp
            acc = np.float32(0.0)
            if p < e:
                j = indices[p]
                g = _level(widths, nl, j)
                for k in range(lane, d_in, LANES):
                    acc += d_xhat[g, r, k] * W_dec[j, k]
            sh[grp, lane] = acc
            cuda.syncthreads()
            w = LANES // 2
            while w > 0:
                if lane < w:
                    sh[grp, lane] += sh[grp, lane + w]
                cuda.syncthreads()
                w //= 2
            if lane == 0 and p < e:
                j = indices[p]
                pen = np.float32(1.0)
                if weighted:
                    pen = norms[j]
                df = sh[grp, 0] + l1_scale * pen
                if values[p] > 0:
                    dpre[p] = df
                else:
                    dpre[p] = 0.0
            cuda.syncthreads()


@cuda.jit(cache=True)
def csc_count_kernel(indptr, indices, chunk_rows, counts):
    """``counts[c, j] += number of entries of feature j in row chunk c``.

    counts: int32 ``[n_chunks, d_sae]``, zeroed by the caller. Integer
    atomics: the counts (not their order) are all that matters here.
    """
    t = cuda.threadIdx.x
    n = indptr.shape[0] - 1
    for c in range(cuda.blockIdx.x, counts.shape[0], cuda.gridDim.x):
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        for p in range(indptr[r0] + t, indptr[r1], BLOCK):
            cuda.atomic.add(counts, (c, indices[p]), 1)


@cuda.jit(cache=True)
def csc_offsets_kernel(counts, colcount):
    """Per feature j: ``counts[:, j]`` becomes its exclusive prefix sum over
    chunks, and ``colcount[j]`` (int64) the feature's total. 1-D grid over j.
    """
    j = cuda.grid(1)
    if j < counts.shape[1]:
        run = 0
        for c in range(counts.shape[0]):
            v = counts[c, j]
            counts[c, j] = run
            run += v
        colcount[j] = run


@cuda.jit(cache=True)
def csc_fill_kernel(indptr, indices, chunk_rows, colptr, offsets, entry_of, row_of):
    """Stable CSR -> CSC: list each feature's entries in row order.

    colptr: int64 ``[d_sae + 1]``; offsets: int32 ``[n_chunks, d_sae]`` from
    :func:`csc_offsets_kernel` (consumed: used as cursors); outputs
    entry_of int64 and row_of int32 ``[nnz]``: the CSR entry index and the
    row of the q-th CSC entry. One block per chunk, rows in order; the
    entries of a row have distinct features, so a barrier between rows
    suffices.
    """
    t = cuda.threadIdx.x
    n = indptr.shape[0] - 1
    for c in range(cuda.blockIdx.x, offsets.shape[0], cuda.gridDim.x):
        r0 = c * chunk_rows
        r1 = min(r0 + chunk_rows, n)
        for r in range(r0, r1):
            for p in range(indptr[r] + t, indptr[r + 1], BLOCK):
                j = indices[p]
                q = colptr[j] + offsets[c, j]
                offsets[c, j] += 1
                entry_of[q] = p
                row_of[q] = r
            cuda.syncthreads()


@cuda.jit(cache=True)
def feature_grad_kernel(colptr, entry_of, row_of, values, dpre, d_xhat, widths, x, shift,
                        W_dec, norms, weighted, l1_scale, g_W_dec, g_W_encT, g_b_enc, l1_feat):
    """Per-feature gradients from the CSC lists; one block per feature.

    For feature j of level g (:func:`_level`; 0 with one level) with entries
    (row i, value f, d_pre) in row order: ``g_W_dec[j] = sum f d_xhat[g, i]``
    plus, if ``weighted``, ``(l1_scale * sum f) * W_dec[j] / norms[j]``
    (norm 0: nothing), else (unit_norm) minus
    its component along ``W_dec[j]``; ``g_W_encT[j] = sum d_pre (x[i] -
    shift)`` (``shift`` the encoder's input centering: an SAE's ``b_dec``, a
    transcoder's zeros); ``g_b_enc[j] = sum d_pre``; ``l1_feat[j] = (sum f)
    * pen_j`` (pen = norm or 1). Shapes: g_W_dec, W_dec float32 ``[d_sae,
    d_out]``; g_W_encT float32 ``[d_sae, d_in]``; x float32 ``[N, d_in]``;
    shift float32 ``[d_in]``; d_xhat float32 ``[L, N, d_out]``; widths
    int64 ``[L]`` (unread when L = 1); colptr int64 ``[d_sae + 1]``;
    entry_of int64, row_of int32 ``[nnz]``. Block ``BLOCK`` threads over
    ``max(d_in, d_out)`` (equal for an SAE). Every thread walks the entry
    list itself (it is cached and short next to the widths) so no barrier is
    needed except the unit-norm reductions.
    """
    sh = cuda.shared.array((2, BLOCK), np.float32)
    t = cuda.threadIdx.x
    nl = d_xhat.shape[0]
    d_sae = W_dec.shape[0]
    d_out = W_dec.shape[1]
    d_in = x.shape[1]
    d_max = max(d_in, d_out)
    for j in range(cuda.blockIdx.x, d_sae, cuda.gridDim.x):
        g = _level(widths, nl, j)
        s = colptr[j]
        e = colptr[j + 1]
        fs = np.float32(0.0)
        ds = np.float32(0.0)
        for q in range(s, e):
            p = entry_of[q]
            fs += values[p]
            ds += dpre[p]
        nj = norms[j]
        coef = np.float32(0.0)
        if weighted and nj > 0:
            coef = l1_scale * fs
        dot = np.float32(0.0)
        sq = np.float32(0.0)
        for k in range(t, d_max, BLOCK):
            out_k = k < d_out  # uniform per thread: k's two roles
            in_k = k < d_in
            ad = np.float32(0.0)
            ae = np.float32(0.0)
            bk = np.float32(0.0)
            if in_k:
                bk = shift[k]
            for q in range(s, e):
                p = entry_of[q]
                i = row_of[q]
                if out_k:
                    ad += values[p] * d_xhat[g, i, k]
                if in_k:
                    ae += dpre[p] * (x[i, k] - bk)
            if out_k:
                w = W_dec[j, k]
                if weighted and nj > 0:
                    ad += coef * (w / nj)
                g_W_dec[j, k] = ad
                dot += ad * w
                sq += w * w
            if in_k:
                g_W_encT[j, k] = ae
        if t == 0:
            g_b_enc[j] = ds
            if weighted:
                l1_feat[j] = fs * nj
            else:
                l1_feat[j] = fs
        if not weighted:  # unit_norm: remove the component along W_dec[j]
            dsum, ssum = block_sum2(sh, t, dot, sq)
            if ssum > 0:
                proj = dsum / ssum
                for k in range(t, d_out, BLOCK):
                    g_W_dec[j, k] -= proj * W_dec[j, k]


@cuda.jit(cache=True)
def matvec_sub_kernel(W, vec, out):
    """``out[k] -= W[k] . vec``; W float32 ``[d_in, d_sae]``, vec float32
    ``[d_sae]``, out float32 ``[d_in]``. One block per row of W.
    """
    sh = cuda.shared.array(BLOCK, np.float32)
    t = cuda.threadIdx.x
    d = W.shape[1]
    for k in range(cuda.blockIdx.x, W.shape[0], cuda.gridDim.x):
        acc = np.float32(0.0)
        for j in range(t, d, BLOCK):
            acc += W[k, j] * vec[j]
        s = block_sum(sh, t, acc)
        if t == 0:
            out[k] = out[k] - s


@cuda.jit(cache=True)
def aux_residual_kernel(x, x_hat, e_hat, w, nf, d_ehat, row_sq):
    """AuxK residual: ``err = e_hat - (x - x_hat)``, ``d_ehat = 2 w err /
    nf``, ``row_sq[r] = sum_k err**2`` (float64). x, x_hat, e_hat, d_ehat
    float32 ``[N, d_in]``; one block per row."""
    sh = cuda.shared.array(BLOCK, np.float64)
    t = cuda.threadIdx.x
    n = x.shape[0]
    d = x.shape[1]
    two_w = np.float32(2.0) * w
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        a = 0.0
        for k in range(t, d, BLOCK):
            err = e_hat[r, k] - (x[r, k] - x_hat[r, k])
            d_ehat[r, k] = (two_w * err) / nf
            a += np.float64(err) * np.float64(err)
        total = block_sum(sh, t, a)
        if t == 0:
            row_sq[r] = total


# ------------------------------------------------------------ host side
def _colsum(A, div, out):
    """``out = A.sum(axis=0) / div`` (float32), deterministic chunked order."""
    n, d = A.shape
    chunks = -(-n // COLSUM_ROWS)
    partial = _work("colsum_partial", (chunks, d))
    colsum_partial_kernel[(-(-d // BLOCK), chunks), BLOCK](A, COLSUM_ROWS, partial)
    colsum_finish_kernel[-(-d // BLOCK), BLOCK](partial, np.float32(div), out)
    return out


def _residual(x, x_hat):
    """``d_xhat`` (workspace) and the per-row squared error and squared
    deviation from the batch mean (float64 workspaces) of the target ``x``
    (a transcoder's ``y``, ``d = d_out`` wide). ``x_hat`` ``[N, d]`` gives
    ``d_xhat`` ``[N, d]`` and ``row_mse`` ``[N]``; the Matryoshka prefixes'
    ``[L, N, d]`` give the suffix sums ``d_xhat`` ``[L, N, d]`` (see
    :func:`residual_kernel`) and ``row_mse`` ``[L, N]``."""
    n, d = x.shape
    levels = _one_level(x_hat)
    nl = levels.shape[0]
    mean = _colsum(x, n, _work("mean", d))
    d_xhat = _work("d_xhat", (nl, n, d))
    row_mse = _work("row_mse", (nl, n), np.float64)
    row_var = _work("row_var", n, np.float64)
    residual_kernel[grid_for(n), BLOCK](x, levels, mean, np.float32(n), d_xhat, row_mse,
                                        row_var)
    if len(x_hat.shape) == 2:
        return d_xhat.reshape(n, d), row_mse.reshape(n), row_var
    return d_xhat, row_mse, row_var


def _feature_pass(x, P, indptr, indices, values, d_xhat, g_W_dec, g_W_encT, g_b_enc, tag,
                  weighted=False, l1_scale=np.float32(0), l1_feat=None, widths=None, y=None):
    """Sparse backward of one code set against ``d_xhat`` (``[N, d_out]``,
    or the Matryoshka suffix sums ``[L, N, d_out]`` with ``widths``, int64
    device ``[L]``: feature j reads its level's): d_pre, a stable
    CSR -> CSC transpose, then per feature ``g_W_dec`` (projected unless
    ``weighted``), ``g_W_encT`` (against ``x`` centred as the encoder saw
    it: uncentred when ``y``, a transcoder's target, is given) and
    ``g_b_enc`` overwritten; with ``l1_scale`` the L1 term (``weighted``: by
    decoder norm) is included and its per-feature parts written to
    ``l1_feat``. ``tag`` names the workspaces of a second code set (AuxK).
    Returns the per-feature entry counts (int64 [d_sae] workspace)."""
    n = x.shape[0]
    d_sae = P.W_enc.shape[1]
    nnz = indices.shape[0]
    d_xhat = _one_level(d_xhat)
    if widths is None:
        widths = _no_widths()
    norms = _norms(P.W_dec, _work("norms", d_sae))
    dpre = _work_at_least("dpre" + tag, nnz, np.float32)
    dpre_kernel[grid_for(n), (LANES, GROUPS)](indptr, indices, values, d_xhat, widths, P.W_dec,
                                              norms, weighted, l1_scale, dpre)
    chunks = -(-n // CHUNK_ROWS)
    counts = _work("csc_counts", (chunks, d_sae), np.int32)
    _zero(counts)
    csc_count_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, counts)
    colcount = _work("colcount" + tag, d_sae, np.int64)
    csc_offsets_kernel[-(-d_sae // BLOCK), BLOCK](counts, colcount)
    colptr = _work("colptr", d_sae + 1, np.int64)
    _single_block(exclusive_scan_kernel)(colcount, colptr)
    entry_of = _work_at_least("entry_of", nnz, np.int64)
    row_of = _work_at_least("row_of", nnz, np.int32)
    csc_fill_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, colptr, counts,
                                             entry_of, row_of)
    if l1_feat is None:
        l1_feat = _work("l1_feat", d_sae)
    feature_grad_kernel[grid_for(d_sae), BLOCK](
        colptr, entry_of, row_of, values, dpre, d_xhat, widths, x, _input_shift(P, y, True),
        P.W_dec, norms, weighted, l1_scale, g_W_dec, g_W_encT, g_b_enc, l1_feat)
    return colcount


def _encoder_grads(P, g, g_W_encT, y=None):
    """``g.W_enc = g_W_encT.T`` and, for an SAE (``y`` None: the encoder
    centres by ``b_dec``), ``g.b_dec -= W_enc @ g.b_enc``."""
    d_sae, d_in = g_W_encT.shape
    transpose_kernel[(-(-d_in // TILE), -(-d_sae // TILE)), (TILE, TILE_ROWS)](g_W_encT,
                                                                              g.W_enc)
    if y is None:
        matvec_sub_kernel[grid_for(d_in), BLOCK](P.W_enc, g.b_enc, g.b_dec)


def _backward(x, P, indptr, indices, values, x_hat, c, weighted, g, scal, y=None):
    """Fill the gradient arrays ``g`` (SAEParams of device arrays) and
    ``scal`` (float64 [3]: sum of squared errors, sum_j (sum_i f_ij) pen_j,
    sum of squared deviations of the target from its mean); ``y`` a
    transcoder's target (``x_hat`` then its full reconstruction). Returns
    the per-feature count of stored entries (int64 [d_sae], a workspace)."""
    n, d_in = x.shape
    d_sae = P.W_enc.shape[1]
    l1_scale = np.float32(c / n)

    d_xhat, row_mse, row_var = _residual(_target(x, y), x_hat)
    _colsum(d_xhat, 1, g.b_dec)

    g_W_encT = _work("g_W_encT", (d_sae, d_in))
    l1_feat = _work("l1_feat", d_sae)
    colcount = _feature_pass(x, P, indptr, indices, values, d_xhat, g.W_dec, g_W_encT, g.b_enc,
                             "", weighted, l1_scale, l1_feat, y=y)
    _encoder_grads(P, g, g_W_encT, y)
    _skip_grad(x, P, d_xhat, g)

    _single_block(sum_kernel)(row_mse, scal, 0)
    _single_block(sum_kernel)(l1_feat, scal, 1)
    _single_block(sum_kernel)(row_var, scal, 2)
    return colcount


def _csr_device(codes, tag="_dense"):
    """``(indptr, indices, values)`` on the device of sparse or dense codes
    (the contract allows both; dense ones are compacted into workspaces
    named by ``tag``)."""
    if isinstance(codes, SparseCodes):
        return _codes_device(codes)
    sc, _ = _dense_to_sparse(_device(codes), tag)
    return sc.indptr, sc.indices, sc.values


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm, y=None):
    """Loss parts and gradients (see :func:`fastsae.backends.reference.gradients`);
    ``y`` a transcoder's target, ``x_hat`` the full reconstruction."""
    dev = _any_device(x, params, codes, x_hat, y)
    x, x_hat, y = _device(x), _device(x_hat), _device_or_none(y)
    P = _params_device(params)
    indptr, indices, values = _csr_device(codes)
    g = _empty_like_params(P, cached=False)
    scal = _work("scalars", 3, np.float64)
    _backward(x, P, indptr, indices, values, x_hat, l1_coefficient,
              decoder_norm == "weighted_l1", g, scal, y)
    s = scal.copy_to_host()
    n = x.shape[0]
    mse = float(s[0] / n)
    l1 = float(l1_coefficient * s[1] / n)
    return Losses(mse=mse, l1=l1, total=mse + l1), _params_out(g, dev)


def _topk_backward(x, P, codes, x_hat, aux, weight, g, scal, widths=None, y=None):
    """TopK gradients into ``g``; ``scal`` float64 [L + 2]: the squared
    error sum of each of the L reconstructions, the aux squared error sum,
    the squared deviation sum. ``codes`` and ``aux`` (the AuxK codes, or
    None) are ``(indptr, indices, values)`` device triples. ``x_hat`` is the
    reconstruction ``[N, d_out]`` (L = 1), or with ``widths`` (int64 device
    ``[L]``) the Matryoshka prefixes' ``[L, N, d_out]``: each feature's
    gradient signal is then the suffix sum over the prefixes containing it,
    and AuxK works on the full (last) one's residual; of ``y``, a
    transcoder's target, when given (of ``x`` else). Returns the main
    codes' per-feature counts."""
    n, d_in = x.shape
    d_sae, d_out = P.W_dec.shape
    t = _target(x, y)
    levels = _one_level(x_hat)
    nl = levels.shape[0]
    d_xhat, row_mse, row_var = _residual(t, levels)
    _colsum(d_xhat[0], 1, g.b_dec)  # level 0's suffix sum: b_dec is in every prefix
    g_W_encT = _work("g_W_encT", (d_sae, d_in))
    colcount = _feature_pass(x, P, *codes, d_xhat, g.W_dec, g_W_encT, g.b_enc, "",
                             widths=widths, y=y)
    row_aux = _work("row_aux", n, np.float64)
    _zero(row_aux)
    if aux is not None:
        e_hat = _work("e_hat", (n, d_out))
        _sparse_decode(*aux, P.W_dec, _zeros("zero_bias", d_out), e_hat)
        d_ehat = _work("d_ehat", (n, d_out))
        aux_residual_kernel[grid_for(n), BLOCK](t, levels[nl - 1], e_hat, np.float32(weight),
                                                np.float32(n), d_ehat, row_aux)
        a_W_dec = _work("aux_g_W_dec", (d_sae, d_out))
        a_W_encT = _work("aux_g_W_encT", (d_sae, d_in))
        a_b_enc = _work("aux_g_b_enc", d_sae)
        _feature_pass(x, P, *aux, d_ehat, a_W_dec, a_W_encT, a_b_enc, "_aux", y=y)
        for dst, src in ((g.W_dec, a_W_dec), (g_W_encT, a_W_encT), (g.b_enc, a_b_enc)):
            add_kernel[flat_grid(dst.size), BLOCK](_flat(dst), _flat(src))
    _encoder_grads(P, g, g_W_encT, y)
    _skip_grad(x, P, d_xhat[0], g)  # AuxK's e_hat has no skip term
    for lev in range(nl):
        _single_block(sum_kernel)(row_mse[lev], scal, lev)
    _single_block(sum_kernel)(row_aux, scal, nl)
    _single_block(sum_kernel)(row_var, scal, nl + 1)
    return colcount


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0,
                   y=None):
    """Losses and gradients of TopK training (see
    :func:`fastsae.backends.reference.topk_gradients`); ``y`` a
    transcoder's target, ``x_hat`` the full reconstruction."""
    dev = _any_device(x, params, codes, x_hat, aux_codes, y)
    x, x_hat, y = _device(x), _device(x_hat), _device_or_none(y)
    P = _params_device(params)
    aux = None
    if aux_codes is not None and aux_weight > 0:
        aux = _csr_device(aux_codes, "_dense_aux")  # lives beside the main codes
    g = _empty_like_params(P, cached=False)
    scal = _work("scalars_topk", 4, np.float64)
    _topk_backward(x, P, _csr_device(codes), x_hat, aux, aux_weight, g, scal, y=y)
    s = scal.copy_to_host()
    n = x.shape[0]
    mse = float(s[0] / n)
    aux_loss = float(aux_weight * s[1] / n) if aux is not None else 0.0
    return Losses(mse=mse, l1=0.0, total=mse + aux_loss, aux=aux_loss), _params_out(g, dev)
