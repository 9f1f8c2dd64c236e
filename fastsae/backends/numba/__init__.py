"""The ``numba`` backend: Numba CPU kernels, parallel over the cores.

This face is host glue only (no compiled code): it assembles the kernels of
the package's modules, one per stage, named like every backend's:

* :mod:`.encode` the ReLU encoders and the BLAS ``sgemm`` binding;
* :mod:`.topk` the TopK, BatchTopK, JumpReLU and AuxK encoders;
* :mod:`.decode` the CSR and dense decoders;
* :mod:`.norms` decoder row norms and the L1 subgradient;
* :mod:`.backward` the gradients (transpose, ``d_pre``, weight passes);
* :mod:`.adam` the Adam update;
* :mod:`.step` the compiled training-step cores;
* :mod:`.jumprelu` JumpReLU training (candidate encoder, sparse and dense
  step cores, and their ``*_modes`` variants for the non-default
  :class:`~fastsae.JumpReLUSparsity` penalties and the pre-activation loss);
* :mod:`.matryoshka` Matryoshka BatchTopK (the TopK step's kernels over
  nested prefixes, and its stand-alone gradients);
* :mod:`.transcoder` transcoders and skip transcoders (``y`` given): the
  target and encoder input handed to the same kernels, ``W_skip``'s
  gradient and Adam.

The functions here take already validated, C-contiguous float32 arrays (use
them through :func:`fastsae.get_backend`, which validates once) and compute
what :mod:`fastsae.backends.reference` defines. Block sizes come from
:mod:`fastsae.backends.tunables` (``NUMBA_*``); the host numerics shared by
every backend (Adam's constants, the AuxK weight, the step result) from
:mod:`fastsae.backends.numerics`.

Threads
-------
Numba's parallel loops use ``numba.get_num_threads()`` threads: set the
environment variable ``NUMBA_NUM_THREADS`` before the first import of numba
(that is the maximum), or call :func:`set_num_threads` (``numba.set_num_threads``)
at any time (up to that maximum; it applies to the calling thread). The
encoder's products run inside the parallel region, one single-threaded BLAS
call per thread per block, so while a fastsae kernel runs BLAS is limited to
one thread with threadpoolctl (and restored afterwards): the process never
runs more compute threads than ``numba.get_num_threads()``. Nothing else is
needed; in particular ``OPENBLAS_NUM_THREADS`` only affects BLAS calls made
outside fastsae (and the BLAS product of :func:`decode` for dense, not-sparse
codes).

Results do not depend on the thread count: every parallel loop owns its
outputs and sums in a fixed order.

Compilation: every kernel is ``cache=True``; the first call in a fresh
environment compiles them (tens of seconds), later processes load them from
``__pycache__`` (see the issue's report for measured times).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from ...params import AdamState, Losses, SAEParams, StepResult
from ...sparse import SparseCodes
from .. import bf16 as BF
from .. import numerics as NU
from .. import tunables as TU
from ..host import synchronize, to_backend, to_numpy
from ..tunables import (NUMBA_CSR_STAGE_MAX_BYTES, NUMBA_CSR_STAGE_START,
                        NUMBA_RELU_PROBE_BLOCKS, NUMBA_RELU_ROW_BLOCK, NUMBA_TOPK_FEATURE_TILE,
                        NUMBA_TOPK_ROW_BLOCK)
from . import backward as B
from . import decode as D
from . import dense as DN
from . import encode as E
from . import jumprelu as JR
from . import matryoshka as MT
from . import norms as NR
from . import step as S
from . import topk as TK
from . import transcoder as TC

NAME = "numba"
DEVICE_ARRAYS = False
AUTO_SELECT = True

__all__ = ["NAME", "DESCRIPTION", "DEVICE_ARRAYS", "AUTO_SELECT", "check_available",
           "get_num_threads", "set_num_threads", "to_backend", "to_numpy", "synchronize",
           "encode_relu", "encode_relu_sparse", "decode", "decoder_column_norms",
           "l1_subgradient", "gradients", "train_step", "encode_topk", "encode_batchtopk",
           "encode_jumprelu", "topk_gradients", "train_step_topk", "jumprelu_gradients",
           "train_step_jumprelu", "matryoshka_gradients", "train_step_matryoshka"]


def _description() -> str:
    n = numba.config.NUMBA_NUM_THREADS
    return f"Numba {numba.__version__} CPU, up to {n} thread{'s' if n != 1 else ''} " \
           f"(numba.set_num_threads; layer {numba.config.THREADING_LAYER})"


DESCRIPTION = _description()

_controller = None


def _blas_single():
    """Context manager limiting BLAS (every loaded BLAS library) to one thread."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()  # after scipy's BLAS is loaded (encode imports it)
    return _controller.limit(limits=1, user_api="blas")


def check_available() -> None:
    """Raise with the reason when the kernels cannot run here (compiles and
    runs a tiny product, which also checks scipy's BLAS is reachable)."""
    a = np.ones((1, 1), np.float32)
    c = np.zeros((1, 1), np.float32)
    if E.gemm(a, a, c, 1.0, 0.0, False, False) != 0 or c[0, 0] != 1.0:
        raise RuntimeError("Numba could not call scipy's BLAS sgemm")


