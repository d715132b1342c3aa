"""Circuit discovery on one set of pairs: attribution, ranking and the minimal faithful circuit.

The one routine behind find_circuits and every training_dynamics checkpoint, and the one
description of its prune scores (`prune_scores_metadata`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.bootstrap import PairBootstrap
from memcirc.circuits.ablation import ABLATION_NAMES, Ablation
from memcirc.circuits.attribution import LOSS_OBJECTIVES, SCORE_DEFINITION, attribute_edges, edge_ranking
from memcirc.circuits.faithfulness import FaithfulnessEvaluator
from memcirc.circuits.graph import EdgeGraph, n_pairs
from memcirc.circuits.search import MinimalCircuit, minimal_circuit
from memcirc.circuits.store import PRUNE_SCORES_FORMAT, circuit_edges
from memcirc.errors import InputError
from memcirc.option_groups import CircuitOptions

if TYPE_CHECKING:
    from auto_circuit.data import PromptPairBatch

log = logging.getLogger(__name__)


@dataclass
class CircuitResult:
    """What `discover_circuit` found on one set of pairs.

    Attributes:
        scores: float32 [n_edges], the prune scores in the graph's edge order.
        ranking: edge indices by |score| descending (`edge_ranking`).
        evaluator: M and F on these pairs; None when F is undefined there (`note` says why).
        search: the minimal-circuit search; None without an evaluator.
        edges: circuit.json rows of the minimal circuit ([] without one).
    """

    scores: torch.Tensor
    ranking: torch.Tensor
    evaluator: FaithfulnessEvaluator | None
    search: MinimalCircuit | None
    edges: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def discover_circuit(graph: EdgeGraph, batches: Sequence[PromptPairBatch], opts: CircuitOptions,
                     evaluator: FaithfulnessEvaluator | None = None,
                     boot: PairBootstrap | None = None) -> CircuitResult:
    """Attribute every edge, rank the edges, and find the smallest top-k circuit reaching opts.target.

    Args:
        boot: the resamples of the pairs behind `opts.select_by` lower: a circuit reaches the target
            when the lower end of its faithfulness interval over them does. None (fewer than 2 pairs)
            or `select_by` point: when its faithfulness does.
        evaluator: the FaithfulnessEvaluator of `batches` under opts.ablation and
            opts.faithfulness_metric when the caller has built it already (find_circuits does, to
            refuse undefined faithfulness before its stage starts). Otherwise it is built here, and
            undefined faithfulness (M(full) = M(empty), e.g. an early training checkpoint) is recorded
            in `note` instead of raised: attribution is still defined, the circuit is not.
    """
    note = None
    if evaluator is None:
        try:
            evaluator = FaithfulnessEvaluator(graph, batches, opts.ablation, opts.faithfulness_metric)
        except InputError as e:
            note = str(e)
    ablation = evaluator.ablation if evaluator is not None else Ablation(graph, batches, opts.ablation)
    scores = attribute_edges(graph, batches, ablation, ig_steps=opts.ig_steps, grad_function=opts.grad_function,
                             loss=opts.loss)
    ranking = edge_ranking(scores)
    if evaluator is None:
        return CircuitResult(scores, ranking, None, None, note=note)
    lower_at = None
    if opts.select_by == "lower":
        if boot is None:
            log.warning("select_by lower: %d pair(s) give no interval; the circuit is chosen by F itself",
                        n_pairs(batches))
        else:
            lower_at = partial(_lower_ends, evaluator, boot)
    search = minimal_circuit(lambda ks: evaluator.at_counts(ranking, ks), graph.n_edges, opts.target,
                             opts.curve_points, lower_at)
    return CircuitResult(scores, ranking, evaluator, search, circuit_edges(graph, scores, ranking,
                                                                           search.minimal_edges))


def _lower_ends(evaluator: FaithfulnessEvaluator, boot: PairBootstrap, counts: list[int]) -> np.ndarray:
    """The lower ends of F's intervals of the top-k circuits `evaluator.at_counts` has just evaluated
    (their per-pair metric is kept there)."""
    return evaluator.intervals(np.stack([evaluator.per_pair_at[k] for k in counts]), boot)[:, 0]


def attribution_method(opts: CircuitOptions) -> dict[str, Any]:
    """How prune scores were computed (their `method` metadata, also find_circuits' manifest `method`).

    Only the settings the scores depend on: the faithfulness metric, target and curve points choose
    the circuit from the scores, not the scores."""
    return {"ig_steps": opts.ig_steps, "ig_points": opts.ig_steps + 1 if opts.ig_steps else 1,
            "ig_variant": "joint interpolation of all edge masks (auto-circuit; not per-node IG)",
            "grad_function": opts.grad_function, "loss": opts.loss, "loss_objective": LOSS_OBJECTIVES[opts.loss],
            "ablation": opts.ablation, "ablation_auto_circuit": ABLATION_NAMES[opts.ablation],
            "patch": "clean input; edges outside the circuit ablated (auto-circuit TREE_PATCH)",
            "weight_processing": opts.weight_processing, "graph": "factorized, separate_qkv, last_seq, "
            "all positions", "normalization": "mean over pairs and IG points",
            "score_definition": SCORE_DEFINITION}


def prune_scores_metadata(graph: EdgeGraph, opts: CircuitOptions, *, model: dict[str, Any], pairs_sha256: str,
                          n_pairs: int, limit: int | None) -> dict[str, Any]:
    """The metadata of a prune_scores.safetensors (format PRUNE_SCORES_FORMAT) of discovery pairs.

    Args:
        model: `memcirc.models.identity.weights_key` of the model the scores belong to.
        pairs_sha256: sha256 of the pairs file; n_pairs: discovery pairs used; limit: the run's --limit.
    """
    return {"format": PRUNE_SCORES_FORMAT, "model_sha256": art.sha256_json(model), "model": model,
            "pairs_sha256": pairs_sha256, "pairs_split": "discovery", "n_pairs": n_pairs, "limit": limit,
            "method": attribution_method(opts), "modules": graph.modules, "n_edges": graph.n_edges}
