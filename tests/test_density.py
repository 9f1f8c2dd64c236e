"""Both sides of the density switch of the CPU backends' ReLU family (issue 12).

The numba and cython backends take a dense path (BLAS products over dense
codes) for ``train_step``, ``decode(SparseCodes)`` and ``gradients`` when the
density of this call's codes (nonzeros / (N * d_sae)) is at least
``tunables.NUMBA_RELU_DENSE_MIN_DENSITY`` / ``CYTHON_RELU_DENSE_MIN_DENSITY``
(decode: ``NUMBA_DENSE_DECODE_MIN_DENSITY`` / ``CYTHON_DENSE_DECODE_MIN_DENSITY``),
read at call time: 0.0 forces the dense path, 2.0 the sparse one. Every
check here runs with the switch forced each way and compares with the NumPy
reference evaluated in float64 on the same float32 inputs (the oracle of
``test_contract.py``); spies on the dense kernels check that the switch
really happens (a face that ignored the threshold would pass the numerical
checks with its sparse path only).

Tolerances are those of ``test_contract.py`` (float32 dot-product bounds of
``conftest.py``); where a quantity is new here (the Adam moments) the bound
is derived from the gradient one in its comment.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R
from fastsae.backends import tunables as TU

from conftest import U32, dot_bound, f64, make_params, make_x

CPU = ("numba", "cython")
_STATUS = {s.name: s for s in fastsae.available_backends()}
# The threshold each switch reads (numba's decode has its own crossover)
THRESHOLD = {
    "numba": {"step": "NUMBA_RELU_DENSE_MIN_DENSITY", "gradients": "NUMBA_RELU_DENSE_MIN_DENSITY",
              "decode": "NUMBA_DENSE_DECODE_MIN_DENSITY"},
    "cython": {"step": "CYTHON_RELU_DENSE_MIN_DENSITY",
               "gradients": "CYTHON_RELU_DENSE_MIN_DENSITY",
               "decode": "CYTHON_DENSE_DECODE_MIN_DENSITY"},
}
MODES = {"dense": 0.0, "sparse": 2.0}

# The kernels each path ends in, as (module, attribute): the faces call them
# through the module attribute, so a wrapper set there sees every call.
DENSE_KERNELS = {
    "numba": {"step": ("fastsae.backends.numba.dense", "step_core"),
              "decode": ("fastsae.backends.numba.dense", "decode_csr"),
              "gradients": ("fastsae.backends.numba.dense", "relu_gradients")},
    "cython": {"step": ("fastsae.backends.cython.dense", "step"),
               "decode": ("fastsae.backends.cython.dense", "decode_csr"),
               "gradients": ("fastsae.backends.cython.dense", "gradients")},
}
SPARSE_KERNELS = {
    "numba": {"step": ("fastsae.backends.numba.step", "train_step_core"),
              "decode": ("fastsae.backends.numba.decode", "decode_csr"),
              "gradients": ("fastsae.backends.numba.backward", "relu_gradients")},
    "cython": {"step": ("fastsae.backends.cython._backward", "train_backward"),
               "decode": ("fastsae.backends.cython._decode", "decode_csr"),
               "gradients": ("fastsae.backends.cython._backward", "gradients_csr")},
}

# (N, d_in, d_sae): one row, one feature, one of everything, odd sizes, and
# sizes that leave remainders in every block grid (numba's 256-row encoder
# blocks, 16-feature sparse tiles and 256-feature dense blocks, cython's
# 256-row tiles; 300 = 256 + 44, 70 = 4 * 16 + 6, 600 = 2 * 256 + 88 puts a
# block past the encoder's one-per-thread density probe on 2 threads,
# 270 = 256 + 14; cython's dense path: 128-row decode blocks, 256-feature
# blocks, 1024-row chunks: 1100 = 1024 + 76)
SHAPES = [(1, 5, 7), (6, 4, 1), (1, 1, 1), (37, 13, 29), (300, 24, 70), (600, 20, 270),
          (1100, 8, 40)]
# (shape, sparsity): every shape with about a third active, and no / every
# feature active on the odd and the remainder shapes
CASES = [(s, "mixed") for s in SHAPES] + [
    ((37, 13, 29), "none"), ((37, 13, 29), "all"), ((300, 24, 70), "none"),
    ((300, 24, 70), "all")]
CASE_IDS = [f"{n}x{d}x{k}-{sp}" for (n, d, k), sp in CASES]


def _usable(name):
    s = _STATUS.get(name)
    return s is not None and s.available


@pytest.fixture(params=CPU)
def be(request):
    if not _usable(request.param):
        s = _STATUS.get(request.param)
        pytest.skip(f"{request.param} backend unavailable: {s.reason if s else 'unknown'}")
    return fastsae.get_backend(request.param)


@pytest.fixture
def force(monkeypatch):
    """``force(be, "dense" | "sparse" | None)`` sets the backend's threshold
    (None: leave the default)."""
    def _set(be, mode):
        if mode is not None:
            for name in set(THRESHOLD[be.name].values()):
                monkeypatch.setattr(TU, name, MODES[mode])
    return _set


class Spy:
    """Counts the calls of the kernels each path ends in."""

    def __init__(self, monkeypatch, be_name):
        self.calls = {}
        for side, table in (("dense", DENSE_KERNELS), ("sparse", SPARSE_KERNELS)):
            for what, (mod, attr) in table[be_name].items():
                module = importlib.import_module(mod)
                fn = getattr(module, attr)  # AttributeError: the kernel is missing
                key = (side, what)
                self.calls[key] = 0
                monkeypatch.setattr(module, attr, self._wrap(fn, key))

    def _wrap(self, fn, key):
        def wrapper(*args, **kwargs):
            self.calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    def reset(self):
        for k in self.calls:
            self.calls[k] = 0

    def took(self, what):
        """'dense' or 'sparse': the path that ran since the last reset (one
        and only one must have)."""
        d, s = self.calls[("dense", what)], self.calls[("sparse", what)]
        assert (d, s) in ((1, 0), (0, 1)), f"{what}: dense kernel called {d}x, sparse {s}x"
        return "dense" if d else "sparse"


def _problem(shape, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    n, d_in, d_sae = shape
    return make_x(rng, n, d_in), make_params(rng, d_in, d_sae, sparsity)


def _grad_tolerance(ref, k, scale=0.0):
    """As test_contract: each gradient entry is a sum of at most ``k`` float32
    products (times a few elementwise factors): ``8 k u`` of the largest
    magnitude, or of ``scale`` (the terms before the unit-norm projection)."""
    return 8 * (k + 4) * U32 * max(float(np.max(np.abs(ref), initial=0.0)), scale, 1e-30)


def _f64_params(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


# ------------------------------------------------------------------ train_step
def _reference_steps(p, x, kw, steps):
    """The float64 reference run from ``p``: results per step, final params,
    Adam state, fire counts, and the largest raw (unprojected) decoder
    gradient met (the scale of the unit-norm projection's cancellation)."""
    p64 = _f64_params(p)
    s64 = AdamState(_f64_params(SAEParams.zeros_like(p)), _f64_params(SAEParams.zeros_like(p)), 0)
    counts = np.zeros(p.d_sae, np.int64)
    results, raw = [], 0.0
    for _ in range(steps):
        f = R.encode_relu(f64(x), p64.W_enc, p64.b_enc, p64.b_dec)
        x_hat = R.decode(f, p64.W_dec, p64.b_dec)
        raw = max(raw, float(np.max(np.abs(f.T @ (2 * (x_hat - f64(x)) / x.shape[0])),
                                    initial=0.0)))
        results.append(R.train_step(p64, s64, f64(x), fire_counts=counts, **kw))
    return results, p64, s64, counts, raw


def _check_step_result(got, want, n, step):
    # as test_contract.test_train_step: losses summed in float64 from float32
    # terms (relative 1e-4), L0 off by at most one entry whose |pre| is within
    # rounding of 0, explained variance 1 - mse/var to 1e-3 plus the mse's
    # relative 1e-4 carried through (|EV| is large when mse >> var: "all" active)
    for part in ("mse", "l1", "total"):
        w, g = getattr(want, part), getattr(got, part)
        assert abs(g - w) <= 1e-4 * max(abs(w), 1e-6) + 1e-6, (step, part, g, w)
    assert abs(got.l0 - want.l0) <= 1.0 / n + 1e-9, (step, got.l0, want.l0)
    ev_w = want.explained_variance
    assert abs(got.explained_variance - ev_w) <= 1e-3 + 1e-4 * abs(1 - ev_w), step


def _run_steps(be, p, x, kw, steps):
    pp, st = p.copy(), AdamState.zeros_like(p)
    counts = np.zeros(p.d_sae, np.int64)
    results = [be.train_step(pp, st, x, fire_counts=counts, **kw) for _ in range(steps)]
    return results, pp, st, counts


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_step_both_paths_match_reference(be, force, case, mode, decoder_norm):
    """Three consecutive steps (with fire counts) forced dense and forced
    sparse, each against the float64 reference run from the same start:
    every StepResult field, parameters, both Adam moments, fire counts.

    Adam's eps is 1e-3 (as test_contract.test_train_step): the update
    ``m / (sqrt(v) + eps)`` is then Lipschitz in the gradient with constant
    1/eps, so float32 gradient error moves the parameters by at most
    ``lr * err / eps`` per step (with 1e-8 a gradient that is 0 up to
    rounding could move a weight by up to lr)."""
    shape, sparsity = case
    force(be, mode)
    x, p = _problem(shape, sparsity, seed=11)
    if decoder_norm == "unit_norm":
        R.normalize_decoder_rows(p.W_dec)
    kw = dict(l1_coefficient=0.2, lr=1e-3, decoder_norm=decoder_norm, beta1=0.9, beta2=0.999,
              eps=1e-3)
    steps = 3
    want, p64, s64, c_ref, raw = _reference_steps(p, x, kw, steps)
    got, pp, st, c_got = _run_steps(be, p, x, kw, steps)
    for i, (g, w) in enumerate(zip(got, want)):
        _check_step_result(g, w, shape[0], i)
    assert st.step == steps
    assert np.array_equal(c_got, c_ref), "fire_counts"
    k = 2 * max(shape)
    for name in SAEParams.NAMES:
        g, w = getattr(pp, name), getattr(p64, name)
        assert g.dtype == np.float32, name
        # parameters move by at most 3 lr; float32 and gradient error far below 1e-5
        assert np.max(np.abs(f64(g) - w)) <= 1e-5 + 1e-5 * np.max(np.abs(w)), name
        # m_t = sum_s (1 - b1) b1^(t-s) g_s: its error is at most the largest
        # gradient error of the three steps (weights sum to < 1). sqrt(v_t) is
        # a weighted 2-norm of the g_s with squared weights summing to < 1, so
        # |sqrt(v) - sqrt(v_ref)| is bounded by the same. The gradient error
        # bound is test_contract's (8 (k+4) u of the largest gradient; for the
        # projected W_dec, of the raw one); the largest |m| stands in for the
        # largest |g| up to (1 - b1^3) = 0.27, hence the factor 4, and 1e-5
        # of it covers the gradients of steps 2 and 3 being taken at
        # parameters that already differ by the 1e-5 above.
        m_ref, v_ref = getattr(s64.m, name), getattr(s64.v, name)
        m_got, v_got = f64(getattr(st.m, name)), f64(getattr(st.v, name))
        g_max = 4 * float(np.max(np.abs(m_ref), initial=0.0))
        scale = raw if name == "W_dec" else 0.0
        tol = _grad_tolerance(np.array([g_max]), k, scale) + 1e-5 * g_max + 1e-12
        assert np.max(np.abs(m_got - m_ref)) <= tol, f"m.{name}"
        assert np.max(np.abs(np.sqrt(v_got) - np.sqrt(v_ref))) <= tol, f"v.{name}"
    if decoder_norm == "unit_norm":
        assert np.allclose(np.linalg.norm(f64(pp.W_dec), axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ decode, gradients
@pytest.mark.parametrize("kind", ["sparse_codes", "dense_codes"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_both_paths(be, force, case, mode, kind):
    """decode(SparseCodes) forced dense and sparse vs the float64 oracle,
    within the float32 dot-product bound of test_contract.test_decode (and
    dense codes, whose numba BLAS/gather choice reads the same tunable)."""
    force(be, mode)
    x, p = _problem(case[0], case[1], seed=5)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    codes = SparseCodes.from_dense(f) if kind == "sparse_codes" else f
    ref = f64(f) @ f64(p.W_dec) + f64(p.b_dec)
    bound = dot_bound(np.abs(f64(f)), np.abs(f64(p.W_dec)), f.shape[1], np.abs(f64(p.b_dec)))
    xh = be.decode(codes, p.W_dec, p.b_dec)
    assert xh.dtype == np.float32 and xh.shape == x.shape
    assert np.all(np.abs(f64(xh) - ref) <= bound)


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("kind", ["sparse_codes", "dense_codes"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_both_paths(be, force, case, mode, kind, decoder_norm):
    """gradients(...) with SparseCodes and with dense codes, forced dense and
    sparse, vs the float64 oracle (test_contract.test_gradients' bounds)."""
    force(be, mode)
    x, p = _problem(case[0], case[1], seed=7)
    if case[0][2] > 2:
        p.W_dec[1] = 0  # a zero decoder row: the weighted_l1 / projection zero-norm rules
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    x_hat = R.decode(f, p.W_dec, p.b_dec).astype(np.float32)
    codes = SparseCodes.from_dense(f) if kind == "sparse_codes" else f
    coef = 0.3
    ref_loss, ref_g = R.gradients(f64(x), _f64_params(p), f64(f), f64(x_hat), coef, decoder_norm)
    n, d_in = x.shape
    k = 2 * max(n, d_in, f.shape[1])
    raw_W_dec = np.max(np.abs(f64(f).T @ (2 * (f64(x_hat) - f64(x)) / n)), initial=0.0)
    loss, g = be.gradients(x, p, codes, x_hat, coef, decoder_norm)
    for name in SAEParams.NAMES:
        got, want = getattr(g, name), getattr(ref_g, name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        scale = raw_W_dec if name == "W_dec" else 0.0
        assert np.max(np.abs(f64(got) - want)) <= _grad_tolerance(want, k, scale), name
    for part in ("mse", "l1", "total"):
        want = getattr(ref_loss, part)
        assert abs(getattr(loss, part) - want) <= 8 * k * U32 * max(abs(want), 1e-30) + 1e-12


# ------------------------------------------------------------------ the switch happens
def _fresh_init(rng, n, d_in, d_sae):
    """A fresh SAE as users start one: random decoder rows, ``W_enc = W_dec.T``,
    ``b_enc = 0`` (about half the features fire), and a batch."""
    W_dec = rng.normal(size=(d_sae, d_in))
    W_dec = 0.1 * W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams(*(np.ascontiguousarray(a, np.float32) for a in
                    (W_dec.T, np.zeros(d_sae), W_dec, np.zeros(d_in))))
    return make_x(rng, n, d_in), p


def _sparse_version(x, p, density=0.02):
    """``p`` with ``b_enc`` set so each feature fires in about ``density`` of
    the rows of ``x``."""
    pre = (f64(x) - f64(p.b_dec)) @ f64(p.W_enc)
    q = p.copy()
    q.b_enc = np.ascontiguousarray(-np.quantile(pre, 1.0 - density, axis=0), np.float32)
    return q


def _density(x, p):
    return float(np.mean(R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec) > 0))


def test_default_threshold_switches_and_forcing_works(be, force, monkeypatch):
    """With the default threshold a freshly initialized (half-dense) batch
    takes the dense path of train_step, decode(SparseCodes) and gradients
    (sparse and dense codes), and a batch at L0 ~ 2% of d_sae the sparse
    path; 0.0 sends the sparse batch dense, 2.0 the dense batch sparse."""
    for name in set(THRESHOLD[be.name].values()):
        default = getattr(TU, name)
        assert 0.02 < default <= 0.5, \
            f"{name} = {default}: this test's batches (densities 0.5, 0.02) no longer " \
            "straddle it"
    spy = Spy(monkeypatch, be.name)
    rng = np.random.default_rng(3)
    x, p_dense = _fresh_init(rng, 256, 32, 128)
    p_sparse = _sparse_version(x, p_dense)
    d_hi, d_lo = _density(x, p_dense), _density(x, p_sparse)
    assert 0.4 < d_hi < 0.6 and 0.01 < d_lo < 0.03, (d_hi, d_lo)

    def paths(p):
        out = {}
        spy.reset()
        be.train_step(p.copy(), AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3,
                      fire_counts=np.zeros(p.d_sae, np.int64))
        out["step"] = spy.took("step")
        f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
        codes = SparseCodes.from_dense(f)
        spy.reset()
        x_hat = be.decode(codes, p.W_dec, p.b_dec)
        out["decode"] = spy.took("decode")
        for kind, c in (("sparse_codes", codes), ("dense_codes", f)):
            spy.reset()
            be.gradients(x, p, c, x_hat, 0.1, "weighted_l1")
            out[f"gradients/{kind}"] = spy.took("gradients")
        return out

    every = ("step", "decode", "gradients/sparse_codes", "gradients/dense_codes")
    assert paths(p_dense) == dict.fromkeys(every, "dense"), "default threshold, density 0.5"
    assert paths(p_sparse) == dict.fromkeys(every, "sparse"), "default threshold, density 0.02"
    force(be, "dense")
    assert paths(p_sparse) == dict.fromkeys(every, "dense"), "forced dense (0.0), density 0.02"
    force(be, "sparse")
    assert paths(p_dense) == dict.fromkeys(every, "sparse"), "forced sparse (2.0), density 0.5"


# ------------------------------------------------------------------ thread counts
@pytest.fixture
def thread_control(be, monkeypatch):
    """(set(n), max threads) for the backend; restores its setting afterwards.
    Cython kernels below CYTHON_PARALLEL_MIN_WORK run on one thread whatever
    the setting: that cut-off is set to 0 so the team really runs."""
    if be.name == "numba":
        import numba
        from fastsae.backends import numba as NB
        old = numba.get_num_threads()
        yield NB.set_num_threads, numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(old)
    else:
        from fastsae.backends import cython as C
        from fastsae.backends.cython import _threads as T
        monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)
        old = T._num_threads
        yield C.set_num_threads, (max(1, T._runtime.max_threads()) if T.OPENMP else 1)
        C.set_num_threads(old)


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("mode", list(MODES))
def test_each_path_independent_of_thread_count(be, force, thread_control, mode, decoder_norm):
    """Forced dense (and forced sparse, whose encoder now starts from the
    density probe's blocks): a train_step, decode(SparseCodes) and gradients
    give bitwise-equal results on 1 and on 2 threads (the dense GEMMs run
    over a fixed block grid, single-threaded BLAS per block). 600 rows: three
    256-row blocks, so the probe covers one block on 1 thread, two on 2."""
    set_threads, top = thread_control
    if top < 2:
        pytest.skip(f"{be.name}: only {top} thread available")
    force(be, mode)
    x, p = _problem((600, 40, 257), "mixed", seed=9)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec).astype(np.float32)
    codes = SparseCodes.from_dense(f)

    def outputs():
        pp, st = p.copy(), AdamState.zeros_like(p)
        counts = np.zeros(p.d_sae, np.int64)
        r = be.train_step(pp, st, x, l1_coefficient=0.3, lr=1e-3, decoder_norm=decoder_norm,
                          fire_counts=counts)
        xh = be.decode(codes, p.W_dec, p.b_dec)
        out = pp.arrays() + st.m.arrays() + st.v.arrays() + [counts, xh]
        out.append(np.array([r.mse, r.l1, r.total, r.l0, r.explained_variance]))
        for c in (codes, f):
            loss, g = be.gradients(x, p, c, xh, 0.3, decoder_norm)
            out += g.arrays() + [np.array([loss.mse, loss.l1])]
        return out

    set_threads(1)
    one = outputs()
    set_threads(2)
    two = outputs()
    for i, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"output {i} depends on the thread count"


def test_path_choice_independent_of_thread_count(be, thread_control, monkeypatch):
    """A batch whose row blocks differ in density (rows 0-255 at ~2%, rows
    256-511 at ~46%: 26% overall, above the default threshold) takes the
    same path, with bitwise-equal results, on 1 and on 2 threads. An encoder
    that decided from "one probe block per thread" would look at rows 0-255
    only on one thread (sparse) and at all 512 on two (dense)."""
    set_threads, top = thread_control
    if top < 2:
        pytest.skip(f"{be.name}: only {top} thread available")
    spy = Spy(monkeypatch, be.name)
    rng = np.random.default_rng(4)
    n, d_in, d_sae = 512, 16, 64
    x, p = _fresh_init(rng, n, d_in, d_sae)
    z = f64(x) @ f64(p.W_enc)
    x[:256] /= np.float32(2.054 * np.std(z[:256]))  # P(z > 2.054) = 2%
    x[256:] *= np.float32(10.0 / np.std(z[256:]))  # P(z > 0.1) = 46%
    p.b_enc[:] = -1.0
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    d_top, d_all = float(np.mean(f[:256] > 0)), float(np.mean(f > 0))
    threshold = getattr(TU, THRESHOLD[be.name]["step"])
    assert d_top < threshold <= d_all, (d_top, threshold, d_all)

    def run():
        pp, st = p.copy(), AdamState.zeros_like(p)
        spy.reset()
        be.train_step(pp, st, x, l1_coefficient=0.1, lr=1e-3)
        return spy.took("step"), pp.arrays() + st.m.arrays() + st.v.arrays()

    set_threads(1)
    path1, one = run()
    set_threads(2)
    path2, two = run()
    assert path1 == path2, f"path on 1 thread: {path1}, on 2 threads: {path2}"
    for i, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"output {i} depends on the thread count"


# ------------------------------------------------------------------ across the switch
def test_training_across_the_switch(be, monkeypatch):
    """A short run from a fresh (half-dense) init with a large L1
    coefficient: L0 falls below the default threshold within a few steps, so
    the run starts on the dense path and ends on the sparse one. It stays
    finite and follows the float64 reference run of the same batches.

    Tolerance: loose (1e-3 of each parameter's scale, 1e-3 relative on the
    losses) because over 15 steps the float32 run and the float64 one drift
    apart and entries near 0 may fire in one and not in the other; a wrong
    kernel on either path moves the parameters by ~lr per step, far more."""
    spy = Spy(monkeypatch, be.name)
    threshold = getattr(TU, THRESHOLD[be.name]["step"])
    rng = np.random.default_rng(21)
    n, d_in, d_sae, steps = 128, 16, 64, 15
    _, p = _fresh_init(rng, n, d_in, d_sae)
    batches = [make_x(rng, n, d_in) for _ in range(steps)]
    kw = dict(l1_coefficient=10.0, lr=3e-2, decoder_norm="weighted_l1", beta1=0.9, beta2=0.999,
              eps=1e-3)
    pp, st = p.copy(), AdamState.zeros_like(p)
    p64 = _f64_params(p)
    s64 = AdamState(_f64_params(SAEParams.zeros_like(p)), _f64_params(SAEParams.zeros_like(p)), 0)
    c_got, c_ref = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    took = []
    for i, xb in enumerate(batches):
        spy.reset()
        got = be.train_step(pp, st, xb, fire_counts=c_got, **kw)
        took.append(spy.took("step"))
        want = R.train_step(p64, s64, f64(xb), fire_counts=c_ref, **kw)
        assert all(np.isfinite(a).all() for a in pp.arrays()), i
        assert np.isfinite(got.total), i
        for part in ("mse", "l1", "total"):
            w, g = getattr(want, part), getattr(got, part)
            assert abs(g - w) <= 1e-3 * max(abs(w), 1e-6) + 1e-6, (i, part, g, w)
        assert abs(got.l0 - want.l0) <= 0.01 * d_sae + 1e-9, (i, got.l0, want.l0)
        # the path follows this batch's density, measured by the oracle
        expect = "dense" if want.l0 / d_sae >= threshold else "sparse"
        if abs(want.l0 / d_sae - threshold) > 0.01:  # clear of the threshold
            assert took[-1] == expect, (i, want.l0 / d_sae, took[-1])
    assert took[0] == "dense" and took[-1] == "sparse", took
    for name in SAEParams.NAMES:
        g, w = f64(getattr(pp, name)), getattr(p64, name)
        assert np.max(np.abs(g - w)) <= 1e-3 * max(np.max(np.abs(w)), 1e-2), name
    # fire counts may differ only by entries that fired in one run and not the other
    assert np.max(np.abs(c_got - c_ref)) <= 0.01 * n * steps


def test_trainer_across_the_switch(be, monkeypatch):
    """The Trainer on this backend, from a fresh SAE (L0 = d_sae / 2) with a
    large L1 coefficient and no warm-ups: L0 falls from 32 of 64 to below 1
    within 15 steps, so the run takes both paths; its final parameters match
    the same run on the NumPy reference backend (float32 there too, so the
    two differ by float32 rounding only: seen ~1e-7; allowed 1e-4 of each
    parameter's scale, far below the ~lr = 3e-2 per step a wrong kernel moves
    a weight)."""
    spy = Spy(monkeypatch, be.name)
    rng = np.random.default_rng(0)
    x = make_x(rng, 2048, 16)
    cfg = fastsae.TrainConfig(
        steps=15, batch_size=128, l1_coefficient=10.0, lr=3e-2, lr_warmup_steps=0,
        l1_warmup_steps=0, lr_decay_fraction=0.0, eval_rows=256, log_every=1,
        normalize_activations=False, b_dec_init="none", progress=False, precision="fp32")
    runs = {}
    for name in ("numpy", be.name):
        sae = fastsae.SparseAutoencoder(16, 64, backend=name, seed=1)
        t = fastsae.Trainer(sae, x, cfg)
        t.train()
        runs[name] = (sae.params, [h["l0"] for h in t.history if "l0" in h])
    assert spy.calls[("dense", "step")] > 0 and spy.calls[("sparse", "step")] > 0, spy.calls
    (want, l0_want), (got, l0_got) = runs["numpy"], runs[be.name]
    assert l0_want[0] >= 0.4 * 64 and l0_want[-1] < 0.02 * 64, l0_want
    assert np.allclose(l0_got, l0_want, atol=1.0 / 128 + 1e-9), (l0_got, l0_want)
    for name in SAEParams.NAMES:
        g, w = f64(getattr(got, name)), f64(getattr(want, name))
        assert np.all(np.isfinite(g)), name
        assert np.max(np.abs(g - w)) <= 1e-4 * max(np.max(np.abs(w)), 1e-2), name
