"""Entropy neurons: W_U's effective null space, the null-share score and the activation-fixing intervention.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from univ.models import LoadedModel, require_causal, run_with_neuron_values
from univ.weights import processed_mlp_weights, processed_unembedding

__all__ = [
    "DEFAULT_MULTIPLES",
    "entropy_intervention",
    "entropy_scores",
    "unembedding_null_space",
]

DEFAULT_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)  # × typical max; the paper fixed 0..6 for max ≈ 1-2
METRIC_CHUNK = 1 << 25  # logits elements per metric chunk: 128 MB in fp32


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
    require_causal(lm, "the entropy intervention (next-token entropy and loss)")
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
