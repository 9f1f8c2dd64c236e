"""Per-kernel benchmarks: every usable backend beside the NumPy reference in
one group per kernel and size; the encode groups also time a bare float32
``np.matmul`` of the encoder's shapes (the floor for the fused encode).

Run:  python -m pytest benchmarks/ --bench-size paper
"""

from __future__ import annotations

import numpy as np

import fastsae

from conftest import record_matmul


def _setup(benchmark, group, size, backend_name, problem):
    benchmark.group = f"{group}[{size}]"
    benchmark.extra_info.update(backend=backend_name, size=size, l0=problem.l0)
    be = fastsae.get_backend(backend_name)
    return be, be.to_backend


def _run(benchmark, be, fn, *args):
    def call():
        out = fn(*args)
        be.synchronize()
        return out
    return benchmark(call)


def test_bare_matmul(benchmark, size, problem):
    """Floor: float32 GEMM of the encoder's shapes, no bias, no ReLU."""
    benchmark.group = f"encode_relu[{size}]"
    benchmark.extra_info.update(backend="bare_matmul", size=size, l0=problem.l0)
    x, W = problem.x, problem.params.W_enc
    out = benchmark(np.matmul, x, W)
    assert out.shape == (x.shape[0], W.shape[1])
    record_matmul(size, benchmark)


def test_encode_relu(benchmark, size, backend_name, problem):
    be, dev = _setup(benchmark, "encode_relu", size, backend_name, problem)
    p = problem.params
    args = [dev(a) for a in (problem.x, p.W_enc, p.b_enc, p.b_dec)]
    f = be.to_numpy(_run(benchmark, be, be.encode_relu, *args))
    assert f.shape == problem.f.shape


def test_encode_relu_sparse(benchmark, size, backend_name, problem):
    be, dev = _setup(benchmark, "encode_relu_sparse", size, backend_name, problem)
    p = problem.params
    args = [dev(a) for a in (problem.x, p.W_enc, p.b_enc, p.b_dec)]
    codes = _run(benchmark, be, be.encode_relu_sparse, *args)
    assert abs(codes.to_host().l0 - problem.l0) < 1.0


def test_decode(benchmark, size, backend_name, problem):
    """Reference: dense codes (what a dense implementation does); other
    backends: sparse codes."""
    be, dev = _setup(benchmark, "decode", size, backend_name, problem)
    codes = problem.f if backend_name == "numpy" else dev(problem.codes)
    p = problem.params
    out = be.to_numpy(_run(benchmark, be, be.decode, codes, dev(p.W_dec), dev(p.b_dec)))
    assert out.shape == problem.x.shape


def test_decoder_column_norms(benchmark, size, backend_name, problem):
    be, dev = _setup(benchmark, "decoder_column_norms", size, backend_name, problem)
    out = be.to_numpy(_run(benchmark, be, be.decoder_column_norms, dev(problem.params.W_dec)))
    assert out.shape == (problem.params.d_sae,)


def test_l1_subgradient(benchmark, size, backend_name, problem):
    be, dev = _setup(benchmark, "l1_subgradient", size, backend_name, problem)
    codes = problem.f if backend_name == "numpy" else dev(problem.codes)
    norms = dev(np.linalg.norm(problem.params.W_dec, axis=1).astype(np.float32))
    out = _run(benchmark, be, be.l1_subgradient, codes, norms, 1e-3)
    assert out is not None


def test_gradients(benchmark, size, backend_name, problem):
    be, dev = _setup(benchmark, "gradients_weighted_l1", size, backend_name, problem)
    codes = problem.f if backend_name == "numpy" else dev(problem.codes)
    params = dev(problem.params)
    loss, grads = _run(benchmark, be, be.gradients, dev(problem.x), params, codes,
                       dev(problem.x_hat), 1e-3, "weighted_l1")
    assert np.isfinite(loss.total)
