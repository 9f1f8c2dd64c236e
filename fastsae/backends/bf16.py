"""bfloat16 encoders with float32 values (``precision="bf16"``), shared by the
numba and cython backends.

The encoder product ``(x - b_dec) @ W_enc`` is computed from both operands
rounded to bfloat16 (round to nearest even) with float32 accumulation, by the
compiled C kernels in ``kernels/c/bf16_encode.c`` (the extension
``fastsae.backends.cython._bf16``, built by ``setup.py`` with the Cython
kernels). Selection (ReLU, JumpReLU, TopK and BatchTopK candidates) runs on each
output tile while it is in cache; then every selected entry's pre-activation is
recomputed in float32 (a dot product of ``x - b_dec`` with the feature's
encoder column, read from a transposed float32 copy of ``W_enc``), so the
codes' **values are float32 ones**. Only the support can differ from the
float32 encoders, and only for entries whose pre-activation is within the
bfloat16 product's error of the cut (0, the JumpReLU threshold, or TopK's
k-th value, BatchTopK's ``N * k``-th). The exact rule is :mod:`fastsae.backends.reference`'s
``precision="bf16"``, the oracle.

Paths, chosen at call time:

* ``avx512bf16``: ``vdpbf16ps`` (AMD Zen 4/5, Intel Cooper Lake, Sapphire
  Rapids and later), where CPUID and the OS allow it and the compiler that
  built the extension knew the instruction set;
* ``emulated``: portable C (bf16 widened to float32, float32 multiply-adds),
  every CPU; much slower than float32 BLAS, for testing and for machines
  without the instructions.

``FASTSAE_BF16_PATH`` (``auto``, the default, ``avx512bf16`` or
``emulated``) forces one. AMX (``_tile_dpbf16ps``) is not built yet: AMX CPUs
take the AVX512-BF16 path.

Cost: a contract call (``be.encode_topk(..., precision="bf16")``) packs
``W_enc`` first (bfloat16 panels plus the float32 transpose, one pass over
the weights; about 13 ms at d_in 512, d_sae 8192). :class:`BF16Encoder`
packs once and encodes many batches.

BatchTopK: the kernel keeps per row the ``K`` best positive bf16
pre-activations (with their float32 values) and counts the row's positive
ones; the batch selection (:func:`_batch_select`) then takes the ``N * m``
best bf16 candidates of the batch and the ``N * k`` best float32 values among
them. When a row with more positives than ``K`` might hold a candidate
beyond its buffer, the call is rerun with ``K`` doubled (as the float32
BatchTopK encoders do); the last ``K`` per ``(d_sae, k)`` is reused.

Training (``train_step``, ``train_step_topk``, ``train_step_matryoshka`` and
``train_step_jumprelu``, its default sparsity mode, with ``precision="bf16"``;
JumpReLU's step selects the entries above its window's low edge, ``theta -
bandwidth / 2``, the threshold mode with that cut, exactly: its bf16
candidates are taken below a cut lowered by a bound on the bf16 product's
error, :func:`~fastsae.backends.numerics.bf16_cut_margin`, so that every
entry whose float32 pre-activation is above the edge is one, and the step's
entries are the float32 step's):
the copy lives on the run's :class:`~fastsae.AdamState` (``state.bf16``, a
:class:`StepCopy`) and the fused Adam update of ``W_enc`` rewrites it as it
updates each piece of ``W_enc`` (no extra pass over the weights); a step
packs afresh only when the copy is missing or was not written by the last
step of this ``W_enc`` (the first step, after a float32 step, after
``state.bf16 = None``). The ReLU step runs the bfloat16 encoder unless the
previous step's codes were dense (density at least the backend's dense-path
threshold, ``tunables.*_RELU_DENSE_MIN_DENSITY``): there the float32 step
with dense BLAS products is faster, and it runs instead (a fresh ReLU SAE
fires half its features); the copy is then rebuilt when the codes are
sparse again. JumpReLU's step switches the same way, at
``tunables.*_JUMPRELU_DENSE_MIN_DENSITY``.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from ..sparse import SparseCodes
from . import numerics as NU
from .tunables import bf16_topk_candidates

__all__ = ["PATHS", "available_paths", "selected_path", "check_available", "BF16Encoder",
           "encode_relu_sparse", "encode_topk", "encode_batchtopk", "encode_jumprelu",
           "path_report", "StepCopy",
           "step_copy", "step_encode", "step_codes", "step_done", "bf16_step_wanted", "last_density",
           "restore_density", "invalidate_copy"]

#: Every path name, fastest first.
PATHS = ("avx512bf16", "emulated")
_ENV = "FASTSAE_BF16_PATH"

_IMPORT_ERROR: Exception | None = None
try:
    from .cython import _bf16 as _C
except ImportError as exc:  # not built (no compiler), or built for another Python
    _C = None
    _IMPORT_ERROR = exc


def check_available() -> None:
    """Raise ``ImportError`` saying why the compiled bf16 kernels are missing."""
    if _C is None:
        raise ImportError(
            f"precision='bf16' on the numba and cython backends needs fastsae's compiled "
            f"bfloat16 kernels (fastsae.backends.cython._bf16), which are not importable "
            f"({_IMPORT_ERROR}); they are built by `pip install .` with a C compiler. The "
            f"numpy backend computes the same rule (slowly) without them")


def available_paths() -> tuple:
    """The paths this CPU, OS and build run, fastest first (empty without the
    compiled kernels; otherwise always ending with ``"emulated"``)."""
    if _C is None:
        return ()
    return (("avx512bf16",) if _C.has_avx512bf16() else ()) + ("emulated",)


def selected_path() -> str:
    """The path a call makes now: ``FASTSAE_BF16_PATH`` if set (``auto``: the
    fastest available). Raises when the kernels are missing or the forced path
    does not run here."""
    check_available()
    want = _wanted()
    have = available_paths()
    if want == "auto":
        return have[0]
    if want not in PATHS:
        raise ValueError(f"{_ENV}={want!r}: expected 'auto' or one of {PATHS}")
    if want not in have:
        raise RuntimeError(f"{_ENV}={want!r}, but this CPU (or this build) runs only "
                           f"{have}{_why_not(want)}")
    return want


def _wanted() -> str:
    """``FASTSAE_BF16_PATH`` normalized (unset or empty: ``"auto"``)."""
    return os.environ.get(_ENV, "auto").strip().lower() or "auto"


def _why_not(path: str) -> str:
    if path == "avx512bf16" and not _C.built_avx512bf16():
        return ": the compiler that built fastsae did not know AVX512-BF16"
    if path == "avx512bf16":
        return ": the CPU (or OS) lacks AVX512-BF16"
    return ""


def path_report() -> str:
    """One line for ``fastsae info``: which bf16 path this machine gets, and why."""
    if _C is None:
        return f"bf16: compiled kernels unavailable ({_IMPORT_ERROR}); numpy emulation only"
    try:
        path = selected_path()
    except (RuntimeError, ValueError) as exc:
        return f"bf16: {exc}"
    why = ("the CPU has AVX512-BF16" if path == "avx512bf16"
           else "no AVX512-BF16 here" + _why_not("avx512bf16"))
    forced = f" (forced by {_ENV})" if _wanted() != "auto" else ""
    return f"bf16: {path} path{forced}; {why}; AMX not built yet"


def _code(path: str) -> int:
    return _C.AVX512BF16 if path == "avx512bf16" else _C.EMULATED


def _threads(threads) -> int:
    if threads is None:
        import numba

        return int(numba.get_num_threads())
    return max(1, int(threads))


class BF16Encoder:
    """An SAE encoder packed once for bfloat16 products.

    ``W_enc`` float32 ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``b_dec``
    ``[d_in]`` (``None``: zeros, a transcoder's uncentered input), all
    finite; copies are kept, so later changes to the arrays are not seen.
    ``threads``: OpenMP threads of each call (default: Numba's thread count).
    Each method returns canonical :class:`~fastsae.SparseCodes` equal, bit for
    bit, to the contract function of the same name with ``precision="bf16"``
    on the same path and thread count.
    """

    def __init__(self, W_enc, b_enc, b_dec=None, *, threads=None):
        check_available()
        from . import validate as V

        W_enc = V.as_float_array(W_enc, "W_enc", 2)
        self.d_in, self.d_sae = W_enc.shape
        if b_dec is None:
            b_dec = np.zeros(self.d_in, dtype=np.float32)
        b_enc = V.as_float_array(b_enc, "b_enc", 1)
        b_dec = V.as_float_array(b_dec, "b_dec", 1)
        V.check_dim("b_enc", b_enc.shape[0], self.d_sae, "length (d_sae)")
        V.check_dim("b_dec", b_dec.shape[0], self.d_in, "length (d_in)")
        self.b_enc = b_enc.copy()
        self.b_dec = b_dec.copy()
        self.threads = _threads(threads)
        selected_path()  # an unusable FASTSAE_BF16_PATH fails here, before any batch
        self._Wp, self._WT = _C.pack(W_enc, self.threads)

    def _x(self, x):
        from . import validate as V

        x = V.as_float_array(x, "x", 2)
        V.check_dim("x", x.shape[1], self.d_in, "width (d_in)")
        return x

    def _run(self, x, thr, k, m) -> SparseCodes:
        return _run(selected_path(), x, self.b_dec, self._Wp, self._WT, self.b_enc, thr, k, m,
                    self.threads)

    def relu(self, x) -> SparseCodes:
        """ReLU codes of ``x [N, d_in]`` (``encode_relu_sparse``)."""
        return self._run(self._x(x), None, 0, 0)

    def jumprelu(self, x, threshold) -> SparseCodes:
        """JumpReLU codes: ``pre > max(threshold, 0)`` (``encode_jumprelu``)."""
        from . import validate as V

        threshold = V.as_float_array(threshold, "threshold", 1)
        V.check_dim("threshold", threshold.shape[0], self.d_sae, "length")
        return self._run(self._x(x), _cut(threshold), 0, 0)

    def topk(self, x, k) -> SparseCodes:
        """Per row the ``k`` largest pre-activations, ReLU (``encode_topk``)."""
        from . import validate as V

        return self._run(self._x(x), None, *_topk_km(V.as_int(k, "k"), self.d_sae))

    def batchtopk(self, x, k) -> SparseCodes:
        """The batch's ``N * k`` largest pre-activations, ReLU (``encode_batchtopk``)."""
        from . import validate as V

        x = self._x(x)
        csr = _batchtopk(selected_path(), x, self.b_dec, self._Wp, self._WT, self.b_enc,
                         V.as_int(k, "k"), self.threads)
        return SparseCodes(*csr, (x.shape[0], self.d_sae))


def _cut(threshold) -> np.ndarray:
    """JumpReLU keeps ``pre > threshold`` and ``pre > 0``: one cut, ``max(threshold, 0)``."""
    return np.ascontiguousarray(np.maximum(threshold, 0), dtype=np.float32)


def _topk_km(k: int, d_sae: int) -> tuple:
    """``(k, m)`` of the TopK call: ``k`` clipped to ``d_sae``, ``m`` candidates."""
    k = min(int(k), d_sae)
    return k, bf16_topk_candidates(k, d_sae)


def _run(path, x, b_dec, Wp, WT, b_enc, thr, k, m, threads) -> SparseCodes:
    """One call of the compiled encoder on ``path`` (a name of :data:`PATHS`)."""
    indptr, indices, values = _C.encode(_code(path), x, b_dec, Wp, WT, b_enc, thr, k, m,
                                        threads)
    return SparseCodes(indptr, indices, values, (x.shape[0], WT.shape[0]))


# BatchTopK: candidate buffer width per (d_sae, k), from the last call
_cand: dict = {}


def _batchtopk(path, x, b_dec, Wp, WT, b_enc, k, threads) -> tuple:
    """The bf16 BatchTopK codes as CSR ``(indptr, indices, values)``: per-row
    candidate buffers from the compiled kernel, then :func:`_batch_select`,
    rerun with wider buffers while a truncated row might matter."""
    n, d_sae = x.shape[0], WT.shape[0]
    k, m = _topk_km(k, d_sae)
    key = (d_sae, k)
    K = min(d_sae, max(_cand.get(key, 0), 4 * m))
    while True:
        bufs = _C.encode_candidates(_code(path), x, b_dec, Wp, WT, b_enc, K, threads)
        out = _batch_select(*bufs, n * m, n * k, d_sae)
        if out is not None or K >= d_sae:
            break
        K = min(d_sae, 2 * K)
    *csr, used = out
    # the next call starts from this width, or half of it once no row used
    # even a quarter of it (one odd batch does not keep the buffers wide)
    _cand[key] = K if 4 * used > K else max(4 * m, K // 2)
    return tuple(csr)


def _batch_select(counts, npos, cols, pre, vals, n_cand, total, d_sae):
    """The batch selection of bf16 BatchTopK (the rule of
    :func:`fastsae.backends.reference.encode_batchtopk`) on the kernel's
    per-row buffers (each sorted by bf16 value desc, column asc): the
    ``n_cand`` best bf16 candidates (ties row-major), then the ``total`` best
    float32 values among them (ties row-major), then those > 0. Returns CSR
    ``(indptr, indices, values, used)`` (``used``: the most candidates one
    row gave), or None when a truncated row (more positives than its buffer)
    might hold a candidate beyond its buffer."""
    n, K = cols.shape
    counts = np.asarray(counts)
    valid = np.arange(K)[None, :] < counts[:, None]
    pb, pf, cc = pre[valid], vals[valid], cols[valid]
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    truncated = np.asarray(npos) > counts
    tot = pb.shape[0]
    if tot <= n_cand:
        if truncated.any():  # every positive is a candidate, and some were not kept
            return None
        used = int(counts.max(initial=0))
    else:
        # the n_cand-th best bf16 value; a truncated row whose last kept value
        # reaches it may have equal or better ones beyond its buffer
        t_b = np.partition(pb, tot - n_cand)[tot - n_cand]
        last = pre[np.flatnonzero(truncated), counts[truncated] - 1]
        if (last >= t_b).any():
            return None
        take = pb > t_b
        ties = np.flatnonzero(pb == t_b)  # row-major: rows in order, columns ascending
        take[ties[:n_cand - int(take.sum())]] = True
        pf, cc, rows = pf[take], cc[take], rows[take]
        used = int(np.bincount(rows, minlength=1).max())
    if pf.shape[0] > total:
        t_f = np.partition(pf, pf.shape[0] - total)[pf.shape[0] - total]
        take = pf > t_f
        ties = np.flatnonzero(pf == t_f)
        ties = ties[np.lexsort((cc[ties], rows[ties]))]  # row-major among equal values
        take[ties[:total - int(take.sum())]] = True
        pf, cc, rows = pf[take], cc[take], rows[take]
    pos = pf > 0
    pf, cc, rows = pf[pos], cc[pos], rows[pos]
    order = np.argsort(rows * d_sae + cc, kind="stable")
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return (indptr, np.ascontiguousarray(cc[order], dtype=np.int32),
            np.ascontiguousarray(pf[order], dtype=np.float32), used)


# The contract's bf16 entries (called by the numba and cython faces with
# validated arrays and their own thread count): pack, then encode.
def _encode(x, W_enc, b_enc, b_dec, thr, k, m, threads) -> SparseCodes:
    path = selected_path()  # a bad FASTSAE_BF16_PATH fails before the packing pass
    Wp, WT = _C.pack(W_enc, threads)
    return _run(path, x, b_dec, Wp, WT, b_enc, thr, k, m, threads)


def encode_relu_sparse(x, W_enc, b_enc, b_dec, threads) -> SparseCodes:
    """bf16 ReLU encoder on validated float32 arrays (see the module docstring)."""
    return _encode(x, W_enc, b_enc, b_dec, None, 0, 0, threads)


def encode_jumprelu(x, W_enc, b_enc, b_dec, threshold, threads) -> SparseCodes:
    """bf16 JumpReLU encoder on validated float32 arrays."""
    return _encode(x, W_enc, b_enc, b_dec, _cut(threshold), 0, 0, threads)


def encode_topk(x, W_enc, b_enc, b_dec, k, threads) -> SparseCodes:
    """bf16 TopK encoder on validated float32 arrays (``k`` clipped to ``d_sae``)."""
    return _encode(x, W_enc, b_enc, b_dec, None, *_topk_km(k, W_enc.shape[1]), threads)


def encode_batchtopk(x, W_enc, b_enc, b_dec, k, threads) -> SparseCodes:
    """bf16 BatchTopK encoder on validated float32 arrays."""
    path = selected_path()
    Wp, WT = _C.pack(W_enc, threads)
    csr = _batchtopk(path, x, b_dec, Wp, WT, b_enc, k, threads)
    return SparseCodes(*csr, (x.shape[0], W_enc.shape[1]))


# ---------------------------------------------------------------- training steps
class StepCopy:
    """What a run's ``precision="bf16"`` steps keep between steps, on its
    :class:`~fastsae.AdamState` as ``state.bf16``: ``Wp`` (uint16 panels)
    and ``WT`` (float32 ``[d_sae, d_in]``) of ``W_enc`` as
    ``kernels/c/bf16_encode.h`` lays them out, ``key`` (which ``W_enc`` at
    which step they are a copy of; ``None``: stale), ``ref`` (a weak reference
    to that ``W_enc``, so a new array that happens to reuse the old one's
    memory is not taken for it) and ``density`` (the last step's L0 / d_sae;
    ``None``: unknown)."""

    __slots__ = ("Wp", "WT", "key", "ref", "density")

    def __init__(self):
        self.Wp = self.WT = self.key = self.ref = self.density = None


def _state_copy(state) -> StepCopy:
    if not isinstance(state.bf16, StepCopy):
        state.bf16 = StepCopy()
    return state.bf16


def _key(state, W_enc) -> tuple:
    return (int(state.step), W_enc.__array_interface__["data"][0], W_enc.shape)


def bf16_step_wanted(state, dense_min_density: float) -> bool:
    """Whether a ReLU step with ``precision="bf16"`` runs the bfloat16
    encoder: unless the last step's codes were at least ``dense_min_density``
    dense (then the float32 step's dense path is the faster one). Raises as
    :func:`selected_path` first, so that a bad ``FASTSAE_BF16_PATH`` fails
    every bf16 step, also one that would take the float32 path."""
    selected_path()
    sc = state.bf16
    d = sc.density if isinstance(sc, StepCopy) else None
    return d is None or d < dense_min_density


def step_copy(state, W_enc, threads):
    """``(Wp, WT)`` for the step about to run: the copy the previous step's
    Adam update wrote, when it is a copy of this ``W_enc`` after
    ``state.step`` steps, else packed now. Raises as :func:`selected_path`
    when the kernels or the forced path are missing."""
    selected_path()
    sc = _state_copy(state)
    if sc.key != _key(state, W_enc) or sc.Wp is None or sc.ref is None or sc.ref() is not W_enc:
        sc.key = None
        sc.Wp, sc.WT = _C.pack(W_enc, threads)
    return sc.Wp, sc.WT


def step_encode(x, b_dec, b_enc, Wp, WT, k, threads, batch=False, thr=None) -> tuple:
    """The step's bfloat16 encoder on the packed copy: ReLU (``k == 0``;
    with ``thr`` float32 ``[d_sae]``: exactly the entries whose float32
    pre-activation is above ``thr``, JumpReLU's candidates, selected from the
    bf16 product below a cut lowered by a bound on its error,
    :func:`~fastsae.backends.numerics.bf16_cut_margin`), TopK's ``k`` per
    row, or (``batch``) BatchTopK's ``N * k``. Returns CSR arrays
    ``(indptr, indices, values)``."""
    if batch:
        return _batchtopk(selected_path(), x, b_dec, Wp, WT, b_enc, k, threads)
    kk, m = (0, 0) if k == 0 else _topk_km(k, WT.shape[0])
    t = cut = None
    if thr is not None:
        t = np.ascontiguousarray(thr, dtype=np.float32)
        cut = NU.bf16_cut_margin(t, b_enc, WT)
    return _C.encode(_code(selected_path()), x, b_dec, Wp, WT, b_enc, t, kk, m, threads, cut)


def step_codes(state, x, W_enc, b_enc, b_dec, k, threads, batch=False, thr=None) -> tuple:
    """A ``precision="bf16"`` step's encoder: :func:`step_copy` then
    :func:`step_encode`. Returns ``((indptr, indices, values), (Wp, WT))``,
    the CSR codes and the copy the step's weight pass then rewrites."""
    Wp, WT = step_copy(state, W_enc, threads)
    return step_encode(x, b_dec, b_enc, Wp, WT, k, threads, batch, thr), (Wp, WT)


def step_done(state, W_enc, *, wrote: bool, nnz: int, n: int) -> None:
    """After a step of a ``precision="bf16"`` run (``state.step`` already
    advanced): the copy is current exactly when this step's weight pass
    wrote it; the step's density is kept for :func:`bf16_step_wanted`."""
    sc = _state_copy(state)
    sc.key = _key(state, W_enc) if wrote else None
    sc.ref = weakref.ref(W_enc) if wrote else None
    sc.density = float(nnz) / max(1, int(n) * int(W_enc.shape[1]))


def last_density(state):
    """The last bf16-run step's code density kept on ``state`` (None: none yet).
    It decides the next ReLU step's path, so a checkpoint keeps it (resume is
    then bit-exact); the copy itself is rebuilt by packing, bit for bit."""
    sc = state.bf16
    return sc.density if isinstance(sc, StepCopy) else None


def restore_density(state, density) -> None:
    """Put a checkpoint's :func:`last_density` back on a fresh ``state``."""
    _state_copy(state).density = float(density)


def invalidate_copy(state) -> None:
    """Mark ``state``'s bf16 copy stale (``W_enc`` was changed outside a
    step, e.g. by resampling), keeping the last step's density."""
    if isinstance(state.bf16, StepCopy):
        state.bf16.key = None
