"""The CUDA backend against the NumPy reference, beyond the shared contract.

Runs only under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
numba is imported; ``tests/test_cuda_sim.py`` launches this file that way in
a subprocess) or on a machine with a CUDA GPU; skipped otherwise. Under the
simulator shapes stay tiny (every thread is a Python thread); the kernels
then run with 8-thread blocks and 8x8 GEMM tiles (see
``fastsae/backends/cuda/common.py``), so these shapes still cross every
tile, chunk and grid-stride boundary.

Tolerances: values are compared with the float32 error bounds of
``conftest.py`` (sums of K float32 terms: ``~K * 2**-24 * sum|terms|``);
the sparse pattern must equal the reference's exactly except where the
float64 pre-activation is within that bound of 0. The CUDA kernels use no
float atomics (fixed reduction orders, a stable CSR->CSC transposition), so
repeated calls must agree bit for bit: that is the race check.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from numba import config, cuda

if not (config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1 (see tests/test_cuda_sim.py)",
                allow_module_level=True)

import fastsae  # noqa: E402
from fastsae import AdamState, SAEParams, SparseCodes  # noqa: E402
from fastsae.backends import cuda as CB  # noqa: E402
from fastsae.backends.cuda import placement as CP  # noqa: E402
from fastsae import reference as R  # noqa: E402

from conftest import (U32, assert_codes_match, dot_bound, encode_oracle, f64,  # noqa: E402
                      make_params, make_x)

SIM = bool(config.ENABLE_CUDASIM)


def _lock_simulator_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` thread-safe.

    The simulator hands a block's threads one shared array per source line
    through an unlocked check-then-insert in a dict; with a short GIL switch
    interval two threads of a block sometimes both miss and get different
    arrays (seen as garbage reads). Same lookup, under a lock.
    """
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_fastsae_locked", False) or not hasattr(cls, "array"):
        return
    lock = threading.Lock()
    original = cls.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None or not hasattr(self, "_allocations"):
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    cls.array = array
    cls._fastsae_locked = True


if SIM:
    _lock_simulator_shared_arrays()

# (N, d_in, d_sae): one row, one feature, odd sizes; bigger ones on a real GPU
SHAPES = [(1, 1, 1), (1, 4, 9), (6, 3, 1), (11, 9, 19)]
if not SIM:
    SHAPES += [(130, 70, 260), (300, 129, 515)]


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator_switches():
    """The simulator polls its threads: a short GIL switch interval makes
    each ``syncthreads`` take microseconds instead of ~5 ms."""
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="module")
def be():
    return fastsae.get_backend("cuda")


def _case(shape, sparsity="mixed", seed=0):
    rng = np.random.default_rng(seed + 17 * shape[0] + 5 * shape[2])
    p = make_params(rng, shape[1], shape[2], sparsity)
    x = make_x(rng, shape[0], shape[1])
    if sparsity == "mixed" and shape[0] > 2:
        x[1] = p.b_dec  # a row with no active feature
    return x, p


def _is_dev(a):
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def _grad_tol(want, k, scale=0.0):
    return 8 * (k + 4) * U32 * max(float(np.max(np.abs(want))), scale, 1e-30)


