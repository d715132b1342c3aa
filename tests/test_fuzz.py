"""The fuzz table (issue 12): every case of the reliability review that needs no GPU, plus our own, each
held to memcirc's promise for bad input (exit 2, exactly one `error:` line, nothing partial left) or to
the behaviour its `reason` documents. The table is tests/fuzz/ (cases_*.py); a case id is its test id,
so pytest's counts are "held / tried".

In-process cases run through `memcirc.cli.main`; the cases that need upstream artifacts read one tiny
finished 8-stage run (module-scoped, about 30 s on one CPU thread). Locks, signals and run_pipeline.sh
run as real processes (`test_process_case`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fuzz import runner
from fuzz.table import CONFIG, REVIEW_IDS, Case, Ctx, all_cases

from memcirc.cli import main

CASES = all_cases()
IN_PROCESS = [c for c in CASES if not c.process and c.covered_by is None]
PROCESS = [c for c in CASES if c.process]
COVERED = [c for c in CASES if c.covered_by is not None]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 8 stages on the testbed, each as cheap as it goes; read-only for the cases."""
    run = tmp_path_factory.mktemp("fuzz-run")
    for stage, argv in runner.tiny_run_steps(run):
        assert main(stage, argv) == 0, stage
    return run


@pytest.fixture(scope="module")
def other_scores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Memorization scores of another model (the testbed's step-652 checkpoint)."""
    from fuzz.table import CHECKPOINTS

    run = tmp_path_factory.mktemp("fuzz-other")
    assert main("memorization_score", ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(run),
                                       "--model", str(CHECKPOINTS / "step-652"), "--limit", "112",
                                       "--metrics", "exact"]) == 0
    return run


@pytest.fixture(scope="module")
def score_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted stage 1 with the real-process cases' arguments (in-process: the same bytes)."""
    from fuzz.process import SCORE

    # named "out" like the real-process cases' run: figures print their run's folder name
    run = tmp_path_factory.mktemp("fuzz-score-ref") / "out"
    assert main("memorization_score", [*SCORE, "--output-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def kfac_ref(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    from fuzz.process import KFAC

    run = tmp_path_factory.mktemp("fuzz-kfac-ref") / "out"
    assert main("kfac_edit", ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(run), "--input-dir",
                              str(tiny_run / "memorization"), *KFAC]) == 0
    return run


@pytest.fixture(scope="module")
def contended(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cc1, cc2: two more runs on a folder a stopped stage-1 run holds (tests/fuzz/process.py)."""
    from fuzz.process import contend

    return contend(tmp_path_factory.mktemp("fuzz-contended"))


FIXTURES = {"run": "tiny_run", "other": "other_scores", "score_ref": "score_ref", "kfac_ref": "kfac_ref",
            "contended": "contended"}


def context(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Ctx:
    ctx = Ctx(tmp_path, monkeypatch=monkeypatch)
    for need in sorted(runner.needs(case)):
        path = request.getfixturevalue(FIXTURES[need])
        if need in ("run", "other"):
            setattr(ctx, need, path)
        else:
            ctx.extra[need] = path if need == "contended" else str(path)
    return ctx


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_case(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              request: pytest.FixtureRequest) -> None:
    ctx = context(case, tmp_path, monkeypatch, request)
    if case.run is not None:
        case.run(ctx)
        return
    rc, out, err, argv = runner.run_in_process(case, ctx, capsys)
    runner.check(case, ctx, rc, out, err, argv)


@pytest.mark.parametrize("case", PROCESS, ids=[c.id for c in PROCESS])
def test_process_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      request: pytest.FixtureRequest) -> None:
    assert case.run is not None
    case.run(context(case, tmp_path, monkeypatch, request))


@pytest.mark.parametrize("case", COVERED, ids=[c.id for c in COVERED])
def test_covered_elsewhere(case: Case) -> None:
    runner.check_covered(case)


def test_the_table_has_every_review_case() -> None:
    ids = {c.id for c in CASES}
    missing = [i for i in REVIEW_IDS if i not in ids]
    assert len(REVIEW_IDS) == 117 and not missing, missing
    assert all(c.review and c.owner for c in CASES), [c.id for c in CASES if not (c.review and c.owner)]
