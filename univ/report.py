"""``univ report DIR``: one self-contained HTML page of everything a run directory holds.

The page reads the tables the other stages wrote and draws the paper's figures from them:

    section                        needs                               written by
    run header                     run.json                            univ correlate
    correlations vs baseline       neurons.parquet, histograms.parquet univ correlate
    universal neurons per layer    neurons.parquet (+ universal flags) univ correlate / universal / analyze
    universal vs other statistics  profiles.parquet or stats.parquet   univ analyze / stats
    families                       profiles.parquet, families.parquet  univ analyze
    top-activating contexts        top_examples.parquet                univ analyze
    prediction / suppression       roles.parquet (or vocab moments)    univ roles
    entropy neurons                interventions.parquet               univ roles
    attention deactivation         bos_scores/attention(_points).parquet  univ roles

A section whose tables are missing is replaced by a line naming the command that produces them, so a
partial directory (run.json + neurons.parquet) still renders. Figures are PNGs drawn with matplotlib's Agg
canvas (no display, no global pyplot state), written to ``DIR/figures/`` and embedded as base64 ``data:`` URIs;
tables are HTML with a few lines of inline JavaScript that sort them on a header click, and each is also
written to ``DIR/tables/<name>.csv`` (linked relatively). The page loads nothing from the network: no CDN,
no web fonts, no external URL.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FIGURES", "register", "run_report"]

UNIVERSAL_THRESHOLD = 0.5  # the paper's excess-correlation cut, used when no universal table exists
MAX_TABLE_ROWS = 200  # rows shown in the page; the CSV beside it has all of them
DPI = 100

# Every figure the report can draw: file stem -> what it shows. A section draws its figures when its data exists.
FIGURES = {
    "corr_distributions": "max correlation vs baseline, and excess correlation (step histograms)",
    "corr_by_layer": "mean max correlation and baseline per layer",
    "corr_pairs": "distribution of all pairwise correlations per compared model",
    "universal_by_layer": "fraction of universal neurons per layer",
    "universal_stats": "within-layer percentiles of universal neurons' statistics (box plots)",
    "family_counts": "universal neurons per family",
    "prediction_trend": "percentiles of vocab kurtosis and skew per layer, and role counts",
    "entropy_curves": "entropy intervention: LN scale, entropy, loss, reciprocal rank vs fixed activation",
    "bos_scores": "attention-deactivation score h vs the random-direction baseline",
    "attention_path": "path intervention: activation vs change in BOS attention and head norm",
}
STAT_METRICS = [
    "act_freq", "act_mean", "act_var", "act_skew", "act_kurt", "input_bias", "in_out_sim", "l2_penalty",
    "w_in_norm", "w_out_norm", "vocab_kurt", "vocab_skew",
]  # fmt: skip
TOKEN_ACT_COLUMNS = ("acts", "activations", "token_acts", "token_values")  # per-token values, if a stage wrote them


# --------------------------------------------------------------------------------------------------------------------
# Page pieces


@dataclass
class _Page:
    """Collects sections, figures and tables while the report is drawn."""

    run_dir: Path
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, body html)
    figures: list[str] = field(default_factory=list)

    def figure(self, fig: Any, name: str, caption: str) -> str:
        """Save ``fig`` to figures/NAME.png and return an <img> with the PNG inlined."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
        data = buf.getvalue()
        path = self.run_dir / "figures" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        self.figures.append(name)
        b64 = base64.b64encode(data).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)} (<code>figures/{name}.png</code>)</figcaption></figure>"
        )

    def table(self, df: pd.DataFrame, name: str, *, max_rows: int = MAX_TABLE_ROWS) -> str:
        """A sortable HTML table of the first ``max_rows`` rows; the whole table goes to tables/NAME.csv."""
        path = self.run_dir / "tables" / f"{name}.csv"
        path.parent.mkdir(exist_ok=True)
        df.to_csv(path, index=False)
        shown = df.head(max_rows)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in shown.itertuples(index=False)
        )
        note = f"{len(df)} row{'s' * (len(df) != 1)}" if len(df) <= max_rows else f"first {max_rows} of {len(df)} rows"
        return (
            f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'<p class="note">{note}; click a header to sort; all rows in <a href="tables/{name}.csv">'
            f"tables/{name}.csv</a></p>"
        )

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return " | ".join(repr(x) if isinstance(x, str) else _fmt(x) for x in list(v))
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "" if math.isnan(v) else str(v)
        return f"{v:.4g}"
    return str(v)


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">No {html.escape(what)} yet: run <code>{html.escape(command)}</code>.</p>'


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _integer_x(*axes: Any) -> None:
    """Layers are integers: no 0.5 ticks on a two-layer model."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _read(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception:  # a half-written or foreign file must not sink the whole report
        return None


# --------------------------------------------------------------------------------------------------------------------
# Sections


def _header(page: _Page, manifest: dict | None, run_dir: Path) -> None:
    if manifest is None:
        page.add("run", "Run", _missing("run.json", f"univ correlate MODELS --data DATA --out {run_dir}"))
        return
    labels = manifest.get("labels") or []
    models = manifest.get("models") or []
    analysed = set(manifest.get("analysed") or [])
    rows = [{"label": lab, "model": mod, "analysed": lab in analysed} for lab, mod in zip(labels, models, strict=False)]
    data = manifest.get("data") or {}
    facts = {
        "tokens": f"{manifest.get('tokens', '?'):,}" if isinstance(manifest.get("tokens"), int) else "?",
        "baseline": f"{manifest.get('baseline', '?')} (seed {manifest.get('baseline_seed', '?')})",
        "mode": manifest.get("mode", "?"),
        "data": f"{data.get('source', '?')} (ctx {data.get('ctx', '?')}, batch {data.get('batch_size', '?')}, "
        f"seed {data.get('seed', '?')})",
        "device": f"{manifest.get('device', '?')}, model {manifest.get('model_dtype', '?')}, "
        f"operands {manifest.get('operand_dtype', '?')}",
        "timings": ", ".join(f"{k} {v}" for k, v in (manifest.get("timings") or {}).items()) or "?",
        "versions": ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()) or "?",
    }
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items())
    body = f"<dl>{dl}</dl>" + page.table(pd.DataFrame(rows, columns=["label", "model", "analysed"]), "models")
    page.add("run", "Run", body)


def _correlations(page: _Page, neurons: pd.DataFrame | None, hist: pd.DataFrame | None, run_dir: Path) -> None:
    if neurons is None:
        page.add("correlations", "Correlations", _missing("neurons.parquet", f"univ correlate … --out {run_dir}"))
        return
    body = []
    models = list(pd.unique(neurons["model"])) if "model" in neurons else [""]
    neurons = neurons if "model" in neurons else neurons.assign(model="")
    fig, ax = _new_figure(11, 3.6, ncols=2)
    bins = np.linspace(-0.05, 1.0, 64)
    for i, model in enumerate(models):
        g = neurons[neurons["model"] == model]
        color = f"C{i}"
        for col, style, what in (("mean_corr", "-", "max corr"), ("mean_baseline", "--", "baseline")):
            if col in g:
                ax[0, 0].hist(g[col].dropna(), bins=bins, histtype="step", color=color, linestyle=style,
                              label=f"{model} {what}".strip())  # fmt: skip
        if "excess_corr" in g:
            ax[0, 1].hist(g["excess_corr"].dropna(), bins=np.linspace(-0.3, 1.0, 66), histtype="step", color=color,
                          label=str(model) or None)  # fmt: skip
    ax[0, 0].set(xlabel="mean over compared models of max correlation", ylabel="neurons", yscale="log")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].axvline(UNIVERSAL_THRESHOLD, color="k", lw=0.8, ls=":")
    ax[0, 1].set(xlabel="excess correlation (max corr − baseline)", ylabel="neurons", yscale="log")
    body.append(page.figure(fig, "corr_distributions", FIGURES["corr_distributions"]))

    if "layer" in neurons and "mean_corr" in neurons:
        fig, ax = _new_figure(6, 3.4)
        for i, model in enumerate(models):
            g = neurons[neurons["model"] == model].groupby("layer")[["mean_corr", "mean_baseline"]].mean()
            ax[0, 0].plot(g.index, g["mean_corr"], "o-", color=f"C{i}", label=f"{model} max corr".strip())
            if "mean_baseline" in g:
                ax[0, 0].plot(g.index, g["mean_baseline"], "o--", color=f"C{i}", label=f"{model} baseline".strip())
        ax[0, 0].set(xlabel="layer", ylabel="mean over neurons")
        ax[0, 0].legend(fontsize=8)
        _integer_x(ax[0, 0])
        body.append(page.figure(fig, "corr_by_layer", FIGURES["corr_by_layer"]))

    if hist is not None and len(hist):
        fig, ax = _new_figure(6, 3.4)
        for i, ((model, other), g) in enumerate(hist.groupby(["model", "other"], sort=False)):
            centres = (g["bin_left"] + g["bin_right"]) / 2
            counts = g["count"].where(g["count"] > 0)
            ax[0, 0].step(centres, counts, where="mid", color=f"C{i}", label=f"{model} vs {other}")
        ax[0, 0].set(xlabel="Pearson r (every neuron pair)", ylabel="pairs", yscale="log")
        ax[0, 0].legend(fontsize=8)
        body.append(page.figure(fig, "corr_pairs", FIGURES["corr_pairs"]))
    else:
        body.append(_missing("histograms.parquet", f"univ correlate … --out {run_dir}"))
    cols = [c for c in ("mean_corr", "mean_baseline", "excess_corr") if c in neurons]
    summary = neurons.groupby(["model", "layer"])[cols].mean().reset_index() if "layer" in neurons else None
    if summary is not None:
        body.append(page.table(summary, "correlation_by_layer"))
    page.add("correlations", "Correlations", "".join(body))


def _universal_flags(run_dir: Path, neurons: pd.DataFrame | None, profiles: pd.DataFrame | None) -> tuple:
    """(DataFrame model, layer, neuron, is_universal[, excess_corr], where the flags came from) or (None, "")."""
    if profiles is not None and "is_universal" in profiles and {"layer", "neuron"} <= set(profiles.columns):
        df = profiles if "model" in profiles else profiles.assign(model="")
        return df, "profiles.parquet"
    if neurons is None:
        return None, ""
    df = neurons if "model" in neurons else neurons.assign(model="")
    universal = _read(run_dir, "universal.parquet")
    if universal is not None and {"layer", "neuron"} <= set(universal.columns):
        u = universal if "model" in universal else universal.assign(model="")
        keys = set(zip(u["model"], u["layer"], u["neuron"], strict=True))
        flags = [k in keys for k in zip(df["model"], df["layer"], df["neuron"], strict=True)]
        return df.assign(is_universal=flags), "universal.parquet"
    if "excess_corr" in df:
        return df.assign(is_universal=df["excess_corr"] > UNIVERSAL_THRESHOLD), (
            f"excess_corr > {UNIVERSAL_THRESHOLD} in neurons.parquet (run 'univ universal' for other rules)"
        )
    return None, ""


def _universal(page: _Page, flags: pd.DataFrame | None, source: str, run_dir: Path) -> None:
    if flags is None:
        page.add("universal", "Universal neurons", _missing("universal flags", f"univ universal {run_dir}"))
        return
    counts = flags.groupby(["model", "layer"])["is_universal"].agg(neurons="size", universal="sum").reset_index()
    counts["universal"] = counts["universal"].astype(int)
    counts["percent"] = 100 * counts["universal"] / counts["neurons"]
    fig, ax = _new_figure(6, 3.4)
    models = list(pd.unique(counts["model"]))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        g = counts[counts["model"] == model]
        ax[0, 0].bar(g["layer"] + (i - (len(models) - 1) / 2) * width, g["percent"], width=width, color=f"C{i}",
                     label=str(model) or None)  # fmt: skip
    ax[0, 0].set(xlabel="layer", ylabel="% universal")
    _integer_x(ax[0, 0])
    if any(models):
        ax[0, 0].legend(fontsize=8)
    totals = counts.groupby("model")[["neurons", "universal"]].sum()
    lines = ", ".join(
        f"{m or 'model'}: {int(r.universal):,} of {int(r.neurons):,} ({100 * r.universal / r.neurons:.2f} %)"
        for m, r in totals.iterrows()
    )
    body = (
        f"<p>Universal flags from {html.escape(source)}. {html.escape(lines)}. The paper finds a U shape over depth "
        "(GPT2-small 4.16 %, GPT2-medium 1.23 %, Pythia-160m 1.26 %).</p>"
        + page.figure(fig, "universal_by_layer", FIGURES["universal_by_layer"])
        + page.table(counts, "universal_by_layer")
    )
    page.add("universal", "Universal neurons", body)


def _statistics(page: _Page, table: pd.DataFrame | None, source: str, run_dir: Path) -> None:
    if table is None or "is_universal" not in table:
        what = "neuron statistics (profiles.parquet / stats.parquet)"
        page.add("statistics", "Universal vs other neurons", _missing(what, f"univ analyze {run_dir}"))
        return
    df = table if "model" in table else table.assign(model="")
    metrics = [m for m in STAT_METRICS if m in df]
    if not metrics:
        page.add("statistics", "Universal vs other neurons", _missing("statistic columns", f"univ analyze {run_dir}"))
        return
    uni = df["is_universal"].fillna(False).astype(bool)
    if not uni.any():
        page.add("statistics", "Universal vs other neurons",
                 f"<p>No universal neuron in {html.escape(source)}: nothing to compare (a lower threshold: "
                 f"<code>univ analyze {html.escape(str(run_dir))} --threshold 0.3</code>).</p>")  # fmt: skip
        return
    pct = {}
    for m in metrics:
        if f"{m}_pct" in df:
            pct[m] = df[f"{m}_pct"]
        else:
            pct[m] = df.groupby(["model", "layer"], sort=False)[m].rank(pct=True) * 100
    fig, ax = _new_figure(max(6, 0.75 * len(metrics)), 3.8)
    data = [pct[m][uni].dropna().to_numpy() for m in metrics]
    if any(len(d) for d in data):
        ax[0, 0].boxplot([d if len(d) else [np.nan] for d in data], showfliers=False)
        ax[0, 0].set_xticks(range(1, len(metrics) + 1), metrics, rotation=45, ha="right")
    ax[0, 0].axhline(50, color="k", lw=0.8, ls=":")
    ax[0, 0].set(ylabel="within-layer percentile (universal neurons)", ylim=(0, 100))
    rows = [
        {
            "metric": m,
            "universal_pct_median": float(np.nanmedian(pct[m][uni])) if uni.any() else float("nan"),
            "other_pct_median": float(np.nanmedian(pct[m][~uni])) if (~uni).any() else float("nan"),
            "universal_median": float(df.loc[uni, m].median()),
            "other_median": float(df.loc[~uni, m].median()),
        }
        for m in metrics
    ]
    body = (
        f"<p>From {html.escape(source)}: {int(uni.sum()):,} universal, {int((~uni).sum()):,} other neurons. The paper "
        "(GPT2-small medians): activation skew ~94th, kurtosis ~93rd, input bias ~18th, L2 penalty ~83rd, "
        "activation frequency ~23rd percentile.</p>"
        + page.figure(fig, "universal_stats", FIGURES["universal_stats"])
        + page.table(pd.DataFrame(rows), "universal_stats")
    )
    page.add("statistics", "Universal vs other neurons", body)


def _families(page: _Page, profiles: pd.DataFrame | None, families: pd.DataFrame | None, flags: Any, run_dir: Path):
    """Family counts of universal neurons and the best-explained examples of each family.

    profiles.parquet carries the family column when 'univ analyze' ran; families.parquet alone (from
    'univ families') works too. Every neuron's row stays in the CSV, the page shows counts and examples.
    """
    source, name = (profiles, "profiles.parquet") if profiles is not None and "family" in profiles else (
        families, "families.parquet")  # fmt: skip
    if source is None or "family" not in source or not {"layer", "neuron"} <= set(source.columns):
        what = "families (profiles.parquet with a family column, or families.parquet)"
        page.add("families", "Neuron families", _missing(what, f"univ analyze {run_dir}"))
        return
    df = source if "model" in source else source.assign(model="")
    if "is_universal" not in df and flags is not None and "is_universal" in flags:
        df = df.merge(flags[["model", "layer", "neuron", "is_universal"]], on=["model", "layer", "neuron"], how="left")
    universal_only = "is_universal" in df and bool(df["is_universal"].fillna(False).astype(bool).any())
    if universal_only:
        df = df[df["is_universal"].fillna(False).astype(bool)]
    elif "is_universal" in df:
        name += " (no universal neuron in this run, so every neuron is counted)"
    fam = df["family"].fillna("").astype(str)
    df = df.assign(family=fam.where(fam != "", "unexplained"))
    body = [f"<p>From {name}; {'universal neurons' if universal_only else 'all neurons'}: {len(df):,}.</p>"]
    if len(df):
        counts = df["family"].value_counts()
        fig, ax = _new_figure(6, max(2.0, 0.35 * len(counts) + 1))
        ax[0, 0].barh(counts.index[::-1], counts.to_numpy()[::-1], color="C0")
        ax[0, 0].set(xlabel="universal neurons" if universal_only else "neurons")
        body.append(page.figure(fig, "family_counts", FIGURES["family_counts"]))
        cols = [c for c in ("model", "family", "layer", "neuron", "best_feature", "best_vr", "excess_corr") if c in df]
        ranked = df.sort_values("best_vr", ascending=False) if "best_vr" in df else df
        examples = ranked.groupby("family", sort=False).head(5)[cols].sort_values("family", kind="stable")
        body.append("<h3>Best-explained examples per family</h3>" + page.table(examples, "family_examples"))
    page.add("families", "Neuron families", "".join(body))


def _load_tokenizer(manifest: dict | None, label: str) -> Any | None:
    if not manifest:
        return None
    labels, models = manifest.get("labels") or [], manifest.get("models") or []
    source = models[labels.index(label)] if label in labels and len(models) == len(labels) else None
    if source is None and models:
        source = models[0]
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=True)  # a report never downloads
    except Exception:  # offline hub name, moved directory: fall back to the stored text
        return None


def _context_html(tokens: Sequence[int], position: int, acts: Sequence[float] | None, tokenizer: Any) -> str:
    """One context: each token a <span>, coloured by activation (if given), the max token outlined."""
    pieces = tokenizer.batch_decode([[int(t)] for t in tokens], clean_up_tokenization_spaces=False)
    top = max((a for a in acts if a is not None and math.isfinite(a)), default=0.0) if acts is not None else 0.0
    spans = []
    for i, piece in enumerate(pieces):
        text = html.escape(piece).replace("\n", "↵")
        style = ""
        if acts is not None and top > 0 and i < len(acts) and acts[i] is not None and math.isfinite(acts[i]):
            alpha = max(0.0, min(1.0, float(acts[i]) / top))
            style = f"background: rgba(255, 140, 0, {alpha:.2f});"
        cls = ' class="max"' if i == position else ""
        title = f' title="{float(acts[i]):.3g}"' if acts is not None and i < len(acts) else ""
        spans.append(f'<span{cls} style="{style}"{title}>{text}</span>')
    return "".join(spans)


def _examples(
    page: _Page, top: pd.DataFrame | None, flags: pd.DataFrame | None, manifest: dict | None, run_dir: Path,
    max_neurons: int, max_examples: int,
) -> None:  # fmt: skip
    if top is None or not len(top):
        page.add("examples", "Top-activating contexts", _missing("top_examples.parquet", f"univ analyze {run_dir}"))
        return
    top = top if "model" in top else top.assign(model="")
    keys = top[["model", "layer", "neuron"]].drop_duplicates()
    if flags is not None and "is_universal" in flags:
        f = flags[flags["is_universal"].fillna(False).astype(bool)]
        order = f.sort_values("excess_corr", ascending=False) if "excess_corr" in f else f
        wanted = [k for k in zip(order["model"], order["layer"], order["neuron"], strict=True)]
        present = set(zip(keys["model"], keys["layer"], keys["neuron"], strict=True))
        chosen = [k for k in wanted if k in present] or sorted(present)
    else:
        chosen = sorted(zip(keys["model"], keys["layer"], keys["neuron"], strict=True))
    shown = chosen[:max_neurons]
    act_col = next((c for c in TOKEN_ACT_COLUMNS if c in top), None)
    tokenizers: dict[str, Any] = {}
    blocks = [
        f'<p class="note">{len(shown)} of {len(chosen)} neurons (universal first, by excess correlation); '
        f"{'tokens coloured by activation' if act_col else 'the max-activating token outlined'}.</p>"
    ]
    by_key = top.groupby(["model", "layer", "neuron"], sort=False)
    for model, layer, neuron in shown:
        g = by_key.get_group((model, layer, neuron))
        g = g.sort_values("rank") if "rank" in g else g.sort_values("value", ascending=False)
        if model not in tokenizers:
            tokenizers[model] = _load_tokenizer(manifest, model)
        tok = tokenizers[model]
        items = []
        for r in g.head(max_examples).itertuples(index=False):
            value = getattr(r, "value", float("nan"))
            tokens = getattr(r, "tokens", None)
            position = int(getattr(r, "position", -1))
            acts = list(getattr(r, act_col)) if act_col else None
            if tok is not None and tokens is not None and len(tokens):
                ctx = _context_html(list(tokens), position, acts, tok)
            else:
                ctx = html.escape(str(getattr(r, "text", "")))
            items.append(f'<li><span class="val">{_fmt(float(value))}</span> <span class="ctx">{ctx}</span></li>')
        title = f"{model} L{layer}.N{neuron}".strip()
        blocks.append(f"<h3>{html.escape(title)}</h3><ol>{''.join(items)}</ol>")
    page.add("examples", "Top-activating contexts", "".join(blocks))


def _roles_source(run_dir: Path, roles: pd.DataFrame | None, profiles: pd.DataFrame | None) -> tuple:
    """The table to draw the prediction/suppression trend from, and where it came from."""
    if roles is not None and {"vocab_kurt", "vocab_skew", "layer", "role"} <= set(roles.columns):
        return roles, "roles.parquet"
    for name, df in (("profiles.parquet", profiles), ("stats.parquet", _read(run_dir, "stats.parquet"))):
        if df is not None and {"vocab_kurt", "vocab_skew", "layer"} <= set(df.columns):
            from univ.roles import classify_roles

            return classify_roles(df), f"vocab moments of {name} (default thresholds)"
    return None, ""


def _prediction(page: _Page, roles: pd.DataFrame | None, source: str, flags: pd.DataFrame | None, run_dir: Path):
    if roles is None:
        page.add("prediction", "Prediction, suppression and partition neurons",
                 _missing("vocabulary role scores (roles.parquet)", f"univ roles {run_dir}"))  # fmt: skip
        return
    from univ.roles import layer_trend

    df = roles if "model" in roles else roles.assign(model="")
    trend = layer_trend(df)
    fig, ax = _new_figure(13, 3.6, ncols=3)
    models = list(pd.unique(trend["model"]))
    pct_cols = [c for c in trend.columns if c.startswith("kurt_p")]
    for i, model in enumerate(models):
        t = trend[trend["model"] == model]
        for j, c in enumerate(pct_cols):
            p = c.removeprefix("kurt_")
            style = dict(color=f"C{j}", lw=2.0 if p == "p50" else 1.0, ls="-" if i == 0 else "--")
            ax[0, 0].plot(t["layer"], t[c], label=p if i == 0 else None, **style)
            ax[0, 1].plot(t["layer"], t[f"skew_{p}"], **style)
        if "n_prediction" in t:
            for role, marker, color in (
                ("prediction", "o", "C2"),
                ("suppression", "s", "C3"),
                ("partition", "^", "C4"),
            ):
                style = dict(marker=marker, color=color, ls="-" if i == 0 else "--")
                ax[0, 2].plot(t["layer"], t[f"n_{role}"], label=role if i == 0 else None, **style)
    ax[0, 0].axhline(10, color="k", lw=0.8, ls=":")
    ax[0, 0].set(xlabel="layer", ylabel="vocab kurtosis of cos(W_U, w_out)", yscale="log")
    ax[0, 0].legend(fontsize=7, title="percentile", title_fontsize=7)
    ax[0, 1].axhline(0, color="k", lw=0.8, ls=":")
    ax[0, 1].set(xlabel="layer", ylabel="vocab skew")
    ax[0, 2].set(xlabel="layer", ylabel="neurons with the role")
    ax[0, 2].legend(fontsize=7)
    _integer_x(*ax[0])
    counts = df.groupby(["model", "role"]).size().rename("neurons").reset_index()
    body = [
        f"<p>From {html.escape(source)}, all neurons. Prediction: vocab kurtosis &gt; 10 and positive skew; "
        "suppression: negative skew; partition: high vocab variance. The paper sees prediction neurons after the "
        "middle of the network and suppression neurons dominating the last layers"
        + (f" ({len(models)} models: solid = {html.escape(str(models[0]))})" if len(models) > 1 else "")
        + ".</p>",
        page.figure(fig, "prediction_trend", FIGURES["prediction_trend"]),
        page.table(counts, "role_counts"),
    ]
    named = df[df["role"].isin(["prediction", "suppression", "partition", "entropy", "attention"])]
    if len(named):
        if flags is not None and "is_universal" in flags:
            f = flags if "model" in flags else flags.assign(model="")
            named = named.merge(f[["model", "layer", "neuron", "is_universal"]], on=["model", "layer", "neuron"],
                                how="left")  # fmt: skip
            named = named.sort_values(["is_universal", "role"], ascending=[False, True], kind="stable")
        cols = ["model", "layer", "neuron", "role", "is_universal", "vocab_kurt", "vocab_skew", "vocab_var_ratio",
                "null_share", "w_out_norm", "top_bos_head", "bos_z", "top_promoted", "top_suppressed"]  # fmt: skip
        body.append("<h3>Neurons with a role</h3>" + page.table(named[[c for c in cols if c in named]], "role_neurons"))
    page.add("prediction", "Prediction, suppression and partition neurons", "".join(body))


def _entropy(page: _Page, curves: pd.DataFrame | None, run_dir: Path) -> None:
    if curves is None or not len(curves):
        page.add("entropy", "Entropy neurons", _missing("intervention results (interventions.parquet)",
                                                         f"univ roles {run_dir}"))  # fmt: skip
        return
    metrics = [("ln_scale", "final norm scale σ"), ("entropy", "next-token entropy (nats)"), ("loss", "loss"),
               ("mrr", "mean reciprocal rank")]  # fmt: skip
    fig, ax = _new_figure(14, 3.4, ncols=4)
    fixed = curves[curves["kind"] != "nominal"]
    use_multiple = fixed["multiple"].notna().all() if "multiple" in fixed else False
    xcol = "multiple" if use_multiple else "value"
    k = 0
    several = fixed["model"].nunique() > 1
    for (model, layer, neuron, kind), g in fixed.groupby(["model", "layer", "neuron", "kind"], sort=False):
        g = g.sort_values(xcol)
        random = kind == "random"
        color = "0.6" if random else f"C{k % 10}"
        k += 0 if random else 1
        label = None if random else (f"{model} " if several else "") + f"L{layer}.N{neuron}"
        for j, (m, _) in enumerate(metrics):
            ax[0, j].plot(g[xcol], g[m], "-o" if not random else "-", color=color, lw=1.8 if not random else 0.8,
                          ms=3, label=label)  # fmt: skip
    nominal = curves[curves["kind"] == "nominal"]
    for j, (m, name) in enumerate(metrics):
        for v in nominal[m]:
            ax[0, j].axhline(v, color="k", lw=0.8, ls="--")
        ax[0, j].set(xlabel="fixed activation" + (" (× typical max)" if use_multiple else ""), ylabel=name)
    ax[0, 0].legend(fontsize=7, title="grey: random neurons; dashed: no intervention", title_fontsize=6)
    summary = (
        fixed.sort_values(xcol)
        .groupby(["model", "layer", "neuron", "kind"], sort=False)
        .agg(act_max=("act_max", "first"), entropy_low=("entropy", "first"), entropy_high=("entropy", "last"),
             ln_scale_low=("ln_scale", "first"), ln_scale_high=("ln_scale", "last"), rank_low=("true_rank", "first"),
             rank_high=("true_rank", "last"))
        .reset_index()
    )  # fmt: skip
    body = (
        "<p>Each neuron's post-activation fixed at every position; means over the batches' valid positions. The "
        "final norm's scale is σ = sqrt(Var(x) + eps) of the residual it normalises (TransformerLens' "
        "ln_final.hook_scale; the logits are divided by it). An entropy neuron raises σ and the entropy while "
        "keeping the ranks (a temperature); random neurons of the same layers are the baseline.</p>"
        + page.figure(fig, "entropy_curves", FIGURES["entropy_curves"])
        + page.table(summary, "entropy_summary")
    )
    page.add("entropy", "Entropy neurons", body)


def _attention(
    page: _Page, hist: pd.DataFrame | None, attn: pd.DataFrame | None, points: pd.DataFrame | None, run_dir: Path
) -> None:
    body = []
    if hist is not None and len(hist):
        fig, ax = _new_figure(6, 3.4)
        for model, gm in hist.groupby("model", sort=False):
            for source, g in gm.groupby("source", sort=False):
                density = g["count"] / max(1, g["count"].sum()) / (g["bin_right"] - g["bin_left"])
                density = density.where(g["count"] > 0)  # empty bins: a gap, not a floor value on a log axis
                centres = (g["bin_left"] + g["bin_right"]) / 2
                label = "ŵ_out W_Q k_BOS (neurons)" if source == "neurons" else "R W_Q k_BOS (random baseline)"
                ax[0, 0].step(centres, density, where="mid", color="C0" if source == "neurons" else "0.5",
                              label=f"{model}: {label}")  # fmt: skip
        ax[0, 0].set(xlabel="h = ŵ_outᵀ W_Qʰ k_BOSʰ · scale (1/√d_head)", ylabel="density", yscale="log")
        ax[0, 0].legend(fontsize=7)
        body.append(page.figure(fig, "bos_scores", FIGURES["bos_scores"]))
    if points is not None and len(points):
        fig, ax = _new_figure(11, 3.6, ncols=2)
        keys = ["model", "layer", "neuron", "head_layer", "head"]
        for i, (key, g) in enumerate(points.groupby(keys, sort=False)):
            dp = g["p_bos_clean"] - g["p_bos_ablated"]
            frac = 100 * (g["z_norm_clean"] - g["z_norm_ablated"]) / g["z_norm_ablated"].where(g["z_norm_ablated"] > 0)
            label = f"L{key[1]}.N{key[2]} → L{key[3]}.H{key[4]}"
            ax[0, 0].scatter(g["act"], dp, s=4, alpha=0.5, color=f"C{i % 10}", label=label)
            ax[0, 1].scatter(dp, frac, s=4, alpha=0.5, color=f"C{i % 10}")
        ax[0, 0].set(xlabel="neuron activation", ylabel="ΔP(attend to BOS), clean − query-ablated")
        ax[0, 0].legend(fontsize=7, markerscale=3)
        ax[0, 1].set(xlabel="ΔP(attend to BOS)", ylabel="Δ‖z‖ of the head (%)")
        body.append(page.figure(fig, "attention_path", FIGURES["attention_path"]))
    if attn is not None and len(attn):
        body.append(page.table(attn, "attention_path"))
    if not body:
        body.append(_missing("attention scores or path interventions", f"univ roles {run_dir}"))
    else:
        body.insert(0, "<p>h &gt; 0: the neuron pushes the head's query towards BOS, the head attends to BOS and its "
                       "output shrinks (deactivation). The path intervention removes the neuron's output from the "
                       "head's queries only (keys and values untouched).</p>")  # fmt: skip
    page.add("attention", "Attention-deactivation neurons", "".join(body))


# --------------------------------------------------------------------------------------------------------------------
# Assembly

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; } code { background: #f4f4f4; padding: 0 .2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dt { font-weight: 600; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-dir="asc"]::after { content: " ▲"; } th[data-dir="desc"]::after { content: " ▼"; }
td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: .85em; color: #555; }
.missing { color: #a60; font-style: italic; } .note { font-size: .85em; color: #555; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; font-size: .85em; }
.ctx span.max { outline: 2px solid #c00; } .val { font-family: ui-monospace, Menlo, Consolas, monospace;
       font-size: .8em; color: #555; display: inline-block; min-width: 4em; }
ol { padding-left: 1.5em; } li { margin: .2em 0; }
"""

