"""The CUDA backend's JumpReLU training beyond tests/test_jumprelu.py:
gradients and multi-step training against the float64 reference on tiny
shapes (one row, one feature, odd sizes, nothing active, everything
active, entries planted in the window and on either side of it), empty
candidate sets, bit-for-bit determinism and device-in / device-out, the
"finite or loud" rule, and PTX compilation of the new kernels. The sparsity
modes (``JumpReLUSparsity``: "tanh", "quadratic", the pre-activation loss;
the shared oracle comparison is tests/test_jumprelu_sparsity.py): both paths
against the reference for SAEs and (skip) transcoders, exact window edges,
no candidates / everything active, several steps, device dead masks and
determinism, infinite and zero thresholds, and that every default
configuration launches only the original kernels, bitwise as
``sparsity=None``.

Runs under the CUDA simulator or on a GPU. Without either, the one test
:func:`test_under_simulator` reruns this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (the simulator must be switched on before numba
is imported), as tests/test_cuda_sim.py does for the older CUDA files.

Tolerances. The oracle is the reference in float64 on the same float32
inputs. A float32 sum of ``K`` terms in any order is within ``K u sum|terms|``
of the exact one (``u = 2**-24``); each gradient below is such a sum of
products of sums (depth at most ``d_in + N + d_sae``), so it is compared
with ``8 (K + 4) u max|g|`` for ``K`` the total reduction length, as
tests/test_cuda_backend.py does. Window and activation membership is only
comparable away from the edges: the random problems are checked to keep
every pre-activation farther than its float32 error bound from ``theta``,
``lo`` and ``hi`` (asserted, so a seed that breaks it fails loudly rather
than being flaky), and the exact problems use pre-activations that are
multiples of 1/8 (exact in float32) with edges off that grid.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import config, cuda

SIM = bool(config.ENABLE_CUDASIM)
HAVE_CUDA = SIM or cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(HAVE_CUDA, reason="runs the file directly (simulator or GPU present)")
def test_under_simulator():
    """This file's tests under the CUDA simulator, in a subprocess."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTSAE_TEST_BACKENDS="cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    runner = ("import sys; sys.setswitchinterval(5e-5); import pytest; "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", runner, str(Path(__file__))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-40:])
    print(tail)
    assert proc.returncode == 0, f"simulated CUDA JumpReLU tests failed:\n{tail}"
    assert " passed" in out, tail


if HAVE_CUDA:
    from fastsae import AdamState, SAEParams  # noqa: E402
    from fastsae import reference as R  # noqa: E402

    from conftest import U32, f64, make_params, make_x  # noqa: E402
    # the CUDA contract tests' fixtures: the simulator's switch interval, the backend
    from test_cuda_backend import _fast_simulator_switches, be  # noqa: E402, F401

    if SIM:
        from test_cuda_backend import _lock_simulator_shared_arrays

        _lock_simulator_shared_arrays()

@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Force the step's sparse backward or its dense (GEMM) path."""
    from fastsae.backends import tunables as TU

    monkeypatch.setattr(TU, "CUDA_JUMPRELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else -1.0)
    return request.param


needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU or the simulator "
                                                      "(see test_under_simulator)")

# (N, d_in, d_sae): one row, one feature, odd sizes crossing the simulator's
# 8-thread blocks and 8x8 GEMM tiles; bigger ones on a real GPU
SHAPES = [(1, 1, 1), (1, 3, 7), (7, 5, 1), (13, 9, 17), (20, 8, 33)]
if HAVE_CUDA and not SIM:
    SHAPES += [(130, 70, 260), (300, 129, 515)]

BW = 0.25  # bandwidth of the random problems: a good share of entries in the window


def _problem(shape, sparsity, seed):
    """Random problem whose pre-activations are clear of the window's edges
    (see the module docstring); returns ``(x, params, log_threshold)``."""
    n, d_in, d_sae = shape
    for attempt in range(200):
        rng = np.random.default_rng(seed * 1000 + attempt)
        p = make_params(rng, d_in, d_sae, sparsity)
        if sparsity == "mixed":
            p.b_enc += 0.4
        R.normalize_decoder_rows(p.W_dec)
        x = make_x(rng, n, d_in)
        lt = np.log(rng.uniform(0.05, 0.6, d_sae)).astype(np.float32)
        if _clear(x, p, lt, BW):
            return x, p, lt
    raise AssertionError("no problem clear of the window edges")


def _clear(x, p, lt, bw):
    pre = (f64(x) - f64(p.b_dec)) @ f64(p.W_enc) + f64(p.b_enc)
    bound = 4 * (x.shape[1] + 4) * U32 * (
        (np.abs(f64(x)) + np.abs(f64(p.b_dec))) @ np.abs(f64(p.W_enc)) + np.abs(f64(p.b_enc)))
    theta, lo, hi = (f64(a) for a in R.jumprelu_window(lt, bw))
    return all(np.all(np.abs(pre - e) > bound + 4 * U32 * np.abs(e)) for e in (theta, lo, hi))


