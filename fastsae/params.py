"""Containers shared by every backend: parameters, Adam state, losses.

Layouts follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]`` (each feature's decoder vector is a contiguous row),
``b_dec [d_in]``; float32, C-contiguous. A transcoder (input ``x [N,
d_in]``, target ``y [N, d_out]``) has ``W_dec [d_sae, d_out]``, ``b_dec
[d_out]`` and, for a skip transcoder, ``W_skip [d_out, d_in]`` (SAELens's
``nn.Linear`` layout, applied as ``x @ W_skip.T``). On the CUDA backend the
same containers hold device arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["SAEParams", "AdamState", "Losses", "StepResult", "JumpReLUSparsity",
           "DECODER_NORM_MODES", "JUMPRELU_SPARSITY_MODES"]

#: ``"weighted_l1"``: April 2024 update, L1 term weighted by each feature's
#: decoder norm (gradient flows through the norms too).
#: ``"unit_norm"``: 2023 paper, plain L1, decoder rows kept at unit norm
#: (gradient component parallel to each row removed, rows renormalized after
#: each optimizer step).
DECODER_NORM_MODES = ("weighted_l1", "unit_norm")

#: JumpReLU's sparsity penalties, SAELens 6.54's ``jumprelu_sparsity_loss_mode``:
#: ``"step"`` (DeepMind's L0 through the step's pseudo-derivative),
#: ``"tanh"`` (Anthropic's ``sum_j tanh(tanh_scale * f_j)``), ``"quadratic"``
#: (Gemma Scope 2's ``2 / target_l0 * (L0 - target_l0)**2`` per row).
JUMPRELU_SPARSITY_MODES = ("step", "tanh", "quadratic")


@dataclass
class SAEParams:
    """The SAE parameter arrays (also used for their gradients and Adam
    moments): the four of every SAE, and ``W_skip`` (``None`` unless a skip
    transcoder)."""

    W_enc: object
    b_enc: object
    W_dec: object
    b_dec: object
    W_skip: object = None

    #: The four arrays every SAE and transcoder has.
    NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

    @property
    def names(self) -> tuple:
        """The names of the arrays these parameters hold (``NAMES``, plus
        ``"W_skip"`` when there is one)."""
        return self.NAMES + (("W_skip",) if self.W_skip is not None else ())

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (``d_in`` for an SAE)."""
        return int(self.W_dec.shape[1])

    def arrays(self):
        return [getattr(self, n) for n in self.names]

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in self.names}

    def _like(self, fn) -> "SAEParams":
        return SAEParams(*(fn(getattr(self, n)) for n in self.NAMES),
                         W_skip=None if self.W_skip is None else fn(self.W_skip))

    def copy(self) -> "SAEParams":
        return self._like(lambda a: a.copy())

    @classmethod
    def zeros_like(cls, other: "SAEParams") -> "SAEParams":
        return other._like(lambda a: np.zeros(a.shape, dtype=np.float32))


@dataclass
class AdamState:
    """Adam moments (same shapes as the parameters) and the step counter.

    ``step`` counts completed updates; bias correction uses ``step + 1``
    for the update in progress.
    """

    m: SAEParams
    v: SAEParams
    step: int = 0
    #: Working state of ``precision="bf16"`` training steps (a
    #: :class:`fastsae.backends.bf16.StepCopy`: the bfloat16 copy of
    #: ``W_enc`` the last step's Adam update wrote, and that step's code
    #: density), or ``None``. Not part of the optimizer's state: never
    #: copied or saved, rebuilt (one packing pass) when missing or stale. Set
    #: it to ``None`` after changing ``params.W_enc`` outside a training step.
    bf16: object = field(default=None, repr=False, compare=False)

    @classmethod
    def zeros_like(cls, params: SAEParams) -> "AdamState":
        return cls(SAEParams.zeros_like(params), SAEParams.zeros_like(params), 0)

    def copy(self) -> "AdamState":
        return AdamState(self.m.copy(), self.v.copy(), self.step)


@dataclass
class Losses:
    """Loss parts of one batch (Python floats).

    ``mse``: squared reconstruction error summed over ``d_in`` and averaged
    over the batch rows. ``l1``: ``l1_coefficient`` times the per-row sum of
    ``f_ij * ||W_dec[j]||`` (``weighted_l1``) or of ``f_ij`` (``unit_norm``),
    averaged over the rows. ``total = mse + l1``. For TopK activations there
    is no L1 term; ``aux`` holds the (already weighted) AuxK loss, included in
    ``total``. For JumpReLU, ``l0_loss`` holds the (weighted) L0 term,
    included in ``total``. For Matryoshka SAEs, ``prefix_mse`` holds the
    squared error of each prefix's reconstruction (one per width, the last
    equal to ``mse``), and ``total = sum(prefix_mse) + aux``.
    """

    mse: float
    l1: float
    total: float
    aux: float = 0.0
    l0_loss: float = 0.0
    prefix_mse: tuple = ()


@dataclass(frozen=True)
class JumpReLUSparsity:
    """The form of a JumpReLU step's sparsity penalty (SAELens 6.54's names
    in brackets); ``None`` where a function takes one means ``"step"`` with
    no pre-activation loss, the original JumpReLU.

    ``mode`` (``jumprelu_sparsity_loss_mode``): one of
    :data:`JUMPRELU_SPARSITY_MODES`. ``tanh_scale`` (``jumprelu_tanh_scale``)
    is used by ``"tanh"`` only, ``target_l0`` (``target_l0``) by, and
    required for, ``"quadratic"``. ``pre_act_coefficient``
    (``pre_act_loss_coefficient``, ``0`` for SAELens's ``None``): weight of
    Anthropic's pre-activation loss ``mean_i sum_j dead_j * relu(theta_j -
    pre_ij)``, which pulls dead features' pre-activations up to their
    thresholds; it needs the step's ``dead_mask``. Decoder rows are unit
    norm in fastsae's JumpReLU, so SAELens's ``||W_dec[j]||`` factors are 1.
    """

    mode: str = "step"
    tanh_scale: float = 4.0
    target_l0: float | None = None
    pre_act_coefficient: float = 0.0

    @property
    def is_default(self) -> bool:
        """The original JumpReLU penalty: ``"step"``, no pre-activation loss."""
        return self.mode == "step" and self.pre_act_coefficient == 0.0


@dataclass
class StepResult:
    """What ``train_step`` reports about the batch it trained on (measured on
    the forward pass, before the parameter update)."""

    mse: float
    l1: float
    total: float
    l0: float
    explained_variance: float
    aux: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d
