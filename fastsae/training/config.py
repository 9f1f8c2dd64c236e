"""Training configuration: every training default and derived setting.

:class:`TrainConfig` holds plain values only (it is saved in checkpoints as a
JSON object) and is the one place where training policy lives: defaults,
schedules, warm-up rules and the values derived from them (the warm-up
lengths of ``None`` fields, AuxK's dead window and ``k_aux``, when
resampling stops). The loop (:mod:`fastsae.training.loop`) and the command
line (:mod:`fastsae.cli`) only read it; the CLI maps its flags onto these
fields and adds no rules of its own.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from ..backends import validate as V
from ..model import ACTIVATIONS, TOPK_ACTIVATIONS
from ..params import JUMPRELU_SPARSITY_MODES, JumpReLUSparsity

__all__ = ["TrainConfig", "LR_WARMUP_CAP", "L1_WARMUP_CAP", "PRECISIONS", "BF16_ACTIVATIONS"]

#: ``TrainConfig.precision`` values.
PRECISIONS = ("auto", "fp32", "bf16")
#: Activations whose training steps run with ``precision="bf16"``.
BF16_ACTIVATIONS = ("relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu")

#: Longest automatic learning-rate warm-up (steps), reached by runs of
#: 1500 steps or more.
LR_WARMUP_CAP = 150
#: Longest automatic L1 warm-up (steps), reached by runs of 3000 steps or more.
L1_WARMUP_CAP = 300


def _auto_warmup(cap: int, total_steps: int) -> int:
    """``min(cap, max(1, total_steps // 10))``: the warm-up stays inside the
    first tenth of a short run."""
    return min(cap, max(1, total_steps // 10))


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
    ``l1_warmup_steps``. A warm-up of ``None`` (the default) is
    ``min(150, max(1, total_steps // 10))`` steps for the learning rate and
    ``min(300, max(1, total_steps // 10))`` for L1, so a short run keeps its
    warm-ups inside its first tenth; ``0`` means no warm-up.

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

    TopK/BatchTopK (models built with ``activation="topk"``/``"batchtopk"``
    or ``"matryoshka_batchtopk"``, whose prefix widths are the model's;
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

    JumpReLU (``activation="jumprelu"``; names and defaults as SAELens 6.54's
    ``JumpReLUTrainingSAEConfig``, step sparsity mode): no L1 term, unit-norm
    decoder rows, thresholds ``exp(log_threshold)`` learned by Adam at the
    run's learning rate from the rectangle-kernel pseudo-gradient of
    bandwidth ``jumprelu_bandwidth``; the loss adds ``l0_coefficient * L0``
    (L0 per row, averaged over the batch), the coefficient rising linearly
    over ``l0_warm_up_steps`` (0: none). A fresh SAE starts with every
    threshold at ``jumprelu_init_threshold``. Thresholds and bandwidth are in
    the units of the (normalized) training inputs' pre-activations. The
    defaults are SAELens's except ``jumprelu_init_threshold`` (SAELens: 0.01,
    for inputs it does not normalize): with fastsae's normalized inputs a
    fresh SAE's pre-activations are about 0.1, and starting the thresholds
    there took the built-in synthetic problem from 15% to 99% of its true
    features recovered in 1000 steps (``benchmarks/jumprelu_defaults.py``).

    JumpReLU's sparsity penalty (SAELens 6.54's names and meanings; see
    :class:`fastsae.JumpReLUSparsity`): ``jumprelu_sparsity_loss_mode``
    ``"step"`` (the L0 above), ``"tanh"`` (Anthropic's ``l0_coefficient *
    sum_j tanh(jumprelu_tanh_scale * f_j)``) or ``"quadratic"`` (Gemma Scope
    2's ``l0_coefficient * 2 / target_l0 * (L0 - target_l0)**2`` per row);
    ``None`` is ``"step"``. ``pre_act_loss_coefficient`` (``None``: off; Anthropic used
    3e-6) adds ``mean_i sum_j dead_j * relu(theta_j - pre_ij)`` over the
    latents that fired in none of the last ``dead_tokens`` tokens, pulling
    them back toward their thresholds.

    ``target_l0``: for ReLU, instead of a fixed L1 coefficient, a controller
    (:mod:`fastsae.training.controller`) multiplies the scheduled
    ``l1_coefficient`` (with its warm-up) by a factor it adjusts after every
    step from the batch's L0, so that the run ends near that L0;
    ``target_l0_gain`` is its integral gain per step. The configured
    coefficient then only sets the starting point. For JumpReLU it is the
    centre of the ``"quadratic"`` mode's penalty and needs that mode: a
    penalty, not a controller, and on the built-in synthetic problem it does
    not bring L0 to the target (``benchmarks/target_l0.py``: the
    thresholds, learned as ``log(threshold)`` by Adam, travel too slowly).
    TopK and BatchTopK set their L0 with ``k``.

    ``precision``: the encoder product of the training steps. ``"fp32"``;
    ``"bf16"`` (bfloat16 operands select the codes, whose values and every
    other product stay float32; see :mod:`fastsae.backends.bf16`), for relu,
    topk, batchtopk, matryoshka_batchtopk and jumprelu SAEs (JumpReLU in its
    default "step" sparsity mode, no pre-activation loss) and transcoders in
    one process on the CPU backends; or
    ``"auto"`` (the default): ``"bf16"`` where that runs on this CPU's
    bfloat16 instructions (AVX512-BF16) on the numba or cython backend, else
    ``"fp32"`` (:meth:`resolve_precision`). The run records the precision and
    path it used; a resumed run keeps its precision.

    ``log_every``: metrics cadence (steps). ``checkpoint_every``: checkpoint
    cadence (steps, 0 = only at the end; needs an output directory).
    ``eval_rows``: rows of the final evaluation. ``progress``: tqdm bar
    (``None`` = only when stderr is a terminal).
    """

    steps: int = 3000
    total_tokens: int | None = None
    batch_size: int = 512
    lr: float = 3e-3
    lr_warmup_steps: int | None = None
    lr_decay_fraction: float = 0.3
    l1_coefficient: float = 0.3
    l1_warmup_steps: int | None = None
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
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.1
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str | None = None
    jumprelu_tanh_scale: float = 4.0
    pre_act_loss_coefficient: float | None = None
    target_l0: float | None = None
    target_l0_gain: float = 0.02
    precision: str = "auto"

    # ------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Raise ``TypeError``/``ValueError`` naming the first bad field."""
        for name in ("steps", "batch_size", "log_every", "dead_window", "resample_samples",
                     "eval_rows"):
            V.as_int(getattr(self, name), name, low=1)
        for name in ("resample_every", "checkpoint_every", "seed"):
            V.as_int(getattr(self, name), name, low=0)
        for name in ("lr_warmup_steps", "l1_warmup_steps"):
            if getattr(self, name) is not None:
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
        V.as_scalar(self.l0_coefficient, "l0_coefficient")
        V.as_int(self.l0_warm_up_steps, "l0_warm_up_steps", low=0)
        V.as_scalar(self.jumprelu_init_threshold, "jumprelu_init_threshold", low=0.0,
                    low_inclusive=False)
        V.as_scalar(self.jumprelu_bandwidth, "jumprelu_bandwidth", low=0.0, low_inclusive=False)
        if self.target_l0 is not None:
            V.as_scalar(self.target_l0, "target_l0", low=0.0, low_inclusive=False)
        mode = self.jumprelu_sparsity_loss_mode
        if mode is not None and mode not in JUMPRELU_SPARSITY_MODES:
            raise ValueError(f"jumprelu_sparsity_loss_mode must be one of "
                             f"{JUMPRELU_SPARSITY_MODES} or None, got {mode!r}")
        if mode == "quadratic" and self.target_l0 is None:
            raise ValueError("jumprelu_sparsity_loss_mode='quadratic' needs target_l0 "
                             "(the L0 its penalty is centred on)")
        V.as_scalar(self.jumprelu_tanh_scale, "jumprelu_tanh_scale", low=0.0,
                    low_inclusive=False)
        if self.pre_act_loss_coefficient is not None:
            V.as_scalar(self.pre_act_loss_coefficient, "pre_act_loss_coefficient")
        V.as_scalar(self.target_l0_gain, "target_l0_gain", low=0.0, low_inclusive=False)
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        return self

    def resolve_precision(self, backend, activation, distributed=None) -> tuple:
        """``(precision, path, why)`` of a run on ``backend`` (a Backend) of a
        model with ``activation`` (``None``: not an SAE), in one process
        (``distributed`` None) or not: ``precision`` ``"fp32"`` or
        ``"bf16"``, ``path`` the bf16 path that runs (``None`` for fp32;
        ``"numpy"`` for the reference backend's emulation), ``why`` one line.
        ``precision="bf16"`` where it cannot run raises ``ValueError``
        saying why; ``"auto"`` then gives ``"fp32"``."""
        from ..backends import bf16 as BF

        want = self.precision
        if want == "fp32":
            return "fp32", None, "precision='fp32' was asked for"
        if activation not in BF16_ACTIVATIONS:
            why = (f"precision='bf16' trains {', '.join(BF16_ACTIVATIONS)} SAEs; this "
                   f"model's activation is {activation!r}")
        elif activation == "jumprelu" and not (
                (self.jumprelu_sparsity_loss_mode or "step") == "step"
                and not self.pre_act_loss_coefficient):
            why = ("precision='bf16' trains JumpReLU SAEs in the default sparsity mode "
                   "('step', no pre-activation loss)")
        elif distributed is not None:
            why = "precision='bf16' is not built for distributed training"
        elif getattr(backend, "_device", False) or backend.name == "cuda":
            why = f"the {backend.name} backend computes in float32"
        elif backend.name == "numpy":
            if want == "bf16":
                return "bf16", "numpy", "the numpy backend emulates the bf16 rule (slowly)"
            why = "the numpy backend only emulates bf16 (slowly)"
        else:
            try:
                path = BF.selected_path()
            except (ImportError, RuntimeError, ValueError) as exc:
                why = str(exc)
            else:
                if want == "bf16" or path != "emulated":
                    return "bf16", path, f"the {path} path runs here"
                why = "this CPU has no bfloat16 instructions (the emulated path is slow)"
        if want == "bf16":
            raise ValueError(why)
        return "fp32", None, "auto: " + why

    # ------------------------------------------------------------ derived values
    @property
    def total_steps(self) -> int:
        if self.total_tokens is not None:
            return max(1, -(-int(self.total_tokens) // int(self.batch_size)))
        return int(self.steps)

    def resolved_lr_warmup_steps(self) -> int:
        """Steps of the learning-rate warm-up (``None`` resolved, see the class)."""
        if self.lr_warmup_steps is not None:
            return int(self.lr_warmup_steps)
        return _auto_warmup(LR_WARMUP_CAP, self.total_steps)

    def resolved_l1_warmup_steps(self) -> int:
        """Steps of the L1 warm-up (``None`` resolved, see the class)."""
        if self.l1_warmup_steps is not None:
            return int(self.l1_warmup_steps)
        return _auto_warmup(L1_WARMUP_CAP, self.total_steps)

    def resolved_dead_tokens(self) -> int:
        """Tokens without firing after which AuxK counts a latent as dead."""
        if self.dead_tokens is not None:
            return int(self.dead_tokens)
        return min(10_000_000, self.dead_window * self.batch_size)

    def resolved_k_aux(self, d_in: int, d_sae: int) -> int:
        """AuxK latents per row: ``k_aux``, or the power of two nearest
        ``d_in / 2``; at most ``d_sae``."""
        k_aux = (int(self.k_aux) if self.k_aux is not None
                 else 2 ** max(0, int(round(math.log2(max(d_in / 2, 1))))))
        return min(k_aux, d_sae)

    def auxk_enabled(self, activation: str) -> bool:
        """Whether a model with this activation trains with the AuxK loss."""
        return activation in TOPK_ACTIVATIONS and self.auxk and self.aux_coefficient > 0

    def resample_due(self, step: int) -> bool:
        """Whether dead features are resampled after ``step`` steps (1-based):
        every ``resample_every`` steps up to ``resample_until`` of the run."""
        return bool(self.resample_every and step % self.resample_every == 0
                    and step <= int(self.resample_until * self.total_steps))

    def show_progress(self) -> bool:
        """Whether to draw the progress bar (``None``: when stderr is a terminal)."""
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)

    # ------------------------------------------------------------ schedules
    def lr_at(self, s: int) -> float:
        """Learning rate of the step with 0-based index ``s``."""
        total = self.total_steps
        warmup = self.resolved_lr_warmup_steps()
        f = min(1.0, (s + 1) / warmup) if warmup else 1.0
        decay = int(round(self.lr_decay_fraction * total))
        if decay > 0 and s >= total - decay:
            f *= (total - s) / decay
        return self.lr * f

    def l1_at(self, s: int) -> float:
        """L1 coefficient of the step with 0-based index ``s``."""
        warmup = self.resolved_l1_warmup_steps()
        if warmup:
            return self.l1_coefficient * min(1.0, (s + 1) / warmup)
        return self.l1_coefficient

    def jumprelu_sparsity(self) -> JumpReLUSparsity:
        """The JumpReLU penalty this configuration trains with: the mode
        (``None``: ``"step"``), its scale and target, the pre-activation loss."""
        mode = self.jumprelu_sparsity_loss_mode or "step"
        return JumpReLUSparsity(
            mode, float(self.jumprelu_tanh_scale),
            None if self.target_l0 is None else float(self.target_l0),
            float(self.pre_act_loss_coefficient or 0.0))

    def l0_at(self, s: int) -> float:
        """JumpReLU's L0 coefficient at the step with 0-based index ``s``."""
        w = int(self.l0_warm_up_steps)
        return self.l0_coefficient * min(1.0, (s + 1) / w) if w else self.l0_coefficient

    # ------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` (unknown keys, e.g. from a later
        version, are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
