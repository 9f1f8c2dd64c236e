"""L1 subgradient (``fastsae._cy_l1``): ``l1_coefficient * norms[j]`` where
``f_ij > 0``, zero elsewhere.

Raw kernels: the caller has validated shapes, dtypes and sparse indices.
The product is formed as ``float32(c) * norms[j]``, the same float32 product
the NumPy reference computes.
"""

cimport cython
from cython.parallel cimport prange


def l1_dense(const float[:, ::1] codes, const float[::1] norms, float c,
             float[:, ::1] out, int nthreads):
    """Dense ``codes [N, d_sae]`` -> ``out [N, d_sae]``."""
    cdef Py_ssize_t n = codes.shape[0], d_sae = codes.shape[1], i, j
    if norms.shape[0] != d_sae or out.shape[0] != n or out.shape[1] != d_sae:
        raise ValueError("shape mismatch")
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        for j in range(d_sae):
            out[i, j] = c * norms[j] if codes[i, j] > 0 else 0


def l1_sparse(const int[::1] indices, const float[::1] norms, float c, float[::1] out,
              int nthreads):
    """Sparse: ``out[k] = c * norms[indices[k]]`` at every stored entry (the
    reference's sparse rule: the pattern is kept as given)."""
    cdef Py_ssize_t nnz = indices.shape[0], k
    if out.shape[0] != nnz:
        raise ValueError("shape mismatch")
    for k in prange(nnz, nogil=True, num_threads=nthreads, schedule="static"):
        out[k] = c * norms[indices[k]]
