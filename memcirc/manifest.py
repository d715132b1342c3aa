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

`open` also probes that the run root is writable, so an unwritable folder fails before the heavy
work, and releases the held-back log records. Calling the steps out of order is a bug and raises.
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
    if manifest.get("status") != "complete":
        raise InputError(f"{what} folder {stage_dir} holds an incomplete run "
                         f"(status {manifest.get('status')!r}): re-run its stage")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path} has schema_version {manifest.get('schema_version')}, "
                         f"this memcirc reads {SCHEMA_VERSION}")
    return manifest


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

    def open(self, force: bool) -> dict[str, Any] | None:
        """Step 1, once the stage knows its fingerprint: the summary of a complete run with this
        fingerprint (re-running is a no-op), else None after probing that the run root is writable."""
        self._advance("new", "opened")
        if self.is_done(force):
            release_logs()
            log.info("%s is complete for this config; nothing to do (--force recomputes)", self.stage_dir)
            self.step = "finished"
            return art.read_json(self.stage_dir / art.SUMMARY_JSON)
        art.ensure_writable(self.run_root)   # bad input (here: an unwritable root) prints one line only
        release_logs()
        return None

    def start(self, force: bool, task_dir: Path | None = None) -> None:
        """Step 2, after every input check: create the folder (with --force drop the old manifest), clean
        stale temp files, log into its log.txt. `task_dir`: this job is one of several array tasks
        writing into the stage folder at once; only its own folder is cleaned and logged into."""
        self._advance("opened", "started")
        own = task_dir or self.stage_dir
        art.ensure_writable(own)
        if force:
            (self.stage_dir / MANIFEST).unlink(missing_ok=True)
        art.clean_stale_temp_files(own)
        attach_log_file(own / art.LOG_TXT)

    def add_input(self, path: Path, manifest: dict[str, Any] | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"path": str(path)}
        if Path(path).is_file():
            entry["sha256"] = art.sha256_file(Path(path))
        if manifest is not None:
            entry["run_id"] = manifest.get("run_id")
        entry.update(extra)
        self.inputs.append(entry)

    def finish(self, outputs: dict[str, int | None], **extra: Any) -> dict[str, Any]:
        """Step 3: write manifest.json last. `outputs` maps file name -> row count (None if not rows)."""
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
        return manifest
