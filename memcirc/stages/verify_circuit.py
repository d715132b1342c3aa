"""The verify_circuit stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import ABLATIONS, StageConfig, option


@dataclass
class VerifyConfig(StageConfig):
    """verify_circuit: the circuit on held-out pairs, per ablation, against random circuits."""

    stage: ClassVar[str] = "verify_circuit"

    ablations: list[str] = option(list(ABLATIONS), "ablation types to evaluate", choices=ABLATIONS)
    random_circuits: int = option(10, "random circuits of the same size", minimum=1)
    edge_counts: list[int] = option([], "extra edge counts to report (default: a log-spaced list)")
    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)


Config = VerifyConfig


def run(cfg: VerifyConfig) -> Any:
    from memcirc.verify import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    return (f"held-out: faithfulness {summary['faithfulness_heldout']:.3f}; random circuits of the same size "
            f"{summary['random_faithfulness_mean']:.3f} ± {summary['random_faithfulness_sd']:.3f}")
