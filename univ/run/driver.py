"""``run``: one correlate experiment from options to outputs, in the order the stages happen.

    load models → plan memory (blocks, passes) → for each pass: stream batches (``stream``) → checkpoint →
    finalize the pass's blocks (``finalize``) → neurons.parquet, run.json (``outputs``)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from univ.errors import Interrupted
from univ.run import stream
from univ.run.config import CorrelateConfig, model_labels, resolve_device
from univ.run.finalize import finalize_pass
from univ.run.outputs import build_manifest, summary_text, write_outputs
from univ.run.plan import Plan, describe_plan, make_plan
from univ.run.state import (
    RunState,
    has_checkpoint,
    read_checkpoint,
    remove_checkpoint,
    save_pass_state,
    write_checkpoint,
)
from univ_kernels.streaming import default_operand_dtype


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


def run(cfg: CorrelateConfig, *, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Run (or resume) a correlate experiment; returns the output directory."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and has_checkpoint(out):
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
        plan = Plan.from_dict(meta["plan"], d_mlp, n_layers, batch_bytes)
    else:
        plan = make_plan(cfg, n_layers, d_mlp, device, batch_bytes)
    log(describe_plan(plan, cfg, models, device))
    state = RunState(plan, models, device, cfg)
    if meta is not None:
        state.load(tensors, meta)
        log(f"resuming pass {state.pass_index + 1} after {state.tokens_done:,} tokens")

    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0}
    bar = tqdm(total=cfg.tokens * len(plan.passes), unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True, initial=state.pass_index * cfg.tokens + state.tokens_done)
    next_ckpt = [_next_checkpoint(cfg, state.tokens_done)]

    def after_batch(st: RunState, n_kept: int) -> None:
        bar.update(n_kept)
        if next_ckpt[0] is not None and st.tokens_done >= next_ckpt[0]:
            write_checkpoint(out, st, cfg)
            next_ckpt[0] = _next_checkpoint(cfg, st.tokens_done)

    tokens_seen = 0
    with stream.StopFlag() as flag:
        while not state.finished:
            bar.set_description(f"pass {state.pass_index + 1}/{len(plan.passes)}")
            if not stream.stream_pass(state, models, cfg, operand_dtype, timings, flag, after_batch):
                write_checkpoint(out, state, cfg)
                bar.close()
                raise Interrupted(f"interrupted after {state.tokens_done:,} tokens of pass "
                                  f"{state.pass_index + 1}; checkpoint written to {out}. Resume with --resume.")
            t0 = time.perf_counter()
            finalize_pass(state, cfg)
            if cfg.save_state:
                save_pass_state(out, state)
            timings["finalize_s"] += time.perf_counter() - t0
            tokens_seen = state.tokens_done
            state.start_pass(state.pass_index + 1)
            if not state.finished:
                write_checkpoint(out, state, cfg)
                next_ckpt[0] = _next_checkpoint(cfg, 0)
    bar.close()

    manifest = build_manifest(cfg, state, plan, models, labels, tokens_seen=tokens_seen, device=device,
                              operand_dtype=operand_dtype, timings=timings, wall_s=time.time() - started)
    table = write_outputs(out, state, models, labels, cfg, manifest)
    remove_checkpoint(out)
    log(summary_text(table))
    log(f"wrote {out / 'neurons.parquet'} and {out / 'run.json'}")
    return out


def _next_checkpoint(cfg: CorrelateConfig, done: int) -> int | None:
    if cfg.checkpoint_every is None:
        return None
    return (done // cfg.checkpoint_every + 1) * cfg.checkpoint_every
