"""bf16 JumpReLU training: ``train_step_jumprelu(..., precision="bf16")`` on
the numba and cython backends (every bf16 path, the ``compiled`` fixture),
with the numpy backend (:mod:`fastsae.backends.reference`) as the oracle.

The rule (the oracle's): with ``theta, lo, hi = jumprelu_window(log_threshold,
bandwidth)`` (``lo = theta - bandwidth / 2``) and ``pre, pre_b =
bf16_pre_activations(...)`` on the encoder input ``xc`` (``x - b_dec``, or
``x`` for a transcoder), the candidates are the entries with ``pre_b > base_j
- r_i scale_j`` (``numerics.bf16_cut_margin`` of ``lo``, ``r =
numerics.bf16_row_norms(xc)``: a cut lowered by a bound on the bf16
product's error), the step uses ``pre`` there and treats every other entry
as below ``lo`` (neither active nor in the window); the rest is the fp32
step. The bound makes every entry with ``pre > lo`` a candidate, so the
bf16 step's entries are the fp32 step's (the earlier rule, ``pre_b > lo``,
dropped some: the old-rule masks below show where). bf16 runs only in the default sparsity mode (``sparsity``
None or ``"step"`` with no pre-activation loss acting).

Every test names its precision: the bf16 calls pass ``precision="bf16"``
(the helper :func:`jstep`'s default), the float32 ones ``precision="fp32"``
or, where said, leave it out.

Groups (the spec's numbers):

1. the oracle: on grid-exact data without jitter (``pre == pre_b``) its bf16
   step is its fp32 step, bit for bit; on random data it equals
   :func:`hand_step`, the rule written out here in float64 (masks, then the
   fp32 formulas); a hand-built case where ``pre > lo >= pre_b`` (active and
   window entries in fp32, which the old rule dropped) and ``pre_b > lo >=
   pre`` (and ``pre_b > theta``) on every CPU backend; the margin against
   adversarial data (every product rounded down by bf16) and the kernels'
   threshold selection with the margin on random shapes;
2. the copy on ``state.bf16`` equals a fresh pack after each of 3 steps
   (shapes off every grid; SAE, explicit ``"step"`` mode, a pre-activation
   coefficient with no dead feature, transcoder, skip transcoder);
3. the kept copy vs ``state.bf16 = None`` before every step: bitwise the same
   training; a current copy is reused without packing;
4. exact data against the oracle's bf16 step (and, without jitter, the
   compiled fp32 step): results and every updated array within
   tests/test_bf16_train.py's tolerances, fire counts exact;
   the density switch both ways;
5. 1 vs 2 threads bitwise; numba vs cython agree on the codes (L0, fire
   counts, l0_loss exactly) and on the rest within rounding;
6. refusals: "tanh", "quadratic", the pre-activation loss with a dead
   feature, with bf16: ValueError from the front, nothing written;
   ``precision="fp16"``; cuda refuses bf16; a bad ``FASTSAE_BF16_PATH``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsae
from fastsae import AdamState, JumpReLUSparsity, SAEParams, StepResult
from fastsae.backends import numerics as NU
from fastsae.backends import reference as R
from fastsae.backends import tunables as TU

from conftest import BF16 as BF
from conftest import BF16_PATHS as PATHS
from conftest import U32, backend_usable, f64
from conftest import skip_unusable_backend as _skip_unusable
from conftest import skip_without_bf16 as _need_bf16
from test_bf16_batchtopk import grid_exact_problem
from test_bf16_train import (LR, OMIT, PackSpy, _pack, assert_copy_current, assert_copy_stale,
                             assert_params_close, assert_results_close, assert_same_bits,
                             batches, snapshot)
from test_bf16_train import make_problem as train_problem

# every test starts with FASTSAE_BF16_PATH unset (the compiled fixture sets it)
pytestmark = pytest.mark.usefixtures("no_bf16_path_from_outside")

ORACLE = fastsae.get_backend("numpy")
CPU_BACKENDS = ("numpy", "numba", "cython")
BW = 0.5      # bandwidth of the random problems (pre-activations of spread ~1)
L0C = 0.3     # l0_coefficient
GRID_BW = 4.0  # bandwidth of the grid-exact problems (integer pre-activations, spread ~50)


@pytest.fixture
def force_bf16(monkeypatch):
    """JumpReLU bf16 steps always take the bf16 encoder (the density switch's
    thresholds are read at call time; a density is at most 1)."""
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 2.0)


@pytest.fixture(params=CPU_BACKENDS)
def cpu(request, monkeypatch):
    """Every CPU backend (bf16 kernels needed for the compiled ones), the
    bf16 encoder forced on the compiled ones."""
    _skip_unusable(request.param)
    if request.param != "numpy":
        _need_bf16()
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    return fastsae.get_backend(request.param)


# ------------------------------------------------------------ thresholds and steps
class Thr:
    """``log_threshold`` and its Adam moments (float32 ``[d_sae]``), the
    arrays a JumpReLU step updates besides params and state."""

    def __init__(self, lt, m=None, v=None):
        self.lt = np.ascontiguousarray(lt, np.float32).copy()
        self.m = np.zeros_like(self.lt) if m is None else m.copy()
        self.v = np.zeros_like(self.lt) if v is None else v.copy()

    def copy(self):
        return Thr(self.lt, self.m, self.v)


def jstep(be, params, state, x, th, cfg=None, y=None, precision="bf16", fire_counts=None,
          **over):
    """One JumpReLU step of configuration ``cfg`` (a dict: ``bandwidth``,
    ``l0c``, ``sparsity``, ``dead_mask``) with ``precision`` (OMIT: left
    out); ``over`` replaces keyword arguments."""
    cfg = cfg or {}
    kw = dict(log_threshold=th.lt, threshold_m=th.m, threshold_v=th.v,
              bandwidth=cfg.get("bandwidth", BW), l0_coefficient=cfg.get("l0c", L0C), lr=LR,
              fire_counts=fire_counts, y=y)
    for key in ("sparsity", "dead_mask"):
        if key in cfg:
            kw[key] = cfg[key]
    kw.update(over)
    if precision is not OMIT:
        kw["precision"] = precision
    return be.train_step_jumprelu(params, state, x, **kw)


def jsnap(params, state, th):
    """:func:`test_bf16_train.snapshot` plus the thresholds and their moments
    (named so that ``assert_params_close`` gives the second moment its
    ``2 * rel``)."""
    arrs, step = snapshot(params, state)
    arrs["log_threshold"] = th.lt.copy()
    arrs["state.m.log_threshold"] = th.m.copy()
    arrs["state.v.log_threshold"] = th.v.copy()
    return arrs, step


def random_thresholds(seed, d_sae):
    """log thresholds with ``theta`` in [0.1, 0.9]: on :func:`train_problem`'s
    pre-activations (about N(-0.4, 1)) with ``BW`` 0.5 some entries are
    active, some in the window, most below; ``lo < 0`` where ``theta < 0.25``."""
    theta = np.random.default_rng(seed + 11).uniform(0.1, 0.9, d_sae)
    return np.log(theta).astype(np.float32)


def centering(params, y):
    return R.input_centering(params, y)


def margin_candidates(x, W_enc, b_enc, b_c, lo, pre_b):
    """The rule's candidates written out here: ``pre_b > base - r * scale`` in
    float64 from :func:`numerics.bf16_cut_margin` and
    :func:`numerics.bf16_row_norms` (``pre_b`` given)."""
    xc = x - b_c
    base, scale = NU.bf16_cut_margin(lo, b_enc, np.ascontiguousarray(W_enc.T))
    r = NU.bf16_row_norms(xc)
    return f64(pre_b) > f64(base)[None, :] - f64(r)[:, None] * f64(scale)[None, :]


def rule_masks(params, x, y, lt, bw, precision):
    """``(pre, pre_b, active, window, cand)`` of the rule on float32 ``pre``
    and the oracle's ``pre_b`` (fp32: every entry a candidate; ``"old"``: the
    earlier bf16 rule, ``pre_b > lo``)."""
    pre, pre_b = R.bf16_pre_activations(x, params.W_enc, params.b_enc, centering(params, y))
    theta, lo, hi = R.jumprelu_window(lt, bw)
    if precision == "bf16":
        cand = margin_candidates(x, params.W_enc, params.b_enc, centering(params, y), lo, pre_b)
    elif precision == "old":
        cand = pre_b > lo
    else:
        cand = np.ones(pre.shape, bool)
    active = cand & (pre > theta)
    window = cand & (pre > lo) & (pre < hi)
    return pre, pre_b, active, window, cand


# ------------------------------------------------------------ the rule, written out
def hand_step(params, state, x, th, y, bw, l0c, precision, lr=LR, beta1=0.9, beta2=0.999,
              eps=1e-8, pre=None):
    """The JumpReLU step with the bf16 rule, written out in float64 from the
    float32 inputs (another formulation than the oracle's ``-inf`` trick):
    the candidates :func:`margin_candidates` (``pre_b`` from
    ``reference.bf16_pre_activations``), active ``cand & pre > theta``,
    window ``cand & lo < pre < hi``; then the step formulas of
    ``fastsae/backends/reference.py``'s JumpReLU section (mse, the Step
    L0 term, ``W_dec``'s projected gradient, the threshold's pseudo-gradient
    ``-(theta / bw) sum_window d_f - c / (N bw) #window``, Adam, decoder rows
    renormalized). ``pre``: the pre-activations the masks use (default the
    float64 ones). Returns ``(StepResult, arrays dict as jsnap's, fire
    counts, masks)``."""
    P = {n: f64(getattr(params, n)) for n in params.names}
    xs = f64(x)
    t = xs if y is None else f64(y)
    n = xs.shape[0]
    xc = xs - P["b_dec"] if y is None else xs
    pre64 = xc @ P["W_enc"] + P["b_enc"] if pre is None else f64(pre)
    _, pre_b = R.bf16_pre_activations(x, params.W_enc, params.b_enc, centering(params, y))
    theta, lo, hi = (f64(a) for a in R.jumprelu_window(th.lt, bw))
    if precision == "bf16":
        cand = margin_candidates(x, params.W_enc, params.b_enc, centering(params, y),
                                 R.jumprelu_window(th.lt, bw)[1], pre_b)
    else:
        cand = np.ones(pre64.shape, bool)
    active = cand & (pre64 > theta)
    window = cand & (pre64 > lo) & (pre64 < hi)
    f = np.where(active, pre64, 0.0)
    x_hat = f @ P["W_dec"] + P["b_dec"]
    if params.W_skip is not None:
        x_hat = x_hat + xs @ P["W_skip"].T
    r = x_hat - t
    mse = float(np.sum(r * r) / n)
    d_xhat = 2.0 * r / n
    W_dec = P["W_dec"]
    g_dec = f.T @ d_xhat
    g_dec = g_dec - (np.sum(g_dec * W_dec, 1) / np.sum(W_dec * W_dec, 1))[:, None] * W_dec
    d_f = d_xhat @ W_dec.T
    d_pre = np.where(active, d_f, 0.0)
    g = {"W_enc": xc.T @ d_pre, "b_enc": d_pre.sum(0), "W_dec": g_dec,
         "b_dec": d_xhat.sum(0) - (P["W_enc"] @ d_pre.sum(0) if y is None else 0.0)}
    if params.W_skip is not None:
        g["W_skip"] = d_xhat.T @ xs
    g_theta = -(theta / bw) * np.where(window, d_f, 0.0).sum(0) - l0c / (n * bw) * window.sum(0)
    g["log_threshold"] = g_theta * theta
    step = state.step + 1
    out = {}
    P["log_threshold"] = f64(th.lt)
    moments = {name: (f64(getattr(state.m, name)), f64(getattr(state.v, name)))
               for name in params.names}
    moments["log_threshold"] = (f64(th.m), f64(th.v))
    for name, gg in g.items():
        m0, v0 = moments[name]
        m = beta1 * m0 + (1 - beta1) * gg
        v = beta2 * v0 + (1 - beta2) * gg * gg
        p = P[name] - lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
        out[name] = p
        out[f"state.m.{name}"] = m
        out[f"state.v.{name}"] = v
    out["W_dec"] = out["W_dec"] / np.linalg.norm(out["W_dec"], axis=1, keepdims=True)
    arrs = {(k if k.startswith("state.") or k == "log_threshold" else f"params.{k}"): v
            for k, v in out.items()}
    nnz = int(active.sum())
    l0_loss = float(l0c * nnz / n)
    var = float(np.sum((t - t.mean(0)) ** 2) / n)
    res = StepResult(mse=mse, l1=0.0, total=mse + l0_loss, l0=nnz / n,
                     explained_variance=1.0 - mse / var, aux=0.0, extra={"l0_loss": l0_loss})
    return res, (arrs, step), active.sum(0).astype(np.int64), (active, window, cand)


# ------------------------------------------------------------ grid-exact problems
def design_thresholds(pre, pre_b, bw, seed):
    """float32 log thresholds on integer ``pre_b`` (grid-exact data): feature
    ``j % 3 == 0`` puts ``lo`` between ``pre_b`` and a larger ``pre`` of one
    of its entries (``pre > lo >= pre_b``: a candidate in fp32 only), ``j % 3
    == 1`` between ``pre_b`` and a smaller ``pre`` (``pre_b > lo >= pre``:
    a bf16 candidate whose float32 value is below the window), the others
    at a half-integer near the column's 75% quantile; ``theta > 0.5``
    always. Without jitter (``pre == pre_b``) every feature is of the last
    kind."""
    rng = np.random.default_rng(seed)
    pre, pre_b = f64(pre), f64(pre_b)
    d = pre - pre_b
    n, d_sae = pre.shape
    lo = np.empty(d_sae)
    floor = 0.5 - bw / 2  # theta = lo + bw/2 > 0.5
    for j in range(d_sae):
        col, q = pre_b[:, j], np.quantile(pre_b[:, j], 0.75)
        want = {0: d[:, j] > 2 ** -12, 1: d[:, j] < -2 ** -12}.get(j % 3)
        rows = np.flatnonzero(want & (col > floor + 0.5)) if want is not None else []
        if len(rows):
            r = rows[np.argmin(np.abs(col[rows] - q) + rng.uniform(0, 0.5, len(rows)))]
            lo[j] = col[r] + d[r, j] / 2
        else:
            lo[j] = max(np.floor(q) + 0.5, floor + 0.5)
    return np.log(lo + bw / 2).astype(np.float32)


def grid_jr_problem(n, d_in, d_sae, seed, jitter=True, transcoder=False, skip=False,
                    bw=GRID_BW):
    """``(params, x, y, log_threshold)`` on :func:`grid_exact_problem`'s data
    (``pre`` and ``pre_b`` exact in float32 in any order, ``pre_b`` integers;
    ``jitter=False``: ``pre == pre_b``) with unit decoder rows and
    :func:`design_thresholds`. A transcoder reads ``x = b_dec + s``
    uncentered: integers in [-10, 10], still exact in bf16 with every
    product and sum exact; its ``b_dec [d_out]``, ``y`` and ``W_skip`` are
    random."""
    prob = grid_exact_problem(n, d_in, d_sae, "mixed", seed, jitter=jitter)
    rng = np.random.default_rng(seed + 1)
    d_out = d_in + 3 if transcoder else d_in
    W_dec = rng.normal(size=(d_sae, d_out))
    W_dec = np.ascontiguousarray(W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True),
                                 np.float32)
    y = None
    b_dec, W_skip = prob.b_dec, None
    if transcoder:
        b_dec = rng.normal(size=d_out).astype(np.float32)
        y = (rng.normal(size=(n, d_out)) * 20).astype(np.float32)
        if skip:
            W_skip = (rng.normal(size=(d_out, d_in)) * 0.1).astype(np.float32)
    params = SAEParams(prob.W_enc.copy(), prob.b_enc.copy(), W_dec, b_dec.copy(), W_skip=W_skip)
    x = prob.x
    pre, pre_b = R.bf16_pre_activations(x, params.W_enc, params.b_enc, centering(params, y))
    xc = f64(x) - f64(centering(params, y))
    # exactness: the float32 product is the exact one, pre_b integers
    np.testing.assert_array_equal(f64(pre), xc @ f64(params.W_enc) + f64(params.b_enc))
    np.testing.assert_array_equal(f64(pre_b), np.round(f64(pre_b)))
    if not jitter:
        np.testing.assert_array_equal(f64(pre), f64(pre_b))
    return params, x, y, design_thresholds(pre, pre_b, bw, seed + 2)


def _counts(params, x, y, lt, bw):
    """Entry kinds of a bf16 step on the data: active, window only, below,
    ``pre > lo >= pre_b`` (``old_missed``: the old rule dropped them),
    ``pre_b > lo >= pre``, candidates below ``lo`` (``margin_only``, the
    price of the margin); asserts that every entry above ``lo`` is a
    candidate."""
    pre, pre_b, act, win, cand = rule_masks(params, x, y, lt, bw, "bf16")
    _, lo, _ = R.jumprelu_window(lt, bw)
    a = f64(pre) > lo
    old = f64(pre_b) > lo
    assert not (a & ~cand).any(), "an entry above lo outside the margin"
    return dict(active=int(act.sum()), window_only=int((win & ~act).sum()),
                below=int((~act & ~win).sum()), old_missed=int((a & ~old).sum()),
                bf16_only=int((old & ~a).sum()), margin_only=int((cand & ~a).sum()))


# ============================================================ 1. the oracle
GRID_CASES = {
    "sae": dict(shape=(48, 20, 77)),
    "sae-odd": dict(shape=(17, 9, 13)),
    "transcoder": dict(shape=(40, 16, 70), transcoder=True),
    "skip-transcoder": dict(shape=(33, 13, 40), transcoder=True, skip=True),
}


def _grid(case, seed, jitter):
    c = GRID_CASES[case]
    return grid_jr_problem(*c["shape"], seed=seed, jitter=jitter,
                           transcoder=c.get("transcoder", False), skip=c.get("skip", False))


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_oracle_bf16_equals_fp32_where_bf16_is_exact(case):
    """precision bf16 vs fp32 (numpy oracle), grid-exact data without jitter
    (``pre == pre_b`` exactly): the candidates are exactly the fp32 entries
    above ``lo``, so the two steps are the same step, bit for bit (results,
    parameters, moments, thresholds and their moments, fire counts), over 1
    step (the only one on exact data)."""
    params, x, y, lt = _grid(case, seed=3, jitter=False)
    cfg = dict(bandwidth=GRID_BW)
    k = _counts(params, x, y, lt, GRID_BW)
    assert k["active"] and k["window_only"] and k["below"], k
    runs = []
    for prec in ("bf16", "fp32"):
        p, s, th = params.copy(), AdamState.zeros_like(params), Thr(lt)
        counts = np.zeros(params.d_sae, np.int64)
        r = jstep(ORACLE, p, s, x, th, cfg, y, precision=prec, fire_counts=counts)
        runs.append((r.as_dict(), jsnap(p, s, th), counts))
    assert runs[0][0] == runs[1][0]
    assert_same_bits(runs[0][1], runs[1][1], f"oracle {case}: bf16 vs fp32")
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_oracle_bf16_equals_fp32_on_jittered_grid(case):
    """precision bf16 vs fp32 (numpy oracle) on jittered grid data: the
    designed thresholds put entries on both sides (``pre > lo >= pre_b``,
    which the old rule dropped, and ``pre_b > lo >= pre``); the margin makes
    the first kind candidates, so the oracle's bf16 step is its fp32 step
    bit for bit, and equals :func:`hand_step` (fire counts exactly; the rest
    within the tolerances of test_oracle_matches_the_rule_on_random_data)."""
    params, x, y, lt = _grid(case, seed=4, jitter=True)
    k = _counts(params, x, y, lt, GRID_BW)
    assert all(k.values()), k
    cfg = dict(bandwidth=GRID_BW)
    out = {}
    for prec in ("bf16", "fp32"):
        p, s, th = params.copy(), AdamState.zeros_like(params), Thr(lt)
        counts = np.zeros(params.d_sae, np.int64)
        r = jstep(ORACLE, p, s, x, th, cfg, y, precision=prec, fire_counts=counts)
        out[prec] = (r, jsnap(p, s, th), counts)
    hr, hsnap, hcounts, _ = hand_step(params, AdamState.zeros_like(params), x, Thr(lt), y,
                                      GRID_BW, L0C, "bf16")
    r, snap, counts = out["bf16"]
    np.testing.assert_array_equal(counts, hcounts)
    assert_results_close(r, hr, f"oracle {case} vs hand")
    assert_params_close(snap, hsnap, f"oracle {case} vs hand")
    assert r.as_dict() == out["fp32"][0].as_dict()
    assert_same_bits(snap, out["fp32"][1], f"oracle {case}: bf16 vs fp32")
    np.testing.assert_array_equal(counts, out["fp32"][2])


RANDOM_ORACLE = {
    "sae": dict(shape=(64, 32, 130)),
    "sae-small": dict(shape=(9, 5, 12)),
    "transcoder": dict(shape=(48, 20, 77), transcoder=True),
    "skip-transcoder": dict(shape=(40, 17, 33), transcoder=True, skip=True),
}


def _random(case, seed):
    c = RANDOM_ORACLE[case]
    n, d_in, d_sae = c["shape"]
    d_out = d_in + 3 if c.get("transcoder") else None
    params, x, y = train_problem(seed, n, d_in, d_sae, d_out, skip=c.get("skip", False))
    params.W_dec /= np.linalg.norm(params.W_dec, axis=1, keepdims=True)
    return params, x, y, random_thresholds(seed, d_sae)


def _clear_of_cuts(params, x, y, lt, bw):
    """Whether every float64 pre-activation is farther than the float32
    product's rounding bound (conftest's ``dot_bound``: ``2 (K + 2) u`` times
    the terms' magnitudes) from its ``theta``, ``lo`` and ``hi``: then the
    float32 oracle's masks are the float64 ones."""
    xc = f64(x) - f64(centering(params, y))
    pre = xc @ f64(params.W_enc) + f64(params.b_enc)
    bound = 2.0 * (x.shape[1] + 2) * U32 * (np.abs(xc) @ np.abs(f64(params.W_enc))
                                           + np.abs(f64(params.b_enc)))
    return all(np.all(np.abs(pre - f64(c)) > bound) for c in R.jumprelu_window(lt, bw))


