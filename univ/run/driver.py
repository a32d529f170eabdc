"""``run``: one correlate experiment from options to outputs, in the order the stages happen.

    check data path, OUT (lock), options → fingerprint the data → load models → plan memory (blocks,
    passes) → for each pass: stream batches (``stream``) → checkpoint → finalize the pass's blocks
    (``finalize``) → next pass's checkpoint … → neurons.parquet, histograms, run.json last (``outputs``)

Every write goes through ``univ.run.files`` (atomic). A checkpoint is written every ``checkpoint_every``
tokens, when a signal stops the run, at the end of each pass's stream (so finalize and the outputs can be
retried from it) and at the start of each later pass. What survives what is listed in the README.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from univ.errors import Interrupted, Refused, UserError
from univ.run import checkpoint, identity, memory, reshard, stream
from univ.run.checkpoint import next_checkpoint
from univ.run.config import CorrelateConfig, model_labels, resolve_device
from univ.run.finalize import finalize_pass
from univ.run.folder import MANIFEST as RUN_JSON
from univ.run.folder import OutLock, open_folder, prepare
from univ.run.inputs import load_models
from univ.run.outputs import build_manifest, summary_text, write_outputs
from univ.run.plan import Plan, PlanError, describe_plan, make_plan
from univ.run.state import RunState
from univ_kernels.io import NoSpace, remove_stale_temps


def run(cfg: CorrelateConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        log=print) -> Path:
    """Run (or resume) a correlate experiment; returns the output directory.

    Raises ``UserError`` (bad input), ``Refused`` (going on would change or lose a result: a folder in use,
    holding another run, a checkpoint that does not match) or ``Interrupted`` (a signal; checkpoint written).
    """
    from univ.data import source_files
    from univ.run import distributed  # under torchrun: one job across the ranks

    if distributed.launched():
        return distributed.run(cfg, resume=resume, overwrite=overwrite, progress=progress, log=log)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite discards it: pass one of them")
    data_files = source_files(cfg.data)  # a bad --data fails here, before anything slow
    out = Path(cfg.out)
    open_folder(out)
    with OutLock(out, log):
        meta = _resume_source(out, resume=resume, overwrite=overwrite, log=log)
        try:
            device = resolve_device(cfg.device)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        try:
            return _run(cfg, out, meta, device, data_files, progress=progress, log=log)
        except NoSpace as e:
            kept = (f"the last checkpoint in {out} is intact: free space, then rerun with --resume"
                    if checkpoint.exists(out) else "free space, then rerun")
            raise UserError(f"{e.strerror}; {kept}") from e


def _resume_source(out: Path, *, resume: bool, overwrite: bool, log) -> dict | None:
    """``prepare``'s metadata of the checkpoint to resume, or — when the newest one was written across ranks —
    the same keys from its snapshot (``univ.run.reshard``), which this process then loads whole."""
    if overwrite:
        shutil.rmtree(out / reshard.DIST_DIR, ignore_errors=True)
    elif reshard.newest_source(out) == "ranks":
        dist_manifest = reshard.distributed_manifest(out)
        world = dist_manifest.get("world", "?")
        if dist_manifest.get("method") == "screen":
            raise Refused(f"{out} holds an unfinished --method screen run of {world} ranks, which resumes on {world} "
                          f"ranks (each holds its own rows): rerun under torchrun --nproc-per-node {world} with "
                          "--resume, or pass --overwrite to start again here")
        if not resume:
            raise Refused(f"{out} holds an unfinished run (a checkpoint of {world} ranks): pass --resume to continue "
                          "it, in this process or any number of ranks, --overwrite to discard it, or choose another "
                          "--out")
        if (out / RUN_JSON).exists():
            raise Refused(f"--resume: the run in {out} already finished (run.json); nothing to resume. To run it "
                          "again, pass --overwrite instead")
        for p in remove_stale_temps(out):
            log(f"note: removed {p.name}, a temporary file left by an interrupted write")
        snap = reshard.read_snapshot(out)
        return {"fingerprint": snap.fingerprint, "run_id": snap.run_id, "plan": snap.plan, "snapshot": snap}
    return prepare(out, resume=resume, overwrite=overwrite, log=log)


def _check_fits(plan: Plan, cfg: CorrelateConfig, device: torch.device, source: str) -> None:
    from univ.run.plan import accumulator_budget, format_bytes

    budget = accumulator_budget(cfg, device, plan.fixed_bytes)
    need = max(sum(plan.block_bytes(b) for b in p) for p in plan.passes)
    if need > budget:
        raise PlanError(f"the checkpoint of {source} has a pass of {format_bytes(need)} of accumulators, more than "
                        f"this process's {format_bytes(max(budget, 0))} budget: resume it under torchrun on more "
                        "ranks, or raise --memory-budget")


def _check_fingerprint(out: Path, saved: dict, now: dict) -> None:
    diffs = identity.differences(saved, now)
    if diffs:
        raise Refused(f"--resume: the checkpoint in {out} was written for another run: " + "; ".join(diffs)
                      + ". Resume with the original models, data and options, or pass --overwrite to start again")


def _run(cfg: CorrelateConfig, out: Path, meta: dict | None, device: torch.device, data_files, *, progress: bool,
         log) -> Path:
    from tqdm.auto import tqdm

    started = time.time()
    data_fp = identity.data_fingerprint(cfg, data_files)
    options_fp = identity.fingerprint(cfg, [], data_files)["options"]
    if meta is not None:  # options and data first: cheap, and before the models load
        saved = meta["fingerprint"]
        _check_fingerprint(out, {**saved, "models": []}, {"options": options_fp, "models": [], "data": data_fp})
    models = load_models(cfg, device)
    meter = memory.Meter(device)  # what the process holds now is the fixed cost the plan builds on
    fingerprint = {"options": options_fp, "models": [identity.model_fingerprint(lm) for lm in models],
                   "data": data_fp}
    if meta is not None:
        _check_fingerprint(out, meta["fingerprint"], fingerprint)
    ident = {"run_id": meta["run_id"] if meta else identity.new_run_id(), "fingerprint": fingerprint}

    labels = model_labels(cfg.models)
    # Centred fp16 operands on CUDA whatever the model dtype: as fast as bf16, and 2.4e-5 in r with fp32
    # models (issue 12); fp32 on CPU, whose BLAS has no fast half path.
    operand_dtype = getattr(torch, cfg.operand_dtype) if cfg.operand_dtype else \
        (torch.float16 if device.type == "cuda" else torch.float32)
    n_layers = [lm.n_layers for lm in models]
    d_mlp = [lm.d_mlp for lm in models]
    t_batch = cfg.batch_size * cfg.ctx
    batch_bytes = sum(t_batch * lm.n_neurons * (lm.dtype.itemsize + 4 + operand_dtype.itemsize) for lm in models)
    method = _resolve_method(cfg, meta, n_layers, d_mlp, device, batch_bytes, log)
    if method == "screen":
        return _run_screen(cfg, out, meta, models, device, operand_dtype, batch_bytes, ident, labels, meter,
                           started, progress=progress, log=log)
    if meta is not None:
        plan = Plan.from_dict(meta["plan"], d_mlp, n_layers, batch_bytes)
        if "snapshot" in meta:  # written across ranks: its passes must fit this one process
            _check_fits(plan, cfg, device, meta["snapshot"].source)
    else:
        plan = make_plan(cfg, n_layers, d_mlp, device, batch_bytes)
    planned_peak = meter.planned_peak(memory.run_bytes(plan, cfg, models))
    log(describe_plan(plan, cfg, models, device))
    log(f"  planned peak (process, {device})      {memory.format_bytes(planned_peak):>10s}")
    if data_files is not None and (len(data_files) > 1 or str(data_files[0]) != cfg.data):
        shown = ", ".join(str(p) for p in data_files[:10]) + (f", … ({len(data_files)} files)"
                                                              if len(data_files) > 10 else "")
        log(f"  data: {shown}")
    state = RunState(plan, models, device, cfg)
    if meta is not None and "snapshot" in meta:
        snap = meta["snapshot"]
        reshard.apply_snapshot(snap, state)
        checkpoint.write(out, state, ident)  # in this process's layout (a newer generation), then the ranks' go
        shutil.rmtree(out / reshard.DIST_DIR, ignore_errors=True)
        log(f"resumed from the checkpoint of {snap.source}")
    elif meta is not None:
        checkpoint.load_into(out, state, meta)
    if meta is not None:
        where = "the end of its stream" if state.streamed else f"{state.tokens_done:,} tokens"
        log(f"resuming pass {state.pass_index + 1} after {where} (checkpoint generation {state.generation})")

    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0}
    bar = tqdm(total=cfg.tokens * len(plan.passes), unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True, initial=state.pass_index * cfg.tokens + state.tokens_done)
    next_ckpt = [next_checkpoint(cfg, state.tokens_done)]

    def after_batch(st: RunState, n_kept: int) -> None:
        bar.update(n_kept)
        # (not after the pass's last batch: the end-of-pass checkpoint follows at once)
        if next_ckpt[0] is not None and next_ckpt[0] <= st.tokens_done < cfg.tokens:
            checkpoint.write(out, st, ident)
            next_ckpt[0] = next_checkpoint(cfg, st.tokens_done)

    def interrupted(flag: stream.StopFlag) -> Interrupted:
        bar.close()
        return Interrupted(f"interrupted by {flag.signal_name} in pass {state.pass_index + 1} of {state.n_passes} "
                           f"({state.tokens_done:,} tokens in); checkpoint written to {checkpoint.path(out)}. "
                           "Resume with --resume (the same command and options).")

    tokens_seen = 0
    with stream.StopFlag() as flag:
        while not state.finished:
            bar.set_description(f"pass {state.pass_index + 1}/{len(plan.passes)}")
            if not state.streamed:
                if not stream.stream_pass(state, models, cfg, operand_dtype, timings, flag, after_batch):
                    checkpoint.write(out, state, ident)
                    raise interrupted(flag)
                state.streamed = True
                checkpoint.write(out, state, ident)  # finalize and the outputs can be retried from here
            t0 = time.perf_counter()
            finalize_pass(state, cfg)
            if cfg.save_state:
                checkpoint.save_pass_state(out, state, ident)
            timings["finalize_s"] += time.perf_counter() - t0
            tokens_seen = state.tokens_done
            state.start_pass(state.pass_index + 1)
            if not state.finished:
                checkpoint.write(out, state, ident)
                next_ckpt[0] = next_checkpoint(cfg, 0)
                if flag.stop:
                    raise interrupted(flag)
        bar.close()
        # A signal from here on is noted by the flag and the outputs are still written (seconds).
        manifest = build_manifest(cfg, state, plan, models, labels, tokens_seen=tokens_seen, device=device,
                                  operand_dtype=operand_dtype, timings=timings, wall_s=time.time() - started,
                                  run_id=ident["run_id"], fingerprint=fingerprint)
        manifest["method"] = "exact"
        measured_peak = meter.measured_peak()
        manifest["memory"].update(planned_peak_bytes=planned_peak, measured_peak_bytes=measured_peak)
        table = write_outputs(out, state, models, labels, cfg, manifest)
        checkpoint.remove(out)
    log_finished(table, cfg, out, ident["run_id"], tokens_seen, planned_peak, measured_peak, log)
    return out


def log_finished(table, cfg: CorrelateConfig, out: Path, run_id: str, tokens_seen: int, planned_peak: int,
                  measured_peak: int, log, method_line: str | None = None) -> None:
    """The end of a run on the terminal, for either method: the table's summary, memory, tokens, where it went."""
    log(summary_text(table))
    if method_line:
        log(method_line)
    log(memory.summary_line(planned_peak, measured_peak))
    if tokens_seen < cfg.tokens:
        log(f"note: the data ran out: this run used {tokens_seen:,} of the {cfg.tokens:,} tokens asked for "
            "(--tokens); run.json records both")
    log(f"wrote {out / 'neurons.parquet'} and {out / 'run.json'} (run id {run_id})")


