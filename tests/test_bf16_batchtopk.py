"""bf16 BatchTopK: ``encode_batchtopk(..., precision="bf16")``,
``BF16Encoder.batchtopk``, and the ``precision="bf16"`` training steps
``train_step_topk(activation="batchtopk")`` and ``train_step_matryoshka``.

Every test names its precision: the bf16 calls pass ``precision="bf16"``,
the float32 comparisons ``precision="fp32"`` (or, where said, the default).

The rule (the oracle, :func:`fastsae.backends.reference.encode_batchtopk`):
with ``m = min(d_sae, min(k, d_sae) + max(8, min(k, d_sae) // 4))`` the
candidates are the ``N * m`` largest *positive* bf16 pre-activations
``pre_b`` of the batch (ties: row-major flat order; all positive ones if
fewer), then among them the ``N * min(k, d_sae)`` largest float32 ``pre``
(ties: row-major), then only ``pre > 0`` is kept; the values are ``pre``.

Groups (numbers as in the spec):

1. the oracle against the rule written out here (:func:`rule_by_definition`,
   another formulation: lexsort instead of stable argsort); equal to the
   fp32 ``encode_batchtopk`` where the bf16 product is exact (``pre ==
   pre_b``); hand-built cases (a)-(d) on every CPU backend and bf16 path;
2. the compiled encoder (numba and cython x every bf16 path) against the
   oracle: on *grid-exact* data (every product and every partial sum, bf16
   and float32, exact in float32 in any order, see :func:`grid_exact_problem`)
   equal codes, bitwise values; on random data values are ``pre`` and the
   support may differ only where a rounding bound allows it
   (:func:`check_batch_codes`, the batch cut's version of
   ``check_topk_codes``); the candidate buffer's retry; canonical CSR;
3. ``BF16Encoder.batchtopk`` == the contract call (bitwise), thread-count
   independence, numba == cython (bitwise);
4. the bf16 BatchTopK and Matryoshka steps (mirroring
   ``tests/test_bf16_train.py``'s TopK tests);
5. refusals: cuda refuses ``precision="bf16"``, bad precisions are refused
   on every backend, before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, SparseCodes
from fastsae import reference as R

from conftest import BF16 as BF
from conftest import BF16_PATHS as PATHS
from conftest import U32, backend_usable, dot_bound, f64, make_x
from conftest import skip_unusable_backend as _skip_unusable
from conftest import skip_without_bf16 as _need_bf16
from test_bf16 import (SHAPES, Problem, assert_canonical, check_values, k_values, mask_of,
                       n_candidates, random_problem, same_codes)
from test_bf16 import CPU_BACKENDS, cpu  # noqa: F401  (cpu: the fixture)
from test_bf16_train import LR, OMIT, _pack
from test_bf16_train import (assert_copy_current, assert_params_close, assert_results_close,
                             assert_same_bits, batches, check_one_step_runs,
                             check_thread_independence, dead_mask_for, snapshot)
from test_bf16_train import exact_problem as train_exact_problem
from test_bf16_train import make_problem as train_problem

# every test starts with FASTSAE_BF16_PATH unset (the compiled fixture sets it)
pytestmark = pytest.mark.usefixtures("no_bf16_path_from_outside")

ORACLE = fastsae.get_backend("numpy")


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _as_dicts(c: SparseCodes):
    c = c.to_host()
    return [dict(zip(c.indices[c.indptr[i]:c.indptr[i + 1]].tolist(),
                     c.values[c.indptr[i]:c.indptr[i + 1]].tolist()))
            for i in range(c.shape[0])]


def _paths_for(be):
    """The bf16 paths a hand-built case runs on: every compiled path, or
    the oracle's one ("-")."""
    return PATHS if be.name != "numpy" else ("-",)


# ------------------------------------------------------------ the rule, written out
def rule_by_definition(pre, pre_b, k):
    """The bf16 BatchTopK rule on given ``pre`` / ``pre_b`` arrays, as a
    dense float64 array: ``np.lexsort`` on (flat index, -value), another
    route than the oracle's stable argsort. ``m`` is the spec's formula
    written out (``test_bf16.n_candidates``), not the library's function."""
    pre, pre_b = f64(pre), f64(pre_b)
    n, d_sae = pre.shape
    kk = min(int(k), d_sae)
    m = n_candidates(int(k), d_sae)
    idx = np.arange(n * d_sae)
    pb, p = pre_b.ravel(), pre.ravel()
    pos = idx[pb > 0]
    cand = pos[np.lexsort((pos, -pb[pos]))][:n * m]
    sel = cand[np.lexsort((cand, -p[cand]))][:n * kk]
    sel = sel[p[sel] > 0]
    out = np.zeros(n * d_sae)
    out[sel] = p[sel]
    return out.reshape(n, d_sae)


def _counts_at_least(vals, thresholds):
    """For each threshold t, ``#{v in vals: v >= t}``."""
    s = np.sort(vals)
    return s.size - np.searchsorted(s, thresholds, side="left")


def _counts_above(vals, thresholds):
    """For each threshold t, ``#{v in vals: v > t}``."""
    s = np.sort(vals)
    return s.size - np.searchsorted(s, thresholds, side="right")


def sure_batch_support(pre, tol, pre_b, tol_b, k):
    """Which entries the bf16 BatchTopK rule keeps whatever the computed
    values are, given only that each computed ``pre`` lies within ``tol`` of
    ``pre`` and each computed ``pre_b`` within ``tol_b`` of ``pre_b`` (all
    tolerances > 0: random data; ties are then all "maybe"). Returns
    ``(sure_kept, sure_dropped)`` masks: an entry is surely a candidate when
    it is surely positive and fewer than ``N * m`` others can rank at or
    above it; surely not when it cannot be positive or ``N * m`` surely
    positive ones surely rank above it; the same at the ``N * k`` cut among
    the (possible) candidates; then the ReLU with ``tol``."""
    n, d_sae = pre.shape
    NC, NK = n * n_candidates(k, d_sae), n * min(k, d_sae)
    pb, tb, p, tp = (f64(a).ravel() for a in (pre_b, tol_b, pre, tol))
    assert np.all(tb > 0) and np.all(tp > 0), "random data only: a zero tolerance"
    pos_sure, pos_maybe = pb - tb > 0, pb + tb > 0
    # candidates (the entry itself is among pos_maybe's upper bounds: -1)
    up = _counts_at_least((pb + tb)[pos_maybe], pb - tb) - pos_maybe
    cand_sure = pos_sure & (up < NC)
    cand_no = ~pos_maybe | (_counts_above((pb - tb)[pos_sure], pb + tb) >= NC)
    cand_maybe = ~cand_no
    # the N * k best float32 values among the candidates
    up = _counts_at_least((p + tp)[cand_maybe], p - tp) - cand_maybe
    sel_sure = cand_sure & (up < NK)
    sel_no = cand_no | (_counts_above((p - tp)[cand_sure], p + tp) >= NK)
    kept = sel_sure & (p - tp > 0)
    dropped = sel_no | (p + tp <= 0)
    return kept.reshape(n, d_sae), dropped.reshape(n, d_sae)


