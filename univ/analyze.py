"""Analyze: selection, statistics and families of every analysed model, in one pass over the data.

    univ analyze runs/small                     # -> runs/small/profiles.parquet (+ .csv) and friends

Reads the correlate run's ``run.json`` (models, labels, data spec) and ``neurons.parquet``. For each
analysed model: weight statistics (:mod:`univ.weights`), then ONE stream of the run's data through the
model, where each batch's activations update, side by side,

    ActivationStats       pre-activation moments, activation frequency, post mean     (univ.stats)
    NeuronFamilies        feature × neuron sums for the variance explained, position MI (univ.families)
    TopExamples           each neuron's top-k activations with their token windows     (univ.families)

and nothing of size tokens × neurons is kept. Files written in DIR:

    universal.parquet/.csv    universal rows of neurons.parquet                       (univ universal)
    profiles.parquet/.csv     one row per neuron: model, layer, neuron, is_universal, excess_corr, family,
                              best_feature, best_vr, act_mean, act_var, act_skew, act_kurt, act_freq,
                              post_mean, w_in_norm, w_out_norm, input_bias, in_out_sim, l2_penalty,
                              vocab_mean, vocab_var, vocab_skew, vocab_kurt, the per-family best features
                              (unigram_*, alphabet_*, previous_*, syntax_*), position_mi, the correlation
                              columns of neurons.parquet, and ``<stat>_pct`` within-layer percentiles
    families.parquet          model, layer, neuron, family and the feature columns
    top_examples.parquet      model, layer, neuron, rank, value, tokens, position, token, sequence,
                              ctx_position, text
    universal_compare.csv     median within-layer percentiles, universal vs other (stats.compare_universal)
    token_counts.parquet      id, count: occurrences of each token among the first --unigram-sample kept tokens
    analyze.json              options, thresholds, tokens streamed per model, versions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from univ.errors import UserError
from univ.families import (
    FamilyThresholds,
    NeuronFamilies,
    SyntaxFeatures,
    TopExamples,
    add_family_arguments,
    feature_options_from_args,
    load_syntax_model,
    thresholds_from_args,
)
from univ.sites import is_sae_run, run_site_model
from univ.stats import (
    ACT_COLUMNS,
    COMPARE_COLUMNS,
    ActivationStats,
    add_layer_percentiles,
    add_pass_arguments,
    compare_universal,
)
from univ.tables import check_same_run, read_table, write_parquet
from univ.universal import format_layer_table, read_run, select_universal, universal_by_layer
from univ.vocab_features import vocab_features

__all__ = ["PROFILE_COLUMNS", "ModelProfile", "profile_model", "profile_run", "register", "run_analyze"]

# Tables 'univ correlate' writes beside run.json: analyze refuses them when stamped with another run.
CORRELATE_TABLES = ["neurons.parquet", "histograms.parquet", "activation_stats.parquet"]

PROFILE_COLUMNS = [
    "model", "layer", "neuron", "is_universal", "excess_corr", "family", "best_feature", "best_vr",
    *ACT_COLUMNS, "w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
]  # fmt: skip
HOLD_TOKENS = 4_000_000  # a run stream up to this long is tokenized once and reused by every model (~36 MB)
CORR_COLUMNS = ["mean_corr", "min_corr", "max_corr", "mean_baseline", "max_baseline"]
FAMILY_EXTRA = [
    "unigram_feature", "unigram_vr", "alphabet_feature", "alphabet_vr", "previous_feature", "previous_vr",
    "syntax_feature", "syntax_vr", "position_mi", "dead",
]  # fmt: skip


@dataclasses.dataclass
class ModelProfile:
    """What one pass over one model produced."""

    stats: pd.DataFrame  # layer, neuron, ACT_COLUMNS
    families: pd.DataFrame | None  # layer, neuron, family, ...
    top: pd.DataFrame | None  # top examples
    tokens: int  # kept tokens streamed


# --------------------------------------------------------------------------------------------------------------------
# The pass


@torch.no_grad()
def profile_model(
    lm: Any,
    batches: Any,
    *,
    families: NeuronFamilies | None = None,
    top: TopExamples | None = None,
    thresholds: FamilyThresholds | None = None,
    label: str = "",
    total_tokens: int | None = None,
    progress: bool = True,
) -> ModelProfile:
    """Stream ``batches`` (TokenBatch) through ``lm`` once, updating statistics, families and top-k together."""
    from tqdm.auto import tqdm

    from univ.models import MlpActivations, collect_mlp_activations

    stats = ActivationStats(lm.n_layers, lm.d_mlp, device=lm.device)
    seen = 0
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"profile {label}".strip(), disable=not progress)
    for batch in batches:
        if batch.n_kept == 0:
            continue
        if hasattr(lm, "saes"):  # SAE latents (univ.sites): their own values are both "pre" and "post"
            latents = lm.latents(batch.input_ids, batch.keep)
            acts = MlpActivations(post=latents, pre=latents)
        else:
            acts = collect_mlp_activations(lm, batch.input_ids, pre=True, post=True, keep=batch.keep)  # [T, L, d]
        stats.update(acts.pre, acts.post)
        if families is not None:
            families.update(batch.input_ids, batch.keep, acts.post, acts.pre)
        if top is not None:
            top.update(batch.input_ids, batch.keep, acts.post.reshape(acts.post.shape[0], -1))
        seen += batch.n_kept
        bar.update(batch.n_kept)
    bar.close()
    if seen == 0:
        raise UserError(f"model {label or lm.name!r}: the run's data gave no kept token to profile; "
                        "check run.json's data source (or pass more --tokens)")
    stats_df = stats.result()
    fam_df = None
    if families is not None:
        fam_df = families.result(act_kurt=stats_df["act_kurt"].to_numpy(), thresholds=thresholds)
    top_df = top.result(lm.tokenizer, d_mlp=lm.d_mlp, model=label) if top is not None else None
    return ModelProfile(stats=stats_df, families=fam_df, top=top_df, tokens=seen)


def run_data_spec(manifest: dict[str, Any], tokens: int | None, batch_size: int | None) -> Any:
    """The run's token stream (``DataSpec``) from run.json, with the token budget or batch size overridden."""
    from univ.data import DataSpec

    data = dict(manifest.get("data") or {})
    if "source" not in data:
        raise UserError(
            "run.json has no data.source: cannot stream the run's data (was it written by 'univ correlate'?)"
        )
    fields = {f.name for f in dataclasses.fields(DataSpec)}
    spec = DataSpec(**{k: v for k, v in data.items() if k in fields and v is not None})
    changes: dict[str, Any] = {}
    if tokens is not None:
        changes["max_tokens"] = int(tokens)
    if batch_size is not None:
        changes["batch_size"] = int(batch_size)
    return dataclasses.replace(spec, **changes)


