"""The config field groups several stages share (`CircuitOptions`, `BootstrapOptions`, `MemorizedRule`,
`HeldoutEval`, `LmEval`, `Sharding`) and the choices their fields accept.

A stage config (memcirc.config.StageConfig) inherits a group: its fields become flags and YAML keys of
that stage, and the stage hands `cfg.options(Group)` to library code, never itself. List a group before
StageConfig in the bases, so the common flags come first in --help and in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.errors import InputError
from memcirc.options import SHARDING, OptionGroup, option
from memcirc.tasks.registry import TASK_NAMES, get_task

MEMORIZED_BY = ("exact", "token_match", "tf_accuracy", "bleu4")
ABLATIONS = ("resample", "zero", "mean")
GRAD_FUNCTIONS = ("logit", "prob", "logprob", "logit_exp")
LOSSES = ("avg_diff", "neg_avg_diff", "avg_val", "avg_val_wrong")
FAITHFULNESS_METRICS = ("logit_diff", "answer_logit", "wrong_logit", "answer_logprob", "prob_diff")
WEIGHT_PROCESSING = ("none", "tl_default")
SELECTION_CRITERIA = ("lower", "point")   # what of F must reach the target (memcirc.circuits.search)


@dataclass
class MemorizedRule(OptionGroup):
    """Which scored windows count as memorized: `memorized_by >= threshold`."""

    title: ClassVar[str] = "memorized windows"

    memorized_by: str = option("exact", "scores.jsonl column that defines a memorized window",
                               choices=MEMORIZED_BY)
    # > 0: at 0 an unmemorized window would count. No upper bound: predict's --label-column may hold
    # a score of any scale; above the [0, 1] of these columns the stages say no window is memorized.
    threshold: float = option(1.0, "a window is memorized when memorized_by >= threshold", within="(0, inf)")


@dataclass
class BootstrapOptions(OptionGroup):
    """Percentile bootstrap intervals over pairs (memcirc.bootstrap)."""

    title: ClassVar[str] = "intervals"

    bootstrap_resamples: int = option(1000, "bootstrap resamples of the pairs for the faithfulness "
                                      "intervals (0 = no intervals)", minimum=0)
    interval_level: float = option(0.95, "coverage of the bootstrap intervals", within="(0, 1)")


@dataclass
class CircuitOptions(BootstrapOptions):
    """How a circuit is found: attribution, ablation, faithfulness metric and target, and what of F must
    reach it (the point estimate, or the lower end of its bootstrap interval over the pairs)."""

    title: ClassVar[str] = "circuit discovery"

    ig_steps: int = option(5, "integrated-gradient samples (0 = plain EAP)", aliases=("--ig",), minimum=0)
    grad_function: str = option("logit", "what the gradient is taken of", aliases=("--grad_function",),
                                choices=GRAD_FUNCTIONS)
    loss: str = option("avg_diff", "attribution loss: avg_diff (answer - wrong), neg_avg_diff, avg_val "
                       "(answer), avg_val_wrong (wrong)", aliases=("--loss_function",), choices=LOSSES)
    ablation: str = option("resample", "what an ablated edge carries: the corrupt run (resample), zero, "
                           "or the mean over the pairs", aliases=("--ablation_type",), choices=ABLATIONS)
    faithfulness_metric: str = option("logit_diff", "metric M in (M(circuit) - M(empty)) / (M(full) - "
                                      "M(empty))", aliases=("--optimize_metric",),
                                      choices=FAITHFULNESS_METRICS)
    target: float = option(0.85, "faithfulness the minimal circuit must reach",
                           aliases=("--target_performance",), within="(0, 1]")
    weight_processing: str = option("none", "TransformerLens weight processing: none (HF-identical "
                                    "logits) or tl_default", choices=WEIGHT_PROCESSING)
    curve_points: int = option(16, "log-spaced edge counts on the faithfulness curve", minimum=2)
    select_by: str = option("lower", "what must reach --target: the lower end of F's bootstrap interval over "
                            "the discovery pairs (lower), or F itself (point: a circuit whose F just crosses "
                            "the target is as likely to miss it on fresh pairs as to reach it)",
                            choices=SELECTION_CRITERIA)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_by == "lower" and self.bootstrap_resamples == 0:
            raise InputError("select_by lower needs the bootstrap interval: set bootstrap_resamples > 0, or "
                             "select_by point")


@dataclass
class TaskChoice(OptionGroup):
    """A standard circuit task (memcirc.tasks) as the pair source, instead of the contrastive pairs."""

    title: ClassVar[str] = "circuit task (instead of the contrastive pairs)"

    task: str | None = option(None, "standard circuit task whose generated pairs replace the contrastive "
                              "stage's: " + ", ".join(TASK_NAMES) + " (memcirc.tasks); the stage writes "
                              "<folder>-<task>/", choices=TASK_NAMES)

    def task_folder(self, folder: Path) -> Path:
        """`folder` for the memorization pairs, `<folder>-<task>` for a task's."""
        return folder.with_name(f"{folder.name}-{self.task}") if self.task else folder

    def hashed_dict(self) -> dict[str, Any]:
        """Without a task the task fields are left out, so runs from before they existed keep their hash."""
        hashed = super().hashed_dict()  # pyright: ignore[reportAttributeAccessIssue]  (StageConfig's, via the MRO)
        if not self.task:
            for name in ("task", "task_pairs"):
                hashed.pop(name, None)
        return hashed


