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

Sparsity modes (:class:`fastsae.JumpReLUSparsity`, issue 15): the kernels
above are the default (``"step"``, no pre-activation loss), unchanged; the
``*_modes`` cores (:func:`sparse_step_core_modes`,
:func:`sparse_gradients_modes`, :func:`dense_step_core_modes`,
:func:`dense_gradients_modes`) take a mode code (:data:`STEP`, :data:`TANH`,
:data:`QUADRATIC`) and the pre-activation loss's dead columns, and reuse the
same row and weight passes with Adam fused:

* ``"tanh"``: ``t = (c s / N)(1 - tanh(s f)^2)`` (evaluated as ``4 e / (1 +
  e)^2``, ``e = exp(-2 s f)``: accurate where ``tanh`` rounds to 1) is added
  to ``d_pre`` at the active entries and to ``d_f`` at the window's (the
  sparse path reads the window's pre-activations, which
  :func:`split_candidates` keeps); no Step term. Sparse: only the active and
  window entries are touched.
* ``"quadratic"``: each row's active count (the active CSR's row lengths;
  counted while making the dense path's codes) gives ``q_i = 4 c (L0_i - T)
  / (N T)``; the Step term is ``-(1 / eps) sum_{window} q_i`` (float64 per
  feature). Sparse: a per-row scalar, nothing dense.
* pre-activation loss (``p > 0`` and some dead feature): dense over the
  dead columns only. Sparse path: :func:`dead_pass` makes their
  pre-activations with one sgemm per task (``xc @ W_enc[:, dead]``), the
  ``below`` set (``pre < theta``, the encoder's active entries excluded),
  and their ``W_enc`` gradient with a second sgemm (``d_pre[:, dead].T @
  xc``), handed to the fused weight pass
  (:func:`.backward.prefix_feature_adam`'s ``ext_*`` arguments) with the
  ``b_enc`` gradient. Dense path: the row pass reads each row's dead
  columns before the codes overwrite them and puts ``-p / N`` into the
  dense ``d_pre``, so the feature pass's GEMMs carry it.

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
           "sparse_step_core", "sparse_gradients", "dense_step_core", "dense_gradients",
           "STEP", "TANH", "QUADRATIC", "dead_pass", "sparse_step_core_modes",
           "sparse_gradients_modes", "dense_step_core_modes", "dense_gradients_modes"]

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
    CSR ``pre < hi`` (``(ip_w, ix_w, v_w)``, ``v_w`` the pre-activations,
    which the non-default sparsity modes read), both canonical."""
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
    ip_w, ix_w, v_w = csr_from_counts(cw)
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
                v_w[ow] = v
                ow += 1
    return ip_a, ix_a, v_a, ip_w, ix_w, v_w


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
    ip_a, ix_a, v_a, ip_w, ix_w, _ = split_candidates(indptr, indices, values, theta, hi)
    d_xhat, _, d_pre, _, sq, _, sum_dx, sum_x, sum_xx = B.topk_row_pass(
        ip_a, ix_a, v_a, np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), W_dec, b_dec,
        x, 0.0)
    dfw = window_df(ip_w, ix_w, d_xhat, W_dec)
    g_lt = threshold_grad(ix_w, dfw, theta, inv_bw, l0s)
    return ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx, g_lt


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def sparse_step_core(x, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec, b_dec,
                     mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c,
                     inv_bw, l0s, tile, fire_counts, center, Wp, WT):
    """A JumpReLU step after the encoder on its candidate CSR, in place:
    the four parameters (Adam fused into the TopK weight pass, decoder rows
    renormalized; ``Wp``, ``WT`` the bf16 copy of ``W_enc`` it rewrites,
    :data:`.backward.NO_COPY`: none), ``b_dec``, and ``log_threshold`` with its moments
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
                                       b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c, tile, Wp,
                                       WT)
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


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def _dense_step_tail(xc, P, D, d_xhat, g_b_enc, cnt, g_lt, W_enc, b_enc, W_dec, b_dec, mWe,
                     vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c,
                     fire_counts, center):
    """A dense step after its row pass (codes ``P``, ``d_pre`` ``D``, the
    bias and threshold gradients): ``g_b_dec``, the feature pass with Adam
    fused, ``b_dec``'s and the thresholds' Adam, the fire counts. Returns
    ``bad``."""
    d_sae = W_dec.shape[0]
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
    return bad


