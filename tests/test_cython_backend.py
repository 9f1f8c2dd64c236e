"""Tests specific to the ``cython`` backend (compiled kernels in ``kernels/cython/``,
wrappers in ``fastsae/backends/cython/``).

Every kernel is compared with the NumPy reference on shapes that exercise the
tiling (one row, one feature, sizes that are not multiples of the tiles,
several row blocks and feature chunks) and the sparsity extremes (no active
feature, every feature active). Parallel kernels are rerun and must give
bit-identical results (races would show as differences).

Tolerance rule: values are compared with ``rtol=1e-4`` and an absolute
tolerance of ``1e-5`` times the largest magnitude of the reference array
(float32 sums of up to ~1000 terms). Sparse patterns must match exactly,
except at entries whose reference pre-activation lies within ``1e-5`` of 0,
where rounding may flip the ReLU.

The degradation test (extensions missing) runs even where the extensions
were not built.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest

import fastsae
from fastsae import backends
from fastsae import reference as R
from fastsae.backends import tunables
from fastsae.backends.numerics import adam_constants
from fastsae.params import AdamState, SAEParams
from fastsae.sparse import SparseCodes

try:
    from fastsae.backends import cython as C

    C.check_available()
    from fastsae.backends.cython import _threads as T
    HAVE_CY = True
except ImportError:  # not built here: only the degradation tests run
    HAVE_CY = False

needs_cy = pytest.mark.skipif(not HAVE_CY, reason="Cython extensions not built")

# (N, d_in, d_sae, b_enc shift): shift -1 gives a few dozen % active, -50 none, +50 all
SHAPES = [
    (1, 1, 1, 0.0),
    (1, 8, 16, -0.5),
    (7, 3, 5, -0.3),
    (5, 16, 1, 0.0),          # d_sae = 1
    (33, 17, 1000, -1.5),     # feature tiles with a remainder
    (300, 64, 1100, -2.0),    # several row blocks and chunks
    (19, 24, 40, -50.0),      # no feature active anywhere
    (23, 24, 40, 50.0),       # every feature active
]


def _problem(n, d_in, d_sae, shift, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    p = SAEParams(
        (rng.standard_normal((d_in, d_sae), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (shift + 0.1 * rng.standard_normal(d_sae)).astype(np.float32),
        (rng.standard_normal((d_sae, d_in), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (0.1 * rng.standard_normal(d_in)).astype(np.float32),
    )
    if d_sae > 2:  # a zero decoder row exercises the zero-norm rules
        p.W_dec[1] = 0
    return x, p


def _close(got, ref, rtol=1e-4, atol_rel=1e-5):
    ref = np.asarray(ref, dtype=np.float64)
    atol = atol_rel * max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), ref, rtol=rtol, atol=atol)


def _same_pattern(codes: SparseCodes, x, p):
    """Pattern equality up to entries with |pre| <= 1e-5; values close."""
    pre = R.pre_activations(x.astype(np.float64), p.W_enc, p.b_enc, p.b_dec)
    got = codes.to_dense()
    ambiguous = np.abs(pre) <= 1e-5
    assert np.array_equal((got > 0) & ~ambiguous, (pre > 0) & ~ambiguous)
    _close(got, np.maximum(pre, 0), atol_rel=1e-5)


@pytest.fixture
def be():
    return fastsae.get_backend("cython")


@pytest.fixture(autouse=True)
def _always_parallel(monkeypatch):
    """Run every kernel on the full thread team even for tiny shapes (by
    default small kernels run on one thread), so races and edge cases of the
    parallel paths (N=1 with 2 threads, ...) are exercised."""
    if HAVE_CY:
        monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)


@needs_cy
def test_small_kernels_run_serially_by_default(monkeypatch):
    monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", tunables.CYTHON_PARALLEL_MIN_WORK)
    assert T.threads(tunables.CYTHON_PARALLEL_MIN_WORK - 1) == 1
    assert T.threads(1 << 30) == C.get_num_threads()


# ------------------------------------------------------------------ kernels
@needs_cy
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_reference(be, shape):
    x, p = _problem(*shape)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    for _ in range(3):  # repeated: parallel kernels must not race
        fc = be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
        _close(fc, f)
        sc = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
        assert sc.indptr.dtype == np.int64 and sc.indices.dtype == np.int32
        assert sc.values.dtype == np.float32 and sc.shape == f.shape
        _same_pattern(sc, x, p)
        if sc.nnz:  # canonical: strictly increasing per row, no stored zeros
            assert np.all(sc.values > 0)
            steps = np.diff(sc.indices.astype(np.int64))
            starts = np.zeros(sc.nnz, dtype=bool)
            starts[sc.indptr[:-1][sc.indptr[:-1] < sc.nnz]] = True
            assert np.all((steps > 0) | starts[1:])
        xh = R.decode(f, p.W_dec, p.b_dec)
        _close(be.decode(sc, p.W_dec, p.b_dec), xh)
        _close(be.decode(f, p.W_dec, p.b_dec), xh)
        norms = R.decoder_column_norms(p.W_dec)
        _close(be.decoder_column_norms(p.W_dec), norms, rtol=1e-6, atol_rel=1e-7)
        np.testing.assert_array_equal(be.l1_subgradient(f, norms, 0.25),
                                      R.l1_subgradient(f, norms, 0.25))
        ls = be.l1_subgradient(sc, norms, 0.25)
        lr = R.l1_subgradient(sc, norms, 0.25)
        np.testing.assert_array_equal(ls.values, lr.values)
        np.testing.assert_array_equal(ls.indices, sc.indices)


@needs_cy
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_reference(be, shape, mode):
    x, p = _problem(*shape, seed=1)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    xh = R.decode(f, p.W_dec, p.b_dec)
    loss_r, g_r = R.gradients(x, p, f, xh, 0.3, mode)
    sc = SparseCodes.from_dense(f)
    first = None
    for codes in (sc, f, sc, sc):  # sparse and dense codes; repeats for races
        loss_c, g_c = be.gradients(x, p, codes, xh, 0.3, mode)
        for name in ("mse", "l1", "total"):
            assert getattr(loss_c, name) == pytest.approx(getattr(loss_r, name), rel=1e-5, abs=1e-6)
        for name in SAEParams.NAMES:
            _close(getattr(g_c, name), getattr(g_r, name))
        if first is None:
            first = g_c
        else:  # deterministic: bit-identical on every run
            for a, b in zip(first.arrays(), g_c.arrays()):
                np.testing.assert_array_equal(a, b)


@needs_cy
def test_random_shapes_hypothesis(be):
    """Random small shapes and sparsity levels (hypothesis), every kernel."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(1, 70), d_in=st.integers(1, 40),
                      d_sae=st.integers(1, 600), shift=st.floats(-3.0, 1.0),
                      seed=st.integers(0, 2**16))
    def check(n, d_in, d_sae, shift, seed):
        x, p = _problem(n, d_in, d_sae, shift, seed)
        f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
        sc = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
        _same_pattern(sc, x, p)
        _close(be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec), f)
        xh = R.decode(f, p.W_dec, p.b_dec)
        _close(be.decode(sc, p.W_dec, p.b_dec), xh)
        for mode in ("weighted_l1", "unit_norm"):
            loss_r, g_r = R.gradients(x, p, f, xh, 0.2, mode)
            loss_c, g_c = be.gradients(x, p, f, xh, 0.2, mode)
            assert loss_c.total == pytest.approx(loss_r.total, rel=1e-5, abs=1e-6)
            for name in SAEParams.NAMES:
                _close(getattr(g_c, name), getattr(g_r, name))

    check()


