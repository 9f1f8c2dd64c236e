"""Per-architecture training state behind one small protocol.

The loop (:class:`fastsae.training.Trainer`) knows nothing about what it
trains: it talks to a :class:`TrainingState`, which holds the parameters and
optimizer state on the backend and everything else that evolves with the
architecture. Three implementations:

:class:`SAEState`         ReLU SAE (L1 penalty; ``weighted_l1`` or ``unit_norm``
                          decoder), the backend's fused ``train_step``
:class:`TopKState`        TopK / BatchTopK SAE (``train_step_topk``), adds the
                          AuxK dead-latent counters (``since``) and BatchTopK's
                          running threshold (``threshold``)
:class:`JumpReLUState`    JumpReLU SAE (``train_step_jumprelu``), adds the
                          learned ``log_threshold`` and its Adam moments
:class:`AutoencoderState` the plain :class:`fastsae.Autoencoder` (NumPy
                          backward, no features)

:func:`make_state` picks one for a model; :func:`model_from_info` rebuilds a
model from the ``model_info()`` saved in a checkpoint.

Units: during training the state works on inputs scaled by the run's
``scale`` (see ``TrainConfig.normalize_activations``); :meth:`export` folds
the scale back so the model works on raw inputs.

Transcoders: a batch is the pair ``(x, y)`` (backend arrays, split on the
host by the trainer); host rows given to :meth:`evaluate`,
:meth:`init_fresh` and the like are a :class:`fastsae.data.PairedSource`'s
``[x | y]`` rows, split here (:meth:`SAEState.pair`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from ..autoencoder import Autoencoder
from ..data import split_pairs
from ..backends import bf16 as BF
from ..backends import reference
from ..io import SAEFormatError, fold_decoder_norms
from ..model import TOPK_ACTIVATIONS, SparseAutoencoder
from ..params import AdamState, SAEParams
from ..sparse import SparseCodes
from .config import TrainConfig

__all__ = ["TrainingState", "SAEState", "TopKState", "JumpReLUState", "AutoencoderState",
           "make_state",
           "model_from_info", "fold_params"]


class TrainingState(Protocol):
    """What the training loop needs from an architecture.

    Attributes: ``kind`` (``"sae"`` or ``"autoencoder"``, saved in
    checkpoints), ``model``, ``backend``, ``n_features`` (features
    whose firing is counted, or ``None``: no dead fraction, resampling or
    density) and ``metric_keys`` (the step-result keys averaged into the
    metrics log).
    """

    kind: str
    n_features: int | None
    metric_keys: tuple

    def wants_init_sample(self) -> bool:
        """Whether :meth:`init_fresh` needs a sample of (scaled) data rows."""

    def init_fresh(self, scale: float, sample: np.ndarray | None) -> None:
        """Start from the model's parameters (moved to inputs scaled by
        ``scale``), with zero optimizer state."""

    def step(self, x, lr: float, l1_coefficient: float, fire_counts) -> dict:
        """One optimizer step on the backend batch ``x`` (float32 ``[N, d_in]``)
        with sparsity coefficient ``l1_coefficient`` (JumpReLU: its L0
        coefficient; unused by TopK);
        adds to ``fire_counts`` (int64 ``[n_features]`` on the backend, or
        ``None``). Returns floats ``mse, l1, total, l0, explained_variance``
        (and ``aux`` for AuxK) measured before the update."""

    def adam_step(self) -> int:
        """Optimizer steps taken so far."""

    def tensors(self) -> dict:
        """Host arrays for the checkpoint (see :mod:`fastsae.training.checkpoint`)."""

    def load(self, tensors: dict, adam_step: int) -> None:
        """Restore from :meth:`tensors`' output (raises ``SAEFormatError``)."""

    def evaluate(self, x: np.ndarray) -> dict:
        """``mse``, ``explained_variance`` (and ``l0``) on host rows ``x``."""

    def resample(self, dead: np.ndarray, x: np.ndarray, rng) -> int:
        """Re-initialize the features flagged in ``dead`` from rows ``x``;
        returns how many."""

    def decoder_rows(self) -> np.ndarray | None:
        """Host ``W_dec [n_features, d_in]`` (for ground-truth recovery), or ``None``."""

    def export(self, scale: float) -> None:
        """Write the trained parameters back into the model, for raw inputs."""

    def save_model(self, directory, metadata: dict):
        """Save the exported model (SAELens layout); ``None`` when the model
        has no such format."""

    def model_info(self) -> dict:
        """JSON-able description that :func:`model_from_info` rebuilds the model from."""


