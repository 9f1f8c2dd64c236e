"""Numba CPU Adam (PyTorch semantics): the per-element update and the flat
update of 1-D parameters.

``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g**2``;
``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)`` with ``t``
the 1-based step, all in float32 in the reference's operation order. The
big matrices are updated where their gradient is produced
(:func:`fastsae.backends.numba.backward.feature_adam` and
:func:`~fastsae.backends.numba.backward.topk_feature_adam` call
:func:`adam_elem`), so the gradient is never written to memory;
:func:`adam_flat` updates ``b_dec``.

``c`` is the float32 ``[8]`` array of
:func:`fastsae.backends.numerics.adam_constants`:
``[b1, b2, 1 - b1, 1 - b2, lr, eps, 1 - b1**t, 1 - b2**t]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tunables import NUMBA_ADAM_FLAT_BLOCK

__all__ = ["const_tuple", "adam_elem", "adam_flat", "nonfinite", "nonfinite_in"]

#: float32's largest finite value: ``abs(p) <= FLT_MAX`` is false exactly for
#: inf and NaN.
FLT_MAX = np.float32(np.finfo(np.float32).max)
#: float32's exponent bits: all set exactly for inf and NaN.
_EXPONENT = np.uint32(0x7F800000)


@njit(inline="always")
def const_tuple(c):
    """The constants as a tuple of float32 scalars (loop-invariant values
    for the vectorizer; same values, same results)."""
    return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7])


@njit(inline="always")
def adam_elem(p, g, m, v, c):
    """One element: returns updated ``(p, m, v)``.

    Callers compile with ``error_model="numpy"``: under Numba's default
    ("python") every division by the per-element ``sqrt(v_hat) + eps`` is
    checked for zero (to raise ``ZeroDivisionError``), a branch that keeps
    LLVM from vectorizing the loop (measured 8x slower). ``eps > 0``, so the
    divisor is never zero and the results are bitwise the same."""
    m = c[0] * m + c[2] * g
    v = c[1] * v + c[3] * g * g
    m_hat = m / c[6]
    v_hat = v / c[7]
    p = p - (c[4] * m_hat) / (np.sqrt(v_hat) + c[5])
    return p, m, v


@njit(inline="always")
def nonfinite(p):
    """1 if float32 ``p`` is inf or NaN, else 0 (for scalars and short
    loops; long rows use :func:`nonfinite_in`)."""
    return 0 if abs(p) <= FLT_MAX else 1


@njit(inline="always")
def nonfinite_in(a):
    """1 if the 1-D contiguous float32 array ``a`` holds an inf or NaN, else 0.

    Adam kernels call it on each row or tile piece right after updating it,
    while it is in cache, so a non-finite parameter is noticed in the pass
    that writes every parameter anyway, with no scan of memory of its own.
    An unsigned max of the exponent bits: an integer reduction that
    vectorizes (a per-element float test inside the update loop measured
    60% slower on the update, this ~5% on a cold array)."""
    u = a.view(np.uint32)
    e = np.uint32(0)
    for i in range(u.shape[0]):
        e = max(e, u[i] & _EXPONENT)
    return 1 if e == _EXPONENT else 0


@njit(parallel=True, cache=True, error_model="numpy")
def adam_flat(p, g, m, v, c):
    """Adam on 1-D float32 arrays of equal length, in place, parallel over
    blocks of :data:`~fastsae.backends.tunables.NUMBA_ADAM_FLAT_BLOCK`
    elements. Returns a count that is nonzero exactly when an updated
    parameter is inf or NaN (:func:`nonfinite_in` per block)."""
    n = p.shape[0]
    B = NUMBA_ADAM_FLAT_BLOCK
    nb = (n + B - 1) // B
    cs = const_tuple(c)
    bad = 0
    for b in prange(nb):
        i0 = b * B
        i1 = min(n, i0 + B)
        # views indexed from 0: LLVM then knows no index wraps (vectorizes)
        pb, gb, mb, vb = p[i0:i1], g[i0:i1], m[i0:i1], v[i0:i1]
        for i in range(i1 - i0):
            pb[i], mb[i], vb[i] = adam_elem(pb[i], gb[i], mb[i], vb[i], cs)
        bad += nonfinite_in(pb)
    return bad
