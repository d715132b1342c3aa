"""Errors a user can fix. Stage scripts turn them into one line on stderr and exit code 2."""

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad input or configuration: a missing file, a malformed row, an unknown key, a bad value.

    The message names the problem and, where there is one, the fix. It must fit on one line.
    """


def exit_code(work: Callable[[], object]) -> int:
    """Run a module command line's work: 0, or 2 with the InputError's line on stderr."""
    try:
        work()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
