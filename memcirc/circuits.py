"""Edge attribution, faithfulness and the minimal faithful circuit (stage 3, find_circuits).

The graph is auto-circuit's factorized residual graph of a TransformerLens model
(`patchable_model(factorized=True, slice_output="last_seq", separate_qkv=True, seq_len=None)`):
sources are the embedding ("Resid Start"), every attention head and every MLP; destinations are the
Q, K and V input of every head, every MLP input and the final residual ("Resid End"). An edge is
patched at every token position at once; only the last position's logits are read.

**One convention everywhere** (attribution, the faithfulness curve, the minimal search, verify):

* the model always runs on the *clean* prompt;
* an edge *in* the circuit carries its clean value; an edge *outside* the circuit carries the
  ablated value of its source: `resample` = the source's output on the corrupt prompt of the same
  pair (auto-circuit RESAMPLE), `zero` = 0 (auto-circuit ZERO), `mean` = the source's output
  averaged over the corrupt prompts of the evaluated split, position by position (auto-circuit
  TOKENWISE_MEAN_CORRUPT generalized to prompts of different lengths: position p averages the
  prompts that have a token at p). This is auto-circuit's TREE_PATCH without reverse.
* M(C) = mean over pairs of the faithfulness metric with circuit C; the full circuit (every edge)
  is the clean run, the empty circuit is every edge ablated (for resample: the corrupt run).
* faithfulness F(C) = (M(C) - M(empty)) / (M(full) - M(empty)), with M(full) and M(empty)
  recomputed on the same pairs under the same ablation (`faithfulness`, `FaithfulnessEvaluator`).

Why the loops below are ours and not auto-circuit's `mask_gradient_prune_scores` / `run_circuits`
(they use auto-circuit's graph, masks, `patch_mode`, `train_mask_mode` and `src_ablations`, and
tests/test_circuits.py checks they give auto-circuit's numbers): auto-circuit's dataset-mean
ablations stack per-position means and need every batch to have one shape, its `PromptDataLoader`
drops the last partial batch, its scores are sums (so they scale with the number of batches and IG
steps), 1.0.1 has no `neg_avg_diff` / `avg_val_wrong` loss, and `run_circuits` keeps every edge tied
with the k-th score, so it cannot evaluate exactly k edges. Here pairs are grouped by length (no
padding, no attention masks: a batch only holds prompts of one length), every pair is used, and a
circuit of k edges is exactly the first k edges of one fixed ranking.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.manifest import StageRun
from memcirc.models import LoadedModel, load
from memcirc.models.arch import n_ctx
from memcirc.pairs import Pair, pairs_input, read_pairs
from memcirc.stages.find_circuits import CircuitsConfig

if TYPE_CHECKING:  # auto-circuit and TransformerLens take seconds to import: imported lazily
    from auto_circuit.data import PromptPairBatch
    from auto_circuit.utils.patchable_model import PatchableModel

log = logging.getLogger(__name__)

STAGE = "find_circuits"
METHOD_VERSION = 1
PRUNE_SCORES = "prune_scores.safetensors"
CIRCUIT_JSON = "circuit.json"
CURVE_PNG = "faithfulness_curve.png"
CIRCUIT_PNG = "circuit.png"
ABLATION_NAMES = {"resample": "RESAMPLE", "zero": "ZERO", "mean": "TOKENWISE_MEAN_CORRUPT (any length)"}
METRICS = {
    "logit_diff": "logit[answer] - logit[wrong] at the last prompt position",
    "answer_logit": "logit[answer] at the last prompt position",
    "wrong_logit": "logit[wrong] at the last prompt position",
    "answer_logprob": "log_softmax(logits)[answer] at the last prompt position",
}
LOSSES = {
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
FAITHFULNESS_DEFINITION = (
    "F(C) = (M(C) - M(empty)) / (M(full) - M(empty)); M = mean over pairs of the metric; clean input, "
    "edges outside C ablated; M(full) and M(empty) recomputed on the same pairs under the same ablation"
)
MONOTONE_TOLERANCE = 1e-5  # a drop of F smaller than this between larger circuits is float noise
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# -- pairs -------------------------------------------------------------------------------------

def make_batches(pairs: Sequence[Pair], batch_size: int, device: torch.device | str) -> list[PromptPairBatch]:
    """auto-circuit batches of at most `batch_size` pairs, each holding prompts of ONE length.

    Pairs are grouped by prompt length (in file order within a length), so no prompt is padded and
    no attention mask is needed; every pair is used (no `drop_last`). Batch keys are 0, 1, 2, ...
    """
    from auto_circuit.data import PromptPairBatch

    by_len: dict[int, list[Pair]] = {}
    for p in pairs:
        by_len.setdefault(len(p.clean), []).append(p)
    batches = []
    for length in sorted(by_len):
        group = by_len[length]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            clean = torch.tensor([p.clean for p in chunk], dtype=torch.long, device=device)
            corrupt = torch.tensor([p.corrupt for p in chunk], dtype=torch.long, device=device)
            answers = torch.tensor([[p.answer] for p in chunk], dtype=torch.long, device=device)
            wrong = torch.tensor([[p.wrong] for p in chunk], dtype=torch.long, device=device)
            diverge = int((clean != corrupt).int().argmax(dim=1).min())
            batches.append(PromptPairBatch(len(batches), diverge, clean, corrupt, answers, wrong))
    return batches


def n_pairs(batches: Sequence[PromptPairBatch]) -> int:
    return sum(int(b.clean.shape[0]) for b in batches)


# -- the edge graph ----------------------------------------------------------------------------

@dataclass
class EdgeGraph:
    """auto-circuit's patchable model plus one fixed order of its edges.

    Edge i of the flat order is element `i - offsets[j]` (row-major) of the mask of destination
    module `modules[j]`; modules are ordered by (layer, name). Prune scores, rankings and circuits
    are flat vectors in this order.
    """

    pm: PatchableModel
    modules: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    edge_names: list[str]
    edge_src: list[str]
    edge_dest: list[str]
    edge_layers: list[tuple[int, int]]
    wrappers: dict[str, Any] = field(repr=False)

    @property
    def n_edges(self) -> int:
        return len(self.edge_names)

    @property
    def device(self) -> torch.device:
        return next(iter(self.wrappers.values())).patch_mask.device

    def flatten(self, per_module: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([per_module[m].detach().reshape(-1).float().cpu() for m in self.modules])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: flat[o:o + math.prod(s)].reshape(s).clone()
                for m, s, o in zip(self.modules, self.shapes, self.offsets, strict=True)}

    def check_scores(self, scores: dict[str, torch.Tensor], what: str) -> None:
        """InputError unless `scores` has exactly this graph's modules and mask shapes."""
        expected = dict(zip(self.modules, self.shapes, strict=True))
        got = {k: tuple(v.shape) for k, v in scores.items()}
        if got != expected:
            wrong = sorted(set(expected) ^ set(got)) or [m for m in self.modules if got[m] != expected[m]]
            detail = ", ".join(f"{m}: {got.get(m)} vs {expected.get(m)}" for m in wrong[:3])
            raise InputError(f"{what} do not fit this model's graph ({self.n_edges} edges; {detail}): they "
                             "were computed for another model; re-run find_circuits")

    def set_ablated(self, ablated: torch.Tensor) -> None:
        """Set every mask: 1.0 = the edge carries its ablated value, 0.0 = its clean value."""
        with torch.no_grad():
            for m, s, o in zip(self.modules, self.shapes, self.offsets, strict=True):
                mask = self.wrappers[m].patch_mask
                mask.data.copy_(ablated[o:o + math.prod(s)].reshape(s).to(mask.device, mask.dtype))


