"""What survives what: crashes after every write, signals, corrupt checkpoints, changed inputs, a second writer.

A tiny two-pass run (two GPT-2 seeds, 200 tokens, one layer per pass, a checkpoint every 100 tokens) is the
subject; every resumed or retried run must give tables identical to the uninterrupted one, or be refused.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import corpus_text, save_tiny_model, tiny_seeds_and_text

from univ import errors
from univ.correlate import CorrelateConfig, run
from univ.run import files, folder
from univ.run import stream as stream_mod
from univ_kernels import io

TABLES = ("neurons.parquet", "neurons.csv", "histograms.parquet")
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runstate")
    models, data = tiny_seeds_and_text(root, (0, 1), 20_000)
    straight = run(cfg(models, data, root / "straight"), **QUIET)
    return models, data, {name: (straight / name).read_bytes() for name in TABLES}


def cfg(models, data, out, **kw):
    base = dict(tokens=200, ctx=32, batch_size=4, device="cpu", memory_budget_gb=40e-6, checkpoint_every=100,
                method="exact")
    base.update(kw)
    return CorrelateConfig(models=tuple(str(m) for m in models), data=str(data), out=str(out), **base)


def assert_same_tables(out: Path, expected: dict) -> None:
    for name, content in expected.items():
        assert (out / name).read_bytes() == content, f"{name} differs from the uninterrupted run"


class Crash(BaseException):
    """Stands in for SIGKILL inside the test process: nothing of the run's own code catches it."""


def _crash():
    raise Crash


def crashed_run(monkeypatch, c, k):
    """Run ``c`` and die right after its k-th write; True if it died (False: the run has fewer writes)."""
    monkeypatch.setattr(files, "_writes", 0)
    monkeypatch.setattr(files, "_die", _crash)
    monkeypatch.setenv("UNIV_FAULT_AFTER_WRITE", str(k))
    try:
        run(c, **QUIET)
    except Crash:
        return True
    finally:
        monkeypatch.delenv("UNIV_FAULT_AFTER_WRITE")
    return False


def test_a_crash_after_any_write_then_resume_gives_the_same_tables(setup, tmp_path, monkeypatch):
    models, data, expected = setup
    log = tmp_path / "writes.log"
    monkeypatch.setenv("UNIV_WRITE_LOG", str(log))
    run(cfg(models, data, tmp_path / "count"), **QUIET)
    monkeypatch.delenv("UNIV_WRITE_LOG")
    writes = [Path(p).name for p in log.read_text().split()]
    # checkpoints mid-pass, at each pass's end and start, the pass states, every output, run.json last
    assert writes.count("checkpoint.safetensors") >= 5 and writes[-1] == "run.json"
    assert {"pass-0.safetensors", "pass-1.safetensors", *TABLES} <= set(writes)
    for k in range(1, len(writes) + 1):
        c = cfg(models, data, tmp_path / f"k{k}")
        assert crashed_run(monkeypatch, c, k), f"the run made fewer than {k} writes"
        assert not list(Path(c.out).glob(".*.tmp"))
        try:
            run(c, resume=True, **QUIET)
        except errors.Refused as e:  # only a run that had finished (run.json written) may say so
            assert writes[k - 1] == "run.json" and "already finished" in str(e), (k, e)
        assert_same_tables(Path(c.out), expected)
        assert not (Path(c.out) / "checkpoint.safetensors").exists()
        shutil.rmtree(c.out)


def test_sigkill_after_a_checkpoint_then_resume_from_the_cli(setup, tmp_path):
    """The real thing once: the env var makes the process SIGKILL itself after its 2nd write."""
    from univ.cli import main

    models, data, expected = setup
    argv = ["correlate", *map(str, models), "--data", str(data), "--out", str(tmp_path / "r"), "--tokens", "200",
            "--ctx", "32", "--batch-size", "4", "--device", "cpu", "--memory-budget", "40e-6", "--method", "exact",
            "--checkpoint-every", "100"]
    env = {**os.environ, "UNIV_FAULT_AFTER_WRITE": "2", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "univ", *argv], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    lock = json.loads((tmp_path / "r" / folder.LOCK).read_text())
    assert lock["pid"] != os.getpid()  # the dead writer's lock file is still there ...
    assert main([*argv, "--resume"]) == 0  # ... and is taken over
    assert_same_tables(tmp_path / "r", expected)


