"""CUDA kernels of the JumpReLU family: training with the rectangle-kernel
pseudo-gradients (see the "JumpReLU family" section of
:mod:`fastsae.backends.reference`).

A step only needs the entries with ``pre > lo`` (``lo = theta - bw/2``): the
active ones (``pre > theta``) and the window's (``lo < pre < hi``). It runs

1. :func:`window_kernel`: ``theta = exp(log_threshold)``, ``lo``, ``hi`` per
   feature, in float32 exactly as ``reference.jumprelu_window`` does.
2. The encoder GEMM of :mod:`.encode` (no activation) into a staging buffer.
3. The epilogue: :func:`candidate_count_kernel` counts each row's candidates
   (``pre > lo[c]``, one comparison per entry), an exclusive scan gives the
   candidates' CSR ``indptr`` (the one scalar read of the step: their total,
   which sizes the buffers), and :func:`candidate_compact_kernel` writes
   them in increasing column order: ``values = f`` (``pre`` when ``pre >
   theta``, else 0: a window entry below the threshold) and the raw ``pre``.
4. The sparse decode of :mod:`.decode` over the candidates (an entry with
   ``f = 0`` adds an exact 0), the residual and ``g_b_dec`` of
   :mod:`.backward`.
5. :func:`jump_dpre_kernel`: ``d_f = d_xhat . W_dec[j]`` at every candidate,
   and ``d_pre = d_f`` where active, else 0.
6. The stable CSR -> CSC transposition and the per-feature gradient kernel of
   :mod:`.backward` (unit-norm projection of ``g_W_dec``), unchanged: the
   candidates with ``f = 0`` contribute exact zeros.
7. :func:`theta_grad_kernel`: per feature, over its CSC list (row order,
   deterministic), the window's sum of ``d_f`` and count, and the active
   count; ``g_log_threshold`` as the reference combines them.
8. ``g_W_enc`` by transposition, ``g_b_dec -= W_enc @ g_b_enc``; the fused
   Adam of :mod:`.adam` on the parameters (decoder rows renormalized in
   the same pass) and on ``log_threshold`` at the same step.

Dense path: when the candidates exceed ``CUDA_JUMPRELU_DENSE_MIN_DENSITY``
of ``N x d_sae`` (a fresh SAE fires about half its features), steps 4-8
become GEMMs on dense arrays (:func:`_jump_dense`): codes ``f`` by
:func:`~fastsae.backends.cuda.topk.jumprelu_kernel`, ``x_hat = f @ W_dec +
b_dec``, ``d_f = d_xhat @ W_dec.T``, one column pass
(:func:`dense_feature_kernel`: ``d_pre``, ``g_b_enc``, the threshold's
gradient, active counts), ``g_W_enc = (x - b_dec).T @ d_pre``, ``g_W_dec =
f.T @ d_xhat`` projected by :func:`project_rows_kernel`.

Transcoders (``y`` given, :mod:`.transcoder`): the target is ``y``, the
encoder GEMM and ``g_W_enc`` read ``x`` uncentred, ``g_b_dec`` has no
``- W_enc @ g_b_enc`` term, and a skip transcoder's ``x @ W_skip.T`` is added
after either path's decode, its gradient ``d_xhat.T @ x`` one GEMM.

Sparsity modes (``sparsity``, a :class:`~fastsae.JumpReLUSparsity`; the
math is in the reference's JumpReLU section). ``None`` and the default
(``"step"``, no pre-activation loss) run exactly the kernels above, bit for
bit as before. The others share steps 1-6 and differ in a few kernels:

* ``"tanh"``: :func:`tanh_adjust_kernel` adds ``t = (c s / N) (1 -
  tanh(s f)**2)`` to ``d_f`` at every candidate (and so to ``d_pre`` where
  active) before the per-feature pass; the dense path adds it in
  :func:`dense_feature_mode_kernel`. No Step term; the loss sums ``tanh(s
  f)`` over the active entries (per feature, float64).
* ``"quadratic"``: each row's active count (:func:`row_active_kernel` on
  the candidates' CSR, :func:`~fastsae.backends.cuda.encode.count_rows_kernel`
  on the dense codes) gives ``q_i`` and the row's loss
  (:func:`quad_rows_kernel`); the Step term sums ``q_i`` over the window.
* Both, and ``"step"`` with the pre-activation loss, compute
  ``g_log_threshold`` with :func:`theta_grad_mode_kernel` (sparse) or
  :func:`dense_feature_mode_kernel` (dense) in place of
  :func:`theta_grad_kernel` / :func:`dense_feature_kernel`.
* Pre-activation loss (``pre_act_coefficient > 0`` and a ``dead_mask``
  with any True): over the dead columns only. :func:`preact_kernel` reads
  their pre-activations from the encoder's staging buffer (which holds all
  of them, below ``lo`` too), one block per dead column: ``d_pre = -p/N``
  at ``pre < theta`` into a ``[n_dead, N]`` buffer, its column sums, the
  threshold's ``(p/N) count`` and the loss. ``g_W_enc``'s part is one GEMM
  ``d_pre_dead^T @ x_c`` (``[n_dead, d_in]``) scattered into the dead
  columns (:func:`scatter_add_kernel`), ``g_b_enc``'s part is added before
  the SAE's ``- W_enc @ g_b_enc`` term. The dead indices are counted and
  listed on the host (a device mask is fetched: ``d_sae`` bools).

No float atomics: results are bit-for-bit reproducible on one GPU. On device
arrays only scalars come back to the host (the candidate count, then the
loss sums and the non-finite flag in one fetch).

Host side: :func:`jumprelu_gradients`, :func:`train_step_jumprelu`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ...params import AdamState, Losses, SAEParams, StepResult
from .. import tunables as TU
from ..numerics import adam_constant_tuple, jumprelu_step_result
from .adam import _adam, adam_kernel
from .backward import (_colsum, _encoder_grads, _residual, csc_count_kernel,
                       csc_fill_kernel, csc_offsets_kernel, feature_grad_kernel,
                       matvec_sub_kernel)
from .common import (BLOCK, CHUNK_ROWS, GROUPS, LANES, SCAN_SHARED, _single_block, _zero,
                     block_exclusive_scan, block_sum, block_sum2, exclusive_scan_kernel,
                     fill_kernel, flat_grid, grid_for, sum_kernel)
from .decode import _no_widths, _one_level, _sparse_decode
from .encode import _fp32_only, _gemm, count_rows_kernel
from .placement import (_any_device, _device, _empty, _empty_like_params, _is_device,
                        _out, _params_device, _params_out, _work, _work_at_least, to_numpy)
from .step import _finish_step, _step_arrays
from .topk import jumprelu_kernel
from .transcoder import (_add_skip, _device_or_none, _input_shift, _skip_grad, _target,
                         _transpose, _zeros)


# ------------------------------------------------------------ kernels
@cuda.jit(cache=True)
def window_kernel(log_threshold, half, theta, lo, hi):
    """``theta = exp(log_threshold)``, ``lo = theta - half``, ``hi = theta +
    half``; all float32 ``[d_sae]``, ``half`` float32 (``lo``, ``hi``
    rounded as ``reference.jumprelu_window`` rounds them). Grid-stride."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for j in range(start, theta.shape[0], step):
        v = log_threshold[j]
        # float32 exp overflows above ~88.72; the guard (NaN passes through
        # to exp) only keeps the simulator's float64 math.exp from raising
        t = np.float32(math.inf) if v > 88.75 else np.float32(math.exp(v))
        theta[j] = t
        lo[j] = t - half
        hi[j] = t + half


