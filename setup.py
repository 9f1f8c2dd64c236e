"""Build the optional Cython kernels in ``kernels/`` into ``fastsae``.

Every ``kernels/NAME.pyx`` becomes the extension ``fastsae._cy_NAME``. The
extensions are optional: without a working C compiler ``pip install .`` still
succeeds and ``fastsae.available_backends()`` reports the ``cython`` backend as
unavailable with the import error as the reason.

OpenMP: used when the compiler accepts ``-fopenmp`` (probed at build time);
otherwise the kernels build single-threaded. Set ``FASTSAE_CYTHON_DEBUG=1`` to
build with bounds checking and wraparound checks turned back on (the CI's
debug step does this to catch out-of-bounds accesses loudly).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTSAE_CYTHON_DEBUG", "") not in ("", "0")


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


def _extensions():
    try:
        import numpy
        from Cython.Build import cythonize
    except ImportError as exc:
        sys.stderr.write(f"WARNING: Cython/numpy not importable at build time ({exc}); "
                         "skipping the Cython kernels.\n")
        return []
    openmp = _compiler_has_openmp()
    compile_args = ["-O3"]
    link_args = []
    if openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
              ("FASTSAE_OPENMP", "1" if openmp else "0")]
    exts = []
    for pyx in sorted(glob.glob(os.path.join("kernels", "*.pyx"))):
        stem = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(Extension(f"fastsae._cy_{stem}", [pyx],
                              include_dirs=[numpy.get_include(), "kernels"],
                              define_macros=macros, extra_compile_args=compile_args,
                              extra_link_args=link_args, optional=True))
    directives = {"language_level": "3", "boundscheck": DEBUG, "wraparound": DEBUG,
                  "cdivision": not DEBUG, "initializedcheck": DEBUG}
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
