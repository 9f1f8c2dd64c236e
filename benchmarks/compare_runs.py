"""Compare the medians of pytest-benchmark JSON files from two versions.

Each run is a ``--benchmark-json`` file of this suite; give the runs of the
old version, then ``--`` and those of the new one (interleave the runs on one
machine so drift hits both alike)::

    python benchmarks/compare_runs.py old1.json old2.json -- new1.json new2.json

Prints, per benchmark and backend, the median of every run, each run's
ratio to the bare matmul of the same run, and new / old of the medians'
means. Ratios within one run are what to read on a shared machine.
"""

from __future__ import annotations

import json
import statistics
import sys


def _load(path):
    data = json.load(open(path))
    out, matmul = {}, {}
    for b in data["benchmarks"]:
        key = (b["group"] or b["name"], b["extra_info"].get("backend", "?"))
        out[key] = b["stats"]["median"] * 1e3
        if key[1] == "bare_matmul":
            matmul[key[0].split("[")[-1]] = out[key]
    return out, matmul


def main(argv) -> int:
    if "--" not in argv:
        print(__doc__)
        return 2
    i = argv.index("--")
    old = [_load(p) for p in argv[:i]]
    new = [_load(p) for p in argv[i + 1:]]
    keys = sorted(set().union(*(r for r, _ in old + new)))
    print(f"{'benchmark':44s} {'backend':8s} {'old ms':>17s} {'new ms':>17s} "
          f"{'old x mm':>11s} {'new x mm':>11s} {'new/old':>7s}")
    for key in keys:
        if key[1] == "numpy" or not all(key in r for r, _ in old + new):
            continue
        size = key[0].split("[")[-1]

        def cols(runs):
            ms = [r[key] for r, _ in runs]
            mm = [r[key] / m[size] for r, m in runs if size in m]
            return ms, mm

        oms, omm = cols(old)
        nms, nmm = cols(new)
        ratio = statistics.mean(nms) / statistics.mean(oms)
        f = lambda v, p: "/".join(f"{x:.{p}f}" for x in v)  # noqa: E731
        print(f"{key[0]:44s} {key[1]:8s} {f(oms, 1):>17s} {f(nms, 1):>17s} "
              f"{f(omm, 2):>11s} {f(nmm, 2):>11s} {ratio:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