@needs_cy
def test_dense_decode_both_paths(be):
    """Dense codes go through a gather when sparse, sgemm when dense."""
    x, p = _problem(70, 20, 300, 0.0)
    rng = np.random.default_rng(3)
    for density in (0.01, 0.5, 1.0):
        f = (rng.random((70, 300)) < density) * rng.random((70, 300))
        f = f.astype(np.float32)
        _close(be.decode(f, p.W_dec, p.b_dec), R.decode(f, p.W_dec, p.b_dec))


@needs_cy
def test_negative_sparse_values_follow_reference(be):
    """Hand-made codes with a negative value: d_pre and fire counts use f > 0
    as the reference does, decode and g_W_dec use the value as stored."""
    x, p = _problem(3, 4, 5, 0.0)
    f = np.zeros((3, 5), np.float32)
    f[0, 1], f[0, 3], f[2, 0] = 0.5, -0.25, 1.5
    xh = R.decode(f, p.W_dec, p.b_dec)
    _close(be.decode(SparseCodes.from_dense(f), p.W_dec, p.b_dec), xh)
    for mode in ("weighted_l1", "unit_norm"):
        loss_r, g_r = R.gradients(x, p, f, xh, 0.1, mode)
        loss_c, g_c = be.gradients(x, p, SparseCodes.from_dense(f), xh, 0.1, mode)
        assert loss_c.total == pytest.approx(loss_r.total, rel=1e-5)
        for name in SAEParams.NAMES:
            _close(getattr(g_c, name), getattr(g_r, name))


