"""Numba-specific tests: thread-count independence, the encoder's blocking and
staging paths, multi-step training against the reference, BLAS thread control.

The shared contract (every kernel vs the float64 oracle on edge-case shapes)
is in ``test_contract.py``; this file covers what only the Numba backend has.
Tolerances are those of ``conftest.py`` (float32 dot-product bounds); the
sparse pattern must match exactly except where ``|pre|`` is within the bound
of 0.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R

from conftest import assert_codes_match, encode_oracle, f64, make_params, make_x

import numba  # a dependency of fastsae
import fastsae.backends.numba as NB
from fastsae.backends.numba import encode as E

pytestmark = pytest.mark.skipif(
    not any(s.name == "numba" and s.available for s in fastsae.available_backends()),
    reason="numba backend unavailable")

# N spans several encoder row blocks (NUMBA_RELU_ROW_BLOCK = 256) and an odd remainder
SHAPES = [(1, 1, 1), (1, 7, 300), (5, 3, 1), (300, 17, 65), (600, 40, 257)]


@pytest.fixture
def be():
    return fastsae.get_backend("numba")


@pytest.fixture
def threads():
    """Restore the Numba thread count after a test changes it."""
    old = numba.get_num_threads()
    yield numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(old)


def _problem(shape, sparsity="mixed", seed=0):
    rng = np.random.default_rng(seed)
    n, d_in, d_sae = shape
    return make_x(rng, n, d_in), make_params(rng, d_in, d_sae, sparsity)


def _all_outputs(be, x, p):
    """Every kernel's output on one problem, as a flat list of arrays."""
    f = be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    codes = be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    x_hat = be.decode(codes, p.W_dec, p.b_dec)
    norms = be.decoder_column_norms(p.W_dec)
    sub = be.l1_subgradient(codes, norms, 0.3)
    out = [f, codes.indptr, codes.indices, codes.values, x_hat, be.decode(f, p.W_dec, p.b_dec),
           norms, sub.values]
    for mode in ("weighted_l1", "unit_norm"):
        loss, g = be.gradients(x, p, codes, x_hat, 0.3, mode)
        out += g.arrays() + [np.array([loss.mse, loss.l1])]
    for mode in ("weighted_l1", "unit_norm"):
        pp, st = p.copy(), AdamState.zeros_like(p)
        counts = np.zeros(p.d_sae, np.int64)
        for _ in range(2):
            r = be.train_step(pp, st, x, l1_coefficient=0.3, lr=1e-3, decoder_norm=mode,
                              fire_counts=counts)
            out.append(np.array([r.mse, r.l1, r.l0, r.explained_variance]))
        out += pp.arrays() + st.m.arrays() + st.v.arrays() + [counts]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_identical_over_runs_and_thread_counts(be, threads, shape):
    """Bitwise-identical results run after run and with 1 or all threads
    (every parallel loop owns its outputs and sums in a fixed order)."""
    x, p = _problem(shape)
    numba.set_num_threads(threads)
    first = _all_outputs(be, x, p)
    again = _all_outputs(be, x, p)
    numba.set_num_threads(1)
    single = _all_outputs(be, x, p)
    for a, b, c in zip(first, again, single):
        assert np.array_equal(a, b), "changed between identical runs (race?)"
        assert np.array_equal(a, c), "depends on the thread count"


@pytest.mark.parametrize("sparsity", ["mixed", "none", "all"])
@pytest.mark.parametrize("shape", SHAPES)
def test_encoders_blocks_and_staging(shape, sparsity, threads):
    """Dense and CSR encoders at every block size, including the staging
    overflow path (``k_stage`` smaller than a row's active count)."""
    x, p = _problem(shape, sparsity, seed=3)
    pre, bound = encode_oracle(x, p)
    xc = E.centered(x, p.b_dec)
    n, d_sae = pre.shape
    with NB._blas_single():
        for nt in sorted({1, threads}):
            for rb in (1, 3, 256):
                dense = E.encode_relu_dense(xc, p.W_enc, p.b_enc, rb, nt)
                assert_codes_match(dense, pre, bound, f"dense rb={rb}")
                for k in (1, 4, d_sae):
                    indptr, indices, values, mx = E.encode_relu_csr(xc, p.W_enc, p.b_enc,
                                                                    rb, k, nt)
                    codes = SparseCodes(indptr, indices, values, (n, d_sae))
                    assert np.array_equal(codes.to_dense(), dense), (rb, k, nt)
                    assert mx == (np.diff(indptr).max() if n else 0)