def run_excluded(manifest: dict[str, Any], tokenizer: Any) -> set[int] | None:
    """The positions the correlate run skipped: BOS/EOS/pad, and newlines unless it kept them."""
    from univ.data import excluded_token_ids

    data = manifest.get("data") or {}
    if "excluded" in data:
        return {int(i) for i in data["excluded"]}
    return excluded_token_ids(tokenizer, newlines=bool(data.get("exclude_newlines", True)))


def profile_run(
    run_dir: str | Path,
    *,
    tokens: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    dtype: str | None = None,
    threshold: float = 0.5,
    rule: str = "mean",
    families: bool = True,
    top_k: int = 10,
    thresholds: FamilyThresholds | None = None,
    syntax: str = "auto",
    n_tokens: int = 300,
    n_unigrams: int = 300,
    unigram_sample: int = 1_000_000,
    spacy_model: str = "en_core_web_sm",
    n_position_bins: int | None = None,
    outputs: str = "all",
    verbose: bool = True,
    progress: bool = True,
) -> Path:
    """The shared driver of ``univ stats``, ``univ families`` and ``univ analyze`` (``outputs`` picks the files).

    Stages, in order: selection → for each analysed model (load, features, one pass, weight statistics)
    → one table → files. Returns the main file written: profiles.parquet ("all"), stats.parquet ("stats"),
    families.parquet ("families").
    """
    from univ.models import load_model
    from univ.weights import weight_stats

    if outputs not in ("all", "stats", "families"):
        raise ValueError(f"outputs={outputs!r}; use 'all', 'stats' or 'families'")
    if syntax not in ("auto", "on", "off"):
        raise ValueError(f"syntax={syntax!r}; use 'auto', 'on' or 'off'")
    run_dir = Path(run_dir)
    thresholds = thresholds or FamilyThresholds()
    say = print if verbose else (lambda *a, **k: None)
    manifest = read_run(run_dir)
    sae_sites = is_sae_run(manifest)
    rid = check_same_run(run_dir, CORRELATE_TABLES, stage="univ analyze", fix=f"'univ correlate' into {run_dir}")
    labels, models = manifest["labels"], manifest["models"]
    for label in manifest["analysed"]:  # before anything slow
        if label not in labels:
            raise UserError(f"{run_dir / 'run.json'}: analysed model {label!r} is not among the labels {labels}; "
                            "the file was edited or is corrupt: rerun 'univ correlate'")
    stream = _RunStream(manifest, run_data_spec(manifest, tokens, batch_size))
    neurons = _selection(run_dir, threshold, rule, write=outputs == "all", say=say, run=rid)
    nlp = None
    if families and syntax != "off":
        nlp = load_syntax_model(spacy_model, verbose=verbose)
        if nlp is None and syntax == "on":
            raise UserError(f"--syntax on: spaCy with pipeline {spacy_model!r} is not installed "
                            f'(pip install "univ[syntax]" && python -m spacy download {spacy_model})')

    started = time.time()
    stats_frames, fam_frames, top_frames, seen = [], [], [], {}
    for label in manifest["analysed"]:
        lm = load_model(models[labels.index(label)], device=device, dtype=dtype)
        if sae_sites:  # the run's neurons are this model's SAE latents
            lm = run_site_model(lm, manifest, labels.index(label))
        fam = top = None
        if families:
            d_vocab = int(lm.model.get_output_embeddings().weight.shape[0])
            counts = stream.token_counts(lm, d_vocab, unigram_sample) if unigram_sample > 0 else None
            vocab = vocab_features(
                lm.tokenizer, vocab_size=d_vocab, token_counts=counts, n_tokens=n_tokens, n_unigrams=n_unigrams
            )
            syn = SyntaxFeatures(nlp, lm.tokenizer, vocab_size=d_vocab) if nlp is not None else None
            fam = NeuronFamilies(
                vocab, lm.n_layers, lm.d_mlp, ctx=stream.spec.ctx, syntax=syn, n_position_bins=n_position_bins,
                device=lm.device,
            )  # fmt: skip
            top = TopExamples(lm.n_neurons, top_k, device=lm.device) if top_k > 0 else None
        profile = profile_model(
            lm, stream.batches(lm), families=fam, top=top, thresholds=thresholds, label=label,
            total_tokens=stream.spec.max_tokens, progress=progress,
        )  # fmt: skip
        seen[label] = profile.tokens
        frame = profile.stats
        if outputs != "families":
            if sae_sites:  # a latent's weights: its decoder row (norm, vocab moments); the MLP columns do not apply
                from univ.roles.latents import latent_vocab_scores

                weights = latent_vocab_scores(lm).drop(columns=["site", "vocab_var_ratio"])
            else:
                weights = weight_stats(lm)
            frame = frame.merge(weights, on=["layer", "neuron"], how="left")
        stats_frames.append(frame.assign(model=label))
        if profile.families is not None:
            fam_frames.append(profile.families.drop(columns=["act_kurt"], errors="ignore").assign(model=label))
        if profile.top is not None:
            top_frames.append(profile.top)
        del lm, fam, top
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    stats_df = _front(pd.concat(stats_frames, ignore_index=True), "model")
    fam_df = _front(pd.concat(fam_frames, ignore_index=True), "model") if fam_frames else None
    profiles = stats_df if fam_df is None else stats_df.merge(fam_df, on=["model", "layer", "neuron"], how="left")
    profiles = _join_correlations(profiles, neurons)
    profiles = add_layer_percentiles(
        profiles, [c for c in [*COMPARE_COLUMNS, "best_vr", "position_mi"] if c in profiles]
    )
    info = {
        "run_id": rid, "outputs": outputs, "threshold": threshold, "rule": rule, "data": stream.spec.to_dict(),
        "tokens": seen,
        "families": dataclasses.asdict(thresholds) if families else None, "top_k": top_k if families else 0,
        "syntax": nlp is not None,
        "features": {"n_tokens": n_tokens, "n_unigrams": n_unigrams, "unigram_sample": unigram_sample},
        "seconds": round(time.time() - started, 1), "versions": {"torch": torch.__version__, "pandas": pd.__version__},
    }  # fmt: skip
    if stream.counts and outputs == "all":  # which tokens occur in the data (the report marks the others)
        counts = next(iter(stream.counts.values()))
        seen_ids = np.flatnonzero(counts)
        write_parquet(pd.DataFrame({"id": seen_ids, "count": counts[seen_ids]}), run_dir / "token_counts.parquet", rid)
        info["token_counts_tokens"] = int(counts.sum())
    return _write_outputs(
        run_dir, outputs, profiles, fam_df, top_frames, info, has_neurons=neurons is not None, say=say, run=rid
    )


