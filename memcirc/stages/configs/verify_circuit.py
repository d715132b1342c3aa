r"""Verify a circuit on held-out pairs (stage 4 of the memcirc pipeline).

Reads <output-dir>/circuits/ (prune scores, minimal circuit size) and, through its manifest, the
contrastive pairs; evaluates the top-k circuit on the held-out split under each ablation type
(baselines recomputed per ablation) against random circuits of the same size. Refuses prune scores
computed for another model or another pairs file. Writes <output-dir>/verify/: summary.json,
faithfulness_vs_edges.png, manifest.json (last).

examples:
  python verify_circuit.py --config configs/testbed.yaml --output-dir runs/testbed
  python verify_circuit.py --output-dir runs/neo --model EleutherAI/gpt-neo-125m \
      --ablations resample zero mean --random-circuits 20 --edge-counts 14 141 332
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import ABLATIONS, BootstrapOptions, TaskChoice


@dataclass
class VerifyConfig(TaskChoice, BootstrapOptions, StageConfig):
    """verify_circuit: the circuit on held-out pairs, per ablation, against random circuits."""

    stage: ClassVar[str] = "verify_circuit"

    ablations: list[str] = option(list(ABLATIONS), "ablation types to evaluate", choices=ABLATIONS)
    random_circuits: int = option(10, "random circuits of the same size", minimum=1)
    edge_counts: list[int] = option([], "extra edge counts to report (default: a log-spaced list)")
    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)

    @property
    def stage_dir(self) -> Path:
        return self.task_folder(super().stage_dir)

    @property
    def upstream_dir(self) -> Path | None:
        """--input-dir, else the circuits folder (circuits-<task>/ with --task)."""
        upstream = super().upstream_dir
        return upstream if self.input_dir or upstream is None else self.task_folder(upstream)

    def needs_auto_circuit(self) -> bool:
        return True


Config = VerifyConfig
