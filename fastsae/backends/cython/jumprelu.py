"""JumpReLU training of the ``cython`` backend (compiled ``_jumprelu``,
``kernels/cython/jumprelu.pyx``): :func:`jumprelu_gradients` and
:func:`train_step_jumprelu` (see :func:`fastsae.reference.train_step_jumprelu`).

Per call, per feature (float32, exactly as the reference's
``jumprelu_window``): ``theta = exp(log_threshold)``, ``lo = theta - bw/2``,
``hi = theta + bw/2``. Only the *candidates* ``pre > lo`` (the active entries
``pre > theta`` and the window's ``lo < pre < hi``) matter, so:

* sparse path: the fused encoder keeps the candidates as CSR (``pre``
  values; ``N x d_sae`` is never formed), then one
  ``_jumprelu.sparse_backward`` call decodes (active entries), computes
  ``d_f`` at the candidates, the four gradients and the threshold's, and
  (training step) applies Adam to all five parameters in its per-feature
  pass, renormalizing the decoder rows;
* dense path (a fresh JumpReLU SAE fires about half its features): the
  encoder's first row block measures the candidates' density (shape-only
  grid, so the choice does not depend on the threads); at or above
  :data:`~fastsae.backends.tunables.CYTHON_JUMPRELU_DENSE_MIN_DENSITY` (read
  at call time: 0.0 forces dense, anything above 1 sparse) ``pre`` is made
  dense and ``_jumprelu.dense_backward`` does the same with BLAS products.

Sparsity modes (``sparsity``, a :class:`~fastsae.JumpReLUSparsity`) and the
pre-activation loss (``dead_mask``): ``None``, ``JumpReLUSparsity()`` and a
pre-activation coefficient with no dead feature run exactly the step kernels
(the default call, bit for bit). Otherwise the same two kernels take the
mode's arguments (``mode=``, ``tanh_scale=``, ``target_l0=``, ``stats=``)
and stay fused (Adam in the feature pass):

* ``"tanh"``: its term is added to ``d_f`` at the candidates (sparse: in the
  row pass; dense: in the feature pass's epilogue), no Step term;
  ``l0_loss = c * sum tanh(s f) / N``;
* ``"quadratic"``: each row's active count ``L0_i`` in the row pass, then
  ``q_i = 4 c (L0_i - T) / (N T)`` summed over each feature's window in
  place of the window count; ``l0_loss = c * 2 / T * sum_i (L0_i - T)**2 / N``;
* pre-activation loss (``pre_act_coefficient > 0`` and a dead feature):
  dense over the dead features only. Sparse path: :func:`_jumprelu.preact_dead`
  (before any update) computes ``P = xc @ W_enc[:, dead] + b_enc[dead]``
  and the ``W_enc`` gradient ``xc.T @ d_pre[:, dead]`` (two GEMMs of width
  ``n_dead``), which the backward adds in its feature pass with the
  ``b_enc`` and threshold terms; dense path: the epilogue sets ``d_pre``
  at the dead features' entries below their thresholds in the same pass
  over ``pre``. ``aux = p * sum (theta - pre) / N`` over those entries.

Which path ran: the calls go through this module's attributes
``_sparse_backward`` and ``_dense_backward`` (tests replace them to spy).
Arrays come from the validating front (C-contiguous float32 in SAELens
layouts, ``log_threshold`` and its moments float32 ``[d_sae]``,
``fire_counts`` int64 ``[d_sae]`` or None, ``bandwidth > 0``, ``y`` None
or a transcoder's target ``[N, d_out]``: the encoder then reads ``x``
uncentered and the kernels fit ``y - x @ W_skip.T``, see :mod:`.transcoder`).
"""

from __future__ import annotations

import numpy as np

from ...params import AdamState, JumpReLUSparsity, Losses, SAEParams, StepResult
from .. import bf16 as BF
from .. import tunables as TU
from .. import numerics as NU
from ..numerics import jumprelu_step_result
from . import _backward, _jumprelu
from . import transcoder as TC
from ._threads import blas_single, row_tile, threads
from .adam import moment_arrays, step_constants
from .dense import feature_block
from .encode import dense_tiling
from .step import _bf16_codes

__all__ = ["jumprelu_gradients", "train_step_jumprelu", "window", "encode_candidates"]


