"""Statistics of every neuron: activation moments streamed over a dataset, weight statistics, and how
universal neurons compare with the rest of their layer.

Activations (Gurnee et al. 2024 use the *pre*-activation, the input of the GELU):

    act_mean, act_var     mean and (population) variance of the pre-activation
    act_skew, act_kurt    m3/σ³ and m4/σ⁴ — kurtosis is *not* excess: a Gaussian gives 3
    act_freq              P(pre > 0), the activation frequency (the repo's "sparsity")
    post_mean             mean of the post-activation (what the neuron writes, on average)

Only kept positions count (``TokenBatch.keep``: no BOS, EOS, pad or newline). Nothing of size tokens ×
neurons is stored: ``ActivationStats`` keeps the power sums S_k = Σ (x − c)^k, k = 1..4, in float64 with
a per-neuron shift c (the first batch's mean). Without the shift, S_4 of a neuron whose mean is large
against its spread cancels catastrophically when turned into central moments; with it the leftover mean
(x̄ − c) is small and the expansion below is well conditioned:

    m = S1/n,  μ2 = S2/n − m²,  μ3 = S3/n − 3m·S2/n + 2m³,  μ4 = S4/n − 4m·S3/n + 6m²·S2/n − 3m⁴

Shards with different shifts merge exactly by re-expanding the binomial (``merge``).

``univ stats DIR`` runs one pass over the run's data for each analysed model, adds the weight statistics
(:mod:`univ.weights`) and the within-layer percentiles, and writes ``DIR/stats.parquet`` (+ ``.csv``); when
the run has correlations it also prints the universal-vs-rest comparison (``DIR/stats_compare.csv``).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = [
    "ACT_COLUMNS",
    "COMPARE_COLUMNS",
    "ActivationStats",
    "add_layer_percentiles",
    "compare_universal",
]

ACT_COLUMNS = ["act_mean", "act_var", "act_skew", "act_kurt", "act_freq", "post_mean"]
# The paper's comparison (properties_of_universal_neurons): activation and weight statistics, within layer.
COMPARE_COLUMNS = [
    "act_freq", "act_mean", "act_skew", "act_kurt", "input_bias", "in_out_sim", "l2_penalty",
    "w_in_norm", "w_out_norm", "vocab_kurt", "vocab_skew",
]  # fmt: skip
CHUNK = 1 << 24  # elements per float64 block in update(): 128 MB, whatever the batch and model size


class ActivationStats:
    """Streaming pre-activation moments, activation frequency and post-activation mean per neuron.

    Example:
        >>> st = ActivationStats(n_layers=1, d_mlp=2)
        >>> st.update(torch.tensor([[[0.0, 1.0]], [[2.0, 3.0]]]))  # pre [T=2, L=1, d=2]
        >>> st.result()[["act_mean", "act_var", "act_freq"]].to_numpy().tolist()
        [[1.0, 1.0, 0.5], [2.0, 1.0, 1.0]]
    """

    def __init__(self, n_layers: int, d_mlp: int, *, device: str | torch.device = "cpu") -> None:
        self.n_layers, self.d_mlp = n_layers, d_mlp
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        n = self.n_layers * self.d_mlp
        z = lambda: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.n = 0
        self.shift: Tensor | None = None  # [N] float64, set by the first update
        self.sums = torch.zeros(4, n, dtype=torch.float64, device=self.device)  # S_1..S_4 of (pre - shift)
        self.n_pos = z()  # count of pre > 0
        self.post_sum = z()
        self.n_post = 0

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The sums as named tensors (a checkpoint's ``prefix``.shift/sums/n_pos/post_sum); counts: ``counters``."""
        shift = self.shift if self.shift is not None else torch.zeros_like(self.post_sum)
        return {f"{prefix}.shift": shift, f"{prefix}.sums": self.sums, f"{prefix}.n_pos": self.n_pos,
                f"{prefix}.post_sum": self.post_sum}

    def counters(self) -> list:
        return [self.n, self.n_post, self.shift is not None]

    def load_state_dict(self, tensors: dict[str, Tensor], prefix: str, counters: list) -> None:
        """Take over what ``state_dict`` and ``counters`` saved."""
        self.n, self.n_post, has_shift = counters
        self.shift = tensors[f"{prefix}.shift"].clone() if has_shift else None
        self.sums, self.n_pos = tensors[f"{prefix}.sums"].clone(), tensors[f"{prefix}.n_pos"].clone()
        self.post_sum = tensors[f"{prefix}.post_sum"].clone()

    @torch.no_grad()
    def update(self, pre: Tensor, post: Tensor | None = None) -> None:
        """Add T kept positions: pre, post [T, L, d_mlp] (any float dtype; post optional)."""
        n_neurons = self.n_layers * self.d_mlp
        if pre.ndim != 3 or pre.shape[1:] != (self.n_layers, self.d_mlp):
            raise ValueError(f"pre must be [T, {self.n_layers}, {self.d_mlp}]; got {tuple(pre.shape)}")
        if post is not None and post.shape != pre.shape:
            raise ValueError(f"post has shape {tuple(post.shape)}; expected pre's {tuple(pre.shape)}")
        t = pre.shape[0]
        if t == 0:
            return
        x = pre.reshape(t, n_neurons).to(self.device)
        if not torch.isfinite(x).all():
            raise ValueError("pre-activations contain NaN or inf; check the model's dtype (fp16 overflow?)")
        rows = max(1, CHUNK // n_neurons)
        if self.shift is None:
            self.shift = x[:rows].double().mean(0)  # any shift near the mean does; the first block's is cheap
        for start in range(0, t, rows):
            d = x[start : start + rows].double() - self.shift  # [rows, N]
            d2 = d * d
            self.sums[0] += d.sum(0)
            self.sums[1] += d2.sum(0)
            self.sums[2] += (d2 * d).sum(0)
            self.sums[3] += (d2 * d2).sum(0)
        self.n_pos += (x > 0).sum(0, dtype=torch.float64)
        self.n += t
        if post is not None:
            self.post_sum += post.reshape(t, n_neurons).to(self.device).sum(0, dtype=torch.float64)
            self.n_post += t

    def _sums_about(self, shift: Tensor) -> Tensor:
        """S_1..S_4 of (x − shift), from the sums about self.shift: Σ(x−c')^k = Σ_j C(k,j) δ^(k−j) S_j, δ = c − c'."""
        if self.shift is None:
            return torch.zeros_like(self.sums)
        delta = self.shift - shift
        s = [torch.full_like(delta, float(self.n)), *self.sums]  # S_0 = n
        out = []
        for k in range(1, 5):
            out.append(sum(math.comb(k, j) * delta ** (k - j) * s[j] for j in range(k + 1)))
        return torch.stack(out)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Add another shard's state (same layout, disjoint tokens); exact up to float64 rounding."""
        if (other.n_layers, other.d_mlp) != (self.n_layers, self.d_mlp):
            raise ValueError(
                f"cannot merge ActivationStats of {other.n_layers}x{other.d_mlp} neurons into "
                f"{self.n_layers}x{self.d_mlp}"
            )
        if other.n == 0:
            return self
        other_shift = other.shift.to(self.device)
        if self.shift is None:
            self.shift = other_shift.clone()
        moved = ActivationStats.__new__(ActivationStats)
        moved.__dict__.update(other.__dict__, shift=other_shift, sums=other.sums.to(self.device))
        self.sums += moved._sums_about(self.shift)
        self.n += other.n
        self.n_pos += other.n_pos.to(self.device)
        self.post_sum += other.post_sum.to(self.device)
        self.n_post += other.n_post
        return self

    def moments(self) -> dict[str, Tensor]:
        """act_mean, act_var, act_skew, act_kurt, act_freq, post_mean as [N] float64 tensors (NaN if undefined)."""
        n = self.n
        nan = torch.full((self.n_layers * self.d_mlp,), float("nan"), dtype=torch.float64, device=self.device)
        if n == 0:
            return {c: nan.clone() for c in ACT_COLUMNS}
        r1, r2, r3, r4 = (s / n for s in self.sums)  # raw moments of (x - shift)
        m = r1
        mu2 = (r2 - m * m).clamp_min(0)
        mu3 = r3 - 3 * m * r2 + 2 * m**3
        mu4 = r4 - 4 * m * r3 + 6 * m**2 * r2 - 3 * m**4
        # Below this the variance is float64 rounding noise of a constant neuron (fp32 activations cannot
        # resolve std/mean < 1e-7): no skew or kurtosis exists.
        flat = mu2 <= 1e-20 * (self.shift**2 + m**2).clamp_min(1e-300)
        var = torch.where(flat, torch.zeros_like(mu2), mu2)
        safe = torch.where(flat, nan, mu2)
        return {
            "act_mean": self.shift + m,
            "act_var": var,
            "act_skew": mu3 / safe.pow(1.5),
            "act_kurt": mu4 / safe.pow(2),
            "act_freq": self.n_pos / n,
            "post_mean": self.post_sum / self.n_post if self.n_post else nan,
        }

    def result(self) -> pd.DataFrame:
        """One row per neuron: layer, neuron and :data:`ACT_COLUMNS`."""
        moments = {k: v.cpu().numpy() for k, v in self.moments().items()}
        layer, neuron = np.divmod(np.arange(self.n_layers * self.d_mlp), self.d_mlp)
        return pd.DataFrame({"layer": layer, "neuron": neuron, **moments})


# --------------------------------------------------------------------------------------------------------------------
# Universal vs the rest


def add_layer_percentiles(df: pd.DataFrame, cols: list[str] | None = None, *, suffix: str = "_pct") -> pd.DataFrame:
    """Add ``<col>_pct``: the within-layer (and within-model) percentile, 0–100, of each column.

    Ties get the mean rank, which is ``scipy.stats.percentileofscore(kind="rank")``, what the paper used;
    NaN stays NaN and is left out of the ranking.
    """
    cols = [c for c in (cols if cols is not None else COMPARE_COLUMNS) if c in df]
    keys = ["model", "layer"] if "model" in df else ["layer"]
    ranks = df.groupby(keys, sort=False)[cols].rank(method="average", pct=True) * 100
    return df.assign(**{f"{c}{suffix}": ranks[c] for c in cols})


def compare_universal(df: pd.DataFrame, cols: list[str] | None = None) -> pd.DataFrame:
    """Median within-layer percentile of each statistic, universal vs other neurons, per model.

    The paper's finding (GPT2-small medians): universal neurons sit at the ~94th percentile of activation
    skew, ~93rd of kurtosis, ~18th of input bias, ~83rd of L2 penalty, ~23rd of activation frequency.
    Columns: model, metric, universal_pct, other_pct (medians of percentiles), universal_median,
    other_median (medians of the raw values), n_universal, n_other.
    """
    if "is_universal" not in df:
        raise KeyError("compare_universal needs an is_universal column (univ.universal.select_universal)")
    cols = [c for c in (cols if cols is not None else COMPARE_COLUMNS) if c in df]
    if any(f"{c}_pct" not in df for c in cols):
        df = add_layer_percentiles(df, cols)
    df = df if "model" in df else df.assign(model="")
    rows = []
    for model, g in df.groupby("model", sort=False):
        uni = g["is_universal"].fillna(False).astype(bool)
        for c in cols:
            rows.append(
                {
                    "model": model,
                    "metric": c,
                    "universal_pct": g.loc[uni, f"{c}_pct"].median(),
                    "other_pct": g.loc[~uni, f"{c}_pct"].median(),
                    "universal_median": g.loc[uni, c].median(),
                    "other_median": g.loc[~uni, c].median(),
                    "n_universal": int(uni.sum()),
                    "n_other": int((~uni).sum()),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Command


def add_pass_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that stream the run's data through its models."""
    p.add_argument("dir", help="run directory written by 'univ correlate' (run.json, neurons.parquet)")
    p.add_argument("--tokens", type=int, default=None, help="kept tokens to stream per model (default: the run's)")
    p.add_argument("--device", default="cpu", help="torch device for the models and accumulators (default: cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    p.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16, float16 (default: fp32 CPU/bf16 GPU)")
    p.add_argument("--threshold", type=float, default=0.5, help="universal: excess-correlation cut (default: 0.5)")
    p.add_argument("--rule", choices=("mean", "strict"), default="mean", help="universal: selection rule")
