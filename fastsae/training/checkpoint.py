"""Training checkpoints: one safetensors file plus a JSON copy of its header.

Format ``fastsae-checkpoint-1`` (unchanged since fastsae 0.1.0)::

    checkpoint.safetensors  tensors: param.<name>, adam_m.<name>, adam_v.<name>
                            (float32; SAE names W_enc b_enc W_dec b_dec, or the
                            Autoencoder's W0 b0 W1 ...), fire.cur / fire.prev
                            (int64 [d_sae], SAE only), topk.since (int64
                            [d_sae]) and topk.threshold (float64 [1]) for
                            TopK/BatchTopK; header metadata "fastsae": the run
                            state as JSON
    checkpoint.json         the same run state, for people (never read)

The run state is a JSON object with ``format``, ``fastsae_version``,
``kind`` (``"sae"``/``"autoencoder"``), ``step``, ``adam_step``, ``scale``,
``stream`` (data position), ``rng`` (NumPy bit-generator state), ``config``
(:meth:`TrainConfig.to_dict`), ``model`` (what rebuilds the model, see
:mod:`fastsae.training.state`), ``backend``, ``window`` (firing-window
steps), ``acc`` (metric sums since the last log record), ``data`` (path or
description), ``data_rows`` and ``extra`` (the caller's ``extra_state``).

Both files are written atomically (temporary file, fsync, rename), so a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import SAEFormatError, atomic_write_json, load_tensors, save_tensors

__all__ = ["CHECKPOINT_FILENAME", "CHECKPOINT_FORMAT", "write_checkpoint", "read_checkpoint"]

CHECKPOINT_FILENAME = "checkpoint.safetensors"
#: The ``format`` field of every checkpoint this version reads and writes.
CHECKPOINT_FORMAT = "fastsae-checkpoint-1"


def write_checkpoint(path, tensors: dict, run_state: dict) -> Path:
    """Write ``tensors`` and ``run_state`` (its ``format`` field set here) to
    ``path`` and the JSON copy beside it, each atomically; returns ``path``."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **run_state}
    save_tensors(path, tensors, {"fastsae": json.dumps(state)})
    atomic_write_json(path.with_suffix(".json"), state)
    return path


def read_checkpoint(path) -> tuple[dict, dict]:
    """``(tensors, run_state)`` of a checkpoint file or of an output directory
    holding one. Raises ``FileNotFoundError`` when there is none and
    :class:`fastsae.io.SAEFormatError` when the file is not a fastsae
    training checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors, meta = load_tensors(path)
    try:
        state = json.loads(meta["fastsae"])
        ok = state.get("format") == CHECKPOINT_FORMAT
    except (KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise SAEFormatError(f"{path} is not a fastsae training checkpoint")
    return tensors, state
