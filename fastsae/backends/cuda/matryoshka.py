"""CUDA Matryoshka BatchTopK training (see the "Matryoshka family" section of
:mod:`fastsae.backends.reference`): the BatchTopK codes of the batch,
selected once, and ``L`` nested prefixes of the dictionary given by the
widths ``w_0 < ... < w_{L-1} = d_sae``.

No prefix has its own pass over the decoder. The TopK family's kernels are
level-aware (:mod:`.decode`, :mod:`.backward`):

* row pass (one block per row, threads over ``d_in``):
  :func:`~.decode.sparse_decode_kernel` walks the row's entries in their
  (increasing feature) order once and stores the running reconstruction
  each time an entry crosses a width, giving every prefix's ``x_hat_l``
  (``[L, N, d_in]``); :func:`~.backward.residual_kernel` turns them into
  the suffix sums ``D_g = sum_{l >= g} 2 (x_hat_l - x) / N`` and the
  per-row squared errors of every prefix (float64);
* ``d_pre`` at each entry is ``D_level(j)(i) . W_dec[j]``
  (:func:`~.backward.dpre_kernel`);
* weight pass (one block per feature over the stable CSC lists, no float
  atomics): :func:`~.backward.feature_grad_kernel` with ``D_level(j)`` in
  place of ``d_xhat``; ``g_b_dec`` is the column sum of ``D_0`` minus
  ``W_enc @ g_b_enc``;
* AuxK, Adam and the decoder-row renormalization are BatchTopK's, AuxK on
  the full reconstruction's residual;
* a transcoder (:mod:`.transcoder`) fits ``y``, and a skip transcoder's
  ``x @ W_skip.T`` is added to every prefix's reconstruction; its gradient
  is ``D_0.T @ x``.

The extra cost over BatchTopK is ``O(L N d_in)`` memory traffic. With one
width (``[d_sae]``) every kernel does BatchTopK's arithmetic, so the step is
bit for bit :func:`~.step.train_step_topk` with ``activation="batchtopk"``.

Host side: :func:`matryoshka_gradients`, :func:`train_step_matryoshka`.
"""

from __future__ import annotations

import numpy as np

from ...params import AdamState, Losses, SAEParams, StepResult
from ..numerics import matryoshka_step_result
from .backward import _csr_device, _topk_backward
from .decode import _sparse_decode, _widths_device
from .placement import (_any_device, _device, _empty_like_params, _params_device, _params_out,
                        _work)
from .encode import _fp32_only
from .step import _selection_step
from .transcoder import _add_skip, _device_or_none


def matryoshka_gradients(x, params: SAEParams, codes, widths, aux_codes=None, aux_weight=0.0,
                         y=None):
    """Losses and gradients of a Matryoshka BatchTopK step (see
    :func:`fastsae.backends.reference.matryoshka_gradients`): ``codes`` the
    batch's codes, ``widths`` host int64 ``[L]``. ``Losses.prefix_mse`` has
    one entry per width (the last is ``mse``); ``W_dec``'s gradient is
    projected. On the device when any argument is. ``y``: a transcoder's
    target (every prefix's reconstruction has the skip term)."""
    dev = _any_device(x, params, codes, aux_codes, y)
    x, y = _device(x), _device_or_none(y)
    P = _params_device(params)
    n, d_out = x.shape[0], P.W_dec.shape[1]
    nl = len(widths)
    main = _csr_device(codes)
    aux = None
    if aux_codes is not None and aux_weight > 0:
        aux = _csr_device(aux_codes, "_dense_aux")  # lives beside the main codes
    wd = _widths_device(widths)
    x_hat = _work("x_hat_prefixes", (nl, n, d_out))
    _sparse_decode(*main, P.W_dec, P.b_dec, x_hat, wd)
    _add_skip(x, P, x_hat)
    g = _empty_like_params(P, cached=False)
    scal = _work("scalars_matryoshka", nl + 2, np.float64)
    _topk_backward(x, P, main, x_hat, aux, aux_weight, g, scal, wd, y)
    s = scal.copy_to_host()
    prefix = tuple(float(v / n) for v in s[:nl])
    aux_loss = float(aux_weight * s[nl] / n) if aux is not None else 0.0
    return (Losses(mse=prefix[-1], l1=0.0, total=sum(prefix) + aux_loss, aux=aux_loss,
                   prefix_mse=prefix),
            _params_out(g, dev))


def train_step_matryoshka(params: SAEParams, state: AdamState, x, *, k, widths, lr,
                          beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                          k_aux=0, aux_coefficient=0.0, y=None,
                          precision="fp32") -> StepResult:
    """One Matryoshka BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.backends.reference.train_step_matryoshka`); device or
    host arrays and ``y`` as :func:`~.step.train_step`. ``StepResult.extra`` holds
    ``min_active``, ``prefix_mse`` and ``prefix_explained_variance``. float32
    only (the front refuses ``precision="bf16"`` here)."""
    _fp32_only(precision)
    nl = len(widths)
    s, nnz, n, aux_loss, kept_min, finite = _selection_step(
        params, state, x, k, "batchtopk", lr, beta1, beta2, eps, fire_counts, dead_mask, k_aux,
        aux_coefficient, widths, y)
    return matryoshka_step_result(s[:nl], aux_loss, nnz, n, s[nl + 1] / n, kept_min, finite)
