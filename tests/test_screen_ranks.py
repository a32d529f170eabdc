"""--method screen under torchrun: the ranks split the neurons, and the answer is the exhaustive one.

Ranks are forked from the test process with an initialized gloo group (test_distributed.spawn), as the exact
engine's tests do; each compares with a one-process exact run of the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from test_distributed import join_ranks, spawn, start_ranks
from test_distributed_run import (
    _rank_resume_corrupt,
    _rank_run,
    assert_corrupt_unit_refused,
    assert_same_outputs,
    config,
    reference,
    zoo,
)

from univ.errors import Refused
from univ.run.config import CorrelateConfig
from univ.run.distributed import DIST_DIR, MANIFEST

__all__ = ["zoo"]  # the fixture, shared with the exact engine's tests

SCREEN = dict(method="screen", screen_tokens=300, tokens=1500)


def _screen_cfg(zoo, arch, out, **kw) -> dict:
    return config(zoo, arch, out, **{**SCREEN, **kw})


def _exact_of(cfg: dict) -> dict:
    return {**{k: v for k, v in cfg.items() if k not in ("screen_tokens", "checkpoint_every")}, "method": "exact"}


def assert_screen_answer(got: Path, cfg: dict, tmp_path_factory) -> None:
    """neurons.parquet: the exhaustive method's; the histograms, CKA and statistics: the one-process screen's
    (the histogram and CKA come from the sample)."""
    import shutil

    exact = reference(_exact_of(cfg), tmp_path_factory)
    screen = reference({**cfg, "checkpoint_every": None}, tmp_path_factory)
    mixed = tmp_path_factory.mktemp("mixed")
    for f in screen.iterdir():
        if f.is_file():
            shutil.copy(f, mixed / f.name)
    shutil.copy(exact / "neurons.parquet", mixed / "neurons.parquet")
    assert_same_outputs(got, mixed, atol=1e-5)


def _manifest(out: Path) -> dict:
    return json.loads((out / DIST_DIR / MANIFEST).read_text())


@pytest.mark.parametrize("arch, world, kw", [
    ("gpt2", 2, dict()),                                            # reference mode, the gaussian baseline
    ("llama", 3, dict(mode="all-pairs", baseline="orthogonal")),    # column maxima reduced across the ranks
    ("gpt2", 2, dict(baseline="none", activation_stats=True)),      # statistics gathered by rank 0
    ("gpt2", 3, dict(n_models=2, baseline_draws=3)),                # more ranks than units and row layers
])
def test_screen_on_ranks_equals_exact_in_one_process(zoo, tmp_path, tmp_path_factory, arch, world, kw):
    kw = dict(kw)
    n_models = kw.pop("n_models", 3)
    cfg = _screen_cfg(zoo, arch, tmp_path / "d", **kw)
    cfg["models"] = cfg["models"][:n_models]
    spawn(_rank_run, world, tmp_path, cfg)
    assert_screen_answer(tmp_path / "d", cfg, tmp_path_factory)
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["method"] == "screen" and info["distributed"]["world"] == world
    ranks = info["distributed"]["ranks"]
    layers = {k: sum(r["row_layers"][k] for r in ranks) for k in ranks[0]["row_layers"]}
    n_layers = json.loads((Path(cfg["models"][0]) / "config.json").read_text())["num_hidden_layers" if arch == "llama"
                                                                                else "n_layer"]
    assert all(v == n_layers for v in layers.values()), layers  # every row layer of every direction: one owner
    busy = [sum(r["row_layers"].values()) > 0 for r in ranks]
    assert all(busy) or sum(layers.values()) < world  # every rank verified some rows, where there are enough
    rep = info["screen"]
    assert rep["screen_tokens"] >= 300 and 0 <= rep["certified_first_round"] <= 1
    assert rep["flops"]["total"] > 0 and rep["verify_passes"] >= 1
    assert not (tmp_path / "d" / DIST_DIR).exists()


def test_screen_on_ranks_with_the_fallback_round(zoo, tmp_path, tmp_path_factory, monkeypatch):
    """A window shut tight: most rows go to the second round, which the ranks run in lockstep; the merges go
    through collectives of a few elements at a time."""
    import univ.run.certify as certify
    import univ.run.screen_ranks as screen_ranks

    monkeypatch.setattr(certify, "PROVISIONAL_Z", 0.0)  # inherited by the forked ranks
    monkeypatch.setattr(screen_ranks, "REDUCE_CHUNK", 7)  # the merges' collectives in many uneven chunks
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d", mode="all-pairs")
    spawn(_rank_run, 2, tmp_path, cfg)
    assert_screen_answer(tmp_path / "d", cfg, tmp_path_factory)
    rep = json.loads((tmp_path / "d" / "run.json").read_text())["screen"]
    assert rep["rounds"] == 2 and rep["fallback_rows"] > 0


def test_auto_picks_screen_when_the_ranks_need_passes(zoo, tmp_path, tmp_path_factory):
    cfg = config(zoo, "gpt2", tmp_path / "d", method="auto", memory_budget_gb=8e-5, screen_tokens=300)
    spawn(_rank_run, 2, tmp_path, cfg)
    assert json.loads((tmp_path / "d" / "run.json").read_text())["method"] == "screen"
    assert_screen_answer(tmp_path / "d", {**cfg, "method": "screen"}, tmp_path_factory)


def _stop_when(out: Path, stage: str, procs, sig, victims, timeout: float = 60) -> None:
    """Wait until the manifest names a generation of ``stage``, then send ``sig`` to the victim ranks."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if _manifest(out)["stage"] == stage:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert all(p.is_alive() for p in procs), "a rank ended before the checkpoint appeared"
        time.sleep(0.02)
    else:
        raise AssertionError(f"no {stage} checkpoint appeared")
    for r in victims:
        os.kill(procs[r].pid, sig)


