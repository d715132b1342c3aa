"""`memcirc <command> [flags]`, the console command (also `python -m memcirc <command>`).

A stage's command is its short name or its stage name: `memcirc score` = `memcirc memorization_score`
= `python memorization_score.py` (the same `memcirc.cli.main`). `memcirc report RUN`, `memcirc
slurm ...` and `memcirc pipeline ...` are `python -m memcirc.report`, `python -m memcirc.slurm` and
`python -m memcirc.pipeline` (what run_pipeline.sh runs). The names are the stage
registry's (memcirc.stages.registry); nothing heavy is imported before a stage parses its flags.
"""

from __future__ import annotations

import importlib
import sys

from memcirc import __version__
from memcirc.stages.registry import STAGES

TOOLS = {   # command -> (module whose main(argv) it runs, its line in `memcirc --help`)
    "pipeline": ("memcirc.pipeline", "preflight, the config's stages and the report in one process"),
    "report": ("memcirc.report", "the run report of a run folder: memcirc report RUN"),
    "slurm": ("memcirc.slurm.__main__", "the pipeline as SLURM jobs: submit, grid, status, wait"),
}


def _summary(stage_name: str) -> str:
    """The first line of the stage's Config docstring, without its "<stage>: " head."""
    doc = (STAGES[stage_name].config.__doc__ or "").strip().splitlines()
    return doc[0].split(": ", 1)[-1] if doc else ""


def usage() -> str:
    lines = ["usage: memcirc <command> [flags]      memcirc <command> --help: its flags and examples", "",
             "commands (the stage's name works too):"]
    lines += [f"  {s.command_name:<12} {_summary(s.name)}" for s in STAGES.values()]
    lines += [f"  {name:<12} {text}" for name, (_, text) in TOOLS.items()]
    lines += ["", "options:", "  -h, --help   show this help and exit",
              "  --version    print the memcirc version and exit"]
    return "\n".join(lines)


def stage_of(command: str) -> str | None:
    """The stage name of a command (short name or stage name), or None."""
    for stage in STAGES.values():
        if command in (stage.command_name, stage.name):
            return stage.name
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "--version":
        print(f"memcirc {__version__}")
        return 0
    if command in TOOLS:
        return importlib.import_module(TOOLS[command][0]).main(rest)
    if (stage := stage_of(command)) is None:
        from memcirc.parsing import unknown_name

        known = [s.command_name for s in STAGES.values()] + list(TOOLS)
        print(f"error: {unknown_name('command', command, known)} (see memcirc --help)", file=sys.stderr)
        return 2
    from memcirc.cli import main as run_stage

    return run_stage(stage, rest, prog=f"memcirc {STAGES[stage].command_name}")


if __name__ == "__main__":
    raise SystemExit(main())
