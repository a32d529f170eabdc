"""Selection: which neurons are universal, from the correlate run's neuron table.

Gurnee et al. (2024) call neuron i of the reference model universal when its *excess correlation*, the mean
over the compared models m of (max_j ρ^m_ij − max_j ρ̄^m_ij) with ρ̄ the rotated baseline, exceeds 0.5:

    rule "mean"    excess_corr = mean_corr − mean_baseline > threshold        (the paper, §3)
    rule "strict"  min_corr − max_baseline > threshold                        (the repo's stricter table:
                                                                                every seed must clear it)
    rule "draws"   excess_q05 > threshold                                     (with K baseline draws: the
                                                                                excess clears it in ≥ 95 %
                                                                                of the draws)

One rotation draw decides the borderline (issue 12: on the zoo two draws' universal sets overlap at
Jaccard ≈ 0.7), so ``univ correlate --baseline-draws K`` records, per neuron, the excess of the worst and
best draw; a neuron is *borderline* when excess_min ≤ threshold < excess_max: another draw would flip it.

Dead neurons (NaN correlations) are never universal. ``univ universal DIR`` writes the universal rows to
``DIR/universal.parquet`` and ``DIR/universal.csv`` and prints counts per layer; the paper's U shape over
depth (most universal neurons in the first and last layers) shows up in that table.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from univ.tables import run_id, write_parquet

__all__ = [
    "RULES",
    "borderline",
    "draws_summary",
    "read_neurons",
    "read_run",
    "register",
    "run_universal",
    "select_universal",
    "universal_by_layer",
]

RULES = ("mean", "strict", "draws")
DEFAULT_THRESHOLD = 0.5  # the paper's cut on excess correlation


# --------------------------------------------------------------------------------------------------------------------
# Reading a run directory


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The correlate run's manifest ``DIR/run.json`` (models, labels, analysed labels, data spec)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the directory written by 'univ correlate'")
    manifest = json.loads(path.read_text())
    for key in ("models", "labels"):
        if key not in manifest:
            raise ValueError(f"{path} has no {key!r} entry; was it written by 'univ correlate'?")
    if len(manifest["models"]) != len(manifest["labels"]):
        raise ValueError(f"{path}: {len(manifest['models'])} models but {len(manifest['labels'])} labels")
    manifest.setdefault("analysed", manifest["labels"][:1])
    return manifest


def read_neurons(run_dir: str | Path) -> pd.DataFrame:
    """The per-neuron correlation table ``DIR/neurons.parquet``."""
    path = Path(run_dir) / "neurons.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'univ correlate' first (or finish the run in {run_dir})")
    return pd.read_parquet(path)


# --------------------------------------------------------------------------------------------------------------------
# Selection


def select_universal(neurons: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD, rule: str = "mean") -> pd.Series:
    """Boolean Series (index of ``neurons``): is each neuron universal under ``rule``? NaN rows are not.

    Example:
        >>> df = pd.DataFrame({"mean_corr": [0.8, 0.6], "mean_baseline": [0.2, 0.2]})
        >>> select_universal(df).tolist()
        [True, False]
    """
    if rule == "mean":
        if "excess_corr" in neurons:
            score = neurons["excess_corr"]
        elif {"mean_corr", "mean_baseline"} <= set(neurons.columns):
            score = neurons["mean_corr"] - neurons["mean_baseline"]
        else:
            raise KeyError("rule 'mean' needs column excess_corr (or mean_corr and mean_baseline)")
    elif rule == "strict":
        missing = {"min_corr", "max_baseline"} - set(neurons.columns)
        if missing:
            raise KeyError(f"rule 'strict' needs columns min_corr and max_baseline; missing: {sorted(missing)}")
        score = neurons["min_corr"] - neurons["max_baseline"]
    elif rule == "draws":
        if "excess_q05" not in neurons:
            raise KeyError("rule 'draws' needs column excess_q05: rerun 'univ correlate' with --baseline-draws K")
        score = neurons["excess_q05"]
    else:
        raise ValueError(f"unknown rule {rule!r}; use one of {RULES}")
    # NaN > t is False: dead neurons are never universal.
    return (score.astype(float) > threshold).rename("is_universal")


def borderline(neurons: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD) -> pd.Series | None:
    """Boolean Series: does the verdict of the paper's rule depend on the baseline draw (None without draws)?

    True when excess_min ≤ threshold < excess_max, i.e. at least one draw passes and one fails. A run of
    one draw has excess_min = excess_max, so nothing is borderline there: it cannot see the spread.
    """
    if not {"excess_min", "excess_max"} <= set(neurons.columns):
        return None
    lo, hi = neurons["excess_min"].astype(float), neurons["excess_max"].astype(float)
    return ((lo <= threshold) & (threshold < hi)).rename("is_borderline")


def draws_summary(neurons: pd.DataFrame, draws: int | None, *, threshold: float = DEFAULT_THRESHOLD) -> str:
    """One line: how many neurons the paper's rule and the ≥ 95 %-of-draws rule keep, and how many are borderline."""
    border = borderline(neurons, threshold=threshold)
    if border is None or "excess_q05" not in neurons:
        return "baseline draws: not recorded (rerun 'univ correlate --baseline-draws K' to see the borderline)"
    n_mean = int(select_universal(neurons, threshold=threshold, rule="mean").sum())
    n_draws = int(select_universal(neurons, threshold=threshold, rule="draws").sum())
    if draws == 1:
        return (f"baseline draws: 1 (universal by the paper's rule {n_mean}; one draw shows no spread, so the "
                "borderline is unknown: rerun with --baseline-draws K)")
    k = f"{draws}" if draws else "K"
    return (f"baseline draws: {k}; universal by the paper's rule (mean over draws) {n_mean}, in ≥ 95 % of draws "
            f"{n_draws}; borderline (some draws pass, some fail) {int(border.sum())}")


