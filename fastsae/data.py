"""Activation data: sources, seeded shuffling, batches, and a synthetic problem.

Sources
-------
A *source* is a 2-D table of activations, ``[n_rows, d_in]``, read a range of
rows at a time:

``ArraySource``    an in-memory NumPy array (any float dtype).
``NpySource``      one ``.npy`` file opened as a read-only memory map
                   (``np.load(mmap_mode="r", allow_pickle=False)``): only the
                   rows asked for are read, so the file may be larger than RAM.
``ShardedSource``  a directory of ``.npy`` shards (sorted by file name, all
                   with the same ``d_in``), each memory-mapped, seen as one
                   table.

:func:`open_source` picks the right one for an array, a file or a directory.
Nothing is ever unpickled: object arrays are refused.

``PairedSource``   a transcoder's data: an input source ``[n_rows, d_in]``
                   and a target source ``[n_rows, d_out]`` with the same rows
                   in the same order, seen as one table ``[n_rows, d_in +
                   d_out]`` (each row the input, then its target) so that
                   shuffling, batches and resume treat a pair as one row.

Shuffling and batches
---------------------
:class:`BatchStream` turns a source into an endless stream of float32 batches
``[batch_size, d_in]``. The rows are cut into blocks of ``block_rows``
contiguous rows; every epoch visits the blocks in an order drawn from
``(seed, epoch)``, loads them a *buffer* at a time (``buffer_rows`` rows, so
memory stays bounded however big the file is) and permutes the rows inside
the buffer with a generator seeded by ``(seed, epoch, buffer)``. When the
whole source fits in one buffer (the usual in-memory case) this is a uniform
random permutation of all rows per epoch. Batches run on across epoch
boundaries. The only state is the number of rows consumed (``position``), so
a stream saved with :meth:`BatchStream.state_dict` and restored with
:meth:`BatchStream.load_state_dict` yields exactly the same batches.

Synthetic ground truth
----------------------
:func:`synthetic` draws ``n_features`` random unit directions in ``d_in``
dimensions (more features than dimensions: superposition) and rows that are
sparse nonnegative combinations of them; it returns the data and the true
dictionary so a trained SAE can be scored with :func:`recovery`.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataSource", "ArraySource", "NpySource", "ShardedSource", "PairedSource", "split_pairs",
    "open_source",
    "BatchStream", "sample_rows", "norm_scaling_factor", "SyntheticData", "synthetic",
    "SyntheticPairs", "synthetic_pairs", "recovery",
]


# ====================================================================== sources
class DataSource:
    """A table of activations ``[n_rows, d_in]`` read by row ranges.

    Subclasses set ``n_rows``, ``d_in``, ``dtype`` and implement
    :meth:`_read` (rows ``start:stop`` in storage order).
    """

    n_rows: int
    d_in: int
    dtype: np.dtype
    description: str = "data"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new C-contiguous float32 array."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows {start}:{stop} out of range for {self.n_rows} rows")
        return np.ascontiguousarray(self._read(start, stop), dtype=np.float32)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write rows ``start:stop`` into ``out``, a float32 ``[stop - start,
        d_in]`` array (a view is fine), converted as :meth:`read` converts:
        the same values without the intermediate copy."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows {start}:{stop} out of range for {self.n_rows} rows")
        if out.dtype != np.float32 or out.shape != (stop - start, self.d_in):
            raise ValueError(f"out must be float32 [{stop - start}, {self.d_in}], got "
                             f"{out.dtype} {out.shape}")
        self._read_into(start, stop, out)

    def _read_into(self, start, stop, out):
        # the same cast as read's ascontiguousarray(..., float32), straight into out
        out[...] = self._read(start, stop)

    def _float32_rows(self):
        """The whole table as an in-memory C-contiguous float32 ``[n_rows,
        d_in]`` array that may be read without copying, or ``None`` (then
        rows are read through :meth:`read_into`)."""
        return None

    def take(self, rows) -> np.ndarray:
        """Rows at the given (any order) indices, float32 ``[len(rows), d_in]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} rows")
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((rows.size, self.d_in), dtype=np.float32)
        out[order] = self._take_sorted(rows[order])
        return out

    def _take_sorted(self, rows):
        return np.stack([self._read(r, r + 1)[0] for r in rows]) if rows.size else \
            np.empty((0, self.d_in), np.float32)

    def _read(self, start, stop):  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {self.n_rows} rows x {self.d_in}>"


