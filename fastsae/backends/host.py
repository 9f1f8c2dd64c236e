"""Placement for the CPU backends: their arrays are NumPy arrays on the host.

The contract's placement functions (:func:`to_backend`, :func:`to_numpy`,
:func:`synchronize`) are identities here; the ``numpy``, ``numba`` and
``cython`` faces take them from this module, the ``cuda`` backend has its own
(:mod:`fastsae.backends.cuda.placement`).
"""

from __future__ import annotations

__all__ = ["to_backend", "to_numpy", "synchronize"]


def to_backend(obj):
    """Return ``obj`` unchanged: a CPU backend computes on host arrays."""
    return obj


def to_numpy(obj):
    """Return ``obj`` unchanged: a CPU backend's arrays already are NumPy arrays."""
    return obj


def synchronize() -> None:
    """Nothing to wait for: a CPU backend's calls return when their work is done."""
    return None