def test_dense_decode_both_paths(be):
    """Dense codes go through CSR when sparse and through BLAS when not."""
    for sparsity in ("mixed", "all"):
        x, p = _problem((40, 12, 50), sparsity, seed=5)
        f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
        ref = f64(f) @ f64(p.W_dec) + f64(p.b_dec)
        got = be.decode(f, p.W_dec, p.b_dec)
        scale = np.abs(f64(f)) @ np.abs(f64(p.W_dec)) + np.abs(f64(p.b_dec))
        assert np.all(np.abs(got - ref) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape", [(1, 6, 9), (300, 24, 70)])
def test_train_step_matches_reference_over_steps(be, shape, decoder_norm):
    """Five steps against the reference in float64 (eps=1e-3, see
    test_contract.test_train_step for why)."""
    x, p = _problem(shape, seed=11)
    if decoder_norm == "unit_norm":
        R.normalize_decoder_rows(p.W_dec)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    z = [np.zeros_like(a) for a in p64.arrays()]
    s64 = AdamState(SAEParams(*[a.copy() for a in z]), SAEParams(*[a.copy() for a in z]), 0)
    kw = dict(l1_coefficient=0.2, lr=1e-3, decoder_norm=decoder_norm, eps=1e-3)
    pp, st = p.copy(), AdamState.zeros_like(p)
    c_ref, c_got = np.zeros(p.d_sae, np.int64), np.zeros(p.d_sae, np.int64)
    for step in range(5):
        want = R.train_step(p64, s64, f64(x), fire_counts=c_ref, **kw)
        got = be.train_step(pp, st, x, fire_counts=c_got, **kw)
        for part in ("mse", "l1", "total"):
            w, g = getattr(want, part), getattr(got, part)
            assert abs(g - w) <= 1e-4 * max(abs(w), 1e-6) + 1e-6, (step, part)
        assert abs(got.l0 - want.l0) <= 1.0 / shape[0] + 1e-9
        assert abs(got.explained_variance - want.explained_variance) <= 1e-3
    assert st.step == 5
    for name in SAEParams.NAMES:
        g, w = getattr(pp, name), getattr(p64, name)
        assert np.max(np.abs(f64(g) - w)) <= 2e-5 + 2e-5 * np.max(np.abs(w)), name
    assert np.array_equal(c_got, c_ref)


def test_blas_limited_inside_and_restored(be):
    """BLAS runs single-threaded inside the kernels (the parallelism is
    Numba's) and its setting is restored afterwards."""
    from threadpoolctl import threadpool_info

    before = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    with NB._blas_single():
        inside = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    x, p = _problem((20, 8, 30))
    be.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    be.train_step(p.copy(), AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3)
    after = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    assert inside and all(t == 1 for t in inside)
    assert after == before


def test_respects_set_num_threads(be, threads):
    """The encoder splits its rows over exactly get_num_threads() parts, so
    a single thread still gives the full answer."""
    x, p = _problem((64, 8, 40), seed=2)
    NB.set_num_threads(1)
    assert numba.get_num_threads() == 1 and NB.get_num_threads() == 1
    one = be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    NB.set_num_threads(None)  # back to the default: NUMBA_NUM_THREADS
    assert NB.get_num_threads() == numba.get_num_threads() == threads
    assert np.array_equal(one, be.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))
    assert "thread" in NB.DESCRIPTION


def test_bad_state_and_counts_raise(be):
    x, p = _problem((4, 3, 5))
    st = AdamState.zeros_like(p)
    st.m.W_enc = st.m.W_enc.astype(np.float64)
    with pytest.raises(TypeError, match="state.m.W_enc"):
        be.train_step(p.copy(), st, x, l1_coefficient=0.1, lr=1e-3)
    with pytest.raises(TypeError, match="fire_counts"):
        be.train_step(p.copy(), AdamState.zeros_like(p), x, l1_coefficient=0.1, lr=1e-3,
                      fire_counts=np.zeros(5, np.float32))
