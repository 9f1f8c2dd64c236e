"""Losses and gradients of the ``cython`` backend (compiled ``_backward``),
computed from the active entries only (``kernels/cython/backward.pyx``):
sparse ``d_pre``, a CSR -> CSC transpose so that each feature's gradients
are summed by one thread (race-free, deterministic for any thread count).
ReLU ``gradients`` of codes with a density (stored entries of sparse codes,
nonzeros of dense ones, over ``N * d_sae``) of at least
:data:`~fastsae.backends.tunables.CYTHON_RELU_DENSE_MIN_DENSITY` (read at
call time) go to :func:`.dense.gradients` (dense BLAS products) instead.

Arrays come from the validating front: ``x [N, d_in]``, ``x_hat [N,
d_out]`` (the full reconstruction), :class:`~fastsae.params.SAEParams` in
SAELens layouts, codes dense ``[N, d_sae]`` or canonical
:class:`SparseCodes`, ``y`` None or ``[N, d_out]`` (a transcoder's target,
see :mod:`.transcoder`); all C-contiguous float32.
"""

from __future__ import annotations

import numpy as np

from ...params import Losses, SAEParams
from ...sparse import SparseCodes
from .. import tunables as TU
from . import _backward, _decode, _encode, dense
from . import transcoder as TC
from .encode import csr_arrays
from .norms import decoder_column_norms
from ._threads import threads


def _empty_like(params: SAEParams) -> SAEParams:
    """Buffers for the four base gradients (``W_skip``'s is made apart)."""
    return SAEParams(*(np.empty_like(getattr(params, k)) for k in SAEParams.NAMES))


def _backward_threads(n, d_in, d_sae, nnz):
    return threads((3 * nnz + n) * d_in + d_in * d_sae)


def _grads_into(x, params: SAEParams, csr, x_hat, l1_coefficient, decoder_norm, norms,
                grads: SAEParams, nt, kw):
    """Fill ``grads`` (the four base ones); return ``(mse, l1)``. ``kw``: the
    kernel's transcoder keywords (:func:`.transcoder.kernel_args`)."""
    indptr, indices, values = csr
    return _backward.gradients_csr(
        x, x_hat, params.W_enc, params.W_dec, params.b_dec, indptr, indices, values, norms,
        float(l1_coefficient), decoder_norm == "weighted_l1", decoder_norm == "unit_norm",
        grads.W_enc, grads.b_enc, grads.W_dec, grads.b_dec, None, nt, **kw)


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm, y=None):
    """Loss parts and gradients (see :func:`fastsae.reference.gradients`);
    ``y`` a transcoder's target (``x_hat`` has the skip term)."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    if isinstance(codes, SparseCodes):
        nnz, indptr = codes.indices.shape[0], None
    else:  # one counting pass: the CSR below reuses its row pointer
        indptr = _encode.dense_indptr(codes, threads(n * d_sae))
        nnz = int(indptr[-1])
    if nnz / (n * d_sae) >= TU.CYTHON_RELU_DENSE_MIN_DENSITY:
        return dense.gradients(x, params, codes, x_hat, l1_coefficient, decoder_norm, y)
    csr = csr_arrays(codes, threads(n * d_sae), indptr)
    nt = _backward_threads(n, d_in, d_sae, csr[1].shape[0])
    norms = decoder_column_norms(params.W_dec)
    grads = _empty_like(params)
    kw = TC.kernel_args(x, params, y, builds_recon=False)
    mse, l1 = _grads_into(x, params, csr, x_hat, l1_coefficient, decoder_norm, norms, grads,
                          nt, kw)
    return Losses(mse=mse, l1=l1, total=mse + l1), TC.with_skip_gradient(grads, x, kw)


def _aux_grads(x, params: SAEParams, x_hat, aux: SparseCodes, weight, nt, y=None):
    """AuxK loss and gradients: ``aux = w mean_i ||e_hat_i - e_i||^2`` with
    ``e = t - x_hat`` constant (``t`` the target: ``x``, a transcoder's
    ``y``) and ``e_hat = aux @ W_dec`` (no bias, no skip term).

    The sparse backward kernel computes these when handed
    ``x_hat' = t + w (e_hat - e)`` (its ``d_xhat = 2 (x_hat' - t) / N`` is
    then ``d_ehat``); its ``g_b_dec`` has ``sum_i d_ehat_i`` in it, which the
    AuxK term does not have (no bias in ``e_hat``), so that is taken out."""
    n, d_sae = x.shape[0], params.d_sae
    t = TC.fit_target(x, y)
    e_hat = np.empty_like(t)
    _decode.decode_csr(aux.indptr, aux.indices, aux.values, params.W_dec,
                       np.zeros(params.d_out, np.float32), e_hat, nt)
    diff = e_hat - (t - x_hat)
    loss = float(np.sum(diff.astype(np.float64) ** 2) / n) * weight
    fake = t + np.float32(weight) * diff
    g = _empty_like(params)
    norms = np.ones(d_sae, dtype=np.float32)
    _backward.gradients_csr(x, fake, params.W_enc, params.W_dec, params.b_dec,
                            aux.indptr, aux.indices, aux.values, norms, 0.0, False, True,
                            g.W_enc, g.b_enc, g.W_dec, g.b_dec, None, nt,
                            **TC.kernel_args(x, params, y, builds_recon=False, want_d=False))
    g.b_dec -= (2.0 / n) * (fake - t).sum(axis=0, dtype=np.float64).astype(np.float32)
    return loss, g


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0,
                   y=None):
    """Losses and gradients for TopK/BatchTopK training (see
    :func:`fastsae.reference.topk_gradients`): the sparse backward with no L1
    term and a projected decoder gradient, plus the AuxK term (which leaves
    ``b_dec`` and ``W_skip`` alone); ``y`` a transcoder's target."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    csr = csr_arrays(codes, threads(n * d_sae))
    nt = _backward_threads(n, d_in, d_sae, csr[1].shape[0])
    grads = _empty_like(params)
    norms = np.ones(d_sae, dtype=np.float32)
    kw = TC.kernel_args(x, params, y, builds_recon=False)
    mse, _ = _grads_into(x, params, csr, x_hat, 0.0, "unit_norm", norms, grads, nt, kw)
    aux = 0.0
    if aux_codes is not None and aux_weight > 0:
        if not isinstance(aux_codes, SparseCodes):
            aux_codes = SparseCodes(*csr_arrays(aux_codes, nt), (n, d_sae))
        aux, g = _aux_grads(x, params, x_hat, aux_codes, float(aux_weight), nt, y)
        for name in SAEParams.NAMES:
            getattr(grads, name).__iadd__(getattr(g, name))
    return (Losses(mse=mse, l1=0.0, total=mse + aux, aux=aux),
            TC.with_skip_gradient(grads, x, kw))
