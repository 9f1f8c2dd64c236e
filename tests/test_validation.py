"""Bad input gets a clear TypeError/ValueError on every backend, never a
crash or garbage; float64 and non-contiguous inputs are accepted."""

from __future__ import annotations

import numpy as np
import pytest

from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R

from conftest import make_params, make_x


@pytest.fixture
def prob():
    rng = np.random.default_rng(0)
    p = make_params(rng, 6, 10)
    x = make_x(rng, 5, 6)
    return x, p


def _enc(backend, x_, p, **over):
    args = dict(x=x_, W_enc=p.W_enc, b_enc=p.b_enc, b_dec=p.b_dec)
    args.update(over)
    return backend.encode_relu(**args)


BAD_ARRAYS = [
    ("int dtype", lambda a: a.astype(np.int32), TypeError, "floating-point dtype"),
    ("complex dtype", lambda a: a.astype(np.complex64), TypeError, "floating-point dtype"),
    ("object dtype", lambda a: a.astype(object), TypeError, "floating-point dtype"),
    ("bool dtype", lambda a: a > 0, TypeError, "floating-point dtype"),
    ("string", lambda a: "abc", TypeError, "floating-point dtype"),
    ("nan", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a), ValueError,
     "NaN or infinite"),
    ("inf", lambda a: np.where(np.arange(a.size).reshape(a.shape) == a.size - 1, np.inf, a),
     ValueError, "NaN or infinite"),
    ("extra dim", lambda a: a[None], ValueError, "-D, got shape"),
    ("empty", lambda a: a[:0], ValueError, "must not be empty"),
]


@pytest.mark.parametrize("which", ["x", "W_enc", "b_enc", "b_dec"])
@pytest.mark.parametrize("case", BAD_ARRAYS, ids=[c[0] for c in BAD_ARRAYS])
def test_encode_rejects_bad_arrays(backend, prob, which, case):
    x, p = prob
    _, mutate, exc, msg = case
    arr = {"x": x, "W_enc": p.W_enc, "b_enc": p.b_enc, "b_dec": p.b_dec}[which]
    with pytest.raises(exc, match=msg) as info:
        _enc(backend, x, p, **{which: mutate(arr)})
    assert which in str(info.value)
    with pytest.raises(exc, match=msg):
        backend.encode_relu_sparse(**{"x": x, "W_enc": p.W_enc, "b_enc": p.b_enc,
                                      "b_dec": p.b_dec, which: mutate(arr)})


def test_mismatched_dimensions(backend, prob):
    x, p = prob
    with pytest.raises(ValueError, match=r"x has d_in \(shape\[1\]\) = 5, expected 6"):
        _enc(backend, x[:, :5], p)
    with pytest.raises(ValueError, match="b_enc has length = 9, expected 10"):
        _enc(backend, x, p, b_enc=p.b_enc[:9])
    with pytest.raises(ValueError, match="b_dec has length"):
        _enc(backend, x, p, b_dec=p.b_dec[:3])
    with pytest.raises(ValueError, match="codes has d_sae"):
        backend.decode(np.ones((5, 9), np.float32), p.W_dec, p.b_dec)
    with pytest.raises(ValueError, match="b_dec has length"):
        backend.decode(np.ones((5, 10), np.float32), p.W_dec, p.b_dec[:2])
    with pytest.raises(ValueError, match="norms"):
        backend.l1_subgradient(np.ones((5, 10), np.float32), np.ones(9, np.float32), 0.1)


def test_float64_and_noncontiguous_are_accepted(backend, prob):
    x, p = prob
    want = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    got64 = backend.to_numpy(backend.encode_relu(x.astype(np.float64), p.W_enc.astype(np.float64),
                                                 p.b_enc, p.b_dec))
    assert got64.dtype == np.float32
    np.testing.assert_allclose(got64, want, rtol=1e-5, atol=1e-6)
    W_f = np.asfortranarray(p.W_enc)
    x_strided = np.repeat(x, 2, axis=0)[::2]
    assert not x_strided.flags.c_contiguous and not W_f.flags.c_contiguous
    got = backend.to_numpy(backend.encode_relu(x_strided, W_f, p.b_enc, p.b_dec))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    W_dec_t = np.ascontiguousarray(p.W_dec.T).T  # Fortran-ordered view
    got = backend.to_numpy(backend.decode(want, W_dec_t, p.b_dec))
    np.testing.assert_allclose(got, R.decode(want, p.W_dec, p.b_dec), rtol=1e-5, atol=1e-5)


