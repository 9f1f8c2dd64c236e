"""The CUDA backend: the kernel contract on an NVIDIA GPU through numba.cuda.

Install with the ``cuda`` extra (``pip install fastsae[cuda]``, which pulls
``numba-cuda``). Kernels live in ``fastsae/_kernels/gpu_*.py``; this module
moves data, allocates, launches and reads back the few scalars a caller
needs. Semantics are those of :mod:`fastsae.reference`.

Arrays in and out
-----------------
Every function accepts NumPy arrays (copied to the GPU, results copied back
as NumPy) or device arrays: numba device arrays and anything exposing
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors; used in
place, without copies). When any array argument is a device array the
results are numba device arrays (they expose ``__cuda_array_interface__``
themselves: ``cupy.asarray(out)`` / ``torch.as_tensor(out, device="cuda")``
wrap them without copies). Device arrays must be C-contiguous; float arrays
must be float32 (``fastsae._validate`` checks shape and dtype before any
kernel runs). :func:`to_backend` / :func:`to_numpy` move arrays,
:class:`SAEParams`, :class:`AdamState` and :class:`SparseCodes` across.

``train_step`` on device params and state runs entirely on the GPU: the only
host transfers are two small reads (the number of active entries, needed to
size the sparse codes, and the five loss scalars of the returned
:class:`StepResult`). Scratch buffers are cached per shape between calls
(:func:`clear_workspace` frees them); the module is not meant to be called
from several Python threads at once.

Algorithm (see each kernel file for details): dense tiled GEMM with bias,
ReLU and per-row counts in its epilogue -> scan -> ordered compaction to
canonical CSR; sparse decode; per-entry ``d_pre``; stable CSR -> CSC
transposition so every per-feature gradient is a deterministic,
atomic-free sum; fused Adam (+ fused unit-norm renormalization). Results are
bit-for-bit reproducible from run to run on the same GPU.

TopK family (``encode_topk``, ``encode_batchtopk``, ``encode_jumprelu``,
``topk_gradients``, ``train_step_topk``): the same GEMM stages the
pre-activations; an exact radix select on their float bit patterns (per
row: one block per row; BatchTopK: whole-matrix histograms plus a scan of
the per-row tie counts) finds the threshold and applies the reference's
lower-index tie rule (see :mod:`fastsae._kernels.gpu_topk`). AuxK selects
among the dead latents on the same staged pre-activations (no second
product) and its sparse gradients go through the same per-feature backward.

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code runs on
the CPU, very slowly, with small launch geometries (see
:mod:`fastsae._kernels.gpu_common`): that is how the tests check every
kernel on machines without a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import cuda

from ._kernels import gpu_adam, gpu_backward, gpu_decode, gpu_encode, gpu_norms, gpu_topk
from ._kernels.gpu_common import (BLOCK, CHUNK_ROWS, COLSUM_ROWS, GROUPS, LANES, SIMULATOR,
                                  TILE, TILE_ROWS, add_kernel, exclusive_scan_kernel,
                                  fill_kernel, flat_grid, grid_for, sum_kernel)
from .params import AdamState, Losses, SAEParams, StepResult
from .sparse import SparseCodes

NAME = "cuda"
DEVICE_ARRAYS = True
DESCRIPTION = ("CUDA simulator (NUMBA_ENABLE_CUDASIM=1): numba.cuda kernels run on the CPU, "
               "for testing only" if SIMULATOR else "numba.cuda kernels on an NVIDIA GPU")

#: Whether automatic backend choice should pick this backend when it is
#: usable: not the simulator, which is correct but thousands of times slower
#: than the CPU backends (backends.get_backend may honour this).
AUTO_SELECT = not SIMULATOR

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeArray

    class _SimDeviceArray(_FakeArray):
        """A simulator device array that also exposes ``__cuda_array_interface__``.

        The simulator's own arrays do not, so code that recognizes device
        arrays by that attribute (``fastsae._validate``, CuPy, PyTorch) would
        take them for host data and copy them. The simulator's "device
        memory" is host memory, so the interface honestly points at it.
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


