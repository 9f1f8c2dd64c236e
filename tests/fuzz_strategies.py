"""Strategies and oracles for the property-based fuzz suite (tests/test_fuzz.py).

Generation
----------
An argument is drawn as a :class:`Slot`: float64 *values* of the documented
shape, plus a *presentation* (dtype, memory layout, read-only flag, a wrong
number of dimensions). ``Slot.build()`` materializes a fresh NumPy array, so
every backend gets equal but independent inputs. Values are normal draws at a
random scale (or small integers, to provoke exact ties and zeros), into which
a few special values may be written: huge finite ones (``1e30``, ``3e38``),
non-finite ones, or ``1e39`` (finite in float64, ``inf`` once cast to
float32).

Oracles
-------
What the front must *refuse* is predicted from the built arrays by
:func:`array_refused` / :func:`scalar_refused`, an independent restatement of
the rules of :mod:`fastsae.backends.validate`. What an accepted call must
*return* is computed in float64 from the float32-rounded inputs with the
reference formulas, plus an elementwise *magnitude* ``M`` of every output (the
same formula on absolute values: a float32 evaluation in any order errs by at
most ``K * 2**-24 * M`` for ``K`` terms). Results are compared within
``1e-5 * M + 1e-4 * |want|`` (or the tighter ``dot_bound`` for one product).
Where ``M >= 1e37`` a float32 evaluation may overflow, so non-finite results
are legitimate there and nothing is compared; everywhere else results must be
finite (non-finite positions match exactly: none).
"""

from __future__ import annotations

import hashlib
import numbers
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from fastsae import SparseCodes

U = 2.0 ** -24
F32_MAX = float(np.finfo(np.float32).max)
#: Magnitude at or above which a float32 evaluation may overflow.
OVERFLOW = 1e37

GOOD_DTYPES = (np.float32, np.float32, np.float32, np.float64, np.float16)
BAD_DTYPES = (np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64, object)
LAYOUTS = ("C", "C", "F", "strided", "reversed")
HUGE = (1e30, -1e30, 3e38, -3e38)
NONFINITE = (np.nan, np.inf, -np.inf, 1e39)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def as_f32(a):
    """What the front computes on: the float32 rounding of an accepted array."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.ascontiguousarray(np.asarray(a), dtype=np.float32)


# ================================================================ values
@st.composite
def values(draw, shape, *, kinds=("huge",), nonneg=False, force=None):
    """float64 values of ``shape``; see the module docstring. ``kinds``: the
    special values that may be written in ("huge", "nonfinite"); ``force``:
    one kind that must be."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    style = draw(st.sampled_from(("normal", "normal", "normal", "ints", "zeros")))
    scale = draw(st.sampled_from((1.0, 1.0, 1e-3, 1e3)))
    if style == "normal":
        v = np.array(rng.normal(size=shape) * scale)
    elif style == "ints":
        v = np.array(rng.integers(-2, 3, size=shape), dtype=np.float64)
    else:
        v = np.zeros(shape)
    if nonneg:
        v = np.abs(v)
    kind = force or (draw(st.sampled_from(("none",) * 24 + tuple(kinds))) if kinds else "none")
    if kind != "none" and v.size:
        pool = HUGE if kind == "huge" else NONFINITE
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, v.size - 1))
            s = draw(st.sampled_from(pool))
            v.flat[i] = abs(s) if nonneg and not np.isnan(s) else s
    return v