@cuda.jit(cache=True)
def candidate_count_kernel(pre, lo, counts):
    """``counts[r]`` = entries of row ``r`` with ``pre[r, c] > lo[c]``.

    pre: float32 ``[N, d]``; lo: float32 ``[d]``; counts: int32 ``[N]``.
    One block of ``BLOCK`` threads per row (grid-stride over rows)."""
    t = cuda.threadIdx.x
    n = pre.shape[0]
    d = pre.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        total = 0
        for base in range(0, d, BLOCK):
            c = base + t
            flag = 0
            if c < d and pre[r, c] > lo[c]:
                flag = 1
            total += cuda.syncthreads_count(flag)
        if t == 0:
            counts[r] = total


@cuda.jit(cache=True)
def candidate_compact_kernel(pre, lo, theta, indptr, indices, values, cand_pre):
    """The candidates (``pre > lo``) as canonical CSR.

    indptr: int64 ``[N + 1]`` (exclusive scan of the candidate counts);
    outputs indices int32, values float32 (``f``: ``pre`` where ``pre >
    theta``, else 0) and cand_pre float32 (``pre``), all ``[n_cand]``. One
    block per row; chunk by chunk of ``BLOCK`` columns, a block scan places
    each candidate (increasing columns, deterministic, no atomics); empty
    chunks are skipped after one ``syncthreads_or``."""
    sh = cuda.shared.array(SCAN_SHARED, np.int64)
    t = cuda.threadIdx.x
    n = pre.shape[0]
    d = pre.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        pos = indptr[r]
        for base in range(0, d, BLOCK):
            c = base + t
            v = np.float32(0.0)
            flag = 0
            if c < d:
                v = pre[r, c]
                if v > lo[c]:
                    flag = 1
            if cuda.syncthreads_or(flag):  # uniform: skip chunks without candidates
                excl, total = block_exclusive_scan(sh, t, flag)
                if flag:
                    q = pos + excl
                    indices[q] = c
                    cand_pre[q] = v
                    values[q] = v if v > theta[c] else np.float32(0.0)
                pos += total


@cuda.jit(cache=True)
def jump_dpre_kernel(indptr, indices, values, d_xhat, W_dec, dpre, dfc):
    """At each candidate ``p = (i, j)``: ``dfc[p] = d_xhat[i] . W_dec[j]``
    and ``dpre[p] = dfc[p]`` if ``values[p] > 0`` (active) else 0.

    Shapes as :func:`fastsae.backends.cuda.backward.dpre_kernel`, whose
    layout this follows: block ``(LANES, GROUPS)``, a group of ``LANES``
    threads per entry (coalesced over ``d_in``, fixed tree order), one row
    per block (grid-stride)."""
    sh = cuda.shared.array((GROUPS, LANES), np.float32)
    lane = cuda.threadIdx.x
    grp = cuda.threadIdx.y
    n = d_xhat.shape[0]
    d_in = d_xhat.shape[1]
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        s = indptr[r]
        e = indptr[r + 1]
        for base in range(s, e, GROUPS):  # same trip count for the whole block
            p = base + grp
            acc = np.float32(0.0)
            if p < e:
                j = indices[p]
                for k in range(lane, d_in, LANES):
                    acc += d_xhat[r, k] * W_dec[j, k]
            sh[grp, lane] = acc
            cuda.syncthreads()
            w = LANES // 2
            while w > 0:
                if lane < w:
                    sh[grp, lane] += sh[grp, lane + w]
                cuda.syncthreads()
                w //= 2
            if lane == 0 and p < e:
                df = sh[grp, 0]
                dfc[p] = df
                if values[p] > 0:
                    dpre[p] = df
                else:
                    dpre[p] = np.float32(0.0)
            cuda.syncthreads()


