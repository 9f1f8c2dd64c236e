"""bf16 training steps: ``train_step(..., precision="bf16")`` and
``train_step_topk(..., activation="topk", precision="bf16")`` on the numba
and cython backends, with the numpy backend (:mod:`fastsae.backends.reference`)
as the oracle.

What is checked, and against what:

* the copy of ``W_enc`` a bf16 step keeps on ``state.bf16`` (``Wp`` uint16
  panels, ``WT`` float32 transpose): after every step that ran the bf16
  encoder it is current (``key`` set) and equal, bit for bit, to a fresh
  ``_bf16.pack`` of the *updated* ``W_enc`` (the fused Adam pass rewrote
  it); shapes off every grid (odd ``d_in``, ``d_sae`` not a multiple of
  16 / 64, one input, one feature), ReLU in both decoder-norm modes, TopK
  (k = 1, 3, d_sae), TopK with AuxK, transcoders and a skip transcoder;
* the kept copy against a fresh pack end to end (``state.bf16 = None``
  before every step): bitwise equal parameters and moments;
* the step against the oracle: on *exact* data (the bf16 product is an exact
  float32 sum in any order, and bf16 / fp32 supports agree) against the
  numpy backend's bf16 step and the same backend's fp32 step; on random
  data L0 within 1%, losses loosely, parameters where the supports agree;
* staleness: a missing copy, a step counter or a ``W_enc`` array the copy
  is not of, all repack (and equal a run from ``state.bf16 = None``); a
  current copy is reused without packing; ``AdamState.copy()`` drops it;
* the ReLU density switch with the default tunables: after a dense step
  the float32 step runs (bitwise the fp32 step of a twin), and bf16 again
  once the codes are sparse;
* refusals (bad precision, cuda; BatchTopK + bf16 runs), fp32 explicit ==
  omitted, the numpy backend's bf16 steps;
* thread-count independence (bitwise), 1 vs 2 threads.

Every compiled test runs on each backend ("numba", "cython") and each path
of ``fastsae.backends.bf16.available_paths()`` (forced with
``FASTSAE_BF16_PATH``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams
from fastsae.backends import tunables as TU

from conftest import BF16 as BF
from conftest import BF16_PATHS as PATHS
from conftest import backend_usable as _usable
from conftest import skip_unusable_backend as _skip_unusable
from conftest import skip_without_bf16 as _need_bf16

# every test starts with FASTSAE_BF16_PATH unset
pytestmark = pytest.mark.usefixtures("no_bf16_path_from_outside")

ORACLE = fastsae.get_backend("numpy")
LR = 1e-3


# ------------------------------------------------------------ skips and fixtures
def _pack(W_enc):
    """A fresh pack of ``W_enc`` (the reference for the kept copy)."""
    from fastsae.backends.cython import _bf16 as C

    return C.pack(np.ascontiguousarray(W_enc, np.float32), 1)


@pytest.fixture
def force_bf16(monkeypatch):
    """ReLU steps always take the bf16 encoder (the dense-switch thresholds
    are read at call time; a density is at most 1)."""
    monkeypatch.setattr(TU, "NUMBA_RELU_DENSE_MIN_DENSITY", 2.0)
    monkeypatch.setattr(TU, "CYTHON_RELU_DENSE_MIN_DENSITY", 2.0)


# ------------------------------------------------------------ problems and steps
def make_problem(seed, n, d_in, d_sae, d_out=None, skip=False, bias=-0.4):
    """``(params, x, y)``: an SAE (``d_out`` None) or a transcoder with
    target ``y [n, d_out]`` (``skip``: with ``W_skip [d_out, d_in]``)."""
    rng = np.random.default_rng(seed)
    out = d_in if d_out is None else d_out
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    W_enc = f32(rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in))
    b_enc = f32(rng.normal(size=d_sae) * 0.1 + bias)
    W_dec = f32(rng.normal(size=(d_sae, out)) / np.sqrt(d_in))
    b_dec = f32(rng.normal(size=out) * 0.1)
    W_skip = f32(rng.normal(size=(out, d_in)) * 0.1) if skip else None
    params = SAEParams(W_enc, b_enc, W_dec, b_dec, W_skip=W_skip)
    x = f32(rng.normal(size=(n, d_in)))
    y = None if d_out is None else f32(rng.normal(size=(n, out)))
    return params, x, y


def batches(seed, steps, n, d_in, d_out=None):
    """``steps`` fresh ``(x, y)`` batches."""
    rng = np.random.default_rng(seed + 7)
    for _ in range(steps):
        x = rng.normal(size=(n, d_in)).astype(np.float32)
        y = None if d_out is None else rng.normal(size=(n, d_out)).astype(np.float32)
        yield x, y


def dead_mask_for(d_sae, seed=3):
    m = np.random.default_rng(seed).random(d_sae) < 0.5
    m[0] = True  # some True
    return m


OMIT = object()  # step(..., precision=OMIT): the argument left out


def step(be, params, state, x, cfg, y=None, precision="bf16", **extra):
    """One step of configuration ``cfg`` (a dict: ``kind`` "relu" or "topk",
    ``decoder_norm``, ``k`` (an int or "d"), ``aux``)."""
    kw = dict(lr=LR, y=y, **extra)
    if precision is not OMIT:
        kw["precision"] = precision
    if cfg["kind"] == "relu":
        return be.train_step(params, state, x, l1_coefficient=cfg.get("l1", 3e-3),
                             decoder_norm=cfg.get("decoder_norm", "weighted_l1"), **kw)
    k = params.d_sae if cfg["k"] == "d" else cfg["k"]
    if cfg.get("aux"):
        kw.update(dead_mask=dead_mask_for(params.d_sae), k_aux=2, aux_coefficient=1 / 32)
    return be.train_step_topk(params, state, x, k=k, activation=cfg.get("activation", "topk"),
                              **kw)


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def snapshot(params, state):
    """Copies of every parameter and moment array, and the step counter."""
    arrs = {f"params.{n}": getattr(params, n).copy() for n in params.names}
    for part in ("m", "v"):
        mom = getattr(state, part)
        arrs.update({f"state.{part}.{n}": getattr(mom, n).copy() for n in params.names})
    return arrs, int(state.step)


def assert_same_bits(a, b, what=""):
    """Two ``snapshot``s (or live ``(params, state)``) equal bit for bit."""
    (aa, sa), (bb, sb) = a, b
    assert sa == sb, f"{what}: step {sa} != {sb}"
    assert aa.keys() == bb.keys()
    for name in aa:
        np.testing.assert_array_equal(_bits(aa[name]), _bits(bb[name]),
                                      err_msg=f"{what}: {name} differs")


def assert_copy_current(params, state, what=""):
    """The step ran the bf16 encoder and its Adam pass wrote the copy: the
    copy is current and equals a fresh pack of the updated ``W_enc``."""
    sc = state.bf16
    assert isinstance(sc, BF.StepCopy), f"{what}: state.bf16 is {sc!r}"
    assert sc.key is not None, f"{what}: the copy is marked stale after a bf16 step"
    assert sc.key[0] == state.step, f"{what}: key {sc.key} is not of step {state.step}"
    Wp, WT = _pack(params.W_enc)
    assert sc.Wp.dtype == np.uint16 and sc.WT.dtype == np.float32
    assert sc.Wp.shape == Wp.shape and sc.WT.shape == WT.shape, what
    if not np.array_equal(sc.WT, WT):
        bad = np.argwhere(sc.WT != WT)
        raise AssertionError(f"{what}: WT differs from the pack of W_enc at {len(bad)} "
                             f"entries, first (feature, input) {tuple(bad[0])}")
    if not np.array_equal(sc.Wp, Wp):
        bad = np.flatnonzero(sc.Wp != Wp)
        raise AssertionError(f"{what}: Wp differs from the pack of W_enc at {bad.size} of "
                             f"{Wp.size} entries, first at {int(bad[0])}")


def assert_copy_stale(state, what=""):
    sc = state.bf16
    assert isinstance(sc, BF.StepCopy), f"{what}: state.bf16 is {sc!r}"
    assert sc.key is None, f"{what}: the copy is marked current after a float32 step"


class PackSpy:
    """Stands in for the compiled module on :mod:`fastsae.backends.bf16`,
    counting ``pack`` calls (everything else passes through)."""

    def __init__(self, real):
        self._real = real
        self.packs = 0

    def pack(self, *a, **k):
        self.packs += 1
        return self._real.pack(*a, **k)

    def __getattr__(self, name):
        return getattr(self._real, name)


# ------------------------------------------------------------ 1. copy == fresh pack
SHAPES = [(1, 8, 16), (7, 1, 5), (33, 17, 77), (16, 9, 1), (64, 32, 130)]
SHAPE_IDS = [f"{n}x{d}x{s}" for n, d, s in SHAPES]
CONFIGS = {
    "relu-weighted_l1": dict(kind="relu", decoder_norm="weighted_l1"),
    "relu-unit_norm": dict(kind="relu", decoder_norm="unit_norm"),
    "topk-k1": dict(kind="topk", k=1),
    "topk-k3": dict(kind="topk", k=3),
    "topk-kd": dict(kind="topk", k="d"),
    "topk-k3-auxk": dict(kind="topk", k=3, aux=True),
    "transcoder-relu": dict(kind="relu", transcoder=True),
    "transcoder-topk": dict(kind="topk", k=3, transcoder=True),
    "skip-transcoder-relu": dict(kind="relu", transcoder=True, skip=True),
    "skip-transcoder-topk-auxk": dict(kind="topk", k=3, aux=True, transcoder=True, skip=True),
}


def _problem_for(cfg, shape, seed):
    n, d_in, d_sae = shape
    d_out = d_in + 3 if cfg.get("transcoder") else None
    params, x, y = make_problem(seed, n, d_in, d_sae, d_out, skip=cfg.get("skip", False))
    return params, d_out


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_equals_fresh_pack_after_each_step(compiled, force_bf16, shape, cfg_name):
    be, path = compiled
    cfg = CONFIGS[cfg_name]
    n, d_in, d_sae = shape
    seed = 100 * n + 10 * d_in + d_sae
    params, d_out = _problem_for(cfg, shape, seed)
    state = AdamState.zeros_like(params)
    before = params.W_enc.copy()
    for i, (x, y) in enumerate(batches(seed, 3, n, d_in, d_out)):
        r = step(be, params, state, x, cfg, y)
        assert np.isfinite(r.total), r
        assert_copy_current(params, state, f"{be.name}/{path} {cfg_name} step {i + 1}")
    # the test is not vacuous: the steps did change W_enc
    if (params.W_enc != before).any():
        assert not np.array_equal(_pack(before)[1], state.bf16.WT)


# ------------------------------------------------------------ 2. kept copy vs fresh pack
E2E_CASES = {
    "relu-weighted_l1": (CONFIGS["relu-weighted_l1"], (40, 17, 77)),
    "relu-unit_norm": (CONFIGS["relu-unit_norm"], (33, 9, 130)),
    "topk-k3": (CONFIGS["topk-k3"], (40, 17, 77)),
    "topk-k3-auxk": (CONFIGS["topk-k3-auxk"], (33, 16, 70)),
    "transcoder-topk": (CONFIGS["transcoder-topk"], (20, 7, 33)),
}


@pytest.mark.parametrize("case", sorted(E2E_CASES))
def test_kept_copy_equals_fresh_pack_end_to_end(compiled, force_bf16, case):
    """4 steps with the copy the Adam pass kept, and 4 with it thrown away
    before every step (packed afresh): bitwise the same training."""
    be, path = compiled
    cfg, (n, d_in, d_sae) = E2E_CASES[case]
    params, d_out = _problem_for(cfg, (n, d_in, d_sae), 5)
    kept_p, kept_s = params.copy(), AdamState.zeros_like(params)
    fresh_p, fresh_s = params.copy(), AdamState.zeros_like(params)
    for i, (x, y) in enumerate(batches(5, 4, n, d_in, d_out)):
        rk = step(be, kept_p, kept_s, x, cfg, y)
        fresh_s.bf16 = None
        rf = step(be, fresh_p, fresh_s, x, cfg, y)
        assert rk.as_dict() == rf.as_dict(), f"step {i + 1}: {rk} != {rf}"
        assert_same_bits(snapshot(kept_p, kept_s), snapshot(fresh_p, fresh_s),
                         f"{be.name}/{path} {case} step {i + 1}")
    assert_copy_current(kept_p, kept_s, "kept")


# ------------------------------------------------------------ 3. against the oracle
def exact_problem(n, d_in, d_sae, seed, topk=False):
    """Exact data (the idea of ``tests/test_bf16.py``'s ``exact_problem``):
    ``bf16(x - b_dec)`` integers in [-7, 7] and ``bf16(W_enc)`` in
    +-{1, 2, 3}, each perturbed by a relative 2^-13..2^-12 that rounding to
    bf16 removes, so the bf16 product is an integer, exact in float32 in any
    summation order. ``b_enc`` is a half-integer (ReLU), so ``pre_b`` is never
    0 and ``|pre - pre_b| <= d_in * 2 * 21 * 2^-12 < 0.5`` (d_in <= 48) has
    the sign of ``pre_b``: the bf16 and fp32 ReLU supports agree. Returns
    ``(params, x)``."""
    assert d_in <= 48
    rng = np.random.default_rng(seed)

    def jitter(shape):
        return rng.uniform(2 ** -13, 2 ** -12, shape) * rng.choice([-1.0, 1.0], shape)

    s = rng.integers(-7, 8, (n, d_in)).astype(np.float64)
    w = rng.choice([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], (d_in, d_sae))
    b_dec = rng.integers(-3, 4, d_in).astype(np.float64)
    x = (b_dec + s * (1 + jitter(s.shape))).astype(np.float32)
    W_enc = (w * (1 + jitter(w.shape))).astype(np.float32)
    spread = 9.3 * np.sqrt(d_in)
    b_enc = np.round(rng.normal(-0.4, 0.3, d_sae) * spread) + 0.5
    W_dec = (rng.normal(size=(d_sae, d_in)) / (10 * np.sqrt(d_sae))).astype(np.float32)
    params = SAEParams(W_enc, b_enc.astype(np.float32), W_dec, b_dec.astype(np.float32))
    return params, x


def _mask(codes):
    c = codes.to_host()
    m = np.zeros(c.shape, bool)
    m[np.repeat(np.arange(c.shape[0]), np.diff(c.indptr)), c.indices] = True
    return m


def _supports(be, params, x, cfg, precision):
    args = (x, params.W_enc, params.b_enc, params.b_dec)
    if cfg["kind"] == "relu":
        return _mask(be.encode_relu_sparse(*args, precision=precision))
    return _mask(be.encode_topk(*args, cfg["k"], precision=precision))


def assert_results_close(got, want, what):
    g, w = got.as_dict(), want.as_dict()
    assert g["l0"] == w["l0"], f"{what}: l0 {g['l0']} != {w['l0']}"
    for key in ("mse", "l1", "total", "aux"):
        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-12,
                                   err_msg=f"{what}: {key}")
    # explained variance is 1 - mse / var: its absolute error is mse's relative one
    np.testing.assert_allclose(g["explained_variance"], w["explained_variance"], rtol=1e-5,
                               atol=1e-5, err_msg=f"{what}: explained_variance")
    assert g.keys() == w.keys(), what
    if "min_active" in w:  # TopK: the smallest kept code, a float32 pre-activation
        np.testing.assert_allclose(g["min_active"], w["min_active"], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: min_active")


def assert_params_close(a, b, what, rel=1e-6):
    """Parameters and moments after one step, within ``rel`` of each array's
    scale. Why not bitwise: the backends sum the gradients' float32 dot
    products in other orders (blocked, fused, threaded; the oracle with numpy
    BLAS), so a gradient differs by ~(terms) * 2^-24 relative to its terms'
    magnitudes. Adam's first update ``lr * g / (|g| + eps)`` (bias corrected)
    is flat in ``g`` away from 0 (derivative ``lr * eps / (|g| + eps)^2``), so
    the parameters differ by far less than 1e-6 of their scale; the first
    moments (``0.1 g``) by the gradients' relative error (measured: at most
    ~3e-7 of the array's largest entry here), the second (``0.001 g^2``) by
    twice it (measured ~4.5e-7): ``2 * rel`` for ``state.v``."""
    (aa, sa), (bb, sb) = a, b
    assert sa == sb
    for name in aa:
        x, y = aa[name].astype(np.float64), bb[name].astype(np.float64)
        scale = max(np.abs(y).max(initial=0.0), 1e-30)
        tol = (2 * rel if name.startswith("state.v.") else rel) * scale
        np.testing.assert_allclose(x, y, rtol=0, atol=tol, err_msg=f"{what}: {name}")


ORACLE_CASES = {
    "relu-weighted_l1": (dict(kind="relu", decoder_norm="weighted_l1"), (48, 20, 77)),
    "relu-unit_norm": (dict(kind="relu", decoder_norm="unit_norm"), (31, 13, 130)),
    "topk-k4": (dict(kind="topk", k=4), (48, 20, 77)),
    "topk-k4-all-candidates": (dict(kind="topk", k=4), (17, 9, 12)),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_exact_data_matches_oracle_and_fp32_step(compiled, force_bf16, case):
    be, path = compiled
    cfg, (n, d_in, d_sae) = ORACLE_CASES[case]
    params, x = exact_problem(n, d_in, d_sae, seed=n + d_sae)
    # the data does what it says: one support for every rule and encoder
    want = _supports(ORACLE, params, x, cfg, "bf16")
    assert 0 < want.sum() < want.size
    assert np.array_equal(_supports(ORACLE, params, x, cfg, "fp32"), want), "test data"
    assert np.array_equal(_supports(be, params, x, cfg, "bf16"), want)
    check_one_step_runs(be, f"{be.name}/{path} {case}", cfg, params, x, want, step)


def check_one_step_runs(be, label, cfg, params, x, want, step_fn, extra=None):
    """One bf16 step of ``be`` against the oracle's bf16 step and ``be``'s
    fp32 step from the same start, on data where all three select the
    support ``want`` (bool ``[N, d_sae]``): the bf16 step's copy is current,
    its fire counts are ``want``'s, and results, parameters and fire counts
    agree within assert_results_close / assert_params_close (``extra(r,
    r_other, what)``: further checks of the results)."""
    d_sae = params.d_sae
    runs = {}
    for who, b, prec in (("bf16", be, "bf16"), ("oracle", ORACLE, "bf16"), ("fp32", be, "fp32")):
        p, s = params.copy(), AdamState.zeros_like(params)
        counts = np.arange(d_sae, dtype=np.int64)
        runs[who] = (step_fn(b, p, s, x, cfg, precision=prec, fire_counts=counts),
                     snapshot(p, s), counts)
        if who == "bf16":
            assert_copy_current(p, s, "bf16 step")
    r, snap, counts = runs["bf16"]
    np.testing.assert_array_equal(counts - np.arange(d_sae), want.sum(0))
    for other in ("oracle", "fp32"):
        what = f"{label} vs {other}"
        ro = runs[other][0]
        assert_results_close(r, ro, what)
        if extra is not None:
            extra(r, ro, what)
        assert_params_close(snap, runs[other][1], what)
        np.testing.assert_array_equal(counts, runs[other][2], err_msg=f"{what}: fire_counts")


RANDOM_CASES = {
    "relu": (dict(kind="relu"), (96, 48, 200)),
    "topk-k9": (dict(kind="topk", k=9), (96, 48, 200)),
}


@pytest.mark.parametrize("case", sorted(RANDOM_CASES))
def test_random_data_close_to_oracle(compiled, force_bf16, case):
    """Random data: the supports may differ where a bf16 pre-activation is
    within float32 rounding of the cut (the kernel sums the bf16 product in
    float32, the oracle in float64): L0 within 1% and the losses within
    1e-3 (a differing entry moves mse by one code's contribution; they are
    rare, ~1e-7 of the entries, and usually absent). Where the compiled
    encoder's support equals the oracle's (checked; on these seeds it
    does), the whole step is compared as on exact data."""
    be, path = compiled
    cfg, (n, d_in, d_sae) = RANDOM_CASES[case]
    params, x, _ = make_problem(17, n, d_in, d_sae)
    runs = {}
    for who, b in (("bf16", be), ("oracle", ORACLE)):
        p, s = params.copy(), AdamState.zeros_like(params)
        runs[who] = (step(b, p, s, x, cfg), snapshot(p, s))
    (r, snap), (ro, snap_o) = runs["bf16"], runs["oracle"]
    assert ro.l0 > 0
    assert abs(r.l0 - ro.l0) <= 0.01 * ro.l0, (r.l0, ro.l0)
    for key in ("mse", "total"):
        np.testing.assert_allclose(getattr(r, key), getattr(ro, key), rtol=1e-3)
    same = np.array_equal(_supports(be, params, x, cfg, "bf16"),
                          _supports(ORACLE, params, x, cfg, "bf16"))
    assert same, "the random data has a support near-tie on this path (pick another seed)"
    assert_results_close(r, ro, f"{be.name}/{path} {case} vs oracle")
    assert_params_close(snap, snap_o, f"{be.name}/{path} {case} vs oracle")
    # and bf16 is not fp32 here: the supports differ somewhere
    if cfg["kind"] == "relu":
        assert not np.array_equal(_supports(ORACLE, params, x, cfg, "fp32"),
                                  _supports(ORACLE, params, x, cfg, "bf16"))


# ------------------------------------------------------------ 4. staleness
STALE_CFGS = {"relu": CONFIGS["relu-weighted_l1"], "topk": CONFIGS["topk-k3"]}


def _twin_without_copy(params, state):
    """Copies of the run so far, without the bf16 copy (``AdamState.copy``)."""
    s = state.copy()
    assert s.bf16 is None
    return params.copy(), s


@pytest.mark.parametrize("kind", sorted(STALE_CFGS))
def test_changed_W_enc_with_copy_dropped_repacks(compiled, force_bf16, kind):
    be, path = compiled
    cfg = STALE_CFGS[kind]
    params, x, _ = make_problem(21, 40, 17, 77)
    state = AdamState.zeros_like(params)
    step(be, params, state, x, cfg)
    assert_copy_current(params, state, "step 1")
    params.W_enc *= np.float32(-0.75)  # in place: same array, same step counter
    state.bf16 = None
    twin_p, twin_s = _twin_without_copy(params, state)
    step(be, params, state, x, cfg)
    assert_copy_current(params, state, "after W_enc changed in place")
    step(be, twin_p, twin_s, x, cfg)
    assert_same_bits(snapshot(params, state), snapshot(twin_p, twin_s), "vs twin")


@pytest.mark.parametrize("how", ["step-counter", "new-W_enc-array", "both"])
@pytest.mark.parametrize("kind", sorted(STALE_CFGS))
def test_copy_of_another_step_or_array_repacks(compiled, force_bf16, kind, how, monkeypatch):
    """A copy whose key does not match (``state.step`` moved, or ``W_enc`` is
    another array) is repacked: the step equals a run from no copy at all."""
    be, path = compiled
    cfg = STALE_CFGS[kind]
    params, x, _ = make_problem(22, 33, 9, 70)
    state = AdamState.zeros_like(params)
    step(be, params, state, x, cfg)
    assert_copy_current(params, state, "step 1")
    old_W = params.W_enc  # kept alive: a new array cannot reuse its address
    if how in ("step-counter", "both"):
        state.step += 1
    if how in ("new-W_enc-array", "both"):
        params.W_enc = params.W_enc.copy()
    twin_p, twin_s = _twin_without_copy(params, state)
    spy = PackSpy(BF._C)
    with monkeypatch.context() as mp:
        mp.setattr(BF, "_C", spy)
        step(be, params, state, x, cfg)
    assert spy.packs == 1, f"a stale copy ({how}) was not repacked"
    assert_copy_current(params, state, how)
    step(be, twin_p, twin_s, x, cfg)
    assert_same_bits(snapshot(params, state), snapshot(twin_p, twin_s), f"{how} vs twin")
    assert old_W is not params.W_enc or how == "step-counter"


@pytest.mark.parametrize("kind", sorted(STALE_CFGS))
def test_current_copy_is_reused_without_packing(compiled, force_bf16, kind, monkeypatch):
    """Only the first step (and one after ``state.bf16 = None``) packs; the
    others encode from the copy the previous Adam pass wrote."""
    be, path = compiled
    cfg = STALE_CFGS[kind]
    params, x, _ = make_problem(23, 40, 17, 77)
    state = AdamState.zeros_like(params)
    spy = PackSpy(BF._C)
    monkeypatch.setattr(BF, "_C", spy)
    packs = []
    for i in range(4):
        if i == 2:
            state.bf16 = None
        step(be, params, state, x, cfg)
        packs.append(spy.packs)
    assert packs == [1, 1, 2, 2], packs


@pytest.mark.parametrize("kind", sorted(STALE_CFGS))
def test_invalidate_copy_repacks_and_keeps_density(compiled, kind, monkeypatch):
    """``bf16.invalidate_copy`` (W_enc changed outside a step, e.g. by
    resampling): the next step packs afresh, the density decision stays."""
    be, path = compiled
    if not hasattr(BF, "invalidate_copy"):
        pytest.skip("fastsae.backends.bf16.invalidate_copy not present")
    cfg = STALE_CFGS[kind]
    params, x, _ = make_problem(25, 33, 9, 70, bias=-1.8)  # ~5% dense: ReLU stays bf16
    state = AdamState.zeros_like(params)
    step(be, params, state, x, cfg)
    assert_copy_current(params, state, "step 1")
    density = state.bf16.density
    assert 0 < density < TU.NUMBA_RELU_DENSE_MIN_DENSITY
    params.W_enc[:, ::3] *= np.float32(-1)  # changed in place, outside a step
    BF.invalidate_copy(state)
    assert_copy_stale(state, "after invalidate_copy")
    assert state.bf16.density == density and BF.last_density(state) == density
    twin_p, twin_s = _twin_without_copy(params, state)
    BF.restore_density(twin_s, density)
    spy = PackSpy(BF._C)
    with monkeypatch.context() as mp:
        mp.setattr(BF, "_C", spy)
        step(be, params, state, x, cfg)
    assert spy.packs == 1
    assert_copy_current(params, state, "after invalidate_copy")
    step(be, twin_p, twin_s, x, cfg)
    assert_same_bits(snapshot(params, state), snapshot(twin_p, twin_s), "vs twin")


def test_adam_state_copy_drops_the_bf16_copy(compiled, force_bf16):
    be, _ = compiled
    params, x, _ = make_problem(24, 8, 5, 12)
    state = AdamState.zeros_like(params)
    assert state.bf16 is None
    step(be, params, state, x, CONFIGS["topk-k3"])
    assert isinstance(state.bf16, BF.StepCopy)
    c = state.copy()
    assert c.bf16 is None and c.step == state.step
    assert "bf16" not in repr(state)


# ------------------------------------------------------------ 5. density switch
def _dense_start(seed, n=64, d_in=32, d_sae=128):
    """b_enc = 0, W_enc = W_dec.T (random): about half the features fire."""
    params, x, _ = make_problem(seed, n, d_in, d_sae)
    params.b_enc[:] = 0
    params.W_enc[:] = params.W_dec.T
    return params, x


def test_relu_density_switch_with_default_tunables(compiled):
    be, path = compiled
    thr = (TU.NUMBA_RELU_DENSE_MIN_DENSITY if be.name == "numba"
           else TU.CYTHON_RELU_DENSE_MIN_DENSITY)
    assert thr < 0.3
    cfg = CONFIGS["relu-weighted_l1"]
    params, x = _dense_start(31)
    state = AdamState.zeros_like(params)
    # step 1: density unknown -> bf16, which records a dense step
    r1 = step(be, params, state, x, cfg)
    assert_copy_current(params, state, "step 1")
    assert state.bf16.density == pytest.approx(r1.l0 / params.d_sae)
    assert state.bf16.density >= thr
    # step 2: the last codes were dense -> the float32 step, copy stale
    twin_p, twin_s = _twin_without_copy(params, state)
    step(be, params, state, x, cfg)
    assert_copy_stale(state, "step 2")
    step(be, twin_p, twin_s, x, cfg, precision="fp32")
    assert_same_bits(snapshot(params, state), snapshot(twin_p, twin_s), "step 2 vs fp32 twin")
    # sparse codes: b_enc -5 with pre-activations of spread ~3 -> about 5% of the
    # features fire (a few per row), under the threshold
    params.W_enc *= np.float32(3.0)
    params.b_enc[:] = -5
    # step 3 still follows step 2's dense codes: float32, which records sparse codes
    r3 = step(be, params, state, x, cfg)
    assert_copy_stale(state, "step 3")
    assert 0 < r3.l0 and state.bf16.density < thr, (r3.l0, state.bf16.density)
    # step 4: sparse last step -> bf16 again, from a fresh pack
    twin_p, twin_s = _twin_without_copy(params, state)
    r4 = step(be, params, state, x, cfg)
    assert r4.l0 > 0
    assert_copy_current(params, state, "step 4")
    step(be, twin_p, twin_s, x, cfg)  # no copy, no density: bf16
    assert_same_bits(snapshot(params, state), snapshot(twin_p, twin_s), "step 4 vs twin")
    # step 5 reuses step 4's copy
    step(be, params, state, x, cfg)
    assert_copy_current(params, state, "step 5")


@pytest.mark.parametrize("name", ["numba", "cython"])
def test_bad_path_refused_on_a_step_that_would_run_fp32(monkeypatch, name):
    """A bad ``FASTSAE_BF16_PATH`` fails a ``precision="bf16"`` ReLU step
    also where the last codes were dense (the step would take the float32
    path, which never reads the path): the same error as on a bf16 step,
    before anything is written."""
    _skip_unusable(name)
    _need_bf16()
    be = fastsae.get_backend(name)
    cfg = CONFIGS["relu-weighted_l1"]
    params, x = _dense_start(31)
    state = AdamState.zeros_like(params)
    step(be, params, state, x, cfg)
    thr = (TU.NUMBA_RELU_DENSE_MIN_DENSITY if name == "numba"
           else TU.CYTHON_RELU_DENSE_MIN_DENSITY)
    assert state.bf16.density >= thr  # the next step would be float32
    before = snapshot(params, state)
    monkeypatch.setenv("FASTSAE_BF16_PATH", "no-such-path")
    with pytest.raises(ValueError, match="FASTSAE_BF16_PATH"):
        step(be, params, state, x, cfg)
    assert_same_bits(snapshot(params, state), before, f"{name}: written before refusal")


def test_topk_is_always_bf16_even_when_dense(compiled):
    """TopK ignores the density switch (k = d_sae: every code fires)."""
    be, _ = compiled
    params, x = _dense_start(32, d_sae=40)
    state = AdamState.zeros_like(params)
    for i in range(3):
        step(be, params, state, x, dict(kind="topk", k="d"))
        assert_copy_current(params, state, f"topk step {i + 1}")


# ------------------------------------------------------------ 6. refusals and defaults
@pytest.mark.parametrize("bad", ["fp16", None, 1, "BF16", ""], ids=repr)
@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_bad_precision_refused_and_nothing_written(kind, bad):
    for name in ("numpy", "numba", "cython"):
        if not _usable(name):
            continue
        be = fastsae.get_backend(name)
        params, x, _ = make_problem(41, 9, 5, 12)
        state = AdamState.zeros_like(params)
        before = snapshot(params, state)
        with pytest.raises(ValueError, match="precision"):
            step(be, params, state, x, STALE_CFGS[kind], precision=bad)
        assert_same_bits(snapshot(params, state), before, f"{name}: written before refusal")
        assert state.bf16 is None


@pytest.mark.parametrize("name", ["numpy", "numba", "cython"])
def test_batchtopk_bf16_runs_and_bad_precision_refused(name):
    """BatchTopK takes precision="bf16" on the CPU backends (the compiled
    ones keep the copy); a precision other than fp32 / bf16 is still refused
    before anything is written. (tests/test_bf16_batchtopk.py tests the
    BatchTopK and Matryoshka bf16 steps in full.)"""
    _skip_unusable(name)
    if name != "numpy":
        _need_bf16()
    be = fastsae.get_backend(name)
    params, x, _ = make_problem(42, 9, 5, 12)
    state = AdamState.zeros_like(params)
    counts = np.zeros(params.d_sae, np.int64)
    cfg = dict(kind="topk", k=2, activation="batchtopk", aux=True)
    before = snapshot(params, state)
    with pytest.raises(ValueError, match="precision"):
        step(be, params, state, x, cfg, precision="fp16", fire_counts=counts)
    assert_same_bits(snapshot(params, state), before, "written before refusal")
    assert state.bf16 is None and not counts.any()
    r = step(be, params, state, x, cfg, precision="bf16", fire_counts=counts)
    assert np.isfinite(r.total) and state.step == 1 and counts.sum() == r.l0 * x.shape[0]
    if name == "numpy":
        assert state.bf16 is None  # the oracle keeps no copy
    else:
        assert_copy_current(params, state, f"{name} batchtopk bf16 step")
    step(be, params, state, x, dict(kind="topk", k=2, activation="batchtopk"),
         precision="fp32")  # fp32 BatchTopK runs


@pytest.mark.parametrize("kind", sorted(STALE_CFGS))
@pytest.mark.parametrize("name", ["numba", "cython"])
def test_unusable_path_refused_and_nothing_written(monkeypatch, force_bf16, name, kind):
    """A bad ``FASTSAE_BF16_PATH`` fails the bf16 step before it writes
    anything (parameters, moments, counter, fire counts, the kept copy)."""
    _skip_unusable(name)
    _need_bf16()
    be = fastsae.get_backend(name)
    cfg = STALE_CFGS[kind]
    params, x, _ = make_problem(46, 9, 5, 12)
    state = AdamState.zeros_like(params)
    step(be, params, state, x, cfg)  # a good step first: there is a current copy
    sc = state.bf16
    key, Wp, WT = sc.key, sc.Wp.copy(), sc.WT.copy()
    before = snapshot(params, state)
    counts = np.zeros(params.d_sae, np.int64)
    monkeypatch.setenv("FASTSAE_BF16_PATH", "no-such-path")
    with pytest.raises(ValueError, match="FASTSAE_BF16_PATH"):
        step(be, params, state, x, cfg, fire_counts=counts)
    assert_same_bits(snapshot(params, state), before, f"{name}: written before refusal")
    assert not counts.any()
    assert state.bf16 is sc and sc.key == key
    assert np.array_equal(sc.Wp, Wp) and np.array_equal(sc.WT, WT)
    monkeypatch.delenv("FASTSAE_BF16_PATH")
    step(be, params, state, x, cfg)  # and the run goes on from the kept copy
    assert_copy_current(params, state, "after the refused step")


def test_bf16_steps_refused_on_cuda():
    try:
        be = fastsae.get_backend("cuda")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cuda backend unavailable: {exc}")
    params, x, _ = make_problem(43, 9, 5, 12)
    state = AdamState.zeros_like(params)
    for kind in ("relu", "topk"):
        with pytest.raises(ValueError, match="bf16"):
            step(be, params, state, x, STALE_CFGS[kind])
    assert state.step == 0 and state.bf16 is None


@pytest.mark.parametrize("cfg_name", ["relu-weighted_l1", "relu-unit_norm", "topk-k3-auxk",
                                      "transcoder-topk"])
@pytest.mark.parametrize("name", ["numpy", "numba", "cython"])
def test_fp32_explicit_equals_omitted(name, cfg_name):
    _skip_unusable(name)
    be = fastsae.get_backend(name)
    cfg = CONFIGS[cfg_name]
    params, d_out = _problem_for(cfg, (33, 17, 77), 44)
    runs = []
    for prec in ("fp32", OMIT):
        p, s = params.copy(), AdamState.zeros_like(params)
        for x, y in batches(44, 2, 33, 17, d_out):
            r = step(be, p, s, x, cfg, y, precision=prec)
        assert s.bf16 is None  # a float32 run keeps no copy
        runs.append((r.as_dict(), snapshot(p, s)))
    assert runs[0][0] == runs[1][0]
    assert_same_bits(runs[0][1], runs[1][1], f"{name} {cfg_name}: fp32 vs omitted")


@pytest.mark.parametrize("cfg_name", ["relu-weighted_l1", "topk-k3-auxk", "transcoder-relu"])
def test_numpy_backend_bf16_step_runs(cfg_name):
    """The oracle's bf16 steps run, keep no copy, and train with the bf16
    support (here it differs from fp32's)."""
    cfg = CONFIGS[cfg_name]
    params, d_out = _problem_for(cfg, (64, 32, 130), 45)
    p, s = params.copy(), AdamState.zeros_like(params)
    (x, y), = batches(45, 1, 64, 32, d_out)
    r = step(ORACLE, p, s, x, cfg, y)
    assert np.isfinite(r.total) and r.l0 > 0 and s.step == 1 and s.bf16 is None
    assert not np.array_equal(p.W_enc, params.W_enc)
    p32, s32 = params.copy(), AdamState.zeros_like(params)
    r32 = step(ORACLE, p32, s32, x, cfg, y, precision="fp32")
    if cfg["kind"] == "relu":  # random data: some entry is in one support only
        assert r.l0 != r32.l0 or not np.array_equal(p.W_enc, p32.W_enc)


# ------------------------------------------------------------ 7. threads
@pytest.mark.parametrize("cfg_name", ["relu-weighted_l1", "relu-unit_norm", "topk-k3-auxk",
                                      "transcoder-topk"])
def test_thread_count_independence(compiled, force_bf16, cfg_name):
    be, path = compiled
    check_thread_independence(be, path, cfg_name, CONFIGS[cfg_name], _problem_for, step)


def check_thread_independence(be, path, cfg_name, cfg, problem_for, step_fn):
    """3 bf16 steps with 1 thread and with 2 from the same start: results,
    parameters, moments and the kept copy bitwise equal (``problem_for``
    and ``step_fn`` as this module's ``_problem_for`` and ``step``)."""
    default = be.get_num_threads()
    if default < 2:
        pytest.skip(f"{be.name} has {default} thread here")
    # large enough that the cython kernels go parallel (work >= 2^20)
    shape = (256, 48, 130)
    params, d_out = problem_for(cfg, shape, 51)
    runs = []
    try:
        for threads in (1, 2):
            be.set_num_threads(threads)
            p, s = params.copy(), AdamState.zeros_like(params)
            res = [step_fn(be, p, s, x, cfg, y).as_dict()
                   for x, y in batches(51, 3, shape[0], shape[1], d_out)]
            assert_copy_current(p, s, f"{threads} threads")
            runs.append((res, snapshot(p, s), s.bf16.Wp.copy()))
    finally:
        be.set_num_threads(None)
    assert be.get_num_threads() == default
    (r1, s1, w1), (r2, s2, w2) = runs
    assert r1 == r2
    assert_same_bits(s1, s2, f"{be.name}/{path} {cfg_name}: 1 vs 2 threads")
    assert np.array_equal(w1, w2)


def test_another_array_at_the_same_address_is_not_taken_for_w_enc(compiled, force_bf16):
    """The copy belongs to one W_enc object: a view (same memory, same
    address, another object) that the caller has rewritten is repacked, not
    encoded from the old copy (the key alone, address and step, would match)."""
    be, _ = compiled
    p, x, _ = make_problem(2, 16, 9, 33)
    st = AdamState.zeros_like(p)
    be.train_step(p, st, x, l1_coefficient=1e-3, lr=1e-3, precision="bf16")
    v = p.W_enc.view()
    v[...] = -p.W_enc  # rewritten in place, through the new object
    p.W_enc = v
    twin_p, twin_s = p.copy(), st.copy()  # no kept copy: packs the new weights
    be.train_step(p, st, x, l1_coefficient=1e-3, lr=1e-3, precision="bf16")
    be.train_step(twin_p, twin_s, x, l1_coefficient=1e-3, lr=1e-3, precision="bf16")
    for n in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(p, n), getattr(twin_p, n), n)
    Wp, WT = _pack(p.W_enc)
    assert np.array_equal(st.bf16.Wp, Wp) and np.array_equal(st.bf16.WT, WT)


@pytest.mark.parametrize("bad", ["short panels", "wrong transpose", "panels alone"])
def test_cython_backward_refuses_a_copy_of_another_shape(bad, monkeypatch, force_bf16):
    """``train_backward`` checks the copy it is to rewrite before any write:
    a copy of the wrong size, or panels without their transpose, is a clear
    error and the parameters stay as they were (a mismatched copy must never
    be written past its end)."""
    _skip_unusable("cython")
    _need_bf16()
    from fastsae.backends.cython import step as CS

    real = CS._bf16_codes

    def broken(*a, **kw):
        codes, copy = real(*a, **kw)
        if bad == "short panels":
            copy["bf16_panels"] = copy["bf16_panels"][:-32]
        elif bad == "wrong transpose":
            copy["bf16_transpose"] = np.zeros((1, 1), np.float32)
        else:
            del copy["bf16_transpose"]
        return codes, copy
    monkeypatch.setattr(CS, "_bf16_codes", broken)
    be = fastsae.get_backend("cython")
    p, x, _ = make_problem(4, 12, 9, 33)
    before = p.copy()
    match = "go together" if bad == "panels alone" else "not of W_enc's shape"
    with pytest.raises(ValueError, match=match):
        be.train_step(p, AdamState.zeros_like(p), x, l1_coefficient=1e-3, lr=LR,
                      precision="bf16")
    for n in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(p, n), getattr(before, n), n)