def check_batch_codes(got, prob: Problem, k, what, tol_b=None, min_sure=0.8):
    """``got`` (bf16 BatchTopK codes of ``prob``, random data) against the
    definitions: canonical CSR; every value the float32 ``pre`` (check_values:
    within ``prob.tol``) and > 0; at most ``N * min(k, d_sae)`` entries, each
    with ``pre_b`` possibly > 0; the support contains every surely-kept and
    no surely-dropped entry (:func:`sure_batch_support`).

    Ranking tolerances: ``pre`` within ``dot_bound`` (a float32 dot product
    of ``d_in`` terms plus the bias in any order, Higham's bound x 2: the
    kernel's recompute and the oracle's BLAS both are one), ``pre_b`` within
    ``tol_b`` (default ``prob.tol_b``: the kernel's float32 sum of exact bf16
    products). ``min_sure``: the share of the expected entries that must be
    decided (so the check is not vacuous on near-tied data). Returns the
    ``(sure_kept, sure_dropped)`` masks."""
    n, d_sae = prob.shape
    c = assert_canonical(got, n, d_sae)
    check_values(got, prob, what)
    NK = n * min(k, d_sae)
    assert c.nnz <= NK, f"{what}: {c.nnz} entries, more than N * k = {NK}"
    tb = prob.tol_b if tol_b is None else tol_b
    have = mask_of(got)
    assert np.all((prob.pre_b + tb)[have] > 0), f"{what}: an entry with pre_b <= 0"
    order_tol = dot_bound(np.abs(f64(prob.xc)), np.abs(f64(prob.W_enc)), prob.x.shape[1],
                          np.abs(f64(prob.b_enc)))
    kept, dropped = sure_batch_support(prob.pre, order_tol, prob.pre_b, tb, k)
    want = rule_by_definition(prob.pre, prob.pre_b, k) > 0
    if want.sum():
        assert kept.sum() >= min_sure * want.sum(), \
            f"test data: only {kept.sum()} of {want.sum()} entries decided"
    missing, extra = kept & ~have, dropped & have
    if missing.any() or extra.any():
        bad = np.argwhere(missing | extra)[0]
        i, j = int(bad[0]), int(bad[1])
        raise AssertionError(
            f"{what} (k={k}): entry ({i}, {j}) {'missing' if missing[i, j] else 'extra'} "
            f"(pre {prob.pre[i, j]!r}, pre_b {prob.pre_b[i, j]!r}); "
            f"{int(missing.sum())} missing, {int(extra.sum())} extra")
    return kept, dropped


# ------------------------------------------------------------ problems
GRID = 2.0 ** -12  # the jitter's grid: every product and partial sum is a multiple of it


def grid_exact_problem(n, d_in, d_sae, sparsity, seed, jitter=True):
    """Data exact in float32 for *both* products, in any summation order:
    ``x - b_dec = s`` integers in [-7, 7] (exact bf16), ``W_enc = w + delta``
    with ``w`` in +-{1, 2, 3} and ``delta`` in +-{1..4} * 2^-12 (<= 2^-10,
    under half a bf16 ulp at w: rounding to bf16 gives ``w``), ``b_dec`` and
    ``b_enc`` integers. Every product ``s * W`` (18 bits) and partial sum is a
    multiple of 2^-12 of magnitude < 2^12, so exact in float32: ``pre`` and
    ``pre_b`` (integers) are the same numbers in every backend and order, and
    results must agree bit for bit. ``jitter=False``: ``delta = 0``, so
    ``pre == pre_b``. ``pre - pre_b`` is at most ``d_in * 7 * 2^-10``."""
    rng = np.random.default_rng(seed)
    s = rng.integers(-7, 8, (n, d_in)).astype(np.float64)
    w = rng.choice([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], (d_in, d_sae))
    delta = (rng.integers(1, 5, (d_in, d_sae)) * rng.choice([-1.0, 1.0], (d_in, d_sae)) * GRID
             if jitter else np.zeros((d_in, d_sae)))
    b_dec = rng.integers(-3, 4, d_in).astype(np.float64)
    if sparsity == "mixed":
        b_enc = np.round(rng.normal(-0.4, 0.3, d_sae) * 9.3 * np.sqrt(d_in))
    else:
        b_enc = np.full(d_sae, {"none": -2000.0, "all": 2000.0}[sparsity])
    assert 7 * 3.001 * d_in + np.abs(b_enc).max() < 2 ** 12, "too long for exact sums"
    prob = Problem(b_dec + s, w + delta, b_enc, b_dec, exact=True)
    # the construction did what it says
    np.testing.assert_array_equal(prob.xcb, s.astype(np.float32))
    np.testing.assert_array_equal(prob.wb, w.astype(np.float32))
    pre32, pre_b = R.bf16_pre_activations(*prob.args)
    np.testing.assert_array_equal(f64(pre32), prob.pre)  # float32 BLAS is exact here
    np.testing.assert_array_equal(f64(pre_b), prob.pre_b)
    np.testing.assert_array_equal(prob.pre_b, np.round(prob.pre_b))
    return prob


CASES = ([(s, "mixed") for s in SHAPES]
         + [(s, sp) for s in [(13, 2, 1), (7, 33, 65), (97, 48, 130)] for sp in ("none", "all")])
KINDS = ("exact", "random")
KIND_CASES = [(kind, s, sp) for kind in KINDS for s, sp in CASES]
KIND_IDS = [f"{kind}-{n}x{d}x{f}-{sp}" for kind, (n, d, f), sp in KIND_CASES]


def make_problem(kind, shape, sparsity):
    n, d_in, d_sae = shape
    seed = 1000 * n + 10 * d_in + d_sae + {"none": 1, "all": 2}.get(sparsity, 0)
    fn = grid_exact_problem if kind == "exact" else random_problem
    return fn(n, d_in, d_sae, sparsity, seed)


def _expect_sparsity(got, prob, k, sparsity, what):
    """``none``: every pre < 0, empty codes; ``all``: every pre > 0, exactly
    ``N * min(k, d_sae)`` entries."""
    n, d_sae = prob.shape
    if sparsity == "none":
        assert np.all(prob.pre < 0) and got.nnz == 0, what
    elif sparsity == "all":
        assert np.all(prob.pre > 0) and got.nnz == n * min(k, d_sae), what


