"""bf16 encoders (issue 13): ``precision="bf16"`` on ``encode_relu_sparse``,
``encode_topk`` and ``encode_jumprelu``.

What is checked, and against what:

* the oracle (the ``numpy`` backend, :mod:`fastsae.backends.reference`):
  ``bf16_round`` against a bit-level round-to-nearest-even written here (ties,
  NaN, inf, overflow, denormals), and the three encoders against their
  definitions evaluated directly in float64 (``pre_b`` from the bf16-rounded
  operands, ``pre`` the float32 pre-activations);
* the compiled kernel (``numba`` and ``cython``, on every instruction path of
  ``fastsae.backends.bf16.available_paths()``, forced with
  ``FASTSAE_BF16_PATH``) against the same definitions: on *exact* data (short
  operands whose bf16 product is an exact float32 sum in any order) the
  supports must equal the oracle's; on random data they may differ only where
  ``pre_b`` or ``pre`` is within float32 rounding of the boundary (0, the
  threshold, or TopK's m-th / k-th value);
* hand-built cases, exact in any summation order, where the bf16 rule and the
  fp32 rule give different supports, and where the value (``pre``) differs
  from ``pre_b``;
* thread-count independence (bitwise), ``BF16Encoder`` against the contract
  functions (bitwise), numba against cython (bitwise, one shared kernel);
* ``precision="fp32"`` (the default) bit-identical to omitting it;
* refusals: a bad ``precision``, ``bf16`` on cuda, an unknown or unavailable
  ``FASTSAE_BF16_PATH``.

Tolerances (see the spec's "Tolerances"): values within
``max(1e-5 * (|pre| + (|xc| @ |W_enc| + |b_enc|)), dot_bound)`` of the float64
``pre``; ``pre_b`` computed by the kernel in float32 is within
``2 (d_in + 2) u (|xc_b| @ |W_b| + |b_enc|)`` of the float64 one (0 on exact
data).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastsae
from fastsae import SparseCodes
from fastsae import reference as R
from fastsae.backends import tunables as TU

from conftest import BACKEND_STATUS as _STATUS
from conftest import BF16 as B
from conftest import BF16_IMPORT_ERROR as _B_ERR
from conftest import BF16_PATHS as PATHS
from conftest import U32, dot_bound, f64, make_params, make_x
from conftest import backend_usable as _usable
from conftest import skip_unusable_backend as _skip_unusable
from conftest import skip_without_bf16 as _need_bf16

# the caller's shell must not pick the path (tests that want one set it)
pytestmark = pytest.mark.usefixtures("no_bf16_path_from_outside")

KNOWN_PATHS = ("avx512bf16", "emulated")
CPU_BACKENDS = ("numpy", "numba", "cython")


@pytest.fixture(params=CPU_BACKENDS)
def cpu(request):
    _skip_unusable(request.param)
    if request.param != "numpy":
        _need_bf16()
    return fastsae.get_backend(request.param)


ORACLE = fastsae.get_backend("numpy")


# ------------------------------------------------------------ helpers
def bf16_bits(a):
    """Round float32 to the nearest bfloat16, ties to even, by bit arithmetic
    (NaN stays NaN, inf stays inf, overflow goes to inf)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    lsb = (u >> np.uint64(16)) & np.uint64(1)
    r = ((u + np.uint64(0x7FFF) + lsb) & np.uint64(0xFFFF0000)).astype(np.uint32)
    out = r.view(np.float32).reshape(a.shape).copy()
    out[np.isnan(a)] = np.nan
    return out


