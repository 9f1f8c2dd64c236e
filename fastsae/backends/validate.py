"""Input validation shared by every backend.

Every public kernel entry point goes through these checks before any
compiled code runs, so a bad argument gives a ``TypeError``/``ValueError``
that says what was expected and what was given, never a crash or garbage.

Rules: arrays must be real floating point (float16/float64 are converted
to float32 once; integer, bool, complex and object dtypes are refused), have
the documented number of dimensions and sizes, be non-empty and finite.
Non-contiguous arrays are copied to C order. Device arrays (objects with
``__cuda_array_interface__``) are checked for shape and dtype only: they must
already be float32 and are not scanned for NaN (that would cost a device
round trip).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..params import DECODER_NORM_MODES, JUMPRELU_SPARSITY_MODES, JumpReLUSparsity, SAEParams
from ..sparse import SparseCodes, check_codes
from ..sparse import device_shape_dtype as _device_shape_dtype
from ..sparse import is_device_array


def as_float_array(a, name: str, ndim: int, allow_device: bool = False,
                   check_finite: bool = True):
    """Return ``a`` as a C-contiguous, finite float32 array of ``ndim`` dims."""
    if allow_device and is_device_array(a):
        shape, dtype = _device_shape_dtype(a)
        if len(shape) != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got a device array of shape {shape}")
        if dtype != np.float32:
            raise TypeError(f"{name} must be float32 on the device, got {dtype}")
        if 0 in shape:
            raise ValueError(f"{name} must not be empty, got shape {shape}")
        return a
    if isinstance(a, SparseCodes):
        raise TypeError(f"{name} must be a dense array, got SparseCodes")
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of floats: {exc}") from None
    if arr.dtype.kind != "f":
        raise TypeError(
            f"{name} must have a floating-point dtype (float32 preferred), got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if check_finite and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        where = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s) "
                         f"(first at index {tuple(where)})")
    return arr


def check_dim(name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name} has {what} = {got}, expected {expected} to match the other "
                         "arguments")


def as_scalar(value, name: str, low: float = 0.0, low_inclusive: bool = True,
              high: float | None = None) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < low or (v == low and not low_inclusive):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {v}")
    if high is not None and v >= high:
        raise ValueError(f"{name} must be < {high}, got {v}")
    return v


def adam_args(lr, beta1, beta2, eps) -> tuple:
    """Adam's settings of a training step, checked: ``lr >= 0``, betas in
    ``[0, 1)``, ``eps > 0``; returned as floats."""
    return (as_scalar(lr, "lr"), as_scalar(beta1, "beta1", high=1.0),
            as_scalar(beta2, "beta2", high=1.0),
            as_scalar(eps, "eps", low=0.0, low_inclusive=False))


def as_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def widths_arg(widths, d_sae: int) -> np.ndarray:
    """Matryoshka prefix widths: a non-empty sequence of integers, strictly
    increasing, the first >= 1 and the last equal to ``d_sae``; returned as
    a fresh int64 host array (kernels index with it, so it is checked here)."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__"):
        raise TypeError(f"widths must be a sequence of integers, got {type(widths).__name__}")
    a = np.asarray(widths)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"widths must be a non-empty 1-D sequence, got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"widths must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a[0] < 1 or np.any(np.diff(a) <= 0):
        raise ValueError(f"widths must be strictly increasing and >= 1, got {a.tolist()}")
    if a[-1] != d_sae:
        raise ValueError(f"widths: the last width must be d_sae ({d_sae}), got {int(a[-1])}")
    return a


def dead_mask_arg(dead_mask, d_sae: int) -> None:
    """AuxK's mask of dead latents: bool ``[d_sae]`` (host or device) or None."""
    if dead_mask is None:
        return
    if not (isinstance(dead_mask, np.ndarray) or is_device_array(dead_mask)):
        raise TypeError(f"dead_mask must be a bool array of shape ({d_sae},) or None, "
                        f"got {type(dead_mask).__name__}")
    if tuple(dead_mask.shape) != (d_sae,):
        raise ValueError(f"dead_mask must have shape ({d_sae},), "
                         f"got {tuple(dead_mask.shape)}")
    if not is_device_array(dead_mask) and np.asarray(dead_mask).dtype != np.bool_:
        raise TypeError(f"dead_mask must be a bool array, got {dead_mask.dtype}")


