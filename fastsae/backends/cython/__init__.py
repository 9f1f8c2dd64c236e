"""The ``cython`` backend: the kernel contract as compiled Cython extensions.

Every kernel source ``kernels/cython/NAME.pyx`` is compiled by ``setup.py``
into ``fastsae.backends.cython._NAME`` and called from the wrapper module of
the same name here (``encode``, ``topk``, ``decode``, ``norms``,
``backward``, ``adam``, ``dense``, ``jumprelu``; ``step`` assembles the
ReLU and TopK training steps, ``jumprelu`` the JumpReLU one, ``matryoshka``
the Matryoshka BatchTopK one (on ``_backward``'s kernels, given widths),
``_threads`` holds the thread control, ``transcoder`` what every gradient
and training function adds for transcoders and skip transcoders (``y``);
``kernels/README.md`` has the table). They are the
same algorithms as the Numba backend:

* encode: tiled BLAS ``sgemm`` (from ``scipy.linalg.cython_blas``) with the
  bias, ReLU and CSR compaction (or the top-k selection) done on each tile
  while it is in cache;
* decode: gather-accumulate of the active decoder rows;
* backward: sparse ``d_pre`` at the active entries only, a CSC transpose so
  each feature's gradients are accumulated by one thread (race-free);
* Adam: in the training steps fused into the backward's per-feature pass (so
  the gradient matrices are never stored); ``_adam.adam_step`` is the
  stand-alone one-pass update of all four parameters;
* dense path (``_dense``, wrapper ``dense``): at high code density the ReLU
  ``train_step``, ``decode`` of sparse codes and ``gradients`` use dense
  BLAS products instead (the step decides from this batch's density on the
  encoder's first row block, against
  ``tunables.CYTHON_RELU_DENSE_MIN_DENSITY``, decode against
  ``CYTHON_DENSE_DECODE_MIN_DENSITY``; both read at call time).

The extensions are optional. When they were not built (no C compiler at
install time) or fail to import, :func:`check_available` raises
``ImportError`` with the reason and ``fastsae.available_backends()`` reports
it; the contract functions then exist but only raise that error.

Threads: the parallel loops use OpenMP when the compiler supported it at
build time (``fastsae info`` says whether). The team size defaults to
``OMP_NUM_THREADS`` or the core count; :func:`set_num_threads` changes it for
this process. Inside the parallel loops BLAS is limited to one thread (via
threadpoolctl) so the cores are not oversubscribed; without OpenMP the loops
run serially and BLAS keeps its own threading.

Every function takes the arrays the validating front
(:class:`fastsae.Backend`) has checked and trusts them; the compiled kernels
check only what the front cannot know (see ``kernels/README.md``).
"""

from __future__ import annotations

from ..host import synchronize, to_backend, to_numpy

__all__ = ["NAME", "DESCRIPTION", "DEVICE_ARRAYS", "AUTO_SELECT", "check_available",
           "get_num_threads", "set_num_threads", "to_backend", "to_numpy", "synchronize",
           "encode_relu", "encode_relu_sparse", "decode", "decoder_column_norms",
           "l1_subgradient", "gradients", "train_step", "encode_topk", "encode_batchtopk",
           "encode_jumprelu", "topk_gradients", "train_step_topk", "jumprelu_gradients",
           "train_step_jumprelu", "matryoshka_gradients", "train_step_matryoshka"]

NAME = "cython"
DEVICE_ARRAYS = False
AUTO_SELECT = True

_IMPORT_ERROR: Exception | None = None
try:  # the compiled kernels are optional
    from . import (_adam, _backward, _decode, _dense, _encode, _jumprelu,  # noqa: F401
                   _norms, _runtime, _topk)
except ImportError as exc:  # not built, or built for another Python/NumPy
    _IMPORT_ERROR = exc


def check_available() -> None:
    """Raise ``ImportError`` saying why the compiled kernels cannot be used."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            f"the compiled Cython kernels (fastsae.backends.cython._*) are not importable "
            f"({_IMPORT_ERROR}); they are built by `pip install .` or "
            f"`python setup.py build_ext --inplace`, which need a C compiler, Cython and SciPy")


if _IMPORT_ERROR is None:
    from . import _threads
    from .backward import gradients, topk_gradients
    from .decode import decode
    from .encode import encode_relu, encode_relu_sparse
    from .jumprelu import jumprelu_gradients, train_step_jumprelu
    from .matryoshka import matryoshka_gradients, train_step_matryoshka
    from .norms import decoder_column_norms, l1_subgradient
    from .step import train_step, train_step_topk
    from .topk import encode_batchtopk, encode_jumprelu, encode_topk
else:
    _threads = None

    def _unavailable(*args, **kwargs):
        """Stands in for every kernel when the extensions are missing."""
        check_available()

    (encode_relu, encode_relu_sparse, decode, decoder_column_norms, l1_subgradient, gradients,
     train_step, encode_topk, encode_batchtopk, encode_jumprelu, topk_gradients,
     train_step_topk, jumprelu_gradients, train_step_jumprelu, matryoshka_gradients,
     train_step_matryoshka) = (_unavailable,) * 16


def get_num_threads() -> int:
    """Threads the kernels use (1 without OpenMP or without the extensions)."""
    return 1 if _threads is None else _threads.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Set the OpenMP team size for this process (``None``: back to the default,
    ``OMP_NUM_THREADS`` or the core count). No effect without OpenMP."""
    global DESCRIPTION
    if _threads is not None:
        _threads.set_num_threads(n)
    DESCRIPTION = _description()


def _description() -> str:
    if _threads is None:
        return "Cython kernels not built"
    par = (f"OpenMP, {get_num_threads()} threads" if _threads.OPENMP
           else "no OpenMP at build time: single-threaded loops")
    dbg = ", debug build (bounds checks on)" if _threads.DEBUG_BUILD else ""
    return f"Cython CPU kernels ({par}; SciPy BLAS sgemm{dbg})"


DESCRIPTION = _description()