def build_graph(loaded: LoadedModel, weight_processing: str = "none") -> EdgeGraph:
    """Convert to a HookedTransformer offline and wrap it in auto-circuit's factorized graph."""
    from auto_circuit.utils.graph_utils import patchable_model

    from memcirc.models.tl import to_hooked_transformer

    tl = to_hooked_transformer(loaded, weight_processing)
    # Prompts are never padded. TL infers an attention mask from pad ids when the tokenizer pads on
    # the left, which would mask genuine pad-id tokens (pad = eos = bos in GPT-NeoX and GPT-Neo).
    if tl.tokenizer is not None:
        tl.tokenizer.padding_side = "right"
    pm = patchable_model(tl, factorized=True, slice_output="last_seq", seq_len=None, separate_qkv=True,
                         device=loaded.device)
    wrappers = {w.module_name: w for w in pm.dest_wrappers}
    layer_of: dict[str, int] = {}
    for d in pm.dests:
        layer_of[d.module_name] = min(layer_of.get(d.module_name, d.layer), d.layer)
    modules = sorted(wrappers, key=lambda m: (layer_of[m], m))
    for m in modules:
        if not _SAFE_NAME.match(m):
            raise InputError(f"unexpected destination module name {m!r} in the auto-circuit graph")
    shapes = [tuple(wrappers[m].patch_mask.shape) for m in modules]
    offsets = list(np.cumsum([0] + [math.prod(s) for s in shapes[:-1]]).tolist())
    n = sum(math.prod(s) for s in shapes)
    names: list[str | None] = [None] * n
    src: list[str] = [""] * n
    dest: list[str] = [""] * n
    layers: list[tuple[int, int]] = [(0, 0)] * n
    where = {m: (o, s) for m, o, s in zip(modules, offsets, shapes, strict=True)}
    for edge in pm.edges:
        o, s = where[edge.dest.module_name]
        i = o + int(np.ravel_multi_index(edge.patch_idx, s))
        names[i], src[i], dest[i] = edge.name, edge.src.name, edge.dest.name
        layers[i] = (edge.src.layer, edge.dest.layer)
    if any(x is None for x in names) or len(pm.edges) != n:
        raise RuntimeError("auto-circuit's edges do not match its masks")
    return EdgeGraph(pm, modules, shapes, offsets, names, src, dest, layers, wrappers)  # type: ignore[arg-type]