@pytest.mark.parametrize("case", sorted(RANDOM_ORACLE))
def test_oracle_matches_the_rule_on_random_data(case):
    """precision bf16 (numpy oracle) vs :func:`hand_step` (float64), random
    data whose pre-activations are clear of every cut (checked), so the
    masks are the same: L0, fire counts exactly; results within
    ``assert_results_close`` (rtol 1e-5: the oracle's float32 sums against
    float64) and every updated array within ``assert_params_close`` (1e-6 of
    the array's scale, 2e-6 for second moments: the float32 gradients'
    relative error, ~(terms) * 2^-24, through Adam's first update, flat in
    the gradient away from 0; test_bf16_train.py's justification). The bf16
    masks are the fp32 ones; not vacuous: on this data the old rule's masks
    (``pre_b > lo``) differ from them, and the margin admits candidates below
    ``lo``."""
    params, x, y, lt = _random(case, seed=8)
    assert _clear_of_cuts(params, x, y, lt, BW), "test data: a pre-activation near a cut"
    p, s, th = params.copy(), AdamState.zeros_like(params), Thr(lt)
    counts = np.zeros(params.d_sae, np.int64)
    r = jstep(ORACLE, p, s, x, th, None, y, precision="bf16", fire_counts=counts)
    hr, hsnap, hcounts, (act, win, cand) = hand_step(params, AdamState.zeros_like(params), x,
                                                     Thr(lt), y, BW, L0C, "bf16")
    assert r.l0 == hr.l0 and r.l0 == act.sum() / x.shape[0]
    np.testing.assert_array_equal(counts, hcounts)
    assert r.extra["l0_loss"] == pytest.approx(L0C * act.sum() / x.shape[0], rel=1e-12)
    assert_results_close(r, hr, f"oracle {case} vs hand")
    assert_params_close(jsnap(p, s, th), hsnap, f"oracle {case} vs hand")
    _, _, act32, win32, _ = rule_masks(params, x, y, lt, BW, "fp32")
    np.testing.assert_array_equal(act, act32)
    np.testing.assert_array_equal(win, win32)
    if x.shape[0] * params.d_sae > 1000:
        _, _, act_old, win_old, _ = rule_masks(params, x, y, lt, BW, "old")
        assert act.any() and (win & ~act).any() and (~act & ~win).any()
        assert not (np.array_equal(act, act_old) and np.array_equal(win, win_old)), \
            "test data: the old rule's masks agree with fp32 (pick another seed)"
        assert _counts(params, x, y, lt, BW)["margin_only"] > 0


