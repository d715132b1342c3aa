"""Stage configuration: one dataclass per stage holds the only copy of the defaults.

Precedence is dataclass defaults < YAML (`--config`) < flags actually passed on the command line.
The CLI is generated from the fields, so flags, YAML keys and help text cannot drift apart:
field `prefix_len` is `--prefix-len` on the CLI (also `--prefix_len`), `prefix_len:` in YAML.
The original memorization_circuits spellings (`--model_name`, `--prompt_tokens`, ...) are declared
as aliases; --help lists them once, in their own section, and each flag under its section (common
options, the stage's own, each shared field group, sharding and SLURM).

A YAML file is shared by all stages: top-level keys are read by every stage that has such a
field, and a section named after a stage's folder (`memorization:`, `contrastive:`, ...) overrides
them for that stage only. A key no stage knows is an error that names it.

Each stage's config class lives in a light module (`memcirc.stages.configs.<stage>`, no torch: --help
and the YAML checks need no heavy import), which the stage's module imports. Field groups that several
stages share are declared once, in memcirc.option_groups (`CircuitOptions`, `MemorizedRule`, ...):
a stage config inherits a group, and hands the library a plain group object (`cfg.options(group)`),
never itself. Every value is checked when the config is built, never later.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from memcirc.errors import InputError
from memcirc.logs import LEVELS as LOG_LEVELS
from memcirc.options import SHARDING, OptionGroup, field_type, option
from memcirc.parsing import HelpFormatter, Parser, load_yaml_file, unknown_name
from memcirc.stages.registry import DEFAULT_PIPELINE, PIPELINE_KEY, STAGES, config_classes

DTYPES = ("auto", "float32", "bfloat16", "float16")
SLURM_KEY = "slurm"   # job resources for `run_pipeline.sh --slurm`, validated by memcirc.slurm
T = typing.TypeVar("T", bound="OptionGroup")
C = typing.TypeVar("C", bound="StageConfig")


@dataclass
class StageConfig(OptionGroup):
    """Flags every stage accepts (docs/config.md)."""

    stage: ClassVar[str] = ""        # the stage's name in memcirc.stages.registry, e.g. "find_circuits"

    config: str | None = option(None, "YAML config file (shared by all stages)", hashed=False)
    output_dir: str = option("runs/testbed", "run root; this stage writes <output-dir>/<its folder>/",
                             hashed=False)
    input_dir: str | None = option(None, "upstream stage folder (default: <output-dir>/<upstream folder>)",
                                   hashed=False)
    model: str = option("testbed", "Hub id, local model folder, or 'testbed'", aliases=("--model_name",))
    revision: str | None = option(None, "model revision, e.g. a Pythia checkpoint 'step3000'")
    gguf_file: str | None = option(None, "GGUF file inside the model folder / repo (converted once to a "
                                   "safetensors folder, cached by its sha256)")
    tokenizer: str | None = option(None, "tokenizer folder or Hub id to use instead of the model's own")
    prepend_bos: str = option("auto", "BOS before every window and perplexity block: auto (when the "
                              "tokenizer adds one itself), always, never", choices=("auto", "always", "never"))
    attn_implementation: str | None = option(None, "HF attention implementation (eager, sdpa, ...)")
    device: str = option("auto", "where the model runs (auto: cuda, else mps, else cpu)", hashed=False,
                         metavar="{auto,cpu,cuda,cuda:N,mps}")
    dtype: str = option("auto", "model dtype (auto = float32 on CPU, bfloat16 on GPU)", choices=DTYPES)
    # 32 bits: sklearn's random_state (predict) and numpy's legacy seeding take no more; torch's 64
    seed: int = option(0, "random seed, applied once at stage start", within="[0, 4294967295]")
    limit: int | None = option(None, "process at most N items (smoke runs; results not reportable)",
                               minimum=1)
    force: bool = option(False, "recompute even if a complete run with another config exists",
                         hashed=False)
    dry_run: bool = option(False, "print the resolved config and planned outputs, then exit",
                           hashed=False)
    log_level: str = option("INFO", "logging level", choices=LOG_LEVELS, hashed=False)

    # -- derived values -------------------------------------------------------------------
    @classmethod
    def folder(cls) -> str:
        """The stage's folder under the run root (also its YAML section)."""
        return STAGES[cls.stage].folder

    @property
    def stage_dir(self) -> Path:
        return Path(self.output_dir) / self.folder()

    def stage_folder(self, stage: str) -> Path:
        """The folder of another stage of this run (e.g. "contrastive_dataset" -> <output-dir>/contrastive)."""
        return Path(self.output_dir) / STAGES[stage].folder

    @property
    def upstream_dir(self) -> Path | None:
        """--input-dir, else the folder of the first stage this one reads."""
        if self.input_dir:
            return Path(self.input_dir)
        needs = STAGES[self.stage].needs
        return self.stage_folder(needs[0]) if needs else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict[str, Any]:
        """The fields that can change a stage's results (what the config hash covers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["hashed"]}

    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def options(self, group: type[T]) -> T:
        """The plain option object of a field group this config inherits (what library code takes)."""
        return group(**{f.name: getattr(self, f.name) for f in dataclasses.fields(group)})

    def data_path(self, name: str) -> str:
        """The data field `name` as a path or Hub id: 'testbed' resolved to the testbed's file."""
        return testbed_data(name, getattr(self, name))

    def needs_auto_circuit(self) -> bool:
        """Does this run import auto-circuit (installed apart from memcirc's dependencies)?"""
        return False

    def model_spec(self):  # -> memcirc.models.ModelSpec (imported lazily: torch is slow to import)
        from memcirc.models import ModelSpec

        return ModelSpec(name_or_path=self.model, revision=self.revision, gguf_file=self.gguf_file,
                         tokenizer=self.tokenizer, dtype=self.dtype, device=self.device,
                         attn_implementation=self.attn_implementation)


