"""``--method screen`` across the ranks of torchrun: the ranks split the neurons.

    screen   the exact engine's split of blocks (``univ.run.shard_plan``, one token shard per group) over the
             sample; then the per-(neuron, layer) maxima, histograms, CKA and sample-dead columns are reduced,
             so that every rank holds the whole screen (the same one a single process computes)
    verify   each rank gets whole layers of rows (``ScreenRun.own.<p>``, balanced by the first round's work) and
             verifies and certifies only those, over every token; a row's certificate needs no other rank. The
             ranks stream in lockstep: one tiny all_reduce per batch carries a stop signal and notices a dead rank
    outputs  each row's results come from its owner (summed onto every rank, zeros elsewhere: exact), and rank 0
             writes the tables

Checkpoints: one unit per rank per generation under OUT/distributed/, committed by the manifest as the exact
engine's are (``distributed.commit_generation``): at the start and the end of the screen, after every verify
pass, every ``--checkpoint-every`` tokens and on a signal. A kill inside the screen restarts the screen. A screen
checkpoint resumes on the same number of ranks (each holds its own rows).
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from univ.errors import Interrupted
from univ.run import checkpoint, memory
from univ.run.distributed import (
    _any,
    _remove_other_generations,
    _together,
    _unit_path,
    commit_generation,
    group_state,
    unit_meta,
)
from univ.run.plan import pairs_for, rotated_models
from univ.run.screen import ScreenRun
from univ.run.shard_plan import describe_shard_plan, make_shard_plan, make_units, within_bytes
from univ.run.stream import StopFlag

REDUCE_CHUNK = 1 << 24  # elements per collective (64 MB of fp32)
# Row-indexed tensors of a ScreenRun: each row's values live on the rank that owns its layer.
ROW_TENSORS = ("done", "todo", "ex_max", "ex_arg", "ex_rot", "extra_max", "extra_arg", "margin")


@dataclass
class Job:
    """What ``univ.run.distributed`` has set up for this rank before the method's work begins."""

    rank: int
    world: int
    device: torch.device
    comm: torch.device  # where collectives' tensors live (the GPU under NCCL, else the CPU)
    out: Path
    ddir: Path
    models: list
    labels: list
    ident: dict
    operand_dtype: torch.dtype
    batch_bytes: int
    budget: int
    manifest: dict | None
    meter: memory.Meter
    started: float
    progress: bool
    log: object


def run(cfg, job: Job) -> Path:
    """Screen, verify and certify across the ranks; rank 0 writes the outputs. Every rank calls it."""
    if cfg.token_shards not in (None, 1):
        job.log(f"note: --token-shards {cfg.token_shards} is the exact method's split; the screen's ranks split the "
                "neurons and each reads every token")
    srun = ScreenRun(cfg, job.models, job.device, job.operand_dtype, job.rank, job.world)
    if job.rank != 0:
        srun.act_stats = {}  # every rank streams every token: rank 0 alone gathers the statistics
    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0, "screen_s": 0.0}
    if job.manifest is not None:
        _together(_load, job, srun)
    _any(False, job.comm)  # sync: every rank has read its unit before rank 0 cleans up
    if job.rank == 0:
        _remove_other_generations(job.ddir, job.manifest["generation"] if job.manifest else None)
    _any(False, job.comm)  # sync: and before any rank writes the next generation
    with StopFlag() as flag, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="data source .* ran out")  # said in the summary and run.json
        if srun.c["stage"] == "screen":
            if job.manifest is None:
                _commit(job, srun)  # so that --resume after a kill in the screen restarts it
            t0 = time.perf_counter()
            _screen(cfg, job, srun, timings, flag)
            timings["screen_s"] += time.perf_counter() - t0
            _commit(job, srun)
            job.log(f"rank 0 of {job.world}: {srun.verify_line()}")
        else:
            job.log(f"resuming generation {srun.generation}: the verify stage, round {srun.c['round'] + 1}, pass "
                    f"{srun.c['pass'] + 1} after {srun.c['batches_done']} batches")
        _verify(cfg, job, srun, timings, flag)
    merge_results(srun, job.comm)
    return _finish(cfg, job, srun, timings)


