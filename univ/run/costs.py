"""``univ correlate --dry-run``: each method's memory, passes, FLOPs and time, from the models' configs alone.

Nothing is loaded but each model's ``config.json`` (a local folder, or a Hub name when online): no weights,
no data. The exact method's plan is ``univ.run.plan.make_plan``'s; the screen's is its screen plan over the
sample plus a verify stage over a share of the neuron × layer rows (``VERIFIED_SHARE``: what the shipped depth
zoo needs at a 2 M-token sample, by baseline draws; the real run records its own in run.json). Times are
FLOPs at the named peak: a lower bound. ``--ranks N`` plans torchrun's N ranks, one device each: the exact
method's blocks split as ``univ.run.shard_plan.make_shard_plan`` splits them, the screen's sample blocks the
same way and its verified rows 1/N per rank; memory and FLOPs are then the busiest device's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from univ.errors import UserError
from univ.run.config import CorrelateConfig
from univ.run.plan import PlanError, format_bytes, make_plan, pairs_for, rotated_models, within_models

H100_BF16_TFLOPS = 989.0  # dense bf16 (SXM), the default --peak-tflops
DEVICE_BYTES = 80e9  # the default device when --memory-budget is not given: one 80 GB GPU
USABLE = 0.9  # the share of the device the run plans to use (as make_plan's default budget)
# Share of neuron × layer rows the verify stage computes, by baseline draws: predicted for a 2 M-token sample from
# the depth zoo's exact per-layer maxima and measured margins (bench/bench_screen.py, bench/RESULTS.md). Every
# draw's best rotated layer must be verified, which is what keeps it high.
VERIFIED_SHARE = {0: 0.24, 1: 0.37, 4: 0.54, 16: 0.72}


def verified_share(draws: int) -> float:
    return VERIFIED_SHARE[max(k for k in VERIFIED_SHARE if k <= draws)]


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: its neurons, and its size for the forward's FLOPs and the weights."""

    name: str
    n_layers: int
    d_mlp: int
    d_model: int
    gated: bool
    params: int

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    @property
    def forward_flops(self) -> int:
        """Per token: 2 FLOPs per weight of the blocks (the LM head is never run)."""
        per_layer = 4 * self.d_model ** 2 + (3 if self.gated else 2) * self.d_model * self.d_mlp
        return 2 * self.n_layers * per_layer


def model_shape(name: str, trust_remote_code: bool = False) -> Shape:
    """Read one model's config (no weights): layers, MLP width, d_model; refuse an unknown architecture."""
    from transformers import AutoConfig

    from univ.models import ModelNotFoundError, _resolve_source, get_adapter

    src = _resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {name!r}: its config did not load ({str(e).splitlines()[0]}); --dry-run "
                                 "needs a folder with config.json, or a Hub name and a network") from e
    adapter = get_adapter(config.model_type)
    d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    n_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    d_mlp = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or
                getattr(config, "ffn_dim", 0) or 4 * d_model)
    vocab = int(getattr(config, "vocab_size", 0))
    per_layer = 4 * d_model ** 2 + (3 if adapter.gated else 2) * d_model * d_mlp
    params = n_layers * per_layer + 2 * vocab * d_model
    return Shape(name, n_layers, d_mlp, d_model, adapter.gated, params)


def _plan(cfg: CorrelateConfig, shapes: list[Shape], free: float, batch_bytes: int):
    """make_plan's passes for accumulators in what ``free`` leaves beside the plan's fixed bytes (W, a batch)."""
    from univ.baseline import CHUNK_BYTES

    fixed = sum(4 * shapes[i].n_layers * shapes[i].d_mlp ** 2 for i in within_models(cfg, len(shapes))) + \
        batch_bytes + (CHUNK_BYTES if cfg.baseline != "none" else 0)
    if free - fixed <= 0:
        return None
    try:
        return make_plan(replace(cfg, memory_budget_gb=(free - fixed) / 1e9), [s.n_layers for s in shapes],
                         [s.d_mlp for s in shapes], torch.device("cpu"), batch_bytes)
    except PlanError:
        return None