def _check_table(arr, what: str) -> None:
    if arr.dtype.kind != "f":
        raise ValueError(f"{what} must hold floating-point activations, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, d_in], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{what} has d_in = 0 (shape {arr.shape})")


class ArraySource(DataSource):
    """An in-memory array ``[n_rows, d_in]`` (not copied)."""

    def __init__(self, array, description: str = "in-memory array"):
        arr = np.asarray(array)
        _check_table(arr, description)
        if arr.shape[0] == 0:
            raise ValueError(f"{description} has no rows")
        self._a = arr
        self.n_rows, self.d_in = (int(s) for s in arr.shape)
        self.dtype = arr.dtype
        self.description = description

    def _read(self, start, stop):
        return self._a[start:stop]

    def _take_sorted(self, rows):
        return self._a[rows]

    def _float32_rows(self):
        a = self._a
        # a subclass that changes _read (a spy, a transform) must be read through it;
        # a memory map is not in memory (its pages may have to come from disk)
        if (type(self)._read is not ArraySource._read or a.dtype != np.float32
                or not a.flags.c_contiguous or _is_mapped(a)):
            return None
        return a


def _is_mapped(a) -> bool:
    """Whether array ``a`` is (a view of) a memory-mapped file."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _open_npy(path: Path):
    """Memory-map one ``.npy`` file read-only; clear errors, never unpickle."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as a .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"{path} is not a single .npy array (an .npz archive?)")
    _check_table(arr, str(path))
    return arr


class NpySource(DataSource):
    """One ``.npy`` file, memory-mapped read-only (never loaded whole)."""

    def __init__(self, path):
        self.path = Path(path)
        self._a = _open_npy(self.path)
        if self._a.shape[0] == 0:
            raise ValueError(f"{self.path} has no rows")
        self.n_rows, self.d_in = (int(s) for s in self._a.shape)
        self.dtype = self._a.dtype
        self.description = str(self.path)

    def _read(self, start, stop):
        return self._a[start:stop]

    def _take_sorted(self, rows):
        return self._a[rows]


