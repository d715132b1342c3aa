r"""Bypass the attention of each block (self-only attention, or zero/mean ablation) and measure
memorization of the memorized windows against held-out perplexity (stage 5 of the memcirc pipeline).

Reads <output-dir>/memorization/ (or --memorized-file) and writes <output-dir>/bypass/: summary.json
(baseline and one entry per block / block set: exact, token_match, loose_match, ..., ppl),
tradeoff.png, log.txt, manifest.json (last).

examples:
  python attention_bypass.py --config configs/testbed.yaml --output-dir runs/testbed
  python attention_bypass.py --output-dir runs/testbed --mode zero --layer-sets 0,1 2,3
  python attention_bypass.py --model EleutherAI/gpt-neo-1.3B --memorized-file memorized.npy \
      --output-dir runs/neo --lm-eval-tasks lambada_openai
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import HeldoutEval, LmEval


@dataclass
class BypassConfig(HeldoutEval, LmEval, StageConfig):
    """attention_bypass: per-block attention interventions, memorization vs general ability."""

    stage: ClassVar[str] = "attention_bypass"

    mode: str = option("self", "self: each token attends only to itself (the paper's intervention); "
                       "zero: attention output zeroed; mean: attention output replaced by its mean over "
                       "the held-out reference text", choices=("self", "zero", "mean"))
    layers: list[int] = option([], "bypass only these blocks, one run each (default: every block)")
    layer_sets: list[str] = option([], "block sets to bypass together, run after the single blocks, e.g. 0,1 2,3")
    memorized_file: str | None = option(None, "score these windows instead of the upstream memorized set "
                                        "(JSONL/Parquet with tokens, or the llm-memorization .npy format)")
    # not hashed: a run without --stress keeps the fingerprint it had before the option existed; the
    # stage adds the stress plan to the fingerprint when it is on (a toggle is a changed run)
    stress: bool = option(False, "bypass the run that lowers exact match most (ties: the lower perplexity) and "
                          "measure memorization under prefix perturbations before and after: a 'stress' block "
                          "in summary.json and stress.png (memcirc/stress.py)", hashed=False)
    batch_size: int = option(32, "sequences per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)


Config = BypassConfig