# Sort a table by the clicked column: numbers numerically, anything else as text; click again to reverse.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var row = th.parentNode, table = row.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(row.children, th);
    var dir = th.getAttribute("data-dir") === "asc" ? "desc" : "asc";
    row.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
    th.setAttribute("data-dir", dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].textContent, y = b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _assemble(page: _Page, title: str) -> str:
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in page.sections)
    sections = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in page.sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>{sections}"
        f"<script>{_JS}</script></body></html>\n"
    )


def run_report(run_dir: str | Path, *, max_neurons: int = 50, max_examples: int = 5) -> Path:
    """Render DIR/report.html (+ DIR/figures/*.png, DIR/tables/*.csv) from whatever the run directory holds.

    Prints nothing; returns the path of the page. Needs run.json or neurons.parquet; every other table is
    optional (its section says which command makes it). ``max_neurons``/``max_examples`` cap the contexts.
    """
    run_dir = Path(run_dir)
    manifest = None
    if (run_dir / "run.json").is_file():
        manifest = json.loads((run_dir / "run.json").read_text())
    neurons = _read(run_dir, "neurons.parquet")
    if manifest is None and neurons is None:
        raise FileNotFoundError(
            f"{run_dir} holds neither run.json nor neurons.parquet: pass a directory written by 'univ correlate'"
        )
    for old in (run_dir / "figures").glob("*.png"):
        if old.stem in FIGURES:
            old.unlink()  # a figure whose data is gone must not linger beside the new page
    profiles = _read(run_dir, "profiles.parquet")
    stats_table, stats_source = (profiles, "profiles.parquet") if profiles is not None else (
        _read(run_dir, "stats.parquet"), "stats.parquet")  # fmt: skip
    flags, flag_source = _universal_flags(run_dir, neurons, profiles)
    if stats_table is not None and "is_universal" not in stats_table and flags is not None:
        f = flags[["model", "layer", "neuron", "is_universal"]]
        st = stats_table if "model" in stats_table else stats_table.assign(model=f["model"].iloc[0] if len(f) else "")
        stats_table = st.merge(f, on=["model", "layer", "neuron"], how="left")

    page = _Page(run_dir)
    roles, roles_source = _roles_source(run_dir, _read(run_dir, "roles.parquet"), profiles)
    sections = [
        ("run", "Run", lambda: _header(page, manifest, run_dir)),
        ("correlations", "Correlations",
         lambda: _correlations(page, neurons, _read(run_dir, "histograms.parquet"), run_dir)),
        ("universal", "Universal neurons", lambda: _universal(page, flags, flag_source, run_dir)),
        ("statistics", "Universal vs other neurons",
         lambda: _statistics(page, stats_table, stats_source, run_dir)),
        ("families", "Neuron families",
         lambda: _families(page, profiles, _read(run_dir, "families.parquet"), flags, run_dir)),
        ("examples", "Top-activating contexts",
         lambda: _examples(page, _read(run_dir, "top_examples.parquet"), flags, manifest, run_dir, max_neurons,
                           max_examples)),
        ("prediction", "Prediction, suppression and partition neurons",
         lambda: _prediction(page, roles, roles_source, flags, run_dir)),
        ("entropy", "Entropy neurons", lambda: _entropy(page, _read(run_dir, "interventions.parquet"), run_dir)),
        ("attention", "Attention-deactivation neurons",
         lambda: _attention(page, _read(run_dir, "bos_scores.parquet"), _read(run_dir, "attention.parquet"),
                            _read(run_dir, "attention_points.parquet"), run_dir)),
    ]  # fmt: skip
    for anchor, title, draw in sections:
        try:
            draw()
        except Exception as e:  # a table with an unexpected schema costs its section, not the whole page
            warnings.warn(f"report section {title!r} failed: {type(e).__name__}: {e}", stacklevel=2)
            msg = f"This section could not be drawn: {type(e).__name__}: {e}"
            page.add(anchor, title, f'<p class="missing">{html.escape(msg)}</p>')

    labels = ", ".join((manifest or {}).get("analysed") or (manifest or {}).get("labels") or [])
    title = f"univ report — {run_dir.name}" + (f" ({labels})" if labels else "")
    out = run_dir / "report.html"
    from univ_kernels.streaming import atomic_write_bytes

    atomic_write_bytes(out, _assemble(page, title).encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _main(args: argparse.Namespace) -> int:
    print(run_report(args.dir, max_neurons=args.max_neurons, max_examples=args.max_examples))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ report``."""
    p = subparsers.add_parser(
        "report",
        help="render DIR/report.html from a run directory (figures embedded, works offline)",
        description=(
            "Draw the paper's figures from whatever DIR holds and write one self-contained page, DIR/report.html:\n"
            "max-correlation vs baseline distributions, universal neurons per layer, universal-vs-other statistics,\n"
            "neuron families, top-activating contexts, the prediction/suppression layer trend, entropy and\n"
            "attention-deactivation interventions. Missing tables leave a line naming the command that makes them\n"
            "(univ correlate, universal, analyze, roles). Figures are embedded as PNG and also written to\n"
            "DIR/figures/; tables sort on a header click and are written to DIR/tables/*.csv. The page loads\n"
            "nothing from the network."
        ),
        epilog="examples:\n  univ report runs/small\n  univ report runs/small --max-neurons 200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="run directory (run.json, neurons.parquet, and any later tables)")
    p.add_argument("--max-neurons", type=int, default=50, help="neurons with top-activating contexts (default 50)")
    p.add_argument("--max-examples", type=int, default=5, help="contexts per neuron (default 5)")
    p.set_defaults(func=_main)
    return p