def bf16_by_distance(a):
    """The same rounding, written as "the nearer of the two bf16 neighbours"
    in float64 (a check of :func:`bf16_bits`); finite inputs only."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    lo_bits = u & np.uint32(0xFFFF0000)
    hi_bits = lo_bits + np.uint32(0x10000)  # next bf16 away from zero
    lo = f64(lo_bits.view(np.float32))
    hi_inf = (hi_bits & np.uint32(0x7FFFFFFF)) == np.uint32(0x7F800000)
    with np.errstate(over="ignore", invalid="ignore"):
        hi = f64(hi_bits.view(np.float32))
    hi = np.where(hi_inf, np.copysign(2.0 ** 128, f64(a)), hi)  # unbounded exponent
    d_lo, d_hi = np.abs(f64(a) - lo), np.abs(hi - f64(a))
    even = ((lo_bits >> np.uint32(16)) & np.uint32(1)) == 0
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & even)
    return np.where(take_lo, lo_bits, hi_bits).view(np.float32).reshape(a.shape)


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _candidates_fn():
    for mod in (R, B, TU):
        fn = getattr(mod, "bf16_topk_candidates", None) if mod is not None else None
        if fn is not None:
            return fn
    return None


def n_candidates(k, d_sae):
    """The spec's m, written out."""
    return min(d_sae, k + max(8, k // 4))


def assert_canonical(c: SparseCodes, n, d_sae):
    c = c.to_host()
    assert tuple(c.shape) == (n, d_sae)
    assert c.indptr.dtype == np.int64 and c.indices.dtype == np.int32
    assert c.values.dtype == np.float32
    assert c.indptr.shape == (n + 1,) and c.indptr[0] == 0
    assert np.all(np.diff(c.indptr) >= 0) and c.indptr[-1] == c.indices.size == c.values.size
    assert np.all((c.indices >= 0) & (c.indices < d_sae))
    for i in range(n):
        row = c.indices[c.indptr[i]:c.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), f"row {i}: columns not strictly increasing"
    return c


def mask_of(c: SparseCodes):
    c = c.to_host()
    m = np.zeros(c.shape, bool)
    rows = np.repeat(np.arange(c.shape[0]), np.diff(c.indptr))
    m[rows, c.indices] = True
    return m


def same_codes(a: SparseCodes, b: SparseCodes, what=""):
    a, b = a.to_host(), b.to_host()
    assert tuple(a.shape) == tuple(b.shape), what
    np.testing.assert_array_equal(a.indptr, b.indptr, err_msg=f"{what}: indptr")
    np.testing.assert_array_equal(a.indices, b.indices, err_msg=f"{what}: indices")
    np.testing.assert_array_equal(_bits(a.values), _bits(b.values), err_msg=f"{what}: values")


class Problem:
    """float32 inputs and their float64 pre-activations (the definitions)."""

    def __init__(self, x, W_enc, b_enc, b_dec, exact=False):
        self.x, self.W_enc, self.b_enc, self.b_dec = (np.ascontiguousarray(a, np.float32)
                                                     for a in (x, W_enc, b_enc, b_dec))
        self.exact = exact
        xc = (self.x - self.b_dec).astype(np.float32)  # float32, as every backend
        xcb, wb = bf16_bits(xc), bf16_bits(self.W_enc)
        b = f64(self.b_enc)
        d_in = self.x.shape[1]
        self.pre = f64(xc) @ f64(self.W_enc) + b
        self.pre_b = f64(xcb) @ f64(wb) + b
        scale = np.abs(f64(xc)) @ np.abs(f64(self.W_enc)) + np.abs(b)
        scale_b = np.abs(f64(xcb)) @ np.abs(f64(wb)) + np.abs(b)
        self.tol = np.maximum(1e-5 * (scale + np.abs(self.pre)), dot_bound(
            np.abs(f64(xc)), np.abs(f64(self.W_enc)), d_in, np.abs(b)))
        self.tol_b = np.zeros_like(scale_b) if exact else 2.0 * (d_in + 2) * U32 * scale_b
        self.xc, self.xcb, self.wb = xc, xcb, wb

    @property
    def args(self):
        return self.x, self.W_enc, self.b_enc, self.b_dec

    @property
    def shape(self):
        return self.pre.shape


def _near(v, tol):
    """|v| within tol (never, where tol is 0: exact data)."""
    return (np.abs(v) <= tol) & (tol > 0)


def expected_threshold(prob: Problem, thr=None):
    """ReLU (thr None) / JumpReLU support: ``(expected mask, ambiguous mask)``."""
    t = np.zeros(prob.shape[1]) if thr is None else np.maximum(f64(thr), 0.0)
    db, d = prob.pre_b - t, prob.pre - t
    want = (db > 0) & (d > 0)
    amb = _near(db, prob.tol_b) | ((db > 0) & _near(d, prob.tol))
    return want, amb


def expected_topk(prob: Problem, k):
    """TopK support per row; which rows are clear of float32 near-ties at the
    m-th ``pre_b`` and the k-th ``pre``; and, in those rows, the selected
    entries whose ``pre`` is within rounding of 0 (kept or dropped)."""
    n, d_sae = prob.shape
    m = n_candidates(k, d_sae)
    kk = min(k, m)
    want = np.zeros((n, d_sae), bool)
    amb = np.zeros((n, d_sae), bool)
    clear = np.ones(n, bool)
    for i in range(n):
        pb, p, tb, tf = prob.pre_b[i], prob.pre[i], prob.tol_b[i], prob.tol[i]
        ob = np.argsort(-pb, kind="stable")
        if m < d_sae:
            a, b = ob[m - 1], ob[m]
            if tb[a] + tb[b] > 0 and pb[a] - pb[b] <= tb[a] + tb[b]:
                clear[i] = False
        cand = np.sort(ob[:m])
        oc = cand[np.argsort(-p[cand], kind="stable")]
        if kk < m:
            a, b = oc[kk - 1], oc[kk]
            if p[a] - p[b] <= tf[a] + tf[b]:
                clear[i] = False
        sel = oc[:kk]
        amb[i, sel[np.abs(p[sel]) <= tf[sel]]] = True
        want[i, sel[p[sel] > 0]] = True
    return want, clear, amb


def check_values(got: SparseCodes, prob: Problem, what):
    """Every stored value is the float32 ``pre`` (within tolerance), and > 0."""
    g = got.to_host()
    rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
    v = f64(g.values)
    ref, tol = prob.pre[rows, g.indices], prob.tol[rows, g.indices]
    bad = np.abs(v - ref) > tol
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: value at ({rows[j]}, {g.indices[j]}) is {v[j]!r}, "
                             f"pre = {ref[j]!r} (pre_b = {prob.pre_b[rows[j], g.indices[j]]!r},"
                             f" tol {tol[j]:.3g}); {int(bad.sum())} bad of {v.size}")
    assert np.all(v > 0), f"{what}: a stored value is not positive"


def _first_diff(a, b):
    i, j = np.argwhere(a != b)[0]
    return int(i), int(j)


def check_threshold_codes(got, prob, thr=None, what="relu", need_equal=False):
    n, d_sae = prob.shape
    assert_canonical(got, n, d_sae)
    check_values(got, prob, what)
    want, amb = expected_threshold(prob, thr)
    if need_equal:
        assert not amb.any(), "test data: exact case must have no ambiguous entries"
    have = mask_of(got)
    diff = (have != want) & ~amb
    if diff.any():
        i, j = _first_diff(np.where(amb, want, have), want)
        t = 0.0 if thr is None else float(thr[j])
        raise AssertionError(
            f"{what}: support differs at ({i}, {j}): got {'in' if have[i, j] else 'out'}, "
            f"expected {'in' if want[i, j] else 'out'} (pre = {prob.pre[i, j]!r}, "
            f"pre_b = {prob.pre_b[i, j]!r}, threshold {t!r}); {int(diff.sum())} such entries")
    return want, amb


def check_topk_codes(got, prob, k, what="topk", min_clear=0.25):
    n, d_sae = prob.shape
    c = assert_canonical(got, n, d_sae)
    check_values(got, prob, what)
    want, clear, amb = expected_topk(prob, k)
    assert clear.mean() >= min_clear, f"test data: only {clear.sum()} of {n} rows clear"
    have = mask_of(got)
    kk = min(k, n_candidates(k, d_sae))
    assert np.all(np.diff(c.indptr) <= kk), f"{what}: a row holds more than {kk} entries"
    for i in np.flatnonzero(clear):
        if not np.array_equal(have[i] & ~amb[i], want[i] & ~amb[i]):
            raise AssertionError(
                f"{what}: row {i} (k={k}, m={n_candidates(k, d_sae)}): got columns "
                f"{np.flatnonzero(have[i]).tolist()}, expected {np.flatnonzero(want[i]).tolist()}"
                f"; pre = {prob.pre[i].tolist()}, pre_b = {prob.pre_b[i].tolist()}")
    return want, clear[:, None] & ~amb  # the entries that must match exactly


# ------------------------------------------------------------ problems
def random_problem(n, d_in, d_sae, sparsity, seed):
    rng = np.random.default_rng(seed)
    p = make_params(rng, d_in, d_sae, sparsity)
    return Problem(make_x(rng, n, d_in), p.W_enc, p.b_enc, p.b_dec)


def exact_problem(n, d_in, d_sae, sparsity, seed):
    """Short operands: ``bf16(xc) = s`` (integers in [-7, 7]) and ``bf16(W_enc)
    = w`` (in +-{1, 2, 3}), each perturbed by a relative 2^-13..2^-12 that
    rounding to bf16 removes; ``b_dec`` and ``b_enc`` integers. So ``pre_b`` is
    an integer, exact in float32 in any order, and ``pre`` differs from it by
    far less than 1 (no entry near the boundary) but by far more than float32
    rounding (the values tell ``pre`` from ``pre_b``)."""
    rng = np.random.default_rng(seed)

    def jitter(shape):
        return rng.uniform(2 ** -13, 2 ** -12, shape) * rng.choice([-1.0, 1.0], shape)

    s = rng.integers(-7, 8, (n, d_in)).astype(np.float64)
    w = rng.choice([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], (d_in, d_sae))
    b_dec = rng.integers(-3, 4, d_in).astype(np.float32)
    x = (f64(b_dec) + s * (1 + jitter(s.shape))).astype(np.float32)
    W = (w * (1 + jitter(w.shape))).astype(np.float32)
    if sparsity == "mixed":
        spread = 9.3 * np.sqrt(d_in)
        b_enc = np.round(rng.normal(-0.4, 0.3, d_sae) * spread)
    else:
        b_enc = np.full(d_sae, {"none": -1e4, "all": 1e4}[sparsity])
    prob = Problem(x, W, b_enc.astype(np.float32), b_dec, exact=True)
    # the construction did what it says
    np.testing.assert_array_equal(prob.xcb, s.astype(np.float32))
    np.testing.assert_array_equal(prob.wb, w.astype(np.float32))
    assert np.all(np.abs(prob.pre - prob.pre_b) < 0.7)
    return prob


# (N, d_in, d_sae): one row, one feature, one input, odd d_in, d_sae off the
# 16/64 grids, N off the 6/96 grids, and a few sizes spanning several blocks
SHAPES = [(1, 1, 1), (1, 7, 5), (6, 1, 17), (13, 2, 1), (7, 33, 65), (97, 48, 130),
          (200, 31, 70), (5, 64, 64)]
CASES = ([(s, "mixed") for s in SHAPES]
         + [(s, sp) for s in [(13, 2, 1), (7, 33, 65), (97, 48, 130)] for sp in ("none", "all")])
KINDS = ["exact", "random"]
# (kind, shape, sparsity): every case both ways, and long dot products (d_in
# past 512, off every grid) on random data only (exact data needs short ones)
KIND_CASES = ([(kind, s, sp) for kind in KINDS for s, sp in CASES]
              + [("random", (50, 515, 1030), "mixed"), ("random", (9, 1031, 65), "mixed")])
KIND_CASE_IDS = [f"{kind}-{n}x{d}x{k}-{sp}" for kind, (n, d, k), sp in KIND_CASES]


def make_problem(kind, shape, sparsity):
    """The problem of one ``KIND_CASES`` entry (seeded by its shape)."""
    n, d_in, d_sae = shape
    seed = 1000 * n + 10 * d_in + d_sae + {"none": 1, "all": 2}.get(sparsity, 0)
    fn = exact_problem if kind == "exact" else random_problem
    return fn(n, d_in, d_sae, sparsity, seed)


def thresholds_for(prob: Problem, seed=0):
    rng = np.random.default_rng(seed + prob.shape[1])
    if prob.exact:  # integers: ties pre_b == t happen, and are out (strict)
        return rng.integers(-2, 4, prob.shape[1]).astype(np.float32)
    return rng.uniform(-0.5, 1.0, prob.shape[1]).astype(np.float32)


def k_values(d_sae):
    """k = 1 and 7 (margin 8), d_sae // 2 (margin k // 4 where k >= 32), d_sae
    and past d_sae (every feature a candidate)."""
    return {"k1": 1, "k7": 7, "khalf": max(1, d_sae // 2), "kd": d_sae, "kd+3": d_sae + 3}


# ------------------------------------------------------------ module and oracle
def test_bf16_module_imports():
    assert B is not None, f"fastsae.backends.bf16 does not import: {_B_ERR}"


def test_bf16_kernels_are_built_with_the_other_extensions():
    """Where the Cython extensions are built, the bf16 kernels are too (they
    share the build): a half-built tree must fail here, not skip every
    compiled test below."""
    if not _usable("cython"):
        pytest.skip(f"the Cython extensions are not built: {_STATUS['cython'].reason}")
    assert B is not None, _B_ERR
    B.check_available()
    assert "emulated" in B.available_paths()


def test_bit_level_helper_agrees_with_nearest_rule():
    """The test's own rounding, two ways (so the oracle is checked against
    something right)."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    a = u.view(np.float32)
    a = a[np.isfinite(a)]
    np.testing.assert_array_equal(_bits(bf16_bits(a)), _bits(bf16_by_distance(a)))


# (input bits, rounded bits): ties to even both ways, plain up/down, overflow,
# inf, the largest finite bf16, denormals (ties, carry into the normals), signs
BF16_CASES = [
    (0x3F800000, 0x3F800000),  # 1.0
    (0x3F808000, 0x3F800000),  # 1 + 2^-8: tie, down to even
    (0x3F818000, 0x3F820000),  # 1 + 3 * 2^-8: tie, up to even
    (0x3F808001, 0x3F810000),  # just above the tie: up
    (0x3F807FFF, 0x3F800000),  # just below the tie: down
    (0x3F7F8000, 0x3F800000),  # 1 - 2^-9: tie between 0x3F7F (odd) and 1.0
    (0xBF818000, 0xBF820000),  # negative tie
    (0x7F7FFFFF, 0x7F800000),  # float32 max: overflows to inf
    (0x7F7F7FFF, 0x7F7F0000),  # stays the largest finite bf16
    (0x7F7F8000, 0x7F800000),  # tie at the top: the even neighbour is inf
    (0xFF7FFFFF, 0xFF800000),  # -max -> -inf
    (0x7F800000, 0x7F800000),  # inf
    (0xFF800000, 0xFF800000),  # -inf
    (0x00000000, 0x00000000),  # 0
    (0x80000000, 0x80000000),  # -0
    (0x00000001, 0x00000000),  # smallest denormal: to 0
    (0x80000001, 0x80000000),  # to -0
    (0x00008000, 0x00000000),  # denormal tie, down to even
    (0x00018000, 0x00020000),  # denormal tie, up to even
    (0x00010000, 0x00010000),  # smallest bf16 denormal: exact
    (0x007FFFFF, 0x00800000),  # largest denormal: up into the normals
    (0x00FF8000, 0x01000000),  # carry into the exponent
]


def test_oracle_bf16_round_cases():
    src = np.array([c[0] for c in BF16_CASES], np.uint32).view(np.float32)
    want = np.array([c[1] for c in BF16_CASES], np.uint32)
    got = R.bf16_round(src.copy())
    assert got.dtype == np.float32 and got.shape == src.shape
    for (a, b), g in zip(BF16_CASES, _bits(got)):
        assert g == b, f"bf16_round(0x{a:08X}) = 0x{int(g):08X}, expected 0x{b:08X}"


def test_oracle_bf16_round_nan_stays_nan():
    # payloads only in the low 16 bits: a naive "add and truncate" makes them inf
    nans = np.array([0x7FC00000, 0x7F800001, 0x7F80FFFF, 0xFF800001, 0x7FFFFFFF,
                     0xFFFFFFFF, 0x7F810000], np.uint32).view(np.float32)
    got = R.bf16_round(nans.copy())
    assert np.all(np.isnan(got)), _bits(got)


def test_oracle_bf16_round_random_bits():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2 ** 32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    a = a.reshape(600, 500)  # 2-D in, 2-D out
    before = a.copy()
    got = R.bf16_round(a)
    assert got.dtype == np.float32 and got.shape == a.shape
    np.testing.assert_array_equal(_bits(a), _bits(before))  # input untouched
    nan = np.isnan(a)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(bf16_bits(a))[~nan])
    fin = got[~nan]
    assert np.all((_bits(fin) & 0xFFFF) == 0)  # a bfloat16, widened
    np.testing.assert_array_equal(_bits(R.bf16_round(fin)), _bits(fin))  # idempotent


def test_oracle_bf16_round_ordinary_values():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(10_000) * 10.0 ** rng.uniform(-30, 30, 10_000)).astype(np.float32)
    got = R.bf16_round(a)
    np.testing.assert_array_equal(_bits(got), _bits(bf16_bits(a)))
    assert np.all(np.abs(f64(got) - f64(a)) <= 2.0 ** -8 * np.abs(f64(a)) + 2.0 ** -134)


def test_topk_candidates_formula():
    assert TU.BF16_TOPK_MARGIN_MIN == 8
    assert TU.BF16_TOPK_MARGIN_FRACTION == 4
    fn = _candidates_fn()
    assert fn is not None, "bf16_topk_candidates not found in reference, bf16 or tunables"
    for k in (1, 2, 7, 8, 31, 32, 33, 35, 36, 100, 1000, 4096):
        for d_sae in (1, 5, 9, 40, 64, 1000, 16384):
            want = min(d_sae, k + max(TU.BF16_TOPK_MARGIN_MIN, k // TU.BF16_TOPK_MARGIN_FRACTION))
            assert want == n_candidates(k, d_sae)
            assert fn(k, d_sae) == want, (k, d_sae)


@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_CASE_IDS)
def test_oracle_relu_and_jumprelu_definitions(kind, shape, sparsity):
    """The oracle against the definitions: values are the float32 ``pre``
    (bit for bit the fp32 pre-activations), support ``pre_b > t and pre > t``."""
    prob = make_problem(kind, shape, sparsity)
    if not prob.exact:  # the oracle accumulates pre_b in float64: only a float32 rounding
        prob.tol_b = 4 * U32 * (np.abs(f64(prob.xcb)) @ np.abs(f64(prob.wb))
                                + np.abs(f64(prob.b_enc)))
    pre32 = R.pre_activations(*prob.args)
    for thr in (None, thresholds_for(prob)):
        if thr is None:
            got = ORACLE.encode_relu_sparse(*prob.args, precision="bf16")
        else:
            got = ORACLE.encode_jumprelu(*prob.args, thr, precision="bf16")
        what = "oracle relu" if thr is None else "oracle jumprelu"
        check_threshold_codes(got, prob, thr, what, need_equal=prob.exact)
        g = got.to_host()
        rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
        np.testing.assert_array_equal(_bits(g.values), _bits(pre32[rows, g.indices]),
                                      err_msg=f"{what}: values are not the fp32 pre")


@pytest.mark.parametrize("kname", ["k1", "k7", "khalf", "kd", "kd+3"])
@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_CASE_IDS)
def test_oracle_topk_definition(kind, shape, sparsity, kname):
    prob = make_problem(kind, shape, sparsity)
    if not prob.exact:
        prob.tol_b = 4 * U32 * (np.abs(f64(prob.xcb)) @ np.abs(f64(prob.wb))
                                + np.abs(f64(prob.b_enc)))
    k = k_values(prob.shape[1])[kname]
    got = ORACLE.encode_topk(*prob.args, k, precision="bf16")
    check_topk_codes(got, prob, k, "oracle topk")
    pre32 = R.pre_activations(*prob.args)
    g = got.to_host()
    rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
    np.testing.assert_array_equal(_bits(g.values), _bits(pre32[rows, g.indices]))


def test_oracle_topk_margin_covers_everything_equals_fp32():
    """Where m = d_sae every feature is a candidate, so bf16 TopK is fp32 TopK."""
    for d_sae, ks in ((8, (1, 3, 8, 11)), (20, (12, 16, 20, 30))):
        prob = random_problem(40, 16, d_sae, "mixed", 5)
        for k in ks:
            assert n_candidates(k, d_sae) == d_sae
            same_codes(ORACLE.encode_topk(*prob.args, k, precision="bf16"),
                       ORACLE.encode_topk(*prob.args, k), f"d_sae={d_sae} k={k}")


# ------------------------------------------------------------ hand-built cases
# d_in = 1, xc = +1 (row 0) and -1 (row 1) after b_dec = 0.5: every product is
# exact, so pre and pre_b are exact in any order. Column by column (row 0):
#   0: w 1,            b 1            pre = pre_b = 2                     in
#   1: w 1 + 2^-9 (bf16 1), b -(1 + 2^-10): pre_b < 0 < pre = 2^-10      out (fp32: in)
#   2: w 1 - 2^-9 (tie -> bf16 1), b -1 + 2^-10: pre < 0 < pre_b       out both
#   3: w 1 + 2^-9, b -1:     pre_b = 0 (strict >), pre = 2^-9           out (fp32: in)
#   4: w 2^20 + 2^12 (tie -> bf16 2^20), b -2^20 + 0.5: pre_b = 0.5, pre = 4096.5
#                                                           in, value pre = 4096.5
#   5: w 3, b -3:      pre = pre_b = 0                                   out
#   6: w -1, b 0.5:    -0.5 (row 1: 1.5)                                 out (row 1 in)
#   7: w 1 - 2^-9, b 1: pre_b = 2, pre = 2 - 2^-9 (row 1: pre_b 0, pre 2^-9)
HAND_W = np.array([1, 1 + 2 ** -9, 1 - 2 ** -9, 1 + 2 ** -9, 2 ** 20 + 2 ** 12, 3, -1,
                   1 - 2 ** -9], np.float32)
HAND_B = np.array([1, -(1 + 2 ** -10), -1 + 2 ** -10, -1, -2 ** 20 + 0.5, -3, 0.5, 1],
                  np.float32)
HAND_THR = np.array([1.5, -1, -1, -1, 1.0, -5, 0, 2 - 2 ** -10], np.float32)
HAND_RELU = [{0: 2.0, 4: 4096.5, 7: 2 - 2 ** -9}, {6: 1.5}]
HAND_RELU_FP32 = [{0: 2.0, 1: 2 ** -10, 3: 2 ** -9, 4: 4096.5, 7: 2 - 2 ** -9},
                  {6: 1.5, 7: 2 ** -9}]
HAND_JUMP = [{0: 2.0}, {6: 1.5}]  # 4: pre_b 0.5 <= 1; 7: pre <= t < pre_b


def _hand_inputs(pad, reps):
    """The hand-built problem with ``pad`` extra inputs that are 0 (their
    products vanish exactly) and the two rows repeated ``reps`` times."""
    rng = np.random.default_rng(pad)
    x = np.zeros((2, 1 + pad), np.float32)
    x[:, 0] = [1.5, -0.5]
    b_dec = np.zeros(1 + pad, np.float32)
    b_dec[0] = 0.5
    x[:, 1:] = b_dec[1:] = rng.integers(-3, 4, pad).astype(np.float32)  # xc = 0
    W = np.concatenate([HAND_W[None, :], rng.standard_normal((pad, HAND_W.size))
                        .astype(np.float32)])
    return np.tile(x, (reps, 1)), W, HAND_B.copy(), b_dec


def _as_dicts(c: SparseCodes):
    c = c.to_host()
    return [dict(zip(c.indices[c.indptr[i]:c.indptr[i + 1]].tolist(),
                     c.values[c.indptr[i]:c.indptr[i + 1]].tolist()))
            for i in range(c.shape[0])]


HAND_LAYOUTS = [(0, 1), (2, 3), (16, 7), (47, 49)]
HAND_IDS = [f"pad{p}-rows{2 * r}" for p, r in HAND_LAYOUTS]


@pytest.mark.parametrize("pad,reps", HAND_LAYOUTS, ids=HAND_IDS)
def test_hand_built_relu_jumprelu(cpu, monkeypatch, pad, reps):
    x, W, b, b_dec = _hand_inputs(pad, reps)
    for path in (PATHS if cpu.name != "numpy" else ("-",)):
        if cpu.name != "numpy":
            monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        got = cpu.encode_relu_sparse(x, W, b, b_dec, precision="bf16")
        assert_canonical(got, x.shape[0], W.shape[1])
        assert _as_dicts(got) == HAND_RELU * reps, (cpu.name, path)
        got = cpu.encode_jumprelu(x, W, b, b_dec, HAND_THR, precision="bf16")
        assert _as_dicts(got) == HAND_JUMP * reps, (cpu.name, path)
    # the fp32 rule on the same data (the cases do tell the two apart)
    assert _as_dicts(cpu.encode_relu_sparse(x, W, b, b_dec)) == HAND_RELU_FP32 * reps


def _topk_case(ws, bs):
    return (np.ones((1, 1), np.float32), np.array([ws], np.float32),
            np.array(bs, np.float32), np.zeros(1, np.float32))


BIG, BIG_B = 2.0 ** 20 + 2 ** 12, -2.0 ** 20  # bf16(BIG) = 2^20: pre = pre_b + 4096
HALF_DOWN = 2.0 ** 20 - 2 ** 11  # a tie: bf16 2^20, pre = pre_b - 2048
# (name, W row, b_enc, k, expected {column: value}, fp32's columns)
TOPK_HAND = [
    # 12 features, k=1 -> m=9: col 10's pre 4096.5 is largest but its pre_b (0.5)
    # ranks 11th: not a candidate
    ("not-a-candidate", [1] * 10 + [BIG, 1], [9 - j for j in range(10)] + [BIG_B + 0.5, -100],
     1, {0: 10.0}, [10]),
    # all pre_b equal (1): candidates are the 9 lowest indices; col 11's larger
    # pre does not count
    ("candidate-ties-lower-index", [1] * 11 + [1 + 2 ** -9], [0] * 12, 1, {0: 1.0}, [11]),
    # the same with the larger pre inside the candidates: selected, value pre
    ("candidate-wins-on-pre", [1] * 8 + [1 + 2 ** -9] + [1] * 3, [0] * 12, 1,
     {8: 1 + 2 ** -9}, [8]),
    # k=2 -> m=10: col 1 is a candidate (pre_b 9) but its pre is -2039
    ("candidate-with-low-pre", [1, HALF_DOWN] + [1] * 8 + [BIG, BIG],
     [9, -2.0 ** 20 + 9] + [9 - j for j in range(2, 10)] + [BIG_B + 0.5] * 2,
     2, {0: 10.0, 2: 8.0}, [10, 11]),
    # m = d_sae: fp32 TopK on pre
    ("all-candidates", [BIG, 1, 1, 1, 1], [BIG_B + 0.5, 0, 1, 2, -2], 3,
     {0: 4096.5, 2: 2.0, 3: 3.0}, [0, 2, 3]),
    ("k-over-d_sae", [BIG, 1, 1, 1, 1], [BIG_B + 0.5, 0, 1, 2, -2], 7,
     {0: 4096.5, 1: 1.0, 2: 2.0, 3: 3.0}, [0, 1, 2, 3]),
    ("selected-nonpositive-dropped", [1, 1, 1], [0, -2, -1], 2, {0: 1.0}, [0]),
    ("none-positive", [1, 1, 1], [-1, -2, -1], 3, {}, []),
]


@pytest.mark.parametrize("name,w,b,k,want,fp32_cols", TOPK_HAND, ids=[c[0] for c in TOPK_HAND])
def test_hand_built_topk(cpu, monkeypatch, name, w, b, k, want, fp32_cols):
    args = _topk_case(w, b)
    for path in (PATHS if cpu.name != "numpy" else ("-",)):
        if cpu.name != "numpy":
            monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        got = cpu.encode_topk(*args, k, precision="bf16")
        assert_canonical(got, 1, len(w))
        assert _as_dicts(got) == [want], (cpu.name, path)
    assert sorted(_as_dicts(cpu.encode_topk(*args, k))[0]) == fp32_cols


# ------------------------------------------------------------ compiled vs oracle
@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_CASE_IDS)
def test_compiled_relu(compiled, kind, shape, sparsity):
    be, path = compiled
    prob = make_problem(kind, shape, sparsity)
    got = be.encode_relu_sparse(*prob.args, precision="bf16")
    want, amb = check_threshold_codes(got, prob, None, f"{be.name}/{path} relu",
                                      need_equal=prob.exact)
    oracle = ORACLE.encode_relu_sparse(*prob.args, precision="bf16")
    assert np.array_equal(mask_of(got)[~amb], mask_of(oracle)[~amb])
    if prob.exact:
        same = mask_of(got) == mask_of(oracle)
        assert same.all()
        _values_tell_pre_from_pre_b(got, prob)


def _values_tell_pre_from_pre_b(got, prob):
    """On exact data with enough entries, some values are farther from
    ``pre_b`` than the tolerance (so check_values rejected bf16 values)."""
    m = mask_of(got)
    if m.sum() >= 3 and np.abs(prob.b_enc).max() < 1e3:
        far = np.abs(prob.pre - prob.pre_b) > 2 * prob.tol
        assert (far & m).any(), "test data: no value distinguishes pre from pre_b"


@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_CASE_IDS)
def test_compiled_jumprelu(compiled, kind, shape, sparsity):
    be, path = compiled
    prob = make_problem(kind, shape, sparsity)
    thr = thresholds_for(prob)
    got = be.encode_jumprelu(*prob.args, thr, precision="bf16")
    _, amb = check_threshold_codes(got, prob, thr, f"{be.name}/{path} jumprelu",
                                   need_equal=prob.exact)
    oracle = ORACLE.encode_jumprelu(*prob.args, thr, precision="bf16")
    assert np.array_equal(mask_of(got)[~amb], mask_of(oracle)[~amb])
    if prob.exact:
        _values_tell_pre_from_pre_b(got, prob)


@pytest.mark.parametrize("kname", ["k1", "k7", "khalf", "kd", "kd+3"])
@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_CASE_IDS)
def test_compiled_topk(compiled, kind, shape, sparsity, kname):
    be, path = compiled
    prob = make_problem(kind, shape, sparsity)
    k = k_values(prob.shape[1])[kname]
    got = be.encode_topk(*prob.args, k, precision="bf16")
    _, clear = check_topk_codes(got, prob, k, f"{be.name}/{path} topk")
    oracle = ORACLE.encode_topk(*prob.args, k, precision="bf16")
    assert np.array_equal(mask_of(got)[clear], mask_of(oracle)[clear])


def test_compiled_exact_large_rows_all_equal(compiled):
    """A larger exact problem (rows and features over several blocks): the
    three supports equal the oracle's entry for entry."""
    be, _ = compiled
    prob = exact_problem(300, 20, 257, "mixed", 9)
    thr = thresholds_for(prob)
    args = prob.args
    for got, want in (
            (be.encode_relu_sparse(*args, precision="bf16"),
             ORACLE.encode_relu_sparse(*args, precision="bf16")),
            (be.encode_jumprelu(*args, thr, precision="bf16"),
             ORACLE.encode_jumprelu(*args, thr, precision="bf16"))):
        assert np.array_equal(mask_of(got), mask_of(want))
        check_values(got, prob, be.name)
    got = be.encode_topk(*args, 32, precision="bf16")
    _, clear = check_topk_codes(got, prob, 32, be.name)
    want = ORACLE.encode_topk(*args, 32, precision="bf16")
    assert np.array_equal(mask_of(got)[clear], mask_of(want)[clear])


def test_compiled_float64_and_strided_inputs(compiled):
    """The front's conversions apply to bf16 calls too: float64 or
    non-contiguous inputs give the float32-contiguous result."""
    be, _ = compiled
    prob = random_problem(30, 12, 40, "mixed", 3)
    ref = be.encode_relu_sparse(*prob.args, precision="bf16")
    x64 = f64(prob.x)
    Wf = np.asfortranarray(prob.W_enc)
    same_codes(be.encode_relu_sparse(x64, Wf, prob.b_enc, f64(prob.b_dec), precision="bf16"),
               ref, "float64 / Fortran inputs")


# ------------------------------------------------------------ determinism
def _encodes(be, prob, thr, k):
    return (be.encode_relu_sparse(*prob.args, precision="bf16"),
            be.encode_jumprelu(*prob.args, thr, precision="bf16"),
            be.encode_topk(*prob.args, k, precision="bf16"))


def test_thread_count_independence(compiled):
    be, path = compiled
    default = be.get_num_threads()
    if default < 2:
        pytest.skip(f"{be.name} has {default} thread here")
    prob = random_problem(397, 37, 300, "mixed", 11)
    thr = thresholds_for(prob)
    try:
        be.set_num_threads(1)
        one = _encodes(be, prob, thr, 17)
        be.set_num_threads(2)
        two = _encodes(be, prob, thr, 17)
        again = _encodes(be, prob, thr, 17)
    finally:
        be.set_num_threads(None)
    for what, a, b, c in zip(("relu", "jumprelu", "topk"), one, two, again):
        same_codes(a, b, f"{be.name}/{path} {what}: 1 vs 2 threads")
        same_codes(b, c, f"{be.name}/{path} {what}: repeat")


def test_numba_and_cython_agree_bitwise(monkeypatch):
    """One shared kernel: the same path gives the same bits on both faces."""
    _need_bf16()
    for name in ("numba", "cython"):
        _skip_unusable(name)
    nb, cy = fastsae.get_backend("numba"), fastsae.get_backend("cython")
    prob = random_problem(150, 29, 90, "mixed", 12)
    thr = thresholds_for(prob)
    for path in PATHS:
        monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        for what, a, b in zip(("relu", "jumprelu", "topk"), _encodes(nb, prob, thr, 9),
                              _encodes(cy, prob, thr, 9)):
            same_codes(a, b, f"{path} {what}: numba vs cython")


@pytest.mark.parametrize("path", PATHS or ("none",))
def test_bf16_encoder_matches_contract_functions(monkeypatch, path):
    _need_bf16()
    _skip_unusable("numba")
    monkeypatch.setenv("FASTSAE_BF16_PATH", path)
    be = fastsae.get_backend("numba")
    for shape, seed in (((1, 1, 1), 0), ((13, 33, 65), 1), ((200, 16, 130), 2)):
        prob = random_problem(*shape, "mixed", seed)
        thr = thresholds_for(prob)
        enc = B.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec)
        for k in (1, 7, prob.shape[1] + 3):
            same_codes(enc.topk(prob.x, k), be.encode_topk(*prob.args, k, precision="bf16"),
                       f"topk k={k}")
        same_codes(enc.relu(prob.x), be.encode_relu_sparse(*prob.args, precision="bf16"), "relu")
        same_codes(enc.jumprelu(prob.x, thr),
                   be.encode_jumprelu(*prob.args, thr, precision="bf16"), "jumprelu")
        # reusable: another batch (other N) through the same packed weights
        x2 = make_x(np.random.default_rng(seed + 50), 7, shape[1])
        same_codes(enc.relu(x2), be.encode_relu_sparse(x2, *prob.args[1:], precision="bf16"),
                   "relu, second batch")
        same_codes(enc.relu(prob.x), be.encode_relu_sparse(*prob.args, precision="bf16"),
                   "relu, again")


def test_bf16_encoder_keeps_copies():
    _need_bf16()
    prob = random_problem(20, 9, 30, "mixed", 6)
    W, b, bd = (a.copy() for a in prob.args[1:])
    enc = B.BF16Encoder(W, b, bd)
    ref = enc.relu(prob.x)
    W *= -1
    b += 5
    bd += 1
    same_codes(enc.relu(prob.x), ref, "after changing the arrays it was built from")


def test_bf16_encoder_without_b_dec_and_threads(monkeypatch):
    _need_bf16()
    _skip_unusable("numba")
    be = fastsae.get_backend("numba")
    prob = random_problem(120, 24, 100, "mixed", 4)
    zero = np.zeros(prob.x.shape[1], np.float32)
    enc = B.BF16Encoder(prob.W_enc, prob.b_enc)  # b_dec None: no centering
    same_codes(enc.relu(prob.x), be.encode_relu_sparse(prob.x, prob.W_enc, prob.b_enc, zero,
                                                       precision="bf16"), "b_dec=None")
    if be.get_num_threads() >= 2:
        thr = thresholds_for(prob)
        e1 = B.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec, threads=1)
        e2 = B.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec, threads=2)
        same_codes(e1.relu(prob.x), e2.relu(prob.x), "threads 1 vs 2 relu")
        same_codes(e1.topk(prob.x, 5), e2.topk(prob.x, 5), "threads 1 vs 2 topk")
        same_codes(e1.jumprelu(prob.x, thr), e2.jumprelu(prob.x, thr), "threads 1 vs 2 jump")


