"""examples/: each script runs on the testbed and prints what it promises."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

EXAMPLE = REPO / "examples" / "score_and_edit.py"


def run_example(*args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def still_exact(line: str) -> int:
    """N of a '...: N of M memorized texts still exact' line."""
    found = re.search(r": (\d+) of \d+ memorized texts still exact", line)
    assert found is not None, line
    return int(found.group(1))


def test_score_and_edit(scored, kfac_run):
    stdout = run_example("--limit", "112", "--kfac", str(kfac_run), "--show", "2")
    rows = [json.loads(line) for line in (scored / "memorization" / "scores.jsonl").read_text().splitlines()]
    n = sum(r["exact"] for r in rows)            # the stage's count on the same 112 canaries
    lines = stdout.splitlines()
    assert f": {n} of 112 texts memorized" in lines[0] and n > 0
    shown = re.findall(r"text (canary-k\d+-\d+): '(.*)'\n +-> '(.*)'", stdout)
    assert [doc for doc, _, _ in shown] == [r["doc"] for r in rows if r["exact"]][:2]
    assert "closest miss" in stdout
    bypassed = next(line for line in lines if line.startswith("attention of block 1 bypassed"))
    kept = still_exact(bypassed)
    assert kept < n and f"bypass removed again: {n} of {n} memorized texts still exact" in stdout
    edit = next(line for line in lines if line.startswith("K-FAC edit"))
    summary = json.loads((kfac_run / "kfac" / "summary.json").read_text())
    assert "rho=0.6" in edit and "from edited_model" in edit and "2 weight matrices" in edit
    assert still_exact(edit) < n
    assert summary["saved"]["rho"] == 0.6 and f"edit undone: {n} of {n}" in stdout


def test_without_a_kfac_run_the_example_says_how_to_get_one():
    stdout = run_example("--limit", "20", "--show", "1")
    assert "pass --kfac <run folder>" in stdout.splitlines()[-1]