def _accumulators(cfg: CorrelateConfig, shapes: list[Shape], free: float, batch_bytes: int, ranks: int):
    """(passes, bytes per device beside the weights, co-moment FLOPs per token on the busiest device) of the exact
    engine's plan in ``free`` bytes per device, or None if it cannot fit: make_plan's in one process,
    make_shard_plan's over ``ranks``."""
    from univ.baseline import CHUNK_BYTES
    from univ.run.shard_plan import make_shard_plan, make_units, within_bytes

    n_layers, d_mlp = [s.n_layers for s in shapes], [s.d_mlp for s in shapes]
    pairs = pairs_for(cfg.mode, len(shapes))
    if ranks == 1:
        plan = _plan(cfg, shapes, free, batch_bytes)
        if plan is None:
            return None
        blocks = max(sum(plan.block_bytes(b) for b in p) for p in plan.passes)
        return len(plan.passes), plan.fixed_bytes + blocks, 2 * sum(shapes[a].n_neurons * shapes[m].n_neurons
                                                                    for a, m in pairs)
    rotated = rotated_models(cfg.mode, len(shapes)) if cfg.baseline != "none" else []
    cka_only = [i for i in within_models(cfg, len(shapes)) if i not in rotated]
    fixed = batch_bytes + (CHUNK_BYTES if cfg.baseline != "none" else 0) + \
        sum(4 * n_layers[i] * d_mlp[i] ** 2 for i in cka_only)
    if free - fixed <= 0:
        return None
    try:
        sp = make_shard_plan(make_units(pairs, n_layers, d_mlp), world=ranks, token_shards=1,
                             budget_bytes=int(free - fixed), within=within_bytes(n_layers, d_mlp, rotated),
                             reverse=cfg.mode == "all-pairs")
    except PlanError:
        return None
    busiest = max(sum(u.nbytes for u in g.units) for g in sp.groups) // 2  # a unit's bytes / 2: its FLOPs per token
    return sp.n_passes, fixed + max(sp.rank_bytes(r) for r in range(ranks)), busiest


def estimate(cfg: CorrelateConfig, shapes: list[Shape], device_bytes: float, ranks: int = 1) -> dict[str, dict]:
    """Per method: fits, peak bytes per device, passes, FLOPs of the busiest device (and their parts)."""
    n = [s.n_neurons for s in shapes]
    dtype_bytes = torch.finfo(getattr(torch, cfg.dtype or "float32")).bits // 8
    weights = sum(s.params for s in shapes) * dtype_bytes
    t_batch = cfg.batch_size * cfg.ctx
    batch_bytes = sum(t_batch * s.n_neurons * (dtype_bytes + 4 + 2) for s in shapes)
    budget = USABLE * device_bytes - weights
    pairs = pairs_for(cfg.mode, len(shapes))
    within = within_models(cfg, len(shapes))
    rotated = rotated_models(cfg.mode, len(shapes)) if cfg.baseline != "none" else []
    w_flops = sum(shapes[i].n_layers * shapes[i].d_mlp ** 2 for i in within)
    forward = sum(s.forward_flops for s in shapes)
    k = cfg.baseline_draws if cfg.baseline != "none" else 0
    rot_finalize = sum(2 * n[a] * n[m] * k * (shapes[m].d_mlp + shapes[a].d_mlp * (cfg.mode == "all-pairs"))
                       for a, m in pairs)
    out: dict[str, dict] = {}

    acc = _accumulators(cfg, shapes, budget, batch_bytes, ranks)
    exact = {"fits": acc is not None, "passes": acc[0] if acc else None, "weights": weights}
    if acc is not None:
        passes, held, comoment = acc
        exact["peak"] = weights + held
        exact["flops"] = cfg.tokens * (passes * forward + comoment + w_flops) + rot_finalize / ranks
    out["exact"] = exact

    from univ.run.screen import default_screen_tokens, directed_pairs

    s_tok = default_screen_tokens(cfg.tokens) if cfg.screen_tokens is None else min(cfg.screen_tokens, cfg.tokens)
    sacc = _accumulators(replace(cfg, tokens=s_tok), shapes, budget, batch_bytes, ranks)
    screen = {"fits": False, "screen_tokens": s_tok, "weights": weights}
    if sacc is not None:
        s_passes, s_held, s_comoment = sacc
        w_rot = sum(4 * shapes[i].n_layers * shapes[i].d_mlp ** 2 for i in rotated)
        share = verified_share(k)
        segments = sum(4 * n[a] * share * n[m] for a, m in directed_pairs(cfg.mode, len(shapes))) / ranks
        maxima = sum(4 * 2 * n[a] * shapes[m].n_layers * (1 + k) for a, m in directed_pairs(cfg.mode, len(shapes)))
        room = budget - w_rot - maxima - batch_bytes
        one_row_layer = max(4 * s.d_mlp for s in shapes)
        if room >= one_row_layer:
            v_passes = max(1, math.ceil(segments / room))
            seg_flops = 2 * segments / 4
            screen.update(
                fits=True, screen_passes=s_passes, verify_passes=v_passes,
                peak=weights + max(s_held, w_rot + maxima + batch_bytes + min(segments, room)),
                flops=s_tok * (s_passes * forward + s_comoment + w_flops) + rot_finalize / ranks
                + cfg.tokens * (v_passes * forward + seg_flops + sum(shapes[i].n_layers * shapes[i].d_mlp ** 2
                                                                    for i in rotated))
                + rot_finalize * share / ranks, verified_share=share)
    out["screen"] = screen
    return out