def get_num_threads() -> int:
    """Threads Numba's parallel loops use now (``numba.get_num_threads()``)."""
    return int(numba.get_num_threads())


def set_num_threads(n) -> None:
    """Use ``n`` threads, capped at ``NUMBA_NUM_THREADS`` (the size of Numba's
    pool, fixed at its start; asking for more uses them all); ``None``: back
    to that default maximum."""
    top = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(top if n is None else min(int(n), top))


# Staging width for the CSR encoder: per-row entries kept in the first pass.
# Learned from the previous call's largest row (x1.5, power of two) so rows
# rarely need the recompute path; bounded so the staging area stays small.
_k_stage: dict = {}


def _k_for(n: int, d_sae: int, table=None) -> int:
    """The staging width for ``n`` rows from ``table`` (None: ``_k_stage``)."""
    k = (_k_stage if table is None else table).get(d_sae, NUMBA_CSR_STAGE_START)
    cap = max(16, NUMBA_CSR_STAGE_MAX_BYTES // (8 * max(n, 1)))  # 8 bytes per staged entry
    return int(max(1, min(k, d_sae, cap)))


def _learn_k(d_sae: int, max_count: int, table=None) -> None:
    want = 1
    while want < max(16, int(max_count) * 3 // 2):
        want *= 2
    (_k_stage if table is None else table)[d_sae] = want


def _encode_csr(xc, W_enc, b_enc):
    n, d_sae = xc.shape[0], W_enc.shape[1]
    with _blas_single():
        indptr, indices, values, mx = E.encode_relu_csr(xc, W_enc, b_enc, NUMBA_RELU_ROW_BLOCK,
                                                        _k_for(n, d_sae), get_num_threads())
    _learn_k(d_sae, mx)
    return indptr, indices, values


def _codes(indptr, indices, values, n, d_sae) -> SparseCodes:
    return SparseCodes(indptr, indices, values, (int(n), int(d_sae)))


# ---------------------------------------------------------------- forward
def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)`` -> dense float32 ``[N, d_sae]``."""
    xc = E.centered(x, b_dec)
    with _blas_single():
        return E.encode_relu_dense(xc, W_enc, b_enc, NUMBA_RELU_ROW_BLOCK, get_num_threads())


def encode_relu_sparse(x, W_enc, b_enc, b_dec, *, precision="fp32") -> SparseCodes:
    """:func:`encode_relu` as canonical CSR, without a dense ``N x d_sae`` array
    (``precision="bf16"``: the shared compiled kernels of :mod:`..bf16`)."""
    if precision == "bf16":
        return BF.encode_relu_sparse(x, W_enc, b_enc, b_dec, get_num_threads())
    xc = E.centered(x, b_dec)
    return _codes(*_encode_csr(xc, W_enc, b_enc), x.shape[0], W_enc.shape[1])


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec`` -> float32 ``[N, d_in]``: a gather-accumulate
    from CSR below
    :data:`~fastsae.backends.tunables.NUMBA_DENSE_DECODE_MIN_DENSITY`, BLAS
    products from it on (CSR codes scattered into cached row blocks, see
    :func:`.dense.decode_csr`; dense codes straight to BLAS)."""
    if isinstance(codes, SparseCodes):
        n, d_sae = codes.shape
        if codes.nnz >= TU.NUMBA_DENSE_DECODE_MIN_DENSITY * n * d_sae:
            with _blas_single():
                return DN.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec,
                                     NUMBA_RELU_ROW_BLOCK, get_num_threads())
        return D.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec)
    return D.decode_dense(codes, W_dec, b_dec, float(TU.NUMBA_DENSE_DECODE_MIN_DENSITY))


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row ``[d_sae]``."""
    return NR.row_norms(W_dec)


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` at the active entries; same kind out as in."""
    if isinstance(codes, SparseCodes):
        vals = NR.l1_subgradient_csr(codes.indices, codes.values, norms, float(l1_coefficient))
        return SparseCodes(codes.indptr.copy(), codes.indices.copy(), vals, codes.shape)
    return NR.l1_subgradient_dense(codes, norms, float(l1_coefficient))


