"""Transcoders and skip transcoders on the numba backend (see the module
docstring of :mod:`fastsae.backends.reference`): the face's glue and the
skip term's two kernels.

A transcoder reads ``x [N, d_in]`` and reconstructs ``y [N, d_out]``:
``y_hat = f @ W_dec + b_dec (+ x @ W_skip.T)``, its encoder uncentered
(``pre = x @ W_enc + b_enc``). The compiled cores already separate the
residual's target from the encoder input, so a face passes them:

* the target (:func:`target`): ``x`` for an SAE, ``y``, or ``y - x @
  W_skip.T`` for a skip transcoder (:func:`skip_target`), so that the
  kernels' residual ``f @ W_dec + b_dec - target`` is ``y_hat - y``;
* the encoder input (:func:`encoder_input`): ``x - b_dec``, or ``x``;
* ``center = y is None``: whether ``g_b_dec`` has the centering's ``- W_enc
  @ g_b_enc`` term.

After the core, :func:`skip_adam` makes ``W_skip``'s gradient ``D.T @ x``
(``D = dL/dy_hat`` ``[N, d_out]``, which the cores return) block by block
and consumes it with Adam at once (the step's constants). Explained variance
is against ``var(y)``: the cores measure it on their target, which is ``y``
unless there is a skip term (then the face measures ``y`` with
:func:`.step.batch_variance`).

Both skip products are dense GEMMs on a fixed grid of blocks (rows of ``x``
for the forward, rows of ``W_skip`` for the gradient; :func:`.dense.row_block`
of the dimension), one single-threaded sgemm per block inside a parallel
loop, like the dense path's (:mod:`.dense`): the skip term runs on Numba's
threads like every other kernel here (``set_num_threads`` governs it, no
second pool competes with Numba's workers), and results do not depend on
the thread count. Call the kernels with BLAS limited to one thread (the
face does it). At N = 1024, d_in = d_out = 256 on a shared 2-core machine
these took ~1.7 ms each; BLAS's own threaded sgemm from the face, 1 ms
when the machine was quiet and up to 40 ms (the gradient) when it was
busy, its threads then competing with Numba's.

Arrays are float32 and C-contiguous as the front hands them: ``x [N,
d_in]``, ``y [N, d_out]``, ``W_skip [d_out, d_in]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...params import SAEParams
from .adam import adam_elem, const_tuple, nonfinite_in
from .dense import row_block
from .encode import _part_bounds, centered, gemm, warm_gemm

__all__ = ["target", "encoder_input", "encoder_centering", "skip_target", "skip_grad",
           "skip_adam", "grads"]


@njit(parallel=True, cache=True)
def skip_target(x, y, W_skip, n_threads):
    """``y - x @ W_skip.T`` float32 ``[N, d_out]`` (a new array): per fixed
    block of rows a copy of ``y`` and one sgemm with ``beta = 1``."""
    n = x.shape[0]
    out = np.empty(y.shape, np.float32)
    warm_gemm()
    rb = row_block(n)
    nblk = (n + rb - 1) // rb
    parts = max(1, min(n_threads, nblk))
    for p in prange(parts):
        b0, b1 = _part_bounds(nblk, parts, p)
        for b in range(b0, b1):
            i0 = b * rb
            i1 = min(n, i0 + rb)
            o = out[i0:i1]
            o[:] = y[i0:i1]
            gemm(x[i0:i1], W_skip, o, -1.0, 1.0, False, True)
    return out


@njit(inline="always")
def _grad_block(D, x, o0, o1, g):
    """``g = D[:, o0:o1].T @ x``: rows ``o0..o1-1`` of ``W_skip``'s gradient."""
    gemm(D[:, o0:o1], x, g, 1.0, 0.0, True, False)


@njit(parallel=True, cache=True)
def skip_grad(D, x, n_threads):
    """``W_skip``'s gradient ``D.T @ x``, float32 ``[d_out, d_in]``; ``D =
    dL/dy_hat`` ``[N, d_out]`` (C-contiguous rows). Blocks of rows of the
    result, one sgemm each."""
    d_out = D.shape[1]
    g = np.empty((d_out, x.shape[1]), np.float32)
    warm_gemm()
    ob = row_block(d_out)
    nblk = (d_out + ob - 1) // ob
    for t in prange(nblk):
        o0 = t * ob
        o1 = min(d_out, o0 + ob)
        _grad_block(D, x, o0, o1, g[o0:o1])
    return g


@njit(parallel=True, cache=True, error_model="numpy")  # see adam.adam_elem
def _skip_adam(D, x, W_skip, m, v, adam_c):
    """:func:`skip_grad`'s blocks consumed by Adam as each is made (never
    stored whole): ``W_skip`` and its moments ``m``, ``v`` updated in
    place. Returns a count, nonzero exactly when the updated ``W_skip``
    holds an inf or NaN."""
    d_out, d_in = W_skip.shape
    warm_gemm()
    ob = row_block(d_out)
    nblk = (d_out + ob - 1) // ob
    cs = const_tuple(adam_c)
    bad = 0
    for t in prange(nblk):
        o0 = t * ob
        o1 = min(d_out, o0 + ob)
        g = np.empty((o1 - o0, d_in), np.float32)
        _grad_block(D, x, o0, o1, g)
        tb = 0
        for r in range(o1 - o0):
            w, mr, vr, gr = W_skip[o0 + r], m[o0 + r], v[o0 + r], g[r]
            for k in range(d_in):
                w[k], mr[k], vr[k] = adam_elem(w[k], gr[k], mr[k], vr[k], cs)
            tb += nonfinite_in(w)
        bad += tb
    return bad


# ---------------------------------------------------------------- face glue
def target(x, params, y, n_threads):
    """What the kernels' residual is taken against, float32 ``[N, d_out]``:
    ``x`` (``y`` None), ``y`` (no ``W_skip``), else :func:`skip_target`."""
    if y is None:
        return x
    if params.W_skip is None:
        return y
    return skip_target(x, y, params.W_skip, n_threads)


def encoder_centering(params, y):
    """The encoders' ``b_dec`` argument: ``params.b_dec`` for an SAE, zeros
    ``[d_in]`` for a transcoder (``reference.input_centering``)."""
    if y is None:
        return params.b_dec
    return np.zeros(params.d_in, np.float32)


def encoder_input(x, params, y):
    """The encoder's input: ``x - b_dec`` (a new array) for an SAE, ``x``
    itself for a transcoder."""
    if y is None:
        return centered(x, params.b_dec)
    return x


def skip_adam(params, state, D, x, adam_c) -> int:
    """A skip transcoder's ``W_skip`` update from ``D = dL/dy_hat``
    (:func:`_skip_adam`, with the step's constants ``adam_c``); 0 without
    ``W_skip``. Returns the non-finite count (the loud-loss rule)."""
    if params.W_skip is None:
        return 0
    return int(_skip_adam(D, x, params.W_skip, state.m.W_skip, state.v.W_skip, adam_c))


def grads(params, gWe, gbe, gWd, gbd, D, x, n_threads):
    """The gradients as :class:`~fastsae.SAEParams`; with ``W_skip``'s
    ``D.T @ x`` (:func:`skip_grad`) for a skip transcoder."""
    g_skip = None if params.W_skip is None else skip_grad(D, x, n_threads)
    return SAEParams(gWe, gbe, gWd, gbd, g_skip)
