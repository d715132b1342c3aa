"""Logging and progress that read well both in a terminal and in a SLURM log file."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from memcirc.errors import InputError

T = TypeVar("T")
LOG_EVERY_S = 30.0   # without a terminal, a progress line at most this often
DONE_LINE_S = 5.0    # a finished loop that ran this long logs its total and time (a bar leaves nothing)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _bars_open() -> bool:
    """A tqdm bar is drawn on the terminal now (disabled bars leave tqdm's registry at once)."""
    return bool(getattr(tqdm, "_instances", None))


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # no stderr, or a closed one
        return False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be swapped, e.g. by pytest). While a bar
    is drawn the line goes through `tqdm.write`, which lifts the bars and redraws them below it (what
    tqdm.contrib.logging.logging_redirect_tqdm does; that one would replace this handler and its
    held-back records with a plain one)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not _bars_open():
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: a failed write never raises
            self.handleError(record)


class _HeldHandler(_StderrHandler):
    """Holds records below WARNING back until `let_through()`; `drop_held()` discards them.

    Once the inputs are checked (`checked`), a WARNING or worse lets the held records through first,
    so the lines keep their order. (Not `release`: logging.Handler.release is its lock.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] | None = []
        self.checked = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None and record.levelno < logging.WARNING:
            self.held.append(record)
            return
        if self.checked:
            self.let_through()
        super().emit(record)

    def let_through(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)

    def drop_held(self) -> None:
        self.held = None


class _Backlog(logging.Handler):
    """Every record of the stage until its log.txt is attached (`attach_log_file` writes them there
    first): what a stage logs before its folder exists (the model load, the window count) belongs
    in its log too, whether stderr showed it or (an error run) dropped it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _handler(kind: type[logging.Handler]) -> Any:
    return next((h for h in logging.getLogger("memcirc").handlers if isinstance(h, kind)), None)


def _held_handler() -> _HeldHandler | None:
    return _handler(_HeldHandler)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; MEMCIRC_LOG_LEVEL overrides the flag.

    Records below WARNING are held back from stderr until the stage's first long step: the first
    progress loop (`Meter`) after `release_logs()` (which a stage calls once its inputs are checked),
    the first warning after it, or the end of the stage (`flush_logs()`), whichever comes first. A
    run stopped by bad input before then prints exactly one line on stderr: the error. Found later,
    the error line still comes last (memcirc.cli). log.txt gets every record from its creation on.
    """
    logger = logging.getLogger("memcirc")
    chosen = os.environ.get("MEMCIRC_LOG_LEVEL", level).upper()
    if chosen not in logging.getLevelNamesMapping():   # the flag is checked by the config, the environment here
        raise InputError(f"MEMCIRC_LOG_LEVEL={os.environ.get('MEMCIRC_LOG_LEVEL')!r} is not a logging level; "
                         f"use one of {', '.join(LEVELS)} or unset it")
    logger.setLevel(chosen)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = _HeldHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    logger.addHandler(handler)
    logger.addHandler(_Backlog())


def release_logs() -> None:
    """The stage's inputs are checked: the held-back records go to stderr at its first long step
    (a progress loop), its first warning or its end, and from then on every record at once."""
    handler = _held_handler()
    if handler is not None:
        handler.checked = True


def long_step() -> None:
    """A long step begins (a progress loop): after `release_logs()`, print the held records now."""
    handler = _held_handler()
    if handler is not None and handler.checked:
        handler.let_through()


def flush_logs() -> None:
    """Print the held-back records and log straight to stderr from now on (the stage ended, or was
    stopped by a signal or an unexpected error: what it logged is context for that)."""
    handler = _held_handler()
    if handler is not None:
        handler.let_through()


def end_stage_logs() -> None:
    """The stage is over (memcirc.cli): its records not yet in a log.txt (it never started) go nowhere,
    and a later in-process stage does not inherit them."""
    backlog = _handler(_Backlog)
    if backlog is not None:
        logging.getLogger("memcirc").removeHandler(backlog)


def discard_held_logs() -> None:
    """Drop held-back records (the run stopped on bad input: the error line is all that matters)."""
    handler = _held_handler()
    if handler is not None:
        handler.drop_held()


class _LogFile(logging.FileHandler):
    """log.txt. A failed write (disk full) stops it quietly: logging's default is a traceback on stderr
    per record, and the file is a copy of what stderr shows anyway."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.broken = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: ARG002 - logging's signature
        self.broken = True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)