# ---------------------------------------------------------------- backward
def _as_csr(codes):
    if isinstance(codes, SparseCodes):
        return codes.indptr, codes.indices, codes.values
    return D.dense_to_csr(codes)


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm, y=None):
    """Loss parts and gradients (see :func:`fastsae.backends.reference.gradients`):
    at the active entries only below
    :data:`~fastsae.backends.tunables.NUMBA_RELU_DENSE_MIN_DENSITY`, with
    BLAS products over dense codes from it on (:func:`.dense.relu_gradients`).
    ``y``: a transcoder's target (``x_hat`` its full reconstruction)."""
    n, d_sae = x.shape[0], params.d_sae
    t = x if y is None else y  # x_hat has the skip term: the residual is against y
    unit = decoder_norm == "unit_norm"
    sparse_in = isinstance(codes, SparseCodes)
    counts = None if sparse_in else D.row_nnz(codes)
    nnz = codes.nnz if sparse_in else int(counts.sum())
    if nnz >= TU.NUMBA_RELU_DENSE_MIN_DENSITY * n * d_sae:
        f = (DN.csr_to_dense(codes.indptr, codes.indices, codes.values, d_sae) if sparse_in
             else codes)
        xc = TC.encoder_input(x, params, y)
        with _blas_single():
            mse, l1, gWe, gbe, gWd, gbd, dx = DN.relu_gradients(
                t, xc, f, x_hat, params.W_enc, params.W_dec, NR.row_norms(params.W_dec),
                float(l1_coefficient), unit, get_num_threads(), y is None)
    else:
        indptr, indices, values = (_as_csr(codes) if sparse_in
                                   else D.csr_of_counts(codes, counts))
        mse, l1, gWe, gbe, gWd, gbd, dx = B.relu_gradients(
            t, TC.encoder_input(x, params, y), params.W_enc, params.W_dec, indptr, indices,
            values, x_hat, float(l1_coefficient), unit, y is None)
    return (Losses(mse=float(mse), l1=float(l1), total=float(mse) + float(l1)),
            _grads(params, gWe, gbe, gWd, gbd, dx, x))


def _grads(params, gWe, gbe, gWd, gbd, D, x) -> SAEParams:
    """The gradients as SAEParams (with ``W_skip``'s from ``D = dL/dy_hat``
    for a skip transcoder, :func:`.transcoder.grads`)."""
    if params.W_skip is None:
        return SAEParams(gWe, gbe, gWd, gbd)
    with _blas_single():
        return TC.grads(params, gWe, gbe, gWd, gbd, D, x, get_num_threads())


def _target(x, params, y):
    """The kernels' target (:func:`.transcoder.target`; the skip product
    with BLAS limited to one thread)."""
    if params.W_skip is None:
        return x if y is None else y
    with _blas_single():
        return TC.target(x, params, y, get_num_threads())


# ---------------------------------------------------------------- training
def _adam_moments(state: AdamState):
    """The moment arrays ``(mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd)`` of
    ``state`` (the front has checked them)."""
    m, v = state.m, state.v
    return m.W_enc, v.W_enc, m.b_enc, v.b_enc, m.W_dec, v.W_dec, m.b_dec, v.b_dec


_NOCOUNTS = np.empty(0, np.int64)


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None, y=None, precision="fp32") -> StepResult:
    """One training step in place (see :func:`fastsae.backends.reference.train_step`).

    The encoder (:func:`.encode.encode_relu_adaptive`) measures this batch's
    density on its first row blocks: from
    :data:`~fastsae.backends.tunables.NUMBA_RELU_DENSE_MIN_DENSITY` on it
    hands dense codes to :func:`.dense.step_core` (BLAS products), below it
    CSR codes to :func:`.step.train_step_core` (decode, backward at the
    active entries); both fuse Adam (+ unit-norm renormalization) into
    their weight pass. ``y``: a transcoder's target (:mod:`.transcoder`:
    the kernels fit ``y`` less the skip term; ``W_skip``'s Adam after them).

    ``precision="bf16"``: the encoder is :mod:`..bf16`'s on the copy of
    ``W_enc`` kept in ``state.bf16``, which the weight pass rewrites, unless
    the last step's codes were dense (see :func:`..bf16.bf16_step_wanted`):
    then this float32 step runs."""
    counts = _NOCOUNTS if fire_counts is None else fire_counts
    t = state.step + 1
    adam_c = NU.adam_constants(lr, beta1, beta2, eps, t)
    n, d_sae = x.shape[0], params.d_sae
    W_enc, b_enc, W_dec, b_dec = params.W_enc, params.b_enc, params.W_dec, params.b_dec
    unit = decoder_norm == "unit_norm"
    nt = get_num_threads()
    xc = TC.encoder_input(x, params, y)
    dense_min = float(TU.NUMBA_RELU_DENSE_MIN_DENSITY)
    bf = precision == "bf16" and BF.bf16_step_wanted(state, dense_min)
    copy = B.NO_COPY
    with _blas_single():
        tgt = TC.target(x, params, y, nt)
        if bf:
            (indptr, indices, values), copy = BF.step_codes(
                state, x, W_enc, b_enc, TC.encoder_centering(params, y), 0, nt)
            dense = False
            mx = 0
        else:
            dense, f, indptr, indices, values, mx = E.encode_relu_adaptive(
                xc, W_enc, b_enc, NUMBA_RELU_ROW_BLOCK, _k_for(n, d_sae), nt, dense_min,
                NUMBA_RELU_PROBE_BLOCKS)
        norms = NR.row_norms(W_dec)
        if dense:
            mse, l1, nnz, bad, dx = DN.step_core(
                tgt, xc, f, W_enc, b_enc, W_dec, b_dec, *_adam_moments(state), norms,
                float(l1_coefficient), unit, adam_c, counts, nt, y is None)
        else:
            if not bf:
                _learn_k(d_sae, mx)
            mse, l1, nnz, bad, dx = S.train_step_core(
                tgt, xc, indptr, indices, values, W_enc, b_enc, W_dec, b_dec,
                *_adam_moments(state), norms, float(l1_coefficient), unit, adam_c, counts,
                y is None, *copy)
        bad += TC.skip_adam(params, state, dx, x, adam_c)
    var = S.batch_variance(x if y is None else y)
    state.step = t
    if precision == "bf16":
        BF.step_done(state, W_enc, wrote=bf, nnz=nnz, n=n)
    return NU.relu_step_result(mse, l1, nnz, n, var, params_finite=bad == 0)


