"""The ``fastsae`` command line: ``train``, ``encode``, ``info``.

``fastsae train`` with no arguments trains an SAE on the built-in synthetic
problem (known true features) and prints a final table. Errors print one
line, ``fastsae: error: ...``, on stderr and exit with status 2 (no
traceback).

``train`` maps its flags onto :class:`fastsae.TrainConfig` and
:class:`fastsae.SparseAutoencoder`; a flag left out keeps the Python API's
default, except for what the Python API has no default for or that only the
command line decides, all listed here: ``--d-sae`` (2 x the true features on
the built-in problem, else 8 x ``d_in``), ``--k`` (32), ``--decoder-norm``
(``unit_norm``, where the Python class defaults to ``weighted_l1``: on the
built-in problem it recovers more true features at the same explained
variance) and ``--threads`` (1 on the built-in problem, else unlimited).

Transcoders: ``--target-data Y`` (with ``--data X``: the same rows in the
same order, validated to have as many) trains one from ``X`` to ``Y``;
``--transcoder`` without ``--data`` trains one on the built-in synthetic
pairs (:data:`DEFAULT_SYNTHETIC_PAIRS`); ``--skip`` adds the affine skip
connection.

``--out DIR`` holding a run is refused unless ``--resume DIR`` continues it
or ``--overwrite`` replaces it (removing only fastsae's files there, see
:mod:`fastsae.training.outdir`). ``--resume`` keeps the run's settings,
backend and threads; naming another backend or thread count prints a
one-line note that the result is not bit-exact with the original run.

``encode`` writes one scipy.sparse ``.npz`` of all rows (``--out FILE``), or
one per input shard and an index written last (``--out-dir DIR``), here or
on a Dask cluster (``--dask``; see :mod:`fastsae.distributed.encode`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main", "DEFAULT_SYNTHETIC", "DEFAULT_SYNTHETIC_PAIRS"]

#: The built-in synthetic problem (``fastsae train`` with no ``--data``).
DEFAULT_SYNTHETIC = {"n_rows": 131072, "d_in": 64, "n_features": 256, "l0": 5.0,
                     "magnitude": [0.5, 1.5], "noise": 0.0, "seed": 0}
#: The built-in transcoder problem (``fastsae train --transcoder`` with no
#: ``--data``): the synthetic problem's features read in one space, written
#: in another of width ``d_out`` (with ``--skip``, plus a dense linear map).
DEFAULT_SYNTHETIC_PAIRS = {"n_rows": 131072, "d_in": 64, "d_out": 48, "n_features": 256,
                           "l0": 5.0, "magnitude": [0.5, 1.5], "noise": 0.05, "seed": 0}
#: Default SAE width for the synthetic problem (2x its true features).
DEFAULT_D_SAE_FACTOR = 2
#: Default SAE width with ``--data`` (times ``d_in``).
DEFAULT_D_SAE_PER_D_IN = 8
#: ``--k`` default for topk/batchtopk.
DEFAULT_K = 32
#: ``--decoder-norm`` default; the Python class defaults to ``"weighted_l1"``.
DEFAULT_DECODER_NORM = "unit_norm"
#: ``--threads`` default on the built-in problem, whose small matrices lose
#: more to thread synchronization than they gain.
DEFAULT_SYNTHETIC_THREADS = 1


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise CLIError(message)


def _int_list(s):
    """``--widths 1024,2048,4096``: positive integers separated by commas."""
    try:
        v = [int(p) for p in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, "
                                         f"got {s!r}")
    return v


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _non_negative_int(s):
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return v


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _float(low=None, strict=False):
    def conv(s):
        import math
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        if low is not None and (v < low or (strict and v == low)):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if strict else '>='} {low}, got {s!r}")
        return v
    return conv


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .params import JUMPRELU_SPARSITY_MODES
    from .training import TrainConfig

    D = TrainConfig()  # the flags' defaults are the Python API's
    p = _Parser(prog="fastsae", description="Fast sparse autoencoders.")
    p.add_argument("--version", action="version", version=f"fastsae {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,encode,info}", parser_class=_Parser)

    t = sub.add_parser("train", help="train an SAE (default: the built-in synthetic problem)")
    t.add_argument("--data", help=".npy file or directory of .npy shards [rows, d_in]")
    t.add_argument("--target-data",
                   help="train a transcoder from --data to this target: .npy file or shard "
                   "directory [rows, d_out], the same rows in the same order")
    t.add_argument("--transcoder", action="store_true", default=None,
                   help="train a transcoder (implied by --target-data; without --data, on "
                   "the built-in synthetic pairs)")
    t.add_argument("--skip", action="store_true", default=None,
                   help="a skip transcoder: adds the learned affine term x @ W_skip.T")
    t.add_argument("--d-sae", type=_positive_int,
                   help=f"number of SAE features (default {DEFAULT_D_SAE_FACTOR} x the true "
                   f"features on the built-in problem, else {DEFAULT_D_SAE_PER_D_IN} x d_in)")
    t.add_argument("--l1", type=_float(0.0),
                   help=f"L1 coefficient (default {D.l1_coefficient})")
    t.add_argument("--steps", type=_positive_int,
                   help=f"training steps (default {D.steps}; the warm-ups stay within the "
                   "first tenth of the steps). Fixed when a run starts: with --resume it "
                   "may only repeat the run's value")
    t.add_argument("--batch-size", type=_positive_int,
                   help=f"rows per step (default {D.batch_size})")
    t.add_argument("--lr", type=_float(0.0, strict=True),
                   help=f"peak learning rate (default {D.lr})")
    t.add_argument("--seed", type=_nonneg_int,
                   help=f"seed (init and data order; default {D.seed})")
    t.add_argument("--decoder-norm", choices=["weighted_l1", "unit_norm"],
                   help=f"decoder scale control (default {DEFAULT_DECODER_NORM}, unlike the "
                   "Python class SparseAutoencoder, whose default is weighted_l1: on the "
                   "built-in problem unit_norm recovers more true features at the same "
                   "explained variance)")
    t.add_argument("--activation",
                   choices=["relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"],
                   help="relu (L1 penalty, default), topk (k largest per row), batchtopk "
                   "(N*k largest per batch; saved as SAELens jumprelu for inference), "
                   "jumprelu (learned per-feature thresholds, L0 penalty) or "
                   "matryoshka_batchtopk (batchtopk whose loss sums the reconstructions of "
                   "nested prefixes of the features, see --widths)")
    t.add_argument("--widths", type=_int_list,
                   help="matryoshka_batchtopk: prefix widths, comma-separated, strictly "
                   "increasing, the last equal to --d-sae (default d_sae/8,d_sae/4,"
                   "d_sae/2,d_sae)")
    t.add_argument("--target-l0", type=_float(0.0, strict=True),
                   help="relu: adjust the L1 coefficient during training so that the run "
                   "ends at this L0 (active features per row); --l1 then only sets the "
                   "starting point. jumprelu: the centre of the quadratic sparsity mode's "
                   "penalty (needs --jumprelu-sparsity-loss-mode quadratic; a penalty, not a "
                   "controller)")
    t.add_argument("--l0-coefficient", type=_float(0.0),
                   help=f"jumprelu: weight of the L0 penalty (default {D.l0_coefficient})")
    t.add_argument("--l0-warm-up-steps", type=_nonneg_int,
                   help="jumprelu: steps over which the L0 coefficient rises linearly from 0 "
                   f"(default {D.l0_warm_up_steps}: none)")
    t.add_argument("--jumprelu-bandwidth", type=_float(0.0, strict=True),
                   help="jumprelu: width of the rectangle kernel of the thresholds' "
                   f"pseudo-gradient (default {D.jumprelu_bandwidth})")
    t.add_argument("--jumprelu-init-threshold", type=_float(0.0, strict=True),
                   help=f"jumprelu: initial threshold (default {D.jumprelu_init_threshold})")
    t.add_argument("--jumprelu-sparsity-loss-mode", choices=JUMPRELU_SPARSITY_MODES,
                   help="jumprelu: the sparsity penalty, as SAELens: step (L0, default), "
                   "tanh (Anthropic's sum of tanh(--jumprelu-tanh-scale * f)), quadratic "
                   "(Gemma Scope 2's, centred on --target-l0)")
    t.add_argument("--jumprelu-tanh-scale", type=_float(0.0, strict=True),
                   help=f"jumprelu, tanh mode: the scale inside the tanh "
                   f"(default {D.jumprelu_tanh_scale})")
    t.add_argument("--pre-act-loss-coefficient", type=_float(0.0),
                   help="jumprelu: weight of Anthropic's pre-activation loss, which pulls "
                   "dead latents' pre-activations up to their thresholds (default: off; "
                   "Anthropic used 3e-6); dead = no firing in --dead-tokens tokens")
    t.add_argument("--k", type=_positive_int,
                   help=f"active features per row for topk/batchtopk/matryoshka_batchtopk "
                   f"(default {DEFAULT_K}, "
                   "at most d_sae)")
    t.add_argument("--auxk", dest="auxk", action="store_true", default=None,
                   help="topk/batchtopk/matryoshka_batchtopk: add the AuxK loss against "
                   "dead latents")
    t.add_argument("--k-aux", type=_positive_int,
                   help="AuxK latents per row (default: the power of two nearest d_in/2)")
    t.add_argument("--aux-coefficient", type=_float(0.0), help="AuxK weight (default 1/32)")
    t.add_argument("--dead-tokens", type=_positive_int,
                   help="AuxK and jumprelu's pre-activation loss: tokens without firing "
                   "for a latent to count as dead "
                   "(default min(10M, 500 steps of tokens))")
    t.add_argument("--resample-every", type=_nonneg_int,
                   help="resample dead features every N steps (default 0: never)")
    t.add_argument("--checkpoint-every", type=_nonneg_int,
                   help="checkpoint every N steps (needs --out; 0: only at the end)")
    t.add_argument("--backend", help="cuda, numba, cython or numpy (default: fastest usable; "
                   "with --resume, the run's own backend: another one works but is not "
                   "bit-exact with the original run)")
    t.add_argument("--threads", type=_positive_int,
                   help="CPU threads for the backend and BLAS (default: "
                   f"{DEFAULT_SYNTHETIC_THREADS} for the built-in problem, whose small "
                   "matrices lose more to thread synchronization than they gain; the "
                   "backend's default, all cores, with --data; with --resume, the run's "
                   "own)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="the training steps' encoder product: bf16 (bfloat16 operands "
                   "select the codes; their values and the rest of the step stay float32; "
                   "relu, topk, batchtopk, matryoshka_batchtopk and jumprelu (default "
                   "sparsity mode) SAEs on the numba or cython backend), fp32, or auto "
                   "(default): bf16 where this CPU has bfloat16 instructions (AVX512-BF16), "
                   "else fp32. A resumed run keeps its precision")
    t.add_argument("--out", help="output directory: checkpoint, metrics log, final SAE. It "
                   "must not hold a run already (unless --resume DIR is it, or --overwrite) "
                   "and must be writable; both are checked before the first step")
    t.add_argument("--resume", metavar="DIR",
                   help="continue the run saved in DIR to the steps it was started with, "
                   "with its settings, backend and threads (writes into DIR, or --out); "
                   "run-defining flags (--steps, --lr, --d-sae, ...) may only repeat the "
                   "run's values")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: remove the files fastsae wrote there "
                   "(checkpoint, metrics, summary, sae/, plots), nothing else")
    t.add_argument("--plot", action="store_true",
                   help="write PNG plots into --out (needs matplotlib)")
    t.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force the progress bar on")
    t.add_argument("--no-progress", dest="progress", action="store_false",
                   help="force the progress bar off")
    t.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    t.add_argument("--distributed", choices=("data", "features"),
                   help="training over MPI, run as mpiexec -n RANKS fastsae train "
                   "--distributed MODE ...: data (each rank trains the whole SAE on its "
                   "share of every batch) or features (each rank owns a slice of the "
                   "latents; relu, topk and batchtopk; the SAE is saved as per-rank "
                   "checkpoint files); rank 0 prints; --threads defaults to each rank's "
                   "share of the cores; needs pip install 'fastsae[mpi]'")
    t.add_argument("--distributed-timeout", type=_positive_float, default=600.0,
                   metavar="SECONDS",
                   help="with --distributed: a rank that finishes no step for this long "
                   "stops the run (a lost or stuck rank never hangs it; default 600)")

    e = sub.add_parser("encode", help="encode data with a saved SAE into scipy.sparse .npz")
    e.add_argument("--sae", required=True, help="SAE directory (fastsae or SAELens format)")
    e.add_argument("--data", required=True, help=".npy file or directory of .npy shards")
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="one output .npz (scipy.sparse CSR) of all rows")
    where.add_argument("--out-dir", metavar="DIR",
                       help="one .npz per input shard (same stem) and an index.json written "
                       "last; fastsae.distributed.encode.read_encoded(DIR) reads it back")
    e.add_argument("--dask", metavar="SCHEDULER|local[:N]",
                   help="with --out-dir: one task per shard on a Dask cluster (a scheduler "
                   "address, or local:N worker processes here, default one per core); "
                   "needs pip install 'fastsae[dask]'")
    e.add_argument("--retries", type=_non_negative_int, default=2,
                   help="with --out-dir: resubmit a failed shard this many times (default 2)")
    e.add_argument("--batch-size", type=_positive_int, default=4096, help="rows per batch")
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the encoder product in bfloat16 selects the entries, their "
                   "values stay float32 (numba/cython/numpy; see README, 'bfloat16 "
                   "encoders'); default fp32")
    e.add_argument("--backend", help="kernel backend")
    e.add_argument("--threads", type=_positive_int,
                   help="CPU threads (default: all cores; per task with --dask local:N, the "
                   "cores divided among the workers)")

    sub.add_parser("info", help="version, backends and thread counts")
    return p


# =================================================================== train
#: Flags a resume cannot change, and where the run recorded each (given with
#: the recorded value they are accepted, so the original command still works).
_RESUME_FIXED = {
    "d_sae": lambda st, c: st["model"].get("d_sae"),
    "l1": lambda st, c: c.l1_coefficient,
    "steps": lambda st, c: c.total_steps,
    "batch_size": lambda st, c: c.batch_size,
    "lr": lambda st, c: c.lr,
    "seed": lambda st, c: c.seed,
    "decoder_norm": lambda st, c: st["model"].get("decoder_norm"),
    "resample_every": lambda st, c: c.resample_every,
    "activation": lambda st, c: st["model"].get("activation"),
    "k": lambda st, c: st["model"].get("k"),
    "widths": lambda st, c: st["model"].get("widths"),
    "transcoder": lambda st, c: st["model"].get("transcoder") or None,
    "skip": lambda st, c: st["model"].get("skip") or None,
    "auxk": lambda st, c: c.auxk,
    "k_aux": lambda st, c: c.k_aux,
    "aux_coefficient": lambda st, c: c.aux_coefficient,
    "dead_tokens": lambda st, c: c.dead_tokens,
    "target_l0": lambda st, c: c.target_l0,
    "l0_coefficient": lambda st, c: c.l0_coefficient,
    "l0_warm_up_steps": lambda st, c: c.l0_warm_up_steps,
    "jumprelu_bandwidth": lambda st, c: c.jumprelu_bandwidth,
    "jumprelu_init_threshold": lambda st, c: c.jumprelu_init_threshold,
    "jumprelu_sparsity_loss_mode": lambda st, c: c.jumprelu_sparsity_loss_mode,
    "jumprelu_tanh_scale": lambda st, c: c.jumprelu_tanh_scale,
    "pre_act_loss_coefficient": lambda st, c: c.pre_act_loss_coefficient,
}

#: The JumpReLU-only flags.
_JUMPRELU_FLAGS = ("l0_coefficient", "l0_warm_up_steps", "jumprelu_bandwidth",
                   "jumprelu_init_threshold", "jumprelu_sparsity_loss_mode",
                   "jumprelu_tanh_scale", "pre_act_loss_coefficient")


def _check_out_dir(out: Path, resume: Path | None, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds a run other than the resumed one unless
    ``--overwrite`` (before any data is generated or read)."""
    from .training.outdir import run_files, same_dir

    own = resume is not None and same_dir(out, resume)
    if own and overwrite:
        raise CLIError(f"--overwrite would delete the run --resume {resume} continues "
                       "(use --overwrite only with a new run or another --out)")
    if own or overwrite:
        return
    found = run_files(out)
    if found:
        names = ", ".join(str(p.relative_to(out)) for p in found)
        raise CLIError(f"--out {out} already holds a fastsae run ({names}): pass --resume "
                       f"{out} to continue it, or --overwrite to replace it (only fastsae's "
                       "files there are removed)")