# ------------------------------------------------------------ the margin and the kernels
def _kernel_selection(path, x, b_dec, W, b_enc, lo, margin=True):
    """bool ``[N, d_sae]``: the compiled threshold-mode encoder's entries at
    cut ``lo`` (with :func:`numerics.bf16_cut_margin`'s lowered bf16 cut, or
    without: the old rule), and their values as a dense array."""
    from fastsae.backends.cython import _bf16 as C
    Wp, WT = C.pack(W, 2)
    cut = NU.bf16_cut_margin(lo, b_enc, WT) if margin else None
    ip, ix, v = C.encode(BF._code(path), x, b_dec, Wp, WT, b_enc, lo, 0, 0, 2, cut)
    n, d_sae = x.shape[0], W.shape[1]
    sel, val = np.zeros((n, d_sae), bool), np.zeros((n, d_sae), np.float32)
    rows = np.repeat(np.arange(n), np.diff(ip))
    sel[rows, ix[:ip[-1]]] = True
    val[rows, ix[:ip[-1]]] = v[:ip[-1]]
    return sel, val


@pytest.mark.parametrize("d_in", [1, 2, 31, 512, 4096])
def test_margin_covers_the_worst_bf16_error(d_in):
    """Adversarial data: every ``xc`` and ``W`` entry is ``1 + 2^-8 - 2^-20``
    (bf16 rounds it down to 1, relative error just under ``u = 2^-8``), all
    of one sign per row and column, so ``sum |xc_k w_k|`` equals ``|xc|
    |w|`` and the bf16 product is low by about ``2u`` of it, the worst case
    the bound allows; ``lo`` one float32 step below ``pre``. The old rule
    (no margin) drops the entry on every path; with the margin it is kept,
    on every path, and the oracle's candidates hold it."""
    _need_bf16()
    a = np.float32(1 + 2 ** -8 - 2 ** -20)
    x = np.full((3, d_in), a, np.float32)
    x[1] *= -1
    x[2] *= 0.5
    W = np.full((d_in, 2), a, np.float32)
    W[:, 1] = -a
    b, b_dec = np.zeros(2, np.float32), np.zeros(d_in, np.float32)
    pre = (f64(x) @ f64(W)).astype(np.float32)
    lo = np.array([np.nextafter(pre[0, 0], -np.inf), np.nextafter(pre[1, 1], -np.inf)],
                  np.float32)
    pre_b = R._bf16_product(x, W, b)
    assert pre_b[0, 0] < lo[0] - d_in * 2 ** -8  # the bf16 product is far below the cut
    want = np.zeros((3, 2), bool)
    want[0, 0] = want[1, 1] = True
    assert (R.bf16_jumprelu_candidates(x, W, b, lo) >= want).all()
    for path in PATHS:
        old, _ = _kernel_selection(path, x, b_dec, W, b, lo, margin=False)
        new, _ = _kernel_selection(path, x, b_dec, W, b, lo)
        assert not old.any(), path
        np.testing.assert_array_equal(new, want, err_msg=path)


