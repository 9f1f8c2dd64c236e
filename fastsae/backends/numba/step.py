"""Numba CPU training steps: the compiled cores of ``train_step`` (ReLU + L1,
its sparse path; the dense one is :func:`.dense.step_core`) and
``train_step_topk`` (TopK/BatchTopK + AuxK; generalized to nested prefixes
it is also ``train_step_matryoshka``'s), each chaining the kernels of
:mod:`.decode`, :mod:`.norms`, :mod:`.backward` and :mod:`.adam` after the
encoder (:mod:`.encode`, :mod:`.topk`) with no Python in between.

Layouts: ``x`` float32 ``[N, d_in]``, parameters in SAELens layouts
(``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]``) with their Adam moments of the same shapes, all
C-contiguous, updated in place; ``adam_c`` is the float32 ``[8]`` array of
:func:`fastsae.backends.numerics.adam_constants`; ``fire_counts`` int64
``[d_sae]`` (empty: not counted). Both must run with BLAS limited to one
thread (the face does it, see :mod:`fastsae.backends.numba`).

Transcoders: the cores take the reconstruction's target ``x`` (``[N,
d_out]``: an SAE's ``x``, a transcoder's ``y``, less ``x @ W_skip.T`` for a
skip transcoder, which the face computes) separately from the encoder input
``xc`` (``[N, d_in]``), ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, and a
``center`` flag: False drops ``b_dec``'s ``- W_enc @ g_b_enc`` term (the
encoder did not subtract ``b_dec``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..tunables import NUMBA_COLUMN_SUM_BLOCK
from . import adam as A
from . import backward as B
from . import decode as D

__all__ = ["batch_variance", "shifted_variance", "train_step_core", "prefix_step_core",
           "topk_step_core"]


@njit(cache=True)
def _sq_dev_total(x, mean):
    """``sum_ik (x_ik - mean_k)**2`` (float64): per-column partial sums over
    fixed blocks of rows (vectorized across columns, where a per-row sum is
    one long dependency chain), then summed in block order. Serial: a
    fraction of a millisecond, less than waking a busy machine's threads."""
    n, d = x.shape
    RB = NUMBA_COLUMN_SUM_BLOCK
    nb = (n + RB - 1) // RB
    part = np.zeros((nb, d), np.float64)
    for b in range(nb):
        pb = part[b]
        for i in range(b * RB, min(n, b * RB + RB)):
            for k in range(d):
                diff = np.float64(x[i, k]) - mean[k]
                pb[k] += diff * diff
    s = 0.0
    for b in range(nb):
        for k in range(d):
            s += part[b, k]
    return s


@njit(cache=True)
def batch_variance(x):
    """Mean over rows of ``|x_i - mean(x)|**2`` (float64), the denominator
    of the explained variance."""
    n = x.shape[0]
    mean = B.column_sums_rows(x) / n
    return _sq_dev_total(x, mean) / n


@njit(cache=True)
def train_step_core(x, xc, indptr, indices, values, W_enc, b_enc, W_dec, b_dec, mWe, vWe,
                    mbe, vbe, mWd, vWd, mbd, vbd, norms, l1c, unit_norm, adam_c, fire_counts,
                    center, Wp, WT):
    """A ReLU + L1 step after the encoder on its CSR codes (sparse: see
    :func:`.encode.encode_relu_adaptive`), in place: decode fused with the
    residual, backward at the active entries and Adam fused into the weight
    pass (:func:`.backward.feature_adam`); ``xc = x - b_dec``, ``norms`` the
    decoder row norms, ``l1c`` the L1 coefficient, ``unit_norm`` the
    decoder-norm mode, ``x`` the target (module docstring); ``(Wp, WT)``
    the bfloat16 copy of ``W_enc`` the weight pass keeps
    (:func:`.backward.bf16_copy_tile`; empty: none).

    Returns ``(mse, l1, nnz, bad, d_xhat)`` with ``bad`` nonzero exactly
    when an updated parameter is inf or NaN and ``d_xhat = 2 (x_hat - x) /
    N`` (a skip transcoder's ``W_skip`` gradient needs it).
    """
    n = x.shape[0]
    d_sae = W_dec.shape[0]
    d_xhat, row_sq = D.decode_residual_csr(indptr, indices, values, W_dec, b_dec, x)
    # backward, at the active entries only (old W_dec / W_enc read here)
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    l1n = l1c / n
    d_pre, row_l1 = B.d_pre_csr(indptr, indices, values, d_xhat, W_dec, penalty, l1n)
    colptr, rows, perm = B.csr_to_csc(indptr, indices, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc, center)
    # W_dec, W_enc, b_enc: gradient tiles consumed by Adam as they are made
    bad = B.feature_adam(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n,
                         unit_norm, W_enc, b_enc, g_b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c,
                         Wp, WT)
    bad += A.adam_flat(b_dec, g_b_dec, mbd, vbd, adam_c)
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += colptr[j + 1] - colptr[j]
    mse = row_sq.sum() / n
    l1 = l1c * row_l1.sum() / n
    return mse, l1, indptr[n], bad, d_xhat


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def _b_dec_adam(b_dec, mbd, vbd, sum_dx, part, center, adam_c):
    """Adam on ``b_dec`` after a TopK-family weight pass: gradient
    ``sum_dx[k] - sum_t part[t, k]`` (the tile partials of ``W_enc_old @
    g_b_enc``, summed in order), without ``part`` when not ``center`` (a
    transcoder). Returns the non-finite count of the updated ``b_dec``."""
    bad = 0
    for k in range(b_dec.shape[0]):
        if center:
            s = 0.0
            for t in range(part.shape[0]):
                s += part[t, k]
            g = np.float32(sum_dx[k]) - np.float32(s)
        else:
            g = np.float32(sum_dx[k])
        b_dec[k], mbd[k], vbd[k] = A.adam_elem(b_dec[k], g, mbd[k], vbd[k], adam_c)
        bad += A.nonfinite(b_dec[k])
    return bad