def _resume_fixed_flags(args, st) -> None:
    """Refuse the run-defining flags whose value differs from the run's."""
    from .training import TrainConfig

    cfg = TrainConfig.from_dict(st["config"] if isinstance(st.get("config"), dict) else {})
    bad = []
    for name, recorded in _RESUME_FIXED.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        try:
            was = recorded(st, cfg)
        except (AttributeError, KeyError, TypeError):
            was = None
        if v != was:
            bad.append((f"--{name.replace('_', '-')}", v, was))
    p = getattr(args, "precision", None)  # the flag as given, or the precision it resolved to
    if p is not None and p not in (cfg.precision, st.get("precision")):
        bad.append(("--precision", p, st.get("precision") or cfg.precision))
    if not bad:
        return
    what = ", ".join(f"{f} {v} (the run has {w})" for f, v, w in bad)
    hint = ""
    if any(f == "--steps" for f, _, _ in bad):
        hint = ("; a run's length is fixed when it starts, because the learning rate "
                f"decays over its last {cfg.lr_decay_fraction:.0%} of steps: resume without "
                "--steps to finish it, or start a new run with the --steps you want")
    raise CLIError(f"{what} cannot change when resuming (a resumed run keeps the settings "
                   f"saved in its checkpoint){hint}")


def _cmd_train(args) -> int:
    from .backends import validate as V
    from .data import PairedSource, open_source, synthetic, synthetic_pairs
    from .model import TOPK_ACTIVATIONS, SparseAutoencoder
    from .training import TrainConfig, Trainer
    from .training.loop import NotBitExactWarning

    if args.plot and not args.out and not args.resume:
        raise CLIError("--plot needs --out DIR to write the plots into")
    if args.checkpoint_every and not args.out and not args.resume:
        raise CLIError("--checkpoint-every needs --out DIR")
    if args.overwrite and not args.out:
        raise CLIError("--overwrite needs --out DIR (the run to replace)")
    if args.target_data is not None and args.data is None:
        raise CLIError("--target-data needs --data (the transcoder's input rows)")
    if args.transcoder and args.data is not None and args.target_data is None \
            and not args.resume:
        raise CLIError("--transcoder with --data needs --target-data (the rows to reconstruct)")
    if args.skip and not (args.transcoder or args.target_data is not None) and not args.resume:
        raise CLIError("--skip is for transcoders: add --target-data (or --transcoder)")
    t_start = time.perf_counter()
    true_dict = None
    out = Path(args.out) if args.out else None
    if args.resume:
        rdir = Path(args.resume)
        if not rdir.exists():
            raise CLIError(f"nothing to resume: {rdir} does not exist")
        if out is not None:
            _check_out_dir(out, rdir, args.overwrite)
        _, st = Trainer.read_checkpoint(rdir)
        _resume_fixed_flags(args, st)
        syn = (st.get("extra") or {}).get("synthetic")
        pairs = (st.get("extra") or {}).get("synthetic_pairs")
        data = args.data
        if data is not None and args.target_data is not None:
            data = PairedSource(data, args.target_data)
        if data is None and syn is not None:
            ds = synthetic(**_syn_kwargs(syn))
            data, true_dict = ds.x, ds.dictionary
        if data is None and pairs is not None:
            dp = synthetic_pairs(**_syn_kwargs(pairs))
            data, true_dict = PairedSource(dp.x, dp.y), dp.dictionary_out
            syn = pairs
        threads = args.threads
        if threads is None and "threads" not in st and syn is not None and args.data is None:
            threads = DEFAULT_SYNTHETIC_THREADS  # a run from before threads were recorded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotBitExactWarning)  # printed below, one line
            trainer = Trainer.resume(rdir, data, true_dictionary=true_dict,
                                     backend=args.backend, threads=threads,
                                     out_dir=out or rdir, progress=args.progress,
                                     overwrite=args.overwrite, **_distributed_kwargs(args))
        for note in trainer.notices if trainer.is_root else ():
            print(f"fastsae: note: {note}", file=sys.stderr)
        if args.checkpoint_every is not None:  # cadence only: does not change the result
            trainer.config.checkpoint_every = args.checkpoint_every
    else:
        if out is not None:
            _check_out_dir(out, None, args.overwrite)
        extra = {}
        transcoder = bool(args.transcoder or args.target_data is not None)
        skip = bool(args.skip)
        if args.data is None and transcoder:
            syn = dict(DEFAULT_SYNTHETIC_PAIRS, skip=skip)
            dp = synthetic_pairs(**_syn_kwargs(syn))
            source, true_dict = PairedSource(dp.x, dp.y), dp.dictionary_out
            extra["synthetic_pairs"] = syn
            d_sae = args.d_sae or DEFAULT_D_SAE_FACTOR * syn["n_features"]
        elif args.data is None:
            ds = synthetic(**_syn_kwargs(DEFAULT_SYNTHETIC))
            source, true_dict = ds.x, ds.dictionary
            extra["synthetic"] = dict(DEFAULT_SYNTHETIC)
            d_sae = args.d_sae or DEFAULT_D_SAE_FACTOR * DEFAULT_SYNTHETIC["n_features"]
        elif transcoder:
            try:
                source = PairedSource(args.data, args.target_data)
            except ValueError as exc:
                raise CLIError(f"--data and --target-data do not pair up: {exc}") from None
            d_sae = args.d_sae or DEFAULT_D_SAE_PER_D_IN * source.d_x
        else:
            source = open_source(args.data)
            d_sae = args.d_sae or DEFAULT_D_SAE_PER_D_IN * source.d_in
        cfg = TrainConfig()
        for flag, field in (("l1", "l1_coefficient"), ("steps", "steps"),
                            ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                            ("resample_every", "resample_every"),
                            ("checkpoint_every", "checkpoint_every"), ("auxk", "auxk"),
                            ("k_aux", "k_aux"), ("aux_coefficient", "aux_coefficient"),
                            ("dead_tokens", "dead_tokens"), ("target_l0", "target_l0"),
                            ("precision", "precision"),
                            *((f, f) for f in _JUMPRELU_FLAGS)):
            v = getattr(args, flag)
            if v is not None:
                setattr(cfg, field, v)
        cfg.progress = args.progress
        act = args.activation or "relu"
        if args.target_l0 is not None and act in TOPK_ACTIVATIONS:
            raise CLIError(f"--target-l0 applies to --activation relu or jumprelu (a {act} "
                           "SAE's L0 is set by --k)")
        if act == "jumprelu" and ((args.target_l0 is not None)
                                  != (args.jumprelu_sparsity_loss_mode == "quadratic")):
            raise CLIError("--target-l0 with --activation jumprelu is the centre of the "
                           "quadratic sparsity penalty: give both --target-l0 and "
                           "--jumprelu-sparsity-loss-mode quadratic, or neither (fastsae has "
                           "no target-L0 controller for JumpReLU)")
        if act != "jumprelu":
            for flag in _JUMPRELU_FLAGS:
                if getattr(args, flag) is not None:
                    raise CLIError(f"--{flag.replace('_', '-')} needs --activation jumprelu")
        elif args.l1 is not None:
            raise CLIError("--l1 does not apply to --activation jumprelu (it has no L1 term; "
                           "its sparsity is set by --l0-coefficient)")
        if act in ("relu", "jumprelu"):
            for flag in ("k", "auxk", "k_aux", "aux_coefficient", "dead_tokens"):
                if (flag == "dead_tokens" and act == "jumprelu"
                        and args.pre_act_loss_coefficient is not None):
                    continue  # the pre-activation loss's dead latents
                if getattr(args, flag) is not None:
                    raise CLIError(f"--{flag.replace('_', '-')} needs --activation topk, "
                                   "batchtopk or matryoshka_batchtopk")
            k = None
            if act == "jumprelu" and args.decoder_norm not in (None, "unit_norm"):
                raise CLIError("--activation jumprelu trains unit-norm decoder rows: "
                               "--decoder-norm must be unit_norm")
        else:
            if args.decoder_norm not in (None, "unit_norm"):
                raise CLIError(f"--activation {act} trains unit-norm decoder rows: "
                               "--decoder-norm must be unit_norm")
            k = args.k or DEFAULT_K
            if k > d_sae:
                raise CLIError(f"--k {k} exceeds the number of features (--d-sae {d_sae})")
        if args.widths is not None:
            if act != "matryoshka_batchtopk":
                raise CLIError("--widths needs --activation matryoshka_batchtopk")
            try:
                V.widths_arg(args.widths, d_sae)
            except ValueError as exc:
                raise CLIError(f"--{exc} (--d-sae {d_sae})") from None
        d_in = source.d_x if transcoder else _d_in(source)
        mkw = dict(backend=args.backend,
                   decoder_norm=args.decoder_norm or DEFAULT_DECODER_NORM, seed=cfg.seed,
                   activation=act, k=k, transcoder=transcoder,
                   d_out=source.d_y if transcoder else None, skip=skip)
        if args.distributed == "features":  # each rank builds only its latents
            from .distributed.features import FeatureShardedSAE
            if args.widths is not None:
                raise CLIError("--widths: matryoshka_batchtopk is not trained "
                               "feature-sharded yet (use --distributed data)")
            try:
                model = FeatureShardedSAE(d_in, d_sae, **mkw)
            except ValueError as exc:
                raise CLIError(str(exc)) from None
        else:
            model = SparseAutoencoder(d_in, d_sae, widths=args.widths, **mkw)
        threads = args.threads or (DEFAULT_SYNTHETIC_THREADS if args.data is None else None)
        trainer = Trainer(model, source, cfg, out_dir=out, true_dictionary=true_dict,
                          backend=args.backend, threads=threads, overwrite=args.overwrite,
                          extra_state=extra, **_distributed_kwargs(args))
    result = trainer.train()
    if not trainer.is_root:  # rank 0 reports for every rank
        return 0
    total_wall = time.perf_counter() - t_start
    m = dict(result.metrics)
    m["total_wall_s"] = total_wall
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(_table(m, trainer))
    out = Path(args.out or args.resume) if (args.out or args.resume) else None
    if out is not None and trainer.fs is not None:
        print(f"saved: {out / 'checkpoint.safetensors'} and one file per rank under "
              f"{out / 'checkpoint.shards'} (the SAE: fastsae.distributed.load_sharded_sae"
              f"({str(out)!r})), {out / 'metrics.jsonl'}")
    elif out is not None:
        print(f"saved: {out / 'sae'} (SAE), {out / 'checkpoint.safetensors'}, "
              f"{out / 'metrics.jsonl'}")
        if args.plot:
            written = _plots(out, result)
            print(f"plots: {', '.join(str(p) for p in written)}")
    return 0


