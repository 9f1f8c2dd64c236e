"""A trial target-L0 controller on JumpReLU's L0 coefficient, not part of
fastsae (why JumpReLU has none yet: benchmarks/RESULTS.md, "Target L0").

The same integral law as fastsae.training.controller (gain per step on
log((L0 + 1) / (target + 1)), factor exp(u) on the coefficient), on an
exponential moving average of the batch L0 (0.9), starting at ``--start``
times the coefficient, holding while the average already moves toward the
target (faster than a quarter of the error per 100 steps).

    python benchmarks/jumprelu_controller_trials.py --targets 8,32,128 [--steps 1000]
"""

import argparse
import math

from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import DEFAULT_SYNTHETIC
from fastsae.data import synthetic


class HoldingController:
    def __init__(self, target, gain, start, lag=20, smooth=0.9):
        self.target, self.gain, self.lag, self.smooth = target, gain, lag, smooth
        self.state = math.log(start)
        self.ema, self.hist = None, []

    @property
    def factor(self):
        return math.exp(self.state)

    def update(self, l0):
        self.ema = l0 if self.ema is None else self.smooth * self.ema + (1 - self.smooth) * l0
        self.hist.append(self.ema)
        err = math.log((self.ema + 1) / (self.target + 1))
        if len(self.hist) > self.lag:
            trend = math.log((self.ema + 1) / (self.hist[-1 - self.lag] + 1))
            if err * trend < 0 and abs(trend) > 0.25 * abs(err) * self.lag / 100:
                return  # already moving toward the target: do not wind up
        self.state = max(-math.log(1e4), min(math.log(1e4),
                                             self.state + self.gain * max(-1, min(1, err))))

    def state_dict(self):
        return {"state": self.state}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--targets", default="8,32,128")
    ap.add_argument("--gain", type=float, default=0.02)
    ap.add_argument("--start", type=float, default=1e-3)
    args = ap.parse_args()
    syn = dict(DEFAULT_SYNTHETIC)
    syn["magnitude"] = tuple(syn["magnitude"])
    ds = synthetic(**syn)
    for target in (float(t) for t in args.targets.split(",")):
        m = SparseAutoencoder(syn["d_in"], 2 * syn["n_features"], activation="jumprelu",
                              backend=args.backend, seed=0)
        t = Trainer(m, ds.x, TrainConfig(steps=args.steps, progress=False,
                                         log_every=max(1, args.steps // 10)), threads=1)
        t.controller = HoldingController(target, args.gain, args.start)
        r = t.train()
        traj = ", ".join(f"{h['l0']:.1f}" for h in r.history if "l0" in h and "event" not in h)
        print(f"target {target:g}: final L0 {r.metrics['l0']:.2f} "
              f"({100 * (r.metrics['l0'] / target - 1):+.0f}%), factor {t.controller.factor:.3g},"
              f" L0 every tenth: {traj}", flush=True)


if __name__ == "__main__":
    main()
