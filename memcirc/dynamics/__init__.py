"""Memorization and circuits across training checkpoints: the library of the training_dynamics stage.

- `checkpoints`: the sweep's checkpoint list (`CheckpointList` -> `resolve_checkpoints`), Pythia
  schedules, and which unit an array task runs. Cheap to import (no torch).
- `onsets`: the pure onset, overlap and Jaccard math over finished units.
- `units`: one checkpoint unit (fingerprint, status, `run_unit`) and the architecture checks.
- `figures`: the stage's three figures, drawn from its summary and overlap data.

The orchestration (reading the inputs, the lifecycle, the merge) is `memcirc.stages.training_dynamics`.
"""

from memcirc.dynamics.checkpoints import CheckpointList, resolve_checkpoints

__all__ = ["CheckpointList", "resolve_checkpoints"]
