"""``univ report DIR``: one self-contained HTML page of everything a run directory holds.

The page answers at a glance, then explains. From the top:

    section                        needs                               written by
    at a glance (summary card)     run.json, neurons.parquet (+ flags) univ correlate / universal / analyze
    universal neurons, one by one  profiles.parquet (+ roles, contexts) univ analyze / roles
    run                            run.json                            univ correlate
    correlations vs baseline       neurons.parquet, histograms.parquet univ correlate
    universal neurons per layer    neurons.parquet (+ universal flags) univ correlate / universal / analyze
    depth (models of >= 3 layers)  the same + profiles, roles, CKA     univ correlate / analyze / roles
    universal vs other statistics  profiles.parquet or stats.parquet   univ analyze / stats
    families                       profiles.parquet, families.parquet  univ analyze
    top-activating contexts        top_examples.parquet                univ analyze
    prediction / suppression       roles.parquet (or vocab moments)    univ roles
    entropy neurons                interventions.parquet               univ roles
    attention deactivation         bos_scores/attention(_points).parquet  univ roles
    glossary                       every column the page shows

The summary card gives the models, tokens, the universal count and fraction per layer against the baseline,
how that compares with the paper's 1–5 %, and the figure that shows it. Each universal neuron (up to
``--max-cards``) gets a card: excess correlation, its best match in each other seed with r, family and best
feature with its variance explained, role and scores, activation statistics against its layer, top contexts;
the universal table's rows link to the cards.

A section whose tables are missing says what it looked for and names the command that produces them, so a
partial directory (run.json + neurons.parquet) still renders; a corrupt table is named as corrupt. Tables
stamped with another run's id than run.json's (``univ correlate`` ran again into the folder; see
:mod:`univ.tables`) are left out and listed in a warning at the top, so the page never mixes two runs.
Figures are PNGs drawn with matplotlib's Agg canvas (no display, no global pyplot state), written to
``DIR/figures/`` and embedded as base64 ``data:`` URIs; series differ by colour and by line style or marker.
Tables are HTML that sort on a header click and scroll inside their box; each is also written to
``DIR/tables/<name>.csv``, linked relatively (and embedded as a download when small, so the link survives
moving report.html on its own). The page loads nothing from the network: no CDN, no web fonts, no external URL.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from univ.depth import FIGURES as DEPTH_FIGURES
from univ.errors import UserError

__all__ = ["CONDITIONAL_FIGURES", "FIGURES", "GLOSSARY", "register", "run_report"]

UNIVERSAL_THRESHOLD = 0.5  # the paper's excess-correlation cut, used when no universal table exists
MAX_TABLE_ROWS = 200  # rows shown in the page; the CSV beside it has all of them
MAX_CARDS = 24  # universal neurons with a card; the rest are in the table
EMBED_CSV_BYTES = 200_000  # CSVs up to this size are also embedded as a download link
DPI = 100
# Gurnee et al. 2024, Table 1: universal neurons (excess correlation > 0.5) per model.
PAPER_FRACTIONS = {"GPT2-small": 4.16, "GPT2-medium": 1.23, "Pythia-160m": 1.26}
PAPER_RANGE = (1.0, 5.0)  # percent

# Every figure the report can draw: file stem -> what it shows. A section draws its figures when its data exists.
FIGURES = {
    "summary": "per layer: mean max correlation vs baseline, and % universal against the paper's 1–5 %",
    "corr_distributions": "max correlation vs baseline, and excess correlation (step histograms)",
    "corr_by_layer": "mean max correlation and baseline per layer",
    "corr_pairs": "distribution of all pairwise correlations per compared model",
    "layer_similarity": "linear CKA between every layer of the model and every layer of each other seed",
    "universal_by_layer": "fraction of universal neurons per layer",
    **DEPTH_FIGURES,
    "latents_alignment": "SAE latents' decoder rows vs the closest neuron's w_out (with --compare)",
    "universal_stats": "within-layer percentiles of universal neurons' statistics (box plots)",
    "family_counts": "universal neurons per family",
    "prediction_trend": "percentiles of vocab kurtosis and skew per layer, and role counts",
    "entropy_curves": "entropy intervention: LN scale, entropy, loss, reciprocal rank vs fixed activation",
    "bos_scores": "attention-deactivation score h vs the random-direction baseline",
    "attention_path": "path intervention: activation vs change in BOS attention and head norm",
}
# Figures only some runs have: the Depth section's (models of >= 3 layers) and the latents comparison (--compare).
CONDITIONAL_FIGURES = (*DEPTH_FIGURES, "latents_alignment")
STAT_METRICS = [
    "act_freq", "act_mean", "act_var", "act_skew", "act_kurt", "input_bias", "in_out_sim", "l2_penalty",
    "w_in_norm", "w_out_norm", "vocab_kurt", "vocab_skew",
]  # fmt: skip
TOKEN_ACT_COLUMNS = ("acts", "activations", "token_acts", "token_values")  # per-token values, if a stage wrote them
LINESTYLES = ["-", "--", ":", "-."]
CORRELATE_TABLES = ("neurons.parquet", "histograms.parquet", "activation_stats.parquet")
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

# What every column the page shows means (table headers carry it as a tooltip; the Glossary section lists it).
GLOSSARY = {
    "model": "the model's label in run.json (seed-0 is the reference the others are compared with)",
    "layer": "transformer block of the MLP neuron, from 0",
    "neuron": "index of the neuron in its layer's MLP",
    "is_universal": "excess correlation above the threshold (the paper: 0.5)",
    "max_corr": "largest Pearson r of this neuron with any neuron of another model, over the run's tokens",
    "mean_corr": "max correlation, averaged over the compared models",
    "min_corr": "the smallest of the per-model max correlations",
    "mean_baseline": "the same max correlation against randomly rotated neurons of the other model, averaged",
    "max_baseline": "the largest per-model baseline",
    "excess_corr": "mean_corr − mean_baseline: the paper's universality score",
    "baseline": "max correlation with randomly rotated neurons of the other model (what chance gives)",
    "percent": "universal neurons as a percentage of the layer's neurons",
    "universal": "number of universal neurons",
    "neurons": "number of neurons",
    "family": "what explains the neuron best: unigram (current token), alphabet, previous-token, position, "
              "syntax; other when nothing passes its cut",
    "best_feature": "the binary token feature that explains most of the activation's variance",
    "best_vr": "variance explained by best_feature: the fraction of the activation's variance over all tokens "
               "that the feature's on/off split accounts for (1 = fully)",
    "act_mean": "mean pre-activation over the run's kept tokens",
    "act_var": "variance of the pre-activation",
    "act_skew": "skew of the pre-activation (universal neurons: high)",
    "act_kurt": "kurtosis of the pre-activation, non-excess (3 for a Gaussian; universal neurons: high)",
    "act_freq": "fraction of tokens on which the pre-activation is positive (the neuron fires)",
    "post_mean": "mean post-activation (after GELU)",
    "input_bias": "the neuron's input bias b_in (processed weights)",
    "in_out_sim": "cosine between the neuron's input weights w_in and output weights w_out",
    "l2_penalty": "‖w_in‖² + ‖w_out‖²",
    "w_in_norm": "norm of the input weights w_in",
    "w_out_norm": "norm of the output weights w_out",
    "vocab_mean": "mean over the vocabulary of cos(W_U[:, v], w_out)",
    "vocab_var": "variance over the vocabulary of cos(W_U[:, v], w_out)",
    "vocab_var_ratio": "vocab_var · d_model (1 for a random direction; partition neurons: large)",
    "vocab_skew": "skew of cos(W_U[:, v], w_out) over the vocabulary (prediction: > 0, suppression: < 0)",
    "vocab_kurt": "kurtosis of cos(W_U[:, v], w_out) over the vocabulary (> 10: it targets a few tokens)",
    "role": "prediction, suppression, partition, entropy, attention, or none (first that applies)",
    "null_share": "share of ‖w_out‖² in the unembedding's near-null space (entropy neurons: ≥ 0.5)",
    "null_norm": "norm of w_out's part in that null space",
    "top_bos_head": "the later attention head whose attention to BOS this neuron moves most",
    "bos_score": "h = ŵ_outᵀ W_Q k_BOS / √d_head for that head",
    "bos_z": "bos_score in standard deviations of the random-direction baseline (|bos_z| ≥ 5: attention role)",
    "top_promoted": "tokens whose logits the neuron's output raises most (direct effect through W_U)",
    "top_suppressed": "tokens whose logits it lowers most",
    "position_mi": "mutual information between firing and the position in the context",
    "value": "the activation (post-GELU) at the outlined token",
    "r": "Pearson correlation of the activations of the two neurons",
    "percentile": "where the neuron stands among the neurons of its own layer (50 = median)",
}


# --------------------------------------------------------------------------------------------------------------------
# Page pieces


@dataclass
class _Page:
    """Collects sections, figures and tables while the report is drawn."""

    run_dir: Path
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, body html)
    figures: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # table file -> why it is not used

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

    def table(self, df: pd.DataFrame, name: str, *, max_rows: int = MAX_TABLE_ROWS,
              anchors: Sequence[str | None] | None = None) -> str:  # fmt: skip
        """A sortable HTML table of the first ``max_rows`` rows; the whole table goes to tables/NAME.csv.

        ``anchors`` (one per row): the row's ``neuron`` cell links to ``#anchor`` (a neuron's card).
        """
        path = self.run_dir / "tables" / f"{name}.csv"
        path.parent.mkdir(exist_ok=True)
        df.to_csv(path, index=False)
        shown = df.head(max_rows)
        head = "".join(
            f'<th title="{html.escape(_glossary(c))}">{html.escape(str(c))}</th>' if _glossary(c)
            else f"<th>{html.escape(str(c))}</th>"
            for c in shown.columns
        )  # fmt: skip
        link_col = list(shown.columns).index("neuron") if anchors is not None and "neuron" in shown.columns else -1
        rows = []
        for i, row in enumerate(shown.itertuples(index=False)):
            cells = []
            for j, v in enumerate(row):
                text = html.escape(_fmt(v))
                if j == link_col and anchors[i]:
                    text = f'<a href="#{anchors[i]}">{text}</a>'
                cls = ' class="list"' if isinstance(v, (list, tuple, np.ndarray)) else ""
                cells.append(f"<td{cls}>{text}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        note = f"{len(df)} row{'s' * (len(df) != 1)}" if len(df) <= max_rows else f"first {max_rows} of {len(df)} rows"
        links = f'<a href="tables/{name}.csv">tables/{name}.csv</a>'
        size = path.stat().st_size
        if size <= EMBED_CSV_BYTES:
            b64 = base64.b64encode(path.read_bytes()).decode("ascii")
            links += f' (<a download="{name}.csv" href="data:text/csv;base64,{b64}">download, embedded</a>)'
        return (
            f'<div class="tablebox"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
            f'<p class="note">{note}; click a header to sort; all rows in {links}</p>'
        )

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def missing(self, what: str, command: str) -> str:
        """The line for a section without its table: corrupt or from another run if so, else 'No ... yet'."""
        for name, why in self.problems.items():
            if name in what:
                return f'<p class="missing">{html.escape(why)}</p>'
        return f'<p class="missing">No {html.escape(what)} yet: run <code>{html.escape(command)}</code>.</p>'


def _glossary(column: Any) -> str:
    """The glossary entry of a column (per-model columns like max_corr.seed-1 share their stem's)."""
    name = str(column)
    if name in GLOSSARY:
        return GLOSSARY[name]
    stem = name.split(".", 1)[0]
    if stem.endswith("_pct") and stem[:-4] in GLOSSARY:
        return f"within-layer percentile of {stem[:-4]}"
    return GLOSSARY.get(stem, "")


def printable(text: str) -> str:
    """A token's text as a reader can see it: control and invisible characters as <0xNN>, newline as ↵."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\ufffd":
            out.append("<?>")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"<0x{ord(ch):02X}>" if ord(ch) < 256 else f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return " | ".join(repr(printable(x)) if isinstance(x, str) else _fmt(x) for x in list(v))
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "" if math.isnan(v) else str(v)
        return f"{v:.4g}"
    if isinstance(v, str):
        return printable(v)
    return str(v)


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


def _pair_colours(i: int) -> tuple[Any, Any]:
    """A dark and a light shade of one hue (tab20's pairs): a model's value and its baseline."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return cmap((2 * i) % 20), cmap((2 * i + 1) % 20)


def anchor(model: Any, layer: Any, neuron: Any) -> str:
    """The id of a neuron's card: n-<model>-L<layer>-N<neuron>, with the model made URL-safe."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", str(model)) or "model"
    return f"n-{safe}-L{int(layer)}-N{int(neuron)}"


class _Tables:
    """The run folder's tables, read once each; corrupt ones and ones from another run are recorded, not used."""

    def __init__(self, run_dir: Path, current: str | None, page: _Page) -> None:
        self.run_dir, self.current, self.page = run_dir, current, page
        self.cache: dict[str, pd.DataFrame | None] = {}
        self.unstamped: list[str] = []
        self.stamped: list[str] = []

    def get(self, name: str, made_by: str) -> pd.DataFrame | None:
        if name in self.cache:
            return self.cache[name]
        from univ.tables import table_run_id, try_read

        df, problem = try_read(self.run_dir / name, made_by=f"{made_by} {self.run_dir}")
        if problem is not None:
            self.page.problems[name] = problem
        elif df is not None and self.current is not None:
            stamp = table_run_id(self.run_dir / name)
            if stamp is None:
                if name not in CORRELATE_TABLES:  # written with run.json itself, by univ correlate
                    self.unstamped.append(name)
            elif stamp != self.current:
                self.page.problems[name] = (
                    f"{name} was computed from run {stamp}, not from this folder's run {self.current} "
                    f"('univ correlate' ran again here): left out of this page; rerun '{made_by} {self.run_dir}'."
                )
                df = None
            else:
                self.stamped.append(name)
        self.cache[name] = df
        return df


# --------------------------------------------------------------------------------------------------------------------
# Sections


def _header(page: _Page, manifest: dict | None, run_dir: Path) -> None:
    if manifest is None:
        page.add("run", "Run", page.missing("run.json", f"univ correlate MODELS --data DATA --out {run_dir}"))
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
        page.add("correlations", "Correlations", page.missing("neurons.parquet", f"univ correlate … --out {run_dir}"))
        return
    body = []
    models = list(pd.unique(neurons["model"])) if "model" in neurons else [""]
    neurons = neurons if "model" in neurons else neurons.assign(model="")
    fig, ax = _new_figure(11, 3.6, ncols=2)
    bins = np.linspace(-0.05, 1.0, 64)
    for i, model in enumerate(models):
        g = neurons[neurons["model"] == model]
        dark, light = _pair_colours(i)
        for col, style, color, lw, what in (("mean_corr", "-", dark, 1.8, "max corr"),
                                            ("mean_baseline", "--", light, 1.4, "baseline")):  # fmt: skip
            if col in g:
                ax[0, 0].hist(g[col].dropna(), bins=bins, histtype="step", color=color, linestyle=style, lw=lw,
                              label=f"{model} {what}".strip())  # fmt: skip
        if "excess_corr" in g:
            ax[0, 1].hist(g["excess_corr"].dropna(), bins=np.linspace(-0.3, 1.0, 66), histtype="step", color=dark,
                          linestyle=LINESTYLES[i % len(LINESTYLES)], label=str(model) or None)  # fmt: skip
    ax[0, 0].set(xlabel="mean over compared models of max correlation", ylabel="neurons", yscale="log")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].axvline(UNIVERSAL_THRESHOLD, color="k", lw=0.8, ls=":")
    ax[0, 1].set(xlabel="excess correlation (max corr − baseline)", ylabel="neurons", yscale="log")
    body.append(page.figure(fig, "corr_distributions", FIGURES["corr_distributions"]))

    if "layer" in neurons and "mean_corr" in neurons:
        fig, ax = _new_figure(6, 3.4)
        for i, model in enumerate(models):
            g = neurons[neurons["model"] == model].groupby("layer")[["mean_corr", "mean_baseline"]].mean()
            dark, light = _pair_colours(i)
            ax[0, 0].plot(g.index, g["mean_corr"], "o-", color=dark, lw=1.8, label=f"{model} max corr".strip())
            if "mean_baseline" in g:
                ax[0, 0].plot(g.index, g["mean_baseline"], "s--", color=light, lw=1.4, mfc="white",
                              label=f"{model} baseline (random rotation)".strip())  # fmt: skip
        ax[0, 0].set(xlabel="layer", ylabel="mean over neurons")
        ax[0, 0].legend(fontsize=8)
        _integer_x(ax[0, 0])
        body.append(page.figure(fig, "corr_by_layer", FIGURES["corr_by_layer"]))

    if hist is not None and len(hist):
        fig, ax = _new_figure(6, 3.4)
        for i, ((model, other), g) in enumerate(hist.groupby(["model", "other"], sort=False)):
            centres = (g["bin_left"] + g["bin_right"]) / 2
            counts = g["count"].where(g["count"] > 0)
            ax[0, 0].step(centres, counts, where="mid", color=f"C{i}", linestyle=LINESTYLES[i % len(LINESTYLES)],
                          label=f"{model} vs {other}")  # fmt: skip
        ax[0, 0].set(xlabel="Pearson r (every neuron pair)", ylabel="pairs", yscale="log")
        ax[0, 0].legend(fontsize=8)
        body.append(page.figure(fig, "corr_pairs", FIGURES["corr_pairs"]))
    else:
        body.append(page.missing("histograms.parquet", f"univ correlate … --out {run_dir}"))
    from univ.cka import layer_similarity_figure, read_layer_similarity  # torch-free until a report is drawn

    similarity = read_layer_similarity(run_dir)
    if similarity is not None and len(similarity) and similarity["cka"].notna().any():
        body.append(page.figure(layer_similarity_figure(similarity), "layer_similarity", FIGURES["layer_similarity"]))
    cols = [c for c in ("mean_corr", "mean_baseline", "excess_corr") if c in neurons]
    summary = neurons.groupby(["model", "layer"])[cols].mean().reset_index() if "layer" in neurons else None
    if summary is not None:
        body.append(page.table(summary, "correlation_by_layer"))
    page.add("correlations", "Correlations", "".join(body))


def _universal_flags(read: Callable, neurons: pd.DataFrame | None, profiles: pd.DataFrame | None) -> tuple:
    """(DataFrame model, layer, neuron, is_universal[, excess_corr], where the flags came from) or (None, "")."""
    if profiles is not None and "is_universal" in profiles and {"layer", "neuron"} <= set(profiles.columns):
        df = profiles if "model" in profiles else profiles.assign(model="")
        return df, "profiles.parquet"
    if neurons is None:
        return None, ""
    df = neurons if "model" in neurons else neurons.assign(model="")
    universal = read("universal.parquet", "univ universal")
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


def _universal(page: _Page, flags: pd.DataFrame | None, source: str, run_dir: Path, cards: int = MAX_CARDS) -> None:
    if flags is None:
        page.add("universal", "Universal neurons", page.missing("universal flags", f"univ universal {run_dir}"))
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
                     hatch=["", "//", "..", "xx"][i % 4], edgecolor="k", label=str(model) or None)  # fmt: skip
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
    uni = flags[flags["is_universal"].fillna(False).astype(bool)]
    if len(uni):
        uni = uni.sort_values("excess_corr", ascending=False) if "excess_corr" in uni else uni
        cols = [c for c in ("model", "layer", "neuron", "excess_corr", "mean_corr", "mean_baseline", "family",
                            "best_feature", "best_vr", "role") if c in uni]  # fmt: skip
        anchors = [anchor(m, la, n) if i < cards else None
                   for i, (m, la, n) in enumerate(zip(uni["model"], uni["layer"], uni["neuron"], strict=True))]
        body += ("<h3>The universal neurons</h3><p class=\"note\">Strongest first; a neuron's number links to "
                 "its card.</p>" + page.table(uni[cols], "universal_neurons", anchors=anchors))
    else:
        body += (f"<p>Looked for neurons with {html.escape(source)}: none found among {len(flags):,}. The best "
                 "excess correlation is in the Correlations section; a lower cut: "
                 f"<code>univ analyze {html.escape(str(run_dir))} --threshold 0.3</code>.</p>")
    page.add("universal", "Universal neurons", body)


