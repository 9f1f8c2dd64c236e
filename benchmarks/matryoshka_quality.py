"""Matryoshka BatchTopK's quality bar (issue 15) on the built-in synthetic
problem, over several seeds: the explained variance of the smallest prefix
(d_sae/8 latents) of a Matryoshka SAE against that of the d_sae/8 most
frequently firing latents of a BatchTopK SAE trained at the same k, steps
and seed, and both SAEs' full explained variance.

    python benchmarks/matryoshka_quality.py [--backend numba] [--seeds 7,8,9,10]
"""

from __future__ import annotations

import argparse

import numpy as np

from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.data import synthetic


def _ev(x, x_hat) -> float:
    return float(1 - np.sum((x_hat - x) ** 2) / np.sum((x - x.mean(0)) ** 2))


def run(seed: int, backend: str, d_sae: int = 256, k: int = 4, steps: int = 300) -> tuple:
    prob = synthetic(n_rows=32768, d_in=32, n_features=128, l0=4.0, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=256, lr=3e-3, lr_warmup_steps=5,
                      progress=False, eval_rows=4096, log_every=10, seed=seed)
    mat = SparseAutoencoder(32, d_sae, activation="matryoshka_batchtopk", k=k,
                            backend=backend, seed=seed)
    Trainer(mat, prob.x, cfg).train()
    btk = SparseAutoencoder(32, d_sae, activation="batchtopk", k=k, backend=backend,
                            seed=seed)
    Trainer(btk, prob.x, cfg).train()
    x, w = prob.x[-4096:], d_sae // 8
    prefix = _ev(x, mat.decode(mat.encode(x, sparse=True), width=w))
    codes = btk.encode(x, sparse=True)
    top = np.argsort(-np.bincount(codes.indices, minlength=d_sae), kind="stable")[:w]
    f = codes.to_dense()
    drop = np.ones(d_sae, bool)
    drop[top] = False
    f[:, drop] = 0
    return prefix, _ev(x, btk.decode(f)), _ev(x, mat.reconstruct(x)), _ev(x, btk.reconstruct(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--seeds", default="7,8,9,10")
    a = ap.parse_args()
    print("| seed | Matryoshka first d_sae/8 | BatchTopK top d_sae/8 | Matryoshka all "
          "| BatchTopK all |\n|---|---|---|---|---|")
    for s in (int(v) for v in a.seeds.split(",")):
        r = run(s, a.backend)
        print(f"| {s} | " + " | ".join(f"{v:.3f}" for v in r) + " |")


if __name__ == "__main__":
    main()