def jumprelu_sparsity_arg(sparsity, d_sae: int):
    """A :class:`JumpReLUSparsity` or None, checked: a known mode, a positive
    finite ``tanh_scale``, ``target_l0`` in ``(0, d_sae]`` where the mode is
    ``"quadratic"`` (ignored otherwise, as SAELens), a finite
    ``pre_act_coefficient >= 0``. Returns it with plain float fields, or None."""
    if sparsity is None:
        return None
    if not isinstance(sparsity, JumpReLUSparsity):
        raise TypeError("sparsity must be a fastsae.JumpReLUSparsity or None, "
                        f"got {type(sparsity).__name__}")
    if sparsity.mode not in JUMPRELU_SPARSITY_MODES:
        raise ValueError(f"sparsity.mode must be one of {JUMPRELU_SPARSITY_MODES}, "
                         f"got {sparsity.mode!r}")
    tanh_scale = as_scalar(sparsity.tanh_scale, "sparsity.tanh_scale", low=0.0,
                           low_inclusive=False)
    pre = as_scalar(sparsity.pre_act_coefficient, "sparsity.pre_act_coefficient")
    target = sparsity.target_l0
    if sparsity.mode == "quadratic":
        if target is None:
            raise ValueError("sparsity.target_l0 must be set for the 'quadratic' mode")
        target = as_scalar(target, "sparsity.target_l0", low=0.0, low_inclusive=False)
        if target > d_sae:
            raise ValueError(f"sparsity.target_l0 must be at most d_sae ({d_sae}), "
                             f"got {target}")
    elif target is not None:
        target = as_scalar(target, "sparsity.target_l0", low=0.0, low_inclusive=False)
    return JumpReLUSparsity(sparsity.mode, tanh_scale, target, pre)


PRECISIONS = ("fp32", "bf16")


def precision_arg(precision, allow_bf16: bool = True, backend: str = "") -> str:
    """``precision`` of the encoders: ``"fp32"`` or ``"bf16"`` (CPU backends only)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not allow_bf16:
        raise ValueError(f"precision='bf16' runs on the CPU backends (numpy, numba, cython); "
                         f"the {backend} backend computes in float32 (precision='fp32')")
    return precision


def check_decoder_norm(mode) -> str:
    if mode not in DECODER_NORM_MODES:
        raise ValueError(f"decoder_norm must be one of {DECODER_NORM_MODES}, got {mode!r}")
    return mode


def encoder_args(x, W_enc, b_enc, b_dec, allow_device=False):
    x = as_float_array(x, "x", 2, allow_device)
    W_enc = as_float_array(W_enc, "W_enc", 2, allow_device)
    b_enc = as_float_array(b_enc, "b_enc", 1, allow_device)
    b_dec = as_float_array(b_dec, "b_dec", 1, allow_device)
    d_in, d_sae = W_enc.shape
    check_dim("x", x.shape[1], d_in, "d_in (shape[1])")
    check_dim("b_enc", b_enc.shape[0], d_sae, "length")
    check_dim("b_dec", b_dec.shape[0], d_in, "length")
    return x, W_enc, b_enc, b_dec


def codes_arg(codes, d_sae: int | None = None, allow_device=False, name="codes"):
    if isinstance(codes, SparseCodes):
        return check_codes(codes, d_sae, name)  # O(nnz): kernels index with them
    f = as_float_array(codes, name, 2, allow_device)
    if d_sae is not None:
        check_dim(name, f.shape[1], d_sae, "d_sae (shape[1])")
    return f


def params_arg(params, allow_device=False, check_finite=True) -> SAEParams:
    """The parameters of an SAE or a transcoder: ``W_enc [d_in, d_sae]``,
    ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
    ``W_skip [d_out, d_in]`` or None. Whether ``d_out`` may differ from
    ``d_in`` (a transcoder) is :func:`target_arg`'s to say."""
    if not isinstance(params, SAEParams):
        raise TypeError(f"params must be a fastsae.SAEParams, got {type(params).__name__}")
    W_enc = as_float_array(params.W_enc, "W_enc", 2, allow_device, check_finite)
    d_in, d_sae = W_enc.shape
    b_enc = as_float_array(params.b_enc, "b_enc", 1, allow_device, check_finite)
    W_dec = as_float_array(params.W_dec, "W_dec", 2, allow_device, check_finite)
    b_dec = as_float_array(params.b_dec, "b_dec", 1, allow_device, check_finite)
    check_dim("b_enc", b_enc.shape[0], d_sae, "length")
    if W_dec.shape[0] != d_sae:
        raise ValueError(f"W_dec must have shape (d_sae, d_out) with d_sae = {d_sae} rows "
                         f"(W_enc's columns), got {tuple(W_dec.shape)}")
    d_out = W_dec.shape[1]
    check_dim("b_dec", b_dec.shape[0], d_out, "length (W_dec's columns)")
    W_skip = None
    if params.W_skip is not None:
        W_skip = as_float_array(params.W_skip, "W_skip", 2, allow_device, check_finite)
        if tuple(W_skip.shape) != (d_out, d_in):
            raise ValueError(f"W_skip must have shape (d_out, d_in) = {(d_out, d_in)}, "
                             f"got {tuple(W_skip.shape)}")
    return SAEParams(W_enc, b_enc, W_dec, b_dec, W_skip)