def _depth(page: _Page, neurons: pd.DataFrame | None, flags: pd.DataFrame | None, stats: pd.DataFrame | None,
           roles: pd.DataFrame | None, run_dir: Path) -> None:  # fmt: skip
    """Universality, correlations, statistics and roles layer by layer (models of >= 3 layers; see univ.depth)."""
    from univ import depth
    from univ.cka import read_layer_similarity

    depth.draw(page, neurons=neurons, flags=flags, stats=stats, roles=roles,
               similarity=read_layer_similarity(run_dir), new_figure=_new_figure)  # fmt: skip


def _statistics(page: _Page, table: pd.DataFrame | None, source: str, run_dir: Path) -> None:
    if table is None or "is_universal" not in table:
        what = "neuron statistics (profiles.parquet / stats.parquet)"
        page.add("statistics", "Universal vs other neurons", page.missing(what, f"univ analyze {run_dir}"))
        return
    df = table if "model" in table else table.assign(model="")
    metrics = [m for m in STAT_METRICS if m in df]
    if not metrics:
        page.add("statistics", "Universal vs other neurons",
                 page.missing("statistic columns", f"univ analyze {run_dir}"))
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
        page.add("families", "Neuron families", page.missing(what, f"univ analyze {run_dir}"))
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
        ax[0, 0].barh(counts.index[::-1], counts.to_numpy()[::-1], color="C0", edgecolor="k")
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
        page.add("examples", "Top-activating contexts", page.missing("top_examples.parquet", f"univ analyze {run_dir}"))
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


