"""Shared test fixtures: random SAE problems and float32 error bounds.

Tolerances. A float32 dot product of ``K`` terms computed in any order has
error at most ``K * u * sum_k |a_k b_k|`` with ``u = 2**-24`` (Higham, ch. 3).
The oracle is the reference evaluated in float64 on the *same float32
inputs*, so its own error is negligible. :func:`dot_bound` returns that bound
elementwise with a safety factor of 2 (backends may fold ``b_dec`` into the
bias, which adds one product and one sum per entry).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastsae
from fastsae import SAEParams
from fastsae import reference as R

U32 = 2.0 ** -24


def backend_names():
    """Backends the contract tests run over: every usable one, or the
    comma-separated list in ``FASTSAE_TEST_BACKENDS`` (used by the CUDA
    simulator run, which only tests ``cuda``)."""
    usable = [s.name for s in fastsae.available_backends() if s.available]
    wanted = os.environ.get("FASTSAE_TEST_BACKENDS")
    if wanted:
        return [n for n in wanted.split(",") if n in usable]
    return usable


def is_cuda_sim() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(params=backend_names())
def backend(request):
    return fastsae.get_backend(request.param)


def make_params(rng, d_in, d_sae, sparsity="mixed", dtype=np.float32):
    """Random parameters; ``sparsity`` picks ``b_enc``: ``"mixed"`` (about a
    third of features active), ``"none"`` (no feature ever fires), ``"all"``
    (every feature fires on every row)."""
    W_enc = rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)
    W_dec = rng.normal(size=(d_sae, d_in)) / np.sqrt(d_in)
    b_dec = rng.normal(size=d_in) * 0.1
    if sparsity == "mixed":
        b_enc = rng.normal(size=d_sae) * 0.1 - 0.4
    elif sparsity == "none":
        b_enc = np.full(d_sae, -100.0)
    elif sparsity == "all":
        b_enc = np.full(d_sae, 100.0)
    else:
        raise ValueError(sparsity)
    return SAEParams(*(np.ascontiguousarray(a, dtype=dtype) for a in (W_enc, b_enc, W_dec, b_dec)))


def make_x(rng, n, d_in, dtype=np.float32):
    return np.ascontiguousarray(rng.normal(size=(n, d_in)), dtype=dtype)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def dot_bound(abs_a, abs_b, k, extra=0.0):
    """Elementwise bound for ``a @ b`` (+ bias) computed in float32."""
    return 2.0 * (k + 2) * U32 * (abs_a @ abs_b + extra) + 1e-30


def encode_oracle(x, p: SAEParams):
    """float64 pre-activations of float32 inputs, and their error bound."""
    pre = (f64(x) - f64(p.b_dec)) @ f64(p.W_enc) + f64(p.b_enc)
    bound = dot_bound(np.abs(f64(x)) + np.abs(f64(p.b_dec)), np.abs(f64(p.W_enc)),
                      x.shape[1], np.abs(f64(p.b_enc)))
    return pre, bound


def assert_codes_match(dense_got, pre, bound, what="codes"):
    """``dense_got`` equals relu(pre) within ``bound``; the active set matches
    exactly wherever ``|pre|`` exceeds the bound (closer to 0 either side is
    a legitimate float32 outcome)."""
    ref = np.maximum(pre, 0.0)
    err = np.abs(f64(dense_got) - ref)
    assert np.all(err <= bound), f"{what}: max excess {np.max(err - bound):.3g}"
    clear = np.abs(pre) > bound
    assert np.array_equal((dense_got > 0)[clear], (pre > 0)[clear]), f"{what}: active set differs"


# shapes: (N, d_in, d_sae) - single row, single feature, odd and larger sizes
SHAPES = [(1, 1, 1), (1, 5, 1), (1, 3, 7), (3, 1, 4), (7, 5, 1), (13, 9, 17), (31, 16, 64),
          (64, 33, 129), (129, 48, 200)]
SHAPES_CUDA_SIM = [(1, 1, 1), (1, 3, 7), (7, 5, 1), (13, 9, 17), (20, 8, 33)]


def shapes_for(backend_name):
    return SHAPES_CUDA_SIM if backend_name == "cuda" and is_cuda_sim() else SHAPES


def fast_cpu_backend() -> str:
    """The fastest usable CPU backend for training tests: numba, then cython,
    else the numpy reference."""
    for name in ("numba", "cython"):
        try:
            fastsae.get_backend(name)
            return name
        except Exception:  # backend not usable here
            pass
    return "numpy"


def crash_at_step(trainer, n: int) -> None:
    """Make ``trainer``'s ``n``-th state step (1-based) raise
    KeyboardInterrupt: an interrupted run, for the exact-resume tests."""
    real_step, calls = trainer.state.step, {"n": 0}

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    trainer.state.step = crashing_step


# ------------------------------------------------------------ bf16 tests' skips
#: Each registered backend's status (``fastsae.available_backends()``), by name.
BACKEND_STATUS = _STATUS = {s.name: s for s in fastsae.available_backends()}


def backend_usable(name: str) -> bool:
    s = _STATUS.get(name)
    return s is not None and s.available


def skip_unusable_backend(name: str) -> None:
    """Skip the test, with the registry's reason, when backend ``name`` is unusable."""
    if not backend_usable(name):
        s = _STATUS.get(name)
        pytest.skip(f"{name} backend unavailable: {s.reason if s else 'unknown'}")