# ============================================================ 1. the oracle
@pytest.mark.parametrize("case", CASES, ids=[f"{n}x{d}x{f}-{sp}" for (n, d, f), sp in CASES])
def test_oracle_equals_fp32_where_bf16_is_exact(case):
    """precision bf16 vs fp32 (oracle): with ``pre == pre_b`` (no jitter)
    the candidates hold the N * k best positive entries, so the bf16 rule is
    the fp32 rule, bit for bit, for every k (k > d_sae too)."""
    (n, d_in, d_sae), sparsity = case
    prob = grid_exact_problem(n, d_in, d_sae, sparsity, seed=n + d_sae, jitter=False)
    np.testing.assert_array_equal(prob.pre, prob.pre_b)
    for kname, k in k_values(d_sae).items():
        got = ORACLE.encode_batchtopk(*prob.args, k, precision="bf16")
        same_codes(got, ORACLE.encode_batchtopk(*prob.args, k, precision="fp32"),
                   f"{kname}={k}")
        _expect_sparsity(got, prob, k, sparsity, kname)


@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_IDS)
def test_oracle_matches_the_rule(kind, shape, sparsity):
    """precision bf16 (oracle): bitwise the rule written out here, on the
    oracle's own ``(pre, pre_b)`` (:func:`R.bf16_pre_activations`), so no
    rounding enters; values are the fp32 ``pre_activations`` at the support;
    at most N * min(k, d_sae) entries, all with pre > 0 and pre_b > 0. On
    random data also against the float64 definitions (``Problem``), with the
    oracle's pre_b tolerance: it sums the exact bf16 products in float64, so
    only a final rounding, 4 u of the terms' magnitude (as test_bf16)."""
    prob = make_problem(kind, shape, sparsity)
    n, d_sae = prob.shape
    pre, pre_b = R.bf16_pre_activations(*prob.args)
    pre32 = R.pre_activations(*prob.args)
    tol_b = 4 * U32 * (np.abs(f64(prob.xcb)) @ np.abs(f64(prob.wb)) + np.abs(f64(prob.b_enc)))
    for kname, k in k_values(d_sae).items():
        got = ORACLE.encode_batchtopk(*prob.args, k, precision="bf16")
        c = assert_canonical(got, n, d_sae)
        dense = got.to_dense()
        np.testing.assert_array_equal(f64(dense), rule_by_definition(pre, pre_b, k),
                                      err_msg=f"{kname}={k}")
        rows = np.repeat(np.arange(n), np.diff(c.indptr))
        np.testing.assert_array_equal(_bits(c.values), _bits(pre32[rows, c.indices]))
        assert c.nnz <= n * min(k, d_sae)
        assert np.all(pre[rows, c.indices] > 0) and np.all(pre_b[rows, c.indices] > 0)
        _expect_sparsity(got, prob, k, sparsity, kname)
        if not prob.exact:
            check_batch_codes(got, prob, k, f"oracle {kname}", tol_b=tol_b)


def test_oracle_rule_differs_from_fp32_on_jittered_data():
    """The jittered exact data does tell the rules apart (so equality with
    the oracle there is not fp32 equality in disguise)."""
    prob = grid_exact_problem(97, 48, 130, "mixed", 5)
    differs = [k for k in (1, 7, 65)
               if not np.array_equal(mask_of(ORACLE.encode_batchtopk(*prob.args, k,
                                                                     precision="bf16")),
                                     mask_of(ORACLE.encode_batchtopk(*prob.args, k,
                                                                     precision="fp32")))]
    assert differs, "the jittered data gives the fp32 support for every k"


# ------------------------------------------------------------ hand-built cases
# Layout: x = the identity [N, N] (b_dec = 0), so pre[i, j] = W[i, j] + b[j] and
# pre_b[i, j] = bf16(W[i, j]) + b[j]: every product is 1 * w or 0 * w and each
# value below is exact in float32, so pre and pre_b are exact in any order.
# ``pad`` extra inputs have x = b_dec (xc = 0) and random weights: their
# products vanish exactly, but d_in spans the kernel's blocks.
BIG = 2.0 ** 20 + 2.0 ** 12   # bf16 tie, to even: 2^20, so pre = pre_b + 4096 (b = -2^20 + v)
HALF_DOWN = 2.0 ** 20 - 2.0 ** 11  # bf16 tie, to even: 2^20, so pre = pre_b - 2048
E9, E10, E11 = 2.0 ** -9, 2.0 ** -10, 2.0 ** -11  # 1 + e: bf16 1 (under half an ulp)


def _hand(W, b, pad=0):
    W = np.asarray(W, np.float64)
    n = W.shape[0]
    rng = np.random.default_rng(pad)
    x = np.zeros((n, n + pad))
    x[:, :n] = np.eye(n)
    b_dec = np.zeros(n + pad)
    x[:, n:] = b_dec[n:] = rng.integers(-3, 4, pad)
    W = np.concatenate([W, rng.standard_normal((pad, W.shape[1]))])
    return tuple(np.ascontiguousarray(a, np.float32) for a in (x, W, b, b_dec))


def _case_a():
    # (a) pre > 0 but pre_b <= 0 is never a candidate.
    #   (0,0): pre = pre_b = 2;  (0,1): W 1+2^-9, b -1 -> pre 2^-9, pre_b 0 (not > 0)
    #   (0,2): W 1+2^-9, b -(1+2^-10) -> pre 2^-10, pre_b -2^-10;  row 1 all < 0.
    W = [[2, 1 + E9, 1 + E9], [-5, 0, 0]]
    b = [0, -1, -(1 + E10)]
    return W, b, {1: ([{0: 2.0}, {}], [{0: 2.0, 1: E9}, {}]),
                  2: ([{0: 2.0}, {}], [{0: 2.0, 1: E9, 2: E10}, {}])}


def _case_b():
    # (b) the margin: N = 2, k = 1, m = 9: 18 candidates, 2 selected.
    #   (0,11): pre 4096.5 (largest) but pre_b 0.5, ranked 24th of 24 positive: not a
    #   candidate, so dropped; (0,1) (pre 29) enters in its place.
    #   (1,12): pre_b 40, the best candidate, but pre -2008: not selected.
    #   Rows 0 and 1, columns 0..10: pre = pre_b = 30..20 and 19..9.
    W = np.zeros((2, 13))
    W[0, :11] = np.arange(30, 19, -1)
    W[1, :11] = np.arange(19, 8, -1)
    W[0, 11], W[1, 12] = BIG, HALF_DOWN
    b = [0] * 11 + [-2.0 ** 20 + 0.5, -2.0 ** 20 + 40]
    return W, b, {1: ([{0: 30.0, 1: 29.0}, {}], [{0: 30.0, 11: 4096.5}, {}])}