def _exact_problem(n, d_sae, seed, d_in=3):
    """Pre-activations = small multiples of 1/8 (exact in float32); x
    one-hot, thresholds at 3/16 + multiples of 1/8 and bandwidth 5/32, so
    every edge (theta, theta -+ 5/64) lies strictly between grid points and
    each of "below the window", "in it below theta", "in it above theta"
    and "above it" occurs."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d_in), np.float32)
    x[np.arange(n), rng.integers(0, d_in, n)] = 1.0
    W_enc = (rng.integers(-4, 6, (d_in, d_sae)) / 8).astype(np.float32)
    b_enc = (rng.integers(-1, 3, d_sae) / 8).astype(np.float32)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    R.normalize_decoder_rows(W_dec)
    p = SAEParams(W_enc, b_enc, W_dec, np.zeros(d_in, np.float32))
    theta = 3 / 16 + rng.integers(0, 3, d_sae) / 8
    return x, p, np.log(theta).astype(np.float32), 5 / 32


def _p64(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


def _tol(want, k):
    return 8 * (k + 4) * U32 * max(float(np.max(np.abs(want), initial=0.0)), 1e-30)


def _check_gradients(be, x, p, lt, bw, l0c):
    n, d_in = x.shape
    d_sae = p.d_sae
    loss, g, g_lt = be.jumprelu_gradients(x, p, lt, bw, l0c)
    rl, rg, rlt = R.jumprelu_gradients(f64(x), _p64(p), f64(lt), bw, l0c)
    k = d_in + n + d_sae + 4
    assert loss.mse == pytest.approx(rl.mse, rel=(k + 4) * 8 * U32, abs=1e-12)
    assert loss.l0_loss == pytest.approx(rl.l0_loss, rel=1e-12, abs=0)
    assert loss.total == pytest.approx(rl.total, rel=(k + 4) * 8 * U32, abs=1e-12)
    assert loss.l1 == 0.0 and loss.aux == 0.0
    for name in SAEParams.NAMES:
        got, want = f64(getattr(g, name)), getattr(rg, name)
        assert got.shape == want.shape and getattr(g, name).dtype == np.float32
        assert np.max(np.abs(got - want), initial=0.0) <= _tol(want, k), name
    assert g_lt.dtype == np.float32 and g_lt.shape == (d_sae,)
    # the L0 term's part of g_lt is (count / N) * l0c * theta / bw: scale the tolerance on it
    scale = max(float(np.max(np.abs(rlt), initial=0.0)), l0c * float(np.exp(lt.max())) / bw)
    assert np.max(np.abs(f64(g_lt) - rlt), initial=0.0) <= 8 * (k + 4) * U32 * scale
    return loss, g, g_lt


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", ["mixed", "none", "all"])
def test_gradients_vs_float64_reference(be, path, shape, sparsity):
    x, p, lt = _problem(shape, sparsity, seed=shape[0] + 3 * shape[2])
    _check_gradients(be, x, p, lt, BW, 0.3)


@needs_cuda
@pytest.mark.parametrize("n,d_sae", [(1, 1), (1, 7), (9, 13), (17, 11)])
def test_gradients_window_edges_exact(be, path, n, d_sae):
    """Entries below, inside (both sides of theta) and above the window, no
    rounding in the pre-activations: window membership must be exact."""
    x, p, lt, bw = _exact_problem(n, d_sae, seed=7 * n + d_sae)
    _check_gradients(be, x, p, lt, bw, 0.5)
    _check_gradients(be, x, p, lt, bw, 0.0)


@needs_cuda
def test_no_candidates_and_all_window(be, path):
    """No entry above ``lo`` (nothing stored at all) gives zero gradients
    and a zero g_lt; every entry inside the window below theta gives only
    the threshold's gradient."""
    x, p, lt, bw = _exact_problem(6, 5, seed=1)
    far = np.full(p.d_sae, np.log(100.0), np.float32)
    loss, g, g_lt = be.jumprelu_gradients(x, p, far, bw, 0.5)
    assert loss.l0_loss == 0.0 and not np.any(g_lt)
    assert not np.any(g.W_enc) and not np.any(g.b_enc) and not np.any(g.W_dec)
    q = SAEParams(np.zeros_like(p.W_enc), np.full(p.d_sae, 0.5, np.float32), p.W_dec, p.b_dec)
    lt = np.full(p.d_sae, np.log(0.52), np.float32)  # theta 0.52, window (0.42, 0.62)
    _check_gradients(be, x, q, lt, 0.2, 0.5)
    loss, g, g_lt = be.jumprelu_gradients(x, q, lt, 0.2, 0.5)
    assert loss.l0_loss == 0.0 and np.all(g_lt < 0) and not np.any(g.W_enc)


@needs_cuda
@pytest.mark.parametrize("shape,sparsity", [((13, 9, 17), "mixed"), ((20, 8, 33), "mixed"),
                                            ((1, 3, 7), "mixed"), ((7, 5, 1), "all"),
                                            ((6, 3, 5), "none")])
