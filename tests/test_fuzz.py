"""Property-based fuzzing of the validating front, SparseCodes and the file readers.

Targets (one test function each, 200 examples, ``derandomize=True``, no
example database, no deadline; the whole file runs in well under 3 minutes
on 2 cores):

* the front (:class:`fastsae.Backend`) of every usable backend (numpy,
  numba, cython; cuda on a real GPU, or under ``NUMBA_ENABLE_CUDASIM=1`` only
  when ``FASTSAE_FUZZ_CUDA=1`` too, since the simulator is very slow; then
  ``FASTSAE_FUZZ_EXAMPLES=N`` makes it a smoke run of N examples):
  ``encode_relu``, ``encode_relu_sparse``, ``decode`` (dense and sparse codes),
  ``decoder_column_norms``, ``l1_subgradient``, ``gradients``,
  ``topk_gradients``, ``encode_topk``, ``encode_batchtopk``, ``encode_jumprelu``,
  ``train_step``, ``train_step_topk``;
* :class:`fastsae.SparseCodes`: construction from arrays of random dtypes
  (hostile or not), ``from_dense``, ``from_scipy``, ``to_dense``, and such codes
  passed to ``decode``/``l1_subgradient``;
* ``fastsae.io.load_tensors``, ``fastsae.io.read_sae_dir`` and
  ``fastsae.training.checkpoint.read_checkpoint`` on valid files written by
  the package's own writers, then truncated, bit-flipped, replaced by random
  bytes, or given a hand-made safetensors header or random cfg.json content.

Inputs: random sizes (1 to 9, 1-row, 1-feature, odd; rarely 0), dtypes
(float16/32/64, int, unsigned, bool, complex, object), layouts (Fortran,
strided slices, negative strides), read-only arrays, wrong ndim, one
mismatched dimension, NaN/inf/huge finite values (1e30, 3e38, and 1e39 which
only float64 can hold), bad scalars (NaN, bool, str, out of range).

Invariants, on every backend:

* a call the contract refuses (:mod:`fuzz_strategies` predicts which,
  independently of :mod:`fastsae.backends.validate`) raises ``TypeError`` or
  ``ValueError`` whose message names the offending argument, never another
  exception (``IndexError``, ``KeyError``, ``OverflowError``, Numba's own
  errors, ...), and an accepted call does not raise;
* an accepted call returns what the reference formulas give in float64 on the
  same float32-rounded inputs, within float32 error scaled to the inputs'
  magnitude (which also checks the ``numpy`` backend); where a float32
  evaluation may overflow nothing but "no crash" is asked;
* inputs are never mutated; a step that raises leaves parameters, Adam
  state and ``fire_counts`` byte-for-byte unchanged;
* readers return well-formed, finite float32 arrays of the shapes their
  metadata states, or raise ``SAEFormatError`` (or ``FileNotFoundError``).

A crash in compiled code would kill pytest, so hostile SparseCodes reach a
compiled backend only after the front is seen to refuse them on ``numpy``
(validation is shared and runs before any kernel).

Tests that fail on a bug recorded in the report are marked ``@known_bug``
(``xfail(strict=True)``, and no shrinking) until it is fixed: the marker then
fails the run (XPASS) and should be replaced by ``@fuzz``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
import struct
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

import fastsae
from fastsae import AdamState, SAEParams, SparseCodes
from fastsae.backends import reference as R
from fastsae.io import SAEFormatError, load_tensors, read_sae_dir, save_tensors, write_sae_dir
from fastsae.training.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, write_checkpoint

import fuzz_strategies as S
from conftest import backend_names, is_cuda_sim
from fuzz_strategies import F32_MAX, OVERFLOW, U, Int, Real, Slot, as_f32, f64

#: 200 in CI and by default; ``FASTSAE_FUZZ_EXAMPLES`` lowers it for a smoke
#: run of the opt-in CUDA simulator pass (``FASTSAE_FUZZ_CUDA=1``), whose
#: every example costs seconds.
EXAMPLES = int(os.environ.get("FASTSAE_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=False)


def known_bug(reason):
    """``xfail(strict=True)`` for a bug recorded in the report, without the
    (slow, and here useless) shrinking of the failure. Remove once fixed."""
    def mark(test):
        test = settings(fuzz, phases=[Phase.explicit, Phase.generate])(test)
        return pytest.mark.xfail(strict=True, reason=reason)(test)
    return mark


def _fuzz_backends():
    names = backend_names()
    if "cuda" in names and is_cuda_sim() and os.environ.get("FASTSAE_FUZZ_CUDA") != "1":
        names = [n for n in names if n != "cuda"]
    return ["numpy"] + [n for n in names if n != "numpy"]


BACKENDS = _fuzz_backends()
BE = {n: fastsae.get_backend(n) for n in BACKENDS}
#: The step tests hand host arrays to be updated in place: CPU backends only.
STEP_BACKENDS = [n for n in BACKENDS if n != "cuda"]

ENC = {"x": ("N", "d_in"), "W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
PARAM_SPECS = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"),
               "b_dec": ("d_in",)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# ================================================================ running the front
def _host(be, r):
    if isinstance(r, SparseCodes):
        return r.to_host()
    if isinstance(r, tuple):
        return tuple(_host(be, x) for x in r)
    if isinstance(r, SAEParams):
        return SAEParams(*(np.asarray(be.to_numpy(a)) for a in r.arrays()))
    if hasattr(r, "shape"):
        return np.asarray(be.to_numpy(r))
    return r


def _clear_error(exc, names, where):
    assert exc is not None, f"{where}: accepted what the contract refuses (names {sorted(names)})"
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    assert isinstance(exc, (TypeError, ValueError)) and \
        not type(exc).__module__.startswith(("numba", "llvmlite")), f"{where}: {kind}: {exc}"
    assert S.names_one_of(str(exc), names), \
        f"{where}: {kind} {str(exc)!r} names none of {sorted(names)}"


def run_front(build, call, refused, inplace=(), backends=None):
    """Call ``call(backend, args)`` on every backend with fresh ``build()``
    arguments. ``refused``: the names one of which a refusal must mention
    (empty: the call must be accepted). Checks that nothing but the in-place
    arguments of an accepted call changed; returns ``{backend: (args,
    host result)}`` of the accepted calls."""
    out = {}
    event("refused" if refused else "accepted")
    for name in backends or BACKENDS:
        args = build()
        before = {k: S.digest(v) for k, v in args.items()}
        try:
            res, exc = call(BE[name], args), None
        except Exception as e:  # noqa: BLE001 - what it is, is the point
            res, exc = None, e
        for k, v in args.items():
            if exc is not None or k not in inplace:
                assert S.digest(v) == before[k], \
                    f"{name}: {k} changed by a call that {'raised' if exc else 'must not write it'}"
        if refused:
            _clear_error(exc, refused, name)
        elif exc is not None:
            raise AssertionError(f"{name} refused valid input: {type(exc).__name__}: {exc}") \
                from exc
        else:
            out[name] = (args, _host(BE[name], res))
    return out


@dataclass
class Case:
    """Array slots, their dimension symbols, one optional mismatch, scalars."""

    slots: dict
    specs: dict
    mm: tuple | None = None
    scalars: dict = field(default_factory=dict)  # name -> (value, rule)
    inplace: tuple = ()  # names of the arguments a step updates in place
    plan: str = "valid"  # what is wrong with it (fuzz_strategies.PLANS)
    sizes: dict = field(default_factory=dict)

    def build(self):
        return {n: s.build() if isinstance(s, (Slot, S.CodesRecipe)) else s
                for n, s in self.slots.items()}

    def refused(self, built=None, finite=True):
        """Names a refusal may mention (empty when the call must succeed)."""
        built = built or self.build()
        names = set()
        for n, a in built.items():
            if isinstance(a, SparseCodes):
                if not S.csr_valid(a):
                    names.add(n)
            elif isinstance(a, np.ndarray) and n in self.specs:
                ip = n in self.inplace
                if S.array_refused(a, len(self.specs[n]), inplace=ip,
                                   check_finite=finite and not ip):
                    names.add(n)
        if self.mm is not None and len(S.sharing(self.specs, self.mm[2])) > 1:
            names |= S.sharing(self.specs, self.mm[2])
        for n, (v, rule) in self.scalars.items():
            if S.scalar_refused(v, rule) if isinstance(rule, (Real, Int)) else v not in rule:
                names.add(n)
        return names


@st.composite
def case(draw, specs, *, nonneg=(), sparse=(), scalars=None, inplace=()):
    """Arguments for one front call: every array of ``specs`` (name -> its
    dimension symbols), the ``scalars`` (name -> rule), and, in about half the
    examples, one thing wrong (:data:`fuzz_strategies.PLANS`)."""
    scalars = scalars or {}
    plan = draw(st.sampled_from(S.PLANS))
    if plan == "scalar" and not scalars:
        plan = "valid"
    sizes = draw(S.dims(empty=plan == "empty"))
    mm = draw(S.mismatch(specs)) if plan == "mismatch" else None
    bad_slot = draw(st.sampled_from(sorted(specs))) if plan == "slot" else None
    slots = {}
    for n, spec in specs.items():
        shape = S.shape_of(n, spec, sizes, mm)
        if n in sparse and n != bad_slot and draw(st.booleans()):
            rec = S.CodesRecipe(draw(S.values(shape, kinds=(), nonneg=True)))
            if draw(st.booleans()):
                rec.dense[np.abs(rec.dense) < np.median(np.abs(rec.dense))] = 0
            slots[n] = rec
        else:
            slots[n] = draw(S.slot(n, shape, nonneg=n in nonneg, hostile=n == bad_slot,
                                   inplace=n in inplace))
    bad_scalar = draw(st.sampled_from(sorted(scalars))) if plan == "scalar" else None
    c = Case(slots, specs, mm, inplace=tuple(inplace))
    for n, rule in scalars.items():
        c.scalars[n] = (draw(S.scalar(rule, bad=n == bad_scalar)), rule)
    c.plan, c.sizes = plan, sizes
    event(f"plan: {plan}")
    return c


def _dense64(a):
    return S.csr_dense(a) if isinstance(a, SparseCodes) else f64(as_f32(a))


# ================================================================ forward
def _encode_call(c, fn, extra=()):
    def call(be, a):
        return getattr(be, fn)(a["x"], a["W_enc"], a["b_enc"], a["b_dec"],
                               *(a[e] if e in a else c.scalars[e][0] for e in extra))
    return call


def encoder_case(extra_specs=None, k=False):
    return case(dict(ENC, **(extra_specs or {})), scalars={"k": Int()} if k else None)


@fuzz
@given(c=encoder_case())
def test_encode_relu(c):
    for name, (a, got) in run_front(c.build, _encode_call(c, "encode_relu"), c.refused()).items():
        pre, M, bound = S.pre_activations(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, name
        S.check_close(got, np.maximum(pre, 0), M, f"{name} encode_relu", bound=bound)


@fuzz
@given(c=encoder_case())
def test_encode_relu_sparse(c):
    for name, (a, got) in run_front(c.build, _encode_call(c, "encode_relu_sparse"),
                                    c.refused()).items():
        pre, M, bound = S.pre_activations(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
        S.check_selection(got, pre, M, bound, what=f"{name} encode_relu_sparse")


@fuzz
@given(c=encoder_case(k=True))
def test_encode_topk(c):
    for name, (a, got) in run_front(c.build, _encode_call(c, "encode_topk", ["k"]),
                                    c.refused()).items():
        pre, M, bound = S.pre_activations(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
        S.check_selection(got, pre, M, bound, k=int(c.scalars["k"][0]), what=f"{name} encode_topk")


@fuzz
@given(c=encoder_case(k=True))
def test_encode_batchtopk(c):
    for name, (a, got) in run_front(c.build, _encode_call(c, "encode_batchtopk", ["k"]),
                                    c.refused()).items():
        pre, M, bound = S.pre_activations(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
        S.check_selection(got, pre, M, bound, k=int(c.scalars["k"][0]), batch=True,
                          what=f"{name} encode_batchtopk")


@fuzz
@given(c=encoder_case({"threshold": ("d_sae",)}))
def test_encode_jumprelu(c):
    for name, (a, got) in run_front(c.build, _encode_call(c, "encode_jumprelu", ["threshold"]),
                                    c.refused()).items():
        pre, M, bound = S.pre_activations(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
        S.check_selection(got, pre, M, bound, threshold=as_f32(a["threshold"]),
                          what=f"{name} encode_jumprelu")


def _decode_oracle(codes, W_dec, b_dec):
    f, W, b = _dense64(codes), f64(as_f32(W_dec)), f64(as_f32(b_dec))
    M = np.abs(f) @ np.abs(W) + np.abs(b)
    return f @ W + b, M, 2.0 * (W.shape[0] + 2) * U * M + 1e-30


@fuzz
@given(c=case({"codes": ("N", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)},
              sparse=("codes",)))
def test_decode(c):
    call = lambda be, a: be.decode(a["codes"], a["W_dec"], a["b_dec"])  # noqa: E731
    for name, (a, got) in run_front(c.build, call, c.refused()).items():
        want, M, bound = _decode_oracle(a["codes"], a["W_dec"], a["b_dec"])
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, name
        S.check_close(got, want, M, f"{name} decode", bound=bound)


@fuzz
@given(c=case({"W_dec": ("d_sae", "d_in")}))
def test_decoder_column_norms(c):
    for name, (a, got) in run_front(c.build, lambda be, a: be.decoder_column_norms(a["W_dec"]),
                                    c.refused()).items():
        W = f64(as_f32(a["W_dec"]))
        sq = (W * W).sum(axis=1)
        want = np.sqrt(sq)
        assert got.dtype == np.float32, name
        S.check_close(got, want, sq, f"{name} decoder_column_norms",
                      bound=2.0 * (W.shape[1] + 2) * U * want + 1e-30)


def _l1_want(codes, norms, coef):
    f, n = _dense64(codes), f64(as_f32(norms))
    want = np.where(f > 0, coef * n[None, :], 0.0)
    safe_scale = np.broadcast_to(np.abs(coef * n)[None, :], f.shape).copy()
    if not np.isfinite(np.float32(coef)):
        safe_scale[:] = np.inf
    return want, safe_scale


@fuzz
@given(c=case({"codes": ("N", "d_sae"), "norms": ("d_sae",)}, sparse=("codes",),
              scalars={"l1_coefficient": Real()}))
def test_l1_subgradient(c):
    coef = c.scalars["l1_coefficient"][0]
    call = lambda be, a: be.l1_subgradient(a["codes"], a["norms"], coef)  # noqa: E731
    for name, (a, got) in run_front(c.build, call, c.refused()).items():
        want, scale = _l1_want(a["codes"], a["norms"], float(coef))
        if isinstance(a["codes"], SparseCodes):  # sparse in, sparse out, same pattern
            assert isinstance(got, SparseCodes), name
            assert np.array_equal(got.indptr, a["codes"].indptr), name
            assert np.array_equal(got.indices, a["codes"].indices), name
            got = got.to_dense()
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, name
        S.check_close(got, want, scale, f"{name} l1_subgradient",
                      bound=4 * U * np.abs(want) + 1e-30)


# ================================================================ backward
DECODER_NORMS = ("weighted_l1", "unit_norm")


@st.composite
def gradient_case(draw, topk=False):
    specs = dict(x=("N", "d_in"), **PARAM_SPECS, codes=("N", "d_sae"), x_hat=("N", "d_in"))
    if topk:
        specs["aux_codes"] = ("N", "d_sae")
    scalars = {"aux_weight": Real()} if topk else {"l1_coefficient": Real(),
                                                   "decoder_norm": DECODER_NORMS}
    c = draw(case(specs, sparse=("codes", "aux_codes"), scalars=scalars))
    if topk and draw(st.booleans()) and c.mm is None and "aux_codes" not in c.refused():
        del c.slots["aux_codes"], c.specs["aux_codes"]
        c.slots["aux_codes"] = None
    if c.plan == "valid" and all(isinstance(c.slots[n], Slot) for n in ("codes", "x_hat")) \
            and draw(st.booleans()):
        # consistent codes and reconstruction, as a training step has them
        a = {n: f64(as_f32(c.slots[n].values)) for n in ("x", *PARAMS)}
        if all(np.isfinite(v).all() for v in a.values()):
            f = R.encode_relu(a["x"], a["W_enc"], a["b_enc"], a["b_dec"])
            c.slots["codes"].values = f
            c.slots["x_hat"].values = f @ a["W_dec"] + a["b_dec"]
    return c


def _params64(a):
    return SAEParams(*(f64(as_f32(a[n])) for n in PARAMS))


def _check_losses(got, want, mags, name, fields=("mse", "l1")):
    for part, w, m in zip(fields, want, mags):
        g = getattr(got, part)
        assert isinstance(g, float), f"{name}: {part} is {type(g).__name__}"
        S.check_close(np.float64(g), w, m, f"{name} {part}")
    S.check_close(np.float64(got.total), sum(want), sum(mags) + 1e-30, f"{name} total")


@fuzz
@given(c=gradient_case())
def test_gradients(c):
    coef, mode = c.scalars["l1_coefficient"][0], c.scalars["decoder_norm"][0]

    def call(be, a):
        return be.gradients(a["x"], SAEParams(*(a[n] for n in PARAMS)), a["codes"], a["x_hat"],
                            coef, mode)
    for name, (a, (losses, grads)) in run_front(c.build, call, c.refused()).items():
        x, p, f, xh = f64(as_f32(a["x"])), _params64(a), _dense64(a["codes"]), f64(as_f32(a["x_hat"]))
        want_l, want_g = R.gradients(x, p, f, xh, float(coef), mode)
        (ms, ls), mg, worst = S.gradient_magnitudes(x, p, f, xh, float(coef), mode)
        if worst >= OVERFLOW or abs(float(coef)) >= OVERFLOW:
            continue  # a float32 evaluation may overflow: only "no crash" is asked
        _check_losses(losses, (want_l.mse, want_l.l1), (ms, ls), name)
        for n, g, w, m in zip(PARAMS, grads.arrays(), want_g.arrays(), mg):
            assert g.dtype == np.float32, f"{name} grad {n}: {g.dtype}"
            S.check_close(g, w, m, f"{name} gradients {n}")


@fuzz
@given(c=gradient_case(topk=True))
def test_topk_gradients(c):
    w = c.scalars["aux_weight"][0]

    def call(be, a):
        return be.topk_gradients(a["x"], SAEParams(*(a[n] for n in PARAMS)), a["codes"],
                                 a["x_hat"], a["aux_codes"], w)
    for name, (a, (losses, grads)) in run_front(c.build, call, c.refused()).items():
        x, p, f, xh = f64(as_f32(a["x"])), _params64(a), _dense64(a["codes"]), f64(as_f32(a["x_hat"]))
        fa = None if a["aux_codes"] is None else _dense64(a["aux_codes"])
        want_l, want_g = R.topk_gradients(x, p, f, xh, fa, float(w))
        (ms, aux), mg, worst = S.topk_gradient_magnitudes(x, p, f, xh, fa, float(w))
        if worst >= OVERFLOW or abs(float(w)) >= OVERFLOW:
            continue
        _check_losses(losses, (want_l.mse, want_l.aux), (ms, aux), name, ("mse", "aux"))
        assert losses.l1 == 0.0, name
        for n, g, wg, m in zip(PARAMS, grads.arrays(), want_g.arrays(), mg):
            S.check_close(g, wg, m, f"{name} topk_gradients {n}")


# ================================================================ training steps
STATE_PARTS = [f"state.{part}.{n}" for part in ("m", "v") for n in PARAMS]


STEP_PLANS = S.PLANS + ("fire_counts", "dead_mask", "step")


@st.composite
def step_case(draw, topk=False):
    """Step arguments: parameters, fresh (zero) Adam moments, a batch,
    ``fire_counts``, (TopK) ``dead_mask``, the scalars; at most one thing
    wrong. Parameters are finite here (huge values included)."""
    specs = dict(PARAM_SPECS, x=("N", "d_in"), fire_counts=("d_sae",))
    for s in STATE_PARTS:
        specs[s] = PARAM_SPECS[s.split(".")[2]]
    if topk:
        specs["dead_mask"] = ("d_sae",)
        scalars = {"k": Int(), "activation": ("topk", "batchtopk"), "k_aux": Int(low=0),
                   "aux_coefficient": Real()}
    else:
        scalars = {"l1_coefficient": Real(), "decoder_norm": DECODER_NORMS}
    scalars.update(lr=Real(), beta1=Real(high=1.0), beta2=Real(high=1.0),
                   eps=Real(low_inclusive=False))
    plan = draw(st.sampled_from(STEP_PLANS))
    sizes = draw(S.dims(empty=plan == "empty"))
    mm = draw(S.mismatch(specs)) if plan == "mismatch" else None
    arrays = (*PARAMS, "x", *STATE_PARTS)
    bad_slot = draw(st.sampled_from(arrays)) if plan == "slot" else None
    slots = {}
    for n in arrays:
        slots[n] = draw(S.slot(n, S.shape_of(n, specs[n], sizes, mm), hostile=n == bad_slot,
                               inplace=n != "x"))
        if n != "x":
            v = slots[n].values
            v[~np.isfinite(as_f32(v))] = 1.0  # NaN in parameters: a test of its own
            if n.startswith("state."):
                v[:] = 0
    slots["fire_counts"] = draw(st.sampled_from(("int32", "readonly", "strided") if
                                                plan == "fire_counts" else ("none", "ok")))
    if topk:
        slots["dead_mask"] = draw(st.sampled_from(("int8", "float") if plan == "dead_mask"
                                                  else ("none", "ok", "all")))
    c = Case(slots, specs, mm, inplace=tuple(PARAMS) + tuple(STATE_PARTS) + ("fire_counts",))
    c.plan, c.sizes = plan, sizes
    c.fire_shape = S.shape_of("fire_counts", ("d_sae",), sizes, mm)
    c.mask_shape = S.shape_of("dead_mask", ("d_sae",), sizes, mm)
    c.mask_seed = draw(st.integers(0, 2 ** 32 - 1))
    c.step = draw(st.sampled_from((-1, True, 1.5) if plan == "step" else (0, 0, 1, 2, 5, 10 ** 6)))
    bad_scalar = draw(st.sampled_from(sorted(scalars))) if plan == "scalar" else None
    for n, rule in scalars.items():
        c.scalars[n] = (draw(S.scalar(rule, bad=n == bad_scalar)), rule)
    event(f"plan: {plan}")
    return c


def _step_build(c):
    def build():
        a = {n: c.slots[n].build() for n in (*PARAMS, "x", *STATE_PARTS)}
        fc = c.slots["fire_counts"]
        rng = np.random.default_rng(c.mask_seed)
        if fc == "none":
            a["fire_counts"] = None
        else:
            arr = rng.integers(0, 5, size=c.fire_shape).astype(np.int64)
            if fc == "int32":
                arr = arr.astype(np.int32)
            elif fc == "readonly":
                arr.flags.writeable = False
            elif fc == "strided":
                arr = np.repeat(arr, 2)[::2]
            a["fire_counts"] = arr
        dm = c.slots.get("dead_mask", "none")
        if dm != "none":
            m = rng.random(c.mask_shape) < 0.5 if dm != "all" else np.ones(c.mask_shape, bool)
            a["dead_mask"] = {"int8": m.astype(np.int8), "float": m.astype(np.float32)}.get(dm, m)
        else:
            a["dead_mask"] = None
        return a
    return build


def _step_refused(c, a):
    names = c.refused(a)
    fc = a["fire_counts"]
    names.discard("fire_counts")
    if fc is not None and (fc.dtype != np.int64 or not fc.flags.c_contiguous
                           or not fc.flags.writeable or fc.shape != (c.sizes["d_sae"],)):
        names.add("fire_counts")
    dm = a.get("dead_mask")
    names.discard("dead_mask")
    if dm is not None and (dm.dtype != np.bool_ or dm.shape != (c.sizes["d_sae"],)):
        names.add("dead_mask")
    if isinstance(c.step, bool) or not isinstance(c.step, int) or c.step < 0:
        names.add("state.step")
    return names


def _state(a, step):
    return AdamState(SAEParams(*(a[f"state.m.{n}"] for n in PARAMS)),
                     SAEParams(*(a[f"state.v.{n}"] for n in PARAMS)), step)


def _step_call(c, topk):
    def call(be, a):
        params = SAEParams(*(a[n] for n in PARAMS))
        state = _state(a, c.step)
        kw = {n: v for n, (v, _) in c.scalars.items()}
        a["_state"] = state  # the step counter lives on the AdamState object
        if topk:
            return be.train_step_topk(params, state, a["x"], fire_counts=a["fire_counts"],
                                      dead_mask=a["dead_mask"], **kw)
        return be.train_step(params, state, a["x"], fire_counts=a["fire_counts"], **kw)
    return call


def _run_steps(c, topk, backends=None):
    build = _step_build(c)
    refused = _step_refused(c, build())
    event("refused" if refused else "accepted")
    out = {}
    for name in backends or STEP_BACKENDS:
        a = build()
        before = {k: S.digest(v) for k, v in a.items()}
        try:
            res, exc = _step_call(c, topk)(BE[name], a), None
        except Exception as e:  # noqa: BLE001
            res, exc = None, e
        state = a.pop("_state", None)
        for k, v in a.items():
            if exc is not None or k not in c.inplace:
                assert S.digest(v) == before[k], \
                    f"{name}: {k} changed by a step that {'raised' if exc else 'must not write it'}"
        if exc is not None and state is not None:
            assert state.step is c.step, f"{name}: state.step changed by a step that raised"
        if refused:
            _clear_error(exc, refused, name)
        elif exc is not None:
            raise AssertionError(f"{name} refused a valid step: {type(exc).__name__}: {exc}") \
                from exc
        else:
            out[name] = (a, state, res)
    return out


def _adam_check(name, a, state, p0, g64, tol_g, lr, b1, b2, eps, t0, normalize):
    """Fresh moments (zero) make Adam's step a monotone function of each
    gradient entry, so the float64 gradient +- its tolerance brackets the
    update every correct float32 evaluation makes."""
    assert state.step == t0 + 1, f"{name}: state.step {state.step}, expected {t0 + 1}"
    t = t0 + 1
    a1 = (1 - b1) / (1 - b1 ** t)
    s2 = np.sqrt((1 - b2) / (1 - b2 ** t))
    delta = lambda g: lr * a1 * g / (s2 * np.abs(g) + eps)  # noqa: E731
    big = lr * a1 / max(s2, 1e-300)
    for n, p, g, tg in zip(PARAMS, p0, g64, tol_g):
        m, v, new = (f64(x) for x in (state.m.__dict__[n], state.v.__dict__[n], a[n]))
        lo_m, hi_m = (1 - b1) * (g - tg), (1 - b1) * (g + tg)
        slack = 4 * U * np.abs(m) + 1e-30
        assert np.all((m >= lo_m - slack) & (m <= hi_m + slack)), f"{name}: state.m.{n} off"
        gsq_lo = np.where(np.abs(g) <= tg, 0.0, (np.abs(g) - tg) ** 2)
        gsq_hi = (np.abs(g) + tg) ** 2
        slack = 6 * U * np.abs(v) + 1e-37
        assert np.all((v >= (1 - b2) * gsq_lo - slack) & (v <= (1 - b2) * gsq_hi + slack)), \
            f"{name}: state.v.{n} off"
        hi, lo = p - delta(g - tg), p - delta(g + tg)
        slack = 4 * U * np.abs(p) + 32 * U * min(big, 1e30) + 1e-30
        if not (normalize and n == "W_dec"):
            bad = (new < lo - slack) | (new > hi + slack)
            assert not bad.any(), f"{name}: updated {n} off at {np.argwhere(bad)[:3].tolist()}: " \
                                  f"got {new[bad][:3]}, want in [{lo[bad][:3]}, {hi[bad][:3]}]"
            continue
        centre, radius = (hi + lo) / 2, (hi - lo) / 2 + slack
        cn, rn = np.linalg.norm(centre, axis=1), np.linalg.norm(radius, axis=1)
        ok_rows = cn > 10 * rn + 1e-20
        want = centre[ok_rows] / cn[ok_rows, None]
        tol = 3 * rn[ok_rows, None] / cn[ok_rows, None] + 1e-5
        assert np.all(np.abs(new[ok_rows] - want) <= tol), f"{name}: renormalized W_dec off"


def _loss_scale(x, p, f, M_pre, topk=False):
    """Magnitudes of the forward pass of a step, from the codes' magnitude."""
    Mf = np.where(f > 0, M_pre, 0.0) if topk else M_pre
    Mxh = Mf @ np.abs(p.W_dec) + np.abs(p.b_dec)
    return Mf, Mxh


