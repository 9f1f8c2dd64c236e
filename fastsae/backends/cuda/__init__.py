"""The CUDA backend: the kernel contract on an NVIDIA GPU through numba.cuda.

Install with the ``cuda`` extra (``pip install fastsae[cuda]``, which pulls
``numba-cuda``). Semantics are those of :mod:`fastsae.backends.reference`.
This face only names the backend and re-exports the contract; the modules
beside it have the same names as the other backends' (a kernel's twins are
found by name), each holding its family's ``@cuda.jit`` kernels and the host
code that launches them:

``common``     launch geometry (tunables, or a tiny one under the simulator),
               block reductions and scans, small kernels
``placement``  host <-> device moves, :func:`to_backend` / :func:`to_numpy`,
               cached workspaces (:func:`~.placement.clear_workspace`)
``encode``     tiled GEMM with bias/ReLU/row counts, ordered compaction to CSR
``decode``     sparse decode (dense codes reuse the GEMM)
``norms``      decoder-row norms, L1 subgradient
``backward``   residuals, stable CSR -> CSC, per-feature gradients (ReLU and
               TopK/AuxK), :func:`gradients`, :func:`topk_gradients`
``adam``       fused Adam (+ the unit-norm renormalization)
``topk``       exact radix selection (TopK, BatchTopK, AuxK), JumpReLU
``step``       :func:`train_step`, :func:`train_step_topk`
``jumprelu``   JumpReLU training: candidate epilogue (``pre > theta - bw/2``),
               sparse backward with the threshold's pseudo-gradient, the
               sparsity modes (``"tanh"``, ``"quadratic"``, the
               pre-activation loss over the dead columns),
               :func:`jumprelu_gradients`, :func:`train_step_jumprelu`
``matryoshka`` Matryoshka BatchTopK training: the TopK family's kernels
               with prefix levels (one decode walk stores every prefix's
               reconstruction; suffix-summed residual gradients),
               :func:`matryoshka_gradients`, :func:`train_step_matryoshka`
``transcoder`` what transcoders and skip transcoders change (the target
               ``y``, no input centring, the skip term ``x @ W_skip.T`` and
               its gradient by the encoder's GEMM): every gradient and
               training function takes ``y`` last

Arrays: every function takes NumPy arrays (copied to the GPU, results copied
back) or device arrays (numba's, or anything with
``__cuda_array_interface__``: CuPy, PyTorch; used in place); when any
argument is on the device the results stay there (see :mod:`.placement`).
No float atomics anywhere (fixed reduction orders, a stable CSR -> CSC
transposition), so results are bit-for-bit reproducible on the same GPU.

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code runs on
the CPU, very slowly, with small launch geometries (see :mod:`.common`):
that is how the tests check every kernel on machines without a GPU.
"""

from __future__ import annotations

from numba import cuda

from .backward import gradients, topk_gradients
from .common import SIMULATOR
from .decode import decode
from .encode import encode_relu, encode_relu_sparse
from .jumprelu import jumprelu_gradients, train_step_jumprelu
from .matryoshka import matryoshka_gradients, train_step_matryoshka
from .norms import decoder_column_norms, l1_subgradient
from .placement import to_backend, to_numpy
from .step import train_step, train_step_topk
from .topk import encode_batchtopk, encode_jumprelu, encode_topk

__all__ = ["NAME", "DESCRIPTION", "DEVICE_ARRAYS", "AUTO_SELECT", "check_available",
           "get_num_threads", "set_num_threads", "to_backend", "to_numpy", "synchronize",
           "encode_relu", "encode_relu_sparse", "decode", "decoder_column_norms",
           "l1_subgradient", "gradients", "train_step", "encode_topk", "encode_batchtopk",
           "encode_jumprelu", "topk_gradients", "train_step_topk", "jumprelu_gradients",
           "train_step_jumprelu", "matryoshka_gradients", "train_step_matryoshka"]

NAME = "cuda"
#: Functions accept and return device arrays (see :mod:`.placement`).
DEVICE_ARRAYS = True
DESCRIPTION = ("CUDA simulator (NUMBA_ENABLE_CUDASIM=1): numba.cuda kernels run on the CPU, "
               "for testing only" if SIMULATOR else "numba.cuda kernels on an NVIDIA GPU")
#: Whether automatic backend choice may pick this backend when it is usable:
#: not the simulator, which is correct but thousands of times slower than
#: the CPU backends.
AUTO_SELECT = not SIMULATOR


def check_available() -> None:
    """Raise ``RuntimeError`` saying why when no CUDA device can be used;
    when one can, name it in :data:`DESCRIPTION`."""
    global DESCRIPTION
    if SIMULATOR:
        return
    if not cuda.is_available():
        reason = "no CUDA driver or device found"
        try:
            cuda.get_current_device()
        except Exception as exc:  # the driver's own explanation
            reason = f"{reason}: {' '.join(str(exc).split()).rstrip(' :')}"
        raise RuntimeError(reason)
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = ".".join(str(c) for c in dev.compute_capability)
    DESCRIPTION = f"numba.cuda kernels on {name} (compute capability {cc})"


def get_num_threads() -> int:
    """Always 1: the work runs on the GPU, launched from the calling host
    thread; there is no host thread pool to size."""
    return 1


def set_num_threads(n: int | None) -> None:
    """Accepted for the contract and ignored (``None`` included): host
    threads do not apply to GPU kernels (see :func:`get_num_threads`)."""
    return None


def synchronize() -> None:
    """Wait until all queued kernels and copies have finished."""
    cuda.synchronize()
