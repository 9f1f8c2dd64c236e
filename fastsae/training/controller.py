"""The target-L0 controller: sets the L1 coefficient during training so that
a ReLU run ends at the L0 the user asked for (``TrainConfig.target_l0``).

The coefficient a step uses is ``l1_at(s) * exp(u)``: the configured
coefficient with its warm-up times a factor the controller integrates after
every step from the batch's measured L0:

    u <- clip(u + gain * clip(log((L0 + 1) / (target + 1)), -1, 1), -log(1e4), log(1e4))

(``+ 1`` keeps a batch with no active feature finite). A higher L0 than the
target raises the coefficient, a lower one lowers it; the integral removes
the steady-state error whatever the configured coefficient, which then only
sets where the search starts. The state ``u`` is a float64 saved in
checkpoints, so a resumed run is bit-exact.

JumpReLU is not controlled (the trainer refuses ``target_l0`` for it): its L0
follows its coefficient, but its thresholds move only while pre-activations
lie within half a bandwidth of them, so the response is slow and path
dependent (a threshold raised early is not lowered by a smaller coefficient
later); this controller wound up and overshot there, and targets above what a
zero coefficient reaches would need a negative one (``benchmarks/target_l0.py``
and the issue's closing note).
"""

from __future__ import annotations

import math

__all__ = ["L0Controller"]

_LIMIT = math.log(1e4)


class L0Controller:
    """Integral control of ``log(L1 coefficient factor)`` toward ``target``
    L0 (see the module docstring); ``gain`` is per step."""

    def __init__(self, target: float, *, gain: float = 0.01):
        self.target = float(target)
        self.gain = float(gain)
        self.state = 0.0

    @property
    def factor(self) -> float:
        return math.exp(self.state)

    def update(self, l0: float) -> None:
        """Feed the L0 a step measured (before its update)."""
        l0 = float(l0)
        if not math.isfinite(l0):
            return
        err = math.log((max(l0, 0.0) + 1.0) / (self.target + 1.0))
        self.state = max(-_LIMIT, min(_LIMIT, self.state + self.gain * max(-1.0, min(1.0, err))))

    def state_dict(self) -> dict:
        return {"target": self.target, "gain": self.gain, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.state = float(d["state"])
