"""TopK family: fused top-k encode and the TopK training step (AuxK off and
on), every backend that implements them beside the NumPy reference.
Ratios to the bare matmul use the encode group's matmul median of the same
run (run the whole suite, or include test_bench_kernels.py::test_bare_matmul).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState

K = 32


def _backend(benchmark, group, size, backend_name, problem, fn):
    be = fastsae.get_backend(backend_name)
    benchmark.group = f"{group}[{size}]"
    benchmark.extra_info.update(backend=backend_name, size=size, l0=float(K))
    return be


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_encode_topk(benchmark, size, backend_name, problem, activation):
    fn = "encode_" + activation
    be = _backend(benchmark, f"{fn}_k{K}", size, backend_name, problem, fn)
    p = problem.params
    args = [be.to_backend(a) for a in (problem.x, p.W_enc, p.b_enc, p.b_dec)]

    def call():
        out = getattr(be, fn)(*args, K)
        be.synchronize()
        return out

    codes = benchmark(call)
    assert codes.to_host().l0 <= K + 1e-9 or activation == "batchtopk"


@pytest.mark.parametrize("auxk", [False, True])
def test_train_step_topk(benchmark, size, backend_name, problem, auxk):
    be = _backend(benchmark, f"train_step_topk_k{K}{'_auxk' if auxk else ''}", size,
                  backend_name, problem, "train_step_topk")
    params = be.to_backend(problem.params.copy())
    state = be.to_backend(AdamState.zeros_like(problem.params))
    x = be.to_backend(problem.x)
    d_sae, d_in = problem.params.W_dec.shape
    dead = np.zeros(d_sae, bool)
    dead[::4] = True  # a quarter of the latents count as dead for AuxK
    dead = be.to_backend(dead) if auxk else None
    k_aux = 2 ** int(np.log2(max(d_in // 2, 1)))

    def step():
        r = be.train_step_topk(params, state, x, k=K, lr=1e-6, dead_mask=dead,
                               k_aux=k_aux if auxk else 0,
                               aux_coefficient=1 / 32 if auxk else 0.0)
        be.synchronize()
        return r

    res = benchmark(step)
    assert np.isfinite(res.total)