def _roles_source(read: Callable, roles: pd.DataFrame | None, profiles: pd.DataFrame | None) -> tuple:
    """The table to draw the prediction/suppression trend from, and where it came from."""
    if roles is not None and {"vocab_kurt", "vocab_skew", "layer", "role"} <= set(roles.columns):
        return roles, "roles.parquet"
    for name, df in (("profiles.parquet", profiles), ("stats.parquet", read("stats.parquet", "univ stats"))):
        if df is not None and {"vocab_kurt", "vocab_skew", "layer"} <= set(df.columns):
            from univ.roles import classify_roles

            return classify_roles(df), f"vocab moments of {name} (default thresholds)"
    return None, ""


def _prediction(page: _Page, roles: pd.DataFrame | None, source: str, flags: pd.DataFrame | None, run_dir: Path,
                labels: Callable | None = None, seen: set[int] | None = None):  # fmt: skip
    if roles is None:
        page.add("prediction", "Prediction, suppression and partition neurons",
                 page.missing("vocabulary role scores (roles.parquet)", f"univ roles {run_dir}"))  # fmt: skip
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
            style = dict(color=f"C{j}", lw=2.0 if p == "p50" else 1.0, ls=LINESTYLES[j % len(LINESTYLES)],
                         marker=MARKERS[i % len(MARKERS)], ms=3)  # fmt: skip
            ax[0, 0].plot(t["layer"], t[c], label=p if i == 0 else None, **style)
            ax[0, 1].plot(t["layer"], t[f"skew_{p}"], **style)
        if "n_prediction" in t:
            for role, marker, color in (
                ("prediction", "o", "C2"),
                ("suppression", "s", "C3"),
                ("partition", "^", "C4"),
            ):
                style = dict(marker=marker, color=color, ls=LINESTYLES[i % len(LINESTYLES)])
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
    criteria = {
        "prediction": "vocab kurtosis > 10 and positive skew", "suppression": "vocab kurtosis > 10 and negative skew",
        "partition": "vocab variance ratio above the cut", "entropy": "null_share ≥ 0.5 and a top-decile ‖w_out‖",
        "attention": "|bos_z| ≥ 5 for a later head",
    }  # fmt: skip
    absent = [r for r in criteria if not (df["role"] == r).any()]
    if absent:
        body.append("<p>" + " ".join(
            f"Looked for {r} neurons ({html.escape(criteria[r])}) among all {len(df):,} neurons: none found."
            for r in absent) + "</p>")  # fmt: skip
    named = df[df["role"].isin(list(criteria))]
    if len(named):
        named = named.copy()
        for col in ("top_promoted", "top_suppressed"):
            if col in named:
                named[col] = [
                    _token_list(i, t, labels(m) if labels is not None else None, seen)
                    for m, i, t in zip(named["model"], named.get(f"{col}_ids", [None] * len(named)), named[col],
                                       strict=True)
                ]  # fmt: skip
        if flags is not None and "is_universal" in flags:
            f = flags if "model" in flags else flags.assign(model="")
            named = named.merge(f[["model", "layer", "neuron", "is_universal"]], on=["model", "layer", "neuron"],
                                how="left")  # fmt: skip
            named = named.sort_values(["is_universal", "role"], ascending=[False, True], kind="stable")
        cols = ["model", "layer", "neuron", "role", "is_universal", "vocab_kurt", "vocab_skew", "vocab_var_ratio",
                "null_share", "w_out_norm", "top_bos_head", "bos_z", "top_promoted", "top_suppressed"]  # fmt: skip
        note = (' <span class="note">(† never among the kept tokens analyze counted: absent from the data, or '
                "excluded like newlines)</span>") if seen is not None else ""
        body.append(f"<h3>Neurons with a role</h3>{note}" + page.table(named[[c for c in cols if c in named]],
                                                                        "role_neurons"))  # fmt: skip
    page.add("prediction", "Prediction, suppression and partition neurons", "".join(body))


