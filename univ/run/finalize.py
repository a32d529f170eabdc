"""Finalize a pass: reduce its co-moment blocks into per-neuron results (max, argmax, baseline) and histograms.

Every block is read once: its rows (a's neurons against m) and, in all-pairs mode, its columns (m's neurons
against these layers of a). The rotation baseline needs the within-layer co-moments W of the rotated model.
"""

from __future__ import annotations

import torch

from univ.baseline import rotated_inv_sd, rotation
from univ.run.config import CorrelateConfig
from univ.run.plan import Block
from univ.run.state import RunState
from univ_kernels import correlation_summary
from univ_kernels.comoment import symmetrize_upper


def finalize_pass(state: RunState, cfg: CorrelateConfig) -> None:
    """Reduce this pass's blocks into the per-neuron results (max, argmax, baseline) and the histograms."""
    plan = state.plan
    for b, c in state.blocks.items():
        ma, mm = state.moments[b.a], state.moments[b.m]
        d_a = plan.d_mlp[b.a]
        rows = slice(b.layer_start * d_a, b.layer_end * d_a)
        u_a, inv_a = ma.offset()[rows], ma.inv_sd()[rows]
        u_m, inv_m = mm.offset(), mm.inv_sd()
        wanted = {"argmax_a", "hist"} | ({"argmax_b"} if cfg.mode == "all-pairs" else set())
        s = correlation_summary(c, u_a, u_m, inv_a, inv_m, bins=cfg.bins, backend=cfg.backend, outputs=wanted)
        res = state.results[(b.a, b.m)]
        res["max"][rows] = s.max_a.cpu()
        res["arg"][rows] = s.argmax_a.cpu()
        state.hist[(b.a, b.m)] += s.hist.cpu()
        if cfg.mode == "all-pairs":  # the same block read by columns: m's neurons against these layers of a
            combine_max(state.results[(b.m, b.a)], "max", "arg", s.max_b.cpu(), s.argmax_b.cpu() + rows.start)
        if cfg.baseline == "none":
            continue
        res["base"][rows] = forward_baseline(state, b, c, u_a, inv_a, cfg).cpu()
        if cfg.mode == "all-pairs":
            combine_max(state.results[(b.m, b.a)], "base", None, reverse_baseline(state, b, c, u_a, cfg).cpu())


def combine_max(res: dict, key: str, arg_key: str | None, values: torch.Tensor, args: torch.Tensor | None = None):
    """Running max across blocks; strict > keeps the earlier (smaller-index) block on ties."""
    v = torch.nan_to_num(values, nan=float("-inf"))
    better = v > res[key]
    res[key] = torch.where(better, v, res[key])
    if arg_key is not None:
        res[arg_key] = torch.where(better, args, res[arg_key])


def centred_within(state: RunState, i: int, layer: int) -> torch.Tensor:
    """Σ(y_l − ȳ_l)ᵀ(y_l − ȳ_l) for model i, layer l, from the raw (shifted) W.

    W was accumulated on the first pass; every pass reads the same tokens with the same shift, so the
    current pass's column sums are the ones W needs.
    """
    d = state.plan.d_mlp[i]
    u = state.moments[i].offset()[layer * d: (layer + 1) * d]
    return symmetrize_upper(state.within[i][layer]) - u[:, None] * u[None, :]  # W holds its upper triangle


def forward_baseline(state: RunState, b: Block, c, u_a, inv_a, cfg: CorrelateConfig) -> torch.Tensor:
    """Max over every rotated neuron of model m (layer by layer) for each row of the block."""
    m, d_m = b.m, state.plan.d_mlp[b.m]
    u_m = state.moments[m].offset()
    best = torch.full((c.shape[0],), float("-inf"), device=c.device)
    for layer in range(state.plan.n_layers[m]):
        cols = slice(layer * d_m, (layer + 1) * d_m)
        q = rotation(d_m, kind=cfg.baseline, seed=cfg.baseline_seed, model_index=m, layer=layer).to(c.device)
        cc = c[:, cols] - u_a[:, None] * u_m[cols][None, :]  # centred [rows, d_m]
        inv_rot = rotated_inv_sd(centred_within(state, m, layer), q)
        s = correlation_summary(cc @ q, torch.zeros_like(u_a), torch.zeros(d_m, device=c.device), inv_a, inv_rot,
                                bins=1, backend=cfg.backend, outputs={"max_a"})
        best = torch.maximum(best, torch.nan_to_num(s.max_a, nan=float("-inf")))
    return torch.where(torch.isinf(best), float("nan"), best)


def reverse_baseline(state: RunState, b: Block, c, u_a, cfg: CorrelateConfig) -> torch.Tensor:
    """All-pairs: for each neuron of m, max over rotated neurons of the block's layers of a."""
    a, d_a = b.a, state.plan.d_mlp[b.a]
    mm = state.moments[b.m]
    u_m, inv_m = mm.offset(), mm.inv_sd()
    best = torch.full((c.shape[1],), float("-inf"), device=c.device)
    for k, layer in enumerate(range(b.layer_start, b.layer_end)):
        rows = slice(k * d_a, (k + 1) * d_a)
        q = rotation(d_a, kind=cfg.baseline, seed=cfg.baseline_seed, model_index=a, layer=layer).to(c.device)
        cc = c[rows] - u_a[rows][:, None] * u_m[None, :]  # centred [d_a, n_m]
        inv_rot = rotated_inv_sd(centred_within(state, a, layer), q)
        s = correlation_summary(q.t() @ cc, torch.zeros(d_a, device=c.device), torch.zeros_like(u_m), inv_rot, inv_m,
                                bins=1, backend=cfg.backend, outputs={"max_b"})
        best = torch.maximum(best, torch.nan_to_num(s.max_b, nan=float("-inf")))
    return best
