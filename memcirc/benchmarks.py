"""lm-evaluation-harness benchmarks on the model in memory (patched or edited): the optional `lm-eval`
extra (`pip install memcirc[lm-eval]`), used by attention_bypass and kfac_edit.

`check_tasks` runs before any heavy work, before the model's weights load: lm-eval missing, a task
name lm-eval does not know, or a task whose data cannot be loaded (not cached and no network) is an
InputError (exit 2, one line). It checks by building the tasks, which loads their datasets: that is
the only reliable test (a task names its data in YAML, custom loaders or Python classes) and costs
what the run would pay anyway (local and cached data load in seconds, the datasets stay cached).
When a task other than the shipped ones is asked for and the Hub does not answer, offline mode is set
(`memcirc.hub`), so a dataset that is not cached fails at once instead of after datasets' retries.

Task names resolve against memcirc's shipped tasks (`memcirc/lm_eval_tasks`, always searched),
`--lm-eval-include-path`, then lm-eval's ~15k built-in tasks; that built-in index takes lm-eval
10-20 s to build, so it is built only when a name is not found in the first two.

`evaluate` runs `lm_eval.simple_evaluate` on `HFLM(pretrained=<the model object>)`: forward hooks
(the attention bypass) and edited weights are what it measures. lm-eval tokenizes as lm-eval does
(the tokenizer's own special tokens), whatever `--prepend-bos` says, so its numbers compare with
published ones. It seeds Python's, numpy's and torch's global generators; they are restored
afterwards, so running benchmarks does not change a stage's other results.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import hub
from memcirc.errors import InputError
from memcirc.lm_eval_tasks import SHIPPED_TASKS, TASKS_DIR
from memcirc.option_groups import LmEval

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install memcirc[lm-eval]"
# lm-eval warnings that every call with an in-memory model or a custom_dataset task prints; noise here.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
                      "Custom kwargs can be passed to `--metadata`")
_NOISY_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")


@dataclass
class Benchmarks:
    """The checked tasks and the lm-eval TaskManager that knows them (its index is built once)."""

    opts: LmEval
    manager: Any                     # lm_eval.tasks.TaskManager

    def describe(self) -> dict[str, Any]:
        """What summary.json records next to the results."""
        return {"tasks": list(self.opts.lm_eval_tasks), "limit": self.opts.lm_eval_limit,
                "num_fewshot": self.opts.lm_eval_num_fewshot, "include_path": self.opts.lm_eval_include_path,
                "lm_eval_version": getattr(_lm_eval("lm_eval"), "__version__", None)}


# -- before the model loads ------------------------------------------------------------------

def check_tasks(opts: LmEval) -> Benchmarks | None:
    """The tasks of `--lm-eval-tasks` checked and built (None when none are asked for).

    Raises:
        InputError: lm-eval is not installed, an include path is not a folder, a task name is
            unknown, or a task cannot be built (its data is not available, its YAML is broken).
    """
    if not opts.lm_eval_tasks:
        return None
    task_manager = _lm_eval("lm_eval.tasks").TaskManager
    include = [str(TASKS_DIR)]
    if opts.lm_eval_include_path is not None:
        if not Path(opts.lm_eval_include_path).is_dir():
            raise InputError(f"--lm-eval-include-path {opts.lm_eval_include_path} is not a folder (of lm-eval task "
                             "YAML files)")
        include.append(str(Path(opts.lm_eval_include_path).resolve()))
    with _quiet_lm_eval():
        manager = task_manager(include_path=include, include_defaults=False)
        if _unknown(manager, opts.lm_eval_tasks):
            log.info("indexing lm-eval's built-in tasks (10-20 s)")
            manager = task_manager(include_path=include, include_defaults=True)
        unknown = _unknown(manager, opts.lm_eval_tasks)
        if unknown:
            raise InputError(_unknown_message(unknown, manager.all_tasks, opts.lm_eval_include_path))
        if any(name not in SHIPPED_TASKS for name in opts.lm_eval_tasks):
            hub.offline_unless_reachable()   # a Hub task's data: the cache, or the error at once, not after retries
        for name in opts.lm_eval_tasks:
            _build(manager, name)
    return Benchmarks(opts=opts, manager=manager)


def _lm_eval(module: str) -> Any:
    """A module of lm-evaluation-harness (untyped here: it is an optional extra, absent or present)."""
    try:
        importlib.import_module("lm_eval")   # the package first: a stubbed-out lm_eval fails here too
        return importlib.import_module(module)
    except ImportError as e:   # not installed, or installed without a package it imports
        raise InputError(f"--lm-eval-tasks needs lm-evaluation-harness, which is not installed ({e}): "
                         f"{INSTALL_HINT}") from None


def _unknown(manager: Any, names: Sequence[str]) -> list[str]:
    """Names that are neither a task, group or tag lm-eval knows nor a task YAML file."""
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]


def _unknown_message(unknown: Sequence[str], known: Sequence[str], include_path: str | None) -> str:
    hints = [f"{close[0]} for {n}" for n in unknown
             if (close := difflib.get_close_matches(n, known, n=1, cutoff=0.8))]
    where = f"lm-eval's built-in tasks, memcirc's shipped tasks ({', '.join(SHIPPED_TASKS)})"
    where += f" or {include_path}" if include_path else ""
    return (f"unknown lm-eval task(s): {', '.join(unknown)} (not in {where})"
            + (f"; did you mean {', '.join(hints)}?" if hints else "") + "; `lm-eval ls tasks` lists them")


def _build(manager: Any, name: str) -> None:
    """Build task `name` (which loads its datasets); any failure is the task's input problem."""
    try:
        manager.load([name])
    except Exception as e:  # datasets, YAML and lm-eval raise many types; each means "cannot run"
        first = (str(e).strip().splitlines() or [""])[0]
        fix = ("a Hub dataset must be downloaded once with network access (it is then cached), a local data "
               "file must exist; or use a local task (--lm-eval-include-path)" if isinstance(e, OSError)
               else "check the task's YAML")   # ConnectionError and FileNotFoundError are OSErrors
        if isinstance(e, ConnectionError) and hub.is_offline():
            fix = f"{hub.offline_reason()}; {fix}"
        raise InputError(f"lm-eval task {name} cannot be loaded ({type(e).__name__}: {first}); {fix}") from None