#: ``(theta, lo, hi)`` float32 ``[d_sae]`` (the function every backend uses).
window = NU.jumprelu_window


def _tiling(n: int, work: int, nthreads: int):
    """Row tile, feature tile and feature chunks per row block of the
    candidate encoder (as the ReLU encoder's ``encode._tiling``, with the
    JumpReLU row tile): tiles depend on the shape only, chunks (which change
    no product) on the threads."""
    tm = row_tile(n, TU.CYTHON_JUMPRELU_TILE_ROWS, TU.CYTHON_RELU_MIN_ROW_BLOCKS, work)
    nrb = -(-n // tm)
    chunks = max(1, -(-4 * nthreads // nrb)) if nthreads > 1 else 1
    return tm, TU.CYTHON_TILE_COLS, chunks


def encode_candidates(x, W_enc, b_enc, b_dec, lo, min_density):
    """``(pre, None)`` with the dense ``pre [N, d_sae]`` when the candidates'
    density on row block 0 of the encoder's grid is at least
    ``min_density``, else ``(None, (indptr, indices, values))``: the
    candidates ``pre > lo`` as canonical CSR holding ``pre``."""
    n, d_sae = int(x.shape[0]), int(W_enc.shape[1])
    work = n * W_enc.shape[0] * d_sae
    nt = threads(work)
    tm, tn, chunks = _tiling(n, work, nt)
    mr = min(tm, n)
    pre = np.empty((n, d_sae), dtype=np.float32)
    with blas_single():
        cnt0 = _jumprelu.encode_probe(x, W_enc, b_enc, b_dec, lo, pre, tm, tn, nt)
        if mr * d_sae and cnt0 / (mr * d_sae) >= min_density:
            if n > mr:
                dtm, dtn = dense_tiling(n - mr, d_sae)
                _jumprelu.encode_dense(x, W_enc, b_enc, b_dec, pre, dtm, dtn, nt, mr)
            return pre, None
        csr = _jumprelu.encode_csr(x, W_enc, b_enc, b_dec, lo, tm, tn, chunks, nt, pre[:mr])
    return None, csr


def _row_chunk(n: int, d_sae: int) -> int:
    """Rows per chunk of the dense row pass (its ``f`` buffer is ``rows x
    d_sae`` per thread): shape-only."""
    cap = max(16, TU.CYTHON_JUMPRELU_DENSE_ROW_BUFFER // max(1, 4 * d_sae))
    return max(1, min(n, cap))


# The kernels, reached through these attributes (tests replace them to see
# which path ran).
_sparse_backward = _jumprelu.sparse_backward
_dense_backward = _jumprelu.dense_backward

#: The kernels' ``mode`` argument of each sparsity mode.
MODES = {"step": 0, "tanh": 1, "quadratic": 2}

#: Dead features per block of :func:`_jumprelu.preact_dead` (shape-only grid).
PREACT_FEATURE_BLOCK = 128


class _Mode:
    """What a non-default call adds: the kernel mode and its constants, the
    dead features of the pre-activation loss (None: no such loss)."""

    def __init__(self, sparsity: JumpReLUSparsity, dead_idx):
        self.sparsity = sparsity
        self.mode = MODES[sparsity.mode]
        self.dead_idx = dead_idx
        self.stats = np.zeros(2, dtype=np.float64)

    def kernel_args(self) -> dict:
        sp = self.sparsity
        return {"mode": self.mode, "tanh_scale": float(sp.tanh_scale),
                "target_l0": float(sp.target_l0) if self.mode == 2 else 0.0,
                "stats": self.stats}

    def l0_loss(self, l0_coefficient, nnz: int, n: int) -> float:
        """The weighted sparsity term from the kernel's ``stats``."""
        c = float(l0_coefficient)
        if self.mode == 1:
            return c * float(self.stats[0]) / n
        if self.mode == 2:
            return c * (2.0 / float(self.sparsity.target_l0)) * float(self.stats[0]) / n
        return c * nnz / n


def _mode(sparsity, dead_mask):
    """``None`` for the default call (no sparsity, ``"step"`` with no
    pre-activation loss, or a pre-activation loss with no dead feature),
    else the :class:`_Mode`."""
    if NU.jumprelu_default_mode(sparsity, dead_mask):
        return None
    dead_idx = None
    if sparsity.pre_act_coefficient > 0 and dead_mask is not None:
        dead_idx = np.flatnonzero(np.asarray(dead_mask)).astype(np.int64)
        if dead_idx.size == 0:
            dead_idx = None
    return _Mode(sparsity, dead_idx)


def _preact_sparse(x, params: SAEParams, theta, dead_idx, coefficient, y):
    """The sparse path's pre-activation loss (before any update):
    ``(pa_g, pa_cnt, asum)`` of :func:`_jumprelu.preact_dead`."""
    xc = x if y is not None else x - params.b_dec
    W_dead = np.take(params.W_enc, dead_idx, axis=1)
    n, d_in, nd = int(x.shape[0]), params.d_in, int(dead_idx.shape[0])
    with blas_single():
        return _jumprelu.preact_dead(
            xc, W_dead, np.ascontiguousarray(params.b_enc[dead_idx]),
            np.ascontiguousarray(theta[dead_idx]), float(coefficient),
            TU.CYTHON_DENSE_ROW_CHUNK, PREACT_FEATURE_BLOCK, threads(2 * n * d_in * nd))


def _run(x, params: SAEParams, log_threshold, bandwidth, l0_coefficient, adam, moments=(),
         consts=None, threshold_m=None, threshold_v=None, fire_counts=None, grads=None, kw=None,
         y=None, mode=None, bf16_state=None):
    """Encode, then the sparse or the dense backward: ``(mse, nnz, bad, aux)``
    (``aux``: the weighted pre-activation loss, 0.0 without one).
    ``kw``: the kernels' transcoder keywords (:func:`.transcoder.kernel_args`);
    ``mode``: a non-default call's :class:`_Mode` (its ``stats`` filled in);
    ``bf16_state``: the run's AdamState when the candidates come from the
    bf16 encoder on its copy of ``W_enc`` (which the backward rewrites)."""
    n, d_in, d_sae = int(x.shape[0]), params.d_in, params.d_sae
    kw = dict(kw or {})
    theta, lo, hi = window(log_threshold, bandwidth)
    if bf16_state is not None:
        codes, copy = _bf16_codes(x, params, bf16_state, y, 0, thr=lo)
        pre, csr = None, (codes.indptr, codes.indices, codes.values)
        kw.update(copy)
    else:
        pre, csr = encode_candidates(x, params.W_enc, params.b_enc, TC.centering(params, y),
                                     lo, TU.CYTHON_JUMPRELU_DENSE_MIN_DENSITY)
    common = (float(bandwidth), float(l0_coefficient), log_threshold, adam, tuple(moments),
              consts, threshold_m, threshold_v, fire_counts)
    aux_sum = 0.0
    if mode is not None:
        kw.update(mode.kernel_args())
        if mode.dead_idx is not None:
            kw["pre_act"] = float(mode.sparsity.pre_act_coefficient)
            if pre is not None:
                dead = np.zeros(d_sae, dtype=np.uint8)
                dead[mode.dead_idx] = 1
                kw["dead"] = dead
            else:
                pa_g, pa_cnt, aux_sum = _preact_sparse(x, params, theta, mode.dead_idx,
                                                       kw["pre_act"], y)
                kw.update(dead_idx=mode.dead_idx, pa_g=pa_g, pa_cnt=pa_cnt)
    if pre is not None:
        with blas_single():
            mse, nnz, bad = _dense_backward(
                x, pre, params.W_enc, params.b_enc, params.W_dec, params.b_dec, theta, lo, hi,
                *common, _row_chunk(n, d_sae), feature_block(d_sae), TU.CYTHON_DENSE_ROW_CHUNK,
                threads(n * d_in * d_sae), grads, **kw)
        if mode is not None:
            aux_sum = float(mode.stats[1])
    else:
        indptr, indices, values = csr
        nt = threads((3 * indices.shape[0] + n) * d_in + 3 * d_in * d_sae)
        mse, nnz, bad = _sparse_backward(x, params.W_enc, params.b_enc, params.W_dec,
                                         params.b_dec, indptr, indices, values, theta, hi,
                                         *common, nt, grads, **kw)
    aux = 0.0
    if mode is not None and mode.dead_idx is not None:
        aux = float(mode.sparsity.pre_act_coefficient) * aux_sum / n
    return mse, nnz, bad, aux


def jumprelu_gradients(x, params: SAEParams, log_threshold, bandwidth, l0_coefficient,
                       sparsity=None, dead_mask=None, y=None):
    """Losses and gradients of a JumpReLU step (see
    :func:`fastsae.reference.jumprelu_gradients`): ``(Losses, SAEParams,
    g_log_threshold)``, the ``W_dec`` gradient projected; ``sparsity`` (a
    :class:`~fastsae.JumpReLUSparsity` or None: ``"step"``) and
    ``dead_mask`` (the pre-activation loss's features) as the module
    docstring says, ``Losses.l0_loss`` the weighted sparsity term and
    ``Losses.aux`` the weighted pre-activation loss; ``y`` a transcoder's
    target (``W_skip``'s gradient ``D.T @ x``)."""
    n = int(x.shape[0])
    g = SAEParams(*(np.empty_like(getattr(params, k)) for k in SAEParams.NAMES))
    g_lt = np.empty_like(log_threshold)
    kw = TC.kernel_args(x, params, y, builds_recon=True)
    md = _mode(sparsity, dead_mask)
    mse, nnz, _, aux = _run(x, params, log_threshold, bandwidth, l0_coefficient, False,
                            grads=(g.W_enc, g.b_enc, g.W_dec, g.b_dec, g_lt), kw=kw, y=y,
                            mode=md)
    if md is None:
        l0_loss = float(l0_coefficient) * nnz / n
        return (Losses(mse=mse, l1=0.0, total=mse + l0_loss, l0_loss=l0_loss),
                TC.with_skip_gradient(g, x, kw), g_lt)
    l0_loss = md.l0_loss(l0_coefficient, nnz, n)
    return (Losses(mse=mse, l1=0.0, total=mse + l0_loss + aux, aux=aux, l0_loss=l0_loss),
            TC.with_skip_gradient(g, x, kw), g_lt)


def train_step_jumprelu(params: SAEParams, state: AdamState, x, *, log_threshold, threshold_m,
                        threshold_v, bandwidth, l0_coefficient, lr, beta1=0.9, beta2=0.999,
                        eps=1e-8, fire_counts=None, sparsity=None, dead_mask=None,
                        y=None, precision="fp32") -> StepResult:
    """One JumpReLU step in place (see the module docstring): the four
    parameters (and a skip transcoder's ``W_skip``), ``log_threshold`` and
    its moments (Adam at step ``state.step + 1``), decoder rows
    renormalized, ``fire_counts`` added to; ``sparsity`` and ``dead_mask``
    as :func:`jumprelu_gradients` (``extra["l0_loss"]`` the sparsity term,
    ``aux`` the pre-activation loss); ``y`` a transcoder's target.
    ``precision="bf16"`` (the default mode; the front refuses others): the
    candidates from :mod:`..bf16`'s encoder on the copy of ``W_enc`` in
    ``state.bf16``, rewritten by the sparse backward's Adam pass; unless
    the last step's codes were at least ``CYTHON_JUMPRELU_DENSE_MIN_DENSITY``
    dense: then this float32 step."""
    n = int(x.shape[0])
    t, consts = step_constants(state, lr, beta1, beta2, eps)
    kw = TC.kernel_args(x, params, y, builds_recon=True)
    md = _mode(sparsity, dead_mask)
    bf = precision == "bf16" and BF.bf16_step_wanted(
        state, float(TU.CYTHON_JUMPRELU_DENSE_MIN_DENSITY))
    mse, nnz, bad, aux = _run(x, params, log_threshold, bandwidth, l0_coefficient, True,
                              moment_arrays(state), consts, threshold_m, threshold_v,
                              fire_counts, kw=kw, y=y, mode=md,
                              bf16_state=state if bf else None)
    bad += TC.skip_adam(params, state, x, kw, consts)
    state.step = t
    if precision == "bf16":
        BF.step_done(state, params.W_enc, wrote=bf, nnz=nnz, n=n)
    t_fit = TC.fit_target(x, y)
    var = _backward.batch_variance(t_fit, threads(t_fit.size))
    l0_loss = (float(l0_coefficient) * nnz / n if md is None
               else md.l0_loss(l0_coefficient, nnz, n))
    return jumprelu_step_result(mse, l0_loss, nnz, n, var, params_finite=bad == 0, aux=aux)
