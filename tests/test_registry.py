"""Backend registry: listing, explicit/env/automatic choice, clear errors."""

import numpy as np
import pytest

import fastsae
from fastsae import backends


def test_available_backends_lists_every_backend_with_reasons():
    st = fastsae.available_backends()
    assert [s.name for s in st] == list(backends.BACKEND_NAMES)
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


def test_automatic_choice_prefers_fastest(monkeypatch):
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    usable = [s.name for s in fastsae.available_backends() if s.available]
    assert fastsae.get_backend().name == usable[0]


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


def test_backend_object_passes_through():
    be = fastsae.get_backend("numpy")
    assert fastsae.get_backend(be) is be
    assert "numpy" in repr(be)
    x = np.ones((2, 3), np.float32)
    assert be.to_backend(x) is x and be.to_numpy(x) is x
    be.synchronize()
