"""The MPI communicator of distributed training (mpi4py, imported on use).

Every collective fastsae runs goes through :class:`Communicator`, so the
rules hold in one place:

- **Fixed reduction order.** :meth:`Communicator.allreduce_sum` never calls
  ``MPI_Allreduce`` (whose summation order is the library's business and may
  change with the message size or the rank count): the buffer is cut into
  one contiguous chunk per rank, ``Alltoallv`` sends chunk ``j`` of every rank
  to rank ``j``, which adds the ``R`` copies in rank order, and ``Allgatherv``
  hands the sums back. Every rank then holds the same bytes, and two runs on
  the same rank count are bit-identical. Each rank sends and receives
  ``2 (R - 1) / R`` times the buffer, as a ring all-reduce does.
- **No hang on a failed rank.** :meth:`Communicator.fail` reports an error
  raised on one rank and aborts every rank (``MPI_Abort``); a rank that dies
  is noticed by ``mpiexec``, which stops the others; a step that makes no
  progress for ``timeout`` seconds (a rank stuck outside MPI, or waiting on
  one) ends the process from a watchdog thread (:meth:`Communicator.
  watchdog`), so ``mpiexec`` stops the others.
- **Same parameters everywhere**, checked: :meth:`Communicator.check_same`
  compares a SHA-256 of arrays across ranks and raises
  :class:`RanksDiverged` naming the ranks that differ.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import numpy as np

__all__ = ["Communicator", "RanksDiverged", "mpi_module", "MPI_EXTRA_HINT"]

#: What the commands say when mpi4py (or an MPI library) is missing.
MPI_EXTRA_HINT = ("distributed training needs MPI: pip install 'fastsae[mpi]' (mpi4py and "
                  "the mpich wheel, which brings mpiexec), then run the command under "
                  "mpiexec -n RANKS")

#: Exit status of a process the watchdog ends (no progress within the timeout).
WATCHDOG_EXIT = 70

#: Seconds a failing rank waits between printing its error and aborting, so
#: that mpiexec's output forwarding delivers the message (seen lost without).
ABORT_GRACE_S = 1.0


class RanksDiverged(RuntimeError):
    """Ranks that must hold identical arrays (the parameters of data-parallel
    training) hold different ones."""


def mpi_module():
    """``mpi4py.MPI``, or ``ImportError`` saying which extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{MPI_EXTRA_HINT} ({exc})") from None
    return MPI


