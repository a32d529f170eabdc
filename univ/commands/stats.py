"""``univ stats``: the activation and weight statistics stage on its own, one pass over the run's data.

It lives apart from ``univ/stats.py`` (the computations) because it runs through ``univ.analyze.profile_run``,
which itself builds on ``univ.stats`` and ``univ.families``: keeping the command here breaks that circle.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from univ.analyze import profile_run
from univ.stats import add_pass_arguments


def run_stats(
    run_dir: str | Path,
    *,
    tokens: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    dtype: str | None = None,
    threshold: float = 0.5,
    rule: str = "mean",
    verbose: bool = True,
    progress: bool = True,
) -> Path:
    """Activation + weight statistics for every analysed model of a run; writes ``DIR/stats.parquet``.

    One pass over the run's data per model (``tokens`` overrides its token budget). Adds within-layer
    percentiles; if ``neurons.parquet`` exists, ``is_universal`` too and ``DIR/stats_compare.csv``.
    """
    return profile_run(
        run_dir,
        tokens=tokens,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        threshold=threshold,
        rule=rule,
        families=False,
        top_k=0,
        verbose=verbose,
        progress=progress,
        outputs="stats",
    )


def _main(args: argparse.Namespace) -> int:
    run_stats(
        args.dir, tokens=args.tokens, device=args.device, batch_size=args.batch_size, dtype=args.dtype,
        threshold=args.threshold, rule=args.rule,
    )  # fmt: skip
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ stats``."""
    p = subparsers.add_parser(
        "stats",
        help="activation and weight statistics of every neuron",
        description=textwrap.fill(
            "Reads DIR/run.json (models, data) and streams the run's data once through each analysed model: "
            "pre-activation mean, variance, skew, kurtosis (non-excess), activation frequency P(pre > 0) and "
            "post-activation mean, over kept tokens only; adds weight statistics on TransformerLens-style "
            "processed weights (norms, input bias, cos(w_in, w_out), L2 penalty, moments of cos(W_U, w_out) "
            "over the vocabulary) and within-layer percentiles. Writes DIR/stats.parquet and DIR/stats.csv; "
            "with neurons.parquet present, also is_universal and DIR/stats_compare.csv (median percentiles, "
            "universal vs the rest), printed."
        ),
        epilog=(
            "examples:\n  univ stats runs/small\n  univ stats runs/small --tokens 1000000 --device cuda --batch-size 32"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pass_arguments(p)
    p.set_defaults(func=_main)
    return p