@pytest.mark.parametrize("every", [100, None])
def test_sigterm_writes_a_checkpoint_and_exits_75_then_resume_matches(setup, tmp_path, monkeypatch, every):
    from univ.cli import main

    models, data, expected = setup
    real, calls = stream_mod.process_batch, {"n": 0}

    def terminated(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of the second pass
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(stream_mod, "process_batch", terminated)
    argv = ["correlate", *map(str, models), "--data", str(data), "--out", str(tmp_path / "r"), "--tokens", "200",
            "--ctx", "32", "--batch-size", "4", "--device", "cpu", "--memory-budget", "40e-6", "--method", "exact"]
    argv += ["--checkpoint-every", str(every)] if every else []
    assert main(argv) == errors.EXIT_INTERRUPTED
    assert (tmp_path / "r" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(stream_mod, "process_batch", real)
    assert main([*argv, "--resume"]) == 0
    assert_same_tables(tmp_path / "r", expected)


@pytest.fixture
def unfinished(setup, tmp_path, monkeypatch):
    """A run directory killed after its 2nd checkpoint (mid second pass is later; this is pass 1's end)."""
    models, data, _ = setup
    c = cfg(models, data, tmp_path / "r")
    assert crashed_run(monkeypatch, c, 2)
    return c


def _rewrite(path: Path, edit_tensors=None, edit_meta=None):
    """Rewrite a checkpoint with valid checksums and digest after editing it (a 'plausible' foreign file)."""
    tensors, meta = io.read_tensors(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    io.write_tensors(path, tensors, meta)


def test_corrupt_checkpoints_are_refused_naming_file_and_tensor(setup, unfinished, tmp_path):
    _, _, expected = setup
    ckpt = Path(unfinished.out) / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    _, table = io.read_meta(ckpt)
    block = next(n for n in table if n.startswith("block."))
    begin = 8 + int.from_bytes(good[:8], "little") + table[block]["data_offsets"][0]

    def refused(match):
        with pytest.raises(errors.Refused, match=match):
            run(unfinished, resume=True, **QUIET)
        ckpt.write_bytes(good)

    flipped = bytearray(good)
    flipped[begin + 5] ^= 0x10
    ckpt.write_bytes(bytes(flipped))
    refused(rf"tensor '{block}' of .*checkpoint.safetensors: checksum mismatch")
    ckpt.write_bytes(good[: len(good) - 100])
    refused(r"checkpoint.safetensors: truncated")
    key = b'\\"tokens_done\\":'  # inside the header, the metadata is a JSON string in JSON
    at = good.index(key) + len(key)
    edited = bytearray(good)
    edited[at] = ord("0") + (good[at] - ord("0") + 1) % 10  # an edited counter, same length, digest not redone
    ckpt.write_bytes(bytes(edited))
    refused(r"checkpoint.safetensors: header digest mismatch")
    _rewrite(ckpt, edit_tensors=lambda t: t.__setitem__(block, t[block][:1].clone()))
    refused(rf"tensor '{block}' .* is F32 \(1, 128\), this run expects F32 \(64, 128\)")
    _rewrite(ckpt, edit_meta=lambda m: m["counters"].__setitem__("tokens_done", m["counters"]["tokens_done"] + 7))
    refused(r"inconsistent counters \(tokens_done")
    run(unfinished, resume=True, **QUIET)  # the intact checkpoint still resumes to the same tables
    assert_same_tables(Path(unfinished.out), expected)


def test_same_path_new_weights_or_new_data_refused_equivalent_spelling_accepted(setup, unfinished, tmp_path,
                                                                               monkeypatch):
    models, data, expected = setup
    # new data at the same path
    saved_data = data.read_bytes()
    data.write_bytes(saved_data.replace(b"the", b"teh", 3))
    try:
        with pytest.raises(errors.Refused, match=r"data: file .*text.txt changed"):
            run(unfinished, resume=True, **QUIET)
    finally:
        data.write_bytes(saved_data)
    # new weights at the same path
    other = save_tiny_model(tmp_path, "gpt2", seed=7)
    moved = tmp_path / "moved-seed1"
    shutil.copytree(models[1], moved)
    weights = next(p.name for p in Path(models[1]).iterdir() if p.suffix == ".safetensors")
    try:
        shutil.copy(other / weights, Path(models[1]) / weights)
        with pytest.raises(errors.Refused, match=rf"model 1 \(.*gpt2-seed1\): file {weights} changed"):
            run(unfinished, resume=True, **QUIET)
    finally:
        shutil.copy(moved / weights, Path(models[1]) / weights)
    # the same files spelled another way: relative, with a trailing slash
    monkeypatch.chdir(Path(models[1]).parent)
    spelled = cfg([models[0], f"./{Path(models[1]).name}/"], data, unfinished.out)
    run(spelled, resume=True, **QUIET)
    assert_same_tables(Path(unfinished.out), expected)


def test_second_writer_refused_stale_lock_taken_over(setup, tmp_path):
    models, data, expected = setup
    out = tmp_path / "r"
    out.mkdir()
    with folder.OutLock(out, log=lambda *_: None):
        with pytest.raises(errors.Refused, match=rf"{out} is in use by another univ process \(pid {os.getpid()}"):
            run(cfg(models, data, out), **QUIET)
    (out / folder.LOCK).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then"}))
    logs = []
    run(cfg(models, data, out), progress=False, log=logs.append)
    assert any("took over the lock" in line and "pid 999999 on elsewhere" in line for line in logs)
    assert (out / folder.LOCK).read_text() == ""  # released cleanly
    assert_same_tables(out, expected)


def test_finished_run_refused_overwrite_removes_later_stages(setup, tmp_path):
    models, data, expected = setup
    out = tmp_path / "r"
    run(cfg(models, data, out, checkpoint_every=None), **QUIET)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    with pytest.raises(errors.Refused, match=rf"holds a finished run \(run.json, run id {run_id}\).*--overwrite"):
        run(cfg(models, data, out), **QUIET)
    with pytest.raises(errors.Refused, match="already finished"):
        run(cfg(models, data, out), resume=True, **QUIET)
    for name in ("profiles.parquet", "roles.csv", "universal.parquet", "report.html"):
        (out / name).write_text("x")
    (out / "figures").mkdir()
    (out / "notes.txt").write_text("mine")
    logs = []
    run(cfg(models, data, out), overwrite=True, progress=False, log=logs.append)
    assert not any((out / n).exists() for n in ("profiles.parquet", "roles.csv", "universal.parquet",
                                                "report.html", "figures"))
    assert (out / "notes.txt").exists() and "removed" in logs[0]
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id
    assert_same_tables(out, expected)


def test_disk_full_keeps_the_last_checkpoint_and_says_how_much_is_needed(setup, tmp_path, monkeypatch):
    models, data, expected = setup
    c = cfg(models, data, tmp_path / "r")
    real, calls = shutil.disk_usage, {"n": 0}

    def filling(path):
        calls["n"] += 1
        usage = real(path)
        return usage._replace(free=10_000) if calls["n"] >= 3 else usage  # the 3rd write finds the disk full

    monkeypatch.setattr(io.shutil, "disk_usage", filling)
    with pytest.raises(errors.UserError, match=r"^no space left to write .*\.safetensors: it needs "
                                               r"\d+\.\d+ kB, 10.00 kB free; the last checkpoint .* is intact"):
        run(c, **QUIET)
    monkeypatch.setattr(io.shutil, "disk_usage", real)
    assert not list(Path(c.out).glob(".*.tmp"))
    run(c, resume=True, **QUIET)
    assert_same_tables(Path(c.out), expected)


def test_data_ran_out_is_recorded(setup, tmp_path):
    models, data, _ = setup
    small = tmp_path / "small.txt"
    small.write_text(corpus_text()[:3000])
    logs = []
    out = run(cfg(models, small, tmp_path / "r", tokens=100_000, memory_budget_gb=None), progress=False,
              log=logs.append)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["data_exhausted"] and manifest["tokens_requested"] == 100_000
    assert 0 < manifest["tokens"] < 100_000
    assert any(f"used {manifest['tokens']:,} of the 100,000 tokens" in line for line in logs)


def test_bad_inputs_fail_before_models_load(setup, tmp_path, monkeypatch):
    import univ.run.driver as driver

    models, data, _ = setup
    monkeypatch.setattr(driver, "load_models", lambda *a: pytest.fail("models loaded before the inputs were checked"))
    with pytest.raises(errors.UserError, match="no such file"):
        run(cfg(models, tmp_path / "missing.txt", tmp_path / "r"), **QUIET)
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.UserError, match="is not a directory"):
        run(cfg(models, data, tmp_path / "file"), **QUIET)
    with pytest.raises(errors.UserError, match="pass one of them"):
        run(cfg(models, data, tmp_path / "r"), resume=True, overwrite=True, **QUIET)