@cuda.jit(cache=True)
def theta_grad_kernel(colptr, entry_of, values, cand_pre, dfc, theta, hi, inv_eps, l0_term,
                      g_lt, act_count):
    """Per feature ``j``, over its CSC list (row order): the window's (``pre
    < hi[j]``; all candidates are ``> lo[j]``) sum ``s`` of ``d_f`` and count
    ``nw``, and the active count (``values > 0``) into ``act_count[j]``
    (int64); ``g_lt[j] = (float32(-(theta inv_eps) s) - l0_term nw) theta``
    with the last two operations in float64, as the reference's NumPy
    expression promotes them. inv_eps, l0_term (``inv_eps * l0c / N``):
    float32. One thread per feature (grid-stride)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for j in range(start, theta.shape[0], step):
        s = np.float32(0.0)
        nw = np.int64(0)
        na = np.int64(0)
        h = hi[j]
        for q in range(colptr[j], colptr[j + 1]):
            p = entry_of[q]
            if cand_pre[p] < h:
                s += dfc[p]
                nw += 1
            if values[p] > 0:
                na += 1
        th = theta[j]
        a = (-(th * inv_eps)) * s
        g = np.float64(a) - np.float64(l0_term) * np.float64(nw)
        g_lt[j] = np.float32(g * np.float64(th))
        act_count[j] = na


# ------------------------------------------------------------ dense path
@cuda.jit(cache=True)
def dense_feature_kernel(pre, dpre, theta, lo, hi, inv_eps, l0_term, g_b_enc, g_lt,
                         act_count):
    """Dense path, per feature ``j`` (column): ``dpre`` holds ``d_f`` on
    entry and ``d_pre`` (``d_f`` where ``pre > theta``, else 0) on exit;
    ``g_b_enc[j] = sum_i d_pre``, the active count, and ``g_lt[j]`` from the
    window (``lo < pre < hi``) as :func:`theta_grad_kernel` combines them.
    pre, dpre: float32 ``[N, d_sae]``. One thread per column, rows in order
    (consecutive threads read consecutive columns: coalesced)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n = pre.shape[0]
    for j in range(start, pre.shape[1], step):
        th = theta[j]
        l = lo[j]
        h = hi[j]
        s = np.float32(0.0)
        gb = np.float32(0.0)
        nw = np.int64(0)
        na = np.int64(0)
        for i in range(n):
            v = pre[i, j]
            df = dpre[i, j]
            if v > l and v < h:
                s += df
                nw += 1
            if v > th:
                gb += df
                na += 1
            else:
                dpre[i, j] = np.float32(0.0)
        g_b_enc[j] = gb
        a = (-(th * inv_eps)) * s
        g = np.float64(a) - np.float64(l0_term) * np.float64(nw)
        g_lt[j] = np.float32(g * np.float64(th))
        act_count[j] = na


@cuda.jit(cache=True)
def sub_rows_kernel(x, b, out):
    """``out = x - b`` row-wise; x, out float32 ``[N, d]``, b float32 ``[d]``.
    Grid-stride over the flat index."""
    n = x.shape[0]
    d = x.shape[1]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, n * d, step):
        r = e // d
        c = e - r * d
        out[r, c] = x[r, c] - b[c]


@cuda.jit(cache=True)
def project_rows_kernel(g, W):
    """``g[r] -= (g[r] . W[r] / ||W[r]||^2) W[r]`` (rows with ``W[r] = 0``
    unchanged), as :func:`fastsae.backends.cuda.backward.feature_grad_kernel`
    projects. g, W float32 ``[R, d]``; one block per row (grid-stride)."""
    sh = cuda.shared.array((2, BLOCK), np.float32)
    t = cuda.threadIdx.x
    d = W.shape[1]
    for r in range(cuda.blockIdx.x, W.shape[0], cuda.gridDim.x):
        dot = np.float32(0.0)
        sq = np.float32(0.0)
        for k in range(t, d, BLOCK):
            w = W[r, k]
            dot += g[r, k] * w
            sq += w * w
        dsum, ssum = block_sum2(sh, t, dot, sq)
        if ssum > 0:
            proj = dsum / ssum
            for k in range(t, d, BLOCK):
                g[r, k] -= proj * W[r, k]


# ------------------------------------------------------------ sparsity modes
#: The kernels' codes of :data:`fastsae.params.JUMPRELU_SPARSITY_MODES`.
MODE_STEP = 0
MODE_TANH = 1
MODE_QUAD = 2
_MODE_CODES = {"step": MODE_STEP, "tanh": MODE_TANH, "quadratic": MODE_QUAD}


@cuda.jit(device=True, inline=True)
def _mode_g_lt(mode, a, nw, l0_term, qs, inv_eps64, has_pa, pa, th):
    """``g_log_threshold`` of one feature in a sparsity mode, from ``a =
    float32(-(theta inv_eps) sum_window d_f)``, the window count ``nw``
    (``"step"``: ``l0_term`` float32 ``inv_eps c / N``), the window's float64
    sum ``qs`` of ``q_i`` (``"quadratic"``; ``inv_eps64`` float64) and, when
    ``has_pa``, the pre-activation loss's float64 ``pa = (p/N) count``; the
    reference's NumPy promotions: float64 for ``"step"`` and after ``pa``,
    float32 for the tanh and quadratic sums."""
    if mode == MODE_TANH:
        g = np.float64(a)
    elif mode == MODE_QUAD:
        g = np.float64(a + np.float32(-(inv_eps64 * qs)))
    else:
        g = np.float64(a) - np.float64(l0_term) * np.float64(nw)
    if has_pa:
        g += pa
    return np.float32(g * np.float64(th))


@cuda.jit(cache=True)
def tanh_adjust_kernel(values, dfc, dpre, tanh_scale, coef):
    """``"tanh"``, sparse path: at each candidate ``p``, ``dfc[p] += coef (1 -
    tanh(tanh_scale values[p])**2)`` (``coef`` float32 ``c s / N``; inactive
    candidates have ``values = 0``, so ``coef``) and ``dpre[p] = dfc[p]``
    where active (``values > 0``). All float32 ``[n_cand]``. Grid-stride."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for p in range(start, values.shape[0], step):
        v = values[p]
        tn = np.float32(math.tanh(tanh_scale * v))
        df = dfc[p] + coef * (np.float32(1.0) - tn * tn)
        dfc[p] = df
        if v > 0:
            dpre[p] = df


@cuda.jit(cache=True)
def row_active_kernel(indptr, values, counts):
    """``counts[r]`` (int32) = active candidates (``values > 0``) of row ``r``
    of the candidates' CSR (indptr int64 ``[N + 1]``). One block per row."""
    t = cuda.threadIdx.x
    n = indptr.shape[0] - 1
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        e = indptr[r + 1]
        total = 0
        for base in range(indptr[r], e, BLOCK):  # same trip count for the block
            p = base + t
            flag = 0
            if p < e and values[p] > 0:
                flag = 1
            total += cuda.syncthreads_count(flag)
        if t == 0:
            counts[r] = total


