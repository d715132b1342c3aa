"""Circuit evaluation: the metric M of a circuit over pairs, and faithfulness F.

The model always runs on the clean prompt; an edge in the circuit carries its clean value, an edge
outside it the ablated value of its source (`memcirc.circuits.ablation`). M(C) = mean over pairs of
the faithfulness metric with circuit C; F(C) = (M(C) - M(empty)) / (M(full) - M(empty)), with M(full)
and M(empty) recomputed on the same pairs under the same ablation (`FaithfulnessEvaluator`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from memcirc.circuits.ablation import Ablation
from memcirc.circuits.attribution import top_k
from memcirc.circuits.graph import EdgeGraph, answer_ids, n_pairs
from memcirc.errors import InputError
from memcirc.logs import progress

if TYPE_CHECKING:
    from auto_circuit.data import PromptPairBatch

FAITHFULNESS_METRIC_DEFINITIONS = {
    "logit_diff": "logit[answer] - logit[wrong] at the last prompt position",
    "answer_logit": "logit[answer] at the last prompt position",
    "wrong_logit": "logit[wrong] at the last prompt position",
    "answer_logprob": "log_softmax(logits)[answer] at the last prompt position",
}
FAITHFULNESS_DEFINITION = (
    "F(C) = (M(C) - M(empty)) / (M(full) - M(empty)); M = mean over pairs of the metric; clean input, "
    "edges outside C ablated; M(full) and M(empty) recomputed on the same pairs under the same ablation"
)


def metric_per_pair(logits: torch.Tensor, batch: PromptPairBatch, metric: str) -> torch.Tensor:
    """The faithfulness metric of each pair from last-position logits [b, vocab] (float32)."""
    logits = logits.float()
    answers, wrong_answers = answer_ids(batch)
    answer = logits.gather(-1, answers).squeeze(-1)
    wrong = logits.gather(-1, wrong_answers).squeeze(-1)
    if metric == "logit_diff":
        return answer - wrong
    if metric == "answer_logit":
        return answer
    if metric == "wrong_logit":
        return wrong
    if metric == "answer_logprob":
        return torch.log_softmax(logits, dim=-1).gather(-1, answers).squeeze(-1)
    raise InputError(f"faithfulness metric {metric!r} is not one of {', '.join(FAITHFULNESS_METRIC_DEFINITIONS)}")


def circuit_outputs(graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: Ablation,
                    kept: torch.Tensor, desc: str = "circuits",
                    ) -> Iterator[tuple[PromptPairBatch, int, torch.Tensor]]:
    """Last-position logits of the clean prompts with only the edges in each circuit kept.

    Args:
        kept: bool [n_circuits, n_edges]; row j is circuit j (True = the edge keeps its clean value).

    Yields:
        (batch, j, logits [b, vocab]) for every batch and circuit (ablations computed once per batch).
    """
    from auto_circuit.utils.graph_utils import patch_mode

    pm = graph.pm
    kept = kept.reshape(-1, graph.n_edges)
    ablated = (~kept).to(graph.device, torch.float32)  # on the device once, not once per circuit
    for batch in progress(batches, desc, total=len(batches)):
        patch = ablation(batch)
        with patch_mode(pm, patch):
            for j in range(ablated.shape[0]):
                graph.set_ablated(ablated[j])
                with torch.inference_mode():
                    logits = pm(batch.clean)[pm.out_slice].clone()
                yield batch, j, logits  # outside inference_mode: a generator must not leak it
    graph.set_ablated(torch.zeros(graph.n_edges))


def circuit_metrics(graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: Ablation,
                    kept: torch.Tensor, metric: str) -> np.ndarray:
    """M(C) for each row C of `kept` [n_circuits, n_edges]: the metric averaged over all pairs."""
    kept = kept.reshape(-1, graph.n_edges)
    totals = np.zeros(kept.shape[0], dtype=np.float64)
    for batch, j, logits in circuit_outputs(graph, batches, ablation, kept):
        totals[j] += float(metric_per_pair(logits, batch, metric).double().sum())
    return totals / n_pairs(batches)


def faithfulness(m_circuit: float | np.ndarray, m_empty: float, m_full: float) -> float | np.ndarray:
    """F = (M(circuit) - M(empty)) / (M(full) - M(empty)): 0 for the empty circuit, 1 for the full one."""
    return (m_circuit - m_empty) / (m_full - m_empty)


class FaithfulnessEvaluator:
    """M and F of circuits on one set of pairs under one ablation; the baselines are computed once.

    M(full) and M(empty) go through the same code path as any circuit (all edges kept / none kept).
    Raises InputError when M(full) and M(empty) cannot be told apart: F is undefined on these pairs.
    """

    def __init__(self, graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: str,
                 metric: str) -> None:
        self.graph, self.batches, self.metric, self.ablation_kind = graph, batches, metric, ablation
        self.ablation = Ablation(graph, batches, ablation)
        full_empty = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool),
                                  torch.zeros(graph.n_edges, dtype=torch.bool)])
        self.m_full, self.m_empty = (float(x) for x in self.metrics(full_empty))
        gap = self.m_full - self.m_empty
        if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(self.m_full)):
            raise InputError(f"faithfulness is undefined: {metric} is {self.m_full:.6g} with every edge and "
                             f"{self.m_empty:.6g} with none under {ablation} ablation on these "
                             f"{n_pairs(batches)} pairs; the pairs do not separate clean from ablated runs")

    def metrics(self, kept: torch.Tensor) -> np.ndarray:
        return circuit_metrics(self.graph, self.batches, self.ablation, kept, self.metric)

    def faithfulness(self, kept: torch.Tensor) -> np.ndarray:
        return np.asarray(faithfulness(self.metrics(kept), self.m_empty, self.m_full))

    def at_counts(self, ranking: torch.Tensor, counts: Sequence[int]) -> np.ndarray:
        """F of the top-k circuits of `ranking`, for each k in counts."""
        return self.faithfulness(top_k(ranking, counts, self.graph.n_edges))

    def curve_rows(self, points: Sequence[tuple[int, float]]) -> list[dict[str, float]]:
        """(k, F) points as rows that also give M = M(empty) + F * (M(full) - M(empty))."""
        span = self.m_full - self.m_empty
        return [{"edges": k, "faithfulness": f, "metric": self.m_empty + f * span} for k, f in points]