@njit(cache=True)
def shifted_variance(sum_x, sum_xx, n):
    """The batch variance from the row pass's shifted sums (see
    :func:`.backward.prefix_row_pass`): ``max(sum_xx - |sum_x|**2 / N, 0) / N``."""
    m2 = 0.0
    for k in range(sum_x.shape[0]):
        m2 += sum_x[k] * sum_x[k]
    return max(sum_xx - m2 / n, 0.0) / n


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def prefix_step_core(x, xc, indptr, indices, values, a_indptr, a_indices, a_values, W_enc,
                     b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, adam_c,
                     aux_scale, tile, fire_counts, levels, D, center, Wp, WT):
    """Everything of a TopK step after the encoder, over the nested prefixes
    of ``levels`` (int32 ``[d_sae]``, each feature's prefix level; all zeros:
    the TopK/BatchTopK step), in two parallel regions: the row pass (decode,
    prefix residuals and their suffix sums ``D``, ``d_pre``, column sums;
    see :func:`.backward.prefix_row_pass`) and the weight pass over tiles of
    ``tile`` features with Adam fused (:func:`.backward.prefix_feature_adam`);
    the AuxK codes (``a_indptr`` non-empty; ``aux_scale = 2 * weight / N``)
    are rows ``N..2N-1`` of one transposed pattern. ``xc = x - b_dec``
    (from the encoder; a transcoder's ``x``, ``center`` False, with ``x``
    here its target, see the module docstring). ``b_dec`` is updated
    serially (``d_out`` values, gradient ``sum_i D_0(i) - W_enc @ g_b_enc``,
    without the second term when not ``center``). Returns ``(float64 [L]
    per-prefix sums of squared errors, sum of squared aux errors, variance
    of the target, bad)`` with ``bad`` nonzero exactly when an updated
    parameter is inf or NaN. ``D`` float32 ``[L, N, d_out]`` is the row
    pass's workspace (overwritten; ``D[0]`` is then ``dL/dx_hat`` summed
    over the prefixes). ``(Wp, WT)``: the bfloat16 copy of ``W_enc``
    the weight pass keeps (:func:`.backward.bf16_copy_tile`; empty: none)."""
    n = x.shape[0]
    d_sae, d_out = W_dec.shape
    D, d_ehat, d_pre, a_d_pre, sq, a_sq, sum_dx, sum_x, sum_xx = B.prefix_row_pass(
        indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x, aux_scale,
        levels, D)
    colptr, rows, perm, vv, dp = B.stacked_csc(indptr, indices, values, d_pre, a_indptr,
                                               a_indices, a_values, a_d_pre, d_sae)
    _, part, bad = B.prefix_feature_adam(colptr, rows, perm, vv, dp, D, levels, d_ehat, xc,
                                         W_dec, W_enc, b_enc, mWe, vWe, mbe, vbe, mWd, vWd,
                                         adam_c, tile, np.empty(0, np.int64),
                                         np.empty((0, xc.shape[1]), np.float32),
                                         np.empty(0, np.float32), Wp, WT)
    # g_b_dec = sum_i D_0(i) - W_enc_old @ g_b_enc (tile partials in order)
    bad += _b_dec_adam(b_dec, mbd, vbd, sum_dx, part, center, adam_c)
    if fire_counts.shape[0] > 0:
        for p in range(indptr[n]):
            fire_counts[indices[p]] += 1
    return sq, a_sq, shifted_variance(sum_x, sum_xx, n), bad


@njit(cache=True, error_model="numpy")  # see adam.adam_elem
def topk_step_core(x, xc, indptr, indices, values, a_indptr, a_indices, a_values, W_enc,
                   b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, adam_c,
                   aux_scale, tile, fire_counts, center):
    """Everything of a TopK step after the encoder: :func:`prefix_step_core`
    with one prefix. Returns ``(sum of squared errors, sum of squared aux
    errors, variance of the target, bad)``."""
    d_sae, d_out = W_dec.shape
    sq, a_sq, var, bad = prefix_step_core(
        x, xc, indptr, indices, values, a_indptr, a_indices, a_values, W_enc, b_enc, W_dec,
        b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, adam_c, aux_scale, tile, fire_counts,
        np.zeros(d_sae, np.int32), np.empty((1, x.shape[0], d_out), np.float32), center,
        np.empty(0, np.uint16), np.empty((0, 0), np.float32))
    return sq[0], a_sq, var, bad
