"""Decoder ``x_hat = f @ W_dec + b_dec`` (``fastsae.backends.cython._decode``).

Sparse codes: each output row is ``b_dec`` plus the active decoder rows
scaled by their activations, a gather-accumulate of ``N * L0 * d_in``
multiply-adds, parallel over rows (each thread owns its output rows: no
races). Dense codes: the same gather, skipping zeros, when few entries are
nonzero; otherwise a BLAS ``sgemm`` (row blocks in parallel).

Raw kernels: the validating front guarantees the inputs (C-contiguous
float32 of matching shapes; canonical CSR with in-range indices and
``indptr[N] == nnz``); only the output buffer and the tiling, which the
wrapper supplies, are checked.
"""

cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int64_t, int32_t

from common cimport _axpy, _sgemm_rm, blas_int


def decode_csr(const int64_t[::1] indptr, const int32_t[::1] indices, const float[::1] values,
               const float[:, ::1] W_dec, const float[::1] b_dec, float[:, ::1] out,
               int nthreads):
    """``out [N, d_in] = csr @ W_dec + b_dec`` for CSR codes of ``N`` rows."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, d_in = W_dec.shape[1], i, k, e
    if out.shape[0] != n or out.shape[1] != d_in:
        raise ValueError("out must have shape (N, d_in)")
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="guided"):
        for k in range(d_in):
            out[i, k] = b_dec[k]
        for e in range(indptr[i], indptr[i + 1]):
            _axpy(values[e], &W_dec[indices[e], 0], &out[i, 0], d_in)


def count_nonzero(const float[:, ::1] f, int nthreads):
    """Number of nonzero entries of ``f`` (to choose the dense decode path)."""
    cdef Py_ssize_t n = f.shape[0], d = f.shape[1], i, j
    cdef int64_t total = 0
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="static"):
        for j in range(d):
            if f[i, j] != 0:
                total += 1
    return total


def decode_dense_gather(const float[:, ::1] f, const float[:, ::1] W_dec, const float[::1] b_dec,
                        float[:, ::1] out, int nthreads):
    """``out = f @ W_dec + b_dec`` for a mostly-zero dense ``f [N, d_sae]``:
    per row, accumulate the decoder rows of its nonzero entries."""
    cdef Py_ssize_t n = f.shape[0], d_sae = f.shape[1], d_in = W_dec.shape[1], i, j, k
    cdef float v
    if out.shape[0] != n or out.shape[1] != d_in:
        raise ValueError("out must have shape (N, d_in)")
    for i in prange(n, nogil=True, num_threads=nthreads, schedule="guided"):
        for k in range(d_in):
            out[i, k] = b_dec[k]
        for j in range(d_sae):
            v = f[i, j]
            if v != 0:
                _axpy(v, &W_dec[j, 0], &out[i, 0], d_in)


def decode_dense_gemm(const float[:, ::1] f, const float[:, ::1] W_dec, const float[::1] b_dec,
                      float[:, ::1] out, Py_ssize_t tm, int nthreads):
    """``out = f @ W_dec + b_dec`` with one BLAS sgemm per block of ``tm`` rows
    (blocks in parallel; BLAS must be single-threaded when nthreads > 1)."""
    cdef Py_ssize_t n = f.shape[0], d_sae = f.shape[1], d_in = W_dec.shape[1], i, k, rb, r0, mr
    if out.shape[0] != n or out.shape[1] != d_in or tm < 1:
        raise ValueError("out must have shape (N, d_in) and tm must be >= 1")
    if max(n, d_sae, d_in) >= 2**31 - 1:
        raise ValueError("dimensions must fit BLAS's 32-bit integers")
    cdef Py_ssize_t nrb = (n + tm - 1) // tm
    for rb in prange(nrb, nogil=True, num_threads=nthreads, schedule="dynamic"):
        r0 = rb * tm
        mr = min(tm, n - r0)
        for i in range(r0, r0 + mr):
            for k in range(d_in):
                out[i, k] = b_dec[k]
        _sgemm_rm(<blas_int>mr, <blas_int>d_in, <blas_int>d_sae, 1.0, &f[r0, 0], <blas_int>d_sae,
                  &W_dec[0, 0], <blas_int>d_in, 1.0, &out[r0, 0], <blas_int>d_in)
