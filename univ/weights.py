"""Weight statistics of every neuron, on TransformerLens-style processed weights (as the paper's tables).

Raw weights carry arbitrary per-direction scales that the norms undo, so the paper computes its weight
statistics after TransformerLens' default processing. We redo that processing in torch on copies of the
weights (the model is never touched):

    fold_ln                 pre = LN(x) @ w_in + b_in,  LN(x) = x̂·γ + β   →   w_in' = diag(γ) w_in,
                            b_in' = b_in + β @ w_in; the same for the final norm and W_U
    centre reading weights  x̂ has zero mean over d_model, so w_in' may lose its mean over d_model (per
                            neuron) and W_U' its mean over d_model (per token) without changing the output
    center_writing_weights  every norm subtracts the residual's mean, so w_out (and b_out) may lose their
                            mean over d_model
    center_unembed          softmax ignores a constant added to every logit, so W_U and b_U may lose their
                            mean over the vocabulary

RMSNorm models (Llama, Mistral, Qwen, Gemma) do not subtract the mean: only the norm weight is folded; no
reading or writing weight is centred over d_model there (it would change the model). W_U is still centred
over the vocabulary. Gated MLPs fold the norm into the gate (w_in) and the up projection alike.

Per neuron (``weight_stats``): ‖w_in‖, ‖w_out‖, input bias b_in, cos(w_in, w_out), the weight-decay penalty
‖w_in‖² + ‖w_out‖², and the moments over the vocabulary of cos(W_U[:, v], w_out) (mean, variance, skew,
non-excess kurtosis: a random direction gives ≈ 3; prediction neurons have kurtosis > 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from univ.models import LoadedModel, mlp_weights, unembedding

__all__ = ["ProcessedMlp", "processed_mlp_weights", "processed_unembedding", "vector_moments", "weight_stats"]

COS_CHUNK = 1 << 24  # elements of one [neurons, vocab] cosine block: 128 MB in float64


@dataclass
class ProcessedMlp:
    """One layer's processed MLP weights, float32 copies, ``x @ w`` orientation."""

    w_in: Tensor  # [d_model, d_mlp]; norm folded in, centred over d_model (LayerNorm only)
    b_in: Tensor  # [d_mlp]; norm bias folded in
    w_out: Tensor  # [d_mlp, d_model]; centred over d_model (LayerNorm only)
    b_out: Tensor  # [d_model]; centred (LayerNorm only)
    w_up: Tensor | None = None  # gated MLPs: [d_model, d_mlp], norm folded in like w_in
    b_up: Tensor | None = None


def processed_mlp_weights(lm: LoadedModel) -> list[ProcessedMlp]:
    """Per layer MLP weights with the MLP's norm folded in and centred as TransformerLens does (module doc)."""
    out = []
    for mw in mlp_weights(lm):
        layernorm = mw.norm == "layernorm"
        gamma = mw.ln_weight.float()
        w_in, b_in = _fold(mw.w_in.float(), mw.b_in.float(), gamma, mw.ln_bias, centre=layernorm)
        w_up = b_up = None
        if mw.w_up is not None:
            w_up, b_up = _fold(mw.w_up.float(), mw.b_up.float(), gamma, mw.ln_bias, centre=layernorm)
        w_out, b_out = mw.w_out.float().clone(), mw.b_out.float().clone()
        if layernorm:
            w_out = w_out - w_out.mean(1, keepdim=True)
            b_out = b_out - b_out.mean()
        out.append(ProcessedMlp(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, w_up=w_up, b_up=b_up))
    return out


def _fold(w: Tensor, b: Tensor, gamma: Tensor, beta: Tensor | None, *, centre: bool) -> tuple[Tensor, Tensor]:
    """(diag(γ) w, b + β @ w), centred over d_model if the norm subtracts the mean. w: [d_model, n]."""
    b = b + beta.float() @ w if beta is not None else b.clone()
    w = gamma[:, None] * w
    if centre:
        w = w - w.mean(0, keepdim=True)
    return w, b