def _case_c_candidate_ties():
    # (c) ties at the candidate cut: every pre_b is 1 (N = 2, 12 features, k = 1:
    #   18 candidates), so row 0 and row 1's columns 0..5 in row-major order.
    #   (1,6) and (1,11) have the largest pre (1 + 2^-9) but are cut; among the
    #   candidates (1,5) = 1 + 2^-10 and (0,3) = 1 + 2^-11 are best.
    W = np.ones((2, 12))
    W[1, 6] = W[1, 11] = 1 + E9
    W[1, 5] = 1 + E10
    W[0, 3] = 1 + E11
    return W, [0] * 12, {1: ([{3: 1 + E11}, {5: 1 + E10}], [{}, {6: 1 + E9, 11: 1 + E9}])}


def _case_c_final_ties():
    # (c) ties at the final cut: three entries share pre 4097 with pre_b 1, 4096,
    #   4096; every positive is a candidate (N*m = 6 >= 4) and N * k = 2 are taken
    #   in row-major order, (0,0) and (1,1): not the bf16 order ((1,1), (1,2)).
    W = [[BIG, 0, 5], [0, 4097, 4097]]
    b = [-2.0 ** 20 + 1, 0, 0]
    return W, b, {1: ([{0: 4097.0}, {1: 4097.0}], [{0: 4097.0}, {1: 4097.0}])}


def _case_d():
    # (d) fewer positives than N * k (2 * 3 = 6): all entries with pre > 0 and
    #   pre_b > 0. (0,1): pre 2^-9, pre_b 0, out; (1,2): pre_b 5, pre -2043, out.
    W = [[2, 1 + E9, 0, 3], [1 - E10, 0, HALF_DOWN, -1]]
    b = [0, -1, -2.0 ** 20 + 5, 0]
    return W, b, {3: ([{0: 2.0, 3: 3.0}, {0: 1 - E10}],
                      [{0: 2.0, 1: E9, 3: 3.0}, {0: 1 - E10}])}


HAND = {"a-bf16-nonpositive-never": _case_a, "b-margin": _case_b,
        "c-candidate-cut-ties": _case_c_candidate_ties, "c-final-cut-ties": _case_c_final_ties,
        "d-fewer-positives-than-nk": _case_d}


def test_hand_built_cases_are_what_they_say():
    """The comments' pre / pre_b, from the oracle's own arithmetic."""
    for name, make in HAND.items():
        W, b, _ = make()
        x, W32, b32, bd = _hand(W, b)
        pre, pre_b = R.bf16_pre_activations(x, W32, b32, bd)
        np.testing.assert_array_equal(pre, np.asarray(W, np.float64) + np.asarray(b), name)
        if name == "b-margin":
            assert (pre[0, 11], pre_b[0, 11], pre[1, 12], pre_b[1, 12]) == (4096.5, 0.5,
                                                                            -2008.0, 40.0)
            assert (pre_b > 0).sum() == 24 and n_candidates(1, 13) == 9
        if name == "c-candidate-cut-ties":
            assert np.all(pre_b == 1) and n_candidates(1, 12) * 2 == 18
        if name == "c-final-cut-ties":
            assert list(pre_b[[0, 1, 1], [0, 1, 2]]) == [1, 4096, 4096]
            assert list(pre[[0, 1, 1], [0, 1, 2]]) == [4097] * 3


@pytest.mark.parametrize("pad", [0, 37])
@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_built_batchtopk(cpu, monkeypatch, name, pad):
    """precision bf16 on every CPU backend and bf16 path: the expected codes
    exactly (values are the exact float32 pre); precision fp32 on the same
    data gives the other support (the case does tell the rules apart, except
    the final-cut ties, where both rules take the row-major pair)."""
    W, b, ks = HAND[name]()
    args = _hand(W, b, pad)
    n, d_sae = args[0].shape[0], args[1].shape[1]
    for k, (want, want_fp32) in ks.items():
        for path in _paths_for(cpu):
            if cpu.name != "numpy":
                monkeypatch.setenv("FASTSAE_BF16_PATH", path)
            got = cpu.encode_batchtopk(*args, k, precision="bf16")
            assert_canonical(got, n, d_sae)
            assert _as_dicts(got) == want, (cpu.name, path, k)
        assert _as_dicts(cpu.encode_batchtopk(*args, k, precision="fp32")) == want_fp32
        same_codes(ORACLE.encode_batchtopk(*args, k, precision="bf16"),
                   SparseCodes.from_dense(rule_by_definition(*R.bf16_pre_activations(*args), k)
                                          .astype(np.float32)), "oracle vs the rule")


# ============================================================ 2. compiled vs oracle
@pytest.mark.parametrize("kind,shape,sparsity", KIND_CASES, ids=KIND_IDS)
def test_compiled_encode_batchtopk(compiled, kind, shape, sparsity):
    """precision bf16, compiled (backend x path) vs the oracle, k in
    k_values(d_sae): grid-exact data bitwise equal codes; random data within
    the rounding bounds of :func:`check_batch_codes` and equal to the oracle
    wherever neither support is in doubt."""
    be, path = compiled
    prob = make_problem(kind, shape, sparsity)
    n, d_sae = prob.shape
    for kname, k in k_values(d_sae).items():
        what = f"{be.name}/{path} {kname}={k}"
        got = be.encode_batchtopk(*prob.args, k, precision="bf16")
        assert_canonical(got, n, d_sae)
        oracle = ORACLE.encode_batchtopk(*prob.args, k, precision="bf16")
        _expect_sparsity(got, prob, k, sparsity, what)
        if prob.exact:
            same_codes(got, oracle, what)
        else:
            kept, dropped = check_batch_codes(got, prob, k, what)
            decided = kept | dropped
            assert np.array_equal(mask_of(got)[decided], mask_of(oracle)[decided]), what


def _retry_problem(others):
    """N = 40, d_sae = 300, k = 2 (m = 10: buffers start at K = 4m = 40):
    an extra input (x 512 in row 0; W 1, exact) lifts row 0's 300
    pre-activations above every other row's, so row 0 alone holds the N * k
    = 80 selected entries. ``others``: "mixed" (about a third of the other
    rows' entries positive: more than N * m buffered candidates) or
    "negative" (-512 in the other rows: no other positive at all)."""
    base = grid_exact_problem(40, 6, 300, "mixed", 77)
    lift = np.full(40, 0.0 if others == "mixed" else -512.0)
    lift[0] = 512.0
    x = np.concatenate([base.x, lift[:, None]], axis=1)
    W = np.concatenate([base.W_enc, np.ones((1, 300), np.float32)])
    b_dec = np.concatenate([base.b_dec, [0.0]])
    prob = Problem(x, W, base.b_enc, b_dec, exact=True)
    pre, pre_b = R.bf16_pre_activations(*prob.args)
    np.testing.assert_array_equal(f64(pre), prob.pre)  # still exact
    assert pre_b[0].min() > pre_b[1:].max() and pre[0].min() > pre[1:].max()
    if others == "negative":
        assert np.all(pre_b[1:] < 0)
    else:
        assert (pre_b[1:] > 0).sum() > 40 * 10
    return prob


