"""User-facing errors and the exit codes the CLI maps them to.

A ``UserError`` is something the user can fix (a missing file, a bad option, a refused resume): the CLI prints
it as one line, ``univ: error: <what is wrong and what to do>``, and exits with its code; a traceback appears
only with ``--debug``. Anything else is a bug and keeps its traceback.

Exit codes (documented in the README):

    0   success
    1   an unexpected error (a bug: please report it with the --debug traceback)
    2   a user error: bad option, missing or unreadable input, unknown architecture, too little memory
    3   refused: going on would change the result (a resume against other models, data, options or a
        corrupt checkpoint; an output folder that holds another run; a folder another process is writing)
    75  interrupted (SIGINT/SIGTERM): a checkpoint was written; rerun with --resume to finish
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later (with --resume)


class UserError(Exception):
    """An error the user can act on; ``str(err)`` says what is wrong and what to do, in one line."""

    exit_code: int = EXIT_USER


class Refused(UserError):
    """Going on would silently change the result (resume mismatch, corrupt state, folder in use)."""

    exit_code = EXIT_REFUSED


class Interrupted(UserError):
    """The run stopped on a signal after writing a checkpoint; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED
