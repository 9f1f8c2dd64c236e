"""Numba CPU dense path of the ReLU family: BLAS products over dense codes,
for batches whose codes are not sparse.

A fresh ReLU SAE fires about half its features; until the L1 term bites,
``N * L0 * d_in`` gathers and scatters cost several times the dense products
they replace. Above a measured density
(:data:`~fastsae.backends.tunables.NUMBA_RELU_DENSE_MIN_DENSITY`, decided by
the face on each call's own inputs) the training step, ``decode`` and
``gradients`` use the kernels here instead of the sparse ones:

* :func:`step_core`: everything of a ReLU step after the encoder
  (:func:`fastsae.backends.numba.encode.encode_relu_adaptive` hands on dense
  codes ``f``): a row pass (``x_hat = f W_dec``, the residual, ``d_pre =
  (d_xhat W_dec^T + c pen) [f > 0]`` and per-block column sums, each row
  block in cache) and a feature pass over blocks of features (``g_W_dec =
  f^T d_xhat``, ``g_W_enc = xc^T d_pre``) with Adam fused, as the sparse
  :func:`~fastsae.backends.numba.backward.feature_adam` does: four GEMMs
  besides the encoder's, no gradient matrix stored;
* :func:`relu_gradients`: the same two passes writing the gradients;
* :func:`decode_csr`: CSR codes scattered row block by row block into a
  cached dense block, then one GEMM per block.

Layouts as everywhere in this backend: the target ``x`` float32 ``[N,
d_out]`` (an SAE's ``x``; a transcoder's ``y``, less the skip term), the
encoder input ``xc`` ``[N, d_in]`` (``x - b_dec``; a transcoder's ``x``);
``f`` float32 ``[N, d_sae]``; ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_out]``; all C-contiguous. Every product is a
single-threaded sgemm on one block of a grid fixed by the shape (rows:
:func:`row_block`, features of
:data:`~fastsae.backends.tunables.NUMBA_DENSE_FEATURE_BLOCK`) inside a
parallel loop, and column sums are summed per row block then over blocks in
order, so results do not depend on the thread count. Call with BLAS limited
to one thread (the face does it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import (NUMBA_DENSE_FEATURE_BLOCK, NUMBA_DENSE_ROW_BLOCK_MAX,
                         NUMBA_DENSE_ROW_MIN_BLOCKS)
from .adam import adam_elem, const_tuple, nonfinite_in
from .backward import b_dec_grad, column_sums_rows, decoder_row_grad_tail, decoder_row_adam
from .encode import _part_bounds, gemm, warm_gemm

__all__ = ["row_block", "step_core", "relu_gradients", "decode_csr", "csr_to_dense"]


@njit(cache=True)
def row_block(n):
    """Rows per block of :func:`_row_pass` (shape-only, see
    :data:`~fastsae.backends.tunables.NUMBA_DENSE_ROW_BLOCK_MAX`)."""
    rb = (n + NUMBA_DENSE_ROW_MIN_BLOCKS - 1) // NUMBA_DENSE_ROW_MIN_BLOCKS
    return max(1, min(NUMBA_DENSE_ROW_BLOCK_MAX, rb))


@njit(parallel=True, cache=True)
def _row_pass(f, x, x_hat, W_dec, b_dec, penalty, c, rb, n_threads):
    """Per fixed block of ``rb`` rows: ``x_hat = f W_dec + b_dec`` (unless
    ``x_hat`` is given: non-empty), ``d_xhat = 2 (x_hat - x) / N``, the
    squared error per row, ``d_pre = (d_xhat W_dec^T + c pen)`` where ``f >
    0`` (else 0), and per-block column sums of ``d_pre`` and ``f`` and
    counts of ``f > 0`` (float32 within a block of ``rb`` rows, the
    blocks then summed in float64 by :func:`_column_totals`).

    Returns ``(d_xhat, d_pre, row_sq, part_dpre, part_f, part_cnt)``
    (``part_*`` ``[n_blocks, d_sae]``)."""
    n, d_sae = f.shape
    d_in = W_dec.shape[1]
    given = x_hat.shape[0] > 0
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    d_xhat = np.empty((n, d_in), np.float32)
    d_pre = np.empty((n, d_sae), np.float32)
    row_sq = np.empty(n, np.float64)
    part_dpre = np.zeros((nblk, d_sae), np.float32)
    part_f = np.zeros((nblk, d_sae), np.float32)
    part_cnt = np.zeros((nblk, d_sae), np.int32)
    scale = np.float32(2.0 / n)
    zero = np.float32(0.0)
    cpen = c * penalty
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            dx = d_xhat[i0:i1]
            if given:
                dx[:] = x_hat[i0:i1]
            else:
                gemm(f[i0:i1], W_dec, dx, 1.0, 0.0, False, False)
                for r in range(i1 - i0):
                    for k in range(d_in):
                        dx[r, k] += b_dec[k]
            for r in range(i1 - i0):
                i = i0 + r
                s = 0.0
                for k in range(d_in):
                    diff = dx[r, k] - x[i, k]
                    s += np.float64(diff) * diff
                    dx[r, k] = scale * diff
                row_sq[i] = s
            dp = d_pre[i0:i1]
            gemm(dx, W_dec, dp, 1.0, 0.0, False, True)
            pd, pf, pc = part_dpre[b], part_f[b], part_cnt[b]
            for r in range(i1 - i0):
                fr = f[i0 + r]
                dr = dp[r]
                # branch-free, so the loop vectorizes
                for j in range(d_sae):
                    v = fr[j]
                    on = v > 0
                    g = dr[j] + cpen[j] if on else zero
                    dr[j] = g
                    pd[j] += g
                    pc[j] += 1 if on else 0
                    pf[j] += v
    return d_xhat, d_pre, row_sq, part_dpre, part_f, part_cnt


@njit(parallel=True, cache=True)
def _column_totals(part_dpre, part_f, part_cnt):
    """Block partials summed over blocks in order (float64): ``(g_b_enc
    float32, colsum_f float64, counts int64)``, each ``[d_sae]``."""
    nblk, d_sae = part_dpre.shape
    g_b_enc = np.empty(d_sae, np.float32)
    csum = np.empty(d_sae, np.float64)
    cnt = np.empty(d_sae, np.int64)
    for j in prange(d_sae):
        a = 0.0
        s = 0.0
        m = 0
        for b in range(nblk):
            a += part_dpre[b, j]
            s += part_f[b, j]
            m += part_cnt[b, j]
        g_b_enc[j] = a
        csum[j] = s
        cnt[j] = m
    return g_b_enc, csum, cnt


@njit(cache=True)
def _l1_total(csum, penalty):
    """``sum_ij f_ij pen_j = sum_j pen_j colsum_f_j`` (float64)."""
    s = 0.0
    for j in range(csum.shape[0]):
        s += csum[j] * penalty[j]
    return s


@njit(cache=True)
def _block_grads(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, j0, j1, gd, ge):
    """Feature block ``[j0, j1)``: ``gd = f[:, blk]^T d_xhat`` with the
    decoder-norm term (``[nb, d_in]``) and ``ge = xc^T d_pre[:, blk]``
    (``[d_in, nb]``)."""
    nb = j1 - j0
    g = gd[:nb]
    e = ge[:, :nb]
    gemm(f[:, j0:j1], d_xhat, g, 1.0, 0.0, True, False)
    gemm(xc, d_pre[:, j0:j1], e, 1.0, 0.0, True, False)
    for j in range(j0, j1):
        nrm = norms[j] if not unit_norm else np.float32(0.0)
        decoder_row_grad_tail(g[j - j0], W_dec[j], nrm, np.float32(csum[j]), c, unit_norm)
    return g, e


@njit(parallel=True, cache=True, error_model="numpy")  # see adam.adam_elem
def _feature_adam(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, g_b_enc, W_enc,
                  b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c, fb):
    """Gradients of each block of ``fb`` features consumed by Adam as they
    are made (``W_dec`` rows renormalized in ``unit_norm`` mode); returns
    the non-finite count (see :func:`.adam.nonfinite_in`)."""
    d_sae, d_out = W_dec.shape
    d_in = W_enc.shape[0]
    nblk = (d_sae + fb - 1) // fb
    cs = const_tuple(adam_c)
    bad = 0
    for t in prange(nblk):
        j0 = t * fb
        j1 = min(d_sae, j0 + fb)
        gd = np.empty((fb, d_out), np.float32)
        ge = np.empty((d_in, fb), np.float32)
        g, e = _block_grads(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, j0, j1,
                            gd, ge)
        tb = 0
        for j in range(j0, j1):
            tb += decoder_row_adam(W_dec[j], g[j - j0], mWd[j], vWd[j], cs, unit_norm)
            b_enc[j], mbe[j], vbe[j] = adam_elem(b_enc[j], g_b_enc[j], mbe[j], vbe[j], cs)
        tb += nonfinite_in(b_enc[j0:j1])
        for k in range(d_in):
            w, mr, vr, gr = W_enc[k, j0:j1], mWe[k, j0:j1], vWe[k, j0:j1], e[k]
            for q in range(j1 - j0):
                w[q], mr[q], vr[q] = adam_elem(w[q], gr[q], mr[q], vr[q], cs)
            tb += nonfinite_in(w)
        bad += tb
    return bad


@njit(parallel=True, cache=True)
def _feature_grads(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, fb, g_W_enc,
                   g_W_dec):
    """:func:`_feature_adam`'s gradients written to ``g_W_enc`` and ``g_W_dec``."""
    d_sae, d_out = W_dec.shape
    d_in = g_W_enc.shape[0]
    nblk = (d_sae + fb - 1) // fb
    for t in prange(nblk):
        j0 = t * fb
        j1 = min(d_sae, j0 + fb)
        gd = np.empty((fb, d_out), np.float32)
        ge = np.empty((d_in, fb), np.float32)
        g, e = _block_grads(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, j0, j1,
                            gd, ge)
        g_W_dec[j0:j1] = g
        g_W_enc[:, j0:j1] = e