# -- the testbed as a data source ------------------------------------------------------------
# A data field set to 'testbed' names one of the embedded testbed's files. It is resolved here, once:
# library code only ever sees paths. (The model name 'testbed' is resolved by models.loading, and
# predict's corpus 'testbed' is built there: the training set with each canary repeated k times.)

def testbed_data(name: str, value: str) -> str:
    from memcirc.testbed import CORPUS_DIR, EVAL_DOCUMENTS, TESTBED_NAME

    if value != TESTBED_NAME:
        return value
    files = {"dataset": EVAL_DOCUMENTS, "heldout": CORPUS_DIR / "heldout.txt",
             "factor_data": CORPUS_DIR / "train.txt"}
    if name not in files:
        raise InputError(f"config key '{name}' has no testbed file; give a path or Hub id")
    if not files[name].is_file():
        raise InputError(f"the testbed has no {files[name].name} (for '{name}'): run `make testbed`")
    return str(files[name])


# -- YAML ------------------------------------------------------------------------------------

def load_yaml(path: str) -> dict[str, Any]:
    """A config file's top-level mapping (safe tags only; a key twice in one mapping is an error)."""
    data = load_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping at the top level")
    return data


def _yaml_values(cls: type[StageConfig], data: dict[str, Any], path: str) -> dict[str, Any]:
    """Top-level keys this stage has, then its own section; unknown keys are errors."""
    classes = config_classes()
    sections = {c.folder(): c for c in classes}
    known_anywhere = {f.name for c in classes for f in dataclasses.fields(c)}
    values: dict[str, Any] = {}
    own = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in (PIPELINE_KEY, SLURM_KEY):  # read by run_pipeline.sh and memcirc.slurm, not by any stage
            continue
        if key in sections:
            if not isinstance(value, dict):
                raise InputError(f"config section '{key}' in {path} must be a mapping")
            stage_fields = {f.name for f in dataclasses.fields(sections[key])}
            for sub in value:
                if sub not in stage_fields:
                    raise InputError(_unknown_key(f"{key}.{sub}", sub, stage_fields, path,
                                                  f"the keys of {key} are the flags of "
                                                  f"{STAGES[sections[key].stage].script} --help"))
            continue
        if key not in known_anywhere:
            if (folder := _folder_named(key)) is not None:   # a section named after the stage, not its folder
                raise InputError(f"unknown config key '{key}' in {path} (did you mean '{folder}'?)")
            top = known_anywhere | set(sections) | {PIPELINE_KEY, SLURM_KEY}
            raise InputError(_unknown_key(key, key, top, path,
                                          "top-level keys are the flags of any stage (see <stage>.py --help) "
                                          f"or a stage section ({', '.join(sorted(sections))})"))
        if key in own:
            values[key] = value
    values.update(data.get(cls.folder()) or {})
    values.pop("config", None)
    return values


