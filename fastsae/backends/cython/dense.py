"""Dense path of the ``cython`` backend's ReLU family (compiled ``_dense``,
``kernels/cython/dense.pyx``), for codes dense enough that BLAS products
beat the sparse gathers and scatters (a fresh ReLU SAE fires about half of
its features).

Which path runs is decided per call from that call's inputs, against
:data:`fastsae.backends.tunables.CYTHON_RELU_DENSE_MIN_DENSITY` (decode:
``CYTHON_DENSE_DECODE_MIN_DENSITY``; read at call time; 0.0 forces dense,
anything above 1 sparse):

* ``train_step`` (:mod:`.step`): the density of row block 0 of the encoder's
  grid (:func:`.encode.encode_relu_switch`), then :func:`step`;
* ``decode`` of :class:`SparseCodes` (:mod:`.decode`): ``nnz / (N * d_sae)``,
  then :func:`decode_csr`;
* ``gradients`` (:mod:`.backward`): ``nnz / (N * d_sae)`` of the codes
  (stored entries of sparse codes, nonzeros of dense ones), then
  :func:`gradients`.

The callers reach these through the module attribute (``dense.step(...)``),
so a test can replace them to see which path ran. Results are within
float32 tolerance of the reference and do not depend on the thread count
(every grid below is fixed by the shape); they are not bitwise equal to the
sparse path's.

Arrays come from the validating front: C-contiguous float32 in SAELens
layouts (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``), canonical
:class:`SparseCodes`, ``fire_counts`` int64 ``[d_sae]`` or None, ``y``
None or a transcoder's target ``[N, d_out]`` (see :mod:`.transcoder`).
"""

from __future__ import annotations

import numpy as np

from ...params import AdamState, Losses, SAEParams, StepResult
from ...sparse import SparseCodes
from ..numerics import relu_step_result
from ..tunables import (CYTHON_DENSE_DECODE_ROWS_MAX, CYTHON_DENSE_DECODE_ROWS_MIN,
                        CYTHON_DENSE_FEATURE_BLOCK_MAX, CYTHON_DENSE_FEATURE_BLOCK_MIN,
                        CYTHON_DENSE_MIN_FEATURE_BLOCKS, CYTHON_DENSE_ROW_BLOCK_MAX,
                        CYTHON_DENSE_ROW_BLOCK_MIN, CYTHON_DENSE_ROW_CHUNK)
from . import _backward, _dense
from . import transcoder as TC
from ._threads import blas_single, threads
from .adam import moment_arrays, step_constants
from .norms import decoder_column_norms

__all__ = ["step", "decode_csr", "gradients", "to_dense", "feature_block", "row_block"]


