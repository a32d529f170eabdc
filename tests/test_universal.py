"""Selection of universal neurons on a hand-made neuron table, and the ``univ universal`` command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from univ.universal import (
    borderline,
    draws_summary,
    read_run,
    register,
    run_universal,
    select_universal,
    universal_by_layer,
)


def _table() -> pd.DataFrame:
    # excess (mean rule):  0.60  0.50  0.51  0.30  NaN   0.70
    # strict (min-maxb):   0.40  0.45  0.51  0.10  NaN   0.65
    df = pd.DataFrame(
        {
            "model": ["a"] * 6,
            "layer": [0, 0, 0, 1, 1, 1],
            "neuron": [0, 1, 2, 0, 1, 2],
            "mean_corr": [0.80, 0.70, 0.71, 0.50, np.nan, 0.90],
            "min_corr": [0.70, 0.65, 0.71, 0.40, np.nan, 0.85],
            "max_corr": [0.90, 0.75, 0.71, 0.60, np.nan, 0.95],
            "mean_baseline": [0.20, 0.20, 0.20, 0.20, np.nan, 0.20],
            "max_baseline": [0.30, 0.20, 0.20, 0.30, np.nan, 0.20],
        }
    )
    df["excess_corr"] = [0.60, 0.50, 0.51, 0.30, np.nan, 0.70]  # exact, to test "strictly greater"
    return df


def test_mean_rule_is_strictly_greater_and_nan_is_not_universal():
    df = _table()
    assert select_universal(df).tolist() == [True, False, True, False, False, True]  # 0.50 is not > 0.5
    assert select_universal(df, threshold=0.55).tolist() == [True, False, False, False, False, True]
    assert select_universal(df, threshold=0.2).tolist() == [True, True, True, True, False, True]
    # without excess_corr the rule uses mean_corr - mean_baseline
    assert select_universal(df.drop(columns="excess_corr")).tolist() == select_universal(df).tolist()


def test_strict_rule_needs_every_seed():
    df = _table()
    assert select_universal(df, rule="strict").tolist() == [False, False, True, False, False, True]
    assert select_universal(df, rule="strict", threshold=0.3).tolist() == [True, True, True, False, False, True]


def _with_draws(df: pd.DataFrame) -> pd.DataFrame:
    # per-draw excess spread around excess_corr:    0.60  0.50  0.51  0.30  NaN   0.70
    return df.assign(excess_min=[0.55, 0.40, 0.45, 0.20, np.nan, 0.66],
                     excess_q05=[0.56, 0.42, 0.49, 0.22, np.nan, 0.67],
                     excess_max=[0.66, 0.58, 0.60, 0.40, np.nan, 0.75])


def test_draws_rule_and_borderline():
    df = _with_draws(_table())
    assert select_universal(df, rule="draws").tolist() == [True, False, False, False, False, True]
    assert select_universal(df, rule="draws", threshold=0.4).tolist() == [True, True, True, False, False, True]
    # borderline: some draw passes and some fails (excess_min <= t < excess_max); NaN never is
    assert borderline(df).tolist() == [False, True, True, False, False, False]
    assert borderline(df, threshold=0.65).tolist() == [True, False, False, False, False, False]
    assert borderline(_table()) is None
    line = draws_summary(df, 8)
    assert "paper's rule (mean over draws) 3" in line and "95 % of draws 2" in line and "borderline" in line
    assert line.rstrip().endswith("2")
    assert "unknown" in draws_summary(df, 1) and "not recorded" in draws_summary(_table(), None)
    with pytest.raises(KeyError, match="--baseline-draws"):
        select_universal(_table(), rule="draws")


def test_run_universal_reports_borderline(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"models": ["m/a", "m/b"], "labels": ["a", "b"],
                                                   "baseline_draws": 16}))
    _with_draws(_table()).to_parquet(tmp_path / "neurons.parquet")
    out = run_universal(tmp_path, rule="draws")
    assert out["is_universal"].sum() == 2 and out["is_borderline"].sum() == 2
    assert "baseline draws: 16" in capsys.readouterr().out
    assert pd.read_parquet(tmp_path / "universal.parquet")["is_borderline"].tolist() == [False, False]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        select_universal(_table(), rule="median")
    with pytest.raises(KeyError, match="min_corr and max_baseline"):
        select_universal(_table().drop(columns="min_corr"), rule="strict")
    with pytest.raises(KeyError, match="is_universal"):
        universal_by_layer(_table())


def test_by_layer_counts_and_fractions():
    df = _table().assign(is_universal=lambda d: select_universal(d))
    t = universal_by_layer(df)
    assert t["layer"].tolist() == [0, 1, "all"]
    assert t["neurons"].tolist() == [3, 3, 6]
    assert t["universal"].tolist() == [2, 1, 3]
    np.testing.assert_allclose(t["fraction"], [2 / 3, 1 / 3, 0.5])


def test_run_universal_writes_universal_rows(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"models": ["m/a", "m/b"], "labels": ["a", "b"]}))
    _table().to_parquet(tmp_path / "neurons.parquet")
    out = run_universal(tmp_path, rule="strict")
    assert out["is_universal"].sum() == 2
    uni = pd.read_parquet(tmp_path / "universal.parquet")
    assert list(zip(uni.layer, uni.neuron, strict=True)) == [(0, 2), (1, 2)]
    assert len(pd.read_csv(tmp_path / "universal.csv")) == 2
    printed = capsys.readouterr().out
    assert "all" in printed and "33.33%" in printed
    assert read_run(tmp_path)["analysed"] == ["a"]  # default: the reference model


def test_cli_parser(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["universal", str(tmp_path), "--threshold", "0.4", "--rule", "strict"])
    assert (args.threshold, args.rule) == (0.4, "strict") and callable(args.func)
    with pytest.raises(FileNotFoundError, match="neurons.parquet not found"):
        args.func(args)