def _check_grads(g, ref_g, x, f, x_hat):
    n, d_in = x.shape
    k = 2 * max(n, d_in, f.shape[1])
    raw = np.max(np.abs(f64(f).T @ (2 * (f64(x_hat) - f64(x)) / n)), initial=0.0)
    for name in SAEParams.NAMES:
        got, want = getattr(g, name), getattr(ref_g, name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        tol = _grad_tol(want, k, raw if name == "W_dec" else 0.0)
        assert np.max(np.abs(f64(got) - want)) <= tol, name


# ---------------------------------------------------------------- registry
def test_registered_and_described():
    st = {s.name: s for s in fastsae.available_backends()}["cuda"]
    assert st.available, st.reason
    if SIM:
        assert "simulator" in st.reason.lower()
    assert CB.DEVICE_ARRAYS is True


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("sparsity", ["mixed", "none", "all"])
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_dense_and_sparse(be, shape, sparsity):
    x, p = _case(shape, sparsity)
    pre, bound = encode_oracle(x, p)
    f = be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    assert isinstance(f, np.ndarray) and f.dtype == np.float32
    assert_codes_match(f, pre, bound, "encode_relu")
    codes = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    assert isinstance(codes.values, np.ndarray)
    assert codes.indptr.dtype == np.int64 and codes.indices.dtype == np.int32
    for i in range(shape[0]):
        assert np.all(np.diff(codes.indices[codes.indptr[i]:codes.indptr[i + 1]]) > 0)
    assert np.all(codes.values > 0)
    # same kernel (GEMM) for both: the sparse codes are exactly the dense ones
    assert np.array_equal(codes.to_dense(), f)
    if sparsity == "none":
        assert codes.nnz == 0
    if sparsity == "all":
        assert codes.nnz == shape[0] * shape[2]


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_norms_l1(be, shape):
    x, p = _case(shape)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    ref = f64(f) @ f64(p.W_dec) + f64(p.b_dec)
    bound = dot_bound(np.abs(f64(f)), np.abs(f64(p.W_dec)), f.shape[1], np.abs(f64(p.b_dec)))
    for codes in (f, SparseCodes.from_dense(f)):
        xh = be.decode(codes, p.W_dec, p.b_dec)
        assert np.all(np.abs(f64(xh) - ref) <= bound)
    W = p.W_dec.copy()
    W[-1] = 0.0
    norms = be.decoder_column_norms(W)
    ref_n = np.sqrt(np.sum(f64(W) ** 2, axis=1))
    assert np.all(np.abs(f64(norms) - ref_n) <= (W.shape[1] + 2) * U32 * ref_n + 1e-30)
    assert norms[-1] == 0.0
    # the L1 subgradient is one float32 product: exactly NumPy's
    assert np.array_equal(be.l1_subgradient(f, norms, 0.37), R.l1_subgradient(f, norms, 0.37))
    sc = SparseCodes.from_dense(f)
    got, want = be.l1_subgradient(sc, norms, 0.37), R.l1_subgradient(sc, norms, 0.37)
    for a in ("indptr", "indices", "values"):
        assert np.array_equal(getattr(got, a), getattr(want, a)), a


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("sparsity", ["mixed", "none", "all"])
@pytest.mark.parametrize("shape", SHAPES[1:] if SIM else SHAPES)
def test_gradients_and_repeatability(be, shape, sparsity, decoder_norm):
    x, p = _case(shape, sparsity)
    p.W_dec[0] = 0.0  # zero-norm decoder row: its norm has derivative 0
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    x_hat = R.decode(f, p.W_dec, p.b_dec).astype(np.float32)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    ref_loss, ref_g = R.gradients(f64(x), p64, f64(f), f64(x_hat), 0.3, decoder_norm)
    sc = SparseCodes.from_dense(f)
    loss, g = be.gradients(x, p, sc, x_hat, 0.3, decoder_norm)
    _check_grads(g, ref_g, x, f, x_hat)
    for part in ("mse", "l1", "total"):
        want = getattr(ref_loss, part)
        assert abs(getattr(loss, part) - want) <= 1e-5 * max(abs(want), 1e-30) + 1e-12, part
    # dense codes go through the on-device compaction: identical arithmetic
    loss2, g2 = be.gradients(x, p, f, x_hat, 0.3, decoder_norm)
    assert loss2 == loss
    for name in SAEParams.NAMES:
        assert np.array_equal(getattr(g, name), getattr(g2, name)), name


# ---------------------------------------------------------------- train_step
def _ref_run(p, x, steps, kw):
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    z = AdamState.zeros_like(p64)
    s64 = AdamState(SAEParams(*(f64(a) for a in z.m.arrays())),
                    SAEParams(*(f64(a) for a in z.v.arrays())), 0)
    counts = np.zeros(p.d_sae, dtype=np.int64)
    results = [R.train_step(p64, s64, f64(x), fire_counts=counts, **kw) for _ in range(steps)]
    return p64, results, counts


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]] + SHAPES[4:])
def test_train_step_device_and_host(be, shape, decoder_norm):
    """Device params/state stay on the device and are updated in place;
    host params give bit-identical results; both follow the reference."""
    x, p = _case(shape)
    if decoder_norm == "unit_norm":
        R.normalize_decoder_rows(p.W_dec)
    kw = dict(l1_coefficient=0.2, lr=1e-3, decoder_norm=decoder_norm, eps=1e-3)
    steps = 3
    p64, ref, ref_counts = _ref_run(p, x, steps, kw)

    dp = be.to_backend(p.copy())
    ds = be.to_backend(AdamState.zeros_like(p))
    ids = [id(a) for a in dp.arrays()]
    dcounts = be.to_backend(np.zeros(p.d_sae, dtype=np.int64))
    dx = be.to_backend(x)
    hp, hs = p.copy(), AdamState.zeros_like(p)
    hcounts = np.zeros(p.d_sae, dtype=np.int64)
    for step in range(steps):
        got = be.train_step(dp, ds, dx, fire_counts=dcounts, **kw)
        got_h = be.train_step(hp, hs, x, fire_counts=hcounts, **kw)
        assert got.as_dict() == got_h.as_dict(), step
        r = ref[step]
        for part in ("mse", "l1", "total"):
            assert abs(getattr(got, part) - getattr(r, part)) <= 1e-4 * max(
                abs(getattr(r, part)), 1e-6) + 1e-6, (step, part)
        assert abs(got.l0 - r.l0) <= 1.0 / shape[0] + 1e-9
        assert abs(got.explained_variance - r.explained_variance) <= 1e-3
    assert [id(a) for a in dp.arrays()] == ids and all(_is_dev(a) for a in dp.arrays())
    assert ds.step == hs.step == steps
    back = be.to_numpy(dp)
    for name in SAEParams.NAMES:
        assert np.array_equal(getattr(back, name), getattr(hp, name)), name
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    back_s = be.to_numpy(ds)
    for name in SAEParams.NAMES:
        assert np.array_equal(getattr(back_s.m, name), getattr(hs.m, name))
        assert np.array_equal(getattr(back_s.v, name), getattr(hs.v, name))
    assert np.array_equal(be.to_numpy(dcounts), hcounts)
    assert np.abs(hcounts - ref_counts).max() <= 1  # a pre-activation at ~0 may flip
    if decoder_norm == "unit_norm":
        assert np.allclose(np.linalg.norm(f64(hp.W_dec), axis=1), 1.0, atol=1e-5)


