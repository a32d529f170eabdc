"""The run's outputs: the neuron table (``neurons.parquet``/csv), histograms, activation statistics, run.json."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from univ import __version__
from univ.baseline import summarize_draws
from univ.cka import FILE as LAYER_SIMILARITY
from univ.cka import cka_frame, layer_similarity_table
from univ.run import files
from univ.run.config import CorrelateConfig
from univ.run.plan import Plan
from univ.run.state import RunState
from univ.run.stream import excluded_ids


def neuron_table(state: RunState, models, labels: list[str], cfg: CorrelateConfig) -> pd.DataFrame:
    """One row per neuron of each analysed model, with the paper's columns (see ``write_outputs``)."""
    analysed = sorted({a for a, _ in state.results})
    frames = []
    for a in analysed:
        lm = models[a]
        cols: dict[str, np.ndarray] = {
            "model": np.array([labels[a]] * lm.n_neurons, dtype=object),
            "layer": np.repeat(np.arange(lm.n_layers), lm.d_mlp),
            "neuron": np.tile(np.arange(lm.d_mlp), lm.n_layers),
        }
        if hasattr(lm, "site_names"):  # SAE latents: "layer" is the SAE's index, "site" its hook point
            cols["site"] = np.repeat(np.array(lm.site_names, dtype=object), lm.d_mlp)
        others = sorted(m for x, m in state.results if x == a)
        maxes = [_inf_to_nan(state.results[(a, m)]["max"]).numpy().astype(np.float64) for m in others]
        bases = [_inf_to_nan(state.results[(a, m)]["base"]).numpy().astype(np.float64) for m in others]  # [K, n]
        s = summarize_draws(np.stack(maxes), np.stack(bases))
        for i, m in enumerate(others):
            arg, d_m = state.results[(a, m)]["arg"].numpy(), models[m].d_mlp
            cols[f"max_corr.{labels[m]}"] = maxes[i]
            cols[f"argmax_layer.{labels[m]}"] = np.where(arg >= 0, arg // d_m, -1)
            cols[f"argmax_neuron.{labels[m]}"] = np.where(arg >= 0, arg % d_m, -1)
            cols[f"baseline.{labels[m]}"] = s["baseline_mean"][i]
            cols[f"baseline_sd.{labels[m]}"] = s["baseline_sd"][i]
        for key in ("mean_corr", "min_corr", "max_corr", "mean_baseline", "max_baseline", "excess_corr",
                    "mean_baseline_sd", "excess_se", "excess_q05", "excess_min", "excess_max"):
            cols[key] = s[key]
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _inf_to_nan(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(t), float("nan"), t.float())


def write_outputs(out: Path, state: RunState, models, labels, cfg, manifest: dict) -> pd.DataFrame:
    """Write ``neurons.parquet`` (+ csv), ``histograms.parquet``, (``activation_stats.parquet``,) ``run.json``.

    Each file atomically, ``run.json`` last.

    neurons.parquet columns: ``model`` (label), ``layer``, ``neuron``; per compared model m:
    ``max_corr.<m>`` (max Pearson r over all of m's neurons), ``argmax_layer.<m>``, ``argmax_neuron.<m>``
    (where; −1 if dead), ``baseline.<m>`` (the same max over randomly rotated neurons of m, mean over the K
    baseline draws) and ``baseline_sd.<m>`` (its sd over draws; NaN for K = 1); then over m: ``mean_corr``,
    ``min_corr``, ``max_corr``, ``mean_baseline``, ``max_baseline`` and ``excess_corr = mean_corr −
    mean_baseline`` (the paper's universality score); then the draws' spread: ``mean_baseline_sd`` (sd over
    draws of the mean baseline), ``excess_se`` (its standard error, sd/√K), ``excess_q05`` (> t ⇔ the
    excess passes t in ≥ 95 % of the draws), ``excess_min``/``excess_max`` (the worst and best draw's excess;
    see ``univ.baseline.summarize_draws``). Dead neurons: NaN.

    layer_similarity.parquet (when the run kept W of both models): model, other, layer, other_layer, cka.
    """
    table = neuron_table(state, models, labels, cfg)
    files.write_table(table, out / "neurons.parquet")
    files.write_table(table, out / "neurons.csv")
    edges = np.linspace(-1, 1, cfg.bins + 1)
    hist_rows = [{"model": labels[a], "other": labels[m], "bin_left": edges[i], "bin_right": edges[i + 1],
                  "count": int(h[i])} for (a, m), h in state.hist.items() for i in range(cfg.bins)]
    files.write_table(pd.DataFrame(hist_rows), out / "histograms.parquet")
    if state.cka:
        files.write_table(layer_similarity_table([cka_frame(k.numpy(), labels[a], labels[m])
                                                  for (a, m), k in state.cka.items()]), out / LAYER_SIMILARITY)
    if state.act_stats:  # the same columns `univ stats` computes from activations, streamed in this pass
        frames = [st.result().assign(model=labels[i]) for i, st in state.act_stats.items()]
        stats = pd.concat(frames, ignore_index=True)
        stats = stats[["model", *[c for c in stats.columns if c != "model"]]]
        files.write_table(stats, out / "activation_stats.parquet")
    files.write_json(out / "run.json", manifest)  # last: its presence means the run finished
    return table


def build_manifest(cfg: CorrelateConfig, state: RunState, plan: Plan, models, labels: list[str], *,
                   tokens_seen: int, device: torch.device, operand_dtype: torch.dtype, timings: dict,
                   wall_s: float, run_id: str, fingerprint: dict) -> dict:
    """run.json: what the run was (config, models, data, plan, content fingerprint) and how it went (tokens
    used against tokens asked for, timings, versions). ``run_id`` identifies it to the later stages."""
    return {
        "run_id": run_id,
        "config": asdict(cfg),
        "models": list(cfg.models),
        "labels": labels,
        "analysed": [labels[a] for a in sorted({a for a, _ in state.results})],
        # what a neuron is: MLP neurons, or each model's SAE latents (their hooks and d_sae)
        "sites": ({"kind": "sae", "models": [{"saes": [str(s.path) for s in lm.saes], "hooks": lm.site_names,
                                              "d_sae": lm.d_mlp} for lm in models]}
                  if cfg.sae is not None else {"kind": "mlp"}),
        "data": {"source": cfg.data, "ctx": cfg.ctx, "batch_size": cfg.batch_size, "seed": cfg.seed,
                 "max_tokens": cfg.tokens, "text_field": cfg.text_field, "split": cfg.split,
                 "exclude_newlines": cfg.exclude_newlines,
                 # the ids themselves, so later stages (analyze, roles) skip exactly these positions
                 "excluded": sorted(excluded_ids(cfg, models[0].tokenizer)),
                 "excluded_rule": "pad/BOS/EOS and the single newline token (paper)" if cfg.paper_exact else
                 ("pad/BOS/EOS and every newline-only token" if cfg.exclude_newlines else "pad/BOS/EOS")},
        "mode": cfg.mode,
        "baseline": cfg.baseline,
        "baseline_seed": cfg.baseline_seed,
        "baseline_draws": cfg.baseline_draws,
        "paper_exact": cfg.paper_exact,
        "layer_similarity": bool(state.cka),
        "tokens": tokens_seen,
        "tokens_requested": cfg.tokens,
        "data_exhausted": tokens_seen < cfg.tokens,
        "device": str(device),
        "model_dtype": str(models[0].dtype).removeprefix("torch."),
        "operand_dtype": str(operand_dtype).removeprefix("torch."),
        "plan": plan.to_dict(),
        "memory": {"budget_bytes": plan.budget_bytes, "fixed_bytes": plan.fixed_bytes,
                   "passes": len(plan.passes)},
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "wall_s": round(wall_s, 3)},
        "versions": versions(),
        "model_meta": [lm.meta for lm in models],
        "fingerprint": fingerprint,
    }


def versions() -> dict:
    import transformers

    import univ_kernels

    found = {"univ": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": sys.version.split()[0], "univ_kernels": getattr(univ_kernels, "__version__", __version__)}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def summary_text(table: pd.DataFrame, threshold: float = 0.5) -> str:
    """Per model and layer: neurons, mean max-correlation vs baseline, and how many exceed the threshold."""
    lines = [f"model        layer  neurons  mean max_corr  mean baseline  excess>{threshold:.2f}"]
    for (model, layer), g in table.groupby(["model", "layer"], sort=True):
        n_univ = int((g["excess_corr"] > threshold).sum())
        lines.append(f"{str(model)[:12]:12s} {layer:5d}  {len(g):7d}  {g['mean_corr'].mean():13.3f}  "
                     f"{g['mean_baseline'].mean():13.3f}  {n_univ:5d} ({100 * n_univ / len(g):.2f} %)")
    return "\n".join(lines)
