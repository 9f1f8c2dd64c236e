"""bf16 encoders (issue 13): fp32 and ``precision="bf16"`` encodes beside the
bare float32 matmul of the encoder's shapes, in one group per size,
``bf16_encode[<size>]``:

* ``bare_matmul``: ``np.matmul(x, W_enc, out=preallocated)`` (the floor of
  the fp32 encode, and what every row's ``x matmul`` divides by);
* ``encode_relu_sparse`` (L0 about ``--bench-l0``, 48 by default, through
  the shared bias as in ``test_bench_kernels.py``), ``encode_topk`` and
  ``encode_batchtopk`` (k=32) on numba and cython: fp32 (the default),
  then ``precision="bf16"`` per call (weights packed on each call) on every
  path of
  ``fastsae.backends.bf16.available_paths()`` (``FASTSAE_BF16_PATH`` set);
* ``BF16Encoder(W_enc, b_enc, b_dec)``: its construction (``pack``) and
  ``.relu(x)`` / ``.topk(x, 32)`` / ``.batchtopk(x, 32)`` on the prepacked
  weights, every path;
* ``train_step`` (ReLU, weighted L1), ``train_step_topk`` (k=32, TopK and
  BatchTopK) and ``train_step_jumprelu`` (thresholds 0.05, bandwidth 0.05) on
  numba and cython, fp32 and ``precision="bf16"`` on every path (op
  ``step_relu`` / ``step_topk`` / ``step_batchtopk`` / ``step_jumprelu``):
  the parameters are updated in place
  round after round with a tiny learning rate, so L0 stays put; a bf16
  step encodes from the copy of ``W_enc`` that the previous step's Adam
  pass wrote (the first round packs it);
* peers when importable: ``torch.matmul`` on bf16 tensors (threads set to
  numba's), skipped when torch is absent; MKL's ``cblas_gemm_bf16bf16f32``
  (bf16 operands, float32 output; PyPI ``mkl``, loaded through ctypes from
  ``libmkl_rt``, threads set to numba's) into the full ``N x d_sae`` output
  (op ``matmul``) and in 512-row blocks into one block-sized output that
  stays in cache (op ``matmul_blocks``, the way a fused encoder would use
  it), skipped when MKL is absent. Neither is a dependency.

The end of the run prints the group as its own table (registered in
``conftest.TABLES``): each median as a ratio to the bare matmul and, for the
bf16 rows, to the fp32 encode of the same backend and op (``BF16Encoder``:
numba's, whose thread count it takes).

Run:  python -m pytest benchmarks/test_bench_bf16.py --bench-size paper
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np
import pytest

import fastsae

from conftest import TABLES, _STAT

K = 32
IMPLS = ("numba", "cython")
#: every path the kernel knows; those this CPU lacks are skipped with a reason
PATHS = ("avx512bf16", "emulated")
OPS = ("relu", "topk", "batchtopk")
TABLE = "bf16"


def _bf16():
    bf16 = pytest.importorskip("fastsae.backends.bf16",
                               reason="fastsae.backends.bf16 is not importable")
    try:
        bf16.check_available()
    except ImportError as exc:  # the compiled kernels are not built
        pytest.skip(str(exc))
    return bf16


def _usable(request, name):
    wanted = request.config.getoption("--bench-backends")
    if wanted and name not in wanted.split(","):
        pytest.skip(f"{name} not in --bench-backends")
    st = {s.name: s for s in fastsae.available_backends()}.get(name)
    if st is None or not st.available:
        pytest.skip(f"backend {name} is not usable here: "
                    f"{getattr(st, 'reason', None) or 'not registered'}")
    return fastsae.get_backend(name)


def _path(monkeypatch, path):
    bf16 = _bf16()
    if path not in bf16.available_paths():
        pytest.skip(f"bf16 path {path} not on this CPU (it has {bf16.available_paths()})")
    monkeypatch.setenv("FASTSAE_BF16_PATH", path)
    assert bf16.selected_path() == path
    return bf16


def _setup(benchmark, size, problem, *, impl, op, precision, path="-"):
    """Group and extra_info, before the timing (the group is read then); the
    tests that measure an L0 store it after."""
    benchmark.group = f"bf16_encode[{size}]"
    label = f"{impl} {op} {precision}" + (f" {path}" if path != "-" else "")
    benchmark.extra_info.update(backend=label, size=size, table=TABLE, impl=impl, op=op,
                                precision=precision, path=path, l0=None)


def _args(problem):
    p = problem.params
    return problem.x, p.W_enc, p.b_enc, p.b_dec


def _call(be, op, precision):
    if op == "relu":
        if precision is None:
            return lambda *a: be.encode_relu_sparse(*a)
        return lambda *a: be.encode_relu_sparse(*a, precision=precision)
    enc = be.encode_topk if op == "topk" else be.encode_batchtopk
    if precision is None:
        return lambda *a: enc(*a, K)
    return lambda *a: enc(*a, K, precision=precision)


def _keys(codes):
    c = codes.to_host()
    rows = np.repeat(np.arange(c.shape[0], dtype=np.int64), np.diff(np.asarray(c.indptr)))
    return rows * c.shape[1] + np.asarray(c.indices, np.int64), np.asarray(c.values)


def _check_close(b16, fp32):
    """bf16 codes against fp32's: a support that differs in few entries (only
    near a boundary), float32 values on the common support."""
    (kb, vb), (kf, vf) = _keys(b16), _keys(fp32)
    common, ib, i_f = np.intersect1d(kb, kf, assume_unique=True, return_indices=True)
    diff = kb.size + kf.size - 2 * common.size
    assert diff <= max(8, 0.03 * kf.size), f"{diff} support differences of {kf.size}"
    np.testing.assert_allclose(vb[ib], vf[i_f], rtol=1e-5, atol=1e-5)


def _fp32_codes(problem, op):
    key = (problem.size, problem.x.shape[0], op)
    if key not in _FP32:
        be = fastsae.get_backend("numba" if any(
            s.name == "numba" and s.available for s in fastsae.available_backends())
            else "numpy")
        _FP32[key] = _call(be, op, None)(*_args(problem))
    return _FP32[key]


_FP32: dict = {}


# ------------------------------------------------------------------ the rows
def test_bare_matmul(benchmark, size, problem):
    """Floor: float32 GEMM of the encoder's shapes into a preallocated output."""
    _setup(benchmark, size, problem, impl="bare_matmul", op="matmul", precision="fp32")
    x, W = problem.x, problem.params.W_enc
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    benchmark(np.matmul, x, W, out=out)
    assert out.shape == (x.shape[0], W.shape[1])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_fp32(benchmark, size, problem, impl, op, request):
    be = _usable(request, impl)
    _setup(benchmark, size, problem, impl=impl, op=op, precision="fp32")
    codes = benchmark(_call(be, op, None), *_args(problem))
    benchmark.extra_info["l0"] = float(codes.l0)
    if op == "relu":
        assert abs(codes.l0 - problem.l0) < 1.0
    else:
        assert codes.l0 <= K + 1e-9


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_bf16(benchmark, size, problem, impl, op, path, request, monkeypatch):
    """``precision="bf16"`` per call: the weights are rounded and packed on
    every call."""
    be = _usable(request, impl)
    _path(monkeypatch, path)
    _setup(benchmark, size, problem, impl=impl, op=op, precision="bf16", path=path)
    codes = benchmark(_call(be, op, "bf16"), *_args(problem))
    benchmark.extra_info["l0"] = float(codes.l0)
    _check_close(codes, _fp32_codes(problem, op))


