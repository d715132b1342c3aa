"""memcirc's own cache (`$MEMCIRC_CACHE`, else `~/.cache/memcirc`) and the sha256 of big files, hashed once.

A model's identity is the sha256 of its weight files (`memcirc.models.weights`; a GGUF's own file in
`memcirc.models.gguf`). Reading 500 MB to GBs in every stage would cost seconds to minutes each, so a
file's digest is remembered in `<cache>/sha256/<key>.json`, keyed by the file's resolved path, size,
mtime, ctime, inode and device: a file rewritten in place (or replaced by another, or copied over) has
another mtime, ctime or inode, so it is hashed again. (ctime cannot be set back by `touch`.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from memcirc import artifacts as art

log = logging.getLogger(__name__)

CACHE_ENV = "MEMCIRC_CACHE"
_SHA256_DIR = "sha256"
_LOG_AFTER_S = 2.0   # hashing that takes longer than this is worth a log line


def cache_root() -> Path:
    """`$MEMCIRC_CACHE`, else `~/.cache/memcirc`."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "memcirc"


def _stat_key(path: Path) -> dict[str, int | str]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def sha256_cached(path: Path) -> str:
    """sha256 of the file at `path` (symlinks resolved), read once per (path, size, mtime, ctime, inode)."""
    path = Path(path).resolve()
    key = _stat_key(path)
    record = cache_root() / _SHA256_DIR / f"{art.sha256_json(key)[:32]}.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(record.read_text())
        if {k: known.get(k) for k in key} == key and len(str(known.get("sha256", ""))) == 64:
            return str(known["sha256"])
    started = time.monotonic()
    digest = art.sha256_file(path)   # streamed in 1 MiB blocks
    if (took := time.monotonic() - started) > _LOG_AFTER_S:
        log.info("sha256 of %s (%.0f MB) in %.1f s, once", path, path.stat().st_size / 1e6, took)
    if _stat_key(path) == key:   # not changed while it was read; else the next run hashes it again
        with contextlib.suppress(OSError):  # a read-only cache only costs the re-hash next time
            art.write_json(record, {**key, "sha256": digest})
    return digest
