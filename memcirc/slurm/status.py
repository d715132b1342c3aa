"""What the cluster says about a submission (scontrol, else sacct, else the run folder), as a report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.slurm.records import read_jobs
from memcirc.stages.registry import DONE_MARKER, STAGES

SUCCESS = "COMPLETED"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
NEVER = ("DependencyNeverSatisfied", "InvalidDependency")   # pending reasons of a job that cannot run
POLL_S = float(os.environ.get("MEMCIRC_SLURM_POLL", 10))     # seconds between status polls of --wait
TASK_UNIT = {"shards": "shard", "checkpoints": "checkpoint unit"}   # what an array task is, by array kind


@dataclass
class Task:
    """One array task (or a whole single job) as the cluster reports it."""

    index: int | None         # array task id (= shard / checkpoint index), None for a single job
    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    log: str | None = None

    @property
    def waiting(self) -> bool:
        """Queued or running, and able to run."""
        return self.state in ACTIVE and self.reason not in NEVER


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output: one record per line, `Key=value` pairs (values may hold spaces)."""
    out = []
    for line in text.splitlines():
        pairs = re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s[A-Za-z][\w:/]*=|$)", line.strip())
        if pairs:
            out.append(dict(pairs))
    return out


def task_ids(spec: str) -> list[int]:
    """'0-3%2', '1,3', '5' -> the ids."""
    ids: list[int] = []
    for part in spec.split("%")[0].strip("[]").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            ids += range(int(lo), int(hi.split(":")[0]) + 1)
        elif part.strip():
            ids.append(int(part))
    return ids


def _scontrol(job: dict[str, Any]) -> list[Task] | None:
    """The job's tasks from scontrol; None if scontrol does not know the job (or is not installed)."""
    try:
        r = subprocess.run(["scontrol", "-o", "show", "job", str(job["job_id"])], capture_output=True, text=True)
    except FileNotFoundError:   # not on a SLURM host: only the run folder can tell
        return None
    if r.returncode != 0:
        return None
    tasks: list[Task] = []
    for rec in parse_records(r.stdout):
        state = rec.get("JobState", "UNKNOWN")
        ids = task_ids(rec["ArrayTaskId"]) if rec.get("ArrayTaskId") else [None]
        for i in ids:
            log = rec.get("StdOut") if len(ids) == 1 else None
            tasks.append(Task(i, rec.get("JobId", str(job["job_id"])), state, rec.get("Reason", ""),
                              rec.get("ExitCode", ""), int(rec.get("Restarts", 0) or 0), log))
    return tasks


def _sacct(job: dict[str, Any]) -> list[Task]:
    """The job's tasks from accounting; [] without sacct or a record."""
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(job["job_id"]), "-o",
                            "JobID,JobIDRaw,State,ExitCode"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    tasks: list[Task] = []
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            job_spec, raw, state, code = (line.split("|") + ["", "", "", ""])[:4]
            ids = task_ids(job_spec.split("_", 1)[1]) if "_" in job_spec else [None]
            tasks += [Task(i, raw, state.split()[0] if state else "UNKNOWN", "", code) for i in ids]
    return tasks


def query(job: dict[str, Any]) -> list[Task]:
    """The tasks of one recorded job: scontrol, else sacct, else [] (the cluster forgot it)."""
    tasks = _scontrol(job)
    return tasks if tasks is not None else _sacct(job)


def active_jobs(submission: dict[str, Any]) -> list[str]:
    """'name id' of each job of `submission` still queued or running."""
    return [f"{j['name']} {j['job_id']}" for j in submission["jobs"] if any(t.waiting for t in query(j))]


def _log_of(job: dict[str, Any], task: Task) -> str | None:
    if task.log and task.log != "(null)":
        return task.log
    pattern = job.get("log")
    if not pattern:
        return None
    return pattern.replace("%A", str(job["job_id"])).replace("%a", str(task.index)).replace("%j", task.job_id)


def _complete(manifest: Path) -> bool:
    try:
        record = json.loads(manifest.read_bytes())
    except (OSError, ValueError):   # none yet, or cut: the stage is not done
        return False
    return isinstance(record, dict) and record.get("status") == "complete"


def _marker_done(run_dir: Path, stage: str | None, index: int | None) -> bool:
    """An array task's done marker, or the stage's complete manifest, is on disk."""
    if stage not in STAGES:   # None: the report or an experiment
        return False
    folder = run_dir / STAGES[stage].folder
    manifest = folder / art.MANIFEST
    if _complete(manifest):
        return True
    tasks_folder = STAGES[stage].tasks_folder
    if index is None or tasks_folder is None:
        return False
    return (folder / tasks_folder / f"{index:05d}" / DONE_MARKER).is_file()