@pytest.mark.parametrize("path", PATHS)
def test_bf16_encoder_pack(benchmark, size, problem, path, monkeypatch):
    """``BF16Encoder(W_enc, b_enc, b_dec)``: rounding and packing the weights."""
    bf16 = _path(monkeypatch, path)
    p = problem.params
    _setup(benchmark, size, problem, impl="BF16Encoder", op="pack", precision="bf16",
           path=path)
    enc = benchmark(bf16.BF16Encoder, p.W_enc, p.b_enc, p.b_dec)
    assert enc is not None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_bf16_encoder(benchmark, size, problem, op, path, request, monkeypatch):
    """``BF16Encoder`` prepacked: ``.relu(x)`` / ``.topk(x, k)``, the same
    codes as the contract function (numba's, bit for bit)."""
    bf16 = _path(monkeypatch, path)
    p = problem.params
    enc = bf16.BF16Encoder(p.W_enc, p.b_enc, p.b_dec)
    fn = enc.relu if op == "relu" else (lambda x: getattr(enc, op)(x, K))
    _setup(benchmark, size, problem, impl="BF16Encoder", op=op, precision="bf16", path=path)
    codes = benchmark(fn, problem.x)
    benchmark.extra_info["l0"] = float(codes.l0)
    _check_close(codes, _fp32_codes(problem, op))
    if any(s.name == "numba" and s.available for s in fastsae.available_backends()):
        ref = _call(fastsae.get_backend("numba"), op, "bf16")(*_args(problem))
        for a, b in zip((codes.indptr, codes.indices, codes.values),
                        (ref.indptr, ref.indices, ref.values)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


STEPS = ("step_relu", "step_topk", "step_batchtopk", "step_jumprelu")


def _step_fn(be, problem, op, precision):
    """One training step on copies of the problem's SAE, in place."""
    q = problem.params.copy()
    st = fastsae.AdamState.zeros_like(q)
    x = problem.x
    if op == "step_relu":
        return lambda: be.train_step(q, st, x, l1_coefficient=1e-3, lr=1e-7,
                                     precision=precision)
    if op == "step_jumprelu":
        # thresholds at the ReLU codes' level: the window (bandwidth 0.05)
        # around 0.05 holds about the same entries as ReLU's L0
        lt = np.full(q.d_sae, np.log(0.05), np.float32)
        tm, tv = np.zeros_like(lt), np.zeros_like(lt)
        return lambda: be.train_step_jumprelu(q, st, x, log_threshold=lt, threshold_m=tm,
                                              threshold_v=tv, bandwidth=0.05,
                                              l0_coefficient=1e-3, lr=1e-7,
                                              precision=precision)
    return lambda: be.train_step_topk(q, st, x, k=K, activation=op[len("step_"):], lr=1e-7,
                                      precision=precision)


@pytest.mark.parametrize("precision_path", ["fp32", *(f"bf16-{p}" for p in PATHS)])
@pytest.mark.parametrize("op", STEPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, size, problem, impl, op, precision_path, request, monkeypatch):
    be = _usable(request, impl)
    precision, _, path = precision_path.partition("-")
    if precision == "bf16":
        _path(monkeypatch, path)
    _setup(benchmark, size, problem, impl=impl, op=op, precision=precision,
           path=path or "-")
    r = benchmark(_step_fn(be, problem, op, precision))
    benchmark.extra_info["l0"] = float(r.l0)
    assert np.isfinite(r.mse)


def test_torch_bf16_matmul(benchmark, size, problem):
    """Peer: ``torch.matmul`` of bf16 ``x - b_dec`` and ``W_enc`` (bf16
    output), threads set to numba's."""
    torch = pytest.importorskip("torch")
    threads = fastsae.get_backend("numba").get_num_threads() if any(
        s.name == "numba" and s.available for s in fastsae.available_backends()) else None
    if threads:
        torch.set_num_threads(threads)
    p = problem.params
    xb = torch.from_numpy(problem.x - p.b_dec).to(torch.bfloat16)
    wb = torch.from_numpy(p.W_enc).to(torch.bfloat16)
    out = torch.empty((xb.shape[0], wb.shape[1]), dtype=torch.bfloat16)
    _setup(benchmark, size, problem, impl="torch", op="matmul", precision="bf16",
           path=f"torch {torch.__version__}")
    benchmark(torch.matmul, xb, wb, out=out)
    assert out.shape == (xb.shape[0], wb.shape[1])


def _mkl():
    """``libmkl_rt`` (ctypes) with ``cblas_gemm_bf16bf16f32``, or skip."""
    names = [ctypes.util.find_library("mkl_rt")]
    names += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            fn = lib.cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        fn.restype = None
        fn.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr,
                       c_int, c_float, ptr, c_int]
        lib.MKL_Set_Num_Threads.argtypes = [c_int]
        lib.MKL_Set_Num_Threads.restype = None
        return lib, name
    pytest.skip("MKL (libmkl_rt with cblas_gemm_bf16bf16f32) not found: pip install mkl")