def _distributed_kwargs(args) -> dict:
    """The Trainer's distributed arguments from the flags; a clear error
    when MPI is missing."""
    if args.distributed is None:
        return {}
    from .distributed.comm import mpi_module
    try:
        mpi_module()
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    return {"distributed": args.distributed, "distributed_timeout": args.distributed_timeout}


def _syn_kwargs(syn: dict) -> dict:
    kw = dict(syn)
    kw["magnitude"] = tuple(kw.get("magnitude", (0.5, 1.5)))
    return kw


def _d_in(source) -> int:
    import numpy as np
    return source.d_in if hasattr(source, "d_in") else int(np.asarray(source).shape[1])


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def _table(m: dict, trainer) -> str:
    what = ("a transcoder: " + ("skip, " if trainer.model.skip else "")
            + f"{trainer.model.d_in} -> {trainer.model.d_out}"
            if getattr(trainer.model, "transcoder", False) else None)
    rows = [*((("model", what),) if what else ()),
            ("MSE (normalized inputs)", _fmt(m.get("mse"))),
            ("explained variance", _fmt(m.get("explained_variance"), pct=True)),
            *((f"  by the first {k.rsplit('_', 1)[1]} features", _fmt(v, pct=True))
              for k, v in m.items() if k.startswith("explained_variance_")),
            ("L0 (active features/row)", _fmt(m.get("l0"))),
            ("dead features", _fmt(m.get("dead_fraction"), pct=True))]
    if "recovered" in m:
        rows += [("true features recovered (cos > 0.9)", _fmt(m["recovered"], pct=True)),
                 ("mean best cosine to true features", _fmt(m["mean_max_cosine"]))]
    rows += [("steps", _fmt(m.get("steps"))), ("tokens", _fmt(m.get("tokens"))),
             ("tokens/s", f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "-"),
             ("training time", f"{m['wall_s']:.1f} s"),
             ("total time", f"{m['total_wall_s']:.1f} s"),
             ("precision", m.get("precision", "fp32")
              + (f" ({m['bf16_path']} path)" if m.get("bf16_path") else "")),
             ("backend", m.get("backend", "-")
              + (f", {m['ranks']} ranks ("
                 + ("feature-sharded" if m.get("distributed") == "features"
                    else "data-parallel") + ")" if m.get("ranks") else ""))]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    bar = "-" * max(len(s) for s in lines)
    return "\n".join([bar] + lines + [bar])


