"""The state of a run as named tensors (moments, co-moment blocks, within-layer W, results) and counters.

``RunState.named()`` names every tensor, ``RunState.expected()`` the names, dtypes and shapes the current pass
must have (what a checkpoint is validated against), ``RunState.counters()`` holds the integers. The
checkpoint file that carries them is ``univ.run.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from univ.run.config import CorrelateConfig
from univ.run.plan import Block, Plan, analysed_models, pairs_for, within_models
from univ.stats import ActivationStats
from univ_kernels import ColumnMoments


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
        self.generation = 0  # checkpoints written so far by this run (carried across resumes)
        self.batches_done = 0
        self.tokens_done = 0
        self.moments = [ColumnMoments(lm.n_neurons, device=device, name=f"model {i} ({lm.name})")
                        for i, lm in enumerate(models)]
        self.blocks: dict[Block, torch.Tensor] = {}
        self.within: dict[int, torch.Tensor] = {}  # model -> [L, d, d] raw (shifted) within-layer co-moments
        # results[(a, m)]: a's neurons against m: max, argmax, baseline (filled block by block)
        self.results: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.hist: dict[tuple[int, int], torch.Tensor] = {}
        self.cka: dict[tuple[int, int], torch.Tensor] = {}
        self.rotations = None  # univ.baseline.RotationBank, built at the first finalize (not checkpointed)
        # Activation statistics of the analysed models, gathered on the first pass (same tokens every pass).
        self.act_stats: dict[int, ActivationStats] = {}
        if cfg.activation_stats:
            for a in analysed_models(cfg.mode, len(models)):
                self.act_stats[a] = ActivationStats(models[a].n_layers, models[a].d_mlp)
        for a, m in pairs_for(cfg.mode, len(models)):
            for x, y in ((a, m), (m, a)) if cfg.mode == "all-pairs" else ((a, m),):
                n = models[x].n_neurons
                self.results[(x, y)] = {  # base: one row per baseline draw
                    "max": torch.full((n,), float("-inf")), "arg": torch.full((n,), -1, dtype=torch.int64),
                    "base": torch.full((cfg.baseline_draws, n), float("-inf")),
                }
            self.hist[(a, m)] = torch.zeros(cfg.bins, dtype=torch.int64)
            if cfg.layer_similarity:  # linear CKA, layer of a × layer of m, filled block by block at finalize
                self.cka[(a, m)] = torch.full((models[a].n_layers, models[m].n_layers), float("nan"),
                                              dtype=torch.float64)
        for i in within_models(cfg, len(models)):
            self.within[i] = torch.zeros((models[i].n_layers, models[i].d_mlp, models[i].d_mlp),
                                         dtype=torch.float32, device=device)
        # A model's statistics are gathered in the first pass that forwards it (the same rule at every world size).
        self.stats_pass = {i: next((p for p in range(self.n_passes) if i in self.pass_models(p)), 0)
                           for i in self.act_stats}
        self.start_pass(0)

    def pass_models(self, p: int) -> set[int]:
        """Models pass p needs forwarded: those of its blocks, and on the first pass those whose W it collects."""
        blocks = self.plan.passes[p] if p < self.n_passes else []
        return {b.a for b in blocks} | {b.m for b in blocks} | (set(self.within) if p == 0 else set())

    def active_models(self) -> set[int]:
        """What this pass forwards: ``pass_models`` and the models whose statistics it gathers."""
        return self.pass_models(self.pass_index) | {i for i, p in self.stats_pass.items() if p == self.pass_index}

    @property
    def n_passes(self) -> int:
        return len(self.plan.passes)

    @property
    def finished(self) -> bool:
        return self.pass_index >= self.n_passes

    def start_pass(self, index: int) -> None:
        self.pass_index, self.batches_done, self.tokens_done = index, 0, 0
        self.streamed = False  # True once the pass's whole token stream is in (finalize pending)
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

    def named(self) -> dict[str, torch.Tensor]:
        """Every accumulator by its checkpoint name, where it lives (device tensors: not copied)."""
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
        for (a, m), k in self.cka.items():
            out[f"cka.{a}.{m}"] = k
        for i, st in self.act_stats.items():
            out.update(st.state_dict(f"stats.{i}"))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """``named()`` as contiguous CPU copies."""
        return {k: v.detach().contiguous().cpu() for k, v in self.named().items()}

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{name: (dtype, shape)} a checkpoint of the current pass must hold: the plan's, not the file's."""
        return {k: (v.dtype, tuple(v.shape)) for k, v in self.named().items()}

    def counters(self) -> dict:
        return {"pass_index": self.pass_index, "batches_done": self.batches_done, "tokens_done": self.tokens_done,
                "streamed": self.streamed, "moments_n": [m.n for m in self.moments],
                "stats_n": {str(i): st.counters() for i, st in self.act_stats.items()}}

    def load(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        """Take over a checkpoint's tensors (already validated against ``expected()``) and counters."""
        self.start_pass(counters["pass_index"])
        self.batches_done, self.tokens_done = counters["batches_done"], counters["tokens_done"]
        self.streamed = counters["streamed"]
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
        for key in self.cka:
            self.cka[key] = tensors[f"cka.{key[0]}.{key[1]}"].clone()
        for i, st in self.act_stats.items():
            st.load_state_dict(tensors, f"stats.{i}", counters["stats_n"][str(i)])


