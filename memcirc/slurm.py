"""Scale-out on SLURM: the pipeline as job arrays and dependent jobs (`run_pipeline.sh --slurm`).

Scoring and K-FAC factor collection run as job arrays of `--num-shards` tasks, training_dynamics as
one array task per checkpoint (`memcirc.dynamics.resolve_checkpoints`); each array's merge is a job
with `--dependency=afterok` on the array, and every other stage a job that depends on the final job
of its upstream stages. Resources come from the config's `slurm:` section:

    slurm:
      partition: gpu
      gpus: 1                  # --gres=gpu:N
      cpus_per_task: 4
      mem: 32G
      time: "04:00:00"
      account: my-lab
      extra: ["--constraint=a100"]       # more #SBATCH lines
      setup: ["module load cuda/12.4"]   # shell lines run before each stage
      num_shards: 8
      kfac_edit: {num_shards: 2}         # per-job overrides: a stage, <stage>.merge, report, an experiment
      memorization_score.merge: {mem: 4G, time: "00:20:00"}

Every job is requeueable and appends to its log; on SIGTERM a stage keeps its finished chunks and
exits 143, and the job script requeues the job (`scontrol requeue`) unless SLURM is already
requeueing it (pre-emption) or it was cancelled; the requeued job resumes. The submitted scripts
and job ids are recorded under `<run>/slurm/` (`jobs.json`), which `status` reads to say which
shard failed, its array task and its log. A finished shard is a no-op when submitted again, so
re-submitting the same command recomputes only what is missing.

    python -m memcirc.slurm submit --config C --output-dir RUN --stages memorization_score kfac_edit
    python -m memcirc.slurm status RUN        # exit 0 done or running, 1 something failed
    python -m memcirc.slurm wait RUN
    python -m memcirc.slurm grid --config C --output-dir RUN     # verify_scripts/ experiment grid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.config import SLURM_KEY, StageConfig, build_config, load_yaml
from memcirc.errors import InputError
from memcirc.stages.registry import DEFAULT_PIPELINE, DONE_MARKER, STAGES

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = "slurm"
JOBS_JSON = "jobs.json"
LOGS_DIR = "logs"
ARRAY_TASK = "$SLURM_ARRAY_TASK_ID"   # the one unquoted word of a rendered command
PIPELINE_STAGES = tuple(STAGES)
ARRAY_STAGES = tuple(s.name for s in STAGES.values() if s.array)
EXPERIMENTS = ("branch_decision", "memorization_decision", "ablations", "random_baseline")
EXPERIMENT_NEEDS = {"branch_decision": ("memorization_score",), "memorization_decision": ("memorization_score",),
                    "ablations": ("branch_decision", "memorization_decision"),
                    "random_baseline": ("branch_decision", "memorization_decision")}
GRID_DIR = REPO / "verify_scripts"
SUCCESS = "COMPLETED"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
NEVER = ("DependencyNeverSatisfied", "InvalidDependency")   # pending reasons of a job that cannot run
POLL_S = float(os.environ.get("MEMCIRC_SLURM_POLL", 10))     # seconds between status polls of --wait


# -- the slurm: section ----------------------------------------------------------------------

@dataclass
class Resources:
    """What one job asks for. None leaves the choice to the cluster's defaults."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str | None = None
    extra: list[str] = field(default_factory=list)
    num_shards: int | None = None   # array stages only

    def sbatch_lines(self) -> list[str]:
        lines = [f"--{flag}={value}" for flag, value in (("partition", self.partition), ("account", self.account),
                                                          ("qos", self.qos)) if value]
        if self.gpus:
            lines.append(f"--gres=gpu:{self.gpus}")
        lines.append(f"--cpus-per-task={self.cpus_per_task}")
        lines += [f"--{flag}={value}" for flag, value in (("mem", self.mem), ("time", self.time)) if value]
        return lines + [e.removeprefix("#SBATCH").strip() for e in self.extra]