try:
    from fastsae.backends import bf16 as BF16
    BF16_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - reported by test_bf16_module_imports
    BF16, BF16_IMPORT_ERROR = None, f"{type(exc).__name__}: {exc}"
#: The bf16 paths this CPU and build run (empty: no compiled kernels).
BF16_PATHS = tuple(BF16.available_paths()) if BF16 is not None else ()
#: ``(backend, path)`` of every compiled bf16 case (``"none"``: skipped).
BF16_COMPILED = [(name, path) for name in ("numba", "cython") for path in (BF16_PATHS or ("none",))]


def skip_without_bf16() -> None:
    """Skip the test when the bf16 module or its compiled kernels are
    missing, saying which."""
    if BF16 is None:
        pytest.skip(f"fastsae.backends.bf16 not importable: {BF16_IMPORT_ERROR}")
    if not BF16_PATHS:
        try:
            BF16.check_available()
            why = "available_paths() is empty"
        except ImportError as exc:
            why = str(exc)
        pytest.skip(f"compiled bf16 kernels unavailable: {why}")


@pytest.fixture
def no_bf16_path_from_outside(monkeypatch):
    """The test starts with FASTSAE_BF16_PATH unset (the caller's shell must
    not pick the path); the bf16 test modules use it on every test."""
    monkeypatch.delenv("FASTSAE_BF16_PATH", raising=False)


@pytest.fixture(params=BF16_COMPILED, ids=[f"{n}-{p}" for n, p in BF16_COMPILED])
def compiled(request, monkeypatch):
    """``(backend, path)``: a compiled backend with the bf16 kernel path forced."""
    name, path = request.param
    skip_unusable_backend(name)
    skip_without_bf16()
    monkeypatch.setenv("FASTSAE_BF16_PATH", path)
    return fastsae.get_backend(name), path


def small_train_config(**kw):
    """The trainer tests' short run (60 steps of 128 rows, quick warm-ups),
    with ``kw`` changed."""
    base = dict(steps=60, batch_size=128, lr=3e-3, l1_coefficient=0.5, lr_warmup_steps=5,
                l1_warmup_steps=10, log_every=10, dead_window=10, eval_rows=1024)
    base.update(kw)
    return fastsae.TrainConfig(**base)


class CountingRows:
    """Mixin for a :class:`fastsae.data.DataSource` subclass: counts the rows
    it reads (``rows_read``), through ``_read`` and ``_take_sorted`` alike."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_read = 0

    def _read(self, start, stop):
        self.rows_read += stop - start
        return super()._read(start, stop)

    def _take_sorted(self, rows):
        self.rows_read += rows.size
        return super()._take_sorted(rows)

