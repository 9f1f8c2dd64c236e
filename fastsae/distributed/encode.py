"""Encoding a shard set shard by shard: in this process or on a Dask cluster.

``fastsae encode --sae DIR --data SHARDS --out-dir OUT [--dask SCHEDULER|local[:N]]``
and :func:`encode_to_dir` encode each input shard (one ``.npy`` file of a
shard directory, or the one ``.npy`` file given) as one task, and write::

    OUT/<shard stem>.npz   the shard's codes: scipy.sparse CSR [rows, d_sae],
                           float32 values, int32 indices, int64 indptr
    OUT/index.json         written last, once every shard is written: the
                           shards in input order with their rows, non-zeros
                           and each output file's SHA-256

Each shard's file is written atomically by the task that encoded it, and the
index only after all of them, so a directory with an index is complete and a
failed run never leaves one. :func:`read_encoded` reads a directory back as
one CSR matrix (checking the index and every file's hash).

The work is the same everywhere: a task loads the SAE (once per worker
process, then cached), reads its shard in ``batch_size``-row batches, encodes
each with :meth:`SparseAutoencoder.encode` and writes the file. The ``.npz``
bytes are deterministic (fixed zip timestamps), so the same SAE, data,
batch size, backend and threads per task give byte-identical files and
hashes whether the tasks ran here or on a cluster. A task that raises is
resubmitted up to ``retries`` times (a worker that dies is replaced by Dask
and its task rerun); bad data (NaN or infinite values) is not retried.

On a cluster the SAE directory, the shards and ``OUT`` must be reachable at
the same paths from every worker (a shared file system), and fastsae must
be importable there. ``local[:N]`` starts a cluster of ``N`` worker
processes on this machine (default: one per core), one thread each.
Dask is the optional extra ``pip install 'fastsae[dask]'``; nothing here
imports it until a cluster is asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["EncodeError", "encode_to_dir", "read_encoded", "shard_files"]

INDEX_NAME = "index.json"
INDEX_FORMAT = "fastsae-encoded-shards"
INDEX_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so that equal codes give equal bytes
_CONNECT_TIMEOUT_S = 30  # how long a scheduler address may take to answer


class EncodeError(RuntimeError):
    """A shard could not be encoded (after its retries), or an encoded
    directory is incomplete, corrupt or not fastsae's."""


class ShardDataError(ValueError):
    """The shard's data are bad (NaN or infinite values): retrying cannot help."""