def _blocks(total: int, parts: int, lo: int, hi: int, mult: int = 1) -> int:
    """About ``total / parts`` (rounded up to a multiple of ``mult``),
    clamped to ``[lo, hi]`` and to ``total``: a shape-only block size."""
    b = -(-total // parts)
    b = -(-b // mult) * mult
    return max(1, min(total, hi, max(lo, b)))


def feature_block(d_sae: int) -> int:
    """Features per block of the dense feature pass (see
    :data:`~fastsae.backends.tunables.CYTHON_DENSE_MIN_FEATURE_BLOCKS`)."""
    return _blocks(d_sae, CYTHON_DENSE_MIN_FEATURE_BLOCKS, CYTHON_DENSE_FEATURE_BLOCK_MIN,
                   CYTHON_DENSE_FEATURE_BLOCK_MAX, 64)


def row_block(n: int) -> int:
    """Rows per block of the dense step's row pass."""
    return _blocks(n, 8, CYTHON_DENSE_ROW_BLOCK_MIN, CYTHON_DENSE_ROW_BLOCK_MAX)


def step(params: SAEParams, state: AdamState, x, f, norms, *, l1_coefficient, lr,
         decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
         fire_counts=None, y=None) -> StepResult:
    """The rest of a ReLU training step on dense codes, in place (``y``: a
    transcoder's target, ``f`` then encoded from ``x`` uncentered).

    ``x`` float32 ``[N, d_in]``; ``f`` float32 ``[N, d_sae]`` C-contiguous,
    ``relu((x - b_dec) @ W_enc + b_enc)`` under ``params`` (from
    :func:`.encode.encode_relu_switch`); ``norms`` float32 ``[d_sae]``, the
    decoder row norms of ``params.W_dec`` before the step. Decodes, computes
    the losses and gradients with dense BLAS products and applies Adam
    fused into the feature pass (``unit_norm``: decoder rows renormalized),
    updating ``params``, ``state`` (``step`` advanced) and ``fire_counts``
    (int64 ``[d_sae]`` or None) in place. Returns the batch's
    :class:`StepResult` (losses before the update, finite or loud)."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    work = n * d_in * d_sae
    nt = threads(work)
    t, consts = step_constants(state, lr, beta1, beta2, eps)
    kw = TC.kernel_args(x, params, y, builds_recon=True)  # before the blas guard: full pool
    with blas_single():
        mse, l1, nnz, bad = _dense.step_backward(
            x, f, params.W_enc, params.b_enc, params.W_dec, params.b_dec, norms,
            float(l1_coefficient), decoder_norm == "weighted_l1", decoder_norm == "unit_norm",
            *moment_arrays(state), consts, fire_counts, row_block(n), feature_block(d_sae),
            CYTHON_DENSE_ROW_CHUNK, nt, **kw)
    bad += TC.skip_adam(params, state, x, kw, consts)
    state.step = t
    t_fit = TC.fit_target(x, y)
    var = _backward.batch_variance(t_fit, threads(t_fit.size))
    return relu_step_result(mse, l1, nnz, n, var, params_finite=bad == 0)


def to_dense(codes: SparseCodes):
    """Canonical :class:`SparseCodes` as a dense float32 ``[N, d_sae]`` array."""
    n, d_sae = codes.shape
    out = np.empty((n, d_sae), dtype=np.float32)
    _dense.csr_to_dense(codes.indptr, codes.indices, codes.values, out, threads(n * d_sae))
    return out


def decode_csr(codes: SparseCodes, W_dec, b_dec):
    """``codes @ W_dec + b_dec`` for dense-ish :class:`SparseCodes`
    ``(N, d_sae)``: each block of rows scattered into a dense buffer and
    multiplied by one sgemm. ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
    returns float32 ``[N, d_in]``."""
    n, (d_sae, d_in) = codes.shape[0], W_dec.shape
    out = np.empty((n, d_in), dtype=np.float32)
    work = n * d_sae * d_in
    tm = _blocks(n, 8, CYTHON_DENSE_DECODE_ROWS_MIN, CYTHON_DENSE_DECODE_ROWS_MAX)
    with blas_single():
        _dense.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec, out, tm,
                          threads(work))
    return out


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm, y=None):
    """Loss parts and gradients (see :func:`fastsae.reference.gradients`)
    with dense BLAS products. ``x`` float32 ``[N, d_in]``, ``x_hat`` ``[N,
    d_out]`` (the full reconstruction); ``codes`` dense float32 ``[N,
    d_sae]`` (used as given) or :class:`SparseCodes` (made dense first);
    ``y`` a transcoder's target. Returns ``(Losses, SAEParams)`` of float32
    gradients in the parameters' layouts."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    f = to_dense(codes) if isinstance(codes, SparseCodes) else codes
    norms = decoder_column_norms(params.W_dec)
    g = SAEParams(*(np.empty_like(getattr(params, k)) for k in SAEParams.NAMES))
    kw = TC.kernel_args(x, params, y, builds_recon=False)
    with blas_single():
        mse, l1 = _dense.gradients(
            x, x_hat, f, params.W_enc, params.W_dec, params.b_dec, norms, float(l1_coefficient),
            decoder_norm == "weighted_l1", decoder_norm == "unit_norm", g.W_enc, g.b_enc,
            g.W_dec, g.b_dec, feature_block(d_sae), CYTHON_DENSE_ROW_CHUNK,
            threads(n * d_in * d_sae), **kw)
    return Losses(mse=mse, l1=l1, total=mse + l1), TC.with_skip_gradient(g, x, kw)
