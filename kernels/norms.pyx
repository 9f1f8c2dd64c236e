"""Decoder row norms (``fastsae._cy_norms``).

Raw kernels: the caller (``fastsae.cython_backend``) has validated shapes and
dtypes; arrays are C-contiguous float32.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrtf

from _common cimport _sumsq


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
    if d_sae == 0:
        return
    if nthreads <= 1:
        for j in range(d_sae):
            out[j] = sqrtf(_sumsq(&W_dec[j, 0], d_in))
        return
    for j in prange(d_sae, nogil=True, num_threads=nthreads, schedule="static"):
        out[j] = sqrtf(_sumsq(&W_dec[j, 0], d_in))