def test_train_steps_vs_float64_reference(be, path, shape, sparsity):
    """Three steps (the four parameters, log_threshold and both pairs of
    moments, fire counts, Adam's step, the StepResult) against the float64
    reference. Adam divides by sqrt(v) + eps, so eps is large enough here
    (1e-3) that float32 rounding of tiny gradients cannot flip an update."""
    x, p, lt = _problem(shape, sparsity, seed=5 + shape[2])
    kw = dict(bandwidth=BW, l0_coefficient=0.2, lr=1e-3, eps=1e-3)
    p64, lt64 = _p64(p), f64(lt)
    s64 = AdamState(SAEParams(*(np.zeros_like(a) for a in p64.arrays())),
                    SAEParams(*(np.zeros_like(a) for a in p64.arrays())), 0)
    tm64, tv64 = np.zeros_like(lt64), np.zeros_like(lt64)
    hp, hs, hlt = p.copy(), AdamState.zeros_like(p), lt.copy()
    tm, tv = np.zeros_like(lt), np.zeros_like(lt)
    c_ref = np.zeros(p.d_sae, np.int64)
    c_got = np.zeros(p.d_sae, np.int64)
    for step in range(3):
        assert _clear(x, hp, hlt, BW), "the trained problem drifted onto a window edge"
        ref = R.train_step_jumprelu(p64, s64, f64(x), log_threshold=lt64, threshold_m=tm64,
                                    threshold_v=tv64, fire_counts=c_ref, **kw)
        got = be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=tm,
                                     threshold_v=tv, fire_counts=c_got, **kw)
        for part in ("mse", "total", "l0", "explained_variance"):
            assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                       abs=1e-6), (step, part)
        assert got.extra["l0_loss"] == pytest.approx(ref.extra["l0_loss"], rel=1e-12)
        assert got.l1 == 0.0 and got.aux == 0.0
    for name in SAEParams.NAMES:
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    for got_a, want in ((hlt, lt64), (tm, tm64), (tv, tv64)):
        assert np.max(np.abs(f64(got_a) - want)) <= 1e-5 + 1e-5 * np.max(np.abs(want))
    for part in ("m", "v"):
        for name in SAEParams.NAMES:
            want = getattr(getattr(s64, part), name)
            got_a = f64(getattr(getattr(hs, part), name))
            assert np.max(np.abs(got_a - want)) <= 1e-5 * (1 + np.max(np.abs(want))), (part,
                                                                                     name)
    assert np.array_equal(c_got, c_ref)
    assert hs.step == 3
    norms = np.linalg.norm(f64(hp.W_dec), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-6)


@needs_cuda
def test_train_step_deterministic_and_device_resident(be, path):
    """Two identical runs on device arrays agree bit for bit, stay on the
    device, and agree bit for bit with a run on host arrays."""
    x, p, lt = _problem((13, 9, 17), "mixed", seed=2)
    kw = dict(bandwidth=BW, l0_coefficient=0.1, lr=1e-3)
    outs = []
    for _ in range(2):
        bp = be.to_backend(p.copy())
        bs = be.to_backend(AdamState.zeros_like(p))
        blt, btm, btv = (be.to_backend(a) for a in (lt.copy(), np.zeros_like(lt),
                                                    np.zeros_like(lt)))
        fc = be.to_backend(np.zeros(p.d_sae, np.int64))
        res = [be.train_step_jumprelu(bp, bs, be.to_backend(x), log_threshold=blt,
                                      threshold_m=btm, threshold_v=btv, fire_counts=fc, **kw)
               for _ in range(2)]
        dev = list(bp.arrays()) + [blt, btm, btv, fc]
        assert all(hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
                   for a in dev)
        outs.append((res, [be.to_numpy(a) for a in dev]))
    hp, hs, hlt = p.copy(), AdamState.zeros_like(p), lt.copy()
    htm, htv = np.zeros_like(lt), np.zeros_like(lt)
    hfc = np.zeros(p.d_sae, np.int64)
    hres = [be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=htm,
                                   threshold_v=htv, fire_counts=hfc, **kw) for _ in range(2)]
    (r1, a1), (r2, a2) = outs
    key = [(r.mse, r.l0, r.extra["l0_loss"], r.explained_variance) for r in r1]
    assert key == [(r.mse, r.l0, r.extra["l0_loss"], r.explained_variance) for r in r2]
    assert key == [(r.mse, r.l0, r.extra["l0_loss"], r.explained_variance) for r in hres]
    host = list(hp.arrays()) + [hlt, htm, htv, hfc]
    for a, b, c in zip(a1, a2, host):
        assert np.array_equal(a, b) and np.array_equal(a, c)