# ------------------------------------------------------------------ training
@needs_cy
@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape", [(1, 8, 16, -0.5), (64, 32, 300, -1.0),
                                   (257, 40, 700, -1.5), (23, 24, 40, 50.0),
                                   (19, 24, 40, -50.0)], ids=str)
def test_train_step_matches_reference(be, shape, mode):
    x, p = _problem(*shape, seed=2)
    if mode == "unit_norm":
        R.normalize_decoder_rows(p.W_dec)
    p_r, p_c = p.copy(), p.copy()
    s_r, s_c = AdamState.zeros_like(p), AdamState.zeros_like(p)
    fc_r = np.zeros(p.d_sae, np.int64)
    fc_c = np.zeros(p.d_sae, np.int64)
    kw = dict(l1_coefficient=0.2, lr=1e-3, decoder_norm=mode)
    for step in range(5):
        xb = np.roll(x, step, axis=0)
        r = R.train_step(p_r, s_r, xb, fire_counts=fc_r, **kw)
        c = be.train_step(p_c, s_c, xb, fire_counts=fc_c, **kw)
        for name in ("mse", "l1", "total", "explained_variance"):
            assert getattr(c, name) == pytest.approx(getattr(r, name), rel=1e-4, abs=1e-5)
        assert c.l0 == r.l0
        np.testing.assert_array_equal(fc_c, fc_r)
        assert s_c.step == s_r.step == step + 1
        for name in SAEParams.NAMES:
            _close(getattr(p_c, name), getattr(p_r, name), rtol=1e-4, atol_rel=1e-5)
            _close(getattr(s_c.m, name), getattr(s_r.m, name))
            _close(getattr(s_c.v, name), getattr(s_r.v, name))
    if mode == "unit_norm":
        norms = np.linalg.norm(p_c.W_dec, axis=1)
        np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)


@needs_cy
@pytest.mark.parametrize("renormalize", [False, True])
def test_standalone_adam_kernel(renormalize):
    """_adam.adam_step (all four parameters in one parallel pass, constants
    from numerics.adam_constants) equals the reference's adam_update (+
    normalize_decoder_rows)."""
    from fastsae.backends.cython import _adam

    x, p = _problem(9, 20, 70, 0.0, seed=4)
    rng = np.random.default_rng(4)
    g = SAEParams(*(rng.standard_normal(a.shape).astype(np.float32) for a in p.arrays()))
    p_r, p_c = p.copy(), p.copy()
    s_r, s_c = AdamState.zeros_like(p), AdamState.zeros_like(p)
    for t in range(1, 4):
        R.adam_update(p_r, g, s_r, 1e-2, 0.9, 0.999, 1e-8)
        if renormalize:
            R.normalize_decoder_rows(p_r.W_dec)
        _adam.adam_step(*p_c.arrays(), *g.arrays(), *s_c.m.arrays(), *s_c.v.arrays(),
                        adam_constants(1e-2, 0.9, 0.999, 1e-8, t), renormalize, 2)
        for a, b in zip(p_c.arrays() + s_c.m.arrays() + s_c.v.arrays(),
                        p_r.arrays() + s_r.m.arrays() + s_r.v.arrays()):
            _close(a, b, rtol=1e-5, atol_rel=1e-6)


@needs_cy
def test_train_step_fire_counts_must_be_int64(be):
    """The contract's counts are int64; other dtypes are refused up front."""
    x, p = _problem(40, 16, 64, -0.5)
    counts = np.ones(64, np.int32)
    with pytest.raises(TypeError, match="fire_counts must be a writable, contiguous int64"):
        be.train_step(p, AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3,
                      fire_counts=counts)
    np.testing.assert_array_equal(counts, 1)


