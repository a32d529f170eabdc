"""``univ demo``: the whole pipeline on the embedded seed zoo, offline, on a CPU, in about a minute.

    univ demo                      # -> runs/demo/report.html
    univ demo --out /tmp/d --tokens 50000

Steps: the shipped zoo (tiny GPT-2 seeds trained on Shakespeare; rebuilt into the cache if this install
lacks it) → ``univ correlate`` in reference mode with the paper's Gaussian rotation baseline on held-out
plays the models never saw → universal neurons per layer → profiles, roles and the HTML report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from univ import corpus, zoo
from univ.correlate import CorrelateConfig
from univ.correlate import run as run_correlate

DEFAULT_OUT = "runs/demo"
DEFAULT_TOKENS = 150_000  # of the ~185 k held-out tokens; enough for r to settle to ~±0.005
# Profiles and interventions need fewer tokens than the correlation; these keep the demo near a minute
# on 2 CPU cores (analyze over 150 k tokens took 23 s, interventions over 16 k tokens 46 s).
PROFILE_TOKENS = 60_000
INTERVENTION_TOKENS = 2_048


def run_demo(out: str | Path = DEFAULT_OUT, *, tokens: int = DEFAULT_TOKENS, zoo_dir: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, profile_tokens: int = PROFILE_TOKENS,
             intervention_tokens: int = INTERVENTION_TOKENS, progress: bool = True, log=print) -> Path:
    """Run every stage on the zoo; returns the output directory (which holds ``report.html``).

    ``profile_tokens``: tokens ``univ analyze`` reads; ``intervention_tokens``: tokens each fixed-activation
    pass of ``univ roles`` reads.
    """
    out = Path(out)
    zoo_dir = Path(zoo_dir) if zoo_dir is not None else zoo.ensure_zoo()
    manifest = zoo.read_manifest(zoo_dir)
    seeds = zoo.seed_dirs(zoo_dir)
    log(f"zoo: {len(seeds)} seeds of a {manifest['config']['n_layer']}-layer GPT-2 "
        f"(d_model {manifest['config']['n_embd']}, {manifest['neurons_per_model']} neurons) in {zoo_dir}")
    data = corpus.write_corpus_files(out / "data", "heldout")
    cfg = CorrelateConfig(
        models=tuple(str(s) for s in seeds), data=str(data), out=str(out), tokens=tokens,
        ctx=int(manifest["config"]["n_ctx"]), batch_size=batch_size, mode="reference", baseline="gaussian",
        device=device or "cpu", dtype="float32",
    )
    for stale in (out / "checkpoint.json",):  # a demo interrupted earlier just starts again
        stale.unlink(missing_ok=True)
    run_correlate(cfg, overwrite=True, progress=progress, log=log)
    for stage in _later_stages(min(profile_tokens, tokens), intervention_tokens):
        stage(out, log=log)
    return out


def _later_stages(profile_tokens: int, intervention_tokens: int):
    """The analysis stages after correlate, in pipeline order (each reads and extends the run directory)."""
    from univ.analyze import run_analyze
    from univ.report import run_report
    from univ.roles import run_roles

    def analyze(out, log):
        run_analyze(out, tokens=profile_tokens, progress=False, verbose=log is print)

    def roles(out, log):
        run_roles(out, tokens=intervention_tokens, log=log)

    def report(out, log):
        log(f"report: {run_report(out)}")

    return [analyze, roles, report]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the shipped seed zoo (offline, CPU, about a minute)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="held-out tokens to correlate over")
    p.add_argument("--zoo", default=None, help="a zoo directory (default: the shipped zoo)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.set_defaults(func=main)


def main(args) -> int:
    run_demo(args.out, tokens=args.tokens, zoo_dir=args.zoo, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(out=DEFAULT_OUT, tokens=DEFAULT_TOKENS, zoo=None, device=None)))