# ------------------------------------------------------------ availability
def check_available() -> None:
    """Raise ``RuntimeError`` saying why when no CUDA device can be used."""
    global DESCRIPTION
    if SIMULATOR:
        return
    if not cuda.is_available():
        reason = "no CUDA driver or device found"
        try:
            cuda.get_current_device()
        except Exception as exc:  # the driver's own explanation
            reason = f"{reason}: {' '.join(str(exc).split()).rstrip(' :')}"
        raise RuntimeError(reason)
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = ".".join(str(c) for c in dev.compute_capability)
    DESCRIPTION = f"numba.cuda kernels on {name} (compute capability {cc})"


def synchronize() -> None:
    """Wait until all queued kernels and copies have finished."""
    cuda.synchronize()


# ------------------------------------------------------------ placement
def _wrap(a):
    """Under the simulator, give a fresh device array the interface attribute."""
    if SIMULATOR and not isinstance(a, _SimDeviceArray):
        return _SimDeviceArray(a._ary)
    return a


def _empty(shape, dtype=np.float32):
    return _wrap(cuda.device_array(shape, dtype=dtype))


def _is_device(a) -> bool:
    if isinstance(a, np.ndarray):
        return False
    return isinstance(a, _FakeArray) or hasattr(a, "__cuda_array_interface__")


def _device(a, dtype=np.float32):
    """``a`` as a C-contiguous device array of ``dtype``.

    Device arrays are used in place (refused when they are not C-contiguous
    or have the wrong dtype: a silent copy would break in-place updates);
    host arrays are copied over.
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
    return (_device(codes.indptr, np.int64), _device(codes.indices, np.int32),
            _device(codes.values, np.float32))


def _params_device(p: SAEParams) -> SAEParams:
    return SAEParams(*(_device(a) for a in p.arrays()))


def to_backend(obj):
    """Copy an array, :class:`SAEParams`, :class:`AdamState` or
    :class:`SparseCodes` to the GPU (floats as float32, integers keep their
    dtype). Device arrays are returned unchanged."""
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


def clear_workspace() -> None:
    """Free the cached scratch buffers (they are re-created on demand)."""
    _WORK.clear()


def _single_block(kernel):
    """``kernel[1, BLOCK]``: a deliberate one-block launch (a short ordered
    pass such as a scan), so numba's low-occupancy warning is silenced for
    this configuration only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size")
        return kernel[1, BLOCK]


def _zero(a):
    flat = a.reshape(a.size) if len(a.shape) > 1 else a
    fill_kernel[flat_grid(flat.shape[0]), BLOCK](flat, flat.dtype.type(0))


def _flat(a):
    return a.reshape(a.size)


# ------------------------------------------------------------ forward
def _gemm(A, shift, B, bias, relu, out, row_counts=None):
    grid, block = gpu_encode.gemm_launch(A.shape[0], B.shape[1])
    has_shift = shift is not None
    if shift is None:
        shift = bias  # never read
    counts = row_counts if row_counts is not None else _work("dummy_counts", 1, np.int32)
    gpu_encode.gemm_bias_act_kernel[grid, block](A, shift, has_shift, B, bias, bool(relu), out,
                                                 counts, row_counts is not None)


def _compact(dense, counts, indptr=None, fresh=True, tag=""):
    """CSR of ``dense``'s nonzeros given per-row counts (int32 [N])."""
    n, d = dense.shape
    if indptr is None:
        indptr = _empty(n + 1, np.int64) if fresh else _work("indptr", n + 1, np.int64)
    _single_block(exclusive_scan_kernel)(counts, indptr)
    nnz = int(indptr[n:n + 1].copy_to_host()[0])  # one scalar read: sizes the output
    if fresh:
        indices = _empty(max(nnz, 1), np.int32)[:nnz]
        values = _empty(max(nnz, 1), np.float32)[:nnz]
    else:
        indices = _work_at_least("indices" + tag, nnz, np.int32)
        values = _work_at_least("values" + tag, nnz, np.float32)
    gpu_encode.compact_rows_kernel[grid_for(n), BLOCK](dense, indptr, indices, values)
    return SparseCodes(_wrap(indptr), _wrap(indices), _wrap(values), (int(n), int(d))), nnz


def _encode_sparse(x, W_enc, b_enc, b_dec, fresh):
    n, d_sae = x.shape[0], W_enc.shape[1]
    dense = _work("enc_dense", (n, d_sae))
    counts = _work("row_counts", n, np.int32)
    _zero(counts)
    _gemm(x, b_dec, W_enc, b_enc, True, dense, counts)
    return _compact(dense, counts, fresh=fresh)


