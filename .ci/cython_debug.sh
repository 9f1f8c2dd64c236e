#!/usr/bin/env bash
# Build the Cython kernels (kernels/cython/*.pyx -> fastsae.backends.cython._*,
# dense.pyx included) with bounds checking on (FASTSAE_CYTHON_DEBUG=1) in a
# throw-away copy of this checkout and run the cython backend's tests (and the
# cython half of tests/test_density.py, both sides of the density switch; the
# JumpReLU family's own tests/test_cython_jumprelu.py, both of its paths; the
# Matryoshka family's tests/test_cython_matryoshka.py; the transcoders'
# tests/test_cython_transcoder.py; the bfloat16 encoders' tests/test_bf16.py and
# tests/test_bf16_batchtopk.py)
# against that build, so an out-of-bounds index in a kernel fails loudly (IndexError)
# instead of reading or writing memory it does not own.
#
# Then, where the compiler ships AddressSanitizer, the same again with
# FASTSAE_CYTHON_ASAN=1 and libasan preloaded: that also catches overruns
# through raw pointers inside the kernels' inner loops, which memoryview
# bounds checks cannot see. Skip that stage with FASTSAE_CI_ASAN=0.
#
# Usage: bash .ci/cython_debug.sh [extra pytest args]
# Needs a C compiler, Cython, NumPy and SciPy in the active Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SRC=$(pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastsae-cydebug.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

build_and_test() {  # $1: stage name, $2: extra env for the build, $3: preload lib or ""
    local dir="$WORK/$1"
    mkdir -p "$dir"
    # tracked files plus untracked, non-ignored ones (the tree as it is being tested)
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | xargs -0 cp --parents -t "$dir")
    (
        cd "$dir"
        env FASTSAE_CYTHON_DEBUG=1 $2 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 \
            || { cat build.log; echo "$1 build failed" >&2; exit 1; }
        if grep -q "WARNING: could not build\|WARNING: Cython/numpy not importable" build.log; then
            cat build.log; echo "$1 build incomplete" >&2; exit 1
        fi
        local pre=()
        if [ -n "$3" ]; then pre=(LD_PRELOAD="$3" ASAN_OPTIONS=detect_leaks=0); fi
        # make sure the copy (not an installed fastsae) is what gets tested
        env "${pre[@]}" PYTHONPATH="$dir" "$PY" - <<'PYEOF'
import os, fastsae
from fastsae.backends.cython import _runtime as rt
assert fastsae.__file__.startswith(os.getcwd()), fastsae.__file__
assert rt.__file__.startswith(os.getcwd()), rt.__file__
assert rt.DEBUG, "extensions were not built in debug mode"
print("debug build OK:", fastsae.available_backends()[2])
PYEOF
        env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
            "$PY" -m pytest -q -p no:cacheprovider tests/test_cython_backend.py \
            tests/test_cython_topk.py tests/test_cython_jumprelu.py \
            tests/test_cython_matryoshka.py tests/test_cython_transcoder.py "${@:4}"
        # the dense path of the ReLU family (kernels/cython/dense.pyx) and the
        # encoder's density switch, both sides of it
        if [ -f tests/test_density.py ]; then
            env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_density.py -k cython "${@:4}"
        fi
        # the bfloat16 encoders' C kernels (kernels/c/bf16_encode.c): raw pointers
        # only, so the ASan stage is what checks them
        if [ -f tests/test_bf16.py ]; then
            env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16.py "${@:4}"
        fi
        # bf16 BatchTopK: the C kernel's candidate buffers (fs_bf16_encode_candidates)
        if [ -f tests/test_bf16_batchtopk.py ]; then
            env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16_batchtopk.py "${@:4}"
        fi
        # bf16 JumpReLU steps: sparse_backward rewrites the copy (_write_copy)
        if [ -f tests/test_bf16_jumprelu.py ]; then
            env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16_jumprelu.py -k cython "${@:4}"
        fi
        # the training steps' bf16 copy of W_enc, rewritten by the backward's
        # Adam pass (kernels/cython/backward.pyx, _write_copy: raw pointers)
        if [ -f tests/test_bf16_train.py ]; then
            env "${pre[@]}" PYTHONPATH="$dir" FASTSAE_REQUIRE_DEBUG_BUILD=1 \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16_train.py -k cython "${@:4}"
        fi
    )
}

echo "== bounds-checked build"
build_and_test boundscheck "" "" "$@"

ASAN_LIB=$(${CC:-cc} -print-file-name=libasan.so 2>/dev/null || true)
if [ "${FASTSAE_CI_ASAN:-1}" != "0" ] && [ -n "$ASAN_LIB" ] && [ -f "$ASAN_LIB" ]; then
    echo "== bounds-checked build with AddressSanitizer ($ASAN_LIB)"
    build_and_test asan "FASTSAE_CYTHON_ASAN=1" "$ASAN_LIB" "$@"
else
    echo "== AddressSanitizer stage skipped (no libasan, or FASTSAE_CI_ASAN=0)"
fi