class ShardedSource(DataSource):
    """A directory of ``.npy`` shards seen as one table (file-name order)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"data directory not found: {self.directory}")
        files = sorted(p for p in self.directory.iterdir()
                       if p.suffix == ".npy" and p.is_file())
        if not files:
            raise ValueError(f"no .npy shards in directory {self.directory}")
        self._shards = [_open_npy(p) for p in files]
        self.files = files
        d = {int(a.shape[1]) for a in self._shards}
        if len(d) != 1:
            detail = ", ".join(f"{p.name}: {a.shape[1]}" for p, a in zip(files, self._shards))
            raise ValueError(f"shards in {self.directory} have different d_in ({detail})")
        self.d_in = d.pop()
        self._starts = np.zeros(len(files) + 1, dtype=np.int64)
        np.cumsum([a.shape[0] for a in self._shards], out=self._starts[1:])
        self.n_rows = int(self._starts[-1])
        if self.n_rows == 0:
            raise ValueError(f"the shards in {self.directory} hold no rows")
        self.dtype = np.result_type(*[a.dtype for a in self._shards])
        self.description = f"{self.directory} ({len(files)} shards)"

    def _pieces(self, start, stop):
        """Rows ``start:stop`` shard by shard: ``(shard, lo, hi)`` for each
        non-empty piece, in order (rows ``lo:hi`` of shard ``shard``)."""
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            lo = start - self._starts[s]
            hi = min(stop, self._starts[s + 1]) - self._starts[s]
            if hi > lo:
                yield s, lo, hi
                start += hi - lo
            s += 1

    def _read(self, start, stop):
        parts = [np.asarray(self._shards[s][lo:hi], dtype=np.float32)
                 for s, lo, hi in self._pieces(start, stop)]
        if not parts:
            return np.empty((0, self.d_in), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read_into(self, start, stop, out):
        # shard by shard straight into out (no concatenated copy in between)
        done = 0
        for s, lo, hi in self._pieces(start, stop):
            out[done:done + hi - lo] = self._shards[s][lo:hi]
            done += hi - lo

    def _take_sorted(self, rows):
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((rows.size, self.d_in), dtype=np.float32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._shards[s][rows[sel] - self._starts[s]]
        return out


class PairedSource(DataSource):
    """A transcoder's input and target sources, row by row: rows ``[x | y]``
    of width ``d_x + d_y``. Both sources must have the same number of rows
    (the same rows in the same order: nothing can check the order, so keep
    the shards of both sets in step)."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = open_source(inputs), open_source(targets)
        if self.inputs.n_rows != self.targets.n_rows:
            raise ValueError(f"the input data ({self.inputs.description}) have "
                             f"{self.inputs.n_rows} rows but the target data "
                             f"({self.targets.description}) have {self.targets.n_rows}: a "
                             "transcoder's input and target rows must pair up")
        self.n_rows = self.inputs.n_rows
        self.d_x, self.d_y = self.inputs.d_in, self.targets.d_in
        self.d_in = self.d_x + self.d_y
        self.dtype = np.dtype(np.float32)
        self.description = f"{self.inputs.description} -> {self.targets.description}"

    def _read(self, start, stop):
        return np.concatenate([self.inputs.read(start, stop), self.targets.read(start, stop)],
                              axis=1)

    def _read_into(self, start, stop, out):
        # each half straight into its columns of out (the same values as _read)
        self.inputs.read_into(start, stop, out[:, :self.d_x])
        self.targets.read_into(start, stop, out[:, self.d_x:])

    def _take_sorted(self, rows):
        return np.concatenate([self.inputs.take(rows), self.targets.take(rows)], axis=1)

    def split(self, rows):
        """``(x, y)``: C-contiguous float32 copies of the two halves of
        ``rows [n, d_x + d_y]``."""
        return split_pairs(rows, self.d_x)


def split_pairs(rows, d_x: int):
    """``(x, y)`` from paired rows ``[n, d_x + d_y]`` (a
    :class:`PairedSource`'s ``[x | y]``): C-contiguous float32 copies of the
    first ``d_x`` columns and of the rest."""
    rows = np.asarray(rows)
    return (np.ascontiguousarray(rows[:, :d_x], dtype=np.float32),
            np.ascontiguousarray(rows[:, d_x:], dtype=np.float32))


