"""The find_circuits stage: EAP-IG edge attribution on the discovery pairs and the minimal faithful circuit.

Reads <output-dir>/contrastive/pairs.jsonl (discovery split); writes prune_scores.safetensors,
circuit.json, summary.json, faithfulness_curve.png, circuit.png and manifest.json (last) into
<output-dir>/circuits/. The science is in `memcirc.circuits` (`discover_circuit`). Every F on the curve
comes with a percentile bootstrap interval over the discovery pairs (`memcirc.bootstrap`), with the
ranking and k held fixed: it does not cover the choice of k on these same pairs (verify's held-out
interval is the one to quote).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memcirc import artifacts as art
from memcirc.bootstrap import PairBootstrap, as_interval, bootstrap_info, ci_text, pair_bootstrap
from memcirc.circuits import (
    CIRCUIT_JSON,
    FAITHFULNESS_DEFINITION,
    FAITHFULNESS_METRIC_DEFINITIONS,
    PRUNE_SCORES,
    RANKING,
    SCORE_DEFINITION,
    CircuitResult,
    FaithfulnessEvaluator,
    MinimalCircuit,
    attribution_method,
    build_graph,
    discover_circuit,
    make_batches,
    prune_scores_metadata,
    save_prune_scores,
)
from memcirc.circuits.figures import circuit_graph_figure, faithfulness_curve_figure
from memcirc.errors import InputError
from memcirc.logs import show
from memcirc.manifest import StageRun
from memcirc.models import LoadedModel, load
from memcirc.models.arch import embedding_rows, n_ctx
from memcirc.models.identity import check_same_model, weights_key
from memcirc.models.preflight import check_model
from memcirc.option_groups import CircuitOptions
from memcirc.pairs import PAIRS_JSONL, Pair, pairs_input, read_pairs
from memcirc.plots import figure_source
from memcirc.stages.configs.find_circuits import CircuitsConfig
from memcirc.stages.registry import STAGES
from memcirc.tasks.source import GeneratedPairs, generate_for, task_metric_warning, task_performance

log = logging.getLogger(__name__)

METHOD_VERSION = 1
CURVE_PNG = "faithfulness_curve.png"
CIRCUIT_PNG = "circuit.png"


def run(cfg: CircuitsConfig) -> dict[str, Any]:
    """find_circuits: attribute edges on the discovery split, find the minimal faithful circuit.

    Writes prune_scores.safetensors, circuit.json, summary.json, faithfulness_curve.png,
    circuit.png and manifest.json (last) into <output-dir>/circuits/. Returns the summary.
    """
    torch.manual_seed(cfg.seed)
    check_model(cfg.model_spec(), needs_tl=True, what="find_circuits")  # config.json alone, before any work
    opts = cfg.options(CircuitOptions)
    source = read_discovery_pairs(cfg)
    loaded, pairs = source.loaded, source.pairs
    key = weights_key(loaded)
    stage = StageRun.for_config(cfg, fingerprint=art.sha256_json({
        "method": METHOD_VERSION, "config": cfg.hashed_dict(), "pairs_sha256": source.sha256, "model": key}))
    if (done := stage.open(cfg.force)) is not None:
        return done
    graph = build_graph(loaded, opts.weight_processing)
    batches = make_batches(pairs, cfg.batch_size, loaded.device)
    # built before the stage starts: pairs on which faithfulness is undefined are refused here
    evaluator = FaithfulnessEvaluator(graph, batches, opts.ablation, opts.faithfulness_metric)
    stage.start(cfg.force)
    for warning in (*source.warnings, _dtype_warning(loaded.dtype)):
        if warning:
            log.warning(warning)
    outputs: dict[str, int | None] = {}
    if source.generated is not None:   # the task's pairs, for verify_circuit and for the record
        art.atomic_write_bytes(cfg.stage_dir / PAIRS_JSONL, source.generated.data)
        outputs[PAIRS_JSONL] = len(source.generated.pairs)
        stage.add_input(cfg.stage_dir.resolve() / PAIRS_JSONL, None, source.sha256, split="discovery",
                        n_pairs=len(pairs), generated=source.generated.describe())
    else:
        stage.add_input(source.path.resolve(), source.manifest, source.sha256, split="discovery", n_pairs=len(pairs))
    log.info("%d discovery pairs in %d batches (grouped by length, no padding); %d edges; %s = %.4g with "
             "every edge, %.4g with none (%s ablation)", len(pairs), len(batches), graph.n_edges,
             opts.faithfulness_metric, evaluator.m_full, evaluator.m_empty, opts.ablation)

    boot = pair_bootstrap(len(pairs), cfg.bootstrap_resamples, cfg.interval_level, cfg.seed)
    found = discover_circuit(graph, batches, opts, evaluator, boot)
    search = found.search
    assert search is not None
    _log_search(search, graph.n_edges)
    save_prune_scores(cfg.stage_dir / PRUNE_SCORES, graph, found.scores, prune_scores_metadata(
        graph, opts, model=key, pairs_sha256=source.sha256, n_pairs=len(pairs), limit=cfg.limit))
    art.write_json(cfg.stage_dir / CIRCUIT_JSON, {
        "edges_total": graph.n_edges, "edges": len(found.edges), "faithfulness": search.faithfulness,
        "ranking": RANKING, "score_definition": SCORE_DEFINITION, "circuit": found.edges})
    summary = build_summary(found, opts, graph.n_edges, n_pairs=len(pairs), n_batches=len(batches), boot=boot)
    if cfg.task:
        summary["task"] = task_performance(cfg.task, evaluator.full_per_pair)
    summary["bootstrap"] = bootstrap_info(boot, len(pairs), cfg.bootstrap_resamples, cfg.interval_level, cfg.seed)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    footer = figure_source(cfg.model, cfg.output_dir, cfg.revision)
    what = f"task {cfg.task}" if cfg.task else "memorization pairs"
    faithfulness_curve_figure(search, graph.n_edges, cfg.stage_dir / CURVE_PNG,
                              title=f"{loaded.spec.name_or_path}, {what}: {opts.faithfulness_metric}, {opts.ablation} "
                                    f"ablation, {len(pairs)} discovery pairs" + (f"; interval: bootstrap over "
                                    f"pairs, {boot.resamples} resamples" if boot is not None else ""), source=footer,
                              intervals=curve_intervals(summary), level=cfg.interval_level,
                              verify_folder=cfg.task_folder(Path(STAGES["verify_circuit"].folder)).name)
    circuit_graph_figure(found.edges, cfg.stage_dir / CIRCUIT_PNG,
                         title=f"minimal circuit: {search.minimal_edges} of {graph.n_edges} edges, "
                               f"F = {search.faithfulness:.3f} ({opts.faithfulness_metric}, {opts.ablation} "
                               f"ablation, {len(pairs)} discovery pairs)", source=footer)
    stage.finish({**outputs, PRUNE_SCORES: None, CIRCUIT_JSON: len(found.edges), art.SUMMARY_JSON: None,
                  CURVE_PNG: None, CIRCUIT_PNG: None}, model=loaded.identity(), seed=cfg.seed,
                 method=attribution_method(opts),
                 metric={"name": opts.faithfulness_metric,
                         "definition": FAITHFULNESS_METRIC_DEFINITIONS[opts.faithfulness_metric],
                         "faithfulness": FAITHFULNESS_DEFINITION})
    ci = f", {ci_text(summary['faithfulness_ci'], cfg.interval_level)}" if summary["faithfulness_ci"] else ""
    show(f"circuits ({cfg.stage_dir}): {search.minimal_edges} of {graph.n_edges} edges reach faithfulness "
         f"{search.faithfulness:.3f} ({target_text(summary)}{ci}) on {len(pairs)} discovery pairs; "
         f"monotone: {search.monotone}")
    return summary


@dataclass
class DiscoveryPairs:
    """The discovery pairs of a find_circuits run, the model they are for, and where they came from."""

    loaded: LoadedModel
    pairs: list[Pair]
    sha256: str
    path: Path                                  # the contrastive pairs.jsonl (unused for a task)
    manifest: dict[str, Any] | None = None      # the contrastive stage's manifest
    generated: GeneratedPairs | None = None     # a task's pairs (--task), written into the stage folder
    warnings: tuple[str | None, ...] = ()


def read_discovery_pairs(cfg: CircuitsConfig) -> DiscoveryPairs:
    """The contrastive stage's discovery pairs, or (--task) the task's, generated for the model's tokenizer."""
    if cfg.task:
        loaded = load(cfg.model_spec())
        generated = generate_for(cfg.task, loaded.tokenizer, cfg.task_pairs, cfg.seed, cfg.prepend_bos)
        return DiscoveryPairs(loaded, generated.split("discovery", cfg.limit), generated.sha256,
                              cfg.stage_dir / PAIRS_JSONL, generated=generated,
                              warnings=(task_metric_warning(cfg.task, cfg.faithfulness_metric),))
    upstream = cfg.upstream_dir
    assert upstream is not None
    pairs_path, upstream_manifest, pairs_sha = pairs_input(upstream)
    loaded = load(cfg.model_spec())
    dtype_warning = check_same_model(upstream_manifest.get("model"), loaded, "contrastive pairs")
    pairs = read_pairs(pairs_path, vocab_size=embedding_rows(loaded.model), max_len=n_ctx(loaded.model),
                       split="discovery", limit=cfg.limit)
    if not pairs:
        raise InputError(f"{pairs_path} has no discovery pairs; re-run contrastive_dataset with more data")
    return DiscoveryPairs(loaded, pairs, pairs_sha, pairs_path, upstream_manifest, warnings=(dtype_warning,))


