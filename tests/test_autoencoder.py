"""The seed article's stacked Linear+ReLU autoencoder: forward, gradients, training."""

import numpy as np
import pytest

import fastsae
from fastsae import Autoencoder, TrainConfig, Trainer


def _x(n=64, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(size=(n, d))).astype(np.float32)


def test_forward_matches_float64_numpy(backend):
    ae = Autoencoder([4, 3, 2, 3, 4], backend=backend, seed=1)
    x = _x()
    h = x.astype(np.float64)
    for W, b in zip(ae.weights, ae.biases):
        h = np.maximum(h @ W + b, 0)
    np.testing.assert_allclose(ae.forward(x), h, atol=1e-5)
    ae2 = Autoencoder([4, 3, 2, 3, 4], output_relu=False, backend=backend, seed=1)
    h = x.astype(np.float64)
    for i, (W, b) in enumerate(zip(ae2.weights, ae2.biases)):
        h = h @ W + b
        if i < 3:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(ae2.forward(x), h, atol=1e-5)


@pytest.mark.parametrize("output_relu", [True, False])
@pytest.mark.parametrize("sizes", [[4, 3, 2, 3, 4], [5, 7, 5], [3, 2]])
def test_gradients_match_finite_differences(sizes, output_relu):
    """Central differences in float64 (step 1e-6). With these seeds no ReLU
    input lies within the step of its kink, so the loss is smooth there."""
    ae = Autoencoder(sizes, output_relu=output_relu, seed=3)
    x = _x(16, sizes[0], seed=4)
    y = _x(16, sizes[-1], seed=5)
    loss, grads, _ = ae.loss_and_grads(x, y, float64=True)
    h = 1e-6
    for name, p in ae.arrays().items():
        p64 = p.astype(np.float64)
        num = np.zeros_like(p64)
        for idx in np.ndindex(p.shape):
            saved = p[idx]
            # perturb through a float64 copy of the weights
            for sign in (1, -1):
                ae_w = [w.astype(np.float64) for w in ae.weights]
                ae_b = [b.astype(np.float64) for b in ae.biases]
                target = ae_w if name[0] == "W" else ae_b
                target[int(name[1:])][idx] += sign * h
                hs = ae._forward(x.astype(np.float64), ae_w, ae_b,
                                 fastsae.reference.encode_relu, fastsae.reference.decode)
                val = np.sum((hs[-1] - y) ** 2) / x.shape[0]
                num[idx] += sign * val / (2 * h)
            assert p[idx] == saved
        np.testing.assert_allclose(grads[name], num, rtol=1e-5, atol=1e-7, err_msg=name)
    assert loss > 0


def test_mse_gradient_is_2_times_error():
    # single linear layer without ReLU: dL/db = 2 mean_i (Y'_i - Y_i)
    ae = Autoencoder([3, 3], output_relu=False, seed=0)
    x = _x(10, 3)
    loss, grads, out = ae.loss_and_grads(x, float64=True)
    np.testing.assert_allclose(grads["b0"], 2 * (out - x).mean(axis=0), rtol=1e-12)


def test_train_step_reduces_loss_and_trainer_trains_it(tmp_path):
    x = _x(512, 4, seed=7)
    ae = Autoencoder([4, 3, 2, 3, 4], output_relu=True, seed=2)
    st = ae.init_optimizer()
    first = ae.train_step(x, st, lr=1e-2)["mse"]
    for _ in range(200):
        last = ae.train_step(x, st, lr=1e-2)["mse"]
    assert last < 0.7 * first
    ae2 = Autoencoder([4, 3, 2, 3, 4], seed=2)
    cfg = TrainConfig(steps=300, batch_size=64, lr=1e-2, normalize_activations=False,
                      lr_warmup_steps=10, log_every=50)
    res = Trainer(ae2, x, cfg, out_dir=tmp_path).train()
    assert res.history[-1]["mse"] < res.history[0]["mse"]
    assert (tmp_path / "checkpoint.safetensors").exists()
    assert not (tmp_path / "sae").exists()


def test_autoencoder_resume_and_normalization(tmp_path):
    x = _x(256, 4, seed=8) * 30.0
    cfg = TrainConfig(steps=40, batch_size=32, lr=1e-2, checkpoint_every=20, log_every=10)
    a = Autoencoder([4, 3, 4], seed=1)
    ra = Trainer(a, x, cfg, out_dir=tmp_path / "a").train()
    b = Autoencoder([4, 3, 4], seed=1)
    cfg_b = TrainConfig(**{**cfg.to_dict(), "steps": 40})
    tb = Trainer(b, x, cfg_b, out_dir=tmp_path / "b")
    orig = tb.state.step
    calls = {"n": 0}

    def crash(*a_, **k):
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("simulated crash")
        return orig(*a_, **k)
    tb.state.step = crash
    with pytest.raises(RuntimeError, match="simulated"):
        tb.train()
    rb = Trainer.resume(tmp_path / "b", x).train()
    for k, v in ra.model.arrays().items():
        np.testing.assert_array_equal(rb.model.arrays()[k], v)
    # folded for raw inputs: the model's own EV on raw data matches the trainer's
    out = ra.model.forward(x)
    ev = 1 - np.sum((out - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert abs(ev - ra.metrics["explained_variance"]) < 0.05


def test_bad_layer_sizes():
    with pytest.raises(ValueError):
        Autoencoder([4])
    with pytest.raises(ValueError):
        Autoencoder([4, 0, 4])
    ae = Autoencoder([4, 2, 4])
    with pytest.raises(ValueError, match="d_in"):
        ae.forward(np.ones((2, 3), np.float32))
