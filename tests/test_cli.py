"""The command line: fast top-level help, complete sub-command help, one-line errors with their exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from univ import cli
from univ.errors import EXIT_REFUSED, EXIT_USER, Refused

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(args: list[str]) -> dict:
    """Run ``univ ARGS`` in a fresh interpreter; return its exit code and which heavy modules it imported."""
    code = (
        "import sys, json\n"
        "from univ.cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'pandas', 'transformers', 'matplotlib') if m in sys.modules)\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_top_level_imports_nothing_heavy(args):
    result = _modules_after(args)
    assert result == {"rc": 0, "heavy": []}


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every sub-command's parser, nested ones (zoo train, zoo info) included, with its full name."""
    root = cli.build_parser("*")
    out = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((f"{prefix} {name}".strip(), sub))
                    walk(f"{prefix} {name}", sub)

    walk("", root)
    return out


def test_command_table_matches_the_modules():
    names = [name for name, _ in _all_parsers() if " " not in name]
    assert names == list(cli.COMMANDS)  # every module registers the command the table names, in order


@pytest.mark.parametrize("name, parser", _all_parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_help_is_complete(name, parser):
    assert (parser.description or "").strip(), f"univ {name}: no description"
    assert "example" in (parser.epilog or ""), f"univ {name}: no example"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        what = "/".join(action.option_strings) or action.dest
        assert (action.help or "").strip(), f"univ {name} {what}: no help"
    formatter = cli.HelpFormatter(f"univ {name}")
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            if not isinstance(action, argparse._HelpAction):
                shown = formatter._get_help_string(action)
                assert "default" in shown, f"univ {name} {action.option_strings[0]}: default not shown"


def test_formatter_shows_defaults_once():
    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--tokens", type=int, default=150_000, help="tokens to read")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--ctx", type=int, default=32, help="context (default 32)")
    parser.add_argument("--flag", action="store_true", help="a switch")
    text = " ".join(parser.format_help().split())
    assert "tokens to read (default: 150000)" in text and "seeds (default: 0 1 2)" in text
    assert text.count("default") == 3 and "a switch" in text


def test_user_error_is_one_line(tmp_path, capsys):
    rc = cli.main(["report", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == EXIT_USER
    assert err.startswith("univ: error: ") and err.count("\n") == 1 and "univ correlate" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = cli.main(["report", str(tmp_path / "nowhere"), "--debug"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("univ: error: ")


def test_refused_exit_code(monkeypatch, tmp_path, capsys):
    import univ.report

    def refuse(*_a, **_k):
        raise Refused("another run's tables: rerun univ analyze")

    monkeypatch.setattr(univ.report, "run_report", refuse)
    assert cli.main(["report", str(tmp_path)]) == EXIT_REFUSED
    assert capsys.readouterr().err == "univ: error: another run's tables: rerun univ analyze\n"


def test_os_errors_are_user_errors(monkeypatch, tmp_path, capsys):
    import univ.report

    def missing(*_a, **_k):
        open(tmp_path / "absent.txt")  # noqa: SIM115 - raises FileNotFoundError with the OS's words

    monkeypatch.setattr(univ.report, "run_report", missing)
    assert cli.main(["report", str(tmp_path)]) == EXIT_USER
    assert capsys.readouterr().err == f"univ: error: No such file or directory: {tmp_path / 'absent.txt'}\n"


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import univ.report

    def bug(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(univ.report, "run_report", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["report", str(tmp_path)])