# ------------------------------------------------------------ fp32 unchanged
def test_fp32_default_is_unchanged(cpu):
    prob = random_problem(64, 33, 129, "mixed", 8)
    thr = thresholds_for(prob)
    same_codes(cpu.encode_relu_sparse(*prob.args, precision="fp32"),
               cpu.encode_relu_sparse(*prob.args), "relu")
    same_codes(cpu.encode_topk(*prob.args, 9, precision="fp32"),
               cpu.encode_topk(*prob.args, 9), "topk")
    same_codes(cpu.encode_jumprelu(*prob.args, thr, precision="fp32"),
               cpu.encode_jumprelu(*prob.args, thr), "jumprelu")
    # and fp32 is really fp32 (this data has bf16 support differences)
    assert not np.array_equal(mask_of(cpu.encode_relu_sparse(*prob.args)),
                              mask_of(cpu.encode_relu_sparse(*prob.args, precision="bf16")))


def test_fp32_ignores_the_path_variable(cpu, monkeypatch):
    """FASTSAE_BF16_PATH concerns bf16 calls only."""
    prob = random_problem(10, 5, 12, "mixed", 1)
    ref = cpu.encode_relu_sparse(*prob.args)
    monkeypatch.setenv("FASTSAE_BF16_PATH", "no-such-path")
    same_codes(cpu.encode_relu_sparse(*prob.args), ref)


