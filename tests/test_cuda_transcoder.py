"""The CUDA backend's transcoders and skip transcoders (``y`` given) against
the float64 oracle: every gradient function (ReLU in both decoder-norm
modes, TopK with and without AuxK, JumpReLU on its sparse and dense paths,
Matryoshka with AuxK) and three consecutive steps of every training
function (ReLU, TopK, BatchTopK + AuxK, JumpReLU on both paths, Matryoshka
+ AuxK: parameters, moments with ``W_skip``'s, fire counts, the
StepResult), with and without ``W_skip``, ``d_out`` below, above and equal
to ``d_in`` and ``d_out == 1``, one row, one feature, no active feature and
all active; device-in / device-out and bit-for-bit determinism; a
non-finite ``W_skip`` after the update makes the losses NaN. ``y = None``
is covered by the other tests/test_cuda_*.py files (unchanged).

Runs under the CUDA simulator or on a GPU. Without either, the one test
:func:`test_under_simulator` reruns this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (as tests/test_cuda_matryoshka.py does). Shapes
are tiny: the simulator runs every GPU thread as a Python thread, and its
8-thread blocks and 8x8 GEMM tiles are still crossed by these sizes'
ragged edges.

Inputs are chosen so that every selection (ReLU, TopK, BatchTopK, AuxK,
the JumpReLU window) is exact in float32: ``x`` in {-1, 0, 1}, ``W_enc`` and
``b_enc`` multiples of 1/8 with a distinct multiple of 2**-12 per feature
(ties broken), JumpReLU thresholds at 3/16 + multiples of 1/8 with
bandwidth 5/32, so no pre-activation is near an edge. Tolerances as
tests/test_cuda_matryoshka.py: a float32 reduction chain of ``K`` terms is
within ``K u sum|terms|`` (``u = 2**-24``); gradients are compared with
``8 (K + 4) u`` times the largest magnitude of the oracle's array (or of
its terms, for ``W_dec`` and ``W_skip``), ``K = d_in + d_out + N + d_sae +
L``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# the simulator's flags and marker, and the CUDA tests' fixtures (the
# simulator's switch interval and locked shared arrays, the backend, the
# JumpReLU path switch) as tests/test_cuda_jumprelu.py sets them up
from test_cuda_jumprelu import HAVE_CUDA, needs_cuda

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(HAVE_CUDA, reason="runs the file directly (simulator or GPU present)")
def test_under_simulator():
    """This file's tests under the CUDA simulator, in a subprocess."""
    from test_cuda_sim import _RUNNER, SIM_TIMEOUT_S

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTSAE_TEST_BACKENDS="cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(Path(__file__))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=SIM_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-40:])
    print(tail)
    assert proc.returncode == 0 and " passed" in out, f"simulated CUDA tests failed:\n{tail}"


if HAVE_CUDA:
    from fastsae import AdamState, SAEParams  # noqa: E402
    from fastsae import reference as R  # noqa: E402

    from conftest import U32, f64  # noqa: E402
    from test_cuda_jumprelu import _fast_simulator_switches, be, path  # noqa: E402, F401
    from test_jumprelu import _zero_state64  # noqa: E402

K_AUX = 2
AUX_COEF = 1 / 8
BW = 5 / 32  # JumpReLU bandwidth: the window's edges lie between the grid points

# (N, d_in, d_out, d_sae): d_out below, above and equal to d_in, d_out == 1
# with one row and one feature
CASES = [(4, 5, 3, 7), (3, 3, 6, 5), (3, 4, 4, 6), (1, 6, 1, 1)]
CASE_IDS = [f"{n}x{i}to{o}x{s}" for n, i, o, s in CASES]


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Force the JumpReLU step's sparse backward or its dense (GEMM) path."""
    from fastsae.backends import tunables as TU

    monkeypatch.setattr(TU, "CUDA_JUMPRELU_DENSE_MIN_DENSITY",
                        2.0 if request.param == "sparse" else -1.0)
    return request.param


