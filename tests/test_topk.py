"""TopK / BatchTopK / JumpReLU encoders and the TopK training step: the
reference against finite differences, and every backend that implements the
family against the float64 oracle (selection checked up to float32 ties)."""

from __future__ import annotations

import numpy as np
import pytest

from fastsae import AdamState, SAEParams, SparseCodes
from fastsae import reference as R

from conftest import encode_oracle, f64, make_params, make_x, shapes_for



# ------------------------------------------------------------ reference
def _topk_loss(x, p, k, dead, k_aux, w, e0, activation="topk"):
    enc = R.encode_topk if activation == "topk" else R.encode_batchtopk
    c = enc(x, p.W_enc, p.b_enc, p.b_dec, k)
    xh = R.decode(c, p.W_dec, p.b_dec)
    loss = np.sum((xh - x) ** 2) / x.shape[0]
    if w:
        a = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, k_aux).to_dense()
        loss += w * np.sum((a @ p.W_dec - e0) ** 2) / x.shape[0]
    return loss


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_topk_gradients_finite_differences(activation, aux, seed):
    """AuxK's target e = x - x_hat is held constant (as in the paper), so the
    finite differences use the e of the unperturbed parameters."""
    rng = np.random.default_rng(seed)
    n, d_in, d_sae, k = 6, 4, 9, 3
    p = make_params(rng, d_in, d_sae, "mixed", dtype=np.float64)
    p.b_enc += 0.6
    x = make_x(rng, n, d_in, dtype=np.float64)
    dead = np.zeros(d_sae, bool)
    dead[[1, 4, 6, 7]] = True
    enc = R.encode_topk if activation == "topk" else R.encode_batchtopk
    codes = enc(x, p.W_enc, p.b_enc, p.b_dec, k)
    x_hat = R.decode(codes, p.W_dec, p.b_dec)
    w = R.aux_scale(dead, 2, 0.5) if aux else 0.0
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 2) if aux else None
    loss, g = R.topk_gradients(x, p, codes, x_hat, aux_codes, w)
    e0 = x - x_hat
    assert loss.total == pytest.approx(_topk_loss(x, p, k, dead, 2, w, e0, activation))
    h = 1e-6
    for name in SAEParams.NAMES:
        a = getattr(p, name)
        fd = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            up = _topk_loss(x, p, k, dead, 2, w, e0, activation)
            a[idx] = old - h
            down = _topk_loss(x, p, k, dead, 2, w, e0, activation)
            a[idx] = old
            fd[idx] = (up - down) / (2 * h)
        if name == "W_dec":
            fd = R._project_out_parallel(fd, p.W_dec)
        np.testing.assert_allclose(getattr(g, name), fd, rtol=1e-6, atol=1e-6, err_msg=name)


def test_reference_topk_semantics():
    x = np.zeros((2, 1), np.float32)
    W = np.zeros((1, 5), np.float32)
    b = np.array([1.0, 3.0, 3.0, -1.0, 3.0], np.float32)
    c = R.encode_topk(x, W, b, np.zeros(1, np.float32), 2)
    assert c.indices.tolist() == [1, 2, 1, 2]  # ties: lower index wins
    c = R.encode_topk(x, W, b, np.zeros(1, np.float32), 5)
    assert c.row_counts().tolist() == [4, 4]  # the negative one is dropped by ReLU
    c = R.encode_batchtopk(x, W, b, np.zeros(1, np.float32), 2)  # 4 of 10, ties by flat index
    assert c.to_dense().tolist() == [[0, 3, 3, 0, 3], [0, 3, 0, 0, 0]]
    c = R.encode_jumprelu(x, W, b, np.zeros(1, np.float32), np.array([0, 3, 2, -5, 2.5],
                                                                       np.float32))
    assert c.to_dense().tolist() == [[1, 0, 3, 0, 3]] * 2  # strict >, and ReLU


