"""Numba CPU JumpReLU training: the fused candidate encoder, the sparse and
dense step cores and the gradients (see the "JumpReLU family" section of
:mod:`fastsae.backends.reference` for the math).

Per feature ``j`` the face computes, once per call and in float32 exactly as
the reference's ``jumprelu_window`` does, ``theta_j = exp(log_threshold_j)``
and the window bounds ``lo_j = theta_j - bw/2``, ``hi_j = theta_j + bw/2``.
Only pre-activations ``pre > lo`` ever matter: the active ones (``pre >
theta``: codes, ``d_pre = d_f``) and the window's (``lo < pre < hi``: the
threshold's pseudo-gradient needs ``d_f`` there). So:

* :func:`encode_adaptive`: the product ``(x - b_dec) @ W_enc`` by the ReLU
  encoder's fixed grid of row blocks (one single-threaded sgemm per block
  into a per-thread workspace that stays in cache), each pre-activation
  tested once against ``lo`` (as ReLU tests against 0); the first row blocks
  measure the batch's candidate density, and from
  :data:`~fastsae.backends.tunables.NUMBA_JUMPRELU_DENSE_MIN_DENSITY` on the
  whole ``pre`` is returned dense, below it the candidates as CSR (values =
  ``pre``, which may lie below ``theta``).
* sparse path (:func:`sparse_step_core`, :func:`sparse_gradients`): the
  candidates are split into the active CSR (the codes) and the window
  pattern (:func:`split_candidates`); the TopK step's kernels do the rest of
  the active part unchanged (:func:`.backward.topk_row_pass`: decode,
  residual, ``d_pre`` at the active entries, column sums;
  :func:`.backward.topk_feature_adam`: weight gradients with Adam fused,
  unit-norm projection and renormalization); ``d_f`` at the window entries
  is one dot product each (:func:`window_df`, read before ``W_dec``
  changes) and summed per feature in row order.
* dense path (:func:`dense_step_core`, :func:`dense_gradients`): BLAS
  products over dense codes as the ReLU family's issue-12 path
  (:mod:`.dense`): a row pass of our own (:func:`_dense_row_pass`: ``f`` from
  ``pre``, ``x_hat = f W_dec``, ``d_f = d_xhat W_dec^T``, the window sums and
  ``d_pre``) and :mod:`.dense`'s feature pass with Adam fused.

Transcoders: the step cores and gradients take the reconstruction's target
``x`` (``[N, d_out]``: a transcoder's ``y``, less the skip term ``x @
W_skip.T`` for a skip transcoder, computed by the face) separately from the
encoder input ``xc`` (``[N, d_in]``), and ``center`` (False: ``g_b_dec``
without ``- W_enc @ g_b_enc``); they return ``d_xhat = dL/dx_hat`` for the
skip gradient.

Results do not depend on the thread count: fixed block grids, every
parallel loop owns its outputs, sums in a fixed order. Call every kernel
with BLAS limited to one thread (the face does it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import NUMBA_DENSE_FEATURE_BLOCK
from . import backward as B
from . import dense as DN
from . import step as S
from .adam import adam_elem, const_tuple, nonfinite_in
from .decode import csr_from_counts
from .encode import _part_bounds, _todo_blocks, gemm, warm_gemm

__all__ = ["encode_adaptive", "split_candidates", "window_df", "threshold_grad",
           "sparse_step_core", "sparse_gradients", "dense_step_core", "dense_gradients"]

# ---------------------------------------------------------------- encoder
@njit(cache=True)
def _compact_lo(Y, r, b_enc, lo, idx_ws):
    """``v = Y[r] + b_enc``; the ``v > lo`` are compacted in place to the
    front of ``Y[r]`` and their columns to ``idx_ws[r]``; returns how many.
    Chunks of 64 columns with no candidate (a vectorized count) are skipped;
    the write position never passes the read position."""
    d = Y.shape[1]
    cnt = 0
    for j0 in range(0, d, 64):
        j1 = min(d, j0 + 64)
        hits = 0
        for j in range(j0, j1):
            hits += 1 if Y[r, j] + b_enc[j] > lo[j] else 0
        if hits > 0:
            for j in range(j0, j1):
                v = Y[r, j] + b_enc[j]
                if v > lo[j]:
                    Y[r, cnt] = v
                    idx_ws[r, cnt] = j
                    cnt += 1
    return cnt


@njit(parallel=True, cache=True)
def _stage_blocks(xc, W_enc, b_enc, lo, rb, n_threads, b_first, counts, st_idx, st_val):
    """Pass 1 over the row blocks ``b_first..`` of the grid: each row's
    candidate count to ``counts`` and its first ``K = st_idx.shape[1]``
    candidates to the staging area."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    K = st_idx.shape[1]
    nblk = (n + rb - 1) // rb - b_first
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        t0, t1 = _part_bounds(nblk, parts, p)
        Y = np.empty((rb, d_sae), np.float32)
        idx_ws = np.empty((rb, d_sae), np.int32)
        for b in range(t0 + b_first, t1 + b_first):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            blk = Y[:i1 - i0]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                row = i0 + r
                cnt = _compact_lo(blk, r, b_enc, lo, idx_ws)
                counts[row] = cnt
                for q in range(min(cnt, K)):
                    st_idx[row, q] = idx_ws[r, q]
                    st_val[row, q] = blk[r, q]