@cuda.jit(cache=True)
def quad_rows_kernel(counts, target, qcoef, two_over_t, q, row_l0):
    """``"quadratic"``, per row: ``err = L0_i - T`` (float64; counts int32
    ``[N]``, target ``T``), ``q[i] = qcoef err`` (``4 c / (N T)``) and
    ``row_l0[i] = two_over_t err err`` (``2 / T``), float64 ``[N]``.
    Grid-stride."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, counts.shape[0], step):
        err = np.float64(counts[i]) - target
        q[i] = qcoef * err
        row_l0[i] = two_over_t * err * err


@cuda.jit(cache=True)
def theta_grad_mode_kernel(colptr, entry_of, row_of, values, cand_pre, dfc, theta, hi,
                           inv_eps, l0_term, inv_eps64, mode, tanh_scale, q, pa_theta,
                           has_pa, g_lt, act_count, feat_l0):
    """:func:`theta_grad_kernel` in a sparsity mode (``mode``: ``MODE_*``):
    per feature over its CSC list (row order), the window's sum of ``d_f``
    (``dfc``, tanh-adjusted by then) and count, ``"quadratic"``'s window sum
    of ``q[row]`` (float64 ``[N]``), the active count, and ``g_lt[j]`` by
    :func:`_mode_g_lt` (``pa_theta`` float64 ``[d_sae]`` read when
    ``has_pa``). ``feat_l0[j]`` (float64): ``"tanh"``'s sum of ``tanh(s f)``
    over the active entries (0 in other modes). One thread per feature."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for j in range(start, theta.shape[0], step):
        s = np.float32(0.0)
        nw = np.int64(0)
        na = np.int64(0)
        qs = 0.0
        tl = 0.0
        h = hi[j]
        for k in range(colptr[j], colptr[j + 1]):
            p = entry_of[k]
            if cand_pre[p] < h:
                s += dfc[p]
                nw += 1
                if mode == MODE_QUAD:
                    qs += q[row_of[k]]
            v = values[p]
            if v > 0:
                na += 1
                if mode == MODE_TANH:
                    tl += np.float64(np.float32(math.tanh(tanh_scale * v)))
        th = theta[j]
        a = (-(th * inv_eps)) * s
        pa = 0.0
        if has_pa:
            pa = pa_theta[j]
        g_lt[j] = _mode_g_lt(mode, a, nw, l0_term, qs, inv_eps64, has_pa, pa, th)
        act_count[j] = na
        feat_l0[j] = tl