# -- ablations ---------------------------------------------------------------------------------

class Ablation:
    """The source outputs an ablated edge carries, per batch: `ablation(batch)` -> [srcs, b, seq, d].

    Computed lazily per batch (the whole dataset's activations need not fit in memory) and cached
    while the cache stays under `cache_bytes`.
    """

    def __init__(self, graph: EdgeGraph, batches: Sequence[PromptPairBatch], kind: str,
                 cache_bytes: int = 1 << 30) -> None:
        if kind not in ABLATION_NAMES:
            raise InputError(f"ablation {kind!r} is not one of {', '.join(ABLATION_NAMES)}")
        self.graph, self.kind, self.cache_bytes = graph, kind, cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached = 0
        self._mean: torch.Tensor | None = self._positionwise_mean(batches) if kind == "mean" else None

    def _src_outs(self, tokens: torch.Tensor) -> torch.Tensor:
        from auto_circuit.types import AblationType
        from auto_circuit.utils.ablation_activations import src_ablations

        return src_ablations(self.graph.pm, tokens, AblationType.RESAMPLE)

    def _positionwise_mean(self, batches: Sequence[PromptPairBatch]) -> torch.Tensor:
        total: torch.Tensor | None = None
        count = torch.zeros(max(int(b.corrupt.shape[1]) for b in batches), dtype=torch.float64)
        for batch in batches:
            outs = self._src_outs(batch.corrupt).double().sum(dim=1)  # [srcs, seq, d]
            if total is None:
                total = torch.zeros(outs.shape[0], len(count), *outs.shape[2:], dtype=torch.float64,
                                    device=outs.device)
            total[:, :outs.shape[1]] += outs
            count[:outs.shape[1]] += batch.corrupt.shape[0]
        assert total is not None
        return total / count.to(total.device).view(1, -1, *([1] * (total.ndim - 2)))

    def __call__(self, batch: PromptPairBatch) -> torch.Tensor:
        if batch.key in self._cache:
            return self._cache[batch.key]
        if self.kind == "resample":
            outs = self._src_outs(batch.corrupt)
        elif self.kind == "zero":
            from auto_circuit.types import AblationType
            from auto_circuit.utils.ablation_activations import src_ablations

            outs = src_ablations(self.graph.pm, batch.clean, AblationType.ZERO)
        else:
            assert self._mean is not None
            b, s = batch.clean.shape
            mean = self._mean[:, :s].unsqueeze(1)
            dtype = next(self.graph.pm.parameters()).dtype
            outs = mean.expand(mean.shape[0], b, *mean.shape[2:]).to(dtype).contiguous()
        size = outs.numel() * outs.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[batch.key] = outs
            self._cached += size
        return outs