@needs_cuda
def test_dense_switch(be, monkeypatch):
    """The dense path is taken above CUDA_JUMPRELU_DENSE_MIN_DENSITY
    candidates per entry, the sparse one below; both give the same
    results within float32 rounding."""
    from fastsae.backends import tunables as TU
    from fastsae.backends.cuda import jumprelu as J

    calls = []
    real = J._jump_dense
    monkeypatch.setattr(J, "_jump_dense", lambda *a: calls.append(1) or real(*a))
    x, p, lt = _problem((13, 9, 17), "mixed", seed=3)
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    density = float(np.mean(pre > R.jumprelu_window(lt, BW)[1]))
    assert 0.1 < density < 0.9
    out = {}
    for limit, dense in ((density + 0.05, False), (density - 0.05, True)):
        monkeypatch.setattr(TU, "CUDA_JUMPRELU_DENSE_MIN_DENSITY", limit)
        calls.clear()
        out[dense] = be.jumprelu_gradients(x, p, lt, BW, 0.2)
        assert len(calls) == int(dense)
    (ls, gs, lts), (ld, gd, ltd) = out[False], out[True]
    assert ls.l0_loss == ld.l0_loss and ls.mse == pytest.approx(ld.mse, rel=1e-5)
    assert np.allclose(lts, ltd, rtol=1e-5, atol=1e-6)
    for a, b in zip(gs.arrays(), gd.arrays()):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_gradients_device_in_device_out(be):
    x, p, lt = _problem((7, 5, 9), "mixed", seed=4)
    loss_h, g_h, glt_h = be.jumprelu_gradients(x, p, lt, BW, 0.2)
    assert isinstance(glt_h, np.ndarray) and all(isinstance(a, np.ndarray) for a in g_h.arrays())
    loss_d, g_d, glt_d = be.jumprelu_gradients(be.to_backend(x), be.to_backend(p),
                                               be.to_backend(lt), BW, 0.2)
    assert not isinstance(glt_d, np.ndarray) and hasattr(glt_d, "__cuda_array_interface__")
    assert loss_d == loss_h
    assert np.array_equal(be.to_numpy(glt_d), glt_h)
    for a, b in zip(be.to_numpy(g_d).arrays(), g_h.arrays()):
        assert np.array_equal(a, b)


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars
def test_non_finite_threshold_is_loud(be, path):
    """A threshold that overflows float32 (log_threshold 1000: theta = inf,
    its gradient -(inf / bw) * 0 = NaN, as in the reference) leaves a NaN
    log_threshold: the step reports NaN losses; the next healthy step is
    finite again (the flag is reset every step)."""
    x, p, lt = _problem((7, 5, 9), "mixed", seed=6)
    bad = lt.copy()
    bad[3] = 1000.0
    kw = dict(bandwidth=BW, l0_coefficient=0.1, lr=1e-3)

    def step(impl, lt0):
        lt1 = lt0.copy()
        res = impl.train_step_jumprelu(p.copy(), AdamState.zeros_like(p), x, log_threshold=lt1,
                                       threshold_m=np.zeros_like(lt), threshold_v=np.zeros_like(lt),
                                       **kw)
        return res, lt1

    with np.errstate(over="ignore", invalid="ignore"):
        ref, ref_lt = step(R, bad)
        got, got_lt = step(be, bad)
    assert np.isnan(ref.mse) and np.isnan(got.mse) and np.isnan(got.total)
    assert np.array_equal(np.isnan(got_lt), np.isnan(ref_lt)) and np.isnan(got_lt[3])
    ok, _ = step(be, lt)
    assert np.isfinite(ok.mse) and np.isfinite(ok.total)


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars
def test_huge_and_tiny_thresholds(be, path):
    """theta = exp(log_threshold) overflowing to inf (no candidate, g NaN
    as in the reference) or underflowing to 0 (every positive entry active,
    window (-bw/2, bw/2)): gradients still match the reference."""
    x, p, lt = _problem((7, 5, 9), "mixed", seed=8)
    lt = lt.copy()
    lt[0], lt[1], lt[2] = 95.0, -200.0, -1e30
    with np.errstate(over="ignore", invalid="ignore"):
        loss, g, g_lt = be.jumprelu_gradients(x, p, lt, BW, 0.2)
        rl, rg, rlt = R.jumprelu_gradients(x, p, lt, BW, 0.2)
    assert loss.l0_loss == rl.l0_loss
    assert np.array_equal(np.isnan(g_lt), np.isnan(rlt)) and np.isnan(g_lt[0])
    ok = ~np.isnan(rlt)
    assert np.allclose(g_lt[ok], rlt[ok], rtol=1e-5, atol=1e-6)
    for name in SAEParams.NAMES:
        assert np.allclose(getattr(g, name), getattr(rg, name), rtol=1e-5, atol=1e-6), name


# ------------------------------------------------------------ sparsity modes
# The shared oracle comparison of every backend is tests/test_jumprelu_sparsity.py;
# here: both CUDA paths on shapes crossing the simulator's blocks, SAE and
# (skip) transcoder, the default's kernels, determinism and device masks.
if HAVE_CUDA:
    from fastsae import JumpReLUSparsity  # noqa: E402

#: name -> (sparsity, dead features as a fraction: None = no mask)
MODES = {
    "tanh": (dict(mode="tanh", tanh_scale=3.0), None),
    "tanh-steep": (dict(mode="tanh", tanh_scale=30.0), None),
    "quad-low": (dict(mode="quadratic", target_l0=1.0), None),
    "quad-high": (dict(mode="quadratic", target_l0=6.0), None),
    "step+pre": (dict(pre_act_coefficient=0.7), 0.3),
    "tanh+pre": (dict(mode="tanh", tanh_scale=4.0, pre_act_coefficient=0.5), 0.3),
    "quad+pre-all": (dict(mode="quadratic", target_l0=2.0, pre_act_coefficient=0.3), 1.0),
}