def make_state(model, config: TrainConfig, backend) -> TrainingState:
    """The training state for ``model`` (a SparseAutoencoder or an Autoencoder)."""
    if isinstance(model, SparseAutoencoder):
        cls = {"topk": TopKState, "batchtopk": TopKState, "jumprelu": JumpReLUState,
               "matryoshka_batchtopk": MatryoshkaState}.get(model.activation, SAEState)
        return cls(model, config, backend)
    return AutoencoderState(model, config, backend)


def model_from_info(info: dict, backend=None):
    """Rebuild the (untrained) model described by a state's ``model_info()``."""
    if info["type"] == "SparseAutoencoder":
        act = info.get("activation", "relu")
        tc = bool(info.get("transcoder", False))
        return SparseAutoencoder(info["d_in"], info["d_sae"], decoder_norm=info["decoder_norm"],
                                 backend=backend, seed=info["seed"], activation=act,
                                 k=info.get("k") if act in TOPK_ACTIVATIONS else None,
                                 widths=info.get("widths"), transcoder=tc,
                                 d_out=info.get("d_out") if tc else None,
                                 skip=bool(info.get("skip", False)))
    return Autoencoder(info["layer_sizes"], info["output_relu"], backend=backend,
                       seed=info["seed"])


# ================================================================ SAE (ReLU)
class SAEState:
    """A ReLU SAE: parameters and Adam moments on the backend, trained with
    the fused ``train_step`` (L1 penalty with the model's ``decoder_norm``)."""

    kind = "sae"
    metric_keys = ("mse", "l1", "total", "l0", "explained_variance")
    #: The training steps' precision, ``"fp32"`` or ``"bf16"`` (the trainer
    #: sets it from :meth:`TrainConfig.resolve_precision`).
    precision = "fp32"

    def __init__(self, model: SparseAutoencoder, config: TrainConfig, backend):
        self.model, self.config, self.backend = model, config, backend
        self.n_features = model.d_sae
        self.params = None  # SAEParams on the backend
        self.state = None  # AdamState on the backend
        self._zeros_in = None  # a transcoder's input centering, on the backend

    # ------------------------------------------------------------ SAE or transcoder
    def pair(self, x):
        """``(x, y)`` of a batch: ``(x, None)`` for an SAE; a transcoder's
        ``(x, y)`` pair as given, or split from host ``[x | y]`` rows."""
        if isinstance(x, tuple):
            return x
        if not self.model.transcoder:
            return x, None
        return split_pairs(x, self.model.d_in)

    def target(self, x):
        """What the model reconstructs from host rows ``x``: ``x`` itself, or
        a transcoder's target half."""
        xi, y = self.pair(x)
        return xi if y is None else y

    def centering(self):
        """What the encoders subtract from the input (backend array):
        ``b_dec``, or zeros for a transcoder."""
        if not self.model.transcoder:
            return self.params.b_dec
        if self._zeros_in is None:
            self._zeros_in = self.backend.to_backend(np.zeros(self.model.d_in, np.float32))
        return self._zeros_in

    # ------------------------------------------------------------ setup
    def wants_init_sample(self) -> bool:
        return self.model.fresh and self.config.b_dec_init != "none"

    def init_fresh(self, scale, sample):
        m = self.model
        host = m.params.copy()
        if not m.fresh:
            # trained parameters are for raw inputs: move them to the scaled space
            host = fold_params(host, 1.0 / scale)
        elif self.config.b_dec_init != "none":
            tmp = m.copy()
            tmp.params = host
            tmp.init_b_dec(self.target(sample), self.config.b_dec_init)
        self.params = self.backend.to_backend(host)
        self.state = self.backend.to_backend(AdamState.zeros_like(host))

    # ------------------------------------------------------------ training
    def step(self, x, lr, l1_coefficient, fire_counts) -> dict:
        c = self.config
        x, y = self.pair(x)
        r = self.backend.train_step(self.params, self.state, x, l1_coefficient=l1_coefficient,
                                    lr=lr, decoder_norm=self.model.decoder_norm, beta1=c.beta1,
                                    beta2=c.beta2, eps=c.eps, fire_counts=fire_counts, y=y,
                                    precision=self.precision)
        return {"mse": r.mse, "l1": r.l1, "total": r.total, "l0": r.l0,
                "explained_variance": r.explained_variance}

    def adam_step(self) -> int:
        return int(self.state.step)

    # ------------------------------------------------------------ inference
    def encode(self, xd):
        """Inference codes of backend rows ``xd`` with the current parameters."""
        p = self.params
        return self.backend.encode_relu_sparse(xd, p.W_enc, p.b_enc, self.centering())

    def _decode(self, codes, x):
        """The host reconstruction (float64) from backend ``codes`` of host
        inputs ``x``: the decode, plus a skip transcoder's skip term."""
        be, p = self.backend, self.params
        out = np.asarray(be.to_numpy(be.decode(codes, p.W_dec, p.b_dec)), np.float64)
        if self.model.skip:
            out += x.astype(np.float64) @ np.asarray(be.to_numpy(p.W_skip), np.float64).T
        return out

    def _reconstruct(self, x):
        """``(codes, reconstruction, target)`` of host rows ``x``."""
        xi, y = self.pair(x)
        codes = self.encode(self.backend.to_backend(xi))
        return codes, self._decode(codes, xi), (xi if y is None else y)

    def host_params(self) -> SAEParams:
        """The current parameters as float32 host arrays (training units)."""
        return _host(self.backend.to_numpy(self.params))

    def decoder_rows(self) -> np.ndarray:
        return self.host_params().W_dec

    def evaluate(self, x) -> dict:
        codes, x_hat, t = self._reconstruct(x)
        mse = float(np.sum((x_hat - t) ** 2) / t.shape[0])
        return {"mse": mse, "explained_variance": reference.explained_variance(t, mse),
                "l0": codes.to_host().l0}

    def per_row_error(self, x) -> np.ndarray:
        """Squared reconstruction error of each host row of ``x`` (float64)."""
        _, x_hat, t = self._reconstruct(x)
        return np.sum((x_hat - t) ** 2, axis=1)

    # ------------------------------------------------------------ checkpoints
    def tensors(self) -> dict:
        p, st = self.host_params(), self.backend.to_numpy(self.state)
        out = {}
        for n in p.names:
            out[f"param.{n}"] = p.as_dict()[n]
            out[f"adam_m.{n}"] = np.asarray(getattr(st.m, n))
            out[f"adam_v.{n}"] = np.asarray(getattr(st.v, n))
        return out

    def load(self, tensors: dict, adam_step: int):
        names = self.model.params.names

        def get(prefix):
            return SAEParams(*(np.ascontiguousarray(tensors[f"{prefix}.{n}"], dtype=np.float32)
                               for n in names))
        p = get("param")
        m = self.model
        if (p.d_in, p.d_sae, p.d_out) != (m.d_in, m.d_sae, m.d_out):
            raise SAEFormatError("checkpoint parameters do not match the model's shape")
        self.params = self.backend.to_backend(p)
        state = AdamState(get("adam_m"), get("adam_v"), int(adam_step))
        self.state = self.backend.to_backend(state)

    # ------------------------------------------------------------ dead features
    def resample(self, dead: np.ndarray, x: np.ndarray, rng) -> int:
        """2023 paper: new decoder directions from poorly reconstructed inputs."""
        if self.model.transcoder:
            raise ValueError("resampling dead features is not implemented for transcoders "
                             "(its input and output directions differ): set resample_every=0")
        idx = np.flatnonzero(dead)
        if idx.size == 0:
            return 0
        err = self.per_row_error(x)
        w = err * err  # probability proportional to the square of the loss
        if not np.isfinite(w).all() or w.sum() <= 0:
            w = np.ones_like(w)
        pick = rng.choice(x.shape[0], size=idx.size, replace=idx.size > x.shape[0],
                          p=w / w.sum())
        host = self.backend.to_numpy(self.params)
        st = self.backend.to_numpy(self.state)
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
        self.params = self.backend.to_backend(SAEParams(W_enc, b_enc, W_dec, b_dec))
        self.state = self.backend.to_backend(st)
        BF.invalidate_copy(self.state)  # W_enc changed outside a step: the copy is stale
        return int(idx.size)

    # ------------------------------------------------------------ export
    def export(self, scale) -> None:
        self.model.set_params(fold_params(self.host_params(), scale))

    def save_model(self, directory, metadata: dict):
        return self.model.save(directory, metadata=metadata)

    def model_info(self) -> dict:
        m = self.model
        return {"type": "SparseAutoencoder", "d_in": m.d_in, "d_sae": m.d_sae,
                "decoder_norm": m.decoder_norm, "seed": m.seed,
                "activation": m.activation, "k": m.k, "widths": m.widths,
                "transcoder": m.transcoder, "d_out": m.d_out, "skip": m.skip}