def dry_run(cfg: CorrelateConfig, *, peak_tflops: float | None = None, ranks: int = 1, log=print) -> int:
    """Print each method's plan; 0 if the chosen (or auto-picked) method fits the devices, 2 if not."""
    peak = peak_tflops or H100_BF16_TFLOPS
    if peak <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {peak}")
    if ranks < 1:
        raise UserError(f"--ranks must be ≥ 1, got {ranks}")
    device_bytes = cfg.memory_budget_gb * 1e9 / USABLE if cfg.memory_budget_gb else DEVICE_BYTES
    shapes = [model_shape(m, cfg.trust_remote_code) for m in cfg.models]
    est = estimate(cfg, shapes, device_bytes, ranks)
    where = (f"a device of {format_bytes(device_bytes)} (--memory-budget {cfg.memory_budget_gb} GB)"
             if cfg.memory_budget_gb else "one 80 GB device (--memory-budget GB for another)")
    if ranks > 1:
        where = f"{ranks} ranks (torchrun --nproc-per-node {ranks}), each on " + where.replace("one 80", "an 80")
    log(f"dry run: {len(shapes)} models, {cfg.tokens:,} tokens, mode {cfg.mode}, on {where}; times at "
        f"{peak:g} TFLOP/s (--peak-tflops), a lower bound")
    for s in shapes:
        log(f"  {s.name}: {s.n_layers} layers × {s.d_mlp:,} neurons = {s.n_neurons:,}, d_model {s.d_model}, "
            f"~{s.params / 1e9:.2f} B parameters")
    log(f"  weights ({cfg.dtype or 'float32'}) {format_bytes(est['exact']['weights'])}")
    for method in ("exact", "screen"):
        e = est[method]
        if not e["fits"]:
            log(f"  {method:6s}: does not fit: even its smallest accumulator exceeds what the weights leave free"
                + ("; try --dtype bfloat16" if not cfg.dtype else ""))
            continue
        hours = e["flops"] / (peak * 1e12) / 3600
        passes = (f"{e['passes']} pass{'es' if e['passes'] > 1 else ''} over the tokens" if method == "exact" else
                  f"{e['screen_passes']} over a {e['screen_tokens']:,}-token sample, then {e['verify_passes']} "
                  f"verify pass{'es' if e['verify_passes'] > 1 else ''} (assuming {100 * e['verified_share']:.0f} % of "
                  "neuron × layer rows verified)")
        log(f"  {method:6s}: peak {format_bytes(e['peak'])} per device, {passes}, {e['flops']:.3g} FLOPs"
            f"{' on the busiest rank' if ranks > 1 else ''}, ≥ {hours:.2f} h")
    fits = {m for m in ("exact", "screen") if est[m]["fits"]}
    if cfg.method == "auto":
        chosen = "exact" if est["exact"]["fits"] and est["exact"]["passes"] == 1 else "screen"
        log(f"  --method auto would run: {chosen}")
    else:
        chosen = cfg.method
    if chosen not in fits:
        hint = suggest(cfg, shapes, device_bytes, chosen, ranks)
        log(f"  --method {chosen} cannot fit this device" + (f"; it fits with {hint}" if hint else
                                                            ": use a larger device, or torchrun on more GPUs"))
        return 2
    return 0


def suggest(cfg: CorrelateConfig, shapes: list[Shape], device_bytes: float, method: str,
            ranks: int = 1) -> str | None:
    """The first of: 16-bit weights, no layer CKA (its W of every model), smaller batches, that makes it fit."""
    changes: list[tuple[str, dict]] = []
    if cfg.dtype in (None, "float32"):
        changes.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    if cfg.layer_similarity:
        changes.append(("--no-layer-similarity", {"layer_similarity": False}))
    flags, kw = [], {}
    for flag, change in [(None, {}), *changes]:
        if flag:
            flags.append(flag)
            kw.update(change)
        batch = cfg.batch_size
        while batch >= 1:
            trial = replace(cfg, batch_size=batch, **kw)
            if estimate(trial, shapes, device_bytes, ranks)[method]["fits"]:
                extra = [] if batch == cfg.batch_size else [f"--batch-size {batch}"]
                return " ".join(flags + extra) or None
            batch //= 2
    return None
