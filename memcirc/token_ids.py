"""Strict integer token ids, as every reader of token data checks them (data rows, label tables,
upstream scores).

A token id is an `int` (never a `bool`, which Python counts as one), an integer NumPy scalar or
array (Parquet, NPY and 🤗 datasets columns), or a whole float such as `2.0` (Arrow stores a list
column holding one float as floats throughout). Anything else is refused, never coerced: `5.7`,
`true`, `"5"`, a nested list, `null`, and values outside int64 (`1e30`, 2**70, a uint64 >= 2**63,
shown as the value it is, not wrapped). Range against a vocabulary is checked later, per model.

The common case (a JSON list of ints) costs two passes in C (`token_list`): no Python-level
loop per element. The slow path only runs to find and name the offending element.
"""

from __future__ import annotations

import array
import math
from typing import Any

import numpy as np

from memcirc.errors import InputError

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_SHOWN = 40     # characters of a refused value shown in the message


def kind(value: Any) -> str:
    """A value's type as a data file's reader thinks of it (JSON names)."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "a number"
    names = {str: "a string", list: "a list", tuple: "a list", dict: "an object", np.ndarray: "an array"}
    return names.get(type(value), f"a {type(value).__name__}")


def token_list(values: Any, at: str, column: str) -> list[int]:
    """`values` (a row's token column) as a list of Python ints, or an InputError naming `at`
    (the file and line/row), the column, the position and the value."""
    if isinstance(values, (list, tuple)):
        # JSON ints, two passes in C: array('q') takes only integers within int64 (a float, string,
        # None or list is a TypeError, 2**70 an OverflowError) but takes True as 1, so a type scan
        # wants exactly `int`. The list itself is returned: copying 6.4M ids costs more than the checks.
        try:
            array.array("q", values)
            if set(map(type, values)) <= {int}:
                return values if isinstance(values, list) else list(values)
        except (TypeError, OverflowError):
            if set(map(type, values)) == {float}:   # an Arrow float column: whole floats are ids
                return _checked_array(np.asarray(values, np.float64), at, column).tolist()
        return _checked_one_by_one(values, at, column)   # mixed ints and floats, NumPy scalars, or bad
    if isinstance(values, np.ndarray):
        return _checked_array(values, at, column).tolist()
    raise InputError(f"{at}: column '{column}' holds {kind(values)}, expected a list of token ids")


def token_array(values: Any, at: str, column: str) -> np.ndarray:
    """`token_list` as an int64 array."""
    if isinstance(values, np.ndarray):
        return _checked_array(values, at, column)
    return np.asarray(token_list(values, at, column), np.int64)


def _checked_array(ids: np.ndarray, at: str, column: str) -> np.ndarray:
    """An int64 copy of a 1-D array of token ids, every element checked at once."""
    if ids.ndim != 1:
        raise InputError(f"{at}: column '{column}' holds a {ids.ndim}-D array, expected a flat list of "
                         "token ids")
    dtype = ids.dtype
    if np.issubdtype(dtype, np.signedinteger):
        return ids.astype(np.int64, copy=False)
    if np.issubdtype(dtype, np.unsignedinteger):
        ok = ids <= INT64_MAX          # compared as unsigned: a uint64 >= 2**63 is not wrapped
    elif np.issubdtype(dtype, np.floating):
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(ids) & (np.floor(ids) == ids) & (ids >= INT64_MIN) & (ids < 2.0**63)
    else:                                # bool, strings, objects: element by element
        return np.asarray(_checked_one_by_one(ids.tolist(), at, column), np.int64)
    if not ok.all():
        position = int(np.argmin(ok))    # the first refused element
        raise _element_error(ids[position].item(), position, at, column)
    return ids.astype(np.int64)


def _checked_one_by_one(values: Any, at: str, column: str) -> list[int]:
    """The slow path: `values` as ints, or the InputError for the first one that is not a token id."""
    for position, value in enumerate(values):
        if _not_an_id(value) is not None:
            raise _element_error(value, position, at, column)
    return [int(v) for v in values]


def _element_error(value: Any, position: int, at: str, column: str) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
    return InputError(f"{at}: column '{column}' holds {kind(value)} at position {position} ({shown}), "
                      f"{_not_an_id(value)}")


def _not_an_id(value: Any) -> str | None:
    """Why `value` is not a token id (None: it is one)."""
    if isinstance(value, (bool, np.bool_)):
        return "expected integer token ids"
    if isinstance(value, (int, np.integer)):
        return None if INT64_MIN <= int(value) <= INT64_MAX else "outside the int64 range of token ids"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            return "expected integer token ids"
        return None if INT64_MIN <= value < 2.0**63 else "outside the int64 range of token ids"
    return "expected integer token ids"