def _dense_to_sparse(f):
    counts = _work("row_counts_dense", f.shape[0], np.int32)
    gpu_encode.count_rows_kernel[grid_for(f.shape[0]), BLOCK](f, counts)
    return _compact(f, counts, indptr=_work("indptr_dense", f.shape[0] + 1, np.int64),
                    fresh=False)


def _out(a, device_out):
    return _wrap(a) if device_out else a.copy_to_host()


def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense float32 ``[N, d_sae]``."""
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    out = _empty((x.shape[0], W_enc.shape[1]))
    _gemm(x, b_dec, W_enc, b_enc, True, out)
    return _out(out, dev)


def encode_relu_sparse(x, W_enc, b_enc, b_dec) -> SparseCodes:
    """:func:`encode_relu` as canonical :class:`SparseCodes`."""
    dev = _any_device(x, W_enc, b_enc, b_dec)
    args = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _encode_sparse(*args, fresh=True)
    return codes if dev else codes.to_host()


def _sparse_decode(indptr, indices, values, W_dec, b_dec, out):
    gpu_decode.sparse_decode_kernel[grid_for(out.shape[0]), BLOCK](
        indptr, indices, values, W_dec, b_dec, out)


def decode(codes, W_dec, b_dec):
    """``codes @ W_dec + b_dec``, float32 ``[N, d_in]``; codes dense or sparse."""
    dev = _any_device(codes, W_dec, b_dec)
    W_dec, b_dec = _device(W_dec), _device(b_dec)
    n = int(codes.shape[0])
    out = _empty((n, W_dec.shape[1]))
    if isinstance(codes, SparseCodes):
        _sparse_decode(*_codes_device(codes), W_dec, b_dec, out)
    else:
        _gemm(_device(codes), None, W_dec, b_dec, False, out)
    return _out(out, dev)


def _norms(W_dec, out):
    gpu_norms.row_norms_kernel[grid_for(W_dec.shape[0]), BLOCK](W_dec, out)
    return out


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row, float32 ``[d_sae]``."""
    dev = _any_device(W_dec)
    W_dec = _device(W_dec)
    return _out(_norms(W_dec, _empty(W_dec.shape[0])), dev)


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms[j]`` where ``codes[i, j] > 0``, else 0; same
    kind as ``codes`` (sparse codes keep their pattern)."""
    dev = _any_device(codes, norms)
    norms = _device(norms)
    c = np.float32(l1_coefficient)
    if isinstance(codes, SparseCodes):
        indptr, indices, _ = _codes_device(codes)
        vals = _empty(max(indices.shape[0], 1))[:indices.shape[0]]
        gpu_norms.l1_sparse_kernel[flat_grid(indices.shape[0]), BLOCK](indices, norms, c, vals)
        if not dev:
            h = codes.to_host()
            return SparseCodes(np.array(h.indptr, dtype=np.int64), np.array(h.indices, np.int32),
                               vals.copy_to_host(), tuple(codes.shape))
        out_ptr = _empty(indptr.shape[0], np.int64)
        out_idx = _empty(max(indices.shape[0], 1), np.int32)[:indices.shape[0]]
        out_ptr.copy_to_device(indptr)
        if indices.shape[0]:
            out_idx.copy_to_device(indices)
        return SparseCodes(out_ptr, out_idx, _wrap(vals), tuple(codes.shape))
    f = _device(codes)
    out = _empty(f.shape)
    gpu_norms.l1_dense_kernel[flat_grid(f.shape[0] * f.shape[1]), BLOCK](f, norms, c, out)
    return _out(out, dev)


# ------------------------------------------------------------ backward
def _colsum(A, div, out):
    """``out = A.sum(axis=0) / div`` (float32), deterministic chunked order."""
    n, d = A.shape
    chunks = -(-n // COLSUM_ROWS)
    partial = _work("colsum_partial", (chunks, d))
    gpu_backward.colsum_partial_kernel[(-(-d // BLOCK), chunks), BLOCK](A, COLSUM_ROWS, partial)
    gpu_backward.colsum_finish_kernel[-(-d // BLOCK), BLOCK](partial, np.float32(div), out)
    return out


def _backward(x, P, indptr, indices, values, x_hat, c, weighted, g, scal):
    """Fill the gradient arrays ``g`` (SAEParams of device arrays) and
    ``scal`` (float64 [3]: sum of squared errors, sum_j (sum_i f_ij) pen_j,
    sum of squared deviations of x from its mean). Returns the per-feature
    count of stored entries (int64 [d_sae], a workspace array)."""
    n, d_in = x.shape
    d_sae = P.W_enc.shape[1]
    nf = np.float32(n)
    l1_scale = np.float32(c / n)

    mean = _colsum(x, n, _work("mean", d_in))
    d_xhat = _work("d_xhat", (n, d_in))
    row_mse = _work("row_mse", n, np.float64)
    row_var = _work("row_var", n, np.float64)
    gpu_backward.residual_kernel[grid_for(n), BLOCK](x, x_hat, mean, nf, d_xhat, row_mse,
                                                     row_var)
    _colsum(d_xhat, 1, g.b_dec)

    g_W_encT = _work("g_W_encT", (d_sae, d_in))
    l1_feat = _work("l1_feat", d_sae)
    colcount = _feature_pass(x, P, indptr, indices, values, d_xhat, g.W_dec, g_W_encT, g.b_enc,
                             "", weighted, l1_scale, l1_feat)
    gpu_backward.transpose_kernel[(-(-d_in // TILE), -(-d_sae // TILE)), (TILE, TILE_ROWS)](
        g_W_encT, g.W_enc)
    gpu_backward.matvec_sub_kernel[grid_for(d_in), BLOCK](P.W_enc, g.b_enc, g.b_dec)

    _single_block(sum_kernel)(row_mse, scal, 0)
    _single_block(sum_kernel)(l1_feat, scal, 1)
    _single_block(sum_kernel)(row_var, scal, 2)
    return colcount


def _empty_like_params(P: SAEParams, cached: bool) -> SAEParams:
    if cached:
        return SAEParams(*(_work("grad_" + name, a.shape) for name, a in P.as_dict().items()))
    return SAEParams(*(_empty(a.shape) for a in P.arrays()))


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm):
    """Loss parts and gradients (see :func:`fastsae.reference.gradients`)."""
    dev = _any_device(x, params, codes, x_hat)
    x, x_hat = _device(x), _device(x_hat)
    P = _params_device(params)
    if isinstance(codes, SparseCodes):
        indptr, indices, values = _codes_device(codes)
    else:
        sc, _ = _dense_to_sparse(_device(codes))
        indptr, indices, values = sc.indptr, sc.indices, sc.values
    g = _empty_like_params(P, cached=False)
    scal = _work("scalars", 3, np.float64)
    _backward(x, P, indptr, indices, values, x_hat, float(l1_coefficient),
              decoder_norm == "weighted_l1", g, scal)
    s = scal.copy_to_host()
    n = x.shape[0]
    mse = float(s[0] / n)
    l1 = float(l1_coefficient * s[1] / n)
    losses = Losses(mse=mse, l1=l1, total=mse + l1)
    if dev:
        return losses, SAEParams(*(_wrap(a) for a in g.arrays()))
    return losses, SAEParams(*(a.copy_to_host() for a in g.arrays()))


# ------------------------------------------------------------ optimizer
def _adam_scalars(step, lr, beta1, beta2, eps):
    t = step + 1
    f = np.float32
    return (f(beta1), f(1 - beta1), f(beta2), f(1 - beta2), f(1 - beta1 ** t),
            f(1 - beta2 ** t), f(lr), f(eps))


def _adam(P, G, M, V, scalars, unit_norm):
    for name in SAEParams.NAMES:
        p, g, m, v = (getattr(o, name) for o in (P, G, M, V))
        if name == "W_dec" and unit_norm:
            gpu_adam.adam_rows_renorm_kernel[grid_for(p.shape[0]), BLOCK](p, g, m, v, *scalars)
        else:
            pf = _flat(p)
            gpu_adam.adam_kernel[flat_grid(pf.shape[0]), BLOCK](pf, _flat(g), _flat(m),
                                                               _flat(v), *scalars)


def _step_arrays(params: SAEParams, state: AdamState, fire_counts):
    """Device arrays for a training step: ``(P, M, V, fc_dev, host_pairs)``.

    Parameters and Adam moments already on the device are used in place;
    host ones are copied over and listed in ``host_pairs`` (host array,
    device copy) for :func:`_finish_step` to write back. ``fc_dev`` is
    ``fire_counts`` when it is a device array, else None. Shapes and dtypes
    were checked by the validating front."""
    host_pairs = []

    def dev(a):
        d = _device(a)
        if not _is_device(a):
            host_pairs.append((a, d))
        return d

    P, M, V = (SAEParams(*(dev(a) for a in o.arrays())) for o in (params, state.m, state.v))
    fc_dev = None
    if fire_counts is not None and _is_device(fire_counts):
        fc_dev = _device(fire_counts, np.int64)
    return P, M, V, fc_dev, host_pairs


def _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs) -> np.ndarray:
    """Adds this step's per-feature firing counts ``colcount`` to
    ``fire_counts`` (on the device or the host), writes updated host
    parameters and moments back, and returns the step's scalars on the host."""
    if fc_dev is not None:
        add_kernel[flat_grid(fc_dev.shape[0]), BLOCK](fc_dev, colcount)
    s = scal.copy_to_host()
    if fire_counts is not None and fc_dev is None:
        fire_counts += colcount.copy_to_host().astype(fire_counts.dtype)
    for h, d in host_pairs:
        d.copy_to_host(h)
    return s


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None) -> StepResult:
    """Forward, backward and Adam update on batch ``x``, in place.

    Device parameters and moments are updated where they are; host (NumPy)
    ones are copied to the GPU and the updated values copied back into the
    same arrays. ``fire_counts`` (int64 ``[d_sae]``, host or device) is
    incremented by the number of rows each feature fired in.
    """
    P, M, V, fc_dev, host_pairs = _step_arrays(params, state, fire_counts)
    xd = _device(x)
    n = xd.shape[0]
    unit_norm = decoder_norm == "unit_norm"

    codes, nnz = _encode_sparse(xd, P.W_enc, P.b_enc, P.b_dec, fresh=False)
    x_hat = _work("x_hat", xd.shape)
    _sparse_decode(codes.indptr, codes.indices, codes.values, P.W_dec, P.b_dec, x_hat)
    G = _empty_like_params(P, cached=True)
    scal = _work("scalars", 3, np.float64)
    colcount = _backward(xd, P, codes.indptr, codes.indices, codes.values, x_hat,
                         float(l1_coefficient), not unit_norm, G, scal)
    _adam(P, G, M, V, _adam_scalars(state.step, lr, beta1, beta2, eps), unit_norm)
    state.step += 1
    s = _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs)
    mse = float(s[0] / n)
    l1 = float(l1_coefficient * s[1] / n)
    var = float(s[2] / n)
    return StepResult(mse=mse, l1=l1, total=mse + l1, l0=nnz / n,
                      explained_variance=1.0 - mse / var if var > 0 else 1.0)