def _resume_ranks(rank, world, cfg: dict):
    from univ.run.distributed import run

    lines: list[str] = []
    run(CorrelateConfig(**cfg), resume=True, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    return lines


def test_sigterm_in_verify_then_resume_equals_uninterrupted(zoo, tmp_path):
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d")
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    procs, tmp = start_ranks(_rank_run, 2, tmp_path, cfg, 0.05)
    _stop_when(tmp_path / "d", "verify", procs, signal.SIGTERM, [0, 1])
    join_ranks(procs, timeout=60)
    import torch

    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("interrupted" in r for r in results), results
    assert _manifest(tmp_path / "d")["method"] == "screen"
    logs = spawn(_resume_ranks, 2, tmp_path, cfg)
    assert any("resuming generation" in line for line in logs[0]), logs[0]
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


@pytest.mark.parametrize("stage", ["screen", "verify"])
def test_a_killed_rank_ends_every_rank_then_resume_equals_uninterrupted(zoo, tmp_path, stage):
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d", checkpoint_every=300)
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    os.environ["UNIV_DIST_TIMEOUT"] = "20"  # inherited by the forked ranks
    try:
        procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.05)
        _stop_when(tmp_path / "d", stage, procs, signal.SIGKILL, [1])
        waited = join_ranks(procs, timeout=40)
    finally:
        del os.environ["UNIV_DIST_TIMEOUT"]
    assert procs[0].exitcode not in (0, None) and procs[1].exitcode == -signal.SIGKILL and waited < 30
    assert not (tmp_path / "d" / "neurons.parquet").exists()
    spawn(_resume_ranks, 2, tmp_path, cfg)
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


# Every write of a 2-rank screen run, per rank: its units (screen start, screen end, two every 500 tokens of the
# verify pass), on rank 0 the manifest after each, then the outputs. A SIGKILL right after any of them, then
# --resume: the same answer.
@pytest.mark.parametrize("fault", [(1, k) for k in range(1, 6)] + [(0, k) for k in range(1, 16)])
def test_a_sigkill_after_any_write_then_resume_equals_uninterrupted(zoo, tmp_path, fault):
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d", checkpoint_every=500)
    spawn(_rank_run, 2, tmp_path, {**cfg, "out": str(tmp_path / "full")})
    os.environ["UNIV_DIST_TIMEOUT"] = "15"
    try:
        procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.0, fault)
        join_ranks(procs, timeout=60)
    finally:
        del os.environ["UNIV_DIST_TIMEOUT"]
    if procs[fault[0]].exitcode != -signal.SIGKILL:  # the run writes fewer files than the index
        pytest.skip(f"rank {fault[0]} wrote fewer than {fault[1]} files")
    assert procs[1 - fault[0]].exitcode not in (0, None)
    if (tmp_path / "d" / DIST_DIR / MANIFEST).exists():
        spawn(_resume_ranks, 2, tmp_path, cfg)
    else:  # killed before the first generation was committed: nothing to resume, and a fresh start is allowed
        with pytest.raises(AssertionError, match="no checkpoint"):
            spawn(_resume_ranks, 2, tmp_path, cfg)
        spawn(_rank_run, 2, tmp_path, cfg)
    assert_same_outputs(tmp_path / "d", tmp_path / "full", atol=0.0)


