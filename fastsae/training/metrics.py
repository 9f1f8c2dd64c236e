"""Training metrics: firing windows, dead fraction, feature density, the log.

:class:`FiringWindow` counts in how many rows each feature fired, over two
alternating windows of ``dead_window`` steps (the counts of the current
window live on the backend, where ``train_step`` adds to them). A model
without features (the plain :class:`fastsae.Autoencoder`) gets an inert
window: no counts, a NaN dead fraction, no density.

:class:`MetricsLog` is ``out_dir/metrics.jsonl``: one JSON object per logged
step, ``{"step", "tokens", "mse", "l1", "total", "l0",
"explained_variance"[, "aux"][, "explained_variance_<width>" per Matryoshka
prefix], "dead_fraction", "lr", "l1_coefficient"
[, "mean_max_cosine", "recovered"], "elapsed_s", "tokens_per_s"}``, plus
event records such as ``{"step", "event": "resample", "resampled"}``.
NaN and infinite values are written as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes

__all__ = ["FiringWindow", "MetricsLog", "MetricsAccumulator", "feature_density",
           "none_if_nan", "METRICS_FILENAME", "STEP_KEYS"]

METRICS_FILENAME = "metrics.jsonl"
#: Keys of a training state's step result that are averaged into the log
#: (``"aux"`` only when the state lists it in ``metric_keys``), beside a
#: Matryoshka state's ``explained_variance_<width>`` keys.
STEP_KEYS = ("mse", "l1", "total", "l0", "explained_variance", "aux", "l0_loss")


def none_if_nan(v):
    """``None`` for ``None``, NaN and infinities (JSON has no NaN), else ``v``."""
    return None if v is None or not math.isfinite(v) else v


class FiringWindow:
    """Firing counts of ``n_features`` features over the current and the
    previous window (``n_features=None``: inert, for models without features).

    ``fire_counts`` is the int64 ``[n_features]`` backend array a step adds to;
    ``prev`` (host, int64) holds the previous window's counts.
    """

    def __init__(self, backend, n_features: int | None):
        self.backend = backend
        self.enabled = n_features is not None
        self.prev = np.zeros(n_features if self.enabled else 1, np.int64)
        self.fire_counts = backend.to_backend(np.zeros_like(self.prev)) if self.enabled else None
        self.cur_steps = 0
        self.prev_steps = 0

    @property
    def steps(self) -> int:
        """Steps covered by the counts (current + previous window)."""
        return self.prev_steps + self.cur_steps

    def counts(self) -> np.ndarray:
        """Host int64 firing counts over both windows."""
        if self.fire_counts is None:
            return self.prev.copy()
        return np.asarray(self.backend.to_numpy(self.fire_counts), dtype=np.int64) + self.prev

    def record_step(self, dead_window: int) -> None:
        """Count one more step; start a new window after ``dead_window`` steps."""
        if not self.enabled:
            return
        self.cur_steps += 1
        if self.cur_steps >= dead_window:
            self.prev = np.array(self.backend.to_numpy(self.fire_counts), dtype=np.int64)
            self.prev_steps = self.cur_steps
            self.fire_counts = self.backend.to_backend(np.zeros_like(self.prev))
            self.cur_steps = 0

    def reset(self) -> None:
        """Forget all counts (after resampling, so new features get a chance)."""
        self.fire_counts = self.backend.to_backend(np.zeros_like(self.prev))
        self.prev = np.zeros_like(self.prev)
        self.cur_steps = self.prev_steps = 0

    def dead_fraction(self) -> float:
        """Fraction of features that fired in none of the window's rows (NaN
        without features or before the first step)."""
        if not self.enabled or self.steps == 0:
            return float("nan")
        return float(np.mean(self.counts() == 0))

    def density(self, batch_size: int) -> dict | None:
        """Histogram of log10 firing frequency over the window (see
        :func:`feature_density`); ``None`` without features or rows."""
        rows = self.steps * batch_size
        if not self.enabled or rows == 0:
            return None
        return feature_density(self.counts(), rows)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"cur_steps": self.cur_steps, "prev_steps": self.prev_steps}

    def tensors(self) -> dict:
        if not self.enabled:
            return {}
        return {"fire.cur": np.asarray(self.backend.to_numpy(self.fire_counts), dtype=np.int64),
                "fire.prev": self.prev}

    def load(self, tensors: dict, state: dict) -> None:
        self.cur_steps, self.prev_steps = int(state["cur_steps"]), int(state["prev_steps"])
        if self.enabled:
            cur = np.array(tensors["fire.cur"], dtype=np.int64)
            self.fire_counts = self.backend.to_backend(cur)
            self.prev = np.array(tensors["fire.prev"], dtype=np.int64)


def feature_density(counts: np.ndarray, rows: int) -> dict:
    """Histogram of ``log10(counts / rows)`` over the features that fired:
    ``{"bin_edges", "counts", "dead", "rows", "log10_frequency"}`` (quarter-decade
    bins from the lowest observable frequency to 1; ``-inf`` for dead ones)."""
    freq = counts / rows
    alive = freq > 0
    lo = math.floor(math.log10(1.0 / rows) * 4) / 4
    edges = np.arange(lo, 0.25 + 1e-9, 0.25)
    hist, edges = np.histogram(np.log10(freq[alive]), bins=edges)
    return {"bin_edges": edges.tolist(), "counts": hist.tolist(),
            "dead": int((~alive).sum()), "rows": int(rows),
            "log10_frequency": np.where(alive, np.log10(np.where(alive, freq, 1)),
                                        -np.inf).tolist()}


class MetricsAccumulator:
    """Sums of the step results since the last logged record (saved in
    checkpoints as the plain dict :attr:`sums`, ``{"n": steps, key: sum}``)."""

    def __init__(self, sums: dict | None = None):
        self.sums = dict(sums or {})

    def add(self, result: dict) -> None:
        s = self.sums
        s["n"] = s.get("n", 0) + 1
        for k in (*STEP_KEYS, *(k for k in result if k.startswith("explained_variance_"))):
            s[k] = s.get(k, 0.0) + float(result.get(k, 0.0))

    def means(self, keys) -> dict | None:
        """Mean of each key (``None`` when not finite), or ``None`` before any step."""
        n = self.sums.get("n", 0)
        if n == 0:
            return None
        return {k: none_if_nan(self.sums.get(k, 0.0) / n) for k in keys}

    def clear(self) -> None:
        self.sums = {}


class MetricsLog:
    """The logged records in memory (:attr:`history`) and, with a path, in
    ``metrics.jsonl`` (appended one line per record)."""

    def __init__(self, out_dir: Path | None):
        self.path = None if out_dir is None else Path(out_dir) / METRICS_FILENAME
        self.history: list[dict] = []

    def append(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def restore(self, step: int, source: Path | None) -> None:
        """On resume: the records of ``source`` (the resumed run's log) up to
        ``step`` become the history, so the log matches the checkpoint.
        Nothing is written until :meth:`begin`."""
        kept = []
        if source is not None and Path(source).exists():
            for line in Path(source).read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(rec)
        self.history = kept

    def begin(self) -> None:
        """Write the history (empty for a fresh run) as the log file, atomically;
        :meth:`append` adds to it from then on."""
        if self.path is None:
            return
        body = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write_bytes(self.path, body.encode())
