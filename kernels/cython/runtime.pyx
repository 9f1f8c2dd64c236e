"""Build facts of the compiled Cython kernels (``fastsae.backends.cython._runtime``)."""

from common cimport FASTSAE_OPENMP, FASTSAE_DEBUG, fastsae_max_threads, blas_int

#: Whether the kernels were compiled with OpenMP (else they run single-threaded).
OPENMP = bool(FASTSAE_OPENMP)
#: Whether this is a debug build (bounds checking on, FASTSAE_CYTHON_DEBUG=1).
DEBUG = bool(FASTSAE_DEBUG)
#: Size in bytes of SciPy's BLAS integer type the kernels were compiled against.
BLAS_INT_BYTES = sizeof(blas_int)


def max_threads():
    """OpenMP's default team size (``OMP_NUM_THREADS`` or the core count); 1 without OpenMP."""
    return fastsae_max_threads()
