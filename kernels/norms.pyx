"""Decoder row norms (``fastsae._cy_norms``).

Raw kernels: the caller (``fastsae.cython_backend``) has validated shapes and
dtypes; arrays are C-contiguous float32.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrt

from _common cimport _dot_d


def decoder_column_norms(const float[:, ::1] W_dec, float[::1] out, int nthreads):
    """``out[j] = ||W_dec[j, :]||`` for ``W_dec [d_sae, d_in]``, ``out [d_sae]``.

    Squares are summed in float64 (one pass over W_dec, parallel over rows),
    so the result is the correctly rounded float32 norm up to ~1 ulp.
    """
    cdef Py_ssize_t d_sae = W_dec.shape[0], d_in = W_dec.shape[1], j, k
    if out.shape[0] != d_sae:
        raise ValueError("out must have length d_sae")
    for j in prange(d_sae, nogil=True, num_threads=nthreads, schedule="static"):
        out[j] = <float>sqrt(_dot_d(&W_dec[j, 0], &W_dec[j, 0], d_in))