# ================================================================ inputs
def shard_files(data) -> list[Path]:
    """The ``.npy`` files a ``--data`` path names, in the order
    :func:`fastsae.data.open_source` reads them: a directory's shards in
    file-name order, or the one file."""
    p = Path(data)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix == ".npy" and q.is_file())
        if not files:
            raise ValueError(f"no .npy shards in directory {p}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"data not found: {p}")
    if p.suffix != ".npy":
        raise ValueError(f"--data must be a .npy file or a directory of .npy shards, got {p}")
    return [p]


def _parse_dask(spec):
    """``("local", n_workers | None)`` or ``("address", spec)``."""
    s = str(spec).strip()
    if s == "local":
        return "local", None
    if s.startswith("local:"):
        n = s[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--dask local:N needs a positive worker count N, got {spec!r}")
        return "local", int(n)
    if not s:
        raise ValueError("--dask needs a scheduler address (tcp://host:8786) or local[:N]")
    return "address", s


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError("encoding on Dask needs the dask extra: "
                          "pip install 'fastsae[dask]'") from None
    return distributed


# ============================================================ the task
_SAE_CACHE: dict = {}


def _sae_signature(sae_dir: Path):
    """Files and modification times of an SAE path: a changed SAE is reloaded."""
    files = sorted(sae_dir.iterdir()) if sae_dir.is_dir() else [sae_dir]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())


def _load_sae(sae_dir: str, backend):
    from ..model import SparseAutoencoder

    p = Path(sae_dir)
    key = (str(p.resolve()), backend, _sae_signature(p))
    sae = _SAE_CACHE.get(key)
    if sae is None:
        _SAE_CACHE.clear()  # one SAE per worker process at a time
        sae = _SAE_CACHE[key] = SparseAutoencoder.load(p, backend=backend)
    return sae


def _csr_npz_bytes(indptr, indices, values, shape) -> bytes:
    """A compressed ``.npz`` that ``scipy.sparse.load_npz`` reads as a
    ``csr_array``, with fixed zip timestamps (the same codes, the same bytes)."""
    arrays = {"indices": indices, "indptr": indptr, "format": np.array(b"csr"),
              "shape": np.array(shape, dtype=np.int64), "data": values,
              "_is_array": np.array(True)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _encode_shard(sae_dir: str, backend, shard: str, out: str, batch_size: int,
                  threads, precision: str = "fp32") -> dict:
    """Encode one shard into ``out`` (atomically); returns its index entry.
    Runs in a worker process or here."""
    from ..data import _open_npy
    from ..io import atomic_write_bytes
    from ..training import limit_threads

    t0 = time.perf_counter()
    sae = _load_sae(sae_dir, backend)
    arr = _open_npy(Path(shard))  # a shard of no rows is fine: it gives an empty file
    n_rows, d_in = (int(v) for v in arr.shape)
    if d_in != sae.d_in:
        raise ShardDataError(f"{shard} has d_in = {d_in} but the SAE expects "
                             f"d_in = {sae.d_in}")
    indptr = [np.zeros(1, np.int64)]
    indices, values = [], []
    nnz = 0
    with limit_threads(threads, sae.backend):
        encode = sae.sparse_encoder(precision)  # bf16: packs the weights once per shard
        for lo in range(0, n_rows, batch_size):
            hi = min(lo + batch_size, n_rows)
            x = np.ascontiguousarray(arr[lo:hi], dtype=np.float32)
            if not np.isfinite(x).all():
                bad = lo + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
                raise ShardDataError(f"{shard} contains NaN or infinite values "
                                     f"(first in row {bad})")
            c = encode(x)
            indptr.append(np.asarray(c.indptr[1:], dtype=np.int64) + nnz)
            indices.append(np.asarray(c.indices, dtype=np.int32))
            values.append(np.asarray(c.values, dtype=np.float32))
            nnz += int(c.indptr[-1])
    data = _csr_npz_bytes(np.concatenate(indptr),
                          np.concatenate(indices) if indices else np.zeros(0, np.int32),
                          np.concatenate(values) if values else np.zeros(0, np.float32),
                          (n_rows, sae.d_sae))
    atomic_write_bytes(out, data)
    return {"file": Path(out).name, "shard": Path(shard).name, "rows": n_rows,
            "nnz": nnz, "backend": sae.backend.name, "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": time.perf_counter() - t0}


# ============================================================ the driver
def _check_out_dir(out_dir: Path) -> None:
    """A new directory (its parent must exist), an empty one or a previous
    encode's (a foreign ``index.json`` is not taken over)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} exists and is not a directory")
    if not out_dir.exists():
        if not out_dir.parent.is_dir():
            raise ValueError(f"the parent of --out-dir does not exist: {out_dir.parent}")
        return
    index = out_dir / INDEX_NAME
    if index.exists():
        _read_index(out_dir)
    elif any(out_dir.iterdir()):
        raise ValueError(f"--out-dir {out_dir} is not empty and holds no {INDEX_NAME} of an "
                         "earlier fastsae encode: give a new or empty directory")


def _clear_out_dir(out_dir: Path) -> None:
    """Remove a previous encode's index (first, so that the directory never
    looks complete while it is rewritten) and then its shard files."""
    out_dir.mkdir(exist_ok=True)
    index = out_dir / INDEX_NAME
    if index.exists():
        old = _read_index(out_dir)
        index.unlink()
        for s in old["shards"]:
            (out_dir / s["file"]).unlink(missing_ok=True)


def encode_to_dir(sae, data, out_dir, *, batch_size: int = 4096, backend=None,
                  threads: int | None = None, dask=None, retries: int = 2,
                  precision: str = "fp32", progress=print) -> dict:
    """Encode every shard of ``data`` with the SAE at path ``sae`` into
    ``out_dir``: one ``<shard stem>.npz`` per shard and ``index.json`` last
    (layout in the module docstring). Returns the index (a dict).

    ``dask``: ``None`` (encode here, shard after shard), ``"local"`` or
    ``"local:N"`` (a local cluster of N worker processes), a scheduler
    address, or a ``distributed.Client``. ``threads``: threads per task
    (default: all cores here; on a local cluster the cores divided among the
    workers; on another cluster the workers' own setting). ``retries``: how
    often a failed task is resubmitted before the run fails with
    :class:`EncodeError`. ``progress``: called with one line per finished,
    retried or failed shard (``None``: silent). ``precision``: ``"fp32"``
    or ``"bf16"`` (:meth:`fastsae.SparseAutoencoder.encode`), recorded in the
    index.
    """
    from ..model import SparseAutoencoder  # noqa: F401 - import errors surface here, not on workers

    say = progress if progress is not None else (lambda _msg: None)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
    sae_path = Path(sae).resolve()  # workers elsewhere have another working directory
    model = _load_sae(str(sae_path), backend)  # fails here, clearly, before any task
    model.sparse_encoder(precision)  # so does a precision this backend or build cannot run
    files = [f.resolve() for f in shard_files(data)]
    from ..data import _open_npy
    rows = []
    for f in files:  # header checks here: a wrong width fails before any work
        n, d = _open_npy(f).shape
        if d != model.d_in:
            raise ValueError(f"the data have d_in = {d} ({f}) but the SAE expects "
                             f"d_in = {model.d_in}")
        rows.append(int(n))
    out_dir = Path(out_dir).resolve()
    _check_out_dir(out_dir)

    tasks = [(str(sae_path), backend, str(f), str(out_dir / (f.stem + ".npz")))
             for f in files]
    client, own = None, []
    if dask is not None:  # connect first: a bad address leaves the directory untouched
        client, own, where, threads = _open_client(dask, threads)
    else:
        where = "this process"
    t0 = time.perf_counter()
    try:
        _clear_out_dir(out_dir)
        if client is None:
            results = _run_here(tasks, (batch_size, threads, precision), retries, say)
        else:
            results = _submit_all(client, tasks, (batch_size, threads, precision), retries, say)
    finally:
        for thing in own:  # what this call started: the client, then its cluster
            thing.close()
    wall = time.perf_counter() - t0

    backends = sorted({r["backend"] for r in results})
    if backends != [model.backend.name]:
        say(f"note: the tasks ran on backend(s) {', '.join(backends)}, this process on "
            f"{model.backend.name} (give --backend to make them all the same)")
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
             "sae": str(sae_path), "architecture": model.architecture,
             "d_in": model.d_in, "d_sae": model.d_sae,
             "rows": int(sum(rows)), "nnz": int(sum(r["nnz"] for r in results)),
             "batch_size": int(batch_size), "backend": ",".join(backends),
             "precision": precision,
             "threads_per_task": threads,
             "shards": [{k: r[k] for k in ("file", "shard", "rows", "nnz", "sha256")}
                        for r in results]}
    from ..io import atomic_write_bytes
    atomic_write_bytes(out_dir / INDEX_NAME,
                       (json.dumps(index, indent=1) + "\n").encode())
    l0 = index["nnz"] / max(index["rows"], 1)
    say(f"encoded {index['rows']:,} rows of {len(files)} shard(s) into {model.d_sae} features "
        f"(L0 {l0:.2f}) on {where} in {wall:.1f} s -> {out_dir}")
    return index


def _done_line(i, n, r):
    return (f"[{i}/{n}] {r['shard']}: {r['rows']:,} rows, "
            f"L0 {r['nnz'] / max(r['rows'], 1):.2f}, {r['seconds']:.1f} s")


def _give_up(task, attempts, exc):
    return EncodeError(f"encoding shard {Path(task[2]).name} failed after {attempts} "
                       f"attempt(s): {type(exc).__name__}: {exc}")


def _run_here(tasks, settings, retries, say):
    task = _encode_shard  # looked up per run, so that tests can replace it
    results = []
    for i, t in enumerate(tasks):
        for attempt in range(1, retries + 2):
            try:
                r = task(*t, *settings)
                break
            except ShardDataError:
                raise
            except Exception as exc:
                if attempt > retries:
                    raise _give_up(t, attempt, exc) from exc
                say(f"shard {Path(t[2]).name} failed on attempt {attempt} of {retries + 1} "
                    f"({type(exc).__name__}: {exc}): retrying")
        results.append(r)
        say(_done_line(i + 1, len(tasks), r))
    return results


def _open_client(spec, threads):
    """``(client, [what to close], description, threads per task)``."""
    distributed = _import_distributed()
    if isinstance(spec, distributed.Client):
        return spec, [], f"Dask cluster {spec.scheduler.address}", threads
    kind, arg = _parse_dask(spec)
    if kind == "address":
        try:
            client = distributed.Client(arg, timeout=_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise EncodeError(f"cannot reach the Dask scheduler at {arg}: {exc}") from None
        return client, [client], f"the Dask cluster at {arg}", threads
    n = arg or os.cpu_count() or 1
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // n)
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    return (client, [client, cluster],
            f"a local Dask cluster of {n} worker process(es)", threads)


def _submit_all(client, tasks, settings, retries, say):
    distributed = _import_distributed()
    task = _encode_shard
    token = os.urandom(4).hex()

    def submit(i, attempt):
        return client.submit(task, *tasks[i], *settings, pure=False,
                             key=f"fastsae-encode-{token}-{i}-{attempt}")

    pending = {submit(i, 1): (i, 1) for i in range(len(tasks))}
    results = [None] * len(tasks)
    done = 0
    try:
        while pending:
            finished = distributed.wait(list(pending), return_when="FIRST_COMPLETED").done
            for fut in finished:
                i, attempt = pending.pop(fut)
                try:
                    r = fut.result()
                except ShardDataError:
                    raise
                except Exception as exc:
                    if attempt > retries:
                        raise _give_up(tasks[i], attempt, exc) from exc
                    say(f"shard {Path(tasks[i][2]).name} failed on attempt {attempt} of "
                        f"{retries + 1} ({type(exc).__name__}: {exc}): retrying")
                    pending[submit(i, attempt + 1)] = (i, attempt + 1)
                    continue
                results[i] = r
                done += 1
                say(_done_line(done, len(tasks), r))
    finally:
        for fut in pending:
            fut.cancel()
    return results


# ============================================================ reading back
def _read_index(out_dir: Path) -> dict:
    path = out_dir / INDEX_NAME
    if not path.is_file():
        raise EncodeError(f"{out_dir} holds no {INDEX_NAME}: not a complete fastsae encode "
                          "(an interrupted or failed run writes none)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncodeError(f"{path} is not a readable index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise EncodeError(f"{path} is not a fastsae encode index (format "
                          f"{index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != INDEX_VERSION:
        raise EncodeError(f"{path} has index version {index.get('version')!r}; this fastsae "
                          f"reads version {INDEX_VERSION}")
    shards = index.get("shards")
    if (not isinstance(shards, list) or not isinstance(index.get("d_sae"), int)
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                       and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)
                       and "/" not in s["file"] and "\\" not in s["file"]
                       and s["file"] not in ("", ".", "..") for s in shards)):
        raise EncodeError(f"{path} is malformed (its shard list or d_sae)")
    return index


def _read_csr(path: Path, rows: int, d_sae: int):
    import scipy.sparse as sp

    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in ("indptr", "indices", "data", "shape")}
    except Exception as exc:
        raise EncodeError(f"cannot read {path} as encoded codes: {exc}") from None
    indptr, indices, values = a["indptr"], a["indices"], a["data"]
    if (tuple(int(s) for s in a["shape"]) != (rows, d_sae) or indptr.shape != (rows + 1,)
            or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or indptr[-1] != indices.size or indices.size != values.size
            or (indices.size and (indices.min() < 0 or indices.max() >= d_sae))):
        raise EncodeError(f"{path} does not hold a valid [{rows}, {d_sae}] CSR matrix")
    return sp.csr_array((values, indices, indptr), shape=(rows, d_sae))


def read_encoded(out_dir, *, verify: bool = True):
    """All codes of an :func:`encode_to_dir` output as one
    ``scipy.sparse.csr_array [rows, d_sae]`` (float32), shards in input
    order. With ``verify`` every file's SHA-256 is checked against the
    index. Missing, altered or foreign files raise :class:`EncodeError`;
    nothing is unpickled."""
    import scipy.sparse as sp

    out_dir = Path(out_dir)
    index = _read_index(out_dir)
    parts = []
    for s in index["shards"]:
        f = out_dir / s["file"]
        if not f.is_file():
            raise EncodeError(f"{f} is missing (listed in {out_dir / INDEX_NAME})")
        if verify and hashlib.sha256(f.read_bytes()).hexdigest() != s["sha256"]:
            raise EncodeError(f"{f} does not match its SHA-256 in the index: altered or "
                              "corrupt")
        parts.append(_read_csr(f, s["rows"], index["d_sae"]))
    if not parts:
        return sp.csr_array((0, index["d_sae"]), dtype=np.float32)
    return sp.vstack(parts, format="csr")
