"""Training loop: schedules, dead features, metrics, checkpoints, resume.

:class:`Trainer` trains a :class:`fastsae.SparseAutoencoder` (or the plain
:class:`fastsae.Autoencoder`) on a data source with the backend's fused
``train_step``. Parameters and Adam state live on the backend (``to_backend``)
for the whole run; they come back to the host only for metrics, resampling
and checkpoints.

Files written when ``out_dir`` is given::

    out_dir/checkpoint.safetensors  parameters, Adam moments, firing counts;
                                    the run state (step, scale, data position,
                                    RNG state, config) as JSON in the header
    out_dir/checkpoint.json         the same run state, for people (not read)
    out_dir/metrics.jsonl           one JSON object per logged step
    out_dir/sae/                    the final SAE, SAELens format, on raw inputs
    out_dir/summary.json            final metrics and feature-density histogram

Every file is written atomically (temporary file, fsync, rename), so a crash
while saving leaves the previous checkpoint intact. Resuming from a
checkpoint on the same backend continues bit for bit: the batches depend only
on (seed, rows consumed), and everything else that evolves is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _validate as V
from .autoencoder import Autoencoder
from .backends import get_backend
from .data import BatchStream, norm_scaling_factor, open_source, recovery, sample_rows
from .io import SAEFormatError, atomic_write_bytes, atomic_write_json, load_tensors, save_tensors
from .model import ACTIVATIONS, SparseAutoencoder
from .params import AdamState, SAEParams
from .sparse import SparseCodes

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDiverged", "CHECKPOINT_FILENAME"]

CHECKPOINT_FILENAME = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = "fastsae-checkpoint-1"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; names the step."""