def _entropy(page: _Page, curves: pd.DataFrame | None, run_dir: Path, roles_info: dict | None = None) -> None:
    if curves is None or not len(curves):
        if roles_info is not None and "interventions.parquet" not in page.problems:
            cands = {m: v.get("entropy_candidates") for m, v in (roles_info.get("models") or {}).items()}
            text = ("<p>Looked for entropy neurons by fixing candidates' activations: univ roles ran "
                    + ("without interventions (--no-interventions)" if not any(cands.values())
                       else "but wrote no curve")
                    + f"; none to show. <code>univ roles {html.escape(str(run_dir))}</code> runs them.</p>")
            page.add("entropy", "Entropy neurons", text)
            return
        page.add("entropy", "Entropy neurons", page.missing("intervention results (interventions.parquet)",
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
        kk = max(k - 1, 0)
        for j, (m, _) in enumerate(metrics):
            ax[0, j].plot(g[xcol], g[m], marker=None if random else MARKERS[kk % len(MARKERS)],
                          ls=":" if random else LINESTYLES[kk % len(LINESTYLES)], color=color,
                          lw=1.8 if not random else 0.8, ms=4, label=label)  # fmt: skip
    nominal = curves[curves["kind"] == "nominal"]
    for j, (m, name) in enumerate(metrics):
        for v in nominal[m]:
            ax[0, j].axhline(v, color="k", lw=0.8, ls="--")
        ax[0, j].set(xlabel="fixed activation" + (" (× typical max)" if use_multiple else ""), ylabel=name)
    ax[0, 0].legend(fontsize=7, title="grey dotted: random neurons; black dashed: no intervention",
                    title_fontsize=6)  # fmt: skip
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
    page: _Page, hist: pd.DataFrame | None, attn: pd.DataFrame | None, points: pd.DataFrame | None, run_dir: Path,
    roles_info: dict | None = None,
) -> None:  # fmt: skip
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
                              linestyle="-" if source == "neurons" else "--", label=f"{model}: {label}")  # fmt: skip
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
            mk = MARKERS[i % len(MARKERS)]
            ax[0, 0].scatter(g["act"], dp, s=6, alpha=0.5, color=f"C{i % 10}", marker=mk, label=label)
            ax[0, 1].scatter(dp, frac, s=6, alpha=0.5, color=f"C{i % 10}", marker=mk)
        ax[0, 0].set(xlabel="neuron activation", ylabel="ΔP(attend to BOS), clean − query-ablated")
        ax[0, 0].legend(fontsize=7, markerscale=3)
        ax[0, 1].set(xlabel="ΔP(attend to BOS)", ylabel="Δ‖z‖ of the head (%)")
        body.append(page.figure(fig, "attention_path", FIGURES["attention_path"]))
    if attn is not None and len(attn):
        body.append(page.table(attn, "attention_path"))
    elif body and roles_info is not None:
        notes = [n for v in (roles_info.get("models") or {}).values() for n in (v.get("notes") or [])]
        infos = list((roles_info.get("models") or {}).values())
        pairs = sum(len(v.get("attention_pairs") or []) for v in infos)
        pools = "; ".join(sorted({str(v.get("pool")) for v in infos if v.get("pool")}))
        what = ("so none was run; a neuron of the last layer has no later head" if pairs == 0
                else "none gave a result")  # fmt: skip
        body.append(f"<p>Path intervention: {pairs} (neuron, later head) pairs to test among the candidates "
                    f"({html.escape(pools or 'none')}), {what}."
                    + (f" Notes: {html.escape('; '.join(notes))}." if notes else "") + "</p>")
    if not body:
        body.append(page.missing("attention scores or path interventions", f"univ roles {run_dir}"))
    else:
        body.insert(0, "<p>h &gt; 0: the neuron pushes the head's query towards BOS, the head attends to BOS and its "
                       "output shrinks (deactivation). The path intervention removes the neuron's output from the "
                       "head's queries only (keys and values untouched).</p>")  # fmt: skip
    page.add("attention", "Attention-deactivation neurons", "".join(body))


