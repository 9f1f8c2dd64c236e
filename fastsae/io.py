"""Files: SAELens-format SAE directories, atomic writes, training checkpoints.

SAELens directory (what ``SAE.save_model`` writes and ``SAE.load_from_disk``
reads)::

    DIR/cfg.json                  one JSON object
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae],
                                  W_dec [d_sae, d_in], b_dec [d_in], float32

(``"jumprelu"`` SAEs also store ``threshold [d_sae]``.) For a standard ReLU
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
    "atomic_write_json", "write_sae_dir", "read_sae_dir", "read_gemma_scope", "read_sparsify", "is_sparsify", "save_tensors",
    "load_tensors", "GEMMA_SCOPE_FILENAME", "is_gemma_scope", "fold_decoder_norms",
]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: Gemma Scope's published file: one ``params.npz`` per SAE.
GEMMA_SCOPE_FILENAME = "params.npz"
#: EleutherAI sparsify's weights file (beside its own cfg.json).
SPARSIFY_FILENAME = "sae.safetensors"
_GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

#: Tensors of a standard SAE and their shapes in terms of (d_in, d_sae).
_TENSOR_SHAPES = {
    "W_enc": lambda d_in, d_sae: (d_in, d_sae),
    "b_enc": lambda d_in, d_sae: (d_sae,),
    "W_dec": lambda d_in, d_sae: (d_sae, d_in),
    "b_dec": lambda d_in, d_sae: (d_in,),
}

#: dtype strings accepted in cfg.json (SAELens writes e.g. "float32" or,
#: in older versions, "torch.float32"). Weights are converted to float32.
_DTYPES = {"float32", "float16", "float64", "bfloat16"}

#: Architectures fastsae reads and writes: ReLU, TopK (per row) and JumpReLU
#: (how SAELens saves a BatchTopK-trained SAE for inference).
_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")

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
    for name, shape in _TENSOR_SHAPES.items():
        if tensors[name].shape != shape(d_in, d_sae):
            raise ValueError(f"{name} has shape {tensors[name].shape}, "
                             f"expected {shape(d_in, d_sae)}")
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
    if architecture == "jumprelu":
        thr = np.ascontiguousarray(np.asarray(threshold), dtype=np.float32)
        if thr.shape != (d_sae,):
            raise ValueError(f"a jumprelu SAE needs threshold of shape ({d_sae},), "
                             f"got {thr.shape}")
        tensors["threshold"] = thr
    # The same top-level fields (and order) as SAELens 6's save_model.
    cfg = {
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _metadata_block(metadata),
    }
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
    ``rescale_acts_by_decoder_norm: true`` is converted by folding the decoder norms into ``W_enc``, ``b_enc``
    and ``W_dec`` (SAELens's ``fold_W_dec_norm``), which gives the same
    codes times the norms and the same reconstruction. A cfg with
    ``apply_b_dec_to_input: false`` is converted exactly (in real arithmetic)
    by folding ``b_dec @ W_enc`` into ``b_enc``. Unknown cfg fields are
    ignored. Raises :class:`SAEFormatError` for a missing or malformed file or
    field, another architecture, an unsupported input normalization, or
    tensors whose names or shapes do not match the cfg.
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
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEFormatError(f"{cpath}: apply_b_dec_to_input must be true or false, "
                             f"got {apply_b_dec!r}")

    wpath = directory / WEIGHTS_FILENAME
    if not wpath.is_file():
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".pkl"))
        hint = (f" ({', '.join(others)} found: pickled files are never loaded)" if others else "")
        raise SAEFormatError(f"{directory} has no {WEIGHTS_FILENAME}{hint}")
    arrays, _ = load_tensors(wpath)
    out = {}
    for name, shape_of in (_GATED_SHAPES if arch == "gated" else _TENSOR_SHAPES).items():
        if name not in arrays:
            raise SAEFormatError(f"{wpath} has no tensor {name!r} "
                                 f"(found: {', '.join(sorted(arrays)) or 'none'})")
        a = arrays[name]
        want = shape_of(d_in, d_sae)
        if tuple(a.shape) != want:
            raise SAEFormatError(f"{wpath}: {name} has shape {tuple(a.shape)} but cfg.json "
                                 f"(d_in={d_in}, d_sae={d_sae}) implies {want}")
        if a.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: {name} has dtype {a.dtype}, expected float")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{wpath}: {name} contains NaN or infinite values")
        out[name] = a
    extras = {}
    if arch == "gated":
        # the magnitude path is a ReLU SAE: W_enc * exp(r_mag), b_mag (float32, as
        # SAELens computes it); the gate keeps W_enc and b_gate
        gate_W = out["W_enc"]
        out["W_enc"] = (gate_W * np.exp(out["r_mag"])[None, :]).astype(np.float32)
        out["b_enc"] = out["b_mag"]
        extras["gate"] = {"W_enc": gate_W, "b_gate": out["b_gate"], "r_mag": out["r_mag"]}
    if not apply_b_dec:
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
    elif arch == "jumprelu":
        if "threshold" not in arrays:
            raise SAEFormatError(f"{wpath} has no tensor 'threshold' (needed by jumprelu)")
        thr = arrays["threshold"]
        if tuple(thr.shape) != (d_sae,) or thr.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: threshold has shape {tuple(thr.shape)} and dtype "
                                 f"{thr.dtype}, expected float ({d_sae},)")
        thr = np.ascontiguousarray(thr, dtype=np.float32)
        if not np.isfinite(thr).all():
            raise SAEFormatError(f"{wpath}: threshold contains NaN or infinite values")
        extras["threshold"] = thr
    params = SAEParams(out["W_enc"], out["b_enc"], out["W_dec"], out["b_dec"])
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
    SAE: ``encoder.weight [d_sae, d_in]`` (``nn.Linear`` layout, transposed
    here to ``W_enc``), ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``;
    ``d_sae = num_latents or d_in * expansion_factor``. sparsify encodes
    ``topk(relu((x - b_dec) @ W_enc + b_enc), k)``: the same codes as
    fastsae's topk (top-k then ReLU). ``W_dec`` is not renormalized.

    Returned like :func:`read_sae_dir` (a cfg of ``architecture: "topk"``,
    ``extras["k"]``). Transcoders (``transcode``/``skip_connection``),
    ``groupmax`` activations, other tensors or shapes raise
    :class:`SAEFormatError` naming what is not supported.
    """
    directory = Path(directory)
    cpath = directory / CFG_FILENAME
    cfg = _read_cfg(directory)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise SAEFormatError(f"{cpath}: sparsify activation {act!r} is not supported "
                             "(only 'topk')")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag, False) is not False:
            raise SAEFormatError(f"{cpath}: a sparsify transcoder ({flag}: {cfg[flag]!r}) "
                                 "cannot be loaded as an SAE: fastsae does not run "
                                 "transcoders yet")
    d_in = _cfg_int(cfg, "d_in", cpath)
    n = cfg.get("num_latents", 0)
    if n in (0, None):
        n = d_in * _cfg_int(cfg, "expansion_factor", cpath)
    d_sae = _cfg_int({"num_latents": n}, "num_latents", cpath)
    k = _cfg_int(cfg, "k", cpath)
    if k > d_sae:
        raise SAEFormatError(f"{cpath}: k = {k} exceeds the number of latents {d_sae}")
    wpath = directory / SPARSIFY_FILENAME
    arrays, _ = load_tensors(wpath)
    want = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
            "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if set(arrays) != set(want):
        raise SAEFormatError(f"{wpath} holds {', '.join(sorted(arrays))}; a sparsify SAE "
                             f"holds exactly {', '.join(sorted(want))}")
    out = {}
    for name, shape in want.items():
        a = arrays[name]
        if tuple(a.shape) != shape or a.dtype.kind != "f":
            raise SAEFormatError(f"{wpath}: {name} has shape {tuple(a.shape)} and dtype "
                                 f"{a.dtype}, expected float {shape} (d_in={d_in}, "
                                 f"d_sae={d_sae})")
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{wpath}: {name} contains NaN or infinite values")
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    params = SAEParams(np.ascontiguousarray(out["encoder.weight"].T), out["encoder.bias"],
                       out["W_dec"], out["b_dec"])
    info = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae,
            "metadata": {"converted_from": "sparsify", "sparsify_cfg": cfg}}
    return params, info, {"k": k}