def _relu_step_oracle(c, a):
    x, p = f64(a["x"]), SAEParams(*(f64(a[n]) for n in PARAMS))
    kw = {n: v for n, (v, _) in c.scalars.items()}
    pre, M_pre, b_pre = S.pre_activations(a["x"], *(a[n] for n in ("W_enc", "b_enc", "b_dec")))
    f = np.maximum(pre, 0)
    xh = f @ p.W_dec + p.b_dec
    want_l, want_g = R.gradients(x, p, f, xh, float(kw["l1_coefficient"]), kw["decoder_norm"])
    Mf, Mxh = _loss_scale(x, p, f, M_pre)
    (ms, ls), mg, worst = S.gradient_magnitudes(x, p, Mf, Mxh, float(kw["l1_coefficient"]),
                                                kw["decoder_norm"])
    ambiguous = bool(np.any(np.abs(pre) <= b_pre))
    return dict(pre=pre, f=f, losses=(want_l.mse, want_l.l1), mags=(ms, ls), grads=want_g,
                gmags=mg, worst=max(worst, S._max(M_pre), S._max(Mxh)), ambiguous=ambiguous,
                active=f > 0, bound=b_pre)


def _ambiguous_selection(pre, bound, cap, groups):
    for g in groups:
        order = np.argsort(-pre[g], kind="stable")
        vals, bnd = pre[g][order], bound[g][order]
        kk = min(cap, vals.size)
        if np.any(np.abs(vals[:kk]) <= bnd[:kk]):
            return True
        if kk < vals.size and vals[kk - 1] - vals[kk] <= bnd[kk - 1] + bnd[kk]:
            return True
    return False


