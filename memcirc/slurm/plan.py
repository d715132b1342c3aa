"""Job planning: the stages as sbatch jobs, job arrays and their merges, each after its upstream.

A stage's array kind (`Stage.array` in the registry) decides how it is split: "shards" runs
`--num-shards N --shard-index $SLURM_ARRAY_TASK_ID` (N from --num-shards or the slurm: section),
"checkpoints" one `--checkpoint-index` task per checkpoint; each array is followed by a `--merge`
job. A stage module may define `array_tasks(cfg) -> int | None`: the number of array tasks its
config needs (training_dynamics: its checkpoints), or None for as many as asked for; 1 is one job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcirc.config import StageConfig, build_config
from memcirc.errors import InputError
from memcirc.stages.registry import STAGES, Stage

if TYPE_CHECKING:
    from memcirc.slurm.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ARRAY_TASK = "$SLURM_ARRAY_TASK_ID"   # the one unquoted word of a rendered command


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


def stage_config(stage: str, argv: list[str]) -> StageConfig:
    """The stage's config as its job will build it (InputError now rather than on the cluster)."""
    return build_config(STAGES[stage].config, argv)


def array_size(stage: Stage, cfg: StageConfig, settings: Settings, num_shards: int | None) -> int:
    """How many array tasks `stage` runs as: the stage's own count, else the shards asked for."""
    array_tasks = getattr(stage.module, "array_tasks", None)
    needed = array_tasks(cfg) if array_tasks is not None else None
    return settings.num_shards(stage.name, num_shards) if needed is None else needed


def array_flags(stage: Stage, n: int) -> tuple[list[str], list[str], list[str]]:
    """(an array task's flags, the merge's, a single job's) for `n` tasks of the stage's array kind."""
    if stage.array == "checkpoints":
        return ["--checkpoint-index", ARRAY_TASK], ["--merge"], []
    return (["--num-shards", str(n), "--shard-index", ARRAY_TASK], ["--merge", "--num-shards", str(n)],
            ["--num-shards", "1"])


def stage_jobs(stage: Stage, cfg: StageConfig, command: list[str], after: list[str], settings: Settings,
               num_shards: int | None) -> list[Job]:
    """One job, or an array and its merge."""
    if not stage.array:
        return [Job(stage.name, "single", command, after, stage=stage.name)]
    n = array_size(stage, cfg, settings, num_shards)
    task, merge, single = array_flags(stage, n)
    if n == 1:
        return [Job(stage.name, "single", command + single, after, stage=stage.name)]
    return [Job(stage.name, "array", command + task, after, stage=stage.name, tasks=n),
            Job(f"{stage.name}.merge", "merge", command + merge, [stage.name], stage=stage.name)]


def plan_pipeline(stages: list[str], run_dir: Path, config: str | None, settings: Settings, *, python: str,
                  common: list[str], stage_args: dict[str, list[str]], num_shards: int | None = None,
                  report: bool = True) -> list[Job]:
    """The jobs of `stages` in pipeline order, each stage's flags checked by building its config."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"unknown stages {unknown}; stages: {', '.join(STAGES)}")
    jobs: list[Job] = []
    final: dict[str, str] = {}       # stage -> the name of the job that finishes it
    for stage in [s for s in STAGES.values() if s.name in stages]:
        argv = ([] if config is None else ["--config", config]) + ["--output-dir", str(run_dir), *common,
                                                                  *stage_args.get(stage.name, [])]
        cfg = stage_config(stage.name, argv)
        after = [final[s] for s in stage.needs if s in final]
        jobs += stage_jobs(stage, cfg, [python, str(REPO / stage.script), *argv], after, settings, num_shards)
        final[stage.name] = jobs[-1].name
    if report and jobs:
        jobs.append(Job("report", "report", [python, "-m", "memcirc.report", str(run_dir)], list(final.values())))
    return jobs
