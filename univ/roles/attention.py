"""Attention (de)activation neurons: the BOS score of every (neuron, later head) pair and the path intervention.

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
in attention to BOS and in the head's output norm.

Rotary models (GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma) rotate q and k by position: BOS's key sits at
position 0, where the rotation is the identity, but a query at position p is rotated by R_p, so its score
for BOS is q·R_pᵀ k_BOS and the neuron's effect depends on p. The paper's score is position-free (GPT-2 has
absolute positions); here the rotary score is its average over query positions p ∈ P (default 1…255, the
paper's 256-token context): ``h(n) = ŵ_outᵀ W_Q^h mean_p(R_pᵀ) k_BOS^h · scale`` — exact for the expected
change of the BOS logit at a uniformly drawn query position, and GPT-2's score when nothing rotates. The
path intervention needs no approximation: it recomputes the head from the attention input with the model's
own rotary tables (and Qwen3's q/k norms), one code path for every architecture. Qwen3's RMS-normalised
queries make the score non-linear in w_out: bos_scores refuses them (NotImplementedError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from univ.models import LoadedModel, attention_weights, mlp_weights, require_causal
from univ.roles.entropy import _ids_keep, _module
from univ.weights import processed_mlp_weights

__all__ = [
    "BosScores",
    "bos_keys",
    "bos_path_intervention",
    "bos_scores",
    "summarize_path",
]


# --------------------------------------------------------------------------------------------------------------------
# Attention deactivation: scores


DEFAULT_QUERY_POSITIONS = range(1, 256)  # rotary models: the paper's attention context was 256 tokens


def _rotary_tables(lm: LoadedModel, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own rotary cos and sin at these positions: [P, rotary_dims] float32 each."""
    rotary = getattr(lm.base_model, "rotary_emb", None)
    if rotary is None:
        raise NotImplementedError(
            f"model_type {lm.adapter.model_type!r} rotates queries and keys but keeps no rotary_emb on its base "
            "model; univ cannot read its rotary tables"
        )
    probe = torch.zeros(1, device=lm.device, dtype=torch.float32)  # sets only the tables' dtype and device
    cos, sin = rotary(probe, positions.to(lm.device)[None])
    return cos[0].float(), sin[0].float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """R x in the Hugging Face convention: rotate_half on the first cos.shape[-1] dims of each head."""
    dims = cos.shape[-1]
    rot, rest = x[..., :dims], x[..., dims:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([rot * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def _query_side_keys(lm: LoadedModel, attn: list, keys: list[Tensor], positions: Any) -> list[Tensor]:
    """Per layer, the key a query should align with to attend to BOS: k_BOS, or mean_p R_pᵀ k_BOS (rotary).

    R_pᵀ = R_{-p} (cos, −sin) and the rotation is linear, so the mean over positions is one rotation by the
    mean tables.
    """
    if not any(a.rotary_dims for a in attn):
        return keys
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    if pos.numel() == 0 or int(pos.min()) < 0:
        raise ValueError("query_positions must be a non-empty list of positions ≥ 0")
    cos, sin = _rotary_tables(lm, pos)
    cos, sin = cos.mean(0).to(keys[0].device), sin.mean(0).to(keys[0].device)
    return [_rotate(k, cos, -sin) if a.rotary_dims else k for a, k in zip(attn, keys, strict=True)]


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
def bos_scores(
    lm: LoadedModel, *, n_random: int = 1000, seed: int = 0, query_positions: Any = DEFAULT_QUERY_POSITIONS
) -> BosScores:
    """The attention-deactivation heuristic for every (neuron, later head) pair (module docstring).

    Processed weights on the query side (attention norm γ folded into W_Q, centred over d_model; processed,
    unit-normalised w_out) and the model's own BOS key: the score is per unit of normalised residual, as the
    paper's. Rotary models: averaged over ``query_positions`` (module docstring); Qwen3's q/k norms raise
    NotImplementedError.
    """
    attn = attention_weights(lm)
    if any(a.q_norm is not None for a in attn):
        raise NotImplementedError(
            f"the BOS attention score is linear in the query; model_type {lm.adapter.model_type!r} RMS-normalises "
            "queries and keys per head (q_norm/k_norm), so it has no such score (the path intervention still works)"
        )
    keys = _query_side_keys(lm, attn, bos_keys(lm), query_positions)
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


def _attn_norm(x: Tensor, a: Any) -> Tensor:
    """The norm before attention, from its extracted weights (effective scale; RMSNorm has no bias)."""
    if a.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), a.ln_weight.float(), a.ln_bias.float(), a.ln_eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.ln_eps) * a.ln_weight.float()


def _head_qkv(lm: LoadedModel, a: Any, h: int, x_q: Tensor, x_kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Head h's q, k, v [B, S, d_head] float32 from normed inputs, rotated by position as the model does."""
    kv = h // (a.n_heads // a.n_kv_heads)  # grouped-query attention
    q = x_q @ a.w_q[h].float() + a.b_q[h].float()
    k = x_kv @ a.w_k[kv].float() + a.b_k[kv].float()
    v = x_kv @ a.w_v[kv].float() + a.b_v[kv].float()
    if a.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before the rotation
        eps = float(getattr(lm.model.config, "rms_norm_eps", 1e-6))
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * a.q_norm.float()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * a.k_norm.float()
    if a.rotary_dims:
        cos, sin = _rotary_tables(lm, torch.arange(x_q.shape[1]))  # [S, rotary_dims]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return q, k, v


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

    The head is recomputed from the residual entering its layer with the extracted weights (every
    architecture alike). With ``ablate`` (the raw w_out, [d_model]), the queries read resid − act · w_out at
    positions ≥ after_pos; keys and values read the untouched residual.
    """
    (n_layer, n), (a_layer, h) = neuron, head
    ln = _module(lm.layer(a_layer), lm.adapter.attn_norm)
    aw = attention_weights(lm)[a_layer]
    got: dict[str, Tensor] = {}

    def grab_act(module: torch.nn.Module, args: tuple) -> None:
        got["act"] = args[0][..., n]

    def grab_resid(module: torch.nn.Module, args: tuple) -> None:
        got["resid"] = args[0]
        raise _Stop  # the rest of the forward is not needed

    mlp_out = _module(lm.layer(n_layer), lm.adapter.mlp_out)
    handles = [mlp_out.register_forward_pre_hook(grab_act), ln.register_forward_pre_hook(grab_resid)]
    try:
        lm.base_model(input_ids=input_ids.to(lm.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    x = got["resid"].float()  # [B, S, d_model]
    x_kv = _attn_norm(x, aw)
    x_q = x_kv
    if ablate is not None:
        delta = got["act"].float()[..., None] * ablate.float()  # [B, S, d_model]
        delta[:, :after_pos] = 0
        x_q = _attn_norm(x - delta, aw)
    q, k, v = _head_qkv(lm, aw, h, x_q, x_kv)
    s = torch.einsum("bqe,bke->bqk", q, k) * aw.scale
    seq = s.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=s.device).tril()
    probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)  # [B, S, S]
    z = probs @ v  # [B, S, d_head]
    return {
        "act": got["act"].float(),
        "p_bos": probs[..., 0],
        "z_norm": z.norm(dim=-1),
        "out_norm": (z @ aw.w_o[h].float()).norm(dim=-1),
    }


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
    Every supported architecture (rotary and grouped-query attention included: module docstring).
    """
    (n_layer, n), (a_layer, h) = (int(neuron[0]), int(neuron[1])), (int(head[0]), int(head[1]))
    require_causal(lm, "the BOS path intervention")
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