@njit(cache=True)
def _dense_grads_tail(xc, P, D, d_xhat, g_b_enc, W_enc, W_dec, center):
    """The weight gradients after a dense row pass: ``(g_W_enc, g_W_dec,
    g_b_dec)``."""
    d_sae = W_dec.shape[0]
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    DN._feature_grads(P, D, d_xhat, xc, W_dec, np.empty(0, np.float32), np.float32(0.0), True,
                      np.zeros(d_sae, np.float64), NUMBA_DENSE_FEATURE_BLOCK, g_W_enc, g_W_dec)
    return g_W_enc, g_W_dec, g_b_dec


@njit(cache=True, error_model="numpy")
def dense_step_core(x, xc, P, theta, lo, hi, W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe,
                    mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c, inv_bw, l0s,
                    fire_counts, n_threads, center):
    """:func:`sparse_step_core` on dense pre-activations ``P`` (overwritten
    with the codes): BLAS products, the ReLU dense path's feature pass with
    Adam fused (unit-norm). Returns ``(sum of squared errors, nnz, bad,
    d_xhat)``."""
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt = _dense_front(x, P, W_dec, b_dec, theta, lo, hi,
                                                     inv_bw, l0s, n_threads)
    bad = _dense_step_tail(xc, P, D, d_xhat, g_b_enc, cnt, g_lt, W_enc, b_enc, W_dec, b_dec,
                           mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv,
                           adam_c, fire_counts, center)
    return sq, cnt.sum(), bad, d_xhat


@njit(cache=True)
def dense_gradients(x, xc, P, theta, lo, hi, W_enc, W_dec, b_dec, inv_bw, l0s, n_threads,
                    center):
    """:func:`sparse_gradients` on dense pre-activations ``P`` (overwritten)."""
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt = _dense_front(x, P, W_dec, b_dec, theta, lo, hi,
                                                     inv_bw, l0s, n_threads)
    g_W_enc, g_W_dec, g_b_dec = _dense_grads_tail(xc, P, D, d_xhat, g_b_enc, W_enc, W_dec,
                                                  center)
    return sq, cnt.sum(), g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_lt, d_xhat


# ---------------------------------------------------------------- sparsity modes
# The non-default penalties of JumpReLUSparsity (see the reference's section
# comment): the kernels above stay the default path, bit for bit; these add
# to them. Mode codes of the ``mode`` argument:
STEP, TANH, QUADRATIC = 0, 1, 2
#: The pre-activation loss's dead-column pass (sparse path): at most this
#: many dead columns per parallel task, rows in blocks of ``_DEAD_ROWS``.
_DEAD_COLS_MAX = 128
_DEAD_ROWS = 1024


@njit(inline="always")
def _tanh_sech2(z):
    """``(tanh(z), 1 - tanh(z)**2)`` in float32, both to a few ulps (the
    second as ``4 e / (1 + e)**2``, ``e = exp(-2 |z|)``: no cancellation
    where ``tanh(z)`` rounds to 1)."""
    e = np.exp(np.float32(-2.0) * abs(z))
    d = np.float32(1.0) + e
    th = (np.float32(1.0) - e) / d
    if z < 0:
        th = -th
    return th, np.float32(4.0) * e / (d * d)