# ------------------------------------------------------------ every backend
def _tie_problem(backend, idx, seed=0):
    shapes = shapes_for(backend.name)
    n, d_in, d_sae = shapes[idx % len(shapes)]
    rng = np.random.default_rng(seed + 17 * idx)
    p = make_params(rng, d_in, d_sae, "mixed")
    p.b_enc += 0.4
    if d_sae >= 4:  # exact ties: zero encoder columns with equal biases give pre == bias
        p.W_enc[:, -3:] = 0
        p.b_enc[-3:] = 0.25
    return make_x(rng, n, d_in), p


def _check_selection(got: SparseCodes, pre, bound, per_row_k=None, total_k=None):
    """``got`` selects the top entries of ``pre`` up to float32 error: values
    match, every kept entry is at least the oracle's cut-off minus the error
    bound, and nothing clearly above the cut-off is missing."""
    d = got.to_dense()
    err = np.abs(f64(d) - np.where(d > 0, pre, 0))
    assert np.all(err <= bound), "selected values differ from the pre-activations"
    slack = 2 * bound.max()
    if per_row_k is not None:
        k = min(per_row_k, pre.shape[1])
        cut = -np.sort(-pre, axis=1)[:, k - 1:k]
        assert np.all(got.row_counts() <= k)
    else:
        kk = min(total_k, pre.size)
        cut = np.full((pre.shape[0], 1), -np.sort(-pre.ravel())[kk - 1])
        assert got.nnz <= kk
    assert np.all(pre[d > 0] >= np.broadcast_to(cut, pre.shape)[d > 0] - slack)
    missing = (d == 0) & (pre > np.maximum(cut, 0) + slack)
    assert not missing.any(), "an entry clearly in the top set was not selected"


@pytest.mark.parametrize("k", [1, 3, 64])
@pytest.mark.parametrize("idx", range(9))
def test_encode_topk(backend, idx, k):
    x, p = _tie_problem(backend, idx)
    pre, bound = encode_oracle(x, p)
    ref = R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k)
    for _ in range(3):
        got = backend.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k).to_host()
        _check_selection(got, pre, bound, per_row_k=k)
        # where the oracle's selection is clear of float32 ties, it must be identical
        srt = -np.sort(-pre, axis=1)
        kk = min(k, pre.shape[1])
        clear = (kk == pre.shape[1]) or np.all(srt[:, kk - 1] - srt[:, kk] > 2 * bound.max())
        if clear:
            assert np.array_equal(got.indices, ref.indices)
            assert np.array_equal(got.indptr, ref.indptr)


def test_encode_topk_exact_ties_pick_lowest_index(backend):
    x = np.ones((3, 2), np.float32)
    W = np.zeros((2, 6), np.float32)
    b = np.array([0.5, 2.0, 2.0, 2.0, 1.0, 2.0], np.float32)
    got = backend.encode_topk(x, W, b, np.zeros(2, np.float32), 3).to_host()
    assert got.indices.tolist() == [1, 2, 3] * 3
    got = backend.encode_batchtopk(x, W, b, np.zeros(2, np.float32), 2).to_host()
    # 6 of 18 entries; the 12 tied 2.0s in row-major order
    assert got.to_dense().tolist() == [[0, 2, 2, 2, 0, 2], [0, 2, 2, 0, 0, 0], [0] * 6]


@pytest.mark.parametrize("k", [1, 4, 50])
@pytest.mark.parametrize("idx", range(9))
def test_encode_batchtopk(backend, idx, k):
    x, p = _tie_problem(backend, idx, seed=3)
    pre, bound = encode_oracle(x, p)
    for _ in range(3):
        got = backend.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k).to_host()
        _check_selection(got, pre, bound, total_k=k * x.shape[0])


