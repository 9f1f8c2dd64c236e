"""The CUDA backend's Matryoshka BatchTopK training beyond tests/test_matryoshka.py:
one width (``[d_sae]``) is bit for bit the BatchTopK step and
``topk_gradients`` (the level-aware kernels do BatchTopK's arithmetic with
one level), the prefix decode walk against dense prefix decodes, the
gradients and a few steps against the float64 oracle on tiny edge shapes
(one row, one feature, a level no row reaches, every feature its own level,
nothing selected, dense codes), bit-for-bit determinism and
device-in / device-out. The level-aware kernels' PTX compilation (with
``[L, N, d_in]`` arguments) is checked by tests/test_cuda_sim.py.

Runs under the CUDA simulator or on a GPU. Without either, the one test
:func:`test_under_simulator` reruns this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (as tests/test_cuda_jumprelu.py does).

Tolerances as tests/test_cuda_jumprelu.py: a float32 sum of ``K`` terms is
within ``K u sum|terms|`` of the exact one (``u = 2**-24``); gradients are
compared with ``8 (K + 4) u max|g|``, ``K`` the whole reduction chain's
length (``d_in + N + d_sae + L``). The selection is exact on these inputs
(pre-activations are small multiples of 1/8 computed exactly in float32,
see :func:`_problem`), so the oracle selects the same entries.
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
    assert proc.returncode == 0, f"simulated CUDA Matryoshka tests failed:\n{tail}"
    assert " passed" in out, tail


if HAVE_CUDA:
    from fastsae import AdamState, SAEParams  # noqa: E402
    from fastsae import reference as R  # noqa: E402

    from conftest import U32, f64  # noqa: E402
    from test_jumprelu import _zero_state64  # noqa: E402
    # the CUDA contract tests' fixtures: the simulator's switch interval, the backend
    from test_cuda_backend import _fast_simulator_switches, be  # noqa: E402, F401

    if SIM:
        from test_cuda_backend import _lock_simulator_shared_arrays

        _lock_simulator_shared_arrays()

needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU or the simulator "
                                                      "(see test_under_simulator)")

K_AUX = 2
AUX_COEF = 1 / 32


def _problem(n, d_in, d_sae, seed, bias=0.0):
    """Pre-activations exact in float32 (x one-hot, ``W_enc`` and ``b_enc``
    multiples of 1/8; a distinct multiple of 2**-12 per feature breaks every
    tie), unit-norm random decoder, ``b_dec = 0`` so the pre-activations
    stay exact."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d_in), np.float32)
    x[np.arange(n), rng.integers(0, d_in, n)] = 1.0
    W_enc = (rng.integers(-4, 6, (d_in, d_sae)) / 8).astype(np.float32)
    b_enc = (bias + rng.integers(-1, 3, d_sae) / 8
             + rng.permutation(d_sae) / 4096).astype(np.float32)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    R.normalize_decoder_rows(W_dec)
    return x, SAEParams(W_enc, b_enc, W_dec, np.zeros(d_in, np.float32))


def _p64(p):
    return SAEParams(*(f64(a) for a in p.arrays()))


def _aux(x, p, dead):
    if dead is None:
        return None, 0.0
    codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, K_AUX)
    return codes, AUX_COEF * 0.7


