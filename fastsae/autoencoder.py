"""The seed article's plain autoencoder: stacked Linear + ReLU layers.

``Autoencoder([4, 3, 2, 3, 4])`` maps 4 -> 3 -> 2 -> 3 -> 4. Each layer
computes ``relu(h @ W + b)`` with the backend's encoder kernel
(``encode_relu(h, W, b, 0)``); with ``output_relu=False`` the last layer is
linear and runs on the decoder kernel (``decode(h, W, b)``, i.e.
``h @ W + b``). Training minimizes the squared error summed over the output
dimensions and averaged over rows (the SAE's MSE convention), whose gradient
with respect to the output ``Y'`` is ``2 (Y' - Y) / N``; the backward pass
is plain NumPy. It trains with :class:`fastsae.Trainer` like an SAE.

Layouts: layer ``i`` has ``W [n_i, n_{i+1}]`` and ``b [n_{i+1}]`` (float32),
the same ``[in, out]`` layout as an SAE's ``W_enc``.
"""

from __future__ import annotations

import numpy as np

from .backends import validate as V
from .backends import reference
from .backends import Backend, get_backend

__all__ = ["Autoencoder"]


class Autoencoder:
    """Stacked Linear+ReLU autoencoder built on the encode+ReLU kernel.

    Parameters
    ----------
    layer_sizes : sequence of int
        Widths, input first, e.g. ``[4, 3, 2, 3, 4]``; at least two.
    output_relu : bool
        Apply ReLU after the last layer too (the article's network does).
    backend : str or Backend, optional
    seed : int
        Initialization: ``W, b ~ U(-1/sqrt(n_in), 1/sqrt(n_in))`` (PyTorch's
        ``nn.Linear`` default).
    """

    def __init__(self, layer_sizes, output_relu: bool = True, *, backend=None, seed: int = 0):
        sizes = [V.as_int(s, "layer size") for s in layer_sizes]
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs at least an input and an output width, "
                             f"got {list(layer_sizes)}")
        self.layer_sizes = sizes
        self.output_relu = bool(output_relu)
        self.seed = int(seed)
        self._backend_arg = backend
        self._backend = backend if isinstance(backend, Backend) else None
        rng = np.random.default_rng(self.seed)
        self.weights, self.biases = [], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / np.sqrt(n_in)
            self.weights.append(rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32))
            self.biases.append(rng.uniform(-bound, bound, n_out).astype(np.float32))

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(self._backend_arg)
        return self._backend

    @property
    def d_in(self) -> int:
        return self.layer_sizes[0]

    @property
    def d_out(self) -> int:
        return self.layer_sizes[-1]

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def __repr__(self) -> str:
        return (f"Autoencoder({self.layer_sizes}, output_relu={self.output_relu})")

    # --------------------------------------------------------------- arrays
    def arrays(self) -> dict:
        """Parameters by name: ``W0, b0, W1, b1, ...`` (the live arrays)."""
        out = {}
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            out[f"W{i}"], out[f"b{i}"] = W, b
        return out

    def _relu_at(self, i) -> bool:
        return i < self.n_layers - 1 or self.output_relu

    # -------------------------------------------------------------- forward
    def _forward(self, x, weights, biases, encode_relu, decode):
        """All layer outputs ``[x, h1, ..., y]`` with the given kernels."""
        hs = [x]
        for i, (W, b) in enumerate(zip(weights, biases)):
            h = hs[-1]
            if self._relu_at(i):
                zero = np.zeros(W.shape[0], dtype=W.dtype)
                hs.append(encode_relu(h, W, b, zero))
            else:
                hs.append(decode(h, W, b))
        return hs

    def _backend_forward(self, x):
        be = self.backend
        hs = self._forward(be.to_backend(x), [be.to_backend(w) for w in self.weights],
                           [be.to_backend(b) for b in self.biases], be.encode_relu, be.decode)
        return [np.asarray(be.to_numpy(h)) for h in hs]

    def forward(self, x) -> np.ndarray:
        """Output ``[N, d_out]`` float32 for input ``x [N, d_in]`` (backend kernels)."""
        x = V.as_float_array(x, "x", 2)
        V.check_dim("x", x.shape[1], self.d_in, "d_in (shape[1])")
        return self._backend_forward(x)[-1]

    __call__ = forward

    # ------------------------------------------------------------- backward
    def loss_and_grads(self, x, y=None, *, float64: bool = False):
        """Loss ``mean_i sum_k (Y'_ik - Y_ik)^2`` and its gradients.

        ``y`` defaults to ``x`` (reconstruction). Returns ``(loss, grads,
        y_pred)`` with ``grads`` a dict named like :meth:`arrays`.
        ``float64=True`` runs the forward pass with the NumPy reference
        kernels in float64 (for finite-difference checks).
        """
        x = V.as_float_array(x, "x", 2)
        V.check_dim("x", x.shape[1], self.d_in, "d_in (shape[1])")
        y = x if y is None else V.as_float_array(y, "y", 2)
        if y.shape != (x.shape[0], self.d_out):
            raise ValueError(f"y must have shape {(x.shape[0], self.d_out)}, got {y.shape}")
        if float64:
            x64 = x.astype(np.float64)
            hs = self._forward(x64, [w.astype(np.float64) for w in self.weights],
                               [b.astype(np.float64) for b in self.biases],
                               reference.encode_relu, reference.decode)
            y = y.astype(np.float64)
        else:
            hs = self._backend_forward(x)
        out = hs[-1]
        n = x.shape[0]
        diff = out - y
        loss = float(np.sum(diff * diff) / n)
        d = 2.0 * diff / n  # dL/dY'
        grads = {}
        for i in range(self.n_layers - 1, -1, -1):
            W = self.weights[i].astype(d.dtype)
            if self._relu_at(i):
                d = np.where(hs[i + 1] > 0, d, 0)  # ReLU derivative 0 at 0
            grads[f"W{i}"] = hs[i].T @ d
            grads[f"b{i}"] = d.sum(axis=0)
            d = d @ W.T
        return loss, grads, out

    # --------------------------------------------------------------- training
    def init_optimizer(self) -> dict:
        """Adam state: zero moments named like :meth:`arrays`, and ``step``."""
        return {"m": {k: np.zeros_like(v) for k, v in self.arrays().items()},
                "v": {k: np.zeros_like(v) for k, v in self.arrays().items()},
                "step": 0}

    def train_step(self, x, state: dict, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   y=None) -> dict:
        """One Adam step (PyTorch formula, ``t = step + 1``) on batch ``x``;
        returns ``{"mse", "explained_variance"}`` measured before the update."""
        loss, grads, _ = self.loss_and_grads(x, y)
        t = state["step"] + 1
        for name, p in self.arrays().items():
            g = grads[name].astype(np.float32)
            m, v = state["m"][name], state["v"][name]
            m[...] = beta1 * m + (1 - beta1) * g
            v[...] = beta2 * v + (1 - beta2) * g * g
            m_hat = m / (1 - beta1 ** t)
            v_hat = v / (1 - beta2 ** t)
            p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        state["step"] = t
        target = np.asarray(x if y is None else y, dtype=np.float32)
        return {"mse": loss, "explained_variance": reference.explained_variance(target, loss)}
