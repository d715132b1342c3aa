"""The find_circuits stage: EAP-IG edge attribution on the discovery pairs and the minimal faithful circuit.

Reads <output-dir>/contrastive/pairs.jsonl (discovery split); writes prune_scores.safetensors,
circuit.json, summary.json, faithfulness_curve.png, circuit.png and manifest.json (last) into
<output-dir>/circuits/. The science is in `memcirc.circuits` (`discover_circuit`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import torch

from memcirc import artifacts as art
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
from memcirc.config import CircuitOptions, StageConfig, option
from memcirc.errors import InputError
from memcirc.manifest import StageRun
from memcirc.models import load
from memcirc.models.arch import embedding_rows, n_ctx
from memcirc.models.identity import check_same_model, weights_key
from memcirc.models.preflight import check_model
from memcirc.pairs import pairs_input, read_pairs
from memcirc.plots import edge_count_axis, save_figure, subplots

log = logging.getLogger(__name__)

METHOD_VERSION = 1
CURVE_PNG = "faithfulness_curve.png"
CIRCUIT_PNG = "circuit.png"
MAX_DRAWN_EDGES = 300  # a bigger circuit is drawn by its strongest edges (the title says so)
_LETTER_STYLE = {"Q": "-", "K": "--", "V": ":"}


@dataclass
class CircuitsConfig(CircuitOptions, StageConfig):
    """find_circuits: EAP-IG edge attribution (auto-circuit) and the minimal faithful circuit."""

    stage: ClassVar[str] = "find_circuits"

    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)


Config = CircuitsConfig


def run(cfg: CircuitsConfig) -> dict[str, Any]:
    """find_circuits: attribute edges on the discovery split, find the minimal faithful circuit.

    Writes prune_scores.safetensors, circuit.json, summary.json, faithfulness_curve.png,
    circuit.png and manifest.json (last) into <output-dir>/circuits/. Returns the summary.
    """
    torch.manual_seed(cfg.seed)
    check_model(cfg.model_spec(), needs_tl=True, what="find_circuits")  # config.json alone, before any work
    opts = cfg.options(CircuitOptions)
    upstream = cfg.upstream_dir
    assert upstream is not None
    pairs_path, upstream_manifest, pairs_sha = pairs_input(upstream)
    loaded = load(cfg.model_spec())
    dtype_warning = check_same_model(upstream_manifest.get("model"), loaded, "contrastive pairs")
    vocab = embedding_rows(loaded.model)
    pairs = read_pairs(pairs_path, vocab_size=vocab, max_len=n_ctx(loaded.model), split="discovery",
                       limit=cfg.limit)
    if not pairs:
        raise InputError(f"{pairs_path} has no discovery pairs; re-run contrastive_dataset with more data")
    key = weights_key(loaded)
    stage = StageRun.for_config(cfg, fingerprint=art.sha256_json({
        "method": METHOD_VERSION, "config": cfg.hashed_dict(), "pairs_sha256": pairs_sha, "model": key}))
    if (done := stage.open(cfg.force)) is not None:
        return done
    graph = build_graph(loaded, opts.weight_processing)
    batches = make_batches(pairs, cfg.batch_size, loaded.device)
    # built before the stage starts: pairs on which faithfulness is undefined are refused here
    evaluator = FaithfulnessEvaluator(graph, batches, opts.ablation, opts.faithfulness_metric)
    stage.start(cfg.force)
    for warning in (dtype_warning, _dtype_warning(loaded.dtype)):
        if warning:
            log.warning(warning)
    stage.add_input(pairs_path.resolve(), upstream_manifest, pairs_sha, split="discovery", n_pairs=len(pairs))
    log.info("%d discovery pairs in %d batches (grouped by length, no padding); %d edges; %s = %.4g with "
             "every edge, %.4g with none (%s ablation)", len(pairs), len(batches), graph.n_edges,
             opts.faithfulness_metric, evaluator.m_full, evaluator.m_empty, opts.ablation)

    found = discover_circuit(graph, batches, opts, evaluator)
    search = found.search
    assert search is not None
    _log_search(search, graph.n_edges)
    save_prune_scores(cfg.stage_dir / PRUNE_SCORES, graph, found.scores, prune_scores_metadata(
        graph, opts, model=key, pairs_sha256=pairs_sha, n_pairs=len(pairs), limit=cfg.limit))
    art.write_json(cfg.stage_dir / CIRCUIT_JSON, {
        "edges_total": graph.n_edges, "edges": len(found.edges), "faithfulness": search.faithfulness,
        "ranking": RANKING, "score_definition": SCORE_DEFINITION, "circuit": found.edges})
    summary = build_summary(found, opts, graph.n_edges, n_pairs=len(pairs), n_batches=len(batches))
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    faithfulness_curve_figure(search, cfg.stage_dir / CURVE_PNG,
                              title=f"{loaded.spec.name_or_path}: {opts.faithfulness_metric}, {opts.ablation} "
                                    f"ablation, {len(pairs)} discovery pairs")
    circuit_graph_figure(found.edges, cfg.stage_dir / CIRCUIT_PNG,
                         title=f"minimal circuit: {search.minimal_edges} of {graph.n_edges} edges, "
                               f"F = {search.faithfulness:.3f}")
    stage.finish({PRUNE_SCORES: None, CIRCUIT_JSON: len(found.edges), art.SUMMARY_JSON: None, CURVE_PNG: None,
                  CIRCUIT_PNG: None}, model=loaded.identity(), seed=cfg.seed, method=attribution_method(opts),
                 metric={"name": opts.faithfulness_metric,
                         "definition": FAITHFULNESS_METRIC_DEFINITIONS[opts.faithfulness_metric],
                         "faithfulness": FAITHFULNESS_DEFINITION})
    print(f"circuits ({cfg.stage_dir}): {search.minimal_edges} of {graph.n_edges} edges reach faithfulness "
          f"{search.faithfulness:.3f} (target {opts.target}) on {len(pairs)} discovery pairs; "
          f"monotone: {search.monotone}")
    return summary


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
    log.info("minimal circuit: %d of %d edges reach faithfulness %.4f (target %.2f)", search.minimal_edges,
             n_edges, search.faithfulness, search.target)


# -- summary and headline --------------------------------------------------------------------

def build_summary(found: CircuitResult, opts: CircuitOptions, n_edges: int, *, n_pairs: int,
                  n_batches: int) -> dict[str, Any]:
    """summary.json: the minimal circuit, the baselines, the curve and the bisection probes."""
    search, evaluator, scores = found.search, found.evaluator, found.scores
    assert search is not None and evaluator is not None
    return {
        "edges_total": n_edges, "minimal_edges": search.minimal_edges,
        "edge_fraction": search.minimal_edges / n_edges, "faithfulness": search.faithfulness,
        "target": opts.target, "split": "discovery", "n_pairs": n_pairs, "n_batches": n_batches,
        "metric": opts.faithfulness_metric, "ablation": opts.ablation, "metric_full": evaluator.m_full,
        "metric_empty": evaluator.m_empty, "monotone": search.monotone,
        "monotone_in_bracket": search.monotone_in_bracket, "non_monotone_steps": search.non_monotone_steps,
        "bracket": list(search.bracket) if search.bracket else None,
        "curve": evaluator.curve_rows(search.curve), "bisection": evaluator.curve_rows(search.probes),
        "score_abs_sum": float(scores.abs().sum()), "scores_nonzero": int((scores != 0).sum()),
    }


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    return (f"circuit: {summary['minimal_edges']} of {summary['edges_total']} edges reach faithfulness "
            f"{summary['faithfulness']:.3f} on discovery pairs (target {summary['target']})")


# -- figures ---------------------------------------------------------------------------------

def faithfulness_curve_figure(search: MinimalCircuit, path: Path, title: str) -> None:
    """F against k: the log-spaced curve, the bisection probes, the target and the minimal circuit."""
    fig, ax = subplots(figsize=(8, 4.5))
    ks, fs = zip(*search.curve, strict=True)
    ax.plot(ks, fs, "o-", color="#4c72b0", label="curve (log-spaced k)")
    if search.probes:
        pk, pf = zip(*search.probes, strict=True)
        ax.plot(pk, pf, "x", color="#55a868", label="bisection probes")
    ax.axhline(search.target, color="grey", ls="--", lw=0.8, label=f"target {search.target}")
    ax.plot([search.minimal_edges], [search.faithfulness], "*", ms=14, color="#c44e52",
            label=f"minimal: {search.minimal_edges} edges, F = {search.faithfulness:.3f}")
    for step in search.non_monotone_steps:
        ax.axvspan(step["from_edges"], step["to_edges"], color="#dd8452", alpha=0.15, lw=0)
    edge_count_axis(ax, ks[-1])
    ax.set_ylabel("faithfulness")
    extra = "" if search.monotone else f"; {len(search.non_monotone_steps)} non-monotone step(s) shaded"
    ax.set_title(title + extra, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def _node(name: str) -> tuple[str, str | None]:
    """A destination 'A1.2.Q' is drawn on head node 'A1.2' (edge style says Q/K/V)."""
    parts = name.split(".")
    if name.startswith("A") and len(parts) == 3 and parts[2] in _LETTER_STYLE:
        return ".".join(parts[:2]), parts[2]
    return name, None


def _layered_graph(edges: Sequence[Mapping[str, Any]]) -> tuple[nx.DiGraph, dict[str, tuple[float, int]]]:
    """The circuit's graph on head/MLP nodes, and node positions: one row per layer."""
    g = nx.DiGraph()
    layer: dict[str, int] = {}
    for e in edges:
        src, _ = _node(e["src"])
        dest, letter = _node(e["dest"])
        layer[src] = min(layer.get(src, e["src_layer"]), e["src_layer"])
        # a head node sits at its source layer (where its output enters the residual)
        layer.setdefault(dest, e["dest_layer"])
        g.add_edge(src, dest, score=e["score"], letter=letter)
    rows: dict[int, list[str]] = {}
    for node in sorted(g.nodes, key=lambda n: (layer[n], n)):
        rows.setdefault(layer[node], []).append(node)
    pos = {n: ((i + 1) / (len(row) + 1), lay) for lay, row in rows.items() for i, n in enumerate(row)}
    return g, pos


