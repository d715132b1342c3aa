"""`<run>/slurm/jobs.json`: every submission to a run folder, its jobs, their ids, scripts and logs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.errors import InputError

SLURM_DIR = "slurm"
JOBS_JSON = "jobs.json"
LOGS_DIR = "logs"


def jobs_file(run_dir: Path) -> Path:
    return run_dir / SLURM_DIR / JOBS_JSON


def read_jobs(run_dir: Path) -> dict[str, Any]:
    path = jobs_file(run_dir)
    if not path.is_file():
        raise InputError(f"{run_dir} has no {SLURM_DIR}/{JOBS_JSON}: nothing was submitted with --slurm there")
    return art.read_json(path)


def read_or_new(run_dir: Path) -> dict[str, Any]:
    """The run's record, or an empty one for a run folder nothing was submitted to yet."""
    return read_jobs(run_dir) if jobs_file(run_dir).is_file() else {"run_dir": str(run_dir), "submissions": []}


def add_submission(run_dir: Path, record: dict[str, Any], number: int, what: dict[str, Any],
                   jobs: list[dict[str, Any]]) -> None:
    """Append a submission (its number, time, the command's `what` and the jobs) and write the record."""
    record["submissions"].append({"number": number, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  **what, "jobs": jobs})
    art.write_json(jobs_file(run_dir), record)
