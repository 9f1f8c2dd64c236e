"""JumpReLU's defaults on the built-in synthetic problem: true-feature
recovery, L0 and explained variance for a few (l0_coefficient,
jumprelu_init_threshold, jumprelu_bandwidth, steps) settings beside a ReLU run
of the same steps. How ``TrainConfig.jumprelu_init_threshold``'s default
was chosen (see benchmarks/RESULTS.md, "JumpReLU").

    python benchmarks/jumprelu_defaults.py [--backend numpy] [--steps 1000]
"""

import argparse

from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import DEFAULT_SYNTHETIC
from fastsae.data import synthetic

SETTINGS = [  # (l0_coefficient, init threshold, bandwidth)
    (1.0, 0.01, 0.05),   # SAELens's defaults
    (5.0, 0.01, 0.05),
    (1.0, 0.01, 0.5),
    (0.3, 0.1, 0.05),
    (1.0, 0.1, 0.05),    # fastsae's defaults
    (1.0, 0.1, 0.2),
    (1.0, 0.3, 0.05),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    syn = dict(DEFAULT_SYNTHETIC)
    syn["magnitude"] = tuple(syn["magnitude"])
    ds = synthetic(**syn)
    d_sae = 2 * syn["n_features"]
    print(f"synthetic problem {syn}, d_sae {d_sae}, {args.steps} steps, backend {args.backend}")
    print("| activation | l0_coefficient | init threshold | bandwidth | recovered | L0 | EV |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    runs = [("relu", None)] + [("jumprelu", s) for s in SETTINGS]
    for act, s in runs:
        kw = {} if s is None else dict(l0_coefficient=s[0], jumprelu_init_threshold=s[1],
                                       jumprelu_bandwidth=s[2])
        m = SparseAutoencoder(syn["d_in"], d_sae, activation=act, backend=args.backend,
                              seed=0, decoder_norm="unit_norm")
        r = Trainer(m, ds.x, TrainConfig(steps=args.steps, progress=False, **kw),
                    true_dictionary=ds.dictionary, threads=1).train()
        mm = r.metrics
        cols = ["-", "-", "-"] if s is None else [f"{v:g}" for v in s]
        print(f"| {act} | {' | '.join(cols)} | {mm['recovered']:.3f} | {mm['l0']:.1f} "
              f"| {mm['explained_variance']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
