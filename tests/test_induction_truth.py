"""The induction ground truth on the testbed's own checkpoints (issue: circuits over training).

The build recorded the two checkpoints around the induction phase change (`ground_truth.json`,
`induction.phase_change`). training_dynamics --task induction over the testbed checkpoints must find,
from the checkpoints alone: the best induction head's score and the loss saved on repeated tokens
jumping together between exactly those two; the task unsolved before it; and at the final checkpoint
an induction circuit (the previous-token head feeding the induction head's key) that holds on
held-out pairs (verify_circuit) and beats random circuits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcirc.cli import main
from memcirc.testbed import GROUND_TRUTH

PAIRS = 96          # 48 discovery, 48 held-out
WINDOWS = 16        # the memorization part of each unit is not under test here


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("induction")
    common = ["--output-dir", str(root), "--task", "induction", "--task-pairs", str(PAIRS)]
    assert main("memorization_score", ["--output-dir", str(root), "--limit", str(WINDOWS)]) == 0
    assert main("training_dynamics", [*common, "--limit", str(WINDOWS)]) == 0
    assert main("find_circuits", common) == 0
    assert main("verify_circuit", ["--output-dir", str(root), "--task", "induction", "--ablations", "resample",
                                   "--random-circuits", "10"]) == 0
    return root


def test_the_induction_score_and_the_repeated_token_loss_jump_at_the_recorded_phase_change(run: Path) -> None:
    change = read(GROUND_TRUTH)["induction"]["phase_change"]
    heads = read(run / "dynamics-induction" / "heads.json")
    rows = heads["checkpoints"]
    steps = [r["step"] for r in rows]
    score = [r["induction_head_score"] for r in rows]
    gain = [r["repeated_loss"]["gain"] for r in rows]
    i = steps.index(change["after_step"])
    assert steps[i - 1] == change["before_step"]
    # the largest rise of both between consecutive checkpoints is at the recorded one
    rises = [(score[j] - score[j - 1], gain[j] - gain[j - 1]) for j in range(1, len(rows))]
    assert max(range(len(rises)), key=lambda j: rises[j][0]) + 1 == i
    assert max(range(len(rises)), key=lambda j: rises[j][1]) + 1 == i
    assert score[i - 1] < 0.2 < 0.5 < score[i] and gain[i - 1] < 1.0 < 3.0 < gain[i]


def test_before_the_phase_change_the_task_is_not_solved(run: Path) -> None:
    change = read(GROUND_TRUTH)["induction"]["phase_change"]
    summary = read(run / "dynamics-induction" / "summary.json")
    by_step = {c["step"]: c for c in summary["checkpoints"]}
    before, final = by_step[change["before_step"]], summary["checkpoints"][-1]
    assert before["heldout_accuracy"] < 0.5 < 0.9 < final["heldout_accuracy"]
    assert before["heldout_metric_full"] < 0.25 * final["heldout_metric_full"]


def test_the_induction_circuit_is_found_at_the_final_checkpoint(run: Path) -> None:
    heads = read(run / "dynamics-induction" / "heads.json")
    final = heads["checkpoints"][-1]
    assert final["k_composition"] and final["induction_head_out"]       # previous-token head -> induction head
    assert heads["previous_token_head"] < heads["induction_head"]         # in a lower layer ("L0H.." < "L1H..")
    verify = read(run / "verify-induction" / "summary.json")
    assert verify["faithfulness_heldout"] >= 0.85
    assert verify["faithfulness_heldout_ci"][0] > verify["random_faithfulness_ci"][1]
    circuit = read(run / "circuits-induction" / "circuit.json")
    ind, prev = heads["induction_head"], heads["previous_token_head"]
    edge = f"A{prev[1]}.{prev[3:]}->A{ind[1]}.{ind[3:]}.K"
    assert edge in {e["edge"] for e in circuit["circuit"]}