# ================================================================ arrays
@dataclass
class Slot:
    """One array argument: canonical values plus how they are presented."""

    name: str
    values: np.ndarray
    dtype: object = np.float32
    layout: str = "C"
    readonly: bool = False
    ndim_change: str = "none"  # "none", "extra" (one more axis), "drop" (one fewer)

    def build(self):
        v = self.values
        if self.ndim_change == "extra":
            v = v[None]
        elif self.ndim_change == "drop":
            v = v.reshape(-1) if v.ndim == 2 else v.reshape(-1)[:1].reshape(())
        a = _cast(v, self.dtype)
        a = _layout(a, self.layout)
        if self.readonly:
            a.flags.writeable = False
        return a

    def __repr__(self):
        return (f"Slot({self.name}, shape={self.values.shape}, dtype={np.dtype(self.dtype)}, "
                f"layout={self.layout}, ro={self.readonly}, ndim={self.ndim_change}, "
                f"values={np.array2string(self.values.ravel()[:12], precision=3)})")


def _cast(v, dtype):
    dtype = np.dtype(dtype)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(np.nan_to_num(np.round(v)), info.min, info.max).astype(dtype)
        if dtype.kind == "b":
            return v > 0
        if dtype.kind == "O":
            return v.astype(object)
        return v.astype(dtype)


def _layout(a, layout):
    if a.ndim == 0:
        return np.array(a)  # (np.ascontiguousarray would make it 1-D)
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        sl = tuple(slice(None, None, 2) for _ in a.shape)
        big[sl] = a
        return big[sl]
    if layout == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    raise ValueError(layout)


@st.composite
def slot(draw, name, shape, *, hostile=False, huge=True, nonneg=False, inplace=False):
    """A :class:`Slot` in a random accepted presentation (float16/32/64, any
    layout, maybe read-only), or, ``hostile``, one the front refuses: a bad
    dtype or number of dimensions, NaN/inf, or for an argument updated in
    place, also float64, a non-C layout or read-only."""
    how = "none"
    if hostile:
        how = draw(st.sampled_from(("dtype", "ndim") + (("layout", "readonly") if inplace
                                                        else ("nonfinite",))))
    v = draw(values(shape, kinds=("huge",) if huge else (), nonneg=nonneg,
                    force="nonfinite" if how == "nonfinite" else None))
    s = Slot(name, v, draw(st.sampled_from(GOOD_DTYPES)), draw(st.sampled_from(LAYOUTS)),
             draw(st.booleans()))
    if inplace:  # what a step may update in place: float32, C order, writable
        s.dtype, s.layout, s.readonly = np.float32, "C", False
    if how == "dtype":
        s.dtype = draw(st.sampled_from(BAD_DTYPES + ((np.float64,) if inplace else ())))
    elif how == "ndim":
        s.ndim_change = draw(st.sampled_from(("extra", "drop")))
    elif how == "layout":
        s.layout = draw(st.sampled_from(LAYOUTS[2:]))
    elif how == "readonly":
        s.readonly = True
    return s


