"""Memory a run plans for, and what it measures, in the same units: the process's (or the GPU's) peak bytes.

The plan counts what the run allocates on top of what the process already holds once its models are loaded
(the runtime's fixed cost, measured then: interpreter, libraries, weights):

    planned peak = max(peak so far, held after loading + accumulators of the largest pass + W + moments
                       + one batch (activations, operands) + the forward's transient + finalize's workspace)

``measured_peak_bytes`` is the high-water mark at the end of the run: ``ru_maxrss`` on CPU (the process's
resident peak), ``torch.cuda.max_memory_allocated`` plus the bytes held before the run on CUDA. Both go to
run.json (``memory``) and are printed at the end, so anyone can see whether the plan held.
"""

from __future__ import annotations

import os
import resource

import torch

# Finalize's workspace beyond the blocks: correlation_summary's row chunks and the baseline's rotated chunk.
FINALIZE_CHUNK_BYTES = 64 << 20


def rss_bytes() -> int:
    """Resident bytes of this process now (Linux /proc; the peak where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


class Meter:
    """Started once the models are loaded: what is held then is the fixed cost the plan builds on."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.held = torch.cuda.memory_allocated(device)
            self.peak_before = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.held = rss_bytes()
            self.peak_before = peak_rss_bytes()

    def planned_peak(self, run_bytes: int) -> int:
        return max(self.peak_before, self.held + run_bytes)

    def measured_peak(self) -> int:
        if self.device.type == "cuda":
            return max(self.peak_before, torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


def forward_bytes(models, batch_size: int, ctx: int, active: set[int] | None = None) -> int:
    """The largest forward's transient: a few [B, ctx, d_model] hidden tensors and one layer's attention scores.

    One model runs at a time and frees its activations before the next, so the largest one counts, not the sum.
    """
    best = 0
    for i, lm in enumerate(models):
        if active is not None and i not in active:
            continue
        cfg = lm.model.config
        d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1) or 1)
        item = lm.dtype.itemsize
        tokens = batch_size * ctx
        hidden = tokens * (6 * d_model + 2 * lm.d_mlp) * item  # residual, q/k/v, attention out, MLP in/out
        scores = 2 * batch_size * heads * ctx * ctx * item  # one layer's scores and softmax
        best = max(best, hidden + scores)  # the base model only: no [B, ctx, vocab] logits
    return best


def run_bytes(plan, cfg, models, active: set[int] | None = None, owned=None) -> int:
    """What the run allocates after loading: its largest pass's blocks (those ``owned``), the plan's fixed bytes
    (W, one batch, the baseline chunk), the moments, the forward's transient, finalize's workspace and the
    baseline's cached rotations."""
    from univ.baseline import CACHE_BYTES
    from univ.run.plan import rotated_models

    owned = owned or (lambda b: True)
    blocks = max((sum(plan.block_bytes(b) for b in p if owned(b)) for p in plan.passes), default=0)
    moments = sum(8 * 4 * lm.n_neurons for lm in models)
    rotations = 0
    if cfg.baseline != "none":
        rotated = rotated_models(cfg.mode, len(models))
        rotations = min(CACHE_BYTES, sum(4 * cfg.baseline_draws * models[i].n_layers * models[i].d_mlp ** 2
                                         for i in rotated))
    return (blocks + plan.fixed_bytes + moments + forward_bytes(models, cfg.batch_size, cfg.ctx, active)
            + FINALIZE_CHUNK_BYTES + rotations)


def format_bytes(n: float) -> str:
    from univ.run.plan import format_bytes as fmt

    return fmt(n)


def summary_line(planned: int, measured: int) -> str:
    ratio = measured / planned if planned else float("nan")
    return f"memory: peak {format_bytes(measured)} measured, {format_bytes(planned)} planned ({ratio:.2f}x the plan)"
