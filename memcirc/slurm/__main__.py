"""`python -m memcirc.slurm submit|grid|status|wait`: the command line (see memcirc.slurm)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import memcirc.slurm
from memcirc.errors import InputError
from memcirc.parsing import Parser
from memcirc.pipeline import stage_argv
from memcirc.slurm.grid import plan_grid
from memcirc.slurm.plan import REPO, plan_pipeline
from memcirc.slurm.render import check_script_path
from memcirc.slurm.settings import EXPERIMENTS, Settings, read_settings
from memcirc.slurm.status import POLL_S, status_report, wait
from memcirc.slurm.submit import submit
from memcirc.stages.registry import DEFAULT_PIPELINE


def _run_dir(path: str) -> Path:
    return Path(os.path.abspath(path))


def _python(explicit: str | None, settings: Settings) -> str:
    chosen = settings.python or explicit or sys.executable
    # absolute, but not resolved: a virtualenv's python is a symlink that must stay one
    return os.path.abspath(chosen) if os.sep in chosen else chosen




def _poll_seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):   # nan/inf would fail in time.sleep, 0 would spin
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _add_submit_options(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config", required=name == "grid", help="the run's YAML config (with a slurm: section)")
    p.add_argument("--output-dir", required=True, help="run root")
    p.add_argument("--num-shards", type=int, help="array size of scoring and K-FAC factor collection "
                                                  "(default: slurm.num_shards, else 1)")
    p.add_argument("--python", help="interpreter on the nodes (default: slurm.python, else this one)")
    p.add_argument("--common-arg", action="append", default=[], metavar="ARG",
                   help="a flag for every stage (repeat; --common-arg=--device)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the jobs, then print the status report")
    p.add_argument("--poll", type=_poll_seconds, default=POLL_S, help="seconds between status polls with --wait")
    if name == "submit":
        p.add_argument("--stages", nargs="+", default=list(DEFAULT_PIPELINE), help="stages to submit")
        p.add_argument("--stage-arg", action="append", default=[], metavar="STAGE=ARG",
                       help="a flag for one stage (repeat; --stage-arg=memorization_score=--prefix-len)")
        p.add_argument("--no-report", action="store_true", help="no final memcirc.report job")
    else:
        p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), help="experiments to submit")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m memcirc.slurm", description=(memcirc.slurm.__doc__ or "").split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, help_text in (("submit", "submit pipeline stages as jobs"),
                            ("grid", "submit the verify_scripts/ experiment grid")):
        _add_submit_options(sub.add_parser(name, help=help_text), name)
    for name in ("status", "wait"):
        p = sub.add_parser(name, help="report the latest submission" if name == "status" else
                           "wait for the latest submission, then report")
        p.add_argument("run_dir")
        p.add_argument("--poll", type=_poll_seconds, default=POLL_S, help="seconds between polls (wait)")
    return parser


def _report(args: argparse.Namespace) -> int:
    """status / wait: exit 0 done or running (wait: all completed), 1 something failed."""
    run_dir = _run_dir(args.run_dir)
    if args.command == "wait":
        return 0 if wait(run_dir, args.poll) else 1
    text, _, _ = status_report(run_dir)
    print(text)
    return 1 if "FAILED:" in text else 0


def _submit(args: argparse.Namespace) -> int:
    """submit / grid: plan the jobs (every stage's config checked), submit or print them."""
    run_dir = _run_dir(args.output_dir)
    check_script_path(run_dir, "--output-dir")   # before anything is planned, written or submitted
    check_script_path(REPO, "the memcirc checkout")
    config = os.path.abspath(args.config) if args.config else None
    settings = read_settings(config)
    python = _python(args.python, settings)
    if args.num_shards is not None and args.num_shards < 1:
        raise InputError(f"--num-shards must be >= 1, got {args.num_shards}")
    if args.command == "submit":
        jobs = plan_pipeline(args.stages, run_dir, config, settings, python=python, common=args.common_arg,
                             stage_args=stage_argv(args.stage_arg), num_shards=args.num_shards,
                             report=not args.no_report)
        what = {"command": "submit", "stages": args.stages}
    else:
        assert config is not None, "argparse requires --config for grid"
        jobs = plan_grid(args.experiments, run_dir, config, settings, python=python, common=args.common_arg,
                         num_shards=args.num_shards)
        what = {"command": "grid", "experiments": args.experiments}
    if not jobs:
        raise InputError("no stages to submit")
    submit(jobs, settings, run_dir, dry_run=args.dry_run, what={**what, "config": config})
    if args.wait and not args.dry_run:
        return 0 if wait(run_dir, args.poll) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _report(args) if args.command in ("status", "wait") else _submit(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
