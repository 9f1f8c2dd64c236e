"""The ``cython`` backend: the kernel contract as compiled Cython extensions.

The kernels live in ``kernels/*.pyx`` and are compiled by ``setup.py`` into
``fastsae._cy_*`` (``encode``, ``topk``, ``decode``, ``norms``, ``l1``,
``backward``, ``adam``, ``runtime``). They are the same algorithms as the Numba backend:

* encode: tiled BLAS ``sgemm`` (from ``scipy.linalg.cython_blas``) with the
  bias, ReLU and CSR compaction done on each tile while it is in cache;
* decode: gather-accumulate of the active decoder rows;
* backward: sparse ``d_pre`` at the active entries only, a CSC transpose so
  each feature's gradients are accumulated by one thread (race-free);
* Adam: in ``train_step`` fused into the backward's per-feature pass (each
  block of ``W_enc`` columns and ``W_dec`` rows is updated, and renormalized
  in ``unit_norm`` mode, as soon as its gradient exists, so the gradient
  matrices are never stored); ``_cy_adam.adam_step`` is the stand-alone
  one-pass update of all four parameters.

The extensions are optional. When they were not built (no C compiler at
install time) or fail to import, :func:`check_available` raises
``ImportError`` with the reason and ``fastsae.available_backends()`` reports
it.

Threads: the parallel loops use OpenMP when the compiler supported it at
build time (``fastsae info`` says whether). The team size defaults to
``OMP_NUM_THREADS`` or the core count; :func:`set_num_threads` changes it for
this process. Inside the parallel loops BLAS is limited to one thread (via
threadpoolctl) so the cores are not oversubscribed; without OpenMP the loops
run serially and BLAS keeps its own threading.

Every function takes already-validated arrays (the public
:class:`fastsae.Backend` validates), but still checks, cheaply, the
invariants the compiled code relies on: dtypes and C order (typed
memoryviews refuse anything else), shapes, and that sparse indices are in
range.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .params import AdamState, Losses, SAEParams, StepResult
from .sparse import SparseCodes

NAME = "cython"

_IMPORT_ERROR: Exception | None = None
try:  # the compiled kernels are optional
    from . import _cy_adam, _cy_backward, _cy_decode, _cy_encode, _cy_l1, _cy_norms, _cy_runtime
    from . import _cy_topk
except ImportError as exc:  # not built, or built for another Python/NumPy
    _IMPORT_ERROR = exc

OPENMP = bool(_IMPORT_ERROR is None and _cy_runtime.OPENMP)
DEBUG_BUILD = bool(_IMPORT_ERROR is None and _cy_runtime.DEBUG)

# Encoder tiling: a tile of _TM rows x _TN features (256 x 512 floats = 512 KiB,
# half of this machine's per-core L2) is computed by one sgemm and its
# epilogue runs before the next tile.
_TM = 256
_TN = 512
# The top-k encoders' row tile: taller than _TM (512 x 512 floats = 1 MiB tiles)
# so each sgemm repacks the row block's x - b_dec less often (measured ~5%
# faster at paper size than 256 rows; the selection epilogue is cheap).
_TOPK_TM = 512
# Dense codes with at most this fraction of nonzeros are decoded by a gather
# (skipping zeros); denser ones by sgemm.
_GATHER_MAX_DENSITY = 0.1

# Kernels with less work than this (multiply-adds or element visits) run on
# one thread: waking the team costs more than it saves (and on a busy machine
# a descheduled worker can stall the whole team for a scheduler tick).
_PAR_MIN_WORK = 1 << 20

_num_threads: int | None = None


def check_available() -> None:
    """Raise ``ImportError`` saying why the compiled kernels cannot be used."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            f"the compiled Cython kernels (fastsae._cy_*) are not importable "
            f"({_IMPORT_ERROR}); they are built by `pip install .` or "
            f"`python setup.py build_ext --inplace`, which need a C compiler, Cython and SciPy")