RESOURCE_KEYS = tuple(f.name for f in dataclasses.fields(Resources))
GLOBAL_KEYS = ("setup", "python", "max_parallel", "requeue")
# jobs that need no GPU unless the config says otherwise: they only read files
NO_GPU = {"memorization_score.merge": {"gpus": 0}, "training_dynamics.merge": {"gpus": 0},
          "report": {"gpus": 0, "cpus_per_task": 1}}


def job_keys() -> list[str]:
    return [*PIPELINE_STAGES, *(f"{s}.merge" for s in ARRAY_STAGES), "report", *EXPERIMENTS]


@dataclass
class Settings:
    """The validated `slurm:` section."""

    base: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    python: str | None = None
    max_parallel: int | None = None
    requeue: bool = True

    def resources(self, job: str) -> Resources:
        values = {**self.base, **NO_GPU.get(job, {}), **self.jobs.get(job, {})}
        return Resources(**values)

    def num_shards(self, stage: str, requested: int | None) -> int:
        if requested is not None:
            return requested
        return self.jobs.get(stage, {}).get("num_shards") or self.base.get("num_shards") or 1


def _check(key: str, value: Any, kind: str) -> Any:
    ok = {"str": isinstance(value, str) and bool(value.strip()),
          "strnum": isinstance(value, (str, int)) and not isinstance(value, bool),
          "count": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
          "positive": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          "bool": isinstance(value, bool),
          "lines": isinstance(value, list) and all(isinstance(v, str) and "\n" not in v for v in value)}[kind]
    if value is not None and not ok:
        want = {"str": "a string", "strnum": "a string or a number", "count": "an integer >= 0",
                "positive": "an integer >= 1", "bool": "true or false", "lines": "a list of one-line strings"}[kind]
        raise InputError(f"config key '{SLURM_KEY}.{key}' must be {want}, got {value!r}")
    return str(value) if kind == "strnum" and value is not None else value


KINDS = {"partition": "str", "account": "str", "qos": "str", "gpus": "count", "cpus_per_task": "positive",
         "mem": "strnum", "time": "strnum", "extra": "lines", "num_shards": "positive", "setup": "lines",
         "python": "str", "max_parallel": "positive", "requeue": "bool"}


def _resources(section: dict[str, Any], prefix: str) -> dict[str, Any]:
    values = {}
    for key, value in section.items():
        if key not in RESOURCE_KEYS:
            raise InputError(f"unknown config key '{SLURM_KEY}.{prefix}{key}'; known keys of a job: "
                             f"{', '.join(RESOURCE_KEYS)}")
        if value is not None:
            values[key] = _check(prefix + key, value, KINDS[key])
    return values


def read_settings(config: str | None) -> Settings:
    """The config's `slurm:` section, checked: an unknown key or a bad value is an InputError naming it."""
    section = load_yaml(config).get(SLURM_KEY) if config else None
    if section is None:
        return Settings()
    if not isinstance(section, dict):
        raise InputError(f"config section '{SLURM_KEY}' in {config} must be a mapping")
    settings = Settings()
    known_jobs = job_keys()
    for key, value in section.items():
        if key in known_jobs:
            if not isinstance(value, dict):
                raise InputError(f"config section '{SLURM_KEY}.{key}' must be a mapping of job resources")
            settings.jobs[key] = _resources(value, f"{key}.")
        elif key in GLOBAL_KEYS:
            setattr(settings, key, _check(key, value, KINDS[key]) if value is not None else getattr(settings, key))
        elif key in RESOURCE_KEYS:
            settings.base.update(_resources({key: value}, ""))
        else:
            raise InputError(f"unknown config key '{SLURM_KEY}.{key}' in {config}; known keys: "
                             f"{', '.join(RESOURCE_KEYS + GLOBAL_KEYS)}, or a job section "
                             f"({', '.join(known_jobs)})")
    return settings


# -- jobs ------------------------------------------------------------------------------------

@dataclass
class Job:
    """One sbatch submission: a single job or a job array (`tasks`)."""

    name: str                 # memorization_score, memorization_score.merge, report, branch_decision, ...
    kind: str                 # array | merge | single | report | experiment
    command: list[str]        # argv; ARRAY_TASK is replaced by each task's id
    after: list[str]          # names of the jobs this one waits for (afterok)
    stage: str | None = None
    tasks: int | None = None
    body: str | None = None   # an experiment template's script body (instead of `command`)
    job_id: str | None = None
    script: str | None = None
    log: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "body"}


