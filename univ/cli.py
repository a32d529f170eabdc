"""The ``univ`` command line: one sub-command per stage of the pipeline.

    univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small
    univ analyze runs/small          # universal, stats, families -> profiles.parquet
    univ roles runs/small            # weight-level roles -> roles.parquet
    univ report runs/small           # -> report.html
    univ demo                        # the whole pipeline on the shipped seed zoo

Each stage module exposes ``register(subparsers)``, which adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from univ import __version__

# Stage modules in pipeline order; each defines register(subparsers).
COMMAND_MODULES: list[str] = [
    "univ.correlate",
    "univ.universal",
    "univ.stats",
    "univ.families",
    "univ.analyze",
    "univ.roles",
    "univ.report",
    "univ.demo",
    "univ.zoo",
    "univ.sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="univ",
        description="Find universal neurons across language-model seeds and explain what they do.",
        epilog=(
            "examples:\n"
            "  univ demo                                    # everything on the shipped seed zoo, ~1 min on a CPU\n"
            "  univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small\n"
            "  univ analyze runs/small && univ roles runs/small && univ report runs/small\n\n"
            "Run 'univ COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"univ {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
