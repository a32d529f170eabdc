"""``univ roles`` on a run whose neurons are SAE latents: the vocabulary roles from each latent's decoder row.

A latent writes ``W_dec[j]`` into the stream it was trained on. For a residual or MLP-output SAE that is its
output direction in the residual stream; for an SAE on the MLP neurons (``mlp.hook_post``) it passes through
the layer's output weights first (``W_dec[j] @ w_out``). Centred like the processed MLP weights, its cosine with
every processed unembedding column gives the same vocabulary moments as a neuron's, hence prediction,
suppression and partition latents with the same cuts (:mod:`univ.roles.vocab`). The entropy and
attention-deactivation interventions fix one MLP neuron's activation; they are not applied to latents, and
roles.json says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from univ.roles.vocab import RoleThresholds, classify_roles
from univ.weights import processed_mlp_weights, unit_unembedding, vocab_moments

NOT_APPLIED = ("entropy and attention-deactivation interventions fix an MLP neuron's activation; they are not "
               "applied to SAE latents")  # fmt: skip


@torch.no_grad()
def latent_directions(site_model: Any) -> list[torch.Tensor]:
    """Per SAE of a ``univ.sites.SiteModel``: [d_sae, d_model] output directions in the residual stream, centred."""
    mlps = None
    out = []
    for sae in site_model.saes:
        w = sae.W_dec.float()
        if sae.point == "mlp.hook_post":
            mlps = mlps or processed_mlp_weights(site_model.lm)
            w = w @ mlps[sae.layer].w_out.float().to(w.device)
        out.append(w - w.mean(1, keepdim=True))
    return out


@torch.no_grad()
def latent_vocab_scores(site_model: Any) -> pd.DataFrame:
    """Per latent: layer (SAE index), neuron (latent), site, w_out_norm (decoder norm) and the vocab moments."""
    u_hat = unit_unembedding(site_model.lm)
    frames = []
    for i, (sae, d) in enumerate(zip(site_model.saes, latent_directions(site_model), strict=True)):
        vocab = vocab_moments(d, u_hat)  # the same moments weight_stats gives a neuron's w_out
        columns = dict(zip(("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"), vocab, strict=True))
        frames.append(pd.DataFrame({"layer": i, "neuron": range(d.shape[0]), "site": sae.hook,
                                    "w_out_norm": d.norm(dim=1).cpu().numpy(), **columns}))  # fmt: skip
    df = pd.concat(frames, ignore_index=True)
    return df.assign(vocab_var_ratio=df["vocab_var"] * site_model.d_model)


def run_latent_roles(run_dir: Path, manifest: dict, rid: str | None, *, models: list[str] | None = None,
                     device: str | None = None, dtype: str | None = None, thresholds: RoleThresholds | None = None,
                     log: Callable[[str], None] | None = None,
                     write_parquet: Callable | None = None) -> Path:  # fmt: skip
    """roles.parquet (vocabulary roles of every latent of each analysed model) and roles.json with the notes."""
    from univ.correlate import resolve_device
    from univ.models import load_model
    from univ.roles.vocab import top_tokens_of
    from univ.sites import run_site_model

    say = log or (lambda _msg: None)
    thresholds = thresholds or RoleThresholds()
    labels = list(manifest["labels"])
    chosen = list(models) if models else list(manifest["analysed"])
    dev = resolve_device(device)
    frames, info = [], {"run_id": rid, "sites": "sae", "thresholds": thresholds.__dict__, "models": {}}
    for label in chosen:
        i = labels.index(label)
        lm = load_model(manifest["models"][i], device=dev, dtype=dtype)
        site_model = run_site_model(lm, manifest, i)
        say(f"[{label}] vocabulary roles of {site_model.n_neurons:,} latents from their decoder rows")
        df = classify_roles(latent_vocab_scores(site_model).assign(model=label), thresholds)
        roled = df[df[["is_prediction", "is_suppression", "is_partition"]].any(axis=1)]
        dirs = latent_directions(site_model)
        keys = zip(roled["layer"].astype(int), roled["neuron"].astype(int), strict=True)
        tops = top_tokens_of(lm, {(a, b): dirs[a][b] for a, b in keys})
        df = df.merge(tops, on=["layer", "neuron"], how="left")
        for c in ("top_promoted", "top_suppressed", "top_promoted_ids", "top_suppressed_ids"):
            df[c] = df[c].apply(lambda v: list(v) if isinstance(v, list) else [])
        frames.append(df)
        info["models"][label] = {"notes": [NOT_APPLIED]}
        say(f"[{label}] {NOT_APPLIED}")
    roles = pd.concat(frames, ignore_index=True)
    front = ["model", "layer", "neuron", "site", "role"]
    roles = roles[front + [c for c in roles.columns if c not in front]]
    out = run_dir / "roles.parquet"
    write_parquet(roles, out, rid)
    for stale in ("interventions", "attention", "attention_points", "bos_scores"):
        (run_dir / f"{stale}.parquet").unlink(missing_ok=True)
    info["written"] = [out.name]
    from univ_kernels.streaming import atomic_write_bytes

    atomic_write_bytes(run_dir / "roles.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    return out