def _mode_args(name, d_sae, seed=0):
    """``(JumpReLUSparsity, dead_mask)`` of MODES[name] (at least one dead
    feature when a fraction is given)."""
    kw, frac = MODES[name]
    dead = None
    if frac is not None:
        rng = np.random.default_rng(seed)
        dead = rng.random(d_sae) < frac
        dead[rng.integers(0, d_sae)] = True
    return JumpReLUSparsity(**kw), dead


def _tc_problem(shape, d_out, skip, seed):
    """A transcoder problem clear of the window edges: ``(x, params, lt, y)``
    (``W_skip`` when ``skip``); the encoder reads ``x`` uncentred."""
    n, d_in, d_sae = shape
    for attempt in range(200):
        rng = np.random.default_rng(seed * 1000 + attempt)
        p = make_params(rng, d_in, d_sae, "mixed")
        W_dec = (rng.normal(size=(d_sae, d_out)) / np.sqrt(d_out)).astype(np.float32)
        R.normalize_decoder_rows(W_dec)
        W_skip = (rng.normal(size=(d_out, d_in)) * 0.1).astype(np.float32) if skip else None
        q = SAEParams(p.W_enc, p.b_enc, W_dec,
                      (rng.normal(size=d_out) * 0.1).astype(np.float32), W_skip)
        x = make_x(rng, n, d_in)
        y = make_x(rng, n, d_out)
        lt = np.log(rng.uniform(0.05, 0.6, d_sae)).astype(np.float32)
        zero = SAEParams(p.W_enc, p.b_enc, p.W_dec, np.zeros(d_in, np.float32))
        if _clear(x, zero, lt, BW):
            return x, q, lt, y
    raise AssertionError("no problem clear of the window edges")


def _check_modes(be, x, p, lt, bw, l0c, sp, dead, y=None):
    """The backend's gradients in a sparsity mode against the float64
    reference, with _check_gradients' normwise tolerances plus the size of
    each mode's own terms in g_lt (the Step term's magnitude in "step"/
    "quadratic", the tanh terms' window sum, the pre-activation loss's
    count); ``l0_loss`` and ``aux`` to a few hundred roundings of their
    magnitudes (the sets are exact: the problems are clear of the edges)."""
    n, d_in = x.shape
    d_sae = p.d_sae
    loss, g, g_lt = be.jumprelu_gradients(x, p, lt, bw, l0c, sparsity=sp, dead_mask=dead, y=y)
    y64 = None if y is None else f64(y)
    rl, rg, rlt = R.jumprelu_gradients(f64(x), _p64(p), f64(lt), bw, l0c, sp, dead, y64)
    k = d_in + n + d_sae + p.W_dec.shape[1] + 4
    c = 8 * (k + 4) * U32
    assert loss.mse == pytest.approx(rl.mse, rel=c, abs=1e-12)
    assert loss.l1 == 0.0
    theta = float(np.exp(np.float64(lt.max())))
    xin = f64(x) - (0 if y is not None else f64(p.b_dec))
    pre = xin @ f64(p.W_enc) + f64(p.b_enc)
    pm = np.abs(xin) @ np.abs(f64(p.W_enc)) + np.abs(f64(p.b_enc))
    if sp.mode == "tanh":
        tol_l0 = l0c / n * (2 * sp.tanh_scale * c * pm.sum() + c * pre.size)
        assert abs(loss.l0_loss - rl.l0_loss) <= tol_l0
        extra = theta * theta / bw * l0c * sp.tanh_scale
    elif sp.mode == "quadratic":
        assert loss.l0_loss == pytest.approx(rl.l0_loss, rel=1e-12, abs=0)
        extra = theta / bw * 4 * l0c * (d_sae + sp.target_l0) / sp.target_l0
    else:
        assert loss.l0_loss == pytest.approx(rl.l0_loss, rel=1e-12, abs=0)
        extra = theta * l0c / bw
    if sp.pre_act_coefficient and dead is not None and dead.any():
        below = dead[None, :] & (pre < np.exp(f64(lt))[None, :])
        mag = np.sum(below * (np.exp(f64(lt))[None, :] + pm))
        assert abs(loss.aux - rl.aux) <= c * sp.pre_act_coefficient / n * mag + 1e-300
        extra += theta * sp.pre_act_coefficient
    else:
        assert loss.aux == 0.0 and rl.aux == 0.0
    assert loss.total == pytest.approx(rl.total, rel=c, abs=1e-9)
    for name in p.names:
        got, want = f64(getattr(g, name)), getattr(rg, name)
        assert got.shape == want.shape and getattr(g, name).dtype == np.float32
        assert np.max(np.abs(got - want), initial=0.0) <= _tol(want, k), name
    scale = max(float(np.max(np.abs(rlt), initial=0.0)), extra)
    assert np.max(np.abs(f64(g_lt) - rlt), initial=0.0) <= c * scale
    return loss, g, g_lt


