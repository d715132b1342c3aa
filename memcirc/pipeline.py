"""`memcirc pipeline --config C --output-dir O [flags]`: the whole local pipeline in one process.

Runs what run_pipeline.sh ran as 8 + 3 processes: the model preflight (memcirc.preflight), each stage
of the config's `pipeline:` list in registry order through `memcirc.cli.main` (the same code as
`python <stage>.py`), then the run report (memcirc.report). torch, transformers, TransformerLens and
auto-circuit are imported once instead of once per stage: on a small model that start-up was most
of the pipeline's wall time (docs/contract.md exit codes; the first non-zero stage code stops it and
is returned, its error line the last line of stderr as before).

Each stage still loads its own model: stages change weights in place (kfac_edit edits and restores,
attention_bypass hooks), so a model shared between them would need a proof per stage that it is put
back bit for bit; on the testbed a load is well under a second. Between stages the `memcirc` logger
is put back as a fresh process has it (no handler holds records, no stage's log.txt stays open),
once-only warnings are re-armed and memory is collected. One difference stays: with a Hub model and
no network, the first stage's probe (memcirc.hub) turns offline mode on for the whole process, so
only that stage logs it and later stages do not wait for the probe again.

  memcirc pipeline --config configs/testbed.yaml --output-dir runs/testbed
  memcirc pipeline --config my.yaml --output-dir runs/x --from-stage find_circuits --device cpu \\
      --stage-arg=find_circuits=--batch-size --stage-arg=find_circuits=8
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import warnings
from pathlib import Path

from memcirc.config import pipeline_stages
from memcirc.errors import InputError, one_line
from memcirc.stages.registry import STAGES

PROG = "memcirc pipeline"
VALUED = ("--device", "--dtype", "--log-level", "--limit", "--seed", "--revision", "--model")
SWITCHES = ("--force", "--dry-run")
_DOC = __doc__ or ""


def _parser() -> argparse.ArgumentParser:
    """The pipeline's flags; the common ones every stage gets as typed."""
    own = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=_DOC.split("\n\n")[0],
                                  epilog="\n\n".join(_DOC.split("\n\n")[1:]),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    own.add_argument("--config", required=True, help="the YAML config (its pipeline: list names the stages)")
    own.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="the run root")
    own.add_argument("--from-stage", "--from_stage", dest="from_stage", help="first stage to run")
    own.add_argument("--to-stage", "--to_stage", dest="to_stage", help="last stage to run")
    own.add_argument("--stage-arg", dest="stage_args", action="append", default=[], metavar="STAGE=ARG",
                     help="one argument for one stage (repeat; any characters, e.g. --stage-arg=kfac_edit=--rhos)")
    common = own.add_argument_group("common flags (passed to every stage as typed)")
    for flag in VALUED:
        common.add_argument(flag, dest=flag[2:].replace("-", "_"))
    for flag in SWITCHES:
        common.add_argument(flag, dest=flag[2:].replace("-", "_"), action="store_true")
    return own


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed flags, the common flags in the order and spelling typed)."""
    args = _parser().parse_args(argv)   # --help, unknown flags and missing values: exit 2 with usage
    common: list[str] = []
    keep_next = False
    for token in argv:   # what is not the pipeline's own goes to every stage unchanged
        if keep_next or token.split("=", 1)[0] in VALUED + SWITCHES:
            common.append(token)
            keep_next = not keep_next and "=" not in token and token in VALUED
    return args, common


def selected_stages(config: str, first: str | None, last: str | None) -> list[str]:
    """The config's stages from `first` to `last` (both default to its ends), in registry order."""
    if not Path(config).is_file():
        raise InputError(f"config file not found: {config}")
    stages = pipeline_stages(config)

    def index(name: str) -> int:
        if name not in stages:
            raise InputError(f"unknown stage '{name}' (stages: {' '.join(stages)})")
        return stages.index(name)

    i, j = index(first or stages[0]), index(last or stages[-1])
    if i > j:
        raise InputError(f"--from-stage {first} comes after --to-stage {last}")
    return stages[i:j + 1]


def stage_argv(pairs: list[str]) -> dict[str, list[str]]:
    """--stage-arg STAGE=ARG values, per stage, in the order given."""
    per: dict[str, list[str]] = {}
    for pair in pairs:
        stage, sep, arg = pair.partition("=")
        if not sep or stage not in STAGES:
            raise InputError(f"--stage-arg {pair!r}: expected STAGE=ARG with STAGE one of {', '.join(STAGES)}")
        per.setdefault(stage, []).append(arg)
    return per


def fresh_logging() -> None:
    """The `memcirc` logger as a new process has it: a stage's log.txt, held records and level must not
    reach the next stage (or the report); each stage's setup_logging starts from here."""
    logger = logging.getLogger("memcirc")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def fresh_warnings() -> None:
    """A warning one stage showed is shown again by the next, as in a new process: resetting the filters
    invalidates every module's once-only registry; then the filters in force are put back."""
    kept = list(warnings.filters)
    warnings.resetwarnings()
    warnings.filters[:] = kept  # pyright: ignore[reportIndexIssue]  (a list at run time; typeshed says Sequence)


def free_memory() -> None:
    """Drop what the finished stage left (its model, activations) before the next loads its own."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stage(stage: str, argv: list[str]) -> int:
    """One stage as `python <stage>.py argv` runs it, and the process state put back after it."""
    from memcirc.cli import main

    try:
        return main(stage, argv)
    finally:
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # cli.main's handler is for inside a stage
        fresh_logging()
        fresh_warnings()
        free_memory()


def run(config: str, output_dir: str, stages: list[str], common: list[str],
        extra: dict[str, list[str]]) -> int:
    """Preflight, the stages, the report: the first non-zero exit code stops the run and is returned."""
    base = ["--config", config, "--output-dir", output_dir, *common]
    if "--dry-run" not in common:
        from memcirc.preflight import main as preflight

        if rc := preflight(["--stages", *stages, *base]):
            return rc
        fresh_logging()
    print(f"memcirc pipeline: config={config} output={output_dir} stages={' '.join(stages)}", flush=True)
    for stage in stages:
        print(f"== {stage}", flush=True)
        if rc := run_stage(stage, base + extra.get(stage, [])):
            return rc
    # The headline numbers last, so they end the log; also saved as report.md and report.json.
    from memcirc.report import main as report

    try:
        return report([output_dir])
    finally:
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, common = split_argv(argv)
    try:
        stages = selected_stages(args.config, args.from_stage, args.to_stage)
        extra = stage_argv(args.stage_args)
    except InputError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return run(args.config, args.output_dir, stages, common, extra)


if __name__ == "__main__":
    raise SystemExit(main())