@dataclass
class TaskSource(TaskChoice):
    """A task's pairs, generated here: how many, and the task's metric in place of the default one."""

    task_pairs: int = option(128, "pairs the task generates for the model's tokenizer (seeded; half held out)",
                             minimum=4)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._apply_task_metric()

    def _apply_task_metric(self) -> None:
        """A task whose metric is not the default (greater_than: prob_diff, with gradients of probabilities)
        sets it where faithfulness_metric and grad_function are at their defaults (logit_diff, logit);
        a configured other metric is kept (the stage warns)."""
        if not self.task or not isinstance(self, CircuitOptions):
            return
        info = get_task(self.task)
        if (self.faithfulness_metric, self.grad_function) == ("logit_diff", "logit"):
            self.faithfulness_metric, self.grad_function = info.metric, info.grad_function


@dataclass
class HeldoutEval(OptionGroup):
    """The before/after evaluation of an intervention: memorization and held-out perplexity."""

    title: ClassVar[str] = "held-out evaluation"

    heldout: str = option("testbed", "held-out text for perplexity: any data source (.txt = one document, "
                          "JSONL/Parquet with a text or token column, a folder or Hub id; 'testbed': the "
                          "held-out plays)")
    ppl_blocks: int = option(64, "held-out token blocks (of --ppl-block-len tokens) for perplexity", minimum=1)
    ppl_block_len: int | None = option(None, "tokens per perplexity block, BOS included (default: "
                                       "min(model context, 1024))", minimum=2)
    # Lev/S is in [0, 1] (generated and truth have S tokens each): outside [0, 1] all or none match
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold", within="[0, 1]")


@dataclass
class LmEval(OptionGroup):
    """lm-evaluation-harness benchmarks on the model in memory (memcirc.benchmarks; the lm-eval extra)."""

    title: ClassVar[str] = "lm-eval benchmarks (the lm-eval extra)"

    lm_eval_tasks: list[str] = option([], "lm-evaluation-harness tasks or groups (the lm-eval extra: pip install "
                                      "memcirc[lm-eval]), e.g. heldout_lastword (shipped, offline)")
    lm_eval_limit: int | None = option(None, "at most N documents per lm-eval task (smoke runs; not comparable "
                                       "with published numbers)", minimum=1)
    lm_eval_num_fewshot: int | None = option(None, "few-shot examples per lm-eval prompt (none: each task's "
                                             "own, else 0)", minimum=0)
    lm_eval_include_path: str | None = option(None, "folder of local lm-eval task YAML files, searched before "
                                              "the built-in tasks")


@dataclass
class Sharding(OptionGroup):
    """One job of several (SLURM array tasks), then one `--merge` job."""

    title: ClassVar[str] = SHARDING

    num_shards: int | None = option(None, "split the work into N shards, one per job (default: "
                                    "SLURM_ARRAY_TASK_COUNT, else 1)", minimum=1, hashed=False)
    shard_index: int | None = option(None, "which shard this job runs (default: SLURM_ARRAY_TASK_ID, "
                                     "else 0)", minimum=0, hashed=False)
    merge: bool = option(False, "merge the finished shards into the stage outputs", aliases=("--merge_only",),
                         hashed=False)