KERNEL_SHAPES = [(1, 8, 16), (7, 1, 5), (16, 9, 1), (33, 17, 77), (64, 32, 130), (200, 96, 257)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=[f"{n}x{d}x{s}" for n, d, s in KERNEL_SHAPES])
@pytest.mark.parametrize("where", ["mixed", "none", "all"])
def test_kernel_selection_with_margin_is_fp32s(shape, where):
    """The compiled threshold mode with the margin, every path, random data
    (spread 1, ``b_dec`` and ``b_enc`` nonzero): its entries are exactly the
    float64 ``pre > lo`` except where ``pre`` is within the float32 product's
    rounding bound (conftest's ``2 (K + 2) u32`` times the terms) of ``lo``,
    and its values are float32 ones (within that bound of float64). ``lo``:
    random around the 80% quantile (``mixed``, with the old rule missing
    entries on the larger shapes, checked), above every ``pre`` (``none``:
    no entry) or below every one (``all``: every entry)."""
    _need_bf16()
    n, d_in, d_sae = shape
    rng = np.random.default_rng(n * 1000 + d_in * 10 + d_sae)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    W = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    b = (0.1 * rng.standard_normal(d_sae)).astype(np.float32)
    b_dec = (0.1 * rng.standard_normal(d_in)).astype(np.float32)
    xc = f64(x - b_dec)
    pre = xc @ f64(W) + f64(b)
    lo = {"mixed": rng.uniform(0.5, 1.2, d_sae), "none": np.full(d_sae, pre.max() + 1.0),
          "all": np.full(d_sae, pre.min() - 1.0)}[where].astype(np.float32)
    bound = 2.0 * (d_in + 2) * U32 * (np.abs(xc) @ np.abs(f64(W)) + np.abs(f64(b)))
    want, near = pre > f64(lo), np.abs(pre - f64(lo)) <= bound
    for path in PATHS:
        got, val = _kernel_selection(path, x, b_dec, W, b, lo)
        assert not ((got != want) & ~near).any(), path
        assert np.all(np.abs(f64(val) - pre)[got] <= bound[got]), path
        if where == "none":
            assert not got.any()
        if where == "all":
            assert got.all()
        if where == "mixed" and n * d_sae >= 5000:
            old, _ = _kernel_selection(path, x, b_dec, W, b, lo, margin=False)
            assert (want & ~old & ~near).any(), "test data: the old rule misses nothing"


def test_cut_margin_is_a_safe_float32_cut():
    """``numerics.bf16_cut_margin``: ``base <= lo`` (strictly below, by at
    least the slack), ``scale`` at least the bound's ``2^-7 |w_j|`` and
    finite; a column whose float32 norm overflows gives ``scale`` float32's
    largest value and ``base`` -inf (every entry a candidate, never a NaN
    cut); a zero
    column and zero bias give ``base`` just below ``lo`` (the ``2^-20 |lo|``
    slack for the kernel's float32 cut) and a tiny positive scale. On random data the margin is at least 10x the observed bf16
    error (it is a worst-case bound) and at most a quarter of ``pre``'s
    spread at d_in 512, where it costs about 1.5x the candidates."""
    rng = np.random.default_rng(0)
    d_in, d_sae = 512, 300
    W = (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    W[:, 0] = 0.0
    W[:, 1] = 1e37
    b = (0.1 * rng.standard_normal(d_sae)).astype(np.float32)
    b[0] = 0.0
    lo = rng.uniform(-1, 2, d_sae).astype(np.float32)
    base, scale = NU.bf16_cut_margin(lo, b, np.ascontiguousarray(W.T))
    assert base.dtype == scale.dtype == np.float32
    assert np.all(base < lo) and np.isfinite(scale).all() and not np.isnan(base).any()
    assert np.isfinite(np.delete(base, 1)).all()
    norms = np.linalg.norm(f64(W), axis=0)
    assert np.all(f64(scale)[2:] >= 2 ** -7 * norms[2:])
    # the column's float32 norm overflows: every entry is a candidate
    assert scale[1] == np.float32(np.finfo(np.float32).max) and base[1] == -np.inf
    assert 0 < scale[0] < 1e-30 and 0 < f64(lo[0]) - f64(base[0]) <= 2 ** -19 * abs(f64(lo[0]))
    # against the observed error
    W = W[:, 2:]
    b, lo = b[2:], lo[2:]
    base, scale = NU.bf16_cut_margin(lo, b, np.ascontiguousarray(W.T))
    x = rng.standard_normal((400, d_in)).astype(np.float32)
    pre = f64(x) @ f64(W) + f64(b)
    err = np.abs(pre - R._bf16_product(x, W, b))
    margin = f64(NU.bf16_row_norms(x))[:, None] * f64(scale)[None, :]
    assert np.all(margin >= 10 * err)
    assert margin.max() < 0.25 * pre.std()
    r = NU.bf16_row_norms(x)
    np.testing.assert_allclose(f64(r), np.linalg.norm(f64(x), axis=1), rtol=2 ** -21)
    assert np.all(f64(r) >= np.linalg.norm(f64(x), axis=1))


@pytest.mark.parametrize("bad", ["no-thr", "short-base", "short-scale", "topk", "not-a-pair"])
def test_encoder_refuses_a_bad_cut(bad):
    """The compiled encoder checks the lowered cut before entering C: without
    ``thr``, of the wrong length, with TopK (``k >= 1``), or not a
    ``(base, scale)`` pair: a clear ValueError."""
    _need_bf16()
    from fastsae.backends.cython import _bf16 as C
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 20)).astype(np.float32)
    Wp, WT = C.pack(W, 1)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    z8, z20 = np.zeros(8, np.float32), np.zeros(20, np.float32)
    cut = (z20, z20)
    thr, k, m = z20, 0, 0
    if bad == "no-thr":
        thr = None
    elif bad == "short-base":
        cut = (z20[:19], z20)
    elif bad == "short-scale":
        cut = (z20, z20[:3])
    elif bad == "topk":
        thr, k, m = None, 2, 4
    else:
        cut = (z20, z20, z20)
    with pytest.raises(ValueError, match="cut"):
        C.encode(C.EMULATED, x, z8, Wp, WT, z20, thr, k, m, 1, cut)


# ------------------------------------------------------------ hand-built case
# xc = x (b_dec 0, b_enc 0); 64 and the W entries are exact bf16 except
# 1 + 2^-9 (bf16: 1, pre = 64.125, pre_b = 64) and 1 - 2^-10 (bf16: 1,
# pre = 63.9375, pre_b = 64); bandwidth 0.05.
HB_BW = 0.05
HB_X = np.array([[64.0, 0.0], [0.0, 64.0], [64.0, -0.125]], np.float32)
HB_W = np.array([[1 + 2 ** -9, 1 + 2 ** -9, 1 - 2 ** -10, 0.5, -2 ** -13],
                 [0.0, 0.0, 0.0, 0.25, 0.0]], np.float32)
# thresholds: f0 64.05 (fp32: active at rows 0, 2, above its window; bf16 pre_b 64 <= lo,
# inside the margin), f1 64.14 (fp32: rows 0, 2 in the window below theta; the old rule:
# nothing), f2 63.99 (pre_b 64
# above theta and in the window, pre 63.9375 below lo: nothing either way), f3 31.99
# (row 0 pre 32 active and in the window, row 1 16 below, row 2 31.96875 window only; same
# both ways), f4 0.01 (lo -0.015 < 0: pre -2^-7 / 0 in the window, same both ways)
HB_THETA = np.array([64.05, 64.14, 63.99, 31.99, 0.01])


