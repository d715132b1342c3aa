"""Stage folders, manifests, atomic writes and the file formats every stage shares.

A stage writes into `<output-dir>/<stage>/` under fixed file names declared here; parameters
live in `manifest.json`, which is written last. A folder without a complete manifest does not
exist for downstream stages. Nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memcirc.errors import InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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
            yield row


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


# -- provenance ------------------------------------------------------------------------------

def git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    import memcirc

    versions: dict[str, str | None] = {"python": platform.python_version(), "memcirc": memcirc.__version__}
    for pkg in ("torch", "transformers", "transformer-lens", "auto-circuit", "datasets", "numpy",
                "tokenizers", "nltk", "rapidfuzz"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


# -- stage folders ---------------------------------------------------------------------------

def read_manifest(stage_dir: Path, what: str = "input") -> dict[str, Any]:
    """The manifest of a finished stage folder; anything less is an InputError."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{what} folder {stage_dir} has no {MANIFEST}: run its stage first "
                         "(or point --input-dir at a finished stage folder)")
    manifest = read_json(path)
    if manifest.get("status") != "complete":
        raise InputError(f"{what} folder {stage_dir} holds an incomplete run "
                         f"(status {manifest.get('status')!r}): re-run its stage")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path} has schema_version {manifest.get('schema_version')}, "
                         f"this memcirc reads {SCHEMA_VERSION}")
    return manifest


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


@dataclass
class StageRun:
    """One execution of a stage: idempotency check, timings, and the manifest written last."""

    stage_dir: Path
    stage: str
    config: dict[str, Any]
    fingerprint: str           # hash of everything that determines the outputs
    started: float = field(default_factory=time.time)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def for_config(cls, cfg: Any, stage: str, inputs: list[dict[str, Any]], **parts: Any) -> StageRun:
        """The run of `cfg`'s stage, fingerprinted by its hashed config, its inputs and `parts`
        (e.g. model=LoadedModel.results_identity())."""
        fingerprint = sha256_json({"config": cfg.hashed_dict(), "inputs": inputs, **parts})
        return cls(cfg.stage_dir, stage, cfg.to_dict(), fingerprint, inputs=inputs)

    def existing(self) -> dict[str, Any] | None:
        path = self.stage_dir / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        return manifest if manifest.get("status") == "complete" else None

    def is_done(self, force: bool) -> bool:
        """True when a complete run with this fingerprint exists (re-running is a no-op)."""
        manifest = self.existing()
        if manifest is None:
            return False
        if manifest.get("fingerprint") == self.fingerprint and not force:
            return True
        if not force:
            raise InputError(f"{self.stage_dir} holds a complete run with a different config or input; "
                             "pass --force to replace it, or choose another --output-dir")
        return False

    def completed_summary(self, force: bool) -> dict[str, Any] | None:
        """The summary of a complete run with this fingerprint (so re-running is a no-op), else None."""
        if not self.is_done(force):
            return None
        from memcirc.logs import release_logs

        release_logs()
        log.info("%s is complete for this config; nothing to do (--force recomputes)", self.stage_dir)
        return read_json(self.stage_dir / SUMMARY_JSON)

    def begin(self, force: bool) -> None:
        """Make the folder writable; with --force remove the previous manifest first."""
        ensure_writable(self.stage_dir)
        if force:
            (self.stage_dir / MANIFEST).unlink(missing_ok=True)
        clean_stale_temp_files(self.stage_dir)

    def begin_shard(self, shard_dir: Path, force: bool) -> None:
        """`begin` for one of several jobs writing into the stage folder at once (SLURM array tasks):
        only the temp files of its own folder are stale; the other jobs' are being written."""
        ensure_writable(shard_dir)
        if force:
            (self.stage_dir / MANIFEST).unlink(missing_ok=True)
        clean_stale_temp_files(shard_dir)

    def add_input(self, path: Path, manifest: dict[str, Any] | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"path": str(path)}
        if Path(path).is_file():
            entry["sha256"] = sha256_file(Path(path))
        if manifest is not None:
            entry["run_id"] = manifest.get("run_id")
        entry.update(extra)
        self.inputs.append(entry)

    def finish(self, outputs: dict[str, int | None], **extra: Any) -> dict[str, Any]:
        """Write manifest.json last. `outputs` maps file name -> row count (None if not rows)."""
        out_entries = [{"path": name, "sha256": sha256_file(self.stage_dir / name), "rows": rows}
                       for name, rows in outputs.items()]
        finished = time.time()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "status": "complete",
            "run_id": sha256_json([self.fingerprint, out_entries])[:16],
            "fingerprint": self.fingerprint,
            "config": self.config,
            "config_sha256": sha256_json(self.config),
            "inputs": self.inputs,
            "outputs": out_entries,
            **extra,
            "git": git_info(),
            "versions": library_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "wall_seconds": round(finished - self.started, 3),
        }
        write_json(self.stage_dir / MANIFEST, manifest)
        return manifest


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
