"""The training_dynamics stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import CircuitOptions, MemorizedRule, StageConfig, option


@dataclass
class DynamicsConfig(MemorizedRule, CircuitOptions, StageConfig):
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
    pairs_dir: str | None = option(None, "contrastive stage folder with the pairs (default: "
                                   "<output-dir>/contrastive)")
    checkpoint_index: int | None = option(None, "run only this checkpoint's unit (default: SLURM_ARRAY_TASK_ID "
                                          "in a job array, else every checkpoint)", minimum=0, hashed=False)
    merge: bool = option(False, "only aggregate finished checkpoint units into the stage outputs", hashed=False)
    batch_size: int = option(32, "windows / pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)
    chunk_size: int = option(256, "windows per resumable scoring chunk inside a checkpoint unit", minimum=1,
                             hashed=False)


Config = DynamicsConfig


def run(cfg: DynamicsConfig) -> Any:
    from memcirc.dynamics import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's lines in the run report: onsets, and the circuit at each checkpoint."""
    onset = ", ".join(f"{g}: {v if v is not None else 'never'}" for g, v in summary["onset_by_group"].items())
    lines = [f"training dynamics ({summary['n_checkpoints']} checkpoints): memorization onset (median step) "
             f"{onset}"]
    if summary["circuits"]:
        per = ", ".join(f"{c['step']}: {_or_dash(c['circuit_edges'], 'd')}/{_or_dash(c['faithfulness_heldout'])}"
                        f"/{_or_dash(c['jaccard_final'])}{'*' if c['ill_conditioned'] else ''}"
                        for c in summary["checkpoints"])
        lines.append(f"circuit over training (step: edges/held-out F/Jaccard with final; * ill-conditioned) {per}")
    return "\n".join(lines)


def _or_dash(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)