def _folder_named(name: str) -> str | None:
    """The folder (YAML section) of the stage whose name or command is `name`, else None."""
    return next((s.folder for s in STAGES.values() if name in (s.name, s.command_name)), None)


def _unknown_key(shown: str, key: str, known: set[str], path: str, help_hint: str) -> str:
    """"unknown config key 'memorization.prefix_lenn' in FILE (did you mean 'prefix_len'?)"."""
    message = unknown_name("config key", key, known, path, help_hint)
    return message.replace(f"'{key}'", f"'{shown}'", 1)


def pipeline_stages(path: str) -> list[str]:
    """The stages run_pipeline.sh runs for a config file: its `pipeline:` list, in registry order."""
    listed = load_yaml(path).get(PIPELINE_KEY, list(DEFAULT_PIPELINE))
    if not isinstance(listed, list) or any(s not in STAGES for s in listed):
        raise InputError(f"config key '{PIPELINE_KEY}' in {path} must list stages from "
                         f"{', '.join(STAGES)}; got {listed!r}")
    return [s for s in STAGES if s in listed]


# -- CLI -------------------------------------------------------------------------------------
# --help sections: the common flags, the stage's own, one per shared field group, sharding and SLURM,
# then the aliases, listed once. A flag's snake_case spelling and its aliases are accepted but not
# shown beside it.

COMMON = "common options"
ALIASES = "aliases of the original memorization_circuits flags"


def _flags(f: dataclasses.Field) -> tuple[str, list[str]]:
    """(the flag --help shows, the hidden spellings: snake_case and the declared aliases)."""
    shown = f"--{f.name.replace('_', '-')}"
    hidden = [f"--{f.name}"] if "_" in f.name else []
    return shown, hidden + [a for a in f.metadata["aliases"] if a not in (shown, *hidden)]


def _section(cls: type[StageConfig], f: dataclasses.Field) -> str:
    """The --help section of field `f`: its own `group`, else that of the class declaring it."""
    if f.metadata.get("group"):
        return f.metadata["group"]
    owner = next(c for c in reversed(cls.__mro__) if f.name in c.__dict__.get("__annotations__", {}))
    if owner is StageConfig:
        return COMMON
    return owner.title if owner is not cls and owner.title else f"{cls.stage} options"


def _default(f: dataclasses.Field, cls: type[StageConfig]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{f.name} has no default; declare config fields with option()")


def _help_text(f: dataclasses.Field, default: Any) -> str:
    """The field's help and, unless it already speaks of its default, "(default: X)"; "%" escaped:
    argparse %-formats help texts (kfac_edit's "<= 20%)" made its --help a traceback)."""
    text = f.metadata["help"]
    if not re.search(r"\bdefault\b", text) and f.name not in ONE_SHOT:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {'none' if shown in (None, '') else shown})"
    return text.replace("%", "%%")


ONE_SHOT = ("force", "dry_run")   # actions, not settings: no config file sets them, so no --no-force


