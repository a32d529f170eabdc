"""``univ demo``: the whole pipeline on the shipped seed zoo, offline, on a CPU.

    univ demo                      # -> runs/demo/report.html
    univ demo --out /tmp/d --tokens 50000
    univ demo --fresh              # recompute every stage even if runs/demo holds them
    univ demo --zoo depth --out runs/depth   # the 6-layer, 5-seed zoo: universality and roles over depth

Steps: the shipped zoo (tiny GPT-2 seeds trained on Shakespeare; rebuilt into the cache if this install
lacks it) → ``univ correlate`` in reference mode (the depth zoo: all pairs) with the paper's Gaussian rotation
baseline on held-out plays the models never saw → the same tokens through each seed's shipped SAE
(``OUT/latents``, default zoo) → universal neurons per layer → profiles, roles and the HTML report, which
compares universal neurons with universal latents and, for the depth zoo, shows them layer by layer.

Each stage's time is printed. A second run into the same folder with the same inputs (zoo, data, token
budgets, device, univ version: recorded in ``OUT/demo.json``) reuses the stages whose outputs are there and
stamped with the same run id, and redraws only the report; ``--fresh`` recomputes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from univ import __version__, corpus, zoo

DEFAULT_OUT = "runs/demo"
DEFAULT_TOKENS = 150_000  # of the ~185 k held-out tokens; enough for r to settle to ~±0.005
# Profiles and interventions need fewer tokens than the correlation; these keep the demo short on 2 CPU
# cores (analyze over 150 k tokens took 23 s, interventions over 16 k tokens 46 s).
PROFILE_TOKENS = 60_000
INTERVENTION_TOKENS = 2_048
# Measured: `univ demo` on a 2-core Intel Xeon CPU, torch 2.13.0+cpu, 2026-12-07, one core held by a training
# job: 242 s (correlate 72 s with 16 baseline draws, the SAE latents 124 s, analyze 19 s, roles 24 s, report
# 3 s); the rerun reused every stage and redrew the report in 9 s. Before the latents stage: 157 s quiet.
MEASURED = ("about 4 minutes from scratch on a 2-core CPU and 9 s for a rerun that reuses the\n"
            "stages")
LATENTS = "latents"  # OUT/latents: the correlate run of the shipped SAEs' latents, when the zoo has them
STATE = "demo.json"  # the inputs of the last demo in OUT and the run id each stage's outputs belong to
STAGE_OUTPUTS = {"analyze": "profiles.parquet", "roles": "roles.parquet"}


def run_demo(out: str | Path = DEFAULT_OUT, *, tokens: int = DEFAULT_TOKENS, zoo_dir: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, profile_tokens: int = PROFILE_TOKENS,
             intervention_tokens: int = INTERVENTION_TOKENS, progress: bool = True, fresh: bool = False,
             log=print) -> Path:
    """Run every stage on the zoo; returns the output directory (which holds ``report.html``).

    ``profile_tokens``: tokens ``univ analyze`` reads; ``intervention_tokens``: tokens each fixed-activation
    pass of ``univ roles`` reads. Stages already done for the same inputs are reused unless ``fresh``.
    """
    from univ.correlate import CorrelateConfig
    from univ.correlate import run as run_correlate
    from univ.tables import run_id, table_run_id

    _quiet_transformers()
    started = time.perf_counter()
    out = Path(out)
    zoo_dir = zoo.resolve_zoo(zoo_dir)
    manifest = zoo.read_manifest(zoo_dir)
    seeds = zoo.seed_dirs(zoo_dir)
    log(f"zoo: {len(seeds)} seeds of a {manifest['config']['n_layer']}-layer GPT-2 "
        f"(d_model {manifest['config']['n_embd']}, {manifest['neurons_per_model']} neurons) in {zoo_dir}")
    data = corpus.write_corpus_files(out / "data", "heldout")
    cfg = CorrelateConfig(
        models=tuple(str(s) for s in seeds), data=str(data), out=str(out), tokens=tokens,
        ctx=int(manifest["config"]["n_ctx"]), batch_size=batch_size, mode=_demo_mode(zoo_dir), baseline="gaussian",
        device=device or "cpu", dtype="float32",
    )
    inputs = _inputs(manifest, data, tokens, profile_tokens, intervention_tokens, batch_size, cfg.device)
    state = {} if fresh else _read_state(out)
    done = state.get("stages", {}) if state.get("inputs") == inputs else {}
    rid = _run_id_or_none(out, run_id)
    times: dict[str, float] = {}

    def stage(name: str, fn: Any, cached: bool, where: Path | None = None, run: str | None = None) -> None:
        if cached:
            log(f"{name}: reused (same inputs and run {run or rid} in {where or out})")
            return
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0
        log(f"{name}: {times[name]:.1f} s")

    def correlate() -> None:
        nonlocal rid
        for stale in (out / "checkpoint.json",):  # a demo interrupted earlier just starts again
            stale.unlink(missing_ok=True)
        run_correlate(cfg, overwrite=True, progress=progress, log=log)  # the demo's own folder: replace the old
        rid = run_id(out)

    have_run = rid is not None and done.get("correlate") == rid
    stage("correlate", correlate, have_run)
    state = {"inputs": inputs, "stages": {"correlate": rid}}
    _write_state(out, state)
    saes = zoo.shipped_saes(zoo_dir)
    if saes is not None:  # the same tokens through each seed's SAE: universal latents beside universal neurons
        lat_out = out / LATENTS
        lat_rid = _run_id_or_none(lat_out, run_id)

        def latents() -> None:
            run_correlate(replace(cfg, out=str(lat_out), sae=tuple(map(str, saes))), overwrite=True,
                          progress=progress, log=lambda *_: None)  # fmt: skip

        stage("latents", latents, have_run and lat_rid is not None and done.get("latents") == lat_rid, lat_out,
              lat_rid)
        state["stages"]["latents"] = run_id(lat_out)
        _write_state(out, state)
    later = _later_stages(min(profile_tokens, tokens), intervention_tokens)
    for name, fn in later:
        output = STAGE_OUTPUTS.get(name)
        cached = (output is not None and have_run and done.get(name) == rid
                  and (out / output).is_file() and table_run_id(out / output) == rid)  # fmt: skip
        have_run = have_run and cached  # a recomputed stage invalidates those after it
        stage(name, lambda fn=fn: fn(out, log), cached)
        if output is not None:
            state["stages"][name] = rid
            _write_state(out, state)
    total = time.perf_counter() - started
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    log(f"demo: {total:.1f} s in all ({spent}); report: {(out / 'report.html').resolve()}")
    return out


def _demo_mode(zoo_dir: Path) -> str:
    """A shipped zoo's demo mode (the depth zoo: all pairs, so every seed is analysed); reference otherwise."""
    for named in zoo.ZOOS.values():
        if zoo.corpus.DATA_DIR / named.folder == Path(zoo_dir):
            return named.demo_mode
    return "reference"