class _RunStream:
    """The run's token stream for every model. Models of one run share a tokenizer (correlate checks it),
    so a stream up to HOLD_TOKENS long is tokenized once and held (ids + mask, ~9 B/token) for all of them."""

    def __init__(self, manifest: dict[str, Any], spec: Any) -> None:
        self.manifest, self.spec = manifest, spec
        self.held: list | None = None
        self.counts: dict[int, np.ndarray] = {}

    def _stream(self, lm: Any, max_tokens: int | None) -> Any:
        from univ.data import token_batches

        return token_batches(
            **_batch_kwargs(self.spec, max_tokens),
            tokenizer=lm.tokenizer,
            excluded=run_excluded(self.manifest, lm.tokenizer),
        )

    def batches(self, lm: Any) -> Any:
        """TokenBatch iterable of the whole budget (held if short)."""
        from univ.data import check_ctx

        check_ctx(lm, self.spec.ctx)
        if self.held is not None:
            return self.held
        if self._holds():
            self.held = list(self._stream(lm, self.spec.max_tokens))
            return self.held
        return self._stream(lm, self.spec.max_tokens)

    def token_counts(self, lm: Any, vocab_size: int, sample: int) -> np.ndarray:
        """Occurrences of each id among the first ``sample`` kept tokens (tokenizer only, no model): they rank
        the token/unigram features by frequency before the pass."""
        if vocab_size not in self.counts:
            n = sample if self.spec.max_tokens is None else min(sample, self.spec.max_tokens)
            self.counts[vocab_size] = _count_first(
                self.batches(lm) if self._holds() else self._stream(lm, n), n, vocab_size
            )
        return self.counts[vocab_size]

    def _holds(self) -> bool:
        return self.spec.max_tokens is not None and self.spec.max_tokens <= HOLD_TOKENS


