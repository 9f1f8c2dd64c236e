"""Adam of the ``cython`` backend: what the fused update is handed.

The training steps run Adam inside the backward's per-feature pass
(``_backward.train_backward``, ``kernels/cython/backward.pyx``): each block
of ``W_enc`` columns and ``W_dec`` rows is updated (and renormalized in
``unit_norm`` mode) as soon as its gradient exists, so no gradient matrix is
stored. ``_adam.adam_step`` (``kernels/cython/adam.pyx``) is the stand-alone
one-pass update of all four parameters from given gradients. Both read the
constants of :func:`fastsae.backends.numerics.adam_constants`, in its order.
"""

from __future__ import annotations

from ...params import AdamState
from ..numerics import adam_constants


def moment_arrays(state: AdamState) -> tuple:
    """The eight moment arrays in the kernels' argument order: ``m`` of
    ``W_enc, b_enc, W_dec, b_dec``, then ``v`` of the same (float32,
    C-contiguous, the parameters' shapes: the front checked them)."""
    m, v = state.m, state.v
    return (m.W_enc, m.b_enc, m.W_dec, m.b_dec, v.W_enc, v.b_enc, v.W_dec, v.b_dec)


def step_constants(state: AdamState, lr, beta1, beta2, eps):
    """``(t, consts)``: the 1-based number of the step about to be taken and
    its float32 ``[8]`` Adam constants."""
    t = state.step + 1
    return t, adam_constants(lr, beta1, beta2, eps, t)