# ------------------------------------------------------------ refusals
BAD_PRECISIONS = ["fp16", "bfloat16", "BF16x", "", "float32", "bf16 "]


@pytest.mark.parametrize("bad", BAD_PRECISIONS, ids=[repr(b) for b in BAD_PRECISIONS])
def test_bad_precision_refused(cpu, bad):
    prob = random_problem(3, 4, 5, "mixed", 0)
    calls = (lambda: cpu.encode_relu_sparse(*prob.args, precision=bad),
             lambda: cpu.encode_topk(*prob.args, 2, precision=bad),
             lambda: cpu.encode_jumprelu(*prob.args, np.zeros(5, np.float32), precision=bad))
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "fp32" in msg and "bf16" in msg, msg


@pytest.mark.parametrize("bad", [None, 16, b"bf16"], ids=["None", "16", "bytes"])
def test_non_string_precision_refused(cpu, bad):
    prob = random_problem(3, 4, 5, "mixed", 0)
    with pytest.raises((ValueError, TypeError)):
        cpu.encode_relu_sparse(*prob.args, precision=bad)


def test_bf16_validates_inputs_like_fp32(cpu):
    prob = random_problem(3, 4, 5, "mixed", 0)
    x = prob.x.copy()
    x[1, 2] = np.nan
    with pytest.raises(ValueError):
        cpu.encode_relu_sparse(x, *prob.args[1:], precision="bf16")
    with pytest.raises(ValueError):
        cpu.encode_topk(*prob.args, 0, precision="bf16")
    with pytest.raises(ValueError):
        cpu.encode_jumprelu(*prob.args, np.zeros(4, np.float32), precision="bf16")
    with pytest.raises(ValueError):
        cpu.encode_relu_sparse(prob.x, prob.W_enc[:3], prob.b_enc, prob.b_dec, precision="bf16")


