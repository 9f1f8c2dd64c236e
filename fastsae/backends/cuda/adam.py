"""CUDA fused Adam, with the unit-norm decoder renormalization fused in.

:func:`adam_kernel` updates one parameter array and its two moments in a
single pass (read p, g, m, v; write p, m, v), on the flattened array. The
scalars arrive as float32 and the formula is evaluated in the reference's
order, so each step matches PyTorch/NumPy float32 Adam up to FMA contraction:

    m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g
    p -= (lr (m / bc1)) / (sqrt(v / bc2) + eps),  bc_k = 1 - b_k**t

:func:`adam_rows_renorm_kernel` does the same for ``W_dec`` in
``"unit_norm"`` mode, one block per decoder row, and then divides the
updated row by its norm (rows of norm 0 are left as they are), saving a
second pass over ``W_dec``.

The scalars are those of :func:`fastsae.backends.numerics.adam_constants`,
in its order (``b1, b2, 1 - b1, 1 - b2, lr, eps, bc1, bc2``); :func:`_adam`
launches both kernels over the parameter arrays (the four of every model,
and a skip transcoder's ``W_skip``).

Both kernels also set ``flag[slot] = 1`` when a parameter they write is inf
or NaN (the pass touches every parameter anyway; the step fetches the flag
with its other scalars), so a non-finite model is reported by the step that
made it, even in features that never fire.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..numerics import adam_constant_tuple
from .common import BLOCK, _flat, block_sum, fill_kernel, flat_grid, grid_for

#: float32's largest finite value: ``abs(p) <= FLT_MAX`` is false exactly for
#: inf and NaN.
FLT_MAX = np.float32(np.finfo(np.float32).max)


@cuda.jit(cache=True)
def adam_kernel(p, g, m, v, b1, b2, omb1, omb2, lr, eps, bc1, bc2, flag, slot):
    """One Adam step on 1-D float32 arrays p, g, m, v (same length), in place.

    Scalars (float32, in :func:`~fastsae.backends.numerics.adam_constants`'
    order): b1, b2, omb1 = 1 - b1, omb2 = 1 - b2, lr, eps, bias corrections
    bc1, bc2. ``flag[slot] = 1`` (float64 ``flag``) if an updated parameter
    is inf or NaN. 1-D grid-stride loop, any launch shape.
    """
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    bad = False
    for i in range(start, p.shape[0], step):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        pi = p[i] - (lr * (mi / bc1)) / (math.sqrt(vi / bc2) + eps)
        p[i] = pi
        bad = bad or not (abs(pi) <= FLT_MAX)
    if bad:
        flag[slot] = 1.0  # every writer stores the same value


@cuda.jit(cache=True)
def adam_rows_renorm_kernel(p, g, m, v, b1, b2, omb1, omb2, lr, eps, bc1, bc2, flag, slot):
    """Adam step on 2-D float32 ``[R, d]`` arrays, then ``p[r] /= ||p[r]||``.

    One block of ``BLOCK`` threads per row (grid-stride over rows). Scalars
    and ``flag[slot]`` as in :func:`adam_kernel`.
    """
    sh = cuda.shared.array(BLOCK, np.float32)
    t = cuda.threadIdx.x
    R = p.shape[0]
    d = p.shape[1]
    bad = False
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        acc = np.float32(0.0)
        for k in range(t, d, BLOCK):
            gi = g[r, k]
            mi = b1 * m[r, k] + omb1 * gi
            vi = b2 * v[r, k] + omb2 * gi * gi
            m[r, k] = mi
            v[r, k] = vi
            pk = p[r, k] - (lr * (mi / bc1)) / (math.sqrt(vi / bc2) + eps)
            p[r, k] = pk
            acc += pk * pk
            bad = bad or not (abs(pk) <= FLT_MAX)
        norm = math.sqrt(block_sum(sh, t, acc))
        if norm > 0:
            for k in range(t, d, BLOCK):  # the same thread wrote these elements
                p[r, k] = p[r, k] / norm
    if bad:
        flag[slot] = 1.0


# ------------------------------------------------------------ host side
def _adam(P, G, M, V, step, lr, beta1, beta2, eps, unit_norm, flag, slot):
    """Adam step ``step + 1`` on every parameter (device SAEParams ``P`` with
    gradients ``G`` and moments ``M``, ``V``, all in place); with
    ``unit_norm`` the decoder rows are renormalized in the same pass.
    ``flag[slot]`` (float64 device array) is set to 0, then to 1 if an
    updated parameter is inf or NaN."""
    fill_kernel[1, 1](flag[slot:slot + 1], 0.0)
    scalars = adam_constant_tuple(lr, beta1, beta2, eps, step + 1) + (flag, np.int64(slot))
    for name in P.names:  # a skip transcoder's W_skip too
        p, g, m, v = (getattr(o, name) for o in (P, G, M, V))
        if name == "W_dec" and unit_norm:
            adam_rows_renorm_kernel[grid_for(p.shape[0]), BLOCK](p, g, m, v, *scalars)
        else:
            pf = _flat(p)
            adam_kernel[flat_grid(pf.shape[0]), BLOCK](pf, _flat(g), _flat(m), _flat(v),
                                                       *scalars)
