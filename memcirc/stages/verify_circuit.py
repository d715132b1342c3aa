"""The verify_circuit stage: the circuit of find_circuits on held-out pairs, against random circuits.

The circuit is the top-k edges of the prune scores find_circuits wrote (k = its minimal circuit),
evaluated on the HELD-OUT split of the same pairs file, which attribution and the choice of k never
saw (the contrastive stage splits by document). Faithfulness is `memcirc.circuits`' one definition:
for every ablation type the baselines M(full) and M(empty) are recomputed on the held-out pairs under
that ablation. Random circuits of the same size (uniform edge subsets, seeded) give the chance level.
Every F comes with a percentile bootstrap interval over the held-out pairs (`memcirc.bootstrap`;
--bootstrap-resamples, --interval-level); the random baseline's is the interval of their MEAN F with
the random circuits held fixed (`RANDOM_CI_DEFINITION`).
Prune scores are refused when they were computed for another model or another pairs file, or when
their shapes do not fit this model's graph. Writes summary.json, faithfulness_vs_edges.png and
manifest.json (last) into <output-dir>/verify/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.bootstrap import PairBootstrap, as_interval, bootstrap_info, ci_text, pair_bootstrap
from memcirc.circuits import (
    FAITHFULNESS_DEFINITION,
    FAITHFULNESS_METRIC_DEFINITIONS,
    PRUNE_SCORES,
    FaithfulnessEvaluator,
    build_graph,
    edge_ranking,
    load_prune_scores,
    log_spaced_counts,
    make_batches,
    n_pairs,
    top_k,
)
from memcirc.circuits.figures import faithfulness_vs_edges_figure
from memcirc.errors import InputError
from memcirc.logs import show
from memcirc.manifest import StageRun, output_sha256, read_manifest, read_output
from memcirc.models import LoadedModel, load
from memcirc.models.arch import embedding_rows, n_ctx
from memcirc.models.identity import check_same_model, weights_key
from memcirc.models.preflight import check_model
from memcirc.option_groups import CircuitOptions
from memcirc.pairs import PAIRS_JSONL, pairs_input, read_pairs
from memcirc.plots import figure_source
from memcirc.stages.configs.verify_circuit import VerifyConfig
from memcirc.stages.registry import STAGES
from memcirc.tasks.source import task_performance

log = logging.getLogger(__name__)

METHOD_VERSION = 1
FAITHFULNESS_PNG = "faithfulness_vs_edges.png"
RANDOM_CI_DEFINITION = ("interval of the MEAN faithfulness over the random circuits of each size: the random "
                        "circuits are held fixed and the pairs resampled (the same resamples as the circuit's "
                        "interval); not the spread between random circuits (random_faithfulness_sd)")


def run(cfg: VerifyConfig) -> dict[str, Any]:
    """verify_circuit: held-out faithfulness per ablation against random circuits of the same size.

    Writes summary.json, faithfulness_vs_edges.png and manifest.json (last) into <output-dir>/verify/.
    """
    torch.manual_seed(cfg.seed)
    check_model(cfg.model_spec(), needs_tl=True, what="verify_circuit")  # config.json alone, before any work
    circuits_dir = cfg.upstream_dir
    assert circuits_dir is not None
    circuits_manifest = read_manifest(circuits_dir, "circuits")
    circuits_summary = art.read_json(read_output(circuits_dir, art.SUMMARY_JSON, "circuits", circuits_manifest))
    if "minimal_edges" not in circuits_summary:
        raise InputError(f"{circuits_dir}/{art.SUMMARY_JSON} has no minimal_edges; re-run find_circuits")
    found_with = recorded_circuit_options(circuits_manifest, circuits_dir)
    task = circuits_manifest.get("config", {}).get("task")
    if task != cfg.task:
        def of(t: str | None) -> str:
            return f"task {t}" if t else "the memorization pairs"
        raise InputError(f"{circuits_dir} holds the circuit of {of(task)}; verify it with "
                         f"{f'--task {task}' if task else 'no --task'} (or point --input-dir at the circuits "
                         f"folder of {of(cfg.task)})")
    pairs_path, pairs_manifest, pairs_sha = pairs_input(_pairs_folder(circuits_dir, circuits_manifest))
    scores_path = read_output(circuits_dir, PRUNE_SCORES, "circuits", circuits_manifest)
    tensors, metadata = load_prune_scores(scores_path)
    loaded = load(cfg.model_spec())
    check_provenance(metadata, loaded, pairs_sha, pairs_path, scores_path)
    vocab = embedding_rows(loaded.model)
    pairs = read_pairs(pairs_path, vocab_size=vocab, max_len=n_ctx(loaded.model), split="heldout",
                       limit=cfg.limit)
    if not pairs:
        raise InputError(f"{pairs_path} has no held-out pairs; rebuild the pairs with a held-out fraction > 0")
    k_min = int(circuits_summary["minimal_edges"])
    metric = found_with.faithfulness_metric
    ablations = list(dict.fromkeys([found_with.ablation, *cfg.ablations]))
    # checked before open, which releases the held-back log lines: bad scores get one error line only
    graph = build_graph(loaded, found_with.weight_processing)
    graph.check_scores(tensors, f"prune scores in {scores_path}")
    n = graph.n_edges
    bad = [k for k in cfg.edge_counts if not 0 <= k <= n]
    if bad or k_min > n:
        raise InputError(f"edge counts {bad or [k_min]} are outside 0..{n} (this model's graph has {n} edges)")
    stage = StageRun.for_config(cfg, fingerprint=art.sha256_json({
        "method": METHOD_VERSION, "config": cfg.hashed_dict(), "circuits_run": circuits_manifest["run_id"],
        "prune_scores_sha256": output_sha256(circuits_manifest, PRUNE_SCORES), "pairs_sha256": pairs_sha,
        "model": weights_key(loaded)}))
    if (done := stage.open(cfg.force)) is not None:
        return done
    counts = sorted({0, n, k_min, *(cfg.edge_counts or log_spaced_counts(n, found_with.curve_points))})
    batches = make_batches(pairs, cfg.batch_size, loaded.device)
    evaluators = {a: FaithfulnessEvaluator(graph, batches, a, metric) for a in ablations}
    stage.start(cfg.force)
    stage.add_input(pairs_path, pairs_manifest, pairs_sha, split="heldout", n_pairs=len(pairs))
    stage.add_input(scores_path, circuits_manifest, output_sha256(circuits_manifest, PRUNE_SCORES))
    log.info("%d held-out pairs in %d batches; circuit of %d of %d edges; ablations %s; %d random circuits "
             "per edge count", len(pairs), len(batches), k_min, n, ", ".join(ablations), cfg.random_circuits)

    ranking = edge_ranking(graph.flatten(tensors))
    rng = np.random.default_rng(cfg.seed)
    randoms = {k: random_circuits(n, k, cfg.random_circuits, rng) for k in counts if 0 < k < n}
    kept, overlap = circuits_to_evaluate(ranking, counts, k_min, randoms)
    # one set of pair resamples for every ablation and circuit: their intervals are paired
    boot = pair_bootstrap(len(pairs), cfg.bootstrap_resamples, cfg.interval_level, cfg.seed)
    results = {name: heldout_result(ev, kept, counts, k_min, randoms, overlap, boot)
               for name, ev in evaluators.items()}
    primary = ablations[0]
    summary = {
        "edges_total": n, "circuit_edges": k_min, "metric": metric, "split": "heldout",
        "n_pairs": n_pairs(batches), "n_batches": len(batches), "random_circuits": cfg.random_circuits,
        "discovery_faithfulness": circuits_summary.get("faithfulness"),
        "discovery_faithfulness_ci": circuits_summary.get("faithfulness_ci"),
        "target": circuits_summary.get("target"),
        "ablation": primary,
        **{k: results[primary][k] for k in ("faithfulness_heldout", "faithfulness_heldout_ci",
                                            "random_faithfulness_mean", "random_faithfulness_ci",
                                            "random_faithfulness_sd", "random_overlap_mean")},
        "faithfulness_at_edges": results[primary]["faithfulness_at_edges"],
        "ablations": results,
        "bootstrap": {**bootstrap_info(boot, len(pairs), cfg.bootstrap_resamples, cfg.interval_level, cfg.seed),
                      "random_faithfulness_ci": RANDOM_CI_DEFINITION},
    }
    if task:
        summary["task"] = task_performance(task, evaluators[primary].full_per_pair)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    faithfulness_vs_edges_figure(results, k_min, n, cfg.stage_dir / FAITHFULNESS_PNG, level=cfg.interval_level,
                                 title=f"{loaded.spec.name_or_path}: {metric} on {len(pairs)} held-out pairs; "
                                       f"{cfg.random_circuits} random circuits per edge count"
                                       + (f"; intervals: bootstrap over pairs, {boot.resamples} resamples"
                                          if boot is not None else ""),
                                 source=figure_source(cfg.model, cfg.output_dir, cfg.revision))
    stage.finish({art.SUMMARY_JSON: None, FAITHFULNESS_PNG: None}, model=loaded.identity(), seed=cfg.seed,
                 circuits={"run_id": circuits_manifest["run_id"], "minimal_edges": k_min,
                           "config": circuits_manifest["config"]},
                 metric={"name": metric, "definition": FAITHFULNESS_METRIC_DEFINITIONS[metric],
                         "faithfulness": FAITHFULNESS_DEFINITION,
                         "random_circuits": "uniform k-edge subsets without replacement, numpy default_rng(seed)"})
    r = results[primary]
    ci = f", {ci_text(r['faithfulness_heldout_ci'], cfg.interval_level)}" if r["faithfulness_heldout_ci"] else ""
    show(f"verify ({cfg.stage_dir}): held-out faithfulness {r['faithfulness_heldout']:.3f} at {k_min} edges "
         f"({primary} ablation{ci}); random circuits {r['random_faithfulness_mean']:.3f} ± "
         f"{r['random_faithfulness_sd']:.3f} (overlap {r['random_overlap_mean']:.3f})")
    return summary


# -- inputs ----------------------------------------------------------------------------------

def recorded_circuit_options(manifest: dict[str, Any], circuits_dir: Path) -> CircuitOptions:
    """The circuit settings find_circuits ran with, from its manifest's config."""
    recorded = manifest.get("config", {})
    names = [f.name for f in dataclasses.fields(CircuitOptions)]
    missing = [k for k in names if k not in recorded]
    if missing:
        raise InputError(f"{circuits_dir}/manifest.json records no {', '.join(missing)} in its config (written "
                         "by an older memcirc); re-run find_circuits")
    return CircuitOptions(**{k: recorded[k] for k in names})


