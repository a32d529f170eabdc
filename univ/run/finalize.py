"""Finalize a pass: reduce its co-moment blocks into per-neuron results (max, argmax, baseline) and histograms.

Every block is read once: its rows (a's neurons against m) and, in all-pairs mode, its columns (m's neurons
against these layers of a). The rotation baseline (K draws, one batched GEMM per layer) needs the within-layer
co-moments W of the rotated model; the layer similarity (linear CKA) needs W of both models of the block.
"""

from __future__ import annotations

import torch

from univ.baseline import RotationBank, rotated_max
from univ.cka import layer_cka, within_fro
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
        block_cka(state, b, c, u_a)
        if cfg.mode == "all-pairs":  # the same block read by columns: m's neurons against these layers of a
            combine_max(state.results[(b.m, b.a)], "max", "arg", s.max_b.cpu(), s.argmax_b.cpu() + rows.start)
        if cfg.baseline == "none":
            continue
        res["base"][:, rows] = forward_baseline(state, b, c, u_a, inv_a, cfg).cpu()
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


def rotation_bank(state: RunState, cfg: CorrelateConfig) -> RotationBank:
    """The run's rotations: drawn once, reused by every block of every pass (and by both directions)."""
    if state.rotations is None:
        state.rotations = RotationBank(cfg.baseline, cfg.baseline_seed, cfg.baseline_draws)
    return state.rotations


def rotated_by_layer(state: RunState, b: Block, c, u_a, inv_a, cfg: CorrelateConfig):
    """Per layer of model m: (layer, [K, rows]) each row's max r over that layer's rotated neurons, per draw."""
    m, d_m = b.m, state.plan.d_mlp[b.m]
    u_m = state.moments[m].offset()
    bank = rotation_bank(state, cfg)
    for layer in range(state.plan.n_layers[m]):
        cols = slice(layer * d_m, (layer + 1) * d_m)
        q_cat, inv_rot = bank.get(m, layer, centred_within(state, m, layer))
        # centred [rows, d_m] a chunk at a time inside rotated_max
        yield layer, rotated_max(c[:, cols], inv_a, q_cat, inv_rot, cfg.baseline_draws, u_rows=u_a,
                                 u_cols=u_m[cols])


def rotated_by_layer_reverse(state: RunState, b: Block, c, u_a, cfg: CorrelateConfig):
    """All-pairs, per layer of a in the block: (layer, [K, n_m]) each neuron of m's max r over that layer's
    rotated neurons, per draw."""
    a, d_a = b.a, state.plan.d_mlp[b.a]
    mm = state.moments[b.m]
    u_m, inv_m = mm.offset(), mm.inv_sd()
    bank = rotation_bank(state, cfg)
    for k, layer in enumerate(range(b.layer_start, b.layer_end)):
        rows = slice(k * d_a, (k + 1) * d_a)
        q_cat, inv_rot = bank.get(a, layer, centred_within(state, a, layer))
        # centred [n_m, d_a] a chunk at a time inside rotated_max
        yield layer, rotated_max(c[rows].t(), inv_m, q_cat, inv_rot, cfg.baseline_draws, u_rows=u_m,
                                 u_cols=u_a[rows])


def forward_baseline(state: RunState, b: Block, c, u_a, inv_a, cfg: CorrelateConfig) -> torch.Tensor:
    """[K, rows]: per draw, max over every rotated neuron of model m (layer by layer) for each row of the block."""
    best = torch.full((cfg.baseline_draws, c.shape[0]), float("-inf"), device=c.device)
    for _, r in rotated_by_layer(state, b, c, u_a, inv_a, cfg):
        best = torch.maximum(best, r.nan_to_num(nan=float("-inf")))
    return torch.where(torch.isinf(best), float("nan"), best)


def reverse_baseline(state: RunState, b: Block, c, u_a, cfg: CorrelateConfig) -> torch.Tensor:
    """All-pairs, [K, n_m]: per draw, for each neuron of m, max over rotated neurons of the block's layers of a."""
    best = torch.full((cfg.baseline_draws, c.shape[1]), float("-inf"), device=c.device)
    for _, r in rotated_by_layer_reverse(state, b, c, u_a, cfg):
        best = torch.maximum(best, r.nan_to_num(nan=float("-inf")))
    return best


def block_cka(state: RunState, b: Block, c, u_a) -> None:
    """Linear CKA of the block's layers of a against every layer of m, from C and both models' W (univ.cka)."""
    if (b.a, b.m) not in state.cka or b.a not in state.within or b.m not in state.within:
        return
    d_a, d_m = state.plan.d_mlp[b.a], state.plan.d_mlp[b.m]
    fro_a = within_fro(state.within[b.a][b.layer_start:b.layer_end],
                       state.moments[b.a].offset()[b.layer_start * d_a: b.layer_end * d_a])
    fro_m = within_fro(state.within[b.m], state.moments[b.m].offset())
    state.cka[(b.a, b.m)][b.layer_start:b.layer_end] = layer_cka(c, u_a, state.moments[b.m].offset(), fro_a, fro_m,
                                                                 d_a, d_m)