# ------------------------------------------------------------ TopK family
# Forward: the GEMM writes pre-activations (no ReLU) into the staging buffer,
# a selection kernel (fastsae/_kernels/gpu_topk.py) describes each row's
# selection as (threshold key, last tied column), mask_kernel writes the
# selected positive entries into a second buffer, and the ReLU path's
# count/compact kernels make canonical CSR of it.

def _pre(x, W_enc, b_enc, b_dec):
    pre = _work("topk_pre", (x.shape[0], W_enc.shape[1]))
    _gemm(x, b_dec, W_enc, b_enc, False, pre)
    return pre


def _select_rows(pre, k, dead=None):
    """(thr_key int64 [N], thr_col int32 [N]) of the per-row top-k
    (among the ``dead`` columns when given); ``k`` already clipped."""
    n = pre.shape[0]
    bits = pre.view(np.uint32)
    thr_key = _work("thr_key", n, np.int64)
    thr_col = _work("thr_col", n, np.int32)
    mask = dead if dead is not None else _work("dummy_mask", 1, np.bool_)
    gpu_topk.row_select_kernel[grid_for(n), BLOCK](bits, int(k), mask, dead is not None,
                                                  thr_key, thr_col)
    return thr_key, thr_col


def _select_batch(pre, total):
    """BatchTopK selection of the ``total`` largest entries (flat tie rule)."""
    n, d = pre.shape
    bits = pre.view(np.uint32)
    flat = bits.reshape(n * d)
    hist = _work("topk_hist", gpu_topk.NBINS, np.int64)
    prefix, remaining = 0, int(total)
    for p in range(4):
        shift = 24 - 8 * p
        _zero(hist)
        gpu_topk.hist_kernel[flat_grid(n * d), BLOCK](flat, np.int64(prefix), shift, hist)
        h = hist.copy_to_host()  # 256 counts: the bin choice is made on the host
        cum = 0
        for b in range(gpu_topk.NBINS - 1, -1, -1):
            if cum + int(h[b]) >= remaining:
                prefix |= b << shift
                remaining -= cum
                break
            cum += int(h[b])
    ties = _work("topk_ties", n, np.int32)
    gpu_topk.row_ties_kernel[grid_for(n), BLOCK](bits, np.int64(prefix), ties)
    tie_before = _work("topk_tie_before", n + 1, np.int64)
    _single_block(exclusive_scan_kernel)(ties, tie_before)
    thr_key = _work("thr_key", n, np.int64)
    thr_col = _work("thr_col", n, np.int32)
    gpu_topk.batch_tie_cols_kernel[grid_for(n), BLOCK](bits, np.int64(prefix),
                                                      np.int64(remaining), tie_before,
                                                      thr_key, thr_col)
    return thr_key, thr_col