def _pairs_folder(circuits_dir: Path, manifest: dict[str, Any]) -> Path:
    """The contrastive folder find_circuits read (its manifest's input), or, when that path is gone
    (the run folder was moved), the contrastive folder beside the circuits folder; for a task's
    circuit (--task), the circuits folder itself, which holds the pairs it generated."""
    if manifest.get("config", {}).get("task"):
        return circuits_dir
    entry = next((i for i in manifest.get("inputs", []) if str(i.get("path", "")).endswith(PAIRS_JSONL)),
                 None)
    if entry is None:
        raise InputError(f"{circuits_dir}/manifest.json names no {PAIRS_JSONL} input; re-run find_circuits")
    recorded = Path(entry["path"]).parent
    beside = circuits_dir.parent / STAGES["contrastive_dataset"].folder
    return recorded if recorded.is_dir() or not beside.is_dir() else beside


def check_provenance(metadata: dict[str, str], loaded: LoadedModel, pairs_sha: str, pairs_path: Path,
                     scores_path: Path) -> None:
    """InputError unless the prune scores were computed for this model and this pairs file."""
    try:
        recorded = json.loads(metadata["model"])
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"{scores_path} records no readable model identity; re-run find_circuits") from None
    check_same_model(recorded, loaded, f"prune scores in {scores_path}")
    if metadata.get("pairs_sha256") != pairs_sha:
        raise InputError(f"{scores_path} were computed for pairs sha256 {str(metadata.get('pairs_sha256'))[:12]}; "
                         f"this run uses {pairs_path} with sha256 {pairs_sha[:12]}: re-run find_circuits "
                         "on these pairs")


