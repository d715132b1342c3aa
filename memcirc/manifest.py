"""A stage's manifest and the one lifecycle every stage runs through.

A stage folder exists for downstream stages only once `manifest.json` (written last) says
`complete`. Every stage goes through `StageRun` in this fixed order:

    run = StageRun.for_config(cfg, inputs, model=...)   # fingerprint: config + inputs + model
    if (done := run.open(cfg.force)) is not None:       # complete with this fingerprint: no-op
        return done
    ...every remaining input check...                   # bad input still leaves nothing behind
    run.start(cfg.force)                                # the folder is created, log.txt attached
    ...the work, the outputs...
    run.finish(outputs, ...)                            # manifest.json last

`open` also probes that the run root is writable and that no other process is writing the folder,
so either fails before the heavy work, and lets the held-back log records through (they print from
the stage's first progress loop on). `start` takes the folder's lock (`memcirc.locks`) before it
deletes anything; `finish` drops the chunks and shards, then the lock. Calling the steps out of
order is a bug and raises.

Downstream stages read an upstream file through `read_output`, which checks it against the sha256
its manifest records.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc import locks
from memcirc.errors import InputError
from memcirc.logs import attach_log_file, release_logs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = art.MANIFEST


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


# -- reading finished stages -----------------------------------------------------------------

def read_manifest(stage_dir: Path, what: str = "input") -> dict[str, Any]:
    """The manifest of a finished stage folder; anything less is an InputError."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{what} folder {stage_dir} has no {MANIFEST}: run its stage first "
                         "(or point --input-dir at a finished stage folder)")
    manifest = art.read_json(path)
    if not isinstance(manifest, dict):
        raise InputError(f"{path} is not a memcirc manifest (a JSON {type(manifest).__name__}): re-run its stage")
    if manifest.get("status") != "complete":
        raise InputError(f"{what} folder {stage_dir} holds an incomplete run "
                         f"(status {manifest.get('status')!r}): re-run its stage")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path} has schema_version {manifest.get('schema_version')}, "
                         f"this memcirc reads {SCHEMA_VERSION}")
    if manifest.get("config_sha256") != art.sha256_json(manifest.get("config")):
        raise InputError(f"{path}: its config does not match its config_sha256 (edited after its stage "
                         f"wrote it): re-run {manifest.get('stage') or 'its stage'}")
    return manifest


def read_output(stage_dir: Path, name: str, what: str = "input",
                manifest: dict[str, Any] | None = None) -> Path:
    """The path of output `name` of the finished stage in `stage_dir` (its `manifest`, read when not
    given), after checking the file against the sha256 the manifest records: an edited, cut or
    replaced upstream file is an InputError, never silently used."""
    manifest = manifest if manifest is not None else read_manifest(stage_dir, what)
    stage = manifest.get("stage") or "its stage"
    path = Path(stage_dir) / name
    recorded = output_sha256(manifest, name)
    if recorded is None or not path.is_file():
        raise InputError(f"{what} folder {stage_dir} has no {name}: re-run {stage}")
    sha = art.sha256_file(path)
    if sha != recorded:
        raise InputError(f"{path} changed after its stage wrote it (sha256 {sha[:12]}, its manifest records "
                         f"{recorded[:12]}): re-run {stage} or restore the file")
    return path


def output_sha256(manifest: dict[str, Any], name: str) -> str | None:
    """The sha256 `manifest` records for output `name` (read_output has checked the file against it)."""
    return next((o.get("sha256") for o in manifest.get("outputs", []) if o.get("path") == name), None)


def finished_summary(stage_dir: Path) -> dict[str, Any] | None:
    """The summary.json of a finished stage folder, or None when the stage has not run there."""
    if not (Path(stage_dir) / MANIFEST).is_file():
        return None
    read_manifest(stage_dir)
    return art.read_json(Path(stage_dir) / art.SUMMARY_JSON)


# -- the lifecycle ---------------------------------------------------------------------------

_ORDER = ("new", "opened", "started", "finished")


