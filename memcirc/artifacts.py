"""Atomic writes, hashing and the file formats every stage shares (JSON, JSONL, safetensors).

A stage writes into its folder under the run root with fixed file names declared here; its
manifest and lifecycle are `memcirc.manifest`. Nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import errno
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
    except OSError as e:
        if e.filename is None:   # a failed write() or fsync() (disk full) names no file: the CLI's line does
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: a NaN or infinity is a bug (undefined values are written as null where they
    arise, see docs/contract.md), so it raises ValueError naming the file instead of writing `NaN`."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (a NaN or infinity reached a JSON artifact)") from None
    atomic_write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    # allow_nan=False: `NaN` is not JSON (strict parsers refuse it); as in write_json it is a bug
    return "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in rows).encode()


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
    with open_input(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            # bytes, decoded here: a binary or latin-1 file names its line instead of a traceback
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")  # a BOM is no JSON
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} "
                                 "of the line); JSONL is UTF-8: is this a JSONL file? (latin-1: convert it "
                                 "with iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            except RecursionError:
                raise InputError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def open_input(path: Path) -> Any:
    """`path` opened for reading bytes, or an InputError saying in one line why it cannot be: not
    found, a symlink loop, a symlink to nothing, a folder, no permission."""
    try:
        if Path(path).is_dir():
            raise InputError(f"{path} is a folder, not a file")
        return open(path, "rb")
    except OSError as e:
        raise InputError(unreadable(path, e)) from None


def unreadable(path: Path, error: OSError | None = None) -> str:
    """Why `path` cannot be read, as a message (what `open` or `stat` said, in words)."""
    try:
        os.stat(path)
    except OSError as e:
        error = e
    if error is None:
        return f"{path} cannot be read"
    if error.errno == errno.ELOOP:
        return f"{path} cannot be read (symlink loop)"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return f"{path} is a symlink to {os.readlink(path)}, which does not exist"
    if error.errno == errno.ENOENT:
        return f"file not found: {path}"
    return f"{path} cannot be read ({error.strerror or error})"


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    """Numbered JSONL chunk files of one job. A chunk counts only once it is complete and intact.

    `state.json` holds the fingerprint of the work that wrote the chunks; chunks written for other
    work are discarded, so a resumed job can never mix results of two configurations. Each chunk's
    row count and sha256 go into a record beside it (`00003.json`, written just before the chunk): a
    chunk that is cut, edited or has no record is recomputed, never trusted.
    """

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        state = self.directory / CHUNK_STATE
        recorded = self._state_fingerprint(state)
        if recorded != fingerprint and self.directory.exists():   # no state: chunks of unknown work
            if recorded is not None:
                log.info("discarding chunks of another configuration in %s", self.directory)
            remove_tree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(self.directory)
        if not state.is_file():
            write_json(state, {"fingerprint": fingerprint})

    def _state_fingerprint(self, state: Path) -> str | None:
        """The fingerprint in `state`; None (logged) when it is unreadable, so the chunks are discarded."""
        if not state.is_file():
            return None
        try:
            fingerprint = json.loads(state.read_bytes()).get("fingerprint")
        except (OSError, ValueError, AttributeError) as e:   # cut, not UTF-8, not a JSON object
            log.warning("%s is unreadable (%s); discarding its chunks and starting over", state, e)
            return None
        return fingerprint if isinstance(fingerprint, str) else None

    def path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.jsonl"

    def _record_path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.json"

    def _damage(self, index: int, data: bytes) -> str | None:
        """Why chunk `index` (its bytes `data`) cannot be used, or None when it matches its record."""
        try:
            record = json.loads(self._record_path(index).read_bytes())
        except FileNotFoundError:
            return "no record of its row count and sha256"
        except (OSError, ValueError) as e:
            return f"its record is unreadable: {e}"
        if not isinstance(record, dict):
            return "its record is not a JSON object"
        if (rows := data.count(b"\n")) != record.get("rows"):
            return f"{rows} rows, {record.get('rows')} recorded"
        if sha256_bytes(data) != record.get("sha256"):
            return "its sha256 differs from the one recorded"
        return None

    def _discard(self, index: int, why: str) -> None:
        log.warning("chunk %d in %s is damaged (%s); recomputing it", index, self.directory, why)
        self.path(index).unlink(missing_ok=True)
        self._record_path(index).unlink(missing_ok=True)

    def done(self, index: int) -> bool:
        """True when chunk `index` is on disk and intact; a damaged one is deleted (logged) and is not."""
        try:
            data = self.path(index).read_bytes()
        except FileNotFoundError:
            return False
        why = self._damage(index, data)
        if why is not None:
            self._discard(index, why)
        return why is None

    def write(self, index: int, rows: list[dict[str, Any]]) -> None:
        data = jsonl_bytes(rows)
        # the record first: a chunk file on disk always has one, so a job killed between the two
        # writes leaves a record without a chunk (computed again), never an unrecorded chunk
        write_json(self._record_path(index), {"rows": data.count(b"\n"), "sha256": sha256_bytes(data)})
        atomic_write_bytes(self.path(index), data)

    def concatenate(self, n_chunks: int) -> bytes:
        """Every chunk in order, each checked against its record once more."""
        missing = [i for i in range(n_chunks) if not self.path(i).is_file()]
        if missing:
            raise InputError(f"{self.directory} is missing chunks {missing[:5]}: the job did not finish; "
                             "re-run the same command to compute them")
        parts = []
        for i in range(n_chunks):
            data = self.path(i).read_bytes()
            if (why := self._damage(i, data)) is not None:
                self._discard(i, why)
                raise InputError(f"chunk {i} in {self.directory} is damaged ({why}): re-run the same command "
                                 "to recompute it")
            parts.append(data)
        return b"".join(parts)
