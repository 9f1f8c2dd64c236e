"""Shared benchmark fixtures: named problem sizes with controlled sparsity,
and a summary that prints each benchmark's median as a ratio to the NumPy
reference (and to the bare encoder matmul) measured in the same run.

Sizes (``--bench-size``, comma-separated, default ``small,paper``):

``small``  N=1024, d_in=128, d_sae=1024
``paper``  N=4096, d_in=512, d_sae=8192
``wide``   N=4096, d_in=768, d_sae=24576

``b_enc`` is set so that about ``--bench-l0`` (default 48) features are
active per row; the measured L0 is stored in each benchmark's extra_info and
printed in the summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes

SIZES = {
    "small": (1024, 128, 1024),
    "paper": (4096, 512, 8192),
    "wide": (4096, 768, 24576),
}


def pytest_addoption(parser):
    parser.addoption("--bench-size", default="small,paper",
                     help="comma-separated problem sizes: " + ", ".join(SIZES))
    parser.addoption("--bench-l0", type=float, default=48.0,
                     help="target mean number of active features per row")
    parser.addoption("--bench-backends", default=None,
                     help="comma-separated backends to time (default: every usable one)")


def _sizes(config):
    names = [s.strip() for s in config.getoption("--bench-size").split(",") if s.strip()]
    bad = [s for s in names if s not in SIZES]
    if bad:
        raise pytest.UsageError(f"unknown --bench-size {bad}; choose from {list(SIZES)}")
    return names


def _backends(config):
    usable = [s.name for s in fastsae.available_backends() if s.available]
    wanted = config.getoption("--bench-backends")
    if wanted:
        return [b for b in wanted.split(",") if b in usable]
    return usable


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", _sizes(metafunc.config), scope="session")
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", _backends(metafunc.config))


@dataclass
class Problem:
    size: str
    x: np.ndarray
    params: SAEParams
    f: np.ndarray            # dense codes, float32 [N, d_sae]
    codes: SparseCodes
    x_hat: np.ndarray
    l0: float


_problems: dict = {}


def make_problem(size: str, target_l0: float, seed: int = 0) -> Problem:
    """Random SAE whose shared encoder bias gives about ``target_l0`` active
    features per row (a quantile of the bias-free pre-activations)."""
    key = (size, target_l0, seed)
    if key in _problems:
        return _problems[key]
    n, d_in, d_sae = SIZES[size]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    W_dec = rng.standard_normal((d_sae, d_in), dtype=np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = np.ascontiguousarray(W_dec.T)
    b_dec = (rng.standard_normal(d_in, dtype=np.float32) * 0.1).astype(np.float32)
    sample = (x[: min(n, 512)] - b_dec) @ W_enc
    thresh = np.quantile(sample, 1.0 - target_l0 / d_sae)
    b_enc = np.full(d_sae, -thresh, dtype=np.float32)
    params = SAEParams(W_enc, b_enc, W_dec, b_dec)
    ref = fastsae.get_backend("numpy")
    f = ref.encode_relu(x, W_enc, b_enc, b_dec)
    codes = SparseCodes.from_dense(f)
    x_hat = ref.decode(f, W_dec, b_dec)
    prob = Problem(size, x, params, f, codes, x_hat, codes.l0)
    _problems[key] = prob
    return prob


@pytest.fixture(scope="session")
def problem(size, request):
    return make_problem(size, request.config.getoption("--bench-l0"))


def _median(bench):
    """Median seconds of a BenchmarkFixture or of its Metadata record."""
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)  # fixture -> Metadata -> Stats
    try:
        return stats.median if stats is not None and stats.rounds else None
    except Exception:  # no data (benchmark disabled or failed)
        return None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """Ratios to the NumPy reference and to the bare matmul, per group."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict = {}
    for b in session.benchmarks:
        med = _median(b)
        if med is not None:
            groups.setdefault(b.group, []).append((b, med))
    if not groups:
        return
    tr = terminalreporter
    tr.section("fastsae: medians as ratios (same run)")
    tr.write_line(f"{'group':42s} {'backend':10s} {'median ms':>10s} {'vs numpy':>9s} "
                  f"{'x matmul':>9s} {'L0':>6s}")
    for group in sorted(groups, key=str):
        rows = groups[group]
        by = {b.extra_info.get("backend"): med for b, med in rows}
        ref = by.get("numpy")
        mm = next((med for b, med in rows if b.extra_info.get("backend") == "bare_matmul"), None)
        if mm is None:
            size = rows[0][0].extra_info.get("size")
            mm = _MATMUL_MEDIANS.get(size)
        for b, med in sorted(rows, key=lambda r: r[1]):
            name = b.extra_info.get("backend", b.name)
            speedup = f"{ref / med:8.2f}x" if ref else "       -"
            rel = f"{med / mm:8.2f}x" if mm else "       -"
            l0 = b.extra_info.get("l0")
            l0s = f"{l0:6.1f}" if l0 is not None else "     -"
            tr.write_line(f"{str(group):42s} {name:10s} {med * 1e3:10.3f} {speedup:>9s} "
                          f"{rel:>9s} {l0s}")
    tr.write_line("'vs numpy' = reference median / this median (higher is faster); "
                  "'x matmul' = this median / bare float32 matmul of the encoder's shapes.")


#: bare-matmul medians by size, filled by the encode group for other groups' ratios
_MATMUL_MEDIANS: dict = {}


def record_matmul(size, bench):
    med = _median(bench)
    if med is not None:
        _MATMUL_MEDIANS[size] = med


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(f"{i.get('internal_api')} {i.get('version')} "
                         f"{i.get('architecture')} threads={i.get('num_threads')}"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except Exception as exc:  # threadpoolctl is optional here
        return f"unknown ({exc})"


def pytest_report_header(config):
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "NUMBA_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    return [f"fastsae {fastsae.__version__}; BLAS: {blas_info()}",
            f"benchmark sizes: {config.getoption('--bench-size')}; env: {env or 'none set'}"]
