"""Host-side numerics every backend shares: written once, used everywhere.

Nothing here touches an ``N x d_sae`` array; these are the scalars and small
rules around the kernels, so that every backend builds them the same way
(and so gets the same float32 bits):

* :func:`adam_constants`: Adam's per-step constants in one fixed order
  (:data:`ADAM_CONSTANTS`), as a float32 array; every backend's fused Adam
  reads them from this array (or the tuple :func:`adam_constant_tuple`).
* :func:`auxk_active` (:func:`auxk_requested`) and :func:`auxk_weight`: whether a TopK step runs the
  AuxK term, and its weight ``aux_coefficient * min(n_dead / k_aux, 1)``.
* :func:`explained_variance`: ``1 - mse / var`` (1 for a constant batch).
* :func:`relu_step_result` / :func:`topk_step_result`: the
  :class:`~fastsae.params.StepResult` of one step from the sums a backend
  measured, finite or loud (:func:`loud_loss`).

The NumPy reference keeps its textbook formulas (it is the oracle these are
checked against); :mod:`fastsae.backends.reference` uses the AuxK rule and
the explained variance from here.
"""

from __future__ import annotations

import numpy as np

from ..params import StepResult

__all__ = ["ADAM_CONSTANTS", "adam_constants", "adam_constant_tuple", "auxk_requested",
           "auxk_active", "auxk_weight", "explained_variance", "loud_loss", "relu_step_result",
           "topk_step_result", "min_active", "FLOAT32_MAX", "matryoshka_levels",
           "matryoshka_step_result", "jumprelu_default_mode", "bf16_row_norms",
           "bf16_cut_margin"]

#: float32's largest finite value. Backends sum losses in float64, so a sum
#: past it would still look finite; :func:`loud_loss` reports it as inf, as
#: the float32 reference does.
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: The order of Adam's constants in :func:`adam_constants`'s array (and the
#: indices kernels use): ``beta1, beta2, 1 - beta1, 1 - beta2, lr, eps,
#: 1 - beta1**t, 1 - beta2**t`` with ``t`` the 1-based step.
ADAM_CONSTANTS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "lr", "eps",
                  "bias_correction1", "bias_correction2")


def adam_constants(lr, beta1, beta2, eps, t) -> np.ndarray:
    """Adam's constants for 1-based step ``t`` as float32 ``[8]`` in the order
    of :data:`ADAM_CONSTANTS`. Each is computed in double precision and
    rounded to float32 once (PyTorch semantics in float32)."""
    return np.array([beta1, beta2, 1.0 - beta1, 1.0 - beta2, lr, eps,
                     1.0 - beta1 ** t, 1.0 - beta2 ** t], dtype=np.float32)


def adam_constant_tuple(lr, beta1, beta2, eps, t) -> tuple:
    """:func:`adam_constants` as a tuple of ``np.float32`` scalars (for kernels
    that take them as scalar arguments), same order, same values."""
    return tuple(adam_constants(lr, beta1, beta2, eps, t))


def auxk_requested(dead_mask, k_aux, aux_coefficient) -> bool:
    """The part of :func:`auxk_active` that does not read the mask: a mask
    is given, ``k_aux > 0`` and ``aux_coefficient > 0`` (a device backend
    fetches the mask only when this holds)."""
    return bool(dead_mask is not None and int(k_aux) > 0 and float(aux_coefficient) > 0)


def auxk_active(dead_mask, k_aux, aux_coefficient) -> bool:
    """Whether a TopK/BatchTopK step computes the AuxK term: a dead mask with
    at least one dead latent, ``k_aux > 0`` and ``aux_coefficient > 0``."""
    return auxk_requested(dead_mask, k_aux, aux_coefficient) and bool(
        np.any(np.asarray(dead_mask)))


def auxk_weight(dead_mask, k_aux, aux_coefficient) -> float:
    """Weight of the AuxK term: ``aux_coefficient * min(n_dead / k_aux, 1)``
    (0 when ``k_aux`` is 0), as in OpenAI's TopK code."""
    if not int(k_aux):
        return 0.0
    n_dead = int(np.count_nonzero(np.asarray(dead_mask)))
    return float(aux_coefficient) * min(n_dead / int(k_aux), 1.0)


def explained_variance(mse: float, var: float) -> float:
    """``1 - mse / var``, where ``var`` is the batch's variance summed over
    ``d_in`` and averaged over rows (the same normalization as ``mse``); a
    batch with no variance counts as fully explained (1.0)."""
    mse, var = float(mse), float(var)
    return 1.0 - mse / var if var > 0 else 1.0


def loud_loss(value, params_finite: bool = True) -> float:
    """A loss as a float, finite or loud: NaN when the step left a parameter
    inf or NaN (``params_finite`` false: the model is no longer usable,
    whatever this batch measured), ``inf`` when it exceeds float32's range
    (a float64 sum of float32 squares can hold 1e59; the float32 reference
    cannot), else the value."""
    v = float(value)
    if not params_finite:
        return float("nan")
    return float("inf") if v > FLOAT32_MAX else (-float("inf") if v < -FLOAT32_MAX else v)


