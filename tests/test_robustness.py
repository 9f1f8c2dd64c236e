"""Bad or extreme input at the kernel front, on every backend: clear errors,
steps that change nothing when they refuse, and losses that are finite or
loud.

Each test states a rule of the contract and checks it on every usable
backend (``numpy`` is the oracle; ``tests/test_cuda_sim.py`` runs this file
for ``cuda`` under the simulator). Shapes are tiny: these are rules about
validation and reporting, not about kernel arithmetic, which the per-backend
suites check against the reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes

from conftest import make_params, make_x

F32_MAX = float(np.finfo(np.float32).max)


def _problem(seed=0, n=6, d_in=5, d_sae=9):
    rng = np.random.default_rng(seed)
    return make_x(rng, n, d_in), make_params(rng, d_in, d_sae, "mixed")


def _host(backend, obj):
    return backend.to_numpy(obj)


# ------------------------------------------------------------ codes
def _codes(indptr, indices, values, shape):
    return SparseCodes(np.asarray(indptr), np.asarray(indices), np.asarray(values), shape)


# indptr arrays a wrapping np.diff let through before (unsigned dtypes)
_BAD_INDPTR = {
    "uint64 jump past nnz": np.array([0, 10**7, 3], np.uint64),
    "uint64 decreasing": np.array([0, 3, 1], np.uint64),
    "uint8 decreasing": np.array([0, 2, 1], np.uint8),
    "int32 decreasing": np.array([0, 3, 1], np.int32),
    "uint64 beyond int64": np.array([0, 2**63 + 5, 3], np.uint64),
}


@pytest.mark.parametrize("case", sorted(_BAD_INDPTR), ids=str)
def test_unsigned_or_decreasing_indptr_is_refused_everywhere(backend, case):
    """Any integer dtype is converted to int64 before the checks, so a
    decrease cannot hide behind unsigned wrap-around: every entry point that
    takes codes refuses them, naming ``indptr``, and nothing reads out of
    bounds (at 96df242 numba's decode read past the arrays)."""
    x, p = _problem(n=2, d_in=3, d_sae=4)
    codes = _codes(_BAD_INDPTR[case], np.array([0, 1, 2], np.int32),
                   np.ones(3, np.float32), (2, 4))
    x_hat = np.zeros_like(x)
    norms = np.ones(4, np.float32)
    calls = {
        "decode": lambda: backend.decode(codes, p.W_dec, p.b_dec),
        "l1_subgradient": lambda: backend.l1_subgradient(codes, norms, 0.1),
        "gradients": lambda: backend.gradients(x, p, codes, x_hat, 0.1),
        "topk_gradients": lambda: backend.topk_gradients(x, p, codes, x_hat),
        "to_dense": codes.to_dense,
        "to_scipy": codes.to_scipy,
        "row_counts": codes.row_counts,
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match="indptr") as err:
            call()
        assert "codes.indptr" in str(err.value), what


def test_any_integer_dtype_is_accepted_and_converted(backend):
    """Valid codes in unsigned or narrow integer dtypes give exactly the
    result of the canonical int64/int32 codes."""
    x, p = _problem(n=3, d_in=4, d_sae=5)
    f = np.zeros((3, 5), np.float32)
    f[0, 1], f[0, 4], f[2, 0] = 0.5, 1.25, 2.0
    canonical = SparseCodes.from_dense(f)
    want = _host(backend, backend.decode(canonical, p.W_dec, p.b_dec))
    for ip_t, ix_t in ((np.uint8, np.uint16), (np.uint64, np.uint64), (np.int16, np.int64)):
        codes = _codes(canonical.indptr.astype(ip_t), canonical.indices.astype(ix_t),
                       canonical.values.astype(np.float64), canonical.shape)
        got = _host(backend, backend.decode(codes, p.W_dec, p.b_dec))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(codes.to_dense(), f)


@pytest.mark.parametrize("indices, message", [
    (np.array([0, 4, 2], np.int64), r"lie in \[0, 4\)"),          # past d_sae
    (np.array([1, 1, 2], np.int32), "strictly increasing"),       # duplicate in a row
    (np.array([2, 1, 0], np.uint32), "strictly increasing"),      # unsorted row
    (np.array([0, 1, 2], np.float32), "integer"),                 # not integers
    (np.array([True, False, True]), "integer"),                   # bool
], ids=["out-of-range", "duplicate", "unsorted", "float", "bool"])
def test_bad_indices_are_refused(backend, indices, message):
    codes = _codes(np.array([0, 3, 3], np.int64), indices, np.ones(3, np.float32), (2, 4))
    _, p = _problem(d_in=3, d_sae=4)
    with pytest.raises((TypeError, ValueError), match=message):
        backend.decode(codes, p.W_dec, p.b_dec)


def test_l1_subgradient_is_zero_at_stored_zeros_and_negatives(backend):
    """The L1 subgradient lives where codes > 0: a stored zero (or negative)
    value gets 0, exactly as the dense path gives (at 96df242 the sparse
    path returned ``l1 * norm`` there)."""
    codes = _codes(np.array([0, 3, 3, 5]), np.array([1, 2, 3, 0, 4], np.int32),
                   np.array([0.5, 0.0, -0.25, 1.5, 0.0], np.float32), (3, 5))
    norms = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    got = _host(backend, backend.l1_subgradient(codes, norms, 0.5))
    np.testing.assert_array_equal(got.indptr, codes.indptr)
    np.testing.assert_array_equal(got.indices, codes.indices)
    np.testing.assert_array_equal(got.values, np.float32([1.0, 0.0, 0.0, 0.5, 0.0]))
    dense = _host(backend, backend.l1_subgradient(codes.to_dense(), norms, 0.5))
    np.testing.assert_array_equal(got.to_dense(), dense)


# ------------------------------------------------------------ all-or-nothing steps
def _step_inputs(seed=1):
    x, p = _problem(seed)
    return x, p, AdamState.zeros_like(p), np.zeros(p.d_sae, np.int64)


def _snapshot(p, st, fc):
    arrays = list(p.arrays()) + list(st.m.arrays()) + list(st.v.arrays()) + [fc]
    return [a.tobytes() for a in arrays] + [st.step]


def _variants():
    """(name, mutate) pairs: each makes one argument of a step bad; the
    mutation returns the kwargs to override."""
    def read_only(attr):
        def f(x, p, st, fc):
            getattr(st.v, attr).flags.writeable = False
            return {}
        return f

    def alias_moments(x, p, st, fc):
        st.v.b_dec = st.m.b_dec  # the same array for two moments
        return {}

    def alias_param_moment(x, p, st, fc):
        st.m.W_dec = p.W_dec
        return {}

    def alias_x(x, p, st, fc):
        return {"x": p.W_dec[:, :x.shape[1]][: x.shape[0]]}  # a view of a parameter

    def wrong_fire_counts(x, p, st, fc):
        return {"fire_counts": fc.astype(np.int32)}

    def nan_x(x, p, st, fc):
        y = x.copy()
        y[-1, -1] = np.nan
        return {"x": y}

    def bad_lr(x, p, st, fc):
        return {"lr": float("nan")}

    def fortran_moment(x, p, st, fc):
        st.m.W_enc = np.asfortranarray(st.m.W_enc)
        return {}

    return [("read-only last moment", read_only("b_dec")),
            ("read-only W_enc moment", read_only("W_enc")),
            ("aliased moments", alias_moments), ("moment aliases a parameter",
                                                 alias_param_moment),
            ("x aliases a parameter", alias_x), ("int32 fire_counts", wrong_fire_counts),
            ("NaN in x", nan_x), ("NaN lr", bad_lr), ("Fortran-order moment", fortran_moment)]


@pytest.mark.parametrize("kind", ["relu", "topk"])
@pytest.mark.parametrize("name, mutate", _variants(), ids=[v[0] for v in _variants()])
def test_a_refused_step_changes_nothing(backend, kind, name, mutate):
    """Every argument a step writes (or reads while writing) is checked
    before anything is touched: the step raises a TypeError/ValueError and
    parameters, Adam state, its step counter and the fire counts are byte
    for byte what they were (at 96df242 a read-only moment made the numpy
    step raise after half the update, and aliased arrays were accepted)."""
    if backend.name == "cuda" and name.startswith(("read-only", "Fortran")):
        pytest.skip("device arrays have no host flags; covered on the CPU backends")
    x, p, st, fc = _step_inputs()
    over = mutate(x, p, st, fc)
    kwargs = {"x": x, "fire_counts": fc, "lr": 1e-2}
    kwargs.update(over)
    fc_used = kwargs["fire_counts"]
    before = _snapshot(p, st, fc_used)
    with pytest.raises((TypeError, ValueError)):
        if kind == "relu":
            backend.train_step(p, st, kwargs.pop("x"), l1_coefficient=0.1, **kwargs)
        else:
            backend.train_step_topk(p, st, kwargs.pop("x"), k=3, **kwargs)
    assert _snapshot(p, st, fc_used) == before


def test_aliasing_error_names_both_arrays(backend):
    x, p, st, fc = _step_inputs()
    st.v.b_dec = st.m.b_dec
    with pytest.raises(ValueError, match=r"state\.m\.b_dec and state\.v\.b_dec share memory"):
        backend.train_step(p, st, x, l1_coefficient=0.1, lr=1e-3)


# ------------------------------------------------------------ finite or loud
def _dead_nan_params(p: SAEParams, where: str) -> None:
    """A NaN/inf in the parameters of a feature that never fires (its bias
    far below every pre-activation), so no code, decode or gradient the
    forward pass makes touches it."""
    p.b_enc[3] = -1e6
    if where == "W_enc":
        p.W_enc[0, 3] = np.nan
    elif where == "W_dec":
        p.W_dec[3, 1] = np.inf
    else:
        p.b_enc[3] = np.nan


@pytest.mark.parametrize("where", ["W_enc", "W_dec", "b_enc"])
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_non_finite_parameters_give_a_non_finite_loss(backend, kind, where):
    """A non-finite parameter is reported by the step that sees it, on every
    backend, even in a feature that never fires: the fused Adam pass, which
    writes every parameter anyway, counts the non-finite ones (at 96df242
    numba and cython reported a finite loss and trained on)."""
    x, p = _problem(2)
    _dead_nan_params(p, where)
    p, st = backend.to_backend(p), backend.to_backend(AdamState.zeros_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the oracle's NaN arithmetic
        if kind == "relu":
            r = backend.train_step(p, st, x, l1_coefficient=0.1, lr=1e-3)
        else:
            r = backend.train_step_topk(p, st, x, k=3, activation=kind, lr=1e-3)
    assert not np.isfinite(r.total), r
    assert not np.isfinite(r.mse), r


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_overflowing_inputs_give_a_non_finite_loss(backend, kind):
    """Finite rows of 1e30 overflow float32 (squared errors of 1e60): the
    step must not report a finite loss (at 96df242 numba and cython reported
    about 1e59 while the parameters became inf/NaN)."""
    x, p = _problem(3)
    x[:2] = 1e30
    p, st = backend.to_backend(p), backend.to_backend(AdamState.zeros_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if kind == "relu":
            r = backend.train_step(p, st, x, l1_coefficient=0.1, lr=1e-3)
        else:
            r = backend.train_step_topk(p, st, x, k=3, lr=1e-3)
    assert not np.isfinite(r.total), r


def test_a_loss_past_float32_is_reported_as_inf(backend):
    """``gradients`` with a reconstruction 1e20 away from the batch: each
    squared error overflows float32, so the loss is inf on every backend
    (float64 sums would otherwise report 1e40)."""
    x, p = _problem(4)
    codes = backend.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    x_hat = np.asarray(_host(backend, backend.decode(codes, p.W_dec, p.b_dec))) + 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, _ = backend.gradients(x, p, codes, x_hat.astype(np.float32), 0.1)
        tloss, _ = backend.topk_gradients(x, p, codes, x_hat.astype(np.float32))
    assert loss.mse == np.inf and loss.total == np.inf
    assert tloss.mse == np.inf and tloss.total == np.inf


def test_a_finite_loss_stays_as_measured(backend):
    """The float32-range rule changes nothing below the range: a huge but
    representable loss is reported as measured."""
    x, p = _problem(5)
    codes = backend.encode_relu_sparse(x, p.W_enc, p.b_enc, p.b_dec)
    x_hat = np.asarray(_host(backend, backend.decode(codes, p.W_dec, p.b_dec))) + 1e15
    loss, _ = backend.gradients(x, p, codes, x_hat.astype(np.float32), 0.0)
    assert np.isfinite(loss.mse) and 1e30 < loss.mse < F32_MAX


# ------------------------------------------------------------ huge finite inputs
def test_encoders_on_huge_finite_inputs(backend):
    """Documented behaviour (``Backend.encode_relu``): inputs are finite
    (checked), the product is float32, so a pre-activation past float32's
    range is ``+inf`` (a code of ``inf``) or ``-inf`` (no code). One whose
    terms overflow with both signs is ``+inf``, ``-inf`` or NaN depending on
    the summation order (BLAS kernels and FMA differ), and NaN never fires:
    that entry is 0 or inf, never NaN. Everything else equals the reference
    on every encoder of every backend."""
    rng = np.random.default_rng(6)
    d_in, d_sae = 4, 6
    W = np.zeros((d_in, d_sae), np.float32)
    W[:, 0] = 2.0                       # +inf for a row of +3e38
    W[:, 1] = -2.0                      # -inf
    W[:, 2] = 2.0                       # +inf and -inf terms for the mixed row
    W[:, 3:] = rng.standard_normal((d_in, 3)).astype(np.float32) * 1e-3
    b_enc = np.full(d_sae, 0.5, np.float32)
    b_dec = np.zeros(d_in, np.float32)
    x = np.ones((3, d_in), np.float32)
    x[0] = 3e38
    x[1, :2], x[1, 2:] = 3e38, -3e38    # mixed signs
    R = fastsae.get_backend("numpy")
    thr = np.full(d_sae, 0.25, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = R.encode_relu(x, W, b_enc, b_dec)
        got = {"encode_relu": _host(backend, backend.encode_relu(x, W, b_enc, b_dec)),
               "encode_relu_sparse": _host(backend, backend.encode_relu_sparse(
                   x, W, b_enc, b_dec)).to_dense(),
               "encode_jumprelu": _host(backend, backend.encode_jumprelu(
                   x, W, b_enc, b_dec, thr)).to_dense()}
        topk = {k: _host(backend, getattr(backend, k)(x, W, b_enc, b_dec, 2)).to_dense()
                for k in ("encode_topk", "encode_batchtopk")}
        topk_want = {k: getattr(R, k)(x, W, b_enc, b_dec, 2).to_dense() for k in topk}
    assert want[0, 0] == np.inf and want[0, 1] == 0 and want[0, 2] == np.inf
    mixed = np.zeros(want.shape, bool)
    mixed[1, :3] = True                 # order-dependent: compared by the rule only
    for name, a in {**got, **topk}.items():
        assert not np.isnan(a).any(), name
        assert set(a[mixed].tolist()) <= {0.0, np.inf}, name
    # finite entries: sums of 4 terms, float32 rounding may differ by an ulp
    for name, a in got.items():
        np.testing.assert_allclose(a[~mixed], want[~mixed], rtol=1e-6, err_msg=name)
    for name, a in topk.items():
        # a selection depends on the whole row (TopK) or batch (BatchTopK):
        # compared where no mixed entry takes part
        if name == "encode_topk":
            np.testing.assert_allclose(a[[0, 2]], topk_want[name][[0, 2]], rtol=1e-6,
                                       err_msg=name)
        elif (got["encode_relu"][mixed] == want[mixed]).all():
            np.testing.assert_allclose(a, topk_want[name], rtol=1e-6, err_msg=name)


# ------------------------------------------------------------ dense codes
@pytest.mark.parametrize("fn", ["gradients", "topk_gradients"])
def test_dense_codes_give_what_sparse_codes_give(backend, fn):
    """The contract takes codes dense or as SparseCodes (and AuxK codes the
    same way): both give the same losses and gradients (numba and cuda
    raised AttributeError on dense codes in topk_gradients; found by the
    fuzz suite)."""
    x, p = _problem(7)
    sparse = backend.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, 3)
    dense = _host(backend, sparse).to_dense()
    x_hat = np.asarray(_host(backend, backend.decode(sparse, p.W_dec, p.b_dec)))
    if fn == "gradients":
        out_s = backend.gradients(x, p, sparse, x_hat, 0.1)
        out_d = backend.gradients(x, p, dense, x_hat, 0.1)
    else:
        aux_s = backend.encode_topk(x, p.W_enc, p.b_enc - 0.5, p.b_dec, 2)
        aux_d = _host(backend, aux_s).to_dense()
        out_s = backend.topk_gradients(x, p, sparse, x_hat, aux_s, 0.25)
        out_d = backend.topk_gradients(x, p, dense, x_hat, aux_d, 0.25)
    (ls, gs), (ld, gd) = out_s, out_d
    assert ls.total == pytest.approx(ld.total, rel=1e-6)
    for a, b in zip(_host(backend, gs).arrays(), _host(backend, gd).arrays()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