def _config_class(stage: str) -> type[StageConfig]:
    return STAGES[stage].config


def _stage_config(stage: str, argv: list[str]) -> StageConfig:
    """The stage's config as its job will build it (InputError now rather than on the cluster)."""
    return build_config(_config_class(stage), argv)


def _array_size(stage: str, cfg: StageConfig, settings: Settings, num_shards: int | None) -> int:
    if stage == "training_dynamics":
        try:
            from memcirc.dynamics import resolve_checkpoints
        except ImportError:   # a checkout without the dynamics stage: one job runs every checkpoint
            return 1
        return len(resolve_checkpoints(cfg))
    if stage == "kfac_edit" and cfg.factors_file:
        return 1              # reused factors: nothing to collect, nothing to shard
    return settings.num_shards(stage, num_shards)


def plan_pipeline(stages: list[str], run_dir: Path, config: str | None, settings: Settings, *, python: str,
                  common: list[str], stage_args: dict[str, list[str]], num_shards: int | None = None,
                  report: bool = True) -> list[Job]:
    """The jobs of `stages` in pipeline order, each stage's flags checked by building its config."""
    unknown = [s for s in stages if s not in PIPELINE_STAGES]
    if unknown:
        raise InputError(f"unknown stages {unknown}; stages: {', '.join(PIPELINE_STAGES)}")
    jobs: list[Job] = []
    final: dict[str, str] = {}       # stage -> the name of the job that finishes it
    for stage in [s for s in PIPELINE_STAGES if s in stages]:
        argv = ([] if config is None else ["--config", config]) + ["--output-dir", str(run_dir), *common,
                                                                  *stage_args.get(stage, [])]
        cfg = _stage_config(stage, argv)
        base = [python, str(REPO / f"{stage}.py"), *argv]
        after = [final[s] for s in STAGES[stage].needs if s in final]
        n = _array_size(stage, cfg, settings, num_shards) if stage in ARRAY_STAGES else 1
        if n > 1:
            task = (["--checkpoint-index", ARRAY_TASK] if stage == "training_dynamics"
                    else ["--num-shards", str(n), "--shard-index", ARRAY_TASK])
            merge = ["--merge"] if stage == "training_dynamics" else ["--merge", "--num-shards", str(n)]
            jobs.append(Job(stage, "array", base + task, after, stage=stage, tasks=n))
            jobs.append(Job(f"{stage}.merge", "merge", base + merge, [stage], stage=stage))
            final[stage] = f"{stage}.merge"
        else:
            one = ["--num-shards", "1"] if stage in ("memorization_score", "kfac_edit") else []
            jobs.append(Job(stage, "single", base + one, after, stage=stage))
            final[stage] = stage
    if report and jobs:
        jobs.append(Job("report", "report", [python, "-m", "memcirc.report", str(run_dir)], list(final.values())))
    return jobs


# -- scripts ---------------------------------------------------------------------------------

RUNNER = r"""# run_stage CMD...: run one stage. On SIGTERM (pre-emption: SLURM signals every process of the job;
# a time-limit warning with --signal=B:USR1@SECONDS) the stage keeps its finished chunks and exits
# 143; unless SLURM is already requeueing the job (pre-emption) or it was cancelled, the job is
# requeued here, and the requeued job resumes from the kept chunks (same folders, log appended).
run_stage() {
  local pid rc r state signalled=0 me=${SLURM_JOB_ID:-}
  # an array task by <array>_<task>: the array's own id also names the whole array (and its last task)
  [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && me=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  "$@" &
  pid=$!
  trap 'signalled=1; kill -TERM "$pid" 2>/dev/null' TERM USR1
  wait "$pid"; rc=$?
  while (( signalled )); do signalled=0; wait "$pid"; r=$?; (( r != 127 )) && rc=$r; done
  trap - TERM USR1
  if (( rc == 143 )) && [[ -n $me ]]; then
    state=$(squeue -h -j "$me" -o %T 2>/dev/null)
    [[ -n $state ]] || { sleep 2; state=$(squeue -h -j "$me" -o %T 2>/dev/null); }   # a busy controller
    # RUNNING (SIGNALING while the signal is being delivered): nobody else requeues this job
    if [[ $state == RUNNING || $state == SIGNALING ]]; then
      echo "memcirc: stopped by SIGTERM; requeueing job $me, it resumes from its finished chunks" >&2
      scontrol requeue "$me"
    else
      echo "memcirc: stopped by SIGTERM while the job is ${state:-gone}; SLURM requeues or ends it" >&2
    fi
  fi
  return "$rc"
}
"""