def _selection(
    run_dir: Path, threshold: float, rule: str, *, write: bool, say: Any, run: str | None = None
) -> pd.DataFrame | None:
    """neurons.parquet with is_universal (None if the run has none); with ``write``, the universal files."""
    if not (run_dir / "neurons.parquet").is_file():
        say(f"note: {run_dir / 'neurons.parquet'} not found; profiles carry no universality")
        return None
    neurons = read_table(run_dir / "neurons.parquet", made_by="univ correlate")
    neurons = neurons.assign(is_universal=select_universal(neurons, threshold=threshold, rule=rule))
    if write:
        universal = neurons[neurons["is_universal"]].reset_index(drop=True)
        write_parquet(universal, run_dir / "universal.parquet", run)
        universal.to_csv(run_dir / "universal.csv", index=False)
        say(f"universal neurons (rule {rule!r}, threshold {threshold}):")
        say(format_layer_table(universal_by_layer(neurons)))
    return neurons


def _write_outputs(
    run_dir: Path,
    outputs: str,
    profiles: pd.DataFrame,
    fam_df: pd.DataFrame | None,
    top_frames: list[pd.DataFrame],
    info: dict[str, Any],
    *,
    has_neurons: bool,
    say: Any,
    run: str | None = None,
) -> Path:
    """Write the files of ``outputs`` (module doc lists them); return the main one."""
    if outputs in ("all", "stats") and has_neurons:
        compare = compare_universal(profiles)
        compare.to_csv(run_dir / ("universal_compare.csv" if outputs == "all" else "stats_compare.csv"), index=False)
        say("median within-layer percentile, universal vs other:")
        say(compare[["model", "metric", "universal_pct", "other_pct"]].to_string(index=False, float_format="%.1f"))
    if fam_df is not None and outputs != "stats":
        keys = ["model", "layer", "neuron"]
        fam_df = fam_df.merge(profiles[[*keys, "is_universal"]], on=keys, how="left") if has_neurons else fam_df
        write_parquet(fam_df, run_dir / "families.parquet", run)
        if top_frames:
            write_parquet(pd.concat(top_frames, ignore_index=True), run_dir / "top_examples.parquet", run)
        say(_family_table(profiles))
    if outputs == "stats":
        out = run_dir / "stats.parquet"
        write_parquet(profiles, out, run)
        profiles.to_csv(run_dir / "stats.csv", index=False)
    elif outputs == "families":
        out = run_dir / "families.parquet"
    else:
        out = run_dir / "profiles.parquet"
        profiles = _order_columns(profiles)
        write_parquet(profiles, out, run)
        profiles.to_csv(run_dir / "profiles.csv", index=False)
        (run_dir / "analyze.json").write_text(json.dumps(info, indent=2, default=str))
    say(f"wrote {out}")
    return out