def target_arg(x, y, params: SAEParams, allow_device=False):
    """The reconstruction target: ``None`` for an SAE (its target is ``x``:
    ``d_out`` must equal ``d_in`` and there is no ``W_skip``), else a
    transcoder's ``y`` float32 ``[N, d_out]`` with ``x``'s rows. Returns
    ``y`` converted (finite, C-contiguous float32)."""
    if y is None:
        if params.d_out != params.d_in:
            raise ValueError(f"W_dec has d_out = {params.d_out} columns but x has d_in = "
                             f"{params.d_in}: a transcoder needs its target y")
        if params.W_skip is not None:
            raise ValueError("params has W_skip (a skip transcoder) but no target y was given")
        return None
    y = as_float_array(y, "y", 2, allow_device)
    check_dim("y", y.shape[1], params.d_out, "d_out (shape[1], W_dec's columns)")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}: a transcoder's "
                         "input and target rows must pair up")
    return y


def params_inplace(params, allow_device=False) -> SAEParams:
    """Check parameters that a training step updates in place: they must
    already be C-contiguous float32 (a converted copy would silently not be
    trained). Not scanned for NaN: a non-finite loss stops the trainer."""
    checked = params_arg(params, allow_device, check_finite=False)
    for name in checked.names:
        a = getattr(params, name)
        if getattr(checked, name) is not a:
            a = np.asarray(a)
            raise TypeError(f"params.{name} must be a C-contiguous float32 array to be updated "
                            f"in place, got dtype {a.dtype}, "
                            f"C-contiguous={a.flags.c_contiguous}")
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"params.{name} is read-only; a training step updates it in place")
    return checked


