"""The attention_bypass stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import HeldoutEval, StageConfig, option


@dataclass
class BypassConfig(HeldoutEval, StageConfig):
    """attention_bypass: per-block attention interventions, memorization vs general ability."""

    stage: ClassVar[str] = "attention_bypass"

    mode: str = option("self", "self: each token attends only to itself (the paper's intervention); "
                       "zero: attention output zeroed; mean: attention output replaced by its mean over "
                       "the held-out reference text", choices=("self", "zero", "mean"))
    layer_sets: list[str] = option([], "extra block sets to bypass together, e.g. 0,1 2,3")
    memorized_file: str | None = option(None, "score these windows instead of the upstream memorized set "
                                        "(JSONL/Parquet with tokens, or the llm-memorization .npy format)")
    lm_eval_tasks: list[str] = option([], "lm-evaluation-harness tasks (needs the lm-eval extra)")
    batch_size: int = option(32, "sequences per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)


Config = BypassConfig


def run(cfg: BypassConfig) -> Any:
    from memcirc.bypass import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    blocks = ", ".join(f"{e['layer']}: {e['exact']:.2f}/{e['ppl']:.1f}" for e in summary["layers"])
    return (f"attention bypass: baseline exact {summary['baseline']['exact']:.2f}, ppl "
            f"{summary['baseline']['ppl']:.1f}; per block exact/ppl {blocks}")