def _screen(cfg, job: Job, srun: ScreenRun, timings: dict, flag: StopFlag) -> None:
    """The sample's blocks split over the ranks as the exact engine splits them, then reduced to one screen."""
    from tqdm.auto import tqdm

    n = len(job.models)
    rotated = rotated_models(cfg.mode, n) if cfg.baseline != "none" else []
    plan = make_shard_plan(make_units(pairs_for(cfg.mode, n), srun.n_layers, srun.d), world=job.world,
                           token_shards=1, budget_bytes=job.budget, within=within_bytes(srun.n_layers, srun.d, rotated),
                           reverse=cfg.mode == "all-pairs")
    run_plan, state, mine = group_state(plan, job.rank, job.models, job.device, srun.screen_cfg(), job.batch_bytes)
    gp = plan.groups[job.rank]
    job.log(f"screen method on {job.world} ranks: sample of {srun.screen_tokens:,} tokens (every {srun.stride}th "
            "batch of the stream); the sample's blocks split as the exact method's:")
    job.log(describe_shard_plan(plan))
    w_bytes = sum(w.numel() * w.element_size() for w in state.within.values())
    srun.c["screen_bytes"] = memory.run_bytes(run_plan, srun.screen_cfg(), job.models, active=set(gp.models),
                                              owned=lambda b: b in mine) + w_bytes
    bar = tqdm(total=srun.screen_tokens * plan.n_passes, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not job.progress or job.rank != 0, desc="screen")

    def stop() -> str | None:
        return (flag.signal_name or "a signal on another rank") if _any(flag.stop, job.comm) else None

    try:
        srun.run_screen(state, timings, bar.update, stop, active=lambda p: set(gp.models_in_pass(p)))
    finally:
        bar.close()
    merge_screen(srun, job.comm)
    srun.start_verify()


def merge_screen(srun: ScreenRun, comm: torch.device) -> None:
    """Every rank's share of the screen into the whole screen, on every rank: each (row, layer) maximum, CKA entry
    and histogram count came from one rank's block; a column is dead if no rank that forwarded its model saw it
    move. NaN and −inf mean the same to the certificate (nothing there), so a maximum's NaN reduces as −inf."""
    neg_inf = float("-inf")
    for k in sorted(srun.t):  # the same names, in the same order, on every rank
        if k.startswith(("sc_max.", "sc_rot.")):
            srun.t[k] = _reduce(srun.t[k].nan_to_num(nan=neg_inf), comm, "max")
        elif k.startswith("cka."):
            v = _reduce(srun.t[k].nan_to_num(nan=neg_inf), comm, "max")
            srun.t[k] = torch.where(torch.isinf(v), float("nan"), v)
        elif k.startswith("hist."):
            srun.t[k] = _reduce(srun.t[k], comm, "sum")
    for i, (n_layers, d) in enumerate(zip(srun.n_layers, srun.d, strict=True)):
        dead = srun.t.get(f"screen_dead.{i}", torch.ones(n_layers * d, dtype=torch.bool))
        srun.t[f"screen_dead.{i}"] = _reduce(dead.to(torch.uint8), comm, "min").bool()
    srun.c["flops_screen"] = int(_reduce(torch.tensor([srun.c["flops_screen"]]), comm, "sum").item())


def merge_results(srun: ScreenRun, comm: torch.device) -> None:
    """Every rank's rows into one ScreenRun on every rank (what one process would hold), and the counters."""
    import torch.distributed as dist

    for p in range(len(srun.pairs)):
        own = srun.own_rows(p)
        for name in ROW_TENSORS:
            key = f"{name}.{p}"
            if key not in srun.t:  # ex_rot without a baseline: absent on every rank alike
                continue
            v = srun.t[key]
            mask = own[None, :, None] if name == "ex_rot" else own.view(-1, *([1] * (v.dim() - 1)))
            kept = torch.where(mask, v, torch.zeros((), dtype=v.dtype))
            summed = _reduce(kept.to(torch.uint8) if v.dtype == torch.bool else kept, comm, "sum")
            srun.t[key] = summed.bool() if v.dtype == torch.bool else summed
    names = ("flops_verify", "fallback_rows", "first_alive", "first_fallback", "verify_passes", "verify_bytes")
    parts: list = [None] * srun.world
    dist.all_gather_object(parts, {k: srun.c.get(k, 0) for k in names})
    for k in names[:4]:
        srun.c[k] = sum(part[k] for part in parts)
    for k in names[4:]:  # passes: the ranks streamed them together; bytes: the largest rank's
        srun.c[k] = max(part[k] for part in parts)
    srun.c["certified_first"] = 1 - srun.c["first_fallback"] / max(srun.c["first_alive"], 1)
    for p in range(len(srun.pairs)):  # every row is held here now; keep who verified which layer
        srun.t[f"owner.{p}"] = srun.t.pop(f"own.{p}")