def _add_field(parser: argparse.ArgumentParser, group: Any, f: dataclasses.Field, help_text: str) -> None:
    """One field's flag in its section, and its hidden spellings (same dest) outside any."""
    tp, _ = field_type(f)
    shown, hidden = _flags(f)
    choices = f.metadata.get("choices")
    metavar = f.metadata.get("metavar") or ("{" + ",".join(map(str, choices)) + "}" if choices else None)
    if tp is bool:
        kwargs: dict[str, Any] = {"action": "store_true" if f.name in ONE_SHOT else argparse.BooleanOptionalAction}
    elif typing.get_origin(tp) is list:
        kwargs = {"nargs": "+", "type": typing.get_args(tp)[0], "metavar": metavar}
    else:
        kwargs = {"type": _cli_type(tp), "metavar": metavar}
    group.add_argument(shown, dest=f.name, help=help_text, **kwargs)
    if hidden:
        parser.add_argument(*hidden, dest=f.name, help=argparse.SUPPRESS, **kwargs)


def _alias_text(cls: type[StageConfig]) -> str:
    """The aliases, one paragraph (the formatter keeps descriptions as written: wrapped here)."""
    pairs = [f"{a} = {_flags(f)[0]}" for f in dataclasses.fields(cls) for a in _flags(f)[1] if a != f"--{f.name}"]
    listed = ", ".join(pairs) + ". " if pairs else ""
    return textwrap.fill(f"{listed}Every flag also takes its snake_case spelling (--output_dir for --output-dir).",
                         width=76, break_on_hyphens=False)


def build_parser(cls: type[StageConfig], description: str = "", epilog: str = "",
                 prog: str | None = None) -> argparse.ArgumentParser:
    from memcirc import __version__

    parser = Parser(prog=prog, description=description, epilog=epilog, argument_default=argparse.SUPPRESS,
                    formatter_class=HelpFormatter, add_help=False,
                    usage="%(prog)s [--config YAML] [--output-dir DIR] [flags]   (-h: every flag)")
    fields = dataclasses.fields(cls)
    # argparse prints sections in the order they are made: common, the stage's own, shared groups, sharding
    titles = dict.fromkeys([COMMON, f"{cls.stage} options", *(_section(cls, f) for f in fields)])
    titles = [t for t in titles if t != SHARDING] + [SHARDING]
    used = {_section(cls, f) for f in fields} | {COMMON}
    sections = {t: parser.add_argument_group(t) for t in titles if t in used}
    sections[COMMON].add_argument("-h", "--help", action="help", help="show this help and exit")
    sections[COMMON].add_argument("--version", action="version", version=f"memcirc {__version__}",
                                  help="print the memcirc version and exit")
    for f in fields:
        _add_field(parser, sections[_section(cls, f)], f, _help_text(f, _default(f, cls)))
    parser.add_argument_group(ALIASES, _alias_text(cls))
    return parser


def _cli_type(tp: Any):
    def convert(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        return tp(text)
    convert.__name__ = tp.__name__
    return convert


def build_config(cls: type[C], argv: list[str] | None = None, description: str = "",
                 epilog: str = "", prog: str | None = None) -> C:
    """defaults < YAML < explicit flags; raises InputError naming any bad key or value."""
    passed = vars(build_parser(cls, description, epilog, prog).parse_args(argv))
    values: dict[str, Any] = {}
    if passed.get("config"):
        values.update(_yaml_values(cls, load_yaml(passed["config"]), passed["config"]))
    values.update(passed)
    return cls(**values)


def resolved_yaml(cfg: StageConfig) -> str:
    return yaml.safe_dump({cfg.folder(): cfg.to_dict()}, sort_keys=False)


if __name__ == "__main__":  # `python -m memcirc.config pipeline FILE`: the stage list, one per line
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != PIPELINE_KEY:
        sys.exit("usage: python -m memcirc.config pipeline CONFIG.yaml")
    try:
        print("\n".join(pipeline_stages(sys.argv[2])))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