# ---------------------------------------------------------------- TopK family
_NOMAP = np.empty(0, np.int32)  # identity column map
_NOIDX = np.empty(0, np.int64)
_NO_U8 = np.empty(0, np.uint8)
_EMPTY1 = np.empty(0, np.float32)
# BatchTopK candidate-buffer width learned per (d_sae, k) from the last call
_cand: dict = {}


def _topk_csr(xc, W_enc, b_enc, k, colmap):
    with _blas_single():
        return TK.encode_topk_csr(xc, W_enc, b_enc, NUMBA_TOPK_ROW_BLOCK, int(k),
                                  get_num_threads(), colmap)


def _batchtopk_csr(xc, W_enc, b_enc, k):
    key = (int(W_enc.shape[1]), int(k))
    with _blas_single():
        indptr, indices, values, used = TK.encode_batchtopk_csr(
            xc, W_enc, b_enc, NUMBA_TOPK_ROW_BLOCK, int(k), get_num_threads(), _cand.get(key))
    _cand[key] = used
    return indptr, indices, values


def encode_topk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """Per row the ``k`` largest pre-activations (ties: lower index), ReLU,
    canonical CSR; fused with the product (no ``N x d_sae`` array)."""
    if precision == "bf16":
        return BF.encode_topk(x, W_enc, b_enc, b_dec, k, get_num_threads())
    xc = E.centered(x, b_dec)
    return _codes(*_topk_csr(xc, W_enc, b_enc, k, _NOMAP), x.shape[0], W_enc.shape[1])


def encode_batchtopk(x, W_enc, b_enc, b_dec, k, *, precision="fp32") -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: row-major
    order), ReLU, canonical CSR."""
    if precision == "bf16":
        return BF.encode_batchtopk(x, W_enc, b_enc, b_dec, k, get_num_threads())
    xc = E.centered(x, b_dec)
    return _codes(*_batchtopk_csr(xc, W_enc, b_enc, k), x.shape[0], W_enc.shape[1])


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, *, precision="fp32") -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` as canonical CSR."""
    if precision == "bf16":
        return BF.encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, get_num_threads())
    xc = E.centered(x, b_dec)
    with _blas_single():
        out = TK.encode_jumprelu_csr(xc, W_enc, b_enc, threshold, NUMBA_RELU_ROW_BLOCK,
                                     get_num_threads())
    return _codes(*out, x.shape[0], W_enc.shape[1])


def _aux_csr(xc, W_enc, b_enc, dead_mask, k_aux):
    """AuxK selection: TopK over the dead columns only (gathered, so the
    product is ``N x d_in x n_dead``), indices mapped back to features."""
    dead = np.flatnonzero(dead_mask).astype(np.int32)
    Wd, bd = TK.gather_columns(W_enc, b_enc, dead)
    return _topk_csr(xc, Wd, bd, k_aux, dead)


def _stack_csr(a, b):
    """CSR with 2N rows: ``a``'s rows then ``b``'s (each ``(indptr, indices,
    values)``)."""
    ip = np.concatenate([a[0], a[0][-1] + b[0][1:]])
    return ip, np.concatenate([a[1], b[1]]), np.concatenate([a[2], b[2]])


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0,
                   y=None):
    """Losses and gradients of a TopK/BatchTopK step (see
    :func:`fastsae.backends.reference.topk_gradients`), at the active entries
    only. The AuxK term is handled by stacking: rows ``N..2N-1`` carry the
    aux codes with ``d_ehat`` in place of ``d_xhat`` and the same ``xc``, so
    one sparse feature pass yields ``g_W_dec = f.T d_xhat + fa.T d_ehat``
    and ``g_W_enc = xc.T (d_pre + d_pre_aux)``. ``y``: a transcoder's
    target (``x_hat`` its full reconstruction: residuals against ``y``)."""
    W_enc, W_dec = params.W_enc, params.W_dec
    aux_weight = float(aux_weight)
    n = x.shape[0]
    d_sae = W_dec.shape[0]
    t = x if y is None else y
    xc = TC.encoder_input(x, params, y)
    d_xhat, row_sq = B.residual_grad(x_hat, t)
    mse = float(row_sq.sum() / n)
    aux_loss = 0.0
    indptr, indices, values = _as_csr(codes)  # dense codes are allowed too
    dx, xcs = d_xhat, xc
    if aux_codes is not None and aux_weight > 0:
        aux = _as_csr(aux_codes)
        e_hat = D.decode_csr(*aux, W_dec, np.zeros(W_dec.shape[1], np.float32))
        d_ehat, a_row_sq = B.aux_residual(e_hat, t, x_hat, np.float32(aux_weight * 2.0 / n))
        aux_loss = float(aux_weight * a_row_sq.sum() / n)
        indptr, indices, values = _stack_csr((indptr, indices, values), aux)
        dx = np.concatenate([d_xhat, d_ehat])
        xcs = np.concatenate([xc, xc])
    d_pre = B.d_pre_topk_csr(indptr, indices, values, dx, W_dec)
    colptr, rows, perm = B.csr_to_csc(indptr, indices, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc, y is None)
    g_W_enc = np.empty((W_enc.shape[0], d_sae), np.float32)
    g_W_dec = np.empty(W_dec.shape, np.float32)
    # TopK's decoder rows are unit-norm: projected gradient, no L1 term
    B.feature_grads(colptr, rows, perm, values, d_pre, dx, xcs, W_dec, _EMPTY1, 0.0, True,
                    g_W_enc, g_W_dec)
    return (Losses(mse=mse, l1=0.0, total=mse + aux_loss, aux=aux_loss),
            _grads(params, g_W_enc, g_b_enc, g_W_dec, g_b_dec, d_xhat, x))


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
    """One TopK/BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.backends.reference.train_step_topk`): fused top-k (and
    AuxK) encode, then :func:`.step.prefix_step_core` (one prefix): one row pass decoding
    both codes into the two residual gradients, ``d_pre`` at the selected
    entries, then one pass over tiles of features making both weight
    gradients and consuming them with Adam (decoder rows renormalized as
    they are updated). ``y``: a transcoder's target. ``precision="bf16"``:
    the TopK or BatchTopK selection from :mod:`..bf16`'s encoder on the
    copy of ``W_enc`` in ``state.bf16``, which the weight pass rewrites; the
    AuxK selection stays float32 (a product over the dead columns only)."""
    sq, aux_loss, main, var, bad = _selection_step(
        params, state, x, k, activation, lr, beta1, beta2, eps, fire_counts, dead_mask, k_aux,
        aux_coefficient, None, y, precision)
    n = x.shape[0]
    return NU.topk_step_result(sq[0] / n, aux_loss, main[0][-1], n, var, main[2],
                               params_finite=bad == 0)