def test_bf16_refused_on_cuda():
    _skip_unusable("cuda")
    be = fastsae.get_backend("cuda")
    prob = random_problem(3, 4, 5, "mixed", 0)
    for call in (lambda: be.encode_relu_sparse(*prob.args, precision="bf16"),
                 lambda: be.encode_topk(*prob.args, 2, precision="bf16"),
                 lambda: be.encode_jumprelu(*prob.args, np.zeros(5, np.float32),
                                            precision="bf16")):
        with pytest.raises(ValueError):
            call()
    be.encode_relu_sparse(*prob.args, precision="fp32")  # fp32 still runs


def test_available_and_selected_paths(monkeypatch):
    _need_bf16()
    paths = B.available_paths()
    assert isinstance(paths, tuple) and "emulated" in paths
    assert set(paths) <= set(KNOWN_PATHS), paths
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if re.search(r"\bavx512_bf16\b", flags):
        assert "avx512bf16" in paths, "the CPU has AVX512-BF16 but the path is not offered"
    best = "avx512bf16" if "avx512bf16" in paths else "emulated"
    assert B.selected_path() == best
    monkeypatch.setenv("FASTSAE_BF16_PATH", "auto")
    assert B.selected_path() == best
    for p in paths:  # read at call time
        monkeypatch.setenv("FASTSAE_BF16_PATH", p)
        assert B.selected_path() == p


