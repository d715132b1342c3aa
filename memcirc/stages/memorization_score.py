"""The memorization_score stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import Sharding, StageConfig, option
from memcirc.errors import InputError


@dataclass
class ScoreConfig(Sharding, StageConfig):
    """memorization_score: score every window of a corpus."""

    stage: ClassVar[str] = "memorization_score"

    dataset: str = option("testbed", "Hub dataset id, local JSONL/Parquet/text/NPY file or folder, "
                          "or 'testbed'")
    dataset_config: str | None = option(None, "Hub dataset configuration name")
    split: str = option("train", "dataset split")
    streaming: bool = option(False, "stream a Hub dataset instead of downloading it whole")
    text_column: str = option("text", "column holding raw text")
    token_column: str | None = option(None, "column holding token ids (default: 'tokens' if present)")
    group_column: str = option("group", "optional column copied into each window's provenance")
    prefix_len: int = option(50, "prefix (prompt) tokens", aliases=("--prompt_tokens",), minimum=1)
    suffix_len: int = option(50, "suffix (continuation) tokens", aliases=("--generation_tokens",),
                             minimum=1)
    windowing: str = option("start", "'start': one window from each document start (Pythia "
                            "protocol); 'sliding': every stride tokens", choices=("start", "sliding"))
    stride: int | None = option(None, "sliding-window stride (default: prefix_len + suffix_len)",
                                minimum=1)
    metrics: list[str] = option(["exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy"],
                                "metrics to compute (token_match, bleu4, levenshtein need generation)",
                                choices=("exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy",
                                         "token_match", "bleu4", "levenshtein"))
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold")
    batch_size: int = option(32, "windows per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    padding_side: str = option("right", "padding side of the teacher-forced pass (generation "
                               "always left-pads)", choices=("left", "right"), hashed=False)
    chunk_size: int = option(256, "windows per resumable chunk file", minimum=1, hashed=False)

    GENERATION_METRICS: ClassVar[tuple[str, ...]] = ("token_match", "bleu4", "levenshtein")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.metrics:
            raise InputError("config key 'metrics' must name at least one metric")



Config = ScoreConfig


def run(cfg: ScoreConfig) -> Any:
    from memcirc.scoring import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], stage_dir: Path) -> str:
    """The stage's lines in the run report."""
    from memcirc.scoring import format_summary

    return f"memorization ({stage_dir}): exact-match rate per group\n" + format_summary(summary)