def test_a_screen_checkpoint_resumes_only_on_its_world(zoo, tmp_path):
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d")
    procs, _ = start_ranks(_rank_run, 2, tmp_path, cfg, 0.05)
    _stop_when(tmp_path / "d", "verify", procs, signal.SIGTERM, [0, 1])
    join_ranks(procs, timeout=60)
    results = spawn(_rank_resume_corrupt, 3, tmp_path, cfg)  # three ranks: refused on every one
    assert all("on 2 ranks" in r.get("error", "") and r["error"].startswith("Refused") for r in results), results
    from univ.run.driver import run

    with pytest.raises(Refused, match="resumes on 2 ranks"):  # one process: refused too
        run(CorrelateConfig(**cfg), resume=True, progress=False, log=lambda *a: None)
    results = spawn(_rank_resume_corrupt, 2, tmp_path, {**cfg, "method": "exact"})
    assert all("is of --method screen" in r.get("error", "") for r in results), results
    assert_corrupt_unit_refused(cfg, tmp_path)


def _one_process_run(rank, world, cfg: dict):
    import univ.run.files as files
    from univ.run.driver import run

    os.environ["UNIV_FAULT_AFTER_WRITE"] = str(files._writes + 2)
    run(CorrelateConfig(**cfg), progress=False, log=lambda *a: None)


def test_a_one_process_screen_checkpoint_is_refused_under_torchrun(zoo, tmp_path):
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d")
    procs, _ = start_ranks(_one_process_run, 1, tmp_path, cfg)  # killed after its screen's checkpoint
    join_ranks(procs, timeout=60)
    assert procs[0].exitcode == -signal.SIGKILL and (tmp_path / "d" / "checkpoint.safetensors").exists()
    results = spawn(_rank_resume_corrupt, 2, tmp_path, cfg)
    assert all("one-process --method screen run" in r.get("error", "") for r in results), results


@pytest.mark.skipif(os.environ.get("UNIV_SKIP_TORCHRUN") == "1", reason="UNIV_SKIP_TORCHRUN=1")
def test_torchrun_cli_screen(zoo, tmp_path, tmp_path_factory):
    """The real launcher: torchrun --nproc-per-node 2 -m univ correlate ... --method screen (a subprocess)."""
    import subprocess
    import sys

    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "t")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "univ", "correlate", *cfg["models"],
           "--data", cfg["data"], "--out", cfg["out"], "--tokens", str(cfg["tokens"]), "--ctx", "32",
           "--batch-size", "4", "--device", "cpu", "--method", "screen", "--screen-tokens", "300"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "UNIV_DIST_TIMEOUT": "60"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "screen method on 2 ranks" in done.stdout and "(2 ranks)" in done.stdout
    assert_screen_answer(tmp_path / "t", cfg, tmp_path_factory)


def test_sae_latents_screened_on_ranks_equal_exact(zoo, tmp_path, tmp_path_factory):
    """SAE latents as the units (two SAEs per model, one dead latent), screened on 2 ranks: the exact table."""
    import torch
    from test_sites import write_sae

    g = torch.Generator().manual_seed(5)
    saes = []
    for name in ("a", "b"):
        folders = []
        for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
            W = torch.randn(32, 24, generator=g) / 32**0.5
            bias = torch.rand(24, generator=g) * 0.3
            bias[3] = -1e4  # dead
            folders.append(str(write_sae(tmp_path / f"sae-{name}-{hook}", W, bias, hook=hook)))
        saes.append(",".join(folders))
    cfg = _screen_cfg(zoo, "gpt2", tmp_path / "d", sae=tuple(saes), baseline_draws=2)
    cfg["models"] = cfg["models"][:2]
    spawn(_rank_run, 2, tmp_path, cfg)
    assert_screen_answer(tmp_path / "d", cfg, tmp_path_factory)
