"""Logging and progress that read well both in a terminal and in a SLURM log file."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be swapped, e.g. by pytest)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _HeldHandler(_StderrHandler):
    """Holds records below WARNING back until `let_through()`; `drop_held()` discards them.

    (Not `release`: logging.Handler.release is its lock.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None and record.levelno < logging.WARNING:
            self.held.append(record)
        else:
            super().emit(record)

    def let_through(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)

    def drop_held(self) -> None:
        self.held = None


def _held_handler() -> _HeldHandler | None:
    return next((h for h in logging.getLogger("memcirc").handlers if isinstance(h, _HeldHandler)), None)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; MEMCIRC_LOG_LEVEL overrides the flag.

    Records below WARNING are held back until `release_logs()` (called once a stage has checked
    its inputs), so a run stopped by bad input prints exactly one line: the error.
    """
    logger = logging.getLogger("memcirc")
    logger.setLevel(os.environ.get("MEMCIRC_LOG_LEVEL", level).upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = _HeldHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    logger.addHandler(handler)


def release_logs() -> None:
    """Print the held-back records and log straight to stderr from now on."""
    handler = _held_handler()
    if handler is not None:
        handler.let_through()


def discard_held_logs() -> None:
    """Drop held-back records (the run stopped on bad input: the error line is all that matters)."""
    handler = _held_handler()
    if handler is not None:
        handler.drop_held()


def attach_log_file(path: Path) -> logging.Handler:
    """Also log to the stage folder (called once the folder is known to be writable)."""
    logger = logging.getLogger("memcirc")
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    return handler


def progress(items: Iterable[T], desc: str, total: int | None = None, every_s: float = 30.0) -> Iterator[T]:
    """tqdm in a terminal; without one (SLURM), a log line at most every `every_s` seconds."""
    log = logging.getLogger("memcirc.progress")
    bar = tqdm(items, desc=desc, total=total, disable=None, dynamic_ncols=True, leave=False)
    last = time.monotonic()
    for i, item in enumerate(bar, 1):
        yield item
        if bar.disable and time.monotonic() - last >= every_s:
            last = time.monotonic()
            log.info("%s: %d/%s", desc, i, total if total is not None else "?")
    bar.close()
