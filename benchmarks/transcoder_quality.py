"""Transcoder quality on synthetic pairs (issue 15): what the quality bars
of ``tests/test_transcoder.py`` measure, for several seeds and run lengths.

Pairs (:func:`fastsae.data.synthetic_pairs`): 256 true features, L0 5,
``x`` in 64 dimensions, ``y`` in 48; a TopK transcoder (k = 5, 512 latents,
batch 512, the trainer's defaults otherwise) must recover ``y``'s
dictionary (rows at cosine > 0.9); a skip transcoder on ``y = x S + f D_out``
must also recover ``S`` (``W_skip`` against ``S.T``: cosine and relative
error). The skip problem is built ``decorrelated`` (the features' output
uncorrelated with ``x``, so ``S`` is the only linear part of ``y``) and with
input noise 0.1 (what tells ``S`` from the decoder); the generic problem is
run too, to show what a linear skip learns there.

    python benchmarks/transcoder_quality.py [--backend numba] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastsae
from fastsae import TrainConfig, Trainer
from fastsae.data import recovery, synthetic_pairs


def run(skip: bool, decorrelated: bool, noise: float, steps: int, seed: int, backend: str):
    d = synthetic_pairs(65536, 64, 48, 256, 5.0, noise=noise, skip=skip,
                        decorrelated=decorrelated, seed=seed)
    m = fastsae.SparseAutoencoder(64, 512, activation="topk", k=5, transcoder=True, d_out=48,
                                  skip=skip, backend=backend, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=512, lr_warmup_steps=20, progress=False,
                      eval_rows=4096)
    t0 = time.perf_counter()
    r = Trainer(m, (d.x, d.y), cfg).train()
    rec = recovery(m.W_dec, d.dictionary_out)
    out = {"skip": skip, "decorrelated": decorrelated, "noise": noise, "steps": steps,
           "seed": seed, "recovered": rec["recovered"], "mean_max_cosine": rec["mean_max_cosine"],
           "explained_variance": r.metrics["explained_variance"],
           "wall_s": time.perf_counter() - t0}
    if skip:
        a, b = m.W_skip.ravel().astype(np.float64), d.skip.T.ravel().astype(np.float64)
        out["skip_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        out["skip_relative_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = [(False, False, 0.05, 1000), (False, False, 0.05, 2000),
             (True, True, 0.1, 2000), (True, True, 0.1, 3000), (True, False, 0.1, 3000)]
    print("skip decorrelated noise steps seed | recovered mean_cos EV | skip_cos skip_relerr")
    for skip, dec, noise, steps in cases:
        for seed in seeds:
            o = run(skip, dec, noise, steps, seed, args.backend)
            tail = (f"{o['skip_cosine']:.3f} {o['skip_relative_error']:.3f}" if skip else "-")
            print(f"{skip!s:5} {dec!s:5} {noise:.2f} {steps:5d} {seed} | {o['recovered']:.3f} "
                  f"{o['mean_max_cosine']:.3f} {o['explained_variance']:.3f} | {tail}",
                  flush=True)


if __name__ == "__main__":
    main()
