"""Edge attribution, faithfulness and the minimal faithful circuit (find_circuits, verify_circuit,
training_dynamics).

- `graph`: auto-circuit's factorized edge graph (`build_graph`, `EdgeGraph`) and pair batches;
- `ablation`: what an ablated edge carries (`Ablation`);
- `attribution`: edge scores by mask gradients (`attribute_edges`), their ranking (`edge_ranking`, `top_k`);
- `faithfulness`: M and F of circuits (`FaithfulnessEvaluator`), the per-pair metric behind them
  (`faithfulness.circuit_metrics_per_pair`, not re-exported) and F's bootstrap interval over pairs
  (`FaithfulnessEvaluator.intervals`, with `memcirc.bootstrap`);
- `search`: the minimal circuit (`minimal_circuit`);
- `store`: prune scores on disk, circuit.json rows;
- `discover`: the whole discovery on one set of pairs (`discover_circuit`, `prune_scores_metadata`).

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

Why the loops are ours and not auto-circuit's `mask_gradient_prune_scores` / `run_circuits`
(they use auto-circuit's graph, masks, `patch_mode`, `train_mask_mode` and `src_ablations`, and
tests/test_circuits.py checks they give auto-circuit's numbers): auto-circuit's dataset-mean
ablations stack per-position means and need every batch to have one shape, its `PromptDataLoader`
drops the last partial batch, its scores are sums (so they scale with the number of batches and IG
steps), 1.0.1 has no `neg_avg_diff` / `avg_val_wrong` loss, and `run_circuits` keeps every edge tied
with the k-th score, so it cannot evaluate exactly k edges. Here pairs are grouped by length (no
padding, no attention masks: a batch only holds prompts of one length), every pair is used, and a
circuit of k edges is exactly the first k edges of one fixed ranking.

auto-circuit and TransformerLens take seconds to import, so they are imported inside the functions
that use them: importing this package (every stage config does, through the stage registry) does
not pay for them. The function `faithfulness.faithfulness` is not re-exported here: it would
shadow its module.
"""

from memcirc.circuits.ablation import ABLATION_NAMES, Ablation
from memcirc.circuits.attribution import LOSS_OBJECTIVES, SCORE_DEFINITION, attribute_edges, edge_ranking, top_k
from memcirc.circuits.discover import CircuitResult, attribution_method, discover_circuit, prune_scores_metadata
from memcirc.circuits.faithfulness import (
    FAITHFULNESS_DEFINITION,
    FAITHFULNESS_METRIC_DEFINITIONS,
    FaithfulnessEvaluator,
    circuit_metrics,
    circuit_outputs,
    metric_per_pair,
)
from memcirc.circuits.graph import EdgeGraph, build_graph, make_batches, n_pairs
from memcirc.circuits.search import MONOTONE_TOLERANCE, MinimalCircuit, log_spaced_counts, minimal_circuit
from memcirc.circuits.store import (
    CIRCUIT_JSON,
    PRUNE_SCORES,
    PRUNE_SCORES_FORMAT,
    RANKING,
    circuit_edges,
    load_prune_scores,
    save_prune_scores,
)

__all__ = [
    "ABLATION_NAMES", "CIRCUIT_JSON", "FAITHFULNESS_DEFINITION", "FAITHFULNESS_METRIC_DEFINITIONS",
    "LOSS_OBJECTIVES", "MONOTONE_TOLERANCE", "PRUNE_SCORES", "PRUNE_SCORES_FORMAT", "RANKING", "SCORE_DEFINITION",
    "Ablation", "CircuitResult", "EdgeGraph", "FaithfulnessEvaluator", "MinimalCircuit", "attribute_edges",
    "attribution_method", "build_graph", "circuit_edges", "circuit_metrics", "circuit_outputs", "discover_circuit",
    "edge_ranking", "load_prune_scores", "log_spaced_counts", "make_batches", "metric_per_pair",
    "minimal_circuit", "n_pairs", "prune_scores_metadata", "save_prune_scores", "top_k",
]
