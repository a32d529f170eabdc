"""Roles: what a neuron does to the model's output, read from its weights and checked by intervention.

Gurnee et al. (2024, §5 and PAPER_NOTES §6) name three weight-level roles. All scores use TransformerLens-style
processed weights (:mod:`univ.weights`: norms folded in, w_out and W_U centred), so that directions a norm
removes never count.

Prediction / suppression / partition (vocabulary roles)
    The neuron's direct effect on the logits is W_Uᵀ w_out. Over the vocabulary, the moments of
    cos(W_U[:, v], w_out) sort neurons: **prediction** ⇔ kurtosis > 10 and skew > 0 (it boosts a small set of
    tokens), **suppression** ⇔ kurtosis > 10 and skew < 0, **partition** ⇔ high variance (it splits the
    vocabulary in two). The paper's partition cut is vocab_var > 0.005 on GPT2-medium; a random direction has
    vocab_var ≈ 1/d_model, so we cut on ``vocab_var_ratio = vocab_var · d_model > 5`` by default (5/1024 ≈ 0.005
    there, and the same meaning at any width); ``partition_var`` restores an absolute cut. Prediction neurons
    appear after the middle of the network and suppression neurons dominate the last layers (``layer_trend``).

Entropy neurons
    A large w_out that W_U barely reads: it changes the final norm's denominator σ and so scales every logit
    (a temperature) without changing their order. ``null_share = ‖P_N w_out‖ / ‖w_out‖`` with N the *effective
    null space* of W_U: the left singular directions of the processed W_U with the ``null_dims`` smallest
    singular values (default max(1, round(0.01·d_model)), the k ≈ 1 % of Stolfo et al. 2024), together with
    every direction whose singular value is numerically zero. For LayerNorm models the all-ones direction
    is removed first: the norm subtracts the mean, so no neuron can write there (processed w_out has no
    component along it) and counting it would waste a slot. A random direction has null_share ≈
    sqrt(k / d_model). Flag: null_share ≥ 0.5 and ‖w_out‖ at or above the 90th percentile of its layer.
    Confirmed by ``entropy_intervention``: fix the post-activation at multiples of the neuron's typical
    maximum (median over sequences of the per-sequence max) and record mean next-token entropy (nats),
    loss, the final norm's scale σ = sqrt(Var(x) + eps) (TransformerLens' ``ln_final.hook_scale``, what the
    paper plots; the norm multiplies by 1/σ) and the true token's rank, against random neurons of the same
    layers. An entropy neuron raises σ and the entropy as its activation grows, and keeps the ranks.

Attention (de)activation neurons
    For MLP neuron n in layer l and attention head h in a layer after l:
    ``h(n) = ŵ_outᵀ W_Q^h k_BOS^h · scale`` with ŵ_out the unit processed w_out, W_Q^h the processed query
    weights (the attention norm's γ folded in, centred over d_model), k_BOS^h the key of a BOS-only sequence
    (the model's own forward on [BOS], read at the attention input) and scale the model's (1/√d_head for
    GPT-2). Positive h: the neuron pushes the head's query towards BOS, the head attends to BOS and its
    output shrinks (deactivation). The baseline is the same score for random unit directions (centred like
    w_out); ``bos_z = h / rms(baseline of that head)`` makes heads comparable, and |bos_z| ≥ 5 flags the
    role (a Gaussian tail of 6e-7 per pair: ~1 false pair among GPT-2 small's 2.6 M). Confirmed by
    ``bos_path_intervention``: remove activation × w_out (raw weights: exactly what the neuron added) from
    the residual that feeds the head's *queries* only — keys and values untouched — and measure the change
    in attention to BOS and in the head's output norm. GPT-2 only: rotary models (NeoX, Llama, …) rotate
    queries by position, so the score depends on the query position and the path edit needs their attention
    internals; both raise NotImplementedError there.

``univ roles DIR`` scores every neuron of each analysed model, runs the interventions on a few batches of
the run's data for candidate neurons (universal neurons if ``universal.parquet``/``profiles.parquet`` exist,
else every neuron, the top few by score; or ``--neurons``) and writes:

    roles.parquet              one row per neuron: role, is_* flags, vocab moments, null_share, the top BOS head
    interventions.parquet      entropy curves: one row per (neuron, fixed value), plus random and nominal rows
    attention.parquet          path intervention, one row per (neuron, head) pair
    attention_points.parquet   per-position points of the path intervention (subsampled), for scatter plots
    bos_scores.parquet         histogram of h over every (neuron, later head) pair and of the random baseline
    roles.json                 thresholds, candidates, notes (what was skipped and why)

and joins the role columns into ``profiles.parquet`` when it exists (atomic rewrite). A run with interventions
removes intervention tables it did not produce (an earlier run's, for other candidates); ``--no-interventions``
leaves them in place.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from univ.models import LoadedModel, attention_weights, mlp_weights, run_with_neuron_values
from univ.universal import read_run
from univ.weights import processed_mlp_weights, processed_unembedding, weight_stats

__all__ = [
    "BosScores",
    "DEFAULT_MULTIPLES",
    "ROLE_NAMES",
    "RoleThresholds",
    "bos_keys",
    "bos_path_intervention",
    "bos_scores",
    "classify_roles",
    "entropy_intervention",
    "entropy_scores",
    "layer_trend",
    "parse_neurons",
    "register",
    "run_roles",
    "summarize_path",
    "top_tokens",
    "unembedding_null_space",
    "vocab_role_scores",
]

ROLE_NAMES = ("prediction", "suppression", "partition", "entropy", "attention")  # precedence of ``role``
DEFAULT_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)  # × typical max; the paper fixed 0..6 for max ≈ 1-2
TREND_PERCENTILES = (5, 10, 50, 90, 95)  # the paper's layer-trend figure
TOP_TOKENS = 10
METRIC_CHUNK = 1 << 25  # logits elements per metric chunk: 128 MB in fp32
MAX_POINTS = 2000  # per (neuron, head) pair in attention_points.parquet: enough for a scatter plot
ROLE_COLUMNS = [
    "role", "is_prediction", "is_suppression", "is_partition", "is_entropy", "is_attention", "vocab_var_ratio",
    "null_share", "null_norm", "top_bos_head", "bos_layer", "bos_head", "bos_score", "bos_z", "top_promoted",
    "top_suppressed",
]  # fmt: skip  # joined into profiles.parquet


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
    w_u, _ = processed_unembedding(lm)  # [d_model, V]
    mlps = processed_mlp_weights(lm)
    k = min(k, w_u.shape[1])
    rows = []
    for layer, n in neurons:
        effect = mlps[layer].w_out[n] @ w_u  # [V]
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
# Entropy neurons: scores


def default_null_dims(d_model: int) -> int:
    """k ≈ 1 % of d_model (Stolfo et al. 2024), at least one direction."""
    return max(1, round(0.01 * d_model))


@torch.no_grad()
def unembedding_null_space(lm: LoadedModel, null_dims: int | None = None, *, rtol: float = 1e-5) -> Tensor:
    """Orthonormal basis [d_model, m] of W_U's effective null space (module docstring), float64.

    The ``null_dims`` left singular directions of the processed W_U with the smallest singular values, plus
    any whose singular value is below ``rtol`` times the largest; LayerNorm models exclude the all-ones
    direction. Computed from the eigenvectors of W_U W_Uᵀ ([d_model, d_model]): the same directions as the
    SVD at a fraction of the cost for a 50 k vocabulary.
    """
    w_u, _ = processed_unembedding(lm)
    w_u = w_u.double()
    d = w_u.shape[0]
    if lm.adapter.norm == "layernorm":
        # Orthonormal basis of the complement of 1/√d: QR of [1, I] keeps the ones column first.
        ones = torch.ones(d, 1, dtype=w_u.dtype, device=w_u.device) / math.sqrt(d)
        q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=w_u.dtype, device=w_u.device)], 1))
        basis = q[:, 1:d]  # [d, d-1]
    else:
        basis = torch.eye(d, dtype=w_u.dtype, device=w_u.device)
    reduced = basis.T @ w_u  # [d', V]
    eigvals, eigvecs = torch.linalg.eigh(reduced @ reduced.T)  # ascending; eigenvalues are σ²
    sigma = eigvals.clamp_min(0).sqrt()
    k = default_null_dims(d) if null_dims is None else int(null_dims)
    if not 0 < k < sigma.numel():
        raise ValueError(f"null_dims={k}: need 0 < null_dims < {sigma.numel()} (the usable dimensions of W_U)")
    chosen = torch.zeros_like(sigma, dtype=torch.bool)
    chosen[:k] = True
    chosen |= sigma <= rtol * sigma.max()
    return basis @ eigvecs[:, chosen]  # [d, m]


@torch.no_grad()
def entropy_scores(lm: LoadedModel, null_dims: int | None = None) -> pd.DataFrame:
    """Per neuron: layer, neuron, w_out_norm, null_share (share of ‖w_out‖ in W_U's null space), null_norm.

    ``null_norm = ‖w_out‖ · null_share`` is how much norm the neuron can write where the logits do not see it:
    the candidate ranking for the entropy intervention.
    """
    null = unembedding_null_space(lm, null_dims)
    frames = []
    for layer, p in enumerate(processed_mlp_weights(lm)):
        w_out = p.w_out.double().to(null.device)  # [d_mlp, d_model]
        norm = w_out.norm(dim=1)
        in_null = (w_out @ null).norm(dim=1)
        share = torch.where(norm > 0, in_null / norm.clamp_min(1e-300), torch.full_like(norm, float("nan")))
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": np.arange(w_out.shape[0]),
                    "w_out_norm": norm.cpu().numpy(),
                    "null_share": share.cpu().numpy(),
                    "null_norm": in_null.cpu().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------------------------------
# Entropy neurons: intervention


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class _FinalNormScale:
    """Forward pre-hook on the final norm recording σ [B, S] of its input: sqrt(Var(x) + eps), or
    sqrt(mean(x²) + eps) for RMSNorm (TransformerLens' ``hook_scale``)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.norm = _module(lm.base_model, lm.adapter.final_norm)
        self.rms = lm.adapter.norm == "rmsnorm"
        eps = getattr(self.norm, "eps", None) or getattr(self.norm, "variance_epsilon", None) or 1e-5
        self.eps = float(eps)
        self.scale: Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0].float()
        var = x.pow(2).mean(-1) if self.rms else x.var(-1, unbiased=False)
        self.scale = (var + self.eps).sqrt()

    def __enter__(self) -> _FinalNormScale:
        self._handle = self.norm.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class _NeuronTap:
    """Forward pre-hooks on the MLP output projections recording chosen neurons' post-activations [B, S]."""

    def __init__(self, lm: LoadedModel, neurons: Iterable[tuple[int, int]]) -> None:
        self.lm = lm
        self.by_layer: dict[int, list[int]] = {}
        for layer, n in neurons:
            self.by_layer.setdefault(int(layer), []).append(int(n))
        self.values: dict[tuple[int, int], Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            for n in self.by_layer[layer]:
                self.values[(layer, n)] = args[0][..., n].float()

        return hook

    def __enter__(self) -> _NeuronTap:
        for layer in self.by_layer:
            module = _module(self.lm.layer(layer), self.lm.adapter.mlp_out)
            self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def _ids_keep(batch: Any) -> tuple[Tensor, Tensor]:
    """(input_ids, keep) of a TokenBatch or an (input_ids, keep) pair; keep defaults to all but position 0."""
    if hasattr(batch, "input_ids"):
        return batch.input_ids, batch.keep
    if isinstance(batch, Tensor):
        keep = torch.ones_like(batch, dtype=torch.bool)
        keep[:, 0] = False
        return batch, keep
    ids, keep = batch
    return ids, keep


def _next_token_sums(logits: Tensor, input_ids: Tensor, valid: Tensor, ln_scale: Tensor) -> dict[str, float]:
    """Sums over valid positions of entropy (nats), loss, rank of the true next token (1 = top), 1/rank, σ.

    logits [B, S, V]; position t predicts input_ids[:, t+1]; valid [B, S-1]. Valid rows are processed in
    chunks of ~METRIC_CHUNK elements: GPT-2's [8·512, 50257] fp32 log-softmax alone would be 0.8 GB.
    """
    valid = valid.to(logits.device)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    targets = input_ids.to(logits.device)[b_idx, t_idx + 1]
    scale = ln_scale.to(logits.device)[b_idx, t_idx]
    sums = dict.fromkeys(("entropy", "loss", "true_rank", "mrr"), 0.0)
    step = max(1, METRIC_CHUNK // logits.shape[-1])
    for start in range(0, len(b_idx), step):
        sl = slice(start, start + step)
        lg = logits[b_idx[sl], t_idx[sl]].float()  # [T, V]
        tgt = targets[sl, None]
        logp = torch.log_softmax(lg, -1)
        rank = (lg > lg.gather(1, tgt)).sum(-1).double() + 1
        sums["entropy"] += float(-(logp.exp() * logp).sum())
        sums["loss"] += float(-logp.gather(1, tgt).sum())
        sums["true_rank"] += float(rank.sum())
        sums["mrr"] += float((1 / rank).sum())
    sums["ln_scale"] = float(scale.double().sum())
    sums["n_tokens"] = float(len(b_idx))
    return sums


def _metric_pass(
    lm: LoadedModel, batches: Sequence[Any], edits: dict[tuple[int, int], float], tap: Sequence[tuple[int, int]] = ()
) -> tuple[dict[str, float], dict[tuple[int, int], list[Tensor]]]:
    """Mean next-token metrics over the batches with ``edits`` applied; the tapped neurons' activations."""
    total: dict[str, float] = {}
    tapped: dict[tuple[int, int], list[Tensor]] = {key: [] for key in tap}
    for batch in batches:
        ids, keep = _ids_keep(batch)
        with _FinalNormScale(lm) as norm, _NeuronTap(lm, tap) as taps:
            logits = run_with_neuron_values(lm, ids, edits)
        valid = keep[:, :-1].to(torch.bool)
        for key, value in _next_token_sums(logits, ids, valid, norm.scale).items():
            total[key] = total.get(key, 0.0) + value
        for key in tap:
            tapped[key].append(torch.where(keep.to(taps.values[key].device), taps.values[key], float("nan")).cpu())
    n = total.get("n_tokens", 0.0)
    if n == 0:
        raise ValueError("no valid positions in the batches: every position is excluded (keep is all False)")
    means = {k: v / n for k, v in total.items() if k != "n_tokens"}
    means["n_tokens"] = int(n)
    return means, tapped


def _typical_max(acts: list[Tensor]) -> float:
    """Median over sequences of each sequence's max activation (kept positions); |max| fallback, then 1."""
    per_seq = torch.cat([a.nan_to_num(float("-inf")).amax(-1) for a in acts])  # [n_seq]
    per_seq = per_seq[torch.isfinite(per_seq)]
    if per_seq.numel() and float(per_seq.median()) > 1e-6:
        return float(per_seq.median())
    flat = torch.cat([a.flatten() for a in acts])
    flat = flat[torch.isfinite(flat)]
    biggest = float(flat.abs().max()) if flat.numel() else 0.0
    return biggest if biggest > 1e-6 else 1.0


@torch.no_grad()
def entropy_intervention(
    lm: LoadedModel,
    neurons: Iterable[tuple[int, int]],
    batches: Iterable[Any],
    values: Sequence[float] | None = None,
    *,
    multiples: Sequence[float] = DEFAULT_MULTIPLES,
) -> pd.DataFrame:
    """Fix each neuron's post-activation at several values (one neuron at a time, every position) and record
    the mean next-token entropy, loss, final norm scale σ, true-token rank and reciprocal rank.

    ``values`` are absolute activations for every neuron; without them each neuron is fixed at ``multiples``
    of its typical max (median over sequences of the per-sequence max, measured in the nominal pass).
    ``batches``: TokenBatch objects or (input_ids, keep) pairs; position t counts when keep[t] (it predicts
    token t+1). Returns one row per (neuron, value) with kind "fixed", plus one "nominal" row (layer = neuron
    = -1, no intervention). Columns: layer, neuron, kind, multiple, value, act_max, entropy, loss, ln_scale,
    true_rank, mrr, n_tokens.
    """
    neurons = [(int(l_), int(n)) for l_, n in neurons]
    batches = list(batches)
    for layer, n in neurons:
        if not (0 <= layer < lm.n_layers and 0 <= n < lm.d_mlp):
            raise IndexError(f"neuron {layer}.{n} out of range: {lm.n_layers} layers of {lm.d_mlp} neurons")
    nominal, tapped = _metric_pass(lm, batches, {}, tap=neurons)
    nan = float("nan")
    rows = [dict(layer=-1, neuron=-1, kind="nominal", multiple=nan, value=nan, act_max=nan, **nominal)]
    for key in neurons:
        act_max = _typical_max(tapped[key])
        if values is not None:
            grid = [(nan, float(v)) for v in values]
        else:
            grid = [(float(m), float(m) * act_max) for m in multiples]
        for multiple, value in grid:
            metrics, _ = _metric_pass(lm, batches, {key: value})
            rows.append(
                dict(layer=key[0], neuron=key[1], kind="fixed", multiple=multiple, value=value, act_max=act_max,
                     **metrics)
            )  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Attention deactivation: scores


def _require_absolute_positions(lm: LoadedModel, what: str) -> list:
    attn = attention_weights(lm)
    rotary = [a.rotary_dims for a in attn if a.rotary_dims]
    if rotary:
        raise NotImplementedError(
            f"{what} is not implemented for {lm.meta.get('model_type', lm.adapter.model_type)!r}: its attention "
            f"rotates queries and keys by position (rotary_dims={rotary[0]}), so w_outᵀ W_Q k_BOS depends on the "
            "query position. Supported: GPT-2 style models with absolute position embeddings."
        )
    return attn


@torch.no_grad()
def bos_keys(lm: LoadedModel) -> list[Tensor]:
    """Per layer, the key of BOS in a BOS-only sequence: [n_kv_heads, d_head] float32.

    Runs the model on [BOS] and reads each attention layer's input (the attention norm's output), so the key
    includes every earlier layer's contribution at that position, as TransformerLens' ``cache['k', l][0, 0]``.
    Rotary models: the key before any rotation or q/k norm (at position 0 the rotation is the identity).
    """
    attn = attention_weights(lm)
    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; the BOS key needs one")
    inputs: dict[int, Tensor] = {}
    handles = []

    def grab(layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
            inputs[layer] = output[0, 0].float()  # [d_model]

        return hook

    try:
        for i in range(lm.n_layers):
            norm = _module(lm.layer(i), lm.adapter.attn_norm)
            handles.append(norm.register_forward_hook(grab(i)))
        lm.base_model(input_ids=torch.tensor([[bos]], device=lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    keys = []
    for i, a in enumerate(attn):
        x = inputs[i]
        keys.append(torch.einsum("d,hde->he", x, a.w_k.float()) + a.b_k.float())  # [n_kv_heads, d_head]
    return keys


@dataclass
class BosScores:
    """h = ŵ_outᵀ W_Q^h k_BOS^h · scale for every (neuron, head in a later layer), and the random baseline.

    scores [L, d_mlp, L, n_heads] float32 (NaN where the head's layer is not after the neuron's); baseline
    [n_random, L, n_heads] for random unit directions; rms [L, n_heads] of the baseline (the z-score unit).
    """

    scores: Tensor
    baseline: Tensor
    rms: Tensor

    @property
    def z(self) -> Tensor:
        return self.scores / self.rms[None, None]

    def per_neuron(self) -> pd.DataFrame:
        """Each neuron's strongest later head by |bos_z|: layer, neuron, bos_layer, bos_head, top_bos_head
        ("L5.H0", "" if none), bos_score, bos_z."""
        n_layers, d_mlp, _, n_heads = self.scores.shape
        z = self.z.reshape(n_layers, d_mlp, -1)
        idx = z.abs().nan_to_num(-1.0).argmax(-1)  # [L, d_mlp]
        best_z = z.gather(-1, idx[..., None])[..., 0]
        best_h = self.scores.reshape(n_layers, d_mlp, -1).gather(-1, idx[..., None])[..., 0]
        has = torch.isfinite(best_z)
        a_layer = torch.where(has, idx // n_heads, -1)
        a_head = torch.where(has, idx % n_heads, -1)
        labels = [
            f"L{a}.H{h}" if a >= 0 else ""
            for a, h in zip(a_layer.flatten().tolist(), a_head.flatten().tolist(), strict=True)
        ]
        return pd.DataFrame(
            {
                "layer": np.repeat(np.arange(n_layers), d_mlp),
                "neuron": np.tile(np.arange(d_mlp), n_layers),
                "bos_layer": a_layer.flatten().numpy(),
                "bos_head": a_head.flatten().numpy(),
                "top_bos_head": labels,
                "bos_score": best_h.flatten().numpy(),
                "bos_z": best_z.flatten().numpy(),
            }
        )

    def pair(self, neuron: tuple[int, int], head: tuple[int, int]) -> tuple[float, float]:
        """(h, z) of one (neuron, head) pair."""
        (l_, n), (a, h) = neuron, head
        score = float(self.scores[l_, n, a, h])
        return score, score / float(self.rms[a, h])

    def histogram(self, bins: int = 80) -> pd.DataFrame:
        """Counts of h over every valid (neuron, head) pair ("neurons") and over the random baseline
        ("random") restricted to heads that some neuron precedes. Columns: source, bin_left, bin_right, count."""
        valid = self.scores[torch.isfinite(self.scores)].double()
        rand = self.baseline[:, 1:].reshape(-1).double()
        both = torch.cat([valid, rand])
        if both.numel() == 0:
            return pd.DataFrame(columns=["source", "bin_left", "bin_right", "count"])
        lo, hi = float(both.min()), float(both.max())
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        rows = []
        for source, x in (("neurons", valid), ("random", rand)):
            counts, _ = np.histogram(x.numpy(), bins=edges)
            rows += [
                {"source": source, "bin_left": edges[i], "bin_right": edges[i + 1], "count": int(counts[i])}
                for i in range(bins)
            ]
        return pd.DataFrame(rows)


@torch.no_grad()
def bos_scores(lm: LoadedModel, *, n_random: int = 1000, seed: int = 0) -> BosScores:
    """The attention-deactivation heuristic for every (neuron, later head) pair (module docstring).

    Processed weights on the query side (attention norm γ folded into W_Q, centred over d_model; processed,
    unit-normalised w_out) and the model's own BOS key: the score is per unit of normalised residual, as the
    paper's. Rotary models raise NotImplementedError.
    """
    attn = _require_absolute_positions(lm, "the BOS attention score")
    keys = bos_keys(lm)
    layernorm = lm.adapter.norm == "layernorm"
    d_model = lm.d_model
    # g[l, h] = W_Q'^h k_BOS^h · scale, the residual direction that raises head h's score for BOS.
    g_rows = []
    for a, k in zip(attn, keys, strict=True):
        w_q = a.ln_weight.float()[None, :, None] * a.w_q.float()  # [H, d_model, d_head]
        if layernorm:
            w_q = w_q - w_q.mean(1, keepdim=True)
        group = a.n_heads // a.n_kv_heads
        k_per_head = k.repeat_interleave(group, 0)  # [H, d_head]
        g_rows.append(torch.einsum("hde,he->hd", w_q, k_per_head) * a.scale)  # [H, d_model]
    g = torch.stack(g_rows).cpu()  # [L, H, d_model]
    n_layers, n_heads = g.shape[:2]
    g_flat = g.reshape(-1, d_model).T  # [d_model, L·H]
    mlps = processed_mlp_weights(lm)
    scores = torch.empty(lm.n_layers, lm.d_mlp, n_layers, n_heads)
    later = torch.arange(n_layers)
    for layer, p in enumerate(mlps):
        w = p.w_out.cpu()
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        s = (unit @ g_flat).reshape(lm.d_mlp, n_layers, n_heads)
        s[:, later <= layer] = float("nan")
        s[w.norm(dim=1) == 0] = float("nan")
        scores[layer] = s
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n_random, d_model, generator=gen)
    if layernorm:
        r = r - r.mean(1, keepdim=True)  # processed w_out is centred: compare like with like
    r = r / r.norm(dim=1, keepdim=True)
    baseline = (r @ g_flat).reshape(n_random, n_layers, n_heads)
    rms = baseline.pow(2).mean(0).sqrt().clamp_min(1e-30)
    return BosScores(scores=scores, baseline=baseline, rms=rms)


# --------------------------------------------------------------------------------------------------------------------
# Attention deactivation: path intervention


class _Stop(Exception):
    """Raised by the probe hook once the head is measured: the rest of the forward is not needed."""


@torch.no_grad()
def _probe_head(
    lm: LoadedModel,
    input_ids: Tensor,
    neuron: tuple[int, int],
    head: tuple[int, int],
    ablate: Tensor | None,
    after_pos: int,
) -> dict[str, Tensor]:
    """One forward up to the head's layer: the neuron's activation and the head's BOS attention and norms.

    With ``ablate`` (the raw w_out, [d_model]), the queries are computed from resid − act · w_out at positions
    ≥ after_pos; keys and values from the untouched residual (GPT-2's fused c_attn: only the q third changes).
    """
    (n_layer, n), (a_layer, h) = neuron, head
    block = lm.layer(a_layer)
    ln = _module(block, lm.adapter.attn_norm)
    attn = _module(block, lm.adapter.attn)
    c_attn = attn.c_attn
    aw = attention_weights(lm)[a_layer]
    d_model, d_head = lm.d_model, aw.d_head
    got: dict[str, Tensor] = {}

    def grab_act(module: torch.nn.Module, args: tuple) -> None:
        got["act"] = args[0][..., n]

    def grab_resid(module: torch.nn.Module, args: tuple) -> None:
        got["resid"] = args[0]

    def measure(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        if ablate is not None:
            x = got["resid"]
            delta = got["act"][..., None] * ablate.to(x.dtype)  # [B, S, d_model]
            delta[:, :after_pos] = 0
            x_q = F.layer_norm(x - delta, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            q_all = x_q @ c_attn.weight[:, :d_model] + c_attn.bias[:d_model]
        else:
            q_all = out[..., :d_model]
        sl = slice(h * d_head, (h + 1) * d_head)
        q = q_all[..., sl].float()  # [B, S, d_head]
        k = out[..., d_model:][..., sl].float()
        v = out[..., 2 * d_model :][..., sl].float()
        s = torch.einsum("bqe,bke->bqk", q, k) * aw.scale
        seq = s.shape[-1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=s.device).tril()
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)  # [B, S, S]
        z = probs @ v  # [B, S, d_head]
        got["p_bos"] = probs[..., 0]
        got["z_norm"] = z.norm(dim=-1)
        got["out_norm"] = (z @ aw.w_o[h].float()).norm(dim=-1)
        raise _Stop

    mlp_out = _module(lm.layer(n_layer), lm.adapter.mlp_out)
    handles = [
        mlp_out.register_forward_pre_hook(grab_act),
        ln.register_forward_pre_hook(grab_resid),
        c_attn.register_forward_hook(measure),
    ]
    try:
        lm.base_model(input_ids=input_ids.to(lm.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {k: got[k].float() for k in ("act", "p_bos", "z_norm", "out_norm")}


@torch.no_grad()
def bos_path_intervention(
    lm: LoadedModel,
    neuron: tuple[int, int],
    head: tuple[int, int],
    batches: Iterable[Any],
    *,
    after_pos: int = 1,
) -> pd.DataFrame:
    """Remove the neuron's output (activation × w_out) from the head's query input only; per-position effects.

    Returns one row per kept position at or after ``after_pos``: batch, row, position, act, p_bos_clean,
    p_bos_ablated, z_norm_clean, z_norm_ablated, out_norm_clean, out_norm_ablated (z: the head's value mix,
    TransformerLens' hook_z; out: z · W_O^h). ``clean − ablated`` is the neuron's effect through the query:
    positive in p_bos and negative in the norms for a deactivation neuron (bos_score > 0) that fires.
    GPT-2 layout only (fused c_attn, absolute positions); other models raise NotImplementedError.
    """
    (n_layer, n), (a_layer, h) = (int(neuron[0]), int(neuron[1])), (int(head[0]), int(head[1]))
    _require_absolute_positions(lm, "the BOS path intervention")
    if lm.adapter.model_type != "gpt2":
        raise NotImplementedError(
            f"the BOS path intervention edits GPT-2's fused query/key/value projection (c_attn); model_type "
            f"{lm.adapter.model_type!r} is not supported"
        )
    if not (0 <= n_layer < lm.n_layers and 0 <= n < lm.d_mlp):
        raise IndexError(f"neuron {n_layer}.{n} out of range: {lm.n_layers} layers of {lm.d_mlp} neurons")
    n_heads = attention_weights(lm)[0].n_heads
    if not (n_layer < a_layer < lm.n_layers and 0 <= h < n_heads):
        raise ValueError(
            f"head L{a_layer}.H{h} must be in a layer after the neuron's ({n_layer}) and below {lm.n_layers}, "
            f"with 0 <= head < {n_heads}"
        )
    w_out = mlp_weights(lm)[n_layer].w_out[n].detach().to(lm.device)  # raw: exactly what the neuron adds
    frames = []
    for b_index, batch in enumerate(batches):
        ids, keep = _ids_keep(batch)
        clean = _probe_head(lm, ids, (n_layer, n), (a_layer, h), None, after_pos)
        abl = _probe_head(lm, ids, (n_layer, n), (a_layer, h), w_out, after_pos)
        mask = keep.to(torch.bool).clone()
        mask[:, :after_pos] = False
        rows, pos = mask.nonzero(as_tuple=True)
        m = mask.to(clean["act"].device)
        frame = {"batch": b_index, "row": rows.numpy(), "position": pos.numpy(), "act": clean["act"][m].cpu().numpy()}
        for key in ("p_bos", "z_norm", "out_norm"):
            frame[f"{key}_clean"] = clean[key][m].cpu().numpy()
            frame[f"{key}_ablated"] = abl[key][m].cpu().numpy()
        frames.append(pd.DataFrame(frame))
    if not frames:
        raise ValueError("no batches given to the BOS path intervention")
    return pd.concat(frames, ignore_index=True)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy())


def summarize_path(points: pd.DataFrame) -> dict[str, float]:
    """Means and correlations of one pair's path intervention (all positions, not the last batch only).

    d_p_bos = mean(p_bos_clean − p_bos_ablated); d_z_norm_frac = mean((z_clean − z_ablated) / z_ablated);
    pearson/spearman of the activation against those differences (the paper's scatter plots).
    """
    act = points["act"].to_numpy(float)
    dp = (points["p_bos_clean"] - points["p_bos_ablated"]).to_numpy(float)
    dz = (points["z_norm_clean"] - points["z_norm_ablated"]).to_numpy(float)
    with np.errstate(all="ignore"):
        frac = dz / points["z_norm_ablated"].to_numpy(float)
    frac = frac[np.isfinite(frac)]
    return {
        "n_positions": len(points),
        "act_mean": float(np.mean(act)) if len(act) else float("nan"),
        "p_bos_clean": float(points["p_bos_clean"].mean()),
        "p_bos_ablated": float(points["p_bos_ablated"].mean()),
        "d_p_bos": float(np.mean(dp)) if len(dp) else float("nan"),
        "z_norm_clean": float(points["z_norm_clean"].mean()),
        "z_norm_ablated": float(points["z_norm_ablated"].mean()),
        "d_z_norm": float(np.mean(dz)) if len(dz) else float("nan"),
        "d_z_norm_frac": float(np.mean(frac)) if len(frac) else float("nan"),
        "d_out_norm": float((points["out_norm_clean"] - points["out_norm_ablated"]).mean()),
        "pearson_act_dp": _pearson(act, dp),
        "spearman_act_dp": _spearman(act, dp),
        "pearson_act_dnorm": _pearson(act, dz),
        "spearman_act_dnorm": _spearman(act, dz),
    }


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


# --------------------------------------------------------------------------------------------------------------------
# The run directory


def parse_neurons(text: str) -> list[tuple[int, int]]:
    """Parse "11.3030,11.2859" (or "L11.N3030") into [(11, 3030), (11, 2859)]."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.upper().replace("L", "").replace("N", "").split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"neuron {item!r}: expected LAYER.NEURON, e.g. 11.3030 (comma-separated for several)")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError(f"no neuron in {text!r}: expected LAYER.NEURON[,LAYER.NEURON…]")
    return out


def _universal_pool(run_dir: Path, label: str) -> tuple[set[tuple[int, int]] | None, str]:
    """The universal neurons of one model, from universal.parquet or profiles.parquet (None: neither)."""
    for name in ("universal.parquet", "profiles.parquet"):
        path = run_dir / name
        if not path.is_file():
            continue
        df = pd.read_parquet(path)
        if "is_universal" in df and name == "profiles.parquet":
            df = df[df["is_universal"].fillna(False).astype(bool)]
        elif name == "profiles.parquet":
            continue
        if "model" in df:
            df = df[df["model"] == label]
        return {(int(r.layer), int(r.neuron)) for r in df[["layer", "neuron"]].itertuples(index=False)}, name
    return None, ""


def _run_batches(manifest: dict, tokenizer: Any, tokens: int, batch_size: int | None, data: str | None) -> list:
    from univ.data import excluded_token_ids, token_batches

    spec = manifest.get("data") or {}
    source = data or spec.get("source")
    if not source:
        raise ValueError("run.json has no data source; pass --data FILE")
    excluded = excluded_token_ids(tokenizer, newlines=bool(spec.get("exclude_newlines", True)))
    return list(
        token_batches(
            source, tokenizer, ctx=int(spec.get("ctx", 512)), batch_size=int(batch_size or spec.get("batch_size", 8)),
            seed=int(spec.get("seed", 0)), max_tokens=tokens, text_field=spec.get("text_field", "text"),
            split=spec.get("split", "train"), excluded=excluded,
        )
    )  # fmt: skip


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    from univ_kernels.streaming import atomic_write_bytes

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _join_profiles(run_dir: Path, roles: pd.DataFrame) -> bool:
    """Add (or replace) the role columns of profiles.parquet, keyed by (model, layer, neuron); atomic."""
    path = run_dir / "profiles.parquet"
    if not path.is_file():
        return False
    profiles = pd.read_parquet(path)
    keys = [k for k in ("model", "layer", "neuron") if k in profiles]
    if "layer" not in keys or "neuron" not in keys:
        return False
    if "model" not in keys and roles["model"].nunique() > 1:
        return False  # rows of several models cannot be matched to a table without a model column
    cols = [c for c in ROLE_COLUMNS if c in roles]
    merged = profiles.drop(columns=[c for c in cols if c in profiles]).merge(
        roles[keys + cols], on=keys, how="left", validate="many_to_one"
    )
    _write_parquet(merged, path)
    return True


def run_roles(
    run_dir: str | Path,
    *,
    neurons: Sequence[tuple[int, int]] | None = None,
    models: Sequence[str] | None = None,
    tokens: int = 16_384,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    data: str | None = None,
    top: int = 4,
    n_random: int = 6,
    multiples: Sequence[float] = DEFAULT_MULTIPLES,
    values: Sequence[float] | None = None,
    thresholds: RoleThresholds | None = None,
    null_dims: int | None = None,
    n_baseline: int = 1000,
    after_pos: int = 1,
    interventions: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Score every neuron of each analysed model, intervene on candidates, write the role tables.

    Candidates: ``neurons`` if given (both interventions; each neuron's top later head for attention), else
    the top ``top`` by null_norm (entropy) and by |bos_z| (attention) among the universal neurons when the run
    has them, among all neurons otherwise. ``n_random`` random neurons of the entropy candidates' layers
    (not flagged entropy) are the baseline. Returns the path of roles.parquet; ``log`` receives progress lines.
    """
    from univ.correlate import resolve_device
    from univ.models import load_model

    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    manifest = read_run(run_dir)
    thresholds = thresholds or RoleThresholds()
    labels = list(manifest["labels"])
    chosen = list(models) if models else list(manifest["analysed"])
    unknown = [m for m in chosen if m not in labels]
    if unknown:
        raise ValueError(f"model label(s) {unknown} not in this run; its labels are {labels}")
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)

    role_frames, curve_frames, attn_frames, point_frames, hist_frames = [], [], [], [], []
    info: dict[str, Any] = {"thresholds": asdict(thresholds), "seed": seed, "tokens": tokens, "models": {}}
    for label in chosen:
        lm = load_model(manifest["models"][labels.index(label)], device=dev, dtype=dtype)
        notes: list[str] = []
        say(f"[{label}] weight scores")
        df = vocab_role_scores(lm)
        ent = entropy_scores(lm, null_dims)
        df = df.merge(ent[["layer", "neuron", "null_share", "null_norm"]], on=["layer", "neuron"])
        bos: BosScores | None = None
        try:
            bos = bos_scores(lm, n_random=n_baseline, seed=seed)
            df = df.merge(bos.per_neuron(), on=["layer", "neuron"])
            hist_frames.append(bos.histogram().assign(model=label))
        except NotImplementedError as e:
            notes.append(f"attention scores skipped: {e}")
        df = classify_roles(df.assign(model=label), thresholds)

        for layer, n in neurons or []:
            if not (0 <= layer < lm.n_layers and 0 <= n < lm.d_mlp):
                raise IndexError(f"neuron {layer}.{n}: {label} has {lm.n_layers} layers of {lm.d_mlp} neurons")
        candidates_df, pool_desc = _candidate_pool(df, run_dir, label, neurons)

        # Top tokens for every neuron with a vocabulary role, and for the candidates.
        vocab_roled = df[df[["is_prediction", "is_suppression", "is_partition"]].any(axis=1)]
        token_keys = set(zip(vocab_roled["layer"], vocab_roled["neuron"], strict=True))
        token_keys |= set(neurons or [])
        tops = top_tokens(lm, token_keys)
        df = df.merge(tops[["layer", "neuron", "top_promoted", "top_suppressed"]], on=["layer", "neuron"], how="left")
        for c in ("top_promoted", "top_suppressed"):
            df[c] = df[c].apply(lambda v: list(v) if isinstance(v, (list, np.ndarray)) else [])
        role_frames.append(df)

        model_info: dict[str, Any] = {"pool": pool_desc, "null_dims": null_dims or default_null_dims(lm.d_model),
                                      "notes": notes}  # fmt: skip
        if interventions:
            batches = _run_batches(manifest, lm.tokenizer, tokens, batch_size, data)
            if neurons:
                ent_cands = list(neurons)
            else:
                ranked = candidates_df.sort_values(["is_entropy", "null_norm"], ascending=False)
                ent_cands = list(zip(ranked["layer"].head(top), ranked["neuron"].head(top), strict=True))
            ent_cands = [(int(a), int(b)) for a, b in ent_cands]
            flagged = df.loc[df["is_entropy"], ["layer", "neuron"]].itertuples(index=False)
            excluded = set(ent_cands) | {(int(a), int(b)) for a, b in flagged}
            layers = sorted({layer for layer, _ in ent_cands})
            rand_cands: list[tuple[int, int]] = []
            for i in range(n_random if layers else 0):
                layer = layers[i % len(layers)]
                options = [n for n in range(lm.d_mlp) if (layer, n) not in excluded and (layer, n) not in rand_cands]
                if options:
                    rand_cands.append((layer, int(rng.choice(options))))
            say(f"[{label}] entropy intervention: {len(ent_cands)} candidates, {len(rand_cands)} random")
            curves = entropy_intervention(lm, ent_cands + rand_cands, batches, values, multiples=multiples)
            curves["kind"] = [
                "nominal" if k == "nominal" else ("random" if (a, b) in set(rand_cands) else "candidate")
                for k, a, b in zip(curves["kind"], curves["layer"], curves["neuron"], strict=True)
            ]
            curve_frames.append(curves.assign(model=label))
            model_info["entropy_candidates"] = [f"{a}.{b}" for a, b in ent_cands]
            model_info["random_neurons"] = [f"{a}.{b}" for a, b in rand_cands]

            if bos is not None:
                pairs = _attention_pairs(df, candidates_df, neurons, top)
                say(f"[{label}] BOS path intervention: {len(pairs)} pairs")
                model_info["attention_pairs"] = [f"{a}.{b}->L{c}.H{d}" for (a, b), (c, d) in pairs]
                for neuron, head in pairs:
                    try:
                        points = bos_path_intervention(lm, neuron, head, batches, after_pos=after_pos)
                    except NotImplementedError as e:
                        notes.append(f"path intervention skipped: {e}")
                        break
                    h_val, z_val = bos.pair(neuron, head)
                    key = dict(model=label, layer=neuron[0], neuron=neuron[1], head_layer=head[0], head=head[1])
                    attn_frames.append(pd.DataFrame([{**key, "bos_score": h_val, "bos_z": z_val,
                                                      **summarize_path(points)}]))  # fmt: skip
                    if len(points) > MAX_POINTS:
                        points = points.iloc[np.sort(rng.choice(len(points), MAX_POINTS, replace=False))]
                    point_frames.append(points.assign(**key))
        info["models"][label] = model_info
        del lm

    roles = pd.concat(role_frames, ignore_index=True)
    front = ["model", "layer", "neuron", "role"]
    roles = roles[front + [c for c in roles.columns if c not in front]]
    out = run_dir / "roles.parquet"
    _write_parquet(roles, out)
    written = [out]
    for frames, name in ((curve_frames, "interventions"), (attn_frames, "attention"),
                         (point_frames, "attention_points"), (hist_frames, "bos_scores")):  # fmt: skip
        path = run_dir / f"{name}.parquet"
        if frames:
            table = pd.concat(frames, ignore_index=True)
            table = table[["model"] + [c for c in table.columns if c != "model"]]
            _write_parquet(table, path)
            written.append(path)
        elif interventions or name == "bos_scores":
            path.unlink(missing_ok=True)  # stale: from an earlier run with other candidates or models
    if _join_profiles(run_dir, roles):
        written.append(run_dir / "profiles.parquet")
    info["written"] = [p.name for p in written]
    from univ_kernels.streaming import atomic_write_bytes

    atomic_write_bytes(run_dir / "roles.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    return out


def _candidate_pool(
    df: pd.DataFrame, run_dir: Path, label: str, neurons: Sequence[tuple[int, int]] | None
) -> tuple[pd.DataFrame, str]:
    """The rows candidates are drawn from, and a description: universal neurons if the run has any, else all."""
    if neurons:
        return df, "given neurons"
    pool, source = _universal_pool(run_dir, label)
    if pool is None:
        return df, "all neurons (no universal table: run 'univ universal' or 'univ analyze' first)"
    if not pool:
        return df, f"all neurons (no universal neuron in {source})"
    keys = pd.MultiIndex.from_frame(df[["layer", "neuron"]].astype(int))
    return df[keys.isin(list(pool))], f"universal neurons ({source})"


def _attention_pairs(
    df: pd.DataFrame, pool: pd.DataFrame, neurons: Sequence[tuple[int, int]] | None, top: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(neuron, head) pairs for the path intervention: given neurons' top heads, else the pool's top |bos_z|."""
    if neurons:
        rows = df.set_index(["layer", "neuron"]).loc[list(neurons)].reset_index()
    else:
        rows = pool.assign(_abs=pool["bos_z"].abs()).sort_values("_abs", ascending=False).head(top)
    rows = rows[rows["bos_layer"] >= 0]
    return [((int(r.layer), int(r.neuron)), (int(r.bos_layer), int(r.bos_head))) for r in rows.itertuples(index=False)]


def format_role_table(roles: pd.DataFrame) -> str:
    """Per model and layer: role counts and the median / 95th percentile of vocab kurtosis (CLI output)."""
    lines = [f"{'model':<14} {'layer':>5} {'pred':>5} {'supp':>5} {'part':>5} {'entr':>5} {'attn':>5} "
             f"{'kurt p50':>9} {'kurt p95':>9}"]  # fmt: skip
    for (model, layer), g in roles.groupby(["model", "layer"], sort=True):
        k = g["vocab_kurt"].dropna()
        p50, p95 = (float(np.percentile(k, q)) if len(k) else float("nan") for q in (50, 95))
        counts = [int(g[f"is_{r}"].sum()) for r in ROLE_NAMES]
        lines.append(
            f"{str(model)[:14]:<14} {layer:>5} " + " ".join(f"{c:>5}" for c in counts) + f" {p50:>9.2f} {p95:>9.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,1,2,4") from None


def _main(args: argparse.Namespace) -> int:
    thresholds = RoleThresholds(
        kurt=args.kurt, partition_ratio=args.partition_ratio, partition_var=args.partition_var,
        entropy_share=args.entropy_share, entropy_norm_pct=args.entropy_norm_pct, bos_z=args.bos_z,
    )  # fmt: skip
    out = run_roles(
        args.dir, neurons=parse_neurons(args.neurons) if args.neurons else None,
        models=[args.model] if args.model else None, tokens=args.tokens, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, data=args.data, top=args.top, n_random=args.random,
        multiples=args.multiples, values=args.values, thresholds=thresholds, null_dims=args.null_dims,
        n_baseline=args.baseline_samples, after_pos=args.after_pos, interventions=not args.no_interventions,
        seed=args.seed, log=print,
    )  # fmt: skip
    roles = pd.read_parquet(out)
    print(format_role_table(roles))
    run_dir = out.parent
    if (run_dir / "interventions.parquet").is_file():
        curves = pd.read_parquet(run_dir / "interventions.parquet")
        fixed = curves[curves["kind"] != "nominal"]
        print("\nentropy intervention (mean next-token entropy at the lowest and highest fixed value):")
        for (model, layer, neuron), g in fixed.groupby(["model", "layer", "neuron"], sort=False):
            g = g.sort_values("value")
            print(
                f"  {model} {layer}.{neuron} ({g['kind'].iloc[0]}): entropy {g['entropy'].iloc[0]:.3f} → "
                f"{g['entropy'].iloc[-1]:.3f}, ln scale {g['ln_scale'].iloc[0]:.3f} → {g['ln_scale'].iloc[-1]:.3f}"
            )
    if (run_dir / "attention.parquet").is_file():
        attn = pd.read_parquet(run_dir / "attention.parquet")
        print("\nBOS path intervention (clean − query-ablated):")
        for r in attn.itertuples(index=False):
            print(
                f"  {r.model} {r.layer}.{r.neuron} → L{r.head_layer}.H{r.head}: h={r.bos_score:+.3f} "
                f"(z {r.bos_z:+.1f}), ΔP(BOS) {r.d_p_bos:+.4f}, Δ‖z‖ {100 * r.d_z_norm_frac:+.1f} %"
            )
    print(f"\nwrote {out} (and the other tables listed in {run_dir / 'roles.json'})")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ roles``."""
    p = subparsers.add_parser(
        "roles",
        help="weight-level roles: prediction/suppression/partition, entropy and attention-deactivation neurons",
        description=(
            "Classify every neuron of the run's analysed models by what its output weights do (Gurnee et al.\n"
            "2024, §5), on TransformerLens-style processed weights, then check the claims by intervention:\n\n"
            "  prediction / suppression  kurtosis over the vocabulary of cos(W_U[:, v], w_out) > 10, with\n"
            "                            positive / negative skew: the neuron boosts / suppresses a few tokens\n"
            "  partition                 high variance of that cosine: it splits the vocabulary in two\n"
            "  entropy                   a large w_out lying in W_U's effective null space: it rescales the\n"
            "                            final norm (a temperature). Checked by fixing its activation at\n"
            "                            multiples of its typical max against random neurons of its layer\n"
            "  attention (de)activation  w_outᵀ W_Q k_BOS / √d_head far outside the random-direction baseline\n"
            "                            for a later head. Checked by removing the neuron's output from that\n"
            "                            head's queries only (keys, values untouched) and measuring its\n"
            "                            attention to BOS and its output norm (GPT-2 only)\n\n"
            "Interventions run on a few batches of the run's data (run.json) for candidate neurons: universal\n"
            "neurons if 'univ universal' or 'univ analyze' ran, else all neurons, top --top by score; or\n"
            "--neurons. Writes DIR/roles.parquet, interventions.parquet, attention.parquet,\n"
            "attention_points.parquet, bos_scores.parquet, roles.json, and adds the role columns to\n"
            "profiles.parquet if it exists."
        ),
        epilog=(
            "examples:\n"
            "  univ roles runs/small\n"
            "  univ roles runs/small --neurons 11.3030,11.2859 --tokens 65536 --device cuda\n"
            "  univ roles runs/small --no-interventions            # weight scores only, no forward passes\n"
            "  univ roles runs/small --partition-var 0.005         # the paper's absolute partition cut"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="run directory written by 'univ correlate' (run.json)")
    p.add_argument("--neurons", default=None, metavar="L.N,L.N", help="intervene on these neurons only")
    p.add_argument("--model", default=None, metavar="LABEL", help="one analysed model (default: all analysed)")
    p.add_argument(
        "--tokens",
        type=int,
        default=16_384,
        help="kept tokens for the interventions (default 16384; each fixed value is one pass over them)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: the run's)")
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--data", default=None, help="data source instead of run.json's (same ctx and packing)")
    p.add_argument("--top", type=int, default=4, help="candidates per intervention when --neurons is not given")
    p.add_argument("--random", type=int, default=6, help="random baseline neurons for the entropy intervention")
    p.add_argument(
        "--multiples",
        type=_floats,
        default=list(DEFAULT_MULTIPLES),
        help="fixed values as multiples of each neuron's typical max (default 0,0.5,1,2,3,4)",
    )
    p.add_argument(
        "--values",
        type=_floats,
        default=None,
        help="absolute fixed values instead: --values=-0.17,0,1,2,4,6 (with '=' when the first is negative)",
    )
    p.add_argument("--kurt", type=float, default=10.0, help="vocab kurtosis cut for prediction/suppression (10)")
    p.add_argument("--partition-ratio", type=float, default=5.0, help="vocab_var · d_model cut for partition (5)")
    p.add_argument("--partition-var", type=float, default=None, help="absolute vocab_var cut instead (paper: 0.005)")
    p.add_argument("--entropy-share", type=float, default=0.5, help="null_share cut for entropy neurons (0.5)")
    p.add_argument("--entropy-norm-pct", type=float, default=90.0, help="within-layer ‖w_out‖ percentile cut (90)")
    p.add_argument("--bos-z", type=float, default=5.0, help="|bos_z| cut for attention (de)activation neurons (5)")
    p.add_argument("--null-dims", type=int, default=None, help="smallest singular directions of W_U (default 1%% of d)")
    p.add_argument("--baseline-samples", type=int, default=1000, help="random directions for the BOS baseline")
    p.add_argument("--after-pos", type=int, default=1, help="first query position of the path intervention")
    p.add_argument("--no-interventions", action="store_true", help="weight scores only")
    p.add_argument("--seed", type=int, default=0, help="random baseline neurons and directions")
    p.set_defaults(func=_main)
    return p