@cuda.jit(cache=True)
def dense_feature_mode_kernel(pre, dpre, theta, lo, hi, inv_eps, l0_term, inv_eps64, mode,
                              tanh_scale, tanh_coef, q, pa_theta, has_pa, g_b_enc, g_lt,
                              act_count, feat_l0):
    """:func:`dense_feature_kernel` in a sparsity mode: ``"tanh"`` adds ``t``
    to ``d_f`` at the active and window entries (``pre > lo``) first and
    sums ``tanh(s f)`` over the active ones into ``feat_l0[j]`` (float64; 0
    in other modes); ``"quadratic"`` sums ``q[i]`` over the window; then
    ``d_pre``, ``g_b_enc``, the active count and ``g_lt`` (by
    :func:`_mode_g_lt`). One thread per column, rows in order."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    n = pre.shape[0]
    for j in range(start, pre.shape[1], step):
        th = theta[j]
        l = lo[j]
        h = hi[j]
        s = np.float32(0.0)
        gb = np.float32(0.0)
        nw = np.int64(0)
        na = np.int64(0)
        qs = 0.0
        tl = 0.0
        for i in range(n):
            v = pre[i, j]
            df = dpre[i, j]
            act = v > th
            if mode == MODE_TANH and v > l:  # lo <= theta: every active entry too
                fv = np.float32(0.0)
                if act:
                    fv = v
                tn = np.float32(math.tanh(tanh_scale * fv))
                df = df + tanh_coef * (np.float32(1.0) - tn * tn)
                if act:
                    tl += np.float64(tn)
            if v > l and v < h:
                s += df
                nw += 1
                if mode == MODE_QUAD:
                    qs += q[i]
            if act:
                gb += df
                na += 1
                dpre[i, j] = df
            else:
                dpre[i, j] = np.float32(0.0)
        g_b_enc[j] = gb
        a = (-(th * inv_eps)) * s
        pa = 0.0
        if has_pa:
            pa = pa_theta[j]
        g_lt[j] = _mode_g_lt(mode, a, nw, l0_term, qs, inv_eps64, has_pa, pa, th)
        act_count[j] = na
        feat_l0[j] = tl


@cuda.jit(cache=True)
def preact_kernel(pre, dead_idx, theta, pn, dpre_deadT, gb_dead, pa_theta, aux_dead):
    """The pre-activation loss over the dead columns ``j = dead_idx[jj]``
    (int32 ``[n_dead]``), dense in the rows: ``dpre_deadT[jj, i] = -pn``
    where ``pre[i, j] < theta[j]``, else 0 (float32 ``[n_dead, N]``; ``pn``
    float32 ``p / N``); ``gb_dead[jj]`` its sum (float32),
    ``pa_theta[j] = float64(pn) * count`` and ``aux_dead[jj] = sum
    float64(theta - pre)`` over those entries. One block per dead column,
    threads over the rows, fixed tree reductions (deterministic)."""
    sh32 = cuda.shared.array(BLOCK, np.float32)
    sh64 = cuda.shared.array((2, BLOCK), np.float64)
    t = cuda.threadIdx.x
    n = pre.shape[0]
    for jj in range(cuda.blockIdx.x, dead_idx.shape[0], cuda.gridDim.x):
        j = dead_idx[jj]
        th = theta[j]
        gb = np.float32(0.0)
        nb = 0.0
        ax = 0.0
        for i in range(t, n, BLOCK):
            v = pre[i, j]
            d = np.float32(0.0)
            if v < th:
                d = -pn
                gb += d
                nb += 1.0
                ax += np.float64(th - v)
            dpre_deadT[jj, i] = d
        gsum = block_sum(sh32, t, gb)
        asum, bsum = block_sum2(sh64, t, ax, nb)
        if t == 0:
            gb_dead[jj] = gsum
            pa_theta[j] = np.float64(pn) * bsum
            aux_dead[jj] = asum


@cuda.jit(cache=True)
def scatter_add_kernel(dst, idx, src, rows):
    """``dst[idx[jj], k] += src[jj, k]`` (``rows``) or ``dst[k, idx[jj]] +=
    src[jj, k]``; src float32 ``[m, K]``, idx int32 ``[m]`` distinct (each
    element of dst has one writer). Grid-stride over ``m K``."""
    m = src.shape[0]
    kk = src.shape[1]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for e in range(start, m * kk, step):
        jj = e // kk
        k = e - jj * kk
        if rows:
            dst[idx[jj], k] += src[jj, k]
        else:
            dst[k, idx[jj]] += src[jj, k]


# ------------------------------------------------------------ host side
class _Plan:
    """A non-default sparsity mode, as the kernels take it: ``mode``
    (``MODE_*``), ``tanh_scale``, ``target_l0``, the pre-activation loss's
    coefficient ``pre_act`` and, when that loss acts, the dead features'
    indices (int32 device ``[n_dead]``; None when it does not)."""

    __slots__ = ("mode", "tanh_scale", "target_l0", "pre_act", "dead_idx")

    def __init__(self, mode, tanh_scale, target_l0, pre_act, dead_idx):
        self.mode, self.tanh_scale, self.target_l0 = mode, tanh_scale, target_l0
        self.pre_act, self.dead_idx = pre_act, dead_idx


def _plan(sparsity, dead_mask):
    """The :class:`_Plan` of ``sparsity`` (a JumpReLUSparsity or None) and
    ``dead_mask`` (bool ``[d_sae]``, host or device, or None); None for the
    original JumpReLU (``"step"`` with no pre-activation loss acting: no
    coefficient, no mask or no dead feature), which runs the default kernels.
    The mask is read on the host only when the loss's coefficient is > 0."""
    if sparsity is None:
        return None
    mode = _MODE_CODES[sparsity.mode]
    p = float(sparsity.pre_act_coefficient)
    dead_idx = None
    if p > 0 and dead_mask is not None:
        idx = np.flatnonzero(np.asarray(to_numpy(dead_mask), dtype=bool)).astype(np.int32)
        if idx.size:
            dead_idx = _device(idx, np.int32)
    if mode == MODE_STEP and dead_idx is None:
        return None
    target = float(sparsity.target_l0) if sparsity.target_l0 is not None else 1.0
    return _Plan(mode, float(sparsity.tanh_scale), target, p, dead_idx)


def _quad_rows(plan, counts, n, l0_coefficient, scal):
    """``"quadratic"``: ``q`` (float64 ``[N]`` workspace) from the rows'
    active counts (int32 ``[N]``), the rows' loss summed into ``scal[4]``."""
    q = _work("jump_quad_q", n, np.float64)
    row_l0 = _work("jump_quad_row_l0", n, np.float64)
    T = plan.target_l0
    quad_rows_kernel[flat_grid(n), BLOCK](counts, T, 4.0 * l0_coefficient / (n * T), 2.0 / T,
                                          q, row_l0)
    _single_block(sum_kernel)(row_l0, scal, 4)
    return q


def _preact_pass(plan, pre, theta, scal):
    """The pre-activation loss's pass over the dead columns
    (:func:`preact_kernel`); its loss sum into ``scal[5]`` (0 when it does
    not act). Returns ``(dpre_deadT, gb_dead, pa_theta)`` or None."""
    if plan.dead_idx is None:
        fill_kernel[1, 1](scal[5:6], 0.0)
        return None
    n, d_sae = pre.shape
    nd = plan.dead_idx.shape[0]
    dpre_deadT = _work_at_least("jump_pa_dpre", nd * n, np.float32).reshape(nd, n)
    gb_dead = _work_at_least("jump_pa_gb", nd, np.float32)
    aux_dead = _work_at_least("jump_pa_aux", nd, np.float64)
    pa_theta = _work("jump_pa_theta", d_sae, np.float64)
    _zero(pa_theta)
    preact_kernel[grid_for(nd), BLOCK](pre, plan.dead_idx, theta,
                                       np.float32(plan.pre_act / n), dpre_deadT, gb_dead,
                                       pa_theta, aux_dead)
    _single_block(sum_kernel)(aux_dead, scal, 5)
    return dpre_deadT, gb_dead, pa_theta


def _preact_grads(plan, pa, xc, g_W_enc, rows, g_b_enc):
    """Adds the pre-activation loss's gradients: ``g_W_enc``'s dead columns
    get ``(dpre_deadT @ xc)`` (``xc`` the encoder's input ``[N, d_in]``; one
    GEMM ``[n_dead, d_in]``), into rows ``dead_idx`` of a ``[d_sae, d_in]``
    array when ``rows``, else columns of ``[d_in, d_sae]``; ``g_b_enc``'s
    dead entries get the column sums."""
    dpre_deadT, gb_dead, _ = pa
    nd, d_in = dpre_deadT.shape[0], xc.shape[1]
    gw = _work_at_least("jump_pa_gw", nd * d_in, np.float32).reshape(nd, d_in)
    _gemm(dpre_deadT, None, xc, _zeros("jump_zero_in", d_in), False, gw)
    scatter_add_kernel[flat_grid(nd * d_in), BLOCK](g_W_enc, plan.dead_idx, gw, rows)
    scatter_add_kernel[flat_grid(nd), BLOCK](g_b_enc.reshape(g_b_enc.shape[0], 1),
                                             plan.dead_idx, gb_dead.reshape(nd, 1), True)


