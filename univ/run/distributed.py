"""One ``univ correlate`` job across the ranks of ``torchrun``: the runtime (init, agree, checkpoint, resume).

    torchrun --nproc-per-node 4 -m univ correlate A B C --data corpus.txt --tokens 100000000 --out runs/x

The flow: plan (``univ.run.shard_plan``: block groups × token shards, the cost model) → execute (this module,
streaming through ``univ.run.stream``) → merge (``univ.run.merge``: the collectives) → finalize
(``univ.run.finalize``) → outputs (``univ.run.outputs``). ``--method screen`` (or auto, when the exact plan needs
more than one pass) branches after the models load to ``univ.run.screen_ranks``, on the same runtime.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import torch

from univ.errors import Interrupted, Refused, UserError
from univ.run import memory, reshard
from univ.run.merge import MERGE_CHUNK_BYTES, gather_activation_stats, merge_token_shards, reduce_results
from univ.run.shard_plan import (
    ShardPlan,
    Unit,
    choose_token_shards,
    describe_shard_plan,
    make_shard_plan,
    make_units,
    shard_plan_for_passes,
    within_bytes,
)

# ----------------------------------------------------------------------------------------------------------------------
# The run across ranks
#
# Every rank: load the models → the same plan (budget = the smallest rank's) → for each pass: read every batch,
# forward and accumulate those of its token shard, agree after each batch whether to stop (one tiny all_reduce,
# which also notices a dead rank) → checkpoint at the pass's end → merge the group's token shards into the group
# root (Chan), which finalizes the group's blocks → after the last pass reduce the per-neuron results over all
# ranks (max with index, histograms summed) → rank 0 writes the outputs (holding the lock on OUT throughout).
# Checkpoints: one checksummed file per rank per generation, OUT/distributed/gen-<g>/rank-<r>.safetensors, and
# OUT/distributed/manifest.json naming the last generation every rank finished.

ENV_TIMEOUT = "UNIV_DIST_TIMEOUT"  # seconds a collective waits for a dead or stuck rank before every rank fails
DEFAULT_TIMEOUT_S = 300.0
DIST_DIR = "distributed"
MANIFEST = "manifest.json"
UNIT_KIND, UNIT_VERSION = "univ.correlate.rank-checkpoint", 1
_COMM_ERRORS = ("Connection closed", "Connection reset", "Timed out", "timed out", "gloo", "NCCL", "Broken pipe")


def launched() -> bool:
    """True under torchrun with more than one rank (or inside an initialized process group of several)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    return float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))


class RankFailed(UserError):
    """Another rank died or stopped answering; the last complete checkpoint generation is intact."""


def _init(cfg) -> tuple[torch.device, bool]:
    """Join the group torchrun describes (env://): NCCL and one GPU per local rank on CUDA, gloo on CPU."""
    import torch.distributed as dist

    from univ.run.config import resolve_device

    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    return device, True


