"""``univ analyze`` end to end on a fake correlate run of two tiny GPT-2 seeds: one pass, every file, every column."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import univ.models
from tests.helpers import corpus_text, save_tiny_model
from univ.analyze import PROFILE_COLUMNS, register, run_analyze
from univ.commands.families import run_families
from univ.commands.stats import run_stats
from univ.data import token_batches
from univ.errors import Refused, UserError
from univ.tables import run_id, table_run_id, write_parquet

CTX, BATCH, TOKENS = 32, 8, 600


def _fake_neurons(labels: list[str], n_layers: int, d_mlp: int, seed: int = 0) -> pd.DataFrame:
    """What 'univ correlate' leaves: per neuron of each model, max corr and baseline against the others."""
    rng = np.random.default_rng(seed)
    frames = []
    for label in labels:
        n = n_layers * d_mlp
        df = pd.DataFrame(
            {
                "model": label,
                "layer": np.repeat(np.arange(n_layers), d_mlp),
                "neuron": np.tile(np.arange(d_mlp), n_layers),
            }
        )
        others = [m for m in labels if m != label]
        for m in others:
            df[f"max_corr.{m}"] = rng.uniform(0.2, 0.95, n)
            df[f"argmax_layer.{m}"] = rng.integers(0, n_layers, n)
            df[f"argmax_neuron.{m}"] = rng.integers(0, d_mlp, n)
            df[f"baseline.{m}"] = rng.uniform(0.1, 0.3, n)
        corr = df[[f"max_corr.{m}" for m in others]]
        base = df[[f"baseline.{m}" for m in others]]
        df["mean_corr"], df["min_corr"], df["max_corr"] = corr.mean(axis=1), corr.min(axis=1), corr.max(axis=1)
        df["mean_baseline"], df["max_baseline"] = base.mean(axis=1), base.max(axis=1)
        df["excess_corr"] = df["mean_corr"] - df["mean_baseline"]
        df.loc[3, [c for c in df.columns if c not in ("model", "layer", "neuron")]] = np.nan  # a dead neuron
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    models = [str(save_tiny_model(root, arch="gpt2", seed=s)) for s in (0, 1)]
    (root / "corpus.txt").write_text(corpus_text())
    data = {
        "source": str(root / "corpus.txt"), "ctx": CTX, "batch_size": BATCH, "seed": 0, "max_tokens": 5000,
        "text_field": "text", "split": "train",
    }  # fmt: skip
    manifest = {
        "models": models, "labels": ["a", "b"], "analysed": ["a", "b"], "data": data, "mode": "all-pairs",
        "baseline": "gaussian", "tokens": 5000,
    }  # fmt: skip
    (root / "run.json").write_text(json.dumps(manifest))
    _fake_neurons(["a", "b"], 2, 64).to_parquet(root / "neurons.parquet")
    return root


def test_analyze_one_pass_writes_profiles(run_dir, monkeypatch, capsys):
    calls = []
    real = univ.models.collect_mlp_activations

    def counting(lm, input_ids, **kw):
        calls.append(lm.name)
        return real(lm, input_ids, **kw)

    monkeypatch.setattr(univ.models, "collect_mlp_activations", counting)
    path = run_analyze(run_dir, tokens=TOKENS, top_k=3, syntax="off")
    assert path == run_dir / "profiles.parquet"

    # ONE pass per model: one forward per batch of the token budget, shared by stats, families and top-k
    manifest = json.loads((run_dir / "run.json").read_text())
    tok = univ.models.load_model(manifest["models"][0]).tokenizer
    batches = list(token_batches(manifest["data"]["source"], tok, ctx=CTX, batch_size=BATCH, max_tokens=TOKENS))
    assert calls == [manifest["models"][0]] * len(batches) + [manifest["models"][1]] * len(batches)

    prof = pd.read_parquet(path)
    assert list(prof.columns[: len(PROFILE_COLUMNS)]) == PROFILE_COLUMNS
    assert len(prof) == 2 * 2 * 64 and set(prof.model) == {"a", "b"}
    neurons = pd.read_parquet(run_dir / "neurons.parquet")
    merged = prof.merge(neurons, on=["model", "layer", "neuron"], suffixes=("", "_n"))
    np.testing.assert_array_equal(merged.is_universal, merged.excess_corr_n > 0.5)
    assert prof.is_universal.any() and not prof.is_universal.all()
    assert prof.family.isin(["unigram", "alphabet", "previous-token", "syntax", "position", "other", "dead"]).all()
    assert {"act_skew_pct", "l2_penalty_pct", "best_vr_pct"} <= set(prof.columns)
    assert prof[["act_kurt", "w_in_norm", "vocab_kurt", "best_vr"]].notna().all().all()
    assert (run_dir / "profiles.csv").is_file() and (run_dir / "universal.csv").is_file()

    # the streamed statistics equal scipy on the concatenated pre-activations of the same tokens
    lm = univ.models.load_model(manifest["models"][0])
    pre = torch.cat([real(lm, b.input_ids, pre=True, post=False, keep=b.keep).pre for b in batches])
    pre = pre.reshape(pre.shape[0], -1).double().numpy()
    a = prof[prof.model == "a"].sort_values(["layer", "neuron"])
    np.testing.assert_allclose(a.act_kurt, scipy.stats.kurtosis(pre, axis=0, fisher=False), rtol=1e-6)
    np.testing.assert_allclose(a.act_freq, (pre > 0).mean(0), rtol=1e-12)

    top = pd.read_parquet(run_dir / "top_examples.parquet")
    assert len(top) == 2 * 128 * 3 and top.groupby(["model", "layer", "neuron"]).value.is_monotonic_decreasing.all()
    fam = pd.read_parquet(run_dir / "families.parquet")
    assert len(fam) == 256 and "is_universal" in fam
    info = json.loads((run_dir / "analyze.json").read_text())
    assert info["tokens"] == {"a": TOKENS, "b": TOKENS}
    out = capsys.readouterr().out
    assert "universal neurons" in out and "median within-layer percentile" in out and "families" in out
    compare = pd.read_csv(run_dir / "universal_compare.csv")
    assert set(compare.model) == {"a", "b"} and "act_kurt" in set(compare.metric)

    # every table is stamped with the run it was computed from; which tokens occur is kept for the report
    rid = run_id(run_dir)
    assert info["run_id"] == rid and rid.startswith("legacy-")  # this run.json predates run ids
    for name in ("profiles", "universal", "families", "top_examples", "token_counts"):
        assert table_run_id(run_dir / f"{name}.parquet") == rid, name
    counts = pd.read_parquet(run_dir / "token_counts.parquet")
    assert (counts["count"] > 0).all() and counts["count"].sum() == info["token_counts_tokens"] >= TOKENS


def test_stats_and_families_commands(run_dir):
    p = run_stats(run_dir, tokens=300, verbose=False)
    stats = pd.read_parquet(p)
    assert p.name == "stats.parquet" and len(stats) == 256 and "vocab_kurt" in stats and "family" not in stats
    assert (run_dir / "stats_compare.csv").is_file()
    p = run_families(run_dir, tokens=300, top_k=2, syntax="off", verbose=False)
    fam = pd.read_parquet(p)
    assert p.name == "families.parquet" and {"family", "best_feature", "best_vr", "position_mi"} <= set(fam.columns)


def test_cli_and_errors(run_dir, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(tmp_path), "--tokens", "300", "--top-k", "1", "--syntax", "off"])
    with pytest.raises(FileNotFoundError, match="run.json not found"):
        args.func(args)
    (tmp_path / "run.json").write_text(json.dumps({"models": ["x"], "labels": ["a"]}))
    with pytest.raises(UserError, match="no data.source"):
        args.func(args)
    args = parser.parse_args(["analyze", str(run_dir), "--tokens", "300", "--top-k", "1", "--syntax", "off"])
    assert args.func(args) == 0


def _copy_run(src, dst):
    dst.mkdir()
    for name in ("run.json", "neurons.parquet"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_refuses_tables_of_another_run_before_loading(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "mixed")
    neurons = pd.read_parquet(run / "neurons.parquet")
    write_parquet(neurons, run / "neurons.parquet", "an-older-run")
    monkeypatch.setattr(univ.models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(Refused, match="an-older-run.*would mix two runs"):
        run_analyze(run, tokens=300, top_k=1, syntax="off", verbose=False)


def test_corrupt_neuron_table_is_named_corrupt(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "cut")
    data = (run / "neurons.parquet").read_bytes()
    (run / "neurons.parquet").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(UserError, match="neurons.parquet is corrupt"):
        run_analyze(run, tokens=300, top_k=1, syntax="off", verbose=False)


def test_unknown_analysed_label_fails_before_loading(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "labels")
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "analysed": ["zz"]}))
    monkeypatch.setattr(univ.models, "load_model", lambda *a, **k: pytest.fail("loaded a model before failing"))
    with pytest.raises(UserError, match="'zz' is not among the labels"):
        run_analyze(run, tokens=300, top_k=1, syntax="off", verbose=False)
