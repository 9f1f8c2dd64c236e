"""Nothing crashes, nothing is half-updated, nothing is lost: output
directories (no accidental overwrite, --overwrite removes only fastsae's
files, writability checked before the first step), resume (recorded backend
and threads, fixed run length, README's commands), verified checkpoints
(tensor hashes, missing keys and tensors, stale temporary files), bfloat16 /
float16 weights, and divergence messages."""

import hashlib
import json
import os
import re
import shlex
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

import fastsae
from fastsae import SparseAutoencoder, TrainConfig, Trainer
from fastsae.cli import main
from fastsae.io import SAEFormatError, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
USABLE = [s.name for s in fastsae.available_backends() if s.available]
D_IN, D_SAE = 8, 16
# the diverging runs overflow on purpose
pytestmark = pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    d = tmp_path_factory.mktemp("acts")
    x = np.abs(np.random.default_rng(0).normal(size=(2048, D_IN))).astype(np.float32)
    np.save(d / "x.npy", x)
    return d / "x.npy"


def _cfg(**kw):
    base = dict(steps=20, batch_size=64, lr=3e-3, l1_coefficient=0.1, log_every=5,
                dead_window=5, eval_rows=256, checkpoint_every=10)
    base.update(kw)
    return TrainConfig(**base)


def _run(out, acts, backend="numpy", **kw):
    """A finished Python-API run in ``out``."""
    sae = SparseAutoencoder(D_IN, D_SAE, seed=3, backend=backend)
    return Trainer(sae, str(acts), _cfg(**kw), out_dir=out).train()


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsae: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _header(path):
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), 8 + n


def _rewrite(path, edit_state=None, drop_tensors=(), drop_hashes=False, old_format=False):
    """Rewrite a checkpoint: edit its run state (a function of the dict),
    drop tensors (and, with ``drop_hashes``, their hash entries), or turn it
    into a ``fastsae-checkpoint-1`` file without hashes."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = Path(path)
    with safe_open(str(path), framework="np") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k not in drop_tensors}
    state = json.loads(meta["fastsae"])
    if edit_state is not None:
        edit_state(state)
    if old_format:
        state["format"] = "fastsae-checkpoint-1"
        state.pop("threads", None)
        state.pop("threads_used", None)
        meta.pop("fastsae_sha256", None)
    if drop_hashes and "fastsae_sha256" in meta:
        h = json.loads(meta["fastsae_sha256"])
        meta["fastsae_sha256"] = json.dumps({k: v for k, v in h.items()
                                             if k not in drop_tensors})
    meta["fastsae"] = json.dumps(state)
    save_file(tensors, str(path), metadata=meta)


def _delete(state, dotted):
    *outer, last = dotted.split(".")
    d = state
    for k in outer:
        d = d[k]
    del d[last]


def _unwritable_dir(tmp_path):
    """A directory that exists but where no file can be created, or None."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    for cand in ("/sys/kernel", "/sys", "/proc/sys"):  # root writes everywhere else
        p = Path(cand)
        if not p.is_dir():
            continue
        try:
            fd, name = tempfile.mkstemp(dir=p)
        except OSError:
            return p
        os.close(fd)
        os.unlink(name)
    return None


class _Steps:
    """Wraps ``fastsae.Backend.train_step`` (the public backend API every
    trainer step goes through) while active: records each step's loss, and
    can raise ``KeyboardInterrupt`` at call ``stop_at`` (a killed run) or
    replace the learning rate from call ``huge_lr_from`` on (a diverging run)."""

    def __init__(self, stop_at=None, huge_lr_from=None, huge_lr=1e39):
        self.stop_at, self.huge_lr_from, self.huge_lr = stop_at, huge_lr_from, huge_lr
        self.totals = []

    def __enter__(self):
        real = self.real = fastsae.Backend.train_step

        def step(be, *a, **k):
            n = len(self.totals) + 1
            if self.stop_at is not None and n == self.stop_at:
                raise KeyboardInterrupt  # killed mid-run
            if self.huge_lr_from is not None and n >= self.huge_lr_from:
                k["lr"] = self.huge_lr
            r = real(be, *a, **k)
            self.totals.append(r.total)
            return r
        fastsae.Backend.train_step = step
        return self

    def __exit__(self, *exc):
        fastsae.Backend.train_step = self.real


# ====================================================== 1. no accidental overwrite
RUN_FILE_NAMES = ["checkpoint.safetensors", "checkpoint.json", "metrics.jsonl",
                  "summary.json", "sae/cfg.json", "sae/sae_weights.safetensors", "total.png",
                  "feature_density.png"]


