"""lm-evaluation-harness tasks shipped with memcirc (YAML + local data, run offline).

`memcirc.benchmarks` always adds this folder to lm-eval's task search path, so the names below work
with `--lm-eval-tasks` without `--lm-eval-include-path`; the plain lm-eval CLI finds them with
`lm_eval --include_path <this folder>`.

- `heldout_lastword`: last-word prediction (LAMBADA-style) on the testbed's held-out plays.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
SHIPPED_TASKS = ("heldout_lastword",)
