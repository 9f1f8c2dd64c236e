"""Cython backend, TopK family: edge cases and determinism beyond the shared
``tests/test_topk.py`` (which checks every backend against the float64
oracle). Selection rule: larger pre-activation first, ties to the lower
feature (BatchTopK: lower row-major flat index), ReLU after selection.

Comparison rule: the kernels compute ``pre`` in float32 by a tiled sgemm, the
reference here is the float32 NumPy reference on the same inputs, so values
may differ in the last bits; the selected pattern must match exactly except
where two candidates' float64 pre-activations lie within 1e-5 of each other
at the selection boundary or of 0 (then either choice is right). The problems
below are drawn so that such near-ties are rare, and every comparison checks
whether it hit one before accepting a difference.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import reference as R
from fastsae.params import AdamState, SAEParams
from fastsae.sparse import SparseCodes

try:
    from fastsae.backends import cython as C

    C.check_available()
    from fastsae.backends.cython import _threads as T
    from fastsae.backends.cython import topk as CT
    HAVE_CY = True
except ImportError:
    HAVE_CY = False

pytestmark = pytest.mark.skipif(not HAVE_CY, reason="Cython extensions not built")

AMBIG = 1e-5


@pytest.fixture
def be():
    return fastsae.get_backend("cython")


@pytest.fixture(autouse=True)
def _always_parallel(monkeypatch):
    """Full thread team even for tiny shapes, so the parallel paths run."""
    if HAVE_CY:
        monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)


def _problem(n, d_in, d_sae, shift, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    p = SAEParams(
        (rng.standard_normal((d_in, d_sae), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (shift + 0.1 * rng.standard_normal(d_sae)).astype(np.float32),
        (rng.standard_normal((d_sae, d_in), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (0.1 * rng.standard_normal(d_in)).astype(np.float32),
    )
    p.W_dec /= np.maximum(np.linalg.norm(p.W_dec, axis=1, keepdims=True), 1e-12)
    return x, p


def _pre64(x, p):
    return R.pre_activations(x.astype(np.float64), p.W_enc.astype(np.float64),
                             p.b_enc.astype(np.float64), p.b_dec.astype(np.float64))


def _assert_codes(got: SparseCodes, want: SparseCodes, pre):
    """Canonical CSR; same pattern as ``want`` except at near-ties; values close."""
    n, d = got.shape
    assert got.shape == want.shape
    assert got.indptr.dtype == np.int64 and got.indices.dtype == np.int32
    assert got.values.dtype == np.float32
    for i in range(n):
        row = got.indices[got.indptr[i]:got.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), "indices must increase within a row"
    assert np.all(got.values > 0), "no stored zeros / negatives"
    g, w = got.to_dense(), want.to_dense()
    diff = (g > 0) != (w > 0)
    if np.any(diff):
        # every disagreement must be a near-tie: its pre is within AMBIG of 0
        # or of some value in the other selection's kept set of that row
        for i, j in zip(*np.nonzero(diff)):
            kept = np.concatenate([pre[i][g[i] > 0], pre[i][w[i] > 0], [0.0]])
            assert np.min(np.abs(kept - pre[i, j]) + (kept == pre[i, j]) * 1.0) <= AMBIG \
                or abs(pre[i, j]) <= AMBIG, (i, j)
    both = (g > 0) & (w > 0)
    np.testing.assert_allclose(g[both], pre[both], rtol=1e-4, atol=1e-5)


CASES = [  # (N, d_in, d_sae, b_enc shift)
    (1, 1, 1, 0.5),
    (1, 8, 16, 0.0),
    (7, 3, 5, -0.3),
    (5, 16, 1, 0.3),
    (33, 17, 1000, -1.5),     # feature tiles with a remainder (tile 512)
    (300, 64, 1100, -2.0),    # several row blocks, some rows with < k positive
    (19, 24, 40, -50.0),      # nothing positive anywhere
    (23, 24, 40, 50.0),       # everything positive
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 32, 5000])
def test_encode_topk_edges(be, case, k):
    x, p = _problem(*case)
    got = be.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k)
    want = R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k)
    _assert_codes(got, want, _pre64(x, p))
    assert np.all(got.row_counts() <= min(k, case[2]))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 32, 5000])
def test_encode_batchtopk_edges(be, case, k):
    x, p = _problem(*case, seed=1)
    got = be.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    want = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    _assert_codes(got, want, _pre64(x, p))
    assert got.nnz <= min(k, case[2]) * case[0]


def test_batchtopk_concentrated_rows_force_the_exact_fallback(be, monkeypatch):
    """One row holds almost all of the batch's large values: the per-row
    candidate pass (4k per row at first) is then incomplete and the kernel
    must widen it until the selection is proven exact. The widened width is
    remembered for the next call of the same (d_sae, k), which stays exact."""
    monkeypatch.setattr(CT, "_cand", {})  # start from the first-call width 4k
    x, p = _problem(64, 16, 300, -3.0, seed=4)
    x[5] *= 40.0  # row 5 dominates the batch selection
    k = 4
    got = be.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    want = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    assert want.row_counts()[5] > 4 * k  # the case this test is about
    _assert_codes(got, want, _pre64(x, p))
    assert CT._cand[(300, k)] > 4 * k
    x2, p2 = _problem(64, 16, 300, -3.0, seed=5)
    _assert_codes(be.encode_batchtopk(x2, p2.W_enc, p2.b_enc, p2.b_dec, k),
                  R.encode_batchtopk(x2, p2.W_enc, p2.b_enc, p2.b_dec, k), _pre64(x2, p2))


def test_exact_ties(be):
    """Equal pre-activations: the lower feature (flat index) wins, exactly."""
    x = np.zeros((3, 2), np.float32)
    W = np.zeros((2, 700), np.float32)
    b = np.full(700, 1.0, np.float32)
    b[[3, 600, 650]] = 2.0  # across two feature tiles
    z = np.zeros(2, np.float32)
    got = be.encode_topk(x, W, b, z, 2)
    assert got.indices.tolist() == [3, 600] * 3
    got = be.encode_topk(x, W, b, z, 5)
    assert got.indices.tolist() == [0, 1, 3, 600, 650] * 3
    got = be.encode_batchtopk(x, W, b, z, 2)  # 6 of the batch: 3 twos, then row 0's ones
    want = R.encode_batchtopk(x, W, b, z, 2)
    np.testing.assert_array_equal(got.to_dense(), want.to_dense())


def test_jumprelu_thresholds(be):
    x, p = _problem(50, 16, 70, -0.5, seed=2)
    thr = np.linspace(-1, 1, 70).astype(np.float32)
    thr[::7] = 0
    got = be.encode_jumprelu(x, p.W_enc, p.b_enc, p.b_dec, thr)
    want = R.encode_jumprelu(x, p.W_enc, p.b_enc, p.b_dec, thr)
    pre = _pre64(x, p)
    g, w = got.to_dense(), want.to_dense()
    near = (np.abs(pre - thr[None]) <= AMBIG) | (np.abs(pre) <= AMBIG)
    assert np.array_equal((g > 0) & ~near, (w > 0) & ~near)
    # rows with nothing kept, and an all-kept threshold
    got = be.encode_jumprelu(x, p.W_enc, p.b_enc - 100, p.b_dec, thr)
    assert got.nnz == 0 and got.indptr.tolist() == [0] * 51


@pytest.mark.parametrize("which", ["none", "some", "all"])
def test_aux_selection(which):
    x, p = _problem(40, 12, 90, -0.5, seed=3)
    dead = {"none": np.zeros(90, bool), "all": np.ones(90, bool),
            "some": np.arange(90) % 3 == 0}[which]
    for k_aux in (1, 4, 200):
        got = CT.encode_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, k_aux)
        want = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, k_aux)
        if which == "none":
            assert got.nnz == 0
        _assert_codes(got, want, _pre64(x, p))
        assert np.all(dead[got.indices])


def _fixed_codes(x, p, k):
    return R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k)


@pytest.mark.parametrize("which", ["none", "some", "all"])
def test_topk_gradients_aux_dead_sets(be, which):
    x, p = _problem(37, 20, 60, -0.2, seed=5)
    dead = {"none": np.zeros(60, bool), "all": np.ones(60, bool),
            "some": np.arange(60) % 4 == 1}[which]
    codes = _fixed_codes(x, p, 5)
    x_hat = R.decode(codes, p.W_dec, p.b_dec)
    aux = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 8)
    w = R.aux_scale(dead, 8, 1 / 32)
    lg, gg = be.topk_gradients(x, p, codes, x_hat, aux if w else None, w)
    f = lambda a: a.astype(np.float64)  # noqa: E731
    p64 = SAEParams(*(f(a) for a in p.arrays()))
    lw, gw = R.topk_gradients(f(x), p64, SparseCodes(codes.indptr, codes.indices,
                              f(codes.values), codes.shape), f(x_hat),
                              SparseCodes(aux.indptr, aux.indices, f(aux.values), aux.shape)
                              if w else None, w)
    assert lg.mse == pytest.approx(lw.mse, rel=1e-5)
    assert lg.aux == pytest.approx(lw.aux, rel=1e-4, abs=1e-9)
    for a, b, name in zip(gg.arrays(), gw.arrays(), SAEParams.NAMES):
        scale = max(float(np.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux", [False, True])
def test_train_step_deterministic_across_threads_and_repeats(activation, aux):
    x, p0 = _problem(300, 32, 700, -1.0, seed=7)
    dead = (np.arange(700) % 5 == 0) if aux else None
    be = fastsae.get_backend("cython")
    old = T._num_threads
    outs = []
    try:
        for nt in (1, 2, 3, 2):
            C.set_num_threads(nt)
            p = p0.copy()
            st = AdamState.zeros_like(p)
            fc = np.zeros(700, np.int64)
            res = [be.train_step_topk(p, st, x, k=8, activation=activation, lr=1e-3,
                                      fire_counts=fc, dead_mask=dead, k_aux=16,
                                      aux_coefficient=1 / 32) for _ in range(3)]
            outs.append((p, fc, [(r.mse, r.aux, r.l0, r.extra["min_active"]) for r in res]))
    finally:
        C.set_num_threads(old)
    for p, fc, res in outs[1:]:
        for a, b in zip(p.arrays(), outs[0][0].arrays()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(fc, outs[0][1])
        assert res == outs[0][2]


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 3), (9, 8, 33), (64, 16, 130)], ids=str)
def test_train_step_matches_reference(be, activation, aux, shape):
    n, d_in, d_sae = shape
    x, p = _problem(n, d_in, d_sae, 0.0, seed=8)
    dead = (np.arange(d_sae) % 2 == 0) if aux else None
    pr, pc = p.copy(), p.copy()
    sr, sc = AdamState.zeros_like(p), AdamState.zeros_like(p)
    fr, fcy = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    kw = dict(k=3, activation=activation, lr=1e-3, dead_mask=dead, k_aux=2,
              aux_coefficient=0.5)
    rr = R.train_step_topk(pr, sr, x, fire_counts=fr, **kw)
    rc = be.train_step_topk(pc, sc, x, fire_counts=fcy, **kw)
    assert sc.step == sr.step == 1
    np.testing.assert_array_equal(fcy, fr)
    assert rc.l0 == rr.l0
    for f in ("mse", "total", "aux", "explained_variance"):
        assert getattr(rc, f) == pytest.approx(getattr(rr, f), rel=1e-4, abs=1e-7), f
    assert rc.extra["min_active"] == pytest.approx(rr.extra["min_active"], rel=1e-5)
    for a, b, name in zip(pc.arrays(), pr.arrays(), SAEParams.NAMES):
        # Adam's first step moves each weight by ~lr; sign flips of tiny
        # gradients can move it by up to 2 lr
        np.testing.assert_allclose(a, b, rtol=0, atol=2.5e-3, err_msg=name)
    np.testing.assert_allclose(np.linalg.norm(pc.W_dec, axis=1), 1.0, rtol=1e-5)
