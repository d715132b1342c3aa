"""The registry of circuit tasks: data only, like auto-circuit's TASK_DICT (cheap to import: the stage
configs read it for `--task`'s choices and the task's metric; the generators live in
memcirc.tasks.generators, keyed by the same names)."""

from __future__ import annotations

from dataclasses import dataclass

from memcirc.errors import InputError


@dataclass(frozen=True)
class TaskInfo:
    """One circuit task.

    Attributes:
        metric: its faithfulness metric (memcirc.circuits.faithfulness): logit_diff, or prob_diff for
            greater-than's year sets.
        grad_function: what attribution takes the gradient of, to match the metric.
        example: a clean prompt and its answer (--help, README).
    """

    name: str
    metric: str
    grad_function: str
    example: str
    reference: str


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("ioi", "logit_diff", "logit", "When Mary and John went to the store, John gave a drink to -> Mary",
             "Wang et al. 2022"),
    TaskInfo("greater_than", "prob_diff", "prob", "The war lasted from the year 1732 to the year 17 -> 33..99",
             "Hanna et al. 2023"),
    TaskInfo("sva", "logit_diff", "logit", "The keys near the cabinet -> are", "Linzen et al. 2016"),
    TaskInfo("gender", "logit_diff", "logit", "So John is such a good cook, isn't -> he", "Mathwin et al. 2023"),
    TaskInfo("induction", "logit_diff", "logit", "A B C ... P, A B C D E F G H -> I (random tokens)",
             "Olsson et al. 2022"),
)}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> TaskInfo:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]