def _count_first(batches: Any, n: int, vocab_size: int) -> np.ndarray:
    """Occurrences of each id among the first ``n`` kept tokens of ``batches``."""
    from univ.vocab_features import count_tokens

    ids, keeps, total = [], [], 0
    for b in batches:
        keep = b.keep
        if total + b.n_kept > n:
            keep = keep & (keep.flatten().cumsum(0) <= n - total).view_as(keep)
        ids.append(b.input_ids)
        keeps.append(keep)
        total += int(keep.sum())
        if total >= n:
            break
    return count_tokens(ids, vocab_size, keep=keeps)


def _batch_kwargs(spec: Any, max_tokens: int | None) -> dict[str, Any]:
    return dict(
        source=spec.source, ctx=spec.ctx, batch_size=spec.batch_size, seed=spec.seed, max_tokens=max_tokens,
        text_field=spec.text_field, split=spec.split, shuffle_buffer=spec.shuffle_buffer,
    )  # fmt: skip


def _front(df: pd.DataFrame, col: str) -> pd.DataFrame:
    return df[[col] + [c for c in df.columns if c != col]]


def _join_correlations(profiles: pd.DataFrame, neurons: pd.DataFrame | None) -> pd.DataFrame:
    """Add is_universal, excess_corr and the correlation summary columns of neurons.parquet."""
    if neurons is None:
        return profiles.assign(is_universal=False, excess_corr=np.nan)
    cols = ["model", "layer", "neuron", "is_universal"] + [c for c in ["excess_corr", *CORR_COLUMNS] if c in neurons]
    out = profiles.merge(neurons[cols], on=["model", "layer", "neuron"], how="left")
    if "excess_corr" not in out:
        out["excess_corr"] = out.get("mean_corr", np.nan) - out.get("mean_baseline", np.nan)
    out["is_universal"] = out["is_universal"].fillna(False).astype(bool)
    return out


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in PROFILE_COLUMNS if c in df]
    middle = [c for c in FAMILY_EXTRA + CORR_COLUMNS if c in df and c not in first]
    rest = [c for c in df.columns if c not in first and c not in middle]
    return df[first + middle + rest]