def open_source(data) -> DataSource:
    """A :class:`DataSource` for an array, a ``.npy`` file or a shard directory."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            return ShardedSource(p)
        if not p.exists():
            raise FileNotFoundError(f"data not found: {p}")
        return NpySource(p)
    return ArraySource(data)


# ============================================================== batch stream
_DEFAULT_BUFFER_BYTES = 256 * 2**20


class BatchStream:
    """Endless, seeded, resumable stream of float32 batches from a source.

    Parameters
    ----------
    source : DataSource, array or path
    batch_size : int
    seed : int
        Draws the block order and the in-buffer permutations.
    shuffle : bool
        ``False`` streams rows in storage order (epoch after epoch).
    block_rows : int
        Rows read contiguously from storage (default 256).
    buffer_rows : int, optional
        Rows held in memory at once (default: 256 MiB worth, at least one
        batch and one block).
    scale : float
        Every batch is multiplied by this (input normalization).

    Memory
    ------
    A buffer is not copied into its shuffled order: the stream holds the
    buffer's rows as read and an *index vector*, the position of each of its
    rows in the order they are served (the order of reading the buffer's
    blocks, concatenating them and permuting the rows), and gathers each
    batch through it. A buffer boundary costs a permutation; an epoch end
    of a source that fits in one buffer re-reads nothing. Held at most:

    * rows: nothing for an in-memory C-contiguous float32 array
      (:class:`ArraySource`; batches are gathered from it directly, so
      changes to it show in later batches); otherwise a *staging* array,
      float32 ``[min(blocks_per_buffer * block_rows, n_rows), d_in]`` (one
      buffer), allocated once and reused, holding the current buffer's
      blocks in storage order. A source that fits in one buffer is read into
      it once and kept across epochs (the source must not change meanwhile);
    * the index vector, int64 ``[rows of the buffer]``, and the epoch's
      block order, int64 ``[n_blocks]``.

    Each batch is a new array.
    """

    def __init__(self, source, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 block_rows: int = 256, buffer_rows: int | None = None, scale: float = 1.0):
        self.source = open_source(source)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        n = self.source.n_rows
        self.block_rows = max(1, min(int(block_rows), n))
        if buffer_rows is None:
            buffer_rows = _DEFAULT_BUFFER_BYTES // (4 * self.source.d_in)
        buffer_rows = max(int(buffer_rows), self.batch_size, self.block_rows)
        self.blocks_per_buffer = max(1, buffer_rows // self.block_rows)
        self.n_blocks = -(-n // self.block_rows)
        self.scale = float(scale)
        self.position = 0
        self._epoch = None  # (epoch, block order, buffer starts in rows)
        self._reset_rows()

    def _reset_rows(self):
        self._cur_key = None  # the (epoch, buffer) that _cur serves
        self._cur = None  # (rows, index vector or None, first row): see _rows
        self._stage = None  # float32 [<= one buffer, d_in], reused
        self._staged = None  # the blocks _stage holds, sorted (None: none, or torn)

    # ---------------------------------------------------------------- layout
    def _block_len(self, blocks):
        n, br = self.source.n_rows, self.block_rows
        return np.minimum((blocks + 1) * br, n) - blocks * br

    def _epoch_layout(self, epoch):
        if self._epoch is None or self._epoch[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(self.n_blocks)
            else:
                order = np.arange(self.n_blocks)
            lens = self._block_len(order)
            bpb = self.blocks_per_buffer
            buf_lens = np.add.reduceat(lens, np.arange(0, self.n_blocks, bpb))
            starts = np.zeros(len(buf_lens) + 1, dtype=np.int64)
            np.cumsum(buf_lens, out=starts[1:])
            self._epoch = (epoch, order, starts)
        return self._epoch

    def _buffer_blocks(self, epoch, b):
        """Buffer ``b``'s blocks in the epoch's order, int64 ``[<= blocks_per_buffer]``."""
        _, order, _ = self._epoch_layout(epoch)
        bpb = self.blocks_per_buffer
        return order[b * bpb:(b + 1) * bpb]

    def _served_rows(self, epoch, b, blocks, first):
        """Index vector of a shuffled buffer, int64 ``[rows of the buffer]``:
        block ``blocks[j]`` lies at rows ``first[j]:first[j] + its length`` of
        what holds the rows; the blocks' rows are concatenated in the order of
        ``blocks``, then permuted by the ``(seed, epoch, b)`` generator (the
        stream's order since it was written as read-concatenate-permute)."""
        lens = self._block_len(blocks)
        ends = np.cumsum(lens)
        rows = np.repeat(first - (ends - lens), lens) + np.arange(ends[-1])
        rng = np.random.default_rng([self.seed, epoch, b])
        return rows[rng.permutation(rows.shape[0])]

    def _stage_blocks(self, blocks):
        """Hold ``blocks``' rows in the staging array in storage order; returns
        ``(staging, first)``, ``first`` int64 ``[len(blocks)]`` the row of
        the staging array at which each of ``blocks`` starts. Reads nothing
        when the staging array already holds these blocks (a source that fits
        in one buffer: every epoch holds all of them)."""
        held = np.sort(blocks)
        lens = self._block_len(held)
        at = np.cumsum(lens) - lens
        if self._staged is None or not np.array_equal(self._staged, held):
            if self._stage is None:
                n_stage = min(self.blocks_per_buffer * self.block_rows, self.source.n_rows)
                self._stage = np.empty((n_stage, self.source.d_in), np.float32)
            self._staged = None  # a read that fails leaves it torn
            br, n = self.block_rows, self.source.n_rows
            # storage order and one read per run of adjacent blocks: sequential I/O
            cut = np.flatnonzero(np.diff(held) != 1) + 1
            for i, j in zip(np.r_[0, cut], np.r_[cut, held.size]):
                lo, hi = int(held[i]) * br, min((int(held[j - 1]) + 1) * br, n)
                self.source.read_into(lo, hi, self._stage[int(at[i]):int(at[i]) + hi - lo])
            self._staged = held
        return self._stage, at[np.searchsorted(held, blocks)]

    def _rows(self, epoch, b):
        """``(rows, index, first)``: buffer ``b`` of ``epoch`` in serving order
        is ``rows[index]`` (float32 ``rows [m, d_in]``, int64 ``index``), or
        ``rows[first:first + its length]`` when unshuffled (``index`` None)."""
        if self._cur_key != (epoch, b):
            self._cur_key = None
            blocks = self._buffer_blocks(epoch, b)
            table = self.source._float32_rows()
            if table is not None:
                rows, first = table, blocks * self.block_rows
            else:
                rows, first = self._stage_blocks(blocks)
            if self.shuffle:
                self._cur = (rows, self._served_rows(epoch, b, blocks, first), 0)
            else:  # the blocks are adjacent and ascending: one run of rows
                self._cur = (rows, None, int(first[0]))
            self._cur_key = (epoch, b)
        return self._cur

    # ----------------------------------------------------------------- batches
    def next_batch(self) -> np.ndarray:
        """The next ``[batch_size, d_in]`` float32 batch (C-contiguous)."""
        out = np.empty((self.batch_size, self.source.d_in), dtype=np.float32)
        filled, n = 0, self.source.n_rows
        while filled < self.batch_size:
            epoch, r = divmod(self.position, n)
            _, _, starts = self._epoch_layout(epoch)
            b = int(np.searchsorted(starts, r, side="right")) - 1
            rows, index, first = self._rows(epoch, b)
            lo = r - int(starts[b])
            take = min(self.batch_size - filled, int(starts[b + 1]) - r)
            dst = out[filled:filled + take]
            if index is None:
                dst[...] = rows[first + lo:first + lo + take]
            else:  # mode="clip": the indices are in range, and "raise" buffers the copy
                np.take(rows, index[lo:lo + take], axis=0, out=dst, mode="clip")
            filled += take
            self.position += take
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.position / self.source.n_rows

    def state_dict(self) -> dict:
        return {"position": int(self.position), "seed": self.seed, "shuffle": self.shuffle,
                "block_rows": self.block_rows, "blocks_per_buffer": self.blocks_per_buffer,
                "n_rows": self.source.n_rows}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (same source and layout)."""
        if int(state["n_rows"]) != self.source.n_rows:
            raise ValueError(f"the data have {self.source.n_rows} rows but the saved stream "
                             f"had {state['n_rows']}: not the same data")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.block_rows = int(state["block_rows"])
        self.blocks_per_buffer = int(state["blocks_per_buffer"])
        self.n_blocks = -(-self.source.n_rows // self.block_rows)
        self.position = int(state["position"])
        self._epoch = None
        self._reset_rows()  # the layout may have changed: the staging array's size too


# ================================================================ statistics
def sample_rows(source, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` distinct rows drawn uniformly at random (float32, sorted by
    row index); reads only those rows."""
    source = open_source(source)
    n = min(int(n), source.n_rows)
    rng = np.random.default_rng([int(seed), 0x5A3])
    if n == source.n_rows:
        return source.read(0, n)
    rows = np.sort(rng.choice(source.n_rows, size=n, replace=False))
    return source.take(rows)


def norm_scaling_factor(source, n: int = 65536, seed: int = 0) -> float:
    """Constant ``s`` such that ``mean ||s x||^2 = d_in`` on a sample of rows
    (April 2024 update's input normalization). For a :class:`PairedSource`,
    the input's factor (a transcoder scales its input and target by it)."""
    x = sample_rows(source, n, seed).astype(np.float64)
    if isinstance(source, PairedSource):
        x = x[:, :source.d_x]
    ms = float(np.mean(np.sum(x * x, axis=1)))
    if not np.isfinite(ms):
        raise ValueError("the data contain NaN or infinite values")
    if ms <= 0:
        raise ValueError("the data are all zeros: cannot normalize their norm")
    return float(np.sqrt(x.shape[1] / ms))


# ================================================================ synthetic
@dataclass
class SyntheticData:
    """A synthetic dataset with known features.

    ``x``: float32 ``[n_rows, d_in]``; ``dictionary``: float32
    ``[n_features, d_in]`` unit rows (the true features); ``coefficients``:
    ``scipy.sparse.csr_array [n_rows, n_features]`` with ``x = coefficients @
    dictionary`` (+ noise).
    """

    x: np.ndarray
    dictionary: np.ndarray
    coefficients: object
    params: dict


def synthetic(n_rows: int = 131072, d_in: int = 64, n_features: int = 512, l0: float = 5.0,
              *, magnitude=(0.5, 1.5), noise: float = 0.0, seed: int = 0) -> SyntheticData:
    """Sparse nonnegative combinations of known unit directions.

    Each of ``n_features`` random unit directions in ``d_in`` dimensions is
    active in a row independently with probability ``l0 / n_features`` (so
    ``l0`` features per row on average), with a coefficient drawn uniformly
    from ``magnitude = (low, high)``. Optional isotropic Gaussian noise of
    standard deviation ``noise`` per coordinate is added. Deterministic in
    ``seed``.
    """
    import scipy.sparse as sp

    n_rows, d_in, n_features = int(n_rows), int(d_in), int(n_features)
    if n_rows < 1 or d_in < 1 or n_features < 1:
        raise ValueError("n_rows, d_in and n_features must be >= 1")
    if not 0 < l0 <= n_features:
        raise ValueError(f"l0 must be in (0, n_features], got {l0}")
    lo, hi = (float(v) for v in magnitude)
    if not 0 <= lo <= hi:
        raise ValueError(f"magnitude must be (low, high) with 0 <= low <= high, got {magnitude}")
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_features, d_in))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    D = D.astype(np.float32)
    p = float(l0) / n_features
    chunks, chunk = [], 8192  # bounded memory: never a dense [n_rows, n_features] mask
    for start in range(0, n_rows, chunk):
        m = min(chunk, n_rows - start)
        mask = rng.random((m, n_features)) < p
        vals = rng.uniform(lo, hi, size=int(mask.sum()))
        r, c = np.nonzero(mask)
        chunks.append(sp.csr_array((vals, (r, c)), shape=(m, n_features)))
    coef = sp.vstack(chunks, format="csr").astype(np.float32)
    x = np.asarray(coef @ D, dtype=np.float32)
    if noise > 0:
        x += (noise * rng.standard_normal(x.shape)).astype(np.float32)
    params = {"n_rows": n_rows, "d_in": d_in, "n_features": n_features, "l0": float(l0),
              "magnitude": [lo, hi], "noise": float(noise), "seed": int(seed)}
    return SyntheticData(np.ascontiguousarray(x), D, coef, params)


