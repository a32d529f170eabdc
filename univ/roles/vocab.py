"""Vocabulary roles (prediction, suppression, partition) and the classification of every score into a role.

All scores use TransformerLens-style processed weights (:mod:`univ.weights`: norms folded in, w_out and W_U
centred), so that directions a norm removes never count.

The neuron's direct effect on the logits is W_Uᵀ w_out. Over the vocabulary, the moments of
cos(W_U[:, v], w_out) sort neurons: **prediction** ⇔ kurtosis > 10 and skew > 0 (it boosts a small set of
tokens), **suppression** ⇔ kurtosis > 10 and skew < 0, **partition** ⇔ high variance (it splits the
vocabulary in two). The paper's partition cut is vocab_var > 0.005 on GPT2-medium; a random direction has
vocab_var ≈ 1/d_model, so we cut on ``vocab_var_ratio = vocab_var · d_model > 5`` by default (5/1024 ≈ 0.005
there, and the same meaning at any width); ``partition_var`` restores an absolute cut. Prediction neurons
appear after the middle of the network and suppression neurons dominate the last layers (``layer_trend``).

``classify_roles`` turns the scores of every module into is_* flags and one ``role``; the entropy and attention cuts
of ``RoleThresholds`` are explained in :mod:`univ.roles.entropy` and :mod:`univ.roles.attention`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from univ.models import LoadedModel, require_causal
from univ.weights import processed_mlp_weights, processed_unembedding, weight_stats

__all__ = [
    "ROLE_NAMES",
    "RoleThresholds",
    "classify_roles",
    "layer_trend",
    "top_tokens",
    "top_tokens_of",
    "vocab_role_scores",
]

ROLE_NAMES = ("prediction", "suppression", "partition", "entropy", "attention")  # precedence of ``role``
TREND_PERCENTILES = (5, 10, 50, 90, 95)  # the paper's layer-trend figure
TOP_TOKENS = 10


@dataclass(frozen=True)
class RoleThresholds:
    """The cuts that turn scores into roles (module docstring for where each number comes from)."""

    kurt: float = 10.0  # vocab kurtosis (non-excess) above which a neuron predicts or suppresses
    partition_ratio: float = 5.0  # vocab_var · d_model above which a neuron partitions the vocabulary
    partition_var: float | None = None  # absolute vocab_var cut instead (the paper's 0.005 on GPT2-medium)
    entropy_share: float = 0.5  # null_share at or above which a large neuron is an entropy neuron
    entropy_norm_pct: float = 90.0  # ... if its ‖w_out‖ is at or above this within-layer percentile
    bos_z: float = 5.0  # |bos_z| at or above which a neuron is an attention (de)activation neuron


# --------------------------------------------------------------------------------------------------------------------
# Prediction, suppression, partition


@torch.no_grad()
def vocab_role_scores(lm: LoadedModel) -> pd.DataFrame:
    """Per neuron: layer, neuron, w_out_norm and the moments over the vocabulary of cos(W_U[:, v], w_out).

    Adds ``vocab_var_ratio = vocab_var · d_model``: 1 for a random direction, whatever the model's width.
    """
    require_causal(lm, "the vocabulary roles (prediction, suppression, partition)")
    df = weight_stats(lm)[["layer", "neuron", "w_out_norm", "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"]]
    return df.assign(vocab_var_ratio=df["vocab_var"] * lm.d_model)


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], clean_up_tokenization_spaces=False) for i in ids]


@torch.no_grad()
def top_tokens(lm: LoadedModel, neurons: Iterable[tuple[int, int]], k: int = TOP_TOKENS) -> pd.DataFrame:
    """The tokens each neuron's direct logit effect W_Uᵀ w_out raises and lowers most (processed weights).

    Columns: layer, neuron, top_promoted_ids, top_promoted, top_suppressed_ids, top_suppressed (lists,
    strongest first; strings decoded one token at a time).
    """
    neurons = sorted({(int(l_), int(n)) for l_, n in neurons})
    mlps = processed_mlp_weights(lm) if neurons else []
    return top_tokens_of(lm, {(layer, n): mlps[layer].w_out[n] for layer, n in neurons}, k)


@torch.no_grad()
def top_tokens_of(lm: LoadedModel, directions: dict[tuple[int, int], torch.Tensor],
                  k: int = TOP_TOKENS) -> pd.DataFrame:
    """``top_tokens`` for any output directions in the residual stream (SAE latents' decoder rows too)."""
    w_u, _ = processed_unembedding(lm)  # [d_model, V]
    k = min(k, w_u.shape[1])
    rows = []
    for (layer, n), direction in sorted(directions.items()):
        effect = direction.to(w_u) @ w_u  # [V]
        up = torch.topk(effect, k).indices.tolist()
        down = torch.topk(-effect, k).indices.tolist()
        rows.append(
            {
                "layer": layer,
                "neuron": n,
                "top_promoted_ids": up,
                "top_promoted": _decode(lm.tokenizer, up),
                "top_suppressed_ids": down,
                "top_suppressed": _decode(lm.tokenizer, down),
            }
        )
    cols = ["layer", "neuron", "top_promoted_ids", "top_promoted", "top_suppressed_ids", "top_suppressed"]
    return pd.DataFrame(rows, columns=cols)


def layer_trend(df: pd.DataFrame, percentiles: Sequence[float] = TREND_PERCENTILES) -> pd.DataFrame:
    """Per (model, layer): percentiles of vocab_kurt and vocab_skew over all neurons, and role counts.

    The paper's figure: after the middle of the network the upper kurtosis percentiles rise with positive skew
    (prediction neurons); in the last layers the skew turns negative (suppression neurons).
    Columns: model, layer, neurons, kurt_p5 … kurt_p95, skew_p5 … skew_p95, and n_prediction, n_suppression,
    n_partition when ``df`` has the is_* flags.
    """
    df = df if "model" in df else df.assign(model="")
    rows = []
    for (model, layer), g in df.groupby(["model", "layer"], sort=True):
        row: dict[str, Any] = {"model": model, "layer": int(layer), "neurons": len(g)}
        for stat, col in (("kurt", "vocab_kurt"), ("skew", "vocab_skew")):
            values = g[col].dropna().to_numpy()
            for p in percentiles:
                row[f"{stat}_p{p:g}"] = float(np.percentile(values, p)) if len(values) else float("nan")
        for role in ("prediction", "suppression", "partition"):
            if f"is_{role}" in g:
                row[f"n_{role}"] = int(g[f"is_{role}"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Classification


def classify_roles(df: pd.DataFrame, thresholds: RoleThresholds | None = None) -> pd.DataFrame:
    """Add is_prediction, is_suppression, is_partition, is_entropy, is_attention and ``role`` (the first true
    one in ROLE_NAMES order, "none" otherwise). Uses whichever score columns ``df`` has; missing → False.

    Example:
        >>> df = pd.DataFrame({"layer": [0, 0], "vocab_kurt": [25.0, 3.0], "vocab_skew": [-2.0, 0.1]})
        >>> classify_roles(df)["role"].tolist()
        ['suppression', 'none']
    """
    t = thresholds or RoleThresholds()
    out = df.copy()
    false = pd.Series(False, index=out.index)

    def col(name: str) -> pd.Series:
        return out[name].astype(float) if name in out else pd.Series(np.nan, index=out.index)

    kurt, skew = col("vocab_kurt"), col("vocab_skew")
    out["is_prediction"] = (kurt > t.kurt) & (skew > 0)
    out["is_suppression"] = (kurt > t.kurt) & (skew < 0)
    if t.partition_var is not None:
        out["is_partition"] = col("vocab_var") > t.partition_var
    else:
        out["is_partition"] = col("vocab_var_ratio") > t.partition_ratio
    if "null_share" in out and "w_out_norm" in out:
        keys = ["model", "layer"] if "model" in out else ["layer"]
        norm_pct = out.groupby(keys, sort=False)["w_out_norm"].rank(pct=True) * 100
        out["is_entropy"] = (col("null_share") >= t.entropy_share) & (norm_pct >= t.entropy_norm_pct)
    else:
        out["is_entropy"] = false
    out["is_attention"] = col("bos_z").abs() >= t.bos_z
    role = pd.Series("none", index=out.index, dtype=object)
    for name in reversed(ROLE_NAMES):
        role = role.mask(out[f"is_{name}"], name)
    out["role"] = role
    return out