def get_num_threads() -> int:
    """Threads the kernels use (1 without OpenMP)."""
    if not OPENMP:
        return 1
    return _num_threads if _num_threads is not None else max(1, _cy_runtime.max_threads())


def _threads(work: int) -> int:
    """Team size for a kernel doing about ``work`` operations."""
    return 1 if work < _PAR_MIN_WORK else get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Set the OpenMP team size for this process (``None``: back to the default,
    ``OMP_NUM_THREADS`` or the core count). No effect without OpenMP."""
    global _num_threads, DESCRIPTION
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"number of threads must be >= 1, got {n}")
    _num_threads = n
    DESCRIPTION = _description()


def _description() -> str:
    if _IMPORT_ERROR is not None:
        return "Cython kernels not built"
    par = (f"OpenMP, {get_num_threads()} threads" if OPENMP
           else "no OpenMP at build time: single-threaded loops")
    dbg = ", debug build (bounds checks on)" if DEBUG_BUILD else ""
    return f"Cython CPU kernels ({par}; SciPy BLAS sgemm{dbg})"


DESCRIPTION = _description()

# ------------------------------------------------------------------ helpers
class _BlasSingleThread:
    """Context manager limiting BLAS to one thread while OpenMP threads call
    it. Reference-counted under a lock, so concurrent callers from several
    Python threads neither restore the limit under each other's feet nor
    leave BLAS stuck at one thread afterwards."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None
        self._controller = None  # None: not probed yet; False: no threadpoolctl

    def _probe(self):
        try:
            from threadpoolctl import ThreadpoolController
            self._controller = ThreadpoolController()
        except Exception:  # threadpoolctl missing or failing: run unlimited
            self._controller = False

    def __enter__(self):
        with self._lock:
            if self._controller is None:
                self._probe()
            if self._depth == 0 and self._controller:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None
        return False


_blas_guard = _BlasSingleThread()


def _blas_single():
    """BLAS limited to one thread when the OpenMP loops call it (without
    OpenMP the loops are serial and BLAS keeps its own threads)."""
    return _blas_guard if OPENMP else contextlib.nullcontext()