def _shell(command: list[str]) -> str:
    return " ".join(f'"{w}"' if w == ARRAY_TASK else shlex.quote(w) for w in command)


def log_pattern(run_dir: Path, job: Job) -> str:
    suffix = "%A_%a" if job.kind == "array" else "%j"
    return str(run_dir / SLURM_DIR / LOGS_DIR / f"{job.name}-{suffix}.out")


def render(job: Job, settings: Settings, run_dir: Path, dependency_ids: list[str]) -> str:
    """The sbatch script of `job`: #SBATCH lines from the settings, then the stage runner and command."""
    res = settings.resources(job.name)
    lines = ["#!/bin/bash",
             f"# memcirc {job.kind} job '{job.name}' of {run_dir} (written by memcirc.slurm)",
             f"--job-name=memcirc-{job.name}"]
    if job.tasks:
        throttle = f"%{settings.max_parallel}" if settings.max_parallel else ""
        lines.append(f"--array=0-{job.tasks - 1}{throttle}")
    lines += [f"--output={log_pattern(run_dir, job)}", "--open-mode=append",
              "--requeue" if settings.requeue else "--no-requeue", f"--chdir={REPO}", *res.sbatch_lines()]
    if dependency_ids:
        lines += [f"--dependency=afterok:{':'.join(dependency_ids)}", "--kill-on-invalid-dep=yes"]
    header = [line if line.startswith("#") else f"#SBATCH {line}" for line in lines]
    body = ["set -uo pipefail", *settings.setup,
            'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
            'echo "memcirc: job ${SLURM_JOB_ID} (array task ${SLURM_ARRAY_TASK_ID:-none}, restart '
            '${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date -Is)"',
            RUNNER.rstrip()]
    if job.body is not None:
        body.append(job.body.rstrip())
    else:
        body.append(f"run_stage {_shell(job.command)}")
    return "\n".join(header + [""] + body) + "\n"


# -- submission ------------------------------------------------------------------------------

def _sbatch(script: Path, env: dict[str, str] | None = None) -> str:
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise InputError("sbatch not found: run on a SLURM login node (or drop --slurm)") from None
    if r.returncode != 0:
        raise InputError(f"sbatch refused {script.name}: {' '.join(r.stderr.split()) or r.returncode}")
    return r.stdout.strip().split(";")[0]


def _jobs_file(run_dir: Path) -> Path:
    return run_dir / SLURM_DIR / JOBS_JSON


def read_jobs(run_dir: Path) -> dict[str, Any]:
    path = _jobs_file(run_dir)
    if not path.is_file():
        raise InputError(f"{run_dir} has no {SLURM_DIR}/{JOBS_JSON}: nothing was submitted with --slurm there")
    return art.read_json(path)


