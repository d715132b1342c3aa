r"""Build contrastive token-id pairs from memorized windows (stage 2 of the memcirc pipeline).

Reads <output-dir>/memorization/ and writes <output-dir>/contrastive/: pairs.jsonl (clean and
corrupt token ids of equal length, answer and wrong next-token ids, provenance, split),
summary.json, divergence.png, manifest.json (last).

examples:
  python contrastive_dataset.py --config configs/testbed.yaml --output-dir runs/testbed
  python contrastive_dataset.py --output-dir runs/testbed --contrastive-mode dataset --similarity embedding
  python contrastive_dataset.py --output-dir runs/x --memorized-by token_match --threshold 0.75 --metric bleu
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import MemorizedRule


@dataclass
class ContrastiveConfig(MemorizedRule, StageConfig):
    """contrastive_dataset: token-id pairs (clean, corrupt, answer, wrong) for circuit discovery."""

    stage: ClassVar[str] = "contrastive_dataset"

    contrastive_mode: str = option("divergence", "'divergence': where memorization breaks (branch "
                                   "decision); 'dataset': memorized vs non-memorized contexts "
                                   "(memorization decision)", aliases=("--contrastive_mode",),
                                   choices=("divergence", "dataset"))
    metric: str = option("bleu", "score that drives divergence detection: 'bleu' (BLEU-4) or "
                         "'memorization' (token accuracy), as memorization_circuits' --metric",
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
