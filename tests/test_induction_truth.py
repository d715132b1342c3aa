"""The induction ground truth of the testbed (issue: circuits over training): a negative one.

Testbed v2 saw 256 repeated random segments and formed no induction head (memcirc/testbed/README.md,
"Induction: a negative result"). Two independent measurements must agree on that: the build's own
probe loss over training (`ground_truth.json`, every 10 steps) and training_dynamics' head scores and
`--task induction` circuits over the recorded checkpoints, which must report the task unsolved rather
than a circuit that does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcirc.cli import main
from memcirc.testbed import GROUND_TRUTH

PAIRS = 64          # 32 discovery, 32 held-out
WINDOWS = 16        # the memorization part of each unit is not under test here


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("induction")
    assert main("memorization_score", ["--output-dir", str(root), "--limit", str(WINDOWS)]) == 0
    assert main("training_dynamics", ["--output-dir", str(root), "--task", "induction", "--task-pairs", str(PAIRS),
                                      "--limit", str(WINDOWS), "--bootstrap-resamples", "100"]) == 0
    return root / "dynamics-induction"


def test_the_build_probe_never_shows_copying() -> None:
    """The build's held-out probes: the second copy never costs less than 90 % of the first."""
    probe = read(GROUND_TRUTH)["induction"]["probe_loss"]
    assert len(probe) > 80 and all(p["loss_second_copy"] > 0.9 * p["loss_first_copy"] for p in probe)


def test_no_head_becomes_an_induction_head_at_any_checkpoint(run: Path) -> None:
    heads = read(run / "heads.json")
    assert [r["step"] for r in heads["checkpoints"]] == [c["step"] for c in read(GROUND_TRUTH)["checkpoints"]]
    for row in heads["checkpoints"]:
        best = max(v for layer in row["scores"]["induction"] for v in layer)
        assert best < 0.1, (row["step"], best)                      # an induction head attends > 0.5 (SmolLM2: 0.88)
        assert row["repeated_loss"]["gain"] < 1.0                   # SmolLM2 saves 11.6 nats
        assert set(row["role_overlap_final"]) == {"induction", "previous_token", "duplicate_token", "successor",
                                                  "copy_suppression"}


def test_the_induction_task_is_reported_unsolved(run: Path) -> None:
    summary = read(run / "summary.json")
    assert summary["task"] == "induction" and summary["pairs"]["heldout"] == PAIRS // 2
    for c in summary["checkpoints"]:
        # the whole model barely prefers the token an induction head would copy: a logit difference of
        # a tenth of a nat and chance accuracy, so a "circuit" there explains noise
        assert c["heldout_accuracy"] is not None and c["heldout_accuracy"] < 0.8
        assert c["heldout_metric_full"] is not None and abs(c["heldout_metric_full"]) < 1.0
        assert c["heads"]["induction_head_score"] < 0.1
