"""Standard circuit tasks as a pair source: `--task NAME` in find_circuits, verify_circuit and
training_dynamics, instead of the contrastive stage's memorization pairs.

`memcirc.tasks.registry.TASKS` names them (data); `memcirc.tasks.generators` makes their prompts for
one tokenizer; `memcirc.tasks.source.task_pairs` turns them into `memcirc.pairs.Pair`s with a seeded
split into discovery and held-out pairs. This package's import is light (the configs read the registry).
"""

from memcirc.tasks.registry import TASK_NAMES, TASKS, TaskInfo, get_task

__all__ = ["TASKS", "TASK_NAMES", "TaskInfo", "get_task"]