def _codes(p, x):
    return SparseCodes.from_dense(R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec))


CORRUPT = [
    ("index out of range", lambda c: (c.indptr, np.where(np.arange(c.indices.size) == 0, 10,
                                                         c.indices).astype(np.int32), c.values),
     "indices must lie in"),
    ("negative index", lambda c: (c.indptr, np.where(np.arange(c.indices.size) == 0, -1,
                                                     c.indices).astype(np.int32), c.values),
     "indices must lie in"),
    ("indptr too short", lambda c: (c.indptr[:-1], c.indices, c.values), "N \\+ 1"),
    ("indptr past nnz", lambda c: (c.indptr + np.r_[0, np.ones(c.indptr.size - 1, np.int64)],
                                   c.indices, c.values), "indptr must start at 0"),
    ("values short", lambda c: (c.indptr, c.indices, c.values[:-1]), "indices but"),
    ("nan value", lambda c: (c.indptr, c.indices, np.full_like(c.values, np.nan)), "NaN"),
    ("unsorted row", lambda c: (c.indptr, _swap_first_row(c), c.values), "strictly increasing"),
    ("float indices", lambda c: (c.indptr, c.indices.astype(np.float32), c.values),
     "integer array"),
]


def _swap_first_row(c):
    idx = c.indices.copy()
    s, e = c.indptr[0], c.indptr[1]
    idx[s:e] = idx[s:e][::-1]
    return idx


@pytest.mark.parametrize("case", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_sparse_codes_rejected(backend, prob, case):
    x, p = prob
    p.b_enc[:] = 1.0  # every row has several active features
    c = _codes(p, x)
    assert c.indptr[1] - c.indptr[0] >= 2
    bad = SparseCodes(*case[1](c), c.shape)
    with pytest.raises((ValueError, TypeError), match=case[2]):
        backend.decode(bad, p.W_dec, p.b_dec)
    with pytest.raises((ValueError, TypeError), match=case[2]):
        backend.l1_subgradient(bad, np.ones(10, np.float32), 0.1)


def test_bad_scalars_and_modes(backend, prob):
    x, p = prob
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    xh = R.decode(f, p.W_dec, p.b_dec)
    norms = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="l1_coefficient must be >= 0"):
        backend.l1_subgradient(f, norms, -1.0)
    with pytest.raises(ValueError, match="finite"):
        backend.l1_subgradient(f, norms, float("nan"))
    with pytest.raises(TypeError, match="real number"):
        backend.l1_subgradient(f, norms, "0.1")
    with pytest.raises(ValueError, match="decoder_norm must be one of"):
        backend.gradients(x, p, f, xh, 0.1, "l2")
    with pytest.raises(ValueError, match=r"x_hat must have shape \(N, d_out\)"):
        backend.gradients(x, p, f, xh[:, :3], 0.1)
    with pytest.raises(ValueError, match="codes have 4 rows"):
        backend.gradients(x, p, f[:4], xh, 0.1)
    with pytest.raises(TypeError, match="SAEParams"):
        backend.gradients(x, p.as_dict(), f, xh, 0.1)
    bad = SAEParams(p.W_enc, p.b_enc, p.W_dec.T.copy(), p.b_dec)
    with pytest.raises(ValueError, match=r"W_dec must have shape \(d_sae, d_out\)"):
        backend.gradients(x, bad, f, xh, 0.1)


