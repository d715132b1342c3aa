r"""Find the circuit behind a memorization decision (stage 3 of the memcirc pipeline).

Reads <output-dir>/contrastive/pairs.jsonl (discovery split), or with --task generates a standard
circuit task's pairs (ioi, greater_than, sva, gender, induction) for the model's tokenizer, scores
every edge of auto-circuit's factorized graph by mask gradients (EAP-IG; --ig-steps 0 = plain EAP)
and finds the smallest top-k circuit whose faithfulness F = (M(circuit) - M(empty)) / (M(full) -
M(empty)) reaches --target.
Writes <output-dir>/circuits/ (circuits-<task>/ with --task, which also holds the task's pairs.jsonl):
prune_scores.safetensors, circuit.json, summary.json,
faithfulness_curve.png, circuit.png, manifest.json (last).

examples:
  python find_circuits.py --config configs/testbed.yaml --output-dir runs/testbed
  python find_circuits.py --model path/to/smollm2 --task ioi --output-dir runs/smol   # -> runs/smol/circuits-ioi/
  python find_circuits.py --model EleutherAI/gpt-neo-125m --output-dir runs/neo --ig 5 \
      --ablation resample --faithfulness-metric logit_diff --target 0.85 --dtype float32
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import CircuitOptions, TaskSource


@dataclass
class CircuitsConfig(TaskSource, CircuitOptions, StageConfig):
    """find_circuits: EAP-IG edge attribution (auto-circuit) and the minimal faithful circuit."""

    stage: ClassVar[str] = "find_circuits"

    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)

    @property
    def stage_dir(self) -> Path:
        return self.task_folder(super().stage_dir)

    def needs_auto_circuit(self) -> bool:
        return True


Config = CircuitsConfig
