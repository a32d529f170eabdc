"""A checkpoint of any world size resumes at any other (one process included) with the uninterrupted answer.

Runs are cut by the fault hook of ``univ.run.files`` (SIGKILL right after a chosen write: a rank's unit of a
generation before the manifest, a manifest, a one-process checkpoint), then resumed on another world size or
token-shard count. The result must equal the uninterrupted one-process run up to the rounding of the merge
order, or the resume must refuse clearly; never another answer.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal

import pytest
import torch
from helpers import corpus_text, save_tiny_model
from test_distributed import join_ranks, spawn, start_ranks
from test_distributed_run import _rank_resume, _rank_run, assert_same_outputs, config, reference

from univ.errors import UserError
from univ.run.config import CorrelateConfig
from univ.run.distributed import DIST_DIR, MANIFEST

ATOL = 2e-6  # Chan merges in another order: fp32 rounding of C, ~1e-7 in r


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rzoo")
    models = {arch: [save_tiny_model(root, arch, seed=s) for s in (0, 1, 2)] for arch in ("gpt2", "llama")}
    data = root / "text.txt"
    data.write_text(corpus_text()[:40_000])
    return models, data


def _single(cfg: dict, resume: bool = False):
    from univ.run.driver import run

    return run(CorrelateConfig(**cfg), resume=resume, progress=False, log=lambda *a: None)


def _killed_single(cfg: dict, after_writes: int) -> int:
    """A one-process run in a forked child that SIGKILLs itself after its k-th write; returns the exit code."""
    import univ.run.files as files

    def child():
        # one thread: the parent's OpenMP pool does not survive fork, and a forked child that uses it hangs
        torch.set_num_threads(1)
        os.environ["UNIV_FAULT_AFTER_WRITE"] = str(files._writes + after_writes)
        try:
            _single(cfg)
        finally:
            os._exit(0)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(120)
    if p.is_alive():  # never leave a child behind: multiprocessing would wait for it at exit
        p.kill()
        p.join()
        raise AssertionError("the killed run did not end within 120 s")
    return p.exitcode


def _rank_resume_killed(rank, world, cfg: dict, fault: tuple[int, int]):
    """A resumed run on this rank that SIGKILLs rank fault[0] after its fault[1]-th write."""
    import univ.run.files as files
    from univ.run.distributed import run

    if fault[0] == rank:
        os.environ["UNIV_FAULT_AFTER_WRITE"] = str(files._writes + fault[1])
    run(CorrelateConfig(**cfg), resume=True, progress=False, log=lambda *a: None)
    return {"ok": True}


def _killed_ranks(cfg: dict, world: int, fault: tuple[int, int], tmp_path, resume: bool = False) -> None:
    os.environ["UNIV_DIST_TIMEOUT"] = "20"  # the survivors notice the dead rank within this
    try:
        procs, tmp = (start_ranks(_rank_resume_killed, world, tmp_path, cfg, fault) if resume else
                      start_ranks(_rank_run, world, tmp_path, cfg, 0.0, fault))
        join_ranks(procs, timeout=60)
    finally:
        del os.environ["UNIV_DIST_TIMEOUT"]
    errors = "\n".join(f.read_text()[-1500:] for f in sorted(tmp.glob("rank*.err")))
    assert procs[fault[0]].exitcode == -signal.SIGKILL, errors


def _single_kw(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("token_shards", "memory_budget_gb")}


@pytest.mark.parametrize("fault", [(1, 3), (0, 4), (1, 5)])  # a rank's 3rd unit; rank 0's 2nd manifest; ...
@pytest.mark.parametrize("then", [("single", None), ("ranks", 3, 1), ("ranks", 2, 1)])
def test_kill_any_rank_mid_checkpoint_then_resume_on_another_world(zoo, tmp_path, tmp_path_factory, fault, then):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=2, checkpoint_every=200, activation_stats=True)
    _killed_ranks(cfg, 2, fault, tmp_path)
    assert (tmp_path / "d" / DIST_DIR / MANIFEST).exists()  # a complete earlier generation
    if then[0] == "single":
        _single({**cfg, "token_shards": None}, resume=True)
    else:
        logs = spawn(_rank_resume, then[1], tmp_path, {**cfg, "token_shards": then[2]})
        assert any(line.startswith("re-sharded the checkpoint of 2 ranks") for line in logs[0]), logs[0]
    assert not (tmp_path / "d" / DIST_DIR).exists() and not (tmp_path / "d" / "checkpoint.safetensors").exists()
    assert_same_outputs(tmp_path / "d", reference(_single_kw(cfg), tmp_path_factory), atol=ATOL)


@pytest.mark.parametrize("after_writes", [1, 2, 3])
@pytest.mark.parametrize("world, token_shards", [(2, 2), (3, 1)])
def test_kill_one_process_then_resume_across_ranks(zoo, tmp_path, tmp_path_factory, after_writes, world,
                                                   token_shards):
    cfg = config(zoo, "llama", tmp_path / "d", checkpoint_every=200, mode="all-pairs")
    assert _killed_single(cfg, after_writes) == -signal.SIGKILL
    assert (tmp_path / "d" / "checkpoint.safetensors").exists()
    spawn(_rank_resume, world, tmp_path, {**cfg, "token_shards": token_shards})
    assert_same_outputs(tmp_path / "d", reference(cfg, tmp_path_factory), atol=ATOL)
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["distributed"]["world"] == world


def test_blocks_over_passes_resharded_and_back(zoo, tmp_path, tmp_path_factory):
    """Two passes on 2 ranks, killed in the second; 3 ranks take it over and are killed; one process finishes."""
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1, checkpoint_every=300, memory_budget_gb=70e-6)
    _killed_ranks(cfg, 2, (0, 13), tmp_path)
    manifest = json.loads((tmp_path / "d" / DIST_DIR / MANIFEST).read_text())
    assert manifest["pass_index"] == 1  # the kill came in the second pass
    _killed_ranks({**cfg, "memory_budget_gb": 1.0}, 3, (2, 1), tmp_path, resume=True)
    assert json.loads((tmp_path / "d" / DIST_DIR / MANIFEST).read_text())["world"] == 2  # its gen was incomplete
    _killed_ranks({**cfg, "memory_budget_gb": 1.0}, 3, (2, 2), tmp_path, resume=True)
    assert json.loads((tmp_path / "d" / DIST_DIR / MANIFEST).read_text())["world"] == 3
    _single({**cfg, "memory_budget_gb": 1.0, "token_shards": None}, resume=True)
    assert_same_outputs(tmp_path / "d", reference(_single_kw(cfg), tmp_path_factory), atol=ATOL)


def test_a_pass_too_big_for_the_new_world_is_refused(zoo, tmp_path):
    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1, checkpoint_every=200)
    _killed_ranks(cfg, 2, (1, 3), tmp_path)
    with pytest.raises(UserError, match="pass of .* more than this process's .* budget"):
        _single({**cfg, "token_shards": None, "memory_budget_gb": 40e-6}, resume=True)
    assert (tmp_path / "d" / DIST_DIR / MANIFEST).exists()  # nothing lost: the ranks' checkpoint is still there


def test_a_fresh_run_into_a_folder_holding_a_ranks_checkpoint_is_refused(zoo, tmp_path):
    from univ.errors import Refused

    cfg = config(zoo, "gpt2", tmp_path / "d", token_shards=1, checkpoint_every=200)
    _killed_ranks(cfg, 2, (1, 3), tmp_path)
    with pytest.raises(Refused, match="pass --resume to continue it, in this process or any number of ranks"):
        _single({**cfg, "token_shards": None})
