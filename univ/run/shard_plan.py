"""The sharding plan of a correlate job across ranks (block groups × token shards) and its cost model.

    torchrun --nproc-per-node 4 -m univ correlate A B C --data corpus.txt --tokens 100000000 --out runs/x

The accumulators are split into *units*: one layer of model a against every neuron of model m (a C block,
4·d_a·L_m·d_m bytes). For the baseline a rank also holds the within-layer co-moments W (4·L·d² bytes) of
the models its blocks rotate. Ranks form G block groups × K token shards (rank r: group r // K, token
shard r mod K). Each group owns a contiguous run of units (memory per rank ~ 1/G of the total); within a
group, token shard k streams batches i with i mod K = k, and the shards' co-moments are merged exactly
(Chan) at the end of each pass. Every rank reads the same batches in the same order; it runs only the
forwards of the models its units need.

Cost model (per rank, the busiest one; T tokens, P passes, f_i forward FLOPs per token of model i):

    forward   T/K · Σ_{passes} Σ_{i ∈ models the pass needs} f_i  (repeated on every rank of every group)
    GEMM      T/K · Σ_{units and W of the group} 2 · rows · cols  (each co-moment entry: 2 FLOPs per token)
    comm      K > 1: ⌈log2 K⌉ · (the group's accumulators), at pass ends; always: O(neurons) at the end

GPT-2-small (36,864 neurons, f ≈ 2·124e6): one pair's GEMM is 2·36,864² ≈ 2.7e9 FLOPs per token, ~11
forwards; split over N ranks by blocks alone, each rank still runs its two forwards, so the forward share
grows with N (2 forwards against 11/N forwards of GEMM). Token shards divide the forwards too but every
rank of a group holds the group's accumulators and the merge sends them. ``choose_token_shards`` evaluates
every K dividing the world size with this model and keeps the fastest (within 5 %: the smaller K, which holds
and sends less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from univ.run.plan import PlanError, format_bytes

__all__ = ["PlanError", "Unit", "BlockSpec", "GroupPlan", "ShardPlan", "make_units", "within_bytes",
           "split_contiguous", "make_shard_plan", "shard_plan_for_passes", "divisors", "Cost", "estimate_cost",
           "choose_token_shards", "describe_shard_plan", "RATES", "CLOSE_CALL"]

# Rates of the cost model. Only their ratios matter for the choice of K; they are modelling assumptions for
# ranking the options, not measurements (bench/bench_scaling.py measures what a machine does).
RATES = {
    "cuda": {"gemm_flops": 4e14, "forward_flops": 1.5e14, "comm_bytes": 5e10},  # fp16 cuBLAS, HF forward, NCCL
    "cpu": {"gemm_flops": 5e10, "forward_flops": 2e10, "comm_bytes": 1e9},  # BLAS sgemm, eager forward, gloo/TCP
}


CLOSE_CALL = 0.05  # options within 5 % of the fastest estimate count as ties


@dataclass(frozen=True)
class Unit:
    """The smallest piece of co-moment a rank can own: one layer of model a against every neuron of model m."""

    a: int
    m: int
    layer: int
    nbytes: int  # fp32 accumulator; GEMM FLOPs per token = nbytes / 2

    @property
    def label(self) -> str:
        return f"{self.a}[L{self.layer}]×{self.m}"


@dataclass(frozen=True)
class BlockSpec:
    """Layers [layer_start, layer_end) of model a against all neurons of m: the run's ``Block``."""

    a: int
    m: int
    layer_start: int
    layer_end: int


@dataclass
class GroupPlan:
    """The units one block group owns, spread over the passes, and the models whose W it needs (kept all run).

    Each group accumulates the within-layer co-moments of every model its blocks rotate for the baseline, on the
    first pass: a W is as big as one layer unit, and computing it where it is read costs one more GEMM per
    model instead of sending W (or its rotated variances) between ranks before every finalize.
    """

    units: list[Unit]
    within: list[int] = field(default_factory=list)
    within_bytes: int = 0
    passes: list[list[Unit]] = field(default_factory=list)

    @property
    def models(self) -> list[int]:
        """Models whose forward this group runs."""
        return sorted({u.a for u in self.units} | {u.m for u in self.units} | set(self.within))

    def models_in_pass(self, p: int) -> list[int]:
        """Models to forward in pass p: those of its units, and on pass 0 those whose W this group collects."""
        units = self.passes[p] if p < len(self.passes) else []
        return sorted({u.a for u in units} | {u.m for u in units} | (set(self.within) if p == 0 else set()))

    def blocks(self, p: int) -> list[BlockSpec]:
        """Pass p's C units as blocks of consecutive layers of one pair."""
        out: list[BlockSpec] = []
        for u in self.passes[p] if p < len(self.passes) else []:
            last = out[-1] if out else None
            if last and (last.a, last.m, last.layer_end) == (u.a, u.m, u.layer):
                out[-1] = BlockSpec(u.a, u.m, last.layer_start, u.layer + 1)
            else:
                out.append(BlockSpec(u.a, u.m, u.layer, u.layer + 1))
        return out

    def pass_bytes(self, p: int) -> int:
        return sum(u.nbytes for u in self.passes[p]) if p < len(self.passes) else 0


