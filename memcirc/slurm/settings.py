"""The config's `slurm:` section: job resources, checked, with per-job overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from memcirc.config import SLURM_KEY, load_yaml
from memcirc.errors import InputError
from memcirc.parsing import did_you_mean
from memcirc.stages.registry import STAGES

# the verify_scripts/ experiments (memcirc.slurm.grid), which a slurm: section may give resources too
EXPERIMENTS = ("branch_decision", "memorization_decision", "ablations", "random_baseline")


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
# jobs that need no GPU unless the config says otherwise: merges that only read files, and the report
NO_GPU = {**{f"{s.name}.merge": {"gpus": 0} for s in STAGES.values() if s.array and not s.merge_on_gpu},
          "report": {"gpus": 0, "cpus_per_task": 1}}
# the type each key's value must have (a rule name of `valid`)
VALUE_TYPES = {"partition": "str", "account": "str", "qos": "str", "gpus": "count", "cpus_per_task": "positive",
               "mem": "strnum", "time": "strnum", "extra": "lines", "num_shards": "positive", "setup": "lines",
               "python": "str", "max_parallel": "positive", "requeue": "bool"}
WANTED = {"str": "a one-line string", "strnum": "a one-line string or a number", "count": "an integer >= 0",
          "positive": "an integer >= 1", "bool": "true or false", "lines": "a list of one-line strings"}


def job_keys() -> list[str]:
    """The names a job section of `slurm:` may have: a stage, <stage>.merge, report, an experiment."""
    return [*STAGES, *(f"{s.name}.merge" for s in STAGES.values() if s.array), "report", *EXPERIMENTS]


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


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_line(value: Any) -> bool:
    """No control character but tab: each value becomes (part of) one line of a job script."""
    return isinstance(value, str) and not any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value)


def valid(key: str, value: Any) -> Any:
    """`value` of `slurm.<key>` if it has the key's type (numbers of mem/time become strings), else InputError."""
    rule = VALUE_TYPES[key.rsplit(".", 1)[-1]]
    ok = {"str": _one_line(value) and bool(value.strip()),
          "strnum": (_one_line(value) or _is_int(value)),
          "count": _is_int(value) and value >= 0,
          "positive": _is_int(value) and value >= 1,
          "bool": isinstance(value, bool),
          "lines": isinstance(value, list) and all(_one_line(v) for v in value)}[rule]
    if value is not None and not ok:
        raise InputError(f"config key '{SLURM_KEY}.{key}' must be {WANTED[rule]}, got {value!r}")
    return str(value) if rule == "strnum" and value is not None else value


def _resources(section: dict[str, Any], prefix: str) -> dict[str, Any]:
    values = {}
    for key, value in section.items():
        if key not in RESOURCE_KEYS:
            raise InputError(_unknown(f"{prefix}{key}", key, RESOURCE_KEYS, f"known keys of a job: "
                                      f"{', '.join(RESOURCE_KEYS)}"))
        if value is not None:
            values[key] = valid(prefix + key, value)
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
            setattr(settings, key, valid(key, value) if value is not None else getattr(settings, key))
        elif key in RESOURCE_KEYS:
            settings.base.update(_resources({key: value}, ""))
        else:
            raise InputError(_unknown(key, key, [*RESOURCE_KEYS, *GLOBAL_KEYS, *known_jobs],
                                      f"known keys: {', '.join(RESOURCE_KEYS + GLOBAL_KEYS)}, or a job section "
                                      "(a stage, <stage>.merge, report or a verify_scripts experiment)", config))
    return settings


def _unknown(shown: str, key: str, known: Sequence[str], listing: str, config: str | None = None) -> str:
    """"unknown config key 'slurm.gpu' in FILE (did you mean 'gpus'?)", else the listing of known keys."""
    head = f"unknown config key '{SLURM_KEY}.{shown}'" + (f" in {config}" if config else "")
    close = did_you_mean(key, known)
    return f"{head} (did you mean '{close}'?)" if close is not None else f"{head}; {listing}"
