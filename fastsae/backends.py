"""Backend registry and the validating front of the kernel contract.

A backend is a module that implements the contract's functions on
already-validated arrays (see :mod:`fastsae.reference` for the oracle and the
exact semantics). :class:`Backend` wraps such a module: each public method
validates its arguments once (shapes, dtypes, NaN/inf, contiguity, see
:mod:`fastsae._validate`) and then calls the module.

Backends, in the order automatic choice prefers them:

``cuda``    numba.cuda kernels (needs an NVIDIA GPU and driver)
``numba``   Numba CPU kernels, parallel over the cores
``cython``  compiled Cython extensions built by ``setup.py``
``numpy``   the dense NumPy reference (always available)
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import numpy as np

from . import _validate as V
from .params import AdamState, SAEParams, StepResult
from .sparse import SparseCodes

__all__ = ["Backend", "BackendStatus", "available_backends", "get_backend", "BACKEND_NAMES"]

#: Automatic-choice order.
BACKEND_NAMES = ("cuda", "numba", "cython", "numpy")

_MODULES = {
    "numpy": "fastsae.reference",
    "numba": "fastsae.numba_backend",
    "cython": "fastsae.cython_backend",
    "cuda": "fastsae.cuda_backend",
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or a short description when available

    def __str__(self) -> str:
        mark = "usable" if self.available else "unavailable"
        return f"{self.name:7s} {mark:11s} {self.reason}"


_cache: dict = {}


def _load(name: str):
    """Import a backend module; return ``(module, None)`` or ``(None, reason)``."""
    if name in _cache:
        return _cache[name]
    try:
        mod = importlib.import_module(_MODULES[name])
        check = getattr(mod, "check_available", None)
        if check is not None:
            check()  # raises with the reason when the backend cannot run here
        result = (mod, None)
    except Exception as exc:  # any import or probe failure makes it unavailable
        result = (None, f"{type(exc).__name__}: {exc}")
    _cache[name] = result
    return result


def available_backends() -> list[BackendStatus]:
    """Every backend, whether it is usable on this machine, and why not."""
    out = []
    for name in BACKEND_NAMES:
        mod, reason = _load(name)
        if mod is None:
            out.append(BackendStatus(name, False, reason))
        else:
            out.append(BackendStatus(name, True, getattr(mod, "DESCRIPTION", "")))
    return out


def get_backend(name: str | None = None) -> "Backend":
    """Return a backend by name.

    An explicit ``name`` wins; else the environment variable
    ``FASTSAE_BACKEND``; else the first usable of cuda, numba, cython, numpy
    (the CUDA simulator is never chosen automatically).
    An unknown or unusable name raises ``ValueError`` naming the reason and
    the usable alternatives.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get("FASTSAE_BACKEND") or None
    if name is None:
        for candidate in BACKEND_NAMES:
            mod, _ = _load(candidate)
            # a module may be usable but not wanted by default (the CUDA simulator)
            if mod is not None and getattr(mod, "AUTO_SELECT", True):
                return Backend(candidate, mod)
        raise RuntimeError("no fastsae backend is usable")  # numpy always is
    name = str(name).lower()
    usable = [s.name for s in available_backends() if s.available]
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}; "
                         f"usable here: {', '.join(usable)}")
    mod, reason = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not usable here ({reason}); "
                         f"usable here: {', '.join(usable)}")
    return Backend(name, mod)