# ================================================================ SAE (TopK)
class TopKState(SAEState):
    """A TopK or BatchTopK SAE, trained with ``train_step_topk`` (unit-norm
    decoder rows, no L1 term).

    ``since`` (int64 ``[d_sae]``): tokens since each latent last fired, whose
    ``>= dead_tokens`` entries are AuxK's dead mask. ``threshold`` (float, kept
    in float64 and saved exactly): BatchTopK's running estimate of the
    smallest kept activation, the JumpReLU threshold of the exported SAE.
    """

    def __init__(self, model: SparseAutoencoder, config: TrainConfig, backend):
        super().__init__(model, config, backend)
        self.activation, self.k = model.activation, model.k
        self.k_aux = config.resolved_k_aux(model.d_in, model.d_sae)
        self.auxk = config.auxk_enabled(self.activation)
        self.dead_tokens = config.resolved_dead_tokens()
        if self.auxk:
            self.metric_keys = SAEState.metric_keys + ("aux",)
        self.since = np.zeros(model.d_sae, np.int64)
        self.threshold = 0.0
        #: BatchTopK selection (over the batch) and its running threshold
        self.batch_selection = self.activation in ("batchtopk", "matryoshka_batchtopk")

    def init_fresh(self, scale, sample):
        super().init_fresh(scale, sample)
        m = self.model
        if self.batch_selection and m.threshold is not None and not m.fresh:
            self.threshold = float(np.mean(m.threshold, dtype=np.float64))

    def step(self, x, lr, l1_coefficient, fire_counts) -> dict:
        cfg, be = self.config, self.backend
        dead_mask, buf = None, fire_counts
        if self.auxk:
            dead_mask, buf = _dead_step_inputs(be, self.since, self.dead_tokens)
        r = self._train_step(x, lr, fire_counts=buf, dead_mask=dead_mask,
                             k_aux=self.k_aux if self.auxk else 0,
                             aux_coefficient=cfg.aux_coefficient if self.auxk else 0.0)
        if self.auxk:
            _record_firing(be, self.since, buf, self.pair(x)[0].shape[0], fire_counts)
        if self.batch_selection:
            m = float(r.extra.get("min_active", 0.0))
            if m > 0:
                lr_t = cfg.topk_threshold_lr
                self.threshold = (1.0 - lr_t) * self.threshold + lr_t * m
        return {"mse": r.mse, "l1": 0.0, "total": r.total, "l0": r.l0,
                "explained_variance": r.explained_variance, "aux": r.aux, **self._extra(r)}

    def _train_step(self, x, lr, **auxk):
        c = self.config
        x, y = self.pair(x)
        return self.backend.train_step_topk(self.params, self.state, x, k=self.k,
                                            activation=self.activation, lr=lr, beta1=c.beta1,
                                            beta2=c.beta2, eps=c.eps, y=y, **auxk,
                                            precision=self.precision)

    def _extra(self, r) -> dict:
        """Metrics of a step beyond the TopK ones (none here)."""
        return {}

    def encode(self, xd):
        """TopK codes, or for BatchTopK JumpReLU codes with the running threshold."""
        be, p = self.backend, self.params
        if self.activation == "topk":
            return be.encode_topk(xd, p.W_enc, p.b_enc, self.centering(), self.k)
        thr = be.to_backend(np.full(self.model.d_sae, self.threshold, np.float32))
        return be.encode_jumprelu(xd, p.W_enc, p.b_enc, self.centering(), thr)

    def tensors(self) -> dict:
        out = super().tensors()
        out["topk.since"] = self.since.copy()
        out["topk.threshold"] = np.array([self.threshold], np.float64)
        return out

    def load(self, tensors: dict, adam_step: int):
        super().load(tensors, adam_step)
        if "topk.since" not in tensors or "topk.threshold" not in tensors:
            raise SAEFormatError("the checkpoint lacks the TopK state (topk.since, "
                                 "topk.threshold)")
        self.since = np.array(tensors["topk.since"], dtype=np.int64)
        self.threshold = float(np.asarray(tensors["topk.threshold"])[0])

    def export(self, scale) -> None:
        super().export(scale)
        if self.batch_selection:
            # the fold keeps pre-activations unchanged, so the threshold carries over
            m = self.model
            m.threshold = np.full(m.d_sae, self.threshold, np.float32)
            d = m.metadata.get("training_architecture_details")
            m.metadata["training_architecture_details"] = {
                **(d if isinstance(d, dict) else {}),
                "topk_threshold_lr": self.config.topk_threshold_lr}