MODE_SHAPES = [(1, 3, 7), (20, 8, 33)]  # (13, 9, 17): the other mode tests' shape


@needs_cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", MODE_SHAPES)
def test_modes_gradients_vs_float64_reference(be, path, shape, mode):
    x, p, lt = _problem(shape, "mixed", seed=11 + shape[2])
    sp, dead = _mode_args(mode, p.d_sae, seed=shape[2])
    _check_modes(be, x, p, lt, BW, 0.3, sp, dead)


@needs_cuda
@pytest.mark.parametrize("mode", ["tanh+pre", "quad-high", "step+pre"])
@pytest.mark.parametrize("skip", [False, True])
def test_modes_transcoder_vs_float64_reference(be, path, mode, skip):
    x, p, lt, y = _tc_problem((13, 5, 17), 7, skip, seed=3 + skip)
    sp, dead = _mode_args(mode, p.d_sae, seed=1)
    _check_modes(be, x, p, lt, BW, 0.3, sp, dead, y)


@needs_cuda
@pytest.mark.parametrize("mode", ["tanh+pre", "quad+pre-all", "quad-low"])
def test_modes_window_edges_exact(be, path, mode):
    """The exact problems (pre-activations on a 1/8 grid, edges off it):
    every entry kind occurs, the sets are exact."""
    x, p, lt, bw = _exact_problem(17, 11, seed=5)
    sp, dead = _mode_args(mode, p.d_sae, seed=2)
    _check_modes(be, x, p, lt, bw, 0.5, sp, dead)


@needs_cuda
def test_modes_extremes(be, path):
    """No candidate at all (every dead entry below its threshold: the
    pre-activation loss on an empty sparse set), everything active (tanh's
    and quadratic's terms on every entry), and dead features none of whose
    entries is below its threshold (aux exactly 0)."""
    x, p, lt, bw = _exact_problem(6, 5, seed=1)
    far = np.full(p.d_sae, np.log(100.0), np.float32)
    for name in ("step+pre", "quad+pre-all", "tanh+pre"):
        sp, dead = _mode_args(name, p.d_sae, seed=3)
        loss, g, g_lt = _check_modes(be, x, p, far, bw, 0.5, sp, dead)
        assert loss.aux > 0 and not np.any(g.W_dec)
    allp = SAEParams(p.W_enc, np.full(p.d_sae, 50.0, np.float32), p.W_dec, p.b_dec)
    for name in ("tanh", "quad-low", "tanh+pre"):
        sp, dead = _mode_args(name, p.d_sae, seed=4)
        loss, _, _ = _check_modes(be, x, allp, lt, bw, 0.5, sp, dead)
        assert loss.aux == 0.0  # nothing below a threshold


@needs_cuda
@pytest.mark.parametrize("mode", ["tanh+pre", "quad+pre-all"])
def test_modes_train_steps_vs_float64_reference(be, path, mode):
    """Three steps in a sparsity mode against the float64 reference (as
    test_train_steps_vs_float64_reference), aux and l0_loss included."""
    x, p, lt = _problem((13, 9, 17), "mixed", seed=21)
    sp, dead = _mode_args(mode, p.d_sae, seed=5)
    kw = dict(bandwidth=BW, l0_coefficient=0.2, lr=1e-3, eps=1e-3, sparsity=sp, dead_mask=dead)
    p64, lt64 = _p64(p), f64(lt)
    s64 = AdamState(SAEParams(*(np.zeros_like(a) for a in p64.arrays())),
                    SAEParams(*(np.zeros_like(a) for a in p64.arrays())), 0)
    tm64, tv64 = np.zeros_like(lt64), np.zeros_like(lt64)
    hp, hs, hlt = p.copy(), AdamState.zeros_like(p), lt.copy()
    tm, tv = np.zeros_like(lt), np.zeros_like(lt)
    c_ref = np.zeros(p.d_sae, np.int64)
    c_got = np.zeros(p.d_sae, np.int64)
    for step in range(3):
        assert _clear(x, hp, hlt, BW), "the trained problem drifted onto a window edge"
        ref = R.train_step_jumprelu(p64, s64, f64(x), log_threshold=lt64, threshold_m=tm64,
                                    threshold_v=tv64, fire_counts=c_ref, **kw)
        got = be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=tm,
                                     threshold_v=tv, fire_counts=c_got, **kw)
        for part in ("mse", "total", "l0", "explained_variance", "aux"):
            assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                       abs=1e-6), (step, part)
        assert got.extra["l0_loss"] == pytest.approx(ref.extra["l0_loss"], rel=1e-5)
        assert got.aux > 0
    for name in SAEParams.NAMES:
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    for got_a, want in ((hlt, lt64), (tm, tm64), (tv, tv64)):
        assert np.max(np.abs(f64(got_a) - want)) <= 1e-5 + 1e-5 * np.max(np.abs(want))
    assert np.array_equal(c_got, c_ref)


