"""Time a few paper-size training steps in one process (no pytest-benchmark).

A quick cross-check of the benchmark suite on a noisy machine: run it for two
versions in alternating processes and compare the medians::

    PYTHONPATH=/path/to/old python benchmarks/step_timing.py numba,cython topk,relu old
    python benchmarks/step_timing.py numba,cython topk,relu new

Arguments: backends, step kinds (``topk``: ``train_step_topk(k=32)``; ``relu``:
``train_step`` with weighted L1), a label and optionally the initial ``b_enc``
value (default 0: half the features fire; -2.6 gives L0 about 39 at this
shape, the sparse regime) and optionally the ReLU path, ``auto`` (default),
``dense`` or ``sparse`` (the numba/cython density thresholds set to 0 or 2).
12 steps each, the first 2 dropped (compilation, warm caches); prints median
and min in ms and the last step's L0.
"""
import sys, time, statistics
import numpy as np
import fastsae
from fastsae import SAEParams, AdamState
rng = np.random.default_rng(0)
n, d_in, d_sae = 4096, 512, 8192
W_enc = (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
W_dec = np.ascontiguousarray(W_enc.T); W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
x = rng.normal(size=(n, d_in)).astype(np.float32)
b0 = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
path = sys.argv[5] if len(sys.argv) > 5 else "auto"
if path != "auto":
    from fastsae.backends import tunables
    for _name in ("NUMBA_RELU_DENSE_MIN_DENSITY", "CYTHON_RELU_DENSE_MIN_DENSITY"):
        setattr(tunables, _name, {"dense": 0.0, "sparse": 2.0}[path])
p = SAEParams(W_enc, np.full(d_sae, b0, np.float32), W_dec, np.zeros(d_in, np.float32))
for name in sys.argv[1].split(","):
    be = fastsae.get_backend(name)
    q = p.copy(); st = AdamState.zeros_like(q)
    for kind in sys.argv[2].split(","):
        ts = []
        for i in range(12):
            t = time.perf_counter()
            if kind == "topk":
                r = be.train_step_topk(q, st, x, k=32, lr=1e-4)
            else:
                r = be.train_step(q, st, x, l1_coefficient=1e-3, lr=1e-4)
            ts.append(time.perf_counter() - t)
        ts = ts[2:]
        print(f"{sys.argv[3]} {name} {kind}: median {statistics.median(ts)*1e3:.1f} min {min(ts)*1e3:.1f} ms l0 {r.l0:.1f}")
