"""Universal neurons against universal SAE latents: two correlate runs on the same tokens, side by side.

``compare_runs(neuron_run, latent_run)`` counts how many units of each kind pass the paper's rule (excess
correlation > 0.5; dead latents, NaN, never do) and asks whether universal latents line up with universal
neurons in the weights: for each latent of the reference model, the neuron of the same model whose output
direction (processed ``w_out``, in a layer that writes into the stream the SAE reads) is closest in |cos| to the
latent's decoder row. If universality were a property of the features both describe, universal latents would
pick universal neurons more often than other latents do. ``univ report NEURON_RUN --compare LATENT_RUN`` draws it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from univ.errors import UserError

__all__ = ["compare_runs", "draw"]

THRESHOLD = 0.5


@torch.no_grad()
def compare_runs(neuron_run: str | Path, latent_run: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """(summary, one row per latent of the reference model: excess, best-aligned neuron, its |cos|, universal?)."""
    from univ.models import load_model
    from univ.roles.latents import latent_directions
    from univ.sites import is_sae_run, run_site_model
    from univ.universal import read_run
    from univ.weights import processed_mlp_weights

    neuron_run, latent_run = Path(neuron_run), Path(latent_run)
    nj, lj = read_run(neuron_run), read_run(latent_run)
    if is_sae_run(nj) or not is_sae_run(lj):
        raise UserError(f"compare a run of MLP neurons ({neuron_run}) with a run of SAE latents ({latent_run}, "
                        "'univ correlate --sae')")  # fmt: skip
    if nj["models"] != lj["models"]:
        raise UserError(f"the two runs correlate other models ({nj['models']} vs {lj['models']}): compare runs of "
                        "the same seeds")  # fmt: skip
    same_tokens = {k: nj["data"].get(k) for k in ("source", "max_tokens", "ctx", "seed")} == \
        {k: lj["data"].get(k) for k in ("source", "max_tokens", "ctx", "seed")}  # fmt: skip
    neurons = pd.read_parquet(neuron_run / "neurons.parquet")
    latents = pd.read_parquet(latent_run / "neurons.parquet")
    ref = nj["labels"][0]
    neurons, latents = neurons[neurons["model"] == ref], latents[latents["model"] == lj["labels"][0]]
    n_uni = neurons["excess_corr"] > THRESHOLD
    l_uni = latents["excess_corr"] > THRESHOLD
    lm = load_model(nj["models"][0], device="cpu")
    site = run_site_model(lm, lj, 0)
    w_out = processed_mlp_weights(lm)
    uni_keys = set(zip(neurons.loc[n_uni, "layer"], neurons.loc[n_uni, "neuron"], strict=True))
    rows = []
    for i, (sae, dirs) in enumerate(zip(site.saes, latent_directions(site), strict=True)):
        # neurons whose output reaches the stream this SAE reads
        last = sae.layer if sae.point in ("hook_resid_post", "hook_mlp_out") else sae.layer - 1
        if sae.point == "mlp.hook_post" or last < 0:
            continue
        layers = list(range(last + 1)) if sae.point == "hook_resid_post" or sae.point == "hook_resid_pre" else [last]
        outs = torch.cat([w_out[la].w_out.float() for la in layers])  # [n, d_model]
        outs = outs / outs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        hat = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = (hat @ outs.T).abs()  # [d_sae, n]
        best = cos.max(1)
        d_mlp = w_out[0].w_out.shape[0]
        for j in range(hat.shape[0]):
            flat = int(best.indices[j])
            layer, n = layers[flat // d_mlp], flat % d_mlp
            rows.append({"sae": i, "site": sae.hook, "latent": j, "best_layer": layer, "best_neuron": n,
                         "abs_cos": float(best.values[j]), "neuron_universal": (layer, n) in uni_keys})  # fmt: skip
    table = pd.DataFrame(rows)
    if len(table):
        table = table.merge(latents[["layer", "neuron", "excess_corr"]].rename(
            columns={"layer": "sae", "neuron": "latent"}), on=["sae", "latent"], how="left")  # fmt: skip
        table["latent_universal"] = table["excess_corr"] > THRESHOLD

    def share(mask: pd.Series) -> float:
        return float(table.loc[mask, "neuron_universal"].mean()) if len(table) and mask.any() else float("nan")

    summary = {
        "same_tokens": same_tokens, "reference": ref,
        "neurons": int(len(neurons)), "universal_neurons": int(n_uni.sum()),
        "latents": int(len(latents)), "universal_latents": int(l_uni.sum()),
        "dead_latents": int(latents["excess_corr"].isna().sum()),
        "uni_latents_pick_uni_neuron": share(table["latent_universal"]) if len(table) else float("nan"),
        "other_latents_pick_uni_neuron": share(~table["latent_universal"]) if len(table) else float("nan"),
        "median_abs_cos_universal": float(table.loc[table["latent_universal"], "abs_cos"].median())
        if len(table) and table["latent_universal"].any() else float("nan"),
        "median_abs_cos_other": float(table.loc[~table["latent_universal"], "abs_cos"].median())
        if len(table) else float("nan"),
    }  # fmt: skip
    return summary, table


def draw(page: Any, neuron_run: Path, latent_run: Path, new_figure: Any) -> None:
    """The report section "Neurons and SAE latents"."""
    s, table = compare_runs(neuron_run, latent_run)
    pct = lambda a, b: 100 * a / b if b else float("nan")  # noqa: E731
    body = [
        f"<p>Units of {html.escape(s['reference'])}: {s['universal_neurons']:,} of {s['neurons']:,} MLP neurons "
        f"({pct(s['universal_neurons'], s['neurons']):.2f} %) and {s['universal_latents']:,} of {s['latents']:,} "
        f"SAE latents ({pct(s['universal_latents'], s['latents']):.2f} %; {s['dead_latents']:,} dead) pass the "
        f"paper's rule (excess correlation &gt; {THRESHOLD})"
        + ("" if s["same_tokens"] else " — <b>the two runs read different tokens</b>, so the counts are not "
           "comparable") + ". Latents from <code>" + html.escape(str(latent_run)) + "</code>.</p>",
        f"<p>Do universal latents line up with universal neurons? The neuron whose output direction is closest to "
        f"a latent's decoder row is universal for {100 * s['uni_latents_pick_uni_neuron']:.0f} % of the universal "
        f"latents and {100 * s['other_latents_pick_uni_neuron']:.0f} % of the others (median |cos| "
        f"{s['median_abs_cos_universal']:.2f} vs {s['median_abs_cos_other']:.2f}).</p>",
    ]
    if len(table):
        fig, ax = new_figure(6, 3.4)
        for flag, colour, label in ((False, "C7", "other latents"), (True, "C3", "universal latents")):
            values = table.loc[table["latent_universal"] == flag, "abs_cos"]
            if len(values):
                ax[0, 0].hist(values, bins=np.linspace(0, 1, 41), histtype="step", color=colour, lw=1.6,
                              density=True, label=f"{label} ({len(values)})")  # fmt: skip
        ax[0, 0].set(xlabel="|cos| of decoder row with the closest neuron's w_out", ylabel="density")
        ax[0, 0].legend(fontsize=7)
        body.append(page.figure(fig, "latents_alignment", "latent decoder rows vs the closest neuron's w_out"))
        body.append(page.table(table.sort_values("excess_corr", ascending=False), "latents_alignment"))
    page.add("latents", "Neurons and SAE latents", "".join(body))