@njit(parallel=True, cache=True)
def _overflow_blocks(xc, W_enc, b_enc, lo, rb, n_threads, todo, counts, K, indptr, indices,
                     values):
    """Recompute the row blocks ``todo`` (same grid: bitwise the same
    products) and write the rows with more than ``K`` candidates in place."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    m = todo.shape[0]
    parts = max(1, min(n_threads, m))
    for p in prange(parts):
        t0, t1 = _part_bounds(m, parts, p)
        Y = np.empty((rb, d_sae), np.float32)
        idx_ws = np.empty((rb, d_sae), np.int32)
        for t in range(t0, t1):
            i0 = todo[t] * rb
            i1 = min(n, i0 + rb)
            blk = Y[:i1 - i0]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                row = i0 + r
                if counts[row] > K:
                    cnt = _compact_lo(blk, r, b_enc, lo, idx_ws)
                    o = indptr[row]
                    for q in range(cnt):
                        indices[o + q] = idx_ws[r, q]
                        values[o + q] = blk[r, q]


@njit(parallel=True, cache=True)
def _unstage(counts, st_idx, st_val, indptr, indices, values):
    K = st_idx.shape[1]
    for i in prange(counts.shape[0]):
        c = counts[i]
        if c <= K:
            o = indptr[i]
            for t in range(c):
                indices[o + t] = st_idx[i, t]
                values[o + t] = st_val[i, t]


@njit(cache=True)
def _finish(xc, W_enc, b_enc, lo, rb, n_threads, counts, st_idx, st_val):
    """The exact candidate CSR from the staging area (overflowing rows
    recomputed): ``(indptr, indices, values, max_row_count)``."""
    n = xc.shape[0]
    K = st_idx.shape[1]
    nblk = (n + rb - 1) // rb
    indptr = np.empty(n + 1, np.int64)
    indptr[0] = 0
    n_over = 0
    max_cnt = 0
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
        if counts[i] > K:
            n_over += 1
        max_cnt = max(max_cnt, counts[i])
    nnz = indptr[n]
    indices = np.empty(nnz, np.int32)
    values = np.empty(nnz, np.float32)
    _unstage(counts, st_idx, st_val, indptr, indices, values)
    if n_over > 0:
        mask = np.zeros(nblk, np.uint8)
        for i in range(n):
            if counts[i] > K:
                mask[i // rb] = 1
        _overflow_blocks(xc, W_enc, b_enc, lo, rb, n_threads, _todo_blocks(mask), counts, K,
                         indptr, indices, values)
    return indptr, indices, values, max_cnt


@njit(parallel=True, cache=True)
def _probe(xc, W_enc, b_enc, lo, rb, probe):
    """The first ``P = probe.shape[0]`` row blocks, one per thread:
    ``xc @ W_enc`` into ``probe[p]`` (no bias) and each block's count of
    candidates ``pre > lo`` (int64 ``[P]``)."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    P = probe.shape[0]
    cnt = np.zeros(P, np.int64)
    for p in prange(P):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        blk = probe[p, :i1 - i0]
        gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
        c = 0
        for r in range(i1 - i0):
            for j in range(d_sae):
                c += 1 if blk[r, j] + b_enc[j] > lo[j] else 0
        cnt[p] = c
    return cnt