def relu_step_result(mse, l1, nnz, n_rows, var, params_finite: bool = True) -> StepResult:
    """The result of one ReLU (L1) step: losses as floats (see
    :func:`loud_loss`; ``params_finite``: every updated parameter is finite),
    ``l0 = nnz / N``."""
    mse, l1 = loud_loss(mse, params_finite), loud_loss(l1, params_finite)
    return StepResult(mse=mse, l1=l1, total=loud_loss(mse + l1), l0=float(nnz) / int(n_rows),
                      explained_variance=explained_variance(mse, var))


def min_active(values) -> float:
    """Smallest selected activation of a step (0 when none was selected): what
    the trainer's BatchTopK threshold estimate is fed."""
    return float(values.min()) if values.size else 0.0


def topk_step_result(mse, aux, nnz, n_rows, var, values,
                     params_finite: bool = True) -> StepResult:
    """The result of one TopK/BatchTopK step (no L1 term; ``aux`` is the AuxK
    loss, already weighted; losses finite or loud as in
    :func:`relu_step_result`); ``extra["min_active"]`` from the kept values."""
    mse, aux = loud_loss(mse, params_finite), loud_loss(aux, params_finite)
    return StepResult(mse=mse, l1=0.0, total=loud_loss(mse + aux), l0=float(nnz) / int(n_rows),
                      explained_variance=explained_variance(mse, var), aux=aux,
                      extra={"min_active": min_active(values)})


def jumprelu_step_result(mse, l0_loss, nnz, n_rows, var,
                         params_finite: bool = True, aux: float = 0.0) -> StepResult:
    """The result of one JumpReLU step: ``extra["l0_loss"]`` is the weighted
    sparsity term (``l0_coefficient * nnz / N`` in ``"step"`` mode), ``aux``
    the weighted pre-activation loss, both in ``total``; no L1 term;
    ``params_finite`` covers the four parameters and ``log_threshold``."""
    mse, l0_loss = loud_loss(mse, params_finite), loud_loss(l0_loss, params_finite)
    aux = loud_loss(aux, params_finite)
    return StepResult(mse=mse, l1=0.0, total=loud_loss(mse + l0_loss + aux), aux=aux,
                      l0=float(nnz) / int(n_rows), explained_variance=explained_variance(mse, var),
                      extra={"l0_loss": l0_loss})


def jumprelu_window(log_threshold, bandwidth):
    """``(theta, lo, hi)`` per feature in ``log_threshold``'s dtype: JumpReLU's
    thresholds ``exp(log_threshold)`` and the open window ``lo < pre < hi``
    of the rectangle kernel, ``theta -/+ bandwidth / 2`` (see the reference's
    JumpReLU section). Every backend computes them with this function, so
    window membership agrees bit for bit given the same pre-activations."""
    theta = np.exp(log_threshold)
    half = log_threshold.dtype.type(0.5 * bandwidth)
    return theta, theta - half, theta + half


# bf16 products: the unit roundoff of bfloat16 (8 significant bits) and of float32
_U16 = 2.0 ** -8
_U32 = 2.0 ** -24


def bf16_row_norms(xc) -> np.ndarray:
    """``||xc_i||_2`` per row of float32 ``xc [N, d_in]`` as float32, rounded
    up (summed in float64, then widened by ``2^-22`` before the cast): never
    below the true norm, as :func:`bf16_cut_margin`'s bound needs. The C
    kernel (``kernels/c/bf16_encode.c``) computes the same."""
    r = np.sqrt(np.einsum("ij,ij->i", xc, xc, dtype=np.float64)) * (1.0 + 2.0 ** -22)
    return r.astype(np.float32)


