"""The experiment grid: the verify_scripts/ templates as jobs after the scoring they read."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from memcirc.errors import InputError
from memcirc.slurm.plan import REPO, Job, plan_pipeline, stage_config
from memcirc.slurm.settings import EXPERIMENTS

if TYPE_CHECKING:
    from memcirc.slurm.settings import Settings

EXPERIMENT_NEEDS = {"branch_decision": ("memorization_score",), "memorization_decision": ("memorization_score",),
                    "ablations": ("branch_decision", "memorization_decision"),
                    "random_baseline": ("branch_decision", "memorization_decision")}
GRID_STAGES = ("contrastive_dataset", "find_circuits", "verify_circuit")   # what the templates run
GRID_DIR = REPO / "verify_scripts"
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
    for stage in GRID_STAGES:
        stage_config(stage, ["--config", config, "--output-dir", str(run_dir), *common])
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
