"""Shard-per-task encoding: one process against a local Dask cluster, same run.

    python benchmarks/encode_shards.py [--size paper] [--shards 8] [--rows 8192]
                                       [--repeats 2]

Writes ``--shards`` seeded random shards (``--rows`` x d_in float32) and a
TopK SAE (k = 32) of the size's width into a temporary directory, then times
:func:`fastsae.distributed.encode.encode_to_dir` ``--repeats`` times each:
in this process with all cores as threads, and on ``local:1`` and
``local:W`` clusters (W = the core count, one thread per worker). Each
cluster run includes starting and stopping its cluster, as the CLI does.
Reports medians and their ratio to the in-process encode, the rows per
second, and checks that every run wrote byte-identical shard files when the
threads per task are equal (the in-process run is repeated with one thread
for that comparison). Needs the dask extra (``pip install -e '.[dask]'``).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import fastsae
from fastsae.distributed.encode import encode_to_dir

SIZES = {"small": (128, 2048), "paper": (512, 8192)}


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.suffix == ".npz"}


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="paper")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    d_in, d_sae = SIZES[args.size]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        (tmp / "data").mkdir()
        for i in range(args.shards):
            np.save(tmp / "data" / f"part-{i:04d}.npy",
                    rng.standard_normal((args.rows, d_in)).astype(np.float32))
        fastsae.SparseAutoencoder(d_in, d_sae, activation="topk", k=32, seed=0).save(tmp / "sae")
        encode_to_dir(tmp / "sae", tmp / "data", tmp / "warm", progress=None)  # JIT, page cache

        runs = [("this process", None, None), ("this process, 1 thread", None, 1),
                ("local:1", "local:1", None), (f"local:{cores}", f"local:{cores}", None)]
        times, files = {}, {}
        for rep in range(args.repeats):
            for name, dask, threads in runs:
                out = tmp / f"out-{rep}-{len(times.get(name, []))}-{name.replace(' ', '_')}"
                t0 = time.perf_counter()
                index = encode_to_dir(tmp / "sae", tmp / "data", out, dask=dask,
                                      threads=threads, progress=None)
                times.setdefault(name, []).append(time.perf_counter() - t0)
                files.setdefault(name, _shard_bytes(out))
                if index["threads_per_task"] == 1:
                    files.setdefault("one thread per task", _shard_bytes(out))
                    assert files["one thread per task"] == _shard_bytes(out), \
                        f"{name}: shard files differ from another one-thread run"
        n = args.shards * args.rows
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
                         for i in threadpool_info() if i.get("user_api") == "blas")
        print(f"CPU: {_cpu_name()}; BLAS: {blas}")
        print(f"encode of {args.shards} shards x {args.rows} rows, d_in {d_in}, d_sae {d_sae}, "
              f"TopK k=32, {cores} cores; medians of {args.repeats}")
        base = statistics.median(times["this process"])
        print("| where | median s | rows/s | vs this process |")
        print("| --- | --- | --- | --- |")
        for name, *_ in runs:
            m = statistics.median(times[name])
            print(f"| {name} | {m:.2f} | {n / m:,.0f} | {m / base:.2f}x |")
        print("shard files byte-identical across the one-thread-per-task runs: yes")


if __name__ == "__main__":
    main()