def _bf16_bits(a):
    """float32 -> bfloat16 bits (uint16, round to nearest even), C order."""
    from fastsae.backends.reference import bf16_round

    return np.ascontiguousarray((bf16_round(a).view(np.uint32) >> 16).astype(np.uint16))


_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_LAYOUT / CBLAS_TRANSPOSE


@pytest.mark.parametrize("op", ["matmul", "matmul_blocks"])
def test_mkl_bf16_gemm(benchmark, size, problem, op):
    """Peer: MKL's ``cblas_gemm_bf16bf16f32`` of bf16 ``x - b_dec`` and
    ``W_enc``, float32 output; ``matmul_blocks``: 512 rows at a time into one
    reused block output."""
    lib, name = _mkl()
    if any(s.name == "numba" and s.available for s in fastsae.available_backends()):
        lib.MKL_Set_Num_Threads(fastsae.get_backend("numba").get_num_threads())
    p = problem.params
    xc = np.ascontiguousarray(problem.x - p.b_dec, dtype=np.float32)
    a, b = _bf16_bits(xc), _bf16_bits(p.W_enc)
    n, d_in = a.shape
    d_sae = b.shape[1]
    rows = n if op == "matmul" else min(512, n)
    out = np.empty((rows, d_sae), np.float32)
    gemm = lib.cblas_gemm_bf16bf16f32

    def run():
        for lo in range(0, n, rows):
            m = min(rows, n - lo)
            gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, d_sae, d_in, 1.0,
                 a[lo:].ctypes.data, d_in, b.ctypes.data, d_sae, 0.0, out.ctypes.data, d_sae)
        return out
    _setup(benchmark, size, problem, impl="mkl", op=op, precision="bf16",
           path=os.path.basename(name))
    benchmark(run)
    # the last block against the same bf16 products summed in float64
    lo = (n - 1) // rows * rows
    want = _from_bits(a[lo:]) @ _from_bits(b)
    got = out[:n - lo]
    scale = np.abs(_from_bits(a[lo:])) @ np.abs(_from_bits(b))
    # float32 accumulation of d_in products: error ~ d_in * 2^-24 of the scale
    assert np.all(np.abs(got - want) <= 1e-5 * d_in * scale + 1e-30), "MKL bf16 GEMM is off"


