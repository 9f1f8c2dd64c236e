"""Training checkpoints: one safetensors file plus a JSON copy of its header.

Format ``fastsae-checkpoint-2``::

    checkpoint.safetensors  tensors: param.<name>, adam_m.<name>, adam_v.<name>
                            (float32; SAE names W_enc b_enc W_dec b_dec, or the
                            Autoencoder's W0 b0 W1 ...), fire.cur / fire.prev
                            (int64 [d_sae], SAE only), topk.since (int64
                            [d_sae]) and topk.threshold (float64 [1]) for
                            TopK/BatchTopK; header metadata "fastsae": the run
                            state as JSON, "fastsae_sha256": a JSON object
                            mapping every tensor's name to the SHA-256 (hex)
                            of its bytes as stored
    checkpoint.json         the same run state, for people (never read)

The run state is a JSON object with ``format``, ``fastsae_version``,
``kind`` (``"sae"``/``"autoencoder"``), ``step``, ``adam_step``, ``scale``,
``stream`` (data position), ``rng`` (NumPy bit-generator state), ``config``
(:meth:`TrainConfig.to_dict`), ``model`` (what rebuilds the model, see
:mod:`fastsae.training.state`), ``backend``, ``threads`` (the thread limit
the run was given, ``null`` for the backend's default), ``window``
(firing-window steps), ``acc`` (metric sums since the last log record),
``data`` (path or description), ``data_rows`` and ``extra`` (the caller's
``extra_state``).

Reading checks everything before anything is used: every tensor's hash (a
flipped byte is an error naming the tensor), that no tensor is missing or
extra, and that every required run-state key (:data:`REQUIRED_KEYS`) is
there; each failure is one :class:`fastsae.io.SAEFormatError` naming what
is wrong. ``fastsae-checkpoint-1`` files (fastsae before the hashes; no
``threads``) are still read, without the hash check, which they cannot have.

Both files are written atomically (temporary file, fsync, rename), so a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..io import SAEFormatError, atomic_write_json, load_tensors, save_tensors

__all__ = ["CHECKPOINT_FILENAME", "CHECKPOINT_FORMAT", "READABLE_FORMATS", "REQUIRED_KEYS",
           "write_checkpoint", "read_checkpoint", "tensor_sha256"]

CHECKPOINT_FILENAME = "checkpoint.safetensors"
#: The ``format`` field of every checkpoint this version writes.
CHECKPOINT_FORMAT = "fastsae-checkpoint-2"
#: Formats this version reads (``-1``: no tensor hashes).
READABLE_FORMATS = ("fastsae-checkpoint-1", CHECKPOINT_FORMAT)
#: Run-state keys a resume cannot do without.
REQUIRED_KEYS = ("kind", "step", "adam_step", "scale", "stream", "rng", "config", "model",
                 "backend", "window")
#: Header metadata key of the tensor hashes.
_HASH_KEY = "fastsae_sha256"


def tensor_sha256(a) -> str:
    """SHA-256 (hex) of an array's bytes as safetensors stores them
    (C order, little-endian)."""
    a = np.asarray(a)
    le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(le.tobytes()).hexdigest()


def write_checkpoint(path, tensors: dict, run_state: dict) -> Path:
    """Write ``tensors`` and ``run_state`` (its ``format`` field set here) to
    ``path`` and the JSON copy beside it, each atomically; the hashes of the
    tensors go into the header. Returns ``path``."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **run_state}
    tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # keeps 0-d shapes
    hashes = {k: tensor_sha256(v) for k, v in tensors.items()}
    save_tensors(path, tensors, {"fastsae": json.dumps(state), _HASH_KEY: json.dumps(hashes)})
    atomic_write_json(path.with_suffix(".json"), state)
    return path


def read_checkpoint(path) -> tuple[dict, dict]:
    """``(tensors, run_state)`` of a checkpoint file or of an output directory
    holding one, verified (see the module docstring). Raises
    ``FileNotFoundError`` when there is none and
    :class:`fastsae.io.SAEFormatError` when the file is not a fastsae training
    checkpoint, a tensor's bytes do not match their hash, a tensor is
    missing or unexpected, or a required run-state key is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors, meta = load_tensors(path)
    try:
        state = json.loads(meta["fastsae"])
        fmt = state.get("format")
    except (KeyError, ValueError, AttributeError):
        fmt = None
    if fmt not in READABLE_FORMATS:
        raise SAEFormatError(f"{path} is not a fastsae training checkpoint"
                             + (f" (format {fmt!r}; this version reads "
                                f"{', '.join(READABLE_FORMATS)})" if fmt else ""))
    if fmt != "fastsae-checkpoint-1":
        _verify(path, tensors, meta)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise SAEFormatError(f"{path}: the run state lacks {', '.join(map(repr, missing))} "
                             "(a damaged or hand-edited checkpoint)")
    return tensors, state


def _verify(path: Path, tensors: dict, meta: dict) -> None:
    """Check every tensor against the header's hashes."""
    try:
        hashes = json.loads(meta[_HASH_KEY])
        if not isinstance(hashes, dict):
            raise ValueError
    except (KeyError, ValueError):
        raise SAEFormatError(f"{path}: the tensor hashes ({_HASH_KEY!r} in the header) are "
                             "missing or unreadable") from None
    for name in sorted(set(hashes) - set(tensors)):
        raise SAEFormatError(f"{path}: tensor {name!r} is missing")
    for name in sorted(set(tensors) - set(hashes)):
        raise SAEFormatError(f"{path}: tensor {name!r} is not in the checkpoint's hash list "
                             "(a damaged or hand-edited checkpoint)")
    for name in sorted(tensors):
        if tensor_sha256(tensors[name]) != hashes[name]:
            raise SAEFormatError(f"{path}: tensor {name!r} is corrupt (its bytes do not "
                                 "match the SHA-256 stored when it was written)")