def adam_state_arg(state, params: SAEParams, allow_device=False) -> None:
    """Adam moments must match the parameters (float32, same shapes,
    C-contiguous): a training step updates them in place."""
    from ..params import AdamState

    if not isinstance(state, AdamState):
        raise TypeError(f"state must be a fastsae.AdamState, got {type(state).__name__}")
    if isinstance(state.step, (bool, np.bool_)) or not isinstance(state.step, numbers.Integral) \
            or state.step < 0:
        raise ValueError(f"state.step must be a non-negative integer, got {state.step!r}")
    for part in ("m", "v"):
        moments = getattr(state, part)
        if not isinstance(moments, SAEParams):
            raise TypeError(f"state.{part} must be a fastsae.SAEParams, "
                            f"got {type(moments).__name__}")
        if (moments.W_skip is None) != (params.W_skip is None):
            raise ValueError(f"state.{part}.W_skip must be an array exactly when params has "
                             f"W_skip (a skip transcoder)")
        for name in params.names:
            a, p = getattr(moments, name), getattr(params, name)
            if allow_device and is_device_array(a):
                shape, dtype = _device_shape_dtype(a)
                contiguous = True
            else:
                a = np.asarray(a) if not is_device_array(a) else a
                shape, dtype = tuple(a.shape), a.dtype
                contiguous = isinstance(a, np.ndarray) and a.flags.c_contiguous
            if shape != tuple(p.shape):
                raise ValueError(f"state.{part}.{name} must have shape {tuple(p.shape)} like "
                                 f"params.{name}, got {shape}")
            if dtype != np.float32 or not contiguous:
                raise TypeError(f"state.{part}.{name} must be a C-contiguous float32 array "
                                f"(updated in place), got {dtype}, C-contiguous={contiguous}")
            if isinstance(a, np.ndarray) and not a.flags.writeable:
                raise ValueError(f"state.{part}.{name} is read-only; a training step updates "
                                 f"it in place")


def fire_counts_arg(fire_counts, d_sae: int, allow_device=False) -> None:
    """``fire_counts`` is None or an int64 ``[d_sae]`` array updated in place."""
    if fire_counts is None:
        return
    if allow_device and is_device_array(fire_counts):
        shape, dtype = _device_shape_dtype(fire_counts)
        contiguous = True
    elif isinstance(fire_counts, np.ndarray):
        shape, dtype = fire_counts.shape, fire_counts.dtype
        contiguous = fire_counts.flags.c_contiguous and fire_counts.flags.writeable
    else:
        raise TypeError(f"fire_counts must be an int64 array, got {type(fire_counts).__name__}")
    if tuple(shape) != (d_sae,):
        raise ValueError(f"fire_counts must have shape ({d_sae},), got {tuple(shape)}")
    if dtype != np.int64 or not contiguous:
        raise TypeError(f"fire_counts must be a writable, contiguous int64 array, got {dtype}")


def float_vector_inplace(a, name: str, length: int, allow_device=False):
    """A float32 ``[length]`` array a training step updates in place (the
    JumpReLU thresholds and their moments): C-contiguous, writeable, never
    converted (a converted copy would silently not be trained)."""
    if allow_device and is_device_array(a):
        shape, dtype = _device_shape_dtype(a)
        contiguous, writeable = True, True
    elif isinstance(a, np.ndarray):
        shape, dtype = a.shape, a.dtype
        contiguous, writeable = a.flags.c_contiguous, a.flags.writeable
    else:
        raise TypeError(f"{name} must be a float32 array (updated in place), "
                        f"got {type(a).__name__}")
    if tuple(shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(shape)}")
    if dtype != np.float32 or not contiguous:
        raise TypeError(f"{name} must be a C-contiguous float32 array (updated in place), "
                        f"got {dtype}, C-contiguous={contiguous}")
    if not writeable:
        raise ValueError(f"{name} is read-only; a training step updates it in place")
    return a


def no_aliasing(written: dict, read: dict | None = None) -> None:
    """Refuse arrays that a step writes in place (``written``: name -> array)
    when any of them shares memory with another written or read array: the
    step would read values it has already overwritten. Host arrays only
    (device allocations do not overlap unless made as views on purpose)."""
    items = [(k, a) for k, a in written.items() if isinstance(a, np.ndarray)]
    others = [(k, a) for k, a in (read or {}).items() if isinstance(a, np.ndarray)]
    for i, (name, a) in enumerate(items):
        for other, b in items[i + 1:] + others:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name} and {other} share memory; a training step updates "
                                 f"{name} in place, so every array it writes must be its own "
                                 "(pass copies)")
