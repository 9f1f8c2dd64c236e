"""``fastsae encode --out-dir`` and :func:`fastsae.distributed.encode.encode_to_dir`:
one task per shard, here or on a real local Dask cluster (worker processes),
retries, a killed worker, and reading the output back.

Without the dask extra the cluster tests skip; CI installs it
(``pip install -e '.[test,mpi,dask]'``) and runs them for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import fastsae
from fastsae.cli import main
from fastsae.distributed import encode as enc


def _have_dask():
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


needs_dask = pytest.mark.skipif(not _have_dask(), reason="needs pip install 'fastsae[dask]'")

D_IN, D_SAE = 24, 64
ROWS = (300, 1, 0, 77)  # one row, and an empty shard, among ordinary ones


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(3)
    arrays = []
    for i, n in enumerate(ROWS):
        a = rng.standard_normal((n, D_IN)).astype(np.float32)
        np.save(d / f"part-{i:03d}.npy", a)
        arrays.append(a)
    return d, arrays


def _save(tmp_path_factory, name, **kw):
    d = tmp_path_factory.mktemp(name) / "sae"
    sae = fastsae.SparseAutoencoder(D_IN, D_SAE, seed=1, **kw)
    sae.params.b_enc[:] = -0.05  # a few features off per row: codes of mixed density
    sae.save(d)
    return d


@pytest.fixture(scope="module", params=["relu", "topk", "transcoder"])
def sae_dir(request, tmp_path_factory):
    kw = {"relu": {}, "topk": {"activation": "topk", "k": 5},
          "transcoder": {"transcoder": True, "d_out": 16, "activation": "topk", "k": 7}}
    return _save(tmp_path_factory, request.param, **kw[request.param])


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    return _save(tmp_path_factory, "relu")


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _flaky_task(log, fail_for, real, sae_dir, backend, shard, out, *rest):
    """Fails on its first call for the shards named in ``fail_for``; every call
    is appended to the file ``log`` (files: workers may be other processes, and
    Dask sends them a copy of the task, never the test's own objects)."""
    name = os.path.basename(shard)
    with open(log, "a") as fh:
        fh.write(name + "\n")
    with open(log) as fh:
        first = fh.read().split().count(name) == 1
    if name in fail_for and first:
        raise OSError("disk hiccup")
    return real(sae_dir, backend, shard, out, *rest)


def _flaky(tmp_path, fail_for):
    """``(task, calls)``: a :func:`_flaky_task` and a function listing its calls."""
    import functools

    log = tmp_path / "calls.log"
    log.write_text("")
    task = functools.partial(_flaky_task, str(log), frozenset(fail_for), enc._encode_shard)
    return task, lambda: log.read_text().split()


@pytest.fixture
def by_value():
    """Worker processes cannot import this test module: send its functions by value."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ===================================================================== here
def test_each_shard_file_equals_the_model_encode(sae_dir, shards, tmp_path):
    d, arrays = shards
    msgs = []
    index = enc.encode_to_dir(sae_dir, d, tmp_path / "out", batch_size=50, threads=1,
                              progress=msgs.append)
    sae = fastsae.SparseAutoencoder.load(sae_dir)
    assert [s["rows"] for s in index["shards"]] == list(ROWS)
    for s, a in zip(index["shards"], arrays):
        got = sp.load_npz(tmp_path / "out" / s["file"])  # scipy's own reader
        assert isinstance(got, sp.csr_array) and got.shape == (a.shape[0], D_SAE)
        assert got.dtype == np.float32
        if a.shape[0]:
            want = sae.encode(a, sparse=True, batch_size=50).to_scipy()
            assert (got != want).nnz == 0
        assert s["nnz"] == got.nnz
    assert len([m for m in msgs if m.startswith("[")]) == len(ROWS)
    assert msgs[-1].startswith(f"encoded {sum(ROWS):,} rows of {len(ROWS)} shard(s)")
    whole = enc.read_encoded(tmp_path / "out")
    ref = sae.encode(np.concatenate(arrays), sparse=True).to_scipy()
    assert whole.shape == ref.shape
    # other batch boundaries than the per-shard ones: equal within float32 rounding
    assert np.array_equal(whole.indptr, ref.indptr) and np.array_equal(whole.indices, ref.indices)
    np.testing.assert_allclose(whole.data, ref.data, rtol=1e-5, atol=1e-6)


def test_out_dir_agrees_with_the_single_file_out(relu_dir, shards, tmp_path):
    d, _ = shards
    assert main(["encode", "--sae", str(relu_dir), "--data", str(d), "--out",
                 str(tmp_path / "all.npz"), "--batch-size", "64"]) == 0
    assert main(["encode", "--sae", str(relu_dir), "--data", str(d), "--out-dir",
                 str(tmp_path / "dir"), "--batch-size", "64"]) == 0
    a, b = sp.load_npz(tmp_path / "all.npz"), enc.read_encoded(tmp_path / "dir")
    assert a.shape == b.shape and np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)


def _bf16_kernels():
    from fastsae.backends import bf16

    return bool(bf16.available_paths())


@pytest.mark.skipif(not _bf16_kernels(), reason="the compiled bf16 kernels are not built")
@pytest.mark.parametrize("backend", ["numba", "cython", "numpy"])
def test_bf16_precision_encodes_each_shard_as_the_model_does(sae_dir, shards, tmp_path,
                                                             backend):
    """``--precision bf16``: every shard file equals the model's own bf16 encode
    of that shard (the weights packed once per shard), the index records the
    precision, and the one-file ``--out`` gives the same rows."""
    if backend == "cython" and not {s.name: s.available for s in fastsae.available_backends()}["cython"]:
        pytest.skip("the cython backend is not built")
    d, arrays = shards
    index = enc.encode_to_dir(sae_dir, d, tmp_path / "out", batch_size=50, threads=1,
                              backend=backend, precision="bf16", progress=None)
    assert index["precision"] == "bf16"
    sae = fastsae.SparseAutoencoder.load(sae_dir, backend=backend)
    for s, a in zip(index["shards"], arrays):
        got = sp.load_npz(tmp_path / "out" / s["file"])
        if a.shape[0]:
            want = sae.encode(a, sparse=True, batch_size=50, precision="bf16").to_scipy()
            assert (got != want).nnz == 0
    assert main(["encode", "--sae", str(sae_dir), "--data", str(d), "--out",
                 str(tmp_path / "all.npz"), "--batch-size", "50", "--backend", backend,
                 "--precision", "bf16"]) == 0
    assert (sp.load_npz(tmp_path / "all.npz") != enc.read_encoded(tmp_path / "out")).nnz == 0


def test_bf16_precision_refusals_are_clear(relu_dir, shards, tmp_path, capsys):
    d, _ = shards
    with pytest.raises(ValueError, match="precision must be one of"):
        enc.encode_to_dir(relu_dir, d, tmp_path / "out", precision="fp16", progress=None)
    assert not (tmp_path / "out").exists()
    assert main(["encode", "--sae", str(relu_dir), "--data", str(d), "--out",
                 str(tmp_path / "a.npz"), "--precision", "fp16"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bytes_are_deterministic_and_hashes_recorded(relu_dir, shards, tmp_path):
    d, _ = shards
    i1 = enc.encode_to_dir(relu_dir, d, tmp_path / "a", threads=1, progress=None)
    i2 = enc.encode_to_dir(relu_dir, d, tmp_path / "b", threads=1, progress=None)
    assert i1["shards"] == i2["shards"]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in fa.items() if k != "index.json"} == \
        {k: v for k, v in fb.items() if k != "index.json"}
    for s in i1["shards"]:
        assert hashlib.sha256(fa[s["file"]]).hexdigest() == s["sha256"]
    on_disk = json.loads(fa["index.json"])
    assert on_disk["rows"] == sum(ROWS) and on_disk["d_sae"] == D_SAE
    assert on_disk["architecture"] == "standard" and on_disk["threads_per_task"] == 1


def test_one_npy_file_is_one_shard(relu_dir, shards, tmp_path):
    d, arrays = shards
    index = enc.encode_to_dir(relu_dir, d / "part-000.npy", tmp_path / "o", progress=None)
    assert [s["file"] for s in index["shards"]] == ["part-000.npz"]
    assert enc.read_encoded(tmp_path / "o").shape == (arrays[0].shape[0], D_SAE)


def test_a_failed_task_is_retried_here(relu_dir, shards, tmp_path, monkeypatch):
    d, _ = shards
    ref = enc.encode_to_dir(relu_dir, d, tmp_path / "ref", threads=1, progress=None)
    task, calls = _flaky(tmp_path, {"part-001.npy"})
    monkeypatch.setattr(enc, "_encode_shard", task)
    msgs = []
    index = enc.encode_to_dir(relu_dir, d, tmp_path / "out", threads=1, progress=msgs.append)
    assert calls().count("part-001.npy") == 2
    assert any("part-001.npy failed on attempt 1 of 3 (OSError: disk hiccup): retrying" in m
               for m in msgs)
    assert index["shards"] == ref["shards"]


def test_a_task_that_keeps_failing_fails_the_run_and_writes_no_index(relu_dir, shards,
                                                                     tmp_path, monkeypatch):
    d, _ = shards
    calls = []

    def broken(*args):
        calls.append(1)
        raise OSError("no space left")
    monkeypatch.setattr(enc, "_encode_shard", broken)
    with pytest.raises(enc.EncodeError, match=r"shard part-000.npy failed after 2 "
                       r"attempt\(s\): OSError: no space left"):
        enc.encode_to_dir(relu_dir, d, tmp_path / "out", retries=1, progress=None)
    assert len(calls) == 2 and not (tmp_path / "out" / "index.json").exists()
    with pytest.raises(enc.EncodeError, match="holds no index.json"):
        enc.read_encoded(tmp_path / "out")


def test_bad_data_fails_at_once_naming_the_shard_and_row(relu_dir, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    a = np.ones((40, D_IN), np.float32)
    np.save(d / "a.npy", a)
    a[17, 3] = np.nan
    np.save(d / "b.npy", a)
    assert main(["encode", "--sae", str(relu_dir), "--data", str(d), "--out-dir",
                 str(tmp_path / "out"), "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "b.npy contains NaN or infinite values (first in row 17)" in err
    assert "retrying" not in err and not (tmp_path / "out" / "index.json").exists()


def test_rerun_replaces_a_previous_encode(relu_dir, shards, tmp_path):
    d, _ = shards
    out = tmp_path / "out"
    enc.encode_to_dir(relu_dir, d, out, progress=None)
    enc.encode_to_dir(relu_dir, d / "part-003.npy", out, progress=None)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "part-003.npz"]


@pytest.mark.parametrize("case", ["foreign_dir", "is_file", "no_parent", "width",
                                  "batch", "retries", "dask_spec", "dask_zero", "dask_and_out",
                                  "both_outs", "negative_retries"])
def test_bad_requests_are_clear_errors(case, relu_dir, shards, tmp_path, capsys):
    d, _ = shards
    out = tmp_path / "out"
    base = ["encode", "--sae", str(relu_dir), "--data", str(d)]
    if case == "foreign_dir":
        out.mkdir()
        (out / "mine.txt").write_text("x")
        assert main(base + ["--out-dir", str(out)]) == 2
        assert "is not empty and holds no index.json" in capsys.readouterr().err
        assert (out / "mine.txt").exists()
    elif case == "is_file":
        out.write_text("x")
        with pytest.raises(ValueError, match="exists and is not a directory"):
            enc.encode_to_dir(relu_dir, d, out, progress=None)
    elif case == "no_parent":
        with pytest.raises(ValueError, match="parent of --out-dir does not exist"):
            enc.encode_to_dir(relu_dir, d, tmp_path / "x" / "y", progress=None)
    elif case == "width":
        np.save(tmp_path / "w.npy", np.zeros((3, D_IN + 1), np.float32))
        with pytest.raises(ValueError, match=f"d_in = {D_IN + 1}.*expects d_in = {D_IN}"):
            enc.encode_to_dir(relu_dir, tmp_path / "w.npy", out, progress=None)
        assert not out.exists()
    elif case == "batch":
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            enc.encode_to_dir(relu_dir, d, out, batch_size=0)
    elif case == "retries":
        with pytest.raises(ValueError, match="retries must be a non-negative integer"):
            enc.encode_to_dir(relu_dir, d, out, retries=-1)
    elif case == "dask_spec":
        for spec in ("local:x", "local:0", " "):
            with pytest.raises(ValueError, match="--dask"):
                enc._parse_dask(spec)
    elif case == "dask_zero":
        if not _have_dask():
            pytest.skip("needs the dask extra")
        assert main(base + ["--out-dir", str(out), "--dask", "local:0"]) == 2
        assert "positive worker count" in capsys.readouterr().err and not out.exists()
    elif case == "dask_and_out":
        assert main(base + ["--out", str(tmp_path / "a.npz"), "--dask", "local"]) == 2
        assert "--dask needs --out-dir" in capsys.readouterr().err
    elif case == "both_outs":
        assert main(base + ["--out", str(tmp_path / "a.npz"), "--out-dir", str(out)]) == 2
        assert "not allowed with argument" in capsys.readouterr().err
    elif case == "negative_retries":
        assert main(base + ["--out-dir", str(out), "--retries", "-1"]) == 2
        assert "non-negative integer" in capsys.readouterr().err


def test_without_the_dask_extra_the_command_says_which_to_install(relu_dir, shards, tmp_path,
                                                                  monkeypatch, capsys):
    d, _ = shards
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert main(["encode", "--sae", str(relu_dir), "--data", str(d), "--out-dir",
                 str(tmp_path / "o"), "--dask", "local:2"]) == 2
    assert "pip install 'fastsae[dask]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"fastsae\[dask\]"):
        enc.encode_to_dir(relu_dir, d, tmp_path / "o", dask="local:2")


# =========================================================== reading back
@pytest.fixture
def written(relu_dir, shards, tmp_path):
    out = tmp_path / "w"
    enc.encode_to_dir(relu_dir, shards[0], out, progress=None)
    return out


def _edit_index(out, fn):
    index = json.loads((out / "index.json").read_text())
    fn(index)
    (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case,match", [
    ("no_index", "holds no index.json"),
    ("not_json", "not a readable index"),
    ("foreign", "not a fastsae encode index"),
    ("version", "index version 99"),
    ("escape", "malformed"),
    ("missing", "is missing"),
    ("altered", "does not match its SHA-256"),
    ("garbage_unverified", "cannot read"),
    ("bad_csr_unverified", "does not hold a valid"),
    ("rows_unverified", "does not hold a valid"),
])
def test_read_encoded_rejects_incomplete_corrupt_or_foreign_output(written, case, match):
    first = json.loads((written / "index.json").read_text())["shards"][0]["file"]
    verify = not case.endswith("_unverified")
    if case == "no_index":
        (written / "index.json").unlink()
    elif case == "not_json":
        (written / "index.json").write_bytes(b"\xff{")
    elif case == "foreign":
        _edit_index(written, lambda i: i.update(format="something-else"))
    elif case == "version":
        _edit_index(written, lambda i: i.update(version=99))
    elif case == "escape":
        _edit_index(written, lambda i: i["shards"][0].update(file="../w/" + first))
    elif case == "missing":
        (written / first).unlink()
    elif case == "altered":
        b = bytearray((written / first).read_bytes())
        b[len(b) // 2] ^= 0xFF
        (written / first).write_bytes(bytes(b))
    elif case == "garbage_unverified":
        (written / first).write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "bad_csr_unverified":
        m = sp.load_npz(written / first)
        m.indices[0] = D_SAE + 5  # out of range: never handed on to scipy as valid
        np.savez(written / first, indices=m.indices, indptr=m.indptr, data=m.data,
                 shape=np.array(m.shape), format=np.array(b"csr"))
    elif case == "rows_unverified":
        _edit_index(written, lambda i: i["shards"][0].update(rows=i["shards"][0]["rows"] + 1))
    with pytest.raises(enc.EncodeError, match=match):
        enc.read_encoded(written, verify=verify)


def test_read_encoded_never_unpickles(written):
    first = json.loads((written / "index.json").read_text())["shards"][0]["file"]
    np.savez(written / first, indices=np.array([object()], dtype=object))
    with pytest.raises(enc.EncodeError, match="cannot read"):
        enc.read_encoded(written, verify=False)


# ============================================================ on Dask
@needs_dask
def test_local_cluster_output_is_byte_identical_to_one_process(relu_dir, shards, tmp_path,
                                                               capsys):
    d, _ = shards
    base = ["encode", "--sae", str(relu_dir), "--data", str(d), "--batch-size", "32",
            "--threads", "1"]
    assert main(base + ["--out-dir", str(tmp_path / "here")]) == 0
    assert main(base + ["--out-dir", str(tmp_path / "dask"), "--dask", "local:2"]) == 0
    out = capsys.readouterr().out
    assert "on a local Dask cluster of 2 worker process(es)" in out
    assert out.count("] part-") == 2 * len(ROWS)
    here, there = _files(tmp_path / "here"), _files(tmp_path / "dask")
    assert here.keys() == there.keys()
    for name in here:
        if name != "index.json":
            assert here[name] == there[name], name
    ih = json.loads(here["index.json"])
    it = json.loads(there["index.json"])
    assert ih["shards"] == it["shards"]  # input order, whatever order the tasks finished in


@needs_dask
def test_a_failed_task_is_retried_on_the_cluster(relu_dir, shards, tmp_path, monkeypatch,
                                                 by_value):
    d, _ = shards
    ref = enc.encode_to_dir(relu_dir, d, tmp_path / "ref", threads=1, progress=None)
    task, calls = _flaky(tmp_path, {"part-000.npy", "part-003.npy"})
    monkeypatch.setattr(enc, "_encode_shard", task)
    msgs = []
    index = enc.encode_to_dir(relu_dir, d, tmp_path / "out", threads=1, dask="local:2",
                              progress=msgs.append)
    assert sorted(calls()) == sorted(["part-000.npy"] * 2 + ["part-001.npy", "part-002.npy"]
                                     + ["part-003.npy"] * 2)
    assert sum("failed on attempt 1 of 3 (OSError: disk hiccup): retrying" in m
               for m in msgs) == 2
    assert index["shards"] == ref["shards"]


def _die_once(marker, real, sae_dir, backend, shard, out, *rest):
    """Runs in a worker process: the first call for shard 2 kills the worker."""
    if shard.endswith("part-002.npy") and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return real(sae_dir, backend, shard, out, *rest)


@needs_dask
def test_a_killed_worker_loses_no_shard(relu_dir, shards, tmp_path, monkeypatch, by_value):
    import functools

    d, _ = shards
    ref = enc.encode_to_dir(relu_dir, d, tmp_path / "ref", threads=1, progress=None)
    marker = str(tmp_path / "died")
    monkeypatch.setattr(enc, "_encode_shard",
                        functools.partial(_die_once, marker, enc._encode_shard))
    index = enc.encode_to_dir(relu_dir, d, tmp_path / "out", threads=1, dask="local:2",
                              progress=None)
    assert os.path.exists(marker)  # a worker did die
    assert index["shards"] == ref["shards"]
    assert (enc.read_encoded(tmp_path / "out") != enc.read_encoded(tmp_path / "ref")).nnz == 0


@needs_dask
def test_a_scheduler_address_is_used_and_left_running(relu_dir, shards, tmp_path):
    import distributed

    d, _ = shards
    ref = enc.encode_to_dir(relu_dir, d, tmp_path / "ref", threads=1, progress=None)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        msgs = []
        index = enc.encode_to_dir(relu_dir, d, tmp_path / "out", threads=1,
                                  dask=cluster.scheduler_address, progress=msgs.append)
        assert f"on the Dask cluster at {cluster.scheduler_address}" in msgs[-1]
        assert index["shards"] == ref["shards"]
        # the cluster is not ours to stop: it still takes work
        with distributed.Client(cluster.scheduler_address) as c:
            assert c.submit(sum, [1, 2]).result() == 3


@needs_dask
def test_an_unreachable_scheduler_is_a_clear_error(relu_dir, shards, tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "_CONNECT_TIMEOUT_S", 2)
    with pytest.raises(enc.EncodeError, match="cannot reach the Dask scheduler at "
                       "tcp://127.0.0.1:9"):
        enc.encode_to_dir(relu_dir, shards[0], tmp_path / "out", dask="tcp://127.0.0.1:9",
                          progress=None)
    assert not (tmp_path / "out").exists()  # nothing was touched