def _check_gradients(be, x, p, codes, widths, aux=None, aux_w=0.0):
    n, d_in = x.shape
    loss, g = be.matryoshka_gradients(x, p, codes, widths, aux, aux_w)
    rl, rg = R.matryoshka_gradients(f64(x), _p64(p), codes, widths, aux, aux_w)
    k = d_in + n + p.d_sae + len(widths) + 4
    rel = 8 * (k + 4) * U32
    assert len(loss.prefix_mse) == len(widths)
    for a, b in zip(loss.prefix_mse, rl.prefix_mse):
        assert a == pytest.approx(b, rel=rel, abs=1e-12)
    assert loss.mse == loss.prefix_mse[-1]
    assert loss.total == pytest.approx(rl.total, rel=rel, abs=1e-12)
    assert loss.aux == pytest.approx(rl.aux, rel=rel, abs=1e-12) and loss.l1 == 0.0
    for name in SAEParams.NAMES:
        got, want = getattr(g, name), getattr(rg, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        tol = 8 * (k + 4) * U32 * max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        assert np.max(np.abs(f64(got) - want), initial=0.0) <= tol, name
    return loss, g


# (N, d_in, d_sae, widths, k): one row, one feature, one of everything, odd
# sizes crossing the simulator's 8-thread blocks, a level no row reaches,
# every feature its own level
EDGE = [(1, 1, 1, (1,), 1), (1, 3, 7, (2, 7), 2), (6, 4, 1, (1,), 1),
        (7, 5, 13, (3, 8, 13), 2), (11, 9, 19, tuple(range(1, 20)), 3)]


@needs_cuda
@pytest.mark.parametrize("case", EDGE, ids=[f"{c[0]}x{c[1]}x{c[2]}L{len(c[3])}" for c in EDGE])
@pytest.mark.parametrize("auxk", [False, True], ids=["noaux", "aux"])
def test_gradients_vs_float64_oracle(be, case, auxk):
    n, d_in, d_sae, widths, k = case
    x, p = _problem(n, d_in, d_sae, seed=n + 7 * d_sae)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    dead = (np.arange(d_sae) % 3 == 0) if auxk else None
    aux, w = _aux(x, p, dead)
    _check_gradients(be, x, p, codes, np.array(widths, np.int64), aux, w)


@needs_cuda
def test_gradients_empty_level_nothing_selected_dense_codes(be):
    """A prefix level with no active entry in any row (its features never
    selected: the prefix repeats the previous one's reconstruction), codes
    with no entry at all (every prefix is b_dec), and dense codes (compacted
    on the device)."""
    x, p = _problem(9, 5, 12, seed=3)
    p.b_enc[4:8] = -50.0  # level 1 (features 4..7) never fires
    widths = np.array([4, 8, 12], np.int64)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    assert not np.any((codes.indices >= 4) & (codes.indices < 8))
    loss, _ = _check_gradients(be, x, p, codes, widths)
    assert loss.prefix_mse[1] == loss.prefix_mse[0]  # level 1 adds nothing to any row
    _check_gradients(be, x, p, codes.to_dense(), widths)
    q = p.copy()
    q.b_enc[:] = -50.0
    none = R.encode_batchtopk(x, q.W_enc, q.b_enc, q.b_dec, 3)
    assert none.nnz == 0
    loss, g = _check_gradients(be, x, q, none, widths)
    assert len(set(loss.prefix_mse)) == 1
    assert not np.any(g.W_enc) and not np.any(g.b_enc) and not np.any(g.W_dec)


@needs_cuda
def test_prefix_decode_walk(be):
    """The level-aware sparse decode stores each prefix's reconstruction
    exactly as the dense decode of the codes restricted to the prefix does,
    up to float32 rounding (same order of terms: bitwise for the last)."""
    import importlib

    # import_module: the face's decode() function shadows the decode module
    CD = importlib.import_module("fastsae.backends.cuda.decode")
    from fastsae.backends.cuda import placement as CP

    x, p = _problem(10, 6, 21, seed=5)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 4)
    for widths in ([21], [1, 21], [5, 6, 20, 21], list(range(1, 22))):
        wd = CD._widths_device(np.array(widths, np.int64))
        out = CP._empty((len(widths), 10, 6))
        CD._sparse_decode(*CP._codes_device(codes), CP._device(p.W_dec), CP._device(p.b_dec),
                          out, wd)
        got = out.copy_to_host()
        f = f64(codes.to_dense())
        for lev, w in enumerate(widths):
            want = f[:, :w] @ f64(p.W_dec[:w]) + f64(p.b_dec)
            assert np.allclose(got[lev], want, rtol=1e-5, atol=1e-6), (widths, lev)
        full = CP._empty((10, 6))
        CD._sparse_decode(*CP._codes_device(codes), CP._device(p.W_dec), CP._device(p.b_dec),
                          full)
        assert np.array_equal(got[-1], full.copy_to_host())


@needs_cuda
@pytest.mark.parametrize("auxk", [False, True], ids=["noaux", "aux"])
def test_one_width_is_batchtopk_bitwise(be, auxk):
    """widths = [d_sae]: two steps and the gradients are bit for bit
    train_step_topk(activation="batchtopk") and topk_gradients."""
    x, p = _problem(8, 5, 11, seed=11, bias=0.2)
    d_sae = p.d_sae
    dead = (np.arange(d_sae) % 4 == 1) if auxk else None
    kw = dict(k=3, lr=1e-3, dead_mask=dead, k_aux=K_AUX if auxk else 0,
              aux_coefficient=AUX_COEF if auxk else 0.0)
    runs = []
    for matryoshka in (True, False):
        hp, hs, fc = p.copy(), AdamState.zeros_like(p), np.zeros(d_sae, np.int64)
        if matryoshka:
            res = [be.train_step_matryoshka(hp, hs, x, widths=[d_sae], fire_counts=fc, **kw)
                   for _ in range(2)]
        else:
            res = [be.train_step_topk(hp, hs, x, activation="batchtopk", fire_counts=fc, **kw)
                   for _ in range(2)]
        runs.append((res, hp, hs, fc))
    (rm, pm, sm, fm), (rt, pt, st, ft) = runs
    for a, b in zip(rm, rt):
        assert (a.mse, a.total, a.aux, a.l0, a.explained_variance) == \
            (b.mse, b.total, b.aux, b.l0, b.explained_variance)
        assert a.extra["min_active"] == b.extra["min_active"]
        assert a.extra["prefix_mse"] == (a.mse,)
        assert auxk == (a.aux > 0)
    for u, v in zip(list(pm.arrays()) + list(sm.m.arrays()) + list(sm.v.arrays()) + [fm],
                    list(pt.arrays()) + list(st.m.arrays()) + list(st.v.arrays()) + [ft]):
        assert np.array_equal(u, v)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    aux, w = _aux(x, p, dead)
    lm, gm = be.matryoshka_gradients(x, p, codes, [d_sae], aux, w)
    x_hat = be.decode(codes, p.W_dec, p.b_dec)
    lt, gt = be.topk_gradients(x, p, codes, x_hat, aux, w)
    assert (lm.mse, lm.total, lm.aux) == (lt.mse, lt.total, lt.aux)
    for u, v in zip(gm.arrays(), gt.arrays()):
        assert np.array_equal(u, v)