@dataclass
class ShardPlan:
    """Who owns what: G = world / K block groups, each streaming its units over K token shards."""

    world: int
    token_shards: int
    groups: list[GroupPlan]
    n_passes: int
    budget_bytes: int

    def group_of(self, rank: int) -> int:
        return rank // self.token_shards

    def shard_of(self, rank: int) -> int:
        return rank % self.token_shards

    def group_root(self, g: int) -> int:
        """The rank that merges its group's shards and finalizes the group's blocks (token shard 0)."""
        return g * self.token_shards

    def group_ranks(self, g: int) -> list[int]:
        return list(range(g * self.token_shards, (g + 1) * self.token_shards))

    def owns_batch(self, rank: int, batch_index: int) -> bool:
        """Batch i of the stream goes to token shard i mod K: the same split on every rank, every pass, every resume."""
        return batch_index % self.token_shards == self.shard_of(rank)

    def rank_bytes(self, rank: int) -> int:
        """Accumulator bytes the rank holds at once (the biggest pass, plus W)."""
        gp = self.groups[self.group_of(rank)]
        return gp.within_bytes + max((gp.pass_bytes(p) for p in range(self.n_passes)), default=0)

    def to_dict(self) -> dict:
        return {"world": self.world, "token_shards": self.token_shards, "n_passes": self.n_passes,
                "budget_bytes": self.budget_bytes,
                "groups": [{"units": [u.label for u in gp.units], "within": gp.within,
                            "passes": [[b.__dict__ for b in gp.blocks(p)] for p in range(self.n_passes)]}
                           for gp in self.groups]}


def make_units(pairs: list[tuple[int, int]], n_layers: list[int], d_mlp: list[int]) -> list[Unit]:
    """Units pair by pair, layer by layer: contiguous runs of this list keep a pair together (few forwards)."""
    return [Unit(a, m, layer, 4 * d_mlp[a] * n_layers[m] * d_mlp[m]) for a, m in pairs for layer in range(n_layers[a])]


def within_bytes(n_layers: list[int], d_mlp: list[int], models) -> dict[int, int]:
    """fp32 bytes of every layer's within-layer co-moment W [L, d, d], per rotated model."""
    return {i: 4 * n_layers[i] * d_mlp[i] ** 2 for i in models}