def _topk_step_oracle(c, a):
    x, p = f64(a["x"]), SAEParams(*(f64(a[n]) for n in PARAMS))
    kw = {n: v for n, (v, _) in c.scalars.items()}
    k, batch = int(kw["k"]), kw["activation"] == "batchtopk"
    pre, M_pre, b_pre = S.pre_activations(a["x"], *(a[n] for n in ("W_enc", "b_enc", "b_dec")))
    N, d_sae = pre.shape
    if batch:
        ambiguous = _ambiguous_selection(pre.ravel(), b_pre.ravel(), k * N, [slice(None)])
        codes = R.encode_batchtopk(x, p.W_enc, p.b_enc, p.b_dec, k)
    else:
        ambiguous = _ambiguous_selection(pre, b_pre, k, [i for i in range(N)])
        codes = R.encode_topk(x, p.W_enc, p.b_enc, p.b_dec, k)
    f = codes.to_dense()
    xh = f @ p.W_dec + p.b_dec
    fa, w = None, 0.0
    dm = a["dead_mask"]
    if R.auxk_active(dm, kw["k_aux"], kw["aux_coefficient"]):
        dead = np.flatnonzero(dm)
        ambiguous |= _ambiguous_selection(pre[:, dead], b_pre[:, dead], int(kw["k_aux"]),
                                          list(range(N)))
        fa = R.encode_topk_aux(x, p.W_enc, p.b_enc, p.b_dec, dm, kw["k_aux"]).to_dense()
        w = R.aux_scale(dm, kw["k_aux"], kw["aux_coefficient"])
    want_l, want_g = R.topk_gradients(x, p, f, xh, fa, w)
    Mf, Mxh = _loss_scale(x, p, f, M_pre, topk=True)
    Mfa = None if fa is None else np.where(fa > 0, M_pre, 0.0)
    (ms, aux), mg, worst = S.topk_gradient_magnitudes(x, p, Mf, Mxh, Mfa, w)
    return dict(pre=pre, f=f, losses=(want_l.mse, want_l.aux), mags=(ms, aux), grads=want_g,
                gmags=mg, worst=max(worst, S._max(M_pre), S._max(Mxh)), ambiguous=ambiguous,
                active=f > 0, bound=b_pre, codes=codes)


