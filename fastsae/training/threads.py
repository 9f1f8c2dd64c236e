"""Thread limits for a block of code: the backend's threads and BLAS/OpenMP.

``with limit_threads(n, backend): ...`` runs the block with ``backend``'s
compute threads set to ``n`` (:meth:`fastsae.Backend.set_num_threads`) and
every BLAS/OpenMP pool of the process limited to ``n`` (threadpoolctl), then
restores both. ``n=None`` leaves everything as it is. The ``fastsae`` command
line's ``--threads`` is this context manager around training or encoding.
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["limit_threads"]


@contextmanager
def limit_threads(n: int | None, backend):
    """Limit ``backend`` (a :class:`fastsae.Backend`) and the BLAS/OpenMP
    pools to ``n`` threads inside the ``with`` block (``None``: no change)."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = backend.get_num_threads()  # first: the pool limit below may change it
    pools = threadpool_limits(limits=int(n))
    try:
        backend.set_num_threads(n)
        try:
            yield
        finally:
            backend.set_num_threads(before)
    finally:
        pools.restore_original_limits()