@dataclass
class SyntheticPairs:
    """A synthetic transcoder problem: one set of sparse true features read
    in one space and written in another.

    ``x = coefficients @ dictionary_in + noise`` (``[n_rows, d_in]``), ``y =
    x @ skip + coefficients @ dictionary_out + noise`` (``[n_rows, d_out]``;
    ``skip`` float32 ``[d_in, d_out]`` or ``None``, so a skip transcoder's
    ``W_skip`` should learn ``skip.T``), dictionaries of unit rows.
    """

    x: np.ndarray
    y: np.ndarray
    dictionary_in: np.ndarray
    dictionary_out: np.ndarray
    skip: np.ndarray | None
    coefficients: object
    params: dict


def synthetic_pairs(n_rows: int = 65536, d_in: int = 64, d_out: int = 48,
                    n_features: int = 512, l0: float = 5.0, *, magnitude=(0.5, 1.5),
                    noise: float = 0.0, target_noise: float = 0.0, skip: bool = False,
                    skip_scale: float = 0.5, decorrelated: bool = False,
                    seed: int = 0) -> SyntheticPairs:
    """Pairs for a transcoder's quality bar (Dunefsky et al.'s setting): the
    coefficients and ``dictionary_in`` as :func:`synthetic` draws them, a
    second random unit dictionary ``[n_features, d_out]``, isotropic Gaussian
    noise of standard deviation ``noise`` per coordinate on ``x`` (part of
    the input: with ``skip`` it reaches ``y`` through the skip map) and
    ``target_noise`` on ``y``, and with ``skip`` a dense linear map ``skip
    [d_in, d_out]`` (Gaussian, entries of standard deviation ``skip_scale /
    sqrt(d_in)``) added as ``x @ skip``. Only the input's dense part (its
    noise) tells the skip map from the decoder, which could otherwise absorb
    ``dictionary_in @ skip``: a skip quality bar needs ``noise > 0``.

    ``decorrelated``: the columns of ``dictionary_out`` are drawn orthogonal
    to those of ``dictionary_in`` (rows then not unit, scaled so their mean
    norm is 1). The coefficients are independent with equal variances, so
    the features' output ``coefficients @ dictionary_out`` is then
    uncorrelated with ``x``: no linear map of ``x`` predicts any of it, and
    ``x @ skip`` is the only linear part of ``y``. Without it a linear skip
    first learns ``skip`` plus the regression of the features' output on
    ``x`` (about ``d_in / n_features`` of its variance), which it unlearns
    only as the features are learned. Deterministic in ``seed``."""
    base = synthetic(n_rows, d_in, n_features, l0, magnitude=magnitude, noise=noise, seed=seed)
    rng = np.random.default_rng([int(seed), 0x7C0])
    d_out = int(d_out)
    if d_out < 1:
        raise ValueError("d_out must be >= 1")
    D_out = rng.standard_normal((int(n_features), d_out))
    if decorrelated:
        if d_in + d_out > int(n_features):
            raise ValueError("decorrelated pairs need d_in + d_out <= n_features")
        Din = base.dictionary.astype(np.float64)
        q, _ = np.linalg.qr(Din)  # an orthonormal basis of D_in's column space
        D_out -= q @ (q.T @ D_out)
        D_out /= np.linalg.norm(D_out, axis=1).mean()
    else:
        D_out /= np.linalg.norm(D_out, axis=1, keepdims=True)
    D_out = D_out.astype(np.float32)
    y = np.asarray(base.coefficients @ D_out, dtype=np.float32)
    S = None
    if skip:
        S = (rng.standard_normal((base.x.shape[1], d_out)) * (skip_scale / np.sqrt(d_in))
             ).astype(np.float32)
        y += base.x @ S
    if target_noise > 0:
        y += (target_noise * rng.standard_normal(y.shape)).astype(np.float32)
    params = dict(base.params, d_out=d_out, skip=bool(skip), skip_scale=float(skip_scale),
                  target_noise=float(target_noise), decorrelated=bool(decorrelated))
    return SyntheticPairs(base.x, np.ascontiguousarray(y), base.dictionary, D_out, S,
                          base.coefficients, params)


def recovery(W_dec, dictionary, threshold: float = 0.9) -> dict:
    """How well decoder rows recover a true dictionary.

    For each true feature (row of ``dictionary``), the best cosine similarity
    with any learned decoder row. Returns ``{"mean_max_cosine", "recovered"
    (fraction of true features whose best cosine exceeds threshold),
    "threshold", "max_cosine" (array)}``.
    """
    W = np.asarray(W_dec, dtype=np.float64)
    D = np.asarray(dictionary, dtype=np.float64)
    if W.ndim != 2 or D.ndim != 2 or W.shape[1] != D.shape[1]:
        raise ValueError(f"dictionary {D.shape} and decoder {W.shape} must share d_in")
    Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-30)
    Dn = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-30)
    best = (Dn @ Wn.T).max(axis=1)
    return {"mean_max_cosine": float(best.mean()),
            "recovered": float(np.mean(best > threshold)),
            "threshold": float(threshold), "max_cosine": best}