def test_unknown_path_refused(monkeypatch):
    _need_bf16()
    monkeypatch.setenv("FASTSAE_BF16_PATH", "sse9")
    with pytest.raises((ValueError, RuntimeError)) as err:
        B.selected_path()
    assert "emulated" in str(err.value), str(err.value)
    prob = random_problem(3, 4, 5, "mixed", 0)
    for name in ("numba", "cython"):
        if _usable(name):
            with pytest.raises((ValueError, RuntimeError)):
                fastsae.get_backend(name).encode_relu_sparse(*prob.args, precision="bf16")


def test_unavailable_path_refused(monkeypatch):
    _need_bf16()
    lacking = [p for p in KNOWN_PATHS if p not in B.available_paths()]
    if not lacking:  # a CPU without AVX512-BF16, as selected_path sees it
        monkeypatch.setattr(B, "available_paths", lambda: ("emulated",))
        lacking = ["avx512bf16"]
    monkeypatch.setenv("FASTSAE_BF16_PATH", lacking[0])
    with pytest.raises(RuntimeError) as err:
        B.selected_path()
    for p in B.available_paths():
        assert p in str(err.value)
    prob = random_problem(3, 4, 5, "mixed", 0)
    for name in ("numba", "cython"):
        if _usable(name):
            with pytest.raises(RuntimeError):
                fastsae.get_backend(name).encode_relu_sparse(*prob.args, precision="bf16")