def _from_bits(h):
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# ------------------------------------------------------------------ the table
_IMPL_ORDER = {"bare_matmul": 0, "torch": 1, "mkl": 2, "numba": 3, "cython": 4,
               "BF16Encoder": 5}
_OP_ORDER = {"matmul": 0, "matmul_blocks": 0.5, "pack": 1, "relu": 2, "topk": 3, "batchtopk": 4,
             "step_relu": 5, "step_topk": 6, "step_batchtopk": 7, "step_jumprelu": 8}


def _table(tr, rows):
    """``rows``: [(benchmark, median)] of this module's benchmarks."""
    tr.section(f"fastsae: bf16 encoders, {_STAT[0]}s as ratios (same run)")
    try:
        from fastsae.backends import bf16
        tr.write_line(f"{bf16.path_report()}; paths here: {bf16.available_paths()}")
    except Exception as exc:  # not importable: the bf16 rows were skipped
        tr.write_line(f"fastsae.backends.bf16: {exc}")
    tr.write_line(f"{'group':28s} {'op':14s} {'impl':12s} {'prec':4s} {'path':12s} "
                  f"{_STAT[0] + ' ms':>10s} {'x matmul':>9s} {'x fp32':>8s} {'L0':>6s}")
    groups: dict = {}
    for b, med in rows:
        groups.setdefault((str(b.group), b.extra_info.get("n")), []).append((b, med))
    for key in sorted(groups, key=lambda k: (k[0], k[1] or 0)):
        g = groups[key]
        label = f"{key[0]} N={key[1]}" if key[1] is not None else key[0]
        mm = next((m for b, m in g if b.extra_info.get("impl") == "bare_matmul"), None)
        fp32 = {(b.extra_info.get("impl"), b.extra_info.get("op")): m for b, m in g
                if b.extra_info.get("precision") == "fp32"}
        g.sort(key=lambda r: (_OP_ORDER.get(r[0].extra_info.get("op"), 9),
                              _IMPL_ORDER.get(r[0].extra_info.get("impl"), 9),
                              r[0].extra_info.get("precision") != "fp32",
                              str(r[0].extra_info.get("path"))))
        for b, med in g:
            e = b.extra_info
            impl, op = e.get("impl"), e.get("op")
            base = fp32.get(("numba" if impl == "BF16Encoder" else impl, op))
            xf = (f"{med / base:7.2f}x" if base and e.get("precision") == "bf16"
                  and op in (*OPS, *STEPS) else "       -")
            xm = f"{med / mm:8.2f}x" if mm else "        -"
            l0 = e.get("l0")
            tr.write_line(f"{label:28s} {op:14s} {impl:12s} {e.get('precision'):4s} "
                          f"{str(e.get('path')):12s} {med * 1e3:10.3f} {xm:>9s} {xf:>8s} "
                          f"{(f'{l0:6.1f}' if l0 is not None else '     -')}")
    tr.write_line("'x matmul' = this time / np.matmul(x, W_enc, out=preallocated) of the "
                  "same group (float32); 'x fp32' = a bf16 encode's time / the fp32 encode "
                  "of the same backend and op (BF16Encoder: numba's); bf16 rows of numba "
                  "and cython pack the weights on every call, BF16Encoder's relu/topk use "
                  f"weights packed once ('pack' times that); step_* = train_step / "
                  f"train_step_topk / train_step_jumprelu (thresholds 0.05, bandwidth 0.05; "
                  f"bf16: from the copy the previous step wrote); topk "
                  f"and batchtopk k={K}; mkl = cblas_gemm_bf16bf16f32 (matmul_blocks: 512 "
                  "rows at a time into one reused output); L0 = measured "
                  "active features per row.")


TABLES[TABLE] = _table