@needs_cuda
@pytest.mark.parametrize("case,auxk", [((9, 5, 11, (2, 5, 8, 11), 3), True),
                                       ((1, 3, 7, (3, 7), 2), False),
                                       ((6, 4, 6, tuple(range(1, 7)), 2), True)])
def test_train_steps_vs_float64_oracle(be, case, auxk):
    """Two steps (parameters, moments, fire counts, the StepResult with
    its prefix losses) against the float64 oracle; Adam's eps = 1e-3 keeps
    float32 rounding of tiny gradients from flipping an update."""
    n, d_in, d_sae, widths, k = case
    x, p = _problem(n, d_in, d_sae, seed=2 + d_sae, bias=0.2)
    dead = (np.arange(d_sae) % 3 == 1) if auxk else None
    kw = dict(k=k, widths=np.array(widths, np.int64), lr=1e-3, eps=1e-3, dead_mask=dead,
              k_aux=K_AUX if auxk else 0, aux_coefficient=AUX_COEF if auxk else 0.0)
    p64, s64 = _p64(p), _zero_state64(p)
    hp, hs = p.copy(), AdamState.zeros_like(p)
    c_ref, c_got = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    for step in range(2):
        ref = R.train_step_matryoshka(p64, s64, f64(x), fire_counts=c_ref, **kw)
        got = be.train_step_matryoshka(hp, hs, x, fire_counts=c_got, **kw)
        for part in ("mse", "total", "aux", "l0", "explained_variance"):
            assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                       abs=1e-6), (step, part)
        for key in ("prefix_mse", "prefix_explained_variance"):
            assert got.extra[key] == pytest.approx(ref.extra[key], rel=1e-4, abs=1e-6)
        assert got.extra["min_active"] == pytest.approx(ref.extra["min_active"], rel=1e-4,
                                                        abs=1e-6)
    for name in SAEParams.NAMES:
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    for part in ("m", "v"):
        for name in SAEParams.NAMES:
            want = getattr(getattr(s64, part), name)
            got_a = f64(getattr(getattr(hs, part), name))
            assert np.max(np.abs(got_a - want)) <= 1e-5 * (1 + np.max(np.abs(want)))
    assert np.array_equal(c_got, c_ref) and hs.step == 2
    assert np.allclose(np.linalg.norm(f64(hp.W_dec), axis=1), 1.0, atol=1e-6)


@needs_cuda
def test_deterministic_and_device_resident(be):
    """Two identical runs on device arrays (device dead mask and fire
    counts) agree bit for bit, stay on the device, and agree bit for bit
    with a run on host arrays; device-in gradients stay on the device."""
    x, p = _problem(7, 5, 11, seed=4, bias=0.2)
    d_sae = p.d_sae
    dead = np.arange(d_sae) % 3 == 0
    widths = [4, 6, d_sae]
    kw = dict(k=3, widths=widths, lr=1e-3, k_aux=K_AUX, aux_coefficient=AUX_COEF)
    outs = []
    for _ in range(2):
        bp, bs = be.to_backend(p.copy()), be.to_backend(AdamState.zeros_like(p))
        fc = be.to_backend(np.zeros(d_sae, np.int64))
        res = [be.train_step_matryoshka(bp, bs, be.to_backend(x), dead_mask=be.to_backend(dead),
                                        fire_counts=fc, **kw)]
        assert all(hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)
                   for a in list(bp.arrays()) + [fc])
        outs.append((res, [be.to_numpy(a) for a in list(bp.arrays()) + [fc]]))
    hp, hs, hfc = p.copy(), AdamState.zeros_like(p), np.zeros(d_sae, np.int64)
    hres = [be.train_step_matryoshka(hp, hs, x, dead_mask=dead, fire_counts=hfc, **kw)]
    (r1, a1), (r2, a2) = outs

    def key(rs):
        return [(r.mse, r.total, r.aux, r.l0, r.extra["prefix_mse"]) for r in rs]

    assert key(r1) == key(r2) == key(hres)
    for a, b, c in zip(a1, a2, list(hp.arrays()) + [hfc]):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    lh, gh = be.matryoshka_gradients(x, p, codes, widths)
    ld, gd = be.matryoshka_gradients(be.to_backend(x), be.to_backend(p),
                                     be.to_backend(codes), widths)
    assert all(not isinstance(a, np.ndarray) for a in gd.arrays())
    assert ld == lh
    for a, b in zip(be.to_numpy(gd).arrays(), gh.arrays()):
        assert np.array_equal(a, b)