def test_train_step_no_active_feature(be):
    x, p = _case((5, 4, 6), "none")
    counts = np.zeros(6, dtype=np.int64)
    hp, hs = p.copy(), AdamState.zeros_like(p)
    r = be.train_step(hp, hs, x, l1_coefficient=0.1, lr=1e-3, fire_counts=counts)
    p64, ref, _ = _ref_run(p, x, 1, dict(l1_coefficient=0.1, lr=1e-3))
    assert r.l0 == 0.0 and r.l1 == 0.0 and not counts.any()
    assert abs(r.mse - ref[0].mse) <= 1e-5 * ref[0].mse
    for name in SAEParams.NAMES:
        assert np.allclose(getattr(hp, name), getattr(p64, name), atol=1e-6), name


# ---------------------------------------------------------------- placement
def test_device_in_device_out(be):
    x, p = _case((7, 5, 12))
    dx, dp = be.to_backend(x), be.to_backend(p)
    assert _is_dev(dx) and all(_is_dev(a) for a in dp.arrays())
    f = be.encode_relu(dx, dp.W_enc, dp.b_enc, dp.b_dec)
    assert _is_dev(f)
    assert np.array_equal(be.to_numpy(f), be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))
    codes = be.encode_relu_sparse(dx, dp.W_enc, dp.b_enc, dp.b_dec)
    assert _is_dev(codes.values) and _is_dev(codes.indices) and _is_dev(codes.indptr)
    host_codes = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    assert np.array_equal(codes.to_host().indices, host_codes.indices)
    x_hat = be.decode(codes, dp.W_dec, dp.b_dec)
    assert _is_dev(x_hat)
    assert np.array_equal(be.to_numpy(x_hat), be.decode(host_codes, p.W_dec, p.b_dec))
    norms = be.decoder_column_norms(dp.W_dec)
    assert _is_dev(norms)
    l1 = be.l1_subgradient(codes, norms, 0.5)
    assert isinstance(l1, SparseCodes) and _is_dev(l1.values)
    assert np.array_equal(l1.to_host().indptr, host_codes.indptr)
    loss, g = be.gradients(dx, dp, codes, x_hat, 0.3)
    assert all(_is_dev(a) for a in g.arrays())
    loss_h, g_h = be.gradients(x, p, host_codes, be.to_numpy(x_hat), 0.3)
    assert loss == loss_h
    for name in SAEParams.NAMES:
        assert np.array_equal(be.to_numpy(getattr(g, name)), getattr(g_h, name))
    # mixed host/device arguments: device results
    assert _is_dev(be.encode_relu(x, dp.W_enc, p.b_enc, p.b_dec))
    assert _is_dev(be.decode(host_codes, dp.W_dec, p.b_dec))


