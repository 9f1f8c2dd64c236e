"""What the CUDA backend adds for transcoders and skip transcoders (see the
module docstring of :mod:`fastsae.backends.reference`).

A transcoder reads ``x [N, d_in]`` and reconstructs ``y [N, d_out]``:
``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, and for a skip transcoder
``W_skip [d_out, d_in]`` added as ``x @ W_skip.T``. Every kernel of the
other families already takes the target apart from the encoder input, so
the steps only change their arguments:

* the target of the residual, AuxK and explained variance is ``y``
  (:func:`_target`); every reconstruction-wide loop runs over ``d_out``
  (``W_dec.shape[1]``), every input-wide one over ``d_in``;
* the encoder reads ``x`` uncentred (:func:`_input_shift`: the GEMM's
  no-shift form, zeros for the per-feature kernel), and ``g_b_dec`` drops
  the ``- W_enc @ g_b_enc`` term that came from the centring
  (:func:`~.backward._encoder_grads`);
* a skip transcoder adds ``x @ W_skip.T`` to every reconstruction
  (:func:`_add_skip`, after the decode: each Matryoshka prefix has it) and
  gets ``g_W_skip = D.T @ x`` with ``D = dL/dy_hat`` (:func:`_skip_grad`;
  AuxK's ``e_hat`` has no skip term, so ``D`` is the main residual's).
  Both are the encoder's tiled GEMM after a tiled transpose: dense work of
  ``2 N d_in d_out`` FLOPs each, next to the encoder's ``2 N d_in d_sae``;
* Adam updates ``W_skip`` with the rest (:func:`~.adam._adam` walks
  ``params.names``), and its non-finite flag covers ``W_skip``.

With ``y`` None every helper here returns what the SAE step used before
(or does nothing), so SAE steps are unchanged.
"""

from __future__ import annotations

from .common import (BLOCK, TILE, TILE_ROWS, _flat, _zero, add_kernel, flat_grid,
                     transpose_kernel)
from .decode import _one_level
from .encode import _gemm
from .placement import _device, _work


def _target(x, y):
    """What the reconstruction fits: ``x`` (an SAE) or ``y`` (a transcoder)."""
    return x if y is None else y


def _device_or_none(y):
    """A transcoder's target on the device (None stays None)."""
    return None if y is None else _device(y)


def _zeros(name, n):
    """A zeroed float32 ``[n]`` workspace named ``name``."""
    z = _work(name, n)
    _zero(z)
    return z


def _transpose(src, name):
    """``src.T`` (float32 ``[R, C]`` -> ``[C, R]``) into the workspace ``name``."""
    R_, C = src.shape
    dst = _work(name, (C, R_))
    transpose_kernel[(-(-C // TILE), -(-R_ // TILE)), (TILE, TILE_ROWS)](src, dst)
    return dst


def _input_shift(P, y, zeros=False):
    """The encoder's input centring: ``P.b_dec`` for an SAE (``y`` None);
    for a transcoder None (the GEMM's no-shift form) or, with ``zeros``, a
    zeroed ``[d_in]`` workspace (for kernels that always subtract one)."""
    if y is None:
        return P.b_dec
    return _zeros("zero_shift", P.W_enc.shape[0]) if zeros else None


def _add_skip(x, P, x_hat):
    """``x_hat[l] += x @ W_skip.T`` on every level of ``x_hat`` (float32
    ``[N, d_out]`` or ``[L, N, d_out]``) for a skip transcoder; nothing
    without ``W_skip``."""
    if P.W_skip is None:
        return
    n, d_out = x.shape[0], P.W_skip.shape[0]
    skip = _work("skip_term", (n, d_out))
    _gemm(x, None, _transpose(P.W_skip, "skip_WT"), _zeros("skip_zero_out", d_out), False,
          skip)
    levels = _one_level(x_hat)
    for lev in range(levels.shape[0]):
        add_kernel[flat_grid(n * d_out), BLOCK](_flat(levels[lev]), _flat(skip))


def _skip_grad(x, P, D, g):
    """``g.W_skip = D.T @ x`` (``D = dL/dy_hat``, float32 ``[N, d_out]``,
    summed over the prefixes) for a skip transcoder; nothing without
    ``W_skip``."""
    if P.W_skip is not None:
        _gemm(_transpose(D, "skip_DT"), None, x, _zeros("skip_zero_in", x.shape[1]), False,
              g.W_skip)
