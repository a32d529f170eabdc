"""The sharding plan and its cost model (pure functions: no process group needed)."""

import itertools
import random

import pytest

from univ.run.shard_plan import (
    PlanError,
    choose_token_shards,
    describe_shard_plan,
    estimate_cost,
    make_shard_plan,
    make_units,
    split_contiguous,
    within_bytes,
)


def brute_force_best(sizes, parts):
    best = None
    for cuts in itertools.combinations_with_replacement(range(len(sizes) + 1), parts - 1):
        bounds = [0, *cuts, len(sizes)]
        worst = max(sum(sizes[bounds[i]:bounds[i + 1]]) for i in range(parts))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("trial", range(20))
def test_split_contiguous_is_optimal_and_covers_everything(trial):
    rng = random.Random(trial)
    sizes = [rng.randint(1, 50) for _ in range(rng.randint(0, 7))]
    parts = rng.randint(1, 5)
    ranges = split_contiguous(sizes, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    if sizes:
        assert max(sum(sizes[s:e]) for s, e in ranges) == brute_force_best(sizes, parts)


def gpt2_like(n_models=5, layers=3, d=7, mode="reference"):
    pairs = [(0, m) for m in range(1, n_models)] if mode == "reference" else \
        [(a, m) for a in range(n_models) for m in range(a + 1, n_models)]
    rotated = {m for _, m in pairs} | ({a for a, _ in pairs} if mode == "all-pairs" else set())
    return make_units(pairs, [layers] * n_models, [d] * n_models), pairs, \
        within_bytes([layers] * n_models, [d] * n_models, rotated)


@pytest.mark.parametrize("world, k", [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (4, 4), (7, 1)])
@pytest.mark.parametrize("mode", ["reference", "all-pairs"])
def test_every_unit_is_owned_once_and_fits(world, k, mode):
    units, pairs, within = gpt2_like(mode=mode)
    total = sum(u.nbytes for u in units)
    budget = total + sum(within.values())  # roomy: one pass
    plan = make_shard_plan(units, world=world, token_shards=k, budget_bytes=budget, within=within,
                           reverse=mode == "all-pairs")
    owned = [u for gp in plan.groups for u in gp.units]
    assert owned == units  # contiguous, in order, each once
    assert [u for gp in plan.groups for p in gp.passes for u in p] == units
    for gp in plan.groups:  # W of every model the group's blocks rotate, and nothing else
        need = {u.m for u in gp.units} | ({u.a for u in gp.units} if mode == "all-pairs" else set())
        assert set(gp.within) == need
    blocks = {(b.a, b.m, layer) for gp in plan.groups for p in range(plan.n_passes) for b in gp.blocks(p)
              for layer in range(b.layer_start, b.layer_end)}
    assert blocks == {(a, m, layer) for a, m in pairs for layer in range(3)}
    assert all(plan.rank_bytes(r) <= budget for r in range(world))
    # memory ~ 1/G: no group holds more than its share plus one unit
    g = world // k
    assert max(plan.rank_bytes(r) - plan.groups[plan.group_of(r)].within_bytes for r in range(world)) \
        <= total / g + units[0].nbytes
    # each batch index goes to exactly one token shard of each group
    for i in range(12):
        for grp in range(g):
            assert sum(plan.owns_batch(r, i) for r in plan.group_ranks(grp)) == 1


def test_tight_budget_spreads_over_equal_passes_on_every_rank():
    units, _, within = gpt2_like()
    one, w = units[0].nbytes, max(within.values())
    plan = make_shard_plan(units, world=2, token_shards=1, budget_bytes=2 * w + 2 * one, within=within)
    assert plan.n_passes > 1
    assert all(len(gp.passes) == plan.n_passes for gp in plan.groups)
    assert all(plan.rank_bytes(r) <= plan.budget_bytes for r in range(2))


def test_a_unit_that_cannot_fit_names_the_rank():
    units, _, within = gpt2_like()
    with pytest.raises(PlanError, match=r"rank \d+: one layer of model 0"):
        make_shard_plan(units, world=2, token_shards=1, budget_bytes=2 * max(within.values()) + 10, within=within)


def test_token_shards_must_divide_the_world():
    units, _, _ = gpt2_like()
    with pytest.raises(PlanError, match="must divide the 4 ranks"):
        make_shard_plan(units, world=4, token_shards=3, budget_bytes=10**9)


def costs_for(units, world, budget, within=None, device="cuda"):
    return choose_token_shards(units, world=world, budget_bytes=budget, tokens=10**8,
                               forward_flops_per_token=[2 * 124e6] * 5, n_neurons=[12 * 3072] * 5,
                               device_type=device, within=within)


def test_cost_model_gpt2_small_counts():
    """5 GPT-2-small seeds, reference mode: the FLOPs the docstring's formulas give, exactly."""
    units = make_units([(0, m) for m in range(1, 5)], [12] * 5, [3072] * 5)
    plan = make_shard_plan(units, world=1, token_shards=1, budget_bytes=10**12,
                           within=within_bytes([12] * 5, [3072] * 5, {1, 2, 3, 4}))
    c = estimate_cost(plan, tokens=10**8, forward_flops_per_token=[2 * 124e6] * 5, n_neurons=[36864] * 5)
    assert c.gemm_flops == pytest.approx(10**8 * (4 * 2 * 36864**2 + 4 * 2 * 12 * 3072**2))
    assert c.forward_flops == pytest.approx(10**8 * 5 * 2 * 124e6)
    assert c.memory_bytes == 4 * 4 * 36864**2 + 4 * 4 * 12 * 3072**2


def test_token_shards_chosen_when_ranks_outnumber_blocks_or_memory_allows():
    units = make_units([(0, 1)], [1, 1], [3072, 3072])  # one unit only
    k, _ = costs_for(units, 4, 10**12)
    assert k == 4  # block groups beyond the one unit would idle
    units = make_units([(0, m) for m in range(1, 5)], [12] * 5, [3072] * 5)
    within = within_bytes([12] * 5, [3072] * 5, {1, 2, 3, 4})
    total = sum(u.nbytes for u in units) + sum(within.values())
    k_roomy, _ = costs_for(units, 8, 2 * total, within)
    k_tight, costs = costs_for(units, 8, total // 6, within)  # full accumulators need passes: blocks spread instead
    assert k_roomy >= 4 and k_tight < k_roomy  # forwards divided while the accumulators fit in one pass
    passes = {c.token_shards: c.n_passes for c in costs}
    assert passes[8] > passes[k_tight]  # the full accumulators on every rank would mean many passes


def test_close_calls_go_to_the_smaller_k():
    units = make_units([(0, m) for m in range(1, 5)], [12] * 5, [3072] * 5)
    k, costs = costs_for(units, 8, 10**12, within_bytes([12] * 5, [3072] * 5, {1, 2, 3, 4}))
    fastest = min(c.seconds for c in costs)
    chosen = next(c for c in costs if c.token_shards == k)
    assert chosen.seconds <= 1.05 * fastest
    assert all(c.seconds > 1.05 * fastest for c in costs if c.token_shards < k)


def test_describe_lists_every_rank_and_the_costs():
    units, _, within = gpt2_like()
    k, costs = choose_token_shards(units, world=3, budget_bytes=10**9, tokens=1000,
                                   forward_flops_per_token=[1e6] * 5, n_neurons=[21] * 5, within=within)
    text = describe_shard_plan(make_shard_plan(units, world=3, token_shards=k, budget_bytes=10**9, within=within),
                               costs)
    assert all(f"rank {r} " in text for r in range(3)) and f"* K={k}" in text