def _apply_selection(pre, thr_key, thr_col, dead, out_name, fresh):
    n, d = pre.shape
    out = _work(out_name, (n, d))
    mask = dead if dead is not None else _work("dummy_mask", 1, np.bool_)
    gpu_topk.mask_kernel[flat_grid(n * d), BLOCK](pre, pre.view(np.uint32), thr_key, thr_col,
                                                 mask, dead is not None, out)
    counts = _work("row_counts_" + out_name, n, np.int32)
    gpu_encode.count_rows_kernel[grid_for(n), BLOCK](out, counts)
    indptr = None if fresh else _work("indptr_" + out_name, n + 1, np.int64)
    return _compact(out, counts, indptr=indptr, fresh=fresh, tag=out_name)


def _topk_codes(pre, k, activation, fresh, name="topk_dense"):
    n, d = pre.shape
    if activation == "topk":
        thr = _select_rows(pre, min(int(k), d))
    else:
        thr = _select_batch(pre, min(int(k) * n, n * d))
    return _apply_selection(pre, *thr, None, name, fresh)


def _aux_codes(pre, dead, n_dead, k_aux, fresh):
    thr = _select_rows(pre, min(int(k_aux), int(n_dead)), dead)
    return _apply_selection(pre, *thr, dead, "aux_dense", fresh)


