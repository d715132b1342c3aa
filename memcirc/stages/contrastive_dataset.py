"""The contrastive_dataset stage: contrastive pairs (clean, corrupt, answer, wrong) from the memorized
windows of a memorization run, for circuit discovery.

Writes pairs.jsonl (one `memcirc.pairs.Pair` per line, split by document into discovery and held-out),
summary.json, divergence.png and manifest.json (last). The science is in `memcirc.contrastive`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.contrastive import (
    Divergence,
    dataset_pairs,
    divergence_pairs,
    find_divergences,
    split_by_document,
    with_splits,
)
from memcirc.contrastive_figures import divergence_figure
from memcirc.data import ScoredWindow, memorized, read_scores
from memcirc.errors import InputError
from memcirc.groups import group_order
from memcirc.logs import show
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import load
from memcirc.models.identity import check_same_model
from memcirc.option_groups import MemorizedRule
from memcirc.pairs import PAIRS_JSONL, Pair, write_pairs
from memcirc.plots import figure_source
from memcirc.stages.configs.contrastive_dataset import ContrastiveConfig

log = logging.getLogger(__name__)

DIVERGENCE_PNG = "divergence.png"


def run(cfg: ContrastiveConfig) -> dict[str, Any]:
    """Find where memorization of each memorized window breaks, build the pairs, split them by document."""
    torch.manual_seed(cfg.seed)
    upstream_dir = cfg.upstream_dir
    assert upstream_dir is not None, "contrastive_dataset needs memorization_score: its upstream folder is known"
    upstream = read_manifest(upstream_dir, what="memorization")
    windows = read_scores(upstream_dir)
    chosen, non_memorized = _select(windows, cfg)
    loaded = load(cfg.model_spec())
    warning = check_same_model(upstream.get("model"), loaded, "memorization scores")
    stage = StageRun.for_config(cfg, [{"path": str(upstream_dir), "run_id": upstream["run_id"]}])
    if (done := stage.open(cfg.force)) is not None:
        return done
    log.info("%d memorized windows (%s >= %s) of %d; finding where memorization breaks", len(chosen),
             cfg.memorized_by, cfg.threshold, len(windows))
    # load() gives a tokenizer without a pad token eos as pad; the stubs type special-token ids as str | list[str]
    pad_id = cast(int, loaded.tokenizer.pad_token_id)
    divergences = find_divergences(loaded.model, chosen, metric=cfg.metric, drop=cfg.drop,
                                   batch_size=cfg.batch_size, pad_id=pad_id)
    if cfg.contrastive_mode == "divergence":
        pairs, skipped = divergence_pairs(divergences)
        # Split the documents that have pairs, so the held-out fraction is a fraction of pairs.
        split = split_by_document([p.doc for p in pairs], cfg.heldout_fraction, cfg.seed)
    else:
        # A dataset pair holds two documents; candidates come from the memorized document's split.
        split = split_by_document([w.doc for w in windows], cfg.heldout_fraction, cfg.seed)
        log.info("matching %d resolved windows against %d non-memorized candidates",
                 sum(d.resolved for d in divergences), len(non_memorized))
        pairs, skipped = dataset_pairs(loaded.model, divergences, non_memorized, split.__getitem__,
                                       cfg.similarity, cfg.batch_size)
    pairs = with_splits(pairs, split)
    summary = _summary(cfg, len(windows), len(chosen), divergences, pairs, skipped)
    if not pairs:  # checked before the stage folder exists: nothing partial is left behind
        raise InputError(f"no contrastive pairs from {len(chosen)} memorized windows ({skipped}); "
                         "score more data or lower --threshold")
    stage.start(cfg.force)
    if warning:
        log.warning("%s", warning)
    n = write_pairs(cfg.stage_dir / PAIRS_JSONL, pairs)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    divergence_figure(divergences, cfg.stage_dir / DIVERGENCE_PNG, cfg.metric, cfg.drop,
                      source=figure_source(cfg.model, cfg.output_dir, cfg.revision))
    stage.finish({PAIRS_JSONL: n, art.SUMMARY_JSON: None, DIVERGENCE_PNG: None}, model=loaded.identity(),
                 seed=cfg.seed, tokenizer={"name_or_path": loaded.tokenizer.name_or_path,
                                           "vocab_size": len(loaded.tokenizer)})
    show(headline(summary, cfg.stage_dir))
    return summary


def _select(windows: list[ScoredWindow], cfg: ContrastiveConfig) -> tuple[list[ScoredWindow], list[ScoredWindow]]:
    """(memorized windows, non-memorized candidates for dataset mode)."""
    chosen = [w for w, m in zip(windows, memorized(windows, cfg.options(MemorizedRule))) if m]
    if cfg.limit:
        chosen = chosen[:cfg.limit]
    if not chosen:
        raise InputError(f"no memorized windows: none of the {len(windows)} scored windows has "
                         f"{cfg.memorized_by} >= {cfg.threshold}; lower --threshold or score more data")
    non_memorized = [w for w in windows if not w.score("exact") and w.score("lcp") <= cfg.low_max_lcp]
    return chosen, non_memorized


def _summary(cfg: ContrastiveConfig, n_windows: int, n_memorized: int, divergences: list[Divergence],
             pairs: list[Pair], skipped: dict[str, int]) -> dict[str, Any]:
    resolved = [d for d in divergences if d.resolved]
    return {
        "mode": cfg.contrastive_mode, "n_windows": n_windows, "n_memorized": n_memorized,
        "n_resolved": len(resolved), "n_pairs": len(pairs),
        "n_discovery": sum(p.split == "discovery" for p in pairs),
        "n_heldout": sum(p.split == "heldout" for p in pairs),
        "skipped": skipped,
        "divergence_position": _positions(resolved),
    }


SHORT_CONTEXT = 4   # a break at L <= 4: the pair's prompt holds at most 5 tokens


def _positions(resolved: list[Divergence]) -> dict[str, Any] | None:
    """The distribution of break positions (context length L): quartiles, the share beyond
    SHORT_CONTEXT, a count per L, and per group."""
    if not resolved:
        return None
    pos = np.array([d.position for d in resolved])
    groups: dict[str, list[int]] = {}
    for d in resolved:
        groups.setdefault(str(d.window.group), []).append(d.position)
    return {"mean": float(pos.mean()), "min": int(pos.min()), "max": int(pos.max()),
            "quartiles": [float(q) for q in np.percentile(pos, [25, 50, 75])],
            "short_context": SHORT_CONTEXT, "beyond_short_context": int((pos > SHORT_CONTEXT).sum()),
            "fraction_beyond_short_context": round(float((pos > SHORT_CONTEXT).mean()), 4),
            "counts": {str(v): int(c) for v, c in zip(*np.unique(pos, return_counts=True), strict=True)},
            "groups": {g: {"n": len(v), "median": float(np.median(v)),
                           "beyond_short_context": int(sum(x > SHORT_CONTEXT for x in v))}
                       for g, v in ((g, groups[g]) for g in group_order(groups))}}


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report (and what the stage prints last)."""
    line = (f"contrastive ({summary['mode']}): {summary['n_pairs']} pairs ({summary['n_discovery']} discovery, "
            f"{summary['n_heldout']} held-out) from {summary['n_memorized']} memorized windows")
    pos = summary.get("divergence_position")
    if pos and "quartiles" in pos:
        line += (f"; breaks at context length L: median {pos['quartiles'][1]:g}, "
                 f"{pos['beyond_short_context']} of {summary['n_resolved']} beyond L = {pos['short_context']}")
    return line

