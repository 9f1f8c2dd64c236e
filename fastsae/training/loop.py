"""The training loop: :class:`Trainer`, progress, NaN handling, resume.

:class:`Trainer` trains a :class:`fastsae.SparseAutoencoder` (or the plain
:class:`fastsae.Autoencoder`) on a data source. What is trained, and how one
step runs, is the business of the model's :class:`~fastsae.training.state.
TrainingState` (parameters and Adam state live on the backend, from
``to_backend``, for the whole run; they come back to the host only for
metrics, resampling and checkpoints); the loop owns the schedule, the data
stream, the firing windows, the metrics log and the checkpoints.

Files written when ``out_dir`` is given::

    out_dir/checkpoint.safetensors  parameters, Adam moments, firing counts;
                                    the run state (step, scale, data position,
                                    RNG state, config) as JSON in the header
    out_dir/checkpoint.json         the same run state, for people (not read)
    out_dir/metrics.jsonl           one JSON object per logged step
    out_dir/sae/                    the final SAE, SAELens format, on raw inputs
    out_dir/summary.json            final metrics and feature-density histogram

Every file is written atomically (see :mod:`fastsae.training.checkpoint`).
Before the first step the output directory is created and probed for
writing, and a new run refuses a directory that already holds a run
(:class:`~fastsae.training.outdir.RunExistsError`) unless ``overwrite=True``,
which removes only fastsae's files there (see :mod:`fastsae.training.outdir`).

Resuming from a checkpoint continues bit for bit: the batches depend only on
(seed, rows consumed), everything else that evolves is saved, and the resumed
run uses the backend and thread limit recorded in the checkpoint unless told
otherwise (then a :class:`NotBitExactWarning` says so). A run's length is
fixed when it starts (the learning rate decays over the last
``lr_decay_fraction`` of its steps), so a resume finishes the steps it was
started with.

A step whose loss is NaN or infinite stops the run (:class:`TrainingDiverged`,
naming the step and the last good checkpoint); so does a checkpoint whose
parameters or optimizer state are no longer finite, which is then not written.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..autoencoder import Autoencoder
from ..backends import bf16 as BF
from ..backends import get_backend
from ..data import (BatchStream, PairedSource, norm_scaling_factor, open_source, recovery,
                    sample_rows)
from ..io import SAEFormatError, atomic_write_json
from ..model import ACTIVATIONS, TOPK_ACTIVATIONS, SparseAutoencoder
from .checkpoint import CHECKPOINT_FILENAME, read_checkpoint, write_checkpoint
from .config import TrainConfig
from .controller import L0Controller
from .metrics import METRICS_FILENAME, FiringWindow, MetricsAccumulator, MetricsLog, none_if_nan
from .outdir import RunExistsError, check_writable, remove_run, run_files, same_dir
from .state import TrainingState, make_state, model_from_info
from .threads import limit_threads

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "NotBitExactWarning"]


class TrainingDiverged(FloatingPointError):
    """The loss, the parameters or the optimizer state became NaN or
    infinite; the message names the step and the last good checkpoint."""


class NotBitExactWarning(UserWarning):
    """A resumed run continues on another backend or thread count than the
    one it was started with, so it will not match an uninterrupted run bit
    for bit."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    ``metrics``: final evaluation (``mse``, ``explained_variance``, ``l0``,
    ``dead_fraction``; MSE in training units, i.e. on normalized inputs),
    throughput (``tokens_per_s``, ``wall_s``), ``backend``, ``steps`` and,
    when a true dictionary was given, ``mean_max_cosine`` and ``recovered``.
    ``history``: the logged metric records. ``density``: histogram of
    log10 feature firing frequencies over the last window.
    """

    model: object
    metrics: dict
    history: list = field(default_factory=list)
    density: dict | None = None


class Trainer:
    """Train a model on a data source.

    Parameters
    ----------
    model : SparseAutoencoder or Autoencoder
    data : array, ``.npy`` path, shard directory or :class:`fastsae.data.DataSource`
        A transcoder's: an ``(inputs, targets)`` pair of those (the same rows
        in the same order) or a :class:`fastsae.data.PairedSource`.
    config : TrainConfig, optional
    out_dir : path, optional
        Checkpoints, metrics log, final SAE and summary go here.
    true_dictionary : array ``[n_features, d_in]``, optional
        Report ground-truth recovery against it (a transcoder's is
        ``[n_features, d_out]``, the output directions).
    backend : str or Backend, optional
        Defaults to the model's backend.
    threads : int, optional
        Limit the backend and BLAS/OpenMP to this many threads while training
        (:func:`~fastsae.training.threads.limit_threads`; ``None``: no limit).
        Recorded in checkpoints, and used again on resume.
    overwrite : bool
        ``out_dir`` may already hold a run only when this is true; the run's
        files (and only those) are then removed before the first step.
    extra_state : dict, optional
        JSON-able information stored in checkpoints (e.g. how to rebuild the data).
    distributed : None or "data"
        ``"data"``: data-parallel training over MPI, the script run under
        ``mpiexec -n R`` (see :mod:`fastsae.distributed.data_parallel`): every
        rank builds the same trainer, trains on its share of each batch,
        and only rank 0 writes ``out_dir``; ``threads`` defaults to the
        rank's share of the machine's cores. Needs ``fastsae[mpi]``.
    comm : Communicator, optional
        The :class:`fastsae.distributed.comm.Communicator` to use (default:
        one over ``MPI_COMM_WORLD``, with a ``timeout`` of
        ``distributed_timeout`` seconds).
    check_every : int
        Data-parallel: compare a checksum of the parameters across ranks
        every this many steps (and at the end); a mismatch raises
        :class:`fastsae.distributed.comm.RanksDiverged`.
    distributed_timeout : float
        Data-parallel: seconds a rank may go without finishing a step before
        it stops (so a stuck or lost rank ends the run instead of hanging it).

    Attributes: ``config``, ``model``, ``source`` (the data), ``backend``,
    ``state`` (the :class:`~fastsae.training.state.TrainingState`), ``step``
    (steps taken), ``window`` (:class:`~fastsae.training.metrics.FiringWindow`,
    after :meth:`setup`), ``history`` (logged records),
    ``last_checkpoint_step`` and ``last_checkpoint_path`` (the newest
    checkpoint written or resumed from, or ``None``), ``notices`` (one-line
    remarks about a resume, also issued as :class:`NotBitExactWarning`).
    """

    def __init__(self, model, data, config: TrainConfig | None = None, *, out_dir=None,
                 true_dictionary=None, backend=None, threads: int | None = None,
                 overwrite: bool = False, extra_state: dict | None = None,
                 distributed: str | None = None, comm=None, check_every: int = 100,
                 distributed_timeout: float = 600.0):
        self.config = (config or TrainConfig()).validate()
        if distributed not in (None, "data", "features"):
            raise ValueError(f"distributed must be None, 'data' or 'features', got "
                             f"{distributed!r}")
        self.distributed = distributed
        self.spec = None  # feature-sharded: the whole model's description
        if distributed == "features":
            from ..distributed.features import FeatureShardedSAE
            if not isinstance(model, FeatureShardedSAE):
                raise TypeError("feature-sharded training takes a fastsae.distributed."
                                "FeatureShardedSAE (the model's description; each rank "
                                f"builds only its latents), got {type(model).__name__}")
            if self.config.resample_every:
                raise ValueError("resampling is not implemented for feature-sharded "
                                 "training: set resample_every=0")
            if model.activation == "jumprelu" and self.config.pre_act_loss_coefficient:
                raise ValueError("the JumpReLU pre-activation loss (pre_act_loss_coefficient) "
                                 "is not implemented for feature-sharded training (use "
                                 "distributed='data')")
            self.spec = model
        self.comm = None
        if distributed is not None:
            from ..distributed.comm import Communicator
            self.comm = comm if comm is not None else Communicator(timeout=distributed_timeout)
            if isinstance(check_every, bool) or not isinstance(check_every, int) \
                    or check_every < 1:
                raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
        self.check_every = check_every
        self.model = model
        # a transcoder's data: a PairedSource, or an (inputs, targets) pair of sources
        self.source = PairedSource(*data) if isinstance(data, tuple) else open_source(data)
        if not isinstance(model, (SparseAutoencoder, Autoencoder)) and self.spec is None:
            raise TypeError(f"model must be a SparseAutoencoder or an Autoencoder, "
                            f"got {type(model).__name__}")
        if isinstance(model, SparseAutoencoder) or self.spec is not None:
            if model.activation is None:
                raise ValueError(f"fastsae cannot train this {model.architecture!r} SAE (it "
                                 f"trains activations {', '.join(ACTIVATIONS)})")
            c = self.config
            if c.activation is not None and c.activation != model.activation:
                raise ValueError(f"TrainConfig.activation={c.activation!r} but the model's "
                                 f"activation is {model.activation!r}")
            if c.k is not None and c.k != model.k:
                raise ValueError(f"TrainConfig.k={c.k} but the model's k is {model.k}")
            if (c.target_l0 is not None and model.activation == "jumprelu"
                    and c.jumprelu_sparsity_loss_mode != "quadratic"):
                raise ValueError("target_l0 with a jumprelu SAE is the centre of the "
                                 "'quadratic' sparsity mode's penalty: set "
                                 "jumprelu_sparsity_loss_mode='quadratic' (fastsae has no "
                                 "target-L0 controller for JumpReLU)")
            if c.target_l0 is not None and model.activation in TOPK_ACTIVATIONS:
                raise ValueError(f"target_l0 applies to relu and jumprelu SAEs; a "
                                 f"{model.activation} SAE's L0 is set by k")
        elif self.config.target_l0 is not None:
            raise ValueError("target_l0 applies to SparseAutoencoder models only")
        if getattr(model, "activation", None) != "jumprelu":
            for name in ("jumprelu_sparsity_loss_mode", "pre_act_loss_coefficient"):
                if getattr(self.config, name) is not None:
                    raise ValueError(f"{name} applies to jumprelu SAEs only")
        transcoder = bool(getattr(model, "transcoder", False))
        if transcoder != isinstance(self.source, PairedSource):
            raise ValueError("a transcoder trains on (input, target) pairs (data=(x, y), or "
                             "--target-data on the command line); an SAE on one data set"
                             if transcoder else
                             "paired (input, target) data train a transcoder "
                             "(SparseAutoencoder(..., transcoder=True)), not an SAE")
        if transcoder:
            if (self.source.d_x, self.source.d_y) != (model.d_in, model.d_out):
                raise ValueError(f"the data pair inputs of width {self.source.d_x} with "
                                 f"targets of width {self.source.d_y}, but the transcoder "
                                 f"maps d_in = {model.d_in} to d_out = {model.d_out}")
            if self.config.resample_every:
                raise ValueError("resampling dead features is not implemented for "
                                 "transcoders: set resample_every=0")
        elif self.source.d_in != model.d_in:
            raise ValueError(f"the data have d_in = {self.source.d_in} but the model expects "
                             f"d_in = {model.d_in}")
        self.backend = get_backend(backend) if backend is not None else model.backend
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        if threads is None and self.comm is not None and self.comm.size > 1:
            threads = self.comm.default_threads()
        self.threads = threads
        #: rank 0 alone writes outputs
        self.is_root = self.comm is None or self.comm.rank == 0
        self.out_dir = Path(out_dir) if out_dir is not None and self.is_root else None
        #: feature-sharded: every rank writes its checkpoint file here
        self.run_dir = Path(out_dir) if out_dir is not None else None
        self.overwrite = bool(overwrite)
        self.true_dictionary = None
        if true_dictionary is not None:
            td = np.asarray(true_dictionary, dtype=np.float32)
            width = model.d_out if transcoder else model.d_in
            if td.ndim != 2 or td.shape[1] != width:
                raise ValueError(f"true_dictionary must be [n_features, {width}], "
                                 f"got shape {td.shape}")
            self.true_dictionary = td
        self.extra_state = dict(extra_state or {})
        self.fs = None
        if self.spec is not None:
            # this rank's latents: the model trained here is its slice
            from ..distributed.data_parallel import rank_rows
            from ..distributed.features import FeatureSharded
            lo, hi = rank_rows(self.spec.d_sae, self.comm.rank, self.comm.size)
            if hi <= lo:
                raise ValueError(f"{self.spec.d_sae} latents cannot be split over "
                                 f"{self.comm.size} ranks (at least one each)")
            self.model = model = self.spec.local_model(lo, hi, self.backend)
            self.true_dictionary = None  # recovery needs every decoder row in one place
        self.state: TrainingState = make_state(model, self.config, self.backend)
        activation = (model.activation if isinstance(model, SparseAutoencoder)
                      or self.spec is not None else None)
        #: the steps' precision ("fp32" or "bf16"), its bf16 path, and why
        self.precision, self.bf16_path, self.precision_why = self.config.resolve_precision(
            self.backend, activation, distributed)
        self.state.precision = self.precision
        self.dp = None
        if self.spec is not None:
            self.fs = FeatureSharded(self.comm, self.state, self.spec, lo, hi)
        elif self.comm is not None:
            from ..distributed.data_parallel import DataParallel
            self.dp = DataParallel(self.comm, self.state, self.config.batch_size)
        #: the distributed step (data-parallel or feature-sharded), or None
        self._par = self.dp or self.fs
        self.step = 0
        self.log = MetricsLog(self.out_dir)
        self.window: FiringWindow | None = None
        self.last_checkpoint_step = None
        self.last_checkpoint_path: Path | None = None
        self.notices: list[str] = []
        self._acc = MetricsAccumulator()
        # JumpReLU's target_l0 is its quadratic penalty's centre, not a controller's
        self.controller = (L0Controller(self.config.target_l0, gain=self.config.target_l0_gain)
                           if self.config.target_l0 is not None
                           and getattr(model, "activation", None) != "jumprelu" else None)
        self._initialized = False
        self._resumed_from: Path | None = None  # the run directory a resume read
        self._out_ready = False

    @property
    def history(self) -> list[dict]:
        """The logged metric and event records, oldest first."""
        return self.log.history

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Prepare a fresh run: output directory (:meth:`prepare_out_dir`),
        input scale, initial parameters, data stream, RNG, firing windows.
        :meth:`train` calls it when needed; a resumed trainer is already set up."""
        self.prepare_out_dir()
        cfg = self.config
        self.scale = norm_scaling_factor(self.source, seed=cfg.seed) \
            if cfg.normalize_activations else 1.0
        sample = None
        if self.state.wants_init_sample():
            sample = sample_rows(self.source, 65536, cfg.seed) * np.float32(self.scale)
            if not np.isfinite(sample).all():
                raise ValueError("the data contain NaN or infinite values")
        self.state.init_fresh(self.scale, sample)
        if self.dp is not None:  # the same start on every rank, whatever its RNG did
            self.dp.broadcast_state()
        if self.fs is not None:
            self.fs.broadcast_replicated()
        self.stream = self._make_stream()
        self.rng = np.random.default_rng([cfg.seed, 0x7E5A])
        self.window = FiringWindow(self.backend, self.state.n_features)
        self._acc = MetricsAccumulator()
        self._initialized = True

    def _make_stream(self):
        cfg = self.config
        if self.dp is None:
            return BatchStream(self.source, cfg.batch_size, seed=cfg.seed, scale=self.scale)
        from ..distributed.data_parallel import RankBatchStream
        return RankBatchStream(self.source, cfg.batch_size, seed=cfg.seed, scale=self.scale,
                               lo=self.dp.lo, hi=self.dp.hi)

    def prepare_out_dir(self) -> None:
        """Make ``out_dir`` ready before the first step (once; nothing without
        an ``out_dir``): refuse it with :class:`RunExistsError` when it holds a
        run other than the one being resumed, unless ``overwrite`` (then that
        run's files are removed, nothing else); create it and check it is
        writable (``OSError`` naming it); start the metrics log there (a
        resumed run's records up to its checkpoint)."""
        if self.out_dir is None or self._out_ready:
            return
        own = self._resumed_from is not None and same_dir(self._resumed_from, self.out_dir)
        if not own:
            found = run_files(self.out_dir)
            if found and not self.overwrite:
                names = ", ".join(str(p.relative_to(self.out_dir)) for p in found)
                raise RunExistsError(
                    f"{self.out_dir} already holds a fastsae run ({names}): continue it with "
                    f"Trainer.resume({str(self.out_dir)!r}) (fastsae train --resume) or "
                    "replace it with overwrite=True (fastsae train --overwrite), which "
                    "removes only fastsae's files there")
            if found:
                remove_run(self.out_dir)
        check_writable(self.out_dir)
        self.log.begin()
        self._out_ready = True

    # ------------------------------------------------------------ dead features
    def dead_fraction(self) -> float:
        """Fraction of features that fired in none of the window's rows
        (NaN for a model without features or before the first step).
        Feature-sharded: over every rank's latents (collective)."""
        if self.fs is not None and self.window is not None:
            counts = self.fs.global_counts(self.window)
            return float(np.mean(counts == 0)) if self.window.steps else float("nan")
        return float("nan") if self.window is None else self.window.dead_fraction()

    def feature_density(self) -> dict | None:
        """Histogram of log10 firing frequency over the window (SAE only,
        see :func:`fastsae.training.metrics.feature_density`)."""
        if self.fs is not None and self.window is not None:
            from .metrics import feature_density
            rows = self.window.steps * self.config.batch_size
            counts = self.fs.global_counts(self.window)
            return feature_density(counts, rows) if rows else None
        return None if self.window is None else self.window.density(self.config.batch_size)

    def _resample(self):
        cfg = self.config
        dead = self.window.counts() == 0
        if not dead.any():
            return
        rows = self.rng.choice(self.source.n_rows, size=min(cfg.resample_samples,
                                                            self.source.n_rows), replace=False)
        x = self.source.take(np.sort(rows)) * np.float32(self.scale)
        n = self.state.resample(dead, x, self.rng)
        if self.dp is not None:
            self.dp.broadcast_state()
        self.window.reset()  # a fresh window, so resampled features get a chance to fire
        self.log.append({"step": self.step, "event": "resample", "resampled": n})

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_FILENAME

    def _run_state(self) -> dict:
        from .. import __version__
        return {
            "fastsae_version": __version__,
            "kind": self.state.kind, "step": int(self.step),
            "adam_step": self.state.adam_step(),
            "scale": float(self.scale), "stream": self.stream.state_dict(),
            "rng": self.rng.bit_generator.state, "config": self.config.to_dict(),
            "model": (self.spec.model_info() if self.spec is not None
                      else self.state.model_info()), "backend": self.backend.name,
            "threads": self.threads, "threads_used": self.backend.get_num_threads(),
            "precision": self.precision, "bf16_path": self.bf16_path,
            "bf16_density": self._bf16_density(),
            "window": self.window.state_dict(),
            "acc": self._acc.sums, "data": _source_location(self.source),
            "controller": (self.controller.state_dict() if self.controller is not None
                           else None),
            "data_rows": self.source.n_rows, "extra": self.extra_state,
            "distributed": ({"mode": self.distributed, "ranks": self.comm.size}
                            if self.comm is not None else None),
        }

    def _bf16_density(self):
        """The last step's code density a bf16 run's next step decides its path
        from (see :func:`fastsae.backends.bf16.bf16_step_wanted`), or None."""
        st = getattr(self.state, "state", None)
        return BF.last_density(st) if self.precision == "bf16" and st is not None else None

    def save_checkpoint(self, path=None) -> Path:
        """Write the full training state atomically (default: out_dir's
        checkpoint). Raises :class:`TrainingDiverged`, writing nothing, when a
        parameter or optimizer tensor holds NaN or infinite values (the
        previous checkpoint stays the last good one)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None and self.fs is not None and self.run_dir is not None:
            path = self.run_dir / CHECKPOINT_FILENAME
        if path is None:
            raise ValueError("no checkpoint path: give out_dir to the Trainer")
        tensors = self.state.tensors()
        tensors.update(self.window.tensors())
        for name, a in tensors.items():
            a = np.asarray(a)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise TrainingDiverged(
                    f"training diverged: {name} holds NaN or infinite values after step "
                    f"{self.step}, so no checkpoint was written{self._last_good()}")
        if self.fs is not None:  # one file per rank, then the index (collective)
            from ..distributed.features import write_shards
            path = write_shards(self.comm, path.parent, self.step, tensors, self._run_state(),
                                self.fs.lo, self.fs.hi)
        else:
            write_checkpoint(path, tensors, self._run_state())
        self.last_checkpoint_step, self.last_checkpoint_path = self.step, path
        return path

    def _last_good(self) -> str:
        """``"; the last good checkpoint is ..."`` or why there is none."""
        if self.last_checkpoint_path is not None:
            return (f"; the last good checkpoint is {self.last_checkpoint_path} (step "
                    f"{self.last_checkpoint_step})")
        if self.out_dir is None:
            return "; there is no checkpoint (no out_dir)"
        return "; there is no checkpoint (none was written yet)"

    @staticmethod
    def read_checkpoint(path) -> tuple[dict, dict]:
        """``(tensors, run_state)`` of a checkpoint file or output directory
        (see :func:`fastsae.training.checkpoint.read_checkpoint`)."""
        return read_checkpoint(path)

    @classmethod
    def resume(cls, path, data=None, *, true_dictionary=None, backend=None, threads=None,
               out_dir=None, progress=None, overwrite: bool = False,
               distributed: str | None = None, comm=None, check_every: int = 100,
               distributed_timeout: float = 600.0) -> "Trainer":
        """A trainer that continues the run saved at ``path`` (a checkpoint or
        an output directory) to the steps it was started with.

        ``data`` defaults to the saved data path; the model is rebuilt from
        the checkpoint. ``backend`` and ``threads`` default to the ones the
        run recorded (a recorded backend unusable here is a ``ValueError``
        naming it); others are allowed, with a :class:`NotBitExactWarning`.
        ``out_dir`` defaults to the run's own directory; another directory
        must not hold a run unless ``overwrite``. ``distributed`` and the
        other distributed arguments as for the constructor: a run may resume
        on another rank count or in one process, not bit-exactly (a
        :class:`NotBitExactWarning`). A damaged checkpoint
        (hash mismatch, missing tensor or run-state key, step beyond the
        run's steps) raises :class:`fastsae.io.SAEFormatError` naming it.
        """
        tensors, st = read_checkpoint(path)
        p = Path(path)
        run_dir = p if p.is_dir() else p.parent
        cpath = p / CHECKPOINT_FILENAME if p.is_dir() else p
        tensors, st = _Checked(tensors, cpath, "tensor "), _Checked(st, cpath, "run state key ")
        recorded = st["backend"]
        notices = []
        if backend is None:
            try:
                backend = get_backend(recorded)
            except ValueError as exc:
                raise ValueError(
                    f"{cpath}: the run was trained on backend {recorded!r}, which cannot be "
                    f"used here ({exc}); pass another backend (backend=..., or --backend "
                    "on the command line) to continue there, not bit-exactly") from None
        else:
            backend = get_backend(backend)
            if backend.name != recorded:
                notices.append(f"continuing on backend {backend.name!r}, not the run's "
                               f"{recorded!r}")
        used = st.get("threads")
        if threads is None:
            threads = used
        else:
            used = used if used is not None else st.get("threads_used")
            if used is not None and threads != used:
                notices.append(f"continuing with {threads} threads, not the run's {used}")
        try:
            if distributed == "features":  # each rank builds its latents only
                from ..distributed.features import FeatureShardedSAE
                model = FeatureShardedSAE.from_info(st["model"], backend)
            else:
                model = model_from_info(st["model"], backend)
            config = TrainConfig.from_dict(st["config"])
            if st.get("precision") in ("fp32", "bf16"):  # the run's, not a new "auto"
                config.precision = st["precision"]
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SAEFormatError):
                raise
            raise SAEFormatError(f"{cpath}: malformed run state ({exc})") from None
        step, total = st["step"], config.total_steps
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
            raise SAEFormatError(f"{cpath}: the checkpoint is at step {step!r}, outside the "
                                 f"run's 0..{total} steps (a damaged or hand-edited checkpoint)")
        if data is None:
            data = st.get("data")
            paths = ([data.get("inputs"), data.get("targets")] if isinstance(data, dict)
                     else [data])
            if any(d is None or not Path(str(d)).exists() for d in paths):
                raise ValueError(f"the checkpoint's data ({data}) cannot be reopened: "
                                 "pass the data explicitly")
            if isinstance(data, dict):
                data = PairedSource(*paths)
        if progress is not None:
            config.progress = progress
        if out_dir is None:
            out_dir = run_dir
        if overwrite and same_dir(out_dir, run_dir):
            raise ValueError("overwrite=True would remove the run being resumed: it applies "
                             "only to another out_dir")
        t = cls(model, data, config, out_dir=out_dir, true_dictionary=true_dictionary,
                backend=backend, threads=threads, overwrite=overwrite,
                extra_state=st.get("extra"), distributed=distributed, comm=comm,
                check_every=check_every, distributed_timeout=distributed_timeout)
        if t.bf16_path != st.get("bf16_path", t.bf16_path):
            notices.append(f"continuing on the bf16 path {t.bf16_path!r}, not the run's "
                           f"{st.get('bf16_path')!r}")
        was = st.get("distributed") or {}
        ranks_then = int(was.get("ranks", 1))
        ranks_now = t.comm.size if t.comm is not None else 1
        if (ranks_then, was.get("mode") if ranks_then > 1 else None) != \
                (ranks_now, distributed if ranks_now > 1 else None):
            notices.append(f"continuing on {ranks_now} rank(s), not the run's {ranks_then}")
        t._resumed_from = run_dir
        try:
            if "feature_shards" in st or t.fs is not None:
                from ..distributed.features import read_shards, slice_tensors
                lo, hi = (t.fs.lo, t.fs.hi) if t.fs is not None else (0, model.d_sae)
                tensors = _Checked(read_shards(run_dir, st, lo, hi)
                                   if "feature_shards" in st
                                   else slice_tensors(tensors, lo, hi), cpath, "tensor ")
            t._restore(tensors, st)
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, SAEFormatError):
                raise
            raise SAEFormatError(f"{cpath}: malformed checkpoint ({exc})") from None
        t.last_checkpoint_path = cpath
        if notices:
            t.notices.append("; ".join(notices) + ": the result is not bit-exact with the "
                             "original run")
            warnings.warn(t.notices[-1], NotBitExactWarning, stacklevel=2)
        return t

    def _restore(self, tensors, st):
        self.scale = float(st["scale"])
        self.state.load(tensors, st["adam_step"])
        if self.precision == "bf16" and st.get("bf16_density") is not None:
            BF.restore_density(self.state.state, st["bf16_density"])
        self.stream = self._make_stream()
        self.stream.load_state_dict(st["stream"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = st["rng"]
        self.step = int(st["step"])
        self.window = FiringWindow(self.backend, self.state.n_features)
        self.window.load(tensors, st["window"])
        self._acc = MetricsAccumulator(st.get("acc"))
        if self.controller is not None:
            try:
                self.controller.load_state_dict(st["controller"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SAEFormatError(f"the checkpoint lacks this run's target-L0 controller "
                                     f"state ({exc})") from None
        self.last_checkpoint_step = self.step
        self._initialized = True
        # the metrics log matches the checkpoint (written at prepare_out_dir)
        self.log.restore(self.step, self._resumed_from / METRICS_FILENAME
                         if self._resumed_from is not None else None)

    # ------------------------------------------------------------ logging
    @property
    def _saving(self) -> bool:
        """Whether this rank writes checkpoints (feature-sharded: every rank
        of a run with an output directory; otherwise rank 0's)."""
        return self.out_dir is not None or (self.fs is not None and self.run_dir is not None)

    def _recovery(self) -> dict | None:
        if self.true_dictionary is None:
            return None
        rows = self.state.decoder_rows()
        return None if rows is None else recovery(rows, self.true_dictionary)

    def _flush_metrics(self, t_start, step0):
        means = self._acc.means(self.state.metric_keys)
        if means is None:
            return None
        cfg = self.config
        rec = {"step": self.step, "tokens": self.step * cfg.batch_size, **means}
        rec["dead_fraction"] = none_if_nan(self.dead_fraction())
        rec["lr"] = cfg.lr_at(self.step - 1)
        key = ("l0_coefficient" if getattr(self.model, "activation", None) == "jumprelu"
               else "l1_coefficient")
        rec[key] = self.sparsity_coefficient(self.step - 1)
        r = self._recovery()
        if r is not None:
            rec["mean_max_cosine"], rec["recovered"] = r["mean_max_cosine"], r["recovered"]
        el = time.perf_counter() - t_start
        rec["elapsed_s"] = el
        rec["tokens_per_s"] = (self.step - step0) * cfg.batch_size / el if el > 0 else None
        self._acc.clear()
        self.log.append(rec)
        return rec

    # ------------------------------------------------------------ training
    def sparsity_coefficient(self, s: int) -> float:
        """The sparsity coefficient of the step with 0-based index ``s``: the
        L0 coefficient for JumpReLU, else the L1 one, with its warm-up, times
        the target-L0 controller's current multiplier (when on)."""
        cfg = self.config
        c = (cfg.l0_at(s) if getattr(self.model, "activation", None) == "jumprelu"
             else cfg.l1_at(s))
        return c * self.controller.factor if self.controller is not None else c

    def _step(self, s: int, x: np.ndarray) -> dict:
        """Step ``s`` (0-based) on the host batch ``x``, with the data check
        and the divergence check."""
        cfg, be = self.config, self.backend
        lr, l1c = cfg.lr_at(s), self.sparsity_coefficient(s)
        if isinstance(self.source, PairedSource):
            xh, yh = self.source.split(x)
            xb = (be.to_backend(xh), be.to_backend(yh))
            device = xb[0] is not xh
        else:
            xb = be.to_backend(x)
            device = xb is not x
        # The front scans host batches for NaN/inf itself; a device copy is
        # not scanned there, so check the host batch here (one scan a step).
        if device:
            _check_batch(x, s)
        try:
            if self._par is not None:  # this rank's rows (data) or latents (features)
                r = self._par.step(x, lr, l1c, self.window.fire_counts)
            else:
                r = self.state.step(xb, lr, l1c, self.window.fire_counts)
        except ValueError:
            _check_batch(x, s)  # the front refused the batch: name the step and row
            raise
        if not math.isfinite(r["total"]):
            raise TrainingDiverged(
                f"training diverged: the loss is {r['total']} at step {s + 1} "
                f"(lr={lr:.3g}, sparsity coefficient={l1c:.3g}){self._last_good()}")
        if self.controller is not None:
            self.controller.update(r["l0"])
        return r

    def train(self) -> TrainResult:
        """Run (or continue) training to ``config.total_steps``; returns a
        :class:`TrainResult` and leaves the trained parameters in the model
        (folded to raw inputs)."""
        if self.comm is None:
            self.prepare_out_dir()
            if not self._initialized:
                self.setup()
            with limit_threads(self.threads, self.backend):
                return self._train()
        # data-parallel: an error on one rank stops every rank (no hang)
        self.comm.watchdog()
        try:
            self.prepare_out_dir()
            with limit_threads(self.threads, self.backend):
                if not self._initialized:
                    self.setup()
                self._par.check_same(self.step)
                result = self._train()
            self.comm.barrier()
            return result
        except BaseException as exc:
            self.comm.fail(exc)
            raise
        finally:
            self.comm.stop_watchdog()

    def _train(self) -> TrainResult:
        cfg = self.config
        total = cfg.total_steps
        bar = None
        if cfg.show_progress() and self.is_root:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"fastsae[{self.backend.name}]",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        step0, t0 = self.step, time.perf_counter()
        try:
            while self.step < total:
                r = self._step(self.step, self.stream.next_batch())
                self.step += 1
                if self._par is not None:
                    self.comm.heartbeat()
                    if self.step % self.check_every == 0 or self.step == total:
                        self._par.check_same(self.step)
                self._acc.add(r)
                self.window.record_step(cfg.dead_window)
                if cfg.resample_due(self.step) and self.window.steps >= cfg.dead_window:
                    self._resample()
                if self.step % cfg.log_every == 0 or self.step == total:
                    rec = self._flush_metrics(t0, step0)
                    if bar is not None and rec is not None:
                        bar.set_postfix(mse=f"{rec['mse']:.4g}", l0=f"{rec['l0']:.3g}"
                                        if rec["l0"] is not None else "-", refresh=False)
                if (cfg.checkpoint_every and self._saving
                        and self.step % cfg.checkpoint_every == 0 and self.step < total):
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.backend.synchronize()
        wall = time.perf_counter() - t0
        return self._finish(wall, step0)

    def _finish(self, wall, step0) -> TrainResult:
        cfg = self.config
        x = sample_rows(self.source, cfg.eval_rows, cfg.seed + 1) * np.float32(self.scale)
        metrics = (self.fs.evaluate(x) if self.fs is not None else self.state.evaluate(x))
        metrics["dead_fraction"] = none_if_nan(self.dead_fraction())
        r = self._recovery()
        if r is not None:
            metrics["mean_max_cosine"], metrics["recovered"] = (r["mean_max_cosine"],
                                                                r["recovered"])
        trained = (self.step - step0) * cfg.batch_size
        metrics.update({"steps": self.step, "tokens": self.step * cfg.batch_size,
                        "wall_s": wall, "tokens_per_s": trained / wall if wall > 0 else None,
                        "backend": self.backend.name, "scale": self.scale,
                        "precision": self.precision, "bf16_path": self.bf16_path})
        if self.comm is not None:
            metrics["ranks"], metrics["distributed"] = self.comm.size, self.distributed
        density = self.feature_density()
        if self._saving:
            self.save_checkpoint()
        self.state.export(self.scale)
        if self.out_dir is not None:
            if self.fs is None:  # feature-sharded: the checkpoint's shards hold the SAE
                self.state.save_model(self.out_dir / "sae", metadata={
                    "fastsae_training_steps": self.step,
                    "fastsae_activation_scale_folded": self.scale})
            summary = {"metrics": metrics}
            if density is not None:
                summary["density"] = {k: v for k, v in density.items()
                                      if k != "log10_frequency"}
            atomic_write_json(self.out_dir / "summary.json", summary)
        return TrainResult(self.model, metrics, list(self.history), density)


class _Checked(dict):
    """A checkpoint's tensors or run state whose missing entries raise one
    :class:`SAEFormatError` naming them (nested objects too), not a
    ``KeyError``."""

    def __init__(self, d, path, what, where=""):
        super().__init__(d)
        self._path, self._what, self._where = path, what, where

    def __missing__(self, key):
        raise SAEFormatError(f"{self._path}: the checkpoint lacks {self._what}"
                             f"{self._where + str(key)!r} (a damaged or hand-edited checkpoint)")

    def __getitem__(self, key):
        v = super().__getitem__(key)
        if isinstance(v, dict) and not isinstance(v, _Checked):
            v = _Checked(v, self._path, self._what, f"{self._where}{key}.")
        return v


def _check_batch(x: np.ndarray, s: int) -> None:
    """Raise ``ValueError`` naming step ``s + 1``, row and column of the first
    NaN or infinite value of the host batch ``x``."""
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"the data contain NaN or infinite values (batch of step "
                         f"{s + 1}, row {bad[0]} column {bad[1]} of the batch)")


def _source_location(source) -> str:
    """An absolute path for file-backed sources (so a resume from another
    working directory can reopen them), else the source's description; a
    transcoder's ``{"inputs": ..., "targets": ...}``."""
    if isinstance(source, PairedSource):
        return {"inputs": _source_location(source.inputs),
                "targets": _source_location(source.targets)}
    for attr in ("path", "directory"):
        p = getattr(source, attr, None)
        if p is not None:
            return str(Path(p).resolve())
    return source.description
