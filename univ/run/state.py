"""The state of a run as plain tensors (moments, co-moment blocks, within-layer W, results) and its checkpoints.

``RunState.tensors()`` names every tensor; ``RunState.counters()`` holds the integers. A checkpoint is both,
written so that a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from univ import __version__
from univ.run.config import CorrelateConfig
from univ.run.plan import Block, Plan, analysed_models, pairs_for, rotated_models
from univ.stats import ActivationStats
from univ_kernels import ColumnMoments
from univ_kernels.streaming import atomic_write_bytes

CHECKPOINT = "checkpoint"  # checkpoint.safetensors + checkpoint.json in the output directory


class RunState:
    """All accumulators of a run, as plain tensors, so that a checkpoint is one safetensors file.

    ``owns(block)`` selects the blocks this process accumulates (all by default; a distributed run gives each
    rank its share); moments, W and results are held whole by every process.
    """

    def __init__(self, plan: Plan, models, device: torch.device, cfg: CorrelateConfig,
                 owns: Callable[[Block], bool] | None = None):
        self.plan, self.device, self.cfg = plan, device, cfg
        self.owns = owns or (lambda b: True)
        self.n_models = len(models)
        self.pass_index = 0
        self.batches_done = 0
        self.tokens_done = 0
        self.moments = [ColumnMoments(lm.n_neurons, device=device, name=f"model {i} ({lm.name})")
                        for i, lm in enumerate(models)]
        self.blocks: dict[Block, torch.Tensor] = {}
        self.within: dict[int, torch.Tensor] = {}  # model -> [L, d, d] raw (shifted) within-layer co-moments
        # results[(a, m)]: a's neurons against m: max, argmax, baseline (filled block by block)
        self.results: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.hist: dict[tuple[int, int], torch.Tensor] = {}
        # Activation statistics of the analysed models, gathered on the first pass (same tokens every pass).
        self.act_stats: dict[int, ActivationStats] = {}
        if cfg.activation_stats:
            for a in analysed_models(cfg.mode, len(models)):
                self.act_stats[a] = ActivationStats(models[a].n_layers, models[a].d_mlp)
        for a, m in pairs_for(cfg.mode, len(models)):
            for x, y in ((a, m), (m, a)) if cfg.mode == "all-pairs" else ((a, m),):
                n = models[x].n_neurons
                self.results[(x, y)] = {
                    "max": torch.full((n,), float("-inf")), "arg": torch.full((n,), -1, dtype=torch.int64),
                    "base": torch.full((n,), float("-inf")),
                }
            self.hist[(a, m)] = torch.zeros(cfg.bins, dtype=torch.int64)
        if cfg.baseline != "none":
            for i in rotated_models(cfg.mode, len(models)):
                self.within[i] = torch.zeros((models[i].n_layers, models[i].d_mlp, models[i].d_mlp),
                                             dtype=torch.float32, device=device)
        self.start_pass(0)

    @property
    def n_passes(self) -> int:
        return len(self.plan.passes)

    @property
    def finished(self) -> bool:
        return self.pass_index >= self.n_passes

    def start_pass(self, index: int) -> None:
        self.pass_index, self.batches_done, self.tokens_done = index, 0, 0
        for mom in self.moments:
            mom.__init__(mom.n_cols, device=self.device, name=mom.name)
        self.blocks = {}
        if index < len(self.plan.passes):
            for b in self.plan.passes[index]:
                if self.owns(b):
                    self.blocks[b] = torch.zeros(self.plan.block_shape(b), dtype=torch.float32, device=self.device)

    @property
    def collect_within(self) -> bool:
        return self.pass_index == 0 and bool(self.within)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, mom in enumerate(self.moments):
            for k, v in mom.state_dict(f"moments.{i}").items():
                out[k] = v
        for b, c in self.blocks.items():
            out[b.key] = c
        for i, w in self.within.items():
            out[f"within.{i}"] = w
        for (a, m), r in self.results.items():
            for k, v in r.items():
                out[f"result.{a}.{m}.{k}"] = v
        for (a, m), h in self.hist.items():
            out[f"hist.{a}.{m}"] = h
        for i, st in self.act_stats.items():
            shift = st.shift if st.shift is not None else torch.zeros_like(st.post_sum)
            out.update({f"stats.{i}.shift": shift, f"stats.{i}.sums": st.sums, f"stats.{i}.n_pos": st.n_pos,
                        f"stats.{i}.post_sum": st.post_sum})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def counters(self) -> dict:
        return {"pass_index": self.pass_index, "batches_done": self.batches_done, "tokens_done": self.tokens_done,
                "moments_n": [m.n for m in self.moments],
                "stats_n": {str(i): [st.n, st.n_post, st.shift is not None] for i, st in self.act_stats.items()}}

    def load(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        self.start_pass(counters["pass_index"])
        self.batches_done, self.tokens_done = counters["batches_done"], counters["tokens_done"]
        for i, mom in enumerate(self.moments):
            mom.load_state_dict(tensors, f"moments.{i}", counters["moments_n"][i])
        for b in self.blocks:
            self.blocks[b].copy_(tensors[b.key])
        for i in self.within:
            self.within[i].copy_(tensors[f"within.{i}"])
        for (a, m), r in self.results.items():
            for k in r:
                r[k] = tensors[f"result.{a}.{m}.{k}"].clone()
        for key in self.hist:
            self.hist[key] = tensors[f"hist.{key[0]}.{key[1]}"].clone()
        for i, st in self.act_stats.items():
            st.n, st.n_post, has_shift = counters["stats_n"][str(i)]
            st.shift = tensors[f"stats.{i}.shift"].clone() if has_shift else None
            st.sums, st.n_pos = tensors[f"stats.{i}.sums"].clone(), tensors[f"stats.{i}.n_pos"].clone()
            st.post_sum = tensors[f"stats.{i}.post_sum"].clone()


def write_checkpoint(out: Path, state: RunState, cfg: CorrelateConfig) -> None:
    """Atomic (temp file, fsync, rename): a crash leaves the previous checkpoint or the new one, never half."""
    meta = {"fingerprint": cfg.fingerprint(), "plan": state.plan.to_dict(), **state.counters(),
            "univ_version": __version__}
    atomic_write_bytes(out / f"{CHECKPOINT}.safetensors", safetensors.torch.save(state.tensors()))
    atomic_write_bytes(out / f"{CHECKPOINT}.json", (json.dumps(meta, indent=1) + "\n").encode())


def has_checkpoint(out: Path) -> bool:
    return (out / f"{CHECKPOINT}.json").exists()


def remove_checkpoint(out: Path) -> None:
    for suffix in (".safetensors", ".json"):
        (out / f"{CHECKPOINT}{suffix}").unlink(missing_ok=True)


def read_checkpoint(out: Path, cfg: CorrelateConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    meta_path = out / f"{CHECKPOINT}.json"
    if not meta_path.exists():
        finished = " (its run.json says the run there finished)" if (out / "run.json").exists() else ""
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out}{finished} (expected {meta_path.name}); start without --resume"
        )
    meta = json.loads(meta_path.read_text())
    saved, now = meta["fingerprint"], cfg.fingerprint()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
             for k in sorted(saved.keys() | now.keys()) if saved.get(k) != _jsonable(now.get(k))]
    if diffs:
        raise ValueError(
            f"the checkpoint in {out} was written by a run with another configuration; it differs in "
            + "; ".join(diffs) + ". Resume with the original options, or choose another --out."
        )
    return meta, safetensors.torch.load_file(out / f"{CHECKPOINT}.safetensors")


def _jsonable(v):
    return json.loads(json.dumps(v))


def save_pass_state(out: Path, state: RunState) -> None:
    """Keep the pass's accumulators (C blocks, moments, within-layer W) in OUT/state for later re-analysis."""
    state_dir = out / "state"
    state_dir.mkdir(exist_ok=True)
    tensors = {k: v for k, v in state.tensors().items() if not k.startswith(("result.", "hist."))}
    atomic_write_bytes(state_dir / f"pass-{state.pass_index}.safetensors", safetensors.torch.save(tensors))
