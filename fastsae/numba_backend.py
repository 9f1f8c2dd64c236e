"""The ``numba`` backend: Numba CPU kernels, parallel over the cores.

The functions here take already validated, C-contiguous float32 arrays (use
them through :func:`fastsae.get_backend`, which validates) and assemble the
kernels of :mod:`fastsae._kernels` (``encode``, ``decode``, ``norms``,
``backward``, ``adam``). See :mod:`fastsae.reference` for the semantics.

Threads
-------
Numba's parallel loops use ``numba.get_num_threads()`` threads: set the
environment variable ``NUMBA_NUM_THREADS`` before the first import of numba
(that is the maximum), or call ``numba.set_num_threads(n)`` at any time (up
to that maximum; it applies to the calling thread). The encoder's products
run inside the parallel region, one single-threaded BLAS call per thread per
block, so while a fastsae kernel runs BLAS is limited to one thread with
threadpoolctl (and restored afterwards): the process never runs more compute
threads than ``numba.get_num_threads()``. Nothing else is needed; in
particular ``OPENBLAS_NUM_THREADS`` only affects BLAS calls made outside
fastsae (and the BLAS product of :func:`decode` for dense, not-sparse codes).

Results do not depend on the thread count: every parallel loop owns its
outputs and sums in a fixed order.

Compilation: every kernel is ``cache=True``; the first call in a fresh
environment compiles them (tens of seconds), later processes load them from
``__pycache__`` (see the issue's report for measured times).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit
from threadpoolctl import ThreadpoolController

from ._kernels import adam as A
from ._kernels import backward as B
from ._kernels import decode as D
from ._kernels import encode as E
from ._kernels import norms as NR
from ._kernels import topk as TK
from .params import AdamState, Losses, SAEParams, StepResult
from .sparse import SparseCodes

NAME = "numba"

__all__ = ["encode_relu", "encode_relu_sparse", "decode", "decoder_column_norms",
           "l1_subgradient", "gradients", "train_step", "encode_topk", "encode_batchtopk",
           "encode_jumprelu", "topk_gradients", "train_step_topk", "DESCRIPTION",
           "check_available"]


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


def _threads() -> int:
    return int(numba.get_num_threads())


# Staging width for the CSR encoder: per-row entries kept in the first pass.
# Learned from the previous call's largest row (x1.5, power of two) so rows
# rarely need the recompute path; bounded so the staging area stays small.
_k_stage: dict = {}


def _k_for(n: int, d_sae: int) -> int:
    k = _k_stage.get(d_sae, 128)
    cap = max(16, (256 << 20) // (8 * max(n, 1)))  # staging <= 256 MiB
    return int(max(1, min(k, d_sae, cap)))


def _learn_k(d_sae: int, max_count: int) -> None:
    want = 1
    while want < max(16, int(max_count) * 3 // 2):
        want *= 2
    _k_stage[d_sae] = want


def _encode_csr(xc, W_enc, b_enc):
    n, d_sae = xc.shape[0], W_enc.shape[1]
    with _blas_single():
        indptr, indices, values, mx = E.encode_relu_csr(xc, W_enc, b_enc, E.ROW_BLOCK,
                                                        _k_for(n, d_sae), _threads())
    _learn_k(d_sae, mx)
    return indptr, indices, values


# ---------------------------------------------------------------- forward
def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)`` -> dense float32 ``[N, d_sae]``."""
    xc = E.centered(x, b_dec)
    with _blas_single():
        return E.encode_relu_dense(xc, W_enc, b_enc, E.ROW_BLOCK, _threads())


