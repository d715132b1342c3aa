"""Names of window groups: canaries inserted k times are "k=<k>" or "<family> k=<k>" (testbed v2's
"template k=8", "shared k=8"); anything else (e.g. "corpus") is a plain group. One order for every
summary, table and figure: by family ("k=<k>" first), by k within a family, then the rest alphabetically."""

from __future__ import annotations

from collections.abc import Iterable


def dose_of(group: str) -> int | None:
    """k of a canary group named "k=<k>" or "<family> k=<k>" (inserted k times into the training data,
    e.g. "template k=8"); None for others (e.g. "corpus")."""
    family, _, dose = group.rpartition(" ")
    digits = dose[2:]
    if " " in family or not dose.startswith("k=") or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def family_of(group: str) -> str | None:
    """The family word of a canary group ("template" of "template k=8", "" of "k=8"); None for others."""
    return group.rpartition(" ")[0] if dose_of(group) is not None else None


def group_key(group: str) -> tuple[int, str, int, str]:
    k = dose_of(group)
    return (0, family_of(group) or "", k, "") if k is not None else (1, "", 0, group)


def group_order(groups: Iterable[str]) -> list[str]:
    """Canary groups by family ("k=<k>" first, then "<family> k=<k>" by family) and by k within one
    (numerically: k=8 before k=16), then the others alphabetically."""
    return sorted(set(groups), key=group_key)
