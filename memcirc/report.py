"""`python -m memcirc.report RUN_DIR`: the headline numbers of a finished run, printed last."""

from __future__ import annotations

import sys
from pathlib import Path

from memcirc.artifacts import SUMMARY_JSON, read_json, read_manifest
from memcirc.errors import InputError
from memcirc.scoring import format_summary


def report(run_dir: Path) -> str:
    stage_dir = run_dir / "memorization"
    read_manifest(stage_dir)
    summary = read_json(stage_dir / SUMMARY_JSON)
    return f"memorization ({stage_dir}): exact-match rate per group\n{format_summary(summary)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m memcirc.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(report(Path(args[0])))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