@pytest.mark.parametrize("name", RUN_FILE_NAMES)
def test_cli_refuses_an_out_dir_holding_a_run(acts, tmp_path, capsys, name):
    f = tmp_path / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"an earlier run")
    code, _, err = _cli(capsys, "train", "--data", acts, "--d-sae", D_SAE, "--steps", 3,
                        "--batch-size", 64, "--backend", "numpy", "--out", tmp_path)
    _one_line_error(code, err, str(tmp_path), "--resume", "--overwrite", name)
    assert f.read_bytes() == b"an earlier run"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == [name]


def test_cli_overwrite_replaces_only_fastsae_files(acts, tmp_path, capsys):
    argv = ["train", "--data", acts, "--d-sae", D_SAE, "--batch-size", 64, "--backend",
            "numpy", "--out", tmp_path, "--no-progress"]
    code, _, err = _cli(capsys, *argv, "--steps", 30, "--plot")
    assert code == 0, err
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sae" / "README.md").write_text("mine too")
    stale = tmp_path / ".checkpoint.safetensors.abcd1234.tmp"
    stale.write_bytes(b"interrupted")
    code, _, err = _cli(capsys, *argv, "--steps", 10)
    _one_line_error(code, err, "--overwrite")
    code, _, err = _cli(capsys, *argv, "--steps", 10, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "sae" / "README.md").read_text() == "mine too"
    assert not stale.exists()
    assert not (tmp_path / "total.png").exists()  # the first run's plots went with it
    logged = [json.loads(x)["step"] for x in
              (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10]  # only the new run's record (log_every 100 > 10 steps)
    _, st = Trainer.read_checkpoint(tmp_path)
    assert st["step"] == 10 and st["config"]["steps"] == 10


def test_empty_or_missing_out_dir_is_fine(acts, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    for out in (tmp_path / "empty", tmp_path / "new" / "nested", tmp_path / "other"):
        code, _, err = _cli(capsys, "train", "--data", acts, "--d-sae", D_SAE, "--steps", 3,
                            "--batch-size", 64, "--backend", "numpy", "--out", out)
        assert code == 0, (out, err)
        assert (out / "sae" / "cfg.json").exists()


def test_trainer_refuses_an_out_dir_holding_a_run_before_the_first_step(acts, tmp_path):
    _run(tmp_path, acts)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, seed=1, backend="numpy"), str(acts),
                _cfg(steps=5), out_dir=tmp_path)
    with _Steps() as spy, pytest.raises(FileExistsError,
                                        match=r"already holds a fastsae run.*overwrite=True"):
        t.train()
    assert spy.totals == []
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, seed=1, backend="numpy"), str(acts),
                _cfg(steps=5), out_dir=tmp_path, overwrite=True)
    t.train()
    assert Trainer.read_checkpoint(tmp_path)[1]["step"] == 5
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                   .splitlines())] == [5]


def test_unwritable_out_dir_fails_before_the_first_step(acts, tmp_path, capsys):
    ro = _unwritable_dir(tmp_path)
    if ro is None:
        pytest.skip("no unwritable directory on this machine")
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, backend="numpy"), str(acts),
                _cfg(steps=20, log_every=5, checkpoint_every=0), out_dir=ro)
    with _Steps() as spy, pytest.raises(OSError, match="not writable"):
        t.train()
    assert spy.totals == []  # not after log_every steps, at the first metrics write
    code, _, err = _cli(capsys, "train", "--data", acts, "--d-sae", D_SAE, "--steps", 20,
                        "--batch-size", 64, "--backend", "numpy", "--out", ro)
    _one_line_error(code, err, "not writable", str(ro))


# ====================================================== 2. resume continues the run
def _other_backend():
    default = fastsae.get_backend().name
    others = [n for n in USABLE if n != default and n != "cuda"]
    if not others:
        pytest.skip("one usable backend only")
    return default, others[-1]


def _cut_run(out, acts, backend, threads=None, stop_at=15):
    """A run interrupted after its checkpoint at step 10 (of 20)."""
    kw = {} if threads is None else {"threads": threads}
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, seed=3, backend=backend), str(acts), _cfg(),
                out_dir=out, **kw)
    with _Steps(stop_at=stop_at), pytest.raises(KeyboardInterrupt):
        t.train()
    return t


