"""Checkpoints as models (NAME@REVISION) and ``univ sweep``: universality tabulated per training step.

The fixture lays out two seeds the way ``univ zoo train --save-every`` does (SEED/step-NNNNNN/ folders):
at step 1 the seeds are unrelated random models; at step 2 seed 1 is a neuron-permuted copy of seed 0, so
every live neuron of seed 0 has a perfect match and the universal count must jump.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import corpus_text, save_tiny_model
from univ import sweep
from univ.correlate import CorrelateConfig, run
from univ.errors import UserError
from univ.models import load_model
from univ.universal import select_universal

STEPS = ("step-000001", "step-000002")
QUIET = dict(progress=False, log=lambda *_: None)


def permuted_copy(src: Path, dst: Path, seed: int = 7) -> Path:
    """The same GPT-2 with each layer's MLP neurons permuted (c_fc columns and bias, c_proj rows)."""
    lm = load_model(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(lm.n_layers):
            mlp, p = lm.layer(i).mlp, torch.randperm(lm.d_mlp, generator=g)
            mlp.c_fc.weight.copy_(mlp.c_fc.weight[:, p])
            mlp.c_fc.bias.copy_(mlp.c_fc.bias[p])
            mlp.c_proj.weight.copy_(mlp.c_proj.weight[p, :])
    lm.model.save_pretrained(dst)
    lm.tokenizer.save_pretrained(dst)
    return dst


@dataclass
class Ckpts:
    root: Path
    seeds: list[Path]
    data: Path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Ckpts:
    root = tmp_path_factory.mktemp("ckpts")
    seeds = [save_tiny_model(root, "gpt2", seed=s, name=f"seed-{s}") for s in (0, 1)]
    save_tiny_model(seeds[0], "gpt2", seed=10, name=STEPS[0])
    save_tiny_model(seeds[0], "gpt2", seed=20, name=STEPS[1])
    save_tiny_model(seeds[1], "gpt2", seed=11, name=STEPS[0])
    permuted_copy(seeds[0] / STEPS[1], seeds[1] / STEPS[1])
    data = root / "text.txt"
    data.write_text(corpus_text()[:30_000])
    return Ckpts(root, seeds, data)


def _cfg(models, data, out, **kw) -> CorrelateConfig:
    base = dict(tokens=1200, ctx=32, batch_size=4, device="cpu", save_state=False)
    return CorrelateConfig(models=tuple(str(m) for m in models), data=str(data), out=str(out), **{**base, **kw})


def test_two_checkpoints_of_one_seed_are_distinct_models(ckpts, tmp_path):
    names = [f"{ckpts.seeds[0]}@{step}" for step in STEPS]
    out = run(_cfg(names, ckpts.data, tmp_path / "r", mode="all-pairs"), **QUIET)
    table = pd.read_parquet(out / "neurons.parquet")
    labels = ["seed-0@step-000001", "seed-0@step-000002"]
    assert list(pd.unique(table["model"])) == labels  # each checkpoint its own rows
    assert f"max_corr.{labels[1]}" in table and f"max_corr.{labels[0]}" in table
    # unrelated weights at the two steps: no neuron is its own match across them
    assert table[f"max_corr.{labels[1]}"].dropna().max() < 0.999
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["models"] == names and manifest["labels"] == labels
    meta = manifest["model_meta"]
    assert [m["revision"] for m in meta] == list(STEPS)
    assert [m["source"] for m in meta] == [str(ckpts.seeds[0] / s) for s in STEPS]


@pytest.fixture(scope="module")
def swept(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines: list[str] = []
    base = _cfg(["-", "-"], ckpts.data, out)
    table = sweep.run_sweep([str(s) for s in ckpts.seeds], list(STEPS), base, progress=False, log=lines.append)
    return out, table, lines


def test_sweep_counts_universal_neurons_per_step(swept):
    out, table, lines = swept
    assert list(table["revision"]) == [STEPS[0]] * 3 + [STEPS[1]] * 3
    assert list(table["layer"]) == ["0", "1", "all"] * 2 and list(table["step"]) == [1, 1, 1, 2, 2, 2]
    for revision in STEPS:  # the counts are the universal rule applied to each step's own neuron table
        neurons = pd.read_parquet(out / revision / "neurons.parquet")
        rows = table[table["revision"] == revision].set_index("layer")
        universal = select_universal(neurons)
        assert rows.loc["all", "universal"] == universal.sum() and rows.loc["all", "neurons"] == len(neurons)
        for layer in (0, 1):
            assert rows.loc[str(layer), "universal"] == universal[neurons["layer"] == layer].sum()
        np.testing.assert_allclose(rows.loc["all", "mean_excess"], neurons["excess_corr"].mean())
        assert (rows["tokens"] == 1200).all()
    whole = table[table["layer"] == "all"].set_index("revision")["fraction"]
    # random seeds, then a permuted copy (every live neuron matched at r = 1; the tiny model's baseline is high)
    assert whole[STEPS[1]] > whole[STEPS[0]] + 0.2
    saved = pd.read_parquet(out / "sweep.parquet")
    pd.testing.assert_frame_equal(saved, table)
    assert (out / "sweep.csv").is_file() and (out / "sweep.png").stat().st_size > 1000
    info = json.loads((out / "sweep.json").read_text())
    assert info["revisions"] == list(STEPS) and len(info["runs"]) == 2
    assert any("step-000002" in line and "%" in line for line in lines)


def test_sweep_reuses_finished_runs_and_cli(swept, ckpts, capsys):
    out, table, _ = swept
    parser = argparse.ArgumentParser()
    sweep.register(parser.add_subparsers(dest="command"))
    argv = ["sweep", *map(str, ckpts.seeds), "--revisions", *STEPS, "--data", str(ckpts.data), "--out", str(out)]
    argv += ["--tokens", "1200", "--ctx", "32", "--batch-size", "4", "--device", "cpu"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 2  # nothing recomputed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "sweep.parquet"), table)


def test_sweep_resumes_a_step_stopped_midway(swept, ckpts, tmp_path, monkeypatch):
    from univ.run import stream

    _, table, _ = swept
    base = _cfg(["-", "-"], ckpts.data, tmp_path / "s", checkpoint_every=300)
    seeds = [str(s) for s in ckpts.seeds]
    real, calls = stream.process_batch, {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # after the first checkpoint
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(stream, "process_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.run_sweep(seeds, [STEPS[1]], base, **QUIET)
    monkeypatch.setattr(stream, "process_batch", real)
    lines: list[str] = []
    again = sweep.run_sweep(seeds, [STEPS[1]], base, progress=False, log=lines.append)
    assert any("resuming" in line for line in lines)
    expected = table[table["revision"] == STEPS[1]].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.drop(columns="run"), expected.drop(columns="run"), atol=1e-6, rtol=0)


def test_zoo_folder_expands_to_seeds_and_common_checkpoints(tmp_path):
    for s in (0, 1):
        seed = save_tiny_model(tmp_path, "gpt2", seed=s, name=f"seed-{s}")
        for step in ("step-000010", "step-000002") + (("step-000005",) if s == 0 else ()):
            (seed / step).mkdir()
            (seed / step / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{"path": "seed-0"}, {"path": "seed-1"}]}))
    models, revisions = sweep._expand_zoo([str(tmp_path)], None)
    assert models == [str(tmp_path / "seed-0"), str(tmp_path / "seed-1")]
    assert revisions == ["step-000002", "step-000010"]  # by step, only those every seed has


def test_sweep_errors(tmp_path, ckpts):
    base = _cfg(["-", "-"], ckpts.data, tmp_path / "s")
    with pytest.raises(UserError, match="--revisions is required"):
        sweep.run_sweep([str(s) for s in ckpts.seeds], None, base, **QUIET)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "manifest.json").write_text(json.dumps({"models": [{"path": "seed-0"}]}))
    with pytest.raises(UserError, match="no training checkpoints.*--save-every"):
        sweep.run_sweep([str(tmp_path / "zoo")], None, base, **QUIET)
    with pytest.raises(UserError, match="at least two models"):
        sweep.run_sweep([str(ckpts.seeds[0])], list(STEPS), base, **QUIET)
    with pytest.raises(UserError, match="no checkpoint subfolder 'step-9'"):
        sweep.run_sweep([str(s) for s in ckpts.seeds], ["step-9"], base, **QUIET)


def test_sweep_with_the_screen_method_counts_the_same(swept, ckpts, tmp_path):
    """--method screen at every checkpoint: the same universal counts as the exhaustive runs."""
    from dataclasses import replace

    _, table, _ = swept
    base = replace(_cfg(["-", "-"], ckpts.data, tmp_path), method="screen", screen_tokens=400)
    screened = sweep.run_sweep([str(s) for s in ckpts.seeds], list(STEPS), base, progress=False, log=lambda *a: None)
    cols = ["revision", "layer", "universal", "neurons"]
    pd.testing.assert_frame_equal(screened[cols], table[cols])
    np.testing.assert_allclose(screened["mean_excess"], table["mean_excess"], atol=1e-5)
    assert json.loads((tmp_path / STEPS[0] / "run.json").read_text())["method"] == "screen"
