"""Shared benchmark fixtures: named problem sizes with controlled sparsity,
and a summary that prints each benchmark's median as a ratio to the NumPy
reference (and to the bare encoder matmul) measured in the same run.

Sizes (``--bench-size``, comma-separated, default ``small,paper``):

``small``  N=1024, d_in=128, d_sae=1024
``paper``  N=4096, d_in=512, d_sae=8192
``wide``   N=4096, d_in=768, d_sae=24576

``--bench-batch 512,4096`` runs every group at those batch sizes instead of
the size's own N (``N=...`` is then added to the group names of the summary);
left out, each size keeps its N and nothing changes.

``b_enc`` is set so that about ``--bench-l0`` (default 48) features are
active per row; the measured L0 is stored in each benchmark's extra_info and
printed in the summary.

The density groups (``test_bench_density.py``) sweep L0 instead (see
:func:`density_l0s`) and are printed in a table of their own, as ratios to a
lean dense NumPy step (:class:`DenseStep`) and to the bare matmul of the same
size and batch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
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
    parser.addoption("--bench-stat", default="median", choices=("median", "min"),
                     help="statistic of the end-of-run tables (default median; min is "
                     "steadier on a machine that other work shares)")
    parser.addoption("--bench-batch", default=None,
                     help="comma-separated batch sizes (rows per call) replacing each "
                     "size's own N, e.g. 512,4096 (default: the size's N)")


def _sizes(config):
    names = [s.strip() for s in config.getoption("--bench-size").split(",") if s.strip()]
    bad = [s for s in names if s not in SIZES]
    if bad:
        raise pytest.UsageError(f"unknown --bench-size {bad}; choose from {list(SIZES)}")
    return names


def _batches(config):
    """The ``--bench-batch`` values, or ``None`` when the option is not given."""
    raw = config.getoption("--bench-batch")
    if raw is None:
        return None
    try:
        vals = [int(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"--bench-batch takes comma-separated integers, got {raw!r}")
    if not vals or min(vals) < 1:
        raise pytest.UsageError(f"--bench-batch takes positive integers, got {raw!r}")
    return list(dict.fromkeys(vals))


def _backends(config):
    usable = [s.name for s in fastsae.available_backends() if s.available]
    wanted = config.getoption("--bench-backends")
    if wanted:
        return [b for b in wanted.split(",") if b in usable]
    return usable


# ------------------------------------------------------------ density sweep
#: The density groups' L0 values (active features per row): these, then
#: ``d_sae/32`` (the issue's "cost grows with L0" point) and ``d_sae/2`` (a
#: fresh ReLU SAE); each capped at ``d_sae/2``, duplicates dropped.
DENSITY_L0S = (8, 32, 128, 512, 2048)
#: The one L0 at which the NumPy reference is timed in the density groups:
#: it is dense at every L0 (its cost does not depend on it) and slower than
#: the ``dense_blas`` step that is each group's dense baseline.
DENSITY_NUMPY_L0 = 32


def density_l0s(size: str) -> list[int]:
    d_sae = SIZES[size][2]
    cap = d_sae // 2
    vals = [min(v, cap) for v in DENSITY_L0S] + [d_sae // 32, cap]
    return sorted(dict.fromkeys(v for v in vals if v >= 1))


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    sizes = _sizes(metafunc.config)
    if "density_l0" in names:
        # size and L0 together: the L0 values depend on d_sae
        backends = _backends(metafunc.config) if "density_backend" in names else [None]
        cases, ids = [], []
        for s in sizes:
            for l0 in density_l0s(s):
                for b in backends:
                    if b == "numpy" and l0 != min(density_l0s(s),
                                                  key=lambda v: abs(v - DENSITY_NUMPY_L0)):
                        continue
                    cases.append((s, l0, b) if b is not None else (s, l0))
                    ids.append(f"{s}-L0_{l0}" + (f"-{b}" if b is not None else ""))
        argnames = ["size", "density_l0"] + (["density_backend"] if backends != [None] else [])
        metafunc.parametrize(argnames, cases, ids=ids, scope="session")
    elif "size" in names:
        metafunc.parametrize("size", sizes, scope="session")
    if "backend_name" in names:
        metafunc.parametrize("backend_name", _backends(metafunc.config))
    batches = _batches(metafunc.config)
    if "batch" in names and batches is not None:
        metafunc.parametrize("batch", batches, ids=[f"b{b}" for b in batches],
                             scope="session")


@pytest.fixture(scope="session")
def batch():
    """Rows per call: ``None`` (the size's own N) unless ``--bench-batch``
    parametrizes it."""
    return None


def rows_of(size: str, batch: int | None) -> int:
    """The batch (rows) a benchmark runs at: ``batch`` or the size's N."""
    return int(batch) if batch else SIZES[size][0]


@pytest.fixture(autouse=True)
def _record_batch(request):
    """With ``--bench-batch``, every benchmark records its batch (``n``) in
    extra_info, so the summary can tell the batches of one group apart."""
    if _batches(request.config) is not None and "benchmark" in request.fixturenames \
            and "size" in request.fixturenames:
        size = request.getfixturevalue("size")
        b = request.getfixturevalue("batch")
        request.getfixturevalue("benchmark").extra_info["n"] = rows_of(size, b)
    yield


@dataclass
class Problem:
    size: str
    x: np.ndarray
    params: SAEParams
    f: np.ndarray            # dense codes, float32 [N, d_sae]
    codes: SparseCodes
    x_hat: np.ndarray
    l0: float


#: Problems built so far, newest last; the oldest are dropped past this many
#: bytes (the density groups build many large ones).
_PROBLEM_CACHE_BYTES = 3 * 2 ** 30
_problems: OrderedDict = OrderedDict()


def _problem_bytes(p: Problem) -> int:
    return (p.x.nbytes + p.f.nbytes + p.x_hat.nbytes + p.codes.values.nbytes
            + p.codes.indices.nbytes + p.codes.indptr.nbytes
            + sum(a.nbytes for a in (p.params.W_enc, p.params.W_dec)))


def make_problem(size: str, target_l0: float, seed: int = 0, batch: int | None = None
                 ) -> Problem:
    """Random SAE whose shared encoder bias gives about ``target_l0`` active
    features per row (a quantile of the bias-free pre-activations), on a
    batch of ``batch`` rows (default: the size's N)."""
    n = rows_of(size, batch)
    key = (size, float(target_l0), seed, n)
    if key in _problems:
        _problems.move_to_end(key)
        return _problems[key]
    _, d_in, d_sae = SIZES[size]
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
    while len(_problems) > 1 and sum(map(_problem_bytes, _problems.values())) \
            > _PROBLEM_CACHE_BYTES:
        _problems.popitem(last=False)
    return prob


@pytest.fixture(scope="session")
def problem(size, batch, request):
    return make_problem(size, request.config.getoption("--bench-l0"), batch=batch)


# ------------------------------------------------------------ dense baseline
class DenseStep:
    """A lean dense NumPy ReLU SAE step, written as a user would write it:
    five float32 GEMMs into preallocated outputs, ReLU, the L1 penalty
    (decoder row norms as weights for ``weighted_l1``, unit-norm rows with
    the parallel gradient removed for ``unit_norm``) and Adam over all four
    parameters. Same loss normalization as the kernels (sum over d_in, mean
    over rows). It is dense at every L0: the density groups' baseline and
    ``trainer_density.py``'s reference step.

    ``forward`` (encoder and decoder GEMMs), ``backward`` (the other three)
    and ``adam`` can be timed apart; ``step`` runs all three.
    """

    def __init__(self, params: SAEParams, n: int, *, l1_coefficient=1e-4, lr=1e-6,
                 decoder_norm="weighted_l1", beta1=0.9, beta2=0.999, eps=1e-8):
        f32 = np.float32
        self.p = [np.array(a, dtype=f32, copy=True) for a in
                  (params.W_enc, params.b_enc, params.W_dec, params.b_dec)]
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = self.p
        d_in, d_sae = self.W_enc.shape
        self.n, self.l1, self.lr, self.mode = n, float(l1_coefficient), float(lr), decoder_norm
        self.b1, self.b2, self.eps, self.t = beta1, beta2, eps, 0
        self.xc = np.empty((n, d_in), f32)
        self.f = np.empty((n, d_sae), f32)        # pre-activations, then codes
        self.x_hat = np.empty((n, d_in), f32)
        self.d_xhat = np.empty((n, d_in), f32)
        self.d_pre = np.empty((n, d_sae), f32)
        self.mask = np.empty((n, d_sae), np.bool_)
        self.g = [np.empty_like(a) for a in self.p]  # g_W_enc, g_b_enc, g_W_dec, g_b_dec
        self.m = [np.zeros_like(a) for a in self.p]
        self.v = [np.zeros_like(a) for a in self.p]
        self.tmp = [np.empty_like(a) for a in self.p]
        self.pen = np.ones(d_sae, f32)
        self.loss = 0.0

    def forward(self, x):
        np.subtract(x, self.b_dec, out=self.xc)
        np.matmul(self.xc, self.W_enc, out=self.f)               # GEMM 1: encoder
        self.f += self.b_enc
        np.maximum(self.f, 0, out=self.f)                         # ReLU
        np.matmul(self.f, self.W_dec, out=self.x_hat)             # GEMM 2: decoder
        self.x_hat += self.b_dec
        self.x = x

    def backward(self):
        n, f, d_pre, W_dec = self.n, self.f, self.d_pre, self.W_dec
        g_W_enc, g_b_enc, g_W_dec, g_b_dec = self.g
        np.subtract(self.x_hat, self.x, out=self.d_xhat)
        mse = float(np.vdot(self.d_xhat, self.d_xhat)) / n
        self.d_xhat *= np.float32(2.0 / n)
        if self.mode == "weighted_l1":
            self.pen = np.sqrt(np.einsum("ij,ij->i", W_dec, W_dec))
        colsum = f.sum(axis=0)
        self.loss = mse + self.l1 * float(colsum @ self.pen) / n
        np.matmul(self.d_xhat, W_dec.T, out=d_pre)                # GEMM 3
        d_pre += np.float32(self.l1 / n) * self.pen
        np.greater(f, 0, out=self.mask)
        np.multiply(d_pre, self.mask, out=d_pre)                  # ReLU'
        np.matmul(f.T, self.d_xhat, out=g_W_dec)                  # GEMM 4
        if self.mode == "weighted_l1":
            w = np.float32(self.l1 / n) * colsum / np.maximum(self.pen, np.float32(1e-30))
            g_W_dec += w[:, None] * W_dec
        else:  # unit_norm: no component along each (unit) decoder row
            g_W_dec -= np.einsum("ij,ij->i", g_W_dec, W_dec)[:, None] * W_dec
        np.matmul(self.xc.T, d_pre, out=g_W_enc)                  # GEMM 5
        np.sum(d_pre, axis=0, out=g_b_enc)
        np.subtract(self.d_xhat.sum(axis=0), self.W_enc @ g_b_enc, out=g_b_dec)

    def adam(self):
        self.t += 1
        b1, b2 = self.b1, self.b2
        lr_t = np.float32(self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t))
        for p, g, m, v, s in zip(self.p, self.g, self.m, self.v, self.tmp):
            m *= np.float32(b1)
            np.multiply(g, np.float32(1 - b1), out=s)
            m += s
            v *= np.float32(b2)
            np.multiply(g, g, out=s)
            s *= np.float32(1 - b2)
            v += s
            np.sqrt(v, out=s)
            s += np.float32(self.eps)
            np.divide(m, s, out=s)
            s *= lr_t
            p -= s
        if self.mode == "unit_norm":
            self.W_dec /= np.linalg.norm(self.W_dec, axis=1, keepdims=True)

    def step(self, x):
        self.forward(x)
        self.backward()
        self.adam()
        return self.loss