# ============================================================ Gemma Scope
def is_gemma_scope(path) -> bool:
    """Whether ``path`` is Gemma Scope's layout: a ``.npz`` file, or a
    directory holding ``params.npz`` and no ``cfg.json``."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".npz"
    return ((path / GEMMA_SCOPE_FILENAME).is_file()
            and not (path / CFG_FILENAME).exists())


def read_gemma_scope(path) -> tuple[SAEParams, dict, dict]:
    """Read a Gemma Scope SAE (``params.npz``, or the directory holding it):
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
    ``b_dec [d_in]``, ``threshold [d_sae]``, with Gemma Scope's equations
    ``pre = x @ W_enc + b_enc`` (``b_dec`` is not subtracted),
    ``f = relu(pre) * (pre > threshold)``, ``x_hat = f @ W_dec + b_dec``.

    Returned like :func:`read_sae_dir`, with ``b_dec @ W_enc`` folded into
    ``b_enc`` (so the usual ``pre = (x - b_dec) @ W_enc + b_enc`` holds) and a
    cfg of ``architecture: "jumprelu"``. The archive is opened with
    ``allow_pickle=False``: an object array (a pickle) is refused, never
    loaded. Other keys, missing keys, mismatched shapes, non-float or
    non-finite values raise :class:`SAEFormatError`.
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
    W_enc = arrays["W_enc"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{f}: W_enc must be 2-D [d_in, d_sae], got shape {W_enc.shape}")
    d_in, d_sae = W_enc.shape
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
              "b_dec": (d_in,), "threshold": (d_sae,)}
    out = {}
    for k, want in shapes.items():
        a = arrays[k]
        if tuple(a.shape) != want:
            raise SAEFormatError(f"{f}: {k} has shape {tuple(a.shape)}, expected {want} "
                                 f"(from W_enc's {W_enc.shape})")
        if a.dtype.kind != "f":
            raise SAEFormatError(f"{f}: {k} has dtype {a.dtype}, expected float")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise SAEFormatError(f"{f}: {k} contains NaN or infinite values")
        out[k] = a
    fold = out["b_dec"].astype(np.float64) @ out["W_enc"].astype(np.float64)
    b_enc = (out["b_enc"] + fold).astype(np.float32)
    cfg = {"architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae),
           "apply_b_dec_to_input": False, "metadata": {"source_format": "gemma_scope"}}
    params = SAEParams(out["W_enc"], b_enc, out["W_dec"], out["b_dec"])
    return params, cfg, {"threshold": out["threshold"]}