def hand_built():
    rng = np.random.default_rng(5)
    W_dec = rng.normal(size=(5, 2))
    W_dec = (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)).astype(np.float32)
    params = SAEParams(HB_W.copy(), np.zeros(5, np.float32), W_dec, np.zeros(2, np.float32))
    return params, HB_X.copy(), np.log(HB_THETA).astype(np.float32)


def test_hand_built_case_is_what_it_says():
    params, x, lt = hand_built()
    pre, pre_b = R.bf16_pre_activations(x, params.W_enc, params.b_enc, params.b_dec)
    np.testing.assert_array_equal(f64(pre[0, :3]), [64.125, 64.125, 63.9375])
    np.testing.assert_array_equal(f64(pre_b[0, :3]), [64.0, 64.0, 64.0])
    _, _, act, win, cand = rule_masks(params, x, None, lt, HB_BW, "bf16")
    _, _, act32, win32, _ = rule_masks(params, x, None, lt, HB_BW, "fp32")
    A = lambda pairs: {tuple(p) for p in pairs}  # noqa: E731
    assert A(np.argwhere(act32)) == {(0, 0), (2, 0), (0, 3)}
    assert A(np.argwhere(win32 & ~act32)) == {(0, 1), (2, 1), (2, 3), (0, 4), (1, 4), (2, 4)}
    assert A(np.argwhere(act)) == A(np.argwhere(act32))
    assert A(np.argwhere(win & ~act)) == A(np.argwhere(win32 & ~act32))
    _, _, act_old, win_old, cand_old = rule_masks(params, x, None, lt, HB_BW, "old")
    assert A(np.argwhere(act_old)) == {(0, 3)}
    assert A(np.argwhere(win_old & ~act_old)) == {(2, 3), (0, 4), (1, 4), (2, 4)}
    assert not cand_old[0, 0] and cand[0, 0] and cand[2, 1]  # the margin's doing
    theta, lo, _ = R.jumprelu_window(lt, HB_BW)
    assert pre_b[0, 2] > theta[2] and pre[0, 2] < lo[2] and cand[0, 2]  # bf16 candidate
    assert lo[4] < 0 and cand[1, 4] and pre_b[1, 4] == 0.0  # a negative window edge


def test_hand_built_entries_above_lo_in_fp32_only_count(cpu, monkeypatch):
    """precision bf16 on every CPU backend (the compiled ones on every
    path): the entries with ``pre > lo >= pre_b`` (features 0 and 1, active
    or in the window in fp32; the old rule dropped them) count as in the
    fp32 step: feature 0's encoder column moves (active), feature 1's
    threshold moves (window), L0 and fire counts are fp32's; feature 2
    (``pre_b > theta`` but ``pre < lo``) is not active and untouched;
    feature 4's negative ``lo`` keeps its window entries. Everything else
    against :func:`hand_step` (exact data: pre, pre_b exact) and against the
    same backend's fp32 step within ``assert_results_close`` /
    ``assert_params_close``."""
    for path in (PATHS if cpu.name != "numpy" else ("-",)):
        if cpu.name != "numpy":
            monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        what = f"{cpu.name}/{path}"
        params, x, lt = hand_built()
        cfg = dict(bandwidth=HB_BW)
        out = {}
        for prec in ("bf16", "fp32"):
            p, s, th = params.copy(), AdamState.zeros_like(params), Thr(lt)
            counts = np.zeros(5, np.int64)
            r = jstep(cpu, p, s, x, th, cfg, precision=prec, fire_counts=counts)
            out[prec] = (r, p, s, th, counts)
        r, p, s, th, counts = out["bf16"]
        assert r.l0 == 1.0, what
        np.testing.assert_array_equal(counts, [2, 0, 0, 1, 0], err_msg=what)
        assert not np.array_equal(p.W_enc[:, 0], params.W_enc[:, 0]), what  # f0 active
        assert th.lt[1] != lt[1] and th.lt[0] == lt[0], what  # f1 window, f0 none
        np.testing.assert_array_equal(p.W_enc[:, 2], params.W_enc[:, 2], err_msg=what)
        assert p.b_enc[2] == 0 and th.lt[2] == lt[2] and th.m[2] == 0, what
        assert th.lt[4] != lt[4] and th.lt[3] != lt[3], what  # window entries train
        if cpu.name != "numpy":
            assert_copy_current(p, s, what)
        r32, p32, s32, th32, counts32 = out["fp32"]
        np.testing.assert_array_equal(counts32, counts, err_msg=what)
        assert_results_close(r, r32, f"{what} bf16 vs fp32")
        assert_params_close(jsnap(p, s, th), jsnap(p32, s32, th32), f"{what} bf16 vs fp32")
        hr, hsnap, hcounts, _ = hand_step(params, AdamState.zeros_like(params), x, Thr(lt),
                                          None, HB_BW, L0C, "bf16")
        assert_results_close(r, hr, f"{what} vs hand")
        assert_params_close(jsnap(p, s, th), hsnap, f"{what} vs hand")


# ============================================================ 2. copy == fresh pack
SHAPES = [(1, 8, 16), (7, 1, 5), (33, 17, 77), (16, 9, 1), (64, 32, 130)]
SHAPE_IDS = [f"{n}x{d}x{s}" for n, d, s in SHAPES]
CONFIGS = {
    "sae": dict(),
    "sae-step-explicit": dict(sparsity=JumpReLUSparsity(mode="step")),
    "sae-preact-no-dead": dict(sparsity=JumpReLUSparsity(pre_act_coefficient=0.1),
                               dead_mask="none"),
    "transcoder": dict(transcoder=True),
    "skip-transcoder": dict(transcoder=True, skip=True),
}


def _cfg(name, d_sae):
    """The step keywords of config ``name`` (``dead_mask="none"``: an
    all-False mask of ``d_sae``)."""
    cfg = {k: v for k, v in CONFIGS[name].items() if k not in ("transcoder", "skip")}
    if cfg.get("dead_mask") == "none":
        cfg["dead_mask"] = np.zeros(d_sae, bool)
    return cfg


def _problem_for(name, shape, seed):
    """``(params, d_out, log_threshold)``: :func:`train_problem`'s random
    problem with unit decoder rows and :func:`random_thresholds`."""
    c = CONFIGS[name]
    n, d_in, d_sae = shape
    d_out = d_in + 3 if c.get("transcoder") else None
    params, _, _ = train_problem(seed, n, d_in, d_sae, d_out, skip=c.get("skip", False))
    params.W_dec /= np.linalg.norm(params.W_dec, axis=1, keepdims=True)
    return params, d_out, random_thresholds(seed, d_sae)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_equals_fresh_pack_after_each_step(compiled, force_bf16, shape, cfg_name):
    """precision bf16: after each of 3 steps ``state.bf16`` is current and
    equals, bit for bit, a fresh pack of the updated W_enc (the fused Adam
    pass rewrote it). The data has active, window and below entries (checked
    on the larger shapes)."""
    be, path = compiled
    n, d_in, d_sae = shape
    seed = 100 * n + 10 * d_in + d_sae
    params, d_out, lt = _problem_for(cfg_name, shape, seed)
    cfg = _cfg(cfg_name, d_sae)
    state, th = AdamState.zeros_like(params), Thr(lt)
    before = params.W_enc.copy()
    for i, (x, y) in enumerate(batches(seed, 3, n, d_in, d_out)):
        if i == 0 and n * d_sae >= 500:
            k = _counts(params, x, y, th.lt, BW)
            assert k["active"] and k["window_only"] and k["below"], k
        r = jstep(be, params, state, x, th, cfg, y)
        assert np.isfinite(r.total), r
        assert_copy_current(params, state, f"{be.name}/{path} {cfg_name} step {i + 1}")
    if (params.W_enc != before).any():  # not vacuous: the copy did move with W_enc
        assert not np.array_equal(_pack(before)[1], state.bf16.WT)


# ============================================================ 3. kept copy vs fresh pack
E2E_CASES = {
    "sae": ("sae", (40, 17, 77)),
    "sae-odd": ("sae", (33, 9, 130)),
    "transcoder": ("transcoder", (20, 7, 33)),
    "skip-transcoder": ("skip-transcoder", (20, 7, 33)),
}


