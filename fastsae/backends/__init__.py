"""The backends of fastsae: the registry, the kernel contract, and its front.

Layout (every backend has the same shape, so a kernel's twins are found by
name)::

    backends/__init__.py   this registry: available_backends(), get_backend()
             contract.py   the kernel contract, declared in code
             front.py      Backend: validates once, then calls the backend
             validate.py   every argument check the front runs
             numerics.py   host-side numerics shared by all backends (Adam
                           constants, AuxK weight, explained variance, results)
             tunables.py   every block/tile size and cut-off, with its reason
             host.py       placement for the CPU backends (identities)
             reference.py  the ``numpy`` backend: the dense NumPy oracle
             numba/        Numba CPU kernels    } each: __init__ (the face),
             cython/       Cython wrappers      } encode, decode, norms,
             cuda/         numba.cuda kernels   } backward, adam, topk, step

Backends, in the order automatic choice prefers them:

``cuda``    numba.cuda kernels (needs an NVIDIA GPU and driver)
``numba``   Numba CPU kernels, parallel over the cores
``cython``  compiled Cython extensions built by ``setup.py`` from ``kernels/``
``numpy``   the dense NumPy reference (always available)

A backend is loaded only if its face defines the whole contract
(:func:`fastsae.backends.contract.missing`); otherwise it is reported
unusable with the missing names as the reason.
"""

from __future__ import annotations

import importlib
import os

from dataclasses import dataclass

from . import contract
from .front import Backend

__all__ = ["Backend", "BackendStatus", "available_backends", "get_backend", "BACKEND_NAMES"]

#: Automatic-choice order.
BACKEND_NAMES = ("cuda", "numba", "cython", "numpy")

_MODULES = {
    "numpy": "fastsae.backends.reference",
    "numba": "fastsae.backends.numba",
    "cython": "fastsae.backends.cython",
    "cuda": "fastsae.backends.cuda",
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or a short description when available

    def __str__(self) -> str:
        mark = "usable" if self.available else "unavailable"
        return f"{self.name:7s} {mark:11s} {self.reason}"


_cache: dict = {}


def _load(name: str):
    """Import a backend module; return ``(module, None)`` or ``(None, reason)``."""
    if name in _cache:
        return _cache[name]
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # any import failure makes it unavailable
        result = (None, f"{type(exc).__name__}: {exc}")
    else:
        lacking = contract.missing(mod)
        if lacking:
            result = (None, f"{_MODULES[name]} does not implement the kernel contract: "
                            f"missing {', '.join(lacking)}")
        else:
            try:
                mod.check_available()  # raises with the reason when it cannot run here
                result = (mod, None)
            except Exception as exc:
                result = (None, f"{type(exc).__name__}: {exc}")
    _cache[name] = result
    return result


def available_backends() -> list[BackendStatus]:
    """Every backend, whether it is usable on this machine, and why not."""
    out = []
    for name in BACKEND_NAMES:
        mod, reason = _load(name)
        if mod is None:
            out.append(BackendStatus(name, False, reason))
        else:
            out.append(BackendStatus(name, True, mod.DESCRIPTION))
    return out


def get_backend(name: str | None = None) -> "Backend":
    """Return a backend by name.

    An explicit ``name`` wins; else the environment variable
    ``FASTSAE_BACKEND``; else the first usable of cuda, numba, cython, numpy
    (the CUDA simulator is never chosen automatically).
    An unknown or unusable name raises ``ValueError`` naming the reason and
    the usable alternatives.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get("FASTSAE_BACKEND") or None
    if name is None:
        for candidate in BACKEND_NAMES:
            mod, _ = _load(candidate)
            # a module may be usable but not wanted by default (the CUDA simulator)
            if mod is not None and mod.AUTO_SELECT:
                return Backend(candidate, mod)
        raise RuntimeError("no fastsae backend is usable")  # numpy always is
    name = str(name).lower()
    usable = [s.name for s in available_backends() if s.available]
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}; "
                         f"usable here: {', '.join(usable)}")
    mod, reason = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not usable here ({reason}); "
                         f"usable here: {', '.join(usable)}")
    return Backend(name, mod)


