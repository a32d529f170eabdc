"""How universality and the neurons' roles change with depth: the report's Depth section.

The paper's depth results, for GPT-2 small and medium: universal neurons concentrate in the first two and the
last layers with a dip in the middle (a U); after the midpoint prediction neurons (vocab kurtosis > 10,
positive skew) become common, and in the last layers suppression neurons (negative skew) dominate. These
functions compute the same quantities per layer from a run's tables (plain pandas, no torch), and ``draw``
puts them on the report page, each with a sentence that says what the paper found and what this run shows,
computed from the numbers, so a run that differs says so.

The section appears for models of at least ``MIN_LAYERS`` layers: on two layers there is no middle.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FIGURES", "MIN_LAYERS", "draw", "layer_match", "roles_by_depth", "share_by_layer", "shape_of",
           "stat_percentiles_by_layer"]  # fmt: skip

MIN_LAYERS = 3
THRESHOLD = 0.5  # the paper's excess-correlation cut
LOWER_CUT = 0.3  # used (and said) when no neuron passes the paper's cut: the shape over depth still shows
# Gurnee et al. 2024, per-layer universal share of GPT2-small (layers 0..11), percent.
PAPER_GPT2_SMALL = [7.23, 7.94, 3.29, 3.58, 2.31, 2.34, 1.82, 3.65, 3.29, 4.62, 4.07, 5.76]
DEPTH_STATS = ["act_skew", "act_kurt", "act_freq", "input_bias", "l2_penalty", "vocab_kurt"]
FIGURES = {
    "depth_universal": "% universal per layer with the range over baseline draws, and against relative depth "
                       "beside the paper's GPT2-small",
    "depth_corr": "distribution of max correlation and of the rotated baseline per layer (all models; line = median)",
}
# the paper's median within-layer percentiles of universal neurons (GPT2-small)
PAPER_PERCENTILES = {"act_skew": 94, "act_kurt": 93, "input_bias": 18, "l2_penalty": 83, "act_freq": 23}


def _with_model(df: pd.DataFrame) -> pd.DataFrame:
    return df if "model" in df else df.assign(model="")


def share_by_layer(flags: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Per (model, layer): neurons, universal count (excess_corr > threshold) and percent, with the range over
    the baseline draws.

    ``percent_low`` counts the neurons universal against every draw (excess_min > t), ``percent_high`` those
    universal against at least one (excess_max > t): any single draw's share lies between them. Without the
    draws' columns (one-draw runs of older versions) both equal ``percent``.
    """
    df = _with_model(flags)
    uni = df["excess_corr"] > threshold if "excess_corr" in df else df["is_universal"].fillna(False).astype(bool)
    low = df["excess_min"].astype(float) > threshold if "excess_min" in df else uni
    high = df["excess_max"].astype(float) > threshold if "excess_max" in df else uni
    frame = df[["model", "layer"]].assign(universal=uni, low=low, high=high)
    out = frame.groupby(["model", "layer"], sort=True).agg(
        neurons=("universal", "size"), universal=("universal", "sum"), low=("low", "sum"), high=("high", "sum")
    ).reset_index()
    for col, src in (("percent", "universal"), ("percent_low", "low"), ("percent_high", "high")):
        out[col] = 100.0 * out[src] / out["neurons"]
    out["universal"] = out["universal"].astype(int)
    return out.drop(columns=["low", "high"])


