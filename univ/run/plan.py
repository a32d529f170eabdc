"""The memory plan: which blocks of co-moments are accumulated in which pass, as plain data.

A *block* is a range of whole layers of model a (rows) against every neuron of model m (columns). When all
blocks do not fit the memory budget at once they are spread over successive passes over the same token
stream; one layer of a against all of m is the smallest block. ``Plan.to_dict``/``Plan.from_dict`` round-trip
the plan through JSON (checkpoints and run.json), so a resumed (or distributed) run works on the very blocks
the first one chose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from univ.baseline import CHUNK_BYTES
from univ.errors import UserError
from univ.run.config import CorrelateConfig


class PlanError(UserError, MemoryError):
    """The accumulators cannot be split to fit the memory budget (one process or per rank), or the world cannot
    be split as asked (exit 2)."""


@dataclass(frozen=True)
class Block:
    """Layers [layer_start, layer_end) of model a (rows) against all neurons of model m (columns)."""

    a: int
    m: int
    layer_start: int
    layer_end: int

    @property
    def key(self) -> str:
        """The block's tensor name in checkpoints and state files."""
        return f"block.{self.a}.{self.m}.{self.layer_start}.{self.layer_end}"


@dataclass
class Plan:
    passes: list[list[Block]]
    d_mlp: list[int]
    n_layers: list[int]
    budget_bytes: int
    fixed_bytes: int
    lines: list[str] = field(default_factory=list)

    def block_bytes(self, b: Block) -> int:
        return 4 * (b.layer_end - b.layer_start) * self.d_mlp[b.a] * self.n_layers[b.m] * self.d_mlp[b.m]

    def block_shape(self, b: Block) -> tuple[int, int]:
        """[rows, cols] of a block's fp32 co-moment."""
        return (b.layer_end - b.layer_start) * self.d_mlp[b.a], self.n_layers[b.m] * self.d_mlp[b.m]

    def to_dict(self) -> dict:
        return {"passes": [[asdict(b) for b in p] for p in self.passes], "budget_bytes": self.budget_bytes}

    @classmethod
    def from_dict(cls, d: dict, d_mlp: list[int], n_layers: list[int], fixed_bytes: int) -> Plan:
        return cls([[Block(**b) for b in p] for p in d["passes"]], d_mlp, n_layers, d["budget_bytes"], fixed_bytes)


def pairs_for(mode: str, n_models: int) -> list[tuple[int, int]]:
    """Reference: (0, m) for each other model. All-pairs: each unordered pair once (C_maᵀ = C_am)."""
    if mode == "reference":
        return [(0, m) for m in range(1, n_models)]
    return [(a, m) for a in range(n_models) for m in range(a + 1, n_models)]


def analysed_models(mode: str, n_models: int) -> list[int]:
    """Models whose neurons get a row in neurons.parquet: the reference, or every model in all-pairs."""
    pairs = pairs_for(mode, n_models)
    return sorted({a for a, _ in pairs} | ({m for _, m in pairs} if mode == "all-pairs" else set()))


def rotated_models(mode: str, n_models: int) -> list[int]:
    """Models whose neurons the baseline rotates (they need within-layer co-moments W)."""
    pairs = pairs_for(mode, n_models)
    return sorted({m for _, m in pairs} | ({a for a, _ in pairs} if mode == "all-pairs" else set()))


def within_models(cfg: CorrelateConfig, n_models: int) -> list[int]:
    """Models whose within-layer co-moments W the run keeps: the rotated ones (baseline) and, for the layer
    similarity (CKA needs ‖W‖ of both sides), every model of a pair."""
    keep = set(rotated_models(cfg.mode, n_models)) if cfg.baseline != "none" else set()
    if cfg.layer_similarity:
        keep |= {i for pair in pairs_for(cfg.mode, n_models) for i in pair}
    return sorted(keep)


def available_memory(device: torch.device) -> int:
    """Bytes free for accumulators on ``device`` (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def accumulator_budget(cfg: CorrelateConfig, device: torch.device, fixed: int) -> int:
    """Bytes for accumulators: ``--memory-budget`` as given, else 90 % of the device's free memory less what the
    caller holds beside them (``fixed``: W, one batch, workspaces)."""
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * 1e9)
    return int(0.9 * available_memory(device)) - fixed


def format_bytes(n: float) -> str:
    """1.23 GB, 45.6 MB, 32.8 kB: plans span toy models to 38.7 GB accumulators."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def make_plan(cfg: CorrelateConfig, n_layers: list[int], d_mlp: list[int], device: torch.device,
              batch_bytes: int) -> Plan:
    """Pack blocks into passes under the memory budget; raise if even a one-layer block cannot fit."""
    pairs = pairs_for(cfg.mode, len(n_layers))
    within = sum(4 * n_layers[i] * d_mlp[i] ** 2 for i in within_models(cfg, len(n_layers)))
    # Finalize temporaries: the baseline's rotated-correlation chunk (the draws' GEMM, univ.baseline).
    fixed = within + batch_bytes + (CHUNK_BYTES if cfg.baseline != "none" else 0)
    budget = accumulator_budget(cfg, device, fixed)
    plan = Plan([], d_mlp, n_layers, budget, fixed)
    current: list[Block] = []
    used = 0
    for a, m in pairs:
        start = 0
        per_layer = 4 * d_mlp[a] * n_layers[m] * d_mlp[m]
        if per_layer > budget:
            raise PlanError(
                f"even the smallest block (one layer of model {a}, {d_mlp[a]} neurons, against all "
                f"{n_layers[m] * d_mlp[m]} neurons of model {m}) needs {format_bytes(per_layer)}, more than the "
                f"{format_bytes(max(budget, 0))} budget on {device}. Use a device with more memory, free memory, "
                "or raise --memory-budget if the estimate is too cautious."
            )
        while start < n_layers[a]:
            fit = min(n_layers[a] - start, (budget - used) // per_layer)
            if fit == 0:
                plan.passes.append(current)
                current, used = [], 0
                continue
            current.append(Block(a, m, start, start + fit))
            used += fit * per_layer
            start += fit
    if current:
        plan.passes.append(current)
    return plan


def describe_plan(plan: Plan, cfg: CorrelateConfig, models, device: torch.device) -> str:
    gb = lambda b: f"{format_bytes(b):>10s}"  # noqa: E731
    lines = [f"memory plan on {device} ({len(plan.passes)} pass{'es' if len(plan.passes) > 1 else ''}):"]
    for i, lm in enumerate(models):
        params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        lines.append(f"  model {i} {lm.name}: {lm.n_layers}×{lm.d_mlp} neurons, weights {gb(params)}")
    lines.append(f"  batch activations + operands      {gb(plan.fixed_bytes)}  (incl. within-layer co-moments)")
    for p, blocks in enumerate(plan.passes):
        total = sum(plan.block_bytes(b) for b in blocks)
        desc = ", ".join(f"{b.a}[L{b.layer_start}-{b.layer_end - 1}]×{b.m}" for b in blocks)
        lines.append(f"  pass {p + 1}: accumulators {gb(total)}  blocks {desc}")
    lines.append(f"  accumulator budget                {gb(plan.budget_bytes)}")
    if len(plan.passes) > 1:
        lines.append(f"  the accumulators do not fit at once: the {cfg.tokens:,} tokens are read "
                     f"{len(plan.passes)} times")
    return "\n".join(lines)