def _check_step(c, topk, name, a, state, res, p0, x32, fc0):
    o = (_topk_step_oracle if topk else _relu_step_oracle)(c, dict(p0, x=x32,
                                                                  dead_mask=a["dead_mask"]))
    kw = {n: v for n, (v, _) in c.scalars.items()}
    scal = [float(kw[n]) for n in ("lr", "beta1", "beta2", "eps")]
    if o["worst"] >= OVERFLOW or any(abs(s) >= OVERFLOW for s in scal) or \
            abs(float(kw.get("l1_coefficient", 0.0))) >= OVERFLOW:
        event("compared: nothing (overflow possible)")
        return  # overflow possible: the finite-loss rules have tests of their own
    fields = ("mse", "aux") if topk else ("mse", "l1")
    _check_losses(res, o["losses"], o["mags"], name, fields)
    if o["ambiguous"]:
        event("compared: losses")
        return  # an activation within rounding of its threshold: gradients may legitimately differ
    assert res.l0 == pytest.approx(o["active"].sum() / x32.shape[0], abs=1e-12), f"{name}: l0"
    if a["fire_counts"] is not None:
        assert np.array_equal(a["fire_counts"], fc0 + o["active"].sum(axis=0)), f"{name}: fire"
    if topk:
        kept = o["pre"][o["active"]]
        want_min = float(kept.min()) if kept.size else 0.0
        assert abs(res.extra["min_active"] - want_min) <= 1e-5 * S._max(o["bound"]) / U + 1e-30, \
            f"{name}: min_active {res.extra['min_active']} vs {want_min}"
    event("compared: losses, gradients, Adam update")
    tol_g = [1e-5 * m + 1e-4 * np.abs(g) + 1e-30 for m, g in zip(o["gmags"], o["grads"].arrays())]
    normalize = topk or kw.get("decoder_norm") == "unit_norm"
    _adam_check(name, a, state, [f64(p0[n]) for n in PARAMS], o["grads"].arrays(), tol_g,
                *scal, c.step, normalize)


