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

__all__ = ["SparseCodes"]


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
        """Build from a dense ``[N, d_sae]`` array; zeros are dropped."""
        f = np.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"from_dense expects a 2-D array, got shape {f.shape}")
        f = np.ascontiguousarray(f, dtype=np.float32)
        rows, cols = np.nonzero(f)  # row-major order: columns sorted per row
        counts = np.bincount(rows, minlength=f.shape[0])
        indptr = np.zeros(f.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), f[rows, cols].astype(np.float32),
                   (int(f.shape[0]), int(f.shape[1])))

    @classmethod
    def from_scipy(cls, m) -> "SparseCodes":
        """Build from any ``scipy.sparse`` matrix or array (converted to CSR)."""
        import scipy.sparse as sp

        m = sp.csr_array(m)
        m.sum_duplicates()
        m.eliminate_zeros()
        m.sort_indices()
        return cls(m.indptr.astype(np.int64), m.indices.astype(np.int32),
                   m.data.astype(np.float32), (int(m.shape[0]), int(m.shape[1])))

    # ---------------------------------------------------------------- export
    def to_host(self) -> "SparseCodes":
        """Return a copy whose arrays are NumPy arrays (no-op on the CPU)."""
        if isinstance(self.values, np.ndarray):
            return self
        return SparseCodes(*(np.asarray(a.copy_to_host() if hasattr(a, "copy_to_host") else a)
                             for a in (self.indptr, self.indices, self.values)), self.shape)

    def to_dense(self) -> np.ndarray:
        """Dense ``[N, d_sae]`` array (float32, or the values' wider dtype)."""
        h = self.to_host()
        out = np.zeros(h.shape, dtype=np.result_type(h.values.dtype, np.float32))
        rows = np.repeat(np.arange(h.shape[0]), np.diff(h.indptr))
        out[rows, h.indices] = h.values
        return out

    def to_scipy(self):
        """``scipy.sparse.csr_array`` sharing this object's data."""
        import scipy.sparse as sp

        h = self.to_host()
        return sp.csr_array((h.values, h.indices, h.indptr), shape=h.shape)

    # ------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        if isinstance(self.indptr, np.ndarray):
            return int(self.indptr[-1])
        last = self.indptr[-1:]  # one element, not the whole structure, off the device
        return int(np.asarray(last.copy_to_host() if hasattr(last, "copy_to_host") else last)[0])

    def row_counts(self) -> np.ndarray:
        """Number of active features in each row, int64 ``[N]``."""
        return np.diff(self.to_host().indptr)

    @property
    def l0(self) -> float:
        """Mean number of active features per row."""
        return self.nnz / self.shape[0] if self.shape[0] else 0.0

    def __repr__(self) -> str:
        return (f"SparseCodes(shape={self.shape}, nnz={self.nnz}, "
                f"l0={self.l0:.2f})")