@pytest.mark.parametrize("case", sorted(E2E_CASES))
def test_kept_copy_equals_fresh_pack_end_to_end(compiled, force_bf16, case):
    """precision bf16: 4 steps from the copy the Adam pass kept, and 4 with
    ``state.bf16 = None`` before every step (packed afresh): bitwise the same
    training (results, parameters, moments, log_threshold and its moments,
    fire counts)."""
    be, path = compiled
    cfg_name, (n, d_in, d_sae) = E2E_CASES[case]
    params, d_out, lt = _problem_for(cfg_name, (n, d_in, d_sae), 5)
    cfg = _cfg(cfg_name, d_sae)
    kept = (params.copy(), AdamState.zeros_like(params), Thr(lt), np.zeros(d_sae, np.int64))
    fresh = (params.copy(), AdamState.zeros_like(params), Thr(lt), np.zeros(d_sae, np.int64))
    for i, (x, y) in enumerate(batches(5, 4, n, d_in, d_out)):
        rk = jstep(be, kept[0], kept[1], x, kept[2], cfg, y, fire_counts=kept[3])
        fresh[1].bf16 = None
        rf = jstep(be, fresh[0], fresh[1], x, fresh[2], cfg, y, fire_counts=fresh[3])
        assert rk.as_dict() == rf.as_dict(), f"step {i + 1}: {rk} != {rf}"
        assert_same_bits(jsnap(*kept[:3]), jsnap(*fresh[:3]),
                         f"{be.name}/{path} {case} step {i + 1}")
        np.testing.assert_array_equal(kept[3], fresh[3])
    assert kept[3].sum() > 0
    assert_copy_current(kept[0], kept[1], "kept")


def test_current_copy_is_reused_without_packing(compiled, force_bf16, monkeypatch):
    """precision bf16: only the first step (and one after ``state.bf16 =
    None``) packs; the others encode from the copy the previous Adam pass
    wrote."""
    be, path = compiled
    params, _, lt = _problem_for("sae", (40, 17, 77), 23)
    (x, _), = batches(23, 1, 40, 17)
    state, th = AdamState.zeros_like(params), Thr(lt)
    spy = PackSpy(BF._C)
    monkeypatch.setattr(BF, "_C", spy)
    packs = []
    for i in range(4):
        if i == 2:
            state.bf16 = None
        jstep(be, params, state, x, th)
        packs.append(spy.packs)
    assert packs == [1, 1, 2, 2], packs
    assert_copy_current(params, state, "step 4")


# ============================================================ 4. against the oracle
def _copy_run(params, lt, d_sae, start=None):
    counts = np.arange(d_sae, dtype=np.int64) if start is None else start.copy()
    return params.copy(), AdamState.zeros_like(params), Thr(lt), counts


def _compare_steps(r, run, ro, run_o, what):
    """Two one-step runs (results, ``(params, state, th, counts)``) within
    test_bf16_train's tolerances: ``assert_results_close`` (L0 exact, losses
    rtol 1e-5: float32 sums in other orders), ``l0_loss`` (``c * nnz / N``
    of the same count) to 1e-12, ``assert_params_close`` on every updated
    array (1e-6 of its scale, 2e-6 for second moments: the gradients'
    relative rounding through Adam's first update), fire counts exact."""
    assert_results_close(r, ro, what)
    assert r.extra["l0_loss"] == pytest.approx(ro.extra["l0_loss"], rel=1e-12), what
    assert_params_close(jsnap(*run[:3]), jsnap(*run_o[:3]), what)
    np.testing.assert_array_equal(run[3], run_o[3], err_msg=f"{what}: fire_counts")


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_exact_data_matches_oracle_bf16_step(compiled, force_bf16, case):
    """precision bf16 (compiled) vs the oracle's bf16 step on jittered
    grid-exact data: ``pre`` and ``pre_b`` are exact in float32 in every
    order, so the compiled candidates are the oracle's entry for entry, on
    data where the old rule's differed from fp32's (entries with ``pre > lo
    >= pre_b`` and ``pre_b > lo >= pre``, checked). Fire counts exact; results and
    arrays within :func:`_compare_steps`'s tolerances; the copy current."""
    be, path = compiled
    params, x, y, lt = _grid(case, seed=4, jitter=True)
    k = _counts(params, x, y, lt, GRID_BW)
    assert all(k.values()), k
    cfg = dict(bandwidth=GRID_BW)
    run, run_o = _copy_run(params, lt, params.d_sae), _copy_run(params, lt, params.d_sae)
    r = jstep(be, *run[:2], x, run[2], cfg, y, fire_counts=run[3])
    assert_copy_current(run[0], run[1], "bf16 step")
    ro = jstep(ORACLE, *run_o[:2], x, run_o[2], cfg, y, fire_counts=run_o[3])
    _, _, act, _, _ = rule_masks(params, x, y, lt, GRID_BW, "bf16")
    np.testing.assert_array_equal(run[3] - np.arange(params.d_sae), act.sum(0))
    _compare_steps(r, run, ro, run_o, f"{be.name}/{path} {case} vs oracle bf16")


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_exact_data_without_jitter_matches_fp32_steps(compiled, force_bf16, case):
    """precision bf16 (compiled) vs the same backend's fp32 step and the
    oracle's fp32 step, grid-exact data without jitter (``pre == pre_b``:
    the rule is fp32's): within :func:`_compare_steps`'s tolerances."""
    be, path = compiled
    params, x, y, lt = _grid(case, seed=3, jitter=False)
    cfg = dict(bandwidth=GRID_BW)
    runs = {}
    for who, b, prec in (("bf16", be, "bf16"), ("fp32", be, "fp32"), ("oracle", ORACLE, "fp32")):
        run = _copy_run(params, lt, params.d_sae)
        runs[who] = (jstep(b, *run[:2], x, run[2], cfg, y, precision=prec, fire_counts=run[3]),
                     run)
    for other in ("fp32", "oracle"):
        _compare_steps(*runs["bf16"], *runs[other], f"{be.name}/{path} {case} vs {other}")


def test_density_is_the_code_share(compiled, force_bf16):
    """precision bf16: ``state.bf16.density`` after a step is the share of
    active entries, L0 / d_sae (as the ReLU step keeps it: the codes'
    density, known on both the sparse and the dense path), not the share of
    the entries above the window's low edge; grid-exact data without jitter,
    where the two shares differ (checked)."""
    be, path = compiled
    params, x, y, lt = _grid("sae", seed=3, jitter=False)
    pre, _, act, win, cand = rule_masks(params, x, y, lt, GRID_BW, "fp32")
    _, lo, _ = R.jumprelu_window(lt, GRID_BW)
    above = int((f64(pre) > lo).sum())
    assert above != act.sum()
    state, th = AdamState.zeros_like(params), Thr(lt)
    r = jstep(be, params, state, x, th, dict(bandwidth=GRID_BW))
    assert r.l0 * x.shape[0] == act.sum()
    assert state.bf16.density == pytest.approx(act.sum() / pre.size, rel=1e-12), \
        (state.bf16.density, above / pre.size, r.l0 / params.d_sae)


# ------------------------------------------------------------ the density switch
def _twin(params, state, th, counts):
    """Copies of the run so far, without the bf16 copy (``AdamState.copy``)."""
    s = state.copy()
    assert s.bf16 is None
    return params.copy(), s, th.copy(), counts.copy()


def _run_step(be, run, x, precision="bf16"):
    return jstep(be, run[0], run[1], x, run[2], precision=precision, fire_counts=run[3])


def _same_run(a, b, what):
    assert_same_bits(jsnap(*a[:3]), jsnap(*b[:3]), what)
    np.testing.assert_array_equal(a[3], b[3], err_msg=f"{what}: fire_counts")


def test_forced_dense_switch_runs_the_fp32_step(compiled, monkeypatch):
    """precision bf16 with the switch's thresholds forced to 0.0: the first
    step (density unknown) is bf16 (copy current); every later one runs the
    fp32 step instead (copy stale), bitwise the fp32 step of a twin."""
    be, path = compiled
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 0.0)
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 0.0)
    params, _, lt = _problem_for("sae", (64, 32, 128), 31)
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(128, np.int64))
    xs = [x for x, _ in batches(31, 3, 64, 32)]
    _run_step(be, run, xs[0])
    assert_copy_current(run[0], run[1], "step 1")
    assert run[1].bf16.density is not None
    for i, x in enumerate(xs[1:], 2):
        twin = _twin(*run)
        r = _run_step(be, run, x)
        assert_copy_stale(run[1], f"step {i}")
        rt = _run_step(be, twin, x, precision="fp32")
        assert r.as_dict() == rt.as_dict()
        _same_run(run, twin, f"{be.name}/{path} step {i} vs fp32 twin")


