"""Output directories: which files a run owns, the overwrite rule, the write probe.

A run's output directory holds the files fastsae writes there
(:data:`RUN_FILES`, the SAE directory ``sae/`` with :data:`SAE_FILES`, and
the ``--plot`` images :data:`PLOT_FILES`) and whatever else the user keeps
there, which fastsae never touches. A new run refuses a directory that
already holds a run (:class:`RunExistsError`) unless told to replace it;
replacing removes only fastsae's own files (and the temporary files of its
interrupted writes).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..io import CFG_FILENAME, WEIGHTS_FILENAME, stale_tmp_files
from .checkpoint import CHECKPOINT_FILENAME
from .metrics import METRICS_FILENAME

__all__ = ["RUN_FILES", "SAE_DIRNAME", "SAE_FILES", "PLOT_FILES", "RunExistsError",
           "run_files", "remove_run", "check_writable", "same_dir"]

#: Files a run writes at the top of its output directory.
RUN_FILES = (CHECKPOINT_FILENAME, "checkpoint.json", METRICS_FILENAME, "summary.json")
#: The final SAE's directory inside the output directory, and its files.
SAE_DIRNAME = "sae"
SAE_FILES = (CFG_FILENAME, WEIGHTS_FILENAME)
#: The images ``fastsae train --plot`` writes.
PLOT_FILES = ("total.png", "l0.png", "dead_fraction.png", "feature_density.png")


class RunExistsError(FileExistsError):
    """The output directory already holds a run and replacing it was not asked for."""


def same_dir(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same directory (either may not exist yet)."""
    return Path(a).resolve() == Path(b).resolve()


def _owned(out_dir: Path) -> list[Path]:
    """Every path fastsae may have written in ``out_dir``, existing or not."""
    sae = out_dir / SAE_DIRNAME
    return ([out_dir / n for n in RUN_FILES + PLOT_FILES] + [sae / n for n in SAE_FILES])


def run_files(out_dir) -> list[Path]:
    """The files of a run that exist in ``out_dir`` (empty: no run there)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return [p for p in _owned(out_dir) if p.exists()]


def remove_run(out_dir) -> list[Path]:
    """Remove the run in ``out_dir``: fastsae's files, the temporary files of
    their interrupted writes, and ``sae/`` if that leaves it empty. Returns
    what was removed; every other file stays."""
    out_dir = Path(out_dir)
    removed = []
    for p in _owned(out_dir):
        for q in ([p] if p.exists() else []) + stale_tmp_files(p):
            q.unlink()
            removed.append(q)
    sae = out_dir / SAE_DIRNAME
    if sae.is_dir() and not any(sae.iterdir()):
        sae.rmdir()
        removed.append(sae)
    return removed


def check_writable(out_dir) -> None:
    """Create ``out_dir`` (with parents) and write and remove a probe file
    there, so an unusable directory fails before training starts. Raises
    ``OSError`` with a message naming the directory."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(f"cannot create the output directory {out_dir}: "
                        f"{exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastsae-write-probe.", dir=out_dir)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise type(exc)(f"the output directory {out_dir} is not writable: "
                        f"{exc.strerror or exc}") from None
