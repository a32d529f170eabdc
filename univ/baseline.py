"""The random-rotation baseline, computed analytically from accumulators already in hand, for K draws.

The paper correlates model a with *rotated* neurons of model m, layer by layer: ỹ = y Q_l with Q_l a
random [d, d] matrix whose columns are unit vectors (the paper's row-normalised Gaussian R = Q_lᵀ; not
orthogonal). Rotation is linear, so with C the centred cross co-moment and W_l = Σ(y_l − ȳ_l)ᵀ(y_l − ȳ_l)
the centred within-layer co-moment of model m:

    co-moment(x, ỹ) = C[:, l] Q_l          variance of rotated neuron j ∝ (Q_lᵀ W_l Q_l)_jj

No second pass over the data, exact for any number of draws. One draw decides the borderline
(issue 12: two Gaussian draws move a neuron's baseline by sd ≈ 0.028 on the zoo), so a run may take K
draws per layer; draw k of (seed, model index, layer) is the k-th matrix of one seeded stream, so draw 0
is the single draw of earlier runs and K draws always begin with the K − 1 draws of a smaller K.

Pieces, in the order a finalize uses them:

    RotationBank.get(model, layer, W_l)  → Q_cat [d, K·d], 1/sd of the rotated neurons [K·d]  (once per run)
    rotated_max(C_centred, inv_sd, Q_cat, inv_rot, K)  → [K, n] max r over the rotated neurons, per draw
    summarize_draws(max_corr [M, n], base [M, K, n])  → the neuron table's baseline and excess columns
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("gaussian", "orthogonal", "none")
# Peak bytes of one rotated-correlation chunk [rows, K·d] in rotated_max: a GPT2-small layer row block
# against K = 16 draws would otherwise be 36,864 × 49,152 × 4 B = 7.2 GB.
CHUNK_BYTES = 256 << 20
# RotationBank keeps rotations up to this many bytes (host memory) and regenerates beyond it (seeded, so
# a regenerated rotation is bitwise the same): GPT2-small, K = 16, one model is 12 × 16 × 3072² × 4 B = 7.2 GB.
CACHE_BYTES = 2 << 30


def _stream(seed: int, model_index: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + model_index * 1_009 + layer)


def _draw(g: torch.Generator, d: int, kind: str) -> torch.Tensor:
    z = torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return z / z.norm(dim=0, keepdim=True)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r))


def _check_kind(kind: str) -> None:
    if kind not in ("gaussian", "orthogonal"):
        raise ValueError(f"baseline kind must be 'gaussian' or 'orthogonal', got {kind!r}")


def rotations(d: int, *, kind: str, seed: int, model_index: int, layer: int, draws: int = 1) -> torch.Tensor:
    """Q [draws, d, d] float32 on CPU: rotated neuron j of draw k = Σ_i y_i Q[k, i, j].

    ``gaussian``: iid normal with unit-norm columns (the paper's draw); ``orthogonal``: Haar-random
    orthogonal (QR of a Gaussian with the signs of R's diagonal fixed). Draws are consecutive matrices of
    one generator seeded by (seed, model_index, layer): ``rotations(..., draws=K)[:k]`` equals
    ``rotations(..., draws=k)``.
    """
    _check_kind(kind)
    if draws < 1:
        raise ValueError(f"draws must be ≥ 1, got {draws}")
    g = _stream(seed, model_index, layer)
    out = torch.empty((draws, d, d), dtype=torch.float32)  # filled in place: no stacked copy of K matrices
    for k in range(draws):
        out[k] = _draw(g, d, kind)
    return out


def rotation(d: int, *, kind: str, seed: int, model_index: int, layer: int) -> torch.Tensor:
    """Q [d, d] float32 on CPU: draw 0 of ``rotations`` (the single draw of a K = 1 run)."""
    return rotations(d, kind=kind, seed=seed, model_index=model_index, layer=layer, draws=1)[0]


def rotated_inv_sd(w_centred: torch.Tensor, q: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """1/√(Qᵀ W Q)_jj for each rotated neuron j: [d] for q [d, d], [K, d] for q [K, d, d].

    One fp32 GEMM W·[Q_0 … Q_k] per chunk of draws, summed in float64: a random direction's variance sits
    near tr(W)/d, far above W's small eigenvalues, so fp32 products lose little (zoo W, cond 1.4e3: 1.6e-7
    relative, against a float64 product that took 2.3× as long on this CPU). NaN where the variance vanishes.
    """
    w = w_centred.float()
    d = w.shape[0]
    scale = torch.diagonal(w).double().sum().clamp(min=1e-300)
    qs = (q[None] if q.dim() == 2 else q).to(device=w.device)
    step = max(1, chunk_bytes // (4 * d * d))
    out = []
    for k0 in range(0, qs.shape[0], step):
        q_cat = qs[k0:k0 + step].float().permute(1, 0, 2).reshape(d, -1)  # [d, k·d]
        var = (w @ q_cat).mul_(q_cat).sum(0, dtype=torch.float64).view(-1, d)  # [k, d]
        out.append(torch.where(var <= 1e-12 * scale, float("nan"), var.clamp(min=1e-300).rsqrt()).float())
    inv = torch.cat(out)
    return inv[0] if q.dim() == 2 else inv


def rotated_max(cc: torch.Tensor, inv_sd: torch.Tensor, q_cat: torch.Tensor, inv_rot: torch.Tensor,
                draws: int, *, chunk_bytes: int = CHUNK_BYTES, u_rows: torch.Tensor | None = None,
                u_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Per draw, each row's max Pearson r over the rotated neurons of one layer: [draws, n] fp32.

    ``cc`` [n, d] centred co-moments of n neurons with the layer's d neurons (pass ``C.T`` for the
    reverse direction of all-pairs runs); ``inv_sd`` [n] their 1/√M2 (NaN = dead); ``q_cat`` [d, K·d] the K
    rotations side by side (``RotationBank``), so all draws share one GEMM per chunk of rows; ``inv_rot``
    [K·d]. Dead rows, or rows whose every rotated partner is dead, get NaN. With ``u_rows`` [n] and ``u_cols``
    [d], ``cc`` is raw and is centred here (``cc − u_rows u_colsᵀ``) a chunk of rows at a time: the run's
    blocks are never copied whole (a GPT2-small layer's [36,864 × 3,072] would be 453 MB twice).
    """
    n, d = cc.shape
    if q_cat.shape != (d, draws * d) or inv_rot.shape != (draws * d,) or inv_sd.shape != (n,):
        raise ValueError(f"rotated_max: cc {tuple(cc.shape)}, inv_sd {tuple(inv_sd.shape)}, q_cat "
                         f"{tuple(q_cat.shape)}, inv_rot {tuple(inv_rot.shape)} do not match {draws} draws")
    q_cat, inv_rot, inv_sd = (t.to(device=cc.device, dtype=torch.float32) for t in (q_cat, inv_rot, inv_sd))
    step = max(1, chunk_bytes // (4 * draws * d))
    out = torch.empty((draws, n), dtype=torch.float32, device=cc.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        x = cc[r0:r1].float()
        if u_rows is not None:
            x = x - u_rows[r0:r1, None].float() * u_cols[None, :].float()
        r = (x @ q_cat).mul_(inv_sd[r0:r1, None]).mul_(inv_rot[None, :])  # [rows, K·d], in place from here
        r.clamp_(-1.0, 1.0).nan_to_num_(nan=float("-inf"))  # clamp keeps NaN; dead partners never win
        out[:, r0:r1] = r.view(r1 - r0, draws, d).amax(-1).t()
    return torch.where(torch.isinf(out), float("nan"), out)


class RotationBank:
    """The rotations of a run and their rotated-neuron normalisers, per (model, layer), computed once.

    Blocks of several passes (and both directions of all-pairs runs) meet the same (model, layer): the
    normaliser (a d³ float64 product per draw) is always kept ([K·d] floats); the rotations themselves
    are kept up to ``cache_bytes`` and regenerated past it (seeded: bitwise the same).
    """

    def __init__(self, kind: str, seed: int, draws: int, *, cache_bytes: int = CACHE_BYTES):
        _check_kind(kind)
        if draws < 1:
            raise ValueError(f"baseline draws must be ≥ 1, got {draws}")
        self.kind, self.seed, self.draws, self.cache_bytes = kind, seed, draws, cache_bytes
        self._q: dict[tuple[int, int], torch.Tensor] = {}
        self._inv: dict[tuple[int, int], torch.Tensor] = {}
        self._bytes = 0

    def q_cat(self, model_index: int, layer: int, d: int) -> torch.Tensor:
        """[d, K·d] float32 CPU: the K rotations side by side (columns k·d … (k+1)·d − 1 are draw k)."""
        key = (model_index, layer)
        if key in self._q:
            return self._q[key]
        q = rotations(d, kind=self.kind, seed=self.seed, model_index=model_index, layer=layer, draws=self.draws)
        q = q.permute(1, 0, 2).reshape(d, self.draws * d)  # the one copy: [K, d, d] → [d, K·d]
        if self._bytes + q.numel() * 4 <= self.cache_bytes:
            self._q[key] = q
            self._bytes += q.numel() * 4
        return q

    def get(self, model_index: int, layer: int, w_centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_cat [d, K·d] on W's device, 1/sd of the rotated neurons [K·d]) for this model's layer.

        ``w_centred`` is the layer's centred within-layer co-moment; it is the same on every pass (same
        tokens, same shift), so the normaliser computed on first use serves the whole run.
        """
        d = w_centred.shape[0]
        q = self.q_cat(model_index, layer, d)
        key = (model_index, layer)
        if key not in self._inv:
            q3 = q.view(d, self.draws, d).permute(1, 0, 2)  # [K, d, d]
            self._inv[key] = rotated_inv_sd(w_centred, q3).reshape(-1).to(w_centred.device)
        return q.to(w_centred.device), self._inv[key]


def q05_rank(draws: int) -> int:
    """0-based rank j of the order statistic e_(j) with: e_(j) > t ⇔ e_k > t in at least 95 % of draws.

    At most ⌊0.05·K⌋ draws may fail, so the (⌊0.05·K⌋ + 1)-th smallest must pass: the minimum for K < 20.
    """
    return int(np.floor(0.05 * draws + 1e-9))


def _sd(x: np.ndarray, axis: int) -> np.ndarray:
    """Sample sd (ddof 1) over draws; NaN with one draw (no spread can be estimated from it)."""
    if x.shape[axis] < 2:
        return np.full(np.delete(x.shape, axis), np.nan)
    return x.std(axis, ddof=1)


def summarize_draws(max_corr: np.ndarray, base: np.ndarray) -> dict[str, np.ndarray]:
    """The neuron table's baseline and excess columns from K draws (float64; NaN propagates: dead neurons).

    ``max_corr`` [M, n]: max r against each compared model m; ``base`` [M, K, n]: the baseline of each
    draw. With b̄_k = mean_m base[m, k] and e_k = mean_corr − b̄_k (the excess one draw would give):

        baseline_mean [M, n], baseline_sd [M, n]   per compared model, over draws (sd: ddof 1, NaN if K = 1)
        mean_baseline = mean_k b̄_k   max_baseline = max_m baseline_mean   mean/min/max_corr over m
        excess_corr = mean_corr − mean_baseline        (the paper's score; K = 1: exactly the paper's)
        mean_baseline_sd = sd_k b̄_k      excess_se = mean_baseline_sd / √K   (standard error of excess_corr)
        excess_q05 = e_(q05_rank(K))     (> t ⇔ the neuron passes t in ≥ 95 % of draws)
        excess_min, excess_max = min_k e_k, max_k e_k    (min ≤ t < max: the verdict depends on the draw)
    """
    max_corr, base = np.asarray(max_corr, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if base.ndim != 3 or base.shape[0] != max_corr.shape[0] or base.shape[2] != max_corr.shape[1]:
        raise ValueError(f"base must be [M, K, n] for max_corr [M, n] = {max_corr.shape}, got {base.shape}")
    k = base.shape[1]
    with np.errstate(all="ignore"):
        mean_corr = max_corr.mean(0)
        per_draw = base.mean(0)  # [K, n] b̄_k
        excess = mean_corr[None] - per_draw  # [K, n] e_k
        out = {
            "baseline_mean": base.mean(1),
            "baseline_sd": _sd(base, 1),
            "mean_corr": mean_corr,
            "min_corr": max_corr.min(0),
            "max_corr": max_corr.max(0),
            "mean_baseline": per_draw.mean(0),
            "max_baseline": base.mean(1).max(0),
            "mean_baseline_sd": _sd(per_draw, 0),
        }
        out["excess_corr"] = mean_corr - out["mean_baseline"]
        out["excess_se"] = out["mean_baseline_sd"] / np.sqrt(k)
        ordered = np.sort(excess, axis=0)  # NaN sorts last; a dead neuron is NaN in every draw
        out["excess_q05"] = ordered[q05_rank(k)]
        out["excess_min"] = ordered[0]
        out["excess_max"] = ordered[-1]
    return out