# ================================================================ SAE (Matryoshka)
class MatryoshkaState(TopKState):
    """A Matryoshka BatchTopK SAE, trained with ``train_step_matryoshka``
    over the model's prefix ``widths`` (BatchTopK selection, running
    threshold, AuxK and export as :class:`TopKState`). Logs and evaluates
    each prefix's explained variance as ``explained_variance_<width>``."""

    def __init__(self, model: SparseAutoencoder, config: TrainConfig, backend):
        super().__init__(model, config, backend)
        self.widths = list(model.widths)
        self._prefix_keys = tuple(f"explained_variance_{w}" for w in self.widths[:-1])
        self.metric_keys = self.metric_keys + self._prefix_keys

    def _train_step(self, x, lr, **auxk):
        c = self.config
        x, y = self.pair(x)
        return self.backend.train_step_matryoshka(self.params, self.state, x, k=self.k,
                                                  widths=self.widths, lr=lr, beta1=c.beta1,
                                                  beta2=c.beta2, eps=c.eps, y=y, **auxk,
                                                  precision=self.precision)

    def _extra(self, r) -> dict:
        return dict(zip(self._prefix_keys, r.extra["prefix_explained_variance"]))

    def evaluate(self, x) -> dict:
        out = super().evaluate(x)
        be = self.backend
        xi, y = self.pair(x)
        t = xi if y is None else y
        codes = self.encode(be.to_backend(xi)).to_host()
        for w, key in zip(self.widths[:-1], self._prefix_keys):
            c = codes.prefix(w)
            dev = SparseCodes(*(be.to_backend(a) for a in (c.indptr, c.indices, c.values)),
                              c.shape)
            x_hat = self._decode(dev, xi)
            out[key] = reference.explained_variance(t, float(np.sum((x_hat - t) ** 2)
                                                            / t.shape[0]))
        return out