class CandidateSpy:
    """Stands in for the compiled module on fastsae.backends.bf16, recording
    the buffer width ``K`` of each ``encode_candidates`` call."""

    def __init__(self, real):
        self._real, self.widths = real, []

    def encode_candidates(self, *a):
        self.widths.append(int(a[6]))
        return self._real.encode_candidates(*a)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("others", ["mixed", "negative"])
def test_compiled_candidate_buffer_retry(compiled, monkeypatch, others):
    """precision bf16: row 0 alone holds every selected entry, far more than
    its first buffer (4m = 40), so the call must widen its buffers and rerun
    (both ways: more than N*m candidates buffered, or fewer with a truncated
    row). Exact data: bitwise the oracle, all 80 entries in row 0. Then the
    widened width kept for (d_sae, k) does not change the result either."""
    be, path = compiled
    prob = _retry_problem(others)
    k = 2
    want = ORACLE.encode_batchtopk(*prob.args, k, precision="bf16")
    assert np.diff(want.indptr).tolist() == [80] + [0] * 39  # the data does what it says
    spy = None
    if hasattr(BF, "_C") and hasattr(BF, "_cand"):  # the retry is visible: check it ran
        monkeypatch.setattr(BF, "_cand", {})
        spy = CandidateSpy(BF._C)
        monkeypatch.setattr(BF, "_C", spy)
    got = be.encode_batchtopk(*prob.args, k, precision="bf16")
    assert_canonical(got, 40, 300)
    same_codes(got, want, f"{be.name}/{path} {others}")
    if spy is not None:
        assert len(spy.widths) > 1 and spy.widths[0] == 4 * n_candidates(k, 300), spy.widths
        assert spy.widths == sorted(spy.widths) and spy.widths[-1] > 80, spy.widths
    # again, buffers now as wide as the last call left them; and an ordinary
    # batch through the same (d_sae, k) afterwards equals a fresh-cache call
    same_codes(be.encode_batchtopk(*prob.args, k, precision="bf16"), want, "second call")
    plain = grid_exact_problem(40, 6, 300, "mixed", 78)
    same_codes(be.encode_batchtopk(*plain.args, k, precision="bf16"),
               ORACLE.encode_batchtopk(*plain.args, k, precision="bf16"), "after the retry")


def test_compiled_large_exact_problem_bitwise(compiled):
    """precision bf16: a grid-exact problem over several row and feature
    blocks (and many pre_b ties at the candidate cut): bitwise the oracle."""
    be, path = compiled
    prob = grid_exact_problem(300, 20, 257, "mixed", 9)
    for k in (1, 4, 32):
        same_codes(be.encode_batchtopk(*prob.args, k, precision="bf16"),
                   ORACLE.encode_batchtopk(*prob.args, k, precision="bf16"),
                   f"{be.name}/{path} k={k}")


def test_compiled_long_random_rows(compiled):
    """precision bf16: long dot products (d_in past 512, off every grid) on
    random data, within the rounding bounds."""
    be, path = compiled
    prob = random_problem(50, 515, 1030, "mixed", 3)
    for k in (1, 16):
        check_batch_codes(be.encode_batchtopk(*prob.args, k, precision="bf16"), prob, k,
                          f"{be.name}/{path} k={k}")


# ============================================================ 3. encoder, threads, faces
@pytest.mark.parametrize("path", PATHS or ("none",))
@pytest.mark.parametrize("name", ["numba", "cython"])
def test_bf16_encoder_batchtopk_matches_contract(monkeypatch, name, path):
    """precision bf16: ``BF16Encoder.batchtopk`` is the contract call, bit
    for bit, for several batches through the same packed weights, and
    without ``b_dec`` (no centering)."""
    _skip_unusable(name)
    _need_bf16()
    monkeypatch.setenv("FASTSAE_BF16_PATH", path)
    be = fastsae.get_backend(name)
    for shape, seed in (((1, 1, 1), 0), ((13, 33, 65), 1), ((200, 16, 130), 2)):
        prob = random_problem(*shape, "mixed", seed)
        enc = BF.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec)
        for k in (1, 7, prob.shape[1] + 3):
            same_codes(enc.batchtopk(prob.x, k),
                       be.encode_batchtopk(*prob.args, k, precision="bf16"), f"k={k}")
        x2 = make_x(np.random.default_rng(seed + 50), 7, shape[1])
        same_codes(enc.batchtopk(x2, 3),
                   be.encode_batchtopk(x2, *prob.args[1:], 3, precision="bf16"), "2nd batch")
        zero = np.zeros(shape[1], np.float32)
        same_codes(BF.BF16Encoder(prob.W_enc, prob.b_enc).batchtopk(prob.x, 3),
                   be.encode_batchtopk(prob.x, prob.W_enc, prob.b_enc, zero, 3,
                                       precision="bf16"), "b_dec None")


def test_thread_count_independence(compiled):
    """precision bf16: 1 vs 2 threads (contract call and BF16Encoder), and a
    repeat, bit for bit (kernel rows are independent; the batch selection is
    serial)."""
    be, path = compiled
    default = be.get_num_threads()
    if default < 2:
        pytest.skip(f"{be.name} has {default} thread here")
    prob = random_problem(397, 37, 300, "mixed", 11)
    runs = []
    try:
        for threads in (1, 2, 2):
            be.set_num_threads(threads)
            runs.append([be.encode_batchtopk(*prob.args, k, precision="bf16") for k in (1, 17)])
    finally:
        be.set_num_threads(None)
    assert be.get_num_threads() == default
    for a, b, c in zip(*runs):
        same_codes(a, b, f"{be.name}/{path}: 1 vs 2 threads")
        same_codes(b, c, f"{be.name}/{path}: repeat")
    e1 = BF.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec, threads=1)
    e2 = BF.BF16Encoder(prob.W_enc, prob.b_enc, prob.b_dec, threads=2)
    same_codes(e1.batchtopk(prob.x, 5), e2.batchtopk(prob.x, 5), "BF16Encoder 1 vs 2")