def _selection_step(params, state, x, k, activation, lr, beta1, beta2, eps, fire_counts,
                    dead_mask, k_aux, aux_coefficient, widths, y, precision="fp32"):
    """The TopK family's step, shared by :func:`train_step_topk` and
    :func:`train_step_matryoshka` (``widths`` None: one prefix): encode
    (and AuxK), then :func:`.step.prefix_step_core` (a transcoder: on the
    target of :func:`.transcoder.target`, then ``W_skip``'s Adam from the
    row pass's ``D_0``). Returns ``(float64 [L] per-prefix sums of squared
    errors, aux loss, the CSR codes, variance of the target (x or y),
    bad)``."""
    n = x.shape[0]
    t = state.step + 1
    adam_c = NU.adam_constants(lr, beta1, beta2, eps, t)
    W_enc, b_enc, W_dec, b_dec = params.W_enc, params.b_enc, params.W_dec, params.b_dec
    use_aux = NU.auxk_active(dead_mask, k_aux, aux_coefficient)
    weight = NU.auxk_weight(dead_mask, k_aux, aux_coefficient) if use_aux else 0.0
    bf = precision == "bf16"
    copy = B.NO_COPY
    if bf:
        nt = get_num_threads()
        xc = TC.encoder_input(x, params, y)
        with _blas_single():
            main, copy = BF.step_codes(state, x, W_enc, b_enc, TC.encoder_centering(params, y),
                                       int(k), nt, batch=activation == "batchtopk")
        aux = (_aux_csr(xc, W_enc, b_enc, dead_mask, k_aux) if use_aux
               else (_NOIDX, _NOMAP, _EMPTY1))
    elif activation == "topk":
        # centering, TopK and AuxK selection in one parallel region, one product
        dead_u8 = dead_mask.astype(np.uint8) if use_aux else _NO_U8
        with _blas_single():
            xc, main, aux = TK.encode_topk_train(x, TC.encoder_centering(params, y), W_enc,
                                                 b_enc, NUMBA_TOPK_ROW_BLOCK, int(k),
                                                 get_num_threads(), dead_u8, int(k_aux))
    else:
        xc = TC.encoder_input(x, params, y)
        main = _batchtopk_csr(xc, W_enc, b_enc, k)
        aux = (_aux_csr(xc, W_enc, b_enc, dead_mask, k_aux) if use_aux
               else (_NOIDX, _NOMAP, _EMPTY1))
    counts = _NOCOUNTS if fire_counts is None else fire_counts
    levels = _levels(widths, params.d_sae)
    ws = _workspace(levels, n, params.d_out)
    sq, a_sq, var, bad = S.prefix_step_core(_target(x, params, y), xc, *main, *aux, W_enc,
                                            b_enc, W_dec, b_dec, *_adam_moments(state), adam_c,
                                            weight * 2.0 / n, NUMBA_TOPK_FEATURE_TILE, counts,
                                            levels, ws, y is None, *copy)
    if params.W_skip is not None:  # the kernel's variance is of y - x W_skip^T
        with _blas_single():
            bad += TC.skip_adam(params, state, ws[0], x, adam_c)
        var = S.batch_variance(y)
    state.step = t
    if bf:
        BF.step_done(state, W_enc, wrote=True, nnz=main[0][-1], n=n)
    aux_loss = weight * a_sq / n if use_aux else 0.0
    return sq, aux_loss, main, var, bad