@dataclass
class JobStatus:
    job: dict[str, Any]
    tasks: list[Task]

    @property
    def states(self) -> list[str]:
        return [t.state for t in self.tasks]

    @property
    def finished(self) -> bool:
        return bool(self.tasks) and all(t.state not in ACTIVE or t.reason in NEVER for t in self.tasks)

    @property
    def ok(self) -> bool:
        return bool(self.tasks) and all(t.state == SUCCESS or self.untraceable(t) for t in self.tasks)

    def untraceable(self, task: Task) -> bool:
        """A job the cluster forgot that leaves no stage folder of its own (the report, an experiment)."""
        return task.state == "UNKNOWN" and self.job.get("stage") is None


def job_status(run_dir: Path, job: dict[str, Any]) -> JobStatus:
    tasks = query(job)
    if not tasks:   # purged and no accounting: what the run folder says
        indices = list(range(job["tasks"])) if job.get("tasks") else [None]
        tasks = [Task(i, str(job["job_id"]), SUCCESS if _marker_done(run_dir, job.get("stage"), i) else "UNKNOWN",
                      "from the run folder") for i in indices]
    return JobStatus(job, sorted(tasks, key=lambda t: -1 if t.index is None else t.index))


def _failure(name: str, st: JobStatus, t: Task, statuses: dict[str, JobStatus], run_dir: Path) -> str:
    """What went wrong with task `t` of job `name` (neither waiting, completed nor untraceable)."""
    job, log = st.job, _log_of(st.job, t)
    if t.state == "UNKNOWN":
        return (f"{name}: job {t.job_id} is no longer known to SLURM and its outputs are not in {run_dir}: it did "
                f"not finish; log: {log}")
    if t.reason in NEVER or (t.state == "CANCELLED" and any(not statuses[a].ok for a in job["after"]
                                                             if a in statuses)):
        return (f"{name} (job {t.job_id}) did not run ({t.state}, {t.reason or 'cancelled'}): it waits for "
                f"{', '.join(job['after'])}, which did not complete")
    if t.index is not None and job.get("tasks"):
        kind = STAGES[job["stage"]].array
        assert kind is not None, f"{job['stage']} ran array tasks but is not an array stage"  # plan.stage_jobs
        what = TASK_UNIT[kind]
        return (f"{job['stage']}: {what} {t.index} of {job['tasks']} failed: array task {job['job_id']}_{t.index} "
                f"(job {t.job_id}) {t.state}, exit {t.exit_code or '?'}; log: {log}")
    return f"{name}: job {t.job_id} {t.state}, exit {t.exit_code or '?'}; log: {log}"


def status_report(run_dir: Path) -> tuple[str, bool, bool]:
    """(report text, everything finished, everything completed) for the latest submission."""
    record = read_jobs(run_dir)
    sub = record["submissions"][-1]
    statuses = {j["name"]: job_status(run_dir, j) for j in sub["jobs"]}
    lines = [f"memcirc SLURM run {run_dir}: submission {sub['number']} of {len(record['submissions'])} "
             f"({sub['submitted_at']})"]
    failures: list[str] = []
    for name, st in statuses.items():
        job = st.job
        counts = {s: st.states.count(s) for s in dict.fromkeys(st.states)}
        summary = ", ".join(f"{s} {n}" if len(st.tasks) > 1 else s for s, n in counts.items())
        kind = f"array of {job['tasks']}" if job.get("tasks") else job["kind"]
        lines.append(f"  {name:<28} {kind:<12} job {job['job_id']:<8} {summary}")
        for t in st.tasks:
            if t.waiting or t.state == SUCCESS:
                continue
            if st.untraceable(t):
                lines.append(f"    (job {t.job_id} is no longer known to SLURM; see its log: {_log_of(job, t)})")
            else:
                failures.append(_failure(name, st, t, statuses, run_dir))
    finished = all(st.finished for st in statuses.values())
    ok = all(st.ok for st in statuses.values())
    if failures:
        lines += ["FAILED:"] + [f"  {f}" for f in failures]
        if finished:
            lines.append("fix the cause, then submit the same command again: finished shards and stages are "
                         "kept and not recomputed")
    elif ok:
        lines.append("all jobs completed")
    return "\n".join(lines), finished, ok


def wait(run_dir: Path, poll: float = POLL_S, timeout: float | None = None) -> bool:
    """Poll until every job of the latest submission has ended; print the report; True if all completed."""
    t0 = time.time()
    while True:
        text, finished, ok = status_report(run_dir)
        if finished or (timeout is not None and time.time() - t0 > timeout):
            print(text)
            return ok and finished
        time.sleep(poll)