def _encoder_input(x, P, y):
    """The encoder's input as a dense array: ``x - b_dec`` (an SAE, into a
    workspace) or ``x`` (a transcoder)."""
    if y is not None:
        return x
    n, d_in = x.shape
    xc = _work("jump_xc", (n, d_in))
    sub_rows_kernel[flat_grid(n * d_in), BLOCK](x, P.b_dec, xc)
    return xc


def _jump_dense(x, P, pre, theta, lo, hi, inv_eps, l0_term, g, g_lt, y=None, plan=None,
                scal=None, l0_coefficient=0.0, bandwidth=1.0):
    """The dense path of :func:`_jump_backward` (many candidates): codes,
    decode, ``d_f`` and the weight gradients by GEMMs; returns ``(row_mse,
    row_var, act_count)``. ``plan`` (a :class:`_Plan`, None for the default)
    switches the column pass to :func:`dense_feature_mode_kernel` and adds
    the pre-activation loss (its loss sums into ``scal[4:6]``)."""
    n, d_in = x.shape
    d_sae, d_out = P.W_dec.shape
    f = _work("jump_dense_f", (n, d_sae))
    jumprelu_kernel[flat_grid(n * d_sae), BLOCK](pre, theta, f)  # theta >= 0: relu implied
    x_hat = _work("x_hat", (n, d_out))
    _gemm(f, None, P.W_dec, P.b_dec, False, x_hat)
    _add_skip(x, P, x_hat)
    d_xhat, row_mse, row_var = _residual(_target(x, y), x_hat)
    _colsum(d_xhat, 1, g.b_dec)
    dpre = _work("jump_dense_dpre", (n, d_sae))
    _gemm(d_xhat, None, _transpose(P.W_dec, "jump_W_decT"), _zeros("jump_zero_sae", d_sae),
          False, dpre)  # d_f
    act_count = _work("jump_act_count", d_sae, np.int64)
    pa = None
    if plan is None:
        dense_feature_kernel[flat_grid(d_sae), BLOCK](pre, dpre, theta, lo, hi, inv_eps,
                                                      l0_term, g.b_enc, g_lt, act_count)
    else:
        dummy = _work("jump_dummy_f64", 1, np.float64)
        q = dummy
        if plan.mode == MODE_QUAD:
            counts = _work("jump_row_active", n, np.int32)
            count_rows_kernel[grid_for(n), BLOCK](f, counts)  # f != 0 exactly where active
            q = _quad_rows(plan, counts, n, l0_coefficient, scal)
        pa = _preact_pass(plan, pre, theta, scal)
        feat_l0 = _work("jump_feat_l0", d_sae, np.float64)
        dense_feature_mode_kernel[flat_grid(d_sae), BLOCK](
            pre, dpre, theta, lo, hi, inv_eps, l0_term, 1.0 / bandwidth, np.int64(plan.mode),
            np.float32(plan.tanh_scale), np.float32(l0_coefficient * plan.tanh_scale / n), q,
            dummy if pa is None else pa[2], pa is not None, g.b_enc, g_lt, act_count,
            feat_l0)
        if plan.mode == MODE_TANH:
            _single_block(sum_kernel)(feat_l0, scal, 4)
    xc = _encoder_input(x, P, y)  # x itself for a transcoder, x - b_dec for an SAE
    _gemm(_transpose(xc, "jump_xcT"), None, dpre, _zeros("jump_zero_sae", d_sae), False,
          g.W_enc)
    _gemm(_transpose(f, "jump_fT"), None, d_xhat, _zeros("jump_zero_out", d_out), False,
          g.W_dec)
    project_rows_kernel[grid_for(d_sae), BLOCK](g.W_dec, P.W_dec)
    if pa is not None:
        _preact_grads(plan, pa, xc, g.W_enc, False, g.b_enc)
    if y is None:  # the centring's term
        matvec_sub_kernel[grid_for(d_in), BLOCK](P.W_enc, g.b_enc, g.b_dec)
    _skip_grad(x, P, d_xhat, g)
    return row_mse, row_var, act_count