def _fuzz_step(c, topk):
    build = _step_build(c)
    base = build()
    p0 = {n: base[n].copy() for n in PARAMS}
    x32 = as_f32(base["x"])
    fc0 = None if base["fire_counts"] is None else base["fire_counts"].copy()
    for name, (a, state, res) in _run_steps(c, topk).items():
        _check_step(c, topk, name, a, state, res, p0, x32, fc0)


@fuzz
@given(c=step_case())
def test_train_step(c):
    _fuzz_step(c, topk=False)


@fuzz
@given(c=step_case(topk=True))
def test_train_step_topk(c):
    _fuzz_step(c, topk=True)


# ================================================================ SparseCodes
SAFE_HOSTILITIES = tuple(h for h in S.HOSTILITIES if h not in ("stored_zero", "negative_value"))


@st.composite
def sparse_case(draw, hostilities=S.HOSTILITIES):
    n, d_sae, d_in = (draw(st.sampled_from((1, 1, 2, 3, 5, 8))) for _ in range(3))
    rec = draw(S.codes_recipe(n, d_sae, hostilities=hostilities))
    W = draw(S.values((d_sae, d_in), kinds=()))
    b = draw(S.values((d_in,), kinds=()))
    norms = np.abs(draw(S.values((d_sae,), kinds=())))
    return rec, as_f32(W), as_f32(b), as_f32(norms), draw(st.sampled_from((0.0, 0.1, 3.0)))


def _guarded(fn, codes, check):
    """``fn(backend)`` on numpy first; on the compiled backends only if the
    codes are valid or numpy's front refused them (so a front that lets bad
    codes through fails here instead of crashing in a kernel)."""
    valid = S.csr_valid(codes)
    for name in BACKENDS:
        before = S.digest(codes)
        try:
            res, exc = fn(BE[name]), None
        except Exception as e:  # noqa: BLE001
            res, exc = None, e
        assert S.digest(codes) == before, f"{name}: codes mutated"
        if not valid:
            _clear_error(exc, {"codes"}, f"{name} (invalid codes)")
        elif exc is not None:  # "refused or converted": an unsigned indptr may be refused
            _clear_error(exc, {"codes"}, f"{name} (valid codes)")
        else:
            check(name, _host(BE[name], res))


def _construct(rec):
    try:
        return rec.build()
    except Exception as exc:  # noqa: BLE001 - SparseCodes may validate at construction
        assert isinstance(exc, (TypeError, ValueError)), f"{type(exc).__name__}: {exc}"
        return None


@fuzz
@given(sc=sparse_case())
def test_sparse_codes_in_the_front(sc):
    """Hostile or odd SparseCodes (random dtypes, wrap-around, out-of-range,
    unsorted, wrong lengths, NaN) given to decode and l1_subgradient, and
    to_dense: a clear refusal or the right answer, never a crash."""
    rec, W, b, norms, coef = sc
    codes = _construct(rec)
    if codes is None:
        return
    valid = S.csr_valid(codes)
    if valid:
        got = codes.to_dense()
        want = np.zeros(codes.shape, dtype=np.result_type(codes.values.dtype, np.float32))
        rows = np.repeat(np.arange(codes.shape[0]), np.diff(np.asarray(codes.indptr, np.int64)))
        want[rows, np.asarray(codes.indices, np.int64)] = codes.values
        assert got.dtype == want.dtype and np.array_equal(got, want), "to_dense"

    def check_decode(name, got):
        want, M, bound = _decode_oracle(codes, W, b)
        S.check_close(got, want, M, f"{name} decode", bound=bound)
    _guarded(lambda be: be.decode(codes, W, b), codes, check_decode)
    if rec.hostility in ("stored_zero", "negative_value"):
        return  # l1_subgradient of stored values <= 0: test_l1_subgradient_ignores_stored_nonpositive
    _guarded(lambda be: be.l1_subgradient(codes, norms, coef), codes,
             _l1_check(codes, norms, coef))


