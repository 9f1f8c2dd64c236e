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
* ``"unit_norm"`` gradients of ``W_dec`` have the component parallel to each
  row removed: ``g_j - (g_j . w_j) w_j / ||w_j||**2``.
* Adam as in PyTorch: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
  ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)`` with ``t``
  the 1-based step; in ``"unit_norm"`` mode decoder rows are then rescaled to
  unit norm.
"""

from __future__ import annotations

import numpy as np

from .params import AdamState, Losses, SAEParams, StepResult
from .sparse import SparseCodes

NAME = "numpy"


def _dense(codes):
    return codes.to_dense() if isinstance(codes, SparseCodes) else codes


# ---------------------------------------------------------------- forward
def pre_activations(x, W_enc, b_enc, b_dec):
    """``(x - b_dec) @ W_enc + b_enc``, dense ``[N, d_sae]``."""
    return (x - b_dec) @ W_enc + b_enc


def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense ``[N, d_sae]``."""
    return np.maximum(pre_activations(x, W_enc, b_enc, b_dec), 0)


def encode_relu_sparse(x, W_enc, b_enc, b_dec):
    """:func:`encode_relu` as :class:`SparseCodes`."""
    return SparseCodes.from_dense(encode_relu(x, W_enc, b_enc, b_dec))


def decode(codes, W_dec, b_dec):
    """``f @ W_dec + b_dec``, dense ``[N, d_in]``; codes dense or sparse."""
    return _dense(codes) @ W_dec + b_dec


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row, ``[d_sae]``."""
    return np.sqrt(np.sum(W_dec * W_dec, axis=1))


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` where ``f_ij > 0``, zero elsewhere.

    Same kind as ``codes``: dense in, dense out; sparse in, sparse out (same
    sparsity pattern).
    """
    if isinstance(codes, SparseCodes):
        vals = (l1_coefficient * norms[codes.indices]).astype(codes.values.dtype)
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


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm):
    """Loss parts and gradients of ``total`` w.r.t. every parameter.

    ``codes`` (dense or sparse) must be ``encode_relu`` of ``x`` under
    ``params`` and ``x_hat`` its decode. Returns ``(Losses, SAEParams)`` with
    the gradients in the parameters' layouts. In ``"unit_norm"`` mode the
    ``W_dec`` gradient is projected (parallel component removed).
    """
    f = _dense(codes)
    n = x.shape[0]
    W_enc, W_dec = params.W_enc, params.W_dec
    d_xhat = 2.0 * (x_hat - x) / n  # dL/dx_hat
    norms = decoder_column_norms(W_dec)
    if decoder_norm == "weighted_l1":
        penalty = norms
    else:
        penalty = np.ones_like(norms)

    # decoder: x_hat = f @ W_dec + b_dec
    g_W_dec = f.T @ d_xhat
    g_b_dec = d_xhat.sum(axis=0)
    if decoder_norm == "weighted_l1":
        # d/dW_dec[j] of l1c/n * sum_i f_ij ||W_dec[j]||
        unit = np.divide(W_dec, norms[:, None], out=np.zeros_like(W_dec),
                         where=norms[:, None] > 0)
        g_W_dec = g_W_dec + (l1_coefficient / n) * f.sum(axis=0)[:, None] * unit

    # through the codes: dL/df, then the ReLU
    d_f = d_xhat @ W_dec.T + (l1_coefficient / n) * penalty[None, :]
    d_pre = np.where(f > 0, d_f, 0)

    # encoder: pre = (x - b_dec) @ W_enc + b_enc
    g_W_enc = (x - params.b_dec).T @ d_pre
    g_b_enc = d_pre.sum(axis=0)
    g_b_dec = g_b_dec - d_pre.sum(axis=0) @ W_enc.T

    if decoder_norm == "unit_norm":
        g_W_dec = _project_out_parallel(g_W_dec, W_dec)
    grads = SAEParams(g_W_enc, g_b_enc, g_W_dec, g_b_dec)
    return losses(x, params, f, x_hat, l1_coefficient, decoder_norm), grads


# ---------------------------------------------------------------- optimizer
def adam_update(params: SAEParams, grads: SAEParams, state: AdamState, lr,
                beta1, beta2, eps):
    """One Adam update of every parameter, in place; advances ``state.step``."""
    t = state.step + 1
    for name in SAEParams.NAMES:
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
    var = float(np.sum((x - x.mean(axis=0)) ** 2) / x.shape[0])
    return 1.0 - mse / var if var > 0 else 1.0


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None) -> StepResult:
    """Forward, backward and Adam update on one batch, in place.

    ``fire_counts`` (int64 ``[d_sae]``, optional) is incremented by the
    number of rows in which each feature fired. Returns the batch's losses,
    L0 and explained variance, measured before the update.
    """
    f = encode_relu(x, params.W_enc, params.b_enc, params.b_dec)
    x_hat = decode(f, params.W_dec, params.b_dec)
    loss, grads = gradients(x, params, f, x_hat, l1_coefficient, decoder_norm)
    adam_update(params, grads, state, lr, beta1, beta2, eps)
    if decoder_norm == "unit_norm":
        normalize_decoder_rows(params.W_dec)
    active = f > 0
    if fire_counts is not None:
        fire_counts += active.sum(axis=0)
    return StepResult(mse=loss.mse, l1=loss.l1, total=loss.total,
                      l0=float(active.sum() / x.shape[0]),
                      explained_variance=explained_variance(x, loss.mse))
