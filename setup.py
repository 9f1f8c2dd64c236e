"""Build the optional Cython kernels in ``kernels/cython/`` into ``fastsae``.

Every ``kernels/cython/NAME.pyx`` becomes the extension
``fastsae.backends.cython._NAME``, which the wrapper module
``fastsae/backends/cython/NAME.py`` of the same name calls (see
``kernels/README.md``). Shared declarations are ``kernels/cython/common.pxd``,
cimported as ``common`` with ``kernels/cython`` on Cython's include path.
The generated C goes to ``build/cython/`` (``build/cython_debug/`` for the
debug build), never next to the sources. The extensions are optional: without a working C compiler ``pip install .`` still
succeeds and ``fastsae.available_backends()`` reports the ``cython`` backend as
unavailable with the import error as the reason.

OpenMP: used when the compiler accepts ``-fopenmp`` (probed at build time;
``FASTSAE_NO_OPENMP=1`` forces it off); otherwise the kernels build
single-threaded and ``fastsae info`` says so. Set ``FASTSAE_CYTHON_DEBUG=1`` to
build with bounds checking and wraparound checks turned back on (the CI's
debug step does this to catch out-of-bounds accesses loudly).

BLAS: the dense products call ``sgemm`` from ``scipy.linalg.cython_blas``.
SciPy builds may declare its integer arguments as ``int`` (LP64, every SciPy
wheel so far) or as ``blas_int`` (newer SciPy, which may be 64-bit); the type
is read from the installed SciPy's ``cython_blas.pxd`` at build time and
written to a generated include file (``fastsae_blas.pxi``) in the build tree.

Instruction set: by default the kernels are compiled for the build machine
(``-march=native`` when the compiler accepts it), like Numba's JIT does; set
``FASTSAE_PORTABLE=1`` when building wheels for other machines.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTSAE_CYTHON_DEBUG", "") not in ("", "0")
# FASTSAE_CYTHON_ASAN=1 (with the debug build) also compiles with AddressSanitizer,
# which catches raw-pointer overruns that memoryview bounds checks cannot see;
# the process must then preload libasan (see .ci/cython_debug.sh).
ASAN = DEBUG and os.environ.get("FASTSAE_CYTHON_ASAN", "") not in ("", "0")


def _compiler_has_openmp() -> bool:
    """Compile and link a tiny OpenMP program with the default C compiler."""
    if os.environ.get("FASTSAE_NO_OPENMP"):
        return False
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as fh:
            fh.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except Exception:
            return False
        return r.returncode == 0


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when an extension won't build."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no Cython, ...
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc, name="the Cython kernels"):
        sys.stderr.write(f"WARNING: could not build {name} ({exc}); fastsae will work "
                         "without the 'cython' backend.\n")


HERE = os.path.dirname(os.path.abspath(__file__))
# Cython sources (relative: setuptools wants relative source paths). Not a
# Cython package (a directory named ``cython`` would shadow ``cimport cython``
# if its parent were on the include path), so the directory itself is on the
# include path and its .pxd files are cimported by their plain names.
PYX_DIR = os.path.join("kernels", "cython")
# Plain C kernels (the bfloat16 encoders), compiled into the extension of the
# shim of the same stem; instruction sets beyond the build flags are enabled per
# function (target attributes) and chosen at run time.
C_DIR = os.path.join("kernels", "c")
C_SOURCES = {"bf16": ["bf16_encode.c"]}
GEN_DIR = os.path.join(HERE, "build", "fastsae_cython_include")


def _compiler_accepts(flag: str) -> bool:
    """Whether the default C compiler accepts ``flag``."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as fh:
            fh.write("int main(void){return 0;}\n")
        try:
            r = subprocess.run([cc, flag, src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except Exception:
            return False
        return r.returncode == 0


def _write_blas_include() -> str:
    """Write ``fastsae_blas.pxi`` declaring ``sgemm``/``sgemv`` and ``blas_int``
    to match the installed SciPy, and return the directory holding it."""
    import scipy.linalg

    pxd = os.path.join(os.path.dirname(scipy.linalg.__file__), "cython_blas.pxd")
    text = open(pxd).read() if os.path.exists(pxd) else ""
    lines = ["# Generated by setup.py from " + pxd.replace("\\", "/") + ": do not edit.",
             "from scipy.linalg.cython_blas cimport sgemm, sgemv"]
    if re.search(r"\bblas_int\b", text):
        lines.append("from scipy.linalg.cython_blas cimport blas_int")
    else:
        m = re.search(r"void sgemm\(char \*transa, char \*transb, (\w+) \*m", text)
        int_type = m.group(1) if m else "int"
        if int_type == "int64_t":
            lines.append("from libc.stdint cimport int64_t")
        lines.append(f"ctypedef {int_type} blas_int")
    os.makedirs(GEN_DIR, exist_ok=True)
    out = os.path.join(GEN_DIR, "fastsae_blas.pxi")
    content = "\n".join(lines) + "\n"
    if not os.path.exists(out) or open(out).read() != content:
        with open(out, "w") as fh:
            fh.write(content)
    return GEN_DIR


def _extensions():
    try:
        import numpy
        from Cython.Build import cythonize

        gen_dir = _write_blas_include()
    except ImportError as exc:
        sys.stderr.write(f"WARNING: Cython/numpy not importable at build time ({exc}); "
                         "skipping the Cython kernels.\n")
        return []
    openmp = _compiler_has_openmp()
    # -fno-math-errno lets sqrtf vectorize; it changes no result.
    compile_args = ["-O3", "-fno-math-errno"]
    link_args = []
    if DEBUG:
        compile_args = ["-O1", "-g", "-fno-math-errno"]
        if ASAN:
            compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer"]
            link_args.append("-fsanitize=address")
    elif not os.environ.get("FASTSAE_PORTABLE") and _compiler_accepts("-march=native"):
        compile_args.append("-march=native")
    if openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
              ("FASTSAE_OPENMP", "1" if openmp else "0"),
              ("FASTSAE_DEBUG", "1" if DEBUG else "0")]
    exts = []
    for pyx in sorted(glob.glob(os.path.join(PYX_DIR, "*.pyx"))):
        stem = os.path.splitext(os.path.basename(pyx))[0]
        # A shim NAME.pyx over plain C kernels compiles them in (listed, not globbed:
        # a missing source must fail the build, not leave undefined symbols).
        c_sources = [os.path.join(C_DIR, f) for f in C_SOURCES.get(stem, ())]
        for c in c_sources:
            if not os.path.exists(os.path.join(HERE, c)):
                raise FileNotFoundError(f"{c} (a source of fastsae.backends.cython._{stem}) "
                                        "is missing from this checkout")
        exts.append(Extension(f"fastsae.backends.cython._{stem}", [pyx, *c_sources],
                              include_dirs=[numpy.get_include(), PYX_DIR, C_DIR, gen_dir],
                              define_macros=macros, extra_compile_args=compile_args,
                              extra_link_args=link_args, optional=True))
    directives = {"language_level": "3", "boundscheck": DEBUG, "wraparound": DEBUG,
                  "cdivision": not DEBUG, "initializedcheck": DEBUG}
    # Generated C goes to a build folder per mode, so switching FASTSAE_CYTHON_DEBUG
    # regenerates it instead of reusing C made with the other directives.
    c_dir = os.path.join("build", "cython_debug" if DEBUG else "cython")
    return cythonize(exts, compiler_directives=directives, quiet=True,
                     include_path=[PYX_DIR, gen_dir], build_dir=c_dir)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