def _resolve_method(cfg: CorrelateConfig, meta: dict | None, n_layers, d_mlp, device, batch_bytes, log) -> str:
    """exact or screen: a resumed run keeps its checkpoint's; auto is exact when its accumulators fit in one pass."""
    if meta is not None:
        return resumed_method(cfg, meta.get("method", "exact"))
    if cfg.method != "auto":
        return cfg.method
    try:
        passes = len(make_plan(cfg, n_layers, d_mlp, device, batch_bytes).passes)
    except PlanError:
        passes = None
    return auto_method(passes, log)


def resumed_method(cfg: CorrelateConfig, saved: str) -> str:
    """The checkpoint's method, which a resume keeps; another explicit --method is refused."""
    if cfg.method not in ("auto", saved):
        raise Refused(f"--resume: the checkpoint in {cfg.out} is of --method {saved}, not {cfg.method}; resume "
                      f"with --method {saved} (or auto), or pass --overwrite to start again")
    return saved


def auto_method(passes: int | None, log, where: str = "") -> str:
    """--method auto: exact when the exact plan (``passes``, None if it cannot fit) is one pass, screen otherwise;
    ``where`` names the devices in the message (" over 4 ranks")."""
    if passes == 1:
        log(f"method: auto → exact (every co-moment fits in one pass{where})")
        return "exact"
    why = f"need {passes} passes over the tokens" if passes else "do not fit"
    log(f"method: auto → screen (the exact accumulators {why}{where}; --method exact to insist)")
    return "screen"


def _run_screen(cfg, out, meta, models, device, operand_dtype, batch_bytes, ident, labels, meter, started, *,
                progress: bool, log) -> Path:
    from univ.run.screen_stages import run_screened, screen_outputs

    srun, timings = run_screened(cfg, out, meta, models, device, operand_dtype, batch_bytes, ident,
                                 progress=progress, log=log)
    planned_peak = meter.planned_peak(srun.peak_bytes())
    measured_peak = meter.measured_peak()
    table, line = screen_outputs(cfg, out, srun, models, labels, device=device, operand_dtype=operand_dtype,
                                 timings=timings, wall_s=time.time() - started, ident=ident, batch_bytes=batch_bytes,
                                 memory={"planned_peak_bytes": planned_peak, "measured_peak_bytes": measured_peak,
                                         "screen_stage_bytes": srun.c["screen_bytes"]})
    checkpoint.remove(out)
    log_finished(table, cfg, out, ident["run_id"], srun.c["tokens_seen"], planned_peak, measured_peak, log, line)
    return out


__all__ = ["PlanError", "load_models", "run"]
