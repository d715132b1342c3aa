"""The stages of memcirc: one record each, and the only list of them.

"Stage" is the script name everywhere (`find_circuits`, also the manifest's `stage`); the folder
it writes under the run root (`circuits/`) is its *folder*, which also names its YAML section.
`run_pipeline.sh`, `memcirc.slurm`, `memcirc.report`, the root scripts and the tests read this
table; adding a stage is one record here plus the stage's own files (docs/development.md, "Adding a stage").

The table is cheap to import and imports nothing of memcirc: a stage's `Config` (in the light
module memcirc.stages.configs.<stage>) and its module (`run` and `headline`, with the heavy
libraries they need) are imported by name only when asked for. `memcirc.config` reads this table
(folders, YAML sections, the `pipeline:` list); `memcirc <command>` its command names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

ArrayKind = Literal["shards", "checkpoints"]
DONE_MARKER = "done.json"   # what an array task writes last in its own folder


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: the script (`<name>.py` at the repository root) and the manifest's `stage`.
        folder: where it writes under the run root; also its YAML section.
        needs: the stages it reads; the first is what `--input-dir` defaults to.
        array: how SLURM splits it into array tasks: "shards" (one slice of the work each, then
            `--merge`), "checkpoints" (one training checkpoint each, then `--merge`), or None.
        tasks_folder: the sub-folder of `folder` holding one folder per array task, each of which
            holds `DONE_MARKER` once the task has finished.
        merge_on_gpu: the `--merge` job computes with the model (kfac: the edit), so it gets the
            stage's GPUs; other merges only read files and get none unless the config says so.
        command: its short name in `memcirc <command>` (the stage name works there too).
    """

    name: str
    folder: str
    needs: tuple[str, ...] = ()
    array: ArrayKind | None = None
    tasks_folder: str | None = None
    merge_on_gpu: bool = False
    command: str = ""

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"memcirc.stages.{self.name}")

    @property
    def config_module(self) -> ModuleType:
        """The light module of the stage's `Config` (memcirc.stages.configs.<name>: no torch, so `--help`
        and YAML checks are quick), else the stage's own module."""
        try:
            return importlib.import_module(f"memcirc.stages.configs.{self.name}")
        except ModuleNotFoundError as e:
            if e.name != f"memcirc.stages.configs.{self.name}":
                raise
            return self.module

    @property
    def config(self) -> Any:   # type[memcirc.config.StageConfig]; config imports this module, not back
        return self.config_module.Config

    def run(self, cfg: Any) -> Any:
        return self.module.run(cfg)

    def headline(self, summary: dict[str, Any], stage_dir: Path) -> str:
        """The stage's lines in the run report, from its summary.json."""
        return self.module.headline(summary, stage_dir)

    def needs_tl(self, cfg: Any) -> bool:
        """Does this run of the stage convert the model to TransformerLens (the module's optional
        `needs_transformer_lens(cfg)`)? The pipeline preflight refuses an unconvertible family first."""
        check = getattr(self.module, "needs_transformer_lens", None)
        return bool(check(cfg)) if check is not None else False

    @property
    def script(self) -> str:
        return f"{self.name}.py"

    @property
    def command_name(self) -> str:
        return self.command or self.name


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("memorization_score", "memorization", array="shards", tasks_folder="shards", command="score"),
    Stage("contrastive_dataset", "contrastive", needs=("memorization_score",), command="contrastive"),
    Stage("find_circuits", "circuits", needs=("contrastive_dataset",), command="circuits"),
    Stage("verify_circuit", "verify", needs=("find_circuits",), command="verify"),
    Stage("attention_bypass", "bypass", needs=("memorization_score",), command="bypass"),
    Stage("kfac_edit", "kfac", needs=("memorization_score",), array="shards", tasks_folder="shards",
          merge_on_gpu=True, command="kfac"),
    Stage("training_dynamics", "dynamics", needs=("memorization_score", "contrastive_dataset"),
          array="checkpoints", tasks_folder="checkpoints", command="dynamics"),
    Stage("predict_memorization", "predict", needs=("memorization_score", "training_dynamics"), command="predict"),
)}
DEFAULT_PIPELINE = ("memorization_score", "contrastive_dataset", "find_circuits", "verify_circuit")
PIPELINE_KEY = "pipeline"   # the YAML key listing the stages run_pipeline.sh runs


def config_classes() -> list[Any]:
    """Every stage's config class, in pipeline order (one YAML file is checked against all)."""
    return [s.config for s in STAGES.values()]
