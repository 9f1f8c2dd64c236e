"""Decoder row norms and the L1 subgradient (``fastsae.backends.cython._norms``).

Raw kernels on the arrays the validating front hands over (C-contiguous
float32 of matching shapes, CSR indices in range); the Python wrapper
(``fastsae/backends/cython/norms.py``) allocates the outputs.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrtf

from common cimport _sumsq


def decoder_column_norms(const float[:, ::1] W_dec, float[::1] out, int nthreads):
    """``out[j] = ||W_dec[j, :]||`` for ``W_dec [d_sae, d_in]``, ``out [d_sae]``.

    One pass over W_dec, parallel over rows (static blocks of rows, as
    Numba's ``prange`` splits them; one thread when ``nthreads <= 1``).
    Squares are summed in float32 by ``_sumsq`` (four 16-float vector
    accumulators, a register tree at the end, much like what Numba's
    ``fastmath=reassoc`` loop compiles to), within the float32 bound
    ``(d_in + 2) u ||w||`` the contract tests check.
    """
    cdef Py_ssize_t d_sae = W_dec.shape[0], d_in = W_dec.shape[1], j
    if out.shape[0] != d_sae:
        raise ValueError("out must have length d_sae")
    if nthreads <= 1:
        for j in range(d_sae):
            out[j] = sqrtf(_sumsq(&W_dec[j, 0], d_in))
        return
    for j in prange(d_sae, nogil=True, num_threads=nthreads, schedule="static"):
        out[j] = sqrtf(_sumsq(&W_dec[j, 0], d_in))


# L1 subgradient: ``l1_coefficient * norms[j]`` where ``f_ij > 0``, zero
# elsewhere. The product is formed as ``float32(c) * norms[j]``, the same
# float32 product the NumPy reference computes.

def l1_dense(const float[:, ::1] codes, const float[::1] norms, float c,
             float[:, ::1] out, int nthreads):
    """Dense ``codes [N, d_sae]``, ``norms [d_sae]`` -> ``out [N, d_sae]``."""
    cdef Py_ssize_t n = codes.shape[0], d_sae = codes.shape[1], i, j
    if out.shape[0] != n or out.shape[1] != d_sae:
        raise ValueError("out must have the shape of codes")
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        for j in range(d_sae):
            out[i, j] = c * norms[j] if codes[i, j] > 0 else 0


def l1_sparse(const int[::1] indices, const float[::1] values, const float[::1] norms,
              float c, float[::1] out, int nthreads):
    """Sparse: ``out[k] = c * norms[indices[k]]`` where ``values[k] > 0``,
    else 0 (the dense rule at a stored zero or negative value; the pattern
    is kept as given). ``indices`` must lie in ``[0, len(norms))``."""
    cdef Py_ssize_t nnz = indices.shape[0], k
    if out.shape[0] != nnz or values.shape[0] != nnz:
        raise ValueError("values and out must have one value per stored entry")
    for k in prange(nnz, nogil=True, num_threads=nthreads, schedule="static"):
        out[k] = c * norms[indices[k]] if values[k] > 0 else 0
