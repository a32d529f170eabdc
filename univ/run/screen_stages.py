"""The screen method's run, stage by stage: screen → verify passes (rounds) → the results the outputs read.

``run_screened`` drives a ``univ.run.screen.ScreenRun`` through its stages with progress bars, checkpoints
and signals (the rules in ``univ.run.screen``'s docstring); ``Outcome`` hands the answer to
``univ.run.outputs`` in the shape the exact method's state has.
"""

from __future__ import annotations

import time
import warnings

import torch

from univ.errors import Interrupted
from univ.run import checkpoint, memory
from univ.run.config import CorrelateConfig
from univ.run.plan import Plan, format_bytes
from univ.run.screen import ScreenRun
from univ.run.state import RunState
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
    """Screen, verify, certify (rounds of verify passes as needed); returns (the finished ScreenRun, timings).
    Checkpoints as the module docstring says."""
    from tqdm.auto import tqdm

    run = ScreenRun(cfg, models, device, operand_dtype)
    timings = {"forward_s": 0.0, "kernels_s": 0.0, "finalize_s": 0.0, "screen_s": 0.0}
    path = checkpoint.path(out)
    if meta is not None:
        run.load_checkpoint(path, meta)
    with StopFlag() as flag, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="data source .* ran out")  # said in the summary and run.json
        if run.c["stage"] == "screen":
            if meta is None:
                run.write_checkpoint(path, ident)  # so that --resume after a kill in the screen restarts it
            plan = run.screen_plan(batch_bytes)
            log(describe(run, plan))
            bar = tqdm(total=run.screen_tokens * len(plan.passes), unit="tok", unit_scale=True, disable=not progress,
                       dynamic_ncols=True, desc="screen")
            t0 = time.perf_counter()
            try:
                run.run_screen(RunState(plan, models, device, run.screen_cfg()), timings, bar.update,
                               lambda: flag.signal_name if flag.stop else None)
            finally:
                bar.close()
            timings["screen_s"] += time.perf_counter() - t0
            run.c["screen_bytes"] = memory.run_bytes(plan, run.screen_cfg(), models)
            run.start_verify()
            run.write_checkpoint(path, ident)
            log(run.verify_line())
        else:
            log(f"resuming the verify stage: round {run.c['round'] + 1}, pass {run.c['pass'] + 1} after "
                f"{run.c['batches_done']} batches (checkpoint generation {run.generation})")

        def interrupted(tokens_in: int) -> Interrupted:
            return Interrupted(f"interrupted by {flag.signal_name} in verify round {run.c['round'] + 1} "
                               f"({tokens_in:,} tokens in); checkpoint written to {path}. Resume with --resume "
                               "(the same command and options).")

        verify_stage(cfg, run, models[0].tokenizer, timings, flag, commit=lambda: run.write_checkpoint(path, ident),
                     interrupted=interrupted, progress=progress, log=log)
    return run, timings


def screen_outputs(cfg: CorrelateConfig, out, run: ScreenRun, models, labels, *, device, operand_dtype, timings: dict,
                   wall_s: float, ident: dict, batch_bytes: int, memory: dict, extra: dict | None = None):
    """Write a finished screen run's outputs (run.json last): the exhaustive answer, its ``screen`` report, the
    memory both stages planned and used; with --save-state the screen's maxima, masks and margins. Returns
    (the neurons table, the summary line of the screen)."""
    from univ.run import files
    from univ.run.outputs import build_manifest, write_outputs

    plan = Plan.from_dict(run.c["screen_plan"], run.d, run.n_layers, batch_bytes)
    outcome = Outcome(run)
    manifest = build_manifest(cfg, outcome, plan, models, labels, tokens_seen=run.c["tokens_seen"], device=device,
                              operand_dtype=operand_dtype, timings=timings, wall_s=wall_s, run_id=ident["run_id"],
                              fingerprint=ident["fingerprint"])
    manifest["method"] = "screen"
    manifest["screen"] = rep = run.report()
    manifest["memory"].update(memory, verify_stage_bytes=run.c.get("verify_bytes"))
    manifest.update(extra or {})
    if cfg.save_state:  # the sample's and the verified maxima, margins and masks, for re-analysis
        files.write_tensors(out / "state" / "screen.safetensors", {k: v.detach().contiguous().cpu()
                                                                   for k, v in run.t.items()},
                            {"kind": "univ.correlate.screen-state", "run_id": ident["run_id"]})
    table = write_outputs(out, outcome, models, labels, cfg, manifest)
    line = (f"screen: {rep['screen_tokens']:,} sample tokens; {100 * (rep['certified_first_round'] or 0):.1f} % of "
            f"neurons certified in the first round, {rep['fallback_rows']:,} verified again; work "
            f"{rep['flops']['ratio']:.3f} of the exhaustive method's FLOPs")
    return table, line


def verify_stage(cfg: CorrelateConfig, run: ScreenRun, tokenizer, timings: dict, flag: StopFlag, *, commit,
                 interrupted, agree=lambda flag: flag, position=None, progress: bool = True, log=None) -> None:
    """Verify passes until every row is certified, checkpointing (``commit``) every --checkpoint-every tokens,
    after each pass that is not the last, and on a signal (then ``interrupted(tokens into the pass)`` is raised).

    Across ranks ``agree`` ORs a flag over the ranks and ``position()`` gives the pass's (batches, tokens) done:
    the ranks stream in lockstep, and a rank whose rows are all certified streams on without work, so that
    every batch has one stop check for all."""
    from tqdm.auto import tqdm

    from univ.data import DataError

    every = cfg.checkpoint_every
    while agree(run.c["stage"] == "verify"):
        working = run.c["stage"] == "verify"
        skip, tokens_in = position() if position else (run.c["batches_done"], run.c["tokens_done"])
        next_ckpt = every and tokens_in + every
        n_items = sum(it.r1 - it.r0 for it in run.items())
        bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
                   initial=tokens_in, desc=f"verify round {run.c['round'] + 1} pass {run.c['pass'] + 1} "
                                           f"({n_items:,} rows×layers)" if working else "verify (rows done)")
        for batch in token_stream(cfg, tokenizer, skip_batches=skip):
            if working:
                run.verify_batch(batch.input_ids, batch.keep, timings)
            tokens_in += batch.n_kept
            bar.update(batch.n_kept)
            if agree(flag.stop):
                bar.close()
                commit()
                raise interrupted(tokens_in)
            if next_ckpt and tokens_in >= next_ckpt:
                commit()
                next_ckpt = tokens_in + every
        bar.close()
        if tokens_in == 0:
            raise DataError(f"no tokens were read from {cfg.data!r}: is it empty, or is every position excluded?")
        round_before = run.c["round"]
        if working:
            run.finish_pass()
        if agree(run.c["stage"] == "verify"):
            commit()
            if log is not None and run.c["round"] != round_before:
                log(run.verify_line())


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
