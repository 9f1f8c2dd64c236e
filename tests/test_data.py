"""fastsae.data: sources, memory-mapped streaming, seeded shuffling, synthetic data."""

import tracemalloc

import numpy as np
import pytest

from fastsae import data as D

from conftest import CountingRows


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


# ------------------------------------------- the stream against its first form
class _OracleStream:
    """The stream as first written, for comparison: for every buffer, read
    its blocks (``source.read`` per block, in the epoch's block order),
    concatenate them and permute the rows with ``default_rng([seed, epoch,
    buffer])``; unshuffled, read the buffer's rows in one piece. Batches
    are the epochs' rows one after the other, cut every ``batch_size`` rows
    from ``position`` on and multiplied by float32 ``scale``."""

    def __init__(self, source, batch_size, *, seed=0, shuffle=True, block_rows=256,
                 buffer_rows=None, scale=1.0, position=0):
        self.src = D.open_source(source)
        n = self.src.n_rows
        self.bs, self.seed, self.shuffle, self.scale = batch_size, seed, shuffle, scale
        self.br = max(1, min(block_rows, n))
        if buffer_rows is None:
            buffer_rows = 256 * 2**20 // (4 * self.src.d_in)
        self.bpb = max(1, max(buffer_rows, batch_size, self.br) // self.br)
        self.n_blocks = -(-n // self.br)
        self.position = position
        self._epochs = {}

    def epoch_rows(self, epoch):
        """Epoch ``epoch``'s rows in serving order, float32 ``[n_rows, d_in]``."""
        if epoch not in self._epochs:
            n, br = self.src.n_rows, self.br
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            else:
                order = np.arange(self.n_blocks)
            bufs = []
            for b, lo in enumerate(range(0, self.n_blocks, self.bpb)):
                blocks = order[lo:lo + self.bpb]
                if self.shuffle:
                    buf = np.concatenate([self.src.read(k * br, min((k + 1) * br, n))
                                          for k in blocks])
                    rng = np.random.default_rng([self.seed, epoch, b])
                    buf = buf[rng.permutation(buf.shape[0])]
                else:
                    buf = self.src.read(blocks[0] * br, min((blocks[-1] + 1) * br, n))
                bufs.append(buf)
            self._epochs = {epoch: np.concatenate(bufs)}
        return self._epochs[epoch]

    def next_batch(self):
        n, parts, need = self.src.n_rows, [], self.bs
        while need:
            epoch, r = divmod(self.position, n)
            part = self.epoch_rows(epoch)[r:r + need]
            parts.append(part)
            need -= part.shape[0]
            self.position += part.shape[0]
        out = np.concatenate(parts)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out


def _assert_same(stream, oracle, n_batches):
    for i in range(n_batches):
        got, want = stream.next_batch(), oracle.next_batch()
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == want.shape
        # bytes, not values: the same rows in the same order, bit for bit
        assert got.tobytes() == want.tobytes(), f"batch {i} (position {oracle.position})"
    assert stream.position == oracle.position


def _make_source(kind, x, tmp_path):
    """``x`` float32 ``[n, d]`` as a source of the given kind (for ``paired``,
    rows ``[x | 3x[:, :2] + 1]``: the stream's rows of the pair)."""
    n = x.shape[0]
    if kind == "array":  # gathered from the array itself
        return D.ArraySource(x)
    if kind == "array64":  # converted to float32 on reading: staged
        return D.ArraySource(x.astype(np.float64))
    if kind == "npy":
        np.save(tmp_path / "x.npy", x)
        return D.open_source(tmp_path / "x.npy")
    if kind == "shards":  # uneven, one empty, one of a single row
        d = tmp_path / "shards"
        d.mkdir()
        cuts = sorted({0, n, min(n, 1), n // 3, n // 3, (2 * n) // 3 + 1})
        cuts = [0] + [c for c in cuts if 0 < c < n] + [n]
        for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
            np.save(d / f"s{i:02d}.npy", x[lo:hi])
        np.save(d / "s99_empty.npy", np.zeros((0, x.shape[1]), np.float32))
        return D.open_source(d)
    if kind == "paired":
        np.save(tmp_path / "x.npy", x)
        return D.PairedSource(tmp_path / "x.npy", 3 * x[:, :2] + 1)
    raise AssertionError(kind)


# (n_rows, batch_size, block_rows, buffer_rows, shuffle, seed, scale)
_LAYOUTS = [
    (1, 1, 256, None, True, 0, 1.0),  # a single row
    (1, 3, 256, None, True, 4, 1.0),  # a single row, batches of 3
    (7, 10, 256, None, True, 1, 2.5),  # fewer rows than a batch
    (100, 16, 256, None, True, 2, 1.0),  # batch not dividing the rows, one block
    (103, 8, 10, None, True, 3, 1.0),  # block_rows not dividing the rows, one buffer
    (103, 7, 10, 30, True, 5, 0.75),  # several buffers, short last block and buffer
    (256, 32, 16, 64, True, 6, 1.0),  # several buffers, everything dividing
    (77, 50, 8, 24, True, 7, 1.0),  # a batch longer than a buffer (48 rows)
    (103, 7, 10, 30, False, 5, 1.0),  # unshuffled, several buffers
    (100, 16, 256, None, False, 0, 3.0),  # unshuffled, one buffer
    (50, 9, 1, 5, True, 8, 1.0),  # one-row blocks
]


@pytest.mark.parametrize("layout", _LAYOUTS, ids=[
    f"n{l[0]}-b{l[1]}-blk{l[2]}-buf{l[3]}-{'shuf' if l[4] else 'noshuf'}" for l in _LAYOUTS])
@pytest.mark.parametrize("kind", ["array", "array64", "npy", "shards", "paired"])
def test_stream_equals_read_concatenate_permute(kind, layout, tmp_path):
    n, bs, block, buf, shuffle, seed, scale = layout
    x = _rows(n, 5, seed=n)
    src = _make_source(kind, x, tmp_path)
    kw = dict(seed=seed, shuffle=shuffle, block_rows=block, buffer_rows=buf, scale=scale)
    stream = D.BatchStream(src, bs, **kw)
    n_batches = max(4, -(-4 * n // bs))  # four epochs and more
    _assert_same(stream, _OracleStream(src, bs, **kw), n_batches)


@pytest.mark.parametrize("kind", ["array", "npy", "shards", "paired"])
@pytest.mark.parametrize("layout", [(96, 16, 8, 32), (96, 16, 256, None), (103, 7, 10, 30)])
def test_resume_mid_epoch_and_at_boundaries(kind, layout, tmp_path):
    """A stream restored from ``state_dict`` (into a stream built with other
    settings, already used) continues as the first one would: mid-buffer,
    exactly at a buffer boundary and exactly at an epoch end."""
    n, bs, block, buf = layout
    src = _make_source(kind, _rows(n, 4, seed=1), tmp_path)
    kw = dict(seed=11, block_rows=block, buffer_rows=buf, scale=1.5)
    first = D.BatchStream(src, bs, **kw)
    bounds = first._epoch_layout(1)[2]
    for stop in (3 * bs, n, n + int(bounds[1]), 2 * n, 2 * n + 5):
        s = D.BatchStream(src, bs, **kw)
        while s.position < stop:  # consume up to ``stop`` rows, the last batch short
            if stop - s.position < bs:
                s.batch_size = stop - s.position
            s.next_batch()
        s.batch_size = bs
        assert s.position == stop
        state = s.state_dict()
        assert set(state) == {"position", "seed", "shuffle", "block_rows",
                              "blocks_per_buffer", "n_rows"}
        # the scale is not part of the state: the trainer passes it again; a
        # stream that has served other rows from its buffers forgets them
        again = D.BatchStream(src, bs, seed=0, block_rows=3, buffer_rows=bs, scale=1.5)
        for _ in range(-(-stop // bs)):
            again.next_batch()
        again.load_state_dict(state)
        oracle = _OracleStream(src, bs, position=stop, **kw)
        _assert_same(again, oracle, -(-2 * n // bs))
        _assert_same(s, _OracleStream(src, bs, position=stop, **kw), 3)  # and the original


def test_old_checkpoint_state_resumes():
    """A ``state_dict`` as the stream always wrote it resumes exactly."""
    x = _rows(103, 6, seed=4)
    state = {"position": 250, "seed": 9, "shuffle": True, "block_rows": 10,
             "blocks_per_buffer": 3, "n_rows": 103}
    s = D.BatchStream(x, 7)
    s.load_state_dict(state)
    oracle = _OracleStream(x, 7, seed=9, block_rows=10, buffer_rows=30, position=250)
    _assert_same(s, oracle, 40)
    assert s.state_dict() == dict(state, position=250 + 40 * 7)


class _CountingSource(D.DataSource):
    """A source that only implements ``_read`` (the generic path), counting
    the rows read."""

    def __init__(self, x):
        self._x, self.rows_read, self.reads = x, 0, 0
        self.n_rows, self.d_in = x.shape
        self.dtype = x.dtype

    def _read(self, start, stop):
        self.rows_read += stop - start
        self.reads += 1
        return self._x[start:stop]


class _CountingNpy(CountingRows, D.NpySource):
    pass


@pytest.mark.parametrize("counting", ["generic", "npy"])
def test_refill_of_a_source_in_one_buffer_reads_nothing(counting, tmp_path):
    n, bs = 300, 64
    x = _rows(n, 4, seed=2)
    if counting == "npy":
        np.save(tmp_path / "x.npy", x)
        src = _CountingNpy(tmp_path / "x.npy")
    else:
        src = _CountingSource(x)
    kw = dict(seed=3, block_rows=16)  # 19 blocks, one buffer
    s = D.BatchStream(src, bs, **kw)
    _assert_same(s, _OracleStream(x, bs, **kw), 20)  # four epochs and more
    assert src.rows_read == n  # the first fill only
    if counting == "generic":
        assert src.reads == 1  # all the blocks are adjacent: one read
    s.load_state_dict(s.state_dict())  # a resume reads it again, once
    _assert_same(s, _OracleStream(x, bs, position=s.position, **kw), 20)
    assert src.rows_read == 2 * n


def test_refills_of_several_buffers_read_each_row_once_per_epoch():
    n, bs = 1000, 64
    src = _CountingSource(_ids(n, 2))
    kw = dict(seed=1, block_rows=32, buffer_rows=128)
    s = D.BatchStream(src, bs, **kw)
    _assert_same(s, _OracleStream(_ids(n, 2), bs, **kw), n * 3 // bs)  # 3 epochs, 8 buffers
    epochs_begun = -(-s.position // n)
    assert src.rows_read <= epochs_begun * n
    assert src.reads <= epochs_begun * (n // 32 + 1)  # one read per block at most


def test_array_source_is_gathered_in_place():
    """An in-memory float32 array is not copied: peak traced memory stays
    far below its size over several epochs. A subclass that changes
    ``_read`` is read through it (not gathered from the array)."""
    n, d = 20000, 64  # 5 MiB
    x = _rows(n, d, seed=5)
    tracemalloc.start()
    s = D.BatchStream(x, 256, seed=2)
    for _ in range(3 * n // 256):
        s.next_batch()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * 2**20, peak  # the index vector and its permutation: 0.5 MiB

    class Doubled(D.ArraySource):
        def _read(self, start, stop):
            return 2 * self._a[start:stop]
    src = Doubled(x)
    _assert_same(D.BatchStream(src, 100, seed=2, block_rows=64, buffer_rows=5000),
                 _OracleStream(src, 100, seed=2, block_rows=64, buffer_rows=5000), 250)


def test_read_into_matches_read(tmp_path):
    x = _rows(103, 6)
    for kind in ("array", "array64", "npy", "shards", "paired"):
        sub = tmp_path / kind
        sub.mkdir()
        src = _make_source(kind, x, sub)
        for lo, hi in ((0, 103), (35, 60), (40, 41), (102, 103), (7, 7)):
            out = np.full((hi - lo, src.d_in), np.nan, np.float32)
            src.read_into(lo, hi, out)
            assert out.tobytes() == src.read(lo, hi).tobytes()
        with pytest.raises(IndexError):
            src.read_into(100, 104, np.empty((4, src.d_in), np.float32))
        with pytest.raises(ValueError, match="float32"):
            src.read_into(0, 4, np.empty((4, src.d_in), np.float64))
        with pytest.raises(ValueError, match="float32"):
            src.read_into(0, 4, np.empty((5, src.d_in), np.float32))


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
