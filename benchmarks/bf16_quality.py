"""Training quality with ``precision="bf16"`` against ``"fp32"``: the same run
(seed, steps, every default) in both precisions, on two problems.

    python benchmarks/bf16_quality.py [--backend numba] [--activation relu]
                                      [--steps 800] [--out-dir DIR] [--quick]
                                      [--seed-spread] [--seeds K]

1. The built-in synthetic problem of ``fastsae train`` (its command line's
   defaults: 256 known directions in 64 dimensions, ``d_sae`` 512), through
   ``fastsae.cli.main``; its summary's explained variance, L0 and true-feature
   recovery (best cosine above 0.9).
2. The trainer benchmark's activations file (``trainer_density.py``: seeded,
   2048 directions with Zipf frequencies in 384 dimensions, 131072 rows;
   written once under ``--out-dir``), ``d_sae`` 6144, the CLI's defaults
   (batch 512, unit-norm decoder), through the Python API so that the
   recovery of the file's 2048 directions is measured too.

Issue 13's bars, checked per problem: the bf16 run ends within 0.005
explained variance and within 1 point of true-feature recovery of the fp32
run. ``--activation topk`` / ``batchtopk`` runs TopK / BatchTopK SAEs (k 32)
instead of ReLU, ``--activation jumprelu`` JumpReLU SAEs (the trainer's
defaults: "step" sparsity mode).
``--quick`` (CI) runs the built-in problem for 300 steps only and checks
the bars there. ``--seed-spread`` adds an fp32 run at seed 1: how far two
fp32 runs that differ only in their seed end apart, the scale the bars'
differences are to be read against. ``--seeds K`` trains both precisions at
seeds 0..K-1 and holds the means to the bars: JumpReLU on the activations
file ends up to 10 L0 and 2 points of recovery apart between two runs that
differ only in float32 rounding (numba against cython), so one pair of runs
says little there. Results also go to ``DIR/bf16_quality.json``. Names the CPU,
the BLAS and the bf16 path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastsae  # noqa: E402
from fastsae.backends import bf16 as BF  # noqa: E402
from fastsae.cli import DEFAULT_DECODER_NORM, DEFAULT_K, main as cli_main  # noqa: E402
from fastsae.training import TrainConfig, Trainer  # noqa: E402

from conftest import blas_info, cpu_model  # noqa: E402
from trainer_density import D_IN, D_SAE, DATA, activations_file  # noqa: E402

EV_BAR = 0.005
RECOVERY_BAR = 0.01
PRECISIONS = ("fp32", "bf16")


def builtin_run(backend: str, activation: str, precision: str, steps, out: Path,
                seed: int = 0) -> dict:
    """``fastsae train`` on the built-in problem; its summary's metrics."""
    argv = ["train", "--backend", backend, "--precision", precision, "--out", str(out),
            "--overwrite", "--activation", activation, "--seed", str(seed)]
    if steps is not None:
        argv += ["--steps", str(steps)]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(argv)
    if rc != 0:
        raise RuntimeError(f"fastsae {' '.join(argv)} exited with {rc}")
    return json.loads((out / "summary.json").read_text())["metrics"]


def true_directions() -> np.ndarray:
    """The activations file's 2048 unit directions (its generator's first draw)."""
    rng = np.random.default_rng(DATA["seed"])
    D = rng.standard_normal((DATA["n_dirs"], DATA["d_in"]))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return D.astype(np.float32)


def file_run(path: Path, backend: str, activation: str, precision: str, steps: int,
             seed: int = 0) -> dict:
    """A fresh SAE on the activations file with the CLI's defaults."""
    k = None if activation in ("relu", "jumprelu") else DEFAULT_K
    model = fastsae.SparseAutoencoder(D_IN, D_SAE, backend=backend,
                                      decoder_norm=DEFAULT_DECODER_NORM, seed=seed,
                                      activation=activation, k=k)
    cfg = TrainConfig(steps=steps, precision=precision, progress=False, seed=seed)
    t = Trainer(model, str(path), cfg, true_dictionary=true_directions(), backend=backend)
    return dict(t.train().metrics)


def _row(name, m) -> str:
    rec = m.get("recovered")
    return (f"| {name} | {m['precision']} ({m.get('bf16_path') or '-'}) | "
            f"{m['explained_variance']:.4f} | {m['l0']:.1f} | "
            f"{'-' if rec is None else f'{rec:.3f}'} | {m['wall_s']:.1f} |")


def _mean_run(runs) -> dict:
    """Explained variance and recovery averaged over runs (the bars' inputs
    with ``--seeds``)."""
    out = {"explained_variance": float(np.mean([r["explained_variance"] for r in runs]))}
    rec = [r.get("recovered") for r in runs]
    out["recovered"] = None if None in rec else float(np.mean(rec))
    return out