@njit(parallel=True, cache=True)
def _stage_probe(probe, b_enc, lo, rb, counts, st_idx, st_val):
    """Pass 1 for the probed blocks (compacted in place in ``probe``)."""
    n = counts.shape[0]
    d_sae = probe.shape[2]
    K = st_idx.shape[1]
    for p in prange(probe.shape[0]):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        blk = probe[p, :i1 - i0]
        idx_ws = np.empty((i1 - i0, d_sae), np.int32)
        for r in range(i1 - i0):
            cnt = _compact_lo(blk, r, b_enc, lo, idx_ws)
            counts[i0 + r] = cnt
            for q in range(min(cnt, K)):
                st_idx[i0 + r, q] = idx_ws[r, q]
                st_val[i0 + r, q] = blk[r, q]


@njit(parallel=True, cache=True)
def _dense_pre(xc, W_enc, b_enc, rb, n_threads, probe, out):
    """All pre-activations ``xc @ W_enc + b_enc`` into ``out`` ``[N, d_sae]``:
    the probed blocks copied with the bias, the others by the same grid."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    P = probe.shape[0]
    for p in prange(P):
        i0 = p * rb
        i1 = min(n, i0 + rb)
        for r in range(i1 - i0):
            src = probe[p, r]
            dst = out[i0 + r]
            for j in range(d_sae):
                dst[j] = src[j] + b_enc[j]
    nblk = (n + rb - 1) // rb - P
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        for b in range(b0 + P, b1 + P):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            blk = out[i0:i1]
            gemm(xc[i0:i1], W_enc, blk, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                for j in range(d_sae):
                    blk[r, j] += b_enc[j]


@njit(cache=True)
def encode_adaptive(xc, W_enc, b_enc, lo, row_block, k_stage, n_threads, min_density,
                    probe_blocks):
    """The candidates ``pre > lo`` of ``pre = xc @ W_enc + b_enc``, dense or
    CSR as this batch's density calls for: ``(dense, pre, indptr, indices,
    values, max_row_count)`` with ``pre`` float32 ``[N, d_sae]`` (every
    pre-activation) when ``dense`` (CSR arrays empty), else the canonical
    CSR of the candidates with their ``pre`` values (``pre`` empty).

    The first ``probe_blocks`` row blocks (of ``row_block`` rows) are
    computed first; their candidate density (at least ``min_density`` ->
    dense) decides, and they are reused either way. The decision depends on
    the inputs only (never on the thread count or on earlier calls); the
    CSR rows stage ``k_stage`` entries (more: recomputed, see
    :func:`_finish`)."""
    n = xc.shape[0]
    d_sae = W_enc.shape[1]
    warm_gemm()
    rb = max(1, min(row_block, max(n, 1)))
    nblk = (n + rb - 1) // rb
    P = max(0, min(probe_blocks, nblk))
    probe = np.empty((P, rb, d_sae), np.float32)
    pcnt = _probe(xc, W_enc, b_enc, lo, rb, probe)
    rows = min(n, P * rb)
    if rows > 0 and pcnt.sum() >= min_density * rows * d_sae:
        pre = np.empty((n, d_sae), np.float32)
        _dense_pre(xc, W_enc, b_enc, rb, n_threads, probe, pre)
        return True, pre, np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), 0
    K = max(1, min(k_stage, d_sae))
    counts = np.zeros(n, np.int64)
    st_idx = np.empty((n, K), np.int32)
    st_val = np.empty((n, K), np.float32)
    _stage_probe(probe, b_enc, lo, rb, counts, st_idx, st_val)
    if nblk > P:
        _stage_blocks(xc, W_enc, b_enc, lo, rb, n_threads, P, counts, st_idx, st_val)
    indptr, indices, values, mx = _finish(xc, W_enc, b_enc, lo, rb, n_threads, counts, st_idx,
                                          st_val)
    return False, np.empty((0, 0), np.float32), indptr, indices, values, mx


# ---------------------------------------------------------------- sparse path
@njit(parallel=True, cache=True)
def split_candidates(indptr, indices, values, theta, hi):
    """From the candidate CSR (every entry has ``pre > lo``): the active
    CSR ``pre > theta`` (the codes: ``(ip_a, ix_a, v_a)``) and the window
    pattern ``pre < hi`` (``(ip_w, ix_w)``), both canonical."""
    n = indptr.shape[0] - 1
    ca = np.empty(n, np.int64)
    cw = np.empty(n, np.int64)
    for i in prange(n):
        a = 0
        w = 0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = values[p]
            a += 1 if v > theta[j] else 0
            w += 1 if v < hi[j] else 0
        ca[i] = a
        cw[i] = w
    ip_a, ix_a, v_a = csr_from_counts(ca)
    ip_w, ix_w, _ = csr_from_counts(cw)
    for i in prange(n):
        oa = ip_a[i]
        ow = ip_w[i]
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = values[p]
            if v > theta[j]:
                ix_a[oa] = j
                v_a[oa] = v
                oa += 1
            if v < hi[j]:
                ix_w[ow] = j
                ow += 1
    return ip_a, ix_a, v_a, ip_w, ix_w


@njit(parallel=True, cache=True)
def window_df(ip_w, ix_w, d_xhat, W_dec):
    """``d_f = d_xhat_i . W_dec[j]`` at each window entry (CSR order)."""
    n = ip_w.shape[0] - 1
    out = np.empty(ix_w.shape[0], np.float32)
    for i in prange(n):
        dx = d_xhat[i]
        for p in range(ip_w[i], ip_w[i + 1]):
            out[p] = B._dot(dx, W_dec[ix_w[p]])
    return out


@njit(cache=True)
def _theta_grad(wsum, wcnt, theta, inv_bw, l0s):
    """``g_log_threshold`` from the window sums of ``d_f`` (float32) and
    counts, in the reference's precisions: ``g_theta = -(theta * inv_bw) *
    wsum - l0s * count`` (``l0s = inv_bw * l0_coefficient / N`` rounded to
    float32; the count term in float64, as NumPy promotes it), times
    ``theta``, rounded to float32."""
    d_sae = theta.shape[0]
    out = np.empty(d_sae, np.float32)
    ie = np.float32(inv_bw)
    c2 = np.float64(np.float32(l0s))
    for j in range(d_sae):
        t1 = (-(theta[j] * ie)) * wsum[j]
        g = np.float64(t1) - c2 * wcnt[j]
        out[j] = np.float32(g * np.float64(theta[j]))
    return out


@njit(cache=True)
def threshold_grad(ix_w, dfw, theta, inv_bw, l0s):
    """``g_log_threshold`` float32 ``[d_sae]`` from the window entries'
    ``d_f`` (``dfw``, CSR order): per feature the float32 sum over its rows
    in increasing order (a serial scatter in CSR order), ``inv_bw = 1 /
    bandwidth``, ``l0s = inv_bw * l0_coefficient / N`` (the Step term's
    scale, as the reference rounds it)."""
    d_sae = theta.shape[0]
    wsum = np.zeros(d_sae, np.float32)
    wcnt = np.zeros(d_sae, np.int64)
    for p in range(ix_w.shape[0]):
        j = ix_w[p]
        wsum[j] += dfw[p]
        wcnt[j] += 1
    return _theta_grad(wsum, wcnt, theta, inv_bw, l0s)


@njit(cache=True, error_model="numpy")
def _threshold_adam(log_threshold, g, m, v, adam_c):
    """Adam on ``log_threshold`` (same step constants); returns the
    non-finite count of the updated thresholds."""
    cs = const_tuple(adam_c)
    for j in range(log_threshold.shape[0]):
        log_threshold[j], m[j], v[j] = adam_elem(log_threshold[j], g[j], m[j], v[j], cs)
    return nonfinite_in(log_threshold)


@njit(cache=True)
def _sparse_front(x, indptr, indices, values, theta, hi, W_dec, b_dec, inv_bw, l0s):
    """What both sparse entry points share: split, row pass (the TopK
    step's), window ``d_f`` and ``g_log_threshold``."""
    ip_a, ix_a, v_a, ip_w, ix_w = split_candidates(indptr, indices, values, theta, hi)
    d_xhat, _, d_pre, _, sq, _, sum_dx, sum_x, sum_xx = B.topk_row_pass(
        ip_a, ix_a, v_a, np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), W_dec, b_dec,
        x, 0.0)
    dfw = window_df(ip_w, ix_w, d_xhat, W_dec)
    g_lt = threshold_grad(ix_w, dfw, theta, inv_bw, l0s)
    return ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx, g_lt


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def sparse_step_core(x, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec, b_dec,
                     mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c,
                     inv_bw, l0s, tile, fire_counts, center):
    """A JumpReLU step after the encoder on its candidate CSR, in place:
    the four parameters (Adam fused into the TopK weight pass, decoder rows
    renormalized), ``b_dec``, and ``log_threshold`` with its moments
    ``tm``/``tv``. Returns ``(sum of squared errors, nnz, variance of the
    target x, bad, d_xhat)``, ``bad`` nonzero exactly when an updated
    parameter or threshold is inf or NaN."""
    n = x.shape[0]
    d_sae, d_out = W_dec.shape
    ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx, g_lt = _sparse_front(
        x, indptr, indices, values, theta, hi, W_dec, b_dec, inv_bw, l0s)
    colptr, rows, perm = B.csr_to_csc(ip_a, ix_a, d_sae)
    _, part, bad = B.topk_feature_adam(colptr, rows, perm, v_a, d_pre, d_xhat,
                                       np.empty((0, d_out), np.float32), xc, W_dec, W_enc,
                                       b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c, tile)
    bad += S._b_dec_adam(b_dec, mbd, vbd, sum_dx, part, center, adam_c)
    bad += _threshold_adam(log_threshold, g_lt, tm, tv, adam_c)
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += colptr[j + 1] - colptr[j]
    return sq, ip_a[n], S.shifted_variance(sum_x, sum_xx, n), bad, d_xhat