def test_round_trips(be):
    x, p = _case((4, 3, 5))
    s = AdamState.zeros_like(p)
    s.step = 7
    codes = SparseCodes.from_dense(R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))
    dp, ds, dc = be.to_backend(p), be.to_backend(s), be.to_backend(codes)
    assert ds.step == 7 and _is_dev(ds.m.W_dec) and _is_dev(dc.indices)
    assert be.to_backend(dp.W_enc) is dp.W_enc  # device arrays pass through
    hp, hs, hc = be.to_numpy(dp), be.to_numpy(ds), be.to_numpy(dc)
    for name in SAEParams.NAMES:
        assert np.array_equal(getattr(hp, name), getattr(p, name))
    assert hs.step == 7
    for a in ("indptr", "indices", "values"):
        assert np.array_equal(getattr(hc, a), getattr(codes, a))
        assert getattr(hc, a).dtype == getattr(codes, a).dtype
    d64 = be.to_backend(np.ones(3))  # float64 arrives as float32
    assert be.to_numpy(d64).dtype == np.float32
    assert be.to_numpy(be.to_backend(np.arange(4))).dtype == np.arange(4).dtype
    be.synchronize()


def test_shape_changes_reuse_workspace(be):
    """Cached scratch buffers follow the shapes of successive calls."""
    for shape in [(6, 4, 10), (3, 4, 10), (9, 5, 7), (6, 4, 10)]:
        x, p = _case(shape)
        pre, bound = encode_oracle(x, p)
        hp, hs = p.copy(), AdamState.zeros_like(p)
        be.train_step(hp, hs, x, l1_coefficient=0.1, lr=1e-3)
        codes = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
        assert_codes_match(codes.to_dense(), pre, bound)
    CP.clear_workspace()
    x, p = _case((2, 3, 4))
    be.train_step(p.copy(), AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3)


# ---------------------------------------------------------------- bad input
def test_bad_device_input_is_refused(be):
    x, p = _case((4, 6, 5))
    dp = be.to_backend(p)
    with pytest.raises(TypeError):
        be.encode_relu(CP._wrap(cuda.to_device(x.astype(np.float64))), dp.W_enc, dp.b_enc,
                       dp.b_dec)
    with pytest.raises(ValueError):
        be.encode_relu(x, dp.W_enc, dp.b_enc, dp.b_dec[:3])
    wide = be.to_backend(np.zeros((6, 10), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        be.encode_relu(x, CP._wrap(wide[:, ::2]), dp.b_enc, dp.b_dec)
    with pytest.raises(TypeError):
        be.train_step(dp, be.to_backend(AdamState.zeros_like(p)), x, l1_coefficient=0.1,
                      lr=1e-3, fire_counts=be.to_backend(np.zeros(5, np.float32)))
    with pytest.raises(ValueError):
        bad = AdamState.zeros_like(p)
        bad.m.W_enc = np.zeros((2, 2), np.float32)
        be.train_step(p.copy(), bad, x, l1_coefficient=0.1, lr=1e-3)
