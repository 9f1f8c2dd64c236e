"""Numba CPU Matryoshka BatchTopK (see :func:`fastsae.reference.train_step_matryoshka`).

The BatchTopK step's kernels generalized to nested prefixes of the
dictionary (``levels`` int32 ``[d_sae]``, each feature's prefix level from
:func:`fastsae.backends.numerics.matryoshka_levels`): the codes are selected
once (the BatchTopK encoder); :func:`.backward.prefix_row_pass` walks each
row's entries in feature order accumulating the reconstruction, stores the
partial sum as each width is crossed (no prefix decodes on its own), turns
the prefix residuals into the suffix sums ``D_g = sum_{l >= g} 2 r_l / N``
in place and takes ``d_pre`` of each entry against its level's ``D``; the
weight pass sums ``f_ij D_level(j)(i)`` per feature. The training step is
:func:`.step.prefix_step_core` (Adam fused into the weight pass); this
module adds the stand-alone gradients (:func:`gradients_core`), whose weight
pass writes the gradients instead (:func:`prefix_feature_grads`). With one
width ``[d_sae]`` (all levels 0) these are the BatchTopK kernels.

Inputs come from the validating front: codes canonical CSR (indices
increasing in each row), ``levels`` nondecreasing with ``levels[-1] = L -
1``; nothing is checked again here.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import NUMBA_TOPK_FEATURE_TILE
from . import backward as B

__all__ = ["prefix_feature_grads", "gradients_core"]


@njit(parallel=True, cache=True)
def prefix_feature_grads(colptr, rows, perm, values, d_pre, D, levels, d_ehat, xc, W_dec,
                         g_W_enc, g_W_dec, tile):
    """The weight pass of :func:`.backward.prefix_feature_adam` writing the
    gradients: ``g_W_dec`` ``[d_sae, d_out]`` (unit-norm projected) and
    ``g_W_enc`` ``[d_in, d_sae]`` written whole; returns ``g_b_enc`` float32
    ``[d_sae]``. Parallel over tiles of ``tile`` features, each owned by one
    thread, rows summed in increasing order (thread-count independent)."""
    d_sae = W_dec.shape[0]
    d_in = g_W_enc.shape[0]
    T = max(1, tile)
    ntiles = (d_sae + T - 1) // T
    g_b_enc = np.empty(d_sae, np.float32)
    for t in prange(ntiles):
        j0 = t * T
        j1 = min(d_sae, j0 + T)
        ge = np.zeros((T, d_in), np.float32)
        for j in range(j0, j1):
            gd = g_W_dec[j]
            g_b_enc[j] = B.prefix_feature_grad(colptr, rows, perm, values, d_pre, D[levels[j]],
                                               d_ehat, xc, j, gd, ge[j - j0])
            B.project_row(gd, W_dec[j])
        for k in range(d_in):
            for j in range(j0, j1):
                g_W_enc[k, j] = ge[j - j0, k]
    return g_b_enc


@njit(cache=True)
def gradients_core(x, xc, indptr, indices, values, a_indptr, a_indices, a_values, W_enc,
                   W_dec, b_dec, aux_scale, levels, D, center):
    """Losses and gradients of a Matryoshka BatchTopK step on given CSR codes
    (and AuxK codes when ``a_indptr`` is non-empty, ``aux_scale = 2 *
    weight / N``): ``(float64 [L] per-prefix sums of squared errors, sum of
    squared aux errors, g_W_enc, g_b_enc, g_W_dec, g_b_dec)``; ``D`` float32
    ``[L, N, d_out]`` the row pass's workspace (overwritten; ``D[0]`` is then
    ``dL/dx_hat`` summed over the prefixes). ``x`` is the target (``[N,
    d_out]``), ``xc`` the encoder input, ``center`` as in
    :func:`.step.prefix_step_core`."""
    d_sae = W_dec.shape[0]
    D, d_ehat, d_pre, a_d_pre, sq, a_sq, sum_dx, _, _ = B.prefix_row_pass(
        indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x, aux_scale,
        levels, D)
    colptr, rows, perm, vv, dp = B.stacked_csc(indptr, indices, values, d_pre, a_indptr,
                                               a_indices, a_values, a_d_pre, d_sae)
    g_W_enc = np.empty(W_enc.shape, np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    g_b_enc = prefix_feature_grads(colptr, rows, perm, vv, dp, D, levels, d_ehat, xc, W_dec,
                                   g_W_enc, g_W_dec, NUMBA_TOPK_FEATURE_TILE)
    g_b_dec = B.b_dec_grad(sum_dx, W_enc, g_b_enc, center)
    return sq, a_sq, g_W_enc, g_b_enc, g_W_dec, g_b_dec