def encode_relu_sparse(x, W_enc, b_enc, b_dec) -> SparseCodes:
    """:func:`encode_relu` as canonical CSR, without a dense ``N x d_sae`` array."""
    xc = E.centered(x, b_dec)
    indptr, indices, values = _encode_csr(xc, W_enc, b_enc)
    return SparseCodes(indptr, indices, values, (int(x.shape[0]), int(W_enc.shape[1])))


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec`` -> float32 ``[N, d_in]``; gather-accumulate
    from CSR (dense codes are compacted first unless more than 1/8 is nonzero)."""
    if isinstance(codes, SparseCodes):
        return D.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec)
    return D.decode_dense(codes, W_dec, b_dec)


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row ``[d_sae]``."""
    return NR.row_norms(W_dec)


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` at the active entries; same kind out as in."""
    if isinstance(codes, SparseCodes):
        vals = NR.l1_subgradient_csr(codes.indices, norms, float(l1_coefficient))
        return SparseCodes(codes.indptr.copy(), codes.indices.copy(), vals, codes.shape)
    return NR.l1_subgradient_dense(codes, norms, float(l1_coefficient))


# ---------------------------------------------------------------- backward
_EMPTY2 = np.empty((0, 0), np.float32)
_EMPTY1 = np.empty(0, np.float32)


@njit(cache=True)
def _gradients_core(x, W_enc, b_enc, W_dec, b_dec, indptr, indices, values, x_hat,
                    l1c, unit_norm):
    n, d_in = x.shape
    d_sae = W_dec.shape[0]
    xc = E.centered(x, b_dec)
    d_xhat, row_sq = B.residual_grad(x_hat, x)
    norms = NR.row_norms(W_dec)
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    l1n = l1c / n
    d_pre, row_l1 = B.d_pre_csr(indptr, indices, values, d_xhat, W_dec, penalty, l1n)
    colptr, rows, perm = B.csr_to_csc(indptr, indices, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc)
    g_W_enc = np.empty((d_in, d_sae), np.float32)
    g_W_dec = np.empty((d_sae, d_in), np.float32)
    e2 = np.empty((0, 0), np.float32)
    e1 = np.empty(0, np.float32)
    B.feature_pass(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n,
                   unit_norm, False, g_W_enc, g_W_dec,
                   e2, e1, e1, e2, e2, e1, e1, e2, e2, e1)
    mse = row_sq.sum() / n
    l1 = l1c * row_l1.sum() / n
    return mse, l1, g_W_enc, g_b_enc, g_W_dec, g_b_dec


def _as_csr(codes):
    if isinstance(codes, SparseCodes):
        return codes.indptr, codes.indices, codes.values
    return D.dense_to_csr(codes)


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm):
    """Loss parts and gradients (see :func:`fastsae.reference.gradients`),
    computed at the active entries only."""
    indptr, indices, values = _as_csr(codes)
    mse, l1, gWe, gbe, gWd, gbd = _gradients_core(
        x, params.W_enc, params.b_enc, params.W_dec, params.b_dec, indptr, indices, values,
        x_hat, float(l1_coefficient), decoder_norm == "unit_norm")
    return (Losses(mse=float(mse), l1=float(l1), total=float(mse) + float(l1)),
            SAEParams(gWe, gbe, gWd, gbd))


# ---------------------------------------------------------------- training
@njit(parallel=True, cache=True)
def _row_sq_dev(x, mean):
    n, d = x.shape
    out = np.empty(n, np.float64)
    for i in numba.prange(n):
        s = 0.0
        for k in range(d):
            diff = np.float64(x[i, k]) - mean[k]
            s += diff * diff
        out[i] = s
    return out


@njit(cache=True)
def _train_step_core(x, W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd,
                     l1c, unit_norm, adam_c, fire_counts, row_block, k_stage, n_threads):
    """Forward, backward and Adam on one batch with no Python in between.

    Returns ``(mse, l1, nnz, variance_of_x, max_row_count)``. Must run with
    BLAS limited to one thread (see the module docstring).
    """
    n, d_in = x.shape
    d_sae = W_dec.shape[0]
    # forward (sparse: no N x d_sae array)
    xc = E.centered(x, b_dec)
    indptr, indices, values, max_cnt = E.encode_relu_csr(xc, W_enc, b_enc, row_block,
                                                         k_stage, n_threads)
    d_xhat, row_sq = D.decode_residual_csr(indptr, indices, values, W_dec, b_dec, x)
    # backward, at the active entries only (old W_dec / W_enc read here)
    norms = NR.row_norms(W_dec)
    penalty = np.ones(d_sae, np.float32) if unit_norm else norms
    l1n = l1c / n
    d_pre, row_l1 = B.d_pre_csr(indptr, indices, values, d_xhat, W_dec, penalty, l1n)
    colptr, rows, perm = B.csr_to_csc(indptr, indices, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc)
    # W_dec, W_enc, b_enc: gradient tiles consumed by Adam as they are made
    e2 = np.empty((0, 0), np.float32)
    B.feature_pass(colptr, rows, perm, values, d_pre, d_xhat, xc, W_dec, norms, l1n,
                   unit_norm, True, e2, e2,
                   W_enc, b_enc, g_b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c)
    A.adam_flat(b_dec, g_b_dec, mbd, vbd, adam_c)
    if fire_counts.shape[0] > 0:
        for j in range(d_sae):
            fire_counts[j] += colptr[j + 1] - colptr[j]
    mse = row_sq.sum() / n
    l1 = l1c * row_l1.sum() / n
    mean = B.column_sums_rows(x) / n
    var = _row_sq_dev(x, mean).sum() / n
    return mse, l1, indptr[n], var, max_cnt


def _adam_moments(state: AdamState):
    """The moment arrays ``(mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd)`` of
    ``state``, already checked by :func:`fastsae._validate.adam_state_arg`
    (the backend front end validates before calling in)."""
    m, v = state.m, state.v
    return m.W_enc, v.W_enc, m.b_enc, v.b_enc, m.W_dec, v.W_dec, m.b_dec, v.b_dec


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None) -> StepResult:
    """One training step in place (see :func:`fastsae.reference.train_step`):
    a single compiled call does the sparse encode, decode, backward at the
    active entries and the fused Adam update (+ unit-norm renormalization)."""
    mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd = _adam_moments(state)
    counts = np.empty(0, np.int64) if fire_counts is None else fire_counts
    t = state.step + 1
    adam_c = A.adam_consts(lr, beta1, beta2, eps, t)
    n, d_sae = x.shape[0], params.d_sae
    with _blas_single():
        mse, l1, nnz, var, mx = _train_step_core(
            x, params.W_enc, params.b_enc, params.W_dec, params.b_dec,
            mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, float(l1_coefficient),
            decoder_norm == "unit_norm", adam_c, counts, E.ROW_BLOCK, _k_for(n, d_sae),
            _threads())
    _learn_k(d_sae, mx)
    state.step = t
    mse, l1, var = float(mse), float(l1), float(var)
    ev = 1.0 - mse / var if var > 0 else 1.0
    return StepResult(mse=mse, l1=l1, total=mse + l1, l0=float(nnz) / n,
                      explained_variance=ev)


# ---------------------------------------------------------------- TopK family
_NOMAP = np.empty(0, np.int32)
# BatchTopK candidate-buffer width learned per (d_sae, k) from the last call
_cand: dict = {}


def _codes(indptr, indices, values, n, d_sae) -> SparseCodes:
    return SparseCodes(indptr, indices, values, (int(n), int(d_sae)))


def _topk_csr(xc, W_enc, b_enc, k):
    with _blas_single():
        return TK.encode_topk_csr(xc, W_enc, b_enc, TK.ROW_BLOCK, int(k), _threads(), _NOMAP)


def _batchtopk_csr(xc, W_enc, b_enc, k):
    key = (int(W_enc.shape[1]), int(k))
    with _blas_single():
        indptr, indices, values, used = TK.encode_batchtopk_csr(
            xc, W_enc, b_enc, TK.ROW_BLOCK, int(k), _threads(), _cand.get(key))
    _cand[key] = used
    return indptr, indices, values


def encode_topk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """Per row the ``k`` largest pre-activations (ties: lower index), ReLU,
    canonical CSR; fused with the product (no ``N x d_sae`` array)."""
    xc = E.centered(x, b_dec)
    return _codes(*_topk_csr(xc, W_enc, b_enc, k), x.shape[0], W_enc.shape[1])


def encode_batchtopk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: row-major
    order), ReLU, canonical CSR."""
    xc = E.centered(x, b_dec)
    return _codes(*_batchtopk_csr(xc, W_enc, b_enc, k), x.shape[0], W_enc.shape[1])


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold) -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` as canonical CSR."""
    xc = E.centered(x, b_dec)
    with _blas_single():
        out = TK.encode_jumprelu_csr(xc, W_enc, b_enc, np.ascontiguousarray(threshold,
                                                                            np.float32),
                                     E.ROW_BLOCK, _threads())
    return _codes(*out, x.shape[0], W_enc.shape[1])


def _aux_csr(xc, W_enc, b_enc, dead_mask, k_aux):
    """AuxK selection: TopK over the dead columns only (gathered, so the
    product is ``N x d_in x n_dead``), indices mapped back to features."""
    dead = np.flatnonzero(dead_mask).astype(np.int32)
    Wd, bd = TK.gather_columns(W_enc, b_enc, dead)
    with _blas_single():
        return TK.encode_topk_csr(xc, Wd, bd, TK.ROW_BLOCK, int(k_aux), _threads(), dead)


@njit(parallel=True, cache=True)
def _aux_residual(e_hat, x, x_hat, scale):
    """``d_ehat = scale * (e_hat - (x - x_hat))`` and per-row squared error."""
    n, d = x.shape
    out = np.empty((n, d), np.float32)
    row_sq = np.empty(n, np.float64)
    for i in numba.prange(n):
        s = 0.0
        for k in range(d):
            err = e_hat[i, k] - (x[i, k] - x_hat[i, k])
            s += np.float64(err) * err
            out[i, k] = scale * err
        row_sq[i] = s
    return out, row_sq


def _stack_csr(a, b, n):
    """CSR with 2N rows: ``a``'s rows then ``b``'s (each ``(indptr, indices,
    values)``)."""
    ip = np.concatenate([a[0], a[0][-1] + b[0][1:]])
    return ip, np.concatenate([a[1], b[1]]), np.concatenate([a[2], b[2]])


def _topk_backward(x, xc, W_enc, W_dec, x_hat, d_xhat, main, aux, aux_weight, adam):
    """Shared TopK backward. The AuxK term is handled by stacking: rows
    ``N..2N-1`` carry the aux codes with ``d_ehat`` in place of ``d_xhat``
    and the same ``xc``, so one sparse feature pass yields ``g_W_dec =
    f.T d_xhat + fa.T d_ehat`` and ``g_W_enc = xc.T (d_pre + d_pre_aux)``.
    ``adam``: ``None`` (return gradients) or ``(params, moments, adam_c)``.
    Returns ``(aux_loss, g_b_enc, g_b_dec, g_W_enc, g_W_dec)``."""
    n = x.shape[0]
    d_sae = W_dec.shape[0]
    aux_loss = 0.0
    indptr, indices, values = main
    dx, xcs = d_xhat, xc
    if aux is not None and aux_weight > 0:
        e_hat = D.decode_csr(aux[0], aux[1], aux[2], W_dec, np.zeros(W_dec.shape[1],
                                                                     np.float32))
        d_ehat, row_sq = _aux_residual(e_hat, x, x_hat, np.float32(aux_weight * 2.0 / n))
        aux_loss = float(aux_weight * row_sq.sum() / n)
        indptr, indices, values = _stack_csr(main, aux, n)
        dx = np.concatenate([d_xhat, d_ehat])
        xcs = np.concatenate([xc, xc])
    zeros = np.zeros(d_sae, np.float32)
    d_pre, _ = B.d_pre_csr(indptr, indices, values, dx, W_dec, zeros, 0.0)
    colptr, rows, perm = B.csr_to_csc(indptr, indices, d_sae)
    g_b_enc = B.column_sums_csc(colptr, perm, d_pre)
    g_b_dec = B.b_dec_grad(B.column_sums_rows(d_xhat), W_enc, g_b_enc)
    e2, e1 = _EMPTY2, _EMPTY1
    if adam is None:
        g_W_enc = np.empty((W_enc.shape[0], d_sae), np.float32)
        g_W_dec = np.empty(W_dec.shape, np.float32)
        B.feature_pass(colptr, rows, perm, values, d_pre, dx, xcs, W_dec, zeros, 0.0,
                       True, False, g_W_enc, g_W_dec,
                       e2, e1, e1, e2, e2, e1, e1, e2, e2, e1)
        return aux_loss, g_b_enc, g_b_dec, g_W_enc, g_W_dec
    params, (mWe, vWe, mbe, vbe, mWd, vWd), adam_c = adam
    B.feature_pass(colptr, rows, perm, values, d_pre, dx, xcs, W_dec, zeros, 0.0,
                   True, True, e2, e2, params.W_enc, params.b_enc, g_b_enc,
                   mWe, vWe, mbe, vbe, mWd, vWd, adam_c)
    return aux_loss, g_b_enc, g_b_dec, None, None


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0):
    """Losses and gradients of a TopK/BatchTopK step (see
    :func:`fastsae.reference.topk_gradients`), at the active entries only."""
    xc = E.centered(x, params.b_dec)
    d_xhat, row_sq = B.residual_grad(x_hat, x)
    n = x.shape[0]
    mse = float(row_sq.sum() / n)
    main = (codes.indptr, codes.indices, codes.values)
    aux = None if aux_codes is None else (aux_codes.indptr, aux_codes.indices,
                                          aux_codes.values)
    aux_loss, gbe, gbd, gWe, gWd = _topk_backward(x, xc, params.W_enc, params.W_dec, x_hat,
                                                  d_xhat, main, aux, float(aux_weight),
                                                  None)
    return (Losses(mse=mse, l1=0.0, total=mse + aux_loss, aux=aux_loss),
            SAEParams(gWe, gbe, gWd, gbd))


#: Features per tile of the TopK step's weight pass (see
#: :func:`fastsae._kernels.backward.topk_feature_adam`): 64 float32 = 256
#: contiguous bytes per row of ``W_enc`` and of each of its moments.
_TOPK_TILE = 64


@njit(cache=True, error_model="numpy")  # see _kernels.adam.adam_elem
def _topk_step_core(x, xc, indptr, indices, values, a_indptr, a_indices, a_values, W_enc,
                    b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd, adam_c,
                    aux_scale, tile, fire_counts):
    """Everything of a TopK step after the encoder, in two parallel regions:
    the row pass (decode, residual gradients, ``d_pre``, column sums; see
    :func:`fastsae._kernels.backward.topk_row_pass`) and the weight pass
    over feature tiles with Adam fused
    (:func:`fastsae._kernels.backward.topk_feature_adam`); the AuxK codes
    (``a_indptr`` non-empty) are rows ``N..2N-1`` of one transposed pattern.
    ``b_dec`` is updated serially (``d_in`` values). Returns ``(sum of
    squared errors, sum of squared aux errors, variance of x)``."""
    n = x.shape[0]
    d_sae, d_in = W_dec.shape
    d_xhat, d_ehat, d_pre, a_d_pre, sq, a_sq, sum_dx, sum_x, sum_xx = B.topk_row_pass(
        indptr, indices, values, a_indptr, a_indices, a_values, W_dec, b_dec, x, aux_scale)
    ip, ix, vv, dp = indptr, indices, values, d_pre
    if a_indptr.shape[0] > 0:
        nm = indptr[n]
        ip = np.empty(2 * n + 1, np.int64)
        ip[:n + 1] = indptr
        ip[n + 1:] = nm + a_indptr[1:]
        ix = np.concatenate((indices, a_indices))
        vv = np.concatenate((values, a_values))
        dp = np.concatenate((d_pre, a_d_pre))
    colptr, rows, perm = B.csr_to_csc(ip, ix, d_sae)
    _, part = B.topk_feature_adam(colptr, rows, perm, vv, dp, d_xhat, d_ehat, xc, W_dec,
                                  W_enc, b_enc, mWe, vWe, mbe, vbe, mWd, vWd, adam_c, tile)
    # g_b_dec = sum_i d_xhat_i - W_enc_old @ g_b_enc (tile partials in order)
    for k in range(d_in):
        s = 0.0
        for t in range(part.shape[0]):
            s += part[t, k]
        g = np.float32(sum_dx[k]) - np.float32(s)
        b_dec[k], mbd[k], vbd[k] = A.adam_elem(b_dec[k], g, mbd[k], vbd[k], adam_c)
    if fire_counts.shape[0] > 0:
        for p in range(indptr[n]):
            fire_counts[indices[p]] += 1
    m2 = 0.0
    for k in range(d_in):
        m2 += sum_x[k] * sum_x[k]
    var = max(sum_xx - m2 / n, 0.0) / n
    return sq, a_sq, var


_NOIDX = np.empty(0, np.int64)
_NO_U8 = np.empty(0, np.uint8)
_NOCOUNTS = np.empty(0, np.int64)


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0) -> StepResult:
    """One TopK/BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.reference.train_step_topk`): fused top-k (and AuxK)
    encode, one row pass decoding both codes into the two residual
    gradients, ``d_pre`` at the selected entries, then one pass over tiles
    of features making both weight gradients and consuming them with Adam
    (decoder rows renormalized as they are updated)."""
    mWe, vWe, mbe, vbe, mWd, vWd, mbd, vbd = _adam_moments(state)
    n, d_sae = x.shape[0], params.d_sae
    t = state.step + 1
    adam_c = A.adam_consts(lr, beta1, beta2, eps, t)
    W_enc, b_enc, W_dec, b_dec = params.W_enc, params.b_enc, params.W_dec, params.b_dec
    use_aux = (dead_mask is not None and k_aux > 0 and aux_coefficient > 0
               and np.any(dead_mask))
    weight = 0.0
    if use_aux:
        n_dead = int(np.count_nonzero(dead_mask))
        weight = float(aux_coefficient) * min(n_dead / int(k_aux), 1.0)
    if activation == "topk":
        # centering, TopK and AuxK selection in one parallel region, one product
        dead_u8 = np.asarray(dead_mask).astype(np.uint8) if use_aux else _NO_U8
        with _blas_single():
            xc, main, aux = TK.encode_topk_train(x, b_dec, W_enc, b_enc, TK.ROW_BLOCK,
                                                 int(k), _threads(), dead_u8, int(k_aux))
    else:
        xc = E.centered(x, b_dec)
        main = _batchtopk_csr(xc, W_enc, b_enc, k)
        aux = (_aux_csr(xc, W_enc, b_enc, np.asarray(dead_mask), k_aux) if use_aux
               else (_NOIDX, _NOMAP, _EMPTY1))
    counts = _NOCOUNTS if fire_counts is None else fire_counts
    sq, a_sq, var = _topk_step_core(x, xc, main[0], main[1], main[2], aux[0], aux[1], aux[2],
                                    W_enc, b_enc, W_dec, b_dec, mWe, vWe, mbe, vbe, mWd, vWd,
                                    mbd, vbd, adam_c, weight * 2.0 / n, _TOPK_TILE, counts)
    state.step = t
    mse = float(sq / n)
    aux_loss = float(weight * a_sq / n) if use_aux else 0.0
    var = float(var)
    ev = 1.0 - mse / var if var > 0 else 1.0
    vals = main[2]
    return StepResult(mse=mse, l1=0.0, total=mse + aux_loss, l0=float(main[0][-1]) / n,
                      explained_variance=ev, aux=aux_loss,
                      extra={"min_active": float(vals.min()) if vals.size else 0.0})