def array_refused(a, ndim, *, inplace=False, check_finite=True) -> bool:
    """Whether the front must refuse array ``a`` where a real ``ndim``-D
    array is documented (``inplace``: also float32, C-contiguous, writable;
    ``check_finite``: also finite once rounded to float32)."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.ndim != ndim or a.size == 0:
        return True
    if inplace and (a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable):
        return True
    return bool(check_finite and not np.isfinite(as_f32(a)).all())


# ================================================================ shapes
@st.composite
def dims(draw, names=("N", "d_in", "d_sae"), *, empty=False):
    """Sizes of the named dimensions, 1 to 9 (odd and 1 included); ``empty``:
    one of them is 0."""
    out = {n: draw(st.sampled_from((1, 1, 2, 3, 4, 5, 7, 8, 9))) for n in names}
    if empty:
        out[draw(st.sampled_from(names))] = 0
    return out


@st.composite
def mismatch(draw, specs):
    """One axis of one argument, shared with another argument, made one
    longer: ``(name, axis, symbol)`` (None if no axis is shared)."""
    options = sorted((n, i, sym) for n, spec in specs.items() for i, sym in enumerate(spec)
                     if len(sharing(specs, sym)) > 1)
    return draw(st.sampled_from(options)) if options else None


#: What is wrong with an example: nothing (most), or one thing.
PLANS = ("valid",) * 5 + ("slot", "slot", "mismatch", "empty", "scalar")


def shape_of(name, spec, sizes, mm):
    shape = [sizes[s] for s in spec]
    if mm is not None and mm[0] == name:
        shape[mm[1]] += 1
    return tuple(shape)


def sharing(specs, symbol):
    """Names of the arguments with a dimension ``symbol``: any of them may be
    the one a mismatch message names."""
    return {n for n, s in specs.items() if symbol in s}


# ================================================================ scalars
@dataclass(frozen=True)
class Real:
    """A real scalar argument and its documented range."""

    low: float = 0.0
    low_inclusive: bool = True
    high: float | None = None


def scalar_refused(v, rule) -> bool:
    if isinstance(rule, Int):
        return isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) \
            or int(v) < rule.low
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return True
    v = float(v)
    if not np.isfinite(v) or v < rule.low or (v == rule.low and not rule.low_inclusive):
        return True
    return rule.high is not None and v >= rule.high


@dataclass(frozen=True)
class Int:
    low: int = 1


def real(rule: Real, good=(0.0, 1e-3, 0.1, 1.0, 5.0), bad=False):
    """An accepted real scalar (Python or NumPy, float or int), or with
    ``bad`` a refused one (NaN, inf, out of range, bool, str, None, complex)."""
    if bad:
        bads = [b for b in (np.nan, np.inf, -1.0, True, "0.1", None, 1 + 0j) if
                scalar_refused(b, rule)] + ([rule.high] if rule.high is not None else [])
        return st.sampled_from(bads)
    goods = [g for g in good if not scalar_refused(g, rule)]
    return st.sampled_from(goods) | st.sampled_from(goods).map(np.float32) | \
        st.sampled_from([g for g in goods if float(g).is_integer()] or goods).map(int)


def integer(rule: Int, good=(1, 2, 3, 5, 9, 50), bad=False):
    if bad:
        return st.sampled_from([b for b in (0, -1, True, 2.0, "3", None)
                                if scalar_refused(b, rule)])
    return st.sampled_from(good) | st.sampled_from(good).map(np.int64)


def scalar(rule, bad=False):
    """A scalar for ``rule``: Real, Int, or a tuple of the accepted values."""
    if isinstance(rule, Real):
        return real(rule, bad=bad)
    if isinstance(rule, Int):
        return integer(rule, good=(0, 1, 2, 4, 9) if rule.low == 0 else (1, 2, 3, 5, 9, 50),
                       bad=bad)
    return st.sampled_from(("l2", None, "")) if bad else st.sampled_from(rule)


# ================================================================ messages / hashing
def names_one_of(message: str, names) -> bool:
    """Whether ``message`` mentions one of ``names`` as a word (``x`` is not
    found in ``x_hat``; ``W_enc`` is found in ``params.W_enc``)."""
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names)


def digest(obj):
    """Bytes, shape, dtype and flags of every array in ``obj`` (nested
    containers of arrays, SparseCodes, dataclasses), for mutation checks."""
    h = hashlib.sha256()

    def visit(o):
        if isinstance(o, np.ndarray):
            h.update(repr((o.shape, o.dtype.str, o.strides, o.flags.writeable)).encode())
            h.update(np.ascontiguousarray(o).tobytes() if o.dtype != object else repr(o.tolist()).encode())
        elif isinstance(o, SparseCodes):
            for a in (o.indptr, o.indices, o.values):
                visit(a)
            h.update(repr(o.shape).encode())
        elif isinstance(o, dict):
            for k in o:
                visit(o[k])
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif hasattr(o, "__dataclass_fields__"):
            for k in o.__dataclass_fields__:
                visit(getattr(o, k))
        else:
            h.update(repr(o).encode())
    visit(obj)
    return h.hexdigest()


# ================================================================ result checks
def check_close(got, want, M, what, *, bound=None):
    """``got`` (float32) equals the float64 ``want`` within ``bound`` (default
    ``1e-5 * M + 1e-4 * |want|``) wherever ``M < OVERFLOW``; there it must be
    finite. Elsewhere (possible overflow) anything goes."""
    got = np.asarray(got)
    want, M = np.broadcast_to(f64(want), got.shape), np.broadcast_to(f64(M), got.shape)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if bound is None:
        bound = 1e-5 * M + 1e-4 * np.abs(want) + 1e-30
    safe = np.isfinite(M) & (M < OVERFLOW)
    g = f64(got)
    assert np.isfinite(g[safe]).all(), \
        f"{what}: non-finite at {np.argwhere(safe & ~np.isfinite(g))[:3].tolist()} where " \
        f"no float32 evaluation overflows (magnitude < {OVERFLOW:g})"
    with np.errstate(invalid="ignore"):
        err = np.where(safe, np.abs(g - want), 0.0)
    bad = err > np.broadcast_to(bound, got.shape)
    assert not bad.any(), \
        f"{what}: off by {err[bad].max():.3g} at {np.argwhere(bad)[:3].tolist()} " \
        f"(got {g[bad][:3]}, want {want[bad][:3]})"


def check_canonical(c, shape, what="codes"):
    """A canonical SparseCodes of ``shape``: int64 indptr from 0, int32
    indices strictly increasing per row and in range, float32 values, none
    of them zero."""
    assert isinstance(c, SparseCodes), f"{what}: got {type(c).__name__}"
    c = c.to_host()
    assert tuple(c.shape) == tuple(shape), f"{what}: shape {c.shape}, expected {shape}"
    ip, ix, v = c.indptr, c.indices, c.values
    assert ip.dtype == np.int64 and ip.shape == (shape[0] + 1,), f"{what}.indptr {ip.dtype} {ip.shape}"
    assert ix.dtype == np.int32 and v.dtype == np.float32, f"{what}: {ix.dtype}, {v.dtype}"
    assert ip[0] == 0 and np.all(np.diff(ip) >= 0) and ip[-1] == ix.size == v.size, \
        f"{what}.indptr {ip.tolist()} (nnz {ix.size})"
    if ix.size:
        assert ix.min() >= 0 and ix.max() < shape[1], f"{what}.indices out of range"
        rows = np.repeat(np.arange(shape[0]), np.diff(ip))
        same_row = rows[1:] == rows[:-1]
        assert np.all(np.diff(ix.astype(np.int64))[same_row] > 0), f"{what}: unsorted row"
    assert not np.any(v == 0), f"{what}: a stored zero"


def csr_valid(c) -> bool:
    """Whether ``c`` is a SparseCodes every kernel can read safely: integer
    indptr/indices that, as exact integers, describe a CSR matrix of
    ``c.shape`` with strictly increasing columns per row, and real values
    finite in float32. (Exact: uint64 wrap-around is not a valid indptr.)"""
    try:
        n, cols = c.shape
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                   for s in (n, cols)) or n <= 0 or cols <= 0:
            return False
        ip, ix, v = (np.asarray(a) for a in (c.indptr, c.indices, c.values))
    except Exception:
        return False
    if ip.ndim != 1 or ix.ndim != 1 or v.ndim != 1:
        return False
    if ip.dtype.kind not in "iu" or ix.dtype.kind not in "iu" or v.dtype.kind != "f":
        return False
    ptr = [int(p) for p in ip.tolist()]
    idx = [int(i) for i in ix.tolist()]
    if len(ptr) != n + 1 or ptr[0] != 0 or ptr[-1] != len(idx) or len(v) != len(idx):
        return False
    if any(b < a for a, b in zip(ptr, ptr[1:])) or any(not 0 <= i < cols for i in idx):
        return False
    for a, b in zip(ptr, ptr[1:]):
        if any(q <= p for p, q in zip(idx[a:b], idx[a + 1:b])):
            return False
    return bool(np.isfinite(as_f32(v)).all())


def csr_dense(c):
    """float64 dense matrix of a :func:`csr_valid` SparseCodes (float32-rounded values)."""
    n, cols = (int(s) for s in c.shape)
    out = np.zeros((n, cols))
    ip = np.asarray(c.indptr).astype(np.int64)
    rows = np.repeat(np.arange(n), np.diff(ip))
    out[rows, np.asarray(c.indices).astype(np.int64)] = f64(as_f32(c.values))
    return out


# ---------------------------------------------------------------- encoders
def pre_activations(x, W_enc, b_enc, b_dec):
    """float64 pre-activations of float32 inputs, their magnitude and the
    rigorous float32 error bound of one evaluation (cf. tests/conftest.py)."""
    x, W, be, bd = (f64(as_f32(a)) for a in (x, W_enc, b_enc, b_dec))
    pre = (x - bd) @ W + be
    M = (np.abs(x) + np.abs(bd)) @ np.abs(W) + np.abs(be)
    return pre, M, 2.0 * (x.shape[1] + 2) * U * M + 1e-30


def check_selection(got, pre, M, bound, threshold=None, k=None, batch=False, what="codes"):
    """A TopK / BatchTopK / JumpReLU / ReLU selection is one the float32
    evaluation may legitimately make: kept values match ``pre`` within
    ``bound``; nothing clearly better than a kept entry is left out; rows
    (or the batch) with a possible overflow are not compared."""
    check_canonical(got, pre.shape, what)
    c = got.to_host()
    dense = np.zeros(pre.shape)
    rows = np.repeat(np.arange(pre.shape[0]), np.diff(c.indptr))
    dense[rows, c.indices] = f64(c.values)
    sel = np.zeros(pre.shape, bool)
    sel[rows, c.indices] = True
    if k is not None:
        cap = min(k * pre.shape[0], pre.size) if batch else min(k, pre.shape[1])
        counts = [sel.sum()] if batch else sel.sum(axis=1)
        assert max(counts) <= cap, f"{what}: {max(counts)} kept, at most {cap} allowed"
    groups = [np.ones(pre.shape, bool)] if batch else \
        [np.arange(pre.shape[0])[:, None] == i for i in range(pre.shape[0])]
    for g in groups:
        g = np.broadcast_to(g, pre.shape)
        if not (M[g] < OVERFLOW).all():
            continue
        s, u = sel & g, ~sel & g
        assert np.all(np.abs(dense[s] - pre[s]) <= bound[s]), \
            f"{what}: kept value off: got {dense[s]}, want {pre[s]}"
        assert np.all(pre[s] > -bound[s]), f"{what}: kept a negative pre-activation"
        clearly_on = u & (pre > bound)
        if threshold is not None:
            thr = f64(threshold)[None, :]
            assert np.all(pre[s] > (np.broadcast_to(thr, pre.shape) - bound)[s]), \
                f"{what}: kept an entry at or below its threshold"
            clearly_on &= pre > thr + bound
        if k is None:
            assert not clearly_on.any(), f"{what}: left out active entries {np.argwhere(clearly_on)[:3].tolist()}"
            continue
        if not clearly_on.any():
            continue
        n_kept = s.sum()
        cap = min(k * pre.shape[0], pre.size) if batch else min(k, pre.shape[1])
        assert n_kept == cap, f"{what}: kept {n_kept} < {cap} but left out a positive entry"
        worst = np.min(pre[s] + bound[s])
        assert np.all(pre[clearly_on] - bound[clearly_on] <= worst), \
            f"{what}: left out an entry larger than a kept one"


# ---------------------------------------------------------------- gradients
def gradient_magnitudes(x, params, f, x_hat, c, mode):
    """Magnitudes (see the module docstring) of the outputs of
    ``reference.gradients`` on the same arguments, and of its largest
    intermediate. ``f`` is float64 dense codes."""
    A = lambda a: np.abs(f64(a))  # noqa: E731
    n = x.shape[0]
    We, Wd, bd = A(params.W_enc), A(params.W_dec), A(params.b_dec)
    af, mask = np.abs(f), f > 0
    dx = 2.0 * (A(x_hat) + A(x)) / n
    norms = np.sqrt((Wd * Wd).sum(axis=1))
    pen = norms if mode == "weighted_l1" else np.ones_like(norms)
    unit = np.divide(Wd, norms[:, None], out=np.zeros_like(Wd), where=norms[:, None] > 0)
    gWd = af.T @ dx
    if mode == "weighted_l1":
        gWd = gWd + (c / n) * af.sum(axis=0)[:, None] * unit
    df = dx @ Wd.T + (c / n) * pen[None, :]
    dpre = np.where(mask, df, 0)
    gWe = (A(x) + bd).T @ dpre
    gbe = dpre.sum(axis=0)
    gbd = dx.sum(axis=0) + gbe @ We.T
    if mode == "unit_norm":
        gWd = _projected(gWd, Wd)
    mse = float(np.sum((A(x_hat) + A(x)) ** 2) / n)
    l1 = float(c * np.sum(af * pen[None, :]) / n)
    worst = max(_max(a) for a in (dx, df, gWd, gWe, gbe, gbd, norms ** 2))
    return (mse, l1), (gWe, gbe, gWd, gbd), max(worst, mse, l1)


def topk_gradient_magnitudes(x, params, f, x_hat, fa=None, w=0.0):
    A = lambda a: np.abs(f64(a))  # noqa: E731
    n = x.shape[0]
    We, Wd, bd = A(params.W_enc), A(params.W_dec), A(params.b_dec)
    dx = 2.0 * (A(x_hat) + A(x)) / n
    gWd = np.abs(f).T @ dx
    dpre = np.where(f > 0, dx @ Wd.T, 0)
    mse = float(np.sum((A(x_hat) + A(x)) ** 2) / n)
    aux, inter = 0.0, [dx]
    if fa is not None and w > 0:
        err = np.abs(fa) @ Wd + A(x) + A(x_hat)
        aux = float(w * np.sum(err ** 2) / n)
        de = 2.0 * w * err / n
        gWd = gWd + np.abs(fa).T @ de
        dpre = dpre + np.where(fa > 0, de @ Wd.T, 0)
        inter += [err, de]
    gWe = (A(x) + bd).T @ dpre
    gbe = dpre.sum(axis=0)
    gbd = dx.sum(axis=0) + gbe @ We.T
    gWd = _projected(gWd, Wd)
    worst = max(_max(a) for a in (*inter, dpre, gWd, gWe, gbe, gbd, np.sum(Wd * Wd, axis=1)))
    return (mse, aux), (gWe, gbe, gWd, gbd), max(worst, mse, aux)


def _projected(g, W):
    sq = np.sum(W * W, axis=1, keepdims=True)
    coef = np.divide(np.sum(g * W, axis=1, keepdims=True), sq, out=np.zeros_like(sq),
                     where=sq > 0)
    return g + coef * W


def _max(a):
    a = f64(a)
    return float(np.max(a)) if a.size else 0.0


# ================================================================ SparseCodes
@dataclass
class CodesRecipe:
    """A (possibly hostile) SparseCodes built from random arrays."""

    dense: np.ndarray
    hostility: str = "none"
    indptr_dtype: object = np.int64
    indices_dtype: object = np.int32
    values_dtype: object = np.float32
    extra: dict = field(default_factory=dict)

    def build(self) -> SparseCodes:
        d = self.dense
        n, cols = d.shape
        rows, cc = np.nonzero(d)
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=ptr[1:])
        ptr, idx, val = list(ptr), list(cc), list(d[rows, cc])
        shape = (n, cols)
        h, e = self.hostility, self.extra
        if h == "stored_zero" and idx:
            val[e["at"] % len(val)] = 0.0
        elif h == "negative_value" and idx:
            val[e["at"] % len(val)] = -abs(val[e["at"] % len(val)]) - 1.0
        elif h == "nonfinite_value" and idx:
            val[e["at"] % len(val)] = e["special"]
        elif h == "index_out_of_range" and idx:
            idx[e["at"] % len(idx)] = e["index"]
        elif h == "unsorted" and len(idx) >= 2:
            i = e["at"] % (len(idx) - 1)
            idx[i], idx[i + 1] = idx[i + 1], idx[i]
        elif h == "decreasing_indptr":
            ptr[e["at"] % (n + 1)] = e["value"]  # e.g. 10**7, or a wrap-around
        elif h == "indptr_end":
            ptr[-1] += e["delta"]
        elif h == "short_indptr":
            ptr = ptr[:-1]
        elif h == "values_length":
            val = val + [1.0] if e["delta"] > 0 else val[:-1]
        elif h == "shape":
            shape = e["shape"]
        elif h == "ndim":
            return SparseCodes(np.asarray(ptr)[None], np.asarray(idx), np.asarray(val), shape)
        return SparseCodes(_int_array(ptr, self.indptr_dtype), _int_array(idx, self.indices_dtype),
                           _cast(np.asarray(val, dtype=np.float64), self.values_dtype), shape)


def _int_array(v, dtype):
    """``v`` (Python ints) as ``dtype``, wrapping around as a C cast does
    (``-1`` as uint64 is ``2**64 - 1``); non-integer dtypes by value."""
    dtype = np.dtype(dtype)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if dtype.kind in "iu":
            return np.array([int(x) % 2 ** 64 for x in v], dtype=np.uint64).astype(dtype)
        return np.asarray([float(x) for x in v], dtype=np.float64).astype(dtype)


HOSTILITIES = ("none",) * 8 + (
    "stored_zero", "negative_value", "nonfinite_value", "index_out_of_range", "unsorted",
    "decreasing_indptr", "indptr_end", "short_indptr", "values_length", "shape", "ndim")


@st.composite
def codes_recipe(draw, n, d_sae, *, hostilities=HOSTILITIES, nonneg=True):
    dense = draw(values((n, d_sae), kinds=(), nonneg=nonneg))
    if draw(st.booleans()):  # sparser
        dense[np.abs(dense) < np.median(np.abs(dense))] = 0
    r = CodesRecipe(dense, draw(st.sampled_from(hostilities)))
    r.indptr_dtype = draw(st.sampled_from((np.int64,) * 4 + (np.int32, np.uint64, np.uint32,
                                                            np.float64, np.bool_)))
    r.indices_dtype = draw(st.sampled_from((np.int32,) * 4 + (np.int64, np.uint64, np.uint8,
                                                             np.float32)))
    r.values_dtype = draw(st.sampled_from((np.float32,) * 4 + (np.float64, np.float16, np.int32,
                                                              np.bool_, np.complex64, object)))
    r.extra = {
        "at": draw(st.integers(0, 100)),
        "special": draw(st.sampled_from(NONFINITE)),
        "index": draw(st.sampled_from((d_sae, d_sae + 1, -1, 2 ** 31 - 1, 2 ** 40))),
        "value": draw(st.sampled_from((10 ** 7, -1, 2 ** 63 - 1, 2 ** 64 - 1))),
        "delta": draw(st.sampled_from((-1, 1, 10 ** 7))),
        "shape": draw(st.sampled_from(((n, d_sae + 1), (n + 1, d_sae), (n, 0), (0, d_sae),
                                       (n,), (n, d_sae, 1), (-n, d_sae),
                                       (np.int64(n), np.int32(d_sae))))),
    }
    return r