@njit(parallel=True, cache=True)
def _tanh_terms(ip_a, v_a, d_pre, ip_w, ix_w, v_w, dfw, theta, tcs, s):
    """The ``"tanh"`` mode on the sparse path, in place: ``t = tcs (1 -
    tanh(s f)**2)`` added to ``d_pre`` at the active entries and to the
    window entries' ``d_f`` (``dfw``; ``t = tcs`` where inactive). Returns
    the sum of ``tanh(s f)`` over the active entries (float64, per row then
    over rows in order)."""
    n = ip_a.shape[0] - 1
    rows = np.empty(n, np.float64)
    c = np.float32(tcs)
    sc = np.float32(s)
    for i in prange(n):
        acc = 0.0
        for p in range(ip_a[i], ip_a[i + 1]):
            th, se = _tanh_sech2(sc * v_a[p])
            d_pre[p] += c * se
            acc += th
        rows[i] = acc
        for p in range(ip_w[i], ip_w[i + 1]):
            v = v_w[p]
            if v > theta[ix_w[p]]:
                _, se = _tanh_sech2(sc * v)
                dfw[p] += c * se
            else:
                dfw[p] += c
    tot = 0.0
    for i in range(n):
        tot += rows[i]
    return tot


@njit(cache=True)
def _window_sums(ip_w, ix_w, dfw, q, d_sae):
    """Per feature, over its window entries in row order: the float32 sum
    of ``d_f``, the count and (``q`` non-empty, ``"quadratic"``) the
    float64 sum of the rows' ``q_i`` (else an empty array)."""
    n = ip_w.shape[0] - 1
    hq = q.shape[0] > 0
    wsum = np.zeros(d_sae, np.float32)
    wcnt = np.zeros(d_sae, np.int64)
    qsum = np.zeros(d_sae if hq else 0, np.float64)
    for i in range(n):
        for p in range(ip_w[i], ip_w[i + 1]):
            j = ix_w[p]
            wsum[j] += dfw[p]
            wcnt[j] += 1
            if hq:
                qsum[j] += q[i]
    return wsum, wcnt, qsum


@njit(cache=True)
def _theta_grad_modes(wsum, wcnt, qsum, gx, theta, inv_bw, l0s, mode):
    """:func:`_theta_grad` for every mode: the reconstruction part ``-(theta
    * inv_bw) * wsum`` (float32), then in float64 the Step term (``"step"``:
    ``- l0s * count`` as there; ``"tanh"``: none, its terms are in ``wsum``;
    ``"quadratic"``: ``-(inv_bw * qsum)`` rounded to float32) and ``gx``
    (the pre-activation loss's ``(p / N) * count_below``, or empty), times
    ``theta``, rounded to float32."""
    d_sae = theta.shape[0]
    out = np.empty(d_sae, np.float32)
    ie = np.float32(inv_bw)
    c2 = np.float64(np.float32(l0s))
    hx = gx.shape[0] > 0
    for j in range(d_sae):
        t1 = (-(theta[j] * ie)) * wsum[j]
        g = np.float64(t1)
        if mode == STEP:
            g = g - c2 * wcnt[j]
        elif mode == QUADRATIC:
            g = g + np.float64(np.float32(-(inv_bw * qsum[j])))
        if hx:
            g = g + gx[j]
        out[j] = np.float32(g * np.float64(theta[j]))
    return out


