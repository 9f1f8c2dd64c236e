"""Training steps of the ``cython`` backend: forward, sparse backward and
Adam in place, never forming an ``N x d_sae`` matrix (except on the ReLU
step's dense path, below).

The ReLU step measures this batch's code density on the encoder's first row
block (:func:`.encode.encode_relu_switch`); at or above
:data:`~fastsae.backends.tunables.CYTHON_RELU_DENSE_MIN_DENSITY` (read at
call time) it continues with dense codes and :func:`.dense.step` (dense BLAS
products, Adam fused), else with CSR codes and the sparse path below.

Both steps end in one ``_backward.train_backward`` call, which applies Adam
inside the backward's per-feature pass (see :mod:`.adam`), so no gradient
matrix is stored. Arguments come from the validating front: ``params`` and
the Adam moments C-contiguous float32 in SAELens layouts, ``x [N, d_in]``,
``fire_counts`` int64 ``[d_sae]`` (writeable) or None, ``dead_mask`` bool
``[d_sae]`` or None, ``decoder_norm`` and ``activation`` known modes.
Transcoders (``y``): the kernels' target and centering and ``W_skip``'s
gradient and Adam as :mod:`.transcoder` describes.
"""

from __future__ import annotations

import numpy as np

from ...params import AdamState, SAEParams, StepResult
from ...sparse import SparseCodes
from .. import bf16 as BF
from .. import tunables as TU
from ..numerics import auxk_active, auxk_weight, relu_step_result, topk_step_result
from . import _backward, dense
from . import transcoder as TC
from ._threads import threads
from .adam import moment_arrays, step_constants
from .decode import decode_csr
from .encode import encode_relu_switch
from .norms import decoder_column_norms
from .topk import encode_aux, encode_batchtopk, encode_topk, encode_topk_with_aux


def _step_threads(n, d_in, d_sae, nnz):
    return threads((3 * nnz + n) * d_in + 3 * d_in * d_sae)


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None, y=None, precision="fp32") -> StepResult:
    """Forward (fused sparse encode, sparse decode), sparse backward and fused
    Adam on batch ``x``, updating ``params``, ``state`` and ``fire_counts``
    in place; or, when this batch's codes are dense (see the module
    docstring), the same with dense codes through :func:`.dense.step`.
    ``y``: a transcoder's target. Returns the batch's losses, L0 and
    explained variance, measured before the update. ``precision="bf16"``:
    the encoder is :mod:`..bf16`'s on the copy of ``W_enc`` kept in
    ``state.bf16`` (rewritten by the backward's Adam pass), unless the last
    step's codes were dense (:func:`..bf16.bf16_step_wanted`): then this
    float32 step runs."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    norms = decoder_column_norms(params.W_dec)
    dense_min = TU.CYTHON_RELU_DENSE_MIN_DENSITY
    copy = {}
    if precision == "bf16" and BF.bf16_step_wanted(state, dense_min):
        f = None
        codes, copy = _bf16_codes(x, params, state, y, 0)
    else:
        f, codes = encode_relu_switch(x, params.W_enc, params.b_enc, TC.centering(params, y),
                                      dense_min)
    if f is not None:
        r = dense.step(params, state, x, f, norms, l1_coefficient=l1_coefficient, lr=lr,
                       decoder_norm=decoder_norm, beta1=beta1, beta2=beta2, eps=eps,
                       fire_counts=fire_counts, y=y)
        if precision == "bf16":
            BF.step_done(state, params.W_enc, wrote=False, nnz=r.l0 * n, n=n)
        return r
    x_hat = decode_csr(codes, params.W_dec, params.b_dec)
    nt = _step_threads(n, d_in, d_sae, codes.indices.shape[0])
    t, consts = step_constants(state, lr, beta1, beta2, eps)
    kw = TC.kernel_args(x, params, y, builds_recon=True)  # x_hat has no skip term
    mse, l1, _, bad = _backward.train_backward(
        x, x_hat, params.W_enc, params.b_enc, params.W_dec, params.b_dec,
        codes.indptr, codes.indices, codes.values, norms, float(l1_coefficient),
        decoder_norm == "weighted_l1", decoder_norm == "unit_norm",
        *moment_arrays(state), consts, fire_counts, nt, **kw, **copy)
    bad += TC.skip_adam(params, state, x, kw, consts)
    state.step = t
    if precision == "bf16":
        BF.step_done(state, params.W_enc, wrote=bool(copy), nnz=codes.nnz, n=n)
    t_fit = TC.fit_target(x, y)
    var = _backward.batch_variance(t_fit, threads(t_fit.size))
    return relu_step_result(mse, l1, codes.nnz, n, var, params_finite=bad == 0)


def _bf16_codes(x, params, state, y, k, batch=False, thr=None):
    """The ``precision="bf16"`` step's codes (ReLU for ``k == 0``, or with
    ``thr`` the entries above it, JumpReLU's candidates; else TopK, or
    BatchTopK with ``batch``) from the copy of ``W_enc`` on ``state`` (packed
    now if stale), and the backward's keywords that rewrite that copy."""
    nt = threads(x.shape[0] * params.d_in * params.d_sae)
    (ip, ix, v), (Wp, WT) = BF.step_codes(state, x, params.W_enc, params.b_enc,
                                          TC.centering(params, y), k, nt, batch, thr)
    codes = SparseCodes(ip, ix, v, (x.shape[0], params.d_sae))
    return codes, {"bf16_panels": Wp, "bf16_transpose": WT}


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
    """One TopK/BatchTopK step (fused top-k encode, AuxK, sparse backward
    with the decode fused into its row pass, Adam, decoder rows
    renormalized), in place; see :func:`fastsae.reference.train_step_topk`.

    Fused like the Numba backend's: with ``activation="topk"`` the AuxK
    selection (top ``k_aux`` among the dead latents) is made in the same tile
    epilogue as the TopK one (one encoder product; BatchTopK selects it with
    its own pass over the gathered dead columns), and the backward and Adam
    are one ``train_backward`` call for both loss terms (the AuxK codes are
    stacked under the main ones), run as one Matryoshka level ``[d_sae]``. ``y``: a transcoder's
    target. ``precision="bf16"``: the TopK or BatchTopK selection from
    :mod:`..bf16`'s encoder on the copy of ``W_enc`` in ``state.bf16``
    (rewritten by the Adam pass), AuxK's in float32 over the dead columns."""
    codes, prefix_sq, aux, bad, var = selection_step(
        params, state, x, k, activation, np.array([params.d_sae], np.int64), lr, beta1, beta2,
        eps, fire_counts, dead_mask, k_aux, aux_coefficient, y, precision)
    return topk_step_result(prefix_sq[0] / x.shape[0], aux, codes.nnz, x.shape[0], var,
                            codes.values, params_finite=bad == 0)