# ---------------------------------------------------------------- the model and the CLI
_ARCHS = {"relu": {}, "topk": {"activation": "topk", "k": 5}, "jumprelu": {"activation": "jumprelu"},
          "topk_transcoder": {"activation": "topk", "k": 3, "transcoder": True, "d_out": 7}}


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_model_encode_bf16_equals_the_backend_call(cpu, arch):
    """``SparseAutoencoder.encode(precision="bf16")`` is the contract's bf16
    encoder of the model's own parameters and input centering, dense or
    sparse, in one batch or several (the rows are independent)."""
    rng = np.random.default_rng(11)
    sae = fastsae.SparseAutoencoder(13, 70, backend=cpu, seed=2, **_ARCHS[arch])
    sae.params.b_enc[:] = rng.normal(0, 0.05, 70).astype(np.float32)
    if arch == "jumprelu":
        sae.threshold = rng.uniform(0, 0.05, 70).astype(np.float32)
    x = rng.standard_normal((41, 13)).astype(np.float32)
    be, p = cpu, sae.params
    c = np.zeros(13, np.float32) if sae.transcoder else p.b_dec
    if sae.architecture == "topk":
        want = be.encode_topk(x, p.W_enc, p.b_enc, c, sae.k, precision="bf16")
    elif sae.architecture == "jumprelu":
        want = be.encode_jumprelu(x, p.W_enc, p.b_enc, c, sae.threshold, precision="bf16")
    else:
        want = be.encode_relu_sparse(x, p.W_enc, p.b_enc, c, precision="bf16")
    got = sae.encode(x, sparse=True, precision="bf16")
    w = _bits(want.to_dense())
    assert np.array_equal(_bits(got.to_dense()), w)
    assert np.array_equal(_bits(sae.encode(x, precision="bf16", batch_size=6)), w)
    assert np.array_equal(_bits(sae.sparse_encoder("bf16")(x).to_dense()), w)
    # and it is a different rule from fp32 only in the support, never in values
    f = sae.encode(x)
    both = (f != 0) & (got.to_dense() != 0)
    np.testing.assert_allclose(got.to_dense()[both], f[both], rtol=1e-5, atol=1e-6)


