"""Config fields: `option()` declares one (default, help, flags, checks), `OptionGroup` checks every
field of a dataclass on construction: its type, choices, minimum, range (`within`), and that a float is
finite. The stage configs and shared groups built from them are `memcirc.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from memcirc.errors import InputError

SHARDING = "sharding and SLURM"   # the --help section of the job-array fields, whichever class declares them


def option(
    default: Any = None,
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    hashed: bool = True,
    minimum: float | None = None,
    within: str | None = None,
    group: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field. `hashed=False` marks run control that cannot change the results.

    `minimum`: the value (each item of a list) must be >= it. `within`: its range in interval
    notation, e.g. "(0, 1]" or "[0, inf)" (every float option declares one). A float is always finite.
    `group`: the --help section, when not the one of the class that declares the field (SHARDING);
    `metavar`: the value's name in --help (default: `{choice,...}` where there are choices).
    """
    meta = {"help": help, "aliases": aliases, "choices": choices, "hashed": hashed, "minimum": minimum,
            "within": _interval(within) if within is not None else None, "group": group, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class OptionGroup:
    """A set of config fields; every field is checked against its type, choices, minimum and range on
    construction. Subclasses add their own checks in `__post_init__` after calling super()."""

    title: ClassVar[str] = ""   # the --help section of the fields this class declares

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))


# -- value checking -------------------------------------------------------------------------

_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")


def shown(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error line stays one short line, whatever was given
    (a YAML alias bomb expands to millions of characters)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _interval(text: str) -> tuple[str, float, float, bool, bool]:
    """(text, low, high, low open?, high open?) of "(0, 1]"-style notation (declared in code)."""
    m = _INTERVAL.fullmatch(text)
    if m is None:
        raise ValueError(f"bad interval {text!r}; write e.g. '(0, 1]' or '[0, inf)'")
    return text, float(m[2]), float(m[3]), m[1] == "(", m[4] == ")"


def _inside(x: float, interval: tuple[str, float, float, bool, bool]) -> bool:
    _, lo, hi, lo_open, hi_open = interval
    return (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def field_type(f: dataclasses.Field) -> tuple[Any, bool]:
    # Annotations are strings under `from __future__ import annotations`; resolve them once.
    # `typing.__dict__` is `vars(typing)`; spelled so because typeshed types vars() as a mappingproxy.
    tp = f.type if not isinstance(f.type, str) else eval(f.type, typing.__dict__, {})  # noqa: S307
    return _base_type(tp)


def _check_value(f: dataclasses.Field, value: Any) -> None:
    tp, optional = field_type(f)
    key = f.name
    if value is None:
        if not optional:
            raise InputError(f"config key '{key}' must not be empty")
        return
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        accepted = (int, float) if item_type is float else item_type
        if not isinstance(value, list) or not all(isinstance(v, accepted) and not isinstance(v, bool)
                                                  for v in value):
            raise InputError(f"config key '{key}' must be a list of {item_type.__name__}, got {shown(value)}")
        items = value
    else:
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              bool: isinstance(value, bool), str: isinstance(value, str)}.get(tp, True)
        if not ok:
            raise InputError(f"config key '{key}' must be {tp.__name__}, got {shown(value)}")
        items = [value]
    for item in items:
        _check_item(f, item)


def _check_item(f: dataclasses.Field, item: Any) -> None:
    """One value (or list item) against the field's choices, finiteness, minimum and range."""
    key, meta = f.name, f.metadata
    if meta.get("choices") and item not in meta["choices"]:
        choices = ", ".join(map(str, meta["choices"]))
        raise InputError(f"config key '{key}' has bad value {shown(item)}; choose from {choices}")
    # NaN compares False with everything, so it would pass every range check below (and `inf` is
    # never a meaningful setting); YAML .nan/.inf and the flags nan, inf, 1e999 all arrive here.
    if isinstance(item, float) and not math.isfinite(item):
        raise InputError(f"config key '{key}' must be a finite number, got {shown(item)}")
    if meta.get("minimum") is not None and item < meta["minimum"]:
        raise InputError(f"config key '{key}' must be >= {meta['minimum']}, got {shown(item)}")
    if (within := meta.get("within")) is not None and not _inside(item, within):
        raise InputError(f"config key '{key}' must lie in {within[0]}, got {shown(item)}")