def bf16_cut_margin(cut, b_enc, WT):
    """``(base, scale)`` float32 ``[d_sae]`` each: the lowered bf16 cut that
    makes the bf16 threshold selection exact (JumpReLU's training step,
    issue 13).

    Every entry whose float32 pre-activation (``xc_i . w_j + b_j``, summed in
    float32 in any order) is above ``cut[j]`` has a bf16 pre-activation
    (``bf16(xc_i) . bf16(w_j) + b_j``, products exact, summed in float32 in
    any order, DAZ/FTZ allowed) above ``base[j] - r_i * scale[j]``, where
    ``r_i >= ||xc_i||_2`` (:func:`bf16_row_norms`): the two differ by at most

        (2u + u^2 + 2 gamma_n (1+u)^2 + 2 u32 (1+gamma_n)(1+u)^2) |xc_i| |w_j|
        + 2 u32 |b_j| + (subnormal terms, at most n 2^-125 (|xc_i| + |w_j| + 1))

    (``u = 2^-8``, ``u32 = 2^-24``, ``gamma_n = n u32 / (1 - n u32)``, ``n =
    d_in``; Cauchy-Schwarz bounds ``sum_k |xc_ik w_kj|``), and the margin
    computed here is at least that, with the float32 roundings of the norms
    (``np.einsum`` over ``WT``'s rows), of this function's casts and of the
    kernel's ``base - r * scale`` widened away. So selecting ``pre_b > base -
    r * scale`` and then keeping ``pre > cut`` gives exactly the entries with
    ``pre > cut``, at the price of the candidates inside the margin (about
    0.2 standard deviations of ``pre`` at d_in 512).

    ``cut`` float32 ``[d_sae]`` (JumpReLU's ``lo``), ``b_enc`` float32
    ``[d_sae]``, ``WT`` float32 ``[d_sae, d_in]`` (``W_enc``'s transpose, C
    order: the bf16 copy's ``WT``)."""
    cut = np.asarray(cut, dtype=np.float64)
    n = int(WT.shape[1])
    g = n * _U32 / (1.0 - n * _U32) if n * _U32 < 0.5 else np.inf
    one_u = (1.0 + _U16) ** 2
    rel = 2 * _U16 + _U16 ** 2 + 2 * g * one_u + 2 * _U32 * (1 + g) * one_u
    norms = np.sqrt(np.einsum("ij,ij->i", WT, WT)).astype(np.float64)
    # the float32 sum of squares and its sqrt may be low by gamma_n + u32
    # flushed subnormal operands (DAZ) lose at most 2^-126 |w_kj| or 2^-126 |xc_ik| per
    # term, flushed products (FTZ) 2^-126 each: the n 2^-125 terms below
    tiny = n * 2.0 ** -125
    scale = (rel * norms * (1.0 + g + 2 * _U32) + tiny) * (1.0 + 2.0 ** -20)
    with np.errstate(over="ignore", invalid="ignore"):
        scale32 = np.nextafter(np.minimum(scale, FLOAT32_MAX).astype(np.float32), np.float32(np.inf))
    scale32 = np.minimum(scale32, np.float32(FLOAT32_MAX))
    slack = (2 * _U32 * (1.0 + 2.0 ** -10) * np.abs(np.asarray(b_enc, dtype=np.float64))
             + 2.0 ** -20 * np.abs(cut) + tiny * (norms + 2.0))
    base = np.nextafter((cut - slack).astype(np.float32), np.float32(-np.inf))
    return base, scale32


def jumprelu_default_mode(sparsity, dead_mask) -> bool:
    """Whether a JumpReLU call with this (checked) ``sparsity`` (a
    :class:`~fastsae.JumpReLUSparsity` or None) and ``dead_mask`` (bool
    ``[d_sae]`` on the host, or None) is the default one, which every
    backend runs with its step kernels bit for bit: no sparsity, or
    ``"step"`` with no pre-activation loss acting (coefficient 0, or no
    dead feature)."""
    if sparsity is None:
        return True
    acting = (sparsity.pre_act_coefficient > 0 and dead_mask is not None
              and bool(np.asarray(dead_mask).any()))
    return sparsity.mode == "step" and not acting


def matryoshka_levels(widths, d_sae: int) -> np.ndarray:
    """int32 ``[d_sae]``: the Matryoshka level of each feature, the index
    ``g`` of the first width with ``j < widths[g]`` (so features
    ``widths[g-1] <= j < widths[g]`` are level ``g``, and a feature of level
    ``g`` is in the reconstructions of prefixes ``g, g+1, ..., L-1``)."""
    return np.searchsorted(np.asarray(widths, np.int64), np.arange(d_sae),
                           side="right").astype(np.int32)


def matryoshka_step_result(prefix_sq, aux, nnz, n_rows, var, values,
                           params_finite: bool = True) -> StepResult:
    """The result of one Matryoshka BatchTopK step from the per-prefix sums
    of squared errors ``prefix_sq`` (length L, the last the full
    reconstruction's): ``mse`` is the full one, ``total = sum of the
    prefixes' mse + aux``; ``extra`` adds ``prefix_mse`` and
    ``prefix_explained_variance`` (tuples, one per width) to the BatchTopK
    ``min_active``."""
    n = int(n_rows)
    pm = tuple(loud_loss(float(s) / n, params_finite) for s in prefix_sq)
    aux = loud_loss(aux, params_finite)
    r = StepResult(mse=pm[-1], l1=0.0, total=loud_loss(sum(pm) + aux),
                   l0=float(nnz) / n, explained_variance=explained_variance(pm[-1], var),
                   aux=aux, extra={"min_active": min_active(values)})
    r.extra["prefix_mse"] = pm
    r.extra["prefix_explained_variance"] = tuple(explained_variance(m, var) for m in pm)
    return r
