"""The validating front of the kernel contract: :class:`Backend`.

Each public method validates its arguments once (shapes, dtypes, NaN/inf,
contiguity; see :mod:`fastsae.backends.validate`) and then calls the
backend's function of the same name (declared in
:mod:`fastsae.backends.contract`). Backends trust what the front hands them:
these checks are what keep every compiled kernel inside its arrays.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from ..params import AdamState, Losses, SAEParams, StepResult
from ..sparse import SparseCodes
from . import validate as V
from .numerics import jumprelu_default_mode, loud_loss

__all__ = ["Backend"]


class Backend:
    """The kernel contract, validated, for one backend.

    All arrays are float32 in SAELens layouts: ``x [N, d_in]``,
    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``. float64 (or float16) inputs are converted to float32
    once; non-contiguous inputs are copied to C order. Bad inputs raise
    ``TypeError``/``ValueError`` naming the argument.

    Inputs must be finite (checked; a training step's parameters are not
    scanned, see :meth:`train_step`). Arithmetic is float32: a result past
    float32's range is ``inf``, never wrapped or clamped. Encoders: a
    pre-activation that overflows is ``+inf`` (code ``inf``) or ``-inf``
    (no code); one whose terms overflow with both signs is ``+inf``,
    ``-inf`` or NaN depending on the summation order, which differs between
    BLAS kernels and backends, and a NaN pre-activation never fires (no
    encoder returns a NaN code). Losses above float32's largest value are
    reported as ``inf``.
    """

    def __init__(self, name: str, module):
        self.name = name
        self._m = module
        self._device = bool(module.DEVICE_ARRAYS)

    def __repr__(self) -> str:
        return f"<fastsae backend {self.name!r}>"

    # ------------------------------------------------------------ forward
    def encode_relu(self, x, W_enc, b_enc, b_dec):
        """``relu((x - b_dec) @ W_enc + b_enc)`` -> dense float32 ``[N, d_sae]``."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_relu(*args)

    def encode_relu_sparse(self, x, W_enc, b_enc, b_dec, precision="fp32") -> SparseCodes:
        """Same as :meth:`encode_relu`, returned as canonical :class:`SparseCodes`.

        ``precision="bf16"`` (CPU backends): the encoder product from
        bfloat16-rounded operands selects the entries, whose values are then
        the float32 ones (:mod:`fastsae.backends.bf16`)."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_relu_sparse(*args, precision=self._precision(precision))

    def decode(self, codes, W_dec, b_dec):
        """``codes @ W_dec + b_dec`` -> float32 ``[N, d_out]`` (``d_in`` for
        an SAE); codes dense ``[N, d_sae]`` or :class:`SparseCodes`."""
        W_dec = V.as_float_array(W_dec, "W_dec", 2, self._device)
        b_dec = V.as_float_array(b_dec, "b_dec", 1, self._device)
        d_sae, d_in = W_dec.shape
        V.check_dim("b_dec", b_dec.shape[0], d_in, "length")
        codes = V.codes_arg(codes, d_sae, self._device)
        return self._m.decode(codes, W_dec, b_dec)

    def decoder_column_norms(self, W_dec):
        """L2 norm of each feature's decoder vector (row of ``W_dec``) -> ``[d_sae]``."""
        return self._m.decoder_column_norms(V.as_float_array(W_dec, "W_dec", 2, self._device))

    def l1_subgradient(self, codes, norms, l1_coefficient):
        """``l1_coefficient * norms[j]`` where ``codes[i, j] > 0``, else 0;
        dense in -> dense out, sparse in -> sparse out (same pattern)."""
        norms = V.as_float_array(norms, "norms", 1, self._device)
        codes = V.codes_arg(codes, None, self._device)
        if codes.shape[1] != norms.shape[0]:
            raise ValueError(f"norms has length {norms.shape[0]} but codes have "
                             f"d_sae = {codes.shape[1]} columns")
        c = V.as_scalar(l1_coefficient, "l1_coefficient")
        return self._m.l1_subgradient(codes, norms, c)

    # ------------------------------------------------------------ training
    def _gradient_args(self, x, params, codes, x_hat, y=None):
        """Validate the batch, parameters, codes, reconstruction and target
        (``y``, a transcoder's) that a gradient computation takes, and check
        they agree with each other."""
        params = V.params_arg(params, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        y = V.target_arg(x, y, params, self._device)
        if x_hat is not None:  # None: the step decodes inside (Matryoshka's prefixes)
            x_hat = V.as_float_array(x_hat, "x_hat", 2, self._device)
            want = (x.shape[0], params.d_out)
            if tuple(x_hat.shape) != want:
                raise ValueError(f"x_hat must have shape (N, d_out) = {want}, "
                                 f"got {tuple(x_hat.shape)}")
        codes = V.codes_arg(codes, params.d_sae, self._device)
        if codes.shape[0] != x.shape[0]:
            raise ValueError(f"codes have {codes.shape[0]} rows but x has {x.shape[0]}")
        return x, params, codes, x_hat, y

    @staticmethod
    def _step_writes(params, state, x, fire_counts, dead_mask=None, extra_written=None,
                     y=None):
        """Every array a step updates must be its own: refuse aliasing among
        the parameters, the moments and ``fire_counts``, and with the batch,
        target or mask they read (checked before anything is written)."""
        written = {f"params.{k}": getattr(params, k) for k in params.names}
        for part in ("m", "v"):
            moments = getattr(state, part)
            written.update({f"state.{part}.{k}": getattr(moments, k) for k in params.names})
        if fire_counts is not None:
            written["fire_counts"] = fire_counts
        written.update(extra_written or {})
        read = {"x": x}
        if y is not None:
            read["y"] = y
        if dead_mask is not None:
            read["dead_mask"] = dead_mask
        V.no_aliasing(written, read)

    def gradients(self, x, params: SAEParams, codes, x_hat, l1_coefficient,
                  decoder_norm="weighted_l1", y=None):
        """Loss parts and parameter gradients for one batch.

        ``codes`` must be the encoding of ``x`` under ``params`` (dense or
        sparse) and ``x_hat`` its reconstruction; ``y`` a transcoder's target
        (``None``: an SAE). Returns ``(Losses, SAEParams)``; see
        :mod:`fastsae.reference` for the loss normalization, the
        ``decoder_norm`` modes and transcoders.
        """
        x, params, codes, x_hat, y = self._gradient_args(x, params, codes, x_hat, y)
        c = V.as_scalar(l1_coefficient, "l1_coefficient")
        mode = V.check_decoder_norm(decoder_norm)
        losses, grads = self._m.gradients(x, params, codes, x_hat, c, mode, y)
        return _loud_losses(losses), grads

    def train_step(self, params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
                   decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
                   fire_counts=None, y=None, precision="fp32") -> StepResult:
        """Forward, backward and Adam update on batch ``x``, in place
        (``y``: a transcoder's target, see :mod:`fastsae.reference`).
        ``precision="bf16"`` (CPU backends): the encoder's support from the
        bfloat16 product (:meth:`encode_relu_sparse`), from a copy of
        ``W_enc`` kept in ``state.bf16`` (see :mod:`fastsae.backends.bf16`).

        ``params`` and ``state`` (arrays of this backend, see
        :meth:`to_backend`) are updated in place. ``fire_counts`` (int64
        ``[d_sae]``, optional) is incremented by how many rows each feature
        fired in. Returns the batch's losses, L0 and explained variance.

        All or nothing: every array the step writes is checked first
        (C-contiguous float32 of the right shape, writeable, sharing memory
        with no other argument); a step that raises has changed nothing.
        Finite or loud: when the update leaves any parameter inf or NaN
        (counted in the fused Adam pass, which writes every parameter), the
        reported ``mse``, penalty and ``total`` are NaN, on every backend.
        """
        params = V.params_inplace(params, self._device)
        V.adam_state_arg(state, params, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        y = V.target_arg(x, y, params, self._device)
        V.fire_counts_arg(fire_counts, params.d_sae, self._device)
        c = V.as_scalar(l1_coefficient, "l1_coefficient")
        lr, beta1, beta2, eps = V.adam_args(lr, beta1, beta2, eps)
        mode = V.check_decoder_norm(decoder_norm)
        precision = self._precision(precision)
        self._step_writes(params, state, x, fire_counts, y=y)
        return self._m.train_step(params, state, x, l1_coefficient=c, lr=lr,
                                  decoder_norm=mode, beta1=beta1, beta2=beta2, eps=eps,
                                  fire_counts=fire_counts, y=y, precision=precision)

    # ------------------------------------------------------------ TopK family
    def encode_topk(self, x, W_enc, b_enc, b_dec, k, precision="fp32") -> SparseCodes:
        """Per row, the ``k`` largest pre-activations (ties: lower feature
        index), then ReLU; at most ``k`` entries per row -> SparseCodes.
        ``precision="bf16"``: candidates from the bfloat16 product, the ``k``
        re-selected by their float32 values (see :meth:`encode_relu_sparse`)."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_topk(*args, V.as_int(k, "k"), precision=self._precision(precision))

    def encode_batchtopk(self, x, W_enc, b_enc, b_dec, k, precision="fp32") -> SparseCodes:
        """The ``N * k`` largest pre-activations of the batch (ties: lower
        row, then lower feature), then ReLU -> SparseCodes.
        ``precision="bf16"``: candidates from the bfloat16 product, the
        ``N * k`` re-selected by their float32 values (see
        :func:`fastsae.reference.encode_batchtopk`)."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_batchtopk(*args, V.as_int(k, "k"),
                                        precision=self._precision(precision))

    def encode_jumprelu(self, x, W_enc, b_enc, b_dec, threshold, precision="fp32") -> SparseCodes:
        """``relu(pre) * (pre > threshold)``, ``threshold [d_sae]`` -> SparseCodes
        (``precision``: see :meth:`encode_relu_sparse`)."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        threshold = V.as_float_array(threshold, "threshold", 1, self._device)
        V.check_dim("threshold", threshold.shape[0], args[1].shape[1], "length")
        return self._m.encode_jumprelu(*args, threshold, precision=self._precision(precision))

    def _precision(self, precision) -> str:
        return V.precision_arg(precision, allow_bf16=not self._device, backend=self.name)

    def topk_gradients(self, x, params: SAEParams, codes, x_hat, aux_codes=None,
                       aux_weight=0.0, y=None):
        """Losses and gradients of a TopK/BatchTopK step (see
        :func:`fastsae.reference.topk_gradients`); ``y`` a transcoder's target."""
        x, params, codes, x_hat, y = self._gradient_args(x, params, codes, x_hat, y)
        aux_codes, w = self._aux_args(x, params, aux_codes, aux_weight)
        losses, grads = self._m.topk_gradients(x, params, codes, x_hat, aux_codes, w, y)
        return _loud_losses(losses), grads

    def _aux_args(self, x, params, aux_codes, aux_weight):
        if aux_codes is not None:
            aux_codes = V.codes_arg(aux_codes, params.d_sae, self._device, "aux_codes")
            if aux_codes.shape[0] != x.shape[0]:
                raise ValueError(f"aux_codes have {aux_codes.shape[0]} rows but x has "
                                 f"{x.shape[0]}")
        return aux_codes, V.as_scalar(aux_weight, "aux_weight")

    def train_step_topk(self, params: SAEParams, state: AdamState, x, *, k,
                        activation="topk", lr, beta1=0.9, beta2=0.999, eps=1e-8,
                        fire_counts=None, dead_mask=None, k_aux=0,
                        aux_coefficient=0.0, y=None, precision="fp32") -> StepResult:
        """One TopK (``activation="topk"``) or BatchTopK step with optional
        AuxK, in place; see :func:`fastsae.reference.train_step_topk`. All
        or nothing, finite or loud, as :meth:`train_step`; ``y`` a
        transcoder's target. ``precision="bf16"`` (CPU backends): the
        selection from the bfloat16 product (:meth:`encode_topk`,
        :meth:`encode_batchtopk`), from a copy of ``W_enc`` kept in
        ``state.bf16``; AuxK's in float32."""
        if activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {activation!r}")
        precision = self._precision(precision)
        params, x, k, lr, beta1, beta2, eps, k_aux, aux_coefficient, y = \
            self._selection_step_args(params, state, x, k, lr, beta1, beta2, eps, fire_counts,
                                      dead_mask, k_aux, aux_coefficient, y)
        return self._m.train_step_topk(
            params, state, x, k=k, activation=activation, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, fire_counts=fire_counts, dead_mask=dead_mask, k_aux=k_aux,
            aux_coefficient=aux_coefficient, y=y, precision=precision)

    def _selection_step_args(self, params, state, x, k, lr, beta1, beta2, eps, fire_counts,
                             dead_mask, k_aux, aux_coefficient, y):
        """The TopK-family steps' common checks (nothing is written before
        they pass): ``(params, x, k, lr, beta1, beta2, eps, k_aux,
        aux_coefficient, y)`` validated."""
        params = V.params_inplace(params, self._device)
        V.adam_state_arg(state, params, self._device)
        V.fire_counts_arg(fire_counts, params.d_sae, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        y = V.target_arg(x, y, params, self._device)
        k = V.as_int(k, "k")
        k_aux = V.as_int(k_aux, "k_aux", low=0)
        aux_coefficient = V.as_scalar(aux_coefficient, "aux_coefficient")
        lr, beta1, beta2, eps = V.adam_args(lr, beta1, beta2, eps)
        V.dead_mask_arg(dead_mask, params.d_sae)
        self._step_writes(params, state, x, fire_counts, dead_mask, y=y)
        return params, x, k, lr, beta1, beta2, eps, k_aux, aux_coefficient, y

    # ------------------------------------------------------------ JumpReLU family
    def jumprelu_gradients(self, x, params: SAEParams, log_threshold, bandwidth,
                           l0_coefficient, sparsity=None, dead_mask=None, y=None):
        """Losses and gradients of a JumpReLU step at thresholds
        ``exp(log_threshold)`` (see :func:`fastsae.reference.jumprelu_gradients`):
        ``(Losses, SAEParams, g_log_threshold)``; the codes are computed
        inside (the threshold's pseudo-gradient needs the pre-activations
        just below each threshold, which codes do not hold); ``sparsity`` a
        :class:`~fastsae.JumpReLUSparsity` (None: ``"step"``), ``dead_mask``
        the features its pre-activation loss acts on; ``y`` a transcoder's target."""
        params = V.params_arg(params, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        y = V.target_arg(x, y, params, self._device)
        log_threshold = V.as_float_array(log_threshold, "log_threshold", 1, self._device)
        V.check_dim("log_threshold", log_threshold.shape[0], params.d_sae, "length")
        bandwidth = V.as_scalar(bandwidth, "bandwidth", low=0.0, low_inclusive=False)
        l0c = V.as_scalar(l0_coefficient, "l0_coefficient")
        sparsity = V.jumprelu_sparsity_arg(sparsity, params.d_sae)
        V.dead_mask_arg(dead_mask, params.d_sae)
        losses, grads, g_lt = self._m.jumprelu_gradients(x, params, log_threshold, bandwidth,
                                                         l0c, sparsity, dead_mask, y)
        return _loud_losses(losses), grads, g_lt

    def train_step_jumprelu(self, params: SAEParams, state: AdamState, x, *, log_threshold,
                            threshold_m, threshold_v, bandwidth, l0_coefficient, lr,
                            beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None,
                            sparsity=None, dead_mask=None, y=None,
                            precision="fp32") -> StepResult:
        """One JumpReLU step in place: the four parameters, ``log_threshold``
        and its Adam moments ``threshold_m``/``threshold_v`` (float32
        ``[d_sae]``, updated in place at the same Adam step); see
        :func:`fastsae.reference.train_step_jumprelu`. All or nothing, finite
        or loud, as :meth:`train_step`. ``precision="bf16"`` (CPU backends,
        the default sparsity mode): the entries the step needs selected by
        the bfloat16 product, from a copy of ``W_enc`` kept in
        ``state.bf16``."""
        precision = self._precision(precision)
        params = V.params_inplace(params, self._device)
        V.adam_state_arg(state, params, self._device)
        V.fire_counts_arg(fire_counts, params.d_sae, self._device)
        for name, a in (("log_threshold", log_threshold), ("threshold_m", threshold_m),
                        ("threshold_v", threshold_v)):
            V.float_vector_inplace(a, name, params.d_sae, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        y = V.target_arg(x, y, params, self._device)
        bandwidth = V.as_scalar(bandwidth, "bandwidth", low=0.0, low_inclusive=False)
        l0c = V.as_scalar(l0_coefficient, "l0_coefficient")
        lr, beta1, beta2, eps = V.adam_args(lr, beta1, beta2, eps)
        sparsity = V.jumprelu_sparsity_arg(sparsity, params.d_sae)
        V.dead_mask_arg(dead_mask, params.d_sae)
        if precision == "bf16" and not jumprelu_default_mode(sparsity, dead_mask):
            raise ValueError("precision='bf16' JumpReLU steps are built for the default "
                             "sparsity mode ('step' with no pre-activation loss acting); "
                             f"got mode {sparsity.mode!r} with pre_act_coefficient "
                             f"{sparsity.pre_act_coefficient} (use precision='fp32')")
        self._step_writes(params, state, x, fire_counts, dead_mask,
                          extra_written={"log_threshold": log_threshold,
                                         "threshold_m": threshold_m,
                                         "threshold_v": threshold_v}, y=y)
        return self._m.train_step_jumprelu(
            params, state, x, log_threshold=log_threshold, threshold_m=threshold_m,
            threshold_v=threshold_v, bandwidth=bandwidth, l0_coefficient=l0c, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, fire_counts=fire_counts, sparsity=sparsity,
            dead_mask=dead_mask, y=y, precision=precision)

    # ------------------------------------------------------------ Matryoshka family
    def matryoshka_gradients(self, x, params: SAEParams, codes, widths, aux_codes=None,
                             aux_weight=0.0, y=None):
        """Losses and gradients of a Matryoshka BatchTopK step over the
        prefixes ``widths`` (see :func:`fastsae.reference.matryoshka_gradients`).
        ``codes`` are the batch's codes; no prefix needs its own decode; ``y``
        a transcoder's target."""
        x, params, codes, _, y = self._gradient_args(x, params, codes, None, y)
        widths = V.widths_arg(widths, params.d_sae)
        aux_codes, w = self._aux_args(x, params, aux_codes, aux_weight)
        losses, grads = self._m.matryoshka_gradients(x, params, codes, widths, aux_codes, w, y)
        return _loud_losses(losses), grads

    def train_step_matryoshka(self, params: SAEParams, state: AdamState, x, *, k, widths, lr,
                              beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None,
                              dead_mask=None, k_aux=0, aux_coefficient=0.0,
                              y=None, precision="fp32") -> StepResult:
        """One Matryoshka BatchTopK step with optional AuxK, in place; see
        :func:`fastsae.reference.train_step_matryoshka`. All or nothing,
        finite or loud, as :meth:`train_step`; ``y`` a transcoder's target;
        ``precision`` as in :meth:`train_step_topk`."""
        precision = self._precision(precision)
        params, x, k, lr, beta1, beta2, eps, k_aux, aux_coefficient, y = \
            self._selection_step_args(params, state, x, k, lr, beta1, beta2, eps, fire_counts,
                                      dead_mask, k_aux, aux_coefficient, y)
        widths = V.widths_arg(widths, params.d_sae)
        return self._m.train_step_matryoshka(
            params, state, x, k=k, widths=widths, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            fire_counts=fire_counts, dead_mask=dead_mask, k_aux=k_aux,
            aux_coefficient=aux_coefficient, y=y, precision=precision)

    # ------------------------------------------------------------ placement
    def to_backend(self, obj):
        """Move an array, :class:`SAEParams` or :class:`AdamState` to where this
        backend computes (the GPU for ``cuda``; unchanged on CPU backends)."""
        return self._m.to_backend(obj)

    def to_numpy(self, obj):
        """Inverse of :meth:`to_backend`: NumPy arrays on the host."""
        return self._m.to_numpy(obj)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU backends)."""
        self._m.synchronize()

    # ------------------------------------------------------------ runtime
    @property
    def description(self) -> str:
        """One line: what the backend is and how it runs here."""
        return self._m.DESCRIPTION

    def get_num_threads(self) -> int:
        """Compute threads this backend's calls use (``numba``: Numba's pool;
        ``cython``: the OpenMP team; ``numpy``: its BLAS; ``cuda``: 1, the
        host threads do not apply)."""
        return int(self._m.get_num_threads())

    def set_num_threads(self, n) -> None:
        """Set the threads of later calls in this process (``None``: back to
        the backend's default)."""
        if n is not None:
            n = V.as_int(n, "n")
        self._m.set_num_threads(n)


def _loud_losses(losses: Losses) -> Losses:
    """Loss parts past float32's range reported as inf (see
    :func:`fastsae.backends.numerics.loud_loss`): backends sum in float64."""
    def loud(v):
        return tuple(loud_loss(e) for e in v) if isinstance(v, tuple) else loud_loss(v)
    return Losses(*(loud(getattr(losses, f.name)) for f in fields(Losses)))