def test_numba_and_cython_agree_bitwise(monkeypatch):
    """precision bf16: one shared kernel and selection, the same bits on
    both faces, on every path."""
    _need_bf16()
    for name in ("numba", "cython"):
        _skip_unusable(name)
    nb, cy = fastsae.get_backend("numba"), fastsae.get_backend("cython")
    prob = random_problem(150, 29, 90, "mixed", 12)
    for path in PATHS:
        monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        for k in (1, 9, 90):
            same_codes(nb.encode_batchtopk(*prob.args, k, precision="bf16"),
                       cy.encode_batchtopk(*prob.args, k, precision="bf16"),
                       f"{path} k={k}: numba vs cython")


def test_fp32_explicit_equals_default_encode(cpu):
    """precision fp32 explicit == omitted, bit for bit."""
    prob = random_problem(64, 33, 129, "mixed", 8)
    same_codes(cpu.encode_batchtopk(*prob.args, 9, precision="fp32"),
               cpu.encode_batchtopk(*prob.args, 9), "fp32 vs default")


# ============================================================ 4. training steps
def widths_for(d_sae):
    """Strictly increasing Matryoshka widths ending at d_sae."""
    return sorted({max(1, d_sae // 4), max(1, d_sae // 2), d_sae})


def step(be, params, state, x, cfg, y=None, precision="bf16", **extra):
    """One step of ``cfg`` (``kind`` "batchtopk" or "matryoshka", ``k`` an
    int or "d", ``aux``) with the given precision (OMIT: left out)."""
    kw = dict(lr=LR, y=y, **extra)
    if precision is not OMIT:
        kw["precision"] = precision
    k = params.d_sae if cfg["k"] == "d" else cfg["k"]
    if cfg.get("aux"):
        kw.update(dead_mask=dead_mask_for(params.d_sae), k_aux=2, aux_coefficient=1 / 32)
    if cfg["kind"] == "matryoshka":
        return be.train_step_matryoshka(params, state, x, k=k, widths=widths_for(params.d_sae),
                                        **kw)
    return be.train_step_topk(params, state, x, k=k, activation="batchtopk", **kw)


TRAIN_SHAPES = [(1, 8, 16), (7, 1, 5), (33, 17, 77), (16, 9, 1), (64, 32, 130)]
TRAIN_IDS = [f"{n}x{d}x{s}" for n, d, s in TRAIN_SHAPES]
CONFIGS = {
    "batchtopk-k1": dict(kind="batchtopk", k=1),
    "batchtopk-k3": dict(kind="batchtopk", k=3),
    "batchtopk-kd": dict(kind="batchtopk", k="d"),
    "batchtopk-k3-auxk": dict(kind="batchtopk", k=3, aux=True),
    "matryoshka-k1": dict(kind="matryoshka", k=1),
    "matryoshka-k3": dict(kind="matryoshka", k=3),
    "matryoshka-kd": dict(kind="matryoshka", k="d"),
    "matryoshka-k3-auxk": dict(kind="matryoshka", k=3, aux=True),
    "transcoder-batchtopk": dict(kind="batchtopk", k=3, transcoder=True),
    "transcoder-matryoshka": dict(kind="matryoshka", k=3, transcoder=True),
    "skip-transcoder-batchtopk-auxk": dict(kind="batchtopk", k=3, aux=True, transcoder=True,
                                           skip=True),
    "skip-transcoder-matryoshka-auxk": dict(kind="matryoshka", k=3, aux=True,
                                            transcoder=True, skip=True),
}


def _problem_for(cfg, shape, seed):
    n, d_in, d_sae = shape
    d_out = d_in + 3 if cfg.get("transcoder") else None
    params, _, _ = train_problem(seed, n, d_in, d_sae, d_out, skip=cfg.get("skip", False))
    return params, d_out


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=TRAIN_IDS)
def test_copy_equals_fresh_pack_after_each_step(compiled, shape, cfg_name):
    """precision bf16 steps: after each of 3 steps ``state.bf16`` is current
    and equals a fresh pack of the updated W_enc, bit for bit."""
    be, path = compiled
    cfg = CONFIGS[cfg_name]
    n, d_in, d_sae = shape
    seed = 100 * n + 10 * d_in + d_sae
    params, d_out = _problem_for(cfg, shape, seed)
    state = AdamState.zeros_like(params)
    before = params.W_enc.copy()
    for i, (x, y) in enumerate(batches(seed, 3, n, d_in, d_out)):
        r = step(be, params, state, x, cfg, y)
        assert np.isfinite(r.total), r
        assert_copy_current(params, state, f"{be.name}/{path} {cfg_name} step {i + 1}")
    if (params.W_enc != before).any():  # not vacuous: the copy did move with W_enc
        assert not np.array_equal(_pack(before)[1], state.bf16.WT)


E2E_CASES = {
    "batchtopk-k3": (CONFIGS["batchtopk-k3"], (40, 17, 77)),
    "batchtopk-k3-auxk": (CONFIGS["batchtopk-k3-auxk"], (33, 16, 70)),
    "matryoshka-k3": (CONFIGS["matryoshka-k3"], (40, 17, 77)),
    "matryoshka-k3-auxk": (CONFIGS["matryoshka-k3-auxk"], (33, 16, 70)),
    "transcoder-batchtopk": (CONFIGS["transcoder-batchtopk"], (20, 7, 33)),
    "skip-transcoder-matryoshka-auxk": (CONFIGS["skip-transcoder-matryoshka-auxk"],
                                        (20, 7, 33)),
}


@pytest.mark.parametrize("case", sorted(E2E_CASES))
def test_kept_copy_equals_fresh_pack_end_to_end(compiled, case):
    """precision bf16: 4 steps from the copy the Adam pass kept, and 4 with
    ``state.bf16 = None`` before every step: bitwise the same training
    (results, parameters, moments, fire counts)."""
    be, path = compiled
    cfg, (n, d_in, d_sae) = E2E_CASES[case]
    params, d_out = _problem_for(cfg, (n, d_in, d_sae), 5)
    kept_p, kept_s = params.copy(), AdamState.zeros_like(params)
    fresh_p, fresh_s = params.copy(), AdamState.zeros_like(params)
    kc, fc = np.zeros(d_sae, np.int64), np.zeros(d_sae, np.int64)
    for i, (x, y) in enumerate(batches(5, 4, n, d_in, d_out)):
        rk = step(be, kept_p, kept_s, x, cfg, y, fire_counts=kc)
        fresh_s.bf16 = None
        rf = step(be, fresh_p, fresh_s, x, cfg, y, fire_counts=fc)
        assert rk.as_dict() == rf.as_dict(), f"step {i + 1}: {rk} != {rf}"
        assert_same_bits(snapshot(kept_p, kept_s), snapshot(fresh_p, fresh_s),
                         f"{be.name}/{path} {case} step {i + 1}")
        np.testing.assert_array_equal(kc, fc)
    assert_copy_current(kept_p, kept_s, "kept")


def _support(be, params, x, k, precision):
    return mask_of(be.encode_batchtopk(x, params.W_enc, params.b_enc, params.b_dec, k,
                                       precision=precision))


ORACLE_CASES = {
    "batchtopk-k4": (dict(kind="batchtopk", k=4), (48, 20, 77)),
    "batchtopk-k4-auxk": (dict(kind="batchtopk", k=4, aux=True), (48, 20, 77)),
    "batchtopk-k4-all-candidates": (dict(kind="batchtopk", k=4), (17, 9, 12)),
    "matryoshka-k4": (dict(kind="matryoshka", k=4), (48, 20, 77)),
    "matryoshka-k4-auxk": (dict(kind="matryoshka", k=4, aux=True), (31, 13, 130)),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_exact_data_matches_oracle_and_fp32_step(compiled, case):
    """precision bf16 (compiled) vs the oracle's bf16 step and the same
    backend's fp32 step, on test_bf16_train's exact data (half-integer
    pre_b, |pre - pre_b| < 0.5: pre orders entries as pre_b does, so the
    bf16 and fp32 supports agree; checked). Results and parameters within
    test_bf16_train's tolerances (assert_results_close /
    assert_params_close: the gradients' float32 sums run in other orders);
    Matryoshka's per-prefix mse within the same rtol 1e-5 (each a sum of
    squared residuals in another order); fire counts exact."""
    be, path = compiled
    cfg, (n, d_in, d_sae) = ORACLE_CASES[case]
    params, x = train_exact_problem(n, d_in, d_sae, seed=n + d_sae)
    want = _support(ORACLE, params, x, cfg["k"], "bf16")
    assert 0 < want.sum() < want.size
    assert np.array_equal(_support(ORACLE, params, x, cfg["k"], "fp32"), want), "test data"
    assert np.array_equal(_support(be, params, x, cfg["k"], "bf16"), want)

    def prefixes(r, ro, what):
        if cfg["kind"] == "matryoshka":
            assert len(r.extra["prefix_mse"]) == len(widths_for(d_sae))
            np.testing.assert_allclose(r.extra["prefix_mse"], ro.extra["prefix_mse"],
                                       rtol=1e-5, err_msg=f"{what}: prefix_mse")
    check_one_step_runs(be, f"{be.name}/{path} {case}", cfg, params, x, want, step, prefixes)


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_random_data_close_to_oracle(compiled, kind):
    """precision bf16, random data: the supports may differ where a bf16
    pre-activation is within float32 rounding of the batch cut (the kernel
    sums in float32, the oracle in float64): L0 within 1% and mse / total
    within rtol 1e-3 (a differing entry moves mse by one code's share).
    Where the supports agree (checked; on this seed they do), the whole step
    is compared as on exact data."""
    be, path = compiled
    cfg = dict(kind=kind, k=9)
    params, x, _ = train_problem(17, 96, 48, 200)
    runs = {}
    for who, b in (("bf16", be), ("oracle", ORACLE)):
        p, s = params.copy(), AdamState.zeros_like(params)
        runs[who] = (step(b, p, s, x, cfg, precision="bf16"), snapshot(p, s))
    (r, snap), (ro, snap_o) = runs["bf16"], runs["oracle"]
    assert ro.l0 > 0
    assert abs(r.l0 - ro.l0) <= 0.01 * ro.l0, (r.l0, ro.l0)
    for key in ("mse", "total"):
        np.testing.assert_allclose(getattr(r, key), getattr(ro, key), rtol=1e-3)
    same = np.array_equal(_support(be, params, x, 9, "bf16"), _support(ORACLE, params, x, 9,
                                                                       "bf16"))
    assert same, "the random data has a support near-tie on this path (pick another seed)"
    assert_results_close(r, ro, f"{be.name}/{path} {kind} vs oracle")
    assert_params_close(snap, snap_o, f"{be.name}/{path} {kind} vs oracle")


@pytest.mark.parametrize("cfg_name", ["batchtopk-k3", "matryoshka-k3-auxk",
                                      "transcoder-batchtopk", "skip-transcoder-matryoshka-auxk"])
def test_min_active_is_the_smallest_bf16_code(compiled, cfg_name):
    """precision bf16: ``StepResult.extra["min_active"]`` is, bit for bit,
    the smallest value of the bf16 BatchTopK codes of the step's batch under
    the parameters before the step (the same kernel on the same weights), and
    ``l0`` their count per row; 0.0 when no code fires."""
    be, path = compiled
    cfg = CONFIGS[cfg_name]
    params, d_out = _problem_for(cfg, (40, 17, 77), 61)
    state = AdamState.zeros_like(params)
    for i, (x, y) in enumerate(batches(61, 3, 40, 17, d_out)):
        centering = np.zeros(17, np.float32) if y is not None else params.b_dec.copy()
        codes = be.encode_batchtopk(x, params.W_enc.copy(), params.b_enc.copy(), centering, 3,
                                    precision="bf16")
        r = step(be, params, state, x, cfg, y)
        assert codes.nnz > 0
        assert _bits(r.extra["min_active"]) == _bits(codes.values.min()), (i, r.extra)
        assert r.l0 == codes.nnz / 40
    params.b_enc[:] = -100.0  # nothing fires
    r = step(be, params, state, x, cfg, y)
    assert r.l0 == 0 and r.extra["min_active"] == 0.0


@pytest.mark.parametrize("cfg_name", ["batchtopk-k3-auxk", "matryoshka-k3",
                                      "transcoder-batchtopk"])
def test_step_thread_count_independence(compiled, cfg_name):
    """precision bf16 steps, 1 vs 2 threads: bitwise the same results,
    parameters, moments and kept copy."""
    be, path = compiled
    check_thread_independence(be, path, cfg_name, CONFIGS[cfg_name], _problem_for, step)


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_numba_and_cython_steps_agree(monkeypatch, kind):
    """precision bf16: the two faces share the encoder, so the step's codes
    (L0, min_active, fire counts) agree exactly; the rest within rounding
    (their backward passes sum in other orders; assert_params_close)."""
    _need_bf16()
    for name in ("numba", "cython"):
        _skip_unusable(name)
    cfg = dict(kind=kind, k=3, aux=True)
    params, _, _ = train_problem(71, 40, 17, 77)
    (x, _), = batches(71, 1, 40, 17)
    for path in PATHS:
        monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        out = []
        for name in ("numba", "cython"):
            p, s = params.copy(), AdamState.zeros_like(params)
            counts = np.zeros(77, np.int64)
            r = step(fastsae.get_backend(name), p, s, x, cfg, fire_counts=counts)
            out.append((r, snapshot(p, s), counts))
        (ra, sa, ca), (rb, sb, cb) = out
        assert ra.l0 == rb.l0 and _bits(ra.extra["min_active"]) == _bits(rb.extra["min_active"])
        np.testing.assert_array_equal(ca, cb)
        assert_results_close(ra, rb, f"{path} numba vs cython")
        assert_params_close(sa, sb, f"{path} numba vs cython")


def test_numpy_backend_bf16_steps_run():
    """precision bf16 on the oracle: the steps run, keep no copy, and their
    codes are the bf16 rule's (fire counts = the bf16 encoder's support)."""
    params, x, _ = train_problem(45, 64, 32, 130)
    for kind in ("batchtopk", "matryoshka"):
        p, s = params.copy(), AdamState.zeros_like(params)
        counts = np.zeros(130, np.int64)
        r = step(ORACLE, p, s, x, dict(kind=kind, k=5), fire_counts=counts)
        assert np.isfinite(r.total) and r.l0 > 0 and s.step == 1 and s.bf16 is None
        np.testing.assert_array_equal(counts, _support(ORACLE, params, x, 5, "bf16").sum(0))


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fp32_explicit_equals_omitted_step(name, kind):
    """precision fp32 explicit == omitted, bitwise, and keeps no copy."""
    _skip_unusable(name)
    be = fastsae.get_backend(name)
    cfg = dict(kind=kind, k=3, aux=True)
    params, _ = _problem_for(cfg, (33, 17, 77), 44)
    runs = []
    for prec in ("fp32", OMIT):
        p, s = params.copy(), AdamState.zeros_like(params)
        for x, y in batches(44, 2, 33, 17):
            r = step(be, p, s, x, cfg, y, precision=prec)
        assert s.bf16 is None
        runs.append((r.as_dict(), snapshot(p, s)))
    assert runs[0][0] == runs[1][0]
    assert_same_bits(runs[0][1], runs[1][1], f"{name} {kind}: fp32 vs omitted")


# ============================================================ 5. refusals
def _host(be, obj):
    return be.to_numpy(obj) if hasattr(be, "to_numpy") else obj


def _refused_before_writing(be, precision, match):
    """Every bf16 BatchTopK entry point refuses ``precision`` with
    ValueError(match), writing nothing (parameters, moments, counter, fire
    counts, kept copy)."""
    hp, x, _ = train_problem(43, 9, 5, 12)
    params, xd = be.to_backend(hp), be.to_backend(x)
    state = be.to_backend(AdamState.zeros_like(hp))
    counts = be.to_backend(np.zeros(12, np.int64))
    before = snapshot(_host(be, params), _host(be, state))
    with pytest.raises(ValueError, match=match):
        be.encode_batchtopk(xd, params.W_enc, params.b_enc, params.b_dec, 2, precision=precision)
    for kind in ("batchtopk", "matryoshka"):
        with pytest.raises(ValueError, match=match):
            step(be, params, state, xd, dict(kind=kind, k=2, aux=True), precision=precision,
                 fire_counts=counts)
    assert_same_bits(snapshot(_host(be, params), _host(be, state)), before,
                     f"{be.name}: written before the refusal")
    assert not np.asarray(_host(be, counts)).any()
    assert state.step == 0 and getattr(state, "bf16", None) is None
    # and the float32 calls still run
    be.encode_batchtopk(xd, params.W_enc, params.b_enc, params.b_dec, 2, precision="fp32")
    step(be, params, state, xd, dict(kind="matryoshka", k=2), precision="fp32")


def test_cuda_refuses_bf16_batchtopk():
    """precision bf16 on cuda (the simulator under NUMBA_ENABLE_CUDASIM=1):
    refused for encode_batchtopk, the BatchTopK and the Matryoshka step."""
    try:
        be = fastsae.get_backend("cuda")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cuda backend unavailable: {exc}")
    _refused_before_writing(be, "bf16", "bf16")


BAD = ["fp16", "BF16", "bfloat16", "", None, 16]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("name", ["numpy", "numba", "cython", "cuda"])
def test_bad_precision_refused_everywhere(name, bad):
    """Precisions other than 'fp32' / 'bf16' (fp16 first) raise ValueError
    naming precision, on every backend, before anything is written."""
    if not backend_usable(name):
        pytest.skip(f"{name} backend unavailable")
    _refused_before_writing(fastsae.get_backend(name), bad, "precision")


def test_candidate_width_shrinks_after_an_odd_batch(compiled, monkeypatch):
    """precision bf16: the buffer width kept per (d_sae, k) grows for a batch
    that needs it (row 0 holds everything) and halves on later ordinary
    batches that use under a quarter of it, never below 4m; the
    codes stay the oracle's throughout."""
    be, path = compiled
    monkeypatch.setattr(BF, "_cand", {})
    k, d_sae = 2, 300
    odd = _retry_problem("mixed")
    same_codes(be.encode_batchtopk(*odd.args, k, precision="bf16"),
               ORACLE.encode_batchtopk(*odd.args, k, precision="bf16"), "odd batch")
    wide = BF._cand[(d_sae, k)]
    assert wide > 4 * n_candidates(k, d_sae)
    plain = grid_exact_problem(40, 6, d_sae, "mixed", 78)
    want = ORACLE.encode_batchtopk(*plain.args, k, precision="bf16")
    widths = []
    for _ in range(6):
        same_codes(be.encode_batchtopk(*plain.args, k, precision="bf16"), want, "plain")
        widths.append(BF._cand[(d_sae, k)])
    assert widths[0] == max(4 * n_candidates(k, d_sae), wide // 2), (wide, widths)
    # it settles where a row of the plain batch uses over a quarter of it (here
    # rows give up to ~20 of the batch's N*m candidates), never under 4m
    assert widths == sorted(widths, reverse=True) and widths[-1] == widths[-2], widths
    assert 4 * n_candidates(k, d_sae) <= widths[-1] < wide, widths


@pytest.mark.parametrize("K", [0, -1, 21])
def test_candidate_kernel_refuses_a_bad_buffer_width(K):
    """The compiled candidate encoder checks its buffer width before
    entering C: ``K`` outside ``1..d_sae`` is a clear error."""
    _need_bf16()
    from fastsae.backends.cython import _bf16 as C

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 20)).astype(np.float32)
    Wp, WT = C.pack(W, 1)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="1 <= K <= d_sae"):
        C.encode_candidates(C.EMULATED, x, np.zeros(8, np.float32), Wp, WT,
                            np.zeros(20, np.float32), K, 1)