def run(cfg, *, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> Path:
    """The correlate run of ``univ.run.driver.run``, on this rank of a torchrun job; every rank calls it."""
    import torch.distributed as dist

    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite discards it: pass one of them")
    _refuse_screen_checkpoint(cfg, overwrite)
    device, created = _init(cfg)
    try:
        return _run(cfg, device, resume=resume, overwrite=overwrite, progress=progress, log=log)
    except (dist.DistError, RuntimeError) as e:
        if isinstance(e, dist.DistError) or any(s in str(e) for s in _COMM_ERRORS):
            raise RankFailed(
                f"rank {dist.get_rank()}: another rank of the distributed run failed or stopped answering "
                f"({str(e).splitlines()[0][:160]}); the last complete checkpoint in {cfg.out} is intact: "
                "rerun the same torchrun command with --resume") from e
        raise
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _refuse_screen_checkpoint(cfg, overwrite: bool) -> None:
    """A screen run's checkpoint resumes only in one process, the way it was written."""
    from pathlib import Path

    from univ.run import checkpoint
    from univ_kernels.io import read_meta

    file = checkpoint.path(Path(cfg.out))
    if overwrite or not file.exists():
        return
    try:
        method = read_meta(file)[0].get("method", "exact")
    except Exception:  # an unreadable checkpoint is refused later, with the reason
        return
    if method == "screen":
        raise Refused(f"{file} is a checkpoint of a one-process --method screen run, which resumes in one process: "
                      "rerun the command without torchrun (with --resume), or pass --overwrite to start again")


def _any(flag: bool, device: torch.device) -> bool:
    """sync: every rank learns whether any rank asked to stop (and a dead rank shows up here, within the timeout)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _together(fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it raised a UserError on any rank, raise that error (the lowest rank's) on all
    of them, so that one rank's refusal is every rank's one-line message instead of a hang."""
    import torch.distributed as dist

    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        error = (type(e).__name__, str(e))
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        cls = {"Refused": Refused, "Interrupted": Interrupted}.get(first[0], UserError)
        raise cls(first[1])
    return result


def _prepare(out: Path, ddir: Path, *, rank: int, resume: bool, overwrite: bool, log) -> dict | None:
    """What the folder holds, checked by every rank (a shared --out); rank 0 removes what --overwrite discards.

    Resuming returns the distributed manifest, or for a one-process checkpoint (the newer one, if both) the same
    keys from its header with ``single``.
    """
    from univ.run import checkpoint
    from univ.run.folder import MANIFEST as RUN_JSON
    from univ.run.folder import remove_outputs
    from univ_kernels.io import remove_stale_temps

    if rank == 0:
        for d in (out, out / "state"):
            for p in remove_stale_temps(d):
                log(f"note: removed {p.name}, a temporary file left by an interrupted write")
        if overwrite:
            remove_outputs(out, log)
            checkpoint.remove(out)
            shutil.rmtree(ddir, ignore_errors=True)
    if overwrite:
        return None
    finished, source = (out / RUN_JSON).exists(), reshard.newest_source(out)
    if resume:
        if source is None:
            if finished:
                raise Refused(f"--resume: the run in {out} already finished (run.json); nothing to resume. "
                              "To run it again, pass --overwrite instead")
            raise UserError(f"--resume: no checkpoint in {out} (expected {DIST_DIR}/{MANIFEST} or "
                            f"{checkpoint.FILE}); start without --resume")
        if source == "ranks":
            return json.loads((ddir / MANIFEST).read_text())
        meta = checkpoint.read_header(out)
        return {"single": True, "world": 1, "token_shards": 1, "run_id": meta["run_id"],
                "generation": meta["generation"], "fingerprint": meta["fingerprint"],
                "budget_bytes": meta["plan"]["budget_bytes"]}
    if source is not None:
        raise Refused(f"{out} holds an unfinished run: pass --resume to continue it, --overwrite to discard it, "
                      "or choose another --out")
    if finished:
        raise Refused(f"{out} holds a finished run (run.json): pass --overwrite to replace it, or choose another "
                      "--out")
    return None


def _run(cfg, device: torch.device, *, resume: bool, overwrite: bool, progress: bool, log) -> Path:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from univ.data import source_files
    from univ.run import identity, stream
    from univ.run.checkpoint import next_checkpoint as _next_checkpoint
    from univ.run.config import model_labels
    from univ.run.driver import resumed_method
    from univ.run.finalize import finalize_pass
    from univ.run.folder import OutLock, open_folder
    from univ.run.inputs import load_models
    from univ.run.outputs import build_manifest, summary_text, write_outputs
    from univ.run.plan import Plan, accumulator_budget, pairs_for, rotated_models
    from univ.run.stream import process_batch, token_stream
    from univ_kernels.streaming import default_operand_dtype

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = _comm_device(device)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    started = time.time()
    out = Path(cfg.out)
    ddir = out / DIST_DIR
    data_files = _together(source_files, cfg.data)  # a bad --data fails here, on every rank, before anything slow
    _together(open_folder, out)
    with ExitStack() as held:
        if rank == 0:  # one writer per folder: the job (rank 0 holds the lock for all ranks)
            _together(lambda: held.enter_context(OutLock(out, log)))
        else:
            _together(lambda: None)
        _any(False, comm)  # sync: rank 0's removals (--overwrite, stale temps) happen before anyone looks
        manifest = _together(_prepare, out, ddir, rank=rank, resume=resume, overwrite=overwrite, log=log)
        screened = manifest is not None and manifest.get("method") == "screen"
        if screened and manifest["world"] != world:
            raise Refused(f"--resume: the checkpoint in {out} is of a --method screen run on {manifest['world']} "
                          f"ranks, which resumes on {manifest['world']} ranks (each holds its own rows): rerun with "
                          f"torchrun --nproc-per-node {manifest['world']}, or pass --overwrite to start again")
        # The same world and token shards: each rank reads back its own unit (bitwise the same run). Any other
        # checkpoint (one process, another world size or --token-shards) is re-sharded from its snapshot.
        same_layout = manifest is not None and not manifest.get("single") and manifest["world"] == world and \
            cfg.token_shards in (None, manifest["token_shards"])
        if manifest is not None:
            resumed_method(cfg, "screen" if screened else "exact")
        snap = _together(reshard.read_snapshot, out) if manifest is not None and not same_layout else None

        models = _together(load_models, cfg, device)
        meter = memory.Meter(device)  # this rank's fixed cost, what its plan builds on
        fingerprint = None
        if rank == 0:
            fingerprint = {"options": identity.fingerprint(cfg, [], data_files)["options"],
                           "models": [identity.model_fingerprint(lm) for lm in models],
                           "data": identity.data_fingerprint(cfg, data_files)}
        fingerprint = _bcast(fingerprint)
        if manifest is not None:
            diffs = identity.differences(manifest["fingerprint"], fingerprint)
            if diffs:
                raise Refused(f"--resume: the checkpoint in {out} was written for another run: " + "; ".join(diffs)
                              + ". Resume with the original models, data and options, or pass --overwrite")
        ident = {"run_id": manifest["run_id"] if manifest else _bcast(identity.new_run_id() if rank == 0 else None),
                 "fingerprint": fingerprint}

        labels = model_labels(cfg.models)
        operand_dtype = getattr(torch, cfg.operand_dtype) if cfg.operand_dtype else \
            default_operand_dtype(device, models[0].dtype)
        n_layers, d_mlp = [lm.n_layers for lm in models], [lm.d_mlp for lm in models]
        t_batch = cfg.batch_size * cfg.ctx
        batch_bytes = sum(t_batch * lm.n_neurons * (lm.dtype.itemsize + 4 + operand_dtype.itemsize) for lm in models)

        # -- the plan: the same on every rank (smallest budget of any rank) --------------------------------------
        units = make_units(pairs_for(cfg.mode, len(models)), n_layers, d_mlp)
        within = within_bytes(n_layers, d_mlp, rotated_models(cfg.mode, len(models)) if cfg.baseline != "none" else [])
        reverse = cfg.mode == "all-pairs"
        costs = None
        if same_layout:
            k, budget = manifest["token_shards"], manifest["budget_bytes"]
        else:
            budget = accumulator_budget(cfg, device, batch_bytes)
            t = torch.tensor([budget], dtype=torch.int64, device=comm)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            budget = int(t.item())
        if screened or (manifest is None and _screen_chosen(cfg, units, world, budget, within, reverse, log)):
            from univ.run import screen_ranks

            job = screen_ranks.Job(rank=rank, world=world, device=device, comm=comm, out=out, ddir=ddir,
                                   models=models, labels=labels, ident=ident, operand_dtype=operand_dtype,
                                   batch_bytes=batch_bytes, budget=budget, manifest=manifest, meter=meter,
                                   started=started, progress=progress, log=log)
            return screen_ranks.run(cfg, job)
        if snap is not None:  # the checkpoint's passes, split over this world
            k = cfg.token_shards or 1
            old = Plan.from_dict(snap.plan, d_mlp, n_layers, batch_bytes)
            pass_units = [[Unit(b.a, b.m, layer, 4 * d_mlp[b.a] * n_layers[b.m] * d_mlp[b.m])
                           for b in blocks for layer in range(b.layer_start, b.layer_end)] for blocks in old.passes]
            plan = _together(shard_plan_for_passes, pass_units, world=world, token_shards=k, budget_bytes=budget,
                             within=within, reverse=reverse)
        elif manifest is None:
            flops = [2.0 * sum(p.numel() for p in lm.model.parameters()) for lm in models]
            k_auto, costs = choose_token_shards(units, world=world, budget_bytes=budget, tokens=cfg.tokens,
                                                forward_flops_per_token=flops,
                                                n_neurons=[lm.n_neurons for lm in models],
                                                device_type=device.type, within=within, reverse=reverse)
            k = cfg.token_shards or k_auto
        if snap is None:
            plan = make_shard_plan(units, world=world, token_shards=k, budget_bytes=budget, within=within,
                                   reverse=reverse)
        log(describe_shard_plan(plan, costs))
        g = plan.group_of(rank)
        gp = plan.groups[g]
        root = plan.shard_of(rank) == 0
        groups = [dist.new_group(plan.group_ranks(i)) for i in range(len(plan.groups))] if k > 1 else None
        sub = groups[g] if groups else None
        run_plan, state, mine = group_state(plan, g, models, device, cfg, batch_bytes)
        # Each analysed model's activation statistics come from one group (every batch once: its token shards),
        # the first that forwards the model, in that pass; rank 0 merges them after the last pass.
        owners = stats_owners(plan, list(state.act_stats))
        state.act_stats = {i: st for i, st in state.act_stats.items() if owners[i][1] == g}
        state.stats_pass = {i: p_ for i, (p_, _) in owners.items()}
        w_bytes = sum(w.numel() * w.element_size() for w in state.within.values())
        merge_bytes = 2 * MERGE_CHUNK_BYTES if k > 1 else 0
        planned_peak = meter.planned_peak(memory.run_bytes(run_plan, cfg, models, active=set(gp.models),
                                                           owned=lambda b: b in mine) + w_bytes + merge_bytes)
        log(f"  planned peak of rank 0 (process, {device}): {memory.format_bytes(planned_peak)}")
        if snap is not None:
            here = {i for i in state.act_stats if root}
            _together(reshard.apply_snapshot, snap, state, shard0=root, rank0=rank == 0, stats_here=here,
                      forwarded=set(gp.models_in_pass(snap.counters["pass_index"])))
            log(f"re-sharded the checkpoint of {snap.source} onto {world} ranks ({k} token shard"
                f"{'s' if k > 1 else ''})")
        elif manifest is not None:
            _together(_load_unit, ddir, manifest, rank, state, cfg, run_plan)
        if manifest is not None:
            where = "the end of its stream" if state.streamed else f"{state.tokens_done:,} tokens"
            log(f"resuming generation {state.generation}: pass {state.pass_index + 1} after {where}")
        _any(False, comm)  # sync: every rank has read its unit before rank 0 cleans up
        if rank == 0:
            _remove_other_generations(ddir, state.generation if manifest is not None else None)

        timings = {k_: 0.0 for k_ in ("forward_s", "kernels_s", "finalize_s", "merge_s", "sync_s", "stream_s")}
        bar = tqdm(total=cfg.tokens * plan.n_passes, unit="tok", unit_scale=True, dynamic_ncols=True,
                   disable=not progress or rank != 0, initial=state.pass_index * cfg.tokens + state.tokens_done)
        next_ckpt = _next_checkpoint(cfg, state.tokens_done)
        tokens_seen = 0

        def checkpoint() -> None:
            _checkpoint(ddir, state, cfg, plan, ident, rank, comm)

        def interrupted(flag) -> Interrupted:
            bar.close()
            return Interrupted(f"interrupted by {flag.signal_name or 'a signal on another rank'} in pass "
                               f"{state.pass_index + 1} of {state.n_passes} ({state.tokens_done:,} tokens in); "
                               f"checkpoint generation {state.generation} written to {ddir}. Resume with the same "
                               "torchrun command and --resume.")

        with stream.StopFlag() as flag:
            while not state.finished:
                p = state.pass_index
                active = set(gp.models_in_pass(p))
                bar.set_description(f"pass {p + 1}/{plan.n_passes}")
                if not state.streamed:
                    t_pass = time.perf_counter()
                    for batch in token_stream(cfg, models[0].tokenizer, skip_batches=state.batches_done):
                        if active and plan.owns_batch(rank, state.batches_done):
                            process_batch(state, models, batch.input_ids, batch.keep, cfg, operand_dtype, timings,
                                          active=active)
                        state.batches_done += 1
                        state.tokens_done += batch.n_kept  # every rank counts every batch: one clock for all
                        bar.update(batch.n_kept)
                        t_sync = time.perf_counter()
                        stop = _any(flag.stop, comm)
                        timings["sync_s"] += time.perf_counter() - t_sync  # includes waiting for the slowest rank
                        if stop:
                            checkpoint()
                            raise interrupted(flag)
                        if next_ckpt is not None and next_ckpt <= state.tokens_done < cfg.tokens:
                            checkpoint()
                            next_ckpt = _next_checkpoint(cfg, state.tokens_done)
                    timings["stream_s"] += time.perf_counter() - t_pass
                    if state.tokens_done == 0:
                        raise UserError(f"no tokens were read from {cfg.data!r}: is it empty, or is every position "
                                        "excluded?")
                    state.streamed = True
                    checkpoint()  # merge, finalize and the outputs can be retried from here
                t0 = time.perf_counter()
                if sub is not None:
                    merge_token_shards(state, active, sub, within=p == 0)
                timings["merge_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if root:
                    finalize_pass(state, cfg)
                    if cfg.save_state:
                        _save_pass_state(out, state, rank, ident)
                timings["finalize_s"] += time.perf_counter() - t0
                tokens_seen = state.tokens_done
                state.start_pass(p + 1)
                if not state.finished:
                    checkpoint()
                    next_ckpt = _next_checkpoint(cfg, 0)
                    if _any(flag.stop, comm):
                        raise interrupted(flag)
            bar.close()

            t0 = time.perf_counter()
            reduce_results(state)
            if cfg.activation_stats:
                gather_activation_stats(state)
            timings["reduce_s"] = time.perf_counter() - t0
            per_rank: list = [None] * world  # what each rank did and held, for run.json and bench/bench_scaling.py
            dist.all_gather_object(per_rank, {"timings": {k_: round(v, 4) for k_, v in timings.items()},
                                              "accumulator_bytes": plan.rank_bytes(rank),
                                              "planned_peak_bytes": planned_peak,
                                              "measured_peak_bytes": meter.measured_peak(),
                                              "models_forwarded": gp.models})
            if rank == 0:
                info = build_manifest(cfg, state, run_plan, models, labels, tokens_seen=tokens_seen, device=device,
                                      operand_dtype=operand_dtype, timings=timings, wall_s=time.time() - started,
                                      run_id=ident["run_id"], fingerprint=fingerprint)
                info["distributed"] = {"world": world, "backend": dist.get_backend(), **plan.to_dict(),
                                       "ranks": per_rank}
                info["memory"].update(planned_peak_bytes=max(r["planned_peak_bytes"] for r in per_rank),
                                      measured_peak_bytes=max(r["measured_peak_bytes"] for r in per_rank),
                                      per_rank=[{k_: r[k_] for k_ in ("planned_peak_bytes", "measured_peak_bytes")}
                                                for r in per_rank])
                table = write_outputs(out, state, models, labels, cfg, info)
                shutil.rmtree(ddir, ignore_errors=True)
                log(summary_text(table))
                for r, got in enumerate(per_rank):
                    log(f"rank {r} " + memory.summary_line(got["planned_peak_bytes"], got["measured_peak_bytes"]))
                log(f"wrote {out / 'neurons.parquet'} and {out / 'run.json'} ({world} ranks, run id "
                    f"{ident['run_id']})")
            _any(False, comm)  # every rank returns after rank 0 has written the outputs
    return out


def _screen_chosen(cfg, units, world: int, budget: int, within, reverse: bool, log) -> bool:
    """--method auto across ranks: exact when its accumulators fit the ranks in one pass, screen otherwise."""
    from univ.run.driver import auto_method
    from univ.run.plan import PlanError

    if cfg.method != "auto":
        return cfg.method == "screen"
    try:
        passes = make_shard_plan(units, world=world, token_shards=cfg.token_shards or 1, budget_bytes=budget,
                                 within=within, reverse=reverse).n_passes
    except PlanError:
        passes = None
    return auto_method(passes, log, f" over {world} ranks") == "screen"


def group_state(plan: ShardPlan, g: int, models, device: torch.device, cfg, batch_bytes: int):
    """(the run's Plan of every group's blocks, the RunState of group g's share, its blocks): the blocks it
    accumulates, and W only of the models it rotates (and, for the layer CKA, of its blocks' models)."""
    from univ.run.plan import Block, Plan
    from univ.run.state import RunState

    gp = plan.groups[g]
    n_layers, d_mlp = [lm.n_layers for lm in models], [lm.d_mlp for lm in models]
    passes = [[Block(**b.__dict__) for grp in plan.groups for b in grp.blocks(p)] for p in range(plan.n_passes)]
    mine = {Block(**b.__dict__) for p in range(plan.n_passes) for b in gp.blocks(p)}
    run_plan = Plan(passes, d_mlp, n_layers, plan.budget_bytes, batch_bytes)
    state = RunState(run_plan, models, device, cfg, owns=lambda b: b in mine)
    keep = set(gp.within) | ({i for b in mine for i in (b.a, b.m)} if cfg.layer_similarity else set())
    state.within = {i: w for i, w in state.within.items() if i in keep}
    return run_plan, state, mine


def _bcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stats_owners(plan: ShardPlan, models: list[int]) -> dict[int, tuple[int, int]]:
    """model → (pass, group): the first pass in which some group forwards the model, and the first such group."""
    owners = {}
    for i in models:
        owners[i] = next(((p, g) for p in range(plan.n_passes) for g, grp in enumerate(plan.groups)
                          if i in grp.models_in_pass(p)), (0, 0))
    return owners


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


# -- checkpoints: one checksummed file per rank per generation, and a manifest ------------------------------------


def _unit_path(ddir: Path, generation: int, rank: int) -> Path:
    return ddir / f"gen-{generation}" / f"rank-{rank}.safetensors"


def _checkpoint(ddir: Path, state, cfg, plan: ShardPlan, ident: dict, rank: int, comm) -> None:
    """Write this rank's unit of the exact run's next generation, then commit the generation."""
    from univ import __version__
    from univ.run import files

    state.generation += 1
    g = state.generation
    meta = {"kind": UNIT_KIND, "version": UNIT_VERSION, "run_id": ident["run_id"], "generation": g, "rank": rank,
            "world": plan.world, "plan": state.plan.to_dict(), "counters": state.counters(),
            "univ_version": __version__}
    files.write_tensors(_unit_path(ddir, g, rank), state.named(), meta)
    commit_generation(ddir, g, rank, plan.world, comm, {
        "run_id": ident["run_id"], "token_shards": plan.token_shards, "budget_bytes": plan.budget_bytes,
        "pass_index": state.pass_index, "tokens_done": state.tokens_done, "fingerprint": ident["fingerprint"]})


def commit_generation(ddir: Path, g: int, rank: int, world: int, comm, manifest: dict) -> None:
    """After this rank wrote its unit of generation g: once every rank has, rank 0 points the manifest at g; then
    generation g − 1 goes. A crash anywhere leaves the manifest naming a generation whose units all exist."""
    from univ.run import checkpoint, files

    _any(False, comm)  # sync: every rank's unit of this generation is on disk
    if rank == 0:
        files.write_json(ddir / MANIFEST, {"generation": g, "world": world, **manifest,
                                           "units": [str(_unit_path(ddir, g, r).relative_to(ddir))
                                                     for r in range(world)]})
    _any(False, comm)  # sync: the manifest names this generation before any rank drops the previous one
    _unit_path(ddir, g - 1, rank).unlink(missing_ok=True)
    if rank == 0:
        shutil.rmtree(ddir / f"gen-{g - 1}", ignore_errors=True)
        if checkpoint.exists(ddir.parent):  # a one-process checkpoint this run resumed from: older now
            checkpoint.remove(ddir.parent)


def _load_unit(ddir: Path, manifest: dict, rank: int, state, cfg, run_plan) -> None:
    """This rank's unit of the manifest's generation, validated (digest, names, shapes, checksums, identity)."""
    from univ_kernels.io import StateFileError, read_tensors

    def more(meta: dict) -> list[str]:
        bad = []
        if meta.get("plan") != json.loads(json.dumps(run_plan.to_dict())):
            bad.append("another plan of blocks than this run computes")
        c = meta.get("counters", {})
        if not 0 <= c.get("pass_index", -1) < state.n_passes or not 0 <= c.get("tokens_done", -1) <= cfg.tokens:
            bad.append(f"counters {c}")
        return bad

    path, meta = unit_meta(ddir, manifest, rank, {"kind": UNIT_KIND, "version": UNIT_VERSION,
                                                  "world": manifest["world"]}, more)
    c = meta["counters"]
    state.start_pass(c["pass_index"])
    try:
        tensors, _ = read_tensors(path, state.expected())
    except StateFileError as e:
        raise Refused(f"checkpoint unusable: {e}; start again with --overwrite") from e
    state.load(tensors, c)
    state.generation = manifest["generation"]


def unit_meta(ddir: Path, manifest: dict, rank: int, want: dict, more=lambda meta: []) -> tuple[Path, dict]:
    """(path, header) of this rank's unit of the manifest's generation; Refused if it is unreadable, or its header
    differs from the manifest (run, generation, rank), from ``want`` or in what ``more(header)`` lists."""
    from univ_kernels.io import StateFileError, read_meta

    path = _unit_path(ddir, manifest["generation"], rank)
    try:
        meta, _ = read_meta(path)
    except (OSError, StateFileError) as e:
        raise Refused(f"checkpoint unusable: {path}: {e}; start again with --overwrite") from e
    want = {"run_id": manifest["run_id"], "generation": manifest["generation"], "rank": rank, **want}
    bad = [f"{k} {meta.get(k)!r} (expected {v!r})" for k, v in want.items() if meta.get(k) != v] + more(meta)
    if bad:
        raise Refused(f"checkpoint unusable: {path} has {'; '.join(bad)}; start again with --overwrite")
    return path, meta


def _remove_other_generations(ddir: Path, keep: int | None) -> None:
    """Units of an unfinished generation (a crash before its manifest) or of older ones: never read again."""
    if not ddir.exists():
        return
    for d in ddir.glob("gen-*"):
        if keep is None or d.name != f"gen-{keep}":
            shutil.rmtree(d, ignore_errors=True)


def _save_pass_state(out: Path, state, rank: int, ident: dict) -> None:
    """OUT/state/pass-<p>.rank-<r>.safetensors: the blocks (and W) this group root holds, for re-analysis."""
    from univ.run import files

    named = {k: v for k, v in state.named().items() if not k.startswith(("result.", "hist."))}
    meta = {"kind": "univ.correlate.state", "version": UNIT_VERSION, "run_id": ident["run_id"], "rank": rank,
            "pass_index": state.pass_index, "plan": state.plan.to_dict(), "counters": state.counters()}
    files.write_tensors(out / "state" / f"pass-{state.pass_index}.rank-{rank}.safetensors", named, meta)