def _l1_check(codes, norms, coef):
    """The check of an accepted ``l1_subgradient`` call against the oracle."""
    def check(name, got):
        want, scale = _l1_want(codes, norms, coef)
        S.check_close(got.to_dense(), want, scale, f"{name} l1_subgradient",
                      bound=4 * U * np.abs(want) + 1e-30)
    return check


@st.composite
def dense_like(draw):
    shape = draw(st.sampled_from(((1, 1), (2, 3), (5, 1), (1, 7), (4, 4), (0, 3), (3, 0), (3,),
                                  (2, 2, 2))))
    v = draw(S.values(shape))
    kind = draw(st.sampled_from(("float32", "float64", "float16", "int32", "uint8", "uint64",
                                 "bool", "object", "complex_real", "complex", "F", "reversed")))
    if kind == "complex":
        return v + 1j * draw(S.values(shape, kinds=())), kind
    if kind == "complex_real":
        return v.astype(np.complex128), kind
    if kind in ("F", "reversed"):
        return S._layout(v.astype(np.float32), kind), kind
    return S._cast(v, kind), kind


def _to_dense_or_refusal(c, what):
    """``c.to_dense()``, or None when it refuses codes holding non-finite
    values (a clear ValueError about the values is fine)."""
    try:
        return c.to_dense()
    except ValueError as exc:
        assert "values" in str(exc) and not np.isfinite(c.values).all(), f"{what}: {exc}"
        return None


@fuzz
@given(d=dense_like())
def test_sparse_codes_from_dense(d):
    """from_dense gives canonical codes whose to_dense is the input in
    float32, or refuses it clearly (complex with an imaginary part: refused)."""
    a, kind = d
    try:
        c = SparseCodes.from_dense(a)
    except Exception as exc:  # noqa: BLE001
        assert isinstance(exc, (TypeError, ValueError)), f"from_dense {kind}: {exc!r}"
        # refused: not a matrix, empty, or not real numbers (complex, object:
        # the front refuses those dtypes everywhere)
        assert (np.asarray(a).ndim != 2 or np.asarray(a).size == 0
                or kind.startswith(("complex", "object"))), f"from_dense refused {kind}: {exc}"
        return
    assert np.asarray(a).ndim == 2, "from_dense accepted a non-matrix"
    assert kind != "complex" or not np.any(np.imag(a)), "from_dense dropped imaginary parts"
    S.check_canonical(c, a.shape, f"from_dense({kind})")
    got = _to_dense_or_refusal(c, f"from_dense({kind}).to_dense()")
    if got is not None:
        want = as_f32(np.real(a) if np.iscomplexobj(a) else a)
        assert np.array_equal(got, want, equal_nan=True), f"from_dense({kind}) values"


@fuzz
@given(data=st.data())
def test_sparse_codes_from_scipy(data):
    """from_scipy: duplicates summed, explicit zeros dropped, rows sorted, no
    stored zero even for values that vanish in float32 (1e-50); the input
    matrix is left as it was."""
    n, m = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    nnz = data.draw(st.integers(0, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    vals = rng.choice(np.array([0.0, 1.0, -2.5, 1e-50, 3e38, 1e39, 0.1]), nnz)
    dtype = data.draw(st.sampled_from((np.float64, np.float32, np.int64, np.bool_)))
    fmt = data.draw(st.sampled_from(("coo", "csr_unsorted", "csc")))
    M = sp.coo_array((S._cast(vals, dtype), (rng.integers(0, n, nnz), rng.integers(0, m, nnz))),
                     shape=(n, m))
    if fmt == "csc":
        M = M.tocsc()
    elif fmt == "csr_unsorted":  # raw CSR: duplicates, columns in any order
        order = np.argsort(M.row, kind="stable")
        indptr = np.searchsorted(M.row[order], np.arange(n + 1))
        M = sp.csr_array((M.data[order], M.col[order], indptr), shape=(n, m))
    want = as_f32(M.toarray())
    parts = [getattr(M, k).copy() for k in ("data", "indices", "indptr") if hasattr(M, k)]
    c = SparseCodes.from_scipy(M)
    after = [getattr(M, k) for k in ("data", "indices", "indptr") if hasattr(M, k)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, after)), f"from_scipy({fmt}) " \
        "changed its input"
    S.check_canonical(c, (n, m), f"from_scipy({np.dtype(dtype)}, {fmt})")
    got = _to_dense_or_refusal(c, "from_scipy(...).to_dense()")
    if got is not None:
        assert np.allclose(got, want, rtol=1e-6, atol=0, equal_nan=True), f"from_scipy({fmt})"


# ================================================================ readers
@st.composite
def damage(draw):
    kind = draw(st.sampled_from(("none", "truncate", "truncate", "flip", "flip", "flip",
                                 "random", "append")))
    return kind, draw(st.integers(0, 2 ** 32 - 1)), draw(st.binary(max_size=64))


def _damaged(data: bytes, dmg) -> bytes:
    kind, seed, junk = dmg
    rng = np.random.default_rng(seed)
    if kind == "truncate":
        return data[:int(rng.integers(0, len(data)))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            # half the flips in the 8-byte length or the JSON header
            hi = min(len(b), 8 + 200) if rng.random() < 0.5 else len(b)
            b[int(rng.integers(0, hi))] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == "random":
        return junk
    if kind == "append":
        return data + junk
    return data


def _crafted_safetensors(draw) -> bytes:
    """A hand-made safetensors file: random dtypes (BF16, F8, bogus), shapes
    and offsets that may disagree with the data."""
    header, blob = {}, b""
    for name in draw(st.lists(st.sampled_from(("W_enc", "b_enc", "W_dec", "b_dec", "threshold",
                                               "x")), max_size=5, unique=True)):
        dt = draw(st.sampled_from(("F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3",
                                   "C64", "XYZ")))
        shape = draw(st.lists(st.integers(-1, 4), max_size=3))
        size = draw(st.integers(0, 64))
        start = len(blob) if draw(st.booleans()) else draw(st.integers(0, 80))
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [start, start + size]}
        blob += bytes(draw(st.binary(min_size=size, max_size=size)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 10 ** 30) |
                    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) |
                    st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


def _reader_outcome(fn, where):
    try:
        return fn(), None
    except (SAEFormatError, FileNotFoundError) as exc:
        return None, exc
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{where}: {type(exc).__module__}.{type(exc).__name__}: {exc}") \
            from exc


def _random_tensors(draw):
    out = {}
    for name in draw(st.lists(st.sampled_from(("W_enc", "b", "x.y", "param.W_dec", "t")),
                              max_size=4, unique=True)):
        shape = draw(st.sampled_from(((0,), (3,), (2, 3), (1, 1, 2))))  # () has its own test
        dt = draw(st.sampled_from((np.float32, np.float16, np.float64, np.int32, np.int64,
                                   np.uint8, np.bool_)))
        out[name] = S._cast(draw(S.values(shape)), dt)
    return out


@fuzz
@given(data=st.data(), dmg=damage())
def test_load_tensors_on_damaged_files(data, dmg, tmp_path_factory):
    d = tmp_path_factory.mktemp("t", numbered=True)
    path = d / "f.safetensors"
    tensors = _random_tensors(data.draw)
    meta = data.draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8)))
    if data.draw(st.integers(0, 4)) == 0:
        path.write_bytes(_crafted_safetensors(data.draw))
        dmg = ("crafted",) + dmg[1:]
    else:
        save_tensors(path, tensors, meta)
        path.write_bytes(_damaged(path.read_bytes(), dmg))
    res, exc = _reader_outcome(lambda: load_tensors(path), f"load_tensors ({dmg[0]})")
    if res is None:
        assert dmg[0] != "none", f"valid file refused: {exc}"
        return
    arrays, got_meta = res
    assert isinstance(arrays, dict) and isinstance(got_meta, dict)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    if dmg[0] == "none":
        assert arrays.keys() == tensors.keys() and got_meta == (meta or {})
        for k, v in tensors.items():
            assert arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v, equal_nan=True), k


