"""The one exception family for input a user can fix, and the one way a command reports it.

Every stage raises a subclass of :class:`UserError` for bad input (a missing file, a malformed line,
a flag out of range, a checkpoint that does not fit the model). Its message is one line that names
the flag, file or line and, where there is one, the way out. Each ``python -m protext.X`` command
catches it once, in :func:`run_command`, prints ``error: <message>`` and exits 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input that the user can fix; the message is a single actionable line."""


#: exit status of a command stopped by bad input (argparse uses the same)
EXIT_USAGE = 2
#: exit status after Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130


def run_command(body: Callable[[], int], *, resume_hint: str = "rerun the same command to continue") -> int:
    """Run a command's body; a :class:`UserError` becomes ``error: ...`` and exit 2, Ctrl-C exit 130.

    ``resume_hint`` is printed after an interrupt, so a user who stops a long run knows what is
    kept and how to go on.
    """
    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted: {resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