def split_contiguous(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``sizes`` into ``parts`` contiguous ranges [start, end) minimising the largest sum; trailing ranges may
    be empty. Binary search on the capacity with a greedy check: O(n log Σ)."""
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, got {parts}")

    def greedy(cap: int) -> list[tuple[int, int]]:
        out, start, used = [], 0, 0
        for i, s in enumerate(sizes):
            if used + s > cap and i > start:
                out.append((start, i))
                start, used = i, 0
            used += s
        out.append((start, len(sizes)))
        return out

    if not sizes:
        return [(0, 0)] * parts
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    ranges = greedy(lo)
    return ranges + [(len(sizes), len(sizes))] * (parts - len(ranges))


def make_shard_plan(units: list[Unit], *, world: int, token_shards: int, budget_bytes: int,
                    within: dict[int, int] | None = None, reverse: bool = False) -> ShardPlan:
    """Split ``units`` over world / token_shards block groups, then each group's units over passes.

    ``within``: W bytes of each rotated model (empty without a baseline); a group needs W of the m of its units,
    and with ``reverse`` (all-pairs: m's neurons against rotated a) of their a too. Memory per rank is its W plus
    one pass of its units, under ``budget_bytes`` (the smallest budget of any rank, so that every rank computes
    the same plan). Every group runs the same number of passes (ranks meet at each pass end); a group's units
    are cut into exactly that many balanced passes.
    """
    within = within or {}
    if world < 1 or token_shards < 1 or world % token_shards:
        raise PlanError(f"--token-shards {token_shards} must divide the {world} ranks (e.g. "
                        f"{', '.join(str(k) for k in divisors(world))})")
    n_groups = world // token_shards
    groups = []
    for s, e in split_contiguous([u.nbytes for u in units], n_groups):
        mine = units[s:e]
        need = sorted(({u.m for u in mine} | ({u.a for u in mine} if reverse else set())) & set(within))
        groups.append(GroupPlan(mine, need, sum(within[i] for i in need)))
    n_passes = 1
    for g, gp in enumerate(groups):
        room = budget_bytes - gp.within_bytes
        too_big = [u for u in gp.units if u.nbytes > room]
        if too_big:
            u = too_big[0]
            raise PlanError(
                f"even the smallest block does not fit on rank {g * token_shards}: one layer of model {u.a} "
                f"against all neurons of model {u.m} needs {format_bytes(u.nbytes)}, with "
                f"{format_bytes(gp.within_bytes)} of within-layer co-moments beside it, against a "
                f"{format_bytes(max(budget_bytes, 0))} budget per rank. Use more ranks with fewer --token-shards, "
                "devices with more memory, or raise --memory-budget if the estimate is too cautious."
            )
        if gp.units:
            n_passes = max(n_passes, _passes_needed([u.nbytes for u in gp.units], room))
    for gp in groups:
        gp.passes = [gp.units[s:e] for s, e in split_contiguous([u.nbytes for u in gp.units], n_passes)]
    return ShardPlan(world, token_shards, groups, n_passes, budget_bytes)


def shard_plan_for_passes(passes: list[list[Unit]], *, world: int, token_shards: int, budget_bytes: int,
                          within: dict[int, int] | None = None, reverse: bool = False) -> ShardPlan:
    """The given passes (a checkpoint's: which units are accumulated in which pass) split over this world's
    block groups, each pass's units contiguously; used to resume a checkpoint at another world size."""
    within = within or {}
    if world < 1 or token_shards < 1 or world % token_shards:
        raise PlanError(f"--token-shards {token_shards} must divide the {world} ranks (e.g. "
                        f"{', '.join(str(k) for k in divisors(world))})")
    n_groups = world // token_shards
    groups = [GroupPlan([]) for _ in range(n_groups)]
    for units in passes:
        for gp, (s, e) in zip(groups, split_contiguous([u.nbytes for u in units], n_groups), strict=True):
            gp.passes.append(units[s:e])
            gp.units += units[s:e]
    for g, gp in enumerate(groups):
        gp.within = sorted(({u.m for u in gp.units} | ({u.a for u in gp.units} if reverse else set())) & set(within))
        gp.within_bytes = sum(within[i] for i in gp.within)
        for p in range(len(passes)):
            need = gp.within_bytes + gp.pass_bytes(p)
            if need > budget_bytes:
                raise PlanError(
                    f"resuming on {world} rank{'s' if world > 1 else ''}: pass {p + 1} of the checkpoint needs "
                    f"{format_bytes(need)} on rank {g * token_shards}, more than its "
                    f"{format_bytes(max(budget_bytes, 0))} budget. Resume on more ranks (or fewer --token-shards), "
                    "or raise --memory-budget")
    return ShardPlan(world, token_shards, groups, len(passes), budget_bytes)


def _passes_needed(sizes: list[int], cap: int) -> int:
    passes, used = 1, 0
    for s in sizes:
        if used + s > cap:
            passes, used = passes + 1, 0
        used += s
    return passes


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# ----------------------------------------------------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True)
class Cost:
    """Work of the busiest rank for one choice of token shards K (FLOPs and bytes over the whole run)."""

    token_shards: int
    n_passes: int
    forward_flops: float
    gemm_flops: float
    comm_bytes: float
    memory_bytes: int
    seconds: float  # with the RATES of the device type: for ranking the choices

    def line(self) -> str:
        return (f"K={self.token_shards}: {self.n_passes} pass{'es' if self.n_passes > 1 else ''}, forward "
                f"{self.forward_flops:.2e} + GEMM {self.gemm_flops:.2e} FLOP/rank, end traffic "
                f"{format_bytes(self.comm_bytes)}, accumulators {format_bytes(self.memory_bytes)}/rank, "
                f"model {self.seconds:.3g} s")


def estimate_cost(plan: ShardPlan, *, tokens: int, forward_flops_per_token: list[float], n_neurons: list[int],
                  device_type: str = "cpu") -> Cost:
    """The cost model of the module docstring, for ``plan``, over ``tokens`` tokens."""
    rates = RATES.get(device_type, RATES["cpu"])
    k = plan.token_shards
    share = tokens / k
    worst = (0.0, 0.0, 0.0)
    for gp in plan.groups:
        fwd = share * sum(forward_flops_per_token[i] for p in range(plan.n_passes) for i in gp.models_in_pass(p))
        gemm = share * (sum(u.nbytes for u in gp.units) + gp.within_bytes) / 2
        t = fwd / rates["forward_flops"] + gemm / rates["gemm_flops"]
        if t > worst[0]:
            worst = (t, fwd, gemm)
    merge = 0.0
    if k > 1:  # the busiest rank of a group receives its group's accumulators ⌈log2 K⌉ times
        merge = math.ceil(math.log2(k)) * max(
            sum(gp.pass_bytes(p) for p in range(plan.n_passes)) + gp.within_bytes for gp in plan.groups)
    final = 2 * 16 * sum(n_neurons)  # max/argmax/min/baseline per neuron: two all_reduces each, O(neurons)
    comm = merge + final
    seconds = worst[0] + comm / rates["comm_bytes"]
    memory = max(plan.rank_bytes(r) for r in range(plan.world))
    return Cost(k, plan.n_passes, worst[1], worst[2], comm, memory, seconds)


def choose_token_shards(units: list[Unit], *, world: int, budget_bytes: int, tokens: int,
                        forward_flops_per_token: list[float], n_neurons: list[int], device_type: str = "cpu",
                        within: dict[int, int] | None = None, reverse: bool = False) -> tuple[int, list[Cost]]:
    """The K (dividing ``world``) the cost model finds fastest; within CLOSE_CALL of the fastest, the smallest such K
    (less memory and traffic: the model's rates are rough). Also every option's cost, for the plan printed before
    streaming. Options whose units do not fit are skipped."""
    costs: list[Cost] = []
    for k in divisors(world):
        try:
            plan = make_shard_plan(units, world=world, token_shards=k, budget_bytes=budget_bytes, within=within,
                                   reverse=reverse)
        except PlanError:
            continue
        costs.append(estimate_cost(plan, tokens=tokens, forward_flops_per_token=forward_flops_per_token,
                                   n_neurons=n_neurons, device_type=device_type))
    if not costs:  # nothing fits: let the plan with K = 1 raise its message
        make_shard_plan(units, world=world, token_shards=1, budget_bytes=budget_bytes, within=within, reverse=reverse)
    fastest = min(c.seconds for c in costs)
    best = min((c for c in costs if c.seconds <= (1 + CLOSE_CALL) * fastest), key=lambda c: c.token_shards)
    return best.token_shards, costs


def describe_shard_plan(plan: ShardPlan, costs: list[Cost] | None = None, labels: list[str] | None = None) -> str:
    """The per-rank memory plan printed before streaming (by rank 0; every rank computes the same)."""
    k, g = plan.token_shards, len(plan.groups)
    lines = [f"distributed plan: {plan.world} ranks = {g} block group{'s' if g > 1 else ''} × {k} token "
             f"shard{'s' if k > 1 else ''} (batch i → shard i mod {k}), {plan.n_passes} "
             f"pass{'es' if plan.n_passes > 1 else ''}, budget {format_bytes(plan.budget_bytes)} per rank"]
    for r in range(plan.world):
        gp = plan.groups[plan.group_of(r)]
        passes = "; ".join(", ".join(f"{b.a}[L{b.layer_start}-{b.layer_end - 1}]×{b.m}" for b in gp.blocks(p))
                           or "-" for p in range(plan.n_passes))
        within = f" + W of model{'s' if len(gp.within) > 1 else ''} {','.join(map(str, gp.within))}" \
            if gp.within else ""
        models = ",".join(map(str, gp.models)) or "none"
        lines.append(f"  rank {r} (group {plan.group_of(r)}, shard {plan.shard_of(r)}): forwards models {models}; "
                     f"accumulators {format_bytes(plan.rank_bytes(r))}: {passes}{within}")
    if costs:
        lines.append("  cost model (busiest rank, whole run):")
        lines += [f"    {'*' if c.token_shards == k else ' '} {c.line()}" for c in costs]
    return "\n".join(lines)
