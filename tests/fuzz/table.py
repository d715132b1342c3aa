"""The case record, the context a builder writes into, and the whole table."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "testbed.yaml"
TESTBED_MODEL = REPO / "memcirc" / "testbed" / "model"
CHECKPOINTS = REPO / "memcirc" / "testbed" / "checkpoints"

# Folder states after the command:
NOTHING = "nothing"      # the stage folder does not exist (nothing partial left)
COMPLETE = "complete"    # manifest.json says complete; no chunks/, no temp files
UNCHANGED = "unchanged"  # every file under the output dir is byte-identical to before the command
RESUMABLE = "resumable"  # no manifest.json and no temp file: a re-run resumes
ANY = "any"              # the case checks what it needs itself

# The review's 117 case ids (issue 12's reliability review), in its order.
REVIEW_IDS = (
    "c01 c02 c03 c04 c05 c06 c07 c08 c09 c10 c11 c11b c12 d01 d02 d03 d04 d05 d06 d07 d08 d09 d10 d11 d12 "
    "d13 d14 d15 d16 n01 n02 n03 n04 n05 n06 n07 n08 p01 p02 p03 p04 p05 s01 s02 h01 m01 m02 m03 m04 m05 "
    "m07 m06 g01 g02 k01 k02 k03 k04 k05 k06 r01 r02 f01 f02 f03 f04 cc1 cc2 t01 t02 t03 t04 t05 u01 u02 "
    "u03 u04 u05 u07 u06 v01 v02 v03 e01 e02 e03 e04 k07 k08 k09 k10 k11 k12 k13 k14 k15 b01 b02 b03 b04 "
    "q01 q02 q03 y01 y02 y03 y04 y05 y06 w01 w02 w03 w04 w05 w06 w07 rr").split()


@dataclass
class Ctx:
    """Where one case runs: its own tmp folder, and the shared read-only upstream runs."""

    tmp: Path
    run: Path | None = None          # the tiny finished 8-stage run (read-only)
    other: Path | None = None        # memorization scores of another model (step-652; read-only)
    monkeypatch: Any = None
    snapshot: dict[Path, bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # builders' values; the str ones are placeholders

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def marker(self) -> Path:
        """The file every malicious payload of the table tries to create."""
        return self.tmp / "PWNED"

    def fields(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "out": str(self.out), "run": str(self.run), "other": str(self.other),
                "config": str(CONFIG), "repo": str(REPO), "model": str(TESTBED_MODEL),
                "ckpt": str(CHECKPOINTS), "marker": str(self.marker),
                **{k: v for k, v in self.extra.items() if isinstance(v, str)}}

    def copy_stage(self, folder: str, dest: Path | None = None, source: Path | None = None) -> Path:
        """A writable copy of one of the run's stage folders (tmp/up/<folder> by default)."""
        assert self.run is not None, "the case must declare needs=('run',)"
        target = dest or self.tmp / "up" / folder
        shutil.copytree((source or self.run) / folder, target)
        return target


@dataclass(frozen=True)
class Case:
    """One hostile input or fault and what memcirc must do with it.

    `argv` follows the common prefix (`--config {config} --device cpu --output-dir {out}` and the
    stage's FAST flags, unless `prefix=False`); `{tmp}`, `{out}`, `{run}`, ... are filled from the Ctx.
    `words` must all occur (case-insensitive) in the one stderr line for a failure, in stdout+stderr
    for a success. `reason` says why the intended behaviour differs from the naive promise.
    """

    id: str
    review: str                      # the review's verdict and notes, or "new: ..." for our own
    stage: str                       # a stage name (run in-process), or "run_pipeline.sh" (a real process)
    argv: tuple[str, ...] = ()
    rc: int = 2
    words: tuple[str | tuple[str, ...], ...] = ()   # a tuple inside: any one of its spellings
    state: str = NOTHING
    build: Callable[[Ctx], None] | None = None
    reason: str | None = None
    owner: str = ""                  # the helper whose area a failure of this case is in
    needs: tuple[str, ...] = ()      # fixtures beyond {run}/{other}: score_ref, kfac_ref, contended (test_fuzz)
    check: Callable[[Ctx, str], None] | None = None   # more checks, given stdout + stderr
    stdin: str | None = None
    prefix: bool = True
    fast: bool = True                # also prepend the stage's FAST flags
    max_chars: int | None = None     # the error line is at most this long
    late: bool = False               # found after the first long step: INFO lines may precede the error line
    covered_by: str | None = None    # held by another test file (the test checks that test exists)
    process: bool = False            # a real-process case (tests/fuzz/process.py)
    run: Callable[[Ctx], None] | None = None   # a case that runs its own commands (multi-step)


def all_cases() -> list[Case]:
    from fuzz import cases_config, cases_data, cases_lifecycle, cases_models, cases_stages, process

    cases = [*cases_config.CASES, *cases_data.CASES, *cases_models.CASES, *cases_stages.CASES,
             *cases_lifecycle.CASES, *process.CASES]
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate fuzz case ids: {duplicates}"
    return cases