@needs_cy
def test_train_step_deterministic_repeats(be):
    """Same start, same batch: bit-identical parameters after each run."""
    x, p0 = _problem(300, 48, 900, -1.5, seed=5)
    results = []
    for _ in range(4):
        p, s = p0.copy(), AdamState.zeros_like(p0)
        for _ in range(2):
            be.train_step(p, s, x, l1_coefficient=0.1, lr=1e-3)
        results.append(p)
    for other in results[1:]:
        for a, b in zip(results[0].arrays(), other.arrays()):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ threads
@needs_cy
def test_thread_count_control_and_independence(be):
    x, p = _problem(300, 48, 900, -1.5, seed=6)
    old = T._num_threads
    try:
        outs = []
        fixed = SparseCodes.from_dense(R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))
        xh0 = R.decode(fixed, p.W_dec, p.b_dec)
        for nt in (1, 2, 3):
            C.set_num_threads(nt)
            assert C.get_num_threads() == (nt if T.OPENMP else 1)
            # the encoder's tiles depend on the thread count, so its values may
            # differ in the last bit; decode and backward are fed fixed codes
            sc = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
            xh = be.decode(fixed, p.W_dec, p.b_dec)
            outs.append((sc, xh, be.gradients(x, p, fixed, xh0, 0.1, "weighted_l1")[1]))
        for sc, xh, g in outs[1:]:
            np.testing.assert_array_equal(sc.indptr, outs[0][0].indptr)
            np.testing.assert_array_equal(sc.indices, outs[0][0].indices)
            _close(sc.values, outs[0][0].values, rtol=1e-6, atol_rel=1e-6)
            # decode and backward sum in the same order for any thread count
            np.testing.assert_array_equal(xh, outs[0][1])
            for a, b in zip(g.arrays(), outs[0][2].arrays()):
                np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError):
            C.set_num_threads(0)
    finally:
        C.set_num_threads(old)


