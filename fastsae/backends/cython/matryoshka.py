"""Matryoshka BatchTopK training on the ``cython`` backend (see
:func:`fastsae.reference.train_step_matryoshka`).

The BatchTopK step's kernels, generalized to nested prefixes
(``kernels/cython/backward.pyx``, ``widths=``): the codes are selected once
(:func:`.topk.encode_batchtopk`); the backward's row pass walks each row's
entries in feature order accumulating the reconstruction and stores the
prefix residuals ``r_l`` as the feature index crosses each width (no prefix
decodes on its own, and the step needs no separate decode), turns them in
place into the suffix sums ``D_g = sum_{l >= g} 2 r_l / N`` and takes
``d_pre`` of each entry against its level's ``D``; the feature pass (with
Adam fused, as for BatchTopK) sums ``f_ij D_level(j)(i)``. With one width
``[d_sae]`` it is the BatchTopK step, bit for bit.

Arguments come from the validating front: ``widths`` a fresh int64 host
array, strictly increasing, the last ``d_sae``; codes canonical.
"""

from __future__ import annotations

import numpy as np

from ...params import Losses, SAEParams
from ..numerics import matryoshka_step_result
from . import _backward
from ._threads import threads
from .backward import _backward_threads, _empty_like
from .encode import csr_arrays
from .step import selection_step
from . import transcoder as TC


def matryoshka_gradients(x, params: SAEParams, codes, widths, aux_codes=None, aux_weight=0.0,
                         y=None):
    """Losses (``prefix_mse`` one per width, ``total = sum(prefix_mse) +
    aux``) and gradients (``W_dec``'s projected) of a Matryoshka BatchTopK
    step on the given codes; AuxK's term when ``aux_codes`` and
    ``aux_weight > 0``; ``y`` a transcoder's target (the kernel builds the
    prefix reconstructions, so it fits ``y - x @ W_skip.T``; ``W_skip``'s
    gradient is ``D_0.T @ x``)."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    indptr, indices, values = csr_arrays(codes, threads(n * d_sae))
    use_aux = aux_codes is not None and aux_weight > 0
    aux_args = ()
    nnz_all = indices.shape[0]
    if use_aux:
        a = csr_arrays(aux_codes, threads(n * d_sae))
        aux_args = (*a, float(aux_weight))
        nnz_all += a[1].shape[0]
    nt = _backward_threads(n, d_in, d_sae, nnz_all)
    grads = _empty_like(params)
    prefix_sq = np.zeros(widths.shape[0], dtype=np.float64)
    kw = TC.kernel_args(x, params, y, builds_recon=True)
    out = _backward.gradients_csr(
        x, None, params.W_enc, params.W_dec, params.b_dec, indptr, indices, values,
        np.ones(d_sae, dtype=np.float32), 0.0, False, True,
        grads.W_enc, grads.b_enc, grads.W_dec, grads.b_dec, None, nt, *aux_args,
        widths=widths, prefix_sq=prefix_sq, **kw)
    TC.with_skip_gradient(grads, x, kw)
    aux = out[2] if use_aux else 0.0
    pm = tuple(float(s) / n for s in prefix_sq)
    return Losses(mse=pm[-1], l1=0.0, total=sum(pm) + aux, aux=aux, prefix_mse=pm), grads


def train_step_matryoshka(params: SAEParams, state, x, *, k, widths, lr, beta1=0.9,
                          beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None, k_aux=0,
                          aux_coefficient=0.0, y=None, precision="fp32"):
    """One Matryoshka BatchTopK step (BatchTopK encode, AuxK among the dead
    latents, backward over the prefixes with Adam fused, decoder rows
    renormalized), in place; the losses are measured before the update;
    ``y`` a transcoder's target; ``precision="bf16"`` as in
    :func:`.step.train_step_topk`."""
    codes, prefix_sq, aux, bad, var = selection_step(
        params, state, x, k, "batchtopk", widths, lr, beta1, beta2, eps, fire_counts,
        dead_mask, k_aux, aux_coefficient, y, precision)
    return matryoshka_step_result(prefix_sq, aux, codes.nnz, x.shape[0], var, codes.values,
                                  params_finite=bad == 0)