# ------------------------------------------------------------ summary
#: the statistic the tables print (``--bench-stat``)
_STAT = ["median"]


def pytest_configure(config):
    _STAT[0] = config.getoption("--bench-stat", "median")


def _median(bench):
    """Median (or ``--bench-stat min``) seconds of a BenchmarkFixture or of
    its Metadata record."""
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)  # fixture -> Metadata -> Stats
    try:
        return getattr(stats, _STAT[0]) if stats is not None and stats.rounds else None
    except Exception:  # no data (benchmark disabled or failed)
        return None


def _is_density(b) -> bool:
    return bool(b.extra_info.get("density"))


#: Tables of their own that benchmark modules register (name -> fn(terminalreporter,
#: [(benchmark, median)])): a benchmark whose extra_info["table"] names one is
#: printed there instead of in the ratio table (test_bench_bf16.py's).
TABLES: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """Ratios to the NumPy reference and to the bare matmul, per group; the
    density groups' ratios to the dense BLAS step and the bare matmul."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict = {}
    dgroups: dict = {}
    tables: dict = {}
    for b in session.benchmarks:
        med = _median(b)
        if med is not None:
            if b.extra_info.get("table") in TABLES:
                tables.setdefault(b.extra_info["table"], []).append((b, med))
                continue
            target = dgroups if _is_density(b) else groups
            target.setdefault((b.group, b.extra_info.get("n")), []).append((b, med))
    tr = terminalreporter
    if groups:
        _summary_table(tr, groups)
    if dgroups:
        _density_table(tr, dgroups)
    for name, rows in tables.items():
        TABLES[name](tr, rows)


def _label(group, n) -> str:
    return f"{group} N={n}" if n is not None else str(group)


def _summary_table(tr, groups):
    tr.section(f"fastsae: {_STAT[0]}s as ratios (same run)")
    tr.write_line(f"{'group':42s} {'backend':10s} {_STAT[0] + ' ms':>10s} {'vs numpy':>9s} "
                  f"{'x matmul':>9s} {'L0':>6s}")
    for key in sorted(groups, key=lambda k: (str(k[0]), k[1] or 0)):
        rows = groups[key]
        by = {b.extra_info.get("backend"): med for b, med in rows}
        ref = by.get("numpy")
        mm = next((med for b, med in rows if b.extra_info.get("backend") == "bare_matmul"), None)
        if mm is None:
            size = rows[0][0].extra_info.get("size")
            mm = _MATMUL_MEDIANS.get((size, key[1]))
        for b, med in sorted(rows, key=lambda r: r[1]):
            name = b.extra_info.get("backend", b.name)
            speedup = f"{ref / med:8.2f}x" if ref else "       -"
            rel = f"{med / mm:8.2f}x" if mm else "       -"
            l0 = b.extra_info.get("l0")
            l0s = f"{l0:6.1f}" if l0 is not None else "     -"
            tr.write_line(f"{_label(*key):42s} {name:10s} {med * 1e3:10.3f} {speedup:>9s} "
                          f"{rel:>9s} {l0s}")
    tr.write_line("'vs numpy' = reference time / this time (higher is faster); "
                  "'x matmul' = this time / bare float32 matmul of the encoder's shapes.")


def _train_floor(n, d_in, d_sae, l0, gflops, gbs):
    """``floors.py``'s train_step floor in seconds: its FLOPs over this run's
    GEMM rate plus its bytes over this run's copy bandwidth (the step's
    compute-bound and memory-bound parts run one after the other)."""
    import floors
    fl, by = next((f, b) for name, f, b in floors.floors(n, d_in, d_sae, l0)
                  if name == "train_step")
    return fl / (gflops * 1e9) + by / (gbs * 1e9)


def _targets(kind, l0, d_sae, n, x_dense, x_mm, x_floor=None) -> str:
    """The issue-12 targets that apply to one density row: 'ok'/'MISS' each."""
    out = []

    def check(name, value, limit):
        if value is not None:
            out.append(f"{name}<={limit:g} {'ok' if value <= limit else 'MISS'}")

    if kind == "train_step":
        check("dense", x_dense, 1.0)
        if l0 <= 64:
            check("dense", x_dense, 0.3)
        if 32 <= l0 <= 64:
            check("mm", x_mm, 1.3)
        if n >= 4096 and l0 == d_sae // 32:
            check("mm", x_mm, 1.6)
        if n <= 512 and l0 == d_sae // 32:
            check("floor", x_floor, 1.3)
    elif kind == "decode" and 32 <= l0 <= 64:
        check("dense", x_dense, 0.05)  # at least 20x faster than the dense decode
    return "; ".join(out)


def _density_table(tr, dgroups):
    tr.section(f"fastsae: density groups, {_STAT[0]}s as ratios to the dense BLAS step and "
               "to the bare matmul (same run)")
    tr.write_line(f"{'group':40s} {'backend':11s} {'L0':>7s} {_STAT[0] + ' ms':>10s} "
                  f"{'x dense':>8s} {'x matmul':>9s} {'x floor':>8s}  targets")
    # the bare matmul and the copy bandwidth of a size and batch, whichever group holds them
    mms, bws = {}, {}
    for rows in dgroups.values():
        for b, med in rows:
            e = b.extra_info
            if e.get("backend") == "bare_matmul":
                mms[(e.get("size"), e.get("rows"))] = med
            elif e.get("bytes"):
                bws[(e.get("size"), e.get("rows"))] = e["bytes"] / med / 1e9
    for key in sorted(dgroups, key=lambda k: str(k[0])):
        rows = dgroups[key]
        b0 = rows[0][0].extra_info
        size, n, d_sae = b0.get("size"), b0.get("rows"), b0.get("d_sae")
        kind = b0.get("kind")
        dense = next((med for b, med in rows if b.extra_info.get("backend") == "dense_blas"),
                     None)
        mm, gbs = mms.get((size, n)), bws.get((size, n))
        d_in = SIZES[size][1] if size in SIZES else None
        gflops = 2.0 * n * d_in * d_sae / mm / 1e9 if mm and d_in else None
        base = [r for r in rows if r[0].extra_info.get("l0") is None]
        swept = [r for r in rows if r[0].extra_info.get("l0") is not None]
        base.sort(key=lambda r: r[1])
        swept.sort(key=lambda r: (r[0].extra_info.get("l0_target", 0),
                                  r[0].extra_info.get("backend", "")))
        for b, med in base + swept:
            e = b.extra_info
            xd = med / dense if dense else None
            xm = med / mm if mm else None
            l0 = e.get("l0")
            xf = None
            if kind == "train_step" and l0 is not None and gflops and gbs:
                xf = med / _train_floor(n, d_in, d_sae, l0, gflops, gbs)
            tgt = "" if l0 is None or e.get("backend") == "numpy" else \
                _targets(kind, e.get("l0_target"), d_sae, n, xd, xm, xf)
            extra = f"  ({gbs:.1f} GB/s)" if e.get("bytes") and gbs else ""
            tr.write_line(
                f"{str(key[0]):40s} {e.get('backend', b.name):11s} "
                f"{(f'{l0:7.1f}' if l0 is not None else '      -')} {med * 1e3:10.3f} "
                f"{(f'{xd:7.3f}x' if xd is not None else '       -')} "
                f"{(f'{xm:8.3f}x' if xm is not None else '        -')} "
                f"{(f'{xf:7.3f}x' if xf is not None else '       -')}  {tgt}{extra}")
    tr.write_line("'x dense' = this time / the dense BLAS step of the same group "
                  "(DenseStep: five GEMMs, ReLU, Adam; for decode its decoder GEMM, for "
                  "gradients its backward); 'x matmul' = this time / np.matmul(x, W_enc, "
                  "out=preallocated) of the same size and batch; 'x floor' (train_step) = "
                  "this time / floors.py's train_step floor (FLOPs at the bare matmul's "
                  "rate + bytes at the copy_64MiB bandwidth, same run). L0 = measured "
                  "active features per row of the benchmark's codes. targets: issue 12's, "
                  "where they apply ('dense' = x dense, 'mm' = x matmul).")


#: bare-matmul medians by (size, n), filled by the encode group for other groups' ratios
#: (n is None without --bench-batch)
_MATMUL_MEDIANS: dict = {}


def record_matmul(size, bench):
    med = _median(bench)
    if med is not None:
        _MATMUL_MEDIANS[(size, bench.extra_info.get("n"))] = med


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(f"{i.get('internal_api')} {i.get('version')} "
                         f"{i.get('architecture')} threads={i.get('num_threads')}"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except Exception as exc:  # threadpoolctl is optional here
        return f"unknown ({exc})"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def pytest_report_header(config):
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "NUMBA_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    return [f"fastsae {fastsae.__version__}; BLAS: {blas_info()}; CPU: {cpu_model()} "
            f"({os.cpu_count()} CPUs)",
            f"benchmark sizes: {config.getoption('--bench-size')}; batches: "
            f"{config.getoption('--bench-batch') or 'each size N'}; env: {env or 'none set'}"]