def compare(name, runs, seeds=1) -> list[str]:
    """The bars for one problem: lines saying PASS or FAIL (and, with an fp32
    run at seed 1, the seed-to-seed spread for scale). ``seeds`` > 1: the
    bars compare the means over seeds ``0..seeds-1`` of each precision, and
    the fp32 runs' standard deviation is printed for scale."""
    if seeds > 1:
        group = {p: [runs[p if s == 0 else f"{p} seed {s}"] for s in range(seeds)]
                 for p in PRECISIONS}
        a, b = _mean_run(group["fp32"]), _mean_run(group["bf16"])
        ev = [r["explained_variance"] for r in group["fp32"]]
        spread = f"{name}: fp32 over {seeds} seeds (scale, no bar): sd EV {np.std(ev, ddof=1):.4f}"
        if a["recovered"] is not None:
            rec = [100 * r["recovered"] for r in group["fp32"]]
            spread += f", sd recovery {np.std(rec, ddof=1):.2f} points"
        out = [spread]
        for p in PRECISIONS:
            out.append(f"{name}: {p} mean over {seeds} seeds: L0 "
                       f"{np.mean([r['l0'] for r in group[p]]):.1f}")
        name = f"{name} (means over {seeds} seeds)"
    else:
        a, b = runs["fp32"], runs["bf16"]
        out = []
    c = runs.get("fp32 seed 1") if seeds == 1 else None
    if c is not None:
        spread = (f"{name}: fp32 seed 0 vs seed 1 (scale, no bar): |EV| "
                  f"{abs(c['explained_variance'] - a['explained_variance']):.4f}")
        if a.get("recovered") is not None:
            spread += f", |recovery| {100 * abs(c['recovered'] - a['recovered']):.2f} points"
        out.append(spread)
    dev = abs(b["explained_variance"] - a["explained_variance"])
    out.append(f"{name}: |EV bf16 - EV fp32| = {dev:.4f} (bar {EV_BAR}): "
               f"{'PASS' if dev <= EV_BAR else 'FAIL'}")
    if a.get("recovered") is not None:
        dr = abs(b["recovered"] - a["recovered"])
        out.append(f"{name}: |recovery bf16 - fp32| = {100 * dr:.2f} points (bar "
                   f"{100 * RECOVERY_BAR:.0f}): {'PASS' if dr <= RECOVERY_BAR else 'FAIL'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--activation", choices=("relu", "topk", "batchtopk", "jumprelu"),
                    default="relu")
    ap.add_argument("--steps", type=int, default=800, help="steps on the activations file")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed-spread", action="store_true",
                    help="also train fp32 at seed 1 (the seed-to-seed spread, for scale)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train both precisions at seeds 0..SEEDS-1 and hold the means to "
                    "the bars (a problem whose runs diverge from rounding alone, as JumpReLU "
                    "on the activations file, needs several)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="fastsae_bf16q_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; {BF.path_report()}")
    if BF.selected_path() == "emulated":
        print("note: no bfloat16 instructions here: the bf16 runs take the (slow) emulated path")
    results, lines = {}, []
    problems = [("built-in synthetic", lambda p, seed: builtin_run(
        args.backend, args.activation, p, 300 if args.quick else None,
        out_dir / f"builtin_{p}_{seed}", seed))]
    if not args.quick:
        path = activations_file(out_dir, 131072)
        problems.append((f"activations file, {args.steps} steps", lambda p, seed: file_run(
            path, args.backend, args.activation, p, args.steps, seed)))
    runs_of = [(p if seed == 0 else f"{p} seed {seed}", p, seed)
               for seed in range(args.seeds) for p in PRECISIONS]
    if args.seed_spread and args.seeds == 1:
        runs_of.append(("fp32 seed 1", "fp32", 1))
    print(f"\n{args.activation} SAEs, backend {args.backend}\n")
    print("| problem | precision (path) | explained variance | L0 | recovered | wall s |")
    print("|---|---|---|---|---|---|")
    for name, run in problems:
        runs = {}
        for label, p, seed in runs_of:
            t = time.perf_counter()
            runs[label] = run(p, seed)
            runs[label].setdefault("wall_s", time.perf_counter() - t)
            print(_row(name if seed == 0 else f"{name}, seed {seed}", runs[label]), flush=True)
        results[name] = runs
        lines += compare(name, runs, args.seeds)
    print()
    print("\n".join(lines))
    (out_dir / "bf16_quality.json").write_text(json.dumps(
        {"cpu": cpu_model(), "blas": blas_info(), "path": BF.path_report(),
         "activation": args.activation, "backend": args.backend, "results": results,
         "checks": lines}, indent=1, default=str))
    print(f"results: {out_dir / 'bf16_quality.json'}")
    return 1 if any(line.endswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
