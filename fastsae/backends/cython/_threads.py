"""Threads of the ``cython`` backend: the OpenMP team size, the cut-off below
which a kernel runs on one thread, and BLAS's single-thread guard.

Imported only when the compiled modules are (the face checks that first):
the build facts come from the compiled ``_runtime``.
"""

from __future__ import annotations

import contextlib
import threading

from ..tunables import CYTHON_PARALLEL_MIN_WORK
from . import _runtime

#: Whether the kernels were compiled with OpenMP (else their loops are serial).
OPENMP = bool(_runtime.OPENMP)
#: Whether this is a FASTSAE_CYTHON_DEBUG=1 build (bounds checks on).
DEBUG_BUILD = bool(_runtime.DEBUG)

_num_threads: int | None = None  # None: OpenMP's default


def get_num_threads() -> int:
    """Threads the kernels use (1 without OpenMP)."""
    if not OPENMP:
        return 1
    return _num_threads if _num_threads is not None else max(1, _runtime.max_threads())


def set_num_threads(n: int | None) -> None:
    """Set the OpenMP team size for this process (``None``: back to the default,
    ``OMP_NUM_THREADS`` or the core count). No effect without OpenMP."""
    global _num_threads
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"number of threads must be >= 1, got {n}")
    _num_threads = n


def threads(work: int) -> int:
    """Team size for a kernel doing about ``work`` operations: one thread
    below :data:`~fastsae.backends.tunables.CYTHON_PARALLEL_MIN_WORK`."""
    return 1 if work < CYTHON_PARALLEL_MIN_WORK else get_num_threads()


class _BlasSingleThread:
    """Context manager limiting BLAS to one thread while OpenMP threads call
    it. Reference-counted under a lock, so concurrent callers from several
    Python threads neither restore the limit under each other's feet nor
    leave BLAS stuck at one thread afterwards."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None
        self._controller = None  # None: not probed yet; False: no threadpoolctl

    def _probe(self):
        try:
            from threadpoolctl import ThreadpoolController
            self._controller = ThreadpoolController()
        except Exception:  # threadpoolctl missing or failing: run unlimited
            self._controller = False

    def __enter__(self):
        with self._lock:
            if self._controller is None:
                self._probe()
            if self._depth == 0 and self._controller:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None
        return False


_blas_guard = _BlasSingleThread()


def blas_single():
    """BLAS limited to one thread when the OpenMP loops call it (without
    OpenMP the loops are serial and BLAS keeps its own threads)."""
    return _blas_guard if OPENMP else contextlib.nullcontext()


def row_tile(n: int, cap: int, min_blocks: int, work: int) -> int:
    """Rows per sgemm tile for an ``n``-row product of about ``work``
    multiply-adds: ``min(cap, max(16, ceil(n / min_blocks)))``, or with one
    block's worth (``min_blocks = 1``) for work that runs on one thread
    anyway (below :data:`CYTHON_PARALLEL_MIN_WORK`). It depends on the
    problem only, never on the thread count: OpenBLAS rounds a product of
    another row count differently, and results must not depend on threads
    (see :data:`fastsae.backends.tunables.CYTHON_RELU_MIN_ROW_BLOCKS`)."""
    if work < CYTHON_PARALLEL_MIN_WORK:
        min_blocks = 1
    return min(cap, max(16, -(-n // min_blocks)))