def test_density_switch_both_ways_with_default_tunables(compiled):
    """precision bf16, the switch's default thresholds (read at call time):
    a dense step (random thresholds in [0.1, 0.9]: active and candidate
    shares both above the threshold) makes the next step the fp32 one
    (stale, == fp32 twin bitwise); with the thresholds raised to 3 (both
    shares ~1e-3) the step after the next (which still follows the dense
    one) is bf16 again from a fresh pack, bitwise a twin that starts
    without a copy, and the one after reuses its copy."""
    be, path = compiled
    thr = (TU.NUMBA_JUMPRELU_DENSE_MIN_DENSITY if be.name == "numba"
           else TU.CYTHON_JUMPRELU_DENSE_MIN_DENSITY)
    assert 0.01 < thr < 0.15
    params, _, lt = _problem_for("sae", (64, 32, 128), 32)
    (x, _), = batches(32, 1, 64, 32)
    _, _, act, _, _ = rule_masks(params, x, None, lt, BW, "fp32")
    assert act.mean() >= 1.5 * thr
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(128, np.int64))
    # step 1: density unknown -> bf16, which records a dense step
    _run_step(be, run, x)
    assert_copy_current(run[0], run[1], "step 1")
    assert run[1].bf16.density >= thr
    # step 2: dense -> the float32 step
    twin = _twin(*run)
    _run_step(be, run, x)
    assert_copy_stale(run[1], "step 2")
    _run_step(be, twin, x, precision="fp32")
    _same_run(run, twin, "step 2 vs fp32 twin")
    # sparse from here: thresholds 3 (lo 2.75) on pre-activations of spread ~1
    run[2].lt[:] = np.float32(np.log(3.0))
    # step 3 follows step 2's dense codes: float32, which records sparse ones
    twin = _twin(*run)
    r3 = _run_step(be, run, x)
    assert_copy_stale(run[1], "step 3")
    _run_step(be, twin, x, precision="fp32")
    _same_run(run, twin, "step 3 vs fp32 twin")
    assert run[1].bf16.density < thr and r3.l0 / 128 < thr, (run[1].bf16.density, r3.l0)
    # step 4: sparse last step -> bf16 again, packed afresh
    twin = _twin(*run)
    _run_step(be, run, x)
    assert_copy_current(run[0], run[1], "step 4")
    _run_step(be, twin, x)  # no copy, no density: bf16
    _same_run(run, twin, "step 4 vs twin")
    _run_step(be, run, x)
    assert_copy_current(run[0], run[1], "step 5")


def test_forced_bf16_stays_bf16_when_dense(compiled, force_bf16):
    """precision bf16 with the thresholds forced to 2.0: dense steps (about
    half the entries above lo) stay bf16, the copy current after each."""
    be, _ = compiled
    params, _, _ = _problem_for("sae", (40, 16, 60), 33)
    lt = np.full(60, np.log(0.3), np.float32)
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(60, np.int64))
    for i, (x, _) in enumerate(batches(33, 3, 40, 16)):
        _run_step(be, run, x)
        assert_copy_current(run[0], run[1], f"step {i + 1}")
        assert run[1].bf16.density > 0.2


# ============================================================ 5. threads, numba vs cython
THREAD_CASES = ["sae", "transcoder", "skip-transcoder"]


@pytest.mark.parametrize("cfg_name", THREAD_CASES)
def test_thread_count_independence(compiled, force_bf16, cfg_name):
    """precision bf16 steps, 1 vs 2 threads: bitwise the same results,
    parameters, moments, thresholds, fire counts and kept copy."""
    be, path = compiled
    default = be.get_num_threads()
    if default < 2:
        pytest.skip(f"{be.name} has {default} thread here")
    shape = (256, 48, 130)  # large enough that the cython kernels go parallel
    params, d_out, lt = _problem_for(cfg_name, shape, 51)
    runs = []
    try:
        for threads in (1, 2):
            be.set_num_threads(threads)
            p, s, th = params.copy(), AdamState.zeros_like(params), Thr(lt)
            counts = np.zeros(shape[2], np.int64)
            res = [jstep(be, p, s, x, th, None, y, fire_counts=counts).as_dict()
                   for x, y in batches(51, 3, shape[0], shape[1], d_out)]
            assert_copy_current(p, s, f"{threads} threads")
            runs.append((res, jsnap(p, s, th), counts, s.bf16.Wp.copy()))
    finally:
        be.set_num_threads(None)
    assert be.get_num_threads() == default
    (r1, s1, c1, w1), (r2, s2, c2, w2) = runs
    assert r1 == r2
    assert_same_bits(s1, s2, f"{be.name}/{path} {cfg_name}: 1 vs 2 threads")
    np.testing.assert_array_equal(c1, c2)
    assert np.array_equal(w1, w2)


@pytest.mark.parametrize("cfg_name", ["sae", "skip-transcoder"])
def test_numba_and_cython_steps_agree(monkeypatch, cfg_name):
    """precision bf16, random data: the two faces share the bf16 encoder
    (candidates and their float32 values), so the step's codes agree
    exactly (L0, l0_loss, fire counts); the rest within
    :func:`_compare_steps`'s tolerances (their backward passes sum in other
    orders)."""
    _need_bf16()
    for name in ("numba", "cython"):
        _skip_unusable(name)
    monkeypatch.setattr(TU, "NUMBA_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    monkeypatch.setattr(TU, "CYTHON_JUMPRELU_DENSE_MIN_DENSITY", 2.0)
    params, d_out, lt = _problem_for(cfg_name, (96, 40, 150), 71)
    (x, y), = batches(71, 1, 96, 40, d_out)
    for path in PATHS:
        monkeypatch.setenv("FASTSAE_BF16_PATH", path)
        out = []
        for name in ("numba", "cython"):
            run = _copy_run(params, lt, params.d_sae, np.zeros(params.d_sae, np.int64))
            out.append((jstep(fastsae.get_backend(name), *run[:2], x, run[2], None, y,
                              fire_counts=run[3]), run))
        (ra, a), (rb, b) = out
        assert ra.l0 == rb.l0 and ra.extra["l0_loss"] == rb.extra["l0_loss"]
        _compare_steps(ra, a, rb, b, f"{path} {cfg_name}: numba vs cython")


# ============================================================ 6. refusals and defaults
MODES = {
    "tanh": (JumpReLUSparsity(mode="tanh"), None),
    "quadratic": (JumpReLUSparsity(mode="quadratic", target_l0=3.0), None),
    "preact-dead": (JumpReLUSparsity(pre_act_coefficient=0.1), "some"),
    "tanh-preact-dead": (JumpReLUSparsity(mode="tanh", pre_act_coefficient=0.1), "some"),
}


def _dead(kind, d_sae):
    if kind is None:
        return None
    m = np.zeros(d_sae, bool)
    m[::3] = True
    return m


def _refused(be, run, x, match, **kw):
    """``be`` refuses the step with ValueError(match), writing nothing
    (parameters, moments, counter, thresholds and their moments, fire
    counts, the kept copy)."""
    p, s, th, counts = run
    before, cnt = jsnap(p, s, th), counts.copy()
    sc = s.bf16
    key = getattr(sc, "key", None)
    copies = (sc.Wp.copy(), sc.WT.copy()) if sc is not None else None
    with pytest.raises(ValueError, match=match):
        jstep(be, p, s, x, th, fire_counts=counts, **kw)
    assert_same_bits(jsnap(p, s, th), before, f"{be.name}: written before the refusal")
    np.testing.assert_array_equal(counts, cnt)
    assert s.bf16 is sc
    if sc is not None:
        assert sc.key == key
        assert np.array_equal(sc.Wp, copies[0]) and np.array_equal(sc.WT, copies[1])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_non_default_modes_refused_with_bf16(cpu, mode):
    """precision bf16 with a non-default sparsity mode ("tanh", "quadratic"
    with target_l0, the pre-activation loss with a dead feature): ValueError
    from the front, nothing written; on the compiled backends after a good
    bf16 step, so a current copy is there to be left alone. The same call
    with precision fp32 then runs."""
    params, _, lt = _problem_for("sae", (20, 9, 24), 41)
    (x, _), = batches(41, 1, 20, 9)
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(24, np.int64))
    if cpu.name != "numpy":
        _run_step(cpu, run, x)  # precision bf16, the default mode
        assert_copy_current(run[0], run[1], "before")
    sparsity, dead = MODES[mode]
    kw = dict(sparsity=sparsity, dead_mask=_dead(dead, 24))
    _refused(cpu, run, x, "bf16", precision="bf16", **kw)
    r = jstep(cpu, run[0], run[1], x, run[2], precision="fp32", fire_counts=run[3], **kw)
    assert np.isfinite(r.total)


@pytest.mark.parametrize("variant", ["step-explicit", "preact-no-dead-mask",
                                     "preact-all-false"])