@needs_cy
def test_concurrent_python_threads_and_blas_limit_restored(be):
    """Several Python threads calling the backend at once get correct
    results, and BLAS's thread limits are restored afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    x, p = _problem(200, 32, 500, -1.5, seed=8)
    ref = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)

    def work(_):
        return be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)

    with ThreadPoolExecutor(4) as pool:
        for out in pool.map(work, range(12)):
            _close(out, ref)
    after = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    assert after == before


@needs_cy
def test_description_and_build_facts():
    from fastsae.backends.cython import _runtime

    desc = C.DESCRIPTION
    assert ("OpenMP" in desc) or ("single-threaded" in desc)
    assert _runtime.BLAS_INT_BYTES in (4, 8)
    status = {s.name: s for s in fastsae.available_backends()}
    assert status["cython"].available and "Cython" in status["cython"].reason


# ------------------------------------------------------------------ safety
@needs_cy
def test_front_refuses_what_would_take_kernels_out_of_bounds(be):
    """The backend module trusts its arguments (validation happens once, in
    the front): the front must refuse every argument that would make the
    compiled code read or write out of bounds, before the kernels run."""
    x, p = _problem(4, 6, 10, 0.0)
    bad = SparseCodes(np.array([0, 1, 1, 1, 2], np.int64), np.array([3, 10], np.int32),
                      np.ones(2, np.float32), (4, 10))
    short = SparseCodes(np.array([0, 1, 1, 1, 3], np.int64), np.array([3, 4], np.int32),
                        np.ones(2, np.float32), (4, 10))
    for codes in (bad, short):
        with pytest.raises(ValueError):
            be.decode(codes, p.W_dec, p.b_dec)
        with pytest.raises(ValueError):
            be.l1_subgradient(codes, np.ones(10, np.float32), 0.1)
        with pytest.raises(ValueError):
            be.gradients(x, p, codes, x, 0.1, "weighted_l1")
    with pytest.raises(ValueError):
        be.encode_relu(x, p.W_enc[:5], p.b_enc, p.b_dec)
    with pytest.raises(ValueError):
        be.l1_subgradient(np.ones((4, 9), np.float32), np.ones(10, np.float32), 0.1)
    with pytest.raises((ValueError, TypeError)):
        be.train_step(p, AdamState(p.copy(), SAEParams(p.W_enc, p.b_enc, p.W_dec[:5],
                                                        p.b_dec)),
                      x, l1_coefficient=0.1, lr=1e-3)
    with pytest.raises(ValueError):
        be.train_step(p, AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3,
                      fire_counts=np.zeros(9, np.int64))
    with pytest.raises(ValueError):
        be.train_step_topk(p, AdamState.zeros_like(p), x, k=2, lr=1e-3,
                           dead_mask=np.ones(9, bool), k_aux=2, aux_coefficient=0.1)


@needs_cy
def test_backend_wrapper_rejects_bad_input(be):
    x, p = _problem(4, 6, 10, 0.0)
    xn = x.copy()
    xn[0, 0] = np.nan
    with pytest.raises(ValueError):
        be.encode_relu_sparse(xn, p.W_enc, p.b_enc, p.b_dec)
    with pytest.raises(ValueError):
        be.decode(np.ones((4, 9), np.float32), p.W_dec, p.b_dec)


@needs_cy
def test_debug_build_catches_out_of_bounds():
    """In a FASTSAE_CYTHON_DEBUG=1 build (see .ci/cython_debug.sh) an
    out-of-range index reaching a raw kernel raises instead of reading
    memory it does not own."""
    from fastsae.backends.cython import _decode, _runtime

    if not _runtime.DEBUG:
        if os.environ.get("FASTSAE_REQUIRE_DEBUG_BUILD"):
            pytest.fail("FASTSAE_REQUIRE_DEBUG_BUILD is set but the extensions are a release build")
        pytest.skip("release build (bounds checks off); .ci/cython_debug.sh runs this")
    W = np.ones((10, 6), np.float32)
    out = np.empty((1, 6), np.float32)
    with pytest.raises(IndexError):
        _decode.decode_csr(np.array([0, 1], np.int64), np.array([10], np.int32),
                           np.ones(1, np.float32), W, np.zeros(6, np.float32), out, 1)


# ------------------------------------------------------------------ degradation
def test_missing_extension_reports_cython_unavailable(monkeypatch):
    """Simulate an install without a C compiler: the extension modules cannot
    be imported. fastsae still works, available_backends() says why cython
    is missing, and get_backend('cython') raises a clear error."""
    pkg = "fastsae.backends.cython"
    # a fresh import of the face and its Python modules (the compiled ones stay
    # loaded: an extension module cannot be initialized twice), with one
    # compiled module missing
    for name, mod in list(sys.modules.items()):
        if (name == pkg or name.startswith(pkg + ".")) and \
                str(getattr(mod, "__file__", "")).endswith(".py"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, pkg + "._encode", None)  # import -> ImportError
    if hasattr(backends, "cython"):  # the import below rebinds it: restore it afterwards
        monkeypatch.setattr(backends, "cython", backends.cython)
    monkeypatch.setattr(backends, "_cache", {})

    status = {s.name: s for s in fastsae.available_backends()}
    assert not status["cython"].available
    assert "not importable" in status["cython"].reason
    assert "C compiler" in status["cython"].reason
    assert status["numpy"].available
    with pytest.raises(ValueError, match="cython.*not usable"):
        fastsae.get_backend("cython")
    # the rest of the package is unaffected
    be = fastsae.get_backend("numpy")
    x, p = _problem(3, 4, 5, 0.0)
    assert be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).shape == (3, 5)
    broken = importlib.import_module(pkg)
    with pytest.raises(ImportError):
        broken.check_available()
    assert broken.DESCRIPTION == "Cython kernels not built"
    # the face still has the whole contract, each kernel raising the reason
    assert all(hasattr(broken, name) for name in broken.__all__)
    with pytest.raises(ImportError, match="not importable"):
        broken.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    assert broken.get_num_threads() == 1


@pytest.mark.slow
def test_pip_install_without_c_compiler(tmp_path):
    """A real install with a compiler that always fails (CC=/bin/false):
    pip still installs fastsae, and the installed copy reports why cython is
    unavailable."""
    import shutil
    import subprocess

    pytest.importorskip("wheel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")) or shutil.which("git") is None:
        pytest.skip("needs the source checkout and git")
    src, target = tmp_path / "src", tmp_path / "site"
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    files = listing.stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(root, f)):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(root, f), src / f)
    env = dict(os.environ, CC="/bin/false")
    r = subprocess.run([sys.executable, "-m", "pip", "install", ".", "--no-build-isolation",
                        "--no-deps", "--target", str(target), "-q"],
                       cwd=src, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "fastsae" / "backends" / "cython" / "__init__.py").exists()
    assert not list((target / "fastsae" / "backends" / "cython").glob("_*.so"))
    # An editable install of the checkout under test (as in CI) puts a finder on
    # sys.meta_path that would serve the compiled modules from the source tree: drop it.
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
             "getattr(f, '__module__', '')];"
             "import fastsae; s = {b.name: b for b in fastsae.available_backends()};"
             "assert fastsae.__file__.startswith(sys.argv[1]), fastsae.__file__;"
             "assert not s['cython'].available; print(s['cython'].reason)")
    r = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(target)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not importable" in r.stdout


@needs_cy
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_to_csr_with_and_without_its_row_pointer(shape):
    """``_encode.dense_to_csr`` of dense ReLU codes is ``SparseCodes.from_dense``'s
    CSR bit for bit, counted by itself or from ``dense_indptr`` (the count
    the gradients' density choice made); a row pointer that does not fit
    ``f`` is refused; a stale one that undercounts writes only its own
    entries (never out of bounds)."""
    from fastsae.backends.cython import _encode as E
    x, p = _problem(*shape)
    f = np.maximum(R.pre_activations(x, p.W_enc, p.b_enc, p.b_dec), 0).astype(np.float32)
    want = SparseCodes.from_dense(f)
    ip = E.dense_indptr(f, 2)
    np.testing.assert_array_equal(ip, want.indptr)
    for got in (E.dense_to_csr(f, 2), E.dense_to_csr(f, 2, ip)):
        for a, b in zip(got, (want.indptr, want.indices, want.values)):
            np.testing.assert_array_equal(a, b)
    n, d = f.shape
    bad = [ip[:-1], ip.astype(np.int32), ip + 1, np.r_[ip[:-1], ip[-1] + d + 1]]
    if n > 1 and ip[-1] > 0:
        bad.append(np.r_[0, np.full(n, ip[-1])][::-1].copy())  # decreasing
    for b in bad:
        with pytest.raises(ValueError, match="row pointer"):
            E.dense_to_csr(f, 2, b)
    if ip[-1] > 0:  # undercount row 0's last... every row keeps at most its share
        short = np.maximum(ip - 1, 0)
        short[0] = 0
        got = E.dense_to_csr(f, 2, short)
        assert got[1].shape[0] == short[-1]


@needs_cy
def test_gradients_of_dense_codes_count_them_once(be, monkeypatch):
    """``gradients`` with dense codes below the density threshold counts
    the nonzeros once (``dense_indptr``) and builds the CSR from that row
    pointer, not from a second count."""
    from fastsae.backends.cython import _decode as Dm
    from fastsae.backends.cython import _encode as E
    from fastsae.backends.cython import backward as CB
    calls = {"indptr": 0, "count": 0}
    real_ip = E.dense_indptr

    def spy_ip(*a):
        calls["indptr"] += 1
        return real_ip(*a)
    monkeypatch.setattr(CB._encode, "dense_indptr", spy_ip)
    monkeypatch.setattr(Dm, "count_nonzero", lambda *a: calls.__setitem__("count", 1) or 0)
    x, p = _problem(300, 64, 1100, -2.0)
    f = np.maximum(R.pre_activations(x, p.W_enc, p.b_enc, p.b_dec), 0).astype(np.float32)
    assert 0 < np.count_nonzero(f) < tunables.CYTHON_RELU_DENSE_MIN_DENSITY * f.size
    x_hat = R.decode(f, p.W_dec, p.b_dec).astype(np.float32)
    got = be.gradients(x, p, f, x_hat, 1e-3, "weighted_l1")
    want = R.gradients(x, p, f, x_hat, 1e-3, "weighted_l1")
    assert calls == {"indptr": 1, "count": 0}
    _close(got[0].mse, want[0].mse)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        _close(getattr(got[1], name), getattr(want[1], name))