def _codes_out(codes, dev):
    if dev:
        return codes
    h = codes.to_host()
    return SparseCodes(np.array(h.indptr, np.int64), np.array(h.indices, np.int32),
                       np.array(h.values, np.float32), tuple(codes.shape))


def encode_topk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """Per row, the ``k`` largest pre-activations (ties: lower feature index),
    then ReLU, as canonical :class:`SparseCodes`."""
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _topk_codes(_pre(x, W_enc, b_enc, b_dec), k, "topk", fresh=True)
    return _codes_out(codes, dev)


def encode_batchtopk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: lower
    row-major index), then ReLU, as canonical :class:`SparseCodes`."""
    dev = _any_device(x, W_enc, b_enc, b_dec)
    x, W_enc, b_enc, b_dec = (_device(a) for a in (x, W_enc, b_enc, b_dec))
    codes, _ = _topk_codes(_pre(x, W_enc, b_enc, b_dec), k, "batchtopk", fresh=True)
    return _codes_out(codes, dev)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold) -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` per feature, as :class:`SparseCodes`."""
    dev = _any_device(x, W_enc, b_enc, b_dec, threshold)
    x, W_enc, b_enc, b_dec, threshold = (_device(a) for a in (x, W_enc, b_enc, b_dec,
                                                              threshold))
    pre = _pre(x, W_enc, b_enc, b_dec)
    n, d = pre.shape
    gpu_topk.jumprelu_kernel[flat_grid(n * d), BLOCK](pre, threshold, pre)
    counts = _work("row_counts_jump", n, np.int32)
    gpu_encode.count_rows_kernel[grid_for(n), BLOCK](pre, counts)
    codes, _ = _compact(pre, counts, fresh=True)
    return _codes_out(codes, dev)


