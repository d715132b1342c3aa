"""Atomic writes, hashing and the file formats every stage shares (JSON, JSONL, safetensors).

A stage writes into its folder under the run root with fixed file names declared here; its
manifest and lifecycle are `memcirc.manifest`. Nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from memcirc.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCORES_JSONL = "scores.jsonl"
SUMMARY_JSON = "summary.json"
HISTOGRAM_PNG = "histogram.png"
LOG_TXT = "log.txt"
CHUNKS_DIR = "chunks"          # resumable partial results of one job
SHARDS_DIR = "shards"          # one folder per SLURM array task, merged by `--merge`
CHUNK_STATE = "state.json"     # fingerprint of the config that wrote the chunks next to it


# -- atomic writes ---------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    data = jsonl_bytes(rows)
    atomic_write_bytes(path, data)
    return data.count(b"\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line is an InputError naming the file and line."""
    return (row for _, row in read_jsonl_numbered(path))


def read_jsonl_numbered(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) of a JSONL file; blank lines are skipped but counted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header key-sorted. safetensors writes the metadata in
    a per-process random order (a Rust HashMap), so equal tensors and metadata gave different bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def save_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, canonical_safetensors(blob))


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise InputError(f"file not found: {path}")
    return load_file(str(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ensure_writable(directory: Path) -> None:
    """Create `directory` or fail with an InputError before any work is done."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {directory} is not writable ({e.strerror or e})") from None


def clean_stale_temp_files(directory: Path) -> None:
    """Temp files left by a killed process are garbage; atomic writes never leave anything else."""
    if directory.is_dir():
        for tmp in directory.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- resumable chunks ------------------------------------------------------------------------

class ChunkStore:
    """Numbered JSONL chunk files of one job. A chunk exists only once it is complete.

    `state.json` holds the fingerprint of the work that wrote the chunks; chunks written for
    other work are discarded, so a resumed job can never mix results of two configurations.
    """

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        state = self.directory / CHUNK_STATE
        if state.is_file() and json.loads(state.read_text()).get("fingerprint") != fingerprint:
            log.info("discarding chunks of another configuration in %s", self.directory)
            remove_tree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(self.directory)
        if not state.is_file():
            write_json(state, {"fingerprint": fingerprint})

    def path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.jsonl"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, rows: list[dict[str, Any]]) -> None:
        write_jsonl(self.path(index), rows)

    def concatenate(self, n_chunks: int) -> bytes:
        missing = [i for i in range(n_chunks) if not self.done(i)]
        if missing:
            raise InputError(f"{self.directory} is missing chunks {missing[:5]}: the job did not finish")
        return b"".join(self.path(i).read_bytes() for i in range(n_chunks))
