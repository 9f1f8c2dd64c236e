"""The CUDA training steps: :func:`train_step` (ReLU + L1) and
:func:`train_step_topk` (TopK / BatchTopK, optional AuxK); the TopK
family's step (:func:`_selection_step`) also runs the Matryoshka one
(:mod:`.matryoshka`).

Each chains the families' passes on device arrays: encode into the staging
buffer and compact to CSR (:mod:`.encode`, or the selection of :mod:`.topk`),
sparse decode (:mod:`.decode`), the sparse backward (:mod:`.backward`) and
the fused Adam (:mod:`.adam`, with the unit-norm projection fused into the
decoder's update). Every intermediate is a cached workspace
(:mod:`.placement`).

On device params and state a step runs entirely on the GPU: the only host
transfers are small reads (the number of active entries, which sizes the
sparse codes; BatchTopK's four 256-bin histograms; the loss scalars of the
returned :class:`StepResult`; the dead mask's count for AuxK). Host (NumPy)
params and moments are copied over, updated there and copied back into the
same arrays.
"""

from __future__ import annotations

import numpy as np

from ...params import AdamState, SAEParams, StepResult
from ..numerics import (auxk_active, auxk_requested, auxk_weight, relu_step_result,
                        topk_step_result)
from .adam import _adam
from .backward import _backward, _topk_backward
from .common import BLOCK, _single_block, add_kernel, flat_grid
from .decode import _sparse_decode, _widths_device
from .encode import _encode_sparse, _fp32_only
from .placement import _device, _empty_like_params, _is_device, _work, to_numpy
from .topk import _aux_codes, _pre, _topk_codes, min_kernel
from .transcoder import _add_skip, _device_or_none, _input_shift


def _step_arrays(params: SAEParams, state: AdamState, fire_counts):
    """Device arrays for a training step: ``(P, M, V, fc_dev, host_pairs)``.

    Parameters and Adam moments already on the device are used in place;
    host ones are copied over and listed in ``host_pairs`` (host array,
    device copy) for :func:`_finish_step` to write back. ``fc_dev`` is
    ``fire_counts`` when it is a device array, else None."""
    host_pairs = []

    def dev(a):
        d = _device(a)
        if not _is_device(a):
            host_pairs.append((a, d))
        return d

    P, M, V = (SAEParams(*(dev(a) for a in o.arrays())) for o in (params, state.m, state.v))
    fc_dev = None
    if fire_counts is not None and _is_device(fire_counts):
        fc_dev = _device(fire_counts, np.int64)
    return P, M, V, fc_dev, host_pairs


def _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs) -> np.ndarray:
    """Adds this step's per-feature firing counts ``colcount`` to
    ``fire_counts`` (on the device or the host), writes updated host
    parameters and moments back, and returns the step's scalars on the host."""
    if fc_dev is not None:
        add_kernel[flat_grid(fc_dev.shape[0]), BLOCK](fc_dev, colcount)
    s = scal.copy_to_host()
    if fire_counts is not None and fc_dev is None:
        fire_counts += colcount.copy_to_host().astype(fire_counts.dtype)
    for h, d in host_pairs:
        d.copy_to_host(h)
    return s


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None, y=None, precision="fp32") -> StepResult:
    """Forward, backward and Adam update on batch ``x``, in place (float32:
    the front refuses ``precision="bf16"`` here).

    Device parameters and moments are updated where they are; host (NumPy)
    ones are copied to the GPU and the updated values copied back into the
    same arrays. ``fire_counts`` (int64 ``[d_sae]``, host or device) is
    incremented by the number of rows each feature fired in. ``y`` (float32
    ``[N, d_out]``, host or device): a transcoder's target (see
    :mod:`.transcoder`).
    """
    _fp32_only(precision)
    P, M, V, fc_dev, host_pairs = _step_arrays(params, state, fire_counts)
    xd, yd = _device(x), _device_or_none(y)
    n = xd.shape[0]
    unit_norm = decoder_norm == "unit_norm"

    codes, nnz = _encode_sparse(xd, P.W_enc, P.b_enc, _input_shift(P, yd), fresh=False)
    x_hat = _work("x_hat", (n, P.W_dec.shape[1]))
    _sparse_decode(codes.indptr, codes.indices, codes.values, P.W_dec, P.b_dec, x_hat)
    _add_skip(xd, P, x_hat)
    G = _empty_like_params(P, cached=True)
    # [0:3] the backward's sums, [3] Adam's non-finite flag: one fetch for all
    scal = _work("scalars_step", 4, np.float64)
    colcount = _backward(xd, P, codes.indptr, codes.indices, codes.values, x_hat,
                         l1_coefficient, not unit_norm, G, scal, yd)
    _adam(P, G, M, V, state.step, lr, beta1, beta2, eps, unit_norm, scal, 3)
    state.step += 1
    s = _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs)
    return relu_step_result(s[0] / n, l1_coefficient * s[1] / n, nnz, n, s[2] / n,
                            params_finite=s[3] == 0)


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
    """One TopK/BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.backends.reference.train_step_topk`); device or host
    arrays and ``y`` as :func:`train_step` (float32 only)."""
    _fp32_only(precision)
    s, nnz, n, aux_loss, kept_min, finite = _selection_step(
        params, state, x, k, activation, lr, beta1, beta2, eps, fire_counts, dead_mask, k_aux,
        aux_coefficient, y=y)
    return topk_step_result(s[0] / n, aux_loss, nnz, n, s[2] / n, kept_min,
                            params_finite=finite)