def _chunks(n: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries cutting ``n`` elements into near-equal runs."""
    return (np.arange(parts + 1, dtype=np.int64) * n) // parts


class Communicator:
    """One MPI communicator (default ``COMM_WORLD``) with fastsae's collectives.

    ``rank`` and ``size`` as in MPI; ``local_size``: the ranks on this
    machine (``MPI_COMM_TYPE_SHARED``), from which :meth:`default_threads`
    gives each rank its share of the cores.
    """

    def __init__(self, comm=None, timeout: float | None = None):
        MPI = mpi_module()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = local.Get_size()
        local.Free()
        self.timeout = timeout
        self._beat = time.monotonic()
        self._watch = None
        self._stop = threading.Event()
        self.bytes_sent = 0  # per rank, by allreduce_sum and allgather_rows

    # ------------------------------------------------------------ threads
    def default_threads(self) -> int:
        """This rank's share of the machine's cores (at least 1)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        return max(1, cores // self.local_size)

    # ------------------------------------------------------------ collectives
    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum the 1-D contiguous float32 ``buf`` over ranks, in place, in rank
        order (module docstring); returns ``buf``."""
        if buf.ndim != 1 or buf.dtype != np.float32 or not buf.flags.c_contiguous:
            raise ValueError("allreduce_sum takes a 1-D contiguous float32 buffer")
        R = self.size
        if R == 1:
            return buf
        MPI = self.MPI
        bounds = _chunks(buf.size, R)
        counts, displs = np.diff(bounds), bounds[:-1]
        mine = int(counts[self.rank])
        recv = np.empty(R * mine, np.float32)
        self.comm.Alltoallv([buf, (counts, displs), MPI.FLOAT],
                            [recv, ([mine] * R, [i * mine for i in range(R)]), MPI.FLOAT])
        acc = recv[:mine].copy()
        for i in range(1, R):
            acc += recv[i * mine:(i + 1) * mine]
        self.comm.Allgatherv([acc, MPI.FLOAT], [buf, (counts, displs), MPI.FLOAT])
        self.bytes_sent += 4 * (buf.size - mine) * 2
        return buf

    def allgather_rows(self, vec: np.ndarray) -> np.ndarray:
        """``[size, n]``: every rank's 1-D ``vec`` (same length and dtype on
        every rank), rank ``r`` in row ``r``."""
        vec = np.ascontiguousarray(vec)
        out = np.empty((self.size, vec.size), vec.dtype)
        if self.size == 1:
            out[0] = vec
            return out
        self.comm.Allgather(vec, out)
        self.bytes_sent += vec.nbytes * (self.size - 1)
        return out

    def allgather_ragged(self, vec: np.ndarray) -> list[np.ndarray]:
        """Every rank's 1-D ``vec`` (lengths may differ; same dtype), in rank order."""
        vec = np.ascontiguousarray(vec)
        if self.size == 1:
            return [vec]
        counts = self.allgather_rows(np.array([vec.size], np.int64))[:, 0]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty(int(counts.sum()), vec.dtype)
        mpi_t = self.MPI._typedict[vec.dtype.char]
        self.comm.Allgatherv([vec, mpi_t], [out, (counts, displs), mpi_t])
        self.bytes_sent += vec.nbytes * (self.size - 1)
        return [out[displs[i]:displs[i] + counts[i]] for i in range(self.size)]

    def bcast_arrays(self, arrays, root: int = 0) -> None:
        """Overwrite each contiguous array with ``root``'s, in place."""
        if self.size == 1:
            return
        for a in arrays:
            if not a.flags.c_contiguous:
                raise ValueError("bcast_arrays takes contiguous arrays")
            self.comm.Bcast(a, root=root)

    def bcast(self, obj, root: int = 0):
        """``root``'s small JSON-able object, on every rank."""
        return obj if self.size == 1 else self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    # ------------------------------------------------------------ checks
    def check_same(self, arrays, what: str) -> None:
        """Raise :class:`RanksDiverged` (on every rank) unless every rank holds
        the same bytes in ``arrays``."""
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).view(np.uint8).data)
        digest = np.frombuffer(h.digest(), np.uint8)
        every = self.allgather_rows(digest)
        differ = [r for r in range(self.size) if not np.array_equal(every[r], every[0])]
        if differ:
            raise RanksDiverged(f"{what}: ranks {', '.join(map(str, differ))} hold other "
                                "values than rank 0 (data-parallel ranks must stay identical; "
                                "a rank computed something else, e.g. another backend or "
                                "thread count, or memory was corrupted)")

    # ------------------------------------------------------------ faults
    def heartbeat(self) -> None:
        """Tell the watchdog this rank made progress."""
        self._beat = time.monotonic()

    def watchdog(self):
        """Start (once) a daemon thread that ends this process with exit status
        :data:`WATCHDOG_EXIT` when no :meth:`heartbeat` came for ``timeout``
        seconds; ``mpiexec`` then stops every rank. Returns ``self``."""
        if self.timeout is None or self.size == 1 or self._watch is not None:
            return self
        self.heartbeat()

        def run():
            period = min(1.0, self.timeout / 10)
            while not self._stop.wait(period):
                idle = time.monotonic() - self._beat
                if idle > self.timeout:
                    sys.stderr.write(
                        f"fastsae: rank {self.rank} of {self.size}: no progress for "
                        f"{idle:.0f} s (timeout {self.timeout:g} s): another rank is stuck "
                        "or gone; stopping\n")
                    sys.stderr.flush()
                    os._exit(WATCHDOG_EXIT)
        self._watch = threading.Thread(target=run, name="fastsae-watchdog", daemon=True)
        self._watch.start()
        return self

    def stop_watchdog(self) -> None:
        self._stop.set()

    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` raised on this rank and abort every rank (with more
        than one rank; a single process just returns, so the caller re-raises)."""
        if self.size == 1:
            return
        sys.stderr.write(f"fastsae: rank {self.rank} of {self.size} failed: "
                         f"{type(exc).__name__}: {exc}\nfastsae: stopping every rank\n")
        sys.stderr.flush()
        # mpiexec forwards the ranks' output; an abort at once can lose the lines above
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)