def _reduce(x: torch.Tensor, comm: torch.device, op: str) -> torch.Tensor:
    """All-reduce a CPU tensor into a new one, through ``comm`` in chunks of REDUCE_CHUNK elements: the maxima of
    a 7B pair with 16 draws are ~0.7 GB, which a GPU need not hold at once beside the models."""
    import torch.distributed as dist

    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), REDUCE_CHUNK):
        y = flat[s:s + REDUCE_CHUNK].to(comm, copy=True)
        dist.all_reduce(y, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        out[s:s + REDUCE_CHUNK] = y.cpu()
    return out.view(x.shape)


def _verify(cfg, job: Job, srun: ScreenRun, timings: dict, flag: StopFlag) -> None:
    """``screen_stages.verify_stage`` in lockstep: the flags ORed over the ranks, the position the working ranks'."""
    from univ.run.screen_stages import verify_stage

    def position() -> tuple[int, int]:
        working = srun.c["stage"] == "verify"
        here = [srun.c["batches_done"], srun.c["tokens_done"]] if working else [0, 0]
        return tuple(_reduce(torch.tensor(here, dtype=torch.int64), job.comm, "max").tolist())

    def interrupted(tokens_in: int) -> Interrupted:
        return Interrupted(f"interrupted by {flag.signal_name or 'a signal on another rank'} in the verify stage "
                           f"({tokens_in:,} tokens into the pass); checkpoint generation {srun.generation} written "
                           f"to {job.ddir}. Resume with the same torchrun command and --resume.")

    verify_stage(cfg, srun, job.models[0].tokenizer, timings, flag, commit=lambda: _commit(job, srun),
                 interrupted=interrupted, agree=lambda f: _any(f, job.comm), position=position,
                 progress=job.progress and job.rank == 0)


def _commit(job: Job, srun: ScreenRun) -> None:
    """This rank's unit of the next generation, then the generation (``distributed.commit_generation``)."""
    srun.write_checkpoint(_unit_path(job.ddir, srun.generation + 1, job.rank), job.ident, rank=job.rank,
                          world=job.world)
    commit_generation(job.ddir, srun.generation, job.rank, job.world, job.comm, {
        "method": "screen", "stage": srun.c["stage"], "run_id": job.ident["run_id"], "token_shards": 1,
        "budget_bytes": job.budget, "fingerprint": job.ident["fingerprint"]})


def _load(job: Job, srun: ScreenRun) -> None:
    """This rank's unit of the manifest's generation, checked against the manifest, then taken over."""
    path, meta = unit_meta(job.ddir, job.manifest, job.rank, {"kind": checkpoint.KIND, "method": "screen",
                                                              "world": job.world})
    srun.load_checkpoint(path, meta)


def _finish(cfg, job: Job, srun: ScreenRun, timings: dict) -> Path:
    """Rank 0 writes the outputs (run.json last) with every rank's memory and timings; then the checkpoints go."""
    import torch.distributed as dist

    from univ.run.driver import log_finished
    from univ.run.screen_stages import screen_outputs

    planned = job.meter.planned_peak(srun.peak_bytes())
    mine = {"timings": {k: round(v, 4) for k, v in timings.items()}, "planned_peak_bytes": planned,
            "measured_peak_bytes": job.meter.measured_peak(), "screen_stage_bytes": srun.c["screen_bytes"],
            "row_layers": {f"{a}->{m}": int((srun.t[f"owner.{p}"] == job.rank).sum())
                           for p, (a, m) in enumerate(srun.pairs)}}
    per_rank: list = [None] * job.world
    dist.all_gather_object(per_rank, mine)
    if job.rank == 0:
        peak = max(r["planned_peak_bytes"] for r in per_rank)
        measured = max(r["measured_peak_bytes"] for r in per_rank)
        table, line = screen_outputs(
            cfg, job.out, srun, job.models, job.labels, device=job.device, operand_dtype=job.operand_dtype,
            timings=timings, wall_s=time.time() - job.started, ident=job.ident, batch_bytes=job.batch_bytes,
            memory={"planned_peak_bytes": peak, "measured_peak_bytes": measured,
                    "screen_stage_bytes": max(r["screen_stage_bytes"] for r in per_rank),
                    "per_rank": [{k: r[k] for k in ("planned_peak_bytes", "measured_peak_bytes")} for r in per_rank]},
            extra={"distributed": {"world": job.world, "backend": dist.get_backend(), "ranks": per_rank}})
        shutil.rmtree(job.ddir, ignore_errors=True)
        log_finished(table, cfg, job.out, job.ident["run_id"], srun.c["tokens_seen"], peak, measured, job.log,
                     f"{line} ({job.world} ranks)")
    _any(False, job.comm)  # every rank returns after rank 0 has written the outputs
    return job.out


__all__ = ["Job", "merge_results", "merge_screen", "run"]
