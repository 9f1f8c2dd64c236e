#!/usr/bin/env bash
# A regular (non-editable) `pip install .` into a fresh venv, then, from outside
# the checkout, import every subpackage and module of the installed fastsae and
# run one training step on each CPU backend. Editable installs read the
# checkout, so they hide a subpackage missing from the package list; this does not.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastsae-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet "$SRC"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import importlib, pkgutil
import numpy as np
import fastsae
from fastsae import AdamState, SAEParams

assert "site-packages" in fastsae.__file__, fastsae.__file__
mods = [m.name for m in pkgutil.walk_packages(fastsae.__path__, "fastsae.")]
for name in mods:
    if name.startswith("fastsae.backends.cuda"):
        continue  # imported below through the registry (needs numba-cuda or a driver)
    importlib.import_module(name)
print(f"imported {len(mods)} modules of {fastsae.__file__}")
for s in fastsae.available_backends():
    print(" ", s)
rng = np.random.default_rng(0)
for name in ("numpy", "numba", "cython"):
    be = fastsae.get_backend(name)  # raises if the installed backend is unusable
    p = SAEParams(*(a.astype(np.float32) for a in (
        rng.normal(size=(16, 32)) / 4, np.zeros(32), rng.normal(size=(32, 16)) / 4,
        np.zeros(16))))
    st = AdamState.zeros_like(p)
    r = be.train_step(p, st, rng.normal(size=(64, 16)).astype(np.float32),
                      l1_coefficient=1e-3, lr=1e-3)
    r2 = be.train_step_topk(p, st, rng.normal(size=(64, 16)).astype(np.float32), k=4, lr=1e-3)
    assert np.isfinite(r.total) and np.isfinite(r2.total) and st.step == 2
    print(f"  {name}: one ReLU and one TopK step, loss {r.total:.4f} / {r2.total:.4f}")
PY