def _tiling(n: int, d_sae: int, nthreads: int):
    """Row tile, feature tile and feature chunks per row block, so that
    there are at least ~4 tasks per thread when the batch allows it."""
    tm = min(_TM, max(16, -(-n // nthreads)))
    nrb = -(-n // tm)
    chunks = max(1, -(-4 * nthreads // nrb)) if nthreads > 1 else 1
    return tm, _TN, chunks


def _f32(a, name):
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
        raise TypeError(f"{name} must be a C-contiguous float32 ndarray")
    return a


def _check_csr(codes: SparseCodes):
    """Cheap O(nnz) checks that make the compiled kernels memory-safe."""
    indptr, indices, values = codes.indptr, codes.indices, codes.values
    n, d_sae = codes.shape
    if not (isinstance(indptr, np.ndarray) and indptr.dtype == np.int64
            and indptr.shape == (n + 1,)):
        raise ValueError("codes.indptr must be int64 of length N + 1")
    if not (isinstance(indices, np.ndarray) and indices.dtype == np.int32):
        raise ValueError("codes.indices must be int32")
    _f32(values, "codes.values")
    nnz = indices.shape[0]
    if values.shape[0] != nnz or indptr[0] != 0 or indptr[-1] != nnz or (
            n > 1 and np.any(indptr[1:] < indptr[:-1])):
        raise ValueError("codes.indptr must start at 0, not decrease and end at nnz")
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= d_sae):
        raise ValueError(f"codes.indices must lie in [0, {d_sae})")


def _csr_of(codes, nthreads):
    """(indptr, indices, values) of dense or sparse codes."""
    if isinstance(codes, SparseCodes):
        _check_csr(codes)
        return codes.indptr, codes.indices, codes.values
    return _cy_encode.dense_to_csr(_f32(codes, "codes"), nthreads)


# ------------------------------------------------------------------ forward
def encode_relu(x, W_enc, b_enc, b_dec):
    """``relu((x - b_dec) @ W_enc + b_enc)``, dense float32 ``[N, d_sae]``."""
    nt = _threads(x.shape[0] * W_enc.shape[0] * W_enc.shape[1])
    out = np.empty((x.shape[0], W_enc.shape[1]), dtype=np.float32)
    tm, tn, chunks = _tiling(x.shape[0], W_enc.shape[1], nt)
    with _blas_single():
        _cy_encode.encode_dense(x, W_enc, b_enc, b_dec, out, tm, tn, chunks, nt)
    return out


def encode_relu_sparse(x, W_enc, b_enc, b_dec) -> SparseCodes:
    """:func:`encode_relu` as canonical :class:`SparseCodes`, without ever
    forming the dense ``[N, d_sae]`` matrix."""
    nt = _threads(x.shape[0] * W_enc.shape[0] * W_enc.shape[1])
    tm, tn, chunks = _tiling(x.shape[0], W_enc.shape[1], nt)
    with _blas_single():
        indptr, indices, values = _cy_encode.encode_csr(x, W_enc, b_enc, b_dec, tm, tn,
                                                        chunks, nt)
    return SparseCodes(indptr, indices, values, (int(x.shape[0]), int(W_enc.shape[1])))


def decode(codes, W_dec, b_dec):
    """``f @ W_dec + b_dec``, float32 ``[N, d_in]``; codes dense or sparse."""
    if isinstance(codes, SparseCodes):
        _check_csr(codes)
        nt = _threads((codes.indices.shape[0] + codes.shape[0]) * W_dec.shape[1])
        out = np.empty((codes.shape[0], W_dec.shape[1]), dtype=np.float32)
        _cy_decode.decode_csr(codes.indptr, codes.indices, codes.values, W_dec, b_dec, out, nt)
        return out
    f = _f32(codes, "codes")
    nt = _threads(f.size)
    out = np.empty((f.shape[0], W_dec.shape[1]), dtype=np.float32)
    nnz = _cy_decode.count_nonzero(f, nt)
    if nnz <= _GATHER_MAX_DENSITY * f.size:
        nt = _threads(f.size + nnz * W_dec.shape[1])
        _cy_decode.decode_dense_gather(f, W_dec, b_dec, out, nt)
    else:
        nt = _threads(f.size * W_dec.shape[1])
        tm = min(_TM, max(16, -(-f.shape[0] // nt)))
        with _blas_single():
            _cy_decode.decode_dense_gemm(f, W_dec, b_dec, out, tm, nt)
    return out


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row, float32 ``[d_sae]``."""
    out = np.empty(W_dec.shape[0], dtype=np.float32)
    _cy_norms.decoder_column_norms(W_dec, out, _threads(W_dec.size))
    return out


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` where ``f_ij > 0`` (dense in, dense out;
    sparse in, sparse out with the same pattern)."""
    c = np.float32(l1_coefficient)
    if isinstance(codes, SparseCodes):
        _check_csr(codes)
        nt = _threads(codes.indices.shape[0])
        if codes.shape[1] != norms.shape[0]:
            raise ValueError("norms must have length d_sae")
        vals = np.empty(codes.indices.shape[0], dtype=np.float32)
        _cy_l1.l1_sparse(codes.indices, norms, c, vals, nt)
        return SparseCodes(codes.indptr.copy(), codes.indices.copy(), vals, codes.shape)
    out = np.empty(codes.shape, dtype=np.float32)
    _cy_l1.l1_dense(_f32(codes, "codes"), norms, c, out, _threads(codes.size))
    return out


# ------------------------------------------------------------------ backward
def _grads_into(x, params: SAEParams, csr, x_hat, l1_coefficient, decoder_norm, norms,
                grads: SAEParams, fire_counts, nt):
    indptr, indices, values = csr
    return _cy_backward.gradients_csr(
        x, x_hat, params.W_enc, params.W_dec, params.b_dec, indptr, indices, values, norms,
        float(l1_coefficient), decoder_norm == "weighted_l1", decoder_norm == "unit_norm",
        grads.W_enc, grads.b_enc, grads.W_dec, grads.b_dec, fire_counts, nt)


def gradients(x, params: SAEParams, codes, x_hat, l1_coefficient, decoder_norm):
    """Loss parts and gradients (see :func:`fastsae.reference.gradients`),
    computed from the active entries only."""
    if decoder_norm not in ("weighted_l1", "unit_norm"):
        raise ValueError(f"unknown decoder_norm {decoder_norm!r}")
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    csr = _csr_of(codes, _threads(n * d_sae))
    nt = _threads((3 * csr[1].shape[0] + n) * d_in + d_in * d_sae)
    norms = decoder_column_norms(params.W_dec)
    grads = SAEParams(np.empty_like(params.W_enc), np.empty_like(params.b_enc),
                      np.empty_like(params.W_dec), np.empty_like(params.b_dec))
    mse, l1 = _grads_into(x, params, csr, x_hat, l1_coefficient, decoder_norm, norms, grads,
                          None, nt)
    return Losses(mse=mse, l1=l1, total=mse + l1), grads


# ------------------------------------------------------------------ training
def _check_state(state: AdamState, params: SAEParams):
    for part in ("m", "v"):
        moments = getattr(state, part)
        if not isinstance(moments, SAEParams):
            raise TypeError(f"state.{part} must be a fastsae.SAEParams")
        for name in SAEParams.NAMES:
            a, p = getattr(moments, name), getattr(params, name)
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32
                    and a.flags.c_contiguous and a.flags.writeable and a.shape == p.shape):
                raise TypeError(f"state.{part}.{name} must be a writeable C-contiguous float32 "
                                f"array of shape {p.shape}")


def train_step(params: SAEParams, state: AdamState, x, *, l1_coefficient, lr,
               decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8,
               fire_counts=None) -> StepResult:
    """Forward (fused sparse encode, sparse decode), sparse backward and fused
    Adam on batch ``x``, updating ``params`` and ``state`` in place.

    No ``N x d_sae`` dense matrix is formed. Returns the batch's losses, L0
    and explained variance, measured before the update.
    """
    if decoder_norm not in ("weighted_l1", "unit_norm"):
        raise ValueError(f"unknown decoder_norm {decoder_norm!r}")
    _check_state(state, params)
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    counts = None
    if fire_counts is not None:
        if (isinstance(fire_counts, np.ndarray) and fire_counts.dtype == np.int64
                and fire_counts.flags.c_contiguous and fire_counts.flags.writeable):
            counts = fire_counts
        else:
            counts = np.zeros(d_sae, dtype=np.int64)

    norms = decoder_column_norms(params.W_dec)
    codes = encode_relu_sparse(x, params.W_enc, params.b_enc, params.b_dec)
    nnz = codes.indices.shape[0]
    x_hat = np.empty_like(x)
    _cy_decode.decode_csr(codes.indptr, codes.indices, codes.values, params.W_dec,
                          params.b_dec, x_hat, _threads((nnz + n) * d_in))
    nt = _threads((3 * nnz + n) * d_in + 3 * d_in * d_sae)
    t = state.step + 1
    f32 = np.float32
    consts = (f32(lr), f32(beta1), f32(1 - beta1), f32(beta2), f32(1 - beta2),
              f32(1 - beta1 ** t), f32(1 - beta2 ** t), f32(eps))
    m, v = state.m, state.v
    # backward with Adam fused into the per-feature pass (no gradient matrices)
    mse, l1, _ = _cy_backward.train_backward(
        x, x_hat, params.W_enc, params.b_enc, params.W_dec, params.b_dec,
        codes.indptr, codes.indices, codes.values, norms, float(l1_coefficient),
        decoder_norm == "weighted_l1", decoder_norm == "unit_norm",
        m.W_enc, m.b_enc, m.W_dec, m.b_dec, v.W_enc, v.b_enc, v.W_dec, v.b_dec,
        consts, counts, nt)
    state.step = t
    if counts is not None and counts is not fire_counts:
        fire_counts += counts

    var = _cy_backward.batch_variance(x, _threads(x.size))
    ev = 1.0 - mse / var if var > 0 else 1.0
    return StepResult(mse=mse, l1=l1, total=mse + l1, l0=codes.nnz / n,
                      explained_variance=ev)


# ------------------------------------------------------------------ TopK family
def _topm(x, W_enc, b_enc, b_dec, m, aux_mask=None, m_aux=0):
    """Per row the ``m`` (<= d_sae) largest *positive* pre-activations, fused
    with the encoder matmul (``_cy_topk.topm_rows``): ``(vals, cols, cnt)``,
    values/columns ``[N, m]`` with each row's ``cnt[i]`` kept entries first,
    in increasing column order. With ``aux_mask`` (uint8 ``[d_sae]``) also
    the top ``m_aux`` positive ones among the masked columns, from the same
    tiles: ``((vals, cols, cnt), (aux_vals, aux_cols, aux_cnt))``."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    vals = np.empty((n, m), dtype=np.float32)
    cols = np.empty((n, m), dtype=np.int32)
    cnt = np.empty(n, dtype=np.int64)
    aux = None
    if aux_mask is not None:
        aux = (np.empty((n, m_aux), dtype=np.float32), np.empty((n, m_aux), dtype=np.int32),
               np.empty(n, dtype=np.int64))
    nt = _threads(n * W_enc.shape[0] * d_sae)
    tm = min(_TOPK_TM, max(16, -(-n // (4 * nt)))) if nt > 1 else _TOPK_TM
    with _blas_single():
        if aux is None:
            _cy_topk.topm_rows(x, W_enc, b_enc, b_dec, m, vals, cols, cnt, tm, _TN, nt)
        else:
            _cy_topk.topm_rows(x, W_enc, b_enc, b_dec, m, vals, cols, cnt, tm, _TN, nt,
                               aux_mask, *aux)
            return (vals, cols, cnt), aux
    return vals, cols, cnt


def _kept(cnt, m):
    """Mask ``[N, m]`` of the filled candidate slots."""
    return np.arange(m)[None, :] < cnt[:, None]


def _csr_from_mask(vals, cols, keep, shape, colmap=None) -> SparseCodes:
    """Canonical CSR of the kept ``[N, m]`` candidates (rows already sorted
    by column; row-major boolean indexing keeps that order); ``colmap``
    renames columns (increasing, so the order is kept)."""
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(keep, axis=1), out=indptr[1:])
    idx = cols[keep]
    if colmap is not None:
        idx = colmap[idx]
    return SparseCodes(indptr, np.ascontiguousarray(idx, dtype=np.int32),
                       np.ascontiguousarray(vals[keep]), shape)


def _check_k(k, name="k"):
    k = int(k)
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def encode_topk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """Per row the ``k`` largest pre-activations (ties: lower feature), then
    ReLU (entries it zeroes dropped): canonical :class:`SparseCodes`. The
    selection is fused into the tiled encoder; ``N x d_sae`` is never formed."""
    shape = (int(x.shape[0]), int(W_enc.shape[1]))
    m = min(_check_k(k), shape[1])
    vals, cols, cnt = _topm(x, W_enc, b_enc, b_dec, m)
    return _csr_from_mask(vals, cols, _kept(cnt, m), shape)


def _batch_select(vals, cols, kept, total):
    """Mask of the ``total`` best kept ``[N, m]`` candidates over the batch
    (value descending, ties to the lower row-major flat index: row, then
    column); every kept candidate when there are at most ``total``."""
    v = vals[kept]
    if v.size <= total:
        return kept.copy()
    kth = v.size - total  # ascending position of the total-th largest value
    vstar = np.partition(v, kth)[kth]
    keep = kept & (vals > vstar)
    need = total - int(np.count_nonzero(keep))
    eq_r, eq_c = np.nonzero(kept & (vals == vstar))
    order = np.lexsort((cols[eq_r, eq_c], eq_r))[:need]
    keep[eq_r[order], eq_c[order]] = True
    return keep


# BatchTopK candidate width per (d_sae, k): the last call's, so that a
# training run settles on a width that needs a single pass (as Numba does).
_cand: dict = {}


def encode_batchtopk(x, W_enc, b_enc, b_dec, k) -> SparseCodes:
    """The ``N * k`` largest pre-activations of the batch (ties: lower
    row-major flat index), then ReLU: canonical :class:`SparseCodes`.

    Exact in a fused pass: per row the top ``m`` positive candidates are kept
    (``m = 4k`` at first, then the width the last call for this
    ``(d_sae, k)`` ended with); the batch selection is made among them, and
    it is proven complete when every row whose ``m`` slots are full has its
    worst candidate outside the selection (then nothing that row dropped
    could have been selected; rows with free slots dropped no positive
    entry). Otherwise ``m`` grows (x4, up to ``d_sae``, where it is exact by
    construction) and the pass is redone."""
    n, d_sae = int(x.shape[0]), int(W_enc.shape[1])
    shape = (n, d_sae)
    k = _check_k(k)
    total = min(k * n, n * d_sae)
    key = (d_sae, k)
    m = min(d_sae, max(4 * k, _cand.get(key, 0)))
    while True:
        vals, cols, cnt = _topm(x, W_enc, b_enc, b_dec, m)
        kept = _kept(cnt, m)
        keep = _batch_select(vals, cols, kept, total)
        full = np.flatnonzero(cnt == m)
        if m >= d_sae or full.size == 0:
            break
        # each full row's worst candidate: smallest value, ties -> the larger column
        # (the last such slot, as slots are in column order)
        fv = vals[full]
        last_min = m - 1 - np.argmin(fv[:, ::-1], axis=1)
        if not np.any(keep[full, last_min]):
            break
        m = min(d_sae, 4 * m)
    _cand[key] = m
    return _csr_from_mask(vals, cols, keep, shape)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold) -> SparseCodes:
    """``relu(pre) * (pre > threshold)`` per feature: the fused sparse ReLU
    encoder, then the positive entries at or below their feature's threshold
    are dropped (same float32 ``pre`` values, so the same result as the
    reference)."""
    codes = encode_relu_sparse(x, W_enc, b_enc, b_dec)
    thr = np.asarray(threshold, dtype=np.float32)
    if thr.shape != (W_enc.shape[1],):
        raise ValueError("threshold must have shape [d_sae]")
    keep = codes.values > thr[codes.indices]
    counts = np.add.reduceat(keep.astype(np.int64), codes.indptr[:-1]) if keep.size else None
    indptr = np.zeros_like(codes.indptr)
    if counts is not None:
        # reduceat over an empty row repeats the next element: zero those rows
        counts[codes.indptr[:-1] == codes.indptr[1:]] = 0
        np.cumsum(counts, out=indptr[1:])
    return SparseCodes(indptr, np.ascontiguousarray(codes.indices[keep]),
                       np.ascontiguousarray(codes.values[keep]), codes.shape)


def _encode_aux(x, W_enc, b_enc, b_dec, dead_mask, k_aux):
    """AuxK selection (top ``k_aux`` among dead latents, then ReLU): the
    fused top-m encoder on the gathered dead columns of ``W_enc`` (their order,
    hence the tie rule, is kept), indices mapped back."""
    dead = np.flatnonzero(dead_mask).astype(np.int32)
    shape = (int(x.shape[0]), int(W_enc.shape[1]))
    m = min(int(k_aux), dead.size)
    if m == 0:
        return SparseCodes(np.zeros(shape[0] + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.float32), shape)
    W_d = np.ascontiguousarray(W_enc[:, dead])
    b_d = np.ascontiguousarray(b_enc[dead])
    vals, cols, cnt = _topm(x, W_d, b_d, b_dec, m)
    return _csr_from_mask(vals, cols, _kept(cnt, m), shape, colmap=dead)


def _aux_scale(dead_mask, k_aux, aux_coefficient):
    n_dead = int(np.count_nonzero(dead_mask))
    return float(aux_coefficient) * min(n_dead / int(k_aux), 1.0) if k_aux else 0.0


def _aux_grads(x, params: SAEParams, x_hat, aux: SparseCodes, weight, nt):
    """AuxK loss and gradients: ``aux = w mean_i ||e_hat_i - e_i||^2`` with
    ``e = x - x_hat`` constant and ``e_hat = aux @ W_dec`` (no bias).

    The sparse backward kernel computes these when handed
    ``x_hat' = x + w (e_hat - e)`` (its ``d_xhat = 2 (x_hat' - x) / N`` is
    then ``d_ehat``); its ``g_b_dec`` has ``sum_i d_ehat_i`` in it, which the
    AuxK term does not have (no bias in ``e_hat``), so that is taken out."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    e_hat = np.empty_like(x)
    _cy_decode.decode_csr(aux.indptr, aux.indices, aux.values, params.W_dec,
                          np.zeros(d_in, np.float32), e_hat, nt)
    diff = e_hat - (x - x_hat)
    loss = float(np.sum(diff.astype(np.float64) ** 2) / n) * weight
    fake = x + np.float32(weight) * diff
    g = SAEParams(np.empty_like(params.W_enc), np.empty_like(params.b_enc),
                  np.empty_like(params.W_dec), np.empty_like(params.b_dec))
    norms = np.ones(d_sae, dtype=np.float32)
    _cy_backward.gradients_csr(x, fake, params.W_enc, params.W_dec, params.b_dec,
                               aux.indptr, aux.indices, aux.values, norms, 0.0, False, True,
                               g.W_enc, g.b_enc, g.W_dec, g.b_dec, None, nt)
    g.b_dec -= (2.0 / n) * (fake - x).sum(axis=0, dtype=np.float64).astype(np.float32)
    return loss, g


def topk_gradients(x, params: SAEParams, codes, x_hat, aux_codes=None, aux_weight=0.0):
    """Losses and gradients for TopK/BatchTopK training (see
    :func:`fastsae.reference.topk_gradients`): the sparse backward with no L1
    term and a projected decoder gradient, plus the AuxK term."""
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    csr = _csr_of(codes, _threads(n * d_sae))
    nt = _threads((3 * csr[1].shape[0] + n) * d_in + d_in * d_sae)
    grads = SAEParams(np.empty_like(params.W_enc), np.empty_like(params.b_enc),
                      np.empty_like(params.W_dec), np.empty_like(params.b_dec))
    norms = np.ones(d_sae, dtype=np.float32)
    mse, _ = _grads_into(x, params, csr, x_hat, 0.0, "unit_norm", norms, grads, None, nt)
    aux = 0.0
    if aux_codes is not None and aux_weight > 0:
        if not isinstance(aux_codes, SparseCodes):
            aux_codes = SparseCodes(*_csr_of(aux_codes, nt), (n, d_sae))
        _check_csr(aux_codes)
        aux, g = _aux_grads(x, params, x_hat, aux_codes, float(aux_weight), nt)
        for name in SAEParams.NAMES:
            getattr(grads, name).__iadd__(getattr(g, name))
    return Losses(mse=mse, l1=0.0, total=mse + aux, aux=aux), grads


def train_step_topk(params: SAEParams, state: AdamState, x, *, k, activation="topk", lr,
                    beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None, dead_mask=None,
                    k_aux=0, aux_coefficient=0.0) -> StepResult:
    """One TopK/BatchTopK step (fused top-k encode, sparse decode, AuxK,
    sparse backward, Adam, decoder rows renormalized), in place; see
    :func:`fastsae.reference.train_step_topk`.

    Fused like the Numba backend's: with ``activation="topk"`` the AuxK
    selection (top ``k_aux`` among the dead latents) is made in the same tile
    epilogue as the TopK one (one encoder product; BatchTopK selects it with
    its own pass over the gathered dead columns), and the backward and Adam
    are one ``train_backward`` call for both loss terms (the AuxK codes are
    stacked under the main ones), so no gradient matrix is ever stored."""
    if activation not in ("topk", "batchtopk"):
        raise ValueError(f"unknown activation {activation!r}")
    _check_state(state, params)
    n, d_in, d_sae = x.shape[0], params.d_in, params.d_sae
    use_aux = (dead_mask is not None and k_aux > 0 and aux_coefficient > 0
               and bool(np.any(dead_mask)))
    aux_codes = None
    if use_aux and activation == "topk":
        shape = (int(n), int(d_sae))
        dead_u8 = np.ascontiguousarray(dead_mask, dtype=bool).view(np.uint8)
        if dead_u8.shape != (d_sae,):
            raise ValueError("dead_mask must have shape [d_sae]")
        m = min(_check_k(k), d_sae)
        ma = min(int(k_aux), int(np.count_nonzero(dead_u8)))
        (vals, cols, cnt), (avals, acols, acnt) = _topm(
            x, params.W_enc, params.b_enc, params.b_dec, m, dead_u8, ma)
        codes = _csr_from_mask(vals, cols, _kept(cnt, m), shape)
        aux_codes = _csr_from_mask(avals, acols, _kept(acnt, ma), shape)
    else:
        enc = encode_topk if activation == "topk" else encode_batchtopk
        codes = enc(x, params.W_enc, params.b_enc, params.b_dec, k)
        if use_aux:
            aux_codes = _encode_aux(x, params.W_enc, params.b_enc, params.b_dec, dead_mask,
                                    k_aux)
    nnz = codes.indices.shape[0]
    x_hat = np.empty_like(x)
    _cy_decode.decode_csr(codes.indptr, codes.indices, codes.values, params.W_dec,
                          params.b_dec, x_hat, _threads((nnz + n) * d_in))
    nnz_all = nnz + (aux_codes.indices.shape[0] if aux_codes is not None else 0)
    nt = _threads((3 * nnz_all + n) * d_in + 3 * d_in * d_sae)
    t = state.step + 1
    f32 = np.float32
    consts = (f32(lr), f32(beta1), f32(1 - beta1), f32(beta2), f32(1 - beta2),
              f32(1 - beta1 ** t), f32(1 - beta2 ** t), f32(eps))
    m_, v_ = state.m, state.v
    norms = np.ones(d_sae, dtype=np.float32)
    counts = None
    if fire_counts is not None and isinstance(fire_counts, np.ndarray) and \
            fire_counts.dtype == np.int64 and fire_counts.flags.c_contiguous and \
            fire_counts.flags.writeable:
        counts = fire_counts
    aux_args = ()
    if aux_codes is not None:
        aux_args = (aux_codes.indptr, aux_codes.indices, aux_codes.values,
                    _aux_scale(dead_mask, k_aux, aux_coefficient))
    mse, _, aux = _cy_backward.train_backward(
        x, x_hat, params.W_enc, params.b_enc, params.W_dec, params.b_dec,
        codes.indptr, codes.indices, codes.values, norms, 0.0, False, True,
        m_.W_enc, m_.b_enc, m_.W_dec, m_.b_dec, v_.W_enc, v_.b_enc, v_.W_dec, v_.b_dec,
        consts, counts, nt, *aux_args)
    if fire_counts is not None and counts is None:
        fire_counts += np.bincount(codes.indices, minlength=d_sae)
    state.step = t
    var = _cy_backward.batch_variance(x, _threads(x.size))
    ev = 1.0 - mse / var if var > 0 else 1.0
    vals = codes.values
    return StepResult(mse=mse, l1=0.0, total=mse + aux, l0=codes.nnz / n,
                      explained_variance=ev, aux=aux,
                      extra={"min_active": float(vals.min()) if vals.size else 0.0})