@dataclass
class TrainConfig:
    """Training settings (all plain values, saved in checkpoints).

    Steps and tokens: the run takes ``steps`` Adam steps of ``batch_size``
    rows, unless ``total_tokens`` is set, which then fixes the step count to
    ``ceil(total_tokens / batch_size)``.

    Schedules (``s`` is the 0-based index of the step being taken):
    the learning rate rises linearly over ``lr_warmup_steps``, stays at
    ``lr`` and falls linearly to zero over the last ``lr_decay_fraction`` of
    the steps; the L1 coefficient rises linearly to ``l1_coefficient`` over
    ``l1_warmup_steps``.

    ``normalize_activations``: scale the inputs by one constant so that the
    mean squared norm of ``x`` is ``d_in`` (April 2024 update); the saved SAE
    has the constant folded in. ``b_dec_init``: ``"mean"``,
    ``"geometric_median"`` or ``"none"`` (fresh models only).

    Dead features: a feature is dead when it fired in no row of the last
    ``dead_window`` to ``2 * dead_window`` steps (two alternating count
    windows). ``resample_every > 0`` re-initializes dead features every that
    many steps until ``resample_until`` (fraction of the run), from the
    inputs the SAE reconstructs worst (2023 paper), using
    ``resample_samples`` random rows.

    TopK/BatchTopK (models built with ``activation="topk"``/``"batchtopk"``;
    ``activation`` and ``k`` here default to the model's and, when given, must
    match it): no L1 term (the L1 fields are ignored), unit-norm decoder rows.
    ``auxk`` adds the AuxK loss (OpenAI 2024): the main reconstruction's error
    is reconstructed from the top ``k_aux`` pre-activations (default: the power
    of two nearest ``d_in / 2``) among latents that have not fired for
    ``dead_tokens`` tokens (default ``min(10_000_000, dead_window *
    batch_size)``), weighted by ``aux_coefficient * min(n_dead / k_aux, 1)``.
    Choose ``dead_tokens`` well above the firing interval of the rarest latent
    worth keeping: AuxK retrains every latent it calls dead on the residual,
    so a window that flags merely rare latents (for example duplicates of a
    feature when ``d_sae`` far exceeds the number of real features) turns them
    into residual fitters and can raise the dead fraction instead.
    BatchTopK keeps a running threshold, ``t <- (1 - topk_threshold_lr) t +
    topk_threshold_lr * min_active`` after every step with an active feature
    (SAELens), which the saved SAE uses at inference (``jumprelu``).

    ``log_every``: metrics cadence (steps). ``checkpoint_every``: checkpoint
    cadence (steps, 0 = only at the end; needs an output directory).
    ``eval_rows``: rows of the final evaluation. ``progress``: tqdm bar
    (``None`` = only when stderr is a terminal).
    """

    steps: int = 3000
    total_tokens: int | None = None
    batch_size: int = 512
    lr: float = 3e-3
    lr_warmup_steps: int = 150
    lr_decay_fraction: float = 0.3
    l1_coefficient: float = 0.3
    l1_warmup_steps: int = 300
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    normalize_activations: bool = True
    b_dec_init: str = "mean"
    dead_window: int = 500
    resample_every: int = 0
    resample_until: float = 0.5
    resample_samples: int = 8192
    log_every: int = 100
    checkpoint_every: int = 0
    eval_rows: int = 16384
    progress: bool | None = None
    activation: str | None = None
    k: int | None = None
    auxk: bool = False
    k_aux: int | None = None
    aux_coefficient: float = 1.0 / 32
    dead_tokens: int | None = None
    topk_threshold_lr: float = 0.01

    @property
    def total_steps(self) -> int:
        if self.total_tokens is not None:
            return max(1, -(-int(self.total_tokens) // int(self.batch_size)))
        return int(self.steps)

    def validate(self) -> "TrainConfig":
        """Raise ``TypeError``/``ValueError`` naming the first bad field."""
        for name in ("steps", "batch_size", "log_every", "dead_window", "resample_samples",
                     "eval_rows"):
            V.as_int(getattr(self, name), name, low=1)
        for name in ("lr_warmup_steps", "l1_warmup_steps", "resample_every", "checkpoint_every",
                     "seed"):
            V.as_int(getattr(self, name), name, low=0)
        if self.total_tokens is not None:
            V.as_int(self.total_tokens, "total_tokens", low=1)
        V.as_scalar(self.lr, "lr", low=0.0, low_inclusive=False)
        V.as_scalar(self.l1_coefficient, "l1_coefficient")
        V.as_scalar(self.beta1, "beta1", high=1.0)
        V.as_scalar(self.beta2, "beta2", high=1.0)
        V.as_scalar(self.eps, "eps", low=0.0, low_inclusive=False)
        V.as_scalar(self.lr_decay_fraction, "lr_decay_fraction")
        if self.lr_decay_fraction > 1:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        V.as_scalar(self.resample_until, "resample_until")
        if self.b_dec_init not in ("mean", "geometric_median", "none"):
            raise ValueError("b_dec_init must be 'mean', 'geometric_median' or 'none', "
                             f"got {self.b_dec_init!r}")
        if not isinstance(self.normalize_activations, bool):
            raise TypeError("normalize_activations must be True or False")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("k", "k_aux", "dead_tokens"):
            if getattr(self, name) is not None:
                V.as_int(getattr(self, name), name, low=1)
        if not isinstance(self.auxk, bool):
            raise TypeError("auxk must be True or False")
        V.as_scalar(self.aux_coefficient, "aux_coefficient")
        V.as_scalar(self.topk_threshold_lr, "topk_threshold_lr", high=1.0)
        return self

    def resolved_dead_tokens(self) -> int:
        """Tokens without firing after which AuxK counts a latent as dead."""
        if self.dead_tokens is not None:
            return int(self.dead_tokens)
        return min(10_000_000, self.dead_window * self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lr_at(self, s: int) -> float:
        """Learning rate of the step with 0-based index ``s``."""
        total = self.total_steps
        f = min(1.0, (s + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        decay = int(round(self.lr_decay_fraction * total))
        if decay > 0 and s >= total - decay:
            f *= (total - s) / decay
        return self.lr * f

    def l1_at(self, s: int) -> float:
        """L1 coefficient of the step with 0-based index ``s``."""
        if self.l1_warmup_steps:
            return self.l1_coefficient * min(1.0, (s + 1) / self.l1_warmup_steps)
        return self.l1_coefficient


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    ``metrics``: final evaluation (``mse``, ``explained_variance``, ``l0``,
    ``dead_fraction``; MSE in training units, i.e. on normalized inputs),
    throughput (``tokens_per_s``, ``wall_s``), ``backend``, ``steps`` and,
    when a true dictionary was given, ``mean_max_cosine`` and ``recovered``.
    ``history``: the logged metric records. ``density``: histogram of
    log10 feature firing frequencies over the last window.
    """

    model: object
    metrics: dict
    history: list = field(default_factory=list)
    density: dict | None = None


# ======================================================== per-model adapters
class _SAEAdapter:
    kind = "sae"

    def __init__(self, trainer, model: SparseAutoencoder, be):
        self.t, self.model, self.be = trainer, model, be
        self.params = None
        self.state = None
        cfg = trainer.config
        self.activation = model.activation
        self.k = model.k
        self.topk = self.activation in ("topk", "batchtopk")
        d_in, d_sae = model.d_in, model.d_sae
        self.k_aux = (int(cfg.k_aux) if cfg.k_aux is not None
                      else 2 ** max(0, int(round(math.log2(max(d_in / 2, 1))))))
        self.k_aux = min(self.k_aux, d_sae)
        self.auxk = self.topk and cfg.auxk and cfg.aux_coefficient > 0
        self.dead_tokens = cfg.resolved_dead_tokens()
        #: tokens since each latent last fired (AuxK's dead mask)
        self.since = np.zeros(d_sae, np.int64)
        #: BatchTopK running threshold (float64 scalar, saved exactly)
        self.threshold = 0.0

    def init_fresh(self, scale, sample):
        m, cfg = self.model, self.t.config
        host = m.params.copy()
        if not getattr(m, "_fresh", False):
            # trained parameters are for raw inputs: move them to the scaled space
            host = _fold(host, 1.0 / scale)
        elif cfg.b_dec_init != "none":
            tmp = m.copy()
            tmp.params = host
            tmp.init_b_dec(sample, cfg.b_dec_init)
        self.params = self.be.to_backend(host)
        self.state = self.be.to_backend(AdamState.zeros_like(host))
        if self.activation == "batchtopk" and m.threshold is not None and not m._fresh:
            self.threshold = float(np.mean(m.threshold, dtype=np.float64))

    def step(self, x, lr, l1c, fire_counts) -> dict:
        if self.topk:
            return self._step_topk(x, lr, fire_counts)
        r = self.be.train_step(self.params, self.state, x, l1_coefficient=l1c, lr=lr,
                               decoder_norm=self.model.decoder_norm,
                               beta1=self.t.config.beta1, beta2=self.t.config.beta2,
                               eps=self.t.config.eps, fire_counts=fire_counts)
        return {"mse": r.mse, "l1": r.l1, "total": r.total, "l0": r.l0,
                "explained_variance": r.explained_variance}

    def _step_topk(self, x, lr, fire_counts) -> dict:
        cfg, be = self.t.config, self.be
        dead_mask, buf = None, fire_counts
        if self.auxk:
            dead_mask = be.to_backend(self.since >= self.dead_tokens)
            # this step's firing counts alone, to know which latents fired
            buf = be.to_backend(np.zeros(self.model.d_sae, np.int64))
        r = be.train_step_topk(self.params, self.state, x, k=self.k, activation=self.activation,
                               lr=lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                               fire_counts=buf, dead_mask=dead_mask,
                               k_aux=self.k_aux if self.auxk else 0,
                               aux_coefficient=cfg.aux_coefficient if self.auxk else 0.0)
        if self.auxk:
            c = np.asarray(be.to_numpy(buf), dtype=np.int64)
            fired = c > 0
            self.since[fired] = 0
            self.since[~fired] += x.shape[0]
            if fire_counts is not None:
                _add_counts(be, fire_counts, c)
        if self.activation == "batchtopk":
            m = float(r.extra.get("min_active", 0.0))
            if m > 0:
                lr_t = cfg.topk_threshold_lr
                self.threshold = (1.0 - lr_t) * self.threshold + lr_t * m
        return {"mse": r.mse, "l1": 0.0, "total": r.total, "l0": r.l0,
                "explained_variance": r.explained_variance, "aux": r.aux}

    def _encode(self, xd, params=None):
        """Inference codes of ``xd`` (on the backend) with the current
        parameters; BatchTopK encodes with its running threshold (JumpReLU)."""
        be, p = self.be, self.params if params is None else params
        if self.activation == "relu":
            return be.encode_relu_sparse(xd, p.W_enc, p.b_enc, p.b_dec)
        thr = np.full(self.model.d_sae, self.threshold, np.float32)
        fn, arg = (("encode_topk", self.k) if self.activation == "topk"
                   else ("encode_jumprelu", thr))
        if be.supports(fn):
            if fn == "encode_jumprelu":
                arg = be.to_backend(arg)
            return getattr(be, fn)(xd, p.W_enc, p.b_enc, p.b_dec, arg)
        h, ref = self.host_params(), get_backend("numpy")
        return getattr(ref, fn)(np.asarray(be.to_numpy(xd)), h.W_enc, h.b_enc, h.b_dec, arg)

    def _reconstruct(self, x):
        be, p = self.be, self.params
        codes = self._encode(be.to_backend(x))
        if isinstance(codes.indptr, np.ndarray) and not isinstance(p.W_dec, np.ndarray):
            codes = SparseCodes(*(be.to_backend(a) for a in (codes.indptr, codes.indices,
                                                              codes.values)), codes.shape)
        x_hat = np.asarray(be.to_numpy(be.decode(codes, p.W_dec, p.b_dec)))
        return codes, x_hat

    def host_params(self) -> SAEParams:
        return _host(self.be.to_numpy(self.params))

    def tensors(self) -> dict:
        p, st = self.host_params(), self.be.to_numpy(self.state)
        out = {}
        for n in SAEParams.NAMES:
            out[f"param.{n}"] = p.as_dict()[n]
            out[f"adam_m.{n}"] = np.asarray(getattr(st.m, n))
            out[f"adam_v.{n}"] = np.asarray(getattr(st.v, n))
        if self.topk:
            out["topk.since"] = self.since.copy()
            out["topk.threshold"] = np.array([self.threshold], np.float64)
        return out

    def adam_step(self) -> int:
        return int(self.state.step)

    def load(self, tensors: dict, adam_step: int):
        def get(prefix):
            return SAEParams(*(np.ascontiguousarray(tensors[f"{prefix}.{n}"], dtype=np.float32)
                               for n in SAEParams.NAMES))
        p = get("param")
        if (p.d_in, p.d_sae) != (self.model.d_in, self.model.d_sae):
            raise SAEFormatError("checkpoint parameters do not match the model's shape")
        self.params = self.be.to_backend(p)
        self.state = self.be.to_backend(AdamState(get("adam_m"), get("adam_v"), int(adam_step)))
        if self.topk:
            if "topk.since" not in tensors or "topk.threshold" not in tensors:
                raise SAEFormatError("the checkpoint lacks the TopK state (topk.since, "
                                     "topk.threshold)")
            self.since = np.array(tensors["topk.since"], dtype=np.int64)
            self.threshold = float(np.asarray(tensors["topk.threshold"])[0])

    def evaluate(self, x) -> dict:
        codes, x_hat = self._reconstruct(x)
        mse = float(np.sum((x_hat.astype(np.float64) - x) ** 2) / x.shape[0])
        from .reference import explained_variance
        return {"mse": mse, "explained_variance": explained_variance(x, mse),
                "l0": codes.to_host().l0}

    def per_row_error(self, x) -> np.ndarray:
        _, x_hat = self._reconstruct(x)
        return np.sum((x_hat.astype(np.float64) - x) ** 2, axis=1)

    def resample(self, dead: np.ndarray, x: np.ndarray, rng) -> int:
        """2023 paper: new decoder directions from poorly reconstructed inputs."""
        idx = np.flatnonzero(dead)
        if idx.size == 0:
            return 0
        err = self.per_row_error(x)
        w = err * err  # probability proportional to the square of the loss
        if not np.isfinite(w).all() or w.sum() <= 0:
            w = np.ones_like(w)
        pick = rng.choice(x.shape[0], size=idx.size, replace=idx.size > x.shape[0],
                          p=w / w.sum())
        host = self.be.to_numpy(self.params)
        st = self.be.to_numpy(self.state)
        W_enc, b_enc, W_dec, b_dec = (np.asarray(a) for a in host.arrays())
        v = x[pick].astype(np.float64) - b_dec
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        alive = ~dead
        enc_norm = np.linalg.norm(W_enc[:, alive], axis=0).mean() if alive.any() else 0.1
        if self.model.decoder_norm == "unit_norm":
            dec_norm = 1.0
        else:
            dec_norm = np.linalg.norm(W_dec[alive], axis=1).mean() if alive.any() else 0.1
        W_dec[idx] = (v * dec_norm).astype(np.float32)
        W_enc[:, idx] = (v.T * 0.2 * enc_norm).astype(np.float32)
        b_enc[idx] = 0.0
        for mom in (st.m, st.v):  # reset Adam for every modified weight and bias
            np.asarray(mom.W_enc)[:, idx] = 0.0
            np.asarray(mom.b_enc)[idx] = 0.0
            np.asarray(mom.W_dec)[idx] = 0.0
        self.params = self.be.to_backend(SAEParams(W_enc, b_enc, W_dec, b_dec))
        self.state = self.be.to_backend(st)
        return int(idx.size)

    def export(self, scale) -> None:
        # the fold keeps pre-activations unchanged, so the threshold carries over
        self.model.params = _fold(self.host_params(), scale)
        self.model._fresh = False
        if self.activation == "batchtopk":
            self.model.threshold = np.full(self.model.d_sae, self.threshold, np.float32)
            d = self.model.metadata.get("training_architecture_details")
            self.model.metadata["training_architecture_details"] = {
                **(d if isinstance(d, dict) else {}),
                "topk_threshold_lr": self.t.config.topk_threshold_lr}

    def model_info(self) -> dict:
        m = self.model
        return {"type": "SparseAutoencoder", "d_in": m.d_in, "d_sae": m.d_sae,
                "decoder_norm": m.decoder_norm, "seed": m.seed,
                "activation": m.activation, "k": m.k}


class _AutoencoderAdapter:
    kind = "autoencoder"

    def __init__(self, trainer, model: Autoencoder, be):
        self.t, self.model, self.be = trainer, model, be
        self.state = None

    def init_fresh(self, scale, sample):
        self.state = self.model.init_optimizer()

    def step(self, x, lr, l1c, fire_counts) -> dict:
        c = self.t.config
        r = self.model.train_step(np.asarray(self.be.to_numpy(x)), self.state, lr=lr,
                                  beta1=c.beta1, beta2=c.beta2, eps=c.eps)
        return {"mse": r["mse"], "l1": 0.0, "total": r["mse"], "l0": float("nan"),
                "explained_variance": r["explained_variance"]}

    def tensors(self) -> dict:
        out = {f"param.{k}": v for k, v in self.model.arrays().items()}
        out.update({f"adam_m.{k}": v for k, v in self.state["m"].items()})
        out.update({f"adam_v.{k}": v for k, v in self.state["v"].items()})
        return out

    def adam_step(self) -> int:
        return int(self.state["step"])

    def load(self, tensors, adam_step):
        self.state = self.model.init_optimizer()
        for k, v in self.model.arrays().items():
            v[...] = tensors[f"param.{k}"]
            self.state["m"][k][...] = tensors[f"adam_m.{k}"]
            self.state["v"][k][...] = tensors[f"adam_v.{k}"]
        self.state["step"] = int(adam_step)

    def evaluate(self, x) -> dict:
        from .reference import explained_variance
        y = self.model.forward(x)
        mse = float(np.sum((y.astype(np.float64) - x) ** 2) / x.shape[0])
        return {"mse": mse, "explained_variance": explained_variance(x, mse)}

    def export(self, scale) -> None:
        # ReLU is positively homogeneous: a net trained on s*x, with outputs
        # divided by s, equals the same weights with every bias divided by s.
        if scale != 1.0:
            for b in self.model.biases:
                b[...] = (b.astype(np.float64) / scale).astype(np.float32)

    def model_info(self) -> dict:
        m = self.model
        return {"type": "Autoencoder", "layer_sizes": m.layer_sizes,
                "output_relu": m.output_relu, "seed": m.seed}


def _add_counts(be, fire_counts, counts: np.ndarray) -> None:
    """``fire_counts += counts`` where ``fire_counts`` lives on the backend."""
    host = be.to_numpy(fire_counts)
    if isinstance(fire_counts, np.ndarray) and host is fire_counts:
        fire_counts += counts
    else:  # a device array: write the sum back
        fire_counts.copy_to_device(np.asarray(host, dtype=np.int64) + counts)


def _host(p: SAEParams) -> SAEParams:
    return SAEParams(*(np.ascontiguousarray(np.asarray(a), dtype=np.float32)
                       for a in p.arrays()))


def _fold(p: SAEParams, s: float) -> SAEParams:
    """Parameters for inputs ``x`` from parameters trained on ``s * x``.

    ``pre = (s x - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc`` and
    ``x_hat = (f W_dec + b_dec) / s``: scale ``W_enc`` by ``s``, divide
    ``W_dec`` and ``b_dec`` by ``s`` (as SAELens's
    ``fold_activation_norm_scaling_factor``).
    """
    s64 = np.float64(s)
    return SAEParams((p.W_enc.astype(np.float64) * s64).astype(np.float32),
                     p.b_enc.astype(np.float32).copy(),
                     (p.W_dec.astype(np.float64) / s64).astype(np.float32),
                     (p.b_dec.astype(np.float64) / s64).astype(np.float32))


# ================================================================== trainer
class Trainer:
    """Train a model on a data source.

    Parameters
    ----------
    model : SparseAutoencoder or Autoencoder
    data : array, ``.npy`` path, shard directory or :class:`fastsae.data.DataSource`
    config : TrainConfig, optional
    out_dir : path, optional
        Checkpoints, metrics log, final SAE and summary go here.
    true_dictionary : array ``[n_features, d_in]``, optional
        Report ground-truth recovery against it.
    backend : str or Backend, optional
        Defaults to the model's backend.
    extra_state : dict, optional
        JSON-able information stored in checkpoints (e.g. how to rebuild the data).
    """

    def __init__(self, model, data, config: TrainConfig | None = None, *, out_dir=None,
                 true_dictionary=None, backend=None, extra_state: dict | None = None):
        self.config = (config or TrainConfig()).validate()
        self.model = model
        self.source = open_source(data)
        if not isinstance(model, (SparseAutoencoder, Autoencoder)):
            raise TypeError(f"model must be a SparseAutoencoder or an Autoencoder, "
                            f"got {type(model).__name__}")
        if isinstance(model, SparseAutoencoder):
            if model.activation is None:
                raise ValueError(f"fastsae cannot train this {model.architecture!r} SAE (it "
                                 f"trains activations {', '.join(ACTIVATIONS)}; a jumprelu SAE "
                                 "is trainable only when saved from a BatchTopK run)")
            c = self.config
            if c.activation is not None and c.activation != model.activation:
                raise ValueError(f"TrainConfig.activation={c.activation!r} but the model's "
                                 f"activation is {model.activation!r}")
            if c.k is not None and c.k != model.k:
                raise ValueError(f"TrainConfig.k={c.k} but the model's k is {model.k}")
        if self.source.d_in != model.d_in:
            raise ValueError(f"the data have d_in = {self.source.d_in} but the model expects "
                             f"d_in = {model.d_in}")
        self.be = get_backend(backend) if backend is not None else model.backend
        if (getattr(model, "activation", "relu") in ("topk", "batchtopk")
                and not self.be.supports("train_step_topk")):
            # TopK kernels are not on every backend yet: train on the reference
            warnings.warn(f"backend {self.be.name!r} has no train_step_topk yet; training "
                          "this TopK SAE on the numpy backend", RuntimeWarning, stacklevel=2)
            self.be = get_backend("numpy")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.true_dictionary = None
        if true_dictionary is not None:
            td = np.asarray(true_dictionary, dtype=np.float32)
            if td.ndim != 2 or td.shape[1] != model.d_in:
                raise ValueError(f"true_dictionary must be [n_features, {model.d_in}], "
                                 f"got shape {td.shape}")
            self.true_dictionary = td
        self.extra_state = dict(extra_state or {})
        adapter_cls = _SAEAdapter if isinstance(model, SparseAutoencoder) else _AutoencoderAdapter
        self._a = adapter_cls(self, model, self.be)
        self.step = 0
        self.history: list[dict] = []
        self._initialized = False
        self.last_checkpoint_step = None

    # ------------------------------------------------------------ setup
    def _setup_fresh(self):
        cfg = self.config
        self.scale = norm_scaling_factor(self.source, seed=cfg.seed) \
            if cfg.normalize_activations else 1.0
        sample = None
        if isinstance(self.model, SparseAutoencoder) and getattr(self.model, "_fresh", False) \
                and cfg.b_dec_init != "none":
            sample = sample_rows(self.source, 65536, cfg.seed) * np.float32(self.scale)
            if not np.isfinite(sample).all():
                raise ValueError("the data contain NaN or infinite values")
        self._a.init_fresh(self.scale, sample)
        self.stream = BatchStream(self.source, cfg.batch_size, seed=cfg.seed, scale=self.scale)
        self.rng = np.random.default_rng([cfg.seed, 0x7E5A])
        d_sae = getattr(self.model, "d_sae", 1)
        self._fire_cur = self.be.to_backend(np.zeros(d_sae, np.int64)) \
            if self._a.kind == "sae" else None
        self._fire_prev = np.zeros(d_sae, np.int64)
        self._cur_steps = 0
        self._prev_steps = 0
        self._acc = {}
        self._initialized = True

    # ------------------------------------------------------------ windows
    def _fire_host(self) -> tuple[np.ndarray, int]:
        """Firing counts over the current + previous window, and their steps."""
        if self._fire_cur is None:
            return self._fire_prev.copy(), self._prev_steps + self._cur_steps
        cur = np.asarray(self.be.to_numpy(self._fire_cur), dtype=np.int64)
        return cur + self._fire_prev, self._prev_steps + self._cur_steps

    def _roll_window(self):
        self._fire_prev = np.array(self.be.to_numpy(self._fire_cur), dtype=np.int64)
        self._prev_steps = self._cur_steps
        self._fire_cur = self.be.to_backend(np.zeros_like(self._fire_prev))
        self._cur_steps = 0

    def dead_fraction(self) -> float:
        """Fraction of features that fired in none of the window's rows."""
        if self._a.kind != "sae":
            return float("nan")
        counts, steps = self._fire_host()
        if steps == 0:
            return float("nan")
        return float(np.mean(counts == 0))

    def feature_density(self) -> dict:
        """Histogram of log10 firing frequency over the window (SAE only)."""
        counts, steps = self._fire_host()
        rows = steps * self.config.batch_size
        if self._a.kind != "sae" or rows == 0:
            return None
        freq = counts / rows
        alive = freq > 0
        lo = math.floor(math.log10(1.0 / rows) * 4) / 4
        edges = np.arange(lo, 0.25 + 1e-9, 0.25)
        hist, edges = np.histogram(np.log10(freq[alive]), bins=edges)
        return {"bin_edges": edges.tolist(), "counts": hist.tolist(),
                "dead": int((~alive).sum()), "rows": int(rows),
                "log10_frequency": np.where(alive, np.log10(np.where(alive, freq, 1)),
                                            -np.inf).tolist()}

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_FILENAME

    def _run_state(self) -> dict:
        from . import __version__
        return {
            "format": _CHECKPOINT_FORMAT, "fastsae_version": __version__,
            "kind": self._a.kind, "step": int(self.step), "adam_step": self._a.adam_step(),
            "scale": float(self.scale), "stream": self.stream.state_dict(),
            "rng": self.rng.bit_generator.state, "config": self.config.to_dict(),
            "model": self._a.model_info(), "backend": self.be.name,
            "window": {"cur_steps": self._cur_steps, "prev_steps": self._prev_steps},
            "acc": self._acc, "data": _source_location(self.source),
            "data_rows": self.source.n_rows, "extra": self.extra_state,
        }

    def save_checkpoint(self, path=None) -> Path:
        """Write the full training state atomically (default: out_dir's checkpoint)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: give out_dir to the Trainer")
        tensors = self._a.tensors()
        if self._a.kind == "sae":
            tensors["fire.cur"] = np.asarray(self.be.to_numpy(self._fire_cur), dtype=np.int64)
            tensors["fire.prev"] = self._fire_prev
        state = self._run_state()
        save_tensors(path, tensors, {"fastsae": json.dumps(state)})
        atomic_write_json(path.with_suffix(".json"), state)
        self.last_checkpoint_step = self.step
        return path

    @staticmethod
    def read_checkpoint(path) -> tuple[dict, dict]:
        """``(tensors, run_state)`` of a checkpoint file or output directory."""
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        tensors, meta = load_tensors(path)
        try:
            state = json.loads(meta["fastsae"])
            ok = state.get("format") == _CHECKPOINT_FORMAT
        except (KeyError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise SAEFormatError(f"{path} is not a fastsae training checkpoint")
        return tensors, state

    @classmethod
    def resume(cls, path, data=None, *, true_dictionary=None, backend=None, out_dir=None,
               progress=None) -> "Trainer":
        """A trainer that continues the run saved at ``path`` (a checkpoint or
        an output directory). ``data`` defaults to the saved data path; the
        model is rebuilt from the checkpoint."""
        tensors, st = cls.read_checkpoint(path)
        info = st["model"]
        if info["type"] == "SparseAutoencoder":
            act = info.get("activation", "relu")
            model = SparseAutoencoder(info["d_in"], info["d_sae"],
                                      decoder_norm=info["decoder_norm"], backend=backend,
                                      seed=info["seed"], activation=act,
                                      k=info.get("k") if act != "relu" else None)
        else:
            model = Autoencoder(info["layer_sizes"], info["output_relu"], backend=backend,
                                seed=info["seed"])
        model._fresh = False
        if data is None:
            data = st["data"]
            if not Path(str(data)).exists():
                raise ValueError(f"the checkpoint's data ({data}) cannot be reopened: "
                                 "pass the data explicitly")
        config = TrainConfig.from_dict(st["config"])
        if progress is not None:
            config.progress = progress
        p = Path(path)
        if out_dir is None:
            out_dir = p if p.is_dir() else p.parent
        t = cls(model, data, config, out_dir=out_dir, true_dictionary=true_dictionary,
                backend=backend, extra_state=st.get("extra"))
        t._restore(tensors, st)
        return t

    def _restore(self, tensors, st):
        self.scale = float(st["scale"])
        self._a.load(tensors, st["adam_step"])
        self.stream = BatchStream(self.source, self.config.batch_size, seed=self.config.seed,
                                  scale=self.scale)
        self.stream.load_state_dict(st["stream"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = st["rng"]
        self.step = int(st["step"])
        w = st["window"]
        self._cur_steps, self._prev_steps = int(w["cur_steps"]), int(w["prev_steps"])
        if self._a.kind == "sae":
            self._fire_cur = self.be.to_backend(np.array(tensors["fire.cur"], dtype=np.int64))
            self._fire_prev = np.array(tensors["fire.prev"], dtype=np.int64)
        else:
            self._fire_cur, self._fire_prev = None, np.zeros(1, np.int64)
        self._acc = dict(st.get("acc") or {})
        self.last_checkpoint_step = self.step
        self._initialized = True
        # keep the metrics log consistent with the checkpoint
        log = self._log_path()
        if log is not None and log.exists():
            kept = []
            for line in log.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
                except ValueError:
                    pass
            atomic_write_bytes(log, ("\n".join(kept) + "\n").encode() if kept else b"")
            self.history = [json.loads(x) for x in kept]

    # ------------------------------------------------------------ logging
    def _log_path(self):
        return None if self.out_dir is None else self.out_dir / "metrics.jsonl"

    def _log(self, record: dict):
        self.history.append(record)
        path = self._log_path()
        if path is not None:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _flush_metrics(self, t_start, step0):
        acc, n = self._acc, self._acc.get("n", 0)
        if n == 0:
            return None
        rec = {"step": self.step, "tokens": self.step * self.config.batch_size}
        keys = ("mse", "l1", "total", "l0", "explained_variance")
        if getattr(self._a, "auxk", False):
            keys += ("aux",)
        for k in keys:
            v = acc.get(k, 0.0) / n
            rec[k] = None if not math.isfinite(v) else v
        rec["dead_fraction"] = _none_if_nan(self.dead_fraction())
        rec["lr"] = self.config.lr_at(self.step - 1)
        rec["l1_coefficient"] = self.config.l1_at(self.step - 1)
        if self.true_dictionary is not None and self._a.kind == "sae":
            r = recovery(self._a.host_params().W_dec, self.true_dictionary)
            rec["mean_max_cosine"], rec["recovered"] = r["mean_max_cosine"], r["recovered"]
        el = time.perf_counter() - t_start
        rec["elapsed_s"] = el
        rec["tokens_per_s"] = (self.step - step0) * self.config.batch_size / el if el > 0 else None
        self._acc = {}
        self._log(rec)
        return rec

    # ------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Run (or continue) training to ``config.total_steps``; returns a
        :class:`TrainResult` and leaves the trained parameters in the model
        (folded to raw inputs)."""
        cfg = self.config
        if not self._initialized:
            self._setup_fresh()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        total = cfg.total_steps
        show = sys.stderr.isatty() if cfg.progress is None else bool(cfg.progress)
        bar = None
        if show:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"fastsae[{self.be.name}]",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        step0, t0 = self.step, time.perf_counter()
        resample_stop = int(cfg.resample_until * total)
        try:
            while self.step < total:
                s = self.step
                x = self.stream.next_batch()
                if not np.isfinite(x).all():
                    bad = np.argwhere(~np.isfinite(x))[0]
                    raise ValueError(f"the data contain NaN or infinite values (batch of step "
                                     f"{s + 1}, row {bad[0]} column {bad[1]} of the batch)")
                lr, l1c = cfg.lr_at(s), cfg.l1_at(s)
                r = self._a.step(self.be.to_backend(x), lr, l1c, self._fire_cur)
                if not math.isfinite(r["total"]):
                    where = (f"; the last good checkpoint is {self.checkpoint_path} (step "
                             f"{self.last_checkpoint_step})" if self.last_checkpoint_step
                             is not None else "; no checkpoint was written")
                    raise TrainingDiverged(
                        f"training diverged: the loss is {r['total']} at step {s + 1} "
                        f"(lr={lr:.3g}, l1_coefficient={l1c:.3g}){where}")
                self.step = s + 1
                self._acc["n"] = self._acc.get("n", 0) + 1
                for k in ("mse", "l1", "total", "l0", "explained_variance", "aux"):
                    self._acc[k] = self._acc.get(k, 0.0) + float(r.get(k, 0.0))
                if self._a.kind == "sae":
                    self._cur_steps += 1
                    if self._cur_steps >= cfg.dead_window:
                        self._roll_window()
                    if (cfg.resample_every and self.step % cfg.resample_every == 0
                            and self.step <= resample_stop
                            and self._prev_steps + self._cur_steps >= cfg.dead_window):
                        self._resample()
                if self.step % cfg.log_every == 0 or self.step == total:
                    rec = self._flush_metrics(t0, step0)
                    if bar is not None and rec is not None:
                        bar.set_postfix(mse=f"{rec['mse']:.4g}", l0=f"{rec['l0']:.3g}"
                                        if rec["l0"] is not None else "-", refresh=False)
                if (cfg.checkpoint_every and self.out_dir is not None
                        and self.step % cfg.checkpoint_every == 0 and self.step < total):
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.be.synchronize()
        wall = time.perf_counter() - t0
        return self._finish(wall, step0)

    def _resample(self):
        cfg = self.config
        counts, _ = self._fire_host()
        dead = counts == 0
        if not dead.any():
            return
        rows = self.rng.choice(self.source.n_rows, size=min(cfg.resample_samples,
                                                            self.source.n_rows), replace=False)
        x = self.source.take(np.sort(rows)) * np.float32(self.scale)
        n = self._a.resample(dead, x, self.rng)
        # start a fresh window so resampled features get a chance to fire
        self._fire_cur = self.be.to_backend(np.zeros_like(self._fire_prev))
        self._fire_prev = np.zeros_like(self._fire_prev)
        self._cur_steps = self._prev_steps = 0
        self._log({"step": self.step, "event": "resample", "resampled": n})

    def _finish(self, wall, step0) -> TrainResult:
        cfg = self.config
        x = sample_rows(self.source, cfg.eval_rows, cfg.seed + 1) * np.float32(self.scale)
        metrics = self._a.evaluate(x)
        metrics["dead_fraction"] = _none_if_nan(self.dead_fraction())
        if self.true_dictionary is not None and self._a.kind == "sae":
            r = recovery(self._a.host_params().W_dec, self.true_dictionary)
            metrics["mean_max_cosine"], metrics["recovered"] = (r["mean_max_cosine"],
                                                                r["recovered"])
        trained = (self.step - step0) * cfg.batch_size
        metrics.update({"steps": self.step, "tokens": self.step * cfg.batch_size,
                        "wall_s": wall, "tokens_per_s": trained / wall if wall > 0 else None,
                        "backend": self.be.name, "scale": self.scale})
        density = self.feature_density() if self._a.kind == "sae" else None
        if self.out_dir is not None:
            self.save_checkpoint()
        self._a.export(self.scale)
        if self.out_dir is not None:
            if self._a.kind == "sae":
                self.model.save(self.out_dir / "sae", metadata={
                    "fastsae_training_steps": self.step,
                    "fastsae_activation_scale_folded": self.scale})
            summary = {"metrics": metrics}
            if density is not None:
                summary["density"] = {k: v for k, v in density.items()
                                      if k != "log10_frequency"}
            atomic_write_json(self.out_dir / "summary.json", summary)
        return TrainResult(self.model, metrics, list(self.history), density)


def _source_location(source) -> str:
    """An absolute path for file-backed sources (so a resume from another
    working directory can reopen them), else the source's description."""
    for attr in ("path", "directory"):
        p = getattr(source, attr, None)
        if p is not None:
            return str(Path(p).resolve())
    return source.description


def _none_if_nan(v):
    return None if v is None or not math.isfinite(v) else v