def _quiet_transformers() -> None:
    """No "Loading weights" bar per model load, no advisory warnings: the demo prints its own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _inputs(manifest: dict, data: Path, tokens: int, profile_tokens: int, intervention_tokens: int,
            batch_size: int, device: str) -> dict[str, Any]:  # fmt: skip
    """Everything a demo's results depend on, as JSON-comparable values."""
    zoo_hash = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data_hash = hashlib.sha256(Path(data).read_bytes()).hexdigest()[:16]
    return {"univ": __version__, "zoo": zoo_hash, "data": data_hash, "tokens": tokens,
            "profile_tokens": profile_tokens, "intervention_tokens": intervention_tokens, "batch_size": batch_size,
            "device": device}  # fmt: skip


def _run_id_or_none(out: Path, run_id: Any) -> str | None:
    if not (out / "run.json").is_file():
        return None
    try:
        return run_id(out)
    except Exception:
        return None


def _read_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(out: Path, state: dict[str, Any]) -> None:
    (out / STATE).write_text(json.dumps(state, indent=2) + "\n")


def _later_stages(profile_tokens: int, intervention_tokens: int) -> list[tuple[str, Any]]:
    """The analysis stages after correlate, in pipeline order (each reads and extends the run directory)."""
    from univ.analyze import run_analyze
    from univ.report import run_report
    from univ.roles import run_roles

    def analyze(out, log):
        run_analyze(out, tokens=profile_tokens, progress=False, verbose=log is print)

    def roles(out, log):
        run_roles(out, tokens=intervention_tokens, log=log)

    def report(out, log):
        latents = out / LATENTS
        run_report(out, compare=latents if (latents / "run.json").is_file() else None)

    return [("analyze", analyze), ("roles", roles), ("report", report)]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the shipped seed zoo (offline, CPU)",
        description=__doc__ + f"\nTime: {MEASURED}.",
        epilog=(
            "examples:\n"
            "  univ demo                                   # -> runs/demo/report.html\n"
            "  univ demo --out /tmp/demo --tokens 50000    # a shorter run\n"
            "  univ demo --fresh                           # recompute every stage\n"
            "  univ demo --zoo depth --out runs/depth      # 6 layers, 5 seeds: the paper's depth results"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/demo, runs/demo-depth for --zoo depth)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="held-out tokens to correlate over")
    p.add_argument("--zoo", default=None, metavar="NAME|DIR",
                   help="a shipped zoo (default: 2 layers, 3 seeds; depth: 6 layers, 5 seeds) or a zoo folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--fresh", action="store_true", help="recompute every stage, even those OUT holds for these inputs")
    p.set_defaults(func=main)


def main(args) -> int:
    out = args.out or (DEFAULT_OUT if args.zoo in (None, "default") else f"{DEFAULT_OUT}-{Path(args.zoo).name}")
    run_demo(out, tokens=args.tokens, zoo_dir=args.zoo, device=args.device, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(out=DEFAULT_OUT, tokens=DEFAULT_TOKENS, zoo=None, device=None, fresh=False)))
