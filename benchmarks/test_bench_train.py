"""Whole training step (forward, backward, Adam) per backend and decoder-norm
mode, beside the NumPy reference's ``train_step``.

The learning rate is tiny so that repeated rounds keep the problem's
sparsity (L0 is recorded before and after).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState


@pytest.mark.parametrize("decoder_norm", ["weighted_l1", "unit_norm"])
def test_train_step(benchmark, size, backend_name, problem, decoder_norm):
    benchmark.group = f"train_step_{decoder_norm}[{size}]"
    benchmark.extra_info.update(backend=backend_name, size=size, l0=problem.l0)
    be = fastsae.get_backend(backend_name)
    params = be.to_backend(problem.params.copy())
    state = be.to_backend(AdamState.zeros_like(problem.params))
    x = be.to_backend(problem.x)

    def step():
        r = be.train_step(params, state, x, l1_coefficient=1e-4, lr=1e-6,
                          decoder_norm=decoder_norm)
        be.synchronize()
        return r

    res = benchmark(step)
    benchmark.extra_info["l0_after"] = res.l0
    assert np.isfinite(res.total)