def test_resume_uses_the_recorded_backend_bit_exactly(acts, tmp_path):
    default, other = _other_backend()
    full = _run(tmp_path / "full", acts, backend=other)
    _cut_run(tmp_path / "cut", acts, other)
    t = Trainer.resume(tmp_path / "cut")  # no backend named: the run's own
    assert t.backend.name == other != default
    r = t.train()
    for n in fastsae.SAEParams.NAMES:
        np.testing.assert_array_equal(getattr(r.model, n), getattr(full.model, n), n)


def test_resume_on_another_backend_says_it_is_not_bit_exact(acts, tmp_path, capsys):
    default, other = _other_backend()
    _cut_run(tmp_path, acts, other)
    with pytest.warns(UserWarning, match=f"{default!r}.*{other!r}.*not bit-exact"):
        t = Trainer.resume(tmp_path, backend=default)
    assert t.backend.name == default
    code, out, err = _cli(capsys, "train", "--resume", tmp_path, "--backend", default,
                          "--json", "--no-progress")
    assert code == 0, err
    notes = [x for x in err.splitlines() if x.strip()]
    assert len(notes) == 1 and notes[0].startswith("fastsae: note: ") \
        and "not bit-exact" in notes[0], err
    assert json.loads(out[:out.rindex("}") + 1])["backend"] == default


def test_cli_resume_keeps_the_runs_backend(acts, tmp_path, capsys):
    _, other = _other_backend()
    _cut_run(tmp_path, acts, other)
    code, out, err = _cli(capsys, "train", "--resume", tmp_path, "--json", "--no-progress")
    assert code == 0, err
    assert "note" not in err
    assert json.loads(out[:out.rindex("}") + 1])["backend"] == other


def test_threads_are_recorded_and_reused(acts, tmp_path, monkeypatch):
    if "numba" not in USABLE:
        pytest.skip("needs numba")
    _cut_run(tmp_path, acts, "numba", threads=1)
    _, st = Trainer.read_checkpoint(tmp_path)
    assert st["threads"] == 1
    seen, real = [], fastsae.Backend.train_step

    def spy(self, *a, **k):
        seen.append(self.get_num_threads())
        return real(self, *a, **k)
    monkeypatch.setattr(fastsae.Backend, "train_step", spy)
    t = Trainer.resume(tmp_path)
    assert t.threads == 1
    t.train()
    assert seen and set(seen) == {1}


def test_old_checkpoint_without_threads_or_hashes_resumes(acts, tmp_path):
    """fastsae-checkpoint-1 files (no tensor hashes, no threads) still resume,
    without the hash check they cannot have."""
    full = _run(tmp_path / "full", acts)
    _cut_run(tmp_path / "cut", acts, "numpy")
    _rewrite(tmp_path / "cut" / "checkpoint.safetensors", old_format=True)
    t = Trainer.resume(tmp_path / "cut")
    assert t.threads is None and t.backend.name == "numpy"
    r = t.train()
    np.testing.assert_array_equal(r.model.W_enc, full.model.W_enc)


@pytest.mark.parametrize("recorded", ["tpu", "unusable"])
def test_unusable_recorded_backend_is_a_clear_error(acts, tmp_path, capsys, recorded):
    if recorded == "unusable":
        bad = [s.name for s in fastsae.available_backends() if not s.available]
        if not bad:
            pytest.skip("every backend is usable here")
        recorded = bad[0]
    _cut_run(tmp_path, acts, "numpy")
    _rewrite(tmp_path / "checkpoint.safetensors",
             edit_state=lambda st: st.update(backend=recorded))
    with pytest.raises(ValueError, match=f"backend {recorded!r}.*--backend"):
        Trainer.resume(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    _one_line_error(code, err, repr(recorded), "--backend")
    with pytest.warns(UserWarning, match="not bit-exact"):  # naming one works, with the note
        t = Trainer.resume(tmp_path, backend="numpy")
    assert t.backend.name == "numpy"


def _readme_training_commands():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Training"):]
    block = block[block.index("```bash") + 7:block.index("```", block.index("```bash") + 7)]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines()
            if line.startswith("fastsae train")]


