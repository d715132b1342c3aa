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


def setup_logging(level: str = "INFO") -> None:
    """One stderr handler on the package logger; MEMCIRC_LOG_LEVEL overrides the flag."""
    logger = logging.getLogger("memcirc")
    logger.setLevel(os.environ.get("MEMCIRC_LOG_LEVEL", level).upper())
    logger.propagate = False
    if not any(getattr(h, "_memcirc", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        handler._memcirc = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def attach_log_file(path: Path) -> logging.Handler:
    """Also log to the stage folder (called once the folder is known to be writable)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger("memcirc").addHandler(handler)
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
