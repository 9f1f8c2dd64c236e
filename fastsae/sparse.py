"""Sparse feature codes in CSR form.

After ReLU (or TopK) only a few dozen of thousands of features are active per
row, so codes travel between kernels as CSR: ``indptr`` int64 ``[N + 1]``,
``indices`` int32 ``[nnz]``, ``values`` float32 ``[nnz]`` and ``shape = (N,
d_sae)``. Canonical form, which every encoder of every backend produces and
which tests compare exactly: within each row the column indices are strictly
increasing, and no stored value is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SparseCodes", "check_codes"]

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class SparseCodes:
    """CSR matrix of feature activations, shape ``(N, d_sae)``.

    Attributes
    ----------
    indptr : int64 [N + 1]
        Row ``i`` holds entries ``indptr[i]:indptr[i + 1]``.
    indices : int32 [nnz]
        Feature (column) index of each entry, strictly increasing in a row.
    values : float32 [nnz]
        Activation of each entry.
    shape : tuple (N, d_sae)

    Arrays may live on a GPU (CUDA backend); :meth:`to_host` copies them back.
    """

    indptr: object
    indices: object
    values: object
    shape: tuple

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, f) -> "SparseCodes":
        """Build from a dense, non-empty ``[N, d_sae]`` array of real numbers
        (converted to float32); zeros, including values that round to 0 in
        float32, are dropped."""
        f = np.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"from_dense expects a 2-D array, got shape {f.shape}")
        if f.dtype.kind not in "fiub":
            raise TypeError(f"from_dense expects real numbers, got dtype {f.dtype}")
        if f.size == 0:
            raise ValueError(f"from_dense expects a non-empty array, got shape {f.shape}")
        f = np.ascontiguousarray(f, dtype=np.float32)
        rows, cols = np.nonzero(f)  # row-major order: columns sorted per row
        counts = np.bincount(rows, minlength=f.shape[0])
        indptr = np.zeros(f.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), f[rows, cols].astype(np.float32),
                   (int(f.shape[0]), int(f.shape[1])))

    @classmethod
    def from_scipy(cls, m) -> "SparseCodes":
        """Build from any non-empty ``scipy.sparse`` matrix or array of real
        numbers (a converted copy: ``m`` is never modified). Duplicates are
        summed, and zeros, including values that round to 0 in float32, are
        dropped."""
        import scipy.sparse as sp

        if not sp.issparse(m):
            raise TypeError(f"from_scipy expects a scipy.sparse matrix or array, "
                            f"got {type(m).__name__}")
        if m.dtype.kind not in "fiub":
            raise TypeError(f"from_scipy expects real numbers, got dtype {m.dtype}")
        if 0 in m.shape:
            raise ValueError(f"from_scipy expects a non-empty matrix, got shape {m.shape}")
        # a copy (m is never touched); duplicates summed in m's own dtype, as
        # m.toarray() does, then rounded to float32 before zeros are dropped
        m = sp.csr_array(m, copy=True)
        m.sum_duplicates()
        m.data = m.data.astype(np.float32)
        m.eliminate_zeros()
        m.sort_indices()
        return cls(m.indptr.astype(np.int64), m.indices.astype(np.int32),
                   np.ascontiguousarray(m.data, dtype=np.float32),
                   (int(m.shape[0]), int(m.shape[1])))

    # ---------------------------------------------------------------- export
    def to_host(self) -> "SparseCodes":
        """Return a copy whose arrays are NumPy arrays (no-op on the CPU)."""
        if isinstance(self.values, np.ndarray):
            return self
        return SparseCodes(*(np.asarray(a.copy_to_host() if hasattr(a, "copy_to_host") else a)
                             for a in (self.indptr, self.indices, self.values)), self.shape)

    def checked(self, d_sae=None) -> "SparseCodes":
        """These codes validated by :func:`check_codes` (``ValueError`` /
        ``TypeError`` naming the bad part) in canonical dtypes: int64
        ``indptr``, int32 ``indices``, float32 ``values``."""
        return check_codes(self, d_sae)

    def _host_checked(self) -> "SparseCodes":
        """Host codes, checked, with canonical index dtypes but the values'
        own float dtype (a float64 oracle keeps its precision)."""
        h = self.to_host()
        c = check_codes(h, finite=False)  # an encoder's overflow (inf) is shown as it is
        return SparseCodes(c.indptr, c.indices, np.asarray(h.values), c.shape)

    def to_dense(self) -> np.ndarray:
        """Dense ``[N, d_sae]`` array (float32, or the values' wider float
        dtype); the codes are checked first (:func:`check_codes`)."""
        h = self._host_checked()
        out = np.zeros(h.shape, dtype=np.result_type(h.values.dtype, np.float32))
        rows = np.repeat(np.arange(h.shape[0]), np.diff(h.indptr))
        out[rows, h.indices] = h.values
        return out

    def to_scipy(self):
        """``scipy.sparse.csr_array`` of these codes (checked first; shares the
        arrays when they already have the canonical dtypes)."""
        import scipy.sparse as sp

        h = self._host_checked()
        return sp.csr_array((h.values, h.indices, h.indptr), shape=h.shape)

    def prefix(self, width: int) -> "SparseCodes":
        """The codes of features ``[0, width)`` only (a Matryoshka prefix),
        same shape, canonical, on the host."""
        h = self._host_checked()
        keep = h.indices < int(width)
        rows = np.repeat(np.arange(h.shape[0]), np.diff(h.indptr))
        counts = np.bincount(rows[keep], minlength=h.shape[0])
        indptr = np.zeros(h.shape[0] + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return SparseCodes(indptr, h.indices[keep], h.values[keep], h.shape)

    # ------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        if isinstance(self.indptr, np.ndarray):
            return int(self.indptr[-1])
        last = self.indptr[-1:]  # one element, not the whole structure, off the device
        return int(np.asarray(last.copy_to_host() if hasattr(last, "copy_to_host") else last)[0])

    def row_counts(self) -> np.ndarray:
        """Number of active features in each row, int64 ``[N]``."""
        return np.diff(self._host_checked().indptr)

    @property
    def l0(self) -> float:
        """Mean number of active features per row."""
        return self.nnz / self.shape[0] if self.shape[0] else 0.0

    def __repr__(self) -> str:
        return (f"SparseCodes(shape={self.shape}, nnz={self.nnz}, "
                f"l0={self.l0:.2f})")


# ------------------------------------------------------------------ checks
def device_shape_dtype(a) -> tuple:
    """``(shape, dtype)`` of a device array, read from its interface (no copy)."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:  # the CUDA simulator's arrays
        return tuple(a.shape), np.dtype(a.dtype)
    return tuple(iface["shape"]), np.dtype(iface["typestr"])