def _problem(n, d_in, d_out, d_sae, skip, seed, bias=0.0):
    """``(x, y, params, log_threshold)`` with exact pre-activations (see the
    module docstring); ``W_skip`` when ``skip``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (n, d_in)).astype(np.float32)
    W_enc = (rng.integers(-4, 6, (d_in, d_sae)) / 8).astype(np.float32)
    b_enc = (bias + rng.integers(-1, 3, d_sae) / 8
             + rng.permutation(d_sae) / 4096).astype(np.float32)
    W_dec = rng.normal(size=(d_sae, d_out)).astype(np.float32)
    R.normalize_decoder_rows(W_dec)
    b_dec = (rng.normal(size=d_out) * 0.1).astype(np.float32)
    W_skip = ((rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)).astype(np.float32) if skip
              else None)
    y = rng.normal(size=(n, d_out)).astype(np.float32)
    lt = np.log(3 / 16 + rng.integers(0, 3, d_sae) / 8).astype(np.float32)
    return x, y, SAEParams(W_enc, b_enc, W_dec, b_dec, W_skip), lt


def _p64(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


def _aux(x, y, p, on):
    """AuxK codes and weight (every third latent dead), or ``(None, 0.0)``."""
    if not on:
        return None, 0.0
    dead = np.arange(p.d_sae) % 3 == 0
    return (R.encode_topk_aux(x, p.W_enc, p.b_enc, R.input_centering(p, y), dead, K_AUX),
            AUX_COEF * 0.7)


def _check(loss, grads, rl, rg, x, y, p, codes, k, levels=1,
           parts=("mse", "l1", "total", "aux")):
    """Losses and every gradient array (``W_skip``'s included) within the
    float32 bounds of the module docstring; ``codes`` (dense or sparse) the
    codes the gradients were taken at, ``levels`` the number of prefixes
    summed into ``dL/dy_hat``."""
    rel = 8 * (k + 4) * U32
    for part in parts:
        assert getattr(loss, part) == pytest.approx(getattr(rl, part), rel=rel, abs=1e-12), part
    assert grads.names == p.names
    # the terms' scale of the decoder-side sums (they may cancel): |D| <= 2 L max|r| / N
    f = codes.to_dense() if hasattr(codes, "to_dense") else codes
    r = float(np.max(np.abs(f64(R.reconstruct(f, p, x)) - f64(y))))
    terms = {"W_dec": 2 * levels * r * float(np.max(np.abs(f), initial=0.0)),
             "W_skip": 2 * levels * r * float(np.max(np.abs(x)))}
    for name in p.names:
        got, want = getattr(grads, name), getattr(rg, name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        scale = max(float(np.max(np.abs(want), initial=0.0)), terms.get(name, 0.0), 1e-30)
        assert np.max(np.abs(f64(got) - want), initial=0.0) <= rel * scale, name


def _jump_codes(x, p, lt):
    """The JumpReLU codes of the oracle (for the tolerance's scale)."""
    pre = R.pre_activations(x, p.W_enc, p.b_enc, np.zeros(p.d_in, np.float32))
    return np.where(pre > np.exp(lt), pre, 0)


# ---------------------------------------------------------------- gradients
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_gradients_vs_float64_oracle(be, case, skip):
    """gradients (both decoder-norm modes), topk_gradients (with and
    without AuxK) and matryoshka_gradients (with AuxK) on a transcoder."""
    n, d_in, d_out, d_sae = case
    x, y, p, _ = _problem(n, d_in, d_out, d_sae, skip, seed=n + 7 * d_sae + skip)
    p64, x64, y64 = _p64(p), f64(x), f64(y)
    k = d_in + d_out + n + d_sae + 4
    f = R.encode_relu(x, p.W_enc, p.b_enc, R.input_centering(p, y))
    x_hat = R.reconstruct(f, p, x)
    for mode in ("weighted_l1", "unit_norm"):
        loss, g = be.gradients(x, p, f, x_hat, 0.05, mode, y)
        rl, rg = R.gradients(x64, p64, f64(f), f64(x_hat), 0.05, mode, y64)
        _check(loss, g, rl, rg, x, y, p, f, k)
    codes = R.encode_topk(x, p.W_enc, p.b_enc, R.input_centering(p, y), min(2, d_sae))
    x_hat = R.reconstruct(codes, p, x)
    for auxk in (False, True):
        aux, w = _aux(x, y, p, auxk)
        loss, g = be.topk_gradients(x, p, codes, x_hat, aux, w, y)
        rl, rg = R.topk_gradients(x64, p64, codes, f64(x_hat), aux, w, y64)
        _check(loss, g, rl, rg, x, y, p, codes, k)
    widths = np.array(sorted({max(1, d_sae // 3), max(1, d_sae // 2), d_sae}), np.int64)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, R.input_centering(p, y), 2)
    aux, w = _aux(x, y, p, True)
    loss, g = be.matryoshka_gradients(x, p, codes, widths, aux, w, y)
    rl, rg = R.matryoshka_gradients(x64, p64, codes, widths, aux, w, y64)
    _check(loss, g, rl, rg, x, y, p, codes, k + len(widths), len(widths))
    for a, b in zip(loss.prefix_mse, rl.prefix_mse):
        assert a == pytest.approx(b, rel=8 * (k + 4) * U32, abs=1e-12)


@needs_cuda
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=CASE_IDS[:2] + CASE_IDS[3:])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_jumprelu_gradients_vs_float64_oracle(be, path, case, skip):
    n, d_in, d_out, d_sae = case
    x, y, p, lt = _problem(n, d_in, d_out, d_sae, skip, seed=3 * n + d_sae + skip)
    k = d_in + d_out + n + d_sae + 4
    loss, g, g_lt = be.jumprelu_gradients(x, p, lt, BW, 0.3, y=y)
    rl, rg, rlt = R.jumprelu_gradients(f64(x), _p64(p), f64(lt), BW, 0.3, y=f64(y))
    _check(loss, g, rl, rg, x, y, p, _jump_codes(x, p, lt), k, parts=("mse", "total"))
    assert loss.l0_loss == pytest.approx(rl.l0_loss, rel=1e-12, abs=0)
    scale = max(float(np.max(np.abs(rlt))), 0.3 * float(np.exp(lt.max())) / BW)
    assert np.max(np.abs(f64(g_lt) - rlt)) <= 8 * (k + 4) * U32 * scale


@needs_cuda
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_gradients_none_and_all_active(be, skip):
    """No active feature (only b_dec and W_skip learn; no code-side
    gradient) and every feature active, for the ReLU, TopK and JumpReLU
    gradients."""
    x, y, p, lt = _problem(4, 3, 5, 6, skip, seed=11)
    k = 3 + 5 + 4 + 6 + 4
    for b in (-50.0, 50.0):
        q = SAEParams(p.W_enc, np.full(6, b, np.float32), p.W_dec, p.b_dec, p.W_skip)
        q64 = _p64(q)
        f = R.encode_relu(x, q.W_enc, q.b_enc, R.input_centering(q, y))
        assert np.all(f > 0) if b > 0 else not np.any(f)
        x_hat = R.reconstruct(f, q, x)
        loss, g = be.gradients(x, q, f, x_hat, 0.05, "weighted_l1", y)
        rl, rg = R.gradients(f64(x), q64, f64(f), f64(x_hat), 0.05, "weighted_l1", f64(y))
        _check(loss, g, rl, rg, x, y, q, f, k)
        if b < 0:
            assert not np.any(g.W_enc) and not np.any(g.b_enc) and not np.any(g.W_dec)
        codes = R.encode_topk(x, q.W_enc, q.b_enc, R.input_centering(q, y), 6)
        x_hat = R.reconstruct(codes, q, x)
        loss, g = be.topk_gradients(x, q, codes, x_hat, None, 0.0, y)
        rl, rg = R.topk_gradients(f64(x), q64, codes, f64(x_hat), None, 0.0, f64(y))
        _check(loss, g, rl, rg, x, y, q, codes, k)
        loss, g, g_lt = be.jumprelu_gradients(x, q, lt, BW, 0.3, y=y)
        rl, rg, rlt = R.jumprelu_gradients(f64(x), q64, f64(lt), BW, 0.3, y=f64(y))
        _check(loss, g, rl, rg, x, y, q, _jump_codes(x, q, lt), k, parts=("mse", "total"))
        assert np.allclose(g_lt, rlt, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- steps
def _zero_state(p):
    return AdamState.zeros_like(p)


def _assert_step(got, ref, step):
    for part in ("mse", "l1", "total", "aux", "l0", "explained_variance"):
        assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                   abs=1e-6), (step, part)
    assert set(got.extra) == set(ref.extra), step
    for key, want in ref.extra.items():
        assert got.extra[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (step, key)


def _assert_trained(hp, hs, p64, s64, extra=()):
    """Parameters, moments (W_skip's included) and extra arrays (got, want)
    against the float64 run."""
    assert hp.names == p64.names and hs.m.names == hs.v.names == p64.names
    pairs = [(getattr(hp, n), getattr(p64, n)) for n in p64.names]
    for part in ("m", "v"):
        pairs += [(getattr(getattr(hs, part), n), getattr(getattr(s64, part), n))
                  for n in p64.names]
    for got, want in pairs + list(extra):
        assert np.max(np.abs(f64(got) - want)) <= 1e-5 * (1 + np.max(np.abs(want)))
    assert hs.step == s64.step


def _run_steps(be, step, x, y, p, nsteps=3, **kw):
    """``nsteps`` steps of ``step`` (a contract name) on the backend and the
    float64 oracle, compared after each; returns the trained pairs."""
    p64, s64 = _p64(p), _zero_state64(p)
    hp, hs = p.copy(), _zero_state(p)
    c_ref, c_got = np.zeros(p.d_sae, np.int64), np.zeros(p.d_sae, np.int64)
    for i in range(nsteps):
        ref = getattr(R, step)(p64, s64, f64(x), fire_counts=c_ref, y=f64(y), **kw)
        got = getattr(be, step)(hp, hs, x, fire_counts=c_got, y=y, **kw)
        _assert_step(got, ref, i)
    assert np.array_equal(c_got, c_ref)
    _assert_trained(hp, hs, p64, s64)
    return hp


# (N, d_in, d_out, d_sae, skip): with and without W_skip, d_out != d_in, d_out == 1
STEP_CASES = [(4, 5, 3, 7, True), (3, 4, 6, 5, False), (2, 3, 1, 4, True)]
STEP_IDS = [f"{n}x{i}to{o}x{s}{'-skip' if k else ''}" for n, i, o, s, k in STEP_CASES]
# the ReLU and TopK steps each case runs (every one with and without W_skip,
# within the simulator's time budget)
RELU_TOPK_STEPS = [("weighted_l1", "topk"), ("weighted_l1", "unit_norm", "topk"),
                   ("unit_norm",)]


@needs_cuda
@pytest.mark.parametrize("case,runs", list(zip(STEP_CASES, RELU_TOPK_STEPS)), ids=STEP_IDS)
def test_relu_and_topk_steps_vs_float64_oracle(be, case, runs):
    """Three steps each of train_step (the decoder-norm modes in ``runs``),
    train_step_topk (TopK when in ``runs``; BatchTopK with AuxK); Adam's
    eps = 1e-3 keeps float32 rounding of tiny gradients from flipping an
    update."""
    n, d_in, d_out, d_sae, skip = case
    x, y, p, _ = _problem(n, d_in, d_out, d_sae, skip, seed=5 + d_sae, bias=0.2)
    adam = dict(lr=1e-3, eps=1e-3)
    for mode in set(runs) - {"topk"}:
        _run_steps(be, "train_step", x, y, p, l1_coefficient=0.05, decoder_norm=mode, **adam)
    if "topk" in runs:
        _run_steps(be, "train_step_topk", x, y, p, k=2, activation="topk", **adam)
    hp = _run_steps(be, "train_step_topk", x, y, p, k=2, activation="batchtopk",
                    dead_mask=np.arange(d_sae) % 3 == 1, k_aux=K_AUX,
                    aux_coefficient=AUX_COEF, **adam)
    assert np.allclose(np.linalg.norm(f64(hp.W_dec), axis=1), 1.0, atol=1e-6)


# (case, JumpReLU path): each path with and without W_skip
JUMP_STEPS = [(0, "sparse"), (1, "sparse"), (1, "dense"), (2, "dense")]


@needs_cuda
@pytest.mark.parametrize("case,path", [(STEP_CASES[i], m) for i, m in JUMP_STEPS],
                         ids=[f"{STEP_IDS[i]}-{m}" for i, m in JUMP_STEPS], indirect=["path"])
def test_jumprelu_steps_vs_float64_oracle(be, case, path):
    """Three train_step_jumprelu steps on the forced path: the parameters,
    log_threshold and both pairs of moments, the StepResult."""
    n, d_in, d_out, d_sae, skip = case
    x, y, p, lt = _problem(n, d_in, d_out, d_sae, skip, seed=9 + d_sae)
    lt64, tm64, tv64 = f64(lt), np.zeros(d_sae), np.zeros(d_sae)
    hlt, tm, tv = lt.copy(), np.zeros_like(lt), np.zeros_like(lt)
    kw = dict(bandwidth=BW, l0_coefficient=0.2, lr=1e-3, eps=1e-3)
    p64, s64 = _p64(p), _zero_state64(p)
    hp, hs = p.copy(), _zero_state(p)
    c_ref, c_got = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    for i in range(3):
        ref = R.train_step_jumprelu(p64, s64, f64(x), log_threshold=lt64, threshold_m=tm64,
                                    threshold_v=tv64, fire_counts=c_ref, y=f64(y), **kw)
        got = be.train_step_jumprelu(hp, hs, x, log_threshold=hlt, threshold_m=tm,
                                     threshold_v=tv, fire_counts=c_got, y=y, **kw)
        _assert_step(got, ref, i)
    assert np.array_equal(c_got, c_ref)
    _assert_trained(hp, hs, p64, s64, [(hlt, lt64), (tm, tm64), (tv, tv64)])


@needs_cuda
@pytest.mark.parametrize("case", STEP_CASES, ids=STEP_IDS)
def test_matryoshka_steps_vs_float64_oracle(be, case):
    """Three train_step_matryoshka steps with AuxK (the prefix losses and
    explained variances against var(y) in StepResult.extra)."""
    n, d_in, d_out, d_sae, skip = case
    x, y, p, _ = _problem(n, d_in, d_out, d_sae, skip, seed=2 + d_sae, bias=0.2)
    widths = np.array(sorted({1, d_sae // 2 or 1, d_sae}), np.int64)
    _run_steps(be, "train_step_matryoshka", x, y, p, k=2, widths=widths, lr=1e-3, eps=1e-3,
               dead_mask=np.arange(d_sae) % 3 == 1, k_aux=K_AUX, aux_coefficient=AUX_COEF)


# ---------------------------------------------------------------- device, finite or loud
@needs_cuda
def test_device_resident_and_deterministic(be):
    """A skip transcoder's BatchTopK + AuxK step on device arrays (y on the
    device too) stays there and agrees bit for bit with the same step on host
    arrays (the host run copies to the device and back: the same kernels in
    the same order, so this is also the determinism check); device-in
    gradients stay on the device and equal host-in ones."""
    x, y, p, _ = _problem(4, 5, 3, 7, True, seed=1, bias=0.2)
    dead = np.arange(7) % 3 == 0
    kw = dict(k=2, activation="batchtopk", lr=1e-3, k_aux=K_AUX, aux_coefficient=AUX_COEF)
    bp, bs = be.to_backend(p.copy()), be.to_backend(_zero_state(p))
    assert bp.names == p.names and bs.m.names == p.names
    dres = [be.train_step_topk(bp, bs, be.to_backend(x), dead_mask=be.to_backend(dead),
                               y=be.to_backend(y), **kw)]
    assert all(hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
               for a in bp.arrays() + bs.m.arrays())
    hp, hs = p.copy(), _zero_state(p)
    hres = [be.train_step_topk(hp, hs, x, dead_mask=dead, y=y, **kw)]
    assert [(r.mse, r.aux, r.l0, r.explained_variance) for r in dres] == \
        [(r.mse, r.aux, r.l0, r.explained_variance) for r in hres]
    back, sback = be.to_numpy(bp), be.to_numpy(bs)
    assert back.names == p.names and sback.v.names == p.names
    for a, b in zip(back.arrays() + sback.m.arrays() + sback.v.arrays(),
                    hp.arrays() + hs.m.arrays() + hs.v.arrays()):
        assert np.array_equal(a, b)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, R.input_centering(p, y), 2)
    widths = np.array([3, 7], np.int64)
    lh, gh = be.matryoshka_gradients(x, p, codes, widths, y=y)
    ld, gd = be.matryoshka_gradients(be.to_backend(x), be.to_backend(p), be.to_backend(codes),
                                     widths, y=be.to_backend(y))
    assert gd.names == p.names and all(not isinstance(a, np.ndarray) for a in gd.arrays())
    assert ld == lh
    for a, b in zip(be.to_numpy(gd).arrays(), gh.arrays()):
        assert np.array_equal(a, b)


@needs_cuda
def test_non_finite_w_skip_is_loud(be):
    """An update that leaves only W_skip non-finite (an infinite first
    moment) makes the step's losses NaN, as the oracle's scan does."""
    x, y, p, _ = _problem(3, 4, 2, 5, True, seed=4)
    s = _zero_state(p)
    s.m.W_skip[0, 0] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        r = be.train_step(p, s, x, l1_coefficient=0.05, lr=1e-3, y=y)
    assert not np.isfinite(p.W_skip[0, 0])
    assert all(np.isfinite(a).all() for a in (p.W_enc, p.b_enc, p.W_dec, p.b_dec))
    assert np.isnan(r.mse) and np.isnan(r.total) and np.isnan(r.l1)
