#!/usr/bin/env bash
# Build the Cython kernels with bounds checking on (FASTSAE_CYTHON_DEBUG=1) in a
# throw-away copy of this checkout and run the cython backend's tests against
# that build, so an out-of-bounds index in a kernel fails loudly (IndexError)
# instead of reading or writing memory it does not own.
#
# Usage: bash .ci/cython_debug.sh [extra pytest args]
# Needs a C compiler, Cython, NumPy and SciPy in the active Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastsae-cydebug.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# tracked files plus untracked, non-ignored ones (the tree as it is being tested)
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$WORK"

cd "$WORK"
FASTSAE_CYTHON_DEBUG=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 \
    || { cat build.log; echo "debug build failed" >&2; exit 1; }
grep -q "WARNING: could not build" build.log && { cat build.log; echo "debug build incomplete" >&2; exit 1; }

# make sure the copy (not an installed fastsae) is what gets tested
PYTHONPATH="$WORK" "$PY" - <<'PYEOF'
import os, fastsae, fastsae._cy_runtime as rt
assert fastsae.__file__.startswith(os.getcwd()), fastsae.__file__
assert rt.DEBUG, "extensions were not built in debug mode"
print("debug build OK:", fastsae.available_backends()[2])
PYEOF

PYTHONPATH="$WORK" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cython_backend.py "$@"