def is_device_array(a) -> bool:
    """A GPU array (``__cuda_array_interface__``), or an array of the CUDA
    simulator (which marks its arrays with ``__cuda_ndarray__``)."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _as_index_array(a, name: str) -> np.ndarray:
    """``a`` as a 1-D integer array in its own dtype, signed or unsigned;
    values beyond int64 and every non-integer dtype are refused. The checks
    only compare these values (no differences, which wrap in unsigned
    dtypes), so they need no int64 copy."""
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be a 1-D integer array: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond the int64 range of indices")
    return arr


def check_codes(codes, d_sae=None, name: str = "codes", finite: bool = True) -> SparseCodes:
    """Check a :class:`SparseCodes` fully and return it in canonical dtypes.

    The one validation of codes, used by the kernel front and by
    :class:`SparseCodes`'s own methods: compiled kernels index with these
    arrays, so every index is proven in range first. ``indptr`` and
    ``indices`` may have any integer dtype (signed or unsigned): the checks
    compare values and never subtract them, so an unsigned ``indptr`` cannot
    hide a decrease by wrapping (``np.diff`` would). ``indptr`` must start
    at 0, never decrease and end at ``nnz``, and ``indices`` must lie in
    ``[0, d_sae)`` and strictly increase within each row (no duplicates).
    ``values`` must be real floating point and (unless ``finite`` is false)
    finite. Returns ``SparseCodes`` with int64 ``indptr``, int32 ``indices``
    and float32 ``values`` (C-contiguous; the arrays themselves when they
    already are), converted once the checks have passed. O(nnz).

    Codes on a GPU (CUDA backend) are checked for dtypes and lengths only
    (reading their contents would cost a device round trip); those the CUDA
    backend makes are canonical by construction.
    """
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"{name} must be a fastsae.SparseCodes, got {type(codes).__name__}")
    try:
        n, cols = (int(s) for s in codes.shape)
    except Exception:
        raise ValueError(f"{name}.shape must be a pair of ints, got {codes.shape!r}") from None
    if n <= 0 or cols <= 0:
        raise ValueError(f"{name} must not be empty, got shape {codes.shape}")
    if cols - 1 > np.iinfo(np.int32).max:
        raise ValueError(f"{name} has d_sae = {cols}, beyond the int32 feature indices")
    if d_sae is not None and cols != d_sae:
        raise ValueError(f"{name} has d_sae (shape[1]) = {cols}, expected {d_sae} to match "
                         "the other arguments")
    arrays = (codes.indptr, codes.indices, codes.values)
    if any(is_device_array(a) for a in arrays):
        return _check_device_codes(codes, n, name)
    # int64 (no copy when canonical): row starts index an nnz-long mask below
    indptr = _as_index_array(codes.indptr, f"{name}.indptr").astype(np.int64, copy=False)
    indices = _as_index_array(codes.indices, f"{name}.indices")
    try:
        values = np.asarray(codes.values)
    except Exception as exc:
        raise TypeError(f"{name}.values must be a 1-D float array: {exc}") from None
    if values.dtype.kind != "f" or values.ndim != 1:
        raise TypeError(f"{name}.values must be a 1-D float array, got dtype {values.dtype} "
                        f"shape {values.shape}")
    if indptr.shape[0] != n + 1:
        raise ValueError(f"{name}.indptr must have length N + 1 = {n + 1}, "
                         f"got {indptr.shape[0]}")
    nnz = indices.shape[0]
    if values.shape[0] != nnz:
        raise ValueError(f"{name}: {nnz} indices but {values.shape[0]} values")
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(indptr[1:] < indptr[:-1]):
        raise ValueError(f"{name}.indptr must start at 0, never decrease and end at "
                         f"nnz = {nnz}")
    if nnz:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= cols:
            raise ValueError(f"{name}.indices must lie in [0, {cols}), got [{lo}, {hi}]")
        # within a row each index must exceed the previous one; a row start
        # (an entry that some indptr[i], 0 < i < N, points at) has no previous
        row_start = np.zeros(nnz, dtype=bool)
        row_start[indptr[:-1][indptr[:-1] < nnz]] = True
        if np.any((indices[1:] <= indices[:-1]) & ~row_start[1:]):
            raise ValueError(f"{name}.indices must be strictly increasing within each row "
                             "(sorted, no duplicates)")
        if finite and not np.isfinite(values).all():
            raise ValueError(f"{name}.values contains NaN or infinite values")
    return SparseCodes(np.ascontiguousarray(indptr),
                       np.ascontiguousarray(indices, dtype=np.int32),
                       np.ascontiguousarray(values, dtype=np.float32), (n, cols))


def _check_device_codes(codes, n: int, name: str) -> SparseCodes:
    want = (("indptr", np.int64, (n + 1,)), ("indices", np.int32, None),
            ("values", np.float32, None))
    lengths = []
    for part, dtype, shape in want:
        a = getattr(codes, part)
        if not is_device_array(a):
            raise TypeError(f"{name}: {part} is on the host but the other arrays are on the "
                            "device; move all three with the backend's to_backend")
        got_shape, got_dtype = device_shape_dtype(a)
        if got_dtype != dtype or len(got_shape) != 1:
            raise TypeError(f"{name}.{part} must be a 1-D {np.dtype(dtype)} device array, "
                            f"got {got_dtype} shape {got_shape}")
        if shape is not None and got_shape != shape:
            raise ValueError(f"{name}.{part} must have length N + 1 = {n + 1}, "
                             f"got {got_shape[0]}")
        lengths.append(got_shape[0])
    if lengths[1] != lengths[2]:
        raise ValueError(f"{name}: {lengths[1]} indices but {lengths[2]} values")
    return codes