def submit(jobs: list[Job], settings: Settings, run_dir: Path, *, dry_run: bool = False,
           what: dict[str, Any] | None = None) -> list[Job]:
    """Render and submit `jobs` in order (each after the ones it waits for), record them in jobs.json.

    Dry run: print the scripts, with <job-name> in place of the ids they would depend on; nothing is
    written or submitted. A refused sbatch cancels this submission's jobs and leaves no record.
    """
    if dry_run:
        for job in jobs:
            print(f"# ---- {job.name} ({job.kind}{f', {job.tasks} tasks' if job.tasks else ''})")
            print(render(job, settings, run_dir, [f"<{a}>" for a in job.after]), end="")
        return jobs
    record = read_jobs(run_dir) if _jobs_file(run_dir).is_file() else {"run_dir": str(run_dir), "submissions": []}
    if record["submissions"]:   # two submissions at once would write the same folders
        active = [f"{j['name']} {j['job_id']}" for j in record["submissions"][-1]["jobs"]
                  if any(t.state in ACTIVE and t.reason not in NEVER for t in query(j))]
        if active:
            raise InputError(f"jobs of the previous submission to {run_dir} are still queued or running "
                             f"({', '.join(active)}): wait for them (python -m memcirc.slurm wait {run_dir}) "
                             "or scancel them, then submit again")
    number = len(record["submissions"]) + 1
    scripts = run_dir / SLURM_DIR / f"submission-{number:03d}"
    created = next((p for p in (run_dir, run_dir / SLURM_DIR) if not p.exists()), None)
    art.ensure_writable(run_dir / SLURM_DIR / LOGS_DIR)   # sbatch does not create the log folder
    ids: dict[str, str] = {}
    try:
        for order, job in enumerate(jobs, 1):
            path = scripts / f"{order:02d}-{job.name}.sbatch"
            art.atomic_write_text(path, render(job, settings, run_dir, [ids[a] for a in job.after]))
            job.job_id = ids[job.name] = _sbatch(path)
            job.script, job.log = str(path), log_pattern(run_dir, job)
    except BaseException:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        art.remove_tree(created or scripts)   # what this submission made, nothing of earlier ones
        raise
    record["submissions"].append({"number": number, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  **(what or {}), "jobs": [j.record() for j in jobs]})
    art.write_json(_jobs_file(run_dir), record)
    for job in jobs:
        size = f"array of {job.tasks} tasks" if job.tasks else "job"
        wait = f", after {', '.join(job.after)}" if job.after else ""
        print(f"submitted {job.name}: {size} {job.job_id}{wait}; log {job.log}")
    print(f"job ids and scripts: {_jobs_file(run_dir)}; status: python -m memcirc.slurm status {run_dir}")
    return jobs


# -- status ----------------------------------------------------------------------------------

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