@pytest.mark.parametrize("idx", range(9))
def test_encode_jumprelu(backend, idx):
    x, p = _tie_problem(backend, idx, seed=5)
    pre, bound = encode_oracle(x, p)
    thr = np.random.default_rng(idx).uniform(-0.5, 1.0, p.d_sae).astype(np.float32)
    got = backend.encode_jumprelu(x, p.W_enc, p.b_enc, p.b_dec, thr).to_host()
    d = got.to_dense()
    keep = (pre > thr[None, :]) & (pre > 0)
    clear = np.abs(pre - np.maximum(thr[None, :], 0)) > bound
    assert np.array_equal((d > 0)[clear], keep[clear])
    assert np.all(np.abs(f64(d) - np.where(d > 0, pre, 0)) <= bound)


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("idx", [2, 5, 6, 7])
def test_topk_gradients(backend, idx, aux):
    x, p = _tie_problem(backend, idx, seed=7)
    codes = R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, 4)
    x_hat = R.decode(codes, p.W_dec, p.b_dec).astype(np.float32)
    dead = np.arange(p.d_sae) % 3 == 0
    aux_codes = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dead, 2) if aux else None
    w = R.aux_scale(dead, 2, 1 / 32) if aux else 0.0
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    c64 = SparseCodes(codes.indptr, codes.indices, f64(codes.values), codes.shape)
    a64 = None if aux_codes is None else SparseCodes(aux_codes.indptr, aux_codes.indices,
                                                     f64(aux_codes.values), aux_codes.shape)
    ref_loss, ref_g = R.topk_gradients(f64(x), p64, c64, f64(x_hat), a64, w)
    loss, g = backend.topk_gradients(x, p, codes, x_hat, aux_codes, w)
    g = backend.to_numpy(g)
    k = 2 * max(x.shape[0], p.d_in, p.d_sae)
    scale = np.max(np.abs(f64(codes.to_dense()).T @ (f64(x_hat) - f64(x)))) * 2 / x.shape[0]
    for name in SAEParams.NAMES:
        want = getattr(ref_g, name)
        tol = 8 * (k + 4) * 2.0 ** -24 * max(np.max(np.abs(want)), scale, 1e-30)
        assert np.max(np.abs(f64(getattr(g, name)) - want)) <= tol, name
    assert loss.aux == pytest.approx(ref_loss.aux, rel=1e-4, abs=1e-7)
    assert loss.total == pytest.approx(ref_loss.total, rel=1e-4)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("idx", [2, 5, 7])
def test_train_step_topk(backend, idx, activation, aux):
    """Three steps against the float64 reference (Adam eps 1e-3: see
    test_contract.test_train_step for why)."""
    x, p = _tie_problem(backend, idx, seed=11)
    m = min(3, p.d_sae)  # no exact ties: training moves them anyway
    p.W_enc[:, -m:] += 0.01 * np.arange(1, m + 1)
    R.normalize_decoder_rows(p.W_dec)
    dead = np.arange(p.d_sae) % 4 == 1
    kw = dict(k=3, activation=activation, lr=1e-3, eps=1e-3,
              dead_mask=dead if aux else None, k_aux=2 if aux else 0,
              aux_coefficient=1 / 32 if aux else 0.0)
    p64 = SAEParams(*(f64(a) for a in p.arrays()))
    s64 = AdamState(SAEParams(*(np.zeros_like(a) for a in p64.arrays())),
                    SAEParams(*(np.zeros_like(a) for a in p64.arrays())), 0)
    bp = backend.to_backend(p.copy())
    bs = backend.to_backend(AdamState.zeros_like(p))
    c_ref = np.zeros(p.d_sae, np.int64)
    c_got = backend.to_backend(np.zeros(p.d_sae, np.int64))
    bdead = backend.to_backend(dead) if aux else None
    for step in range(3):
        ref = R.train_step_topk(p64, s64, f64(x), fire_counts=c_ref, **kw)
        got = backend.train_step_topk(bp, bs, x, fire_counts=c_got,
                                      **{**kw, "dead_mask": bdead})
        for part in ("mse", "total", "aux", "l0"):
            assert getattr(got, part) == pytest.approx(getattr(ref, part), rel=1e-4,
                                                       abs=1e-6), (step, part)
        assert got.extra["min_active"] == pytest.approx(ref.extra["min_active"], rel=1e-4,
                                                        abs=1e-6)
    hp = backend.to_numpy(bp)
    for name in SAEParams.NAMES:
        want = getattr(p64, name)
        assert np.max(np.abs(f64(getattr(hp, name)) - want)) <= 1e-5 + 1e-5 * np.max(
            np.abs(want)), name
    assert np.array_equal(backend.to_numpy(c_got), c_ref)
    assert backend.to_numpy(bs).step == 3