# --------------------------------------------------------------------------------------------------------------------
# Tokens as a reader sees them


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte's stand-in character (to turn a token back into its bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def _token_labeler(tok: Any) -> Callable[[int], str] | None:
    """id -> readable text: a byte-level token that is not whole UTF-8 shows its bytes as <0xNN>."""
    if tok is None:
        return None

    def label(i: int) -> str:
        try:
            piece = tok.convert_ids_to_tokens(int(i))
        except Exception:
            piece = None
        if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece):
            raw = bytes(_BYTE_OF[c] for c in piece)
            try:
                return printable(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return "".join(chr(b) if 0x20 <= b < 0x7F else f"<0x{b:02X}>" for b in raw)
        return printable(tok.decode([int(i)], clean_up_tokenization_spaces=False))

    return label


def _token_list(ids: Any, strings: Any, label: Callable[[int], str] | None, seen: set[int] | None) -> str:
    """'a' | 'b'† …: promoted/suppressed tokens, readable; † marks a token that never occurs in the data."""
    if ids is not None and isinstance(ids, (list, tuple, np.ndarray)) and len(ids) and label is not None:
        parts = [repr(label(int(i))) + ("†" if seen is not None and int(i) not in seen else "") for i in ids]
        return " | ".join(parts)
    if isinstance(strings, (list, tuple, np.ndarray)):
        return " | ".join(repr(printable(str(x))) for x in strings)
    return ""


# --------------------------------------------------------------------------------------------------------------------
# The summary card and the neuron cards


def _verdict(percent: float) -> str:
    lo, hi = PAPER_RANGE
    paper = ", ".join(f"{k} {v:.2f} %" for k, v in PAPER_FRACTIONS.items())
    where = "below" if percent < lo else ("within" if percent <= hi else "above")
    return f"{where} the paper's {lo:.0f}–{hi:.0f} % ({paper})"


def _summary(page: _Page, manifest: dict | None, neurons: pd.DataFrame | None, flags: pd.DataFrame | None,
             source: str, tables: _Tables, run_dir: Path) -> None:  # fmt: skip
    """The card at the top: what ran, how many neurons are universal per layer against the baseline, the figure."""
    facts = []
    m = manifest or {}
    labels, models = m.get("labels") or [], m.get("models") or []
    analysed = m.get("analysed") or labels[:1]
    if labels:
        facts.append(("models", "; ".join(
            (lab if Path(str(mod)).name == lab else f"{lab} = {mod}") + (" (analysed)" if lab in analysed else "")
            for lab, mod in zip(labels, models, strict=False))))  # fmt: skip
    if isinstance(m.get("tokens"), int):
        data = m.get("data") or {}
        src = Path(str(data.get("source", "?"))).name
        tok = f"{m['tokens']:,} tokens of {src} (contexts of {data.get('ctx', '?')})"
        asked = m.get("tokens_requested")
        if isinstance(asked, int) and asked != m["tokens"]:
            tok += f"; {asked:,} were asked for: the data ran out"
        facts.append(("tokens", tok))
    if m.get("baseline"):
        facts.append(("baseline", f"{m['baseline']} random rotation of the other model's neurons (seed "
                                  f"{m.get('baseline_seed', '?')})"))  # fmt: skip
    if tables.current:
        ident = f"{tables.current}"
        if tables.stamped:
            ident += f"; {len(tables.stamped)} tables checked against it"
        if tables.unstamped:
            ident += (f"; {len(tables.unstamped)} carry no run id (written before ids were recorded) and could not "
                      f"be checked: {', '.join(tables.unstamped)}")  # fmt: skip
        facts.append(("run id", ident))
    body = []
    if page.problems:
        items = "".join(f"<li>{html.escape(v)}</li>" for v in page.problems.values())
        body.append(f'<div class="problems"><strong>Left out of this page:</strong><ul>{items}</ul></div>')
    headline = ""
    if flags is not None and "layer" in flags:
        flags = flags.assign(is_universal=flags["is_universal"].fillna(False).astype(bool))
        per = flags.groupby(["model", "layer"], sort=True).agg(
            neurons=("is_universal", "size"), universal=("is_universal", "sum"),
            **({"mean_max_corr": ("mean_corr", "mean")} if "mean_corr" in flags else {}),
            **({"mean_baseline": ("mean_baseline", "mean")} if "mean_baseline" in flags else {}),
            **({"best_excess": ("excess_corr", "max")} if "excess_corr" in flags else {}),
        ).reset_index()  # fmt: skip
        per["universal"] = per["universal"].astype(int)
        per["percent"] = 100 * per["universal"] / per["neurons"]
        lines = []
        for model, g in per.groupby("model", sort=False):
            u, n = int(g["universal"].sum()), int(g["neurons"].sum())
            pct = 100 * u / max(n, 1)
            lines.append(
                f'<span class="big" data-universal="{u}" data-neurons="{n}">{u:,} of {n:,}</span> neurons of '
                f"<strong>{html.escape(str(model) or 'the model')}</strong> are universal "
                f'(<span data-percent="{pct:.2f}">{pct:.2f} %</span>): {html.escape(_verdict(pct), quote=False)}.'
            )
        headline = "<p>" + "<br>".join(lines) + f'</p><p class="note">Universal flags from {html.escape(source)}.</p>'
        fig, ax = _new_figure(11, 3.2, ncols=2)
        for i, (model, g) in enumerate(per.groupby("model", sort=False)):
            dark, light = _pair_colours(i)
            if "mean_max_corr" in g:
                ax[0, 0].plot(g["layer"], g["mean_max_corr"], "o-", color=dark, lw=1.8,
                              label=f"{model} max corr".strip())  # fmt: skip
            if "mean_baseline" in g:
                ax[0, 0].plot(g["layer"], g["mean_baseline"], "s--", color=light, lw=1.4, mfc="white",
                              label=f"{model} baseline".strip())  # fmt: skip
            ax[0, 1].plot(g["layer"], g["percent"], marker=MARKERS[i % len(MARKERS)], color=dark,
                          ls=LINESTYLES[i % len(LINESTYLES)], label=str(model) or None)  # fmt: skip
        ax[0, 1].axhspan(*PAPER_RANGE, color="0.85", zorder=0, label="the paper's 1–5 %")
        ax[0, 0].set(xlabel="layer", ylabel="mean over neurons")
        ax[0, 1].set(xlabel="layer", ylabel="% universal", ylim=(0, max(6.0, float(per["percent"].max()) * 1.2)))
        for a in ax[0]:
            a.legend(fontsize=8)
        _integer_x(*ax[0])
        body.append(headline)
        body.append(page.figure(fig, "summary", FIGURES["summary"]))
        body.append(page.table(per, "summary_by_layer"))
    elif neurons is None:
        body.append(page.missing("neurons.parquet", f"univ correlate … --out {run_dir}"))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts)
    page.add("glance", "At a glance", f'<div class="card summary"><dl>{dl}</dl>{"".join(body)}</div>')


