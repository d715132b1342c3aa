"""Stage configuration: one dataclass per stage holds the only copy of the defaults.

Precedence is dataclass defaults < YAML (`--config`) < flags actually passed on the command line.
The CLI is generated from the fields, so flags, YAML keys and help text cannot drift apart:
field `prefix_len` is `--prefix-len` on the CLI (also `--prefix_len`), `prefix_len:` in YAML.
The predecessor's spellings (`--model_name`, `--prompt_tokens`, ...) are declared as aliases.

A YAML file is shared by all stages: top-level keys are read by every stage that has such a
field, and a section named after a stage folder (`memorization:`, `contrastive:`, ...) overrides
them for that stage only. A key no stage knows is an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from memcirc.errors import InputError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def option(
    default: Any = None,
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    hashed: bool = True,
    minimum: float | None = None,
) -> Any:
    """A config field. `hashed=False` marks run control that cannot change the results."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "hashed": hashed, "minimum": minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StageConfig:
    """Flags every stage accepts (DESIGN §2)."""

    stage: ClassVar[str] = ""        # stage folder under the run root, e.g. "memorization"
    upstream: ClassVar[str | None] = None  # stage folder --input-dir defaults to

    config: str | None = option(None, "YAML config file (shared by all stages)", hashed=False)
    output_dir: str = option("runs/testbed", "run root; this stage writes <output-dir>/<stage>/",
                             hashed=False)
    input_dir: str | None = option(None, "upstream stage folder (default: <output-dir>/<upstream>)",
                                   hashed=False)
    model: str = option("testbed", "Hub id, local model folder, or 'testbed'", aliases=("--model_name",))
    revision: str | None = option(None, "model revision, e.g. a Pythia checkpoint 'step3000'")
    gguf_file: str | None = option(None, "GGUF file inside the model folder / repo")
    attn_implementation: str | None = option(None, "HF attention implementation (eager, sdpa, ...)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", hashed=False)
    dtype: str = option("auto", "model dtype (auto = float32 on CPU, bfloat16 on GPU)", choices=DTYPES)
    seed: int = option(0, "random seed, applied once at stage start")
    limit: int | None = option(None, "process at most N items (smoke runs; results not reportable)",
                               minimum=1)
    force: bool = option(False, "recompute even if a complete run with another config exists",
                         hashed=False)
    dry_run: bool = option(False, "print the resolved config and planned outputs, then exit",
                           hashed=False)
    log_level: str = option("INFO", "logging level", choices=LOG_LEVELS, hashed=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))

    # -- derived values -------------------------------------------------------------------
    @property
    def stage_dir(self) -> Path:
        return Path(self.output_dir) / self.stage

    @property
    def upstream_dir(self) -> Path | None:
        if self.input_dir:
            return Path(self.input_dir)
        return Path(self.output_dir) / self.upstream if self.upstream else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict[str, Any]:
        """The fields that can change a stage's results (what the config hash covers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["hashed"]}

    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def model_spec(self):  # -> memcirc.models.ModelSpec (imported lazily: torch is slow to import)
        from memcirc.models import ModelSpec

        return ModelSpec(name_or_path=self.model, revision=self.revision, gguf_file=self.gguf_file,
                         dtype=self.dtype, device=self.device,
                         attn_implementation=self.attn_implementation)


# -- value checking -------------------------------------------------------------------------

def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _field_type(f: dataclasses.Field) -> tuple[Any, bool]:
    # Annotations are strings under `from __future__ import annotations`; resolve them once.
    tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})  # noqa: S307
    return _base_type(tp)


def _check_value(f: dataclasses.Field, value: Any) -> None:
    tp, optional = _field_type(f)
    key = f.name
    if value is None:
        if not optional:
            raise InputError(f"config key '{key}' must not be empty")
        return
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        accepted = (int, float) if item_type is float else item_type
        if not isinstance(value, list) or not all(isinstance(v, accepted) and not isinstance(v, bool)
                                                  for v in value):
            raise InputError(f"config key '{key}' must be a list of {item_type.__name__}, got {value!r}")
        items = value
    else:
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              bool: isinstance(value, bool), str: isinstance(value, str)}.get(tp, True)
        if not ok:
            raise InputError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
        items = [value]
    choices = f.metadata.get("choices")
    for item in items:
        if choices and item not in choices:
            raise InputError(f"config key '{key}' has bad value {item!r}; choose from {', '.join(map(str, choices))}")
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise InputError(f"config key '{key}' must be >= {minimum}, got {value!r}")


# -- YAML ------------------------------------------------------------------------------------

def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping at the top level")
    return data


def _yaml_values(cls: type[StageConfig], data: dict[str, Any], path: str) -> dict[str, Any]:
    """Top-level keys this stage has, then its own section; unknown keys are errors."""
    stages = {c.stage: c for c in STAGE_CONFIGS}
    known_anywhere = {f.name for c in STAGE_CONFIGS for f in dataclasses.fields(c)}
    values: dict[str, Any] = {}
    own = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in (PIPELINE_KEY, SLURM_KEY):  # read by run_pipeline.sh and memcirc.slurm, not by any stage
            continue
        if key in stages:
            if not isinstance(value, dict):
                raise InputError(f"config section '{key}' in {path} must be a mapping")
            stage_fields = {f.name for f in dataclasses.fields(stages[key])}
            for sub in value:
                if sub not in stage_fields:
                    raise InputError(f"unknown config key '{key}.{sub}' in {path}; "
                                     f"known keys of {key}: {', '.join(sorted(stage_fields))}")
            continue
        if key not in known_anywhere:
            raise InputError(f"unknown config key '{key}' in {path}; known keys: "
                             f"{', '.join(sorted(known_anywhere))}, or a stage section "
                             f"({', '.join(sorted(stages))})")
        if key in own:
            values[key] = value
    values.update(data.get(cls.stage) or {})
    values.pop("config", None)
    return values


# -- the pipeline's stage list ---------------------------------------------------------------

PIPELINE_KEY = "pipeline"
SLURM_KEY = "slurm"   # job resources for `run_pipeline.sh --slurm`, validated by memcirc.slurm
PIPELINE_STAGES = ("memorization_score", "contrastive_dataset", "find_circuits", "verify_circuit",
                   "attention_bypass", "kfac_edit", "training_dynamics", "predict_memorization")
DEFAULT_PIPELINE = PIPELINE_STAGES[:4]


def pipeline_stages(path: str) -> list[str]:
    """The stage scripts run_pipeline.sh runs for a config: its `pipeline:` list, in pipeline order."""
    listed = load_yaml(path).get(PIPELINE_KEY, list(DEFAULT_PIPELINE))
    if not isinstance(listed, list) or any(s not in PIPELINE_STAGES for s in listed):
        raise InputError(f"config key '{PIPELINE_KEY}' in {path} must list stages from "
                         f"{', '.join(PIPELINE_STAGES)}; got {listed!r}")
    return [s for s in PIPELINE_STAGES if s in listed]


# -- CLI -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # argparse exits 2 already; route through InputError for one uniform line on stderr.
        raise InputError(f"{message} (see --help)")


def _flags(f: dataclasses.Field) -> list[str]:
    names = [f"--{f.name.replace('_', '-')}"]
    if "_" in f.name:
        names.append(f"--{f.name}")
    return names + [a for a in f.metadata["aliases"] if a not in names]


def build_parser(cls: type[StageConfig], description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, epilog=epilog, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        tp, _ = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if tp is bool:
            action = "store_true" if f.name in ("force", "dry_run") else argparse.BooleanOptionalAction
            parser.add_argument(*_flags(f), dest=f.name, action=action, help=help_text)
        elif typing.get_origin(tp) is list:
            parser.add_argument(*_flags(f), dest=f.name, nargs="+", type=typing.get_args(tp)[0], help=help_text)
        else:
            parser.add_argument(*_flags(f), dest=f.name, type=_cli_type(tp), help=help_text)
    return parser


def _cli_type(tp: Any):
    def convert(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        return tp(text)
    convert.__name__ = tp.__name__
    return convert


def build_config(cls: type[StageConfig], argv: list[str] | None = None, description: str = "",
                 epilog: str = "") -> StageConfig:
    """defaults < YAML < explicit flags; raises InputError naming any bad key or value."""
    passed = vars(build_parser(cls, description, epilog).parse_args(argv))
    values: dict[str, Any] = {}
    if passed.get("config"):
        values.update(_yaml_values(cls, load_yaml(passed["config"]), passed["config"]))
    values.update(passed)
    return cls(**values)


def resolved_yaml(cfg: StageConfig) -> str:
    return yaml.safe_dump({cfg.stage: cfg.to_dict()}, sort_keys=False)


# Stage configs register themselves here so one YAML file can be validated against all of them.
STAGE_CONFIGS: list[type[StageConfig]] = []


def register(cls: type[StageConfig]) -> type[StageConfig]:
    STAGE_CONFIGS.append(cls)
    return cls


@register
@dataclass
class ScoreConfig(StageConfig):
    """memorization_score: score every window of a corpus."""

    stage: ClassVar[str] = "memorization"
    upstream: ClassVar[str | None] = None

    dataset: str = option("testbed", "Hub dataset id, local JSONL/Parquet/text/NPY file or folder, "
                          "or 'testbed'")
    dataset_config: str | None = option(None, "Hub dataset configuration name")
    split: str = option("train", "dataset split")
    streaming: bool = option(False, "stream a Hub dataset instead of downloading it whole")
    text_column: str = option("text", "column holding raw text")
    token_column: str | None = option(None, "column holding token ids (default: 'tokens' if present)")
    group_column: str = option("group", "optional column copied into each window's provenance")
    prefix_len: int = option(50, "prefix (prompt) tokens", aliases=("--prompt_tokens",), minimum=1)
    suffix_len: int = option(50, "suffix (continuation) tokens", aliases=("--generation_tokens",),
                             minimum=1)
    windowing: str = option("start", "'start': one window from each document start (Pythia "
                            "protocol); 'sliding': every stride tokens", choices=("start", "sliding"))
    stride: int | None = option(None, "sliding-window stride (default: prefix_len + suffix_len)",
                                minimum=1)
    metrics: list[str] = option(["exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy"],
                                "metrics to compute (token_match, bleu4, levenshtein need generation)",
                                choices=("exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy",
                                         "token_match", "bleu4", "levenshtein"))
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold")
    batch_size: int = option(32, "windows per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    padding_side: str = option("right", "padding side of the teacher-forced pass (generation "
                               "always left-pads)", choices=("left", "right"), hashed=False)
    chunk_size: int = option(256, "windows per resumable chunk file", minimum=1, hashed=False)
    num_shards: int | None = option(None, "split the windows into N shards (default: "
                                    "SLURM_ARRAY_TASK_COUNT, else 1)", minimum=1, hashed=False)
    shard_index: int | None = option(None, "which shard this job scores (default: "
                                     "SLURM_ARRAY_TASK_ID, else 0)", minimum=0, hashed=False)
    merge: bool = option(False, "merge finished shards into the stage outputs", aliases=("--merge_only",),
                         hashed=False)

    GENERATION_METRICS: ClassVar[tuple[str, ...]] = ("token_match", "bleu4", "levenshtein")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.metrics:
            raise InputError("config key 'metrics' must name at least one metric")


MEMORIZED_BY = ("exact", "token_match", "tf_accuracy", "bleu4")


@register
@dataclass
class ContrastiveConfig(StageConfig):
    """contrastive_dataset: token-id pairs (clean, corrupt, answer, wrong) for circuit discovery."""

    stage: ClassVar[str] = "contrastive"
    upstream: ClassVar[str | None] = "memorization"

    contrastive_mode: str = option("divergence", "'divergence': where memorization breaks (branch "
                                   "decision); 'dataset': memorized vs non-memorized contexts "
                                   "(memorization decision)", aliases=("--contrastive_mode",),
                                   choices=("divergence", "dataset"))
    memorized_by: str = option("exact", "scores.jsonl column that defines a memorized window",
                               choices=MEMORIZED_BY)
    threshold: float = option(1.0, "a window is memorized when memorized_by >= threshold")
    metric: str = option("bleu", "score that drives divergence detection: 'bleu' (BLEU-4) or "
                         "'memorization' (token accuracy), as the predecessor's --metric",
                         choices=("bleu", "memorization"))
    drop: float = option(0.3, "divergence: relative score drop that marks the break")
    low_max_lcp: int = option(0, "dataset mode: a non-memorized context reproduces at most this many "
                              "suffix tokens", minimum=0)
    similarity: str = option("embedding", "dataset mode: rank candidates by cosine of mean-pooled last "
                             "hidden states ('embedding') or Jaccard of token sets ('token_overlap')",
                             choices=("embedding", "token_overlap"))
    heldout_fraction: float = option(0.3, "fraction of documents whose pairs go to the held-out split")
    batch_size: int = option(32, "sequences per forward pass / generation batch",
                             aliases=("--batch_size",), minimum=1, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError("config key 'heldout_fraction' must be between 0 and 1 (exclusive)")
        if not 0.0 < self.drop < 1.0:
            raise InputError("config key 'drop' must be between 0 and 1 (exclusive)")


ABLATIONS = ("resample", "zero", "mean")
# Circuit settings shared by find_circuits and training_dynamics (one list of valid values each).
GRAD_FUNCTIONS = ("logit", "prob", "logprob", "logit_exp")
LOSSES = ("avg_diff", "neg_avg_diff", "avg_val", "avg_val_wrong")
FAITHFULNESS_METRICS = ("logit_diff", "answer_logit", "wrong_logit", "answer_logprob")
WEIGHT_PROCESSING = ("none", "tl_default")


@register
@dataclass
class CircuitsConfig(StageConfig):
    """find_circuits: EAP-IG edge attribution (auto-circuit) and the minimal faithful circuit."""

    stage: ClassVar[str] = "circuits"
    upstream: ClassVar[str | None] = "contrastive"

    ig_steps: int = option(5, "integrated-gradient samples (0 = plain EAP)", aliases=("--ig",), minimum=0)
    grad_function: str = option("logit", "what the gradient is taken of", aliases=("--grad_function",),
                                choices=GRAD_FUNCTIONS)
    loss: str = option("avg_diff", "attribution loss: avg_diff (answer - wrong), neg_avg_diff, avg_val "
                       "(answer), avg_val_wrong (wrong)", aliases=("--loss_function",),
                       choices=LOSSES)
    ablation: str = option("resample", "what an ablated edge carries: the corrupt run (resample), zero, "
                           "or the mean over the pairs", aliases=("--ablation_type",), choices=ABLATIONS)
    faithfulness_metric: str = option("logit_diff", "metric M in (M(circuit) - M(empty)) / (M(full) - "
                                      "M(empty))", aliases=("--optimize_metric",),
                                      choices=FAITHFULNESS_METRICS)
    target: float = option(0.85, "faithfulness the minimal circuit must reach",
                           aliases=("--target_performance",))
    weight_processing: str = option("none", "TransformerLens weight processing: none (HF-identical "
                                    "logits) or tl_default", choices=WEIGHT_PROCESSING)
    curve_points: int = option(16, "log-spaced edge counts on the faithfulness curve", minimum=2)
    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)


@register
@dataclass
class VerifyConfig(StageConfig):
    """verify_circuit: the circuit on held-out pairs, per ablation, against random circuits."""

    stage: ClassVar[str] = "verify"
    upstream: ClassVar[str | None] = "circuits"

    ablations: list[str] = option(list(ABLATIONS), "ablation types to evaluate", choices=ABLATIONS)
    random_circuits: int = option(10, "random circuits of the same size", minimum=1)
    edge_counts: list[int] = option([], "extra edge counts to report (default: a log-spaced list)")
    batch_size: int = option(32, "pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)


@register
@dataclass
class BypassConfig(StageConfig):
    """attention_bypass: per-block attention interventions, memorization vs general ability."""

    stage: ClassVar[str] = "bypass"
    upstream: ClassVar[str | None] = "memorization"

    mode: str = option("self", "self: each token attends only to itself (the paper's intervention); "
                       "zero: attention output zeroed; mean: attention output replaced by its mean over "
                       "the held-out reference text", choices=("self", "zero", "mean"))
    layer_sets: list[str] = option([], "extra block sets to bypass together, e.g. 0,1 2,3")
    memorized_file: str | None = option(None, "score these windows instead of the upstream memorized set "
                                        "(JSONL/Parquet with tokens, or the llm-memorization .npy format)")
    heldout: str = option("testbed", "held-out text for perplexity ('testbed': the held-out plays)")
    ppl_blocks: int = option(64, "held-out token blocks (of the model context) for perplexity", minimum=1)
    lm_eval_tasks: list[str] = option([], "lm-evaluation-harness tasks (needs the lm-eval extra)")
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold")
    batch_size: int = option(32, "sequences per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)


@register
@dataclass
class KfacConfig(StageConfig):
    """kfac_edit: K-FAC factors, eigenbasis edit keeping a fraction rho of importance, before/after."""

    stage: ClassVar[str] = "kfac"
    upstream: ClassVar[str | None] = "memorization"

    layers: list[int] = option([], "blocks to edit (default: the second half of the model)")
    projections: list[str] = option([], "arch roles of the linear modules to edit (mlp_in, mlp_out, "
                                    "mlp_gate for gated MLPs; default: the MLP input projections, "
                                    "gate and up where gated, as the paper)")
    labels: str = option("sampled", "gradient labels: sampled from the model (true Fisher) or the data",
                         choices=("sampled", "data"))
    factor_tokens: int = option(200_000, "token budget for collecting the factors", minimum=1)
    factor_data: str = option("testbed", "text the factors are collected on ('testbed': the training "
                              "corpus slice)")
    rhos: list[float] = option([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "fractions of importance to keep")
    formulas: list[str] = option(["original", "modified"], "importance: original = lambda*mu, "
                                 "modified = lambda*mu*|C|^2", choices=("original", "modified"))
    damping: float = option(0.0, "added to both factors' eigenvalues")
    heldout: str = option("testbed", "held-out text for perplexity ('testbed': the held-out plays)")
    ppl_blocks: int = option(64, "held-out token blocks (of the model context) for perplexity", minimum=1)
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold")
    save_rho: float | None = option(None, "save the edited model folder at this rho (default: the "
                                    "smallest rho whose perplexity rise is <= 20%)")
    save_formula: str = option("original", "formula of the saved edited model", choices=("original", "modified"))
    factors_file: str | None = option(None, "reuse factors.safetensors of a previous kfac run (same model "
                                      "and modules) instead of collecting them")
    batch_size: int = option(32, "sequences per forward/backward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    chunk_size: int = option(16, "factor batches between resumable saves of the running sums", minimum=1,
                             hashed=False)
    num_shards: int | None = option(None, "split the factor collection into N shards, one per job (default: "
                                    "SLURM_ARRAY_TASK_COUNT, else 1); then one --merge job edits", minimum=1,
                                    hashed=False)
    shard_index: int | None = option(None, "which factor shard this job collects (default: SLURM_ARRAY_TASK_ID, "
                                     "else 0)", minimum=0, hashed=False)
    merge: bool = option(False, "add the finished factor shards, then edit and evaluate", hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [r for r in self.rhos if not 0.0 < r <= 1.0]
        if bad or (self.save_rho is not None and not 0.0 < self.save_rho <= 1.0):
            raise InputError(f"config key 'rhos' must lie in (0, 1], got {bad or [self.save_rho]}")


@register
@dataclass
class PredictConfig(StageConfig):
    """predict_memorization: features from the data alone -> classifiers of memorized vs not."""

    stage: ClassVar[str] = "predict"
    upstream: ClassVar[str | None] = "memorization"

    labels_file: str | None = option(None, "table of memorized sequences (pythia-memorized-evals style: JSONL/"
                                     "Parquet file, dataset folder or Hub id with a tokens/Tokens column, optional "
                                     "index/Index); default: the labels of <input-dir>/scores.jsonl")
    labels_split: str = option("train", "split of --labels-file when it is a dataset folder or Hub id")
    controls_file: str | None = option(None, "random-control table (label 0) to go with --labels-file")
    controls_split: str = option("train", "split of --controls-file when it is a dataset folder or Hub id")
    label_column: str | None = option(None, "table column holding a memorization score (e.g. '1.4B' in "
                                      "pile-*-pythia-random-sampled): label = score >= threshold where present")
    prefix_len: int | None = option(None, "table rows: prefix tokens (default: half the row)", minimum=1)
    suffix_len: int | None = option(None, "table rows: suffix tokens; rows are cut to prefix_len + suffix_len "
                                    "(default: the first row's length)", minimum=1)
    memorized_by: str = option("exact", "scores.jsonl column that defines a memorized window", choices=MEMORIZED_BY)
    threshold: float = option(1.0, "a window is memorized when memorized_by >= threshold")
    reference_model: str | None = option(None, "smaller reference model for the surprisal features (Hub id or "
                                         "folder; default for the testbed: its earliest checkpoint)")
    reference_revision: str | None = option(None, "revision of the reference model")
    baseline_model: str | None = option(None, "the seed's baseline predictor: 'memorized' = memorized by this "
                                        "(smaller) model, scored here, or a JSONL/Parquet table of its memorized "
                                        "sequences (default for the testbed: its last checkpoint)")
    baseline_revision: str | None = option(None, "revision of the baseline model")
    baseline_column: str | None = option(None, "instead of --baseline-model: a label-table column with a smaller "
                                         "model's memorization score (e.g. '160M'), memorized = score >= threshold")
    corpus: str = option("testbed", "training corpus for n-gram duplication counts and token rarity (file, "
                         "folder or Hub id; 'testbed': the testbed's training set, canaries repeated k times)")
    corpus_split: str = option("train", "split of a Hub / folder corpus")
    corpus_streaming: bool = option(False, "stream a Hub corpus (with --corpus-tokens)")
    corpus_tokens: int | None = option(None, "read at most this many corpus tokens into the n-gram index", minimum=1)
    ngram: int = option(8, "n of the n-gram duplication index", minimum=1)
    index_file: str | None = option(None, "reuse a saved ngram_index.safetensors instead of building one")
    domain_column: str = option("source", "window / table field used as the source/domain feature ('doc_kind': "
                                "the document id's leading word, e.g. canary / corpus on the testbed)")
    classifiers: list[str] = option(["gradient_boosting", "logistic_regression"], "classifiers to compare",
                                    choices=("gradient_boosting", "logistic_regression"))
    folds: int = option(5, "stratified cross-validation folds", minimum=2)
    permutation_repeats: int = option(10, "shuffles per feature for permutation importance", minimum=1)
    dynamics_dir: str | None = option(None, "optional: a training_dynamics folder; also predict the onset "
                                      "checkpoint of each memorized window ('auto': <output-dir>/dynamics when "
                                      "that stage has finished)")
    batch_size: int = option(32, "sequences per forward pass", aliases=("--batch_size",), minimum=1, hashed=False)


@register
@dataclass
class DynamicsConfig(StageConfig):
    """training_dynamics: memorization and circuits across training checkpoints."""

    stage: ClassVar[str] = "dynamics"
    upstream: ClassVar[str | None] = "memorization"

    checkpoints: list[str] = option([], "revisions of --model (e.g. step1000) or local checkpoint folders, in "
                                    "training order (default for the testbed: its checkpoints, then the final "
                                    "model)")
    steps: list[int] = option([], "training step of each local checkpoint folder (default: the number at the "
                              "end of its name, e.g. step-222)")
    schedule: str | None = option(None, "build the revision list by name, Pythia-style stepN snapped to the "
                                  "revisions Pythia has: linear (every schedule_every steps, plus the end), log "
                                  "(schedule_points log-spaced revisions) or exp_plus_detail (Tigges et al.: "
                                  "2^0..2^9, then 1k..15k by 1k, 20k..65k by 5k, 70k..140k by 10k, 143k; pass "
                                  "--schedule-start 0 for the 2^i steps)",
                                  choices=("linear", "log", "exp_plus_detail"))
    schedule_start: int = option(1000, "first step of the schedule", minimum=0)
    schedule_end: int = option(143000, "last step of the schedule", minimum=0)
    schedule_every: int = option(1000, "linear schedule: step spacing", minimum=1)
    schedule_points: int = option(8, "log schedule: number of checkpoints", minimum=2)
    memorized_by: str = option("exact", "scores column that defines a memorized window", choices=MEMORIZED_BY)
    threshold: float = option(1.0, "a window is memorized when memorized_by >= threshold")
    circuits: bool = option(True, "run attribution, minimal circuit and faithfulness per checkpoint (needs "
                            "the contrastive stage's pairs)")
    pairs_dir: str | None = option(None, "contrastive stage folder with the pairs (default: "
                                   "<output-dir>/contrastive)")
    ig_steps: int = option(5, "integrated-gradient samples (0 = plain EAP)", aliases=("--ig",), minimum=0)
    grad_function: str = option("logit", "what the gradient is taken of",
                                choices=GRAD_FUNCTIONS)
    loss: str = option("avg_diff", "attribution loss", choices=LOSSES)
    ablation: str = option("resample", "what an ablated edge carries", choices=ABLATIONS)
    faithfulness_metric: str = option("logit_diff", "metric of the faithfulness ratio",
                                      choices=FAITHFULNESS_METRICS)
    target: float = option(0.85, "faithfulness the minimal circuit must reach")
    weight_processing: str = option("none", "TransformerLens weight processing", choices=WEIGHT_PROCESSING)
    curve_points: int = option(16, "log-spaced edge counts on the faithfulness curve", minimum=2)
    checkpoint_index: int | None = option(None, "run only this checkpoint's unit (default: SLURM_ARRAY_TASK_ID "
                                          "in a job array, else every checkpoint)", minimum=0, hashed=False)
    merge: bool = option(False, "only aggregate finished checkpoint units into the stage outputs", hashed=False)
    batch_size: int = option(32, "windows / pairs per batch", aliases=("--batch_size",), minimum=1, hashed=False)
    chunk_size: int = option(256, "windows per resumable scoring chunk inside a checkpoint unit", minimum=1,
                             hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.target <= 1.0:
            raise InputError(f"config key 'target' must be in (0, 1], got {self.target}")


if __name__ == "__main__":  # `python -m memcirc.config pipeline FILE`: the stage list, one per line
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != PIPELINE_KEY:
        sys.exit("usage: python -m memcirc.config pipeline CONFIG.yaml")
    try:
        print("\n".join(pipeline_stages(sys.argv[2])))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