def test_model_sparse_encoder_is_a_snapshot_and_fp32_follows_the_params():
    _need_bf16()
    rng = np.random.default_rng(4)
    sae = fastsae.SparseAutoencoder(9, 40, backend="numba", seed=1)
    x = rng.standard_normal((8, 9)).astype(np.float32)
    bf, fp = sae.sparse_encoder("bf16"), sae.sparse_encoder()
    before_bf, before_fp = bf(x).to_dense(), fp(x).to_dense()
    sae.params.b_enc[:] += 1.0  # in place: every feature fires more
    assert np.array_equal(_bits(bf(x).to_dense()), _bits(before_bf))  # packed at creation
    assert fp(x).nnz > (before_fp != 0).sum()  # fp32 reads the parameters each call
    with pytest.raises(ValueError, match="d_in"):
        bf(np.zeros((2, 8), np.float32))


@pytest.mark.parametrize("bad", ["bf17", "FP32", 1])  # None: the model's own precision
def test_model_refuses_a_bad_precision(bad):
    sae = fastsae.SparseAutoencoder(5, 8, backend="numpy")
    with pytest.raises((ValueError, TypeError), match="precision"):
        sae.encode(np.zeros((2, 5), np.float32), precision=bad)
    with pytest.raises((ValueError, TypeError), match="precision"):
        sae.sparse_encoder(bad)


def test_info_names_the_bf16_path(capsys):
    from fastsae.cli import main

    assert main(["info"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bf16:")]
    assert len(line) == 1
    if PATHS:
        assert f"bf16: {B.selected_path()} path" in line[0]


def test_an_unusable_path_fails_when_the_encoder_is_made(monkeypatch, tmp_path, capsys):
    """A bad ``FASTSAE_BF16_PATH`` fails at ``BF16Encoder`` / ``sparse_encoder``
    (before any batch or Dask task), and ``fastsae encode`` names it."""
    _need_bf16()
    from fastsae.cli import main

    sae = fastsae.SparseAutoencoder(6, 10, backend="numba")
    monkeypatch.setenv("FASTSAE_BF16_PATH", "no-such-path")
    with pytest.raises(ValueError, match="FASTSAE_BF16_PATH='no-such-path'"):
        B.BF16Encoder(sae.params.W_enc, sae.params.b_enc)
    with pytest.raises(ValueError, match="FASTSAE_BF16_PATH='no-such-path'"):
        sae.sparse_encoder("bf16")
    sae.save(tmp_path / "sae")
    np.save(tmp_path / "x.npy", np.ones((3, 6), np.float32))
    assert main(["encode", "--sae", str(tmp_path / "sae"), "--data", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "c.npz"), "--backend", "numba",
                 "--precision", "bf16"]) == 2
    assert "--precision bf16: FASTSAE_BF16_PATH='no-such-path'" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists()
