"""The NumPy reference itself: gradients against central finite differences
in float64, Adam against its textbook formula, and the loss definitions."""

from __future__ import annotations

import numpy as np
import pytest

from fastsae import AdamState, SAEParams
from fastsae import reference as R

from conftest import make_params, make_x


def _loss(x, p, coef, mode):
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    return R.losses(x, p, f, R.decode(f, p.W_dec, p.b_dec), coef, mode).total


def _fd_grad(x, p, coef, mode, name, h=1e-6):
    a = getattr(p, name)
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        up = _loss(x, p, coef, mode)
        a[idx] = old - h
        down = _loss(x, p, coef, mode)
        a[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("mode", ["weighted_l1", "unit_norm"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 3, 5), (7, 5, 11), (9, 6, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_finite_differences(mode, shape, seed):
    rng = np.random.default_rng(seed)
    n, d_in, d_sae = shape
    p = make_params(rng, d_in, d_sae, "mixed", dtype=np.float64)
    p.b_enc += 0.3  # plenty of active features
    x = make_x(rng, n, d_in, dtype=np.float64)
    pre = R.pre_activations(x, p.W_enc, p.b_enc, p.b_dec)
    if np.min(np.abs(pre)) < 1e-4:
        pytest.skip("a pre-activation sits on the ReLU kink")
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    coef = 0.7
    loss, g = R.gradients(x, p, f, R.decode(f, p.W_dec, p.b_dec), coef, mode)
    assert loss.total == pytest.approx(_loss(x, p, coef, mode), rel=1e-12)
    for name in SAEParams.NAMES:
        fd = _fd_grad(x, p, coef, mode, name)
        if mode == "unit_norm" and name == "W_dec":
            # the unit-norm gradient is the projection of the true gradient
            fd = R._project_out_parallel(fd, p.W_dec)
        # central differences with h=1e-6 in float64: truncation ~h^2, rounding ~1e-16/h
        np.testing.assert_allclose(getattr(g, name), fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_unit_norm_gradient_is_orthogonal_to_rows():
    rng = np.random.default_rng(5)
    p = make_params(rng, 6, 9, "mixed", dtype=np.float64)
    p.b_enc += 0.5
    x = make_x(rng, 8, 6, dtype=np.float64)
    f = R.encode_relu(x, p.W_enc, p.b_enc, p.b_dec)
    _, g = R.gradients(x, p, f, R.decode(f, p.W_dec, p.b_dec), 0.1, "unit_norm")
    assert np.max(np.abs(np.sum(g.W_dec * p.W_dec, axis=1))) < 1e-12
    assert np.max(np.abs(g.W_dec)) > 1e-3  # not trivially zero


def test_losses_normalization():
    """mse sums over d_in and averages over rows; l1 likewise."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    x_hat = np.array([[1.0, 0.0], [3.0, 5.0]])
    f = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    W_dec = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    p = SAEParams(np.zeros((2, 3)), np.zeros(3), W_dec, np.zeros(2))
    w = R.losses(x, p, f, x_hat, 0.5, "weighted_l1")
    assert w.mse == pytest.approx((4 + 1) / 2)
    assert w.l1 == pytest.approx(0.5 * (2 * 5 + 1 * 2 + 4 * 2) / 2)
    u = R.losses(x, p, f, x_hat, 0.5, "unit_norm")
    assert u.l1 == pytest.approx(0.5 * (2 + 1 + 4) / 2)
    assert u.total == pytest.approx(u.mse + u.l1)


def test_adam_update_textbook():
    rng = np.random.default_rng(3)
    p = make_params(rng, 3, 4, dtype=np.float64)
    start = p.copy()
    state = AdamState(SAEParams.zeros_like(p), SAEParams.zeros_like(p), 0)
    state = AdamState(SAEParams(*(a.astype(np.float64) for a in state.m.arrays())),
                      SAEParams(*(a.astype(np.float64) for a in state.v.arrays())), 0)
    grads = [SAEParams(*(rng.normal(size=a.shape) for a in p.arrays())) for _ in range(2)]
    lr, b1, b2, eps = 0.01, 0.8, 0.9, 1e-6
    for g in grads:
        R.adam_update(p, g, state, lr, b1, b2, eps)
    assert state.step == 2
    g1, g2 = (g.W_enc for g in grads)
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
    step1 = lr * g1 / (np.abs(g1) + eps)  # m_hat = g, sqrt(v_hat) = |g| on step 1
    step2 = lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
    np.testing.assert_allclose(p.W_enc, start.W_enc - step1 - step2, rtol=1e-12)


def test_train_step_unit_norm_keeps_unit_rows_and_counts_fires():
    rng = np.random.default_rng(4)
    p = make_params(rng, 5, 7)
    R.normalize_decoder_rows(p.W_dec)
    state = AdamState.zeros_like(p)
    x = make_x(rng, 10, 5)
    counts = np.zeros(7, dtype=np.int64)
    res = R.train_step(p, state, x, l1_coefficient=0.1, lr=0.05, decoder_norm="unit_norm",
                       fire_counts=counts)
    np.testing.assert_allclose(np.linalg.norm(p.W_dec, axis=1), 1.0, rtol=1e-6)
    assert counts.sum() == pytest.approx(res.l0 * 10)
    assert state.step == 1


def test_train_step_reduces_loss():
    rng = np.random.default_rng(6)
    p = make_params(rng, 8, 16)
    p.b_enc += 0.4
    state = AdamState.zeros_like(p)
    x = make_x(rng, 64, 8)
    first = R.train_step(p, state, x, l1_coefficient=1e-3, lr=1e-2).total
    for _ in range(50):
        last = R.train_step(p, state, x, l1_coefficient=1e-3, lr=1e-2).total
    assert last < 0.5 * first
