"""The shared main() of every stage script: parse, validate, run, and map errors to exit codes.

Exit codes (DESIGN §2): 0 success, 2 bad input or config (one line on stderr), 1 anything
unexpected (with a traceback), 143 when stopped by SIGTERM (re-running resumes).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from memcirc.config import build_config, resolved_yaml
from memcirc.errors import InputError
from memcirc.logs import discard_held_logs, release_logs, setup_logging
from memcirc.models.device import set_threads_from_env
from memcirc.stages.registry import STAGES

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM (SLURM preemption, scancel) turned into an exception so `finally` blocks run."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    # SLURM signals every process of a job and its batch script forwards the signal too: a second
    # SIGTERM must not interrupt the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main(stage_name: str, argv: list[str] | None = None, doc: str | None = None) -> int:
    """Run the registered stage `stage_name` with command-line arguments `argv` (default: sys.argv)."""
    stage = STAGES[stage_name]
    description, _, epilog = (doc or "").strip().partition("\n\n")
    try:
        cfg = build_config(stage.config, argv, description=description, epilog=epilog)
        setup_logging(cfg.log_level)
        if cfg.dry_run:
            print(resolved_yaml(cfg), end="")
            print(f"# would write: {cfg.stage_dir}/")
            return 0
        signal.signal(signal.SIGTERM, _raise_terminated)
        set_threads_from_env()
        stage.run(cfg)
        release_logs()
        return 0
    except InputError as e:
        discard_held_logs()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("stopped by SIGTERM; finished chunks are kept, re-run the same command to resume",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; finished chunks are kept, re-run the same command to resume", file=sys.stderr)
        return 130
