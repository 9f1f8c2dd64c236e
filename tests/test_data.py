"""fastsae.data: sources, memory-mapped streaming, seeded shuffling, synthetic data."""

import tracemalloc

import numpy as np
import pytest

from fastsae import data as D


def _rows(n=100, d=6, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def _ids(n, d=3):
    """Rows whose first column is the row number (to track the order)."""
    x = np.zeros((n, d), np.float32)
    x[:, 0] = np.arange(n)
    return x


# ------------------------------------------------------------------ sources
def test_array_npy_and_shards_agree(tmp_path):
    x = _rows(103)
    np.save(tmp_path / "one.npy", x)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (lo, hi) in enumerate([(0, 40), (40, 41), (41, 41), (41, 103)]):
        np.save(shards / f"part{i:02d}.npy", x[lo:hi])
    for src in (D.open_source(x), D.open_source(tmp_path / "one.npy"),
                D.open_source(str(shards))):
        assert (src.n_rows, src.d_in) == (103, 6)
        np.testing.assert_array_equal(src.read(0, 103), x)
        np.testing.assert_array_equal(src.read(35, 60), x[35:60])
        idx = np.array([102, 0, 40, 39, 41, 40])
        np.testing.assert_array_equal(src.take(idx), x[idx])
        assert src.read(5, 9).dtype == np.float32
    assert isinstance(D.open_source(tmp_path / "one.npy")._a, np.memmap)


def test_float64_and_float16_files_are_converted(tmp_path):
    x = _rows(10, dtype=np.float64)
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_allclose(D.open_source(tmp_path / "a.npy").read(0, 10), x, rtol=1e-6)
    np.save(tmp_path / "h.npy", x.astype(np.float16))
    assert D.open_source(tmp_path / "h.npy").read(0, 3).dtype == np.float32


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.open_source(tmp_path / "missing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy shards"):
        D.open_source(tmp_path / "empty")
    np.save(tmp_path / "vec.npy", np.ones(5, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        D.open_source(tmp_path / "vec.npy")
    np.save(tmp_path / "int.npy", np.ones((5, 2), np.int32))
    with pytest.raises(ValueError, match="floating-point"):
        D.open_source(tmp_path / "int.npy")
    obj = np.empty((2, 2), dtype=object)
    obj[:] = [[1, 2], [3, 4]]
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read"):  # never unpickled
        D.open_source(tmp_path / "obj.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match="cannot read"):
        D.open_source(tmp_path / "junk.npy")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", _rows(4, 3))
    np.save(mixed / "b.npy", _rows(4, 5))
    with pytest.raises(ValueError, match="different d_in"):
        D.open_source(mixed)
    with pytest.raises(ValueError, match="no rows"):
        D.open_source(np.zeros((0, 4), np.float32))


# ------------------------------------------------------------------ streams
def test_each_epoch_is_a_permutation():
    n, bs = 96, 16
    s = D.BatchStream(_ids(n), bs, seed=3)
    seen = np.concatenate([s.next_batch()[:, 0] for _ in range(n // bs)])
    assert sorted(seen.tolist()) == list(range(n))
    assert not np.array_equal(seen, np.arange(n))
    seen2 = np.concatenate([s.next_batch()[:, 0] for _ in range(n // bs)])
    assert sorted(seen2.tolist()) == list(range(n)) and not np.array_equal(seen, seen2)


def test_block_shuffle_with_small_buffer_covers_every_row():
    n = 1000
    s = D.BatchStream(_ids(n), 64, seed=1, block_rows=32, buffer_rows=128)
    got = np.concatenate([s.next_batch()[:, 0] for _ in range(-(-n // 64))])[:n]
    assert sorted(got.tolist()) == list(range(n))


def test_seeded_and_resumable():
    x = _ids(77)

    def take(stream, k):
        return [stream.next_batch().copy() for _ in range(k)]
    a = take(D.BatchStream(x, 10, seed=5, block_rows=8, buffer_rows=24), 20)
    b = take(D.BatchStream(x, 10, seed=5, block_rows=8, buffer_rows=24), 20)
    c = take(D.BatchStream(x, 10, seed=6, block_rows=8, buffer_rows=24), 20)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    s = D.BatchStream(x, 10, seed=5, block_rows=8, buffer_rows=24)
    take(s, 13)
    state = s.state_dict()
    r = D.BatchStream(x, 10, seed=0)
    r.load_state_dict(state)
    rest = take(r, 7)
    assert all(np.array_equal(u, v) for u, v in zip(a[13:], rest))
    with pytest.raises(ValueError, match="not the same data"):
        D.BatchStream(_ids(78), 10).load_state_dict(state)


def test_unshuffled_stream_and_scale():
    x = _ids(10)
    s = D.BatchStream(x, 4, shuffle=False, scale=2.0)
    got = np.concatenate([s.next_batch()[:, 0] for _ in range(5)])
    np.testing.assert_array_equal(got, 2.0 * (np.arange(20) % 10))
    assert s.epoch == 2.0
    b = s.next_batch()
    assert b.dtype == np.float32 and b.flags.c_contiguous


def test_memmap_larger_than_a_batch_streams_without_loading(tmp_path):
    """A 32 MiB file streamed with a 2 MiB buffer: peak Python-tracked memory
    stays far below the file size, and the data are exactly the file's."""
    n, d = 65536, 128
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 8192):
        mm[lo:lo + 8192] = np.arange(lo, lo + 8192, dtype=np.float32)[:, None]
    mm.flush()
    del mm
    src = D.open_source(path)
    assert isinstance(src._a, np.memmap)
    tracemalloc.start()
    s = D.BatchStream(src, 512, seed=0, block_rows=256, buffer_rows=4096)
    rows = []
    for _ in range(20):
        b = s.next_batch()
        rows.append(b[:, 0].copy())
        assert np.all(b == b[:, :1])  # whole rows, not mixed
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # file is 32 MiB
    got = np.concatenate(rows)
    assert len(np.unique(got)) == got.size  # no row twice within the epoch
    assert D.sample_rows(src, 100).shape == (100, d)


# ---------------------------------------------------------------- statistics
def test_norm_scaling_factor():
    x = _rows(2000, 8) * 7 + 1
    s = D.norm_scaling_factor(x)
    np.testing.assert_allclose(np.mean(np.sum((s * x.astype(np.float64)) ** 2, 1)), 8, rtol=1e-5)
    with pytest.raises(ValueError, match="all zeros"):
        D.norm_scaling_factor(np.zeros((5, 3), np.float32))
    bad = _rows(10, 3)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        D.norm_scaling_factor(bad)


# ---------------------------------------------------------------- synthetic
def test_synthetic_ground_truth():
    ds = D.synthetic(n_rows=20000, d_in=16, n_features=64, l0=4, seed=1)
    assert ds.x.shape == (20000, 16) and ds.x.dtype == np.float32
    assert ds.dictionary.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(ds.dictionary, axis=1), 1, rtol=1e-5)
    c = ds.coefficients
    assert c.shape == (20000, 64) and (c.data >= 0.5).all() and (c.data <= 1.5).all()
    assert abs(c.nnz / 20000 - 4) < 0.1
    np.testing.assert_allclose(c @ ds.dictionary, ds.x, atol=1e-5)
    again = D.synthetic(n_rows=20000, d_in=16, n_features=64, l0=4, seed=1)
    np.testing.assert_array_equal(again.x, ds.x)
    with pytest.raises(ValueError):
        D.synthetic(n_rows=10, d_in=4, n_features=8, l0=0)


def test_recovery_metric():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(20, 8))
    learned = np.concatenate([3 * true[::-1], rng.normal(size=(5, 8))])  # permuted, scaled
    r = D.recovery(learned, true)
    assert r["recovered"] == 1.0 and r["mean_max_cosine"] > 0.999999
    r = D.recovery(-true, true)  # opposite directions are not recovered
    assert r["recovered"] == 0.0
    with pytest.raises(ValueError, match="d_in"):
        D.recovery(np.ones((3, 4)), np.ones((3, 5)))