# ================================================================ SAE (JumpReLU)
class JumpReLUState(SAEState):
    """A JumpReLU SAE, trained with ``train_step_jumprelu`` (unit-norm decoder
    rows, L0 penalty; see :class:`TrainConfig`).

    ``log_threshold`` and its Adam moments live on the backend beside the
    parameters and share their Adam step. A fresh SAE starts every threshold
    at ``jumprelu_init_threshold``; a trained one (loaded, e.g. a SAELens or
    Gemma Scope JumpReLU SAE) first has its decoder norms folded into the
    encoder and the thresholds (``W_enc[:, j] * n_j``, ``b_enc[j] * n_j``,
    ``threshold[j] * n_j``, ``W_dec[j] / n_j``: the same function, unit-norm
    rows), as SAELens's ``fold_W_dec_norm`` does.
    """

    metric_keys = ("mse", "l0_loss", "total", "l0", "explained_variance")

    def __init__(self, model: SparseAutoencoder, config: TrainConfig, backend):
        super().__init__(model, config, backend)
        self.log_threshold = self.threshold_m = self.threshold_v = None
        self.sparsity = config.jumprelu_sparsity()
        #: the pre-activation loss acts on latents that fired in none of the
        #: last ``dead_tokens`` tokens (``since``: tokens since each last fired)
        self.pre_act = self.sparsity.pre_act_coefficient > 0
        self.dead_tokens = config.resolved_dead_tokens()
        self.since = np.zeros(model.d_sae, np.int64)
        if self.pre_act:
            self.metric_keys = JumpReLUState.metric_keys + ("aux",)

    def init_fresh(self, scale, sample):
        m, cfg = self.model, self.config
        if m.fresh:
            super().init_fresh(scale, sample)
            theta = np.full(m.d_sae, cfg.jumprelu_init_threshold, np.float64)
        else:
            host = _host(m.params)
            theta = np.asarray(m.threshold, dtype=np.float64)
            if theta.shape != (m.d_sae,) or not np.all(theta > 0):
                raise ValueError("training a JumpReLU SAE needs a positive threshold for every "
                                 "feature (thresholds are learned as log(threshold)); this "
                                 f"SAE has {int(np.sum(~(theta > 0)))} that are not")
            host = fold_params(host, 1.0 / scale)  # to the training inputs' units
            norms = np.linalg.norm(host.W_dec.astype(np.float64), axis=1)
            if not np.all(norms > 0):
                raise ValueError("training a JumpReLU SAE needs nonzero decoder rows; "
                                 f"{int(np.sum(norms <= 0))} rows are zero")
            host = replace(fold_decoder_norms(host, norms), W_skip=host.W_skip)
            theta = theta * norms
            self.params = self.backend.to_backend(host)
            self.state = self.backend.to_backend(AdamState.zeros_like(host))
        self.log_threshold = self.backend.to_backend(np.log(theta).astype(np.float32))
        self.threshold_m = self.backend.to_backend(np.zeros(m.d_sae, np.float32))
        self.threshold_v = self.backend.to_backend(np.zeros(m.d_sae, np.float32))

    def step(self, x, lr, l1_coefficient, fire_counts) -> dict:
        cfg, be = self.config, self.backend
        x, y = self.pair(x)
        dead_mask, buf = None, fire_counts
        if self.pre_act:
            dead_mask, buf = _dead_step_inputs(be, self.since, self.dead_tokens)
        r = be.train_step_jumprelu(
            self.params, self.state, x, log_threshold=self.log_threshold,
            threshold_m=self.threshold_m, threshold_v=self.threshold_v,
            bandwidth=cfg.jumprelu_bandwidth, l0_coefficient=l1_coefficient,
            lr=lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, fire_counts=buf,
            sparsity=None if self.sparsity.is_default else self.sparsity, dead_mask=dead_mask,
            y=y, precision=self.precision)
        if self.pre_act:
            _record_firing(be, self.since, buf, x.shape[0], fire_counts)
        out = {"mse": r.mse, "l0_loss": r.extra["l0_loss"], "total": r.total, "l0": r.l0,
               "explained_variance": r.explained_variance}
        if self.pre_act:
            out["aux"] = r.aux
        return out

    def host_threshold(self) -> np.ndarray:
        """The current thresholds ``exp(log_threshold)`` as a float32 host array."""
        lt = np.asarray(self.backend.to_numpy(self.log_threshold), dtype=np.float32)
        return np.exp(lt)

    def encode(self, xd):
        be, p = self.backend, self.params
        return be.encode_jumprelu(xd, p.W_enc, p.b_enc, self.centering(),
                                  be.to_backend(self.host_threshold()))

    def tensors(self) -> dict:
        out = super().tensors()
        for name in ("log_threshold", "threshold_m", "threshold_v"):
            out[f"jumprelu.{name}"] = np.asarray(self.backend.to_numpy(getattr(self, name)),
                                                 dtype=np.float32)
        if self.pre_act:
            out["jumprelu.since"] = self.since.copy()
        return out

    def load(self, tensors: dict, adam_step: int):
        super().load(tensors, adam_step)
        d = self.model.d_sae
        for name in ("log_threshold", "threshold_m", "threshold_v"):
            a = tensors.get(f"jumprelu.{name}")
            if a is None or np.asarray(a).shape != (d,):
                raise SAEFormatError(f"the checkpoint lacks the JumpReLU state (jumprelu.{name} "
                                     f"of shape ({d},))")
            setattr(self, name, self.backend.to_backend(
                np.ascontiguousarray(a, dtype=np.float32)))
        if self.pre_act:
            a = tensors.get("jumprelu.since")
            if a is None or np.asarray(a).shape != (d,):
                raise SAEFormatError("the checkpoint lacks the JumpReLU dead-latent counters "
                                     f"(jumprelu.since of shape ({d},)) its "
                                     "pre-activation loss needs")
            self.since = np.array(a, dtype=np.int64)

    def resample(self, dead: np.ndarray, x: np.ndarray, rng) -> int:
        n = super().resample(dead, x, rng)
        if n:  # a fresh threshold (and moments) for each re-initialized feature
            idx = np.flatnonzero(dead)
            lt, tm, tv = (np.array(self.backend.to_numpy(a), dtype=np.float32)
                          for a in (self.log_threshold, self.threshold_m, self.threshold_v))
            lt[idx] = np.log(np.float32(self.config.jumprelu_init_threshold))
            self.since[idx] = 0
            tm[idx] = 0.0
            tv[idx] = 0.0
            self.log_threshold, self.threshold_m, self.threshold_v = (
                self.backend.to_backend(a) for a in (lt, tm, tv))
        return n

    def export(self, scale) -> None:
        super().export(scale)
        m, cfg = self.model, self.config
        # the fold keeps pre-activations unchanged, so the thresholds carry over
        m.threshold = self.host_threshold()
        d = m.metadata.get("training_architecture_details")
        m.metadata["training_architecture_details"] = {
            **(d if isinstance(d, dict) else {}),
            "jumprelu_init_threshold": cfg.jumprelu_init_threshold,
            "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
            "jumprelu_sparsity_loss_mode": self.sparsity.mode,
            "l0_coefficient": cfg.l0_coefficient,
            "l0_warm_up_steps": cfg.l0_warm_up_steps,
            "pre_act_loss_coefficient": cfg.pre_act_loss_coefficient,
            "jumprelu_tanh_scale": self.sparsity.tanh_scale,
            "jumprelu_ste_to_input": False,
            "target_l0": self.sparsity.target_l0}


