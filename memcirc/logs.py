"""Logging and progress that read well both in a terminal and in a SLURM log file."""

from __future__ import annotations

import logging
import logging.handlers
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

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; MEMCIRC_LOG_LEVEL overrides the flag.

    Records below WARNING are held back until `release_logs()` (called once a stage has checked
    its inputs), so a run stopped by bad input prints exactly one line: the error.
    """
    logger = logging.getLogger("memcirc")
    logger.setLevel(os.environ.get("MEMCIRC_LOG_LEVEL", level).upper())
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, "_memcirc", False)]:
        logger.removeHandler(handler)
        handler.close()
    target = _StderrHandler()
    target.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.WARNING, target=target,
                                          flushOnClose=False)
    for handler in (target, held):
        handler._memcirc = True  # type: ignore[attr-defined]
    logger.addHandler(held)


def discard_held_logs() -> None:
    """Drop held-back records (the run stopped on bad input: the error line is all that matters)."""
    logger = logging.getLogger("memcirc")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler) and getattr(handler, "_memcirc", False):
            handler.buffer.clear()
            logger.removeHandler(handler)


def release_logs() -> None:
    """Print the held-back records and log straight to stderr from now on."""
    logger = logging.getLogger("memcirc")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler) and getattr(handler, "_memcirc", False):
            handler.flush()
            logger.removeHandler(handler)
            logger.addHandler(handler.target)


def attach_log_file(path: Path) -> logging.Handler:
    """Also log to the stage folder (called once the folder is known to be writable)."""
    logger = logging.getLogger("memcirc")
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._memcirc = True  # type: ignore[attr-defined]
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
