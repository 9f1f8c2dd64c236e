"""Training: configuration, the loop, per-architecture state, checkpoints, metrics.

Modules::

    config.py      TrainConfig: every training default, schedule and warm-up rule
    loop.py        Trainer: the loop, progress bar, NaN and divergence checks, resume
    state.py       TrainingState protocol; SAEState (ReLU), TopKState (TopK /
                   BatchTopK, AuxK counters, BatchTopK threshold), AutoencoderState
    checkpoint.py  checkpoint format (fastsae-checkpoint-2: tensor SHA-256s;
                   -1 still read), atomic write, verified read
    outdir.py      output directories: a run's files, no accidental overwrite,
                   write probe
    metrics.py     firing windows, dead fraction, feature density, metrics.jsonl
    threads.py     limit_threads: a backend's threads and BLAS/OpenMP for a block

``fastsae.Trainer`` and ``fastsae.TrainConfig`` are these classes.
"""

from .checkpoint import CHECKPOINT_FILENAME, CHECKPOINT_FORMAT, read_checkpoint
from .config import TrainConfig
from .loop import NotBitExactWarning, Trainer, TrainingDiverged, TrainResult
from .outdir import RunExistsError
from .state import AutoencoderState, SAEState, TopKState, TrainingState
from .threads import limit_threads

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDiverged", "TrainingState",
           "SAEState", "TopKState", "AutoencoderState", "CHECKPOINT_FILENAME",
           "CHECKPOINT_FORMAT", "read_checkpoint", "limit_threads", "NotBitExactWarning",
           "RunExistsError"]