def processed_unembedding(lm: LoadedModel, *, vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(W_U [d_model, V], b_U [V]) with the final norm folded in and centred (module doc), float32 copies.

    ``vocab_size`` keeps the first V columns: Pythia pads its unembedding past the tokenizer with columns that
    no token ever uses; centring over them would bias every statistic. Default: ``len(tokenizer)`` when that
    is smaller than the model's vocabulary.
    """
    w_u, ln_w, ln_b = unembedding(lm)
    if vocab_size is None:
        vocab_size = min(w_u.shape[1], len(lm.tokenizer))
    w_u = w_u[:, :vocab_size].float()
    bias = getattr(lm.model.get_output_embeddings(), "bias", None)
    b_u = bias.detach()[:vocab_size].float() if bias is not None else torch.zeros(vocab_size, device=w_u.device)
    layernorm = lm.adapter.norm == "layernorm"
    w_u, b_u = _fold(w_u, b_u, ln_w.float(), ln_b, centre=layernorm)
    w_u = w_u - w_u.mean(1, keepdim=True)  # center_unembed
    b_u = b_u - b_u.mean()
    return w_u, b_u


def vector_moments(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, variance, skew, non-excess kurtosis) along ``dim``, float64; zero variance gives NaN moments."""
    x = x.double()
    mean = x.mean(dim, keepdim=True)
    d = x - mean
    var = d.pow(2).mean(dim)
    m3 = d.pow(3).mean(dim)
    m4 = d.pow(4).mean(dim)
    safe = torch.where(var > 0, var, torch.full_like(var, float("nan")))
    return mean.squeeze(dim), var, m3 / safe.pow(1.5), m4 / safe.pow(2)


@torch.no_grad()
def unit_unembedding(lm: LoadedModel) -> Tensor:
    """The processed unembedding with unit columns [d_model, V]: what an output direction's cosines are taken with."""
    w_u = processed_unembedding(lm)[0]
    return w_u / w_u.norm(dim=0, keepdim=True).clamp_min(1e-30)


def vocab_moments(directions: Tensor, u_hat: Tensor) -> list:
    """Mean, variance, skew and kurtosis over the vocabulary of cos(u_hat[:, v], direction) for each row of
    ``directions`` [n, d_model], as numpy arrays; a zero direction has no cosine: NaN. Chunked (COS_CHUNK)."""
    norm = directions.norm(dim=1)
    hat = directions / norm[:, None].clamp_min(1e-30)
    moments = [[] for _ in range(4)]
    chunk = max(1, COS_CHUNK // u_hat.shape[1])
    for start in range(0, hat.shape[0], chunk):
        cos = hat[start : start + chunk] @ u_hat.to(hat.device)  # [chunk, V]
        for acc, m in zip(moments, vector_moments(cos, dim=1), strict=True):
            acc.append(m)
    vocab = [torch.cat(m).cpu().numpy() for m in moments]
    dead = (norm == 0).cpu().numpy()
    for v in vocab:
        v[dead] = float("nan")
    return vocab


def weight_stats(lm: LoadedModel) -> pd.DataFrame:
    """One row per neuron: layer, neuron, w_in_norm, w_out_norm, input_bias, in_out_sim, l2_penalty,
    vocab_mean, vocab_var, vocab_skew, vocab_kurt (moments over the vocabulary of cos(W_U[:, v], w_out)).

    Example:
        >>> df = weight_stats(load_model("runs/zoo/seed-0"))  # doctest: +SKIP
        >>> df.groupby("layer").vocab_kurt.median()  # doctest: +SKIP
    """
    # a masked LM (BERT) has no direct unembedding: its vocab_* columns are NaN, the others as usual
    u_hat = unit_unembedding(lm) if lm.adapter.causal else torch.full((lm.d_model, 1), float("nan"))
    rows = []
    for layer, p in enumerate(processed_mlp_weights(lm)):
        w_in_norm = p.w_in.norm(dim=0)  # [d_mlp]
        w_out_norm = p.w_out.norm(dim=1)  # [d_mlp]
        in_out = (p.w_in.T * p.w_out).sum(1) / (w_in_norm * w_out_norm).clamp_min(1e-30)
        vocab = vocab_moments(p.w_out, u_hat)
        rows.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": range(p.w_in.shape[1]),
                    "w_in_norm": w_in_norm.cpu().numpy(),
                    "w_out_norm": w_out_norm.cpu().numpy(),
                    "input_bias": p.b_in.cpu().numpy(),
                    "in_out_sim": in_out.cpu().numpy(),
                    "l2_penalty": (w_in_norm.double() ** 2 + w_out_norm.double() ** 2).cpu().numpy(),
                    "vocab_mean": vocab[0],
                    "vocab_var": vocab[1],
                    "vocab_skew": vocab[2],
                    "vocab_kurt": vocab[3],
                }
            )
        )
    return pd.concat(rows, ignore_index=True)