def circuit_graph_figure(edges: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Nodes placed by layer (bottom: embedding, top: logits), edge width by |score|, colour by sign."""
    drawn = list(edges[:MAX_DRAWN_EDGES])
    fig, ax = subplots(figsize=(10, 7))
    if not drawn:
        ax.text(0.5, 0.5, "empty circuit", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title(title)
        save_figure(fig, path)
        return
    g, pos = _layered_graph(drawn)
    top = max(abs(e["score"]) for e in drawn) or 1.0
    for u, v, data in g.edges(data=True):
        width = 0.5 + 4.5 * abs(data["score"]) / top
        colour = "#c44e52" if data["score"] > 0 else "#4c72b0"
        nx.draw_networkx_edges(g, pos, edgelist=[(u, v)], width=width, edge_color=colour, alpha=0.7,
                               style=_LETTER_STYLE.get(data["letter"], "-"), arrows=True, arrowsize=8,
                               connectionstyle="arc3,rad=0.08", ax=ax)
    nx.draw_networkx_nodes(g, pos, node_size=500, node_color="#f0f0f0", edgecolors="#333333", ax=ax)
    nx.draw_networkx_labels(g, pos, font_size=7, ax=ax)
    ax.set_ylabel("layer (auto-circuit graph layer)")
    ax.tick_params(left=True, labelleft=True)
    shown = "" if len(drawn) == len(edges) else f" (strongest {len(drawn)} drawn)"
    ax.set_title(f"{title}{shown}\nred: positive score, blue: negative; into heads: Q solid, K dashed, "
                 "V dotted", fontsize=9)
    save_figure(fig, path)


def needs_transformer_lens(_cfg: CircuitsConfig) -> bool:
    """This stage converts the model to TransformerLens."""
    return True