def _selection_step(params, state, x, k, activation, lr, beta1, beta2, eps, fire_counts,
                    dead_mask, k_aux, aux_coefficient, widths=None, y=None):
    """The TopK family's step (TopK / BatchTopK selection, optional AuxK,
    sparse backward, Adam with the decoder rows renormalized), in place.
    ``widths`` (host int64 ``[L]``): Matryoshka prefixes, whose
    reconstructions come from one decode walk and whose suffix-summed
    residual gradients feed one backward (see :mod:`.backward`); ``y`` a
    transcoder's target (:mod:`.transcoder`).

    Returns ``(s, nnz, n, aux_loss, kept_min, finite)``: ``s`` the host
    scalars, ``s[:L]`` each reconstruction's sum of squared errors (L = 1
    without widths) and ``s[L + 1]`` the sum of squared deviations of the
    target; ``kept_min`` the kept values' minimum as a one-entry array
    (empty when nothing was kept)."""
    P, M, V, fc_dev, host_pairs = _step_arrays(params, state, fire_counts)
    xd, yd = _device(x), _device_or_none(y)
    n, d_out = xd.shape[0], P.W_dec.shape[1]
    nl = 1 if widths is None else len(widths)

    pre = _pre(xd, P.W_enc, P.b_enc, _input_shift(P, yd))
    codes, nnz = _topk_codes(pre, k, activation, fresh=False)
    if widths is None:
        x_hat, wd = _work("x_hat", (n, d_out)), None
    else:
        x_hat, wd = _work("x_hat_prefixes", (nl, n, d_out)), _widths_device(widths)
    _sparse_decode(codes.indptr, codes.indices, codes.values, P.W_dec, P.b_dec, x_hat, wd)
    _add_skip(xd, P, x_hat)
    aux, weight = None, 0.0
    # the mask (d_sae bools) is counted on the host, fetched only when AuxK is
    # asked for: a device mask is not copied on every step
    dead_h = (to_numpy(dead_mask) if auxk_requested(dead_mask, k_aux, aux_coefficient)
              else None)
    if auxk_active(dead_h, k_aux, aux_coefficient):
        dead = _device(dead_mask, np.bool_)  # the device mask in place, or a copy of the host one
        ac, _ = _aux_codes(pre, dead, int(np.count_nonzero(dead_h)), k_aux, fresh=False)
        aux = (ac.indptr, ac.indices, ac.values)
        weight = auxk_weight(dead_h, k_aux, aux_coefficient)
    G = _empty_like_params(P, cached=True)
    # [0:L+2] the backward's sums, [L+2] the kept minimum, [L+3] Adam's non-finite flag
    scal = _work("scalars_topk_step", nl + 4, np.float64)
    colcount = _topk_backward(xd, P, (codes.indptr, codes.indices, codes.values), x_hat, aux,
                              weight, G, scal, wd, yd)
    _single_block(min_kernel)(codes.values, scal, nl + 2)
    _adam(P, G, M, V, state.step, lr, beta1, beta2, eps, True, scal, nl + 3)
    state.step += 1
    s = _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs)
    aux_loss = weight * s[nl] / n if aux is not None else 0.0
    # the kept values' minimum was reduced on the device; a one-entry
    # stand-in (none when nothing was kept) gives the step results the same min
    kept_min = s[nl + 2:nl + 3] if nnz else s[:0]
    return s, nnz, n, aux_loss, kept_min, s[nl + 3] == 0
