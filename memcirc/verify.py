"""Verification of a circuit on held-out pairs (stage 4, verify_circuit).

The circuit is the top-k edges of the prune scores find_circuits wrote (k = its minimal circuit),
evaluated on the HELD-OUT split of the same pairs file, which attribution and the choice of k never
saw (the contrastive stage splits by document). Faithfulness is `memcirc.circuits`' one definition:
for every ablation type the baselines M(full) and M(empty) are recomputed on the held-out pairs under
that ablation. Random circuits of the same size (uniform edge subsets, seeded) give the chance level.
Prune scores are refused when they were computed for another model or another pairs file, or when
their shapes do not fit this model's graph.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.circuits import (
    FAITHFULNESS_DEFINITION,
    METRICS,
    PRUNE_SCORES,
    FaithfulnessEvaluator,
    build_graph,
    edge_ranking,
    load_prune_scores,
    log_spaced_counts,
    make_batches,
    model_key,
    n_pairs,
    top_k,
)
from memcirc.errors import InputError
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import load
from memcirc.models.arch import n_ctx
from memcirc.pairs import PAIRS_JSONL, pairs_input, read_pairs
from memcirc.stages.verify_circuit import VerifyConfig

log = logging.getLogger(__name__)

STAGE = "verify_circuit"
METHOD_VERSION = 1
FAITHFULNESS_PNG = "faithfulness_vs_edges.png"


def random_circuits(n_edges: int, k: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """bool [count, n_edges]: `count` circuits of exactly k edges drawn uniformly without replacement."""
    kept = torch.zeros(count, n_edges, dtype=torch.bool)
    for i in range(count):
        kept[i, torch.from_numpy(rng.choice(n_edges, size=k, replace=False))] = True
    return kept


def _sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pairs_folder(circuits_dir: Path, manifest: dict[str, Any]) -> Path:
    """The contrastive folder find_circuits read (its manifest's input), or, when that path is gone
    (the run folder was moved), the contrastive folder beside the circuits folder."""
    entry = next((i for i in manifest.get("inputs", []) if str(i.get("path", "")).endswith(PAIRS_JSONL)),
                 None)
    if entry is None:
        raise InputError(f"{circuits_dir}/manifest.json names no {PAIRS_JSONL} input; re-run find_circuits")
    recorded = Path(entry["path"]).parent
    beside = circuits_dir.parent / "contrastive"
    return recorded if recorded.is_dir() or not beside.is_dir() else beside


def check_provenance(metadata: dict[str, str], model_sha: str, model: dict[str, Any], pairs_sha: str,
                     pairs_path: Path, scores_path: Path) -> None:
    """InputError unless the prune scores were computed for this model and this pairs file."""
    if metadata.get("model_sha256") != model_sha:
        try:
            theirs = json.loads(metadata.get("model", "{}"))
        except json.JSONDecodeError:
            theirs = {}
        raise InputError(f"{scores_path} were computed for model {theirs.get('name_or_path')!r} (revision "
                         f"{theirs.get('revision')!r}, identity {str(metadata.get('model_sha256'))[:12]}); "
                         f"this run uses {model['name_or_path']!r} (revision {model['revision']!r}, identity "
                         f"{model_sha[:12]}): pass the same --model or re-run find_circuits")
    if metadata.get("pairs_sha256") != pairs_sha:
        raise InputError(f"{scores_path} were computed for pairs sha256 "
                         f"{str(metadata.get('pairs_sha256'))[:12]}; "
                         f"this run uses {pairs_path} with sha256 {pairs_sha[:12]}: re-run find_circuits "
                         "on these pairs")


def run(cfg: VerifyConfig) -> dict[str, Any]:
    """verify_circuit: held-out faithfulness per ablation against random circuits of the same size.

    Writes summary.json, faithfulness_vs_edges.png and manifest.json (last) into <output-dir>/verify/.
    """
    from memcirc.circuit_plots import faithfulness_vs_edges_figure
    torch.manual_seed(cfg.seed)
    circuits_dir = cfg.upstream_dir
    assert circuits_dir is not None
    circuits_manifest = read_manifest(circuits_dir, "circuits")
    circuits_summary = art.read_json(circuits_dir / art.SUMMARY_JSON)
    ccfg = circuits_manifest.get("config", {})
    if "minimal_edges" not in circuits_summary:
        raise InputError(f"{circuits_dir}/{art.SUMMARY_JSON} has no minimal_edges; re-run find_circuits")
    pairs_path, pairs_manifest, pairs_sha = pairs_input(_pairs_folder(circuits_dir, circuits_manifest))
    scores_path = circuits_dir / PRUNE_SCORES
    tensors, metadata = load_prune_scores(scores_path)
    loaded = load(cfg.model_spec())
    key = model_key(loaded)
    check_provenance(metadata, art.sha256_json(key), key, pairs_sha, pairs_path, scores_path)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    pairs = read_pairs(pairs_path, vocab_size=vocab, max_len=n_ctx(loaded.model), split="heldout",
                       limit=cfg.limit)
    if not pairs:
        raise InputError(f"{pairs_path} has no held-out pairs; rebuild the pairs with a held-out "
                         "fraction > 0")
    k_min = int(circuits_summary["minimal_edges"])
    metric = ccfg.get("faithfulness_metric", "logit_diff")
    weight_processing = ccfg.get("weight_processing", "none")
    ablations = list(dict.fromkeys([ccfg.get("ablation", "resample"), *cfg.ablations]))
    fingerprint = art.sha256_json({"method": METHOD_VERSION, "config": cfg.hashed_dict(),
                                   "circuits_run": circuits_manifest["run_id"],
                                   "prune_scores_sha256": art.sha256_file(scores_path),
                                   "pairs_sha256": pairs_sha, "model": key})
    stage = StageRun.for_config(cfg, fingerprint=fingerprint)
    if (done := stage.open(cfg.force)) is not None:
        return done

    graph = build_graph(loaded, weight_processing)
    graph.check_scores(tensors, f"prune scores in {scores_path}")
    n = graph.n_edges
    bad = [k for k in cfg.edge_counts if not 0 <= k <= n]
    if bad or k_min > n:
        raise InputError(f"edge counts {bad or [k_min]} are outside 0..{n} (this model's graph has {n} "
                         "edges)")
    extra = cfg.edge_counts or log_spaced_counts(n, int(ccfg.get("curve_points", 16)))
    counts = sorted({0, n, k_min, *extra})
    batches = make_batches(pairs, cfg.batch_size, loaded.device)
    evaluators = {a: FaithfulnessEvaluator(graph, batches, a, metric) for a in ablations}
    stage.start(cfg.force)
    stage.add_input(pairs_path, pairs_manifest, split="heldout", n_pairs=len(pairs))
    stage.add_input(scores_path, circuits_manifest)
    log.info("%d held-out pairs in %d batches; circuit of %d of %d edges; ablations %s; %d random circuits "
             "per edge count", len(pairs), len(batches), k_min, n, ", ".join(ablations), cfg.random_circuits)

    ranking = edge_ranking(graph.flatten(tensors))
    circuit = top_k(ranking, [k_min], n)[0]
    rng = np.random.default_rng(cfg.seed)
    random_counts = [k for k in counts if 0 < k < n]
    randoms = {k: random_circuits(n, k, cfg.random_circuits, rng) for k in random_counts}
    overlap_at_min = (randoms[k_min] & circuit).sum(dim=1).double() / k_min if k_min in randoms else None
    kept = torch.cat([top_k(ranking, counts, n), *randoms.values()]) if randoms else top_k(ranking, counts, n)

    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for name, ev in evaluators.items():
        f = ev.faithfulness(kept)
        f_circ = dict(zip(counts, f[:len(counts)].tolist(), strict=True))
        rand: dict[int, np.ndarray] = {}
        offset = len(counts)
        for k in random_counts:
            rand[k] = f[offset:offset + cfg.random_circuits]
            offset += cfg.random_circuits
        # at 0 and n edges every circuit is the same circuit
        rand_mean = {k: float(rand[k].mean()) if k in rand else f_circ[k] for k in counts}
        rand_sd = {k: _sd(rand[k]) if k in rand else 0.0 for k in counts}
        results[name] = {
            "faithfulness_heldout": f_circ[k_min],
            "random_faithfulness_mean": rand_mean[k_min], "random_faithfulness_sd": rand_sd[k_min],
            "random_faithfulness": rand[k_min].tolist() if k_min in rand else [],
            "random_overlap_mean": float(overlap_at_min.mean()) if overlap_at_min is not None else 1.0,
            "metric_full": ev.m_full, "metric_empty": ev.m_empty,
            "metric_circuit": ev.m_empty + f_circ[k_min] * (ev.m_full - ev.m_empty),
            "faithfulness_at_edges": [{"edges": k, "faithfulness": f_circ[k], "random_mean": rand_mean[k],
                                       "random_sd": rand_sd[k]} for k in counts],
        }
        curves[name] = {"edges": counts, "faithfulness": [f_circ[k] for k in counts],
                        "random_mean": [rand_mean[k] for k in counts],
                        "random_sd": [rand_sd[k] for k in counts]}
        log.info("%s ablation: held-out faithfulness %.4f at %d edges; random circuits %.4f ± %.4f",
                 name, f_circ[k_min], k_min, rand_mean[k_min], rand_sd[k_min])

    primary = ablations[0]
    summary = {
        "edges_total": n, "circuit_edges": k_min, "metric": metric, "split": "heldout",
        "n_pairs": n_pairs(batches), "n_batches": len(batches), "random_circuits": cfg.random_circuits,
        "discovery_faithfulness": circuits_summary.get("faithfulness"),
        "target": circuits_summary.get("target"),
        "ablation": primary,
        **{k: results[primary][k] for k in ("faithfulness_heldout", "random_faithfulness_mean",
                                            "random_faithfulness_sd", "random_overlap_mean")},
        "faithfulness_at_edges": results[primary]["faithfulness_at_edges"],
        "ablations": results,
    }
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    faithfulness_vs_edges_figure(curves, k_min, n, cfg.stage_dir / FAITHFULNESS_PNG,
                                 title=f"{loaded.spec.name_or_path}: {metric} on {len(pairs)} held-out "
                                       "pairs; "
                                       f"{cfg.random_circuits} random circuits per edge count")
    stage.finish({art.SUMMARY_JSON: None, FAITHFULNESS_PNG: None}, model=loaded.identity(), seed=cfg.seed,
                 circuits={"run_id": circuits_manifest["run_id"], "minimal_edges": k_min,
                           "config": ccfg},
                 metric={"name": metric, "definition": METRICS[metric],
                         "faithfulness": FAITHFULNESS_DEFINITION,
                         "random_circuits": "uniform k-edge subsets without replacement, "
                                            "numpy default_rng(seed)"})
    r = results[primary]
    print(f"verify ({cfg.stage_dir}): held-out faithfulness {r['faithfulness_heldout']:.3f} at {k_min} edges "
          f"({primary} ablation); random circuits {r['random_faithfulness_mean']:.3f} ± "
          f"{r['random_faithfulness_sd']:.3f} (overlap {r['random_overlap_mean']:.3f})")
    return summary
