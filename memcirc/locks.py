"""One writer per stage folder: an exclusive `flock` on `<folder>/.lock`, held by the process writing it.

Two runs on one `--output-dir` (a resubmitted SLURM job, a second terminal) would otherwise interleave
their chunks, and one of them would finish with a manifest that does not describe its rows. The lock
file holds `{pid, host, started}` of its holder, for the refusal message only: the lock itself is the
kernel's, so it dies with the process, and a dead process's lock file is simply taken over.

Array tasks lock their own task folder exclusively and the stage folder *shared*, so tasks run side by
side while a merge (or a one-job run) of the stage, which locks the stage folder exclusively, cannot
run at the same time as any of them. A process runs one stage at a time: `release_all` drops what an
earlier stage run of the same process left held (finished or failed), so sequential in-process runs on
one folder work. flock over NFS is emulated with POSIX record locks by Linux clients, which hold
across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcirc.errors import InputError

LOCK_FILE = ".lock"
_INFO_BYTES = 256   # the info record is padded to one size, so a rewrite never leaves a longer tail


@dataclass
class _Held:
    fd: int
    path: Path
    exclusive: bool


_HELD: dict[str, _Held] = {}   # lock file path (resolved) -> the lock this process holds on it


def _key(directory: Path) -> str:
    # realpath, not Path.resolve: a symlink loop must reach the writability probe's one-line error
    return os.path.realpath(Path(directory) / LOCK_FILE)


def _read_info(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4 * _INFO_BYTES, 0).decode() or "{}")
    except (OSError, ValueError):   # being rewritten, or not ours: the message does without
        return {}
    return info if isinstance(info, dict) else {}


def _write_info(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = json.dumps(info).encode().ljust(_INFO_BYTES - 1) + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def busy_message(directory: Path, info: dict[str, Any]) -> str:
    return (f"another memcirc run (pid {info.get('pid', '?')}, host {info.get('host', '?')}) is writing "
            f"{directory}; wait for it or stop it")


def check_free(directory: Path) -> None:
    """InputError when another process holds `directory`'s lock exclusively. Creates nothing."""
    path = Path(directory) / LOCK_FILE
    if _key(directory) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # no lock file (or no folder): nobody is writing there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # shared: array tasks do not exclude each other
    except BlockingIOError:
        raise InputError(busy_message(directory, _read_info(fd))) from None
    finally:
        os.close(fd)   # closing drops the probe's lock


def _lock_new(directory: Path, exclusive: bool) -> _Held:
    path = Path(directory) / LOCK_FILE
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise InputError(busy_message(directory, info)) from None
        # A holder that released between our open and flock has unlinked the file we locked: only a
        # lock on the file now at `path` counts, so retry on that one.
        st = os.fstat(fd)
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                return _Held(fd, path, exclusive)
        os.close(fd)
    raise RuntimeError(f"could not lock {path}: it keeps being replaced")


def acquire(directory: Path, *, exclusive: bool = True) -> None:
    """Lock the existing folder `directory` for this process (exclusive: one writer; shared: one of
    several array tasks). Re-acquiring a lock this process holds is a no-op (or an upgrade)."""
    key = _key(directory)
    held = _HELD.get(key)
    if held is None:
        held = _HELD[key] = _lock_new(directory, exclusive)
    elif exclusive and not held.exclusive:
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(held.fd)
            _HELD.pop(key)
            os.close(held.fd)   # an upgrade that fails may have dropped the shared lock already
            raise InputError(busy_message(directory, info)) from None
        held.exclusive = True
    _write_info(held.fd)


def release(directory: Path) -> None:
    """Drop this process's lock on `directory` (if any). The sole (exclusive) holder removes the file,
    so a finished folder holds no `.lock`; a shared holder leaves it to the others."""
    _release(_key(directory))


def _release(key: str) -> None:
    held = _HELD.pop(key, None)
    if held is None:
        return
    if held.exclusive:
        with contextlib.suppress(FileNotFoundError):
            held.path.unlink()   # still locked here: nobody can take it between the unlink and the close
    os.close(held.fd)


def release_all() -> None:
    """Drop every lock this process holds (the end of a stage run, finished or failed)."""
    for key in list(_HELD):
        _release(key)


def held() -> list[Path]:
    """The folders this process holds locks on (for tests and diagnostics)."""
    return [h.path.parent for h in _HELD.values()]