_ws = threading.local()


def _workspace(levels, n, d_out):
    """The row pass's ``D`` ``[L, N, d_out]`` float32 (overwritten by every
    step), kept per thread for the last shape: a fresh one of ``L > 1``
    gradients is over glibc's mmap threshold and paged in anew on every
    step (~20 ms at paper size, L = 4). With one prefix a fresh array."""
    shape = (int(levels[-1]) + 1, int(n), int(d_out))
    if shape[0] == 1:
        return np.empty(shape, np.float32)
    d = getattr(_ws, "D", None)
    if d is None or d.shape != shape:
        d = _ws.D = np.empty(shape, np.float32)
    return d


def _levels(widths, d_sae):
    """Each feature's prefix level (int32 ``[d_sae]``); ``widths`` None: all 0."""
    if widths is None:
        return np.zeros(d_sae, np.int32)
    return NU.matryoshka_levels(widths, d_sae)


# ---------------------------------------------------------------- JumpReLU family
# Staging width of the JumpReLU candidate encoder, learned per d_sae as the
# ReLU encoder's (_k_for, _learn_k; its own table: candidates are not the
# ReLU codes).
_jr_stage: dict = {}


def _jr_encode(xc, W_enc, b_enc, lo, nt):
    """The adaptive candidate encoder (call with BLAS limited to one thread):
    ``(dense, pre, indptr, indices, values)``."""
    n, d_sae = xc.shape[0], W_enc.shape[1]
    dense, pre, indptr, indices, values, mx = JR.encode_adaptive(
        xc, W_enc, b_enc, lo, TU.NUMBA_JUMPRELU_ROW_BLOCK, _k_for(n, d_sae, _jr_stage), nt,
        float(TU.NUMBA_JUMPRELU_DENSE_MIN_DENSITY), TU.NUMBA_JUMPRELU_PROBE_BLOCKS)
    if not dense:
        _learn_k(d_sae, mx, _jr_stage)
    return dense, pre, indptr, indices, values


def _jr_prepare(x, params, log_threshold, bandwidth, l0_coefficient, y):
    """What both JumpReLU entry points start from: ``(n, theta, lo, hi,
    1 / bandwidth, the Step term's scale, threads, the encoder input (x -
    b_dec, or a transcoder's x), the residual's target)``."""
    n = x.shape[0]
    theta, lo, hi = NU.jumprelu_window(log_threshold, bandwidth)
    inv_bw = 1.0 / float(bandwidth)
    l0s = inv_bw * float(l0_coefficient) / n  # the Step term's scale, rounded as the reference
    return (n, theta, lo, hi, inv_bw, l0s, get_num_threads(), TC.encoder_input(x, params, y),
            _target(x, params, y))


_JR_MODES = {"step": JR.STEP, "tanh": JR.TANH, "quadratic": JR.QUADRATIC}


def _jr_modes(sparsity, dead_mask, n, l0_coefficient):
    """The kernels' sparsity arguments ``(mode, tcs, s, qc, tl0, dead, pn)``
    (see :func:`.jumprelu.sparse_step_core_modes`), or None for the default
    kernels: ``sparsity`` None, or ``"step"`` with no pre-activation loss
    acting (coefficient 0, or no dead feature), which is the default bit
    for bit."""
    sp = sparsity
    if NU.jumprelu_default_mode(sp, dead_mask):
        return None
    pre = sp.pre_act_coefficient > 0 and dead_mask is not None and bool(dead_mask.any())
    c = float(l0_coefficient)
    s = float(sp.tanh_scale)
    tl0 = float(sp.target_l0) if sp.mode == "quadratic" else 1.0
    dead = np.flatnonzero(dead_mask).astype(np.int64) if pre else _NOIDX64
    return (_JR_MODES[sp.mode], c * s / n, s, 4.0 * c / (n * tl0), tl0, dead,
            float(sp.pre_act_coefficient) / n if pre else 0.0)


_NOIDX64 = np.empty(0, np.int64)


def _jr_losses(mode, l0_coefficient, nnz, l0sum, aux_sum, n, sparsity):
    """``(l0_loss, aux)``: the weighted sparsity term (``"step"``: ``c *
    nnz / N``; else ``c * l0sum / N``) and pre-activation loss."""
    c = float(l0_coefficient)
    l0_loss = c * int(nnz) / n if mode is None or mode == JR.STEP else c * float(l0sum) / n
    aux = 0.0 if sparsity is None else float(sparsity.pre_act_coefficient) * float(aux_sum) / n
    return l0_loss, aux