# ================================================================ Autoencoder
class AutoencoderState:
    """The plain :class:`fastsae.Autoencoder`: its own NumPy Adam step on the
    host (the forward pass runs on the backend's kernels); no features."""

    kind = "autoencoder"
    metric_keys = SAEState.metric_keys
    n_features = None

    def __init__(self, model: Autoencoder, config: TrainConfig, backend):
        self.model, self.config, self.backend = model, config, backend
        self.state = None  # the model's optimizer dict

    def wants_init_sample(self) -> bool:
        return False

    def init_fresh(self, scale, sample):
        self.state = self.model.init_optimizer()

    def step(self, x, lr, l1_coefficient, fire_counts) -> dict:
        c = self.config
        r = self.model.train_step(np.asarray(self.backend.to_numpy(x)), self.state, lr=lr,
                                  beta1=c.beta1, beta2=c.beta2, eps=c.eps)
        return {"mse": r["mse"], "l1": 0.0, "total": r["mse"], "l0": float("nan"),
                "explained_variance": r["explained_variance"]}

    def adam_step(self) -> int:
        return int(self.state["step"])

    def tensors(self) -> dict:
        out = {f"param.{k}": v for k, v in self.model.arrays().items()}
        out.update({f"adam_m.{k}": v for k, v in self.state["m"].items()})
        out.update({f"adam_v.{k}": v for k, v in self.state["v"].items()})
        return out

    def load(self, tensors, adam_step):
        self.state = self.model.init_optimizer()
        for k, v in self.model.arrays().items():
            v[...] = tensors[f"param.{k}"]
            self.state["m"][k][...] = tensors[f"adam_m.{k}"]
            self.state["v"][k][...] = tensors[f"adam_v.{k}"]
        self.state["step"] = int(adam_step)

    def evaluate(self, x) -> dict:
        y = self.model.forward(x)
        mse = float(np.sum((y.astype(np.float64) - x) ** 2) / x.shape[0])
        return {"mse": mse, "explained_variance": reference.explained_variance(x, mse)}

    def resample(self, dead, x, rng) -> int:
        return 0  # no features

    def decoder_rows(self):
        return None

    def export(self, scale) -> None:
        # ReLU is positively homogeneous: a net trained on s*x, with outputs
        # divided by s, equals the same weights with every bias divided by s.
        if scale != 1.0:
            for b in self.model.biases:
                b[...] = (b.astype(np.float64) / scale).astype(np.float32)

    def save_model(self, directory, metadata: dict):
        return None  # no SAELens layout for a stacked autoencoder

    def model_info(self) -> dict:
        m = self.model
        return {"type": "Autoencoder", "layer_sizes": m.layer_sizes,
                "output_relu": m.output_relu, "seed": m.seed}


