"""Job-array sharding and resumable chunked execution, shared by the heavy stages.

A job scores its items chunk by chunk; each finished chunk is one atomic JSONL file, so a job
killed by SIGTERM (SLURM preemption) resumes at the first missing chunk and produces the same
bytes as an uninterrupted run. With N shards, shard i takes the i-th contiguous slice and a
cheap `--merge` step concatenates the shard outputs in order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from memcirc.artifacts import ChunkStore, sha256_file
from memcirc.errors import InputError
from memcirc.logs import Meter

log = logging.getLogger(__name__)
T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer (set by SLURM job arrays; "
                         "unset it or pass --num-shards/--shard-index)") from None


def resolve_shards(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_shards, shard_index), defaulting from a SLURM job array, else (1, 0)."""
    if num_shards is None:
        num_shards = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if shard_index is None:
        # Array ids may start anywhere (--array=1-4); shard ids always start at 0.
        shard_index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    if not 0 <= shard_index < num_shards:
        raise InputError(f"shard index {shard_index} is outside 0..{num_shards - 1} (--shard-index/--num-shards)")
    return num_shards, shard_index


def shard_bounds(n_items: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Contiguous, near-equal slices (as numpy.array_split), so merging is concatenation."""
    base, extra = divmod(n_items, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (shard_index < extra)


def chunk_aligned_bounds(n_items: int, chunk_size: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Shard bounds on the chunk grid of the whole item list: each shard takes whole chunks, so its
    chunks (and the batches inside them) are exactly those of a one-job run, and the merged output
    is byte-identical to it. A shard may be empty when there are fewer chunks than shards."""
    n_chunks = -(-n_items // chunk_size)
    first, last = shard_bounds(n_chunks, num_shards, shard_index)
    return min(first * chunk_size, n_items), min(last * chunk_size, n_items)


def shard_damage(path: Path, marker: dict[str, Any]) -> str | None:
    """Why an array task's output `path` does not match the sha256 its done marker records, or None."""
    if not path.is_file():
        return f"{path} is missing"
    sha = sha256_file(path)
    return None if sha == marker.get("sha256") else f"{path} differs from its done marker (sha256 {sha[:12]})"


def read_marker(path: Path, keys: Sequence[str] = ("fingerprint", "num_shards", "shard_index")
                ) -> dict[str, Any] | None:
    """An array task's done marker; None when there is none, or it is unreadable or lacks `keys` (then
    the task counts as not done and is recomputed: a marker is written last, so it is never needed)."""
    try:
        marker = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:   # ValueError: cut JSON, bytes that are not UTF-8
        log.info("%s is unreadable (%s); its task is treated as not done", path, e)
        return None
    if not isinstance(marker, dict) or any(k not in marker for k in keys):
        log.info("%s is not a done marker of this memcirc; its task is treated as not done", path)
        return None
    return marker


def run_chunked(items: Sequence[T], work: Callable[[Sequence[T]], list[dict[str, Any]]],
                store: ChunkStore, chunk_size: int, desc: str, unit: str = "items") -> bytes:
    """Apply `work` (one row per item) chunk by chunk, skipping intact chunks already on disk; returns
    all rows as JSONL. Progress is counted per chunk (`run_chunked_by_batch` counts inside a chunk)."""
    return run_chunked_by_batch(items, lambda chunk, _advance: work(chunk), store, chunk_size, desc, unit)


def run_chunked_by_batch(items: Sequence[T],
                         work: Callable[[Sequence[T], Callable[[int], None]], list[dict[str, Any]]],
                         store: ChunkStore, chunk_size: int, desc: str, unit: str = "items") -> bytes:
    """`run_chunked` whose `work(chunk, advance)` calls `advance(n)` as it finishes `n` items (per
    batch), so a chunk of hundreds of windows on a large model is not minutes of silence."""
    n_chunks = max(1, -(-len(items) // chunk_size))
    todo = [i for i in range(n_chunks) if not store.done(i)]
    if len(todo) < n_chunks:
        log.info("resuming: %d of %d chunks already done in %s", n_chunks - len(todo), n_chunks, store.directory)
    # the meter counts the items still to do, so its rate and ETA are this run's
    sizes = [len(items[i * chunk_size:(i + 1) * chunk_size]) for i in todo]
    with Meter(desc, total=sum(sizes), unit=unit) as meter:
        done = 0
        for index, size in zip(todo, sizes):
            rows = work(items[index * chunk_size:(index + 1) * chunk_size], meter.update)
            if len(rows) != size:   # one row per item: anything else would shift every later row
                raise RuntimeError(f"chunk {index} of {desc}: {len(rows)} rows for {size} items")
            store.write(index, rows)
            done += size
            meter.update_to(done)   # a work step that counts nothing still moves the meter per chunk
    data = store.concatenate(n_chunks)
    if (n_rows := data.count(b"\n")) != len(items):
        raise RuntimeError(f"{store.directory}: {n_rows} rows for {len(items)} items after {desc}")
    return data