class _Forbidden:
    """Stands in for a kernel the default path must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, launch):
        raise AssertionError(f"the default JumpReLU launched {self.name}")


@needs_cuda
def test_default_sparsity_runs_the_original_kernels(be, path, monkeypatch):
    """``sparsity=None``, ``JumpReLUSparsity()``, a step mode whose
    pre-activation loss does not act (no mask, a mask without dead features,
    a mask with a zero coefficient) and one that ignores tanh_scale /
    target_l0 all give bitwise the same gradients and steps, none of them
    launching a sparsity mode's kernel."""
    from fastsae.backends.cuda import jumprelu as J

    x, p, lt = _problem((13, 9, 17), "mixed", seed=2)
    some = np.zeros(p.d_sae, bool)
    some[[1, 5]] = True
    base = be.jumprelu_gradients(x, p, lt, BW, 0.2)
    for name in ("tanh_adjust_kernel", "row_active_kernel", "quad_rows_kernel",
                 "theta_grad_mode_kernel", "dense_feature_mode_kernel", "preact_kernel",
                 "scatter_add_kernel"):
        monkeypatch.setattr(J, name, _Forbidden(name))
    variants = [(None, None), (JumpReLUSparsity(), None), (JumpReLUSparsity(), some),
                (JumpReLUSparsity(pre_act_coefficient=0.5), None),
                (JumpReLUSparsity(pre_act_coefficient=0.5), np.zeros(p.d_sae, bool)),
                (JumpReLUSparsity(tanh_scale=9.0, target_l0=3.0), some)]
    for sp, dead in variants:
        loss, g, g_lt = be.jumprelu_gradients(x, p, lt, BW, 0.2, sparsity=sp, dead_mask=dead)
        assert loss == base[0]
        assert np.array_equal(g_lt, base[2])
        for a, b in zip(g.arrays(), base[1].arrays()):
            assert np.array_equal(a, b)
    kw = dict(bandwidth=BW, l0_coefficient=0.1, lr=1e-3)
    outs = []
    for sp, dead in variants[:1] + variants[4:]:
        hp, hs, hlt = p.copy(), AdamState.zeros_like(p), lt.copy()
        tm, tv = np.zeros_like(lt), np.zeros_like(lt)
        res = be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=tm,
                                     threshold_v=tv, sparsity=sp, dead_mask=dead, **kw)
        outs.append((res, list(hp.arrays()) + [hlt, tm, tv]))
    (r0, a0), *rest = outs
    for r, a in rest:
        assert (r.mse, r.total, r.aux, r.l0, r.extra) == (r0.mse, r0.total, r0.aux, r0.l0,
                                                          r0.extra)
        assert all(np.array_equal(u, v) for u, v in zip(a, a0))


@needs_cuda
def test_modes_deterministic_device_mask_and_resident(be, path):
    """Two steps twice on device arrays with a device dead mask agree bit
    for bit with each other and with a run on host arrays and a host mask;
    everything stays on the device; the gradients too (device in, device
    out, equal to host in, host out). One mode per path (the simulator's
    time): tanh on the sparse one, quadratic on the dense one."""
    mode = {"sparse": "tanh+pre", "dense": "quad+pre-all"}[path]
    x, p, lt = _problem((13, 9, 17), "mixed", seed=4)
    sp, dead = _mode_args(mode, p.d_sae, seed=6)
    kw = dict(bandwidth=BW, l0_coefficient=0.1, lr=1e-3, sparsity=sp)
    outs = []
    for _ in range(2):
        bp = be.to_backend(p.copy())
        bs = be.to_backend(AdamState.zeros_like(p))
        blt, btm, btv = (be.to_backend(a) for a in (lt.copy(), np.zeros_like(lt),
                                                    np.zeros_like(lt)))
        dm = be.to_backend(dead)
        res = [be.train_step_jumprelu(bp, bs, be.to_backend(x), log_threshold=blt,
                                      threshold_m=btm, threshold_v=btv, dead_mask=dm, **kw)
               for _ in range(2)]
        dev = list(bp.arrays()) + [blt, btm, btv]
        assert all(hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
                   for a in dev)
        outs.append((res, [be.to_numpy(a) for a in dev]))
    hp, hs, hlt = p.copy(), AdamState.zeros_like(p), lt.copy()
    htm, htv = np.zeros_like(lt), np.zeros_like(lt)
    hres = [be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=htm,
                                   threshold_v=htv, dead_mask=dead, **kw) for _ in range(2)]
    (r1, a1), (r2, a2) = outs

    def key(rs):
        return [(r.mse, r.l0, r.aux, r.extra["l0_loss"], r.explained_variance) for r in rs]

    assert key(r1) == key(r2) == key(hres)
    for a, b, c in zip(a1, a2, list(hp.arrays()) + [hlt, htm, htv]):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    loss_h, g_h, glt_h = be.jumprelu_gradients(x, p, lt, BW, 0.2, sparsity=sp, dead_mask=dead)
    loss_d, g_d, glt_d = be.jumprelu_gradients(be.to_backend(x), be.to_backend(p),
                                               be.to_backend(lt), BW, 0.2, sparsity=sp,
                                               dead_mask=be.to_backend(dead))
    assert hasattr(glt_d, "__cuda_array_interface__") and not isinstance(glt_d, np.ndarray)
    assert loss_d == loss_h and np.array_equal(be.to_numpy(glt_d), glt_h)
    for a, b in zip(be.to_numpy(g_d).arrays(), g_h.arrays()):
        assert np.array_equal(a, b)


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars
def test_modes_huge_and_tiny_thresholds(be, path):
    """test_huge_and_tiny_thresholds in the sparsity modes: theta = inf
    (NaN threshold gradient as in the reference; a dead one is below it
    everywhere, an infinite aux) or 0."""
    x, p, lt = _problem((7, 5, 9), "mixed", seed=8)
    lt = lt.copy()
    lt[0], lt[1], lt[2] = 95.0, -200.0, -1e30
    for name in ("tanh+pre", "quad-high", "step+pre"):
        sp, dead = _mode_args(name, p.d_sae, seed=7)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, g, g_lt = be.jumprelu_gradients(x, p, lt, BW, 0.2, sparsity=sp,
                                                  dead_mask=dead)
            rl, rg, rlt = R.jumprelu_gradients(x, p, lt, BW, 0.2, sp, dead)
        assert loss.l0_loss == pytest.approx(rl.l0_loss, rel=1e-5)
        assert loss.aux == pytest.approx(rl.aux, rel=1e-5)
        assert np.array_equal(np.isnan(g_lt), np.isnan(rlt)) and np.isnan(g_lt[0])
        ok = ~np.isnan(rlt)
        assert np.allclose(g_lt[ok], rlt[ok], rtol=1e-5, atol=1e-6)
        for gname in SAEParams.NAMES:
            a, b = getattr(g, gname), getattr(rg, gname)
            assert np.array_equal(np.isnan(a), np.isnan(b)), (name, gname)
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), (name, gname)