def _jump_backward(x, P, log_threshold, bandwidth, l0_coefficient, g, g_lt, scal, y=None,
                   plan=None):
    """Forward and backward of one JumpReLU step on device arrays: fills the
    gradients ``g`` (SAEParams, ``W_dec``'s projected), ``g_lt`` (float32
    ``[d_sae]``) and ``scal[0:3]`` (float64: sum of squared errors, sum of
    squared deviations of the target from its mean, number of active
    entries); ``y`` a transcoder's target (:mod:`.transcoder`). With
    ``plan`` (a :class:`_Plan`; None: the original JumpReLU) also
    ``scal[4]`` (the sparsity term's sum: ``"tanh"``'s sum of ``tanh(s
    f)``, ``"quadratic"``'s of the rows' ``2 / T (L0_i - T)**2``; unset in
    ``"step"``, whose sum is ``scal[2]``) and ``scal[5]`` (the
    pre-activation loss's ``sum relu(theta - pre)`` over the dead columns).
    Returns the per-feature active counts (int64 ``[d_sae]`` workspace)."""
    n, d_in = x.shape
    d_sae, d_out = P.W_dec.shape
    theta = _work("jump_theta", d_sae)
    lo = _work("jump_lo", d_sae)
    hi = _work("jump_hi", d_sae)
    window_kernel[flat_grid(d_sae), BLOCK](log_threshold, np.float32(0.5 * bandwidth), theta,
                                           lo, hi)
    # encoder GEMM + candidate epilogue
    pre = _work("jump_pre", (n, d_sae))
    _gemm(x, _input_shift(P, y), P.W_enc, P.b_enc, False, pre)
    counts = _work("jump_row_counts", n, np.int32)
    candidate_count_kernel[grid_for(n), BLOCK](pre, lo, counts)
    indptr = _work("jump_indptr", n + 1, np.int64)
    _single_block(exclusive_scan_kernel)(counts, indptr)
    nc = int(indptr[n:n + 1].copy_to_host()[0])  # one scalar read: sizes the buffers
    inv_eps = 1.0 / bandwidth
    inv_eps32, l0_term = np.float32(inv_eps), np.float32(inv_eps * l0_coefficient / n)
    if nc > TU.CUDA_JUMPRELU_DENSE_MIN_DENSITY * n * d_sae:
        if plan is None:
            row_mse, row_var, act_count = _jump_dense(x, P, pre, theta, lo, hi, inv_eps32,
                                                      l0_term, g, g_lt, y)
        else:
            row_mse, row_var, act_count = _jump_dense(x, P, pre, theta, lo, hi, inv_eps32,
                                                      l0_term, g, g_lt, y, plan, scal,
                                                      l0_coefficient, bandwidth)
        _sums(row_mse, row_var, act_count, scal)
        return act_count
    indices = _work_at_least("jump_indices", nc, np.int32)
    values = _work_at_least("jump_values", nc, np.float32)
    cand_pre = _work_at_least("jump_cand_pre", nc, np.float32)
    candidate_compact_kernel[grid_for(n), BLOCK](pre, lo, theta, indptr, indices, values,
                                                 cand_pre)
    # decode, residual, g_b_dec's first part
    x_hat = _work("x_hat", (n, d_out))
    _sparse_decode(indptr, indices, values, P.W_dec, P.b_dec, x_hat)
    _add_skip(x, P, x_hat)
    d_xhat, row_mse, row_var = _residual(_target(x, y), x_hat)
    _colsum(d_xhat, 1, g.b_dec)
    # d_f at the candidates
    dpre = _work_at_least("jump_dpre", nc, np.float32)
    dfc = _work_at_least("jump_df", nc, np.float32)
    jump_dpre_kernel[grid_for(n), (LANES, GROUPS)](indptr, indices, values, d_xhat, P.W_dec,
                                                   dpre, dfc)
    if plan is not None and plan.mode == MODE_TANH:
        tanh_adjust_kernel[flat_grid(nc), BLOCK](values, dfc, dpre,
                                                 np.float32(plan.tanh_scale),
                                                 np.float32(l0_coefficient * plan.tanh_scale / n))
    # stable CSR -> CSC (as backward._feature_pass)
    chunks = -(-n // CHUNK_ROWS)
    ccounts = _work("csc_counts", (chunks, d_sae), np.int32)
    _zero(ccounts)
    csc_count_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, ccounts)
    colcount = _work("jump_colcount", d_sae, np.int64)
    csc_offsets_kernel[-(-d_sae // BLOCK), BLOCK](ccounts, colcount)
    colptr = _work("colptr", d_sae + 1, np.int64)
    _single_block(exclusive_scan_kernel)(colcount, colptr)
    entry_of = _work_at_least("entry_of", nc, np.int64)
    row_of = _work_at_least("row_of", nc, np.int32)
    csc_fill_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, colptr, ccounts,
                                             entry_of, row_of)
    # per-feature gradients: unit-norm mode (norms are not read), no L1 term
    g_W_encT = _work("g_W_encT", (d_sae, d_in))
    norms = _work("jump_norms_unused", d_sae)
    l1_feat = _work("l1_feat", d_sae)
    feature_grad_kernel[grid_for(d_sae), BLOCK](
        colptr, entry_of, row_of, values, dpre, _one_level(d_xhat), _no_widths(), x,
        _input_shift(P, y, zeros=True), P.W_dec, norms, False, np.float32(0.0), g.W_dec,
        g_W_encT, g.b_enc, l1_feat)
    act_count = _work("jump_act_count", d_sae, np.int64)
    if plan is None:
        theta_grad_kernel[flat_grid(d_sae), BLOCK](colptr, entry_of, values, cand_pre, dfc,
                                                   theta, hi, inv_eps32, l0_term, g_lt,
                                                   act_count)
    else:
        _sparse_modes(plan, x, P, y, pre, indptr, values, cand_pre, dfc, colptr, entry_of,
                      row_of, theta, hi, inv_eps32, l0_term, bandwidth, l0_coefficient, g,
                      g_W_encT, g_lt, act_count, scal)
    _encoder_grads(P, g, g_W_encT, y)
    _skip_grad(x, P, d_xhat, g)
    _sums(row_mse, row_var, act_count, scal)
    return act_count


def _sparse_modes(plan, x, P, y, pre, indptr, values, cand_pre, dfc, colptr, entry_of, row_of,
                  theta, hi, inv_eps32, l0_term, bandwidth, l0_coefficient, g, g_W_encT, g_lt,
                  act_count, scal):
    """The sparse path's threshold gradient in a sparsity mode
    (:func:`theta_grad_mode_kernel`), with ``"quadratic"``'s row counts and
    the pre-activation loss (its gradients added to ``g_W_encT``'s dead
    rows and ``g.b_enc``); loss sums into ``scal[4:6]``."""
    n = x.shape[0]
    d_sae = theta.shape[0]
    dummy = _work("jump_dummy_f64", 1, np.float64)
    q = dummy
    if plan.mode == MODE_QUAD:
        counts = _work("jump_row_active", n, np.int32)
        row_active_kernel[grid_for(n), BLOCK](indptr, values, counts)
        q = _quad_rows(plan, counts, n, l0_coefficient, scal)
    pa = _preact_pass(plan, pre, theta, scal)
    feat_l0 = _work("jump_feat_l0", d_sae, np.float64)
    theta_grad_mode_kernel[flat_grid(d_sae), BLOCK](
        colptr, entry_of, row_of, values, cand_pre, dfc, theta, hi, inv_eps32, l0_term,
        1.0 / bandwidth, np.int64(plan.mode), np.float32(plan.tanh_scale), q,
        dummy if pa is None else pa[2], pa is not None, g_lt, act_count, feat_l0)
    if plan.mode == MODE_TANH:
        _single_block(sum_kernel)(feat_l0, scal, 4)
    if pa is not None:
        _preact_grads(plan, pa, _encoder_input(x, P, y), g_W_encT, True, g.b_enc)


def _sums(row_mse, row_var, act_count, scal):
    _single_block(sum_kernel)(row_mse, scal, 0)
    _single_block(sum_kernel)(row_var, scal, 1)
    _single_block(sum_kernel)(act_count, scal, 2)


def _mode_losses(plan, s, n, l0_coefficient):
    """``(l0_loss, aux)`` from the backward's host scalars ``s``."""
    if plan is None or plan.mode == MODE_STEP:
        l0_loss = l0_coefficient * s[2] / n
    else:
        l0_loss = l0_coefficient * s[4] / n
    aux = plan.pre_act * s[5] / n if plan is not None and plan.dead_idx is not None else 0.0
    return float(l0_loss), float(aux)


def jumprelu_gradients(x, params: SAEParams, log_threshold, bandwidth, l0_coefficient,
                       sparsity=None, dead_mask=None, y=None):
    """Losses and gradients of a JumpReLU step (see
    :func:`fastsae.backends.reference.jumprelu_gradients`): ``(Losses,
    SAEParams, g_log_threshold)``, on the device when any argument is;
    ``sparsity`` a :class:`~fastsae.JumpReLUSparsity` (None: ``"step"``, no
    pre-activation loss: the original kernels, bit for bit), ``dead_mask``
    (bool ``[d_sae]``, host or device) the features its pre-activation loss
    acts on; ``Losses.l0_loss`` the weighted sparsity term, ``Losses.aux``
    the weighted pre-activation loss; ``y`` a transcoder's target."""
    dev = _any_device(x, params, log_threshold, y, dead_mask)
    x, lt, y = _device(x), _device(log_threshold), _device_or_none(y)
    P = _params_device(params)
    plan = _plan(sparsity, dead_mask)
    g = _empty_like_params(P, cached=False)
    g_lt = _empty(P.W_enc.shape[1])
    # [0:3] the backward's sums, [3] unused, [4:6] the modes' loss sums
    scal = _work("scalars_jump", 6, np.float64)
    _jump_backward(x, P, lt, float(bandwidth), float(l0_coefficient), g, g_lt, scal, y, plan)
    s = scal.copy_to_host()
    n = x.shape[0]
    mse = float(s[0] / n)
    l0_loss, aux = _mode_losses(plan, s, n, l0_coefficient)
    return (Losses(mse=mse, l1=0.0, total=mse + l0_loss + aux, aux=aux, l0_loss=l0_loss),
            _params_out(g, dev), _out(g_lt, dev))


def train_step_jumprelu(params: SAEParams, state: AdamState, x, *, log_threshold,
                        threshold_m, threshold_v, bandwidth, l0_coefficient, lr, beta1=0.9,
                        beta2=0.999, eps=1e-8, fire_counts=None, sparsity=None,
                        dead_mask=None, y=None, precision="fp32") -> StepResult:
    """One JumpReLU step in place (see
    :func:`fastsae.backends.reference.train_step_jumprelu`): Adam on the
    parameters (a skip transcoder's ``W_skip`` too) and on ``log_threshold``
    (moments ``threshold_m``, ``threshold_v``) at the same step, decoder rows
    renormalized; device or host arrays and ``y`` as
    :func:`fastsae.backends.cuda.step.train_step`; ``sparsity`` and
    ``dead_mask`` as :func:`jumprelu_gradients` (the modes' gradients come
    from their own kernels, then the same fused Adam);
    ``extra["l0_loss"]`` the weighted sparsity term, ``aux`` the weighted
    pre-activation loss. float32 only (the front refuses
    ``precision="bf16"`` here)."""
    _fp32_only(precision)
    P, M, V, fc_dev, host_pairs = _step_arrays(params, state, fire_counts)
    vecs = []
    for a in (log_threshold, threshold_m, threshold_v):
        d = _device(a)
        if not _is_device(a):
            host_pairs.append((a, d))
        vecs.append(d)
    lt, tm, tv = vecs
    xd, yd = _device(x), _device_or_none(y)
    n = xd.shape[0]
    plan = _plan(sparsity, dead_mask)
    G = _empty_like_params(P, cached=True)
    g_lt = _work("jump_g_lt", P.W_enc.shape[1])
    # [0:3] the backward's sums, [3] Adam's non-finite flag, [4:6] the modes'
    # loss sums: one fetch for all
    scal = _work("scalars_jump_step", 6, np.float64)
    act_count = _jump_backward(xd, P, lt, float(bandwidth), float(l0_coefficient), G, g_lt,
                               scal, yd, plan)
    _adam(P, G, M, V, state.step, lr, beta1, beta2, eps, True, scal, 3)
    consts = adam_constant_tuple(lr, beta1, beta2, eps, state.step + 1)
    adam_kernel[flat_grid(lt.shape[0]), BLOCK](lt, g_lt, tm, tv, *consts, scal, np.int64(3))
    state.step += 1
    s = _finish_step(scal, act_count, fire_counts, fc_dev, host_pairs)
    nnz = int(s[2])
    if plan is None:
        return jumprelu_step_result(s[0] / n, l0_coefficient * nnz / n, nnz, n, s[1] / n,
                                    params_finite=s[3] == 0)
    l0_loss, aux = _mode_losses(plan, s, n, l0_coefficient)
    return jumprelu_step_result(s[0] / n, l0_loss, nnz, n, s[1] / n, params_finite=s[3] == 0,
                                aux=aux)
