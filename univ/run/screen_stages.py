"""The screen method's run, stage by stage: screen → verify passes (rounds) → the results the outputs read.

``run_screened`` drives a ``univ.run.screen.ScreenRun`` through its stages with progress bars, checkpoints
and signals (the rules in ``univ.run.screen``'s docstring); ``Outcome`` hands the answer to
``univ.run.outputs`` in the shape the exact method's state has.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import torch

from univ.errors import Interrupted
from univ.run import checkpoint
from univ.run.config import CorrelateConfig
from univ.run.plan import Plan, format_bytes, make_plan
from univ.run.screen import ScreenRun
from univ.run.stream import StopFlag, token_stream


class Outcome:
    """The results in the shape the outputs read (``univ.run.outputs``): results, hist, cka, act_stats."""

    def __init__(self, run: ScreenRun):
        self.results, self.hist, self.cka, self.act_stats = {}, {}, {}, run.act_stats
        for p in range(len(run.pairs)):
            best, arg, base = run.result(p)
            n = run.n_rows(p)
            self.results[run.pairs[p]] = {"max": best.float(), "arg": arg,
                                          "base": base if base is not None else torch.full((run.k, n), float("-inf"))}
        for k, v in run.t.items():
            if k.startswith("hist."):
                self.hist[tuple(int(x) for x in k.split(".")[1:])] = v
            elif k.startswith("cka.") and run.cfg.layer_similarity:
                self.cka[tuple(int(x) for x in k.split(".")[1:])] = v


def run_screened(cfg: CorrelateConfig, out, meta: dict | None, models, device: torch.device,
                 operand_dtype: torch.dtype, batch_bytes: int, ident: dict, *, progress: bool, log):
    """Screen, verify, certify (rounds of verify passes as needed); returns (Outcome, screen plan, ScreenRun,
    timings, tokens_seen). Checkpoints as the module docstring says."""
    from tqdm.auto import tqdm

    run = ScreenRun(cfg, models, device, operand_dtype)
    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0, "screen_s": 0.0}
    if meta is not None:
        run.load_checkpoint(out, meta)
    with StopFlag() as flag, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="data source .* ran out")  # said in the summary and run.json
        if run.c["stage"] == "screen":
            if meta is None:
                run.write_checkpoint(out, ident)  # so that --resume after a kill in the screen restarts it
            plan = make_plan(replace(cfg, tokens=run.screen_tokens), run.n_layers, run.d, device, batch_bytes)
            log(describe(run, plan))
            bar = tqdm(total=run.screen_tokens * len(plan.passes), unit="tok", unit_scale=True, disable=not progress,
                       dynamic_ncols=True, desc="screen")
            t0 = time.perf_counter()
            try:
                plan = run.run_screen(batch_bytes, timings, flag, bar.update)
            finally:
                bar.close()
            timings["screen_s"] += time.perf_counter() - t0
            run.c["screen_plan"] = plan.to_dict()
            run.write_checkpoint(out, ident)
            log(run.verify_line())
        else:
            log(f"resuming the verify stage: round {run.c['round'] + 1}, pass {run.c['pass'] + 1} after "
                f"{run.c['batches_done']} batches (checkpoint generation {run.generation})")
        next_ckpt = cfg.checkpoint_every and run.c["tokens_done"] + cfg.checkpoint_every
        while run.c["stage"] == "verify":
            n_items = sum(it.r1 - it.r0 for it in run.items())
            bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
                       initial=run.c["tokens_done"],
                       desc=f"verify round {run.c['round'] + 1} pass {run.c['pass'] + 1} ({n_items:,} rows×layers)")
            for batch in token_stream(cfg, models[0].tokenizer, skip_batches=run.c["batches_done"]):
                bar.update(run.verify_batch(batch.input_ids, batch.keep, timings))
                if flag.stop:
                    bar.close()
                    run.write_checkpoint(out, ident)
                    raise Interrupted(f"interrupted by {flag.signal_name} in verify round {run.c['round'] + 1} "
                                      f"({run.c['tokens_done']:,} tokens in); checkpoint written to "
                                      f"{checkpoint.path(out)}. Resume with --resume (the same command and options).")
                if next_ckpt and run.c["tokens_done"] >= next_ckpt:
                    run.write_checkpoint(out, ident)
                    next_ckpt = run.c["tokens_done"] + cfg.checkpoint_every
            bar.close()
            if run.c["tokens_done"] == 0:
                from univ.data import DataError

                raise DataError(f"no tokens were read from {cfg.data!r}: is it empty, or is every position excluded?")
            round_before = run.c["round"]
            run.finish_pass()
            next_ckpt = cfg.checkpoint_every and cfg.checkpoint_every
            if run.c["stage"] == "verify":
                run.write_checkpoint(out, ident)
                if run.c["round"] != round_before:
                    log(run.verify_line())
    plan = Plan.from_dict(run.c["screen_plan"], run.d, run.n_layers, batch_bytes)
    return Outcome(run), plan, run, timings, run.c["tokens_seen"]


def describe(run: ScreenRun, plan: Plan) -> str:
    cfg = run.cfg
    lines = [f"screen method: sample of {run.screen_tokens:,} tokens (every {run.stride}th batch of the stream), "
             f"{len(plan.passes)} screen pass{'es' if len(plan.passes) > 1 else ''}, then a verify pass over all "
             f"{cfg.tokens:,} tokens (more only for uncertified neurons)"]
    for p, blocks in enumerate(plan.passes):
        total = sum(plan.block_bytes(b) for b in blocks)
        lines.append(f"  screen pass {p + 1}: accumulators {format_bytes(total):>10s} over the sample only")
    n_max = sum(run.n_rows(p) * run.layers_of(p) * (1 + run.k * bool(run.rotated)) * 4 for p in range(len(run.pairs)))
    lines.append(f"  per-(neuron, layer) maxima             {format_bytes(n_max):>10s}")
    return "\n".join(lines)