def universal_by_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Counts and fractions of universal neurons per (model, layer), plus an "all" row per model.

    ``df`` holds every neuron with an ``is_universal`` column (and ``model`` if there are several models).
    Columns: model, layer, neurons, universal, fraction (universal / neurons).
    """
    if "is_universal" not in df:
        raise KeyError("universal_by_layer needs an is_universal column; add it with select_universal(df)")
    df = df if "model" in df else df.assign(model="")
    groups = df.groupby(["model", "layer"], sort=True)["is_universal"]
    table = pd.DataFrame({"neurons": groups.size(), "universal": groups.sum().astype(int)}).reset_index()
    totals = table.groupby("model", sort=False)[["neurons", "universal"]].sum().reset_index().assign(layer="all")
    table["layer"] = table["layer"].astype(object)
    table = pd.concat([table, totals[table.columns]], ignore_index=True)
    order = {m: i for i, m in enumerate(pd.unique(df["model"]))}
    table = table.sort_values("model", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    table["fraction"] = table["universal"] / table["neurons"].where(table["neurons"] > 0, np.nan)
    return table[["model", "layer", "neurons", "universal", "fraction"]]


def format_layer_table(table: pd.DataFrame) -> str:
    """The per-layer table as aligned text (what the CLI prints)."""
    lines = [f"{'model':<16} {'layer':>5} {'neurons':>9} {'universal':>9} {'%':>7}"]
    for row in table.itertuples(index=False):
        pct = 100 * row.fraction
        lines.append(f"{str(row.model):<16} {str(row.layer):>5} {row.neurons:>9d} {row.universal:>9d} {pct:>6.2f}%")
    return "\n".join(lines)


def run_universal(
    run_dir: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    rule: str = "mean",
    verbose: bool = True,
) -> pd.DataFrame:
    """Select universal neurons of ``DIR/neurons.parquet``; write ``universal.parquet``/``.csv``; return all rows.

    The returned frame is the whole neuron table with ``is_universal`` added (the files hold only the
    universal rows, with the same columns). With ``verbose`` the per-layer table is printed.
    """
    run_dir = Path(run_dir)
    neurons = read_neurons(run_dir)
    neurons = neurons.assign(is_universal=select_universal(neurons, threshold=threshold, rule=rule))
    border = borderline(neurons, threshold=threshold)
    if border is not None:
        neurons = neurons.assign(is_borderline=border)
    universal = neurons[neurons["is_universal"]].reset_index(drop=True)
    stamp = run_id(run_dir) if (run_dir / "run.json").is_file() else None  # later stages check the run
    write_parquet(universal, run_dir / "universal.parquet", stamp)
    universal.to_csv(run_dir / "universal.csv", index=False)
    if verbose:
        print(f"universal neurons (rule {rule!r}, threshold {threshold}):")
        print(format_layer_table(universal_by_layer(neurons)))
        draws = (read_run(run_dir).get("baseline_draws") if (run_dir / "run.json").is_file() else None)
        print(draws_summary(neurons, draws, threshold=threshold))
        print(f"wrote {run_dir / 'universal.parquet'} and universal.csv ({len(universal)} rows)")
    return neurons


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _main(args: argparse.Namespace) -> int:
    run_universal(args.dir, threshold=args.threshold, rule=args.rule)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ universal``."""
    p = subparsers.add_parser(
        "universal",
        help="select universal neurons from a correlate run",
        description=textwrap.fill(
            "Reads DIR/neurons.parquet (written by 'univ correlate') and marks a neuron universal when its excess "
            "correlation (mean over compared seeds of max correlation minus max baseline correlation) exceeds "
            "the threshold (Gurnee et al. 2024: 0.5). Writes DIR/universal.parquet and DIR/universal.csv (the "
            "universal rows) and prints counts and fractions per layer."
        ),
        epilog=(
            "examples:\n"
            "  univ universal runs/small                      # the paper's rule: excess_corr > 0.5\n"
            "  univ universal runs/small --threshold 0.4\n"
            "  univ universal runs/small --rule strict        # min_corr - max_baseline > 0.5 (every seed)\n"
            "  univ universal runs/small --rule draws         # excess > 0.5 in >= 95 % of the baseline draws\n"
            "                                                 # (a run with --baseline-draws K)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="run directory holding run.json and neurons.parquet")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cut on the score (default: 0.5)")
    p.add_argument(
        "--rule",
        choices=RULES,
        default="mean",
        help="mean: mean_corr - mean_baseline (paper); strict: min_corr - max_baseline; draws: excess in >= 95 %% "
             "of the baseline draws, i.e. excess_q05 (default: mean)",
    )
    p.set_defaults(func=_main)
    return p