def attach_log_file(path: Path, forced: bool = False) -> logging.Handler:
    """Also log to the stage folder (called once the folder is known to be writable), starting with
    the stage's records so far. An earlier run's log.txt is kept: this run appends below a separator
    line (`forced`: --force recomputes; else it resumes an unfinished run)."""
    logger = logging.getLogger("memcirc")
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(old)
        old.close()
    earlier = path.is_file() and path.stat().st_size > 0
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    if earlier and handler.stream is not None:   # FileHandler opens its stream at once (delay=False)
        why = "--force: recomputed" if forced else "resumed after an unfinished run"
        handler.stream.write(f"----- {time.strftime('%Y-%m-%d %H:%M:%S')} a new run of this stage "
                             f"({why}); the lines above are an earlier run's -----\n")
    backlog = _handler(_Backlog)
    if backlog is not None:
        logger.removeHandler(backlog)
        for record in backlog.records:
            handler.handle(record)
    logger.addHandler(handler)
    return handler


def show(text: str) -> None:
    """Print a result (a stage's table or closing line) on stdout and put it into log.txt too.
    stdout gets exactly `print(text)`: run_pipeline.sh and the tests read it."""
    print(text)
    logger = logging.getLogger("memcirc.results")
    message = text if "\n" not in text else "stdout:\n" + text   # a table keeps its alignment
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger("memcirc").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def log_to_file_only(message: str) -> None:
    """An ERROR record in log.txt only (the error line the CLI prints on stderr itself), so the stage
    folder's log says why the run stopped."""
    logger = logging.getLogger("memcirc")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class Meter:
    """Progress of one long loop, counted in `unit`s (windows, continuations, ...).

    In a terminal: a tqdm bar on stderr. Without one (SLURM, a pipe, pytest) the bar is off and a log
    line at most every `every_s` seconds gives the count, the rate and the ETA, so a log file shows the
    loop is moving and when it will end. Either way a loop that ran `DONE_LINE_S` or longer logs its
    total, time and rate at the end (the bar does not stay). `every_s` defaults to `LOG_EVERY_S`.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "items",
                 every_s: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.n = 0
        draws = _stderr_is_tty()   # tqdm's own disable=None test: no bar without a terminal
        if draws:
            flush_logs()   # the held log lines first, then the bar (which would print above them)
        else:
            long_step()
        self.bar = tqdm(desc=desc, total=total, unit=f" {unit}", disable=not draws, dynamic_ncols=True,
                        leave=False)
        self.to_log = not draws
        self.start = self.last = time.monotonic()
        self.log = logging.getLogger("memcirc.progress")

    def update(self, n: int = 1) -> None:
        """`n` more units done (0: still alive, e.g. after a step that finished none)."""
        self.n += n
        self.bar.update(n)
        now = time.monotonic()
        if self.to_log and now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def update_to(self, n: int) -> None:
        """Set the count to `n` units done when that is ahead of it (a work step's own count may lag)."""
        if n > self.n:
            self.update(n - self.n)

    def line(self, now: float | None = None) -> str:
        """'scoring: 512/767 windows (67%), 12.3 windows/s, ETA 21 s'."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total is not None:
            eta = f", ETA {duration((self.total - self.n) / rate)}" if rate > 0 else ", ETA ?"
        return f"{self.desc}: {count} {self.unit}{share}, {_rate(rate)} {self.unit}/s{eta}"

    def close(self, finished: bool = True) -> None:
        """Close the bar; a finished loop that ran `DONE_LINE_S` (or `every_s`, if shorter) or longer
        logs its total, time and rate: the bar does not stay (leave=False), this line does."""
        self.bar.close()
        elapsed = time.monotonic() - self.start
        if finished and elapsed >= min(self.every_s, DONE_LINE_S):
            self.log.info("%s: done, %d %s in %s (%s %s/s)", self.desc, self.n, self.unit,
                          duration(elapsed), _rate(self.n / max(elapsed, 1e-9)), self.unit)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(finished=exc_type is None)   # an interrupted loop is not "done"


def _rate(per_s: float) -> str:
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress(items: Iterable[T], desc: str, total: int | None = None, every_s: float | None = None,
             unit: str = "items") -> Iterator[T]:
    """Each item of `items`, counted by a `Meter` (a tqdm bar in a terminal; else log lines with rate and ETA)."""
    with Meter(desc, total, unit, every_s) as meter:
        for item in items:
            yield item
            meter.update()
