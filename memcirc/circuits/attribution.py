"""Edge attribution by mask gradients (EAP, EAP-IG) and the one ranking of edges by score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from memcirc.circuits.ablation import Ablation
from memcirc.circuits.graph import EdgeGraph, answer_values, n_pairs
from memcirc.errors import InputError
from memcirc.logs import progress

if TYPE_CHECKING:
    from auto_circuit.data import PromptPairBatch

# what each attribution loss (config.LOSSES) maximizes, v = grad_function(last-position logits)
LOSS_OBJECTIVES = {
    "avg_diff": "v[answer] - v[wrong]",
    "neg_avg_diff": "v[wrong] - v[answer]",
    "avg_val": "v[answer]",
    "avg_val_wrong": "v[wrong]",
}
SCORE_DEFINITION = (
    "score(e) = mean over IG points m in {0, 1/s, ..., 1} (s = ig_steps; only m = 0, plain EAP, when "
    "s = 0) of d loss / d mask_e, loss = -mean over pairs of the objective of grad_function(last-"
    "position logits); all edge masks are interpolated jointly (auto-circuit's IG, not per-node IG: "
    "auto-circuit issue #6); mask 0 = clean value, 1 = ablated value; positive = ablating the edge "
    "lowers the objective. auto-circuit's mask_gradient_prune_scores returns the same gradients "
    "summed over IG points and batches: ours = theirs / ((s + 1) * n_batches) for equal batches."
)


def _objective(logits: torch.Tensor, batch: PromptPairBatch, grad_function: str, loss: str) -> torch.Tensor:
    if grad_function == "logit":
        vals = logits
    elif grad_function == "prob":
        vals = torch.softmax(logits, dim=-1)
    elif grad_function == "logprob":
        vals = torch.log_softmax(logits, dim=-1)
    elif grad_function == "logit_exp":  # auto-circuit: exp(logits) over a detached softmax denominator
        numerator = torch.exp(logits)
        vals = numerator / numerator.sum(dim=-1, keepdim=True).detach()
    else:
        raise InputError(f"unknown grad_function {grad_function!r}")
    answer, wrong = answer_values(vals, batch)
    return {"avg_diff": lambda: answer - wrong, "neg_avg_diff": lambda: wrong - answer,
            "avg_val": lambda: answer, "avg_val_wrong": lambda: wrong}[loss]()


def _mask_grads(masks: dict[str, torch.nn.Parameter], modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """The gradient of every destination mask after a backward pass (each mask feeds the output)."""
    grads: dict[str, torch.Tensor] = {}
    for name in modules:
        grad = masks[name].grad
        if grad is None:
            raise RuntimeError(f"patch mask {name!r} got no gradient: it does not feed the model's output")
        grads[name] = grad
    return grads


def attribute_edges(graph: EdgeGraph, batches: Sequence[PromptPairBatch], ablation: Ablation, *,
                    ig_steps: int, grad_function: str = "logit", loss: str = "avg_diff") -> torch.Tensor:
    """Edge scores by mask gradients (EAP, or auto-circuit's EAP-IG when ig_steps > 0).

    The same computation as auto-circuit's `mask_gradient_prune_scores` (clean input, masks
    interpolating between clean (0) and ablated (1) source values, all masks set together to
    m = 0, 1/s, ..., 1 -- s + 1 points including both ends; `ig_steps = 0` is plain EAP at m = 0,
    auto-circuit's `mask_val=0`), except that the result is a mean, not a sum: the gradient of the
    mean-over-pairs loss, averaged over IG points. Scores therefore do not depend on the batch
    size or the number of steps; auto-circuit's sum equals ours * (s + 1) * n_batches when all
    batches have one size. This joint interpolation of every mask is not per-node IG
    (auto-circuit issue #6). See SCORE_DEFINITION for the sign.

    Returns:
        float32 [n_edges] in the graph's edge order.
    """
    from auto_circuit.utils.graph_utils import patch_mode, set_all_masks, train_mask_mode

    if loss not in LOSS_OBJECTIVES:
        raise InputError(f"unknown loss {loss!r}; choose from {', '.join(LOSS_OBJECTIVES)}")
    pm = graph.pm
    points = [k / ig_steps for k in range(ig_steps + 1)] if ig_steps > 0 else [0.0]
    scale = 1.0 / (n_pairs(batches) * len(points))
    total = torch.zeros(graph.n_edges, dtype=torch.float64)
    with train_mask_mode(pm) as masks:
        for batch in progress(batches, "attribution", total=len(batches)):
            patch = ablation(batch).clone()  # a normal tensor: autograd cannot save inference tensors
            for m in points:
                # a fresh patch_mode per forward: it owns the buffer the sources write into in place
                with patch_mode(pm, patch):
                    set_all_masks(pm, m)
                    logits = pm(batch.clean)[pm.out_slice]
                    objective = _objective(logits.float(), batch, grad_function, loss)
                    (-objective.sum() * scale).backward()
                # accumulate in float64 (masks have the model's dtype, e.g. bfloat16 on a GPU)
                total += graph.flatten(_mask_grads(masks, graph.modules)).double()
                pm.zero_grad(set_to_none=True)
    set_all_masks(pm, 0.0)
    return total.float()


def edge_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Edge indices by |score| descending; ties keep the graph's edge order (deterministic)."""
    return torch.from_numpy(np.argsort(-np.abs(scores.double().numpy()), kind="stable"))


def top_k(ranking: torch.Tensor, counts: Sequence[int], n_edges: int) -> torch.Tensor:
    """bool [len(counts), n_edges]: row i keeps exactly the first counts[i] edges of `ranking`."""
    kept = torch.zeros(len(counts), n_edges, dtype=torch.bool)
    for i, k in enumerate(counts):
        kept[i, ranking[:k]] = True
    return kept
