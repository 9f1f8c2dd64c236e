"""The target-L0 controller on the built-in synthetic problem: final L0 of a
ReLU run for targets 8, 32, 128 (1000 steps, CLI defaults otherwise), and
why JumpReLU has no controller yet: its final L0 at fixed L0 coefficients
down to 0, and with SAELens's "quadratic" sparsity mode centred on the same
targets (see benchmarks/RESULTS.md, "Target L0").

    python benchmarks/target_l0.py [--backend numpy] [--steps 1000]
"""

import argparse

from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import DEFAULT_SYNTHETIC
from fastsae.data import synthetic


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
    print("| activation | setting | L0 every tenth of the run | final L0 (eval) | EV |")
    print("| --- | --- | --- | --- | --- |")
    runs = [("relu", dict(target_l0=float(t))) for t in (8, 32, 128)]
    runs += [("jumprelu", dict(l0_coefficient=c)) for c in (1.0, 0.1, 0.0)]
    runs += [("jumprelu", dict(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(t),
                               jumprelu_bandwidth=bw))
             for bw in (0.05, 0.5) for t in (8, 32, 128)]
    for act, kw in runs:
        m = SparseAutoencoder(syn["d_in"], d_sae, activation=act, backend=args.backend,
                              seed=0, decoder_norm="unit_norm")
        t = Trainer(m, ds.x, TrainConfig(steps=args.steps, progress=False,
                                         log_every=max(1, args.steps // 10), **kw),
                    true_dictionary=ds.dictionary, threads=1)
        r = t.train()
        traj = ", ".join(f"{h['l0']:.1f}" for h in r.history if "l0" in h and "event" not in h)
        setting = ", ".join(f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}"
                            for k, v in kw.items())
        print(f"| {act} | {setting} | {traj} | {r.metrics['l0']:.2f} "
              f"| {r.metrics['explained_variance']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
