"""JumpReLU's quadratic sparsity mode centred on target L0s 8, 32 and 128 on the
built-in synthetic problem, with the thresholds learned as fastsae learns
them (Adam on ``log(threshold)``) and as SAELens 6.54 does (Adam on
``threshold`` itself, projected to >= 0; its issue #494: Adam moves a
parameter by about ``lr`` per step, so a log parameterization moves a small
threshold by about ``lr * threshold``).

An experiment, on the NumPy oracle only: the "direct" runs replace the
oracle's ``train_step_jumprelu`` for the duration of the run by one that
takes the same gradients and applies Adam to ``theta = exp(log_threshold)``
with ``g_theta = g_log_threshold / theta``. fastsae's kernels learn
``log_threshold``; see benchmarks/RESULTS.md, "Target L0".

    python benchmarks/jumprelu_threshold_parameterization.py [--steps 1000]
"""

import argparse
import contextlib

import numpy as np

import fastsae.backends.reference as R
from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import DEFAULT_SYNTHETIC
from fastsae.data import synthetic


def _direct_step(params, state, x, *, log_threshold, threshold_m, threshold_v, bandwidth,
                 l0_coefficient, lr, beta1=0.9, beta2=0.999, eps=1e-8, fire_counts=None,
                 sparsity=None, dead_mask=None, y=None):
    active = R._jumprelu_forward(x, params, log_threshold, bandwidth, y)[3]
    loss, grads, g_lt = R.jumprelu_gradients(x, params, log_threshold, bandwidth,
                                             l0_coefficient, sparsity, dead_mask, y)
    R.adam_update(params, grads, state, lr, beta1, beta2, eps)
    theta = np.exp(log_threshold.astype(np.float64))
    R.adam_vector(theta, g_lt / theta, threshold_m, threshold_v, state.step, lr, beta1, beta2,
                  eps)
    log_threshold[...] = np.log(np.maximum(theta, 1e-6))  # SAELens projects to >= 0
    R.normalize_decoder_rows(params.W_dec)
    if fire_counts is not None:
        fire_counts += active.sum(axis=0)
    return R.jumprelu_step_result(loss.mse, loss.l0_loss, int(active.sum()), x.shape[0],
                                  R._batch_variance(R._target(x, y)), True, aux=loss.aux)


@contextlib.contextmanager
def _direct():
    saved = R.train_step_jumprelu
    R.train_step_jumprelu = _direct_step
    try:
        yield
    finally:
        R.train_step_jumprelu = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    syn = dict(DEFAULT_SYNTHETIC)
    syn["magnitude"] = tuple(syn["magnitude"])
    ds = synthetic(**syn)
    print(f"synthetic problem {syn}, d_sae 512, {args.steps} steps, backend numpy")
    print("| thresholds learned as | target L0 | final L0 (eval) | off by | EV | recovered |")
    print("| --- | --- | --- | --- | --- | --- |")
    for how in ("log", "direct"):
        for target in (8.0, 32.0, 128.0):
            m = SparseAutoencoder(syn["d_in"], 512, activation="jumprelu", backend="numpy",
                                  seed=0)
            cfg = TrainConfig(steps=args.steps, progress=False, target_l0=target,
                              jumprelu_sparsity_loss_mode="quadratic")
            with _direct() if how == "direct" else contextlib.nullcontext():
                r = Trainer(m, ds.x, cfg, true_dictionary=ds.dictionary, threads=1).train()
            l0 = r.metrics["l0"]
            print(f"| {how} | {target:g} | {l0:.2f} | {100 * (l0 / target - 1):+.0f}% "
                  f"| {r.metrics['explained_variance']:.3f} | {r.metrics['recovered']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
