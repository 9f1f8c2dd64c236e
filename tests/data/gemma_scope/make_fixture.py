"""Write a tiny SAE in Gemma Scope's published layout, with its outputs.

Gemma Scope (Lieberum et al. 2024) publishes each SAE as ``params.npz`` with
``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc [d_sae]``,
``b_dec [d_model]`` and ``threshold [d_sae]``, all float32, and documents
(its tutorial's ``JumpReLUSAE``) the equations

    pre_acts = x @ W_enc + b_enc              # b_dec is not subtracted
    acts     = (pre_acts > threshold) * relu(pre_acts)
    recon    = acts @ W_dec + b_dec

This script builds such a file from seeded random weights (no Gemma Scope
weights are involved) and the outputs of those equations computed in float64,
stored float32: ``x.npy`` (32, 16), ``f.npy`` (32, 64), ``x_hat.npy``
(32, 16). Thresholds are U(0.05, 0.6) per feature, and ``b_dec`` is large
enough that subtracting it would change the codes. Run from this directory:
``python make_fixture.py`` (byte-identical output).
"""

import numpy as np

rng = np.random.default_rng(2024)
d_in, d_sae, n = 16, 64, 32
W_dec = rng.standard_normal((d_sae, d_in))
W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
W_enc = (W_dec.T + 0.3 * rng.standard_normal((d_in, d_sae))).astype(np.float32)
W_dec = W_dec.astype(np.float32)
b_enc = (-0.2 + 0.1 * rng.standard_normal(d_sae)).astype(np.float32)
b_dec = (0.5 * rng.standard_normal(d_in)).astype(np.float32)
threshold = rng.uniform(0.05, 0.6, d_sae).astype(np.float32)
x = rng.standard_normal((n, d_in)).astype(np.float32)

pre = x.astype(np.float64) @ W_enc.astype(np.float64) + b_enc
f = np.where(pre > threshold, np.maximum(pre, 0.0), 0.0)
x_hat = f @ W_dec.astype(np.float64) + b_dec

np.savez("params.npz", W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
         threshold=threshold)
np.save("x.npy", x)
np.save("f.npy", f.astype(np.float32))
np.save("x_hat.npy", x_hat.astype(np.float32))
print(f"active fraction {np.mean(f > 0):.3f}; entries with 0 < pre <= threshold: "
      f"{int(((pre > 0) & (pre <= threshold)).sum())}")
