"""The collectives of a run across ranks, in one place: merging token shards (Chan) and reducing per-neuron
results. Only O(neurons) numbers cross ranks at the end; co-moments cross only within a block group, at pass
ends, when tokens are sharded.
"""

from __future__ import annotations

import torch

MERGE_CHUNK_BYTES = 64 << 20  # token-shard merges go a slice of rows at a time: bounded extra memory

# -- merging the token shards of a group (Chan), a slice of rows at a time ---------------------------------------


def _merge_block(c: torch.Tensor, mom_a, rows: slice, mom_b, cols: slice, group) -> None:
    """C [rows, cols] of this rank's shard ← the whole group's, on the group root (others keep theirs).

    Built on StreamingCorrelation's public state (``n``, ``c`` and each side's per-column tensors), sliced from
    the run's ColumnMoments: how the kernels centre is their business. Rows are independent in Chan's
    formula, so the merge goes MERGE_CHUNK_BYTES of C at a time.
    """
    import torch.distributed as dist

    from univ_kernels import StreamingCorrelation
    from univ_kernels.distributed import merge_across

    side_a, side_b = mom_a.state_dict("a"), mom_b.state_dict("b")
    b_state = {k: v[cols] for k, v in side_b.items()}
    n_cols = c.shape[1]
    step = max(1, MERGE_CHUNK_BYTES // (4 * n_cols))
    for r0 in range(0, c.shape[0], step):
        r1 = min(r0 + step, c.shape[0])
        corr = StreamingCorrelation(r1 - r0, n_cols, device=c.device, operand_dtype=torch.float32)
        a_rows = slice(rows.start + r0, rows.start + r1)
        corr.load_state_dict({"n": torch.tensor(mom_a.n, dtype=torch.int64), "c": c[r0:r1],
                              **{k: v[a_rows] for k, v in side_a.items()}, **b_state})
        merge_across(corr, group, dst=0)
        if dist.get_rank(group) == 0:
            c[r0:r1].copy_(corr.state_dict()["c"])


def merge_token_shards(state, models_used: set[int], group, *, within: bool) -> None:
    """End of a pass: the group root ends with the group's whole stream in its blocks, W (pass 0) and moments."""
    from univ_kernels.distributed import merge_across

    plan = state.plan
    for b in sorted(state.blocks, key=lambda b: b.key):  # the same order on every rank of the group
        d_a = plan.d_mlp[b.a]
        _merge_block(state.blocks[b], state.moments[b.a], slice(b.layer_start * d_a, b.layer_end * d_a),
                     state.moments[b.m], slice(None), group)
    if within:
        for i in sorted(state.within):
            d = plan.d_mlp[i]
            for layer in range(plan.n_layers[i]):
                sl = slice(layer * d, (layer + 1) * d)
                _merge_block(state.within[i][layer], state.moments[i], sl, state.moments[i], sl, group)
    for i in sorted(models_used):  # last: the blocks' merges read each shard's own moments
        merge_across(state.moments[i], group, dst=0)


def reduce_results(state) -> None:
    """Per-neuron results and histograms of all ranks → every rank: max with index (ties to the smaller index,
    as in one process), baseline max, histograms summed. O(neurons) numbers on the wire; r is never gathered."""
    import torch.distributed as dist

    from univ_kernels.distributed import all_sum, comm_device, reduce_extreme

    for key in sorted(state.results):
        res = state.results[key]
        reduce_extreme(res["max"], res["arg"], largest=True)
        base = torch.nan_to_num(res["base"].float(), nan=float("-inf")).to(comm_device())
        dist.all_reduce(base, op=dist.ReduceOp.MAX)
        res["base"] = base.cpu()
    for key in sorted(state.hist):
        all_sum(state.hist[key])
    for key in sorted(state.cka):  # each layer pair is computed by the rank that holds its block; NaN elsewhere
        k = torch.nan_to_num(state.cka[key].double(), nan=float("-inf")).to(comm_device())
        dist.all_reduce(k, op=dist.ReduceOp.MAX)
        state.cka[key] = torch.where(torch.isinf(k), float("nan"), k).cpu().to(state.cka[key].dtype)


def gather_activation_stats(state) -> None:
    """Every rank's activation statistics (disjoint token shards of each model) merged, in rank order, on every
    rank: O(neurons) float64 sums per model, exact up to their rounding (``ActivationStats.merge``)."""
    import torch.distributed as dist

    from univ.stats import ActivationStats

    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, {i: st for i, st in state.act_stats.items()})
    merged: dict[int, ActivationStats] = {}
    for stats in got:
        for i, st in sorted(stats.items()):
            merged.setdefault(i, ActivationStats(st.n_layers, st.d_mlp)).merge(st)
    state.act_stats = {i: merged[i] for i in sorted(merged)}
