"""Numba CPU Adam kernels (PyTorch semantics), fused over the parameters.

``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g**2``;
``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)`` with ``t``
the 1-based step, all in float32 in the reference's operation order. The
big matrices are updated where their gradient is produced
(:func:`fastsae._kernels.backward.feature_pass`), so the gradient is never
written to memory; the functions here do the remaining flat updates and the
stand-alone unit-norm renormalization.

``consts`` is the float32 array built by :func:`adam_consts`:
``[b1, b2, 1 - b1, 1 - b2, lr, eps, 1 - b1**t, 1 - b2**t]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["adam_consts", "const_tuple", "adam_elem", "adam_flat", "normalize_rows"]


def adam_consts(lr, beta1, beta2, eps, t):
    """Adam's per-step float32 constants for 1-based step ``t``."""
    return np.array([beta1, beta2, 1.0 - beta1, 1.0 - beta2, lr, eps,
                     1.0 - beta1 ** t, 1.0 - beta2 ** t], dtype=np.float32)


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


@njit(parallel=True, cache=True, error_model="numpy")
def adam_flat(p, g, m, v, c):
    """Adam on 1-D float32 arrays of equal length, in place, parallel over
    blocks of 4096 elements."""
    n = p.shape[0]
    nb = (n + 4095) // 4096
    cs = const_tuple(c)
    for b in prange(nb):
        i0 = b * 4096
        i1 = min(n, i0 + 4096)
        # views indexed from 0: LLVM then knows no index wraps (vectorizes)
        pb, gb, mb, vb = p[i0:i1], g[i0:i1], m[i0:i1], v[i0:i1]
        for i in range(i1 - i0):
            pb[i], mb[i], vb[i] = adam_elem(pb[i], gb[i], mb[i], vb[i], cs)


@njit(cache=True)
def normalize_row(w):
    """Rescale one row to unit L2 norm in place (zero rows stay zero)."""
    s = np.float32(0.0)
    for k in range(w.shape[0]):
        s += w[k] * w[k]
    nrm = np.sqrt(s)
    if nrm > 0:
        for k in range(w.shape[0]):
            w[k] = w[k] / nrm


@njit(parallel=True, cache=True)
def normalize_rows(W):
    """Rescale every nonzero row of ``W`` ``[d_sae, d_in]`` to unit norm."""
    for j in prange(W.shape[0]):
        normalize_row(W[j])