def jumprelu_gradients(x, params: SAEParams, log_threshold, bandwidth, l0_coefficient,
                       sparsity=None, dead_mask=None, y=None):
    """Losses and gradients of a JumpReLU step (see
    :func:`fastsae.backends.reference.jumprelu_gradients`): the candidates
    ``pre > theta - bandwidth/2`` from the fused encoder, then the gradients
    at those entries only (:func:`.jumprelu.sparse_gradients`), or with BLAS
    products from
    :data:`~fastsae.backends.tunables.NUMBA_JUMPRELU_DENSE_MIN_DENSITY` on
    (:func:`.jumprelu.dense_gradients`). ``sparsity`` (a
    :class:`~fastsae.JumpReLUSparsity` or None) other than the default and
    the pre-activation loss (on ``dead_mask``'s features) take the
    ``*_modes`` kernels of both paths (:func:`.jumprelu.sparse_gradients_modes`,
    :func:`.jumprelu.dense_gradients_modes`); the default takes the same
    kernels as before, bit for bit. ``y``: a transcoder's target."""
    n, theta, lo, hi, inv_bw, l0s, nt, xc, tgt = _jr_prepare(x, params, log_threshold,
                                                             bandwidth, l0_coefficient, y)
    W_enc, b_enc, W_dec, b_dec = params.W_enc, params.b_enc, params.W_dec, params.b_dec
    modes = _jr_modes(sparsity, dead_mask, n, l0_coefficient)
    l0sum = aux_sum = 0.0
    with _blas_single():
        dense, pre, indptr, indices, values = _jr_encode(xc, W_enc, b_enc, lo, nt)
        if modes is None and dense:
            out = JR.dense_gradients(tgt, xc, pre, theta, lo, hi, W_enc, W_dec, b_dec, inv_bw,
                                     l0s, nt, y is None)
        elif modes is None:
            out = JR.sparse_gradients(tgt, xc, indptr, indices, values, theta, hi, W_enc,
                                      W_dec, b_dec, inv_bw, l0s, y is None)
        elif dense:
            *out, l0sum, aux_sum = JR.dense_gradients_modes(
                tgt, xc, pre, theta, lo, hi, W_enc, W_dec, b_dec, inv_bw, l0s, nt, y is None,
                *modes)
        else:
            *out, l0sum, aux_sum = JR.sparse_gradients_modes(
                tgt, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec, b_dec,
                inv_bw, l0s, y is None, *modes)
    sq, nnz, gWe, gbe, gWd, gbd, g_lt, dx = out
    mse = float(sq) / n
    l0_loss, aux = _jr_losses(None if modes is None else modes[0], l0_coefficient, nnz, l0sum,
                              aux_sum, n, sparsity)
    return (Losses(mse=mse, l1=0.0, total=mse + l0_loss + aux, aux=aux, l0_loss=l0_loss),
            _grads(params, gWe, gbe, gWd, gbd, dx, x), g_lt)


def train_step_jumprelu(params: SAEParams, state: AdamState, x, *, log_threshold, threshold_m,
                        threshold_v, bandwidth, l0_coefficient, lr, beta1=0.9, beta2=0.999,
                        eps=1e-8, fire_counts=None, sparsity=None, dead_mask=None,
                        y=None, precision="fp32") -> StepResult:
    """One JumpReLU step in place (see
    :func:`fastsae.backends.reference.train_step_jumprelu`): the fused
    candidate encoder, then below
    :data:`~fastsae.backends.tunables.NUMBA_JUMPRELU_DENSE_MIN_DENSITY`
    :func:`.jumprelu.sparse_step_core` (the TopK step's row and weight
    passes on the active entries, one dot per window entry), from it on
    :func:`.jumprelu.dense_step_core` (BLAS products); both fuse Adam on the
    four parameters (decoder rows renormalized) and on ``log_threshold``.
    A non-default ``sparsity`` or an acting pre-activation loss (``dead_mask``)
    takes :func:`.jumprelu.sparse_step_core_modes` /
    :func:`.jumprelu.dense_step_core_modes`, fused the same way ("tanh" and
    "quadratic" touch only the active and window entries, the pre-activation
    loss adds one dense pass over the dead columns, two GEMMs of their
    width, on the sparse path). ``y``: a transcoder's target (``W_skip``'s
    Adam after the core). ``precision="bf16"`` (the default mode; the front
    refuses others): the candidates (``pre > lo``) from :mod:`..bf16`'s
    encoder on the copy of ``W_enc`` in ``state.bf16``, which the sparse
    weight pass rewrites; unless the last step's codes were at least
    ``NUMBA_JUMPRELU_DENSE_MIN_DENSITY`` dense: then this float32 step."""
    counts = _NOCOUNTS if fire_counts is None else fire_counts
    t = state.step + 1
    adam_c = NU.adam_constants(lr, beta1, beta2, eps, t)
    n, theta, lo, hi, inv_bw, l0s, nt, xc, tgt = _jr_prepare(x, params, log_threshold,
                                                             bandwidth, l0_coefficient, y)
    W_enc, b_enc, W_dec, b_dec = params.W_enc, params.b_enc, params.W_dec, params.b_dec
    center = y is None
    modes = _jr_modes(sparsity, dead_mask, n, l0_coefficient)
    l0sum = aux_sum = 0.0
    var = None
    bf = precision == "bf16" and BF.bf16_step_wanted(
        state, float(TU.NUMBA_JUMPRELU_DENSE_MIN_DENSITY))
    copy = B.NO_COPY
    with _blas_single():
        if bf:
            dense = False
            (indptr, indices, values), copy = BF.step_codes(
                state, x, W_enc, b_enc, TC.encoder_centering(params, y), 0, nt, thr=lo)
        else:
            dense, pre, indptr, indices, values = _jr_encode(xc, W_enc, b_enc, lo, nt)
        if modes is None and dense:
            sq, nnz, bad, dx = JR.dense_step_core(
                tgt, xc, pre, theta, lo, hi, W_enc, b_enc, W_dec, b_dec, *_adam_moments(state),
                log_threshold, threshold_m, threshold_v, adam_c, inv_bw, l0s, counts, nt,
                center)
        elif modes is None:
            sq, nnz, var, bad, dx = JR.sparse_step_core(
                tgt, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec, b_dec,
                *_adam_moments(state), log_threshold, threshold_m, threshold_v, adam_c, inv_bw,
                l0s, TU.NUMBA_JUMPRELU_FEATURE_TILE, counts, center, *copy)
        elif dense:
            sq, nnz, bad, dx, l0sum, aux_sum = JR.dense_step_core_modes(
                tgt, xc, pre, theta, lo, hi, W_enc, b_enc, W_dec, b_dec, *_adam_moments(state),
                log_threshold, threshold_m, threshold_v, adam_c, inv_bw, l0s, counts, nt,
                center, *modes)
        else:
            sq, nnz, var, bad, dx, l0sum, aux_sum = JR.sparse_step_core_modes(
                tgt, xc, indptr, indices, values, theta, hi, W_enc, b_enc, W_dec, b_dec,
                *_adam_moments(state), log_threshold, threshold_m, threshold_v, adam_c, inv_bw,
                l0s, TU.NUMBA_JUMPRELU_FEATURE_TILE, counts, center, *modes)
        bad += TC.skip_adam(params, state, dx, x, adam_c)
    if var is None or params.W_skip is not None:  # the kernel's is of y - x W_skip^T
        var = S.batch_variance(x if y is None else y)
    state.step = t
    nnz = int(nnz)
    if precision == "bf16":
        BF.step_done(state, W_enc, wrote=bf, nnz=nnz, n=n)
    l0_loss, aux = _jr_losses(None if modes is None else modes[0], l0_coefficient, nnz, l0sum,
                              aux_sum, n, sparsity)
    return NU.jumprelu_step_result(float(sq) / n, l0_loss, nnz, n, float(var),
                                   params_finite=bad == 0, aux=aux)


