"""fastsae: fast sparse autoencoders on the CPU (Numba, Cython) and GPU (numba.cuda).

Quick use::

    import fastsae
    print(fastsae.available_backends())
    be = fastsae.get_backend()            # cuda > numba > cython > numpy
    codes = be.encode_relu_sparse(x, W_enc, b_enc, b_dec)
    x_hat = be.decode(codes, W_dec, b_dec)
"""

from .backends import Backend, BackendStatus, available_backends, get_backend
from .params import AdamState, JumpReLUSparsity, Losses, SAEParams, StepResult
from .sparse import SparseCodes

__version__ = "0.1.0"

# Model, trainer and data pipeline (imported after __version__: io.py reads it).
from . import data  # noqa: E402
from .autoencoder import Autoencoder  # noqa: E402
from .model import SparseAutoencoder  # noqa: E402
from .io import SAEFormatError  # noqa: E402
from .training import (NotBitExactWarning, RunExistsError, TrainConfig, Trainer,  # noqa: E402
                       TrainingDiverged)

__all__ = [
    "Backend", "BackendStatus", "available_backends", "get_backend",
    "AdamState", "JumpReLUSparsity", "Losses", "SAEParams", "StepResult", "SparseCodes",
    "__version__",
    "SparseAutoencoder", "Trainer", "TrainConfig", "Autoencoder", "data",
    # what a run raises or warns: a damaged file, a diverged run, an out_dir
    # holding a run, a resume that is not bit-exact
    "SAEFormatError", "TrainingDiverged", "RunExistsError", "NotBitExactWarning",
]
