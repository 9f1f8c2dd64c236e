"""The CUDA backend's TopK family beyond tests/test_topk.py: exact
selection on planted ties, edge cases (k >= d_sae, k = 1, N = 1, rows with
fewer than k positive pre-activations, AuxK with all / no latents dead),
multi-step training against the float64 reference on shapes with enough
latents, bit-for-bit determinism across repeats, device-in/device-out.

Runs under the CUDA simulator (tests/test_cuda_sim.py launches it in a
subprocess with ``NUMBA_ENABLE_CUDASIM=1``) or on a GPU; skipped otherwise.
Selection is compared exactly: the inputs are built so every pre-activation
is a small-integer multiple of 1/8 computed exactly in float32 (planted
ties included), or, for random data, away from ties by construction of the
tolerance rule of tests/test_topk.py (pattern equal except entries within
the float32 bound of the k-th value).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import config, cuda

if not (config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1 (see tests/test_cuda_sim.py)",
                allow_module_level=True)

from fastsae import AdamState, SAEParams  # noqa: E402
from fastsae import reference as R  # noqa: E402

from conftest import f64, make_params, make_x  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)

# the CUDA contract tests' fixtures: the simulator's switch interval, the backend
from test_cuda_backend import _fast_simulator_switches, be  # noqa: E402, F401

if SIM:
    from test_cuda_backend import _lock_simulator_shared_arrays

    _lock_simulator_shared_arrays()


def _exact_problem(n, d_sae, seed, d_in=3):
    """Pre-activations = small multiples of 1/8 (exact in float32, many
    exact ties, zeros and negatives): x one-hot-ish, W_enc integers / 8."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d_in), np.float32)
    x[np.arange(n), rng.integers(0, d_in, n)] = 1.0
    W_enc = (rng.integers(-4, 5, (d_in, d_sae)) / 8).astype(np.float32)
    b_enc = (rng.integers(-2, 3, d_sae) / 8).astype(np.float32)
    return x, W_enc, b_enc, np.zeros(d_in, np.float32)


def _same(a, b):
    a, b = a.to_host() if hasattr(a, "to_host") else a, b
    assert np.array_equal(np.asarray(a.indptr), b.indptr)
    assert np.array_equal(np.asarray(a.indices), b.indices)
    assert np.array_equal(np.asarray(a.values), b.values)


@pytest.mark.parametrize("n,d_sae,k", [(1, 1, 1), (1, 1, 3), (1, 7, 2), (6, 5, 1),
                                       (6, 5, 40), (11, 19, 2), (11, 19, 5)])
def test_topk_and_batchtopk_exact_ties(be, n, d_sae, k):
    """Exact equality with the reference, ties included (k >= d_sae, k = 1,
    N = 1, rows with fewer than k positives all occur here)."""
    x, W, b, bd = _exact_problem(n, d_sae, seed=n * 31 + d_sae + k)
    _same(be.encode_topk(x, W, b, bd, k), R.encode_topk(x, W, b, bd, k))
    _same(be.encode_batchtopk(x, W, b, bd, k), R.encode_batchtopk(x, W, b, bd, k))


def test_all_equal_rows(be):
    """Every pre-activation equal: the lowest indices win (BatchTopK: the
    first rows); all negative: nothing kept."""
    x = np.zeros((4, 2), np.float32)
    W = np.zeros((2, 6), np.float32)
    for bias in (0.5, -0.5, 0.0):
        b = np.full(6, bias, np.float32)
        bd = np.zeros(2, np.float32)
        for k in (1, 3, 6, 9):
            _same(be.encode_topk(x, W, b, bd, k), R.encode_topk(x, W, b, bd, k))
            _same(be.encode_batchtopk(x, W, b, bd, k), R.encode_batchtopk(x, W, b, bd, k))


def test_negative_zero_and_extremes(be):
    """-0.0 ties +0.0 (both dropped by ReLU); huge and tiny magnitudes order
    correctly through the key mapping."""
    x = np.zeros((2, 1), np.float32)
    W = np.zeros((1, 7), np.float32)
    b = np.array([-0.0, 0.0, 3e38, 1e-45, -3e38, -1e-45, 2.0], np.float32)
    bd = np.zeros(1, np.float32)
    for k in range(1, 8):
        _same(be.encode_topk(x, W, b, bd, k), R.encode_topk(x, W, b, bd, k))
        _same(be.encode_batchtopk(x, W, b, bd, k), R.encode_batchtopk(x, W, b, bd, k))


def test_jumprelu_exact(be):
    x, W, b, bd = _exact_problem(9, 13, seed=5)
    thr = (np.arange(13) % 5 / 8 - 0.25).astype(np.float32)
    _same(be.encode_jumprelu(x, W, b, bd, thr), R.encode_jumprelu(x, W, b, bd, thr))


@pytest.mark.parametrize("which", ["all", "some", "one"])
def test_aux_selection(be, which):
    """AuxK selection (the internal kernel) against encode_topk_aux."""
    from fastsae.backends.cuda import placement as CP
    from fastsae.backends.cuda import topk as CT

    x, W, b, bd = _exact_problem(7, 11, seed=3)
    dead = {"all": np.ones(11, bool), "some": np.arange(11) % 3 == 0,
            "one": np.arange(11) == 4}[which]
    for k_aux in (1, 2, 20):
        want = R.encode_topk_aux(x, W, b, bd, dead, k_aux)
        xd, Wd, bdv, bdd = (CP._device(a) for a in (x, W, b, bd))
        pre = CT._pre(xd, Wd, bdv, bdd)
        got, _ = CT._aux_codes(pre, CP._device(dead, np.bool_), int(dead.sum()), k_aux,
                               fresh=True)
        _same(got, want)


