"""The NumPy reference backend: readable, obviously correct, dense.

This module is the oracle every fast backend is tested and benchmarked
against. Each function here is written for clarity, not speed: dense
matrices, one NumPy expression per formula. The functions take already
validated arrays (see :mod:`fastsae.backends` for the public, validating
entry points) and work in the dtype they are given, so the finite-difference
tests can run them in float64.

Conventions shared by every backend
-----------------------------------
* ``pre = (x - b_dec) @ W_enc + b_enc`` and ``f = relu(pre)``.
* ``x_hat = f @ W_dec + b_dec``.
* ``mse = mean_i sum_k (x_hat_ik - x_ik)**2`` (summed over ``d_in``,
  averaged over the ``N`` rows).
* ``l1 = l1_coefficient * mean_i sum_j f_ij * n_j`` with ``n_j = ||W_dec[j]||``
  in ``"weighted_l1"`` mode and ``n_j = 1`` in ``"unit_norm"`` mode.
* ``total = mse + l1``.
* The ReLU's derivative at ``pre == 0`` is taken as 0; a zero-norm decoder row
  has derivative 0 for its norm.
* Transcoders (``y`` given to a gradient or step function): the encoder
  reads the input as it is, ``pre = x @ W_enc + b_enc`` (no ``b_dec``: it
  is ``d_out`` wide), and the reconstruction of the target ``y [N, d_out]``
  is ``y_hat = f @ W_dec + b_dec (+ x @ W_skip.T`` for a skip transcoder,
  ``params.W_skip`` not ``None``); every loss, explained variance and AuxK
  residual is taken against ``y``. The encoders take the input centering
  as their ``b_dec`` argument: an SAE passes its ``b_dec``, a transcoder
  zeros (:func:`input_centering`). ``W_skip``'s gradient is
  ``dL/dy_hat.T @ x`` (one dense GEMM); Adam updates it with the rest.
* ``"unit_norm"`` gradients of ``W_dec`` have the component parallel to each
  row removed: ``g_j - (g_j . w_j) w_j / ||w_j||**2``.
* Adam as in PyTorch: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
  ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)`` with ``t``
  the 1-based step; in ``"unit_norm"`` mode decoder rows are then rescaled to
  unit norm.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from threadpoolctl import threadpool_info, threadpool_limits

from ..params import AdamState, JumpReLUSparsity, Losses, SAEParams, StepResult
from ..sparse import SparseCodes
from .host import synchronize, to_backend, to_numpy  # noqa: F401  (contract: placement)
from .numerics import (auxk_active, auxk_weight, bf16_cut_margin, bf16_row_norms,
                       jumprelu_step_result, matryoshka_step_result, min_active)
from .numerics import jumprelu_window as _jumprelu_window
from .numerics import explained_variance as _explained_variance

from .contract import NAMES as _CONTRACT

#: The contract, plus the oracle's own building blocks that tests use.
__all__ = list(_CONTRACT) + ["pre_activations", "losses", "adam_update",
                             "normalize_decoder_rows", "explained_variance", "encode_topk_aux",
                             "aux_scale", "jumprelu_window", "adam_vector",
                             "input_centering", "reconstruct", "jumprelu_sparsity_arg",
                             "bf16_jumprelu_candidates"]

NAME = "numpy"
DESCRIPTION = "dense NumPy reference (the oracle)"
DEVICE_ARRAYS = False
AUTO_SELECT = True


def check_available() -> None:
    """The reference needs nothing but NumPy: always usable."""
    return None


# The reference's only parallelism is NumPy's BLAS; its thread count is the
# BLAS pools' (threadpoolctl), set for this process by set_num_threads.


def get_num_threads() -> int:
    """Threads of the BLAS library NumPy calls (the largest pool's)."""
    pools = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(pools) if pools else 1


#: BLAS threads when fastsae was imported: what ``set_num_threads(None)``
#: goes back to (read once, ~6 ms, before anything here limits the pools).
_default_threads = get_num_threads()


def set_num_threads(n) -> None:
    """Limit NumPy's BLAS to ``n`` threads for this process (``None``: back to
    the count it had when fastsae was imported)."""
    threadpool_limits(limits=_default_threads if n is None else int(n), user_api="blas")


def _dense(codes):
    return codes.to_dense() if isinstance(codes, SparseCodes) else codes


# ---------------------------------------------------------------- SAE or transcoder
def input_centering(params: SAEParams, y=None):
    """What the encoders subtract from their input: ``b_dec`` for an SAE
    (``y`` None), zeros ``[d_in]`` for a transcoder."""
    if y is None:
        return params.b_dec
    return np.zeros(params.d_in, dtype=params.W_enc.dtype)


def _target(x, y):
    """What the reconstruction fits: ``x`` for an SAE, ``y`` for a transcoder."""
    return x if y is None else y


def reconstruct(codes, params: SAEParams, x):
    """The model's output from its codes: ``codes @ W_dec + b_dec``, plus the
    skip term ``x @ W_skip.T`` of a skip transcoder."""
    out = _dense(codes) @ params.W_dec + params.b_dec
    if params.W_skip is not None:
        out = out + x @ params.W_skip.T
    return out


def _encoder_input(x, params: SAEParams, y):
    """The encoder's input as its weights see it: ``x - b_dec`` or ``x``."""
    return x - input_centering(params, y)


def _finish_grads(x, params: SAEParams, y, d_xhat, d_pre, g_W_enc_in, g_W_dec):
    """The gradients from ``dL/dx_hat`` (summed over prefixes) and ``d_pre``:
    ``b_enc``, ``b_dec`` (with the centering's term for an SAE) and
    ``W_skip``'s ``d_xhat.T @ x``. ``g_W_enc_in`` is ``W_enc``'s."""
    g_b_enc = d_pre.sum(axis=0)
    g_b_dec = d_xhat.sum(axis=0)
    if y is None:
        g_b_dec = g_b_dec - g_b_enc @ params.W_enc.T
    g_skip = None if params.W_skip is None else d_xhat.T @ x
    return SAEParams(g_W_enc_in, g_b_enc, g_W_dec, g_b_dec, g_skip)


# ---------------------------------------------------------------- forward
def pre_activations(x, W_enc, b_enc, b_dec):
    """``(x - b_dec) @ W_enc + b_enc``, dense ``[N, d_sae]``."""
    return (x - b_dec) @ W_enc + b_enc


def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense ``[N, d_sae]``: ``pre``
    where ``pre > 0``, else 0. A NaN pre-activation (only float32 overflow
    inside the product makes one: ``inf - inf``) does not fire, as in every
    backend's kernels; a pre-activation that overflows to ``+inf`` fires
    with code ``inf``."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    return np.where(pre > 0, pre, 0).astype(pre.dtype)


def encode_relu_sparse(x, W_enc, b_enc, b_dec, *, precision="fp32"):
    """:func:`encode_relu` as :class:`SparseCodes`; ``precision="bf16"``: see
    :func:`bf16_pre_activations` (an entry is kept where both its bf16 and its
    float32 pre-activation are > 0; its value is the float32 one)."""
    if precision == "bf16":
        pre, pre_b = bf16_pre_activations(x, W_enc, b_enc, b_dec)
        return SparseCodes.from_dense(np.where((pre_b > 0) & (pre > 0), pre, 0).astype(pre.dtype))
    return SparseCodes.from_dense(encode_relu(x, W_enc, b_enc, b_dec))


# ---------------------------------------------------------------- bfloat16
def bf16_round(a):
    """float32 values rounded to the nearest bfloat16 (ties to even), as
    float32: the top 16 bits after rounding. NaN stays NaN (quiet), infinities
    stay, values past bfloat16's largest finite one round to infinity."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    nan = np.isnan(a)
    r[nan] = (u[nan].astype(np.uint32) | 0x00400000) & 0xFFFF0000
    return r.view(np.float32).reshape(a.shape)


def bf16_pre_activations(x, W_enc, b_enc, b_dec):
    """``(pre, pre_b)``: the float32 pre-activations ``(x - b_dec) @ W_enc +
    b_enc`` and the bfloat16 product's, ``bf16(x - b_dec) @ bf16(W_enc) +
    b_enc`` (each operand rounded to bfloat16, the products summed in float64
    here; the compiled kernels sum in float32, in their own order).

    ``precision="bf16"`` encoders select from ``pre_b`` and keep ``pre``'s
    values: only the support can differ from float32, and only where ``pre``
    and ``pre_b`` fall on different sides of the cut."""
    xc = x - b_dec
    return xc @ W_enc + b_enc, _bf16_product(xc, W_enc, b_enc)


def _bf16_product(xc, W_enc, b_enc):
    """``bf16(xc) @ bf16(W_enc) + b_enc``, the products summed in float64."""
    return bf16_round(xc).astype(np.float64) @ bf16_round(W_enc).astype(np.float64) + b_enc


def decode(codes, W_dec, b_dec):
    """``f @ W_dec + b_dec``, dense ``[N, d_in]``; codes dense or sparse."""
    return _dense(codes) @ W_dec + b_dec


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row, ``[d_sae]``."""
    return np.sqrt(np.sum(W_dec * W_dec, axis=1))


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` where ``f_ij > 0``, zero elsewhere.

    Same kind as ``codes``: dense in, dense out; sparse in, sparse out (same
    sparsity pattern; a stored entry that is not positive gets 0, as in the
    dense rule).
    """
    if isinstance(codes, SparseCodes):
        vals = np.where(codes.values > 0, l1_coefficient * norms[codes.indices],
                        0).astype(codes.values.dtype)
        return SparseCodes(codes.indptr.copy(), codes.indices.copy(), vals, codes.shape)
    return np.where(codes > 0, l1_coefficient * norms[None, :], 0).astype(codes.dtype)


# ---------------------------------------------------------------- losses
def losses(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm):
    """Loss parts (see module docstring) as Python floats."""
    f = _dense(codes)
    n = x.shape[0]
    mse = float(np.sum((x_hat - x) ** 2) / n)
    if decoder_norm == "weighted_l1":
        w = decoder_column_norms(params.W_dec)
    else:
        w = np.ones(params.d_sae, dtype=x.dtype)
    l1 = float(l1_coefficient * np.sum(f * w[None, :]) / n)
    return Losses(mse=mse, l1=l1, total=mse + l1)


def _project_out_parallel(g_W_dec, W_dec):
    """Remove from each row of the gradient its component along the row."""
    sq = np.sum(W_dec * W_dec, axis=1, keepdims=True)
    coef = np.divide(np.sum(g_W_dec * W_dec, axis=1, keepdims=True), sq,
                     out=np.zeros_like(sq), where=sq > 0)
    return g_W_dec - coef * W_dec


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm, y=None):
    """Loss parts and gradients of ``total`` w.r.t. every parameter.

    ``codes`` (dense or sparse) must be ``encode_relu`` of ``x`` under
    ``params`` and ``x_hat`` its reconstruction (:func:`reconstruct`).
    ``y``: a transcoder's target (see the module docstring). Returns
    ``(Losses, SAEParams)`` with the gradients in the parameters' layouts. In
    ``"unit_norm"`` mode the ``W_dec`` gradient is projected (parallel
    component removed).
    """
    f = _dense(codes)
    n = x.shape[0]
    t = _target(x, y)
    W_dec = params.W_dec
    d_xhat = 2.0 * (x_hat - t) / n  # dL/dx_hat
    norms = decoder_column_norms(W_dec)
    if decoder_norm == "weighted_l1":
        penalty = norms
    else:
        penalty = np.ones_like(norms)

    # decoder: x_hat = f @ W_dec + b_dec
    g_W_dec = f.T @ d_xhat
    if decoder_norm == "weighted_l1":
        # d/dW_dec[j] of l1c/n * sum_i f_ij ||W_dec[j]||
        unit = np.divide(W_dec, norms[:, None], out=np.zeros_like(W_dec),
                         where=norms[:, None] > 0)
        g_W_dec = g_W_dec + (l1_coefficient / n) * f.sum(axis=0)[:, None] * unit

    # through the codes: dL/df, then the ReLU
    d_f = d_xhat @ W_dec.T + (l1_coefficient / n) * penalty[None, :]
    d_pre = np.where(f > 0, d_f, 0)

    # encoder: pre = (x - b_dec) @ W_enc + b_enc (a transcoder: x @ W_enc + b_enc)
    g_W_enc = _encoder_input(x, params, y).T @ d_pre
    if decoder_norm == "unit_norm":
        g_W_dec = _project_out_parallel(g_W_dec, W_dec)
    grads = _finish_grads(x, params, y, d_xhat, d_pre, g_W_enc, g_W_dec)
    return losses(t, params, f, x_hat, l1_coefficient, decoder_norm), grads


# ---------------------------------------------------------------- optimizer
def adam_update(params: SAEParams, grads: SAEParams, state: AdamState, lr,
                beta1, beta2, eps):
    """One Adam update of every parameter, in place; advances ``state.step``."""
    t = state.step + 1
    for name in params.names:
        p, g = getattr(params, name), getattr(grads, name)
        m, v = getattr(state.m, name), getattr(state.v, name)
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(p.dtype)
    state.step = t


def normalize_decoder_rows(W_dec):
    """Rescale each nonzero row of ``W_dec`` to unit L2 norm, in place."""
    norms = decoder_column_norms(W_dec)
    W_dec /= np.where(norms > 0, norms, 1)[:, None]


def explained_variance(x, mse):
    """``1 - mse / mean_i ||x_i - mean(x)||**2`` (1.0 for a constant batch)."""
    return _explained_variance(mse, _batch_variance(x))


def _batch_variance(x) -> float:
    """``mean_i ||x_i - mean(x)||**2``."""
    return float(np.sum((x - x.mean(axis=0)) ** 2) / x.shape[0])


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None, y=None, precision="fp32") -> StepResult:
    """Forward, backward and Adam update on one batch, in place.

    ``fire_counts`` (int64 ``[d_sae]``, optional) is incremented by the
    number of rows in which each feature fired. ``y``: a transcoder's target
    (module docstring). Returns the batch's losses, L0 and explained
    variance (of the target), measured before the update.
    ``precision="bf16"``: the codes of :func:`encode_relu_sparse`'s bf16
    rule (values float32), the rest of the step as in float32. (The
    compiled backends run their float32 step instead where the last step's
    codes were dense; see :mod:`fastsae.backends.bf16`.)
    """
    b_c = input_centering(params, y)
    if precision == "bf16":
        f = encode_relu_sparse(x, params.W_enc, params.b_enc, b_c, precision="bf16").to_dense()
    else:
        f = encode_relu(x, params.W_enc, params.b_enc, b_c)
    x_hat = reconstruct(f, params, x)
    loss, grads = gradients(x, params, f, x_hat, l1_coefficient, decoder_norm, y)
    adam_update(params, grads, state, lr, beta1, beta2, eps)
    if decoder_norm == "unit_norm":
        normalize_decoder_rows(params.W_dec)
    active = f > 0
    if fire_counts is not None:
        fire_counts += active.sum(axis=0)
    return _finite_or_loud(StepResult(mse=loss.mse, l1=loss.l1, total=loss.total,
                                      l0=float(active.sum() / x.shape[0]),
                                      explained_variance=explained_variance(_target(x, y),
                                                                            loss.mse)),
                           params, "l1")


def _finite_or_loud(r: StepResult, params: SAEParams, penalty: str) -> StepResult:
    """The step's losses (``mse``, ``total`` and the ``penalty`` term, ``l1``
    or ``aux``) NaN when the update left any parameter inf or NaN: the rule
    of :func:`fastsae.backends.numerics.loud_loss`, which every backend
    follows (the oracle can afford the scan)."""
    if all(np.isfinite(a).all() for a in params.arrays()):
        return r
    nan = float("nan")
    return replace(r, mse=nan, total=nan, explained_variance=nan, **{penalty: nan})


# ---------------------------------------------------------------- TopK family
# Selection rule shared by every backend: larger pre-activation first, ties
# broken by the lower feature index (BatchTopK: by the lower row-major flat
# index, i.e. lower row first, then lower feature). ReLU is applied after the
# selection, and entries it zeroes are dropped, so a TopK row holds at most k
# entries. Codes are canonical CSR (indices increasing in each row).

def _select_rows(pre, k):
    """Indices of the k largest entries of each row (ties: lower index)."""
    order = np.argsort(-pre, axis=1, kind="stable")
    return order[:, :k]


def _codes_from_selection(pre, rows, cols):
    vals = pre[rows, cols]
    keep = vals > 0
    f = np.zeros(pre.shape, dtype=pre.dtype)
    f[rows[keep], cols[keep]] = vals[keep]
    return SparseCodes.from_dense(f) if pre.dtype == np.float32 else _sparse64(f)


def _sparse64(f):
    """SparseCodes holding float64 values (finite-difference tests only)."""
    c = SparseCodes.from_dense(f.astype(np.float32))
    rows = np.repeat(np.arange(f.shape[0]), np.diff(c.indptr))
    return SparseCodes(c.indptr, c.indices, f[rows, c.indices], c.shape)


def encode_topk(x, W_enc, b_enc, b_dec, k, *, precision="fp32"):
    """Per row, the ``k`` largest pre-activations, then ReLU -> SparseCodes.

    ``precision="bf16"``: per row the ``m = tunables.bf16_topk_candidates(k,
    d_sae)`` largest bf16 pre-activations (ties: lower index) are the
    candidates; among them the ``k`` largest float32 ones (ties: lower index)
    are selected, then ReLU; values are float32's."""
    if precision == "bf16":
        from .tunables import bf16_topk_candidates

        pre, pre_b = bf16_pre_activations(x, W_enc, b_enc, b_dec)
        k = min(int(k), pre.shape[1])
        cand = _select_rows(pre_b, bf16_topk_candidates(k, pre.shape[1]))
        cand = np.sort(cand, axis=1)  # lower index first, so stable ties prefer it
        local = _select_rows(np.take_along_axis(pre, cand, axis=1), k)
        cols = np.take_along_axis(cand, local, axis=1)
        rows = np.repeat(np.arange(pre.shape[0]), k)
        return _codes_from_selection(pre, rows, cols.ravel())
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    k = min(int(k), pre.shape[1])
    cols = _select_rows(pre, k)
    rows = np.repeat(np.arange(pre.shape[0]), k)
    return _codes_from_selection(pre, rows, cols.ravel())


def encode_batchtopk(x, W_enc, b_enc, b_dec, k, *, precision="fp32"):
    """The ``N * k`` largest pre-activations of the whole batch, then ReLU.

    ``precision="bf16"``: the candidates are the ``N * m`` largest positive
    bf16 pre-activations of the batch (``m = tunables.bf16_topk_candidates(k,
    d_sae)``; ties: row-major order; all of them when fewer are positive);
    among them the ``N * min(k, d_sae)`` largest float32 ones (ties: row-major
    order) are selected, then ReLU; values are float32's. Only bf16-positive
    entries are candidates, as the ReLU rule keeps an entry only where both
    pre-activations are > 0."""
    if precision == "bf16":
        from .tunables import bf16_topk_candidates

        pre, pre_b = bf16_pre_activations(x, W_enc, b_enc, b_dec)
        n, d_sae = pre.shape
        k = min(int(k), d_sae)
        flat_b = pre_b.ravel()
        pos = np.flatnonzero(flat_b > 0)  # increasing flat index: stable ties are row-major
        cand = pos[np.argsort(-flat_b[pos], kind="stable")[:n * bf16_topk_candidates(k, d_sae)]]
        cand = np.sort(cand)
        sel = cand[np.argsort(-pre.ravel()[cand], kind="stable")[:n * k]]
        rows, cols = np.divmod(sel, d_sae)
        return _codes_from_selection(pre, rows, cols)
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    total = min(int(k) * pre.shape[0], pre.size)
    flat = np.argsort(-pre.ravel(), kind="stable")[:total]
    rows, cols = np.divmod(flat, pre.shape[1])
    return _codes_from_selection(pre, rows, cols)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, *, precision="fp32"):
    """``relu(pre) * (pre > threshold)`` per feature -> SparseCodes (how a
    BatchTopK SAE runs at inference, and SAELens's ``jumprelu``).
    ``precision="bf16"``: kept where both the bf16 and the float32
    pre-activation exceed ``max(threshold, 0)``; values are float32's."""
    if precision == "bf16":
        pre, pre_b = bf16_pre_activations(x, W_enc, b_enc, b_dec)
        cut = np.maximum(threshold, 0)[None, :]
        return SparseCodes.from_dense(np.where((pre_b > cut) & (pre > cut), pre, 0)
                                      .astype(pre.dtype))
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    f = np.where((pre > threshold[None, :]) & (pre > 0), pre, 0).astype(pre.dtype)
    return SparseCodes.from_dense(f) if pre.dtype == np.float32 else _sparse64(f)


def encode_topk_aux(x, W_enc, b_enc, b_dec, dead_mask, k_aux):
    """AuxK selection: per row, the ``k_aux`` largest pre-activations among
    dead features (``dead_mask`` bool ``[d_sae]``), then ReLU (as OpenAI's
    reference code does; SAELens keeps negative selected values)."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    dead = np.flatnonzero(dead_mask)
    k = min(int(k_aux), dead.size)
    if k == 0:
        return _codes_from_selection(pre, np.zeros(0, int), np.zeros(0, int))
    local = _select_rows(pre[:, dead], k)
    rows = np.repeat(np.arange(pre.shape[0]), k)
    return _codes_from_selection(pre, rows, dead[local.ravel()])


#: Weight of the AuxK term, ``aux_coefficient * min(n_dead / k_aux, 1)`` (as
#: SAELens scales it, so few dead latents give a small loss); shared by every
#: backend (:func:`fastsae.backends.numerics.auxk_weight`).
aux_scale = auxk_weight


def _auxk_selection(x, params: SAEParams, dead_mask, k_aux, aux_coefficient, y=None):
    """A training step's AuxK ``(codes, weight)``; ``(None, 0.0)`` when off."""
    if not auxk_active(dead_mask, k_aux, aux_coefficient):
        return None, 0.0
    return (encode_topk_aux(x, params.W_enc, params.b_enc, input_centering(params, y),
                            dead_mask, k_aux),
            aux_scale(dead_mask, k_aux, aux_coefficient))


def _auxk_terms(x, x_hat, W_dec, aux_codes, aux_weight):
    """AuxK's ``(loss, W_dec gradient, d_pre)``: ``e_hat = aux_codes @ W_dec``
    fits the held-constant residual ``x - x_hat`` (``x`` the target: a
    transcoder's ``y``); zeros when AuxK is off."""
    n = x.shape[0]
    if aux_codes is None or aux_weight <= 0:
        return 0.0, 0.0, 0.0
    fa = _dense(aux_codes)
    err = fa @ W_dec - (x - x_hat)
    d_ehat = aux_weight * 2.0 * err / n
    return (float(aux_weight * np.sum(err ** 2) / n), fa.T @ d_ehat,
            np.where(fa > 0, d_ehat @ W_dec.T, 0))


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0, y=None):
    """Losses and gradients for TopK/BatchTopK training (unit-norm decoder);
    ``y`` a transcoder's target (module docstring).

    ``mse`` as for ReLU SAEs, no L1 term. With ``aux_codes`` (AuxK selection,
    see :func:`encode_topk_aux`) and ``aux_weight`` (see :func:`aux_scale`),
    ``aux = aux_weight * mean_i ||e_hat_i - e_i||**2`` with ``e = x - x_hat``
    held constant and ``e_hat = aux_codes @ W_dec`` (no bias); ``total =
    mse + aux``. Gradients flow only through selected entries. The ``W_dec``
    gradient has its component parallel to each row removed.
    """
    f = _dense(codes)
    n = x.shape[0]
    t = _target(x, y)
    W_dec = params.W_dec
    d_xhat = 2.0 * (x_hat - t) / n
    g_W_dec = f.T @ d_xhat
    d_pre = np.where(f > 0, d_xhat @ W_dec.T, 0)
    mse = float(np.sum((x_hat - t) ** 2) / n)
    aux, g_aux_W_dec, d_aux_pre = _auxk_terms(t, x_hat, W_dec, aux_codes, aux_weight)
    g_W_dec = _project_out_parallel(g_W_dec + g_aux_W_dec, W_dec)
    d_pre = d_pre + d_aux_pre
    g_W_enc = _encoder_input(x, params, y).T @ d_pre
    return (Losses(mse=mse, l1=0.0, total=mse + aux, aux=aux),
            _finish_grads(x, params, y, d_xhat, d_pre, g_W_enc, g_W_dec))


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
    """One TopK/BatchTopK training step (forward, AuxK, backward, Adam,
    decoder-row renormalization), in place; ``y`` a transcoder's target.
    ``precision="bf16"``: the codes of :func:`encode_topk`'s (or
    :func:`encode_batchtopk`'s) bf16 rule; AuxK's selection stays float32.

    ``dead_mask`` (bool ``[d_sae]``) marks the latents AuxK may use; AuxK is
    on when it is given, ``k_aux > 0`` and ``aux_coefficient > 0``.
    ``StepResult.extra["min_active"]`` is the smallest kept activation of the
    batch (0.0 if none): the trainer's running BatchTopK threshold follows it.
    """
    b_c = input_centering(params, y)
    if activation == "topk":
        codes = encode_topk(x, params.W_enc, params.b_enc, b_c, k, precision=precision)
    else:
        codes = encode_batchtopk(x, params.W_enc, params.b_enc, b_c, k, precision=precision)
    x_hat = reconstruct(codes, params, x)
    aux_codes, weight = _auxk_selection(x, params, dead_mask, k_aux, aux_coefficient, y)
    loss, grads = topk_gradients(x, params, codes, x_hat, aux_codes, weight, y)
    adam_update(params, grads, state, lr, beta1, beta2, eps)
    normalize_decoder_rows(params.W_dec)
    if fire_counts is not None:
        fire_counts += np.bincount(codes.indices, minlength=params.d_sae)
    return _finite_or_loud(
        StepResult(mse=loss.mse, l1=0.0, total=loss.total, l0=codes.l0,
                   explained_variance=explained_variance(_target(x, y), loss.mse), aux=loss.aux,
                   extra={"min_active": min_active(codes.values)}), params, "aux")


# ---------------------------------------------------------------- JumpReLU family
# Training a JumpReLU SAE (Rajamanoharan et al. 2024, as SAELens 6.54 trains
# it in its "step" sparsity mode), with a unit-norm decoder (as Gemma Scope
# trained; gradient of W_dec projected, rows renormalized after each update).
#
#   theta = exp(log_threshold)                  per feature, float32 [d_sae]
#   pre   = (x - b_dec) @ W_enc + b_enc
#   f     = pre * (pre > theta)                 (theta > 0, so relu is implied)
#   x_hat = f @ W_dec + b_dec
#   mse   = mean_i sum_k (x_hat_ik - x_ik)**2
#   l0_loss = l0_coefficient * mean_i sum_j H(pre_ij - theta_j)
#   total = mse + l0_loss
#
# Window (the rectangle kernel of bandwidth eps): lo_j < pre_ij < hi_j with
# lo = theta - 0.5 * eps and hi = theta + 0.5 * eps, both computed once per
# feature in the working dtype (SAELens's -0.5 < (pre - theta) / eps < 0.5,
# up to rounding at the edges; per-feature bounds let a fused encoder test
# each entry with one comparison, pre > lo).
#
# Gradients, with d_f = d_xhat @ W_dec.T, d_xhat = 2 (x_hat - x) / N:
#   pre:   d_pre = d_f where pre > theta (the jump's straight-through part)
#   theta: sum_i over the window of
#            -(theta / eps) * d_f_ij          (JumpReLU's pseudo-derivative)
#            -(1 / eps) * l0_coefficient / N  (Step's, for the L0 term)
#   log_threshold: the theta gradient times theta.
# Only entries with pre > lo are ever needed: the active ones (pre > theta)
# and the window's. Both pseudo-derivatives are exact derivatives of smoothed
# surrogates: S(z) = clip(z / eps + 1/2, 0, 1) replaces H(pre - theta) in the
# L0 term, and theta0 * (S(pre - theta) - S(pre - theta0)) is added to each
# code for the reconstruction term (zero at theta = theta0, the current point).
#
# Other sparsity penalties (JumpReLUSparsity, SAELens 6.54's
# jumprelu_sparsity_loss_mode; c = l0_coefficient, unit-norm rows so
# SAELens's ||W_dec[j]|| factors are 1):
#   "tanh":      l0_loss = c * mean_i sum_j tanh(s * f_ij)    (s = tanh_scale)
#                Its derivative in f, t_ij = (c s / N) (1 - tanh(s f_ij)**2),
#                joins d_f in both places d_f appears above (at inactive
#                entries f = 0, so t = c s / N there); no Step term.
#   "quadratic": l0_loss = c * mean_i 2 / T * (L0_i - T)**2   (T = target_l0,
#                L0_i = active entries of row i). The Step term becomes
#                -(1 / eps) * q_i with q_i = 4 c (L0_i - T) / (N T), per row.
# Pre-activation loss (Anthropic's, SAELens's calculate_pre_act_loss; p =
# pre_act_coefficient, dead = the step's dead_mask):
#   aux = p * mean_i sum_j dead_j * relu(theta_j - pre_ij)
#   d_pre_ij += -(p / N) where dead_j and pre_ij < theta_j   (dense over the
#   theta_j  += +(p / N) * #{i: pre_ij < theta_j}             dead columns)
# so its W_enc gradient is one GEMM over the dead columns, x_c.T @ d_pre.
# The step mode with p = 0 is the original JumpReLU, bit for bit.


#: ``(theta, lo, hi)`` of the window (shared by every backend).
jumprelu_window = _jumprelu_window


def _jumprelu_forward(x, params: SAEParams, log_threshold, bandwidth, y=None,
                      precision="fp32"):
    """``(x - b_dec, pre, theta, active, window)``: the centred batch (a
    transcoder's ``x``), the pre-activations, the thresholds and the active
    and window masks. ``precision="bf16"``: ``pre`` is ``-inf`` wherever the
    bf16 pre-activation is not above the lowered cut of
    :func:`bf16_jumprelu_candidates` (such entries are neither active nor in
    the window; see :func:`train_step_jumprelu`)."""
    xc = _encoder_input(x, params, y)
    pre = xc @ params.W_enc + params.b_enc
    theta, lo, hi = jumprelu_window(log_threshold, bandwidth)
    if precision == "bf16":
        cand = bf16_jumprelu_candidates(xc, params.W_enc, params.b_enc, lo)
        pre = np.where(cand, pre, -np.inf).astype(pre.dtype)
    active = pre > theta[None, :]
    window = (pre > lo[None, :]) & (pre < hi[None, :])
    return xc, pre, theta, active, window


def bf16_jumprelu_candidates(xc, W_enc, b_enc, lo):
    """bool ``[N, d_sae]``: the bf16 JumpReLU step's candidates, the entries
    whose bf16 pre-activation ``pre_b`` (:func:`_bf16_product`) is above
    ``base[j] - r_i * scale[j]`` (:func:`~fastsae.backends.numerics.bf16_cut_margin`
    of ``lo``, :func:`~fastsae.backends.numerics.bf16_row_norms` of ``xc``),
    compared in float64. The margin bounds the bf16 product's error, so every
    entry with a float32 ``pre > lo`` is a candidate: the step that keeps
    ``pre > lo`` among them selects exactly the float32 step's entries."""
    base, scale = bf16_cut_margin(lo, b_enc, np.ascontiguousarray(W_enc.T))
    r = bf16_row_norms(xc).astype(np.float64)
    pre_b = _bf16_product(xc, W_enc, b_enc)
    return pre_b > base[None, :].astype(np.float64) - r[:, None] * scale[None, :]


def jumprelu_sparsity_arg(sparsity):
    """``sparsity`` as a :class:`JumpReLUSparsity` (``None``: the default)."""
    return JumpReLUSparsity() if sparsity is None else sparsity


def jumprelu_gradients(x, params: SAEParams, log_threshold, bandwidth, l0_coefficient,
                       sparsity=None, dead_mask=None, y=None):
    """Losses and gradients of a JumpReLU SAE step (see the section comment);
    ``sparsity`` a :class:`JumpReLUSparsity` or None (``"step"``, no
    pre-activation loss); ``dead_mask`` bool ``[d_sae]`` or None, the
    features the pre-activation loss acts on (None: none); ``y`` a
    transcoder's target (module docstring).

    ``log_threshold`` float ``[d_sae]``. Returns ``(Losses, SAEParams,
    g_log_threshold)``: ``Losses.l0_loss`` holds the weighted sparsity term,
    ``Losses.aux`` the weighted pre-activation loss (``l1`` is 0), the
    ``W_dec`` gradient is projected (parallel component of each row
    removed), ``g_log_threshold`` has ``log_threshold``'s shape.
    """
    return _jumprelu_grads(x, params, log_threshold, bandwidth, l0_coefficient, sparsity,
                           dead_mask, y, "fp32")


def _jumprelu_grads(x, params, log_threshold, bandwidth, l0_coefficient, sparsity, dead_mask,
                    y, precision):
    """:func:`jumprelu_gradients` with ``precision`` (``"bf16"``: as
    :func:`train_step_jumprelu`)."""
    sp = jumprelu_sparsity_arg(sparsity)
    n = x.shape[0]
    t = _target(x, y)
    W_dec = params.W_dec
    dt = x.dtype.type
    xc, pre, theta, active, window = _jumprelu_forward(x, params, log_threshold, bandwidth, y,
                                                       precision)
    f = np.where(active, pre, 0).astype(pre.dtype)
    x_hat = reconstruct(f, params, x)
    d_xhat = 2.0 * (x_hat - t) / n
    g_W_dec = _project_out_parallel(f.T @ d_xhat, W_dec)
    d_f = d_xhat @ W_dec.T
    inv_eps = 1.0 / bandwidth
    c = l0_coefficient
    if sp.mode == "tanh":
        th = np.tanh(dt(sp.tanh_scale) * f)
        d_f = d_f + (dt(c * sp.tanh_scale / n) * (1 - th * th)).astype(pre.dtype)
        step_theta = 0.0
        l0_loss = float(c * th.astype(np.float64).sum() / n)
    elif sp.mode == "quadratic":
        tl0 = float(sp.target_l0)
        err = active.sum(axis=1).astype(np.float64) - tl0
        q = (4.0 * c / (n * tl0)) * err
        step_theta = -(inv_eps * (window * q[:, None]).sum(axis=0)).astype(pre.dtype)
        l0_loss = float(c * np.sum(2.0 / tl0 * err * err) / n)
    else:
        step_theta = -dt(inv_eps * c / n) * window.sum(axis=0)
        l0_loss = float(c * active.sum() / n)
    d_pre = np.where(active, d_f, 0).astype(pre.dtype)
    g_theta = -(theta * dt(inv_eps)) * np.where(window, d_f, 0).sum(axis=0) + step_theta
    aux = 0.0
    if sp.pre_act_coefficient and dead_mask is not None and dead_mask.any():
        p = sp.pre_act_coefficient
        below = (pre < theta[None, :]) & dead_mask[None, :]
        aux = float(p * np.where(below, theta[None, :] - pre, 0).astype(np.float64).sum() / n)
        d_pre = d_pre - dt(p / n) * below
        g_theta = g_theta + dt(p / n) * below.sum(axis=0)
    grads = _finish_grads(x, params, y, d_xhat, d_pre, xc.T @ d_pre, g_W_dec)
    g_log_threshold = (g_theta * theta).astype(log_threshold.dtype)
    mse = float(np.sum((x_hat - t) ** 2) / n)
    return (Losses(mse=mse, l1=0.0, total=mse + l0_loss + aux, aux=aux, l0_loss=l0_loss),
            grads, g_log_threshold)


def adam_vector(p, g, m, v, t, lr, beta1, beta2, eps):
    """Adam on one extra parameter array (the thresholds), in place, at the
    1-based step ``t`` that :func:`adam_update` just used."""
    m[...] = beta1 * m + (1 - beta1) * g
    v[...] = beta2 * v + (1 - beta2) * g * g
    p -= (lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)).astype(p.dtype)


def train_step_jumprelu(params: SAEParams, state: AdamState, x, *, log_threshold,
                        threshold_m, threshold_v, bandwidth, l0_coefficient, lr, beta1=0.9,
                        beta2=0.999, eps=1e-8, fire_counts=None, sparsity=None,
                        dead_mask=None, y=None, precision="fp32") -> StepResult:
    """One JumpReLU training step (forward, backward, Adam on the four
    parameters and on ``log_threshold`` with its moments ``threshold_m``,
    ``threshold_v`` at the same step ``t``, decoder-row renormalization), in
    place. ``StepResult.extra["l0_loss"]`` is the weighted sparsity term,
    ``aux`` the weighted pre-activation loss (``sparsity``, ``dead_mask``
    as :func:`jumprelu_gradients`); ``l0`` the measured L0 (active entries
    per row); ``y`` a transcoder's target.

    ``precision="bf16"`` (the default sparsity mode only: ``"step"`` with no
    pre-activation loss acting): the step needs only the entries above the
    window's low edge ``lo = theta - bandwidth / 2``; the candidates are
    selected by the bfloat16 product below a cut lowered by a bound on its
    error (:func:`bf16_jumprelu_candidates`) and their float32 ``pre`` is
    used; every other entry counts as below ``lo`` (neither active nor in
    the window). The bound makes every entry with ``pre > lo`` a candidate,
    so the step's entries are the float32 step's (the earlier rule, ``pre_b
    > lo``, dropped window entries whose bf16 product fell below ``lo``, at
    random where the bandwidth is not far wider than the bf16 error). The
    rest of the step is float32."""
    active = _jumprelu_forward(x, params, log_threshold, bandwidth, y, precision)[3]
    loss, grads, g_lt = _jumprelu_grads(x, params, log_threshold, bandwidth, l0_coefficient,
                                        sparsity, dead_mask, y, precision)
    adam_update(params, grads, state, lr, beta1, beta2, eps)
    adam_vector(log_threshold, g_lt, threshold_m, threshold_v, state.step, lr, beta1, beta2, eps)
    normalize_decoder_rows(params.W_dec)
    if fire_counts is not None:
        fire_counts += active.sum(axis=0)
    finite = (all(np.isfinite(a).all() for a in params.arrays())
              and bool(np.isfinite(log_threshold).all()))
    return jumprelu_step_result(loss.mse, loss.l0_loss, int(active.sum()), x.shape[0],
                                _batch_variance(_target(x, y)), finite, aux=loss.aux)


# ---------------------------------------------------------------- Matryoshka family
# Matryoshka BatchTopK (Bussmann et al. 2025; SAELens 6.54's
# matryoshka_batchtopk with use_matryoshka_aux_loss false): the BatchTopK
# codes f of the batch, selected once, and L nested prefixes of the
# dictionary given by strictly increasing widths w_0 < ... < w_{L-1} = d_sae.
# Unit-norm decoder, as for TopK (so SAELens's rescale_acts_by_decoder_norm
# is the identity here).
#
#   x_hat_l = f[:, :w_l] @ W_dec[:w_l] + b_dec       prefix l's reconstruction
#   prefix_mse_l = mean_i sum_k (x_hat_l - x)_ik**2   (prefix_mse_{L-1} = mse)
#   total = sum_l prefix_mse_l + aux                 (aux: AuxK on the full
#                                                     residual x - x_hat_{L-1})
#
# A feature j of level g (w_{g-1} <= j < w_g) is in prefixes g..L-1, so its
# gradient signal in row i is the suffix sum D_g = sum_{l >= g} 2 (x_hat_l - x) / N:
#   g_W_dec[j] = sum_i f_ij D_g(i)   (+ AuxK's, then the parallel part removed)
#   d_pre_ij  = D_g(i) . W_dec[j]    at the selected entries (+ AuxK's)
#   g_b_dec   = sum_i D_0(i) - W_enc @ g_b_enc  (b_dec is in every prefix)
# With one width this is exactly the BatchTopK step.

def _prefix_codes(f, widths):
    """Dense codes restricted to each prefix: ``[f * (j < w_l) for l]``."""
    cols = np.arange(f.shape[1])
    return [np.where(cols[None, :] < w, f, 0).astype(f.dtype) for w in widths]


def matryoshka_gradients(x, params: SAEParams, codes, widths, aux_codes=None, aux_weight=0.0,
                         y=None):
    """Losses and gradients of a Matryoshka BatchTopK step (see the section
    comment): ``codes`` the batch's BatchTopK codes, ``widths`` int ``[L]``;
    ``y`` a transcoder's target (every prefix's reconstruction has the skip term).
    ``Losses.prefix_mse`` has one entry per width (the last is ``mse``),
    ``total = sum(prefix_mse) + aux``; the ``W_dec`` gradient is projected."""
    f = _dense(codes)
    n = x.shape[0]
    t = _target(x, y)
    W_dec = params.W_dec
    g_W_dec = np.zeros_like(W_dec)
    d_pre = np.zeros_like(f)
    D_0 = np.zeros_like(t)  # dL/dx_hat summed over the prefixes: b_dec's and W_skip's
    prefix_mse = []
    for fl in _prefix_codes(f, widths):
        # each prefix's loss differentiated on its own, summed
        r = reconstruct(fl, params, x) - t
        prefix_mse.append(float(np.sum(r ** 2) / n))
        d_xhat = 2.0 * r / n
        g_W_dec += fl.T @ d_xhat
        d_pre += np.where(fl > 0, d_xhat @ W_dec.T, 0)
        D_0 += d_xhat
    x_hat = reconstruct(f, params, x)
    aux, g_aux_W_dec, d_aux_pre = _auxk_terms(t, x_hat, W_dec, aux_codes, aux_weight)
    g_W_dec = _project_out_parallel(g_W_dec + g_aux_W_dec, W_dec)
    d_pre = d_pre + d_aux_pre
    g_W_enc = _encoder_input(x, params, y).T @ d_pre
    mse = prefix_mse[-1]
    return (Losses(mse=mse, l1=0.0, total=sum(prefix_mse) + aux, aux=aux,
                   prefix_mse=tuple(prefix_mse)),
            _finish_grads(x, params, y, D_0, d_pre, g_W_enc, g_W_dec))


def train_step_matryoshka(params: SAEParams, state: AdamState, x, *, k, widths, lr,
                          beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                          k_aux=0, aux_coefficient=0.0, y=None,
                          precision="fp32") -> StepResult:
    """One Matryoshka BatchTopK training step (BatchTopK encode, AuxK,
    backward over the prefixes, Adam, decoder-row renormalization), in
    place; AuxK as in :func:`train_step_topk`; ``y`` a transcoder's target. ``StepResult.extra`` holds
    ``min_active``, ``prefix_mse`` and ``prefix_explained_variance``.
    ``precision="bf16"``: the codes of :func:`encode_batchtopk`'s bf16 rule."""
    codes = encode_batchtopk(x, params.W_enc, params.b_enc, input_centering(params, y), k,
                             precision=precision)
    aux_codes, weight = _auxk_selection(x, params, dead_mask, k_aux, aux_coefficient, y)
    loss, grads = matryoshka_gradients(x, params, codes, widths, aux_codes, weight, y)
    adam_update(params, grads, state, lr, beta1, beta2, eps)
    normalize_decoder_rows(params.W_dec)
    if fire_counts is not None:
        fire_counts += np.bincount(codes.indices, minlength=params.d_sae)
    finite = all(np.isfinite(a).all() for a in params.arrays())
    n = x.shape[0]
    return matryoshka_step_result([m * n for m in loss.prefix_mse], loss.aux, codes.nnz, n,
                                  _batch_variance(_target(x, y)), codes.values, finite)
