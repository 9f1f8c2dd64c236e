"""Numba backend, Matryoshka BatchTopK: what the shared ``tests/test_matryoshka.py``
(every backend against the float64 oracle) does not pin down.

The step is the BatchTopK step's kernels generalized to prefix levels
(``backward.prefix_row_pass`` / ``prefix_feature_adam`` through
``step.prefix_step_core``; BatchTopK runs them with all levels 0), so with
one width ``[d_sae]`` it must be the BatchTopK step *bit for bit*, AuxK on
and off. Also: the stand-alone gradients at one width against
``topk_gradients``; the prefix walk against the NumPy oracle at layouts
that leave remainders everywhere (empty levels, every feature its own
level, rows with no entry, a first entry past several widths), dense codes;
and results that do not depend on the thread count (1 vs 2 threads,
bitwise), at shapes spanning several row blocks and feature tiles.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R

be = fastsae.get_backend("numba")


def _problem(n, d_in, d_sae, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in), dtype=np.float32)
    W_dec = rng.standard_normal((d_sae, d_in), dtype=np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = SAEParams((rng.standard_normal((d_in, d_sae), dtype=np.float32)
                   / np.float32(np.sqrt(d_in))),
                  (0.1 * rng.standard_normal(d_sae)).astype(np.float32), W_dec,
                  (0.1 * rng.standard_normal(d_in)).astype(np.float32))
    return x, p


def _dead(d_sae, seed=1):
    return np.random.default_rng(100 + seed).random(d_sae) < 0.4


def _run(step, p, x, n_steps, **kw):
    pp, st = p.copy(), AdamState.zeros_like(p)
    counts = np.zeros(p.d_sae, np.int64)
    res = [step(pp, st, x, fire_counts=counts, **kw) for _ in range(n_steps)]
    return res, pp, st, counts


def _same_state(a, b):
    (ra, pa, sa, ca), (rb, pb, sb, cb) = a, b
    for name in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(pa, name), getattr(pb, name), err_msg=name)
        np.testing.assert_array_equal(getattr(sa.m, name), getattr(sb.m, name), err_msg=name)
        np.testing.assert_array_equal(getattr(sa.v, name), getattr(sb.v, name), err_msg=name)
    np.testing.assert_array_equal(ca, cb)
    assert sa.step == sb.step
    return ra, rb


def _p64(p):
    return SAEParams(*(a.astype(np.float64) for a in p.arrays()))


@pytest.mark.parametrize("aux", [False, True])
def test_one_width_is_the_batchtopk_step_bitwise(aux):
    n, d_in, d_sae = 150, 20, 200  # row blocks of 64 and feature tiles of 64, with remainders
    x, p = _problem(n, d_in, d_sae)
    kw = dict(k=5, lr=1e-3)
    if aux:
        kw.update(dead_mask=_dead(d_sae), k_aux=4, aux_coefficient=0.25)
    a = _run(be.train_step_matryoshka, p, x, 3, widths=[d_sae], **kw)
    b = _run(be.train_step_topk, p, x, 3, activation="batchtopk", **kw)
    ra, rb = _same_state(a, b)
    for u, v in zip(ra, rb):
        assert u.mse == v.mse and u.aux == v.aux and u.total == v.total
        assert u.l0 == v.l0 and u.explained_variance == v.explained_variance
        assert u.extra["min_active"] == v.extra["min_active"]
        assert u.extra["prefix_mse"] == (v.mse,)
    if aux:
        assert ra[0].aux > 0


@pytest.mark.parametrize("aux", [False, True])
def test_one_width_gradients_are_topk_gradients(aux):
    n, d_in, d_sae = 70, 12, 130
    x, p = _problem(n, d_in, d_sae, seed=3)
    codes = be.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 4)
    a_codes, w = None, 0.0
    if aux:
        a_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, _dead(d_sae), 3)
        w = 0.4
    lm, gm = be.matryoshka_gradients(x, p, codes, [d_sae], a_codes, w)
    lt, gt = be.topk_gradients(x, p, codes, be.decode(codes, p.W_dec, p.b_dec), a_codes, w)
    assert lm.prefix_mse == (lm.mse,)
    assert lm.mse == pytest.approx(lt.mse, rel=1e-6)
    assert lm.aux == pytest.approx(lt.aux, rel=1e-6)
    assert lm.total == pytest.approx(lt.total, rel=1e-6)
    for name in SAEParams.NAMES:
        np.testing.assert_allclose(getattr(gm, name), getattr(gt, name), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


# widths over d_sae = 40: many levels, a level per feature near the start, levels
# no row reaches (k small and b_enc pushing the tail down), a first entry past
# several widths
LAYOUTS = [[40], [1, 40], [1, 2, 3, 4, 5, 40], [10, 20, 30, 40], [39, 40],
           list(range(1, 41))]


def _codes_with_gaps(x, p, k):
    """BatchTopK codes of a problem whose features 5..14 never fire (a
    prefix level no row reaches) and some rows have no entry."""
    q = p.copy()
    q.b_enc[5:15] = -100.0
    x = x.copy()
    x[::7] = 0.0  # rows centred on -b_dec: few or no positives
    return x, q, R.encode_batchtopk(x, q.W_enc, q.b_enc, q.b_dec, k)


@pytest.mark.parametrize("widths", LAYOUTS)
@pytest.mark.parametrize("aux", [False, True])
def test_prefix_sums_and_gradients_against_the_oracle(widths, aux):
    n, d_in, d_sae = 90, 9, 40
    x, p = _problem(n, d_in, d_sae, seed=5)
    x, p, codes = _codes_with_gaps(x, p, 3)
    assert np.any(np.diff(codes.indptr) == 0)
    a_codes, w = None, 0.0
    if aux:
        a_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, _dead(d_sae), 2)
        w = 0.3
    lr_, gr = R.matryoshka_gradients(x.astype(np.float64), _p64(p), codes, widths, a_codes, w)
    for c in (codes, R._dense(codes)):  # CSR and dense codes
        ln, gn = be.matryoshka_gradients(x, p, c, widths, a_codes, w)
        assert len(ln.prefix_mse) == len(widths)
        np.testing.assert_allclose(ln.prefix_mse, lr_.prefix_mse, rtol=2e-6)
        assert ln.mse == ln.prefix_mse[-1]
        assert ln.aux == pytest.approx(lr_.aux, rel=2e-6, abs=1e-12)
        assert ln.total == pytest.approx(lr_.total, rel=2e-6)
        for name in SAEParams.NAMES:
            ref = getattr(gr, name)
            scale = max(np.abs(ref).max(), 1e-30)
            err = np.abs(getattr(gn, name) - ref).max() / scale
            assert err < 1e-5, (name, err)


@pytest.mark.parametrize("widths", [[10, 20, 30, 40], [1, 2, 3, 4, 5, 40]])
def test_step_against_the_oracle(widths):
    n, d_in, d_sae = 90, 9, 40
    x, p = _problem(n, d_in, d_sae, seed=6)
    kw = dict(k=3, widths=widths, lr=1e-3, eps=1e-3, dead_mask=_dead(d_sae), k_aux=2,
              aux_coefficient=0.5)
    (r,), q, st, counts = _run(be.train_step_matryoshka, p, x, 1, **kw)
    (rr,), qr, sr, cr = _run(R.train_step_matryoshka, _p64(p), x.astype(np.float64), 1, **kw)
    np.testing.assert_array_equal(counts, cr)
    assert r.l0 == rr.l0
    np.testing.assert_allclose(r.extra["prefix_mse"], rr.extra["prefix_mse"], rtol=1e-5)
    np.testing.assert_allclose(r.extra["prefix_explained_variance"],
                               rr.extra["prefix_explained_variance"], rtol=1e-5, atol=1e-6)
    assert r.aux == pytest.approx(rr.aux, rel=1e-5)
    assert r.total == pytest.approx(rr.total, rel=1e-5)
    assert r.extra["min_active"] == pytest.approx(rr.extra["min_active"], rel=1e-6)
    for name in SAEParams.NAMES:
        np.testing.assert_allclose(getattr(q, name), getattr(qr, name), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(np.linalg.norm(q.W_dec, axis=1), 1.0, rtol=1e-5)


def test_deterministic_across_threads():
    n, d_in, d_sae = 700, 24, 1300  # several row blocks and feature tiles, with remainders
    x, p = _problem(n, d_in, d_sae, seed=8)
    widths = [100, 333, 334, 1000, 1300]
    dead = _dead(d_sae)
    kw = dict(k=6, widths=widths, lr=1e-3, dead_mask=dead, k_aux=8, aux_coefficient=0.1)
    codes = be.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 6)
    a_codes = be.encode_topk(x, p.W_enc, p.b_enc - 1e3 * (~dead), p.b_dec, 8)
    old = numba.get_num_threads()
    outs = []
    try:
        for t in sorted({1, 2, old}):
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            outs.append((_run(be.train_step_matryoshka, p, x, 2, **kw),
                         be.matryoshka_gradients(x, p, codes, widths, a_codes, 0.3)))
    finally:
        numba.set_num_threads(old)
    (s0, (l0, g0)) = outs[0]
    for s, (l, g) in outs[1:]:
        ra, rb = _same_state(s, s0)
        for u, v in zip(ra, rb):
            assert u.extra["prefix_mse"] == v.extra["prefix_mse"] and u.total == v.total
        assert l.prefix_mse == l0.prefix_mse and l.aux == l0.aux
        for name in SAEParams.NAMES:
            np.testing.assert_array_equal(getattr(g, name), getattr(g0, name), err_msg=name)


def test_sparse_codes_input_is_not_modified():
    x, p = _problem(30, 6, 20, seed=9)
    codes = be.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, 2)
    snap = SparseCodes(codes.indptr.copy(), codes.indices.copy(), codes.values.copy(),
                       codes.shape)
    p0 = p.copy()
    be.matryoshka_gradients(x, p, codes, [5, 20])
    np.testing.assert_array_equal(codes.values, snap.values)
    np.testing.assert_array_equal(codes.indices, snap.indices)
    for name in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(p, name), getattr(p0, name))
