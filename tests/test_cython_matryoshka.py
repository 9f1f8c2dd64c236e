"""Cython backend, Matryoshka BatchTopK: what the shared ``tests/test_matryoshka.py``
(every backend against the float64 oracle) does not pin down.

The step is the BatchTopK step's kernels generalized to levels
(``kernels/cython/backward.pyx``, ``widths=``), so with one width
``[d_sae]`` it must be the BatchTopK step *bit for bit* (same selection,
same float32 operations in the same order), AuxK on and off; and results
must not depend on the thread count. Also: the prefix walk against the
float32 NumPy oracle at shapes that leave remainders everywhere (empty
levels, a level per feature, a row with no entry), dense codes, and the
kernel's own argument checks (what the front cannot know).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastsae import reference as R
from fastsae.params import AdamState, SAEParams
from fastsae.sparse import SparseCodes

try:
    from fastsae.backends import cython as C

    C.check_available()
    from fastsae.backends.cython import _backward
    from fastsae.backends.cython import _threads as T
    HAVE_CY = True
except ImportError:
    HAVE_CY = False

pytestmark = pytest.mark.skipif(not HAVE_CY, reason="Cython extensions not built")


@pytest.fixture(autouse=True)
def _always_parallel(monkeypatch):
    """Full thread team even for tiny shapes, so the parallel paths run."""
    if HAVE_CY:
        monkeypatch.setattr(T, "CYTHON_PARALLEL_MIN_WORK", 0)


@pytest.fixture
def threads():
    """Set the team size for the test; restored afterwards."""
    old = C.get_num_threads()
    yield C.set_num_threads
    C.set_num_threads(old)


def _problem(n, d_in, d_sae, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    p = SAEParams(
        (rng.standard_normal((d_in, d_sae), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (0.1 * rng.standard_normal(d_sae)).astype(np.float32),
        (rng.standard_normal((d_sae, d_in), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32),
        (0.1 * rng.standard_normal(d_in)).astype(np.float32),
    )
    p.W_dec /= np.maximum(np.linalg.norm(p.W_dec, axis=1, keepdims=True), 1e-12)
    return x, p


def _dead(d_sae, seed):
    rng = np.random.default_rng(100 + seed)
    return rng.random(d_sae) < 0.4


def _steps(step, p, x, n_steps, **kw):
    pp, st = p.copy(), AdamState.zeros_like(p)
    counts = np.zeros(p.d_sae, np.int64)
    res = [step(pp, st, x, fire_counts=counts, **kw) for _ in range(n_steps)]
    return res, pp, st, counts


def _same_arrays(a, b):
    for name in SAEParams.NAMES:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 2), (77, 24, 130, 5), (300, 33, 257, 7)])
def test_one_width_is_batchtopk_step_bitwise(shape, aux):
    """widths = [d_sae]: the same step as train_step_topk(batchtopk), every
    loss, statistic, parameter, moment and fire count bitwise, 3 steps."""
    n, d_in, d_sae, k = shape
    x, p = _problem(n, d_in, d_sae, seed=d_sae)
    kw = dict(k=k, lr=1e-2, eps=1e-3)
    if aux:
        kw.update(dead_mask=_dead(d_sae, d_sae), k_aux=max(1, k // 2), aux_coefficient=0.5)
    ra, pa, sa, ca = _steps(C.train_step_topk, p, x, 3, activation="batchtopk", **kw)
    rb, pb, sb, cb = _steps(C.train_step_matryoshka, p, x, 3,
                            widths=np.array([d_sae], np.int64), **kw)
    assert np.array_equal(ca, cb)
    for a, b in zip(ra, rb):
        for part in ("mse", "total", "aux", "l0", "explained_variance"):
            assert getattr(a, part) == getattr(b, part), part
        assert a.extra["min_active"] == b.extra["min_active"]
        assert b.extra["prefix_mse"] == (b.mse,)
        assert b.extra["prefix_explained_variance"] == (b.explained_variance,)
    _same_arrays(pa, pb)
    _same_arrays(sa.m, sb.m)
    _same_arrays(sa.v, sb.v)
    assert sa.step == sb.step == 3


def test_one_width_gradients_are_topk_gradients_bitwise():
    """matryoshka_gradients with widths = [d_sae] and no AuxK: bitwise
    topk_gradients on the decoded reconstruction (AuxK on: within float32
    rounding, as topk_gradients sums its AuxK term in a second pass)."""
    x, p = _problem(90, 20, 70, seed=3)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 4)
    x_hat = C.decode(codes, p.W_dec, p.b_dec)
    w = np.array([70], np.int64)
    la, ga = C.topk_gradients(x, p, codes, x_hat)
    lb, gb = C.matryoshka_gradients(x, p, codes, w)
    assert (la.mse, la.total, la.aux) == (lb.mse, lb.total, lb.aux)
    assert lb.prefix_mse == (lb.mse,)
    _same_arrays(ga, gb)
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, _dead(70, 3), 3)
    la, ga = C.topk_gradients(x, p, codes, x_hat, aux_codes, 0.3)
    lb, gb = C.matryoshka_gradients(x, p, codes, w, aux_codes, 0.3)
    assert lb.aux == pytest.approx(la.aux, rel=1e-6)
    assert lb.total == pytest.approx(la.total, rel=1e-6)
    for name in SAEParams.NAMES:
        A, B = getattr(ga, name), getattr(gb, name)
        assert np.max(np.abs(A - B)) <= 1e-5 * max(1e-3, np.max(np.abs(A))), name


WIDTHS = [
    ("empty-levels", (130, 17, 200, 3), [1, 2, 3, 150, 151, 200]),
    ("every-feature", (40, 9, 11, 2), list(range(1, 12))),
    ("paper-like", (64, 32, 256, 4), [32, 64, 128, 256]),
]


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
@pytest.mark.parametrize("case", WIDTHS, ids=[c[0] for c in WIDTHS])
def test_prefixes_match_oracle(case, aux):
    """Losses and gradients against the float32 NumPy oracle, sparse and
    dense codes; row 0 gets tiny inputs, so the batch selection most likely
    leaves it no entry (every level of it is then just b_dec - x)."""
    _, (n, d_in, d_sae, k), widths = case
    x, p = _problem(n, d_in, d_sae, seed=n)
    x[0] *= 1e-3  # very likely to lose every entry to the batch selection
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    aux_codes, aw = None, 0.0
    if aux:
        aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, _dead(d_sae, n), 2)
        aw = 0.25
    w = np.array(widths, np.int64)
    lr_, gr = R.matryoshka_gradients(x, p, codes, w, aux_codes, aw)
    for c in (codes, codes.to_dense()):
        lc, gc = C.matryoshka_gradients(x, p, c, w, aux_codes, aw)
        assert len(lc.prefix_mse) == len(widths)
        np.testing.assert_allclose(lc.prefix_mse, lr_.prefix_mse, rtol=2e-5)
        assert lc.mse == lc.prefix_mse[-1]
        assert lc.total == pytest.approx(lr_.total, rel=2e-5)
        assert lc.aux == pytest.approx(lr_.aux, rel=2e-5, abs=1e-9)
        for name in SAEParams.NAMES:
            A, B = getattr(gr, name), getattr(gc, name)
            assert np.max(np.abs(A - B)) <= 2e-5 * max(1e-3, np.max(np.abs(A))), name


@pytest.mark.parametrize("aux", [False, True], ids=["noaux", "aux"])
def test_independent_of_thread_count(threads, aux):
    """Gradients and two steps bitwise the same on 1, 2 and 3 threads:
    rows split unevenly over the blocks, a feature remainder, widths that
    cut the feature blocks of 16 unevenly."""
    x, p = _problem(600, 40, 257, seed=9)
    widths = np.array([5, 40, 200, 257], np.int64)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 6)
    kw = dict(k=6, widths=widths, lr=1e-2, eps=1e-3)
    aux_codes, aw = None, 0.0
    if aux:
        dead = _dead(257, 9)
        aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 3)
        aw = 0.25
        kw.update(dead_mask=dead, k_aux=3, aux_coefficient=0.5)

    def outputs():
        loss, g = C.matryoshka_gradients(x, p, codes, widths, aux_codes, aw)
        out = g.arrays() + [np.array([loss.mse, loss.total, loss.aux, *loss.prefix_mse])]
        res, pp, st, counts = _steps(C.train_step_matryoshka, p, x, 2, **kw)
        for r in res:
            out.append(np.array([r.mse, r.total, r.aux, r.l0, r.extra["min_active"],
                                 *r.extra["prefix_mse"]]))
        return out + pp.arrays() + st.m.arrays() + st.v.arrays() + [counts]

    runs = []
    for nt in (1, 2, 3):
        threads(nt)
        runs.append(outputs())
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert np.array_equal(a, b), f"output {i} depends on the thread count"


def test_kernel_argument_checks():
    """What the kernel checks itself (the wrapper's side of the contract):
    x_hat or widths, not both or neither; prefix_sq of the widths' length."""
    x, p = _problem(8, 4, 6, seed=1)
    codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 2)
    g = SAEParams(*(np.empty_like(a) for a in p.arrays()))
    ones = np.ones(6, np.float32)
    x_hat = C.decode(codes, p.W_dec, p.b_dec)
    w = np.array([3, 6], np.int64)

    def call(xh, widths, prefix_sq=None):
        return _backward.gradients_csr(x, xh, p.W_enc, p.W_dec, p.b_dec, codes.indptr,
                                       codes.indices, codes.values, ones, 0.0, False, True,
                                       g.W_enc, g.b_enc, g.W_dec, g.b_dec, None, 1,
                                       widths=widths, prefix_sq=prefix_sq)

    with pytest.raises(ValueError, match="x_hat or widths"):
        call(x_hat, w)
    with pytest.raises(ValueError, match="x_hat or widths"):
        call(None, None)
    with pytest.raises(ValueError, match="prefix_sq"):
        call(None, w, np.zeros(3))
    sq = np.zeros(2)
    call(None, w, sq)
    assert sq[0] >= 0 and sq[1] >= 0