def test_jumprelu_kernels_compile_for_a_real_gpu(monkeypatch):
    """PTX for sm_90 of every kernel of cuda/jumprelu.py (typing errors the
    simulator cannot see), when NVVM is installed; skipped otherwise."""
    if SIM:
        pytest.skip("the simulator does not compile kernels")
    if cuda.is_available():
        pytest.skip("a GPU is present: the tests above compile and run the kernels")
    from numba.cuda.cudadrv import nvvm

    try:
        nvvm.NVVM()
        probe = cuda.jit(lambda a: None)
        cuda.compile_ptx(probe.py_func, (cuda.float32[::1],), cc=(9, 0))
    except Exception as exc:  # no NVVM / libdevice / NVRTC on this machine
        pytest.skip(f"CUDA toolkit compiler libraries not found: {type(exc).__name__}")
    import types

    import numba.cuda.dispatcher as dispatcher
    from numba import types as T
    from numba.cuda.dispatcher import CUDADispatcher

    from fastsae.backends.cuda import jumprelu as J

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    f2, f1, d1 = T.float32[:, ::1], T.float32[::1], T.float64[::1]
    i64, i32, f = T.int64[::1], T.int32[::1], T.float32
    sigs = [(J.window_kernel, (f1, f, f1, f1, f1)),
            (J.candidate_count_kernel, (f2, f1, i32)),
            (J.candidate_compact_kernel, (f2, f1, f1, i64, i32, f1, f1)),
            (J.jump_dpre_kernel, (i64, i32, f1, f2, f2, f1, f1)),
            (J.theta_grad_kernel, (i64, i64, f1, f1, f1, f1, f1, f, f, f1, i64)),
            (J.dense_feature_kernel, (f2, f2, f1, f1, f1, f, f, f1, f1, i64)),
            (J.sub_rows_kernel, (f2, f1, f2)), (J.project_rows_kernel, (f2, f2)),
            # the sparsity modes' kernels
            (J.tanh_adjust_kernel, (f1, f1, f1, f, f)),
            (J.row_active_kernel, (i64, f1, i32)),
            (J.quad_rows_kernel, (i32, T.float64, T.float64, T.float64, d1, d1)),
            (J.theta_grad_mode_kernel, (i64, i64, i32, f1, f1, f1, f1, f1, f, f, T.float64,
                                        T.int64, f, d1, d1, T.boolean, f1, i64, d1)),
            (J.dense_feature_mode_kernel, (f2, f2, f1, f1, f1, f, f, T.float64, T.int64, f, f,
                                           d1, d1, T.boolean, f1, f1, i64, d1)),
            (J.preact_kernel, (f2, i32, f1, f, f2, f1, d1, d1)),
            (J.scatter_add_kernel, (f2, i32, f2, T.boolean))]
    from fastsae.backends.cuda import common as K
    from fastsae.backends.cuda import encode as E
    sigs.append((K.sum_kernel, (i64, d1, T.int64)))  # the active counts' sum
    sigs.append((K.sum_kernel, (d1, d1, T.int64)))  # the modes' float64 loss sums
    sigs.append((E.count_rows_kernel, (f2, i32)))  # "quadratic"'s dense row counts
    kernels = {name for name, obj in vars(J).items()
               if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
               and obj.py_func.__module__ == J.__name__}
    assert kernels == {k.py_func.__name__ for k, _ in sigs[:-3]}
    for kernel, sig in sigs:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert ".entry" in ptx, kernel.py_func.__name__