@dataclass
class StageRun:
    """One execution of a stage: idempotency check, timings, and the manifest written last."""

    stage_dir: Path
    stage: str                 # the stage's name (its script), recorded in the manifest
    config: dict[str, Any]
    fingerprint: str           # hash of everything that determines the outputs
    run_root: Path             # probed for writability by `open`
    inputs: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    step: str = "new"
    _locked: list[Path] = field(default_factory=list, repr=False)   # what `start` locked, released by finish

    @classmethod
    def for_config(cls, cfg: Any, inputs: list[dict[str, Any]] | None = None, *, fingerprint: str | None = None,
                   **parts: Any) -> StageRun:
        """The run of `cfg`'s stage. Its fingerprint is `fingerprint` when given, else the hash of the
        hashed config, `inputs` and `parts` (e.g. model=identity.results_key(loaded))."""
        inputs = list(inputs or [])
        if fingerprint is None:
            fingerprint = art.sha256_json({"config": cfg.hashed_dict(), "inputs": inputs, **parts})
        return cls(cfg.stage_dir, cfg.stage, cfg.to_dict(), fingerprint, Path(cfg.output_dir), inputs=inputs)

    def _advance(self, frm: str, to: str) -> None:
        if self.step != frm:
            raise RuntimeError(f"StageRun.{to}: called in step {self.step!r}, expected {frm!r} "
                               f"(the lifecycle is {' -> '.join(_ORDER)})")
        self.step = to

    def existing(self) -> dict[str, Any] | None:
        """This folder's complete manifest, else None. An unreadable one (a truncated write of another
        tool, a disk error) counts as incomplete: the run recomputes and replaces it."""
        path = self.stage_dir / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:   # ValueError: JSON and UTF-8 decoding errors
            log.warning("%s is unreadable (%s); the stage is treated as not run and recomputed", path, e)
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("status") == "complete" else None

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

    def open(self, force: bool) -> dict[str, Any] | None:
        """Step 1, once the stage knows its fingerprint: the summary of a complete run with this
        fingerprint (re-running is a no-op), else None after probing that the run root is writable."""
        self._advance("new", "opened")
        # A process runs one stage at a time: a lock still held is an earlier run's that stopped with
        # an error (in-process callers, tests), and would refuse the next process for no reason.
        locks.release_all()
        locks.check_free(self.stage_dir)   # before the manifest: a run in progress may replace it
        if self.is_done(force):
            release_logs()
            log.info("%s is complete for this config; nothing to do (--force recomputes)", self.stage_dir)
            self.step = "finished"
            return art.read_json(self.stage_dir / art.SUMMARY_JSON)
        art.ensure_writable(self.run_root)   # bad input (here: an unwritable root) prints one line only
        release_logs()
        return None

    def start(self, force: bool, task_dir: Path | None = None) -> None:
        """Step 2, after every input check: create and lock the folder, then (with --force) drop the old
        manifest, clean stale temp files, log into its log.txt. `task_dir`: this job is one of several
        array tasks writing into the stage folder at once; it locks its own folder, and the stage folder
        shared, and only its own folder is cleaned and logged into.

        Raises:
            InputError: another process is writing the folder (nothing has been touched then).
        """
        self._advance("opened", "started")
        own = task_dir or self.stage_dir
        art.ensure_writable(own)
        if task_dir is not None:
            locks.acquire(self.stage_dir, exclusive=False)
            self._locked.append(self.stage_dir)
        locks.acquire(own)
        self._locked.append(own)
        if force:
            (self.stage_dir / MANIFEST).unlink(missing_ok=True)
        art.clean_stale_temp_files(own)
        attach_log_file(own / art.LOG_TXT, forced=force)

    def add_input(self, path: Path, manifest: dict[str, Any] | None = None, sha256: str | None = None,
                  **extra: Any) -> None:
        """Record an input file. `sha256`: its digest when already known (read_output has checked the
        file against it), so the file is not hashed twice."""
        entry: dict[str, Any] = {"path": str(path)}
        if sha256 is not None:
            entry["sha256"] = sha256
        elif Path(path).is_file():
            entry["sha256"] = art.sha256_file(Path(path))
        if manifest is not None:
            entry["run_id"] = manifest.get("run_id")
        entry.update(extra)
        self.inputs.append(entry)

    def release(self) -> None:
        """Drop the locks `start` took (finish does; a caller that stops early may)."""
        while self._locked:
            locks.release(self._locked.pop())

    def finish(self, outputs: dict[str, int | None], **extra: Any) -> dict[str, Any]:
        """Step 3: write manifest.json last, drop the resumable chunks and shards (garbage once the
        manifest exists), then the lock. `outputs` maps file name -> row count (None if not rows)."""
        self._advance("started", "finished")
        out_entries = [{"path": name, "sha256": art.sha256_file(self.stage_dir / name), "rows": rows}
                       for name, rows in outputs.items()]
        finished = time.time()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "status": "complete",
            "run_id": art.sha256_json([self.fingerprint, out_entries])[:16],
            "fingerprint": self.fingerprint,
            "config": self.config,
            "config_sha256": art.sha256_json(self.config),
            "inputs": self.inputs,
            "outputs": out_entries,
            **extra,
            "git": git_info(),
            "versions": library_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "wall_seconds": round(finished - self.started, 3),
        }
        art.write_json(self.stage_dir / MANIFEST, manifest)
        # still under the lock: a run that starts once it is released must find no chunks of this one
        art.remove_tree(self.stage_dir / art.CHUNKS_DIR)
        art.remove_tree(self.stage_dir / art.SHARDS_DIR)
        self.release()
        return manifest
