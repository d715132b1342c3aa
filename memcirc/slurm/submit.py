"""Submission: render each job's script, sbatch it after the jobs it waits for, record the ids."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.slurm import records
from memcirc.slurm.plan import Job
from memcirc.slurm.records import LOGS_DIR, SLURM_DIR
from memcirc.slurm.render import log_pattern, render
from memcirc.slurm.status import active_jobs

if TYPE_CHECKING:
    from memcirc.slurm.settings import Settings


def sbatch(script: Path) -> str:
    """Submit `script`; its job id."""
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise InputError("sbatch not found: run on a SLURM login node (or drop --slurm)") from None
    if r.returncode != 0:
        raise InputError(f"sbatch refused {script.name}: {' '.join(r.stderr.split()) or r.returncode}")
    return r.stdout.strip().split(";")[0]


def print_scripts(jobs: list[Job], settings: Settings, run_dir: Path) -> None:
    """The dry run: every script, with <job-name> in place of the ids it would depend on."""
    for job in jobs:
        print(f"# ---- {job.name} ({job.kind}{f', {job.tasks} tasks' if job.tasks else ''})")
        print(render(job, settings, run_dir, [f"<{a}>" for a in job.after]), end="")


def _submit_all(jobs: list[Job], settings: Settings, run_dir: Path, scripts: Path, created: Path | None) -> None:
    """sbatch every job in order; on any failure cancel what was submitted and remove what was made."""
    ids: dict[str, str] = {}
    try:
        for order, job in enumerate(jobs, 1):
            path = scripts / f"{order:02d}-{job.name}.sbatch"
            art.atomic_write_text(path, render(job, settings, run_dir, [ids[a] for a in job.after]))
            job.job_id = ids[job.name] = sbatch(path)
            job.script, job.log = str(path), log_pattern(run_dir, job)
    except BaseException:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        art.remove_tree(created or scripts)   # what this submission made, nothing of earlier ones
        raise


def submit(jobs: list[Job], settings: Settings, run_dir: Path, *, dry_run: bool = False,
           what: dict[str, Any] | None = None) -> list[Job]:
    """Render and submit `jobs` in order (each after the ones it waits for), record them in jobs.json.

    Dry run: print the scripts, with <job-name> in place of the ids they would depend on; nothing is
    written or submitted. A refused sbatch cancels this submission's jobs and leaves no record.
    """
    if dry_run:
        print_scripts(jobs, settings, run_dir)
        return jobs
    record = records.read_or_new(run_dir)
    if record["submissions"]:   # two submissions at once would write the same folders
        active = active_jobs(record["submissions"][-1])
        if active:
            raise InputError(f"jobs of the previous submission to {run_dir} are still queued or running "
                             f"({', '.join(active)}): wait for them (python -m memcirc.slurm wait {run_dir}) "
                             "or scancel them, then submit again")
    number = len(record["submissions"]) + 1
    scripts = run_dir / SLURM_DIR / f"submission-{number:03d}"
    created = next((p for p in (run_dir, run_dir / SLURM_DIR) if not p.exists()), None)
    art.ensure_writable(run_dir / SLURM_DIR / LOGS_DIR)   # sbatch does not create the log folder
    _submit_all(jobs, settings, run_dir, scripts, created)
    records.add_submission(run_dir, record, number, what or {}, [j.record() for j in jobs])
    for job in jobs:
        size = f"array of {job.tasks} tasks" if job.tasks else "job"
        after = f", after {', '.join(job.after)}" if job.after else ""
        print(f"submitted {job.name}: {size} {job.job_id}{after}; log {job.log}")
    print(f"job ids and scripts: {records.jobs_file(run_dir)}; status: python -m memcirc.slurm status {run_dir}")
    return jobs