def _dtype_warning(dtype: torch.dtype) -> str | None:
    if dtype == torch.float32:
        return None
    return (f"attributing in {str(dtype).replace('torch.', '')}: edge scores and faithfulness are much noisier "
            "than in float32 (on a GPT-Neo-125M-shaped model the minimal circuit came out 6x larger); "
            "--dtype float32 is recommended")


def _log_search(search: MinimalCircuit, n_edges: int) -> None:
    if not search.monotone:
        log.warning("faithfulness drops as edges are added at %d evaluated step(s) (first: %s); the minimal "
                    "circuit is the target crossing found by bisection in the bracket %s%s",
                    len(search.non_monotone_steps), search.non_monotone_steps[0], search.bracket,
                    "" if search.monotone_in_bracket else ", which holds such a drop too: a smaller k "
                    "outside the probed points may also reach the target")
    log.info("minimal circuit: %d of %d edges reach faithfulness %.4f (target %.2f%s)", search.minimal_edges,
             n_edges, search.faithfulness, search.target,
             f", met by the interval's lower end {dict(search.lower)[search.minimal_edges]:.4f}"
             if search.selected_by == "lower" else "")


def target_text(summary: dict[str, Any]) -> str:
    """'target 0.85', and what reached it when that was the lower end of F's interval."""
    lower = " for the interval's lower end" if summary.get("selected_by") == "lower" else ""
    return f"target {summary['target']}{lower}"


