"""Where the CUDA backend's arrays live: host <-> device moves and workspaces.

Every contract function accepts NumPy arrays (copied to the GPU, results
copied back as NumPy) or device arrays: numba device arrays and anything
exposing ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors;
used in place, without copies). When any array argument is a device array
the results are numba device arrays (they expose
``__cuda_array_interface__`` themselves). :func:`to_backend` /
:func:`to_numpy` move arrays, :class:`SAEParams`, :class:`AdamState` and
:class:`SparseCodes` across.

Scratch buffers are cached per name and shape between calls (:func:`_work`,
:func:`_work_at_least`; :func:`clear_workspace` frees them), so a training
step allocates nothing once shapes are stable; the backend is therefore not
meant to be called from several Python threads at once.

Under the simulator, device arrays are wrapped in :class:`_SimDeviceArray`
so that they carry ``__cuda_array_interface__`` like real ones.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ...params import AdamState, SAEParams
from ...sparse import SparseCodes
from .common import SIMULATOR

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeArray

    class _SimDeviceArray(_FakeArray):
        """A simulator device array that also exposes ``__cuda_array_interface__``.

        The simulator's own arrays do not, so code that recognizes device
        arrays by that attribute (``fastsae.backends.validate``, CuPy,
        PyTorch) would take them for host data and copy them. The
        simulator's "device memory" is host memory, so the interface
        honestly points at it.
        """

        @property
        def __cuda_array_interface__(self):
            a = self._ary
            return {"shape": tuple(a.shape), "typestr": a.dtype.str,
                    "data": (a.ctypes.data, False),
                    "strides": None if a.flags.c_contiguous else tuple(a.strides),
                    "version": 3}
else:
    _FakeArray = ()  # isinstance(x, ()) is always False


# ------------------------------------------------------------ device arrays
def _wrap(a):
    """Under the simulator, give a fresh device array the interface attribute."""
    if SIMULATOR and not isinstance(a, _SimDeviceArray):
        return _SimDeviceArray(a._ary)
    return a


def _empty(shape, dtype=np.float32):
    """A new device array (contents undefined)."""
    return _wrap(cuda.device_array(shape, dtype=dtype))


def _is_device(a) -> bool:
    if isinstance(a, np.ndarray):
        return False
    return isinstance(a, _FakeArray) or hasattr(a, "__cuda_array_interface__")


def _device(a, dtype=np.float32):
    """``a`` as a C-contiguous device array of ``dtype``.

    Device arrays are used in place; the front checks the dtype of float
    device arrays but neither their layout nor the dtypes of device sparse
    codes and dead masks, so a wrong dtype or a non-C-contiguous device array
    is refused here (a silent copy would break in-place updates). Host
    arrays are copied over.
    """
    if _is_device(a):
        if not isinstance(a, _FakeArray) and not cuda.devicearray.is_cuda_ndarray(a):
            a = cuda.as_cuda_array(a)  # CuPy, PyTorch, ...: zero-copy view
        if np.dtype(a.dtype) != np.dtype(dtype):
            raise TypeError(f"device array must have dtype {np.dtype(dtype)}, got {a.dtype}")
        if not a.is_c_contiguous():
            raise ValueError("device arrays must be C-contiguous (e.g. call .contiguous() or "
                             "cupy.ascontiguousarray first)")
        return a
    h = np.ascontiguousarray(a, dtype=dtype)
    return _wrap(cuda.to_device(h))


def _host(a):
    """A NumPy copy of device array ``a`` (numba, simulator, CuPy, PyTorch...)."""
    if not hasattr(a, "copy_to_host"):
        a = cuda.as_cuda_array(a)
    return a.copy_to_host()


def _any_device(*objs) -> bool:
    """Whether any argument (array, SparseCodes, SAEParams) is on the device:
    then the results stay there."""
    for o in objs:
        if isinstance(o, SparseCodes):
            if _is_device(o.values) or _is_device(o.indptr):
                return True
        elif isinstance(o, SAEParams):
            if any(_is_device(a) for a in o.arrays()):
                return True
        elif _is_device(o):
            return True
    return False


def _codes_device(codes: SparseCodes):
    """``(indptr int64, indices int32, values float32)`` on the device."""
    return (_device(codes.indptr, np.int64), _device(codes.indices, np.int32),
            _device(codes.values, np.float32))


def _params_device(p: SAEParams) -> SAEParams:
    return SAEParams(*(_device(a) for a in p.arrays()))


def _out(a, device_out):
    """A fresh device result as the caller gets it: on the device when any
    argument was, else copied to the host."""
    return _wrap(a) if device_out else a.copy_to_host()


def _codes_out(codes, dev):
    """Sparse codes as the caller gets them (host copies unless ``dev``)."""
    if dev:
        return codes
    h = codes.to_host()
    return SparseCodes(np.array(h.indptr, np.int64), np.array(h.indices, np.int32),
                       np.array(h.values, np.float32), tuple(codes.shape))


def _params_out(g: SAEParams, dev) -> SAEParams:
    """Gradient arrays as the caller gets them (host copies unless ``dev``)."""
    if dev:
        return SAEParams(*(_wrap(a) for a in g.arrays()))
    return SAEParams(*(a.copy_to_host() for a in g.arrays()))


def to_backend(obj):
    """Copy an array, :class:`SAEParams` (every array it holds: a skip
    transcoder's ``W_skip`` too), :class:`AdamState` or :class:`SparseCodes`
    to the GPU (floats as float32, integers keep their dtype). Device arrays
    are returned unchanged."""
    if isinstance(obj, SAEParams):
        return SAEParams(*(to_backend(a) for a in obj.arrays()))
    if isinstance(obj, AdamState):
        return AdamState(to_backend(obj.m), to_backend(obj.v), obj.step)
    if isinstance(obj, SparseCodes):
        return SparseCodes(*_codes_device(obj), tuple(obj.shape))
    if obj is None or _is_device(obj):
        return obj
    a = np.asarray(obj)
    if a.dtype.kind == "f":
        return _device(a, np.float32)
    if a.dtype.kind in "iub":
        return _device(a, a.dtype)
    raise TypeError(f"cannot move {type(obj).__name__} of dtype {a.dtype} to the GPU")


def to_numpy(obj):
    """Inverse of :func:`to_backend`: NumPy arrays (host objects unchanged)."""
    if isinstance(obj, SAEParams):
        return SAEParams(*(to_numpy(a) for a in obj.arrays()))
    if isinstance(obj, AdamState):
        return AdamState(to_numpy(obj.m), to_numpy(obj.v), obj.step)
    if isinstance(obj, SparseCodes):
        return SparseCodes(*(to_numpy(a) for a in (obj.indptr, obj.indices, obj.values)),
                           tuple(obj.shape))
    if _is_device(obj):
        return _host(obj)
    return obj


# ------------------------------------------------------------ workspace
_WORK: dict = {}


def _work(name, shape, dtype=np.float32):
    """A cached scratch device array (contents undefined)."""
    shape = tuple(int(s) for s in (shape if isinstance(shape, tuple) else (shape,)))
    a = _WORK.get(name)
    if a is None or tuple(a.shape) != shape or a.dtype != np.dtype(dtype):
        _WORK.pop(name, None)
        a = _empty(shape, dtype)
        _WORK[name] = a
    return a


def _work_at_least(name, n, dtype):
    """A cached 1-D scratch array of length ``n`` (a view of a buffer that
    only grows, so a varying nnz does not reallocate every step)."""
    a = _WORK.get(name)
    if a is None or a.shape[0] < max(n, 1) or a.dtype != np.dtype(dtype):
        _WORK.pop(name, None)
        a = _empty(max(int(n * 1.25), 1), dtype)
        _WORK[name] = a
    return a[:n]


def _empty_like_params(P: SAEParams, cached: bool) -> SAEParams:
    """Gradient arrays of ``P``'s shapes: workspaces (a training step) or
    fresh arrays (returned to the caller)."""
    if cached:
        return SAEParams(*(_work("grad_" + name, a.shape) for name, a in P.as_dict().items()))
    return SAEParams(*(_empty(a.shape) for a in P.arrays()))


def clear_workspace() -> None:
    """Free the cached scratch buffers (they are re-created on demand)."""
    _WORK.clear()