def test_no_dead_latent_means_no_auxk(be):
    """A dead mask without any dead latent runs no AuxK term: the step is
    bit-identical to one without a dead mask, and its aux loss is 0."""
    x, W, b, bd = _exact_problem(7, 11, seed=3)
    p = SAEParams(W, b, np.ascontiguousarray(W.T), bd)
    kw = dict(k=2, lr=1e-3, k_aux=2, aux_coefficient=0.5)
    runs = []
    for dead in (np.zeros(11, bool), None):
        hp, hs = p.copy(), AdamState.zeros_like(p)
        runs.append((be.train_step_topk(hp, hs, x, dead_mask=dead, **kw), hp))
    (r0, p0), (r1, p1) = runs
    assert r0.aux == 0.0 and r0.as_dict() == r1.as_dict()
    for a, c in zip(p0.arrays(), p1.arrays()):
        assert np.array_equal(a, c)


def _train_problem(n, d_in, d_sae, seed):
    rng = np.random.default_rng(seed)
    p = make_params(rng, d_in, d_sae, "mixed")
    p.b_enc += 0.4
    p.W_enc[:, -3:] += 0.01 * np.arange(1, 4)
    R.normalize_decoder_rows(p.W_dec)
    return make_x(rng, n, d_in), p


@pytest.mark.parametrize("shape,activation,dead_kind", [
    ((13, 9, 17), "topk", "off"), ((13, 9, 17), "topk", "some"),
    ((13, 9, 17), "batchtopk", "off"), ((13, 9, 17), "batchtopk", "some"),
    ((1, 3, 7), "topk", "all"), ((1, 3, 7), "batchtopk", "all")])
def test_train_step_topk_vs_reference(be, shape, activation, dead_kind):
    """Three steps against the float64 reference, AuxK off / some dead / all
    dead (tests/test_topk.py's version, on shapes with d_sae >= 3)."""
    x, p = _train_problem(*shape, seed=11)
    dead = {"off": None, "some": np.arange(p.d_sae) % 4 == 1,
            "all": np.ones(p.d_sae, bool)}[dead_kind]
    aux = dead is not None
    kw = dict(k=3, activation=activation, lr=1e-3, eps=1e-3, dead_mask=dead,
              k_aux=2 if aux else 0, aux_coefficient=1 / 32 if aux else 0.0)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    s64 = AdamState(SAEParams(*(np.zeros_like(a) for a in p64.arrays())),
                    SAEParams(*(np.zeros_like(a) for a in p64.arrays())), 0)
    hp = p.copy()
    hs = AdamState.zeros_like(p)
    c_ref = np.zeros(p.d_sae, np.int64)
    c_got = np.zeros(p.d_sae, np.int64)
    for step in range(3):
        ref = R.train_step_topk(p64, s64, f64(x), fire_counts=c_ref, **kw)
        got = be.train_step_topk(hp, hs, x, fire_counts=c_got, **kw)
        for part in ("mse", "total", "aux", "l0", "explained_variance"):
            assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                       abs=1e-6), (step, part)
        assert got.extra["min_active"] == pytest.approx(ref.extra["min_active"], rel=1e-4,
                                                        abs=1e-6)
        if aux:
            assert got.aux > 0
    for name in SAEParams.NAMES:
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    assert np.array_equal(c_got, c_ref)
    assert hs.step == 3


def test_train_step_topk_deterministic_and_device_resident(be):
    """Two identical runs (device params, device dead mask) agree bit for
    bit, and a host run gives the same numbers as the device run."""
    x, p = _train_problem(13, 9, 17, seed=2)
    dead = np.arange(p.d_sae) % 3 == 0
    kw = dict(k=4, activation="topk", lr=1e-3, k_aux=3, aux_coefficient=0.1)
    outs = []
    for _ in range(2):
        bp = be.to_backend(p.copy())
        bs = be.to_backend(AdamState.zeros_like(p))
        fc = be.to_backend(np.zeros(p.d_sae, np.int64))
        res = [be.train_step_topk(bp, bs, x, dead_mask=be.to_backend(dead), fire_counts=fc,
                                  **kw) for _ in range(2)]
        assert all(hasattr(a, "__cuda_array_interface__") for a in bp.arrays())
        outs.append((res, be.to_numpy(bp), be.to_numpy(fc)))
    hp, hs = p.copy(), AdamState.zeros_like(p)
    hres = [be.train_step_topk(hp, hs, x, dead_mask=dead, **kw) for _ in range(2)]
    (r1, p1, f1), (r2, p2, f2) = outs
    assert [(r.mse, r.aux, r.l0, r.extra["min_active"]) for r in r1] == \
        [(r.mse, r.aux, r.l0, r.extra["min_active"]) for r in r2] == \
        [(r.mse, r.aux, r.l0, r.extra["min_active"]) for r in hres]
    for a, b, c in zip(p1.arrays(), p2.arrays(), hp.arrays()):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(f1, f2)


def test_encoders_repeat_bit_for_bit(be):
    x, W, b, bd = _exact_problem(11, 19, seed=9)
    rng = np.random.default_rng(0)
    W = W + rng.standard_normal(W.shape).astype(np.float32) * 1e-3
    first = [be.encode_topk(x, W, b, bd, 3), be.encode_batchtopk(x, W, b, bd, 3)]
    for _ in range(2):
        again = [be.encode_topk(x, W, b, bd, 3), be.encode_batchtopk(x, W, b, bd, 3)]
        for a, c in zip(first, again):
            _same(a, c)
