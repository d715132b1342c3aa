"""Circuit evaluation: the metric M of a circuit over pairs, and faithfulness F.

The model always runs on the clean prompt; an edge in the circuit carries its clean value, an edge
outside it the ablated value of its source (`memcirc.circuits.ablation`). M(C) = mean over pairs of
the faithfulness metric with circuit C; F(C) = (M(C) - M(empty)) / (M(full) - M(empty)), with M(full)
and M(empty) recomputed on the same pairs under the same ablation (`FaithfulnessEvaluator`).

Intervals: the evaluator keeps the metric of every pair (circuit, empty, full), and the bootstrap
interval of F (`FaithfulnessEvaluator.intervals`, `memcirc.bootstrap`) resamples PAIRS and recomputes
M(C), M(empty) and M(full) on each resample: F is a ratio of pair means, not a mean of per-pair ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memcirc.bootstrap import PairBootstrap, as_interval
from memcirc.circuits.ablation import Ablation
from memcirc.circuits.attribution import top_k
from memcirc.circuits.graph import EdgeGraph, answer_values, n_pairs
from memcirc.errors import InputError
from memcirc.logs import progress

if TYPE_CHECKING:
    from auto_circuit.data import PromptPairBatch

FAITHFULNESS_METRIC_DEFINITIONS = {
    "logit_diff": "logit[answer] - logit[wrong] at the last prompt position",
    "answer_logit": "logit[answer] at the last prompt position",
    "wrong_logit": "logit[wrong] at the last prompt position",
    "answer_logprob": "log_softmax(logits)[answer] at the last prompt position",
    "prob_diff": "softmax(logits)[answer] - softmax(logits)[wrong] at the last prompt position",
}
SET_DEFINITION = ("a pair with answer sets (a task's: greater-than's years) sums over each set: of logits, of "
                  "probabilities (prob_diff: P(answers) - P(wrongs)), answer_logprob = log P(answers)")
FAITHFULNESS_DEFINITION = (
    "F(C) = (M(C) - M(empty)) / (M(full) - M(empty)); M = mean over pairs of the metric; clean input, "
    "edges outside C ablated; M(full) and M(empty) recomputed on the same pairs under the same ablation"
)


def metric_per_pair(logits: torch.Tensor, batch: PromptPairBatch, metric: str) -> torch.Tensor:
    """The faithfulness metric of each pair from last-position logits [b, vocab] (float32)."""
    logits = logits.float()
    if metric == "prob_diff":
        answer, wrong = answer_values(torch.softmax(logits, dim=-1), batch)
        return answer - wrong
    if metric == "answer_logprob":
        logprobs = torch.log_softmax(logits, dim=-1)
        if isinstance(batch.answers, torch.Tensor):
            return logprobs.gather(-1, batch.answers).squeeze(-1)
        return torch.stack([logprobs[i, a].logsumexp(-1) for i, a in enumerate(batch.answers)])
    answer, wrong = answer_values(logits, batch)
    if metric == "logit_diff":
        return answer - wrong
    if metric == "answer_logit":
        return answer
    if metric == "wrong_logit":
        return wrong
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


def circuit_metrics_per_pair(graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: Ablation,
                             kept: torch.Tensor, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(M, per_pair) for each row C of `kept` [n_circuits, n_edges] in one pass over the pairs.

    per_pair: float64 [n_circuits, n_pairs], the metric of every pair (pairs in batch order, the
    same order for every circuit); M: float64 [n_circuits], its mean, summed batch by batch exactly
    as `circuit_metrics` does (so M is the same number whether or not the pairs are kept)."""
    kept = kept.reshape(-1, graph.n_edges)
    totals = np.zeros(kept.shape[0], dtype=np.float64)
    per_pair = np.zeros((kept.shape[0], n_pairs(batches)), dtype=np.float64)
    sizes = [int(b.clean.shape[0]) for b in batches]
    starts = {id(b): int(s) for b, s in zip(batches, np.cumsum([0, *sizes[:-1]]), strict=True)}
    for batch, j, logits in circuit_outputs(graph, batches, ablation, kept):
        values = metric_per_pair(logits, batch, metric).double()
        totals[j] += float(values.sum())
        start = starts[id(batch)]
        per_pair[j, start:start + len(values)] = values.cpu().numpy()
    return totals / n_pairs(batches), per_pair


def circuit_metrics(graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: Ablation,
                    kept: torch.Tensor, metric: str) -> np.ndarray:
    """M(C) for each row C of `kept` [n_circuits, n_edges]: the metric averaged over all pairs."""
    return circuit_metrics_per_pair(graph, batches, ablation, kept, metric)[0]


