"""`python -m memcirc.report RUN_DIR`: the headline numbers of a finished run, printed last.

One headline per finished stage, in pipeline order, each written by its stage from its summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memcirc.errors import InputError
from memcirc.manifest import finished_summary
from memcirc.stages.registry import STAGES


def report(run_dir: Path) -> str:
    lines = []
    for stage in STAGES.values():
        stage_dir = Path(run_dir) / stage.folder
        summary = finished_summary(stage_dir)
        if summary is None:
            if not stage.needs:   # the first stage: without it there is no run to report
                raise InputError(f"{run_dir} holds no finished {stage.folder} stage")
            continue
        lines.append(stage.headline(summary, stage_dir))
    return "\n".join(lines)


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