# -- summary and headline --------------------------------------------------------------------

def build_summary(found: CircuitResult, opts: CircuitOptions, n_edges: int, *, n_pairs: int,
                  n_batches: int, boot: PairBootstrap | None = None) -> dict[str, Any]:
    """summary.json: the minimal circuit, the baselines, the curve and the bisection probes; with `boot`,
    the bootstrap interval of every F (`faithfulness_ci`: the circuit and k held fixed, pairs resampled)."""
    search, evaluator, scores = found.search, found.evaluator, found.scores
    assert search is not None and evaluator is not None
    rows = {"curve": evaluator.curve_rows(search.curve, boot), "bisection": evaluator.curve_rows(search.probes, boot)}
    pp = evaluator.per_pair_at.get(search.minimal_edges)
    minimal_ci = as_interval(evaluator.intervals(pp, boot)) if boot is not None and pp is not None else None
    return {
        "edges_total": n_edges, "minimal_edges": search.minimal_edges,
        "edge_fraction": search.minimal_edges / n_edges, "faithfulness": search.faithfulness,
        "faithfulness_ci": minimal_ci, "target": opts.target, "selected_by": search.selected_by,
        "split": "discovery",
        "n_pairs": n_pairs, "n_batches": n_batches,
        "metric": opts.faithfulness_metric, "ablation": opts.ablation, "metric_full": evaluator.m_full,
        "metric_empty": evaluator.m_empty, "monotone": search.monotone,
        "monotone_in_bracket": search.monotone_in_bracket, "non_monotone_steps": search.non_monotone_steps,
        "bracket": list(search.bracket) if search.bracket else None,
        **rows,
        "score_abs_sum": float(scores.abs().sum()), "scores_nonzero": int((scores != 0).sum()),
    }


def curve_intervals(summary: dict[str, Any]) -> dict[int, list[float]]:
    """k -> the interval of F, for every curve point and probe that has one."""
    return {r["edges"]: r["faithfulness_ci"] for r in (*summary["curve"], *summary["bisection"])
            if r.get("faithfulness_ci")}


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    ci = summary.get("faithfulness_ci")
    level = (summary.get("bootstrap") or {}).get("level", 0.95)
    return (f"circuit: {summary['minimal_edges']} of {summary['edges_total']} edges reach faithfulness "
            f"{summary['faithfulness']:.3f}" + (f" ({ci_text(ci, level)})" if ci else "")
            + f" on discovery pairs ({target_text(summary)})")


def needs_transformer_lens(_cfg: CircuitsConfig) -> bool:
    """This stage converts the model to TransformerLens."""
    return True