def selection_step(params, state, x, k, activation, widths, lr, beta1, beta2, eps,
                   fire_counts, dead_mask, k_aux, aux_coefficient, y=None, precision="fp32"):
    """The TopK-family step (TopK or BatchTopK selection, AuxK, backward over
    the Matryoshka prefixes ``widths`` with Adam fused), in place: returns
    ``(codes, prefix_sq, aux, bad, var)`` with ``prefix_sq`` each prefix's
    sum of squared errors (float64 ``[L]``), ``aux`` the weighted AuxK loss,
    ``bad`` nonzero when an update is non-finite, ``var`` the batch variance
    (of the target: ``y`` for a transcoder)."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    use_aux = auxk_active(dead_mask, k_aux, aux_coefficient)
    aux_codes = None
    b_c = TC.centering(params, y)
    copy = {}
    if precision == "bf16":
        codes, copy = _bf16_codes(x, params, state, y, int(k), activation == "batchtopk")
        if use_aux:
            aux_codes = encode_aux(x, params.W_enc, params.b_enc, b_c, dead_mask, k_aux)
    elif use_aux and activation == "topk":
        codes, aux_codes = encode_topk_with_aux(x, params.W_enc, params.b_enc, b_c, k,
                                                dead_mask, k_aux)
    else:
        enc = encode_topk if activation == "topk" else encode_batchtopk
        codes = enc(x, params.W_enc, params.b_enc, b_c, k)
        if use_aux:
            aux_codes = encode_aux(x, params.W_enc, params.b_enc, b_c, dead_mask, k_aux)
    nnz_all = codes.indices.shape[0] + (aux_codes.indices.shape[0] if use_aux else 0)
    nt = _step_threads(n, d_in, d_sae, nnz_all)
    t, consts = step_constants(state, lr, beta1, beta2, eps)
    aux_args = ()
    if use_aux:
        aux_args = (aux_codes.indptr, aux_codes.indices, aux_codes.values,
                    auxk_weight(dead_mask, k_aux, aux_coefficient))
    prefix_sq = np.zeros(widths.shape[0], dtype=np.float64)
    kw = TC.kernel_args(x, params, y, builds_recon=True)
    _, _, aux, bad = _backward.train_backward(
        x, None, params.W_enc, params.b_enc, params.W_dec, params.b_dec,
        codes.indptr, codes.indices, codes.values, np.ones(d_sae, dtype=np.float32), 0.0,
        False, True, *moment_arrays(state), consts, fire_counts, nt, *aux_args,
        widths=widths, prefix_sq=prefix_sq, **kw, **copy)
    bad += TC.skip_adam(params, state, x, kw, consts)
    state.step = t
    if copy:
        BF.step_done(state, params.W_enc, wrote=True, nnz=codes.nnz, n=n)
    t_fit = TC.fit_target(x, y)
    var = _backward.batch_variance(t_fit, threads(t_fit.size))
    return codes, prefix_sq, aux, bad, var