def shape_of(percent_by_layer: pd.Series) -> str:
    """A word for the curve over depth: "U-shaped", "rising", "falling", "peaked in the middle" or "flat".

    U-shaped: the first and last layers' mean is at least 1.5x the middle layers' mean (the paper's GPT2-small:
    6.98 % against 3.04 %, 2.3x); rising/falling: the last third's mean is 1.5x the first third's or the reverse.
    """
    p = percent_by_layer.sort_index().to_numpy(dtype=float)
    if len(p) < MIN_LAYERS or not np.isfinite(p).all() or p.max() <= 0:
        return "flat"
    outer, middle = np.mean([p[0], p[-1]]), p[1:-1].mean()
    third = max(1, len(p) // 3)
    first, last = p[:third].mean(), p[-third:].mean()
    if outer >= 1.5 * middle and p[0] >= middle and p[-1] >= middle:
        return "U-shaped"
    if middle >= 1.5 * outer:
        return "peaked in the middle"
    if last >= 1.5 * max(first, 1e-12):
        return "rising"
    if first >= 1.5 * max(last, 1e-12):
        return "falling"
    return "flat"


def corr_by_layer(neurons: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer): 10/50/90th percentiles of the max correlation and of its rotated baseline."""
    rows = []
    for (model, layer), g in _with_model(neurons).groupby(["model", "layer"], sort=True):
        row: dict[str, Any] = {"model": model, "layer": int(layer)}
        for col, name in (("mean_corr", "corr"), ("mean_baseline", "baseline")):
            values = g[col].dropna().to_numpy(dtype=float) if col in g else np.array([])
            for q in (10, 50, 90):
                row[f"{name}_p{q}"] = float(np.percentile(values, q)) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def stat_percentiles_by_layer(stats: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Per layer (all models together): universal neurons and the median within-layer percentile of each statistic."""
    df = _with_model(stats)
    uni = df["is_universal"].fillna(False).astype(bool)
    metrics = [m for m in (metrics or DEPTH_STATS) if m in df]
    rows = []
    for layer in sorted(df["layer"].unique()):
        in_layer = df["layer"] == layer
        row: dict[str, Any] = {"layer": int(layer), "universal": int((uni & in_layer).sum())}
        for m in metrics:
            pct = df[f"{m}_pct"] if f"{m}_pct" in df else df.groupby(["model", "layer"])[m].rank(pct=True) * 100
            sel = pct[uni & in_layer].dropna()
            row[f"{m}_pct"] = float(sel.median()) if len(sel) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def roles_by_depth(roles: pd.DataFrame, flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per layer (mean over models): prediction/suppression neurons, those of them universal, vocab-kurtosis p50/p95."""
    df = _with_model(roles)
    if flags is not None and "is_universal" in flags and "is_universal" not in df:
        df = df.merge(_with_model(flags)[["model", "layer", "neuron", "is_universal"]],
                      on=["model", "layer", "neuron"], how="left")  # fmt: skip
    uni = df["is_universal"].fillna(False).astype(bool) if "is_universal" in df else pd.Series(False, df.index)
    n_models = max(1, df["model"].nunique())
    rows = []
    for layer in sorted(df["layer"].unique()):
        g, u = df[df["layer"] == layer], uni[df["layer"] == layer]
        row: dict[str, Any] = {"layer": int(layer)}
        for role in ("prediction", "suppression"):
            flag = g[f"is_{role}"].fillna(False).astype(bool) if f"is_{role}" in g else pd.Series(False, g.index)
            row[f"{role}_per_model"] = float(flag.sum()) / n_models
            row[f"universal_{role}"] = int((flag & u).sum())
        kurt = g["vocab_kurt"].dropna().to_numpy(dtype=float) if "vocab_kurt" in g else np.array([])
        for q in (50, 95):
            row[f"vocab_kurt_p{q}"] = float(np.percentile(kurt, q)) if len(kurt) else float("nan")
        uk = g.loc[u, "vocab_kurt"].dropna() if "vocab_kurt" in g else pd.Series(dtype=float)
        row["vocab_kurt_p50_universal"] = float(uk.median()) if len(uk) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def layer_match(similarity: pd.DataFrame) -> dict[str, float]:
    """Do layers match their own depth in the other seeds? Mean diagonal vs off-diagonal CKA, and the share of
    (model, other, layer) rows whose most similar layer of the other seed is the same layer."""
    s = similarity.dropna(subset=["cka"])
    diag = s[s["layer"] == s["other_layer"]]["cka"]
    off = s[s["layer"] != s["other_layer"]]["cka"]
    best = s.loc[s.groupby(["model", "other", "layer"])["cka"].idxmax()]
    return {"diagonal": float(diag.mean()), "off_diagonal": float(off.mean()),
            "same_layer_best": float((best["layer"] == best["other_layer"]).mean()), "rows": int(len(best))}


# --------------------------------------------------------------------------------------------------------------------
# The section


def _at_cut(df: pd.DataFrame, cut: float) -> pd.DataFrame:
    """is_universal := excess_corr > cut (the paper's rule at this cut), where the table has excess_corr."""
    return df.assign(is_universal=df["excess_corr"] > cut) if "excess_corr" in df else df


def _models(share: pd.DataFrame) -> str:
    n = share["model"].nunique()
    return "one model" if n == 1 else f"{n} models, mean over them"


def _extremes(series: pd.Series) -> str:
    hi, lo = series.idxmax(), series.idxmin()
    return f"highest in layer {hi} ({series[hi]:.2f} %), lowest in layer {lo} ({series[lo]:.2f} %)"


def _share_figure(page: Any, share: pd.DataFrame, new_figure: Callable, cut: float = THRESHOLD) -> str:
    fig, ax = new_figure(10, 3.6, ncols=2)
    n_layers = int(share["layer"].max()) + 1
    for i, (model, g) in enumerate(share.groupby("model", sort=False)):
        ax[0, 0].fill_between(g["layer"], g["percent_low"], g["percent_high"], color=f"C{i}", alpha=0.15, lw=0)
        ax[0, 0].plot(g["layer"], g["percent"], marker="os^Dv"[i % 5], color=f"C{i}", label=str(model) or None)
        depth = g["layer"] / max(1, n_layers - 1)
        ax[0, 1].plot(depth, g["percent"], marker="os^Dv"[i % 5], color=f"C{i}", alpha=0.8)
    paper_depth = np.arange(len(PAPER_GPT2_SMALL)) / (len(PAPER_GPT2_SMALL) - 1)
    ax[0, 1].plot(paper_depth, PAPER_GPT2_SMALL, "k--", lw=1.6, label="paper: GPT2-small")
    ax[0, 0].set(xlabel="layer", ylabel=f"% with excess > {cut} (band: over baseline draws)")
    ax[0, 1].set(xlabel="relative depth (0 = first layer, 1 = last)", ylabel=f"% with excess > {cut} (paper: 0.5)")
    ax[0, 0].xaxis.get_major_locator().set_params(integer=True)
    if share["model"].nunique() > 1 or share["model"].iloc[0]:
        ax[0, 0].legend(fontsize=7)
    ax[0, 1].legend(fontsize=7)
    return page.figure(fig, "depth_universal", FIGURES["depth_universal"])


def _corr_figure(page: Any, neurons: pd.DataFrame, new_figure: Callable) -> str:
    df = _with_model(neurons)
    layers = sorted(df["layer"].unique())
    fig, ax = new_figure(max(6, 0.9 * len(layers) + 2), 3.6)
    corr = [df.loc[df["layer"] == la, "mean_corr"].dropna().to_numpy() for la in layers]
    base = [df.loc[df["layer"] == la, "mean_baseline"].dropna().to_numpy() for la in layers]
    pos = np.arange(len(layers))
    for values, offset, colour, what in ((corr, -0.18, "C0", "max corr"), (base, 0.18, "C7", "baseline")):
        parts = ax[0, 0].violinplot([v if len(v) else [np.nan] for v in values], positions=pos + offset,
                                    widths=0.34, showmedians=True)  # fmt: skip
        for body in parts["bodies"]:
            body.set_facecolor(colour)
            body.set_alpha(0.45)
        for key in ("cmedians", "cbars", "cmins", "cmaxes"):
            parts[key].set_color(colour)
        ax[0, 0].plot([], [], color=colour, lw=6, alpha=0.45, label=what)
    ax[0, 0].axhline(THRESHOLD, color="k", lw=0.6, ls=":")
    ax[0, 0].set_xticks(pos, [str(la) for la in layers])
    ax[0, 0].set(xlabel="layer", ylabel="mean over other seeds of max correlation")
    ax[0, 0].legend(fontsize=7)
    return page.figure(fig, "depth_corr", FIGURES["depth_corr"])


def draw(page: Any, *, neurons: pd.DataFrame | None, flags: pd.DataFrame | None, stats: pd.DataFrame | None,
         roles: pd.DataFrame | None, similarity: pd.DataFrame | None, new_figure: Callable) -> bool:  # fmt: skip
    """Add the Depth section to ``page`` (the report's page); False (nothing added) for models under MIN_LAYERS."""
    if flags is None or "layer" not in flags or flags["layer"].nunique() < MIN_LAYERS:
        return False
    body: list[str] = []
    cut, cut_note = THRESHOLD, ""
    if "excess_corr" in flags and not (flags["excess_corr"] > THRESHOLD).any():
        cut = LOWER_CUT
        cut_note = (f" <b>No neuron passes the paper's cut of {THRESHOLD} here</b> (best excess correlation "
                    f"{flags['excess_corr'].max():.2f}); to show the shape over depth this section counts excess "
                    f"&gt; {cut} instead — a lower bar than the paper's, wherever it says 'universal' below.")
    flags = _at_cut(flags, cut)
    stats = _at_cut(stats, cut) if stats is not None else None
    share = share_by_layer(flags, cut)
    mean_share = share.groupby("layer")["percent"].mean()
    shape = shape_of(mean_share)
    spread = share.groupby("layer")["percent"].agg(["min", "max"])
    body.append(
        f"<h3>Universality over depth</h3><p>Paper (GPT-2 small): universal neurons are U-shaped over depth, "
        f"highest in layers 0–1 (7.2 %, 7.9 %) and the last layer (5.8 %), lowest in the middle (1.8 %). "
        f"Here ({_models(share)}): {_extremes(mean_share)}; the curve is "
        f"<b>{shape}</b>{', as in the paper' if shape == 'U-shaped' else ', unlike the paper'}. Across models a "
        f"layer's share varies by up to {float((spread['max'] - spread['min']).max()):.2f} points; the band is "
        f"the range of the share over the baseline draws.{cut_note}</p>"
    )
    body.append(_share_figure(page, share, new_figure, cut))
    body.append(page.table(share, "depth_universal"))
    if neurons is not None and {"layer", "mean_corr", "mean_baseline"} <= set(neurons.columns):
        corr = corr_by_layer(neurons)
        med = corr.groupby("layer")[["corr_p50", "baseline_p50"]].mean()
        gap = (med["corr_p50"] - med["baseline_p50"])
        body.append(
            "<h3>Max correlation per layer</h3><p>Paper: in every layer the max-correlation distribution sits well "
            "above the rotated baseline, with a tail of universal neurons past it. Here the median max correlation "
            f"runs from {med['corr_p50'].min():.3f} to {med['corr_p50'].max():.3f} and the baseline's from "
            f"{med['baseline_p50'].min():.3f} to {med['baseline_p50'].max():.3f}; the gap is widest in layer "
            f"{gap.idxmax()} ({gap.max():.3f}) and narrowest in layer {gap.idxmin()} ({gap.min():.3f}).</p>"
        )
        body.append(_corr_figure(page, neurons, new_figure))
        body.append(page.table(corr, "depth_corr"))
    if stats is not None and "is_universal" in stats and stats["is_universal"].fillna(False).astype(bool).any():
        pct = stat_percentiles_by_layer(stats)
        agree = []
        for m, p in PAPER_PERCENTILES.items():
            col = f"{m}_pct"
            if col in pct:
                v = pct[col].dropna()
                same = int(((v > 50) == (p > 50)).sum())
                agree.append(f"{m} {same} of {len(v)}")
        body.append(
            "<h3>Statistics of universal neurons by layer</h3><p>Paper (GPT-2 small, median within-layer "
            "percentiles of universal neurons): activation skew 94th, kurtosis 93rd, L2 penalty 83rd, input bias "
            "18th, activation frequency 23rd. Layers (with universal neurons) on the paper's side of the median "
            f"here: {html.escape(', '.join(agree)) or 'none measured'}.</p>"
            + page.table(pct, "depth_statistics")
        )
    if roles is not None and "layer" in roles:
        by = roles_by_depth(roles, flags)
        n_layers = len(by)
        late = by["layer"] >= n_layers / 2
        pred, sup = by["prediction_per_model"], by["suppression_per_model"]
        pred_late = float(pred[late].sum() / pred.sum()) if pred.sum() else float("nan")
        sup_peak = int(by.loc[sup.idxmax(), "layer"]) if sup.sum() else None
        pred_peak = int(by.loc[pred.idxmax(), "layer"]) if pred.sum() else None
        if pred.sum() == 0 and sup.sum() == 0:
            verdict = "no neuron passes the kurtosis > 10 cut in any layer, so the trend cannot show here"
        else:
            verdict = (f"{100 * pred_late:.0f} % of prediction neurons are in the second half (peak: layer "
                       f"{pred_peak}); suppression neurons peak in layer {sup_peak}"
                       + (" — the last layers, as in the paper" if sup_peak is not None and sup_peak >= n_layers - 2
                          else ", not in the last layers as in the paper"))  # fmt: skip
        body.append(
            "<h3>Prediction and suppression neurons by depth</h3><p>Paper (GPT-2 medium, Pythia): after the "
            "midpoint prediction neurons become prevalent, peaking before the final layers, where suppression "
            f"neurons dominate. Here: {html.escape(verdict)}. The vocab-kurtosis percentiles per layer are in the "
            "table (all neurons, and the universal ones' median).</p>"
            + page.table(by, "depth_roles")
        )
    if similarity is not None and len(similarity) and similarity["cka"].notna().any():
        m = layer_match(similarity)
        body.append(
            "<h3>Layer × layer similarity across seeds</h3><p>Layers of different seeds should match by depth: "
            f"the diagonal's mean CKA is {m['diagonal']:.3f} against {m['off_diagonal']:.3f} off it, and "
            f"{100 * m['same_layer_best']:.0f} % of layers are most similar to the same layer of the other seed "
            "(the heatmaps are in the Correlations section). The paper does not measure this; it is the check that "
            "depth is comparable across seeds before comparing neurons layer by layer.</p>"
        )
    page.add("depth", "Depth", "".join(body))
    return True