def _layer_percentile(frame: pd.DataFrame, row: dict, metric: str) -> float:
    """Where ``row``'s ``metric`` stands in its layer (mean rank, %), from the _pct column or computed."""
    pct = row.get(f"{metric}_pct")
    if pct is not None and np.isfinite(pct):
        return float(pct)
    layer = frame[(frame["model"] == row["model"]) & (frame["layer"] == row["layer"])][metric].dropna()
    v = row.get(metric)
    if not len(layer) or v is None or not np.isfinite(v):
        return float("nan")
    return float(100 * ((layer < v).sum() + 0.5 * (layer == v).sum()) / len(layer))


def _feature_target(best_feature: str) -> str | None:
    """The token text a token/unigram feature stands for ('unigram:the' -> 'the'), else None."""
    kind, _, value = str(best_feature).partition(":")
    if kind in ("token", "unigram") and value:
        return value.strip().strip("'\"").strip().lower()
    return None


def _cards(page: _Page, flags: pd.DataFrame | None, roles: pd.DataFrame | None, top: pd.DataFrame | None,
           manifest: dict | None, run_dir: Path, labels: Callable, seen: set[int] | None,
           max_cards: int, max_examples: int) -> None:  # fmt: skip
    """One card per universal neuron, strongest first: everything the run knows about it in one place."""
    title = "Universal neurons, one by one"
    if flags is None:
        page.add("cards", title, page.missing("universal flags", f"univ analyze {run_dir}"))
        return
    uni = flags[flags["is_universal"].fillna(False).astype(bool)]
    if not len(uni):
        page.add("cards", title, f"<p>Looked for universal neurons (excess correlation above the cut) among "
                                 f"{len(flags):,}: none found, so there is no card.</p>")  # fmt: skip
        return
    uni = uni.sort_values("excess_corr", ascending=False) if "excess_corr" in uni else uni
    role_rows = {}
    if roles is not None and {"layer", "neuron"} <= set(roles.columns):
        r = roles if "model" in roles else roles.assign(model="")
        role_rows = {(x["model"], int(x["layer"]), int(x["neuron"])): x for x in r.to_dict("records")}
    tops = {}
    if top is not None and len(top):
        t = top if "model" in top else top.assign(model="")
        tops = {k: g for k, g in t.groupby(["model", "layer", "neuron"], sort=False)}
    all_labels = list((manifest or {}).get("labels") or [])
    tokenizers: dict[str, Any] = {}
    act_col = next((c for c in TOKEN_ACT_COLUMNS if top is not None and c in top), None)
    blocks = [f'<p class="note">{min(len(uni), max_cards)} of {len(uni)} universal neurons, strongest first '
              "(all of them in the table of the Universal neurons section).</p>"]  # fmt: skip
    for d in uni.head(max_cards).to_dict("records"):
        model = d["model"]
        key = (model, int(d["layer"]), int(d["neuron"]))
        parts = []
        ex, mc, mb = (d.get(c, float("nan")) for c in ("excess_corr", "mean_corr", "mean_baseline"))
        parts.append(f"<p><strong>Excess correlation {_fmt(ex)}</strong> = mean max correlation {_fmt(mc)} − "
                     f"mean baseline {_fmt(mb)}.</p>")  # fmt: skip
        matches = []
        for other in all_labels or []:
            if other == model or f"max_corr.{other}" not in flags:
                continue
            ml, mn = d.get(f"argmax_layer.{other}"), d.get(f"argmax_neuron.{other}")
            where = f"L{int(ml)}.N{int(mn)}" if ml is not None and mn is not None and ml >= 0 else "—"
            matches.append({"model": other, "best match": where, "r": d.get(f"max_corr.{other}"),
                            "baseline": d.get(f"baseline.{other}")})  # fmt: skip
        if matches:
            rows_html = "".join(
                f"<tr><td>{html.escape(x['model'])}</td><td>{html.escape(x['best match'])}</td>"
                f"<td>{_fmt(x['r'])}</td><td>{_fmt(x['baseline'])}</td></tr>" for x in matches
            )
            parts.append('<table class="mini"><thead><tr><th>other seed</th><th>best match</th>'
                         f'<th title="{html.escape(GLOSSARY["r"])}">r</th>'
                         f'<th title="{html.escape(GLOSSARY["baseline"])}">baseline</th></tr></thead>'
                         f"<tbody>{rows_html}</tbody></table>")  # fmt: skip
        family, feature, vr = d.get("family"), d.get("best_feature"), d.get("best_vr")
        if family is not None:
            parts.append(f"<p>Family <strong>{html.escape(str(family))}</strong>; best feature "
                         f"<code>{html.escape(printable(str(feature)))}</code>, variance explained {_fmt(vr)}.</p>")
        rd = role_rows.get(key, d)
        if rd.get("role") is not None:
            score_cols = ("vocab_kurt", "vocab_skew", "vocab_var_ratio", "null_share", "bos_z")
            scores = ", ".join(f"{c} {_fmt(rd[c])}" for c in score_cols if _fmt(rd.get(c)) not in ("", "None"))
            promoted = ""
            if "top_promoted" in rd:
                label = labels(model)
                promoted = _token_list(rd.get("top_promoted_ids"), rd.get("top_promoted"), label, seen)
            parts.append(f"<p>Role <strong>{html.escape(str(rd['role']))}</strong> ({html.escape(scores)})"
                         + (f"; promotes <span class=\"toks\">{html.escape(promoted)}</span>" if promoted else "")
                         + ".</p>")
        stats = [c for c in ("act_freq", "act_skew", "act_kurt", "input_bias", "w_out_norm", "l2_penalty",
                             "vocab_kurt") if c in flags and d.get(c) is not None]  # fmt: skip
        if stats:
            cells = "".join(f"<tr><td>{c}</td><td>{_fmt(d[c])}</td><td>{_fmt(_layer_percentile(flags, d, c))}"
                            "</td></tr>" for c in stats)  # fmt: skip
            parts.append('<table class="mini"><thead><tr><th>statistic</th><th>value</th>'
                         f'<th title="{html.escape(GLOSSARY["percentile"])}">percentile in its layer</th></tr></thead>'
                         f"<tbody>{cells}</tbody></table>")  # fmt: skip
        g = tops.get(key)
        if g is not None:
            if model not in tokenizers:
                tokenizers[model] = _load_tokenizer(manifest, model)
            tok = tokenizers[model]
            g = g.sort_values("rank") if "rank" in g else g.sort_values("value", ascending=False)
            items, peaks = [], []
            for r in g.head(max_examples).itertuples(index=False):
                tokens, position = getattr(r, "tokens", None), int(getattr(r, "position", -1))
                acts = list(getattr(r, act_col)) if act_col else None
                if tok is not None and tokens is not None and len(tokens):
                    ctx = _context_html(list(tokens), position, acts, tok)
                    if 0 <= position < len(tokens):
                        peaks.append(tok.decode([int(tokens[position])], clean_up_tokenization_spaces=False))
                else:
                    ctx = html.escape(str(getattr(r, "text", "")))
                    if getattr(r, "token", None) is not None:
                        peaks.append(str(r.token))
                items.append(f'<li><span class="val">{_fmt(float(getattr(r, "value", float("nan"))))}</span> '
                             f'<span class="ctx">{ctx}</span></li>')  # fmt: skip
            target = _feature_target(feature) if feature is not None else None
            note = "Its largest activations (the outlined token is where it peaks)"
            if target is not None and peaks and not any(p.strip().lower() == target for p in peaks):
                where = ", ".join(sorted({repr(printable(p)) for p in peaks}))
                note = (f"Its largest activations peak on {html.escape(where)}, not on its best feature "
                        f"<code>{html.escape(printable(str(feature)))}</code>. Both hold: the family is read from "
                        f"the variance over all tokens ({_fmt(vr)} of it is explained by that feature: the neuron "
                        "is active on it throughout), while these contexts are only its few largest values, which "
                        "can come from another token")  # fmt: skip
            parts.append(f'<p class="note">{note}:</p><ol>{"".join(items)}</ol>')
        name = f"{model} L{key[1]}.N{key[2]}".strip()
        blocks.append(f'<div class="card" id="{anchor(*key)}"><h3>{html.escape(name)}</h3>{"".join(parts)}</div>')
    page.add("cards", title, "".join(blocks))