# ---------------------------------------------------------------- Matryoshka family
def matryoshka_gradients(x, params: SAEParams, codes, widths, aux_codes=None, aux_weight=0.0,
                         y=None):
    """Losses (``prefix_mse`` one per width, ``total = sum(prefix_mse) +
    aux``) and gradients (``W_dec``'s projected) of a Matryoshka BatchTopK
    step on the given codes (see
    :func:`fastsae.backends.reference.matryoshka_gradients`):
    :func:`.matryoshka.gradients_core`, the training step's row pass (the
    prefix residuals as partial sums of each row's decode) and a weight pass
    writing the gradients; AuxK's term when ``aux_codes`` and ``aux_weight >
    0``; ``y``: a transcoder's target (every prefix has the skip term)."""
    n = x.shape[0]
    aux_weight = float(aux_weight)
    indptr, indices, values = _as_csr(codes)  # dense codes are allowed too
    use_aux = aux_codes is not None and aux_weight > 0
    aux = _as_csr(aux_codes) if use_aux else (_NOIDX, _NOMAP, _EMPTY1)
    xc = TC.encoder_input(x, params, y)
    levels = _levels(widths, params.d_sae)
    ws = _workspace(levels, n, params.d_out)
    sq, a_sq, gWe, gbe, gWd, gbd = MT.gradients_core(
        _target(x, params, y), xc, indptr, indices, values, *aux, params.W_enc, params.W_dec,
        params.b_dec, aux_weight * 2.0 / n, levels, ws, y is None)
    pm = tuple(float(s) / n for s in sq)
    aux_loss = aux_weight * float(a_sq) / n if use_aux else 0.0
    return (Losses(mse=pm[-1], l1=0.0, total=sum(pm) + aux_loss, aux=aux_loss, prefix_mse=pm),
            _grads(params, gWe, gbe, gWd, gbd, ws[0], x))


def train_step_matryoshka(params: SAEParams, state: AdamState, x, *, k, widths, lr, beta1=0.9,
                          beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None, k_aux=0,
                          aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
    """One Matryoshka BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.backends.reference.train_step_matryoshka`): the BatchTopK
    step (:func:`train_step_topk`'s encoder and
    :func:`.step.prefix_step_core`) with the features' prefix levels: the
    row pass keeps each prefix's partial reconstruction as the row's entries
    cross its width and the weight pass sums each feature's level's
    gradient, no extra pass over the decoder. ``y``: a transcoder's target.
    ``precision="bf16"``: as in :func:`train_step_topk`."""
    sq, aux_loss, main, var, bad = _selection_step(
        params, state, x, k, "batchtopk", lr, beta1, beta2, eps, fire_counts, dead_mask, k_aux,
        aux_coefficient, widths, y, precision)
    return NU.matryoshka_step_result(sq, aux_loss, main[0][-1], x.shape[0], var, main[2],
                                     params_finite=bad == 0)