# ================================================================ helpers
def _dead_step_inputs(be, since: np.ndarray, dead_tokens: int):
    """``(dead_mask, buf)`` for a step that needs the dead latents (AuxK,
    JumpReLU's pre-activation loss): the latents idle for ``dead_tokens``
    tokens, and a zeroed count buffer for this step's firing alone."""
    return (be.to_backend(since >= dead_tokens),
            be.to_backend(np.zeros(since.shape[0], np.int64)))


def _record_firing(be, since: np.ndarray, buf, rows: int, fire_counts) -> None:
    """After such a step: reset ``since`` where a latent fired, add ``rows``
    tokens elsewhere, and add the step's counts to the run's ``fire_counts``."""
    c = np.asarray(be.to_numpy(buf), dtype=np.int64)
    fired = c > 0
    since[fired] = 0
    since[~fired] += rows
    if fire_counts is not None:
        _add_counts(be, fire_counts, c)


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


def fold_params(p: SAEParams, s: float) -> SAEParams:
    """Parameters for inputs ``x`` from parameters trained on ``s * x``.

    ``pre = (s x - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc`` and
    ``x_hat = (f W_dec + b_dec) / s``: scale ``W_enc`` by ``s``, divide
    ``W_dec`` and ``b_dec`` by ``s`` (as SAELens's
    ``fold_activation_norm_scaling_factor``). A transcoder's input and target
    are both scaled by ``s`` (the input's factor), so the same fold holds
    and ``W_skip``, which maps ``s x`` to ``s y``, is unchanged.
    """
    s64 = np.float64(s)
    return SAEParams((p.W_enc.astype(np.float64) * s64).astype(np.float32),
                     p.b_enc.astype(np.float32).copy(),
                     (p.W_dec.astype(np.float64) / s64).astype(np.float32),
                     (p.b_dec.astype(np.float64) / s64).astype(np.float32),
                     None if p.W_skip is None else np.array(p.W_skip, np.float32))
