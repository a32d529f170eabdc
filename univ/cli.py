"""The ``univ`` command line: one sub-command per stage of the pipeline.

    univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small
    univ analyze runs/small          # universal, stats, families -> profiles.parquet
    univ roles runs/small            # weight-level roles -> roles.parquet
    univ report runs/small           # -> report.html
    univ demo                        # the whole pipeline on the shipped seed zoo

The command table below is static, so ``univ --help`` and ``univ --version`` import nothing heavy (no torch):
only the chosen command's module is imported, and it adds its parser with ``register(subparsers)``.

Errors: a ``univ.errors.UserError`` (and the file errors a user causes: a path that does not exist, a folder
in the way, no permission) prints one line, ``univ: error: <message>``, and exits with its code; anything
else is a bug and keeps its traceback. ``--debug`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from univ import __version__
from univ.errors import EXIT_USER, UserError

# name -> (module whose register(subparsers) adds it, one-line help for `univ --help`), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "correlate": ("univ.correlate", "max correlation of every MLP neuron across seed models (the paper's experiment)"),
    "universal": ("univ.universal", "select universal neurons from a correlate run"),
    "stats": ("univ.commands.stats", "activation and weight statistics of every neuron"),
    "families": ("univ.commands.families", "explain neurons by token features (unigram, alphabet, position, ...)"),
    "analyze": ("univ.analyze", "universal + statistics + families in one pass -> profiles.parquet"),
    "roles": ("univ.roles", "prediction/suppression/partition, entropy and attention roles"),
    "report": ("univ.report", "one self-contained DIR/report.html of a run (works offline)"),
    "demo": ("univ.demo", "the whole pipeline on the shipped seed zoo (offline, CPU)"),
    "zoo": ("univ.zoo", "train or inspect the toy seed zoo (tiny GPT-2s on Shakespeare)"),
    "sweep": ("univ.sweep", "universality over training: correlate the seeds at each checkpoint"),
    "sae": ("univ.sae_train", "train a small TopK SAE on a model's hook (sae_lens format, for --sae)"),
}  # fmt: skip

# File errors a user causes at the command line; converted to one line (exit 2) instead of a traceback.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_SIGINT = 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default unless it names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


def _apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Give a command's parser (and any nested sub-commands, as `zoo train`) the defaults-showing formatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _apply_formatter(sub)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named on the command line: the first word that is not a global option."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``univ`` parser; only ``command``'s module is imported ("*": all, None: none, for --help)."""
    parser = argparse.ArgumentParser(
        prog="univ",
        description="Find universal neurons across language-model seeds and explain what they do.",
        epilog=(
            "examples:\n"
            "  univ demo                                    # everything on the shipped seed zoo, offline, on a CPU\n"
            "  univ correlate seed-a seed-b seed-c --data corpus.txt --tokens 1000000 --out runs/small\n"
            "  univ analyze runs/small && univ roles runs/small && univ report runs/small\n\n"
            "Run 'univ COMMAND --help' for the options of a command. Exit codes: 0 done, 1 a bug (rerun with\n"
            "--debug and report the traceback), 2 a user error, 3 refused (going on would change the result),\n"
            "75 interrupted (a checkpoint was written: rerun with --resume)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"univ {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        if command == "*" or name == command:
            importlib.import_module(module).register(subparsers)
            _apply_formatter(subparsers.choices[name])
        else:
            subparsers.add_parser(name, help=help_line)  # a placeholder: listed in --help, never parsed
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
    if debug:
        argv.remove("--debug")  # accepted anywhere, before or after the command
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        return _fail(str(err), err.exit_code, debug)
    except USER_OS_ERRORS as err:
        return _fail(_os_message(err), EXIT_USER, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_SIGINT, debug)


def _os_message(err: OSError) -> str:
    """A file error as one line: our own messages as they are, the OS's as 'what: path'."""
    if err.filename is None:
        return str(err)
    return f"{err.strerror or type(err).__name__}: {err.filename}"


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"univ: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