# -- the run ---------------------------------------------------------------------------------

def evaluate(model: torch.nn.Module, tokenizer: Any, bench: Benchmarks, batch_size: int) -> dict[str, Any]:
    """Every task of `bench` on `model` as it is now: {task or group: {metric: value, n_samples,
    num_fewshot}}; metrics are numbers or None (non-finite), never NaN."""
    simple_evaluate = _lm_eval("lm_eval.evaluator").simple_evaluate
    hflm = _lm_eval("lm_eval.models.huggingface").HFLM
    was_training = model.training
    with _quiet_lm_eval(), _global_rng_kept():
        lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(bench.opts.lm_eval_tasks), task_manager=bench.manager,
                              limit=bench.opts.lm_eval_limit, num_fewshot=bench.opts.lm_eval_num_fewshot,
                              log_samples=False, bootstrap_iters=0)   # bootstrap stderr forks a process pool
    model.train(was_training)
    assert out is not None, "simple_evaluate returns None only on a non-zero distributed rank"
    return tidy_results(out)


def tidy_results(out: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's output reduced to JSON-safe per-task metrics ('acc,none' -> 'acc')."""
    tidy: dict[str, Any] = {}
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue   # alias, name, sample_len; stderr is "N/A" (no bootstrap)
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = float(value) if math.isfinite(value) else None
        samples = out.get("n-samples", {}).get(task)
        if samples:
            row["n_samples"] = int(samples["effective"])
        if (shots := out.get("n-shot", {}).get(task)) is not None:
            row["num_fewshot"] = int(shots)
        tidy[task] = row
    return tidy


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """simple_evaluate seeds the global generators; put back the stage's own states afterwards."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _EXPECTED_WARNINGS)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO chatter off and its expected warnings dropped, for the duration of a call."""
    root, drop = logging.getLogger("lm_eval"), _DropExpected()
    level = root.level
    root.setLevel(logging.WARNING)
    # a logger's filters see only the records logged on it, so they go on the modules that warn
    noisy = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in noisy:
        logger.addFilter(drop)
    try:
        yield
    finally:
        root.setLevel(level)
        for logger in noisy:
            logger.removeFilter(drop)
