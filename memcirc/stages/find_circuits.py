"""The find_circuits stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import CircuitOptions, StageConfig, option


@dataclass
class CircuitsConfig(CircuitOptions, StageConfig):
    """find_circuits: EAP-IG edge attribution (auto-circuit) and the minimal faithful circuit."""

    stage: ClassVar[str] = "find_circuits"

    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)


Config = CircuitsConfig


def run(cfg: CircuitsConfig) -> Any:
    from memcirc.circuits import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    return (f"circuit: {summary['minimal_edges']} of {summary['edges_total']} edges reach faithfulness "
            f"{summary['faithfulness']:.3f} on discovery pairs (target {summary['target']})")
