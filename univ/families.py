"""Families: explain each neuron by the binary token feature that explains most of its activation variance.

Gurnee et al. (2024) sort universal neurons into families by the *variance explained* (VR) of the
post-activation a by one binary feature f of the current or the previous token:

    VR(f) = between-group SS / total SS = n (S₁ − n₁ā)² / (n₁ n₀ · M2)

with n₁ = #{f = 1}, n₀ = n − n₁, S₁ = Σ_{f=1} a, ā the mean and M2 = Σ (a − ā)². VR = 1 when the neuron
takes one value where f holds and another elsewhere. All of it streams: per batch, features [T, F] are
looked up by token id and ``featuresᵀ @ a`` [F, N] is added to float64 sums, on activations shifted by
the first batch's mean (so S₁ − n₁ā does not cancel). Nothing of size tokens × anything is kept.

Position neurons are found by the mutual information (nats) between *firing* and the position in the
context, I = Σ_b w_b [p_b log(p_b/p) + (1 − p_b) log((1 − p_b)/(1 − p))], with p_b the firing rate at
position b, w_b its share of the tokens and p the overall rate (the paper weighs positions equally; with
a full context every position has the same share). *Firing* is pre > 0, as in the paper, whose cached
activations were pre-activations: for GELU, SiLU and ReLU that is the event post > 0 (GELU's post is
never exactly 0, so "post > 0" is the robust way to write it); for gated MLPs it is the gate firing.

Family rules (thresholds are options, defaults from the paper):

    unigram         best current-token feature (not a first-letter one) has VR > 0.5
    alphabet        best first-letter feature (``starts:x``) has VR > 0.35
    previous-token  best previous-token feature has VR > 0.5
    syntax          best spaCy feature (part of speech, dependency, morphology, entity) has VR > 0.35
                    (only when spaCy and an English pipeline are installed; otherwise never)
    position        none of the above, MI with position > 0.05 and activation kurtosis < 2
    other           none of the above: semantic / context neurons, read from the top examples
    dead            the post-activation never varied

When several VR families pass, the one with the highest VR wins. ``TopExamples`` keeps, for the report,
each neuron's k largest post-activations with the token window around each.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from univ.vocab_features import VocabFeatures, token_strings

__all__ = [
    "FAMILIES",
    "FamilyThresholds",
    "FeatureVariance",
    "NeuronFamilies",
    "PositionInformation",
    "SyntaxFeatures",
    "TopExamples",
    "label_families",
    "load_syntax_model",
]

FAMILIES = ("unigram", "alphabet", "previous-token", "syntax", "position", "other", "dead")
GEMM_CHUNK = 1 << 24  # elements of one [rows, F] float64 feature block: 128 MB


@dataclass(frozen=True)
class FamilyThresholds:
    """Cuts of the family rules (module doc)."""

    unigram: float = 0.5
    alphabet: float = 0.35  # the paper's alphabet figure uses 0.35-0.37
    previous: float = 0.5
    syntax: float = 0.35
    position_mi: float = 0.05  # nats; the paper's position neurons reach 0.09-0.54
    position_max_kurt: float = 2.0  # the paper's candidates: universal with activation kurtosis < 2


# --------------------------------------------------------------------------------------------------------------------
# Streaming accumulators


def _flat_var_mask(m2: Tensor, n: int, shift: Tensor, mean: Tensor) -> Tensor:
    """True where the variance is float64 rounding noise of a constant neuron."""
    return m2 / max(n, 1) <= 1e-20 * (shift**2 + mean**2).clamp_min(1e-300)


class FeatureVariance:
    """Streaming variance explained of N activations by F binary features (module doc has the formula).

    Example:
        >>> fv = FeatureVariance(n_features=1, n_neurons=1)
        >>> f = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
        >>> fv.update(f, 3 * f)                  # the neuron is 3 where the feature holds, else 0
        >>> round(fv.variance_explained().item(), 6)
        1.0
    """

    def __init__(self, n_features: int, n_neurons: int, *, device: str | torch.device = "cpu") -> None:
        self.n_features, self.n_neurons = n_features, n_neurons
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift: Tensor | None = None  # [N]
        self.total = torch.zeros(n_neurons, **f64)  # Σ (a - shift)
        self.total_sq = torch.zeros(n_neurons, **f64)  # Σ (a - shift)²
        self.counts = torch.zeros(n_features, **f64)  # n₁ per feature
        self.sums = torch.zeros(n_features, n_neurons, **f64)  # S₁ of (a - shift) per feature

    @torch.no_grad()
    def update(self, features: Tensor, acts: Tensor) -> None:
        """features [T, F] (bool or 0/1), acts [T, N]."""
        if features.shape != (acts.shape[0], self.n_features) or acts.shape[1:] != (self.n_neurons,):
            raise ValueError(
                f"expected features [T, {self.n_features}] and acts [T, {self.n_neurons}]; "
                f"got {tuple(features.shape)} and {tuple(acts.shape)}"
            )
        t = acts.shape[0]
        if t == 0:
            return
        # Row blocks bound the float64 copies to GEMM_CHUNK elements whatever the batch (16k tokens x 37k
        # neurons would be 4.8 GB at once).
        rows = max(1, GEMM_CHUNK // max(self.n_features, self.n_neurons, 1))
        for start in range(0, t, rows):
            a = acts[start : start + rows].to(self.device, torch.float64)  # [rows, N]
            if self.shift is None:
                self.shift = a.mean(0)
            a = a - self.shift
            f = features[start : start + rows].to(self.device, torch.float64)  # [rows, F]
            self.total += a.sum(0)
            self.total_sq += (a * a).sum(0)
            self.counts += f.sum(0)
            self.sums.addmm_(f.T, a)  # [F, N]
        self.n += t

    def merge(self, other: FeatureVariance) -> FeatureVariance:
        """Add a shard of disjoint tokens (same features and neurons); exact up to float64 rounding."""
        if (other.n_features, other.n_neurons) != (self.n_features, self.n_neurons):
            raise ValueError(
                f"cannot merge FeatureVariance of {other.n_features} features x {other.n_neurons} neurons into "
                f"{self.n_features} x {self.n_neurons}"
            )
        if other.n == 0:
            return self
        o_shift = other.shift.to(self.device)
        if self.shift is None:
            self.shift = o_shift.clone()
        delta = o_shift - self.shift  # a - shift_self = (a - shift_other) + delta
        o_total, o_counts = other.total.to(self.device), other.counts.to(self.device)
        self.total_sq += other.total_sq.to(self.device) + 2 * delta * o_total + other.n * delta**2
        self.total += o_total + other.n * delta
        self.sums += other.sums.to(self.device) + o_counts[:, None] * delta[None, :]
        self.counts += o_counts
        self.n += other.n
        return self

    def neuron_variance(self) -> tuple[Tensor, Tensor]:
        """(M2 [N], dead [N] bool): total sum of squares and where it is zero."""
        n = max(self.n, 1)
        mean = self.total / n
        m2 = (self.total_sq - self.total * mean).clamp_min(0)
        shift = self.shift if self.shift is not None else torch.zeros_like(mean)
        return m2, _flat_var_mask(m2, self.n, shift, mean)

    def variance_explained(self, neurons: slice | None = None) -> Tensor:
        """VR [F, N] (float64) for all neurons or a slice; NaN for dead neurons and constant features."""
        sl = neurons if neurons is not None else slice(None)
        n = self.n
        m2, dead = self.neuron_variance()
        m2, dead = m2[sl], dead[sl]
        if n == 0:
            return torch.full((self.n_features, m2.shape[0]), float("nan"), dtype=torch.float64, device=self.device)
        d = self.sums[:, sl] - self.counts[:, None] * (self.total[sl] / n)[None, :]  # S₁ - n₁ā
        denom = self.counts * (n - self.counts) / n  # n₁ n₀ / n
        ok = (self.counts > 0) & (self.counts < n)
        vr = d * d / denom.clamp_min(1e-300)[:, None] / m2.clamp_min(1e-300)[None, :]
        vr = torch.where(ok[:, None] & ~dead[None, :], vr, torch.full_like(vr, float("nan")))
        return vr.clamp(max=1.0)  # rounding can push a perfect feature to 1 + 1e-15


class PositionInformation:
    """Streaming mutual information (nats) between a neuron firing and the position bin of the token."""

    def __init__(self, n_bins: int, n_neurons: int, *, device: str | torch.device = "cpu") -> None:
        self.n_bins, self.n_neurons = n_bins, n_neurons
        self.device = torch.device(device)
        self.fires = torch.zeros(n_bins, n_neurons, dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros(n_bins, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, bins: Tensor, fires: Tensor) -> None:
        """bins [T] long in [0, n_bins), fires [T, N] bool."""
        if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= self.n_bins):
            raise ValueError(f"position bins must lie in [0, {self.n_bins}); got {int(bins.min())}..{int(bins.max())}")
        bins = bins.to(self.device)
        # index_put_ rather than index_add_: on a busy 2-core CPU, index_add_ took ~0.1 s per small call
        # (thread oversubscription); index_put_ with accumulate took ~50 µs, and is as fast on CUDA.
        rows = max(1, GEMM_CHUNK // max(self.n_neurons, 1))
        for start in range(0, bins.shape[0], rows):
            f = fires[start : start + rows].to(self.device, torch.float64)
            self.fires.index_put_((bins[start : start + rows],), f, accumulate=True)
        self.tokens.index_put_((bins,), torch.ones_like(bins, dtype=torch.float64), accumulate=True)

    def merge(self, other: PositionInformation) -> PositionInformation:
        if (other.n_bins, other.n_neurons) != (self.n_bins, self.n_neurons):
            raise ValueError(
                f"cannot merge PositionInformation {other.n_bins}x{other.n_neurons} into {self.n_bins}x{self.n_neurons}"
            )
        self.fires += other.fires.to(self.device)
        self.tokens += other.tokens.to(self.device)
        return self

    def mutual_information(self) -> Tensor:
        """I(fires; position) [N] in nats; 0 for a neuron that always or never fires."""
        n = self.tokens.sum()
        if n == 0:
            return torch.full((self.n_neurons,), float("nan"), dtype=torch.float64, device=self.device)
        p = self.fires.sum(0) / n  # [N]
        seen = self.tokens > 0
        w = (self.tokens[seen] / n)[:, None]  # [B', 1]
        pb = self.fires[seen] / self.tokens[seen][:, None]  # [B', N]

        def xlogy(x: Tensor, y: Tensor) -> Tensor:  # x·log(x/y), with 0·log 0 = 0
            return torch.where(x > 0, x * torch.log(x / y.clamp_min(1e-300)), torch.zeros_like(x))

        mi = (w * (xlogy(pb, p[None, :]) + xlogy(1 - pb, (1 - p)[None, :]))).sum(0)
        return mi.clamp_min(0)


class TopExamples:
    """Streaming top-k activations per neuron with the token window around each (for the report).

    A window is ``before`` tokens, the token itself, ``after`` tokens, padded with −1 past the sequence, and
    the neuron's activation at each of them (NaN at excluded positions), so the report can colour a context.
    Batches merge as they come: per neuron, the batch's top k join the kept k and the best k stay.
    """

    def __init__(
        self, n_neurons: int, k: int = 10, *, before: int = 16, after: int = 4, device: str | torch.device = "cpu"
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k}: keep at least one example per neuron")
        self.n_neurons, self.k, self.before, self.after = n_neurons, k, before, after
        self.device = torch.device(device)
        w = before + 1 + after
        self.values = torch.empty(0, n_neurons, dtype=torch.float32, device=self.device)  # [k', N], sorted desc
        self.windows = torch.empty(0, n_neurons, w, dtype=torch.int32, device=self.device)  # [k', N, W] token ids
        self.acts = torch.empty(0, n_neurons, w, dtype=torch.float32, device=self.device)  # [k', N, W]
        self.where = torch.empty(0, n_neurons, 2, dtype=torch.int64, device=self.device)  # (sequence, position)
        self.n_sequences = 0

    def _unfold(self, x: Tensor, fill: float) -> Tensor:
        """[B, S, ...] -> [B, S, ..., W]: the window around each position, ``fill`` past the sequence."""
        pad = [0, 0] * (x.ndim - 2) + [self.before, self.after]
        return torch.nn.functional.pad(x, pad, value=fill).unfold(1, self.before + 1 + self.after, 1)

    @torch.no_grad()
    def update(self, input_ids: Tensor, keep: Tensor, values: Tensor) -> None:
        """input_ids, keep [B, S]; values [T, N] at the kept positions (row-major order of ``keep``)."""
        input_ids, keep = input_ids.to(self.device), keep.to(self.device)
        coords = keep.nonzero()  # [T, 2] (row, position), row-major like tensor[keep]
        if coords.shape[0] != values.shape[0] or values.shape[1:] != (self.n_neurons,):
            raise ValueError(
                f"values has shape {tuple(values.shape)}; expected [{coords.shape[0]} kept positions, {self.n_neurons}]"
            )
        self.n_sequences += input_ids.shape[0]
        if values.shape[0] == 0:
            return
        values = values.to(self.device)
        k = min(self.k, values.shape[0])
        top_v, top_i = values.topk(k, dim=0)  # [k, N], in the activations' dtype (no float copy of the batch)
        at = coords[top_i]  # [k, N, 2]
        windows = self._unfold(input_ids, -1)[at[..., 0], at[..., 1]].to(torch.int32)  # [k, N, W]
        grid = torch.full((*keep.shape, self.n_neurons), float("nan"), dtype=values.dtype, device=self.device)
        grid[keep] = values  # [B, S, N]; NaN where excluded
        neuron = torch.arange(self.n_neurons, device=self.device).expand_as(top_i)
        acts = self._unfold(grid, float("nan"))[at[..., 0], at[..., 1], neuron].float()  # [k, N, W]
        where = at.clone()
        where[..., 0] += self.n_sequences - input_ids.shape[0]

        best_v, best_i = torch.cat([self.values, top_v.float()]).topk(min(self.k, len(self.values) + k), dim=0)
        w = windows.shape[-1]
        self.values = best_v
        self.windows = torch.cat([self.windows, windows]).gather(0, best_i[..., None].expand(-1, -1, w))
        self.acts = torch.cat([self.acts, acts]).gather(0, best_i[..., None].expand(-1, -1, w))
        self.where = torch.cat([self.where, where]).gather(0, best_i[..., None].expand(-1, -1, 2))

    def result(self, tokenizer: Any, *, d_mlp: int, model: str = "", neurons: Tensor | None = None) -> pd.DataFrame:
        """One row per (neuron, rank): model, layer, neuron, rank, value, tokens (list[int]), acts (the
        neuron's activation at each token, NaN where excluded), position (index of the activating token in
        ``tokens``), token, sequence, ctx_position (where it was in the stream), text (the window decoded).

        ``neurons``: flat indices to report (default all).
        """
        idx = torch.arange(self.n_neurons) if neurons is None else torch.as_tensor(neurons).reshape(-1)
        values = self.values[:, idx].cpu().numpy()  # [k, n]
        windows = self.windows[:, idx].cpu().numpy()
        where = self.where[:, idx].cpu().numpy()
        acts = self.acts[:, idx].cpu().numpy()
        rows = []
        pieces = token_strings(tokenizer)
        for j, flat in enumerate(idx.tolist()):
            layer, neuron = divmod(flat, d_mlp)
            for rank in range(values.shape[0]):
                w = windows[rank, j]
                valid = w >= 0
                center = int(w[self.before])
                rows.append(
                    {
                        "model": model, "layer": layer, "neuron": neuron, "rank": rank,
                        "value": float(values[rank, j]), "tokens": w[valid].tolist(),
                        "acts": acts[rank, j][valid].tolist(),
                        "position": int(valid[: self.before].sum()),
                        "token": pieces[center] if 0 <= center < len(pieces) else "",
                        "sequence": int(where[rank, j, 0]), "ctx_position": int(where[rank, j, 1]),
                    }
                )  # fmt: skip
        texts = tokenizer.batch_decode([r["tokens"] for r in rows], clean_up_tokenization_spaces=False) if rows else []
        for r, text in zip(rows, texts, strict=True):
            r["text"] = text
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Optional syntax features (spaCy)

UD_POS = "ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X".split()
DEPS = (
    "acl acomp advcl advmod agent amod appos attr aux auxpass case cc ccomp compound conj csubj dative dep det "
    "dobj expl intj mark meta neg nmod npadvmod nsubj nsubjpass nummod oprd parataxis pcomp pobj poss preconj "
    "predet prep prt punct quantmod relcl root xcomp"
).split()
MORPH = (
    "Tense=Past Tense=Pres VerbForm=Inf VerbForm=Ger VerbForm=Part VerbForm=Fin Number=Sing Number=Plur "
    "Aspect=Perf Aspect=Prog Person=1 Person=2 Person=3 PronType=Prs PronType=Dem PronType=Rel PronType=Int "
    "Mood=Imp Degree=Cmp Degree=Sup Poss=Yes Polarity=Neg"
).split()
ENTS = (
    "PERSON NORP FAC ORG GPE LOC PRODUCT EVENT WORK_OF_ART LAW LANGUAGE DATE TIME PERCENT MONEY QUANTITY "
    "ORDINAL CARDINAL"
).split()
SYNTAX_NAMES = (
    [f"pos:{p}" for p in UD_POS] + [f"dep:{d}" for d in DEPS] + [f"morph:{m}" for m in MORPH]
    + [f"ent:{e}" for e in ENTS] + ["sent:stop_word", "sent:start", "sent:end"]
)  # fmt: skip


def load_syntax_model(name: str = "en_core_web_sm", *, verbose: bool = True) -> Any | None:
    """A spaCy pipeline, or None (with an info line) when spaCy or the pipeline is not installed."""
    try:
        import spacy
    except ImportError:
        if verbose:
            print('families: spaCy not installed; syntax features skipped (to use them: pip install "univ[syntax]" '
                  f"&& python -m spacy download {name})", file=sys.stderr)
        return None
    try:
        return spacy.load(name)
    except OSError:
        if verbose:
            print(f"families: spaCy pipeline {name!r} not installed; syntax features skipped "
                  f"(to use them: python -m spacy download {name})", file=sys.stderr)
        return None


class SyntaxFeatures:
    """Per-position syntax features from a spaCy pipeline: [B, S, F] bool for token batches.

    Each sequence is decoded token by token, the concatenation is parsed, and a model token takes the
    labels of the spaCy token its characters fall in — only when they fall in exactly one (the paper's
    alignment rule; tokens spanning two words get none). Special tokens decode to nothing.
    """

    def __init__(self, nlp: Any, tokenizer: Any, *, vocab_size: int | None = None) -> None:
        self.nlp = nlp
        self.names = list(SYNTAX_NAMES)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.pieces = token_strings(tokenizer, vocab_size)
        for i in getattr(tokenizer, "all_special_ids", []):
            if i is not None and 0 <= i < len(self.pieces):
                self.pieces[i] = ""

    def _labels(self, tok: Any) -> list[int]:
        names = [f"pos:{tok.pos_}", f"dep:{str(tok.dep_).lower()}"]
        morph = tok.morph.to_dict() if hasattr(tok.morph, "to_dict") else dict(tok.morph)
        names += [f"morph:{k}={v}" for k, v in morph.items()]
        if tok.ent_type_:
            names.append(f"ent:{tok.ent_type_}")
        if tok.is_stop:
            names.append("sent:stop_word")
        if tok.is_sent_start:
            names.append("sent:start")
        if getattr(tok, "is_sent_end", False):
            names.append("sent:end")
        return [self._index[n] for n in names if n in self._index]

    def __call__(self, input_ids: Tensor) -> Tensor:
        ids = input_ids.cpu().tolist()
        out = torch.zeros(len(ids), len(ids[0]) if ids else 0, len(self.names), dtype=torch.bool)
        texts, spans = [], []
        for row in ids:
            pieces = [self.pieces[t] if 0 <= t < len(self.pieces) else "" for t in row]
            starts = np.cumsum([0] + [len(p) for p in pieces])
            texts.append("".join(pieces))
            spans.append(starts)
        for b, doc in enumerate(self.nlp.pipe(texts)):
            owner = np.full(len(texts[b]), -1, dtype=np.int64)
            labels = []
            for tok in doc:
                if tok.is_space:
                    continue
                owner[tok.idx : tok.idx + len(tok.text)] = len(labels)
                labels.append(self._labels(tok))
            starts = spans[b]
            for s in range(len(ids[b])):
                seg = owner[starts[s] : starts[s + 1]]
                found = np.unique(seg[seg >= 0])
                if len(found) == 1:
                    out[b, s, labels[found[0]]] = True
        return out


# --------------------------------------------------------------------------------------------------------------------
# One model's families


class NeuronFamilies:
    """Everything a families pass accumulates for one model: feature VR, position MI and nothing else.

    Features: the vocabulary's (current token, then previous token, ``prev:`` prefix), then optional
    syntax features (current, previous). ``update`` takes a batch with its kept activations.
    """

    def __init__(
        self,
        vocab: VocabFeatures,
        n_layers: int,
        d_mlp: int,
        *,
        ctx: int,
        syntax: SyntaxFeatures | None = None,
        n_position_bins: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.vocab, self.syntax = vocab, syntax
        self.n_layers, self.d_mlp, self.ctx = n_layers, d_mlp, ctx
        self.device = torch.device(device)
        n = n_layers * d_mlp
        # One extra all-false row: the "previous token" of the first position.
        self._table = torch.cat([vocab.matrix, torch.zeros(1, vocab.matrix.shape[1], dtype=torch.bool)]).to(self.device)
        syn = syntax.names if syntax is not None else []
        cur = list(vocab.names) + syn
        self.names = cur + [f"prev:{x}" for x in cur]
        self.groups = list(vocab.groups) + ["syntax"] * len(syn) + ["previous-token"] * len(cur)
        self.variance = FeatureVariance(len(self.names), n, device=self.device)
        self.n_position_bins = min(ctx, n_position_bins or ctx)
        self.position = PositionInformation(self.n_position_bins, n, device=self.device)

    def features(self, input_ids: Tensor, keep: Tensor) -> Tensor:
        """[T, F] bool features of the kept positions (current, then previous token)."""
        input_ids, keep = input_ids.to(self.device), keep.to(self.device)
        v = self.vocab.vocab_size
        if int(input_ids.max()) >= v or int(input_ids.min()) < 0:
            raise ValueError(f"token ids outside the vocabulary features' {v} ids")
        prev = torch.cat([torch.full_like(input_ids[:, :1], v), input_ids[:, :-1]], 1)  # v: the all-false row
        parts_cur = [self._table[input_ids[keep]]]
        parts_prev = [self._table[prev[keep]]]
        if self.syntax is not None:
            syn = self.syntax(input_ids).to(self.device)  # [B, S, Fs]
            syn_prev = torch.cat([torch.zeros_like(syn[:, :1]), syn[:, :-1]], 1)
            parts_cur.append(syn[keep])
            parts_prev.append(syn_prev[keep])
        return torch.cat(parts_cur + parts_prev, 1)

    @torch.no_grad()
    def update(self, input_ids: Tensor, keep: Tensor, post: Tensor, pre: Tensor | None = None) -> None:
        """input_ids, keep [B, S]; post (and pre) [T, L, d_mlp] at the kept positions."""
        t = post.shape[0]
        acts = post.reshape(t, -1)
        self.variance.update(self.features(input_ids, keep), acts)
        fires = (pre.reshape(t, -1) if pre is not None else acts) > 0
        positions = torch.arange(input_ids.shape[1], device=self.device).expand(input_ids.shape[0], -1)
        bins = positions[keep.to(self.device)] * self.n_position_bins // self.ctx
        self.position.update(bins, fires)

    def result(self, *, act_kurt: np.ndarray | None = None, thresholds: FamilyThresholds | None = None) -> pd.DataFrame:
        """One row per neuron: layer, neuron, family, best_feature, best_vr, the best feature and VR of
        each family (unigram_*, alphabet_*, previous_*, syntax_*), position_mi, dead."""
        n = self.n_layers * self.d_mlp
        groups = np.array(self.groups)
        names = np.array(self.names, dtype=object)
        kinds = {"unigram": "unigram", "alphabet": "alphabet", "previous": "previous-token", "syntax": "syntax"}
        cols: dict[str, Any] = {"best_feature": np.empty(n, dtype=object), "best_vr": np.full(n, np.nan)}
        for k in kinds:
            cols[f"{k}_feature"] = np.empty(n, dtype=object)
            cols[f"{k}_vr"] = np.full(n, np.nan)
        chunk = max(1, GEMM_CHUNK // max(len(names), 1))
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            vr = self.variance.variance_explained(sl).cpu().numpy()  # [F, n_chunk]
            vr = np.where(np.isnan(vr), -np.inf, vr)
            for prefix, mask in [("best", np.ones(len(names), bool))] + [(k, groups == g) for k, g in kinds.items()]:
                if not mask.any():
                    continue
                sub = vr[mask]
                arg = sub.argmax(0)
                val = sub[arg, np.arange(sub.shape[1])]
                ok = np.isfinite(val)
                cols[f"{prefix}_feature"][sl] = np.where(ok, names[mask][arg], None)
                cols[f"{prefix}_vr"][sl] = np.where(ok, val, np.nan)
        _, dead = self.variance.neuron_variance()
        layer, neuron = np.divmod(np.arange(n), self.d_mlp)
        df = pd.DataFrame({"layer": layer, "neuron": neuron, **cols})
        df["position_mi"] = self.position.mutual_information().cpu().numpy()
        df["dead"] = dead.cpu().numpy()
        if act_kurt is not None:
            df["act_kurt"] = act_kurt
        df.insert(2, "family", label_families(df, thresholds))
        return df


def label_families(df: pd.DataFrame, thresholds: FamilyThresholds | None = None) -> pd.Series:
    """The family of each neuron from its per-family best VRs, position MI and activation kurtosis (module doc).

    Needs unigram_vr, alphabet_vr, previous_vr (syntax_vr, position_mi, act_kurt, dead are optional).
    """
    th = thresholds or FamilyThresholds()
    cuts = {"unigram": th.unigram, "alphabet": th.alphabet, "previous-token": th.previous, "syntax": th.syntax}
    cols = {"unigram": "unigram_vr", "alphabet": "alphabet_vr", "previous-token": "previous_vr", "syntax": "syntax_vr"}
    n = len(df)
    scores = np.stack(
        [
            np.where(df[c].to_numpy(float) > cuts[f], df[c].to_numpy(float), -np.inf)
            if c in df
            else np.full(n, -np.inf)
            for f, c in cols.items()
        ]
    )  # [4, n]; -inf where the family's cut is not met
    fams = np.array(list(cols), dtype=object)
    label = np.where(np.isfinite(scores.max(0)), fams[scores.argmax(0)], "other").astype(object)
    if "position_mi" in df:
        kurt = df["act_kurt"].to_numpy(float) if "act_kurt" in df else np.full(n, np.nan)
        flat = np.isnan(kurt) | (kurt < th.position_max_kurt)
        position = (df["position_mi"].to_numpy(float) > th.position_mi) & flat
        label = np.where((label == "other") & position, "position", label)
    if "dead" in df:
        label = np.where(df["dead"].to_numpy(bool), "dead", label)
    return pd.Series(label, index=df.index, name="family")


# --------------------------------------------------------------------------------------------------------------------
# Command


def add_family_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the families stage (shared with ``univ analyze``)."""
    d = FamilyThresholds()
    g = p.add_argument_group("families")
    g.add_argument("--unigram-vr", type=float, default=d.unigram, help=f"unigram family cut (default: {d.unigram})")
    g.add_argument("--alphabet-vr", type=float, default=d.alphabet, help=f"alphabet family cut (default: {d.alphabet})")
    g.add_argument("--previous-vr", type=float, default=d.previous, help=f"previous-token cut (default: {d.previous})")
    g.add_argument("--syntax-vr", type=float, default=d.syntax, help=f"syntax family cut (default: {d.syntax})")
    g.add_argument(
        "--position-mi", type=float, default=d.position_mi, help=f"position MI cut, nats (default: {d.position_mi})"
    )
    g.add_argument(
        "--position-max-kurt", type=float, default=d.position_max_kurt,
        help=f"position neurons need activation kurtosis below this (default: {d.position_max_kurt})",
    )  # fmt: skip
    g.add_argument("--top-k", type=int, default=10, help="top-activating examples kept per neuron (default: 10)")
    g.add_argument(
        "--n-tokens", type=int, default=300, help="single-token features, most frequent first (default: 300)"
    )
    g.add_argument("--n-unigrams", type=int, default=300, help="normalised-string features (default: 300)")
    g.add_argument(
        "--unigram-sample", type=int, default=1_000_000,
        help="tokens counted (tokenizer only) to rank token/unigram features; 0: rank by id (default: 1e6)",
    )  # fmt: skip
    g.add_argument(
        "--syntax", choices=("auto", "on", "off"), default="auto",
        help="spaCy syntax features: auto uses them when spaCy and --spacy-model are installed (default: auto)",
    )  # fmt: skip
    g.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for syntax features")


def thresholds_from_args(args: argparse.Namespace) -> FamilyThresholds:
    return FamilyThresholds(
        unigram=args.unigram_vr, alphabet=args.alphabet_vr, previous=args.previous_vr, syntax=args.syntax_vr,
        position_mi=args.position_mi, position_max_kurt=args.position_max_kurt,
    )  # fmt: skip


def feature_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        n_tokens=args.n_tokens, n_unigrams=args.n_unigrams, unigram_sample=args.unigram_sample,
        spacy_model=args.spacy_model,
    )  # fmt: skip