# -- metrics and circuit evaluation ------------------------------------------------------------

def metric_per_pair(logits: torch.Tensor, batch: PromptPairBatch, metric: str) -> torch.Tensor:
    """The faithfulness metric of each pair from last-position logits [b, vocab] (float32)."""
    logits = logits.float()
    answer = logits.gather(-1, batch.answers).squeeze(-1)
    wrong = logits.gather(-1, batch.wrong_answers).squeeze(-1)
    if metric == "logit_diff":
        return answer - wrong
    if metric == "answer_logit":
        return answer
    if metric == "wrong_logit":
        return wrong
    if metric == "answer_logprob":
        return torch.log_softmax(logits, dim=-1).gather(-1, batch.answers).squeeze(-1)
    raise InputError(f"faithfulness metric {metric!r} is not one of {', '.join(METRICS)}")


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


def edge_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Edge indices by |score| descending; ties keep the graph's edge order (deterministic)."""
    return torch.from_numpy(np.argsort(-np.abs(scores.double().numpy()), kind="stable"))


def top_k(ranking: torch.Tensor, counts: Sequence[int], n_edges: int) -> torch.Tensor:
    """bool [len(counts), n_edges]: row i keeps exactly the first counts[i] edges of `ranking`."""
    kept = torch.zeros(len(counts), n_edges, dtype=torch.bool)
    for i, k in enumerate(counts):
        kept[i, ranking[:k]] = True
    return kept