def _plots(out: Path, result) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib (pip install 'fastsae[plot]'); "
                       "training finished and was saved") from None
    hist = [h for h in result.history if "event" not in h]
    steps = [h["step"] for h in hist]
    written = []
    for key, title, log in (("total", "loss (total)", True), ("l0", "L0", False),
                            ("dead_fraction", "dead fraction", False)):
        ys = [h.get(key) for h in hist]
        if not any(y is not None for y in ys):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, [float("nan") if y is None else y for y in ys])
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        fig.tight_layout()
        written.append(_save_fig(fig, plt, out / f"{key}.png"))
    if result.density:
        d = result.density
        fig, ax = plt.subplots(figsize=(5, 3.2))
        edges = d["bin_edges"]
        ax.stairs(d["counts"], edges)
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("features")
        ax.set_title(f"feature density ({d['dead']} dead)")
        fig.tight_layout()
        written.append(_save_fig(fig, plt, out / "feature_density.png"))
    return written


def _save_fig(fig, plt, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (like every other file of a run)."""
    import io as _io

    from .io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ================================================================== encode
def _encode_loop(encode, source, batch_size, indptr, indices, values):
    """Encode ``source`` in row order with ``encode`` (rows -> SparseCodes,
    :meth:`fastsae.SparseAutoencoder.sparse_encoder`), ``batch_size`` rows at
    a time, appending CSR pieces (indptr offsets already global)."""
    import numpy as np

    nnz = 0
    for lo in range(0, source.n_rows, batch_size):
        x = source.read(lo, min(lo + batch_size, source.n_rows))
        if not np.isfinite(x).all():
            raise CLIError(f"the data contain NaN or infinite values (rows {lo} to "
                           f"{lo + x.shape[0] - 1})")
        c = encode(x)
        indptr.append(np.asarray(c.indptr[1:], dtype=np.int64) + nnz)
        indices.append(np.asarray(c.indices))
        values.append(np.asarray(c.values))
        nnz += int(c.indptr[-1])


def _cmd_encode(args) -> int:
    import numpy as np
    import scipy.sparse as sp

    from .data import open_source
    from .model import SparseAutoencoder
    from .training import limit_threads

    if args.out_dir is not None:
        return _cmd_encode_dir(args)
    if args.dask is not None:
        raise CLIError("--dask needs --out-dir (one output file per shard), not --out")
    sae = SparseAutoencoder.load(args.sae, backend=args.backend)
    source = open_source(args.data)
    if source.d_in != sae.d_in:
        raise CLIError(f"the data have d_in = {source.d_in} but the SAE expects "
                       f"d_in = {sae.d_in}")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise CLIError(f"--out must end in .npz, got {out}")
    if not out.parent.exists():
        raise CLIError(f"output directory does not exist: {out.parent}")
    indptr, indices, values = [np.zeros(1, np.int64)], [], []
    with limit_threads(args.threads, sae.backend):
        try:  # a precision this backend, build or CPU cannot run fails here
            encode = sae.sparse_encoder(args.precision)
        except (ValueError, ImportError, RuntimeError) as exc:
            raise CLIError(f"--precision {args.precision}: {exc}") from None
        _encode_loop(encode, source, args.batch_size, indptr, indices, values)
    nnz = int(indptr[-1][-1])
    m = sp.csr_array((np.concatenate(values) if values else np.zeros(0, np.float32),
                      np.concatenate(indices) if indices else np.zeros(0, np.int32),
                      np.concatenate(indptr)), shape=(source.n_rows, sae.d_sae))
    from .io import atomic_write_bytes
    import io as _io
    buf = _io.BytesIO()
    sp.save_npz(buf, m, compressed=True)
    atomic_write_bytes(out, buf.getvalue())
    print(f"encoded {source.n_rows:,} rows into {sae.d_sae} features "
          f"(L0 {nnz / source.n_rows:.2f}) -> {out}")
    return 0


def _cmd_encode_dir(args) -> int:
    from .distributed.encode import EncodeError, encode_to_dir

    if args.dask is not None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise CLIError("--dask needs the dask extra: pip install 'fastsae[dask]'") from None
    try:
        encode_to_dir(args.sae, args.data, args.out_dir, batch_size=args.batch_size,
                      backend=args.backend, threads=args.threads, dask=args.dask,
                      retries=args.retries, precision=args.precision,
                      progress=lambda m: print(m, flush=True))
    except EncodeError as exc:
        raise CLIError(str(exc)) from None
    return 0


# ==================================================================== info
def _cmd_info(args) -> int:
    from . import __version__, available_backends

    print(f"fastsae {__version__}")
    print(f"python {sys.version.split()[0]} on {sys.platform}, {os.cpu_count()} CPUs")
    print("backends:")
    for s in available_backends():
        print(f"  {s}")
    try:
        import numba
        print(f"numba {numba.__version__}: {numba.get_num_threads()} threads "
              f"(threading layer: {numba.config.THREADING_LAYER})")
    except Exception as exc:  # numba missing or broken
        print(f"numba: unavailable ({type(exc).__name__}: {exc})")
    from .backends.bf16 import path_report
    print(path_report())
    try:
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            print(f"{lib.get('internal_api', '?')} ({lib.get('prefix', '?')}): "
                  f"{lib.get('num_threads')} threads")
    except Exception as exc:
        print(f"threadpoolctl: unavailable ({type(exc).__name__}: {exc})")
    return 0


# ==================================================================== main
def main(argv=None) -> int:
    """Entry point of the ``fastsae`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        cmd = {"train": _cmd_train, "encode": _cmd_encode, "info": _cmd_info}[args.command]
        return cmd(args)
    except CLIError as exc:
        print(f"fastsae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsae: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, FloatingPointError, RuntimeError) as exc:
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and exc.filename not in msg:
            msg = f"{msg}: {exc.filename}"
        print(f"fastsae: error: {msg}".replace("\n", " "), file=sys.stderr)
        return 2


def _entry():  # pragma: no cover
    sys.exit(main())