@fuzz
@given(v=S.values(()), dt=st.sampled_from((np.float32, np.float64, np.int64, np.bool_)))
def test_save_load_tensors_keeps_0d_shapes(v, dt, tmp_path_factory):
    path = tmp_path_factory.mktemp("t0", numbered=True) / "f.safetensors"
    a = S._cast(v, dt)
    save_tensors(path, {"a": a})
    got, _ = load_tensors(path)
    assert got["a"].shape == () and np.array_equal(got["a"], a, equal_nan=True)


@st.composite
def sae_dir_case(draw):
    d_in, d_sae = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    arch = draw(st.sampled_from(("standard", "topk", "jumprelu")))
    params = SAEParams(*(as_f32(draw(S.values(s, kinds=())))
                         for s in ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))))
    what = draw(st.sampled_from(("none", "weights", "weights", "crafted", "cfg_field", "cfg_field",
                                 "cfg_field", "cfg_json", "cfg_text", "delete_weights",
                                 "delete_cfg")))
    extra = {}
    if what == "cfg_field":
        extra["field"] = draw(st.sampled_from(("d_in", "d_sae", "dtype", "architecture", "k",
                                               "apply_b_dec_to_input", "normalize_activations",
                                               "reshape_activations",
                                               "rescale_acts_by_decoder_norm", "metadata")))
        extra["value"] = draw(JSON | st.sampled_from((d_in, d_sae, 1, True, False, "float16",
                                                      "torch.float32", "bfloat16", "topk",
                                                      "jumprelu", "none", None)))
        extra["delete"] = draw(st.integers(0, 5)) == 0
    elif what == "cfg_json":
        extra["value"] = draw(JSON)
    elif what == "cfg_text":
        extra["text"] = draw(st.sampled_from((b"", b"\xff\xfe\x00", b"[" * 100000, b"NaN",
                                              b'{"d_in": 1e999}', b'{"d_in": 2, "d_in": 3}',
                                              b"{" + b'"a":{' * 50000)) | st.binary(max_size=40))
    elif what == "crafted":
        extra["bytes"] = _crafted_safetensors(draw)
    return params, arch, what, extra, draw(damage()), draw(st.integers(1, d_sae))


@fuzz
@given(case=sae_dir_case())
def test_read_sae_dir_on_damaged_dirs(case, tmp_path_factory):
    params, arch, what, extra, dmg, k = case
    d = tmp_path_factory.mktemp("sae", numbered=True)
    thr = np.abs(params.b_enc) if arch == "jumprelu" else None
    write_sae_dir(d, params, architecture=arch, k=k if arch == "topk" else None, threshold=thr)
    wpath, cpath = d / "sae_weights.safetensors", d / "cfg.json"
    if what == "weights":
        wpath.write_bytes(_damaged(wpath.read_bytes(), dmg))
    elif what == "crafted":
        wpath.write_bytes(extra["bytes"])
    elif what == "cfg_field":
        cfg = json.loads(cpath.read_text())
        if extra["delete"]:
            cfg.pop(extra["field"], None)
        else:
            cfg[extra["field"]] = extra["value"]
        cpath.write_text(json.dumps(cfg))
    elif what == "cfg_json":
        cpath.write_text(json.dumps(extra["value"]))
    elif what == "cfg_text":
        cpath.write_bytes(extra["text"])
    elif what == "delete_weights":
        wpath.unlink()
    elif what == "delete_cfg":
        cpath.unlink()
    undamaged = what == "none" or (what == "weights" and dmg[0] == "none")
    res, exc = _reader_outcome(lambda: read_sae_dir(d), f"read_sae_dir ({what})")
    if res is None:
        assert not undamaged, f"valid directory refused: {exc}"
        return
    got, cfg, extras = res
    assert isinstance(got, SAEParams) and isinstance(cfg, dict) and isinstance(extras, dict)
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    for n, shape in zip(PARAMS, ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))):
        a = getattr(got, n)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous, n
        assert a.shape == shape and np.isfinite(a).all(), f"{n}: {a.shape} vs cfg {shape}"
    if "k" in extras:
        assert isinstance(extras["k"], int) and 1 <= extras["k"] <= d_sae
    if "threshold" in extras:
        t = extras["threshold"]
        assert t.dtype == np.float32 and t.shape == (d_sae,) and np.isfinite(t).all()
    if undamaged:
        for n in PARAMS:
            assert np.array_equal(getattr(got, n), getattr(params, n)), n


@fuzz
@given(data=st.data(), dmg=damage())
def test_read_checkpoint_on_damaged_files(data, dmg, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt", numbered=True)
    path = d / "checkpoint.safetensors"
    tensors = {k: np.ascontiguousarray(v) for k, v in _random_tensors(data.draw).items()}
    run_state = {"kind": "sae", "step": 3, "adam_step": 3, "scale": 1.0, "stream": {},
                 "rng": {}, "config": {}, "model": {}, "backend": "numpy", "window": [],
                 "acc": {}, "data": None, "data_rows": 0, "extra": {}}
    edited = data.draw(st.integers(0, 3)) == 0  # one field given random JSON, or dropped
    if edited:
        key = data.draw(st.sampled_from(sorted(run_state) + ["format"]))
        if data.draw(st.booleans()):
            run_state.pop(key, None)
        else:
            run_state[key] = data.draw(JSON.filter(lambda v: "NaN" not in json.dumps(v)))
    meta_kind = data.draw(st.sampled_from(("writer",) * 5 + ("text", "json", "none")))
    if meta_kind == "writer":
        write_checkpoint(path, tensors, dict(run_state))
    elif meta_kind == "none":
        save_tensors(path, tensors)
    else:
        text = data.draw(st.text(max_size=20)) if meta_kind == "text" else json.dumps(
            data.draw(JSON))
        save_tensors(path, tensors, {"fastsae": text})
    path.write_bytes(_damaged(path.read_bytes(), dmg))
    where = f"read_checkpoint ({meta_kind}, {dmg[0]})"
    target = d if data.draw(st.booleans()) else path
    res, exc = _reader_outcome(lambda: read_checkpoint(target), where)
    valid = meta_kind == "writer" and dmg[0] == "none" and not edited
    if res is None:
        assert not valid, f"{where}: valid checkpoint refused: {exc}"
        return
    got, state = res
    assert isinstance(got, dict) and isinstance(state, dict) and \
        state.get("format") == CHECKPOINT_FORMAT, where
    if valid:
        assert {k: v for k, v in run_state.items() if k != "format"}.items() <= state.items()
        assert got.keys() == tensors.keys()
        for k, v in tensors.items():
            assert np.array_equal(got[k], v, equal_nan=True), k


# ================================================================ known bugs, each on its own
@fuzz
@given(sc=sparse_case(hostilities=("decreasing_indptr", "indptr_end", "short_indptr", "none")),
       unsigned=st.sampled_from((np.uint64, np.uint32, np.uint8)))
def test_decode_never_reads_past_an_unsigned_or_decreasing_indptr(sc, unsigned):
    """(a) an unsigned or decreasing indptr (e.g. uint64 ``[0, 10**7, 3]``, a
    segfault in numba's decode once) is refused or converted exactly."""
    rec, W, b, _, _ = sc
    rec.indptr_dtype = unsigned
    codes = _construct(rec)
    if codes is None:
        return

    def check(name, got):
        want, M, bound = _decode_oracle(codes, W, b)
        S.check_close(got, want, M, f"{name} decode", bound=bound)
    _guarded(lambda be: be.decode(codes, W, b), codes, check)


@fuzz
@given(sc=sparse_case(hostilities=("stored_zero", "negative_value")))
def test_l1_subgradient_ignores_stored_nonpositive(sc):
    """(b) the L1 subgradient is only where codes > 0: an explicitly stored
    zero or negative value gets 0."""
    rec, _, _, norms, coef = sc
    rec.values_dtype = np.float32
    coef = max(coef, 0.1)
    codes = _construct(rec)
    assume(codes is not None and S.csr_valid(codes))
    _guarded(lambda be: be.l1_subgradient(codes, norms, coef), codes,
             _l1_check(codes, norms, coef))


@st.composite
def nonfinite_step_case(draw):
    """Valid step inputs but one NaN or inf entry in one parameter (the front
    does not scan parameters: a trainer stops on the non-finite loss)."""
    sizes = draw(S.dims())
    N, d_in, d_sae = sizes["N"], sizes["d_in"], sizes["d_sae"]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    p = SAEParams(*(as_f32(rng.normal(size=s)) for s in
                    ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))))
    which = draw(st.sampled_from(PARAMS))
    a = getattr(p, which)
    a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from((np.nan, np.inf, -np.inf)))
    x = as_f32(rng.normal(size=(N, d_in)))
    return p, x, which, draw(st.sampled_from((1, 2, 9))), draw(st.booleans())


