"""Errors a user can fix. Stage scripts turn them into one line on stderr and exit code 2."""


class InputError(Exception):
    """Bad input or configuration: a missing file, a malformed row, an unknown key, a bad value.

    The message names the problem and, where there is one, the fix. It must fit on one line.
    """