def test_readme_resume_example_works_scaled_down(acts, tmp_path, capsys, monkeypatch):
    """README's training commands, in order, with the sizes scaled down (steps
    / 500, d_sae 16, acts.npy our data): every one, the resume included, runs."""
    monkeypatch.chdir(tmp_path)
    os.symlink(acts, tmp_path / "acts.npy")
    cmds = [c for c in _readme_training_commands() if "--data" in c or "--resume" in c]
    assert any("--resume" in c for c in cmds)
    for cmd in cmds:
        argv = cmd[1:]
        for i, a in enumerate(argv[:-1]):
            if a in ("--steps", "--checkpoint-every"):
                argv[i + 1] = str(max(4, int(argv[i + 1]) // 500))
            elif a == "--d-sae":
                argv[i + 1] = str(D_SAE)
        if "--resume" not in argv:
            argv += ["--batch-size", "64", "--backend", "numpy"]
        code, _, err = _cli(capsys, *argv, "--no-progress")
        assert code == 0, (cmd, err)


def test_resume_with_steps(acts, tmp_path, capsys):
    """A run's length is fixed when it starts: --steps may repeat it, a
    different value is refused saying what to do instead."""
    code, _, err = _cli(capsys, "train", "--data", acts, "--d-sae", D_SAE, "--steps", 20,
                        "--batch-size", 64, "--backend", "numpy", "--out", tmp_path,
                        "--checkpoint-every", 10, "--no-progress")
    assert code == 0, err
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--steps", 20, "--d-sae", D_SAE,
                        "--batch-size", 64, "--no-progress")
    assert code == 0, err
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--steps", 40)
    _one_line_error(code, err, "--steps 40", "the run has 20", "cannot change when resuming",
                    "resume without --steps")


def test_checkpoint_beyond_the_runs_steps_is_refused(acts, tmp_path, capsys):
    _cut_run(tmp_path, acts, "numpy")
    _rewrite(tmp_path / "checkpoint.safetensors", edit_state=lambda st: st.update(step=25))
    with pytest.raises(SAEFormatError, match=r"step 25.*0\.\.20"):
        Trainer.resume(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    _one_line_error(code, err, "step 25")


# ====================================================== 3. verified checkpoints
def test_checkpoint_stores_a_sha256_of_every_tensor(acts, tmp_path):
    _run(tmp_path, acts)
    header, start = _header(tmp_path / "checkpoint.safetensors")
    hashes = json.loads(header["__metadata__"]["fastsae_sha256"])
    blob = (tmp_path / "checkpoint.safetensors").read_bytes()
    names = [k for k in header if k != "__metadata__"]
    assert sorted(hashes) == sorted(names)
    for k in names:
        b, e = header[k]["data_offsets"]
        assert hashlib.sha256(blob[start + b:start + e]).hexdigest() == hashes[k], k


@pytest.mark.parametrize("tensor", ["param.W_enc", "adam_v.b_dec", "fire.cur"])
def test_a_flipped_byte_is_detected_naming_the_tensor(acts, tmp_path, capsys, tensor):
    _cut_run(tmp_path, acts, "numpy")
    p = tmp_path / "checkpoint.safetensors"
    header, start = _header(p)
    b, e = header[tensor]["data_offsets"]
    blob = bytearray(p.read_bytes())
    blob[start + (b + e) // 2] ^= 0x01
    p.write_bytes(bytes(blob))
    with pytest.raises(SAEFormatError, match=re.escape(repr(tensor))):
        Trainer.resume(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    _one_line_error(code, err, repr(tensor), "corrupt")


REQUIRED = ["kind", "step", "adam_step", "scale", "stream", "rng", "config", "model",
            "backend", "window", "model.d_in", "model.type", "stream.position",
            "stream.n_rows", "window.cur_steps", "rng.state"]


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_run_state_key_is_named(acts, tmp_path, capsys, key):
    _cut_run(tmp_path, acts, "numpy")
    _rewrite(tmp_path / "checkpoint.safetensors", edit_state=lambda st: _delete(st, key))
    with pytest.raises(SAEFormatError, match=re.escape(key.split(".")[-1])):
        Trainer.resume(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    line = _one_line_error(code, err, key.split(".")[-1])
    assert "KeyError" not in line


@pytest.mark.parametrize("old_format", [False, True])
@pytest.mark.parametrize("tensor", ["param.W_dec", "adam_m.b_enc", "fire.prev"])
def test_a_missing_tensor_is_named(acts, tmp_path, capsys, tensor, old_format):
    _cut_run(tmp_path, acts, "numpy")
    _rewrite(tmp_path / "checkpoint.safetensors", drop_tensors=(tensor,),
             drop_hashes=old_format, old_format=old_format)
    with pytest.raises(SAEFormatError, match=re.escape(repr(tensor))):
        Trainer.resume(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    _one_line_error(code, err, repr(tensor))


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    ours = [tmp_path / ".checkpoint.safetensors.ab_12xyz.tmp",
            tmp_path / ".checkpoint.safetensors.00000000.tmp"]
    kept = [tmp_path / ".summary.json.abcdefgh.tmp",  # another target's
            tmp_path / ".checkpoint.safetensors.tmp",  # not the pattern
            tmp_path / "checkpoint.safetensors.abcdefgh.tmp",
            tmp_path / "notes.tmp"]
    for p in ours + kept:
        p.write_bytes(b"x")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in kept)


def test_training_writes_clean_up_after_an_interrupted_write(acts, tmp_path):
    _cut_run(tmp_path, acts, "numpy")
    stale = [tmp_path / ".checkpoint.safetensors.k1ll3d_x.tmp",
             tmp_path / ".metrics.jsonl.k1ll3d_x.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    Trainer.resume(tmp_path).train()
    assert not any(p.exists() for p in stale)


# ====================================================== 4. bfloat16 / float16 weights
def _safetensors_bytes(tensors: dict) -> bytes:
    """A .safetensors file built by hand: ``tensors`` maps name -> (dtype
    code, shape, raw little-endian bytes)."""
    header, data, off = {}, b"", 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _bf16(a):
    """Float32 values exactly representable in bfloat16, and their BF16 bytes."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4") & np.uint32(0xFFFF0000)
    return bits.view("<f4"), (bits >> 16).astype("<u2").tobytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mixed"])
def test_half_precision_weights_load_exactly(tmp_path, dtype):
    rng = np.random.default_rng(5)
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN),
              "b_dec": (D_IN,)}
    want, tensors = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        a = rng.normal(size=shape).astype(np.float32)
        use = dtype if dtype != "mixed" else ("bfloat16", "float16")[i % 2]
        if use == "bfloat16":
            want[name], raw = _bf16(a)
            tensors[name] = ("BF16", shape, raw)
        else:
            h = a.astype("<f2")
            want[name] = h.astype(np.float32)
            tensors[name] = ("F16", shape, h.tobytes())
    (tmp_path / "sae_weights.safetensors").write_bytes(_safetensors_bytes(tensors))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
        "dtype": "float16" if dtype == "float16" else "bfloat16", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    sae = SparseAutoencoder.load(tmp_path)
    for name in shapes:
        got = getattr(sae, name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want[name], name)
    try:
        import torch
    except ImportError:
        return
    ref = {k: torch.from_numpy(v.copy()).to(torch.bfloat16 if dtype == "bfloat16"
                                             else torch.float16).float().numpy()
           for k, v in want.items()} if dtype != "mixed" else want
    for name in shapes:
        np.testing.assert_array_equal(getattr(sae, name), ref[name], name)


def test_bf16_special_values_and_layout(tmp_path):
    vals = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, 3.0e38, 1e-40], np.float32)
    want, raw = _bf16(vals)
    p = tmp_path / "t.safetensors"
    p.write_bytes(_safetensors_bytes({"a": ("BF16", (2, 4), raw),
                                      "b": ("F32", (3,), np.arange(3, dtype="<f4").tobytes())}))
    arrays, _ = fastsae.io.load_tensors(p)
    assert arrays["a"].dtype == np.float32 and arrays["a"].shape == (2, 4)
    np.testing.assert_array_equal(arrays["a"].ravel().view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(arrays["b"], [0, 1, 2])
    blob = bytearray(p.read_bytes())
    p.write_bytes(bytes(blob[:-4]))  # truncated data section
    with pytest.raises(SAEFormatError, match="cannot read"):
        fastsae.io.load_tensors(p)


# ====================================================== 6. divergence
@pytest.mark.parametrize("every, good", [(4, 8), (5, 5)])
def test_divergence_names_the_first_bad_step_and_the_last_good_checkpoint(acts, tmp_path,
                                                                          every, good):
    """The 10th update overflows the parameters: the run stops at the first
    sign of it (the loss of step 10, if the backend reports the overflowing
    update there, or of step 11; or the step-10 checkpoint, which must then
    not be written) and names that step and the last checkpoint, which holds
    only finite values."""
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, backend="numpy"), str(acts),
                _cfg(steps=100, checkpoint_every=every, lr_warmup_steps=0), out_dir=tmp_path)
    with _Steps(huge_lr_from=10) as spy, pytest.raises(FloatingPointError) as ei:
        t.train()
    msg, totals = str(ei.value), spy.totals
    named = int(re.search(r"(?:at|after) step (\d+)", msg).group(1))
    bad = [i + 1 for i, v in enumerate(totals) if not np.isfinite(v)]
    assert len(totals) == named and bad in ([], [named]), msg  # no step after the first bad
    assert named == 10 if every == 5 or bad == [10] else named == 11, msg
    ckpt = tmp_path / "checkpoint.safetensors"
    assert f"last good checkpoint is {ckpt} (step {good})" in msg
    tensors, st = Trainer.read_checkpoint(tmp_path)
    assert st["step"] == good
    assert all(np.isfinite(v).all() for v in tensors.values())


def test_non_finite_parameters_are_never_checkpointed(acts, tmp_path, capsys):
    """lr 1e39 overflows float32 in the very first update: the step-1 loss is
    finite, the parameters are not, so the step-1 checkpoint is refused."""
    t = Trainer(SparseAutoencoder(D_IN, D_SAE, backend="numpy"), str(acts),
                _cfg(steps=20, lr=1e39, lr_warmup_steps=0, checkpoint_every=1),
                out_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"step 1\b.*there is no checkpoint"):
        t.train()
    assert not (tmp_path / "checkpoint.safetensors").exists()
    code, _, err = _cli(capsys, "train", "--data", acts, "--d-sae", D_SAE, "--steps", 20,
                        "--batch-size", 64, "--lr", "1e39", "--backend", "numpy",
                        "--out", tmp_path / "cli", "--checkpoint-every", 1)
    _one_line_error(code, err, "diverged", "step 1", "no checkpoint")
    assert not (tmp_path / "cli" / "checkpoint.safetensors").exists()


def test_divergence_after_resume_elsewhere_names_the_resumed_checkpoint(acts, tmp_path):
    _cut_run(tmp_path / "a", acts, "numpy")
    t = Trainer.resume(tmp_path / "a", out_dir=tmp_path / "b")
    with _Steps(huge_lr_from=1), pytest.raises(FloatingPointError) as ei:
        t.train()
    assert f"{tmp_path / 'a' / 'checkpoint.safetensors'} (step 10)" in str(ei.value)
    without = Trainer(SparseAutoencoder(D_IN, D_SAE, backend="numpy"), str(acts),
                      _cfg(lr=1e39, lr_warmup_steps=0))
    with pytest.raises(FloatingPointError, match="there is no checkpoint"):
        without.train()


# ====================================================== resume into another directory
def test_resume_into_another_out_dir_copies_the_log_and_keeps_the_source(acts, tmp_path,
                                                                         capsys):
    full = _run(tmp_path / "full", acts)
    _cut_run(tmp_path / "a", acts, "numpy")
    source = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text("{}")  # b holds (part of) a run
    code, _, err = _cli(capsys, "train", "--resume", tmp_path / "a", "--out", tmp_path / "b")
    _one_line_error(code, err, "--overwrite")
    code, _, err = _cli(capsys, "train", "--resume", tmp_path / "a", "--out", tmp_path / "a",
                        "--overwrite")
    _one_line_error(code, err, "--overwrite")
    code, _, err = _cli(capsys, "train", "--resume", tmp_path / "a", "--out", tmp_path / "b",
                        "--overwrite", "--no-progress")
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()
            if p.is_file()} == source  # the resumed run is left as it was
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [r["step"] for r in full.history]  # 5, 10 copied; 15, 20 new
    np.testing.assert_array_equal(SparseAutoencoder.load(tmp_path / "b" / "sae").W_enc,
                                  full.model.W_enc)


def test_help_documents_the_rules():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(buf.getvalue().split())
    for phrase in ("--overwrite", "must not hold a run already", "bit-exact",
                   "may only repeat the run's values", "must be writable"):
        assert phrase in text, phrase


def test_what_a_run_raises_is_importable_from_the_top_level():
    """The errors and warning a user catches around a run are fastsae's own
    top-level names, the same classes the trainer raises."""
    from fastsae.io import SAEFormatError
    from fastsae.training import NotBitExactWarning, RunExistsError, TrainingDiverged

    assert fastsae.SAEFormatError is SAEFormatError and issubclass(SAEFormatError, ValueError)
    assert fastsae.TrainingDiverged is TrainingDiverged
    assert fastsae.RunExistsError is RunExistsError and issubclass(RunExistsError,
                                                                   FileExistsError)
    assert fastsae.NotBitExactWarning is NotBitExactWarning
    assert {"SAEFormatError", "TrainingDiverged", "RunExistsError",
            "NotBitExactWarning"} <= set(fastsae.__all__)