def test_default_mode_spellings_are_the_default_bf16_step(cpu, variant):
    """precision bf16: ``JumpReLUSparsity(mode="step")``, a pre-activation
    coefficient with ``dead_mask`` None or all False (no loss acting) run
    and are, bit for bit, the ``sparsity=None`` step (2 steps)."""
    params, _, lt = _problem_for("sae", (33, 17, 77), 42)
    kw = {"step-explicit": dict(sparsity=JumpReLUSparsity(mode="step")),
          "preact-no-dead-mask": dict(sparsity=JumpReLUSparsity(pre_act_coefficient=0.2)),
          "preact-all-false": dict(sparsity=JumpReLUSparsity(pre_act_coefficient=0.2),
                                   dead_mask=np.zeros(77, bool))}[variant]
    runs = []
    for extra in ({}, kw):
        run = _copy_run(params, lt, 77)
        res = [jstep(cpu, *run[:2], x, run[2], fire_counts=run[3], **extra).as_dict()
               for x, _ in batches(42, 2, 33, 17)]
        runs.append((res, run))
    assert runs[0][0] == runs[1][0]
    _same_run(runs[0][1], runs[1][1], f"{cpu.name} {variant} vs sparsity=None")


BAD = ["fp16", "BF16", "bfloat16", "", None, 16]


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_bad_precision_refused(name, bad):
    """precisions other than 'fp32' / 'bf16' (fp16 first): ValueError naming
    precision, before anything is written, in the default mode and in a
    non-default one."""
    _skip_unusable(name)
    be = fastsae.get_backend(name)
    params, _, lt = _problem_for("sae", (9, 5, 12), 43)
    (x, _), = batches(43, 1, 9, 5)
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(12, np.int64))
    _refused(be, run, x, "precision", precision=bad)
    _refused(be, run, x, "precision", precision=bad, sparsity=JumpReLUSparsity(mode="tanh"))
    assert run[1].step == 0 and run[1].bf16 is None


def _host(be, obj):
    return be.to_numpy(obj)


def test_cuda_refuses_bf16():
    """precision bf16 on cuda (the simulator under NUMBA_ENABLE_CUDASIM=1):
    ValueError naming bf16, nothing written (parameters, moments,
    thresholds, fire counts); fp16 refused too; precision fp32 runs."""
    if not backend_usable("cuda"):
        pytest.skip("cuda backend unavailable")
    be = fastsae.get_backend("cuda")
    hp, _, lt = _problem_for("sae", (9, 5, 12), 44)
    (hx, _), = batches(44, 1, 9, 5)
    params, x = be.to_backend(hp), be.to_backend(hx)
    state = be.to_backend(AdamState.zeros_like(hp))
    th = Thr(lt)
    th_d = [be.to_backend(a.copy()) for a in (th.lt, th.m, th.v)]
    counts = be.to_backend(np.zeros(12, np.int64))

    def host_snap():
        return jsnap(_host(be, params), _host(be, state),
                     Thr(*(np.asarray(_host(be, a)) for a in th_d)))
    before = host_snap()
    for prec, match in (("bf16", "bf16"), ("fp16", "precision")):
        with pytest.raises(ValueError, match=match):
            be.train_step_jumprelu(params, state, x, log_threshold=th_d[0], threshold_m=th_d[1],
                                   threshold_v=th_d[2], bandwidth=BW, l0_coefficient=L0C,
                                   lr=LR, fire_counts=counts, precision=prec)
    assert_same_bits(host_snap(), before, "cuda: written before the refusal")
    assert not np.asarray(_host(be, counts)).any()
    assert state.step == 0 and getattr(state, "bf16", None) is None
    be.train_step_jumprelu(params, state, x, log_threshold=th_d[0], threshold_m=th_d[1],
                           threshold_v=th_d[2], bandwidth=BW, l0_coefficient=L0C, lr=LR,
                           fire_counts=counts, precision="fp32")
    assert state.step == 1


@pytest.mark.parametrize("name", ["numba", "cython"])
def test_unusable_path_refused_and_nothing_written(monkeypatch, force_bf16, name):
    """precision bf16 with a bad ``FASTSAE_BF16_PATH``: the step fails before
    it writes anything (parameters, moments, thresholds, fire counts, the
    kept copy); the run then goes on from the kept copy."""
    _skip_unusable(name)
    _need_bf16()
    be = fastsae.get_backend(name)
    params, _, lt = _problem_for("sae", (9, 5, 12), 46)
    (x, _), = batches(46, 1, 9, 5)
    run = (params, AdamState.zeros_like(params), Thr(lt), np.zeros(12, np.int64))
    _run_step(be, run, x)
    monkeypatch.setenv("FASTSAE_BF16_PATH", "no-such-path")
    _refused(be, run, x, "FASTSAE_BF16_PATH", precision="bf16")
    monkeypatch.delenv("FASTSAE_BF16_PATH")
    _run_step(be, run, x)
    assert_copy_current(run[0], run[1], "after the refused step")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fp32_explicit_equals_omitted(name):
    """precision fp32 explicit == omitted, bitwise (2 steps), keeping no copy."""
    _skip_unusable(name)
    be = fastsae.get_backend(name)
    params, d_out, lt = _problem_for("skip-transcoder", (33, 17, 77), 47)
    runs = []
    for prec in ("fp32", OMIT):
        run = _copy_run(params, lt, 77)
        res = [jstep(be, *run[:2], x, run[2], None, y, precision=prec,
                     fire_counts=run[3]).as_dict()
               for x, y in batches(47, 2, 33, 17, d_out)]
        assert run[1].bf16 is None
        runs.append((res, run))
    assert runs[0][0] == runs[1][0]
    _same_run(runs[0][1], runs[1][1], f"{name}: fp32 vs omitted")


def test_numpy_backend_bf16_step_keeps_no_copy():
    """precision bf16 on the oracle: the step runs and keeps no copy."""
    params, _, lt = _problem_for("sae", (64, 32, 130), 45)
    (x, _), = batches(45, 1, 64, 32)
    run = _copy_run(params, lt, 130)
    r = _run_step(ORACLE, run, x)
    assert np.isfinite(r.total) and r.l0 > 0 and run[1].step == 1 and run[1].bf16 is None


@pytest.mark.parametrize("bad", ["short panels", "wrong transpose", "panels alone"])
def test_cython_sparse_backward_refuses_a_copy_of_another_shape(bad, monkeypatch, force_bf16):
    """precision bf16: ``sparse_backward`` checks the copy it is to rewrite
    before any write (as ``train_backward`` does): a copy of the wrong size,
    or panels without their transpose, is a clear error and the parameters,
    thresholds and their moments stay as they were."""
    _skip_unusable("cython")
    _need_bf16()
    from fastsae.backends.cython import jumprelu as CJ

    real = CJ._bf16_codes

    def broken(*a, **kw):
        codes, copy = real(*a, **kw)
        if bad == "short panels":
            copy["bf16_panels"] = copy["bf16_panels"][:-32]
        elif bad == "wrong transpose":
            copy["bf16_transpose"] = np.zeros((1, 1), np.float32)
        else:
            del copy["bf16_transpose"]
        return codes, copy
    monkeypatch.setattr(CJ, "_bf16_codes", broken)
    be = fastsae.get_backend("cython")
    params, _, lt = _problem_for("sae", (40, 17, 77), 23)
    (x, _), = batches(23, 1, 40, 17)
    before, th = params.copy(), Thr(lt)
    th0 = th.copy()
    match = "go together" if bad == "panels alone" else "does not match W_enc's shape"
    with pytest.raises(ValueError, match=match):
        jstep(be, params, AdamState.zeros_like(params), x, th)
    for n in SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(params, n), getattr(before, n), n)
    for a, b in ((th.lt, th0.lt), (th.m, th0.m), (th.v, th0.v)):
        np.testing.assert_array_equal(a, b)


def test_cython_sparse_backward_refuses_a_copy_without_adam(monkeypatch):
    """The raw kernel's guard that only an Adam call may rewrite a bf16 copy:
    ``jumprelu_gradients`` (no Adam) never passes one, so the test hands the
    kernel a real copy there (a wrapper around the module's
    ``_sparse_backward``): a clear ValueError, and the gradients' arrays
    are not written (their bytes as handed in)."""
    _skip_unusable("cython")
    _need_bf16()
    from fastsae.backends.cython import _bf16 as C
    from fastsae.backends.cython import jumprelu as CJ

    real = CJ._sparse_backward
    seen = []

    def with_copy(*a, **kw):
        Wp, WT = C.pack(np.ascontiguousarray(a[1]), 1)
        seen.append([(g, g.tobytes()) for g in a[-1]])  # grads: what the call would write
        return real(*a, bf16_panels=Wp, bf16_transpose=WT, **kw)
    monkeypatch.setattr(CJ, "_sparse_backward", with_copy)
    be = fastsae.get_backend("cython")
    params, _, _ = _problem_for("sae", (40, 17, 77), 23)
    lt = np.full(params.d_sae, np.log(2.0), np.float32)  # sparse: the CSR backward runs
    (x, _), = batches(23, 1, 40, 17)
    with pytest.raises(ValueError, match="with adam"):
        be.jumprelu_gradients(x, params, lt, BW, L0C)
    assert len(seen) == 1
    for g, before in seen[0]:
        assert g.tobytes() == before