def faithfulness(m_circuit: float | np.ndarray, m_empty: float, m_full: float) -> float | np.ndarray:
    """F = (M(circuit) - M(empty)) / (M(full) - M(empty)): 0 for the empty circuit, 1 for the full one."""
    return (m_circuit - m_empty) / (m_full - m_empty)


class FaithfulnessEvaluator:
    """M and F of circuits on one set of pairs under one ablation; the baselines are computed once.

    M(full) and M(empty) go through the same code path as any circuit (all edges kept / none kept);
    their per-pair values are kept (`full_per_pair`, `empty_per_pair`) for intervals over pairs, and
    so is the per-pair metric of every top-k circuit `at_counts` evaluated (`per_pair_at`, by k).
    Raises InputError when M(full) and M(empty) cannot be told apart: F is undefined on these pairs.
    """

    def __init__(self, graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: str,
                 metric: str) -> None:
        self.graph, self.batches, self.metric, self.ablation_kind = graph, batches, metric, ablation
        self.ablation = Ablation(graph, batches, ablation)
        self.per_pair_at: dict[int, np.ndarray] = {}
        self._ranking: torch.Tensor | None = None
        full_empty = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool),
                                  torch.zeros(graph.n_edges, dtype=torch.bool)])
        m, per_pair = self.metrics_per_pair(full_empty)
        self.m_full, self.m_empty = (float(x) for x in m)
        self.full_per_pair, self.empty_per_pair = per_pair
        gap = self.m_full - self.m_empty
        if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(self.m_full)):
            raise InputError(f"faithfulness is undefined: {metric} is {self.m_full:.6g} with every edge and "
                             f"{self.m_empty:.6g} with none under {ablation} ablation on these "
                             f"{n_pairs(batches)} pairs; the pairs do not separate clean from ablated runs")

    def metrics(self, kept: torch.Tensor) -> np.ndarray:
        return self.metrics_per_pair(kept)[0]

    def metrics_per_pair(self, kept: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(M [n_circuits], the metric of every pair [n_circuits, n_pairs]); see `circuit_metrics_per_pair`."""
        return circuit_metrics_per_pair(self.graph, self.batches, self.ablation, kept, self.metric)

    def faithfulness(self, kept: torch.Tensor) -> np.ndarray:
        return self.evaluate(kept)[0]

    def evaluate(self, kept: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(F [n_circuits], the metric of every pair [n_circuits, n_pairs]) of each row of `kept`."""
        m, per_pair = self.metrics_per_pair(kept)
        return np.asarray(faithfulness(m, self.m_empty, self.m_full)), per_pair

    def at_counts(self, ranking: torch.Tensor, counts: Sequence[int]) -> np.ndarray:
        """F of the top-k circuits of `ranking`, for each k in counts (their per-pair metric is kept in
        `per_pair_at`, which a new ranking clears)."""
        if ranking is not self._ranking:
            self._ranking, self.per_pair_at = ranking, {}
        f, per_pair = self.evaluate(top_k(ranking, counts, self.graph.n_edges))
        self.per_pair_at.update(zip((int(k) for k in counts), per_pair, strict=True))
        return f

    def intervals(self, per_pair: np.ndarray, boot: PairBootstrap) -> np.ndarray:
        """[..., 2]: the bootstrap interval of F for circuits whose per-pair metric is `per_pair`
        [..., n_pairs]: M(C), M(empty) and M(full) recomputed on every resample of the pairs (the
        ablation itself, e.g. the mean over the split, stays the one of all pairs)."""
        return boot.interval_of_means(faithfulness_of_means, per_pair, self.empty_per_pair,
                                      self.full_per_pair)

    def curve_rows(self, points: Sequence[tuple[int, float]],
                   boot: PairBootstrap | None = None) -> list[dict[str, Any]]:
        """(k, F) points as rows that also give M = M(empty) + F * (M(full) - M(empty)); with `boot`,
        and where `at_counts` evaluated k, also the interval of F (`faithfulness_ci`)."""
        span = self.m_full - self.m_empty
        rows: list[dict[str, Any]] = [{"edges": k, "faithfulness": f, "metric": self.m_empty + f * span}
                                      for k, f in points]
        if boot is not None:
            for row in rows:
                pp = self.per_pair_at.get(row["edges"])
                row["faithfulness_ci"] = as_interval(None if pp is None else self.intervals(pp, boot))
        return rows


def faithfulness_of_means(m_circuit: np.ndarray, m_empty: np.ndarray, m_full: np.ndarray) -> np.ndarray:
    """F from (resampled) pair means, m_circuit [resamples, ...] against m_empty, m_full [resamples]."""
    m_empty, m_full = (np.expand_dims(m, tuple(range(1, m_circuit.ndim))) for m in (m_empty, m_full))
    with np.errstate(divide="ignore", invalid="ignore"):   # a resample with M(full) = M(empty): F undefined
        return (m_circuit - m_empty) / (m_full - m_empty)