@njit(cache=True)
def sparse_gradients(x, xc, indptr, indices, values, theta, hi, W_enc, W_dec, b_dec, inv_bw,
                     l0s, center):
    """The gradients at the candidates: ``(sum of squared errors, nnz,
    g_W_enc, g_b_enc, g_W_dec (projected), g_b_dec, g_log_threshold,
    d_xhat)``."""
    d_sae = W_dec.shape[0]
    ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, _, _, g_lt = _sparse_front(
        x, indptr, indices, values, theta, hi, W_dec, b_dec, inv_bw, l0s)
    colptr, rows, perm = B.csr_to_csc(ip_a, ix_a, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(sum_dx, W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    B.feature_grads(colptr, rows, perm, v_a, d_pre, d_xhat, xc, W_dec, np.empty(0, np.float32),
                    0.0, True, g_W_enc, g_W_dec)
    return sq, ip_a[x.shape[0]], g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_lt, d_xhat


# ---------------------------------------------------------------- dense path
@njit(parallel=True, cache=True)
def _dense_row_pass(P, x, W_dec, b_dec, theta, lo, hi, rb, n_threads):
    """Per fixed block of ``rb`` rows of ``P`` (all pre-activations; on
    return ``P`` holds the codes ``f = pre [pre > theta]``): ``x_hat = f
    W_dec + b_dec``, ``d_xhat = 2 (x_hat - x) / N``, the squared error per
    row, ``d_f = d_xhat W_dec^T`` into ``D`` and then ``d_pre = d_f [pre >
    theta]`` in place, and per-block column partials (float32 within a
    block): ``d_pre`` sums, active counts, window ``d_f`` sums and window
    counts. Returns ``(d_xhat, D, row_sq, part_dpre, part_cnt, part_w,
    part_wc)``."""
    n, d_sae = P.shape
    d_in = W_dec.shape[1]
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    d_xhat = np.empty((n, d_in), np.float32)
    D = np.empty((n, d_sae), np.float32)
    row_sq = np.empty(n, np.float64)
    part_dpre = np.zeros((nblk, d_sae), np.float32)
    part_cnt = np.zeros((nblk, d_sae), np.int32)
    part_w = np.zeros((nblk, d_sae), np.float32)
    part_wc = np.zeros((nblk, d_sae), np.int32)
    scale = np.float32(2.0 / n)
    zero = np.float32(0.0)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        F = np.empty((rb, d_sae), np.float32)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            m = i1 - i0
            fb = F[:m]
            for r in range(m):
                pr = P[i0 + r]
                fr = fb[r]
                for j in range(d_sae):
                    v = pr[j]
                    fr[j] = v if v > theta[j] else zero
            dx = d_xhat[i0:i1]
            gemm(fb, W_dec, dx, 1.0, 0.0, False, False)
            for r in range(m):
                i = i0 + r
                s = 0.0
                for k in range(d_in):
                    diff = (dx[r, k] + b_dec[k]) - x[i, k]
                    s += np.float64(diff) * diff
                    dx[r, k] = scale * diff
                row_sq[i] = s
            dp = D[i0:i1]
            gemm(dx, W_dec, dp, 1.0, 0.0, False, True)
            pd, pc, pw, pwc = part_dpre[b], part_cnt[b], part_w[b], part_wc[b]
            for r in range(m):
                pr = P[i0 + r]
                fr = fb[r]
                dr = dp[r]
                # branch-free, so the loop vectorizes
                for j in range(d_sae):
                    v = pr[j]
                    g = dr[j]
                    on = v > theta[j]
                    inw = (v > lo[j]) & (v < hi[j])
                    pw[j] += g if inw else zero
                    pwc[j] += 1 if inw else 0
                    gp = g if on else zero
                    dr[j] = gp
                    pd[j] += gp
                    pc[j] += 1 if on else 0
                    pr[j] = fr[j]
    return d_xhat, D, row_sq, part_dpre, part_cnt, part_w, part_wc


@njit(parallel=True, cache=True)
def _dense_totals(part_dpre, part_cnt, part_w, part_wc):
    """Block partials summed over blocks in order: ``(g_b_enc float32,
    counts int64, window sums float32, window counts int64)``."""
    nblk, d_sae = part_dpre.shape
    g_b_enc = np.empty(d_sae, np.float32)
    cnt = np.empty(d_sae, np.int64)
    wsum = np.empty(d_sae, np.float32)
    wcnt = np.empty(d_sae, np.int64)
    for j in prange(d_sae):
        a = 0.0
        w = 0.0
        c = 0
        wc = 0
        for b in range(nblk):
            a += part_dpre[b, j]
            c += part_cnt[b, j]
            w += part_w[b, j]
            wc += part_wc[b, j]
        g_b_enc[j] = a
        cnt[j] = c
        wsum[j] = w
        wcnt[j] = wc
    return g_b_enc, cnt, wsum, wcnt


@njit(cache=True)
def _dense_front(x, P, W_dec, b_dec, theta, lo, hi, inv_bw, l0s, n_threads):
    n = x.shape[0]
    d_xhat, D, row_sq, pd, pc, pw, pwc = _dense_row_pass(P, x, W_dec, b_dec, theta, lo, hi,
                                                         DN.row_block(n), n_threads)
    g_b_enc, cnt, wsum, wcnt = _dense_totals(pd, pc, pw, pwc)
    g_lt = _theta_grad(wsum, wcnt, theta, inv_bw, l0s)
    return d_xhat, D, row_sq.sum(), g_b_enc, cnt, g_lt


@njit(cache=True, error_model="numpy")
def dense_step_core(x, xc, P, theta, lo, hi, W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe,
                    mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c, inv_bw, l0s,
                    fire_counts, n_threads, center):
    """:func:`sparse_step_core` on dense pre-activations ``P`` (overwritten
    with the codes): BLAS products, the ReLU dense path's feature pass with
    Adam fused (unit-norm). Returns ``(sum of squared errors, nnz, bad,
    d_xhat)``."""
    d_sae = W_dec.shape[0]
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt = _dense_front(x, P, W_dec, b_dec, theta, lo, hi,
                                                     inv_bw, l0s, n_threads)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    bad = DN._feature_adam(P, D, d_xhat, xc, W_dec, np.empty(0, np.float32), np.float32(0.0),
                           True, np.zeros(d_sae, np.float64), g_b_enc, W_enc, b_enc, mWe, vWe,
                           mbe, vbe, mWd, vWd, adam_c, NUMBA_DENSE_FEATURE_BLOCK)
    cs = const_tuple(adam_c)
    for k in range(b_dec.shape[0]):
        b_dec[k], mbd[k], vbd[k] = adam_elem(b_dec[k], g_b_dec[k], mbd[k], vbd[k], cs)
    bad += nonfinite_in(b_dec)
    bad += _threshold_adam(log_threshold, g_lt, tm, tv, adam_c)
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += cnt[j]
    return sq, cnt.sum(), bad, d_xhat


@njit(cache=True)
def dense_gradients(x, xc, P, theta, lo, hi, W_enc, W_dec, b_dec, inv_bw, l0s, n_threads,
                    center):
    """:func:`sparse_gradients` on dense pre-activations ``P`` (overwritten)."""
    d_sae = W_dec.shape[0]
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt = _dense_front(x, P, W_dec, b_dec, theta, lo, hi,
                                                     inv_bw, l0s, n_threads)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    DN._feature_grads(P, D, d_xhat, xc, W_dec, np.empty(0, np.float32), np.float32(0.0), True,
                      np.zeros(d_sae, np.float64), NUMBA_DENSE_FEATURE_BLOCK, g_W_enc, g_W_dec)
    return sq, cnt.sum(), g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_lt, d_xhat
