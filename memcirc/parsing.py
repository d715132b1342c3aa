"""Reading what a user wrote, strictly: command-line flags and YAML files.

A typo must never be taken for something else: flags are never abbreviated (`--lim` is not
`--limit`), a YAML mapping may not hold a key twice (the last one would win silently), and an
unknown flag or key is an InputError that suggests the closest known name ("did you mean ...?").
"""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from memcirc.errors import InputError

MAX_LISTED = 12   # known names listed in one error line at most; beyond that the line points at --help


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name` (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_name(what: str, name: str, known: Iterable[str], where: str = "", help_hint: str = "") -> str:
    """"unknown WHAT 'NAME'[ in WHERE] (did you mean 'X'?)"; without a close match, the known names
    when there are at most MAX_LISTED of them, else `help_hint` (e.g. "see memorization_score.py --help")."""
    known = sorted(set(known))
    head = f"unknown {what} '{name}'" + (f" in {where}" if where else "")
    if (close := did_you_mean(name, known)) is not None:
        return f"{head} (did you mean '{close}'?)"
    if len(known) <= MAX_LISTED or not help_hint:
        shown = known[:MAX_LISTED]
        more = f", ... ({len(known) - MAX_LISTED} more)" if len(known) > MAX_LISTED else ""
        return f"{head}; known: {', '.join(shown)}{more}"
    return f"{head}; {help_hint}"


# -- flags -----------------------------------------------------------------------------------

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations whose errors are one-line InputErrors (exit 2 in the CLIs),
    with "did you mean" for an unknown flag (Python 3.11's argparse suggests nothing for flags)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        # argparse reads "-1e-3" or "-inf" after a flag as another flag ("expected one argument"):
        # these are values too, so the range check can name the key (no memcirc flag looks like them)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> typing.NoReturn:
        if (m := _UNRECOGNIZED.match(message)) is not None:
            first = m.group(1).split()[0]
            if first.startswith("--") and (close := self._closest_flag(first.split("=")[0])) is not None:
                raise InputError(f"{message} (did you mean {close}? see --help)")
        raise InputError(f"{message} (see --help)")

    def _closest_flag(self, flag: str) -> str | None:
        # Compared without the leading dashes (every flag has them: they would inflate the ratio) and
        # with '_' as '-' (--prefix_len is --prefix-len); the first spelling a flag declares is shown.
        flags: dict[str, str] = {}
        for action in _all_actions(self):
            for s in action.option_strings:
                if s.startswith("--"):
                    flags.setdefault(s[2:].replace("_", "-"), s)
        close = did_you_mean(flag[2:].replace("_", "-"), flags)
        return flags[close] if close is not None else None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (examples keep their lines); `--layers N ...` for a flag
    taking one or more values, so a `{choice,...}` list is not printed twice."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == argparse.ONE_OR_MORE:
            return f"{self._metavar_formatter(action, default_metavar)(1)[0]} ..."
        return super()._format_args(action, default_metavar)


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions and its sub-commands' (their unknown flags are reported by the top parser)."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _all_actions(sub)
    return actions


# -- YAML ------------------------------------------------------------------------------------

class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding one key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor` merges: overriding is their point
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:   # an unhashable key: SafeLoader's own error says so
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str, what: str = "config file") -> Any:
    """The YAML document of `path` (safe tags only, no duplicate keys); InputError naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} cannot be read as UTF-8 text ({e})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as e:
        raise InputError(f"{path}:{e.line}: duplicate key {e.key!r} (first at line {e.first_line}); "
                         "keep one of them") from None
    except yaml.YAMLError as e:
        raise InputError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
