"""Cost over density: ``train_step`` (weighted_l1), sparse ``decode`` and
``gradients`` at L0 in {8, 32, 128, 512, 2048, d_sae/32, d_sae/2} (capped at
d_sae/2), per CPU backend, beside two baselines measured in the same run:

``dense_blas``   :class:`conftest.DenseStep`, a lean dense NumPy step (five
                 GEMMs into preallocated outputs, ReLU, Adam over all four
                 parameters); in the decode group its decoder GEMM, in the
                 gradients group its backward (three GEMMs);
``bare_matmul``  ``np.matmul(x, W_enc, out=preallocated)``.

One group per (kind, size, batch); the run ends with a table of each row's
ratio to both (``conftest._density_table``). L0 is set by a shared encoder
bias (:func:`conftest.make_problem`); the learning rate is tiny so the
repeated rounds keep it. The NumPy reference is timed at one L0 per group
only (``DENSITY_NUMPY_L0``): it is dense at every L0, and slower than
``dense_blas``.

Run (what CI runs: each body once, small size):
    python -m pytest benchmarks/test_bench_density.py --bench-size small --benchmark-disable -q
Measure:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest \\
        benchmarks/test_bench_density.py --bench-size paper --bench-batch 512,4096 \\
        --benchmark-min-rounds=3 --benchmark-max-time=0.5
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState

from conftest import SIZES, DenseStep, make_problem, rows_of

KINDS = ("train_step", "decode", "gradients")
L1 = 1e-4
LR = 1e-6
#: L0 of the problem the baselines run on (their cost does not depend on it)
DENSITY_BASE_L0 = 32


def _info(benchmark, kind, size, batch, backend, **extra):
    n = rows_of(size, batch)
    benchmark.group = f"density_{kind}[{size},N={n}]"
    benchmark.extra_info.update(density=True, kind=kind, size=size, rows=n,
                                d_sae=SIZES[size][2], backend=backend, **extra)
    return n


def _sweep_problem(benchmark, kind, size, batch, density_l0, backend):
    prob = make_problem(size, density_l0, batch=batch)
    _info(benchmark, kind, size, batch, backend, l0=prob.l0, l0_target=density_l0)
    return prob


def _timed(benchmark, be, fn, *args, **kw):
    def call():
        out = fn(*args, **kw)
        be.synchronize()
        return out
    return benchmark(call)


# ------------------------------------------------------------------ baselines
def test_density_bare_matmul(benchmark, size, batch):
    """The matmul every row's 'x matmul' divides by (in the train_step group)."""
    prob = make_problem(size, DENSITY_BASE_L0, batch=batch)
    _info(benchmark, "train_step", size, batch, "bare_matmul")
    x, W = prob.x, prob.params.W_enc
    out = np.empty((x.shape[0], W.shape[1]), np.float32)
    benchmark(np.matmul, x, W, out=out)
    assert np.isfinite(out[0, 0])


#: bytes of the copy that measures memory bandwidth (far beyond the caches)
COPY_BYTES = 64 * 2 ** 20


def test_density_copy_bandwidth(benchmark, size, batch):
    """Memory bandwidth of this run (a 64 MiB copy), for the train_step
    rows' floor (``floors.py``: FLOPs over the bare matmul's rate plus bytes
    over this bandwidth)."""
    _info(benchmark, "train_step", size, batch, "copy_64MiB", bytes=2 * COPY_BYTES)
    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)
    assert dst[-1] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_density_dense_blas(benchmark, size, batch, kind):
    prob = make_problem(size, DENSITY_BASE_L0, batch=batch)
    n = _info(benchmark, kind, size, batch, "dense_blas")
    ds = DenseStep(prob.params, n, l1_coefficient=L1, lr=LR)
    if kind == "train_step":
        benchmark(ds.step, prob.x)
        assert np.isfinite(ds.loss)
    elif kind == "decode":
        f, W_dec, b_dec = prob.f, prob.params.W_dec, prob.params.b_dec
        out = np.empty_like(prob.x)

        def decode():
            np.matmul(f, W_dec, out=out)
            np.add(out, b_dec, out=out)
        benchmark(decode)
        np.testing.assert_allclose(out, prob.x_hat, rtol=1e-3, atol=1e-3)
    else:
        ds.forward(prob.x)
        benchmark(ds.backward)
        assert np.isfinite(ds.loss)


# ------------------------------------------------------------------ the sweep
def test_density_train_step(benchmark, size, batch, density_l0, density_backend):
    prob = _sweep_problem(benchmark, "train_step", size, batch, density_l0, density_backend)
    be = fastsae.get_backend(density_backend)
    params = be.to_backend(prob.params.copy())
    state = be.to_backend(AdamState.zeros_like(prob.params))
    x = be.to_backend(prob.x)
    be.train_step(params, state, x, l1_coefficient=L1, lr=LR)  # compile/warm, not timed
    res = _timed(benchmark, be, be.train_step, params, state, x, l1_coefficient=L1, lr=LR,
                 decoder_norm="weighted_l1")
    benchmark.extra_info["l0_after"] = res.l0
    assert np.isfinite(res.total)
    assert abs(res.l0 - prob.l0) <= 0.05 * prob.l0 + 1.0  # the sweep kept its L0


def test_density_decode(benchmark, size, batch, density_l0, density_backend):
    prob = _sweep_problem(benchmark, "decode", size, batch, density_l0, density_backend)
    be = fastsae.get_backend(density_backend)
    codes = prob.f if density_backend == "numpy" else be.to_backend(prob.codes)
    W_dec, b_dec = be.to_backend(prob.params.W_dec), be.to_backend(prob.params.b_dec)
    out = be.to_numpy(_timed(benchmark, be, be.decode, codes, W_dec, b_dec))
    assert out.shape == prob.x.shape


def test_density_gradients(benchmark, size, batch, density_l0, density_backend):
    prob = _sweep_problem(benchmark, "gradients", size, batch, density_l0, density_backend)
    be = fastsae.get_backend(density_backend)
    codes = prob.f if density_backend == "numpy" else be.to_backend(prob.codes)
    params = be.to_backend(prob.params)
    loss, _ = _timed(benchmark, be, be.gradients, be.to_backend(prob.x), params, codes,
                     be.to_backend(prob.x_hat), L1, "weighted_l1")
    assert np.isfinite(loss.total)