def _glossary_section(page: _Page) -> None:
    items = "".join(f"<dt><code>{html.escape(k)}</code></dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY.items())
    page.add("glossary", "Glossary", "<p>What every column means (table headers show it on hover). "
             "<code>X_pct</code>: the within-layer percentile of X; <code>X.seed-1</code>: X against that model."
             f'</p><dl class="glossary">{items}</dl>')  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Assembly

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; } code { background: #f4f4f4; padding: 0 .2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dt { font-weight: 600; }
.tablebox { max-width: 100%; overflow-x: auto; margin: .5em 0; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: right; white-space: nowrap; }
td.list { white-space: normal; min-width: 16em; max-width: 36em; text-align: left; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .2em 1em 1em; margin: 1em 0; background: #fcfcfc; }
.card:target { outline: 3px solid #e80; } .summary { background: #f6f9ff; }
.big { font-size: 1.4em; font-weight: 700; } table.mini { margin: .3em 0; }
.problems { border: 2px solid #c60; background: #fff4e5; padding: .3em 1em; margin: .5em 0; }
dl.glossary { grid-template-columns: max-content minmax(0, 1fr); } .toks { font-family: ui-monospace, monospace; }
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


def run_report(
    run_dir: str | Path, *, max_neurons: int = 50, max_examples: int = 5, max_cards: int = MAX_CARDS,
    compare: str | Path | None = None,
) -> Path:
    """Render DIR/report.html (+ DIR/figures/*.png, DIR/tables/*.csv) from whatever the run directory holds.

    Prints nothing; returns the path of the page. Needs run.json or neurons.parquet (else a UserError); every
    other table is optional (its section says which command makes it). ``max_neurons``/``max_examples`` cap
    the contexts section, ``max_cards`` the universal neurons with a card. ``compare``: a run of the same seeds'
    SAE latents on the same tokens, for the "Neurons and SAE latents" section (``univ.latents``).
    """
    from univ.tables import run_id

    run_dir = Path(run_dir)
    manifest, current = None, None
    if (run_dir / "run.json").is_file():
        try:
            manifest = json.loads((run_dir / "run.json").read_text())
        except ValueError as e:
            raise UserError(f"{run_dir / 'run.json'} is corrupt (not JSON: {e}); rerun 'univ correlate'") from None
        current = run_id(run_dir)
    page = _Page(run_dir)
    tables = _Tables(run_dir, current, page)
    read = tables.get
    neurons = read("neurons.parquet", "univ correlate … --out")
    if manifest is None and neurons is None:
        if "neurons.parquet" in page.problems:
            raise UserError(page.problems["neurons.parquet"])
        raise UserError(f"{run_dir} holds neither run.json nor neurons.parquet: pass a directory written by "
                        "'univ correlate'")  # fmt: skip
    for old in (run_dir / "figures").glob("*.png"):
        if old.stem in FIGURES:
            old.unlink()  # a figure whose data is gone must not linger beside the new page
    profiles = read("profiles.parquet", "univ analyze")
    stats_table, stats_source = (profiles, "profiles.parquet") if profiles is not None else (
        read("stats.parquet", "univ stats"), "stats.parquet")  # fmt: skip
    flags, flag_source = _universal_flags(read, neurons, profiles)
    if stats_table is not None and "is_universal" not in stats_table and flags is not None:
        f = flags[["model", "layer", "neuron", "is_universal"]]
        st = stats_table if "model" in stats_table else stats_table.assign(model=f["model"].iloc[0] if len(f) else "")
        stats_table = st.merge(f, on=["model", "layer", "neuron"], how="left")
    if flags is not None and neurons is not None:
        keys = ["model", "layer", "neuron"]
        extra = [c for c in neurons.columns if c not in flags.columns]
        n = neurons if "model" in neurons else neurons.assign(model="")
        if extra:
            flags = flags.merge(n[keys + extra], on=keys, how="left")  # the cards need the per-seed matches
    raw_roles = read("roles.parquet", "univ roles")
    roles, roles_source = _roles_source(read, raw_roles, profiles)
    counts = read("token_counts.parquet", "univ analyze")
    seen = {int(i) for i in counts["id"]} if counts is not None and "id" in counts else None
    roles_info = _read_json(run_dir / "roles.json")
    if roles_info is not None and current is not None and roles_info.get("run_id") not in (None, current):
        roles_info = None  # notes of another run's 'univ roles'; its tables are left out too
    top = read("top_examples.parquet", "univ analyze")
    label_cache: dict[str, Any] = {}

    def labels(model: str) -> Callable[[int], str] | None:
        if model not in label_cache:
            label_cache[model] = _token_labeler(_load_tokenizer(manifest, model))
        return label_cache[model]

    sections = [
        ("run", "Run", lambda: _header(page, manifest, run_dir)),
        ("correlations", "Correlations",
         lambda: _correlations(page, neurons, read("histograms.parquet", "univ correlate … --out"), run_dir)),
        ("universal", "Universal neurons", lambda: _universal(page, flags, flag_source, run_dir, max_cards)),
        ("depth", "Depth", lambda: _depth(page, neurons, flags, stats_table, roles, run_dir)),
        ("cards", "Universal neurons, one by one",
         lambda: _cards(page, flags, raw_roles, top, manifest, run_dir, labels, seen, max_cards, max_examples)),
        ("statistics", "Universal vs other neurons",
         lambda: _statistics(page, stats_table, stats_source, run_dir)),
        ("families", "Neuron families",
         lambda: _families(page, profiles, read("families.parquet", "univ analyze"), flags, run_dir)),
        ("examples", "Top-activating contexts",
         lambda: _examples(page, top, flags, manifest, run_dir, max_neurons, max_examples)),
        ("prediction", "Prediction, suppression and partition neurons",
         lambda: _prediction(page, roles, roles_source, flags, run_dir, labels, seen)),
        ("entropy", "Entropy neurons",
         lambda: _entropy(page, read("interventions.parquet", "univ roles"), run_dir, roles_info)),
        ("attention", "Attention-deactivation neurons",
         lambda: _attention(page, read("bos_scores.parquet", "univ roles"), read("attention.parquet", "univ roles"),
                            read("attention_points.parquet", "univ roles"), run_dir, roles_info)),
    ]  # fmt: skip
    if compare is not None:
        from univ import latents

        sections.append(("latents", "Neurons and SAE latents",
                         lambda: latents.draw(page, run_dir, Path(compare), _new_figure)))  # fmt: skip
    for anchor_id, title, draw in sections:
        try:
            draw()
        except Exception as e:  # a table with an unexpected schema costs its section, not the whole page
            warnings.warn(f"report section {title!r} failed: {type(e).__name__}: {e}", stacklevel=2)
            msg = f"This section could not be drawn: {type(e).__name__}: {e}"
            page.add(anchor_id, title, f'<p class="missing">{html.escape(msg)}</p>')
    body_sections = page.sections
    page.sections = []
    try:  # drawn last (it lists every problem the other sections met) but shown first
        _summary(page, manifest, neurons, flags, flag_source, tables, run_dir)
    except Exception as e:
        warnings.warn(f"report section 'At a glance' failed: {type(e).__name__}: {e}", stacklevel=2)
        page.add("glance", "At a glance", f'<p class="missing">{html.escape(f"{type(e).__name__}: {e}")}</p>')
    page.sections += body_sections
    _glossary_section(page)

    names = ", ".join((manifest or {}).get("analysed") or (manifest or {}).get("labels") or [])
    title = f"univ report — {run_dir.name}" + (f" ({names})" if names else "")
    out = run_dir / "report.html"
    from univ_kernels.streaming import atomic_write_bytes

    atomic_write_bytes(out, _assemble(page, title).encode("utf-8"))
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _main(args: argparse.Namespace) -> int:
    out = run_report(args.dir, max_neurons=args.max_neurons, max_examples=args.max_examples,
                     max_cards=args.max_cards, compare=args.compare)  # fmt: skip
    print(out.resolve() if out is not None else out)
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
            "(univ correlate, universal, analyze, roles). At the top, a summary card; then one card per universal\n"
            "neuron; tables from another run (correlate ran again into DIR) are left out and listed in a warning.\n"
            "Figures are embedded as PNG and also written to\n"
            "DIR/figures/; tables sort on a header click and are written to DIR/tables/*.csv. The page loads\n"
            "nothing from the network."
        ),
        epilog="examples:\n  univ report runs/small\n  univ report runs/small --max-neurons 200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="run directory (run.json, neurons.parquet, and any later tables)")
    p.add_argument("--max-neurons", type=int, default=50, help="neurons with top-activating contexts (default 50)")
    p.add_argument("--max-examples", type=int, default=5, help="contexts per neuron (default 5)")
    p.add_argument("--max-cards", type=int, default=MAX_CARDS,
                   help=f"universal neurons with a card of their own, strongest first (default {MAX_CARDS})")
    p.add_argument("--compare", metavar="LATENT_RUN", default=None,
                   help="a 'univ correlate --sae' run of the same seeds on the same tokens: adds the section "
                        "comparing universal neurons with universal SAE latents")
    p.set_defaults(func=_main)
    return p