def _records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output: one record per line, `Key=value` pairs (values may hold spaces)."""
    out = []
    for line in text.splitlines():
        pairs = re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s[A-Za-z][\w:/]*=|$)", line.strip())
        if pairs:
            out.append(dict(pairs))
    return out


def _task_ids(spec: str) -> list[int]:
    """'0-3%2', '1,3', '5' -> the ids."""
    ids: list[int] = []
    for part in spec.split("%")[0].strip("[]").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            ids += range(int(lo), int(hi.split(":")[0]) + 1)
        elif part.strip():
            ids.append(int(part))
    return ids


def query(job: dict[str, Any]) -> list[Task]:
    """The tasks of one recorded job: scontrol, else sacct, else [] (the cluster forgot it)."""
    try:
        r = subprocess.run(["scontrol", "-o", "show", "job", str(job["job_id"])], capture_output=True, text=True)
    except FileNotFoundError:   # not on a SLURM host: only the run folder can tell
        return []
    tasks: list[Task] = []
    if r.returncode == 0:
        for rec in _records(r.stdout):
            state = rec.get("JobState", "UNKNOWN")
            ids = _task_ids(rec["ArrayTaskId"]) if rec.get("ArrayTaskId") else [None]
            for i in ids:
                log = rec.get("StdOut") if len(ids) == 1 else None
                tasks.append(Task(i, rec.get("JobId", str(job["job_id"])), state, rec.get("Reason", ""),
                                  rec.get("ExitCode", ""), int(rec.get("Restarts", 0) or 0), log))
        return tasks
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(job["job_id"]), "-o",
                            "JobID,JobIDRaw,State,ExitCode"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            job_spec, raw, state, code = (line.split("|") + ["", "", "", ""])[:4]
            ids = _task_ids(job_spec.split("_", 1)[1]) if "_" in job_spec else [None]
            tasks += [Task(i, raw, state.split()[0] if state else "UNKNOWN", "", code) for i in ids]
    return tasks


def _log_of(job: dict[str, Any], task: Task) -> str | None:
    if task.log and task.log != "(null)":
        return task.log
    pattern = job.get("log")
    if not pattern:
        return None
    return pattern.replace("%A", str(job["job_id"])).replace("%a", str(task.index)).replace("%j", task.job_id)


def _marker_done(run_dir: Path, stage: str | None, index: int | None) -> bool:
    """An array task's done marker, or the stage's complete manifest, is on disk."""
    if stage is None:
        return False
    folder = run_dir / (STAGES[stage].folder if stage in STAGES else stage)
    manifest = folder / art.MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete":
        return True
    if index is None or stage not in STAGES or STAGES[stage].tasks_folder is None:
        return False
    sub, marker = STAGES[stage].tasks_folder, DONE_MARKER
    return (folder / sub / f"{index:05d}" / marker).is_file()


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
            if t.state in ACTIVE and t.reason not in NEVER or t.state == SUCCESS:
                continue
            log = _log_of(job, t)
            if st.untraceable(t):
                lines.append(f"    (job {t.job_id} is no longer known to SLURM; see its log: {log})")
                continue
            if t.state == "UNKNOWN":
                failures.append(f"{name}: job {t.job_id} is no longer known to SLURM and its outputs are not in "
                                f"{run_dir}: it did not finish; log: {log}")
                continue
            if t.reason in NEVER or (t.state == "CANCELLED" and any(not statuses[a].ok for a in job["after"]
                                                                     if a in statuses)):
                failures.append(f"{name} (job {t.job_id}) did not run ({t.state}, {t.reason or 'cancelled'}): it "
                                f"waits for {', '.join(job['after'])}, which did not complete")
            elif t.index is not None and job.get("tasks"):
                what = "checkpoint unit" if job.get("stage") == "training_dynamics" else "shard"
                failures.append(f"{job['stage']}: {what} {t.index} of {job['tasks']} failed: array task "
                                f"{job['job_id']}_{t.index} (job {t.job_id}) {t.state}, exit {t.exit_code or '?'}"
                                f"; log: {log}")
            else:
                failures.append(f"{name}: job {t.job_id} {t.state}, exit {t.exit_code or '?'}; log: {log}")
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


# -- the experiment grid (verify_scripts/) ---------------------------------------------------

MARKER_SBATCH = "#SBATCH"
MARKER_RUNNER = "# memcirc: run_stage"   # the template line replaced by RUNNER when rendered


def template_body(name: str, args: list[str]) -> str:
    """An experiment template without its own #SBATCH defaults, its arguments fixed, run_stage inlined."""
    path = GRID_DIR / f"{name}.sh"
    if not path.is_file():
        raise InputError(f"no experiment template {path}; experiments: {', '.join(EXPERIMENTS)}")
    lines = path.read_text().splitlines()[1:]   # the shebang is the rendered script's own
    body = [line for line in lines if not line.startswith(MARKER_SBATCH)]
    if MARKER_RUNNER not in body:
        raise InputError(f"{path} has no '{MARKER_RUNNER}' line")
    body[body.index(MARKER_RUNNER)] = "# (run_stage is defined above)"
    return f"set -- {' '.join(shlex.quote(a) for a in args)}\n" + "\n".join(body)


def plan_grid(experiments: list[str], run_dir: Path, config: str, settings: Settings, *, python: str,
              common: list[str], num_shards: int | None = None) -> list[Job]:
    """memorization_score (array + merge), then each experiment script as a job after what it reads."""
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise InputError(f"unknown experiments {unknown}; experiments: {', '.join(EXPERIMENTS)}")
    for stage in ("contrastive_dataset", "find_circuits", "verify_circuit"):
        _stage_config(stage, ["--config", config, "--output-dir", str(run_dir), *common])
    jobs = plan_pipeline(["memorization_score"], run_dir, config, settings, python=python, common=common,
                         stage_args={}, num_shards=num_shards, report=False)
    final = {"memorization_score": jobs[-1].name}
    for name in [e for e in EXPERIMENTS if e in experiments]:
        args = ["--config", config, "--output-dir", str(run_dir), "--python", python, "--", *common]
        after = [final[n] for n in EXPERIMENT_NEEDS[name] if n in final]
        jobs.append(Job(name, "experiment", ["bash", str(GRID_DIR / f"{name}.sh"), *args], after,
                        body=template_body(name, args)))
        final[name] = name
    return jobs


