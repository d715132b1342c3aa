"""Errors a user can fix. Stage scripts turn them into one line on stderr and exit code 2.

A full disk, a quota or a read-only file system while writing is not bad input but not a bug
either: one line too, exit 1 (`no_room_message`), and the same command resumes once fixed.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

# errno -> what to do: errors of the file system, not of the input or the code
NO_ROOM = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (or raise the quota)",
           errno.EROFS: "make it writable"}


class InputError(Exception):
    """Bad input or configuration: a missing file, a malformed row, an unknown key, a bad value.

    The message names the problem and, where there is one, the fix. It must fit on one line.
    """


def one_line(message: str) -> str:
    """`message` with line breaks and other control characters escaped (a path may hold a newline):
    the `error:` line is one line whatever the message quotes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


def no_room_message(e: OSError, where: Path | None = None) -> str:
    """"no space left on device while writing FILE (ENOSPC): free space and re-run the same command
    to resume" for an OSError whose errno is in NO_ROOM. FILE: the error's file name, else `where`."""
    target = e.filename or (f"into {where}" if where is not None else "the outputs")
    code = e.errno or 0
    return (f"{os.strerror(code).lower()} while writing {target} ({errno.errorcode.get(code, code)}): "
            f"{NO_ROOM[code]} and re-run the same command to resume")


def exit_code(work: Callable[[], object]) -> int:
    """Run a module command line's work: 0; 2 with the InputError's line on stderr; 1 with one line
    for a full disk (NO_ROOM); any other error propagates with its traceback."""
    try:
        work()
    except InputError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        print(f"error: {one_line(no_room_message(err))}", file=sys.stderr)
        return 1
    return 0