def _feature_pass(x, P, indptr, indices, values, d_xhat, g_W_dec, g_W_encT, g_b_enc, tag,
                  weighted=False, l1_scale=np.float32(0), l1_feat=None):
    """Sparse backward of one code set against ``d_xhat``: d_pre, a stable
    CSR -> CSC transpose, then per feature ``g_W_dec`` (projected unless
    ``weighted``), ``g_W_encT`` and ``g_b_enc`` overwritten; with
    ``l1_scale`` the L1 term (``weighted``: by decoder norm) is included and
    its per-feature parts written to ``l1_feat``. ``tag`` names the
    workspaces of a second code set (AuxK). Returns the per-feature entry
    counts (int64 [d_sae] workspace)."""
    n = x.shape[0]
    d_sae = P.W_enc.shape[1]
    nnz = indices.shape[0]
    norms = _norms(P.W_dec, _work("norms", d_sae))
    dpre = _work_at_least("dpre" + tag, nnz, np.float32)
    gpu_backward.dpre_kernel[grid_for(n), (LANES, GROUPS)](
        indptr, indices, values, d_xhat, P.W_dec, norms, weighted, l1_scale, dpre)
    chunks = -(-n // CHUNK_ROWS)
    counts = _work("csc_counts", (chunks, d_sae), np.int32)
    _zero(counts)
    gpu_backward.csc_count_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, counts)
    colcount = _work("colcount" + tag, d_sae, np.int64)
    gpu_backward.csc_offsets_kernel[-(-d_sae // BLOCK), BLOCK](counts, colcount)
    colptr = _work("colptr", d_sae + 1, np.int64)
    _single_block(exclusive_scan_kernel)(colcount, colptr)
    entry_of = _work_at_least("entry_of", nnz, np.int64)
    row_of = _work_at_least("row_of", nnz, np.int32)
    gpu_backward.csc_fill_kernel[grid_for(chunks), BLOCK](indptr, indices, CHUNK_ROWS, colptr,
                                                          counts, entry_of, row_of)
    if l1_feat is None:
        l1_feat = _work("l1_feat", d_sae)
    gpu_backward.feature_grad_kernel[grid_for(d_sae), BLOCK](
        colptr, entry_of, row_of, values, dpre, d_xhat, x, P.b_dec, P.W_dec, norms, weighted,
        l1_scale, g_W_dec, g_W_encT, g_b_enc, l1_feat)
    return colcount


def _topk_backward(x, P, codes, x_hat, aux, weight, g, scal):
    """TopK gradients into ``g``; ``scal`` float64 [3]: squared error sum,
    aux squared error sum, squared deviation sum. ``aux`` is the AuxK
    (indptr, indices, values) or None. Returns the main codes' per-feature
    counts."""
    n, d_in = x.shape
    d_sae = P.W_enc.shape[1]
    mean = _colsum(x, n, _work("mean", d_in))
    d_xhat = _work("d_xhat", (n, d_in))
    row_mse = _work("row_mse", n, np.float64)
    row_var = _work("row_var", n, np.float64)
    gpu_backward.residual_kernel[grid_for(n), BLOCK](x, x_hat, mean, np.float32(n), d_xhat,
                                                     row_mse, row_var)
    _colsum(d_xhat, 1, g.b_dec)
    g_W_encT = _work("g_W_encT", (d_sae, d_in))
    colcount = _feature_pass(x, P, *codes, d_xhat, g.W_dec, g_W_encT, g.b_enc, "")
    row_aux = _work("row_aux", n, np.float64)
    _zero(row_aux)
    if aux is not None:
        zero_bias = _work("zero_bias", d_in)
        _zero(zero_bias)
        e_hat = _work("e_hat", (n, d_in))
        _sparse_decode(*aux, P.W_dec, zero_bias, e_hat)
        d_ehat = _work("d_ehat", (n, d_in))
        gpu_topk.aux_residual_kernel[grid_for(n), BLOCK](x, x_hat, e_hat, np.float32(weight),
                                                         np.float32(n), d_ehat, row_aux)
        a_W_dec = _work("aux_g_W_dec", (d_sae, d_in))
        a_W_encT = _work("aux_g_W_encT", (d_sae, d_in))
        a_b_enc = _work("aux_g_b_enc", d_sae)
        _feature_pass(x, P, *aux, d_ehat, a_W_dec, a_W_encT, a_b_enc, "_aux")
        for dst, src in ((g.W_dec, a_W_dec), (g_W_encT, a_W_encT), (g.b_enc, a_b_enc)):
            add_kernel[flat_grid(dst.size), BLOCK](_flat(dst), _flat(src))
    gpu_backward.transpose_kernel[(-(-d_in // TILE), -(-d_sae // TILE)), (TILE, TILE_ROWS)](
        g_W_encT, g.W_enc)
    gpu_backward.matvec_sub_kernel[grid_for(d_in), BLOCK](P.W_enc, g.b_enc, g.b_dec)
    _single_block(sum_kernel)(row_mse, scal, 0)
    _single_block(sum_kernel)(row_aux, scal, 1)
    _single_block(sum_kernel)(row_var, scal, 2)
    return colcount


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0):
    """Losses and gradients of TopK training (see
    :func:`fastsae.reference.topk_gradients`)."""
    dev = _any_device(x, params, codes, x_hat, aux_codes)
    x, x_hat = _device(x), _device(x_hat)
    P = _params_device(params)
    aux = None
    if aux_codes is not None and aux_weight > 0:
        aux = _codes_device(aux_codes)
    g = _empty_like_params(P, cached=False)
    scal = _work("scalars_topk", 4, np.float64)
    _topk_backward(x, P, _codes_device(codes), x_hat, aux, float(aux_weight), g, scal)
    s = scal.copy_to_host()
    n = x.shape[0]
    mse = float(s[0] / n)
    aux_loss = float(aux_weight * s[1] / n) if aux is not None else 0.0
    losses = Losses(mse=mse, l1=0.0, total=mse + aux_loss, aux=aux_loss)
    if dev:
        return losses, SAEParams(*(_wrap(a) for a in g.arrays()))
    return losses, SAEParams(*(a.copy_to_host() for a in g.arrays()))


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0) -> StepResult:
    """One TopK/BatchTopK step with optional AuxK, in place (see
    :func:`fastsae.reference.train_step_topk`); device or host arrays as
    :func:`train_step`."""
    P, M, V, fc_dev, host_pairs = _step_arrays(params, state, fire_counts)
    xd = _device(x)
    n = xd.shape[0]

    pre = _pre(xd, P.W_enc, P.b_enc, P.b_dec)
    codes, nnz = _topk_codes(pre, k, activation, fresh=False)
    x_hat = _work("x_hat", xd.shape)
    _sparse_decode(codes.indptr, codes.indices, codes.values, P.W_dec, P.b_dec, x_hat)
    aux, weight = None, 0.0
    if dead_mask is not None and k_aux > 0 and aux_coefficient > 0:
        dead_h = _host(dead_mask) if _is_device(dead_mask) else np.asarray(dead_mask)
        n_dead = int(np.count_nonzero(dead_h))
        if n_dead:
            dead = _device(dead_h, np.bool_) if not _is_device(dead_mask) else \
                _device(dead_mask, np.bool_)
            ac, _ = _aux_codes(pre, dead, n_dead, k_aux, fresh=False)
            aux = (ac.indptr, ac.indices, ac.values)
            weight = float(aux_coefficient) * min(n_dead / int(k_aux), 1.0)
    G = _empty_like_params(P, cached=True)
    scal = _work("scalars_topk", 4, np.float64)
    colcount = _topk_backward(xd, P, (codes.indptr, codes.indices, codes.values), x_hat, aux,
                              weight, G, scal)
    _single_block(gpu_topk.min_kernel)(codes.values, scal, 3)
    _adam(P, G, M, V, _adam_scalars(state.step, lr, beta1, beta2, eps), True)
    state.step += 1
    s = _finish_step(scal, colcount, fire_counts, fc_dev, host_pairs)
    mse = float(s[0] / n)
    aux_loss = float(weight * s[1] / n) if aux is not None else 0.0
    var = float(s[2] / n)
    return StepResult(mse=mse, l1=0.0, total=mse + aux_loss, l0=nnz / n,
                      explained_variance=1.0 - mse / var if var > 0 else 1.0, aux=aux_loss,
                      extra={"min_active": float(s[3]) if nnz else 0.0})