def test_train_step_rejects_bad_input(backend, prob):
    x, p = prob
    bp = backend.to_backend(p.copy())
    st = backend.to_backend(AdamState.zeros_like(p))
    kw = dict(l1_coefficient=0.1, lr=1e-3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        backend.train_step(bp, st, np.full_like(x, np.nan), **kw)
    with pytest.raises(ValueError, match="d_in"):
        backend.train_step(bp, st, x[:, :4], **kw)
    with pytest.raises(ValueError, match="beta1 must be < 1"):
        backend.train_step(bp, st, x, beta1=1.0, **kw)
    with pytest.raises(ValueError, match="eps must be > 0"):
        backend.train_step(bp, st, x, eps=0.0, **kw)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        backend.train_step(bp, st, x, l1_coefficient=0.1, lr=-1.0)
    with pytest.raises(TypeError, match="AdamState"):
        backend.train_step(bp, None, x, **kw)
    with pytest.raises(ValueError, match="fire_counts must have shape"):
        backend.train_step(bp, st, x, fire_counts=np.zeros(3, np.int64), **kw)
    if backend.name != "cuda":
        p64 = SAEParams(p.W_enc.astype(np.float64), p.b_enc, p.W_dec, p.b_dec)
        with pytest.raises(TypeError, match="updated in place"):
            backend.train_step(p64, st, x, **kw)
    assert st.step == 0  # nothing ran


def test_train_step_rejects_bad_state_and_counts(backend, prob):
    x, p = prob
    if backend.name == "cuda":
        pytest.skip("device state is checked by shape only")
    bp = p.copy()
    kw = dict(l1_coefficient=0.1, lr=1e-3)
    st = AdamState.zeros_like(p)
    st.m.W_enc = st.m.W_enc[:, :3].copy()
    with pytest.raises(ValueError, match=r"state.m.W_enc must have shape \(6, 10\)"):
        backend.train_step(bp, st, x, **kw)
    st = AdamState.zeros_like(p)
    st.v.b_dec = st.v.b_dec.astype(np.float64)
    with pytest.raises(TypeError, match=r"state.v.b_dec must be a C-contiguous float32"):
        backend.train_step(bp, st, x, **kw)
    st = AdamState.zeros_like(p)
    st.step = -1
    with pytest.raises(ValueError, match="state.step"):
        backend.train_step(bp, st, x, **kw)
    st = AdamState.zeros_like(p)
    with pytest.raises(TypeError, match="int64"):
        backend.train_step(bp, st, x, fire_counts=np.zeros(10, np.int32), **kw)
    with pytest.raises(TypeError, match="int64"):
        backend.train_step(bp, st, x, fire_counts=[0] * 10, **kw)
    with pytest.raises(TypeError, match="state.m.W_dec"):
        bad = AdamState.zeros_like(p)
        bad.m.W_dec = np.asfortranarray(bad.m.W_dec)
        backend.train_step_topk(bp, bad, x, k=2, lr=1e-3)
    with pytest.raises(TypeError, match="dead_mask must be a bool"):
        backend.train_step_topk(bp, st, x, k=2, lr=1e-3, dead_mask=np.zeros(10),
                                k_aux=2, aux_coefficient=0.1)
    with pytest.raises(ValueError, match="activation must be"):
        backend.train_step_topk(bp, st, x, k=2, lr=1e-3, activation="relu")
    with pytest.raises(ValueError, match="k must be >= 1"):
        backend.train_step_topk(bp, st, x, k=0, lr=1e-3)
    assert st.step == 0
    np.testing.assert_array_equal(bp.W_enc, p.W_enc)  # nothing was updated


@pytest.mark.parametrize("where", ["params.W_dec", "params.b_enc", "state.m.b_dec",
                                   "state.v.W_enc"])
@pytest.mark.parametrize("step", ["relu", "topk"])
def test_read_only_parameters_or_moments_are_refused_before_any_update(backend, prob, where,
                                                                       step):
    """A training step updates parameters and moments in place: a read-only
    one is refused, naming it, before anything is written."""
    x, p = prob
    bp, st = p.copy(), AdamState.zeros_like(p)
    part, name = where.rsplit(".", 1)
    owner = {"params": bp, "state.m": st.m, "state.v": st.v}[part]
    getattr(owner, name).flags.writeable = False
    before = [a.copy() for a in bp.arrays()] + [a.copy() for a in st.m.arrays()]
    with pytest.raises(ValueError, match=rf"{where} is read-only"):
        if step == "relu":
            backend.train_step(bp, st, x, l1_coefficient=0.1, lr=1e-3)
        else:
            backend.train_step_topk(bp, st, x, k=2, lr=1e-3)
    assert st.step == 0
    for a, b in zip(list(bp.arrays()) + list(st.m.arrays()), before):
        np.testing.assert_array_equal(a, b)