def _family_table(profiles: pd.DataFrame) -> str:
    """Counts of each family, among universal neurons and among all, per model."""
    if "family" not in profiles:
        return ""
    t = profiles.groupby(["model", "family"]).agg(all=("neuron", "size"), universal=("is_universal", "sum"))
    return "families (neurons per family):\n" + t.reset_index().to_string(index=False)


# --------------------------------------------------------------------------------------------------------------------
# Command


def run_analyze(
    run_dir: str | Path,
    *,
    tokens: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    dtype: str | None = None,
    threshold: float = 0.5,
    rule: str = "mean",
    top_k: int = 10,
    thresholds: FamilyThresholds | None = None,
    syntax: str = "auto",
    verbose: bool = True,
    progress: bool = True,
    **feature_options: Any,
) -> Path:
    """Selection, statistics and families of every analysed model of a run; returns ``DIR/profiles.parquet``.

    Example:
        >>> path = run_analyze("runs/small", tokens=200_000)  # doctest: +SKIP
        >>> pd.read_parquet(path).query("is_universal").family.value_counts()  # doctest: +SKIP
    """
    return profile_run(
        run_dir, tokens=tokens, device=device, batch_size=batch_size, dtype=dtype, threshold=threshold, rule=rule,
        families=True, top_k=top_k, thresholds=thresholds, syntax=syntax, verbose=verbose, progress=progress,
        outputs="all",
        **feature_options,
    )  # fmt: skip


def _main(args: argparse.Namespace) -> int:
    run_analyze(
        args.dir, tokens=args.tokens, device=args.device, batch_size=args.batch_size, dtype=args.dtype,
        threshold=args.threshold, rule=args.rule, top_k=args.top_k, thresholds=thresholds_from_args(args),
        syntax=args.syntax, **feature_options_from_args(args),
    )  # fmt: skip
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ analyze``."""
    p = subparsers.add_parser(
        "analyze",
        help="universal selection + statistics + families in one pass -> profiles.parquet",
        description=textwrap.fill(
            "Reads DIR/run.json and DIR/neurons.parquet (from 'univ correlate'). Selects universal neurons "
            "(excess correlation > --threshold), then for every analysed model streams the run's data ONCE and "
            "computes, from the same activations, the activation statistics ('univ stats'), the token-feature "
            "families and top examples ('univ families'), plus weight statistics on processed weights. Writes "
            "DIR/profiles.parquet and .csv (one row per neuron, with within-layer percentiles), "
            "universal.parquet/.csv, families.parquet, top_examples.parquet, universal_compare.csv and "
            "analyze.json; prints the per-layer universal counts, the universal-vs-rest comparison and "
            "family counts."
        ),
        epilog=(
            "examples:\n"
            "  univ analyze runs/small\n"
            "  univ analyze runs/small --tokens 1000000 --device cuda --batch-size 32\n"
            "  univ analyze runs/small --threshold 0.4 --rule strict --top-k 20"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pass_arguments(p)
    add_family_arguments(p)
    p.set_defaults(func=_main)
    return p
