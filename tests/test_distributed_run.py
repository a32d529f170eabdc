"""``univ correlate`` across 2 and 3 gloo ranks equals the single-process run; faults, SIGTERM and resume.

Ranks are forked from the test process with an initialized gloo group (see test_distributed.spawn); the run
detects the group as it would detect torchrun's. One test goes through the real ``torchrun`` launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import corpus_text, save_tiny_model
from test_distributed import join_ranks, spawn, start_ranks

from univ.errors import Interrupted
from univ.run.config import CorrelateConfig
from univ.run.distributed import DIST_DIR, MANIFEST


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dzoo")
    gpt2 = [save_tiny_model(root, "gpt2", seed=s) for s in (0, 1, 2)]
    llama = [save_tiny_model(root, "llama", seed=s) for s in (0, 1, 2)]
    data = root / "text.txt"
    data.write_text(corpus_text()[:40_000])
    return {"gpt2": gpt2, "llama": llama}, data


def config(zoo, arch, out, **kw) -> dict:
    models, data = zoo
    base = dict(models=tuple(str(m) for m in models[arch]), data=str(data), out=str(out), tokens=1200, ctx=32,
                batch_size=4, device="cpu", method="exact")  # the one-process runs compared with ranks: exact too
    base.update(kw)
    return base


def single(cfg: dict) -> Path:
    from univ.run.driver import run

    return run(CorrelateConfig(**cfg), progress=False, log=lambda *a: None)


def _rank_run(rank, world, cfg: dict, slow: float = 0.0, fault: tuple[int, int] | None = None):
    import univ.run.stream as stream
    from univ.run.distributed import run

    if fault and fault[0] == rank:  # this rank SIGKILLs itself right after its k-th file write (univ.run.files)
        import univ.run.files as files

        os.environ["UNIV_FAULT_AFTER_WRITE"] = str(files._writes + fault[1])  # forked: counts on from the parent

    if slow:  # a slower stream, so that a test can act mid-run; streaming-<rank> marks the first batch
        inner = stream.process_batch

        def process_batch(*a, **k):
            (Path(cfg["out"]).parent / f"streaming-{rank}").touch()
            time.sleep(slow)
            return inner(*a, **k)

        stream.process_batch = process_batch
    try:
        run(CorrelateConfig(**cfg), progress=False, log=lambda *a: None)
    except Interrupted as e:
        return {"interrupted": str(e)}
    return {"ok": True}


_cache: dict = {}


def reference(cfg: dict, tmp_path_factory) -> Path:
    key = json.dumps({k: v for k, v in cfg.items() if k != "out"}, sort_keys=True)
    if key not in _cache:
        _cache[key] = single({**cfg, "out": str(tmp_path_factory.mktemp("single") / "r")})
    return _cache[key]


def assert_same_outputs(got: Path, want: Path, atol: float = 1e-6) -> None:
    a, b = pd.read_parquet(got / "neurons.parquet"), pd.read_parquet(want / "neurons.parquet")
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if col.startswith(("argmax_", "model", "layer", "neuron", "site")):  # all-pairs: NaN where m is the row's model
            assert a[col].equals(b[col]), col
        else:
            x, y = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
            assert (np.isnan(x) == np.isnan(y)).all(), col
            assert np.nanmax(np.abs(x - y), initial=0.0) <= atol, (col, np.nanmax(np.abs(x - y)))
    assert (got / "activation_stats.parquet").exists() == (want / "activation_stats.parquet").exists()
    if (want / "activation_stats.parquet").exists():  # merged from the ranks' token shards
        s1, s2 = pd.read_parquet(got / "activation_stats.parquet"), pd.read_parquet(want / "activation_stats.parquet")
        assert list(s1.columns) == list(s2.columns) and len(s1) == len(s2)
        for col in s1.columns:
            if s1[col].dtype.kind == "f":
                np.testing.assert_allclose(s1[col].to_numpy(), s2[col].to_numpy(), rtol=1e-9, atol=1e-9,
                                           err_msg=col)
            else:
                assert s1[col].equals(s2[col]), col
    h1, h2 = pd.read_parquet(got / "histograms.parquet"), pd.read_parquet(want / "histograms.parquet")
    assert h1.equals(h2)  # the same counts in every bin
    assert (got / "layer_similarity.parquet").exists() == (want / "layer_similarity.parquet").exists()
    if (want / "layer_similarity.parquet").exists():  # the CKA of every layer pair, whichever rank held its block
        k1, k2 = pd.read_parquet(got / "layer_similarity.parquet"), pd.read_parquet(want / "layer_similarity.parquet")
        assert len(k1) == len(k2) and not k1["cka"].isna().any()
        np.testing.assert_allclose(k1["cka"].to_numpy(), k2["cka"].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("arch, world, kw", [
    ("gpt2", 2, dict(token_shards=1)),                      # block sharding: each rank one pair
    ("gpt2", 3, dict(token_shards=3)),                      # token sharding: Chan merges at the end
    ("llama", 3, dict(token_shards=1, mode="all-pairs")),   # all-pairs: column maxima reduced across ranks
    ("llama", 2, dict(token_shards=2, mode="all-pairs", baseline="orthogonal")),
])
def test_distributed_equals_single_process(zoo, tmp_path, tmp_path_factory, arch, world, kw):
    cfg = config(zoo, arch, tmp_path / "d", **kw)
    spawn(_rank_run, world, tmp_path, cfg)
    single_kw = {k: v for k, v in cfg.items() if k != "token_shards"}
    assert_same_outputs(tmp_path / "d", reference(single_kw, tmp_path_factory))
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["distributed"]["world"] == world and info["distributed"]["token_shards"] == kw["token_shards"]
    ranks = info["memory"]["per_rank"]
    assert len(ranks) == world and all(r["planned_peak_bytes"] > 0 and r["measured_peak_bytes"] > 0 for r in ranks)
    assert info["memory"]["measured_peak_bytes"] == max(r["measured_peak_bytes"] for r in ranks)
    assert not (tmp_path / "d" / DIST_DIR).exists()  # checkpoints removed once the outputs are written


@pytest.mark.parametrize("world, kw", [
    (2, dict(token_shards=2)),                                    # one group, the stats split over two shards
    (3, dict(token_shards=1, mode="all-pairs")),                   # each model's stats from the group forwarding it
    (2, dict(token_shards=1, memory_budget_gb=70e-6)),             # blocks over two passes on each rank
])
def test_activation_stats_at_every_world_size_and_shard_count(zoo, tmp_path, tmp_path_factory, world, kw):
    cfg = config(zoo, "gpt2", tmp_path / "d", activation_stats=True, **kw)
    spawn(_rank_run, world, tmp_path, cfg)
    single_kw = {k: v for k, v in cfg.items() if k not in ("token_shards", "memory_budget_gb")}
    want = reference(single_kw, tmp_path_factory)
    assert (want / "activation_stats.parquet").exists()
    assert_same_outputs(tmp_path / "d", want)


def test_blocks_spread_over_passes_on_each_rank(zoo, tmp_path, tmp_path_factory):
    # 4 one-layer units of 64 × 128 fp32 = 32 kB each, W 2 × 16 kB: 2 ranks × ~2 units fit only in 2 passes
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1, memory_budget_gb=70e-6)
    spawn(_rank_run, 2, tmp_path, cfg)
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["distributed"]["n_passes"] == 2
    single_kw = {k: v for k, v in cfg.items() if k not in ("token_shards", "memory_budget_gb")}
    assert_same_outputs(tmp_path / "d", reference(single_kw, tmp_path_factory))


def test_one_layer_block_too_big_for_a_rank_is_a_clear_error(zoo, tmp_path):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1, memory_budget_gb=1e-6)
    with pytest.raises(AssertionError, match="even the smallest block does not fit on rank"):
        spawn(_rank_run, 2, tmp_path, cfg)


def wait_for_generation(out: Path, at_least: int, procs, timeout: float = 60) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            gen = json.loads((out / DIST_DIR / MANIFEST).read_text())["generation"]
            if gen >= at_least:
                return gen
        except (OSError, ValueError, KeyError):
            pass
        if not all(p.is_alive() for p in procs):
            raise AssertionError("a rank ended before the checkpoint appeared")
        time.sleep(0.05)
    raise AssertionError("no checkpoint generation appeared")


@pytest.mark.parametrize("token_shards", [1, 2])
def test_killed_rank_ends_every_rank_then_resume_equals_uninterrupted(zoo, tmp_path, token_shards):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=token_shards, checkpoint_every=200)
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    os.environ["UNIV_DIST_TIMEOUT"] = "20"  # inherited by the forked ranks
    try:
        procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.15)
        wait_for_generation(tmp_path / "d", 2, procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        waited = join_ranks(procs, timeout=40)
    finally:
        del os.environ["UNIV_DIST_TIMEOUT"]
    assert procs[0].exitcode not in (0, None) and procs[1].exitcode == -signal.SIGKILL
    assert waited < 30
    assert not (tmp_path / "d" / "neurons.parquet").exists()
    _resume(cfg, tmp_path)
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


@pytest.mark.parametrize("fault", [(1, 3), (0, 4)])  # rank 1 after its 3rd unit; rank 0 after the 2nd manifest
def test_a_generation_counts_only_when_every_rank_wrote_it(zoo, tmp_path, fault):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=2, checkpoint_every=200)
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.0, fault)
    join_ranks(procs, timeout=60)
    assert procs[fault[0]].exitcode == -signal.SIGKILL and procs[1 - fault[0]].exitcode not in (0, None)
    assert json.loads((tmp_path / "d" / DIST_DIR / MANIFEST).read_text())["generation"] == 2
    _resume(cfg, tmp_path)
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


def _rank_resume_corrupt(rank, world, cfg: dict):
    from univ.run.distributed import run

    try:
        run(CorrelateConfig(**cfg), resume=True, progress=False, log=lambda *a: None)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ok": True}


def test_a_corrupt_rank_unit_is_refused_on_every_rank(zoo, tmp_path):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1)
    procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.15)
    wait_streaming(tmp_path / "d", 2, procs)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    join_ranks(procs, timeout=40)
    assert_corrupt_unit_refused(cfg, tmp_path)


def assert_corrupt_unit_refused(cfg: dict, tmp_path: Path) -> None:
    """One flipped bit in the last tensor's bytes of rank 1's unit: every rank's resume refuses, naming it."""
    unit = next((Path(cfg["out"]) / DIST_DIR).glob("gen-*/rank-1.safetensors"))
    data = bytearray(unit.read_bytes())
    data[-5] ^= 0x40
    unit.write_bytes(bytes(data))
    results = spawn(_rank_resume_corrupt, 2, tmp_path, cfg)
    assert all(r.get("error", "").startswith("Refused: checkpoint unusable") for r in results), results
    assert all("rank-1.safetensors" in r["error"] for r in results)


