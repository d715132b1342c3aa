"""The checkpoints of a training-dynamics sweep, resolved without loading anything.

A sweep's checkpoints (`resolve_checkpoints`) are Hub revisions of one model (Pythia's `step1000`
... `step143000`, listed or built from a named schedule), local checkpoint folders, or, for the
testbed, its own checkpoints followed by the final model. Importing this module is cheap (no torch),
so a SLURM layer can size a job array by the length of the list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from memcirc.errors import InputError
from memcirc.testbed import MODEL_DIR, TESTBED_NAME, checkpoint_folders

if TYPE_CHECKING:
    from memcirc.models import ModelSpec

# The revisions EleutherAI publishes for every Pythia model.
PYTHIA_STEPS = (0, *(2 ** i for i in range(10)), *range(1000, 143001, 1000))
# Tigges et al.'s `exp_plus_detail` checkpoint schedule (circuits-over-time).
EXP_PLUS_DETAIL = (*(2 ** i for i in range(10)), *range(1000, 15001, 1000), *range(20000, 65001, 5000),
                   *range(70000, 140001, 10000), 143000)


@dataclass(frozen=True)
class CheckpointList:
    """Which checkpoints a sweep covers (the stage config's fields of the same names).

    Attributes:
        model: the Hub id the revisions belong to, or a local model ('testbed': its checkpoints).
        checkpoints: revisions of `model` (e.g. 'step1000') or local checkpoint folders, in training order.
        steps: the training step of each listed checkpoint (default: the number in its name).
        schedule: build the revisions instead: 'linear', 'log' or 'exp_plus_detail' (see `schedule_steps`).
        schedule_start, schedule_end, schedule_every, schedule_points: the schedule's parameters.
    """

    model: str
    checkpoints: Sequence[str]
    steps: Sequence[int]
    schedule: str | None
    schedule_start: int
    schedule_end: int
    schedule_every: int
    schedule_points: int


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the sweep: `index` is its unit number, `step` its training step."""

    index: int
    label: str
    step: int
    name_or_path: str            # Hub id, local folder, or 'testbed'
    revision: str | None = None  # Hub revision (e.g. 'step3000'); None for local folders

    def spec(self, base: ModelSpec) -> ModelSpec:
        """`base` (dtype, device, GGUF file, attention implementation) loading this checkpoint."""
        return replace(base, name_or_path=self.name_or_path, revision=self.revision)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Entry(NamedTuple):
    label: str
    name_or_path: str
    revision: str | None


# -- schedules -------------------------------------------------------------------------------

def _snap(value: float, available: Sequence[int]) -> int:
    return min(available, key=lambda s: (abs(s - value), s))


def schedule_steps(name: str, start: int, end: int, every: int = 1000, points: int = 8) -> list[int]:
    """Pythia checkpoint steps of a named schedule in [start, end], snapped to existing revisions.

    `linear`: start, start + every, ... and end; `log`: `points` log-spaced steps (step 0 first when
    start is 0); `exp_plus_detail`: Tigges et al.'s list. Two points snapping to one revision count
    once, so a schedule can come out shorter than asked.
    """
    if end < start:
        raise InputError(f"config key 'schedule_end' ({end}) is before 'schedule_start' ({start})")
    available = [s for s in PYTHIA_STEPS if start <= s <= end]
    if not available:
        raise InputError(f"no Pythia revision lies in steps {start}..{end} (they are 0, 1, 2, 4, ..., 512, "
                         "then every 1000 up to 143000)")
    if name == "linear":
        raw: list[float] = list(range(start, end + 1, every))
        if raw[-1] != end:
            raw.append(end)
    elif name == "log":
        if start == 0:
            raw = [0.0, *np.geomspace(1, end, points - 1).tolist()] if end > 0 else [0.0]
        else:
            raw = np.geomspace(start, end, points).tolist()
    elif name == "exp_plus_detail":
        raw = [s for s in EXP_PLUS_DETAIL if start <= s <= end]
        if not raw:
            raise InputError(f"the exp_plus_detail schedule has no step in {start}..{end}")
    else:
        raise InputError(f"unknown schedule {name!r}; choose linear, log or exp_plus_detail")
    return list(dict.fromkeys(_snap(x, available) for x in raw))


# -- the checkpoint list ---------------------------------------------------------------------

def resolve_checkpoints(opts: CheckpointList) -> list[Checkpoint]:
    """The checkpoints of the sweep in training order, without loading anything.

    From, in this order: `checkpoints` (each a local folder, or else a revision of `model`, with
    `steps` or the number in its name); `schedule` (Pythia revisions stepN of `model`); for the
    testbed, its checkpoints then the final model (steps from ground_truth.json).

    Raises:
        InputError: no checkpoints, both a list and a schedule, a missing folder, a revision of a
            local model, an unknown step, steps not strictly increasing, or a checkpoint listed twice.
    """
    if opts.checkpoints and opts.schedule:
        raise InputError("pass either config key 'checkpoints' or 'schedule', not both")
    if opts.steps and not opts.checkpoints:
        raise InputError("config key 'steps' applies only to an explicit 'checkpoints' list")
    if opts.checkpoints:
        entries = [_listed_entry(entry, opts.model) for entry in opts.checkpoints]
        steps = _listed_steps(entries, opts.steps)
    elif opts.schedule:
        entries, steps = _scheduled(opts)
    elif opts.model == TESTBED_NAME:
        entries, steps = _testbed_checkpoints()
    else:
        raise InputError(f"no checkpoints for model {opts.model!r}: pass --checkpoints (revisions such as "
                         "step1000, or local folders) or --schedule linear|log|exp_plus_detail")
    _check_training_order(entries, steps)
    _check_listed_once(entries)
    return [Checkpoint(i, e.label, step, e.name_or_path, e.revision)
            for i, (e, step) in enumerate(zip(entries, steps, strict=True))]


def resolve_checkpoint_index(index: int | None, n_checkpoints: int) -> int | None:
    """The one unit this job runs: `index`, else the SLURM array task's offset, else None (all units)."""
    env = os.environ
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        # Array ids may start anywhere (--array=1-4); unit indices always start at 0.
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if index is not None and not 0 <= index < n_checkpoints:
        raise InputError(f"checkpoint index {index} is outside 0..{n_checkpoints - 1} ({n_checkpoints} "
                         "checkpoints): size the job array to the length of the checkpoint list")
    return index


def _is_local_model(name: str) -> bool:
    return name == TESTBED_NAME or Path(name).expanduser().exists()


def _step_from_name(name: str) -> int | None:
    """'step-222' -> 222, 'step1000' -> 1000, 'stage1-step1000-tokens4B' -> 1000, 'ckpt_500' -> 500."""
    match = re.search(r"step[-_]?(\d+)", name) or re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None


def _listed_entry(entry: str, model: str) -> _Entry:
    """One entry of an explicit list: a local checkpoint folder, else a revision of `model`."""
    path = Path(entry).expanduser()
    if path.is_dir():
        return _Entry(path.resolve().name, str(path.resolve()), None)
    if path.exists():
        raise InputError(f"checkpoint {entry} is a file; pass the folder that holds config.json")
    if entry.startswith(("/", ".", "~")) or "/" in entry:
        raise InputError(f"checkpoint folder {entry} does not exist")
    if _is_local_model(model):
        raise InputError(f"checkpoint {entry!r} is not a folder, and --model {model} is local: "
                         "revisions apply only to Hub ids; list the checkpoint folders instead")
    return _Entry(entry, model, entry)


def _listed_steps(entries: Sequence[_Entry], steps: Sequence[int]) -> list[int]:
    """`steps` (one per entry), else the step number in each entry's name."""
    if steps:
        if len(steps) != len(entries):
            raise InputError(f"config key 'steps' has {len(steps)} values for {len(entries)} checkpoints")
        return [int(s) for s in steps]
    named = [_step_from_name(e.label) for e in entries]
    unknown = [e.label for e, s in zip(entries, named, strict=True) if s is None]
    if unknown:
        raise InputError(f"cannot tell the training step of checkpoint {unknown[0]!r} from its name; "
                         "pass --steps (one per checkpoint)")
    return [int(s) for s in named if s is not None]


def _scheduled(opts: CheckpointList) -> tuple[list[_Entry], list[int]]:
    if _is_local_model(opts.model):
        raise InputError(f"a schedule builds Hub revisions (stepN), but --model {opts.model} is local; list "
                         "its checkpoint folders with --checkpoints")
    assert opts.schedule is not None
    steps = schedule_steps(opts.schedule, opts.schedule_start, opts.schedule_end, opts.schedule_every,
                           opts.schedule_points)
    return [_Entry(f"step{s}", opts.model, f"step{s}") for s in steps], steps


def _testbed_checkpoints() -> tuple[list[_Entry], list[int]]:
    """The testbed's checkpoints, then its final model ('testbed'), with their steps."""
    final = MODEL_DIR.resolve()
    folders = checkpoint_folders()
    entries = [_Entry(folder.name, TESTBED_NAME if folder == final else str(folder), None)
               for _, folder in folders]
    return entries, [step for step, _ in folders]


def _check_training_order(entries: Sequence[_Entry], steps: Sequence[int]) -> None:
    bad = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    if bad:
        i = bad[0]
        raise InputError(f"checkpoint steps must increase (training order): {entries[i - 1].label!r} is step "
                         f"{steps[i - 1]}, the next, {entries[i].label!r}, step {steps[i]}")


def _check_listed_once(entries: Sequence[_Entry]) -> None:
    seen: set[tuple[str, str | None]] = set()
    for e in entries:
        if (e.name_or_path, e.revision) in seen:
            raise InputError(f"checkpoint {e.label!r} is listed twice")
        seen.add((e.name_or_path, e.revision))
