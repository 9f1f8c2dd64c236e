"""Transcoders and skip transcoders on the ``cython`` backend: what every
gradient and training face adds around the shared kernels (see
:mod:`fastsae.backends.reference` for the math).

The kernels take the reconstruction's target separately from the encoder
input (``target=``, ``[N, d_out]``), a ``center`` flag (False: the encoder
read ``x`` as it is, so ``g_b_dec`` has no ``- W_enc @ g_b_enc`` term) and
a ``d_target`` buffer that receives ``D = dL/dx_hat`` (Matryoshka: summed
over the prefixes). An SAE (``y`` None) passes none of them, so its calls
are the ones it always made. For a transcoder:

* the encoders get zeros ``[d_in]`` as their centering (:func:`centering`);
* a kernel handed the full reconstruction (``gradients``,
  ``topk_gradients``) fits ``y``; a kernel that builds it (``f @ W_dec +
  b_dec``: the steps, ``jumprelu_gradients``, ``matryoshka_gradients``)
  fits ``y - x @ W_skip.T`` (one GEMM, before any update), so its residual
  is the full one;
* ``W_skip``'s gradient is ``D.T @ x`` (one GEMM) and the steps update it
  with Adam (``_adam.adam_flat``, the same step ``t`` and constants) after
  the kernel, counting a non-finite result as the kernels do ("finite or
  loud").

The GEMMs are NumPy's (BLAS with its own thread pool: they run outside the
kernels' single-thread BLAS guard). Arrays come from the validating front:
``y`` C-contiguous float32 ``[N, d_out]``, ``W_skip`` and its moments
C-contiguous float32 ``[d_out, d_in]``.
"""

from __future__ import annotations

import numpy as np

from ...params import SAEParams
from . import _adam
from ._threads import threads


def centering(params: SAEParams, y):
    """The encoders' ``b_dec`` argument: ``params.b_dec`` for an SAE, zeros
    ``[d_in]`` for a transcoder."""
    if y is None:
        return params.b_dec
    return np.zeros(params.d_in, dtype=np.float32)


def fit_target(x, y):
    """What explained variance is measured against: ``x`` or ``y``."""
    return x if y is None else y


def kernel_args(x, params: SAEParams, y, *, builds_recon: bool, want_d: bool = True) -> dict:
    """The kernels' transcoder keywords (``{}`` for an SAE): ``target``
    (``y``, or ``y - x @ W_skip.T`` when the kernel ``builds_recon``
    without the skip term), ``center=False`` and, when the model has a skip
    term and ``want_d``, a fresh ``d_target [N, d_out]`` buffer."""
    if y is None:
        return {}
    target = y
    if builds_recon and params.W_skip is not None:
        target = x @ params.W_skip.T
        np.subtract(y, target, out=target)
    kw = {"target": target, "center": False}
    if want_d and params.W_skip is not None:
        kw["d_target"] = np.empty((x.shape[0], params.d_out), dtype=np.float32)
    return kw


def skip_gradient(x, kw: dict):
    """``W_skip``'s gradient ``D.T @ x`` float32 ``[d_out, d_in]`` from the
    kernel's ``d_target``, or None when the model has no skip term."""
    d = kw.get("d_target")
    return None if d is None else d.T @ x


def with_skip_gradient(grads: SAEParams, x, kw: dict) -> SAEParams:
    """``grads`` with ``W_skip``'s gradient set (unchanged without a skip)."""
    grads.W_skip = skip_gradient(x, kw)
    return grads


def skip_adam(params: SAEParams, state, x, kw: dict, consts) -> int:
    """Adam on ``W_skip`` (in place, with the step's float32 ``consts``)
    from the kernel's ``D``; returns how many updated entries are inf or
    NaN (0 without a skip term)."""
    g = skip_gradient(x, kw)
    if g is None:
        return 0
    p, m, v = params.W_skip, state.m.W_skip, state.v.W_skip
    return int(_adam.adam_flat(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                               consts, threads(p.size)))