def _nonfinite_loss_rule(case, topk):
    """(c) NaN/inf in the parameters of a step: every backend reports a
    non-finite loss, or refuses the step naming the parameter (unchanged)."""
    p, x, which, k, batch = case
    for name in STEP_BACKENDS:
        q, s = p.copy(), AdamState.zeros_like(p)
        before = S.digest((q, s))
        try:
            if topk:
                res = BE[name].train_step_topk(q, s, x, k=k, lr=1e-3,
                                               activation="batchtopk" if batch else "topk")
            else:
                res = BE[name].train_step(q, s, x, l1_coefficient=0.1, lr=1e-3,
                                          decoder_norm="unit_norm" if batch else "weighted_l1")
        except Exception as exc:  # noqa: BLE001
            _clear_error(exc, {which}, f"{name} (non-finite {which})")
            assert S.digest((q, s)) == before, f"{name}: a refused step wrote"
            continue
        assert not np.isfinite(res.total), \
            f"{name}: finite loss {res.total} from a non-finite {which}"


@fuzz
@given(case=nonfinite_step_case())
def test_train_step_nonfinite_params_report_nonfinite_loss(case):
    _nonfinite_loss_rule(case, topk=False)


@fuzz
@given(case=nonfinite_step_case())
def test_train_step_topk_nonfinite_params_report_nonfinite_loss(case):
    _nonfinite_loss_rule(case, topk=True)


@st.composite
def overflow_case(draw, topk=False):
    """A valid step whose loss lies past float32's range: finite inputs of
    1e17..1e20 (squares beyond 3.4e38 once summed)."""
    sizes = draw(S.dims())
    N, d_in, d_sae = sizes["N"], sizes["d_in"], sizes["d_sae"]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from((1e17, 1e18, 1e19, 1e20)))
    p = SAEParams(*(as_f32(rng.normal(size=s) * 0.1) for s in
                    ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))))
    x = as_f32(rng.normal(size=(N, d_in)) * scale)
    return p, x, draw(st.sampled_from((1, 2, 5)))


def _overflow_rule(p, x, run):
    """(d) a loss past float32's range is reported as inf, never as a finite
    float above 3.4e38 (backends that sum in float64 could)."""
    q64 = SAEParams(*(f64(a) for a in p.arrays()))
    zeros = lambda: SAEParams(*(np.zeros_like(a) for a in q64.arrays()))  # noqa: E731
    want = run(R, q64, AdamState(zeros(), zeros(), 0), f64(x))  # the float64 oracle
    for name in STEP_BACKENDS:
        q, s = p.copy(), AdamState.zeros_like(p)
        res = run(BE[name], q, s, x)
        for part in ("mse", "total"):
            v = getattr(res, part)
            assert not (np.isfinite(v) and abs(v) > F32_MAX), \
                f"{name}: {part} = {v:g} is past float32's range but reported finite"
        if want.total > 1.01 * F32_MAX:
            assert not np.isfinite(res.total), \
                f"{name}: total {res.total:g}, the float64 loss is {want.total:g}"


@fuzz
@given(oc=overflow_case())
def test_train_step_loss_overflow_is_reported_as_inf(oc):
    p, x, _ = oc
    _overflow_rule(p, x, lambda be, q, s, x: be.train_step(q, s, x, l1_coefficient=0.0,
                                                           lr=1e-3))


@fuzz
@given(oc=overflow_case())
def test_train_step_topk_loss_overflow_is_reported_as_inf(oc):
    p, x, k = oc
    _overflow_rule(p, x, lambda be, q, s, x: be.train_step_topk(q, s, x, k=k, lr=1e-3))


ALIASES = ("m_is_v", "m_is_params", "moment_array_shared", "x_is_W_dec", "b_enc_is_b_dec",
           "fire_counts_view")


@fuzz
@given(kind=st.sampled_from(ALIASES), topk=st.booleans(), seed=st.integers(0, 2 ** 32 - 1),
       n=st.sampled_from((1, 2, 3, 5)), d_in=st.sampled_from((1, 2, 4)))
def test_step_refuses_aliased_arguments(kind, topk, seed, n, d_in):
    """The same array passed twice to a step: refused with a ValueError
    naming one of them, nothing written; or (an array only read, x) the
    result of the same step on a copy."""
    d_sae = {"x_is_W_dec": n, "b_enc_is_b_dec": d_in}.get(kind, 3)
    rng = np.random.default_rng(seed)

    def build():
        r = np.random.default_rng(seed)
        p = SAEParams(*(as_f32(r.normal(size=s)) for s in
                        ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))))
        x = as_f32(r.normal(size=(n, d_in)))
        st_ = AdamState.zeros_like(p)
        fc = np.zeros(d_sae, np.int64)
        names = set()
        if kind == "m_is_v":
            st_ = AdamState(st_.m, st_.m, 0)
            names = {f"state.{a}.{b}" for a in "mv" for b in PARAMS}
        elif kind == "m_is_params":
            st_ = AdamState(p, st_.v, 0)
            names = {f"state.m.{b}" for b in PARAMS} | set(PARAMS)
        elif kind == "moment_array_shared":
            st_.v.W_enc = st_.m.W_enc
            names = {"state.m.W_enc", "state.v.W_enc"}
        elif kind == "x_is_W_dec":
            x = p.W_dec
            names = {"x", "W_dec"}
        elif kind == "b_enc_is_b_dec":
            p.b_enc = p.b_dec
            names = {"b_enc", "b_dec"}
        elif kind == "fire_counts_view":
            fc = np.zeros(2 * d_sae, np.int64)[:d_sae]  # a view, but not shared: accepted
        return p, st_, x, fc, names

    def step(be, p, s, x, fc):
        if topk:
            return be.train_step_topk(p, s, x, k=2, lr=1e-2, fire_counts=fc)
        return be.train_step(p, s, x, l1_coefficient=0.1, lr=1e-2, fire_counts=fc)
    del rng
    for name in STEP_BACKENDS:
        p, s, x, fc, names = build()
        before = S.digest((p, s, x, fc))
        try:
            res, exc = step(BE[name], p, s, x, fc), None
        except Exception as e:  # noqa: BLE001
            res, exc = None, e
        if exc is not None or kind not in ("x_is_W_dec", "fire_counts_view"):
            _clear_error(exc, names, f"{name} {kind}")
            assert S.digest((p, s, x, fc)) == before, f"{name}: a refused step wrote"
            continue
        p2, s2, _, fc2, _ = build()
        want = step(BE[name], p2, s2, np.array(x if kind != "x_is_W_dec" else p2.W_dec), fc2)
        assert res.total == pytest.approx(want.total, rel=1e-6), f"{name} {kind}"
