"""The contrastive_dataset stage: contrastive pairs (clean, corrupt, answer, wrong) from the memorized
windows of a memorization run, for circuit discovery.

Writes pairs.jsonl (one `memcirc.pairs.Pair` per line, split by document into discovery and held-out),
summary.json, divergence.png and manifest.json (last). The science is in `memcirc.contrastive`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.config import MemorizedRule, StageConfig, option
from memcirc.contrastive import (
    Divergence,
    dataset_pairs,
    divergence_pairs,
    find_divergences,
    split_by_document,
    with_splits,
)
from memcirc.data import ScoredWindow, memorized, read_scores
from memcirc.errors import InputError
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import load
from memcirc.models.identity import check_same_model
from memcirc.pairs import PAIRS_JSONL, Pair, write_pairs
from memcirc.plots import save_figure, subplots

log = logging.getLogger(__name__)

DIVERGENCE_PNG = "divergence.png"


@dataclass
class ContrastiveConfig(MemorizedRule, StageConfig):
    """contrastive_dataset: token-id pairs (clean, corrupt, answer, wrong) for circuit discovery."""

    stage: ClassVar[str] = "contrastive_dataset"

    contrastive_mode: str = option("divergence", "'divergence': where memorization breaks (branch "
                                   "decision); 'dataset': memorized vs non-memorized contexts "
                                   "(memorization decision)", aliases=("--contrastive_mode",),
                                   choices=("divergence", "dataset"))
    metric: str = option("bleu", "score that drives divergence detection: 'bleu' (BLEU-4) or "
                         "'memorization' (token accuracy), as the predecessor's --metric",
                         choices=("bleu", "memorization"))
    drop: float = option(0.3, "divergence: relative score drop that marks the break", within="(0, 1)")
    low_max_lcp: int = option(0, "dataset mode: a non-memorized context reproduces at most this many "
                              "suffix tokens", minimum=0)
    similarity: str = option("embedding", "dataset mode: rank candidates by cosine of mean-pooled last "
                             "hidden states ('embedding') or Jaccard of token sets ('token_overlap')",
                             choices=("embedding", "token_overlap"))
    heldout_fraction: float = option(0.3, "fraction of documents whose pairs go to the held-out split",
                                     within="(0, 1)")
    batch_size: int = option(32, "sequences per forward pass / generation batch",
                             aliases=("--batch_size",), minimum=1, hashed=False)


Config = ContrastiveConfig


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
    divergence_figure(divergences, cfg.stage_dir / DIVERGENCE_PNG)
    stage.finish({PAIRS_JSONL: n, art.SUMMARY_JSON: None, DIVERGENCE_PNG: None}, model=loaded.identity(),
                 seed=cfg.seed, tokenizer={"name_or_path": loaded.tokenizer.name_or_path,
                                           "vocab_size": len(loaded.tokenizer)})
    print(headline(summary, cfg.stage_dir))
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
        "divergence_position": ({"mean": float(np.mean([d.position for d in resolved])),
                                 "min": min(d.position for d in resolved),
                                 "max": max(d.position for d in resolved)} if resolved else None),
    }


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report (and what the stage prints last)."""
    return (f"contrastive ({summary['mode']}): {summary['n_pairs']} pairs ({summary['n_discovery']} discovery, "
            f"{summary['n_heldout']} held-out) from {summary['n_memorized']} memorized windows")


def divergence_figure(divergences: Sequence[Divergence], path: Path) -> None:
    """Left: context length at which memorization breaks, per group. Right: the score drop there."""
    groups_of = [d.window.group or "all" for d in divergences]
    resolved = [(d, g) for d, g in zip(divergences, groups_of) if d.resolved]
    groups = sorted({g for _, g in resolved})
    longest = max((d.window.prefix_len for d in divergences), default=1)
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    left.hist([[d.position for d, g in resolved if g == group] for group in groups] or [[]],
              bins=range(0, longest + 2), stacked=True, label=groups or None)
    if groups:
        left.legend(fontsize=8)
    left.set_xlabel("context length where memorization breaks (divergence position)")
    left.set_ylabel("memorized windows")
    left.set_title(f"{len(resolved)} of {len(divergences)} memorized windows break")
    right.scatter([d.score_before for d, _ in resolved], [d.score_after for d, _ in resolved], s=12, alpha=0.7)
    right.plot([0, 1], [0, 1], color="grey", lw=0.8)
    right.set_xlabel("score before the break")
    right.set_ylabel("score at the break")
    right.set_title("score drop at the divergence")
    save_figure(fig, path)
