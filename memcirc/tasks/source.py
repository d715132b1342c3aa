"""A task's prompts as contrastive pairs (`memcirc.pairs.Pair`), split into discovery and held-out."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memcirc import artifacts as art
from memcirc.models.tokenizer import BosPolicy, bos_policy
from memcirc.pairs import Pair
from memcirc.tasks.generators import GENERATORS, LEXICON
from memcirc.tasks.registry import get_task

HELDOUT_FRACTION = 0.5


def task_pairs(name: str, tokenizer: Any, n: int, seed: int, bos: BosPolicy) -> list[Pair]:
    """`n` pairs of task `name` for this tokenizer, seeded; half of them (a seeded choice) held out.
    One document per pair, so the splits are disjoint by document as read_pairs requires."""
    get_task(name)
    prompts = GENERATORS[name](tokenizer, n, random.Random(f"{name}:{seed}"), bos)
    heldout = set(random.Random(f"{name}:{seed}:split").sample(range(n), round(n * HELDOUT_FRACTION)))
    pairs = []
    for i, p in enumerate(prompts):
        one_each = len(p.answers) == len(p.wrongs) == 1
        sets = {} if one_each else {"answer_set": list(p.answers), "wrong_set": list(p.wrongs)}
        pairs.append(Pair(f"{name}-{i:04d}", f"{name}-{i:04d}", "heldout" if i in heldout else "discovery",
                          p.clean, p.corrupt, p.answers[0], p.wrongs[0], source=f"task:{name}", mode="task",
                          group=name, extra={**sets, **({"detail": p.detail} if p.detail else {})}))
    return pairs


@dataclass(frozen=True)
class GeneratedPairs:
    """A task's pairs for one model, and the bytes of their pairs.jsonl (what the stage writes)."""

    task: str
    pairs: list[Pair]
    data: bytes

    @property
    def sha256(self) -> str:
        return art.sha256_bytes(self.data)

    def split(self, split: str, limit: int | None = None) -> list[Pair]:
        kept = [p for p in self.pairs if p.split == split]
        return kept[:limit] if limit is not None else kept

    def describe(self) -> dict[str, Any]:
        """The manifest's record of where the pairs came from."""
        info = get_task(self.task)
        return {"task": self.task, "n_pairs": len(self.pairs), "metric": info.metric, "reference": info.reference,
                "lexicon_sha256": art.sha256_file(LEXICON), "sha256": self.sha256}


def generate_for(task: str, tokenizer: Any, n: int, seed: int, prepend_bos: str) -> GeneratedPairs:
    """The pairs of `task` for this tokenizer under the stage's --prepend-bos (memcirc.models.tokenizer)."""
    pairs = task_pairs(task, tokenizer, n, seed, bos_policy(tokenizer, prepend_bos))
    return GeneratedPairs(task, pairs, art.jsonl_bytes(p.to_row() for p in pairs))


def task_metric_warning(task: str, metric: str) -> str | None:
    """A warning when a task runs with a faithfulness metric other than its own (configured explicitly)."""
    info = get_task(task)
    if metric == info.metric:
        return None
    return (f"task {task} is measured by {info.metric}, but faithfulness_metric is {metric} (configured): "
            "its results are not the task's standard ones")


PERFORMANCE_DEFINITION = ("metric_clean: mean of the task's metric over the pairs with the whole model on the "
                          "clean prompts; accuracy: the fraction of pairs where it is > 0 (the answer beats the "
                          "wrong answer: logit or, for prob_diff, total probability)")


def accuracy(full_per_pair: Sequence[float] | np.ndarray) -> float:
    """The fraction of pairs the whole model gets right: metric > 0 (the answer above the wrong answer)."""
    return float((np.asarray(full_per_pair, dtype=float) > 0).mean())


def task_performance(task: str, full_per_pair: Sequence[float]) -> dict[str, Any]:
    """How well the model does the task (the circuit search's M(full) per pair)."""
    values = np.asarray(full_per_pair, dtype=float)
    return {"task": task, "metric": get_task(task).metric, "n_pairs": int(values.size),
            "metric_clean": float(values.mean()) if values.size else None,
            "accuracy": accuracy(values) if values.size else None, "definition": PERFORMANCE_DEFINITION}