@njit(cache=True)
def _dead_col_block(nd):
    """Dead columns per task of :func:`dead_pass` (shape-only: a multiple
    of 16 from 16 to ``_DEAD_COLS_MAX``, about 8 tasks)."""
    cb = ((nd + 7) // 8 + 15) // 16 * 16
    return max(16, min(_DEAD_COLS_MAX, cb))


@njit(parallel=True, cache=True)
def dead_pass(xc, W_enc, b_enc, theta, dead, ad_ip, ad_sl, pn):
    """The pre-activation loss on the sparse path, dense over the dead
    columns ``dead`` (int64 ``[n_dead]``) only: per fixed task of
    :func:`_dead_col_block` dead columns (``W_enc``'s gathered into a panel)
    and blocks of ``_DEAD_ROWS`` rows, ``pre = xc @ W_enc[:, dead] +
    b_enc[dead]`` (one sgemm), ``below = pre < theta`` except at the
    active entries (the encoder's decision: ``ad_ip``/``ad_sl``, per row the
    dead slots of its active entries), ``d_pre = -pn`` there, and ``G +=
    d_pre.T @ xc`` (one sgemm, row blocks in order). Returns ``(G float32
    [n_dead, d_in], below counts int64 [n_dead], sum of theta - pre over
    the below entries float64)``."""
    n, d_in = xc.shape
    nd = dead.shape[0]
    cb = _dead_col_block(nd)
    rb = max(1, min(_DEAD_ROWS, n))
    ntask = (nd + cb - 1) // cb
    G = np.zeros((nd, d_in), np.float32)
    cnt = np.zeros(nd, np.int64)
    aux = np.zeros(ntask, np.float64)
    npn = np.float32(-pn)
    inf = np.float32(np.inf)
    zero = np.float32(0.0)
    for t in prange(ntask):
        c0 = t * cb
        c1 = min(nd, c0 + cb)
        m = c1 - c0
        Wb = np.empty((d_in, m), np.float32)
        for k in range(d_in):
            for c in range(m):
                Wb[k, c] = W_enc[k, dead[c0 + c]]
        th = np.empty(m, np.float32)
        bb = np.empty(m, np.float32)
        for c in range(m):
            th[c] = theta[dead[c0 + c]]
            bb[c] = b_enc[dead[c0 + c]]
        Pb = np.empty((rb, m), np.float32)
        a = 0.0
        for r0 in range(0, n, rb):
            r1 = min(n, r0 + rb)
            blk = Pb[:r1 - r0]
            gemm(xc[r0:r1], Wb, blk, 1.0, 0.0, False, False)
            for r in range(r1 - r0):
                i = r0 + r
                row = blk[r]
                for q in range(ad_ip[i], ad_ip[i + 1]):
                    sl = ad_sl[q]
                    if sl >= c0 and sl < c1:
                        row[sl - c0] = inf  # active: never below
                for c in range(m):
                    v = row[c] + bb[c]
                    if v < th[c]:
                        row[c] = npn
                        cnt[c0 + c] += 1
                        a += np.float64(th[c]) - np.float64(v)
                    else:
                        row[c] = zero
            gemm(blk, xc[r0:r1], G[c0:c1], 1.0, 0.0 if r0 == 0 else 1.0, True, False)
        aux[t] = a
    tot = 0.0
    for t in range(ntask):
        tot += aux[t]
    return G, cnt, tot


@njit(cache=True)
def _pre_act_sparse(xc, W_enc, b_enc, theta, dead, ip_a, ix_a, pn):
    """The pre-activation loss's terms on the sparse path (:func:`dead_pass`):
    ``(slot int64 [d_sae] (each feature's dead slot, -1 if alive), G
    float32 [n_dead, d_in] (its W_enc gradient, transposed), gb float32
    [n_dead] (its b_enc gradient), gx float64 [d_sae] (its theta gradient),
    aux sum)``; empty arrays and 0 without dead features."""
    d_sae = W_enc.shape[1]
    d_in = xc.shape[1]
    nd = dead.shape[0]
    if nd == 0:
        return (np.empty(0, np.int64), np.empty((0, d_in), np.float32),
                np.empty(0, np.float32), np.empty(0, np.float64), 0.0)
    warm_gemm()
    n = ip_a.shape[0] - 1
    slot = np.full(d_sae, -1, np.int64)
    for c in range(nd):
        slot[dead[c]] = c
    ad_ip = np.zeros(n + 1, np.int64)
    for i in range(n):
        k = 0
        for p in range(ip_a[i], ip_a[i + 1]):
            k += 1 if slot[ix_a[p]] >= 0 else 0
        ad_ip[i + 1] = ad_ip[i] + k
    ad_sl = np.empty(ad_ip[n], np.int64)
    for i in range(n):
        o = ad_ip[i]
        for p in range(ip_a[i], ip_a[i + 1]):
            sl = slot[ix_a[p]]
            if sl >= 0:
                ad_sl[o] = sl
                o += 1
    G, cnt, aux = dead_pass(xc, W_enc, b_enc, theta, dead, ad_ip, ad_sl, pn)
    gb = np.empty(nd, np.float32)
    gx = np.zeros(d_sae, np.float64)
    for c in range(nd):
        gb[c] = np.float32(-pn * cnt[c])
        gx[dead[c]] = pn * cnt[c]
    return slot, G, gb, gx, aux


@njit(cache=True)
def _sparse_front_modes(x, indptr, indices, values, theta, hi, W_dec, b_dec, mode, tcs, s, qc,
                        tl0):
    """:func:`_sparse_front` in any mode, up to the threshold gradient's
    pieces: ``(ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx,
    wsum, wcnt, qsum, l0sum)``; ``"tanh"`` adds its ``t`` to ``d_pre`` and
    the window's ``d_f`` (:func:`_tanh_terms`), ``"quadratic"`` makes ``q_i
    = qc (L0_i - T)`` from the active CSR's row lengths. ``l0sum``: the
    sparsity sum before its ``c / N`` (``"tanh"``: of ``tanh(s f)``;
    ``"quadratic"``: of ``2 / T (L0_i - T)**2``; ``"step"``: 0, the face
    uses nnz)."""
    ip_a, ix_a, v_a, ip_w, ix_w, v_w = split_candidates(indptr, indices, values, theta, hi)
    d_xhat, _, d_pre, _, sq, _, sum_dx, sum_x, sum_xx = B.topk_row_pass(
        ip_a, ix_a, v_a, np.empty(0, np.int64), np.empty(0, np.int32),
        np.empty(0, np.float32), W_dec, b_dec, x, 0.0)
    dfw = window_df(ip_w, ix_w, d_xhat, W_dec)
    n = ip_a.shape[0] - 1
    l0sum = 0.0
    q = np.empty(0, np.float64)
    if mode == TANH:
        l0sum = _tanh_terms(ip_a, v_a, d_pre, ip_w, ix_w, v_w, dfw, theta, tcs, s)
    elif mode == QUADRATIC:
        q = np.empty(n, np.float64)
        for i in range(n):
            err = np.float64(ip_a[i + 1] - ip_a[i]) - tl0
            q[i] = qc * err
            l0sum += 2.0 / tl0 * err * err
    wsum, wcnt, qsum = _window_sums(ip_w, ix_w, dfw, q, W_dec.shape[0])
    return ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx, wsum, wcnt, qsum, l0sum


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def sparse_step_core_modes(x, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec,
                           b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm,
                           tv, adam_c, inv_bw, l0s, tile, fire_counts, center, mode, tcs, s,
                           qc, tl0, dead, pn):
    """:func:`sparse_step_core` in any sparsity mode, with the
    pre-activation loss over the ``dead`` columns (int64, may be empty;
    ``pn = p / N``): the same fused weight pass
    (:func:`.backward.prefix_feature_adam`), handed the dead columns'
    ``W_enc`` and ``b_enc`` gradients (:func:`dead_pass`, made before any
    weight changes) to add. ``tcs = c s / N`` and ``s`` (``"tanh"``), ``qc
    = 4 c / (N T)`` and ``tl0 = T`` (``"quadratic"``). Returns ``(sum of
    squared errors, nnz, variance of the target, bad, d_xhat, l0sum, aux
    sum)`` (see :func:`_sparse_front_modes`, :func:`dead_pass`)."""
    n = x.shape[0]
    d_sae, d_out = W_dec.shape
    (ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, sum_x, sum_xx, wsum, wcnt, qsum,
     l0sum) = _sparse_front_modes(x, indptr, indices, values, theta, hi, W_dec, b_dec, mode,
                                  tcs, s, qc, tl0)
    slot, G, gb, gx, aux = _pre_act_sparse(xc, W_enc, b_enc, theta, dead, ip_a, ix_a, pn)
    g_lt = _theta_grad_modes(wsum, wcnt, qsum, gx, theta, inv_bw, l0s, mode)
    colptr, rows, perm = B.csr_to_csc(ip_a, ix_a, d_sae)
    _, part, bad = B.prefix_feature_adam(colptr, rows, perm, v_a, d_pre,
                                         d_xhat.reshape((1, n, d_out)),
                                         np.zeros(d_sae, np.int32),
                                         np.empty((0, d_out), np.float32), xc, W_dec, W_enc,
                                         b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c, tile,
                                         slot, G, gb, np.empty(0, np.uint16),
                                         np.empty((0, 0), np.float32))
    bad += S._b_dec_adam(b_dec, mbd, vbd, sum_dx, part, center, adam_c)
    bad += _threshold_adam(log_threshold, g_lt, tm, tv, adam_c)
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += colptr[j + 1] - colptr[j]
    return sq, ip_a[n], S.shifted_variance(sum_x, sum_xx, n), bad, d_xhat, l0sum, aux


@njit(cache=True)
def sparse_gradients_modes(x, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec,
                           b_dec, inv_bw, l0s, center, mode, tcs, s, qc, tl0, dead, pn):
    """:func:`sparse_gradients` in any mode (arguments as
    :func:`sparse_step_core_modes`): ``(sum of squared errors, nnz,
    g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_log_threshold, d_xhat, l0sum, aux
    sum)``."""
    d_sae = W_dec.shape[0]
    d_in = xc.shape[1]
    (ip_a, ix_a, v_a, d_xhat, d_pre, sq, sum_dx, _, _, wsum, wcnt, qsum,
     l0sum) = _sparse_front_modes(x, indptr, indices, values, theta, hi, W_dec, b_dec, mode,
                                  tcs, s, qc, tl0)
    _, G, gb, gx, aux = _pre_act_sparse(xc, W_enc, b_enc, theta, dead, ip_a, ix_a, pn)
    g_lt = _theta_grad_modes(wsum, wcnt, qsum, gx, theta, inv_bw, l0s, mode)
    colptr, rows, perm = B.csr_to_csc(ip_a, ix_a, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    for c in range(gb.shape[0]):
        g_b_enc[dead[c]] += gb[c]
    g_b_dec = B.b_dec_grad(sum_dx, W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    B.feature_grads(colptr, rows, perm, v_a, d_pre, d_xhat, xc, W_dec, np.empty(0, np.float32),
                    0.0, True, g_W_enc, g_W_dec)
    for k in range(d_in):
        for c in range(gb.shape[0]):
            g_W_enc[k, dead[c]] += G[c, k]
    return (sq, ip_a[x.shape[0]], g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_lt, d_xhat, l0sum,
            aux)


@njit(parallel=True, cache=True)
def _dense_row_pass_modes(P, x, W_dec, b_dec, theta, lo, hi, rb, n_threads, mode, tcs, s, qc,
                          tl0, dead, pn):
    """:func:`_dense_row_pass` in any mode: ``"tanh"`` adds ``t`` to ``d_f``
    before its window sums and ``d_pre``; ``"quadratic"`` counts each row's
    active entries as it makes the codes and adds its ``q_i`` to per-block
    float64 window partials; the pre-activation loss reads the dead
    columns of each row (``dead``, a loop over them only) before the codes
    overwrite it and sets ``d_pre = -pn`` where ``pre < theta``. Returns
    ``(d_xhat, D, row_sq, part_dpre, part_cnt, part_w, part_wc, part_q
    float64 [nblk, d_sae or 0], part_bc int64 [nblk, n_dead], row_l0 (the
    sparsity sum per row, see :func:`_sparse_front_modes`), row_aux)``."""
    n, d_sae = P.shape
    d_in = W_dec.shape[1]
    nd = dead.shape[0]
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    hq = mode == QUADRATIC
    ht = mode == TANH
    d_xhat = np.empty((n, d_in), np.float32)
    D = np.empty((n, d_sae), np.float32)
    row_sq = np.empty(n, np.float64)
    row_l0 = np.zeros(n, np.float64)
    row_aux = np.zeros(n, np.float64)
    part_dpre = np.zeros((nblk, d_sae), np.float32)
    part_cnt = np.zeros((nblk, d_sae), np.int32)
    part_w = np.zeros((nblk, d_sae), np.float32)
    part_wc = np.zeros((nblk, d_sae), np.int32)
    part_q = np.zeros((nblk, d_sae if hq else 0), np.float64)
    part_bc = np.zeros((nblk, nd), np.int64)
    scale = np.float32(2.0 / n)
    zero = np.float32(0.0)
    tc = np.float32(tcs)
    sc = np.float32(s)
    npn = np.float32(-pn)
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        F = np.empty((rb, d_sae), np.float32)
        rc = np.empty(rb, np.int64)
        bel = np.zeros(nd, np.uint8)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            m = i1 - i0
            fb = F[:m]
            for r in range(m):
                pr = P[i0 + r]
                fr = fb[r]
                c = 0
                for j in range(d_sae):
                    v = pr[j]
                    on = v > theta[j]
                    fr[j] = v if on else zero
                    c += 1 if on else 0
                rc[r] = c
            dx = d_xhat[i0:i1]
            gemm(fb, W_dec, dx, 1.0, 0.0, False, False)
            for r in range(m):
                i = i0 + r
                sq = 0.0
                for k in range(d_in):
                    diff = (dx[r, k] + b_dec[k]) - x[i, k]
                    sq += np.float64(diff) * diff
                    dx[r, k] = scale * diff
                row_sq[i] = sq
            dp = D[i0:i1]
            gemm(dx, W_dec, dp, 1.0, 0.0, False, True)
            pd, pc, pw, pwc = part_dpre[b], part_cnt[b], part_w[b], part_wc[b]
            pq, pbc = part_q[b], part_bc[b]
            for r in range(m):
                i = i0 + r
                pr = P[i]
                fr = fb[r]
                dr = dp[r]
                a = 0.0
                for c in range(nd):  # before the codes overwrite pre
                    j = dead[c]
                    v = pr[j]
                    if v < theta[j]:
                        bel[c] = 1
                        pbc[c] += 1
                        a += np.float64(theta[j]) - np.float64(v)
                    else:
                        bel[c] = 0
                row_aux[i] = a
                qi = 0.0
                if hq:
                    err = np.float64(rc[r]) - tl0
                    qi = qc * err
                    row_l0[i] = 2.0 / tl0 * err * err
                ts = 0.0
                for j in range(d_sae):
                    v = pr[j]
                    g = dr[j]
                    on = v > theta[j]
                    if ht:
                        t = tc
                        if on:
                            th, se = _tanh_sech2(sc * v)
                            t = tc * se
                            ts += th
                        g = g + t
                    if (v > lo[j]) & (v < hi[j]):
                        pw[j] += g
                        pwc[j] += 1
                        if hq:
                            pq[j] += qi
                    if on:
                        dr[j] = g
                        pd[j] += g
                        pc[j] += 1
                    else:
                        dr[j] = zero
                    pr[j] = fr[j]
                if ht:
                    row_l0[i] = ts
                for c in range(nd):
                    if bel[c]:
                        j = dead[c]
                        dr[j] = npn
                        pd[j] += npn
    return (d_xhat, D, row_sq, part_dpre, part_cnt, part_w, part_wc, part_q, part_bc, row_l0,
            row_aux)


@njit(cache=True)
def _dense_front_modes(x, P, W_dec, b_dec, theta, lo, hi, inv_bw, l0s, n_threads, mode, tcs,
                       s, qc, tl0, dead, pn):
    """:func:`_dense_front` in any mode: ``(d_xhat, D, sq, g_b_enc, cnt,
    g_lt, l0sum, aux sum)``."""
    n = x.shape[0]
    d_sae = P.shape[1]
    (d_xhat, D, row_sq, pd, pc, pw, pwc, pq, pbc, row_l0,
     row_aux) = _dense_row_pass_modes(P, x, W_dec, b_dec, theta, lo, hi, DN.row_block(n),
                                      n_threads, mode, tcs, s, qc, tl0, dead, pn)
    g_b_enc, cnt, wsum, wcnt = _dense_totals(pd, pc, pw, pwc)
    nblk = pd.shape[0]
    qsum = np.zeros(pq.shape[1], np.float64)
    for b in range(nblk):
        for j in range(pq.shape[1]):
            qsum[j] += pq[b, j]
    nd = dead.shape[0]
    gx = np.zeros(d_sae if nd > 0 else 0, np.float64)
    for c in range(nd):
        k = 0
        for b in range(nblk):
            k += pbc[b, c]
        gx[dead[c]] = pn * k
    g_lt = _theta_grad_modes(wsum, wcnt, qsum, gx, theta, inv_bw, l0s, mode)
    l0sum = 0.0
    aux = 0.0
    for i in range(n):
        l0sum += row_l0[i]
        aux += row_aux[i]
    return d_xhat, D, row_sq.sum(), g_b_enc, cnt, g_lt, l0sum, aux


@njit(cache=True, error_model="numpy")
def dense_step_core_modes(x, xc, P, theta, lo, hi, W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe,
                          vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv, adam_c, inv_bw, l0s,
                          fire_counts, n_threads, center, mode, tcs, s, qc, tl0, dead, pn):
    """:func:`dense_step_core` in any mode (arguments as
    :func:`sparse_step_core_modes`): every term is in the dense ``d_pre``
    and the column partials, so the same feature pass. Returns ``(sum of
    squared errors, nnz, bad, d_xhat, l0sum, aux sum)``."""
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt, l0sum, aux = _dense_front_modes(
        x, P, W_dec, b_dec, theta, lo, hi, inv_bw, l0s, n_threads, mode, tcs, s, qc, tl0, dead,
        pn)
    bad = _dense_step_tail(xc, P, D, d_xhat, g_b_enc, cnt, g_lt, W_enc, b_enc, W_dec, b_dec,
                           mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, log_threshold, tm, tv,
                           adam_c, fire_counts, center)
    return sq, cnt.sum(), bad, d_xhat, l0sum, aux


@njit(cache=True)
def dense_gradients_modes(x, xc, P, theta, lo, hi, W_enc, W_dec, b_dec, inv_bw, l0s,
                          n_threads, center, mode, tcs, s, qc, tl0, dead, pn):
    """:func:`dense_gradients` in any mode: ``(sum of squared errors, nnz,
    g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_log_threshold, d_xhat, l0sum, aux
    sum)``."""
    warm_gemm()
    d_xhat, D, sq, g_b_enc, cnt, g_lt, l0sum, aux = _dense_front_modes(
        x, P, W_dec, b_dec, theta, lo, hi, inv_bw, l0s, n_threads, mode, tcs, s, qc, tl0, dead,
        pn)
    g_W_enc, g_W_dec, g_b_dec = _dense_grads_tail(xc, P, D, d_xhat, g_b_enc, W_enc, W_dec,
                                                  center)
    return sq, cnt.sum(), g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_lt, d_xhat, l0sum, aux