class FaithfulnessEvaluator:
    """M and F of circuits on one set of pairs under one ablation; the baselines are computed once.

    M(full) and M(empty) go through the same code path as any circuit (all edges kept / none kept).
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


# -- attribution -------------------------------------------------------------------------------

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
    answer = vals.gather(-1, batch.answers).squeeze(-1)
    wrong = vals.gather(-1, batch.wrong_answers).squeeze(-1)
    return {"avg_diff": lambda: answer - wrong, "neg_avg_diff": lambda: wrong - answer,
            "avg_val": lambda: answer, "avg_val_wrong": lambda: wrong}[loss]()


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

    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
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
                total += graph.flatten({name: masks[name].grad for name in graph.modules}).double()
                pm.zero_grad(set_to_none=True)
    set_all_masks(pm, 0.0)
    return total.float()


# -- the minimal circuit -----------------------------------------------------------------------

def log_spaced_counts(n_edges: int, points: int) -> list[int]:
    """0, `points` log-spaced edge counts in [1, n_edges] (rounded, deduplicated), and n_edges."""
    inner = np.unique(np.round(np.geomspace(1, n_edges, points)).astype(int)) if n_edges else []
    return sorted({0, n_edges, *map(int, inner)})


@dataclass
class MinimalCircuit:
    """The outcome of `minimal_circuit`; `evaluated` holds every (k, F) computed, sorted by k."""

    minimal_edges: int
    faithfulness: float
    target: float
    curve: list[tuple[int, float]]
    probes: list[tuple[int, float]]
    bracket: tuple[int, int] | None
    evaluated: list[tuple[int, float]]
    non_monotone_steps: list[dict[str, float]]

    @property
    def monotone(self) -> bool:
        return not self.non_monotone_steps

    @property
    def monotone_in_bracket(self) -> bool:
        if self.bracket is None:
            return True
        lo, hi = self.bracket
        return not any(lo <= s["from_edges"] and s["to_edges"] <= hi for s in self.non_monotone_steps)


def minimal_circuit(faithfulness_at: Callable[[list[int]], Sequence[float]], n_edges: int, target: float,
                    curve_points: int) -> MinimalCircuit:
    """The smallest k whose top-k circuit reaches `target` faithfulness, to the exact edge.

    1. F at 0, `curve_points` log-spaced counts and n_edges (one pass over the pairs).
    2. The first curve point k_hi with F >= target and the curve point k_lo before it bracket the
       answer; bisection inside (k_lo, k_hi] finds k with F(k) >= target and F(k - 1) < target.
    3. Monotonicity is checked, not assumed: every evaluated (k, F), curve and probes, is sorted by
       k and each drop of F larger than MONOTONE_TOLERANCE is reported. When F is monotone the
       result equals a scan over every k; when it is not, a k outside the probed points could
       also reach the target, and `non_monotone_steps` says where the assumption broke.

    Args:
        faithfulness_at: F for a list of edge counts (top-k circuits of one ranking).
    """
    counts = log_spaced_counts(n_edges, curve_points)
    curve = list(zip(counts, map(float, faithfulness_at(counts)), strict=True))
    known = dict(curve)
    probes: list[tuple[int, float]] = []
    passing = [k for k, f in curve if f >= target]
    if not passing:  # only when target > F(all) = 1
        raise InputError(f"no circuit reaches faithfulness {target} (the full circuit has 1.0); "
                         "lower --target")
    hi = passing[0]
    bracket = None
    if hi > 0:
        lo = max(k for k, _ in curve if k < hi)
        bracket = (lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            f = float(faithfulness_at([mid])[0])
            probes.append((mid, f))
            known[mid] = f
            if f >= target:
                hi = mid
            else:
                lo = mid
    evaluated = sorted(known.items())
    steps = [{"from_edges": a, "to_edges": b, "from_faithfulness": fa, "to_faithfulness": fb}
             for (a, fa), (b, fb) in zip(evaluated, evaluated[1:], strict=False)
             if fb < fa - MONOTONE_TOLERANCE]
    return MinimalCircuit(hi, known[hi], target, curve, probes, bracket, evaluated, steps)


# -- model identity ----------------------------------------------------------------------------

IDENTITY_KEYS = ("name_or_path", "revision", "commit_hash", "gguf_file", "model_type")


def model_key(loaded: LoadedModel) -> dict[str, Any]:
    """What identifies the weights (not where or in which dtype they run)."""
    identity = loaded.identity()
    return {**{k: identity[k] for k in IDENTITY_KEYS}, "n_params": identity["n_params"]}


def model_key_sha(loaded: LoadedModel) -> str:
    return art.sha256_json(model_key(loaded))


def check_pairs_model(recorded: dict[str, Any] | None, loaded: LoadedModel, where: Path) -> str | None:
    """InputError unless the pairs' manifest names the model this run loads.

    Returns a warning to log once the stage has started (a dtype that differs from the pairs'), or None.
    """
    recorded = recorded or {}
    here = loaded.identity()
    keys = [k for k in IDENTITY_KEYS if k != "commit_hash"]
    if recorded.get("commit_hash") and here.get("commit_hash"):
        keys.append("commit_hash")
    if any(recorded.get(k) != here.get(k) for k in keys):
        raise InputError(f"the pairs in {where} were built with model {recorded.get('name_or_path')!r} "
                         f"(revision {recorded.get('revision')!r}); this run loads {here['name_or_path']!r} "
                         f"(revision {here['revision']!r}): pass --model {recorded.get('name_or_path')} or "
                         "rebuild the pairs with this model")
    if recorded.get("dtype") and recorded["dtype"] != here["dtype"]:
        return (f"the pairs were built in {recorded['dtype']}, this run uses {here['dtype']}: memorized "
                "status can differ between precisions")
    return None


# -- stage outputs -----------------------------------------------------------------------------

def save_prune_scores(path: Path, graph: EdgeGraph, scores: torch.Tensor, metadata: dict[str, Any]) -> None:
    """One float32 tensor per destination module (its auto-circuit module name); metadata as strings."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    art.save_tensors(path, graph.unflatten(scores), metadata=meta)


def load_prune_scores(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a prune_scores.safetensors; InputError if missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise InputError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from None


def circuit_edges(graph: EdgeGraph, scores: torch.Tensor, ranking: torch.Tensor,
                  k: int) -> list[dict[str, Any]]:
    """The top-k edges of `ranking` as JSON rows (rank, names, score, module, index, layers)."""
    modules = np.searchsorted(np.asarray(graph.offsets), np.arange(graph.n_edges), side="right") - 1
    rows = []
    for rank, i in enumerate(ranking[:k].tolist(), 1):
        m = int(modules[i])
        rows.append({"rank": rank, "edge": graph.edge_names[i], "src": graph.edge_src[i],
                     "dest": graph.edge_dest[i], "score": float(scores[i]), "module": graph.modules[m],
                     "index": i - graph.offsets[m], "src_layer": graph.edge_layers[i][0],
                     "dest_layer": graph.edge_layers[i][1]})
    return rows


def _curve_rows(points: Sequence[tuple[int, float]],
                evaluator: FaithfulnessEvaluator) -> list[dict[str, float]]:
    span = evaluator.m_full - evaluator.m_empty
    return [{"edges": k, "faithfulness": f, "metric": evaluator.m_empty + f * span} for k, f in points]


def run(cfg: CircuitsConfig) -> dict[str, Any]:
    """find_circuits: attribute edges on the discovery split, find the minimal faithful circuit.

    Writes prune_scores.safetensors, circuit.json, summary.json, faithfulness_curve.png,
    circuit.png and manifest.json (last) into <output-dir>/circuits/. Returns the summary.
    """
    from memcirc.circuit_plots import circuit_figure, faithfulness_curve_figure
    torch.manual_seed(cfg.seed)
    if not 0.0 < cfg.target <= 1.0:
        raise InputError(f"config key 'target' must be in (0, 1], got {cfg.target}")
    upstream = cfg.upstream_dir
    assert upstream is not None
    pairs_path, upstream_manifest, pairs_sha = pairs_input(upstream)
    loaded = load(cfg.model_spec())
    dtype_warning = check_pairs_model(upstream_manifest.get("model"), loaded, upstream)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    pairs = read_pairs(pairs_path, vocab_size=vocab, max_len=n_ctx(loaded.model), split="discovery",
                       limit=cfg.limit)
    if not pairs:
        raise InputError(f"{pairs_path} has no discovery pairs; re-run contrastive_dataset with more data")
    key = model_key(loaded)
    fingerprint = art.sha256_json({"method": METHOD_VERSION, "config": cfg.hashed_dict(),
                                   "pairs_sha256": pairs_sha, "model": key})
    stage = StageRun.for_config(cfg, fingerprint=fingerprint)
    if (done := stage.open(cfg.force)) is not None:
        return done
    graph = build_graph(loaded, cfg.weight_processing)
    batches = make_batches(pairs, cfg.batch_size, loaded.device)
    evaluator = FaithfulnessEvaluator(graph, batches, cfg.ablation, cfg.faithfulness_metric)
    stage.start(cfg.force)
    if dtype_warning:
        log.warning(dtype_warning)
    if loaded.dtype != torch.float32:
        log.warning("attributing in %s: edge scores and faithfulness are much noisier than in float32 (on a "
                    "GPT-Neo-125M-shaped model the minimal circuit came out 6x larger); --dtype float32 is "
                    "recommended", str(loaded.dtype).replace("torch.", ""))
    stage.add_input(pairs_path.resolve(), upstream_manifest, split="discovery", n_pairs=len(pairs))
    log.info("%d discovery pairs in %d batches (grouped by length, no padding); %d edges; %s = %.4g with "
             "every edge, %.4g with none (%s ablation)", len(pairs), len(batches), graph.n_edges,
             cfg.faithfulness_metric, evaluator.m_full, evaluator.m_empty, cfg.ablation)

    scores = attribute_edges(graph, batches, evaluator.ablation, ig_steps=cfg.ig_steps,
                             grad_function=cfg.grad_function, loss=cfg.loss)
    ranking = edge_ranking(scores)
    search = minimal_circuit(lambda ks: evaluator.at_counts(ranking, ks), graph.n_edges, cfg.target,
                             cfg.curve_points)
    if not search.monotone:
        log.warning("faithfulness drops as edges are added at %d evaluated step(s) (first: %s); the minimal "
                    "circuit is the target crossing found by bisection in the bracket %s%s",
                    len(search.non_monotone_steps), search.non_monotone_steps[0], search.bracket,
                    "" if search.monotone_in_bracket else ", which holds such a drop too: a smaller k "
                    "outside the probed points may also reach the target")
    log.info("minimal circuit: %d of %d edges reach faithfulness %.4f (target %.2f)", search.minimal_edges,
             graph.n_edges, search.faithfulness, cfg.target)

    method = {"ig_steps": cfg.ig_steps, "ig_points": cfg.ig_steps + 1 if cfg.ig_steps else 1,
              "ig_variant": "joint interpolation of all edge masks (auto-circuit; not per-node IG)",
              "grad_function": cfg.grad_function, "loss": cfg.loss, "loss_objective": LOSSES[cfg.loss],
              "ablation": cfg.ablation, "ablation_auto_circuit": ABLATION_NAMES[cfg.ablation],
              "patch": "clean input; edges outside the circuit ablated (auto-circuit TREE_PATCH)",
              "weight_processing": cfg.weight_processing, "graph": "factorized, separate_qkv, last_seq, "
              "all positions", "normalization": "mean over pairs and IG points",
              "score_definition": SCORE_DEFINITION}
    identity_sha = art.sha256_json(key)
    save_prune_scores(cfg.stage_dir / PRUNE_SCORES, graph, scores, {
        "format": "memcirc prune scores v1", "model_sha256": identity_sha, "model": key,
        "pairs_sha256": pairs_sha, "pairs_split": "discovery", "n_pairs": len(pairs),
        "limit": cfg.limit, "method": method, "modules": graph.modules, "n_edges": graph.n_edges})
    edges = circuit_edges(graph, scores, ranking, search.minimal_edges)
    art.write_json(cfg.stage_dir / CIRCUIT_JSON, {
        "edges_total": graph.n_edges, "edges": len(edges), "faithfulness": search.faithfulness,
        "ranking": "|score| descending, ties in the graph's edge order", "score_definition": SCORE_DEFINITION,
        "circuit": edges})
    summary = {
        "edges_total": graph.n_edges, "minimal_edges": search.minimal_edges,
        "edge_fraction": search.minimal_edges / graph.n_edges, "faithfulness": search.faithfulness,
        "target": cfg.target, "split": "discovery", "n_pairs": len(pairs), "n_batches": len(batches),
        "metric": cfg.faithfulness_metric, "ablation": cfg.ablation, "metric_full": evaluator.m_full,
        "metric_empty": evaluator.m_empty, "monotone": search.monotone,
        "monotone_in_bracket": search.monotone_in_bracket, "non_monotone_steps": search.non_monotone_steps,
        "bracket": list(search.bracket) if search.bracket else None,
        "curve": _curve_rows(search.curve, evaluator), "bisection": _curve_rows(search.probes, evaluator),
        "score_abs_sum": float(scores.abs().sum()), "scores_nonzero": int((scores != 0).sum()),
    }
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    faithfulness_curve_figure(search, cfg.stage_dir / CURVE_PNG,
                              title=f"{loaded.spec.name_or_path}: {cfg.faithfulness_metric}, {cfg.ablation} "
                                    f"ablation, {len(pairs)} discovery pairs")
    circuit_figure(edges, graph, cfg.stage_dir / CIRCUIT_PNG,
                   title=f"minimal circuit: {search.minimal_edges} of {graph.n_edges} edges, "
                         f"F = {search.faithfulness:.3f}")
    stage.finish({PRUNE_SCORES: None, CIRCUIT_JSON: len(edges), art.SUMMARY_JSON: None, CURVE_PNG: None,
                  CIRCUIT_PNG: None}, model=loaded.identity(), seed=cfg.seed, method=method,
                 metric={"name": cfg.faithfulness_metric, "definition": METRICS[cfg.faithfulness_metric],
                         "faithfulness": FAITHFULNESS_DEFINITION})
    print(f"circuits ({cfg.stage_dir}): {search.minimal_edges} of {graph.n_edges} edges reach faithfulness "
          f"{search.faithfulness:.3f} (target {cfg.target}) on {len(pairs)} discovery pairs; "
          f"monotone: {search.monotone}")
    return summary
