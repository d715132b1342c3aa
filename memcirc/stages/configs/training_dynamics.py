r"""Memorization and circuits across training checkpoints (the training_dynamics stage of memcirc).

For each checkpoint (Hub revisions of --model such as Pythia's step1000 ... step143000, listed or
built by --schedule linear|log|exp_plus_detail; local checkpoint folders; the testbed's own
checkpoints by default) re-scores the windows of <output-dir>/memorization/ and, with the pairs of
<output-dir>/contrastive/, runs attribution, the minimal circuit and its held-out faithfulness.
Each checkpoint is one unit, <output-dir>/dynamics/checkpoints/<index>/ (scores.jsonl,
prune_scores.safetensors, circuit.json, done.json last), so it can be a SLURM array task. Once
every unit is done, the merge (merge_units; --merge runs only this step) merges the finished units
into onsets.jsonl, overlap.json, summary.json, memorization_over_training.png,
circuit_over_training.png, overlap_heatmap.png and manifest.json (last) in <output-dir>/dynamics/.

examples:
  python training_dynamics.py --config configs/testbed.yaml --output-dir runs/testbed
  python training_dynamics.py --output-dir runs/p160 --model EleutherAI/pythia-160m --schedule log \
      --schedule-points 10 --dtype float32
  python training_dynamics.py --output-dir runs/x --checkpoints ckpts/step-100 ckpts/step-200 ckpts/final \
      --steps 100 200 300 --no-circuits
  sbatch --array=0-9 ... python training_dynamics.py --output-dir runs/p160 --schedule log   # one unit each
  python training_dynamics.py --output-dir runs/p160 --schedule log --merge                  # then merge
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import CircuitOptions, MemorizedRule, TaskSource
from memcirc.options import SHARDING


@dataclass
class DynamicsConfig(MemorizedRule, TaskSource, CircuitOptions, StageConfig):
    """training_dynamics: memorization and circuits across training checkpoints."""

    stage: ClassVar[str] = "training_dynamics"

    checkpoints: list[str] = option([], "revisions of --model (e.g. step1000) or local checkpoint folders, in "
                                    "training order (default for the testbed: its checkpoints, then the final "
                                    "model)")
    steps: list[int] = option([], "training step of each local checkpoint folder (default: the number at the "
                              "end of its name, e.g. step-222)")
    schedule: str | None = option(None, "build the revision list by name, Pythia-style stepN snapped to the "
                                  "revisions Pythia has: linear (every schedule_every steps, plus the end), log "
                                  "(schedule_points log-spaced revisions) or exp_plus_detail (Tigges et al.: "
                                  "2^0..2^9, then 1k..15k by 1k, 20k..65k by 5k, 70k..140k by 10k, 143k; pass "
                                  "--schedule-start 0 for the 2^i steps)",
                                  choices=("linear", "log", "exp_plus_detail"))
    schedule_start: int = option(1000, "first step of the schedule", minimum=0)
    schedule_end: int = option(143000, "last step of the schedule", minimum=0)
    schedule_every: int = option(1000, "linear schedule: step spacing", minimum=1)
    schedule_points: int = option(8, "log schedule: number of checkpoints", minimum=2)
    circuits: bool = option(True, "run attribution, minimal circuit and faithfulness per checkpoint (needs "
                            "the contrastive stage's pairs)")
    head_scores: bool = option(True, "attention-head component scores per checkpoint: induction, previous-token, "
                               "duplicate-token, successor, copy suppression, and the loss on repeated random "
                               "tokens (memcirc.heads)")
    pairs_dir: str | None = option(None, "contrastive stage folder with the pairs (default: "
                                   "<output-dir>/contrastive)")
    checkpoint_index: int | None = option(None, "run only this checkpoint's unit (default: SLURM_ARRAY_TASK_ID "
                                          "in a job array, else every checkpoint)", minimum=0, hashed=False,
                                          group=SHARDING)
    merge: bool = option(False, "only aggregate finished checkpoint units into the stage outputs", hashed=False,
                         group=SHARDING)
    batch_size: int = option(32, "windows / pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)
    chunk_size: int = option(256, "windows per resumable scoring chunk inside a checkpoint unit", minimum=1,
                             hashed=False)

    @property
    def stage_dir(self) -> Path:
        return self.task_folder(super().stage_dir)

    def needs_auto_circuit(self) -> bool:
        return self.circuits


Config = DynamicsConfig