@njit(cache=True, error_model="numpy")
def step_core(x, xc, f, W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd,
              norms, l1c, unit_norm, adam_c, fire_counts, n_threads, center):
    """A ReLU + L1 step after the encoder, on dense codes ``f`` (``relu(xc
    W_enc + b_enc)``, float32 ``[N, d_sae]``), in place: the row pass, the
    bias gradients (``g_b_dec`` from the old ``W_enc``), the feature pass
    with Adam fused and ``b_dec``'s Adam. ``norms`` are ``W_dec``'s row
    norms (the L1 penalty in ``weighted_l1`` mode); ``center`` False for a
    transcoder (no ``- W_enc @ g_b_enc`` in ``g_b_dec``). Returns ``(mse,
    l1, nnz, bad, d_xhat)``; ``fire_counts`` (int64 ``[d_sae]`` or empty)
    is added to."""
    n = x.shape[0]
    d_sae = W_dec.shape[0]
    warm_gemm()
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    c = np.float32(l1c / n)
    d_xhat, d_pre, row_sq, pd, pf, pc = _row_pass(
        f, x, np.empty((0, 0), np.float32), W_dec, b_dec, penalty, c, row_block(n), n_threads)
    g_b_enc, csum, cnt = _column_totals(pd, pf, pc)
    g_b_dec = b_dec_grad(column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    bad = _feature_adam(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum, g_b_enc,
                        W_enc, b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c,
                        NUMBA_DENSE_FEATURE_BLOCK)
    p, g, m, v = b_dec, g_b_dec, mbd, vbd
    cs = const_tuple(adam_c)
    for k in range(p.shape[0]):
        p[k], m[k], v[k] = adam_elem(p[k], g[k], m[k], v[k], cs)
    bad += nonfinite_in(p)
    nnz = cnt.sum()
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += cnt[j]
    return row_sq.sum() / n, l1c * _l1_total(csum, penalty) / n, nnz, bad, d_xhat


@njit(cache=True)
def relu_gradients(x, xc, f, x_hat, W_enc, W_dec, norms, l1c, unit_norm, n_threads, center):
    """The ReLU loss's parts and gradients from dense codes ``f`` and the
    given ``x_hat`` of target ``x``: ``(mse, l1, g_W_enc, g_b_enc, g_W_dec,
    g_b_dec, d_xhat)`` (see :func:`fastsae.backends.reference.gradients`;
    ``center`` as in :func:`step_core`)."""
    n = x.shape[0]
    d_sae = W_dec.shape[0]
    warm_gemm()
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    c = np.float32(l1c / n)
    d_xhat, d_pre, row_sq, pd, pf, pc = _row_pass(
        f, x, x_hat, W_dec, np.empty(0, np.float32), penalty, c, row_block(n), n_threads)
    g_b_enc, csum, _ = _column_totals(pd, pf, pc)
    g_b_dec = b_dec_grad(column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    _feature_grads(f, d_pre, d_xhat, xc, W_dec, norms, c, unit_norm, csum,
                   NUMBA_DENSE_FEATURE_BLOCK, g_W_enc, g_W_dec)
    l1 = l1c * _l1_total(csum, penalty) / n
    return row_sq.sum() / n, l1, g_W_enc, g_b_enc, g_W_dec, g_b_dec, d_xhat


@njit(parallel=True, cache=True)
def csr_to_dense(indptr, indices, values, d_sae):
    """Dense float32 ``[N, d_sae]`` of CSR codes (parallel over rows)."""
    n = indptr.shape[0] - 1
    out = np.zeros((n, d_sae), np.float32)
    for i in prange(n):
        for p in range(indptr[i], indptr[i + 1]):
            out[i, indices[p]] = values[p]
    return out


@njit(parallel=True, cache=True)
def decode_csr(indptr, indices, values, W_dec, b_dec, row_block, n_threads):
    """``x_hat = f W_dec + b_dec`` for CSR codes dense enough for BLAS:
    per fixed block of ``row_block`` rows the codes are scattered into a
    per-thread dense block (in cache), then one sgemm. float32 ``[N, d_in]``."""
    n = indptr.shape[0] - 1
    d_sae, d_in = W_dec.shape
    out = np.empty((n, d_in), np.float32)
    warm_gemm()
    rb = max(1, row_block)
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        blk = np.empty((rb, d_sae), np.float32)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            fb = blk[:i1 - i0]
            fb[:] = 0.0
            for r in range(i1 - i0):
                for q in range(indptr[i0 + r], indptr[i0 + r + 1]):
                    fb[r, indices[q]] = values[q]
            o = out[i0:i1]
            gemm(fb, W_dec, o, 1.0, 0.0, False, False)
            for r in range(i1 - i0):
                for k in range(d_in):
                    o[r, k] += b_dec[k]
    return out