# -- the evaluation --------------------------------------------------------------------------

def random_circuits(n_edges: int, k: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """bool [count, n_edges]: `count` circuits of exactly k edges drawn uniformly without replacement."""
    kept = torch.zeros(count, n_edges, dtype=torch.bool)
    for i in range(count):
        kept[i, torch.from_numpy(rng.choice(n_edges, size=k, replace=False))] = True
    return kept


def _sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def circuits_to_evaluate(ranking: torch.Tensor, counts: list[int], k_min: int,
                         randoms: Mapping[int, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(kept, overlap). kept: bool rows, the top-k circuit at every count, then every random circuit
    (count by count). overlap: the mean share of the minimal circuit's edges that a random circuit of
    its size holds (1.0 when there is none: k_min is 0 or every edge)."""
    kept = top_k(ranking, counts, len(ranking))
    overlap = 1.0
    if k_min in randoms:
        circuit = kept[counts.index(k_min)]
        overlap = float(((randoms[k_min] & circuit).sum(dim=1).double() / k_min).mean())
    return (torch.cat([kept, *randoms.values()]) if randoms else kept), overlap


def heldout_result(ev: FaithfulnessEvaluator, kept: torch.Tensor, counts: list[int], k_min: int,
                   randoms: Mapping[int, torch.Tensor], overlap: float,
                   boot: PairBootstrap | None = None) -> dict[str, Any]:
    """One ablation's held-out faithfulness of the circuit and of the random circuits, at every count;
    with `boot`, their bootstrap intervals over pairs (`_intervals`)."""
    f, per_pair = ev.evaluate(kept)
    f_circ = dict(zip(counts, f[:len(counts)].tolist(), strict=True))
    rand: dict[int, np.ndarray] = {}
    rand_pp: dict[int, np.ndarray] = {}
    offset = len(counts)
    for k, circuits in randoms.items():
        rand[k] = f[offset:offset + len(circuits)]
        rand_pp[k] = per_pair[offset:offset + len(circuits)]
        offset += len(circuits)
    # at 0 and n edges every circuit is the same circuit
    rand_mean = {k: float(rand[k].mean()) if k in rand else f_circ[k] for k in counts}
    rand_sd = {k: _sd(rand[k]) if k in rand else 0.0 for k in counts}
    circ_ci, rand_ci = _intervals(ev, per_pair[:len(counts)], counts, rand_pp, boot)
    log.info("%s ablation: held-out faithfulness %.4f at %d edges%s; random circuits %.4f ± %.4f",
             ev.ablation_kind, f_circ[k_min], k_min, _ci_text(circ_ci[k_min], boot), rand_mean[k_min],
             rand_sd[k_min])
    return {
        "faithfulness_heldout": f_circ[k_min], "faithfulness_heldout_ci": circ_ci[k_min],
        "random_faithfulness_mean": rand_mean[k_min], "random_faithfulness_ci": rand_ci[k_min],
        "random_faithfulness_sd": rand_sd[k_min],
        "random_faithfulness": rand[k_min].tolist() if k_min in rand else [],
        "random_overlap_mean": overlap,
        "metric_full": ev.m_full, "metric_empty": ev.m_empty,
        "metric_circuit": ev.m_empty + f_circ[k_min] * (ev.m_full - ev.m_empty),
        "faithfulness_at_edges": [{"edges": k, "faithfulness": f_circ[k], "faithfulness_ci": circ_ci[k],
                                   "random_mean": rand_mean[k], "random_mean_ci": rand_ci[k],
                                   "random_sd": rand_sd[k]} for k in counts],
    }


def _intervals(ev: FaithfulnessEvaluator, circuit_pp: np.ndarray, counts: list[int],
               rand_pp: Mapping[int, np.ndarray], boot: PairBootstrap | None,
               ) -> tuple[dict[int, list[float] | None], dict[int, list[float] | None]]:
    """Per count: the interval of the top-k circuit's F and of the random circuits' mean F.

    The random mean is F of the circuits' per-pair metric averaged over the circuits: F is affine in
    M(C) for fixed M(empty), M(full), so on every resample this is the mean of their F."""
    if boot is None:
        return dict.fromkeys(counts), dict.fromkeys(counts)
    circ = dict(zip(counts, (as_interval(row) for row in ev.intervals(circuit_pp, boot)), strict=True))
    rand = {k: as_interval(ev.intervals(rand_pp[k].mean(axis=0), boot)) if k in rand_pp else circ[k]
            for k in counts}
    return circ, rand


def _ci_text(ci: list[float] | None, boot: PairBootstrap | None) -> str:
    return f" ({ci_text(ci, boot.level, 4)})" if ci is not None and boot is not None else ""


# -- summary, headline ----------------------------------------------------------------------

def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    ci, rand_ci = summary.get("faithfulness_heldout_ci"), summary.get("random_faithfulness_ci")
    level = (summary.get("bootstrap") or {}).get("level", 0.95)
    return (f"held-out: faithfulness {summary['faithfulness_heldout']:.3f};"
            + (f" {ci_text(ci, level)};" if ci else "")
            + f" random circuits of the same size {summary['random_faithfulness_mean']:.3f} ± "
              f"{summary['random_faithfulness_sd']:.3f}"
            + (f" (their mean: {ci_text(rand_ci, level)})" if rand_ci else ""))


def needs_transformer_lens(_cfg: VerifyConfig) -> bool:
    """This stage converts the model to TransformerLens."""
    return True
