"""Time :class:`fastsae.data.BatchStream`'s buffer refill (issue 12).

Writes a seeded float32 ``.npy`` file ``[rows, d_in]`` into a temporary
directory, opens it as the trainer does (``open_source(path)``, the stream
scaled by ``norm_scaling_factor``, the default buffer: 256 MiB) and times

* the first ``next_batch`` (the first buffer fill),
* a *refill*: the ``next_batch`` call that crosses into a new buffer (with
  the default buffer and a 192 MiB file, one buffer per epoch: the epoch
  end), the median over ``--repeats`` of them,
* an ordinary ``next_batch`` (every other call), the median.

``--check`` also prints a sha256 of the bytes of the first 3 epochs of
batches, for the trainer's stream and a few other layouts, so that two
versions of the code can be compared bit for bit::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/batchstream_refill.py --rows 131072 --d-in 384 \\
        --batch 512 --repeats 5 --check
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fastsae.data import BatchStream, norm_scaling_factor, open_source


def _write(path: Path, rows: int, d_in: int, seed: int) -> None:
    """A seeded float32 ``[rows, d_in]`` file, written in chunks."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d_in))
    rng = np.random.default_rng(seed)
    for lo in range(0, rows, 8192):
        hi = min(rows, lo + 8192)
        mm[lo:hi] = rng.standard_normal((hi - lo, d_in), dtype=np.float32)
    mm.flush()
    del mm


def _buffer_starts(stream: BatchStream, epoch: int) -> np.ndarray:
    """Rows (in the epoch) at which the stream's buffers start."""
    return stream._epoch_layout(epoch)[2][:-1]


def _crosses(stream: BatchStream, layout: BatchStream) -> bool:
    """Whether ``stream``'s next ``next_batch`` needs a buffer it does not
    hold: its rows reach the start of another buffer (or of the next epoch).
    The buffer starts come from ``layout``, a twin stream, so that asking
    leaves ``stream``'s cached layout alone."""
    n = stream.source.n_rows
    first, last = stream.position, stream.position + stream.batch_size - 1
    for epoch in range(first // n, last // n + 1):
        for s in _buffer_starts(layout, epoch):
            g = epoch * n + int(s)
            if first < g <= last or (g == first and first > 0):
                return True
    return False


def _time(args, source, scale):
    """Seconds: the first call, the refills, the ordinary calls."""
    stream, layout = (BatchStream(source, args.batch, seed=args.seed, scale=scale,
                                  buffer_rows=args.buffer_rows) for _ in range(2))
    t = time.perf_counter()
    stream.next_batch()
    first = time.perf_counter() - t
    refills, ordinary = [], []
    while len(refills) < args.repeats:
        crossing = _crosses(stream, layout)
        t = time.perf_counter()
        stream.next_batch()
        dt = time.perf_counter() - t
        (refills if crossing else ordinary).append(dt)
    return first, refills, ordinary


def _digest(source, scale, epochs=3, **kwargs) -> str:
    """sha256 of the bytes of every float32 batch until ``epochs`` epochs are
    consumed (the last batch runs into the next epoch)."""
    stream = BatchStream(source, kwargs.pop("batch_size"), scale=scale, **kwargs)
    h = hashlib.sha256()
    while stream.position < epochs * source.n_rows:
        h.update(stream.next_batch().tobytes())
    return h.hexdigest()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="refills timed")
    ap.add_argument("--buffer-rows", type=int, default=None,
                    help="BatchStream buffer_rows (default: the trainer's, 256 MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="also print sha256 digests of the first 3 epochs of batches")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.npy"
        _write(path, args.rows, args.d_in, args.seed)
        source = open_source(path)
        scale = norm_scaling_factor(source)
        first, refills, ordinary = _time(args, source, scale)
        mib = args.rows * args.d_in * 4 / 2**20
        print(f"\n{args.label} BatchStream on {path.name}: {args.rows} x {args.d_in} float32 "
              f"({mib:.0f} MiB), batch {args.batch}, buffer_rows {args.buffer_rows}\n")
        print("| call | median ms | min ms | calls |")
        print("|---|---:|---:|---:|")
        print(f"| first next_batch (first fill) | {first * 1e3:.2f} | {first * 1e3:.2f} | 1 |")
        for name, ts in (("refill (crosses into a new buffer)", refills),
                         ("ordinary next_batch", ordinary)):
            print(f"| {name} | {statistics.median(ts) * 1e3:.3f} | {min(ts) * 1e3:.3f} "
                  f"| {len(ts)} |")
        if args.check:
            b = args.batch
            layouts = {
                "trainer (default buffer)": dict(batch_size=b, seed=args.seed),
                "shuffle=False": dict(batch_size=b, seed=args.seed, shuffle=False),
                "block_rows=100 buffer_rows=20000 batch-12": dict(
                    batch_size=max(1, b - 12), seed=args.seed + 1, block_rows=100,
                    buffer_rows=20000),
            }
            print("\n| layout (3 epochs) | sha256 |")
            print("|---|---|")
            for name, kw in layouts.items():
                print(f"| {name} | {_digest(source, scale, **kw)} |")
        del source


if __name__ == "__main__":
    main()
