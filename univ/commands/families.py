"""``univ families``: the neuron families stage on its own, one pass over the run's data.

It lives apart from ``univ/families.py`` (the computations) because it runs through ``univ.analyze.profile_run``,
which itself builds on ``univ.stats`` and ``univ.families``: keeping the command here breaks that circle.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from univ.analyze import profile_run
from univ.families import FamilyThresholds, add_family_arguments, feature_options_from_args, thresholds_from_args
from univ.stats import add_pass_arguments


def run_families(
    run_dir: str | Path,
    *,
    tokens: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    dtype: str | None = None,
    top_k: int = 10,
    thresholds: FamilyThresholds | None = None,
    syntax: str = "auto",
    verbose: bool = True,
    progress: bool = True,
    **feature_options: Any,
) -> Path:
    """Families and top examples for every analysed model of a run; writes ``DIR/families.parquet`` and
    ``DIR/top_examples.parquet``. Returns the families path."""
    return profile_run(
        run_dir, tokens=tokens, device=device, batch_size=batch_size, dtype=dtype, families=True, top_k=top_k,
        thresholds=thresholds, syntax=syntax, verbose=verbose, progress=progress, outputs="families",
        **feature_options,
    )  # fmt: skip


def _main(args: argparse.Namespace) -> int:
    run_families(
        args.dir, tokens=args.tokens, device=args.device, batch_size=args.batch_size, dtype=args.dtype,
        top_k=args.top_k, thresholds=thresholds_from_args(args), syntax=args.syntax, **feature_options_from_args(args),
    )  # fmt: skip
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ families``."""
    p = subparsers.add_parser(
        "families",
        help="explain neurons by token features: unigram, alphabet, previous-token, position, syntax",
        description=textwrap.fill(
            "Reads DIR/run.json and streams the run's data once through each analysed model. For every neuron: "
            "the fraction of variance of its post-activation explained by each binary feature of the current "
            "and previous token (token ids, normalised strings, shape, symbols, word lists, suffixes, first "
            "letter; spaCy syntax when installed), the mutual information of firing with position, and its "
            "top-activating examples. Labels families with the paper's thresholds (unigram VR > 0.5, alphabet "
            "> 0.35, previous-token, position MI with kurtosis < 2, syntax, else other). Writes "
            "DIR/families.parquet and DIR/top_examples.parquet. Families are defined by VR alone here; "
            "'univ analyze' does the same pass with statistics and selection and joins everything."
        ),
        epilog=(
            "examples:\n"
            "  univ families runs/small\n"
            "  univ families runs/small --tokens 2000000 --device cuda --unigram-vr 0.6 --top-k 20\n"
            "  univ families runs/small --syntax on --spacy-model en_core_web_sm"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pass_arguments(p)
    add_family_arguments(p)
    p.set_defaults(func=_main)
    return p