def _rank_resume(rank, world, cfg: dict):
    from univ.run.distributed import run

    lines: list[str] = []
    run(CorrelateConfig(**cfg), resume=True, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    return lines


def _resume(cfg: dict, tmp_path: Path) -> None:
    logs = spawn(_rank_resume, 2, tmp_path, cfg)
    assert any(line.startswith("resuming generation") for line in logs[0]), logs[0]  # not a fresh start


def wait_streaming(out: Path, world: int, procs, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not all((out.parent / f"streaming-{r}").exists() for r in range(world)):
        assert time.monotonic() - t0 < timeout and all(p.is_alive() for p in procs), "the ranks never streamed"
        time.sleep(0.05)


def test_sigterm_on_every_rank_writes_a_checkpoint_and_resume_finishes(zoo, tmp_path):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=2)  # no --checkpoint-every: SIGTERM alone writes one
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    procs, tmp = start_ranks(_rank_run, 2, tmp_path, cfg, 0.15)
    wait_streaming(tmp_path / "d", 2, procs)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    join_ranks(procs, timeout=40)
    import torch

    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("interrupted" in r for r in results), results
    assert json.loads((tmp_path / "d" / DIST_DIR / MANIFEST).read_text())["generation"] == 1
    _resume(cfg, tmp_path)
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


@pytest.mark.skipif(os.environ.get("UNIV_SKIP_TORCHRUN") == "1", reason="UNIV_SKIP_TORCHRUN=1")
def test_torchrun_cli(zoo, tmp_path, tmp_path_factory):
    """The real launcher: torchrun --nproc-per-node 2 -m univ correlate ... (a subprocess, with a timeout)."""
    cfg = config(zoo, "gpt2", tmp_path / "t")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "univ", "correlate",
           *cfg["models"], "--data", cfg["data"], "--out", cfg["out"], "--tokens", str(cfg["tokens"]),
           "--ctx", "32", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "UNIV_DIST_TIMEOUT": "60"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed plan: 2 ranks" in done.stdout
    assert_same_outputs(tmp_path / "t", reference({k: v for k, v in cfg.items()}, tmp_path_factory))
