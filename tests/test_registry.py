"""Backend registry: listing, explicit/env/automatic choice, the contract
check at load, clear errors."""

import inspect
import sys
import types

import numpy as np
import pytest

import fastsae
from fastsae import backends
from fastsae.backends import contract

from conftest import backend_names


def test_available_backends_lists_every_backend_with_reasons():
    st = fastsae.available_backends()
    assert [s.name for s in st] == ["cuda", "numba", "cython", "numpy"]
    by = {s.name: s for s in st}
    assert by["numpy"].available
    for s in st:
        if not s.available:
            assert s.reason, f"{s.name} unavailable without a reason"
        assert s.name in str(s)


def test_explicit_name_wins_over_env(monkeypatch):
    monkeypatch.setenv("FASTSAE_BACKEND", "nonexistent")
    assert fastsae.get_backend("numpy").name == "numpy"


def test_env_var_is_used(monkeypatch):
    monkeypatch.setenv("FASTSAE_BACKEND", "numpy")
    assert fastsae.get_backend().name == "numpy"


def test_automatic_choice_order(monkeypatch):
    """cuda > numba > cython > numpy, skipping unusable ones (simulated here
    by marking backends unusable in the registry's cache)."""
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    numpy_mod = backends._load("numpy")[0]
    for gone, expect in ((("cuda",), "numba"), (("cuda", "numba"), "cython"),
                         (("cuda", "numba", "cython"), "numpy")):
        if expect != "numpy" and not backends._load(expect)[0]:
            continue
        for name in gone:
            monkeypatch.setitem(backends._cache, name, (None, "simulated"))
        assert fastsae.get_backend().name == expect
    # a usable backend that asks not to be chosen automatically is passed over
    shy = types.SimpleNamespace(**{n: getattr(numpy_mod, n) for n in contract.NAMES})
    shy.AUTO_SELECT = False
    monkeypatch.setitem(backends._cache, "cython", (shy, None))
    assert fastsae.get_backend().name == "numpy"


def test_unknown_backend_error_names_alternatives():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*usable here: .*numpy"):
        fastsae.get_backend("tpu")


def test_unavailable_backend_error_gives_reason(monkeypatch):
    monkeypatch.setitem(backends._cache, "cython", (None, "ImportError: simulated missing build"))
    st = {s.name: s for s in fastsae.available_backends()}
    assert not st["cython"].available and "simulated missing build" in st["cython"].reason
    with pytest.raises(ValueError, match=r"'cython' is not usable here \(ImportError: "
                                         r"simulated missing build\); usable here: .*numpy"):
        fastsae.get_backend("cython")


def _fake_backend(monkeypatch, drop=(), **override):
    """Register module ``fastsae_fake_backend`` (a copy of the reference's
    contract names, minus ``drop``) under the registry name ``fake``."""
    ref = sys.modules["fastsae.backends.reference"]
    mod = types.ModuleType("fastsae_fake_backend")
    for n in contract.NAMES:
        if n not in drop:
            setattr(mod, n, getattr(ref, n))
    for k, v in override.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._MODULES, "fake", mod.__name__)
    monkeypatch.delitem(backends._cache, "fake", raising=False)
    return mod


def test_backend_lacking_contract_functions_is_refused(monkeypatch):
    _fake_backend(monkeypatch, drop=("decode", "train_step_topk", "AUTO_SELECT"))
    with pytest.raises(ValueError, match=r"'fake' is not usable here \(fastsae_fake_backend "
                                         r"does not implement the kernel contract: missing "
                                         r"AUTO_SELECT, decode, train_step_topk\)"):
        fastsae.get_backend("fake")


def test_backend_with_wrong_kind_of_name_is_refused(monkeypatch):
    _fake_backend(monkeypatch, encode_relu=42, DEVICE_ARRAYS="no")
    with pytest.raises(ValueError, match="missing DEVICE_ARRAYS, encode_relu"):
        fastsae.get_backend("fake")


def test_complete_backend_loads_and_is_called(monkeypatch):
    calls = []
    ref = sys.modules["fastsae.backends.reference"]

    def norms(W_dec):
        calls.append(W_dec.shape)
        return ref.decoder_column_norms(W_dec)

    _fake_backend(monkeypatch, decoder_column_norms=norms)
    be = fastsae.get_backend("fake")
    out = be.decoder_column_norms(np.ones((3, 4), np.float64))  # the front converts to f32
    assert calls == [(3, 4)] and out.tolist() == [2.0, 2.0, 2.0]


def test_failed_availability_probe_gives_its_reason(monkeypatch):
    def probe():
        raise RuntimeError("no device here")

    _fake_backend(monkeypatch, check_available=probe)
    with pytest.raises(ValueError, match=r"RuntimeError: no device here"):
        fastsae.get_backend("fake")


@pytest.mark.parametrize("name", backend_names())
def test_backend_signatures_match_the_contract(name):
    """Every usable backend's functions take the declared arguments, in the
    declared order (keyword-only after ``*``)."""
    mod = backends._load(name)[0]
    assert set(contract.NAMES) <= set(mod.__all__)
    for f in contract.FUNCTIONS:
        params = inspect.signature(getattr(mod, f.name)).parameters
        got = [p for p in params if params[p].kind != inspect.Parameter.VAR_KEYWORD]
        assert tuple(got) == f.arg_names, (name, f.name)
        star = [a for a, _ in f.args].index("*") if ("*", "") in f.args else len(f.args)
        kw_only = {p for p in got if params[p].kind == inspect.Parameter.KEYWORD_ONLY}
        assert kw_only == set(f.arg_names[star:]), (name, f.name)


def test_contract_families_cover_every_function():
    names = [n for fam in contract.FAMILIES.values() for n in fam]
    assert sorted(names) == sorted(f.name for f in contract.FUNCTIONS)
    assert len(set(names)) == len(names)
    assert contract.function("decode").arg_names == ("codes", "W_dec", "b_dec")


def test_backend_object_passes_through():
    be = fastsae.get_backend("numpy")
    assert fastsae.get_backend(be) is be
    assert "numpy" in repr(be)
    x = np.ones((2, 3), np.float32)
    assert be.to_backend(x) is x and be.to_numpy(x) is x
    be.synchronize()


@pytest.mark.parametrize("name", backend_names())
def test_thread_count_round_trip(name):
    be = fastsae.get_backend(name)
    before = be.get_num_threads()
    assert before >= 1
    be.set_num_threads(1)
    try:
        assert be.get_num_threads() == 1
    finally:
        be.set_num_threads(None)
    assert be.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be >= 1"):
        be.set_num_threads(0)
