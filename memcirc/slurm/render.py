"""sbatch scripts: #SBATCH lines from the settings, then the bash stage runner and the command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from memcirc.errors import InputError
from memcirc.slurm.plan import ARRAY_TASK, REPO, Job
from memcirc.slurm.records import LOGS_DIR, SLURM_DIR

if TYPE_CHECKING:
    from memcirc.slurm.settings import Settings

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


def shell_words(command: list[str]) -> str:
    """`command` as one bash line: every word quoted, ARRAY_TASK double-quoted so that bash expands it."""
    return " ".join(f'"{w}"' if w == ARRAY_TASK else shlex.quote(w) for w in command)


def log_pattern(run_dir: Path, job: Job) -> str:
    """The job's log file as sbatch names it (%A_%a or %j replaced by the ids), for the records."""
    return str(run_dir / SLURM_DIR / LOGS_DIR / f"{job.name}-{_log_suffix(job)}")


def _log_suffix(job: Job) -> str:
    return f"{'%A_%a' if job.kind == 'array' else '%j'}.out"


def check_script_path(path: Path | str, what: str) -> None:
    """InputError for a path a job script cannot hold: a control character (a newline would end the
    #SBATCH line or the header comment and start a shell line) or a backslash (sbatch drops it from
    --output paths). Spaces, '#', '%', quotes and non-ASCII letters are fine, quoted by `sbatch_value`."""
    bad = sorted({c for c in str(path) if ord(c) < 32 or ord(c) == 127 or c == "\\"})
    if bad:
        raise InputError(f"{what} {str(path)!r} contains {' '.join(repr(c) for c in bad)}, which a SLURM job "
                         "script cannot hold; choose a folder without it")


def sbatch_value(value: str) -> str:
    """`value` double-quoted for an #SBATCH line. sbatch reads those lines itself, not bash: it splits
    them at whitespace and ends them at an unquoted '#'; double quotes group, and \\" and \\\\ escape."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _output_value(run_dir: Path, job: Job) -> str:
    # sbatch expands %-patterns (%j, %A, ...) in --output: a '%' of the folder is written %%
    folder = str(run_dir / SLURM_DIR / LOGS_DIR).replace("%", "%%")
    return sbatch_value(f"{folder}/{job.name}-{_log_suffix(job)}")


def render(job: Job, settings: Settings, run_dir: Path, dependency_ids: list[str]) -> str:
    """The sbatch script of `job`: #SBATCH lines from the settings, then the stage runner and command.
    Path values are quoted (`sbatch_value`); the stage command is shell-quoted (`shell_words`)."""
    check_script_path(run_dir, "run folder")
    check_script_path(REPO, "the memcirc checkout")
    res = settings.resources(job.name)
    lines = ["#!/bin/bash",
             f"# memcirc {job.kind} job '{job.name}' of {run_dir} (written by memcirc.slurm)",
             f"--job-name=memcirc-{job.name}"]
    if job.tasks:
        throttle = f"%{settings.max_parallel}" if settings.max_parallel else ""
        lines.append(f"--array=0-{job.tasks - 1}{throttle}")
    lines += [f"--output={_output_value(run_dir, job)}", "--open-mode=append",
              "--requeue" if settings.requeue else "--no-requeue", f"--chdir={sbatch_value(str(REPO))}",
              *res.sbatch_lines()]
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
        body.append(f"run_stage {shell_words(job.command)}")
    return "\n".join(header + [""] + body) + "\n"
