"""``univ correlate``: the paper's experiment: every MLP neuron of every seed against every neuron of the others.

Run order (one function per stage, called by ``run``):

    load models → plan memory (blocks, passes) → for each pass: stream batches → forward every model →
    pre-pass each model once → C_block += Ã_aᵀ Ã_m per block (+ within-layer W_l on the first pass) →
    checkpoint → finalize the pass's blocks (max/argmax, baseline, histogram) → neurons.parquet, run.json

A *block* is a range of whole layers of model a (rows) against every neuron of model m (columns). When all
blocks do not fit the memory budget at once they are spread over successive passes over the same token
stream; one layer of a against all of m is the smallest block.

    univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from univ import __version__
from univ.baseline import KINDS as BASELINES
from univ.baseline import rotated_inv_sd, rotation
from univ.stats import ActivationStats
from univ_kernels import ColumnMoments, comoment_update, correlation_summary
from univ_kernels.streaming import atomic_write_bytes, default_operand_dtype

MODES = ("reference", "all-pairs")
CHECKPOINT = "checkpoint"  # checkpoint.safetensors + checkpoint.json in the output directory


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CorrelateConfig:
    """Everything that defines a correlate run; ``asdict`` of it is the manifest's ``config``."""

    models: tuple[str, ...]  # hub names or local paths; index 0 is the reference model
    data: str  # text file(s), tokenized dataset, or a `datasets` hub name
    out: str = "runs/correlate"
    tokens: int = 1_000_000  # kept tokens (BOS/pad/newline positions excluded)
    mode: str = "reference"  # "reference": model 0 against each other; "all-pairs": every pair
    baseline: str = "gaussian"  # "gaussian" (the paper's), "orthogonal" (Haar), or "none"
    baseline_seed: int = 0
    batch_size: int = 8  # sequences per forward
    ctx: int = 512  # tokens per sequence, BOS first (the paper's 512)
    seed: int = 0  # data order
    text_field: str = "text"
    split: str = "train"
    exclude_newlines: bool = True  # drop "\n" positions, as the paper did
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # model dtype; default float32 on CPU, bfloat16 on CUDA
    operand_dtype: str | None = None  # GEMM operands; default fp32 on CPU, fp16 for half models on CUDA
    backend: str = "auto"  # univ_kernels backend
    gemm: str | None = None  # GPU GEMM path: "cublas" or "triton"
    memory_budget_gb: float | None = None  # accumulator budget; default: 90 % of free device memory
    checkpoint_every: int | None = None  # tokens between checkpoints (None: only at pass ends / Ctrl-C)
    save_state: bool = True  # keep the accumulators (safetensors) in OUT/state for re-analysis
    activation_stats: bool = False  # also stream the analysed models' activation statistics (univ stats)
    bins: int = 100
    trust_remote_code: bool = False

    def __post_init__(self):
        if len(self.models) < 2:
            raise ValueError(f"need at least two models to correlate, got {len(self.models)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.tokens < 1 or self.batch_size < 1 or self.ctx < 2:
            raise ValueError("tokens and batch_size must be ≥ 1 and ctx ≥ 2")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be a positive number of tokens")

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with its checkpoint (output-only options excluded)."""
        skip = {"out", "checkpoint_every", "memory_budget_gb", "save_state", "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available here; use --device cpu")
    return device


def model_labels(names: tuple[str, ...]) -> list[str]:
    """Short unique column labels: the last path component of each model (deduplicated with a suffix)."""
    labels: list[str] = []
    for name in names:
        base = Path(name.rstrip("/")).name or name
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------------------------------------------------
# Memory plan


@dataclass(frozen=True)
class Block:
    """Layers [layer_start, layer_end) of model a (rows) against all neurons of model m (columns)."""

    a: int
    m: int
    layer_start: int
    layer_end: int


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

    def to_dict(self) -> dict:
        return {"passes": [[asdict(b) for b in p] for p in self.passes], "budget_bytes": self.budget_bytes}


def pairs_for(mode: str, n_models: int) -> list[tuple[int, int]]:
    """Reference: (0, m) for each other model. All-pairs: each unordered pair once (C_maᵀ = C_am)."""
    if mode == "reference":
        return [(0, m) for m in range(1, n_models)]
    return [(a, m) for a in range(n_models) for m in range(a + 1, n_models)]


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
    baseline_models = {m for _, m in pairs} | ({a for a, _ in pairs} if cfg.mode == "all-pairs" else set())
    within = sum(4 * n_layers[i] * d_mlp[i] ** 2 for i in baseline_models) if cfg.baseline != "none" else 0
    # Finalize temporaries: a centred [rows, d_m] slice and its rotation, per layer.
    fixed = within + batch_bytes
    if cfg.memory_budget_gb is not None:
        budget = int(cfg.memory_budget_gb * 1e9)
    else:
        budget = int(0.9 * available_memory(device)) - fixed
    plan = Plan([], d_mlp, n_layers, budget, fixed)
    current: list[Block] = []
    used = 0
    for a, m in pairs:
        start = 0
        per_layer = 4 * d_mlp[a] * n_layers[m] * d_mlp[m]
        if per_layer > budget:
            raise MemoryError(
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


# ----------------------------------------------------------------------------------------------------------------------
# State of a run: moments per model, blocks of the current pass, within-layer co-moments, finished results


class RunState:
    """All accumulators of a run, as plain tensors, so that a checkpoint is one safetensors file."""

    def __init__(self, plan: Plan, models, device: torch.device, cfg: CorrelateConfig):
        self.plan, self.device, self.cfg = plan, device, cfg
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
            for a in sorted({a for a, _ in pairs_for(cfg.mode, len(models))} | (
                    set(range(len(models))) if cfg.mode == "all-pairs" else set())):
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
            for i in {m for _, m in pairs_for(cfg.mode, len(models))} | (
                    set(range(len(models))) if cfg.mode == "all-pairs" else set()):
                self.within[i] = torch.zeros((models[i].n_layers, models[i].d_mlp, models[i].d_mlp),
                                             dtype=torch.float32, device=device)
        self.start_pass(0)

    def start_pass(self, index: int) -> None:
        self.pass_index, self.batches_done, self.tokens_done = index, 0, 0
        for mom in self.moments:
            mom.__init__(mom.n_cols, device=self.device, name=mom.name)
        self.blocks = {}
        if index < len(self.plan.passes):
            for b in self.plan.passes[index]:
                rows = (b.layer_end - b.layer_start) * self.plan.d_mlp[b.a]
                cols = self.plan.n_layers[b.m] * self.plan.d_mlp[b.m]
                self.blocks[b] = torch.zeros((rows, cols), dtype=torch.float32, device=self.device)

    @property
    def collect_within(self) -> bool:
        return self.pass_index == 0 and bool(self.within)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, mom in enumerate(self.moments):
            for k, v in mom.state_dict(f"moments.{i}").items():
                out[k] = v
        for b, c in self.blocks.items():
            out[f"block.{b.a}.{b.m}.{b.layer_start}.{b.layer_end}"] = c
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
            self.blocks[b].copy_(tensors[f"block.{b.a}.{b.m}.{b.layer_start}.{b.layer_end}"])
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


# ----------------------------------------------------------------------------------------------------------------------
# The streaming loop


class _StopFlag:
    """Ctrl-C sets a flag checked between batches, so an interrupt never lands inside a half-applied update."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        if threading_main():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: finishing this batch, writing a checkpoint, then exiting (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Interrupted(Exception):
    """Raised after a clean checkpoint when the user interrupted the run."""


def process_batch(state: RunState, models, input_ids: torch.Tensor, keep: torch.Tensor, cfg: CorrelateConfig,
                  operand_dtype: torch.dtype, timings: dict) -> None:
    """Forward every model once, pre-pass each once, then update every block (and W on the first pass)."""
    from univ.models import collect_mlp_activations

    t0 = time.perf_counter()
    acts, pres = [], {}
    for i, lm in enumerate(models):
        want_pre = state.pass_index == 0 and i in state.act_stats
        got = collect_mlp_activations(lm, input_ids, keep=keep, post=True, pre=want_pre)  # [T, L, d]
        if want_pre:
            pres[i] = (got.pre, got.post)
        acts.append(got.post.reshape(got.post.shape[0], -1))  # [T, L·d]
    _sync(state.device)
    t1 = time.perf_counter()
    # Pre-pass every model first: a bad batch raises before any accumulator changes.
    prepped = [mom.prepare(x.to(state.device), operand_dtype=operand_dtype, backend=cfg.backend)
               for mom, x in zip(state.moments, acts, strict=True)]
    for b, c in state.blocks.items():
        d = state.plan.d_mlp[b.a]
        comoment_update(c, prepped[b.a].operand[:, b.layer_start * d: b.layer_end * d], prepped[b.m].operand,
                        backend=cfg.backend, gemm=cfg.gemm)
    if state.collect_within:
        for i, w in state.within.items():
            d = state.plan.d_mlp[i]
            op = prepped[i].operand
            for layer in range(w.shape[0]):
                sl = op[:, layer * d: (layer + 1) * d]
                comoment_update(w[layer], sl, sl, backend=cfg.backend, gemm=cfg.gemm)
    for mom, p in zip(state.moments, prepped, strict=True):
        mom.commit(p)
    for i, (pre, post) in pres.items():  # after the kernels' checks: a rejected batch changes nothing
        state.act_stats[i].update(pre, post)
    _sync(state.device)
    timings["forward_s"] += t1 - t0
    timings["kernels_s"] += time.perf_counter() - t1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: honest timings of forward vs kernels


def finalize_pass(state: RunState, cfg: CorrelateConfig) -> None:
    """Reduce this pass's blocks into the per-neuron results (max, argmax, baseline) and the histograms."""
    plan = state.plan
    for b, c in state.blocks.items():
        ma, mm = state.moments[b.a], state.moments[b.m]
        d_a = plan.d_mlp[b.a]
        rows = slice(b.layer_start * d_a, b.layer_end * d_a)
        u_a, inv_a = ma.offset()[rows], ma.inv_sd()[rows]
        u_m, inv_m = mm.offset(), mm.inv_sd()
        s = correlation_summary(c, u_a, u_m, inv_a, inv_m, bins=cfg.bins, backend=cfg.backend)
        res = state.results[(b.a, b.m)]
        res["max"][rows] = s.max_a.cpu()
        res["arg"][rows] = s.argmax_a.cpu()
        state.hist[(b.a, b.m)] += s.hist.cpu()
        if cfg.mode == "all-pairs":  # the same block read by columns: m's neurons against these layers of a
            _combine_max(state.results[(b.m, b.a)], "max", "arg", s.max_b.cpu(), s.argmax_b.cpu() + rows.start)
        if cfg.baseline == "none":
            continue
        res["base"][rows] = _forward_baseline(state, b, c, u_a, inv_a, cfg).cpu()
        if cfg.mode == "all-pairs":
            _combine_max(state.results[(b.m, b.a)], "base", None, _reverse_baseline(state, b, c, u_a, cfg).cpu())


def _combine_max(res: dict, key: str, arg_key: str | None, values: torch.Tensor, args: torch.Tensor | None = None):
    """Running max across blocks; strict > keeps the earlier (smaller-index) block on ties."""
    v = torch.nan_to_num(values, nan=float("-inf"))
    better = v > res[key]
    res[key] = torch.where(better, v, res[key])
    if arg_key is not None:
        res[arg_key] = torch.where(better, args, res[arg_key])


def _centred_within(state: RunState, i: int, layer: int) -> torch.Tensor:
    """Σ(y_l − ȳ_l)ᵀ(y_l − ȳ_l) for model i, layer l, from the raw (shifted) W.

    W was accumulated on the first pass; every pass reads the same tokens with the same shift, so the
    current pass's column sums are the ones W needs.
    """
    d = state.plan.d_mlp[i]
    u = state.moments[i].offset()[layer * d: (layer + 1) * d]
    return state.within[i][layer] - u[:, None] * u[None, :]


def _forward_baseline(state, b: Block, c, u_a, inv_a, cfg) -> torch.Tensor:
    """Max over every rotated neuron of model m (layer by layer) for each row of the block."""
    m, d_m = b.m, state.plan.d_mlp[b.m]
    u_m = state.moments[m].offset()
    best = torch.full((c.shape[0],), float("-inf"), device=c.device)
    for layer in range(state.plan.n_layers[m]):
        cols = slice(layer * d_m, (layer + 1) * d_m)
        q = rotation(d_m, kind=cfg.baseline, seed=cfg.baseline_seed, model_index=m, layer=layer).to(c.device)
        cc = c[:, cols] - u_a[:, None] * u_m[cols][None, :]  # centred [rows, d_m]
        inv_rot = rotated_inv_sd(_centred_within(state, m, layer), q)
        s = correlation_summary(cc @ q, torch.zeros_like(u_a), torch.zeros(d_m, device=c.device), inv_a, inv_rot,
                                bins=1, backend=cfg.backend)
        best = torch.maximum(best, torch.nan_to_num(s.max_a, nan=float("-inf")))
    return torch.where(torch.isinf(best), float("nan"), best)


def _reverse_baseline(state, b: Block, c, u_a, cfg) -> torch.Tensor:
    """All-pairs: for each neuron of m, max over rotated neurons of the block's layers of a."""
    a, d_a = b.a, state.plan.d_mlp[b.a]
    mm = state.moments[b.m]
    u_m, inv_m = mm.offset(), mm.inv_sd()
    best = torch.full((c.shape[1],), float("-inf"), device=c.device)
    for k, layer in enumerate(range(b.layer_start, b.layer_end)):
        rows = slice(k * d_a, (k + 1) * d_a)
        q = rotation(d_a, kind=cfg.baseline, seed=cfg.baseline_seed, model_index=a, layer=layer).to(c.device)
        cc = c[rows] - u_a[rows][:, None] * u_m[None, :]  # centred [d_a, n_m]
        inv_rot = rotated_inv_sd(_centred_within(state, a, layer), q)
        s = correlation_summary(q.t() @ cc, torch.zeros(d_a, device=c.device), torch.zeros_like(u_m), inv_rot, inv_m,
                                bins=1, backend=cfg.backend)
        best = torch.maximum(best, torch.nan_to_num(s.max_b, nan=float("-inf")))
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def neuron_table(state: RunState, models, labels: list[str], cfg: CorrelateConfig) -> pd.DataFrame:
    """One row per neuron of each analysed model, with the paper's columns (see ``write_outputs``)."""
    analysed = sorted({a for a, _ in state.results})
    frames = []
    for a in analysed:
        lm = models[a]
        cols: dict[str, np.ndarray] = {
            "model": np.array([labels[a]] * lm.n_neurons, dtype=object),
            "layer": np.repeat(np.arange(lm.n_layers), lm.d_mlp),
            "neuron": np.tile(np.arange(lm.d_mlp), lm.n_layers),
        }
        maxes, bases = [], []
        for m in sorted(m for x, m in state.results if x == a):
            r = state.results[(a, m)]
            mx = _inf_to_nan(r["max"]).numpy().astype(np.float64)
            arg = r["arg"].numpy()
            base = _inf_to_nan(r["base"]).numpy().astype(np.float64)
            d_m = models[m].d_mlp
            cols[f"max_corr.{labels[m]}"] = mx
            cols[f"argmax_layer.{labels[m]}"] = np.where(arg >= 0, arg // d_m, -1)
            cols[f"argmax_neuron.{labels[m]}"] = np.where(arg >= 0, arg % d_m, -1)
            cols[f"baseline.{labels[m]}"] = base
            maxes.append(mx)
            bases.append(base)
        mx, base = np.stack(maxes), np.stack(bases)
        with np.errstate(all="ignore"):
            cols["mean_corr"] = mx.mean(0)
            cols["min_corr"] = mx.min(0)
            cols["max_corr"] = mx.max(0)
            cols["mean_baseline"] = base.mean(0)
            cols["max_baseline"] = base.max(0)
            cols["excess_corr"] = cols["mean_corr"] - cols["mean_baseline"]
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _inf_to_nan(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(t), float("nan"), t.float())


def write_outputs(out: Path, state: RunState, models, labels, cfg, manifest: dict) -> pd.DataFrame:
    """Write ``neurons.parquet`` (+ csv), ``histograms.parquet``, ``run.json`` (and ``activation_stats.parquet``).

    neurons.parquet columns: ``model`` (label), ``layer``, ``neuron``; per compared model m:
    ``max_corr.<m>`` (max Pearson r over all of m's neurons), ``argmax_layer.<m>``, ``argmax_neuron.<m>``
    (where; −1 if dead), ``baseline.<m>`` (the same max over randomly rotated neurons of m); then over m:
    ``mean_corr``, ``min_corr``, ``max_corr``, ``mean_baseline``, ``max_baseline`` and
    ``excess_corr = mean_corr − mean_baseline`` (the paper's universality score). Dead neurons: NaN.
    """
    table = neuron_table(state, models, labels, cfg)
    table.to_parquet(out / "neurons.parquet", index=False)
    table.to_csv(out / "neurons.csv", index=False)
    edges = np.linspace(-1, 1, cfg.bins + 1)
    hist_rows = [{"model": labels[a], "other": labels[m], "bin_left": edges[i], "bin_right": edges[i + 1],
                  "count": int(h[i])} for (a, m), h in state.hist.items() for i in range(cfg.bins)]
    pd.DataFrame(hist_rows).to_parquet(out / "histograms.parquet", index=False)
    if state.act_stats:  # the same columns `univ stats` computes from activations, streamed in this pass
        frames = [st.result().assign(model=labels[i]) for i, st in state.act_stats.items()]
        stats = pd.concat(frames, ignore_index=True)
        stats = stats[["model", *[c for c in stats.columns if c != "model"]]]
        stats.to_parquet(out / "activation_stats.parquet", index=False)
    atomic_write_bytes(out / "run.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return table


# ----------------------------------------------------------------------------------------------------------------------
# The run


def load_models(cfg: CorrelateConfig, device: torch.device):
    from univ.models import check_same_tokenizer, load_model, max_positions

    models = [load_model(name, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
              for name in cfg.models]
    check_same_tokenizer(models)
    for lm in models:
        limit = max_positions(lm)
        if limit is not None and cfg.ctx > limit:
            raise ValueError(f"--ctx {cfg.ctx} exceeds {lm.name}'s {limit} positions; pass --ctx {limit} or less")
    return models


def token_stream(cfg: CorrelateConfig, tokenizer, skip_batches: int = 0) -> Iterator:
    from univ.data import excluded_token_ids, token_batches

    excluded = excluded_token_ids(tokenizer, newlines=cfg.exclude_newlines)
    return token_batches(cfg.data, tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                         max_tokens=cfg.tokens, text_field=cfg.text_field, split=cfg.split,
                         skip_batches=skip_batches, excluded=excluded)


def run(cfg: CorrelateConfig, *, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Run (or resume) a correlate experiment; returns the output directory."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / f"{CHECKPOINT}.json").exists():
        raise FileExistsError(f"{out} holds an unfinished run; pass --resume to continue it, or choose another --out")
    device = resolve_device(cfg.device)
    started = time.time()
    models = load_models(cfg, device)
    labels = model_labels(cfg.models)
    operand_dtype = getattr(torch, cfg.operand_dtype) if cfg.operand_dtype else \
        default_operand_dtype(device, models[0].dtype)
    n_layers = [lm.n_layers for lm in models]
    d_mlp = [lm.d_mlp for lm in models]
    t_batch = cfg.batch_size * cfg.ctx
    batch_bytes = sum(t_batch * lm.n_neurons * (lm.dtype.itemsize + 4 + operand_dtype.itemsize) for lm in models)

    meta = None
    if resume:
        meta, tensors = read_checkpoint(out, cfg)
        plan = Plan([[Block(**b) for b in p] for p in meta["plan"]["passes"]], d_mlp, n_layers,
                    meta["plan"]["budget_bytes"], batch_bytes)
    else:
        plan = make_plan(cfg, n_layers, d_mlp, device, batch_bytes)
    log(describe_plan(plan, cfg, models, device))
    state = RunState(plan, models, device, cfg)
    if meta is not None:
        state.load(tensors, meta)
        log(f"resuming pass {state.pass_index + 1} after {state.tokens_done:,} tokens")

    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0}
    total = cfg.tokens * len(plan.passes)
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
               initial=state.pass_index * cfg.tokens + state.tokens_done)
    next_ckpt = _next_checkpoint(cfg, state.tokens_done)
    with _StopFlag() as flag:
        while state.pass_index < len(plan.passes):
            bar.set_description(f"pass {state.pass_index + 1}/{len(plan.passes)}")
            for batch in token_stream(cfg, models[0].tokenizer, skip_batches=state.batches_done):
                process_batch(state, models, batch.input_ids, batch.keep, cfg, operand_dtype, timings)
                state.batches_done += 1
                state.tokens_done += batch.n_kept
                bar.update(batch.n_kept)
                if flag.stop:
                    write_checkpoint(out, state, cfg)
                    bar.close()
                    raise Interrupted(f"interrupted after {state.tokens_done:,} tokens of pass "
                                      f"{state.pass_index + 1}; checkpoint written to {out}. Resume with --resume.")
                if next_ckpt is not None and state.tokens_done >= next_ckpt:
                    write_checkpoint(out, state, cfg)
                    next_ckpt = _next_checkpoint(cfg, state.tokens_done)
            if state.tokens_done == 0:
                raise ValueError(f"no tokens were read from {cfg.data!r}: is it empty, or is every position excluded?")
            t0 = time.perf_counter()
            finalize_pass(state, cfg)
            if cfg.save_state:
                _save_blocks(out, state)
            timings["finalize_s"] += time.perf_counter() - t0
            tokens_seen = state.tokens_done
            state.start_pass(state.pass_index + 1)
            if state.pass_index < len(plan.passes):
                write_checkpoint(out, state, cfg)
                next_ckpt = _next_checkpoint(cfg, 0)
    bar.close()

    manifest = {
        "config": asdict(cfg),
        "models": list(cfg.models),
        "labels": labels,
        "analysed": [labels[a] for a in sorted({a for a, _ in state.results})],
        "data": {"source": cfg.data, "ctx": cfg.ctx, "batch_size": cfg.batch_size, "seed": cfg.seed,
                 "max_tokens": cfg.tokens, "text_field": cfg.text_field, "split": cfg.split,
                 "exclude_newlines": cfg.exclude_newlines},
        "mode": cfg.mode,
        "baseline": cfg.baseline,
        "baseline_seed": cfg.baseline_seed,
        "tokens": tokens_seen,
        "device": str(device),
        "model_dtype": str(models[0].dtype).removeprefix("torch."),
        "operand_dtype": str(operand_dtype).removeprefix("torch."),
        "plan": plan.to_dict(),
        "memory": {"budget_bytes": plan.budget_bytes, "fixed_bytes": plan.fixed_bytes,
                   "passes": len(plan.passes)},
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "wall_s": round(time.time() - started, 3)},
        "versions": _versions(),
        "model_meta": [lm.meta for lm in models],
    }
    table = write_outputs(out, state, models, labels, cfg, manifest)
    for suffix in (".safetensors", ".json"):
        (out / f"{CHECKPOINT}{suffix}").unlink(missing_ok=True)
    log(summary_text(table))
    log(f"wrote {out / 'neurons.parquet'} and {out / 'run.json'}")
    return out


def _next_checkpoint(cfg: CorrelateConfig, done: int) -> int | None:
    if cfg.checkpoint_every is None:
        return None
    return (done // cfg.checkpoint_every + 1) * cfg.checkpoint_every


def _save_blocks(out: Path, state: RunState) -> None:
    """Keep the pass's accumulators (C blocks, moments, within-layer W) for later re-analysis."""
    state_dir = out / "state"
    state_dir.mkdir(exist_ok=True)
    tensors = {k: v for k, v in state.tensors().items() if not k.startswith(("result.", "hist."))}
    atomic_write_bytes(state_dir / f"pass-{state.pass_index}.safetensors", safetensors.torch.save(tensors))


def _versions() -> dict:
    import transformers

    import univ_kernels

    versions = {"univ": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0], "univ_kernels": getattr(univ_kernels, "__version__", __version__)}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def summary_text(table: pd.DataFrame, threshold: float = 0.5) -> str:
    """Per model and layer: neurons, mean max-correlation vs baseline, and how many exceed the threshold."""
    lines = [f"model        layer  neurons  mean max_corr  mean baseline  excess>{threshold:.2f}"]
    for (model, layer), g in table.groupby(["model", "layer"], sort=True):
        n_univ = int((g["excess_corr"] > threshold).sum())
        lines.append(f"{str(model)[:12]:12s} {layer:5d}  {len(g):7d}  {g['mean_corr'].mean():13.3f}  "
                     f"{g['mean_baseline'].mean():13.3f}  {n_univ:5d} ({100 * n_univ / len(g):.2f} %)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "correlate",
        help="correlate every MLP neuron of seed models over a token stream (the paper's experiment)",
        description=(
            "Stream the same tokens through several models that differ only in their training seed and compute,\n"
            "for every MLP neuron of the reference model (or of every model with --mode all-pairs), its maximum\n"
            "Pearson correlation with any neuron of each other model, plus a random-rotation baseline. Nothing of\n"
            "size [tokens × neurons] is kept: fused kernels accumulate co-moments batch by batch.\n\n"
            "Writes OUT/neurons.parquet (+csv), OUT/histograms.parquet, OUT/run.json and OUT/state/."
        ),
        epilog=(
            "examples:\n"
            "  univ correlate stanford-crfm/alias-gpt2-small-x21 stanford-crfm/battlestar-gpt2-small-x49 \\\n"
            "      stanford-crfm/caprica-gpt2-small-x81 --data pile_test.jsonl --tokens 100000000 --out runs/small\n"
            "  univ correlate zoo/seed-0 zoo/seed-1 zoo/seed-2 --data heldout.txt --tokens 60000 --ctx 128\n"
            "  univ correlate A B --data data.txt --out runs/x --resume      # continue an interrupted run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="hub names or local paths; the first is the reference")
    p.add_argument("--data", required=True, help="text file (.txt/.jsonl/.parquet), directory, tokenized dataset, "
                                                 "or a `datasets` hub name (streamed)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="kept tokens to read (default 1,000,000)")
    p.add_argument("--out", default="runs/correlate", help="output directory (default runs/correlate)")
    p.add_argument("--mode", choices=MODES, default="reference",
                   help="reference: model 1 vs each other (the paper); all-pairs: every pair")
    p.add_argument("--baseline", choices=BASELINES, default="gaussian",
                   help="rotation baseline: the paper's row-normalised gaussian, Haar orthogonal, or none")
    p.add_argument("--baseline-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per sequence, BOS first (default 512)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--text-field", default="text", help="text column of jsonl/parquet/hub data")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--keep-newlines", action="store_true", help="do not exclude newline positions")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--operand-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="GEMM operand dtype (default fp32 on CPU, fp16 for half models on CUDA)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--gemm", default=None, choices=["cublas", "triton"], help="GPU GEMM path")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="accumulator memory budget (default 90%% of free device memory)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="TOKENS",
                   help="write a checkpoint every TOKENS tokens (atomic); Ctrl-C always writes one")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--no-save-state", action="store_true", help="do not keep the accumulators in OUT/state")
    p.add_argument("--activation-stats", action="store_true",
                   help="also stream the analysed models' pre-activation moments and frequencies in this pass "
                        "(OUT/activation_stats.parquet, the columns of 'univ stats')")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own code (off by default)")
    p.set_defaults(func=main)


def config_from_args(args) -> CorrelateConfig:
    return CorrelateConfig(
        models=tuple(args.models), data=args.data, out=args.out, tokens=args.tokens, mode=args.mode,
        baseline=args.baseline, baseline_seed=args.baseline_seed, batch_size=args.batch_size, ctx=args.ctx,
        seed=args.seed, text_field=args.text_field, split=args.split, exclude_newlines=not args.keep_newlines,
        device=args.device, dtype=args.dtype, operand_dtype=args.operand_dtype, backend=args.backend, gemm=args.gemm,
        memory_budget_gb=args.memory_budget, checkpoint_every=args.checkpoint_every,
        save_state=not args.no_save_state, activation_stats=args.activation_stats,
        trust_remote_code=args.trust_remote_code,
    )


def main(args) -> int:
    try:
        run(config_from_args(args), resume=args.resume)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    return 0


