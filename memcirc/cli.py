"""The shared main() of every stage script: parse, validate, run, and map errors to exit codes.

Exit codes (docs/contract.md):
  0    success.
  2    bad input or config: one line on stderr, `error: ...`, naming the file/key and the fix.
  1    the run failed for another reason. A full disk, a quota or a read-only file system (ENOSPC,
       EDQUOT, EROFS while writing) is one `error: ...` line too: the input was fine and the same
       command resumes once there is room, so it is not exit 2, whose meaning is "change the input".
       Anything else is a bug and keeps its traceback.
  143  stopped by SIGTERM (re-running resumes); 130 interrupted (Ctrl-C).

Stderr: bad input found before the stage's first long step (a progress loop) prints exactly one
line, because INFO records are held back until then (memcirc.logs). Found later, the INFO lines
already printed come first and the error line is always the last line of stderr. log.txt in the
stage folder gets the error line too.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from memcirc.config import build_config, resolved_yaml
from memcirc.errors import NO_ROOM, InputError, no_room_message, one_line
from memcirc.logs import discard_held_logs, end_stage_logs, flush_logs, log_to_file_only, setup_logging
from memcirc.stages.registry import STAGES

log = logging.getLogger(__name__)
# Not a declared dependency of memcirc: auto-circuit's own declared dependencies pull jax, kaleido and
# a tqdm replacement, so it is installed apart, without them (the packages it imports are memcirc's).
AUTO_CIRCUIT_INSTALL = "pip install --no-deps auto-circuit==1.0.1"


class Terminated(BaseException):
    """SIGTERM (SLURM preemption, scancel) turned into an exception so `finally` blocks run."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    # SLURM signals every process of a job and its batch script forwards the signal too: a second
    # SIGTERM must not interrupt the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main(stage_name: str, argv: list[str] | None = None, doc: str | None = None, prog: str | None = None) -> int:
    """Run the registered stage `stage_name` with command-line arguments `argv` (default: sys.argv).

    `doc`: the --help text (default: the docstring of the stage's config module); `prog`: the command
    as typed (`memcirc score`), which the examples then use instead of `python <stage>.py`.
    """
    stage = STAGES[stage_name]
    description, _, epilog = (doc or stage.config_module.__doc__ or "").strip().partition("\n\n")
    if prog is not None:
        epilog = epilog.replace(f"python {stage.script}", prog)
    where: Path | None = None   # the stage folder, once the config is known (its log.txt is this run's)
    try:
        cfg = build_config(stage.config, argv, description=description, epilog=epilog, prog=prog)
        setup_logging(cfg.log_level)
        where = cfg.stage_dir
        if cfg.dry_run:
            print(resolved_yaml(cfg), end="")
            print(f"# would write: {cfg.stage_dir}/")
            return 0
        _check_auto_circuit(cfg)
        signal.signal(signal.SIGTERM, _raise_terminated)
        from memcirc.models.device import set_threads_from_env  # torch: after --help and the config checks

        set_threads_from_env()
        stage.run(cfg)
        flush_logs()
        return 0
    except InputError as e:
        discard_held_logs()
        return _error_line(str(e), 2, where)
    except OSError as e:
        if e.errno not in NO_ROOM:
            flush_logs()
            raise
        discard_held_logs()
        return _error_line(no_room_message(e, where), 1, where)
    except Terminated:
        flush_logs()
        print("stopped by SIGTERM; finished chunks are kept, re-run the same command to resume",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        flush_logs()
        print("interrupted; finished chunks are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except BaseException:
        flush_logs()   # what the stage logged is context for the traceback that follows
        raise
    finally:
        end_stage_logs()


def _check_auto_circuit(cfg: Any) -> None:
    """Before the stage's module is imported: without auto-circuit that import is a traceback."""
    if cfg.needs_auto_circuit() and importlib.util.find_spec("auto_circuit") is None:
        raise InputError(f"{cfg.stage} needs auto-circuit, which is not installed (pip does not install it "
                         f"with memcirc): {AUTO_CIRCUIT_INSTALL}")


def _error_line(message: str, code: int, where: Path | None) -> int:
    """The one `error:` line, last on stderr, and into this run's log.txt when it has one."""
    message = one_line(message)
    if where is not None:   # else the handlers are a previous in-process run's
        log_to_file_only(f"error: {message}")
    print(f"error: {message}", file=sys.stderr)
    return code