# -- command line ----------------------------------------------------------------------------

def _run_dir(path: str) -> Path:
    return Path(os.path.abspath(path))


def _python(explicit: str | None, settings: Settings) -> str:
    chosen = settings.python or explicit or sys.executable
    # absolute, but not resolved: a virtualenv's python is a symlink that must stay one
    return os.path.abspath(chosen) if os.sep in chosen else chosen


def _stage_args(pairs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in pairs:
        stage, sep, arg = pair.partition("=")
        if not sep or stage not in PIPELINE_STAGES:
            raise InputError(f"--stage-arg takes STAGE=ARG with a stage from {', '.join(PIPELINE_STAGES)}; "
                             f"got {pair!r}")
        out.setdefault(stage, []).append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: ANN201 - one line, exit 2, like the stages
        raise InputError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m memcirc.slurm", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (("submit", "submit pipeline stages as jobs"),
                            ("grid", "submit the verify_scripts/ experiment grid")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=name == "grid", help="the run's YAML config (with a slurm: section)")
        p.add_argument("--output-dir", required=True, help="run root")
        p.add_argument("--num-shards", type=int, help="array size of scoring and K-FAC factor collection "
                                                      "(default: slurm.num_shards, else 1)")
        p.add_argument("--python", help="interpreter on the nodes (default: slurm.python, else this one)")
        p.add_argument("--common-arg", action="append", default=[], metavar="ARG",
                       help="a flag for every stage (repeat; --common-arg=--device)")
        p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
        p.add_argument("--wait", action="store_true", help="wait for the jobs, then print the status report")
        p.add_argument("--poll", type=float, default=POLL_S, help="seconds between status polls with --wait")
        if name == "submit":
            p.add_argument("--stages", nargs="+", default=list(DEFAULT_PIPELINE), help="stages to submit")
            p.add_argument("--stage-arg", action="append", default=[], metavar="STAGE=ARG",
                           help="a flag for one stage (repeat; --stage-arg=memorization_score=--prefix-len)")
            p.add_argument("--no-report", action="store_true", help="no final memcirc.report job")
        else:
            p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), help="experiments to submit")
    for name in ("status", "wait"):
        p = sub.add_parser(name, help="report the latest submission" if name == "status" else
                           "wait for the latest submission, then report")
        p.add_argument("run_dir")
        p.add_argument("--poll", type=float, default=POLL_S, help="seconds between polls (wait)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command in ("status", "wait"):
            run_dir = _run_dir(args.run_dir)
            if args.command == "wait":
                return 0 if wait(run_dir, args.poll) else 1
            text, _, ok = status_report(run_dir)
            print(text)
            return 1 if "FAILED:" in text else 0
        run_dir = _run_dir(args.output_dir)
        config = os.path.abspath(args.config) if args.config else None
        settings = read_settings(config)
        python = _python(args.python, settings)
        if args.num_shards is not None and args.num_shards < 1:
            raise InputError(f"--num-shards must be >= 1, got {args.num_shards}")
        if args.command == "submit":
            jobs = plan_pipeline(args.stages, run_dir, config, settings, python=python, common=args.common_arg,
                                 stage_args=_stage_args(args.stage_arg), num_shards=args.num_shards,
                                 report=not args.no_report)
            what = {"command": "submit", "stages": args.stages}
        else:
            jobs = plan_grid(args.experiments, run_dir, config, settings, python=python, common=args.common_arg,
                             num_shards=args.num_shards)
            what = {"command": "grid", "experiments": args.experiments}
        if not jobs:
            raise InputError("no stages to submit")
        submit(jobs, settings, run_dir, dry_run=args.dry_run, what={**what, "config": config})
        if args.wait and not args.dry_run:
            return 0 if wait(run_dir, args.poll) else 1
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