class Backend:
    """The kernel contract, validated, for one backend.

    All arrays are float32 in SAELens layouts: ``x [N, d_in]``,
    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``. float64 (or float16) inputs are converted to float32
    once; non-contiguous inputs are copied to C order. Bad inputs raise
    ``TypeError``/``ValueError``.
    """

    def __init__(self, name: str, module):
        self.name = name
        self._m = module
        self._device = bool(getattr(module, "DEVICE_ARRAYS", False))

    def __repr__(self) -> str:
        return f"<fastsae backend {self.name!r}>"

    # ------------------------------------------------------------ forward
    def encode_relu(self, x, W_enc, b_enc, b_dec):
        """``relu((x - b_dec) @ W_enc + b_enc)`` -> dense float32 ``[N, d_sae]``."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_relu(*args)

    def encode_relu_sparse(self, x, W_enc, b_enc, b_dec) -> SparseCodes:
        """Same as :meth:`encode_relu`, returned as canonical :class:`SparseCodes`."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._m.encode_relu_sparse(*args)

    def decode(self, codes, W_dec, b_dec):
        """``codes @ W_dec + b_dec`` -> float32 ``[N, d_in]``; codes dense
        ``[N, d_sae]`` or :class:`SparseCodes`."""
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
    def _gradient_args(self, x, params, codes, x_hat):
        """Validate the batch, parameters, codes and reconstruction that a
        gradient computation takes, and check they agree with each other."""
        params = V.params_arg(params, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        x_hat = V.as_float_array(x_hat, "x_hat", 2, self._device)
        if tuple(x_hat.shape) != tuple(x.shape):
            raise ValueError(f"x_hat must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(x_hat.shape)}")
        codes = V.codes_arg(codes, params.d_sae, self._device)
        if codes.shape[0] != x.shape[0]:
            raise ValueError(f"codes have {codes.shape[0]} rows but x has {x.shape[0]}")
        return x, params, codes, x_hat

    def gradients(self, x, params: SAEParams, codes, x_hat, l1_coefficient,
                  decoder_norm="weighted_l1"):
        """Loss parts and parameter gradients for one batch.

        ``codes`` must be the encoding of ``x`` under ``params`` (dense or
        sparse) and ``x_hat`` its decode. Returns ``(Losses, SAEParams)``;
        see :mod:`fastsae.reference` for the loss normalization and the
        ``decoder_norm`` modes.
        """
        x, params, codes, x_hat = self._gradient_args(x, params, codes, x_hat)
        c = V.as_scalar(l1_coefficient, "l1_coefficient")
        mode = V.check_decoder_norm(decoder_norm)
        return self._m.gradients(x, params, codes, x_hat, c, mode)

    def train_step(self, params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
                   decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
                   fire_counts=None) -> StepResult:
        """Forward, backward and Adam update on batch ``x``, in place.

        ``params`` and ``state`` (arrays of this backend, see
        :meth:`to_backend`) are updated in place. ``fire_counts`` (int64
        ``[d_sae]``, optional) is incremented by how many rows each feature
        fired in. Returns the batch's losses, L0 and explained variance.
        """
        params = V.params_inplace(params, self._device)
        V.adam_state_arg(state, params, self._device)
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        V.fire_counts_arg(fire_counts, params.d_sae, self._device)
        c = V.as_scalar(l1_coefficient, "l1_coefficient")
        lr = V.as_scalar(lr, "lr")
        beta1 = V.as_scalar(beta1, "beta1", high=1.0)
        beta2 = V.as_scalar(beta2, "beta2", high=1.0)
        eps = V.as_scalar(eps, "eps", low=0.0, low_inclusive=False)
        mode = V.check_decoder_norm(decoder_norm)
        return self._m.train_step(params, state, x, l1_coefficient=c, lr=lr,
                                  decoder_norm=mode, beta1=beta1, beta2=beta2, eps=eps,
                                  fire_counts=fire_counts)

    # ------------------------------------------------------------ TopK family
    def supports(self, function: str) -> bool:
        """Whether this backend implements a contract function (the TopK
        family may be missing on some backends)."""
        return callable(getattr(self._m, function, None))

    def _impl(self, function: str):
        f = getattr(self._m, function, None)
        if f is None:
            usable = [s.name for s in available_backends()
                      if s.available and callable(getattr(_load(s.name)[0], function, None))]
            raise NotImplementedError(f"backend {self.name!r} does not implement {function}; "
                                      f"backends that do: {', '.join(usable)}")
        return f

    def encode_topk(self, x, W_enc, b_enc, b_dec, k) -> SparseCodes:
        """Per row, the ``k`` largest pre-activations (ties: lower feature
        index), then ReLU; at most ``k`` entries per row -> SparseCodes."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._impl("encode_topk")(*args, V.as_int(k, "k"))

    def encode_batchtopk(self, x, W_enc, b_enc, b_dec, k) -> SparseCodes:
        """The ``N * k`` largest pre-activations of the batch (ties: lower
        row, then lower feature), then ReLU -> SparseCodes."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        return self._impl("encode_batchtopk")(*args, V.as_int(k, "k"))

    def encode_jumprelu(self, x, W_enc, b_enc, b_dec, threshold) -> SparseCodes:
        """``relu(pre) * (pre > threshold)``, ``threshold [d_sae]`` -> SparseCodes."""
        args = V.encoder_args(x, W_enc, b_enc, b_dec, self._device)
        threshold = V.as_float_array(threshold, "threshold", 1, self._device)
        V.check_dim("threshold", threshold.shape[0], args[1].shape[1], "length")
        return self._impl("encode_jumprelu")(*args, threshold)

    def topk_gradients(self, x, params: SAEParams, codes, x_hat, aux_codes=None,
                       aux_weight=0.0):
        """Losses and gradients of a TopK/BatchTopK step (see
        :func:`fastsae.reference.topk_gradients`)."""
        x, params, codes, x_hat = self._gradient_args(x, params, codes, x_hat)
        if aux_codes is not None:
            aux_codes = V.codes_arg(aux_codes, params.d_sae, self._device, "aux_codes")
            if aux_codes.shape[0] != x.shape[0]:
                raise ValueError(f"aux_codes have {aux_codes.shape[0]} rows but x has "
                                 f"{x.shape[0]}")
        w = V.as_scalar(aux_weight, "aux_weight")
        return self._impl("topk_gradients")(x, params, codes, x_hat, aux_codes, w)

    def train_step_topk(self, params: SAEParams, state: AdamState, x, *, k,
                        activation="topk", lr, beta1=0.9, beta2=0.999, eps=1e-8,
                        fire_counts=None, dead_mask=None, k_aux=0,
                        aux_coefficient=0.0) -> StepResult:
        """One TopK (``activation="topk"``) or BatchTopK step with optional
        AuxK, in place; see :func:`fastsae.reference.train_step_topk`."""
        params = V.params_inplace(params, self._device)
        V.adam_state_arg(state, params, self._device)
        V.fire_counts_arg(fire_counts, params.d_sae, self._device)
        if activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {activation!r}")
        x = V.as_float_array(x, "x", 2, self._device)
        V.check_dim("x", x.shape[1], params.d_in, "d_in (shape[1])")
        k = V.as_int(k, "k")
        k_aux = V.as_int(k_aux, "k_aux", low=0)
        aux_coefficient = V.as_scalar(aux_coefficient, "aux_coefficient")
        lr = V.as_scalar(lr, "lr")
        beta1 = V.as_scalar(beta1, "beta1", high=1.0)
        beta2 = V.as_scalar(beta2, "beta2", high=1.0)
        eps = V.as_scalar(eps, "eps", low=0.0, low_inclusive=False)
        if dead_mask is not None:
            if tuple(dead_mask.shape) != (params.d_sae,):
                raise ValueError(f"dead_mask must have shape ({params.d_sae},), "
                                 f"got {tuple(dead_mask.shape)}")
            if not V.is_device_array(dead_mask) and np.asarray(dead_mask).dtype != np.bool_:
                raise TypeError(f"dead_mask must be a bool array, got {dead_mask.dtype}")
        return self._impl("train_step_topk")(
            params, state, x, k=k, activation=activation, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, fire_counts=fire_counts, dead_mask=dead_mask, k_aux=k_aux,
            aux_coefficient=aux_coefficient)

    # ------------------------------------------------------------ placement
    def to_backend(self, obj):
        """Move an array, :class:`SAEParams` or :class:`AdamState` to where this
        backend computes (the GPU for ``cuda``; unchanged on CPU backends)."""
        f = getattr(self._m, "to_backend", None)
        return obj if f is None else f(obj)

    def to_numpy(self, obj):
        """Inverse of :meth:`to_backend`: NumPy arrays on the host."""
        f = getattr(self._m, "to_numpy", None)
        return obj if f is None else f(obj)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU backends)."""
        f = getattr(self._m, "synchronize", None)
        if f is not None:
            f()
