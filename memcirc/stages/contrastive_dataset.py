"""The contrastive_dataset stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import MemorizedRule, StageConfig, option
from memcirc.errors import InputError


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
    drop: float = option(0.3, "divergence: relative score drop that marks the break")
    low_max_lcp: int = option(0, "dataset mode: a non-memorized context reproduces at most this many "
                              "suffix tokens", minimum=0)
    similarity: str = option("embedding", "dataset mode: rank candidates by cosine of mean-pooled last "
                             "hidden states ('embedding') or Jaccard of token sets ('token_overlap')",
                             choices=("embedding", "token_overlap"))
    heldout_fraction: float = option(0.3, "fraction of documents whose pairs go to the held-out split")
    batch_size: int = option(32, "sequences per forward pass / generation batch",
                             aliases=("--batch_size",), minimum=1, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError("config key 'heldout_fraction' must be between 0 and 1 (exclusive)")
        if not 0.0 < self.drop < 1.0:
            raise InputError("config key 'drop' must be between 0 and 1 (exclusive)")



Config = ContrastiveConfig


def run(cfg: ContrastiveConfig) -> Any:
    from memcirc.contrastive import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    return (f"contrastive ({summary['mode']}): {summary['n_pairs']} pairs ({summary['n_discovery']} discovery, "
            f"{summary['n_heldout']} held-out) from {summary['n_memorized']} memorized windows")
