"""Files: SAELens-format SAE directories, atomic writes, training checkpoints.

SAELens directory (what ``SAE.save_model`` writes and ``SAE.load_from_disk``
reads)::

    DIR/cfg.json                  one JSON object
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae],
                                  W_dec [d_sae, d_in], b_dec [d_in], float32

(``"jumprelu"`` SAEs also store ``threshold [d_sae]``; SAELens's
transcoders store ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, skip
transcoders also ``W_skip [d_out, d_in]``, with ``d_out`` in the cfg.)
EleutherAI sparsify directories (``cfg.json`` + ``sae.safetensors``) are
read and written too (:func:`read_sparsify`, :func:`write_sparsify`), and
Gemma Scope's ``params.npz`` is read (:func:`read_gemma_scope`). For a standard ReLU
SAE, ``cfg.json`` holds ``architecture: "standard"``,
``d_in``, ``d_sae``, ``dtype`` (a plain string such as ``"float32"``),
``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations`` and a free-form ``metadata`` object. fastsae writes
exactly these fields (its own details go inside ``metadata``) and reads any
SAELens-style directory, ignoring fields it does not know.

Everything is read with ``json`` and ``safetensors.numpy``: nothing is ever
unpickled (``.pt``/``.pkl`` files are not opened). Weights may be float32,
float64, float16 or bfloat16; NumPy has no bfloat16, so BF16 tensors are read
from the file's bytes (8-byte little-endian header length, JSON header, data)
and widened exactly to float32. All weights are converted to float32.

Every file is written atomically: the bytes go to a temporary file
``.NAME.XXXXXXXX.tmp`` in the target directory, are flushed and
``fsync``-ed, and the file is then renamed over the target with
``os.replace``. A crash mid-write leaves the previous file intact (plus, at
worst, a stray temporary file, which the next successful write of the same
target removes).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np

from .backends import validate as V
from .params import SAEParams

__all__ = [
    "SAEFormatError", "CFG_FILENAME", "WEIGHTS_FILENAME", "atomic_write_bytes", "stale_tmp_files",
    "atomic_write_json", "write_sae_dir", "read_sae_dir", "read_gemma_scope", "read_sparsify",
    "write_sparsify", "is_sparsify", "save_tensors",
    "load_tensors", "GEMMA_SCOPE_FILENAME", "is_gemma_scope", "fold_decoder_norms",
]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: Gemma Scope's published file: one ``params.npz`` per SAE.
GEMMA_SCOPE_FILENAME = "params.npz"
#: EleutherAI sparsify's weights file (beside its own cfg.json).
SPARSIFY_FILENAME = "sae.safetensors"
_GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

#: Tensors of a standard SAE and their shapes in terms of (d_in, d_sae,
#: d_out); d_out is the reconstruction's width (d_in except for transcoders).
_TENSOR_SHAPES = {
    "W_enc": lambda d_in, d_sae, d_out: (d_in, d_sae),
    "b_enc": lambda d_in, d_sae, d_out: (d_sae,),
    "W_dec": lambda d_in, d_sae, d_out: (d_sae, d_out),
    "b_dec": lambda d_in, d_sae, d_out: (d_out,),
}

#: dtype strings accepted in cfg.json (SAELens writes e.g. "float32" or,
#: in older versions, "torch.float32"). Weights are converted to float32.
_DTYPES = {"float32", "float16", "float64", "bfloat16"}

#: SAELens's transcoders (``Transcoder``, ``SkipTranscoder``,
#: ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``): cfg ``d_out``,
#: ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``W_skip [d_out, d_in]`` for
#: the skip ones, ``threshold [d_sae]`` for the jumprelu ones; the encoder
#: reads the raw input (``apply_b_dec_to_input`` must be false).
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder",
                "jumprelu_skip_transcoder")

#: Architectures fastsae reads and writes: ReLU, TopK (per row) and JumpReLU
#: (how SAELens saves a BatchTopK-trained SAE for inference), gated, and the
#: transcoders.
_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated") + _TRANSCODERS

#: A gated SAE's tensors (SAELens's GatedSAE): no ``b_enc``; ``b_gate`` and
#: ``b_mag`` biases and ``r_mag`` the magnitude path's log scale per feature.
_GATED_SHAPES = {
    "W_enc": _TENSOR_SHAPES["W_enc"],
    "W_dec": _TENSOR_SHAPES["W_dec"],
    "b_dec": _TENSOR_SHAPES["b_dec"],
    "b_gate": _TENSOR_SHAPES["b_enc"],
    "b_mag": _TENSOR_SHAPES["b_enc"],
    "r_mag": _TENSOR_SHAPES["b_enc"],
}
#: What :func:`read_sae_dir` reads: the written ones and SAELens's training
#: saves of BatchTopK SAEs (which run as ``jumprelu`` at the saved threshold).
_READ_ARCHITECTURES = _ARCHITECTURES + ("batchtopk", "matryoshka_batchtopk")
#: Architectures whose files hold a per-feature ``threshold`` tensor.
_JUMPRELU = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")


class SAEFormatError(ValueError):
    """A directory or checkpoint is not in a format fastsae can read."""


# ============================================================ atomic writes
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_pattern(name: str) -> re.Pattern:
    """The names ``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")`` makes
    (8 characters from ``[a-z0-9_]`` between prefix and suffix)."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def stale_tmp_files(path) -> list[Path]:
    """Temporary files that interrupted :func:`atomic_write_bytes` calls for
    ``path`` left beside it (a process killed between write and rename)."""
    path = Path(path)
    pat = _tmp_pattern(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if pat.fullmatch(n)]


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); after
    the rename, remove the temporary files earlier, interrupted writes of the
    same ``path`` left behind (:func:`stale_tmp_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    for stale in stale_tmp_files(path):
        try:
            stale.unlink()
        except OSError:  # gone already, or not ours to remove: the write itself succeeded
            pass


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# =============================================================== tensors
def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Atomically write NumPy arrays as a ``.safetensors`` file
    (``metadata``: str -> str)."""
    from safetensors.numpy import save

    # np.asarray(order="C"), not ascontiguousarray, which turns a 0-d array into 1-d
    clean = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path) -> tuple[dict, dict]:
    """Read a ``.safetensors`` file -> ``(arrays, metadata)``; clear errors.

    BF16 tensors, which NumPy cannot represent, come back widened exactly to
    float32 (a bfloat16 is the top 16 bits of a float32); every other dtype
    comes back as stored.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        header = _read_header(path)
        if any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
            return _load_raw(path, header)
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise SAEFormatError(f"cannot read {path} as safetensors: {exc}") from None
    return arrays, meta


#: safetensors dtype codes NumPy reads directly (BF16 is widened, see _load_raw).
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
              "U8": "u1", "BOOL": "?", "BF16": "<u2"}


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (raises ``ValueError`` when the
    file is too short or the header is not a JSON object)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("the file is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"header length {n} runs past the end of the file")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _load_raw(path: Path, header: dict) -> tuple[dict, dict]:
    """Read every tensor of a safetensors file from its bytes, checking each
    entry's dtype, shape and data offsets; BF16 is widened to float32."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    data = memoryview(blob)[8 + n:]
    meta = header.get("__metadata__") or {}
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise ValueError(f"tensor {name!r} has a malformed header entry")
        begin, end = offs
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dt]).itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != want:
            raise ValueError(f"tensor {name!r}: data_offsets {offs} do not hold {dt} "
                             f"{tuple(shape)} within the {len(data)}-byte data section")
        a = np.frombuffer(data[begin:end], dtype=_ST_DTYPES[dt]).reshape(shape)
        if dt == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        arrays[name] = np.array(a, dtype=a.dtype.newbyteorder("="))  # own, native order
    return arrays, meta


# ====================================================== SAELens directories
def _metadata_block(metadata: dict | None) -> dict:
    from . import __version__

    meta = {"model_name": None, "hook_name": None, "fastsae_version": __version__}
    if metadata:
        meta.update(metadata)
    return meta


def write_sae_dir(directory, params: SAEParams, metadata: dict | None = None, *,
                  architecture: str = "standard", k: int | None = None,
                  threshold=None, widths=None, training: dict | None = None,
                  gate: dict | None = None) -> Path:
    """Write an SAE as a SAELens directory (cfg.json + weights).

    ``params`` are host float32 arrays for raw (unnormalized) inputs;
    ``metadata`` is merged into cfg.json's ``metadata`` object.
    ``architecture``: ``"standard"`` (ReLU), ``"topk"`` (needs ``k``; written
    with ``rescale_acts_by_decoder_norm: false``) or ``"jumprelu"`` (needs
    ``threshold [d_sae]``, stored as a tensor, as SAELens does), or
    SAELens's training save of a BatchTopK SAE, ``"batchtopk"`` or
    ``"matryoshka_batchtopk"`` (needs ``k``, ``threshold`` a float stored as
    the float64 scalar tensor ``topk_threshold``, and for Matryoshka
    ``widths``; ``training`` adds SAELens training fields to the cfg's top
    level and ``metadata.training_architecture_details``). ``"gated"`` needs
    ``gate`` (``W_enc``, ``b_gate``, ``r_mag`` as :func:`read_sae_dir` returns
    them; ``params`` then hold the magnitude path, whose ``b_enc`` is ``b_mag``).

    Transcoders (``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, any ``d_out``):
    ``"transcoder"`` (ReLU), ``"jumprelu_transcoder"`` (needs ``threshold``)
    and their skip variants ``"skip_transcoder"`` /
    ``"jumprelu_skip_transcoder"``, which need ``params.W_skip [d_out,
    d_in]`` (every other architecture needs ``params.W_skip`` None). Their
    cfg has ``apply_b_dec_to_input: false`` and ``d_out``, in SAELens's field
    order; put ``hook_name_out`` in ``metadata`` to record the output hook.
    """
    if architecture not in _READ_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {_READ_ARCHITECTURES}, "
                         f"got {architecture!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(np.asarray(getattr(params, name)), dtype=np.float32)
               for name in SAEParams.NAMES}
    d_in, d_sae = tensors["W_enc"].shape
    tc = architecture in _TRANSCODERS
    d_out = tensors["W_dec"].shape[-1] if tc and tensors["W_dec"].ndim == 2 else d_in
    for name, shape in _TENSOR_SHAPES.items():
        if tensors[name].shape != shape(d_in, d_sae, d_out):
            raise ValueError(f"{name} has shape {tensors[name].shape}, "
                             f"expected {shape(d_in, d_sae, d_out)}")
    if "skip" in architecture:
        if params.W_skip is None:
            raise ValueError(f"a {architecture} needs params.W_skip [d_out, d_in]; it is None")
        W_skip = np.ascontiguousarray(np.asarray(params.W_skip), dtype=np.float32)
        if W_skip.shape != (d_out, d_in):
            raise ValueError(f"W_skip has shape {W_skip.shape}, expected {(d_out, d_in)}")
        tensors["W_skip"] = W_skip
    elif params.W_skip is not None:
        raise ValueError(f"architecture {architecture!r} has no skip connection, but "
                         "params.W_skip is set (use skip_transcoder or "
                         "jumprelu_skip_transcoder)")
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        if k is None or not 1 <= int(k) <= d_sae:
            raise ValueError(f"a {architecture} SAE needs 1 <= k <= d_sae={d_sae}, got {k!r}")
    fields = {}
    if architecture == "gated":
        tensors = {"W_enc": np.ascontiguousarray(gate["W_enc"], np.float32),
                   "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"],
                   "b_gate": np.ascontiguousarray(gate["b_gate"], np.float32),
                   "b_mag": tensors["b_enc"],
                   "r_mag": np.ascontiguousarray(gate["r_mag"], np.float32)}
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        t = float(threshold)
        if not np.isfinite(t):
            raise ValueError(f"topk_threshold must be finite, got {t}")
        # SAELens stores it first, a 0-d float64 tensor
        tensors = {"topk_threshold": np.array(t, np.float64), **tensors}
        fields = {"k": int(k), **(training or {}), "rescale_acts_by_decoder_norm": False}
        if architecture == "matryoshka_batchtopk":
            fields["matryoshka_widths"] = V.widths_arg(widths, d_sae).tolist()
            fields["use_matryoshka_aux_loss"] = False
        metadata = dict(metadata or {})
        metadata["training_architecture"] = architecture
        metadata["training_architecture_details"] = dict(fields)
    if architecture in _JUMPRELU:
        thr = np.ascontiguousarray(np.asarray(threshold), dtype=np.float32)
        if thr.shape != (d_sae,):
            raise ValueError(f"a {architecture} needs threshold of shape ({d_sae},), "
                             f"got {thr.shape}")
        tensors["threshold"] = thr
    # The same top-level fields (and order) as SAELens 6's save_model.
    cfg = {
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not tc,  # SAELens's transcoders refuse true
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _metadata_block(metadata),
    }
    if tc:
        cfg["d_out"] = int(d_out)
    if architecture == "topk":
        cfg["k"] = int(k)
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg.update(fields)
    cfg["architecture"] = architecture
    save_tensors(directory / WEIGHTS_FILENAME, tensors)  # no __metadata__, as SAELens
    atomic_write_bytes(directory / CFG_FILENAME, json.dumps(cfg).encode())
    return directory


def _read_cfg(directory: Path) -> dict:
    path = directory / CFG_FILENAME
    if not path.is_file():
        raise SAEFormatError(f"{directory} has no {CFG_FILENAME}: not an SAE directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # too deep: refused
        raise SAEFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path} must hold a JSON object")
    return cfg


def _cfg_int(cfg, key, path) -> int:
    if key not in cfg:
        raise SAEFormatError(f"{path} is missing the required field {key!r}")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SAEFormatError(f"{path}: {key!r} must be a positive integer, got {v!r}")
    return v


def fold_decoder_norms(p: SAEParams, norms) -> SAEParams:
    """SAELens's ``fold_W_dec_norm``: ``W_enc[:, j] * n_j``, ``b_enc[j] * n_j``,
    ``W_dec[j] / n_j`` (``norms`` positive, float64 ``[d_sae]``), float32. The
    codes are scaled by the norms and the reconstruction is unchanged; a
    threshold on the codes scales by the norms too."""
    return SAEParams((p.W_enc * norms[None, :]).astype(np.float32),
                     (p.b_enc * norms).astype(np.float32),
                     (p.W_dec / norms[:, None]).astype(np.float32), p.b_dec)


def read_sae_dir(directory, *, architectures=_READ_ARCHITECTURES) -> tuple[SAEParams, dict, dict]:
    """Read a SAELens-style (or fastsae) SAE directory (float32, float64,
    float16 or bfloat16 weights, all returned as float32: exact except for
    float64).

    Returns ``(params, cfg, extras)`` with float32 host arrays such that, with
    ``pre = (x - b_dec) @ W_enc + b_enc``, SAELens's ``encode`` is
    ``relu(pre)`` (``"standard"``), ReLU of the ``k`` largest ``pre`` per row
    (``"topk"``, ``extras["k"]``) or ``relu(pre) * (pre > threshold)``
    (``"jumprelu"``, ``extras["threshold"]``), and ``decode`` is
    ``f @ W_dec + b_dec``. SAELens's training saves of ``"batchtopk"`` and
    ``"matryoshka_batchtopk"`` SAEs (``k``, ``matryoshka_widths`` and a
    float64 scalar tensor ``topk_threshold``) run as ``"jumprelu"`` at that
    threshold (``extras["threshold"]``, one value per feature; their
    ``extras["k"]``, and ``extras["widths"]`` with ``d_sae`` appended when
    the last width is smaller, as SAELens does). A topk-family cfg with
    ``rescale_acts_by_decoder_norm: true`` is converted by folding the
    decoder norms into ``W_enc``, ``b_enc`` and ``W_dec`` (SAELens's
    ``fold_W_dec_norm``), which gives the same codes times the norms and the
    same reconstruction. A cfg with
    ``apply_b_dec_to_input: false`` is converted exactly (in real arithmetic)
    by folding ``b_dec @ W_enc`` into ``b_enc``. A ``"gated"`` SAE comes back
    as its magnitude path (``W_enc * exp(r_mag)``, ``b_enc = b_mag``) with the
    gate in ``extras["gate"]`` (``W_enc``, ``b_gate``, ``r_mag``).

    SAELens's transcoders, ``"transcoder"``, ``"skip_transcoder"``,
    ``"jumprelu_transcoder"`` and ``"jumprelu_skip_transcoder"`` (cfg
    ``d_out``, ``apply_b_dec_to_input`` false or absent), come back with
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``params.W_skip [d_out,
    d_in]`` for the skip ones (else None), ``extras["transcoder"] = True``,
    ``extras["d_out"]`` and, for the jumprelu ones, ``extras["threshold"]``.
    Their encoder reads the raw input, ``pre = x @ W_enc + b_enc`` (nothing
    is folded), and ``y_hat = f @ W_dec + b_dec [+ x @ W_skip.T]``. SAE
    extras have no ``"transcoder"`` key. Unknown cfg fields are ignored.
    Raises :class:`SAEFormatError` for a missing or malformed file or field,
    another architecture, an unsupported input normalization, tensors whose
    names or shapes do not match the cfg, a ``W_skip`` the architecture does
    not have (or a missing one), or a transcoder with
    ``apply_b_dec_to_input: true``.
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"SAE directory not found: {directory}")
    if not directory.is_dir():
        raise SAEFormatError(f"{directory} is not a directory (expected {CFG_FILENAME} and "
                             f"{WEIGHTS_FILENAME} inside)")
    cfg = _read_cfg(directory)
    cpath = directory / CFG_FILENAME
    # SAELens before 3.x wrote no "architecture"; those SAEs are standard ReLU.
    arch = cfg.get("architecture", "standard")
    if arch not in architectures:
        raise SAEFormatError(
            f"{cpath}: architecture {arch!r} is not supported here "
            f"(supported: {', '.join(architectures)})")
    d_in = _cfg_int(cfg, "d_in", cpath)
    d_sae = _cfg_int(cfg, "d_sae", cpath)
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    if dtype not in _DTYPES:
        raise SAEFormatError(f"{cpath}: unsupported dtype {cfg.get('dtype')!r}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        # "constant_norm_rescale"/"layer_norm" normalize each input at run time;
        # "expected_average_only_in" means an unfolded scaling factor.
        raise SAEFormatError(f"{cpath}: normalize_activations {norm!r} is not supported "
                             "(only 'none')")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise SAEFormatError(f"{cpath}: reshape_activations {reshape!r} is not supported")
    tc = arch in _TRANSCODERS
    apply_b_dec = cfg.get("apply_b_dec_to_input", not tc)
    if not isinstance(apply_b_dec, bool):
        raise SAEFormatError(f"{cpath}: apply_b_dec_to_input must be true or false, "
                             f"got {apply_b_dec!r}")
    if tc and apply_b_dec:
        # b_dec is d_out wide: it cannot centre the d_in-wide input
        raise SAEFormatError(f"{cpath}: a {arch} must have apply_b_dec_to_input false "
                             "(a transcoder's encoder reads its input uncentred; SAELens "
                             "refuses true too)")
    d_out = _cfg_int(cfg, "d_out", cpath) if tc else d_in

    wpath = directory / WEIGHTS_FILENAME
    if not wpath.is_file():
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".pkl"))
        hint = (f" ({', '.join(others)} found: pickled files are never loaded)" if others else "")
        raise SAEFormatError(f"{directory} has no {WEIGHTS_FILENAME}{hint}")
    arrays, _ = load_tensors(wpath)
    shapes = dict(_GATED_SHAPES if arch == "gated" else _TENSOR_SHAPES)
    skip = arch in ("skip_transcoder", "jumprelu_skip_transcoder")
    if skip:
        if "W_skip" not in arrays:
            raise SAEFormatError(f"{wpath} has no tensor 'W_skip', which a {arch} holds "
                                 f"(found: {', '.join(sorted(arrays)) or 'none'})")
        shapes["W_skip"] = lambda d_in, d_sae, d_out: (d_out, d_in)
    elif "W_skip" in arrays:
        # running it without the skip term would silently give another output
        raise SAEFormatError(f"{wpath} holds a tensor 'W_skip' but architecture {arch!r} has "
                             "no skip connection (skip_transcoder and "
                             "jumprelu_skip_transcoder do)")
    dims = f"d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if tc else "")
    out = {}
    for name, shape_of in shapes.items():
        if name not in arrays:
            raise SAEFormatError(f"{wpath} has no tensor {name!r} "
                                 f"(found: {', '.join(sorted(arrays)) or 'none'})")
        a = arrays[name]
        want = shape_of(d_in, d_sae, d_out)
        if tuple(a.shape) != want:
            raise SAEFormatError(f"{wpath}: {name} has shape {tuple(a.shape)} but cfg.json "
                                 f"({dims}) implies {want}")
        if a.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: {name} has dtype {a.dtype}, expected float")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{wpath}: {name} contains NaN or infinite values")
        out[name] = a
    extras = {"transcoder": True, "d_out": d_out} if tc else {}
    if arch == "gated":
        # the magnitude path is a ReLU SAE: W_enc * exp(r_mag), b_mag (float32, as
        # SAELens computes it); the gate keeps W_enc and b_gate
        gate_W = out["W_enc"]
        out["W_enc"] = (gate_W * np.exp(out["r_mag"])[None, :]).astype(np.float32)
        out["b_enc"] = out["b_mag"]
        extras["gate"] = {"W_enc": gate_W, "b_gate": out["b_gate"], "r_mag": out["r_mag"]}
    if not apply_b_dec and not tc:
        # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_dec = out["b_dec"].astype(np.float64)
        out["b_enc"] = (out["b_enc"] + b_dec @ out["W_enc"].astype(np.float64)).astype(np.float32)
        if arch == "gated":
            g = extras["gate"]
            g["b_gate"] = (g["b_gate"] + b_dec @ g["W_enc"].astype(np.float64)).astype(np.float32)
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        k = _cfg_int(cfg, "k", cpath)
        if k > d_sae:
            raise SAEFormatError(f"{cpath}: k = {k} exceeds d_sae = {d_sae}")
        extras["k"] = k
        if arch != "topk":
            extras["threshold"] = _topk_threshold(arrays, wpath, d_sae)
        if arch == "matryoshka_batchtopk":
            extras["widths"] = _matryoshka_widths(cfg.get("matryoshka_widths"), d_sae, cpath)
        # SAELens's TopK-family default is true: read as SAELens would run it
        rescale = cfg.get("rescale_acts_by_decoder_norm", arch != "topk")
        if not isinstance(rescale, bool):
            raise SAEFormatError(f"{cpath}: rescale_acts_by_decoder_norm must be true or false")
        if rescale:
            n = np.linalg.norm(out["W_dec"].astype(np.float64), axis=1)
            folded = fold_decoder_norms(SAEParams(out["W_enc"], out["b_enc"], out["W_dec"],
                                                  out["b_dec"]), np.where(n > 0, n, 1.0))
            out["W_enc"], out["b_enc"], out["W_dec"] = folded.W_enc, folded.b_enc, folded.W_dec
    elif arch in _JUMPRELU:
        if "threshold" not in arrays:
            raise SAEFormatError(f"{wpath} has no tensor 'threshold' (needed by {arch})")
        thr = arrays["threshold"]
        if tuple(thr.shape) != (d_sae,) or thr.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: threshold has shape {tuple(thr.shape)} and dtype "
                                 f"{thr.dtype}, expected float ({d_sae},)")
        thr = np.ascontiguousarray(thr, dtype=np.float32)
        if not np.isfinite(thr).all():
            raise SAEFormatError(f"{wpath}: threshold contains NaN or infinite values")
        extras["threshold"] = thr
    params = SAEParams(out["W_enc"], out["b_enc"], out["W_dec"], out["b_dec"],
                       W_skip=out.get("W_skip"))
    return params, cfg, extras


def _topk_threshold(arrays, wpath, d_sae: int) -> np.ndarray:
    """SAELens's BatchTopK ``topk_threshold`` (a float scalar tensor) per feature."""
    if "topk_threshold" not in arrays:
        raise SAEFormatError(f"{wpath} has no tensor 'topk_threshold' (a BatchTopK training "
                             "save holds one)")
    t = arrays["topk_threshold"]
    if t.size != 1 or t.ndim > 1 or t.dtype.kind != "f" or not np.isfinite(t).all():
        raise SAEFormatError(f"{wpath}: topk_threshold must be one finite float, got shape "
                             f"{tuple(t.shape)} dtype {t.dtype}")
    return np.full(d_sae, float(t.reshape(())), np.float32)


def _matryoshka_widths(widths, d_sae: int, cpath) -> list[int]:
    """cfg's ``matryoshka_widths``, with ``d_sae`` appended when the last is
    smaller (SAELens's rule), checked strictly increasing."""
    if (not isinstance(widths, list) or not widths
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths)):
        raise SAEFormatError(f"{cpath}: matryoshka_widths must be a non-empty list of "
                             f"integers, got {widths!r}")
    if widths[-1] < d_sae:
        widths = widths + [d_sae]
    try:
        return V.widths_arg(widths, d_sae).tolist()
    except ValueError as exc:
        raise SAEFormatError(f"{cpath}: matryoshka_widths: {exc}") from None


# ============================================================ sparsify
def is_sparsify(path) -> bool:
    """Whether ``path`` is a directory in EleutherAI sparsify's layout:
    ``cfg.json`` and ``sae.safetensors``, no SAELens weights file."""
    path = Path(path)
    return (path.is_dir() and (path / SPARSIFY_FILENAME).is_file()
            and (path / CFG_FILENAME).is_file() and not (path / WEIGHTS_FILENAME).exists())


def read_sparsify(directory) -> tuple[SAEParams, dict, dict]:
    """Read a sparsify (eai-sparsify 1.x, ``SparseCoder.save_to_disk``) TopK
    SAE, transcoder or skip transcoder: ``encoder.weight [d_sae, d_in]``
    (``nn.Linear`` layout, transposed here to ``W_enc``), ``encoder.bias``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, when ``skip_connection``
    is true, ``W_skip [d_out, d_in]`` (``nn.Linear`` layout, kept as is:
    ``x @ W_skip.T``); ``d_sae = num_latents or d_in * expansion_factor``;
    ``d_out`` is cfg's ``d_out`` where present (later sparsify versions and
    :func:`write_sparsify` write it when it differs from ``d_in``), else
    ``d_in``. sparsify encodes ``topk(relu(sae_in @ W_enc + b_enc), k)`` with
    ``sae_in = x - b_dec`` for an SAE and ``sae_in = x`` for a transcoder
    (``transcode: true``): the same codes as fastsae's topk (top-k then
    ReLU). Its ``forward`` adds ``x @ W_skip.T``. ``W_dec`` is not
    renormalized.

    Returned like :func:`read_sae_dir`: a cfg of ``architecture: "topk"``
    (cfg.json's ``metadata`` object, which :func:`write_sparsify` writes and
    sparsify ignores, becomes its ``metadata``), ``extras["k"]``, and for a
    transcoder ``extras["transcoder"] = True`` and ``extras["d_out"]``
    (``params.W_skip`` set for a skip transcoder, else None). ``groupmax``
    activations, a skip connection on an SAE (``transcode`` false), other
    tensors or shapes raise :class:`SAEFormatError` naming what is not
    supported.
    """
    directory = Path(directory)
    cpath = directory / CFG_FILENAME
    cfg = _read_cfg(directory)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise SAEFormatError(f"{cpath}: sparsify activation {act!r} is not supported "
                             "(only 'topk')")
    flags = {f: cfg.get(f, False) for f in ("transcode", "skip_connection")}
    for flag, v in flags.items():
        if not isinstance(v, bool):
            raise SAEFormatError(f"{cpath}: {flag} must be true or false, got {v!r}")
    transcode, skip = flags["transcode"], flags["skip_connection"]
    if skip and not transcode:
        raise SAEFormatError(f"{cpath}: a sparsify SAE with a skip connection "
                             "(skip_connection true, transcode false) is not supported: "
                             "fastsae runs skip connections on transcoders only")
    d_in = _cfg_int(cfg, "d_in", cpath)
    n = cfg.get("num_latents", 0)
    if n in (0, None):
        n = d_in * _cfg_int(cfg, "expansion_factor", cpath)
    d_sae = _cfg_int({"num_latents": n}, "num_latents", cpath)
    d_out = _cfg_int(cfg, "d_out", cpath) if cfg.get("d_out") is not None else d_in
    if not transcode and d_out != d_in:
        raise SAEFormatError(f"{cpath}: d_out = {d_out} differs from d_in = {d_in} but "
                             "transcode is false")
    k = _cfg_int(cfg, "k", cpath)
    if k > d_sae:
        raise SAEFormatError(f"{cpath}: k = {k} exceeds the number of latents {d_sae}")
    wpath = directory / SPARSIFY_FILENAME
    arrays, _ = load_tensors(wpath)
    want = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
            "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        want["W_skip"] = (d_out, d_in)
    if set(arrays) != set(want):
        kind = ("skip transcoder" if skip else "transcoder") if transcode else "SAE"
        raise SAEFormatError(f"{wpath} holds {', '.join(sorted(arrays))}; a sparsify {kind} "
                             f"(skip_connection {str(skip).lower()}) holds exactly "
                             f"{', '.join(sorted(want))}")
    out = {}
    for name, shape in want.items():
        a = arrays[name]
        if tuple(a.shape) != shape or a.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: {name} has shape {tuple(a.shape)} and dtype "
                                 f"{a.dtype}, expected float {shape} (d_in={d_in}, "
                                 f"d_sae={d_sae}, d_out={d_out})")
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{wpath}: {name} contains NaN or infinite values")
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    params = SAEParams(np.ascontiguousarray(out["encoder.weight"].T), out["encoder.bias"],
                       out["W_dec"], out["b_dec"], W_skip=out.get("W_skip"))
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    plain = {key: v for key, v in cfg.items() if key != "metadata"}
    info = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae,
            "metadata": {**meta, "converted_from": "sparsify", "sparsify_cfg": plain}}
    extras = {"k": k}
    if transcode:
        info["d_out"] = d_out
        extras.update(transcoder=True, d_out=d_out)
    return params, info, extras


def write_sparsify(directory, params: SAEParams, k: int, *, transcoder: bool,
                   metadata: dict | None = None) -> Path:
    """Write a TopK SAE (``transcoder=False``) or TopK transcoder / skip
    transcoder (``transcoder=True``; skip when ``params.W_skip`` is set) in
    sparsify's layout (what ``SparseCoder.save_to_disk`` writes and
    :func:`read_sparsify` reads): ``sae.safetensors`` with
    ``encoder.weight [d_sae, d_in]`` (``W_enc.T``), ``encoder.bias``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and ``W_skip [d_out, d_in]``
    (float32, no ``__metadata__``), and ``cfg.json`` with sparsify's fields
    in its order: ``activation "topk"``, ``expansion_factor`` (sparsify's
    default 32: unused while ``num_latents`` is set), ``normalize_decoder
    true``, ``num_latents = d_sae``, ``k``, ``multi_topk false``,
    ``skip_connection``, ``transcode``, ``d_in``; then ``d_out`` only when it
    differs from ``d_in`` (later sparsify versions read it; 1.3.3 has
    ``d_out = d_in`` and refuses such a file on the shapes), then
    ``metadata`` when given (sparsify drops fields it does not know).

    ``params`` are host float32 arrays; for an SAE (input centred by
    ``b_dec``) ``W_skip`` must be None and ``d_out == d_in``; for a
    transcoder the encoder reads the raw input. Raises ``ValueError`` on
    shapes that do not fit or ``k`` outside ``1..d_sae``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if not isinstance(transcoder, bool):
        raise TypeError(f"transcoder must be True or False, got {transcoder!r}")
    arr = {name: np.ascontiguousarray(np.asarray(a), dtype=np.float32)
           for name, a in params.as_dict().items()}
    if arr["W_enc"].ndim != 2 or arr["W_dec"].ndim != 2:
        raise ValueError("W_enc and W_dec must be 2-D")
    d_in, d_sae = arr["W_enc"].shape
    d_out = arr["W_dec"].shape[1]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out),
            "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    for name, a in arr.items():
        if a.shape != want[name]:
            raise ValueError(f"{name} has shape {a.shape}, expected {want[name]}")
    skip = "W_skip" in arr
    if not transcoder and (skip or d_out != d_in):
        raise ValueError("an SAE (transcoder=False) needs W_skip None and W_dec "
                         f"[d_sae, d_in]; got W_skip {'set' if skip else 'None'}, "
                         f"d_out = {d_out}, d_in = {d_in}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d_sae:
        raise ValueError(f"k must be an integer in 1..d_sae={d_sae}, got {k!r}")
    tensors = {"encoder.weight": np.ascontiguousarray(arr["W_enc"].T),
               "encoder.bias": arr["b_enc"], "W_dec": arr["W_dec"], "b_dec": arr["b_dec"]}
    if skip:
        tensors["W_skip"] = arr["W_skip"]
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": int(d_sae), "k": int(k), "multi_topk": False,
           "skip_connection": skip, "transcode": transcoder, "d_in": int(d_in)}
    if d_out != d_in:
        cfg["d_out"] = int(d_out)
    if metadata:
        cfg["metadata"] = dict(metadata)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / SPARSIFY_FILENAME, tensors)
    atomic_write_bytes(directory / CFG_FILENAME, json.dumps(cfg).encode())
    return directory


# ============================================================ Gemma Scope
def is_gemma_scope(path) -> bool:
    """Whether ``path`` is Gemma Scope's layout: a ``.npz`` file, or a
    directory holding ``params.npz`` and no ``cfg.json``."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".npz"
    return ((path / GEMMA_SCOPE_FILENAME).is_file()
            and not (path / CFG_FILENAME).exists())


def read_gemma_scope(path, *, transcoder: bool | None = None) -> tuple[SAEParams, dict, dict]:
    """Read a Gemma Scope SAE or transcoder (``params.npz``, or the directory
    holding it): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc
    [d_sae]``, ``b_dec [d_out]``, ``threshold [d_sae]``, with Gemma Scope's
    equations ``pre = x @ W_enc + b_enc`` (``b_dec`` is not subtracted),
    ``f = relu(pre) * (pre > threshold)``, ``out = f @ W_dec + b_dec``.

    An SAE (``d_out == d_in``) is returned like :func:`read_sae_dir`, with
    ``b_dec @ W_enc`` folded into ``b_enc`` (so the usual ``pre = (x - b_dec)
    @ W_enc + b_enc`` holds) and a cfg of ``architecture: "jumprelu"``. A
    transcoder (``d_out != d_in``, or ``transcoder=True``: Gemma Scope's
    transcoders between equal widths look like SAEs on disk) is returned
    like :func:`read_sae_dir`'s ``"jumprelu_transcoder"``: nothing folded,
    cfg ``architecture: "jumprelu_transcoder"`` with ``d_out``,
    ``extras["transcoder"] = True``, ``extras["d_out"]``; ``transcoder=False``
    refuses one. The archive is opened with ``allow_pickle=False``: an object
    array (a pickle) is refused, never loaded. A skip connection (a key
    naming ``skip``), missing keys, mismatched shapes, non-float or
    non-finite values raise :class:`SAEFormatError`; other keys are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Gemma Scope file not found: {path}")
    f = path / GEMMA_SCOPE_FILENAME if path.is_dir() else path
    with open(f, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would try other formats (a pickle)
            raise SAEFormatError(f"{f} is not a readable .npz archive (no zip header)")
    try:
        with np.load(f, allow_pickle=False) as z:
            names = sorted(z.files)
            missing = [k for k in _GEMMA_SCOPE_KEYS if k not in z.files]
            if missing:
                raise SAEFormatError(f"{f} is not a Gemma Scope SAE: it lacks "
                                     f"{', '.join(missing)} (found: {', '.join(names) or 'none'})")
            arrays = {k: z[k] for k in _GEMMA_SCOPE_KEYS}
    except SAEFormatError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise SAEFormatError(f"{f}: {exc} (pickled arrays are never loaded)") from None
    except (OSError, EOFError, KeyError) as exc:
        raise SAEFormatError(f"{f} is not a readable .npz archive: {exc}") from None
    skips = [n for n in names if "skip" in n.lower()]
    if skips:
        # ignoring it would silently drop a term of the output
        raise SAEFormatError(f"{f} holds {', '.join(skips)}: a Gemma Scope transcoder with a "
                             "skip connection is not supported in this layout")
    W_enc, W_dec = arrays["W_enc"], arrays["W_dec"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{f}: W_enc must be 2-D [d_in, d_sae], got shape {W_enc.shape}")
    d_in, d_sae = W_enc.shape
    d_out = W_dec.shape[1] if W_dec.ndim == 2 else d_in
    tc = d_out != d_in if transcoder is None else bool(transcoder)
    if d_out != d_in and not tc:
        raise SAEFormatError(f"{f}: W_dec {W_dec.shape} is {d_out} wide, W_enc's input "
                             f"{d_in}: a transcoder, but transcoder=False was asked for")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
              "b_dec": (d_out,), "threshold": (d_sae,)}
    out = {}
    for k, want in shapes.items():
        a = arrays[k]
        if tuple(a.shape) != want:
            raise SAEFormatError(f"{f}: {k} has shape {tuple(a.shape)}, expected {want} "
                                 f"(from W_enc's {W_enc.shape} and W_dec's {W_dec.shape})")
        if a.dtype.kind != "f":
            raise SAEFormatError(f"{f}: {k} has dtype {a.dtype}, expected float")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{f}: {k} contains NaN or infinite values")
        out[k] = a
    extras = {"threshold": out["threshold"]}
    if tc:
        b_enc = out["b_enc"]  # a transcoder's encoder reads x itself
        cfg = {"architecture": "jumprelu_transcoder", "d_in": int(d_in), "d_sae": int(d_sae),
               "d_out": int(d_out), "apply_b_dec_to_input": False,
               "metadata": {"source_format": "gemma_scope"}}
        extras.update(transcoder=True, d_out=int(d_out))
    else:
        fold = out["b_dec"].astype(np.float64) @ out["W_enc"].astype(np.float64)
        b_enc = (out["b_enc"] + fold).astype(np.float32)
        cfg = {"architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae),
               "apply_b_dec_to_input": False, "metadata": {"source_format": "gemma_scope"}}
    params = SAEParams(out["W_enc"], b_enc, out["W_dec"], out["b_dec"])
    return params, cfg, extras
