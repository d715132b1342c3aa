"""Memorization and circuits across training checkpoints (stage 8, training_dynamics).

The checkpoints (`resolve_checkpoints`) are Hub revisions of `--model` (Pythia's `step1000` ...
`step143000`, listed or built from a named schedule), local checkpoint folders, or, for the testbed,
its own checkpoints followed by the final model. They must share one architecture and one tokenizer;
that is checked on their configs and tokenizers before any weights are read.

Each checkpoint is an independent **unit** (`<out>/dynamics/checkpoints/<index:05d>/`), so it can be
one SLURM array task (`--checkpoint-index`, default `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`):

* `scores.jsonl`: the upstream memorization run's windows re-scored by this checkpoint (teacher-
  forced metrics, plus `memorized_by` when it needs generation); scoring resumes chunk by chunk;
* with circuits (the contrastive stage's pairs, made with the final model): `prune_scores.safetensors`
  (EAP-IG on the discovery pairs, `memcirc.circuits.attribute_edges`), `circuit.json` (the minimal
  circuit reaching `target` on the discovery pairs, `memcirc.circuits.minimal_circuit`, and its
  faithfulness on the held-out pairs, with M(full) and M(empty) of both splits);
* `done.json` last: the unit's fingerprint, label, step, model identity and architecture signature.

A unit whose `done.json` matches this config is skipped; a killed unit has none and is recomputed
(its finished scoring chunks are kept). A unit depends only on its checkpoint and the shared inputs,
never on another unit, so its files are the same whether computed in one process or as array tasks.

The aggregate (all units finished; `--merge` does only this step) writes `onsets.jsonl` (per
window: onset step = the first checkpoint from which it is memorized at that and every later
checkpoint, null if not memorized at the last; first step memorized; whether it was forgotten
after being memorized; memorized per checkpoint), `overlap.json` (Jaccard and weighted Jaccard of
every pair of checkpoints' circuits), `summary.json` (`onset_by_group` and one entry per
checkpoint), three figures and `manifest.json` last.

Importing this module is cheap (torch and auto-circuit are imported only to compute a unit), so a
SLURM layer can size its array with `len(resolve_checkpoints(cfg))`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memcirc import artifacts as art
from memcirc.data import Window
from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.manifest import StageRun, read_manifest
from memcirc.stages.training_dynamics import DynamicsConfig
from memcirc.testbed import MODEL_DIR, TESTBED_NAME, checkpoint_folders

if TYPE_CHECKING:
    from memcirc.models import LoadedModel, ModelSpec
    from memcirc.pairs import Pair

log = logging.getLogger(__name__)

STAGE = "training_dynamics"
METHOD_VERSION = 1
UNITS_DIR = "checkpoints"          # <stage>/checkpoints/<index:05d>/
UNIT_DONE = "done.json"            # written last in a unit folder
ONSETS_JSONL = "onsets.jsonl"
OVERLAP_JSON = "overlap.json"
MEMORIZATION_PNG = "memorization_over_training.png"
CIRCUIT_PNG = "circuit_over_training.png"
OVERLAP_PNG = "overlap_heatmap.png"

# The revisions EleutherAI publishes for every Pythia model.
PYTHIA_STEPS = (0, *(2 ** i for i in range(10)), *range(1000, 143001, 1000))
# Tigges et al.'s `exp_plus_detail` checkpoint schedule (circuits-over-time).
EXP_PLUS_DETAIL = (*(2 ** i for i in range(10)), *range(1000, 15001, 1000), *range(20000, 65001, 5000),
                   *range(70000, 140001, 10000), 143000)
CIRCUIT_KEYS = ("ig_steps", "grad_function", "loss", "ablation", "faithfulness_metric", "target",
                "weight_processing", "curve_points")
FAITHFULNESS_YLIM = (-0.25, 1.25)
ILL_CONDITIONED = 0.1  # |M(full) - M(empty)| below this share of the final checkpoint's gap is flagged

ONSET_DEFINITION = (
    "onset = the step of the first checkpoint from which the window is memorized (memorized_by >= "
    "threshold) at that and every later checkpoint; null when it is not memorized at the last checkpoint. "
    "first_step = the first checkpoint at which it is memorized at all; forgotten = memorized at some "
    "checkpoint and not memorized at a later one")
GROUP_ONSET_DEFINITION = (
    "onset_by_group[g] = the lower median of the onsets of ALL windows of group g, a never-memorized window "
    "counting as later than every checkpoint: the first step by which at least half of the group is "
    "memorized for good; null when fewer than half of the group's windows are memorized at the last "
    "checkpoint (a group with none memorized is null)")
JACCARD_DEFINITION = ("|A & B| / |A | B| of the two checkpoints' minimal-circuit edge sets (null when either "
                      "circuit is undefined)")
WEIGHTED_DEFINITION = ("sum_e min(w_e, v_e) / sum_e max(w_e, v_e), w = |prune score| of every edge normalized "
                       "to sum 1 per checkpoint (all edges, not only the circuit's)")
ILL_DEFINITION = (f"ill_conditioned: M(full) - M(empty) <= 0 or |M(full) - M(empty)| < {ILL_CONDITIONED} x "
                  "that of the last checkpoint on the same pairs; faithfulness is a ratio of that gap, so it "
                  "is noise there")


# -- checkpoints -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the sweep: `index` is its unit number, `step` its training step."""

    index: int
    label: str
    step: int
    name_or_path: str            # Hub id, local folder, or 'testbed'
    revision: str | None = None  # Hub revision (e.g. 'step3000'); None for local folders

    def spec(self, cfg: DynamicsConfig) -> ModelSpec:
        from memcirc.models import ModelSpec

        return ModelSpec(name_or_path=self.name_or_path, revision=self.revision, gguf_file=cfg.gguf_file,
                         dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn_implementation)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_local_model(name: str) -> bool:
    return name == TESTBED_NAME or Path(name).expanduser().exists()


def _step_from_name(name: str) -> int | None:
    """'step-222' -> 222, 'step1000' -> 1000, 'stage1-step1000-tokens4B' -> 1000, 'ckpt_500' -> 500."""
    match = re.search(r"step[-_]?(\d+)", name) or re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None


def _snap(value: float, available: Sequence[int]) -> int:
    return min(available, key=lambda s: (abs(s - value), s))


def schedule_steps(name: str, start: int, end: int, every: int = 1000, points: int = 8) -> list[int]:
    """Pythia checkpoint steps of a named schedule in [start, end], snapped to existing revisions.

    `linear`: start, start + every, ... and end; `log`: `points` log-spaced steps (step 0 first when
    start is 0); `exp_plus_detail`: Tigges et al.'s list. Two points snapping to one revision count
    once, so a schedule can come out shorter than asked.
    """
    if end < start:
        raise InputError(f"config key 'schedule_end' ({end}) is before 'schedule_start' ({start})")
    available = [s for s in PYTHIA_STEPS if start <= s <= end]
    if not available:
        raise InputError(f"no Pythia revision lies in steps {start}..{end} (they are 0, 1, 2, 4, ..., 512, "
                         "then every 1000 up to 143000)")
    if name == "linear":
        raw: list[float] = list(range(start, end + 1, every))
        if raw[-1] != end:
            raw.append(end)
    elif name == "log":
        if start == 0:
            raw = [0.0, *np.geomspace(1, end, points - 1).tolist()] if end > 0 else [0.0]
        else:
            raw = np.geomspace(start, end, points).tolist()
    elif name == "exp_plus_detail":
        raw = [s for s in EXP_PLUS_DETAIL if start <= s <= end]
        if not raw:
            raise InputError(f"the exp_plus_detail schedule has no step in {start}..{end}")
    else:
        raise InputError(f"unknown schedule {name!r}; choose linear, log or exp_plus_detail")
    return list(dict.fromkeys(_snap(x, available) for x in raw))


def _testbed_checkpoints() -> list[tuple[str, str, int]]:
    """(label, name_or_path, step) of the testbed's checkpoints, then its final model ('testbed')."""
    final = MODEL_DIR.resolve()
    return [(folder.name, TESTBED_NAME if folder == final else str(folder), step)
            for step, folder in checkpoint_folders()]


def resolve_checkpoints(cfg: DynamicsConfig) -> list[Checkpoint]:
    """The checkpoints of the sweep in training order, without loading anything.

    From, in this order: `checkpoints` (each a local folder, or else a revision of `model`, with
    `steps` or the number in its name); `schedule` (Pythia revisions stepN of `model`); for the
    testbed, its checkpoints then the final model (steps from ground_truth.json).

    Raises:
        InputError: no checkpoints, both a list and a schedule, a missing folder, a revision of a
            local model, an unknown step, steps not strictly increasing, or a checkpoint listed twice.
    """
    if cfg.checkpoints and cfg.schedule:
        raise InputError("pass either config key 'checkpoints' or 'schedule', not both")
    if cfg.steps and not cfg.checkpoints:
        raise InputError("config key 'steps' applies only to an explicit 'checkpoints' list")
    entries: list[tuple[str, str, str | None]] = []   # (label, name_or_path, revision)
    steps: list[int | None]
    if cfg.checkpoints:
        for entry in cfg.checkpoints:
            path = Path(entry).expanduser()
            if path.is_dir():
                entries.append((path.resolve().name, str(path.resolve()), None))
            elif path.exists():
                raise InputError(f"checkpoint {entry} is a file; pass the folder that holds config.json")
            elif entry.startswith(("/", ".", "~")) or "/" in entry:
                raise InputError(f"checkpoint folder {entry} does not exist")
            elif _is_local_model(cfg.model):
                raise InputError(f"checkpoint {entry!r} is not a folder, and --model {cfg.model} is local: "
                                 "revisions apply only to Hub ids; list the checkpoint folders instead")
            else:
                entries.append((entry, cfg.model, entry))
        if cfg.steps:
            if len(cfg.steps) != len(entries):
                raise InputError(f"config key 'steps' has {len(cfg.steps)} values for {len(entries)} checkpoints")
            steps = list(cfg.steps)
        else:
            steps = [_step_from_name(label) for label, _, _ in entries]
            unknown = [label for (label, _, _), s in zip(entries, steps, strict=True) if s is None]
            if unknown:
                raise InputError(f"cannot tell the training step of checkpoint {unknown[0]!r} from its name; "
                                 "pass --steps (one per checkpoint)")
    elif cfg.schedule:
        if _is_local_model(cfg.model):
            raise InputError(f"a schedule builds Hub revisions (stepN), but --model {cfg.model} is local; list "
                             "its checkpoint folders with --checkpoints")
        steps = list(schedule_steps(cfg.schedule, cfg.schedule_start, cfg.schedule_end, cfg.schedule_every,
                                    cfg.schedule_points))
        entries = [(f"step{s}", cfg.model, f"step{s}") for s in steps]
    elif cfg.model == TESTBED_NAME:
        testbed = _testbed_checkpoints()
        entries = [(label, name, None) for label, name, _ in testbed]
        steps = [s for _, _, s in testbed]
    else:
        raise InputError(f"no checkpoints for model {cfg.model!r}: pass --checkpoints (revisions such as step1000, "
                         "or local folders) or --schedule linear|log|exp_plus_detail")
    ints = [int(s) for s in steps if s is not None]
    bad = [i for i in range(1, len(ints)) if ints[i] <= ints[i - 1]]
    if bad:
        i = bad[0]
        raise InputError(f"checkpoint steps must increase (training order): {entries[i - 1][0]!r} is step "
                         f"{ints[i - 1]}, the next, {entries[i][0]!r}, step {ints[i]}")
    seen: set[tuple[str, str | None]] = set()
    for label, name, revision in entries:
        if (name, revision) in seen:
            raise InputError(f"checkpoint {label!r} is listed twice")
        seen.add((name, revision))
    return [Checkpoint(i, label, step, name, revision)
            for i, ((label, name, revision), step) in enumerate(zip(entries, ints, strict=True))]


def resolve_checkpoint_index(index: int | None, n_checkpoints: int) -> int | None:
    """The one unit this job runs: `index`, else the SLURM array task's offset, else None (all units)."""
    env = os.environ
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        # Array ids may start anywhere (--array=1-4); unit indices always start at 0.
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if index is not None and not 0 <= index < n_checkpoints:
        raise InputError(f"checkpoint index {index} is outside 0..{n_checkpoints - 1} ({n_checkpoints} "
                         "checkpoints): size the job array with len(resolve_checkpoints(cfg))")
    return index


def unit_dir(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / UNITS_DIR / f"{index:05d}"


# -- architecture and tokenizer ------------------------------------------------------------

def signature(config: Any, tokenizer: Any) -> dict[str, Any]:
    """What checkpoints of one training run share: family, sizes, and the tokenizer's vocabulary."""
    from memcirc.models.arch import dims

    d = dims(config)
    vocab = sorted(tokenizer.get_vocab().items())
    return {"model_type": config.model_type, "n_layers": d.n_layers, "d_model": d.d_model, "n_heads": d.n_heads,
            "n_kv_heads": d.n_kv_heads, "d_head": d.d_head, "d_mlp": d.d_mlp, "d_vocab": d.d_vocab,
            "n_ctx": d.n_ctx, "tokenizer_sha256": art.sha256_json(vocab)}


def checkpoint_signature(spec: ModelSpec) -> dict[str, Any]:
    """`signature` from the config and tokenizer files only (no weights are read)."""
    from memcirc.models.loading import load_config_and_tokenizer

    return signature(*load_config_and_tokenizer(spec))


def _signature_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    diff = [k for k in a if a.get(k) != b.get(k)]
    if not diff:
        return None
    if "tokenizer_sha256" in diff and len(diff) == 1:
        return f"tokenizer (vocabulary sha256 {a['tokenizer_sha256'][:12]} vs {b['tokenizer_sha256'][:12]})"
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in diff if k != "tokenizer_sha256")


def check_same_architecture(checkpoints: Sequence[Checkpoint], signatures: Sequence[dict[str, Any]]) -> None:
    """InputError naming the first checkpoint that differs from the last one (architecture or tokenizer)."""
    ref, ref_sig = checkpoints[-1], signatures[-1]
    for ckpt, sig in zip(checkpoints, signatures, strict=True):
        if (diff := _signature_difference(sig, ref_sig)) is not None:
            raise InputError(f"checkpoints {ckpt.label!r} (index {ckpt.index}) and {ref.label!r} (index {ref.index}) "
                             f"differ in {diff}: all checkpoints must share one architecture and tokenizer")


def _check_upstream_model(recorded: dict[str, Any] | None, final_sig: dict[str, Any], what: str) -> None:
    """The model that made an upstream artifact (windows, pairs) must share the checkpoints' tokenizer."""
    from memcirc.models import ModelSpec

    recorded = recorded or {}
    candidates = [(recorded.get("name_or_path"), recorded.get("revision")),
                  (recorded.get("local_path"), None)]
    for name, revision in candidates:
        if not name:
            continue
        try:
            sig = checkpoint_signature(ModelSpec(str(name), revision=revision, device="cpu"))
        except InputError:
            continue
        if sig["tokenizer_sha256"] != final_sig["tokenizer_sha256"] or sig["d_vocab"] != final_sig["d_vocab"]:
            raise InputError(f"the {what} were made with model {recorded.get('name_or_path')!r}, whose tokenizer "
                             "differs from the checkpoints'; rebuild them with a checkpoint of this run")
        return
    log.warning("cannot read the model the %s were made with (%r); their token ids are only checked against "
                "the vocabulary size", what, recorded.get("name_or_path"))


# -- onsets and overlap (pure functions) ------------------------------------------------------

@dataclass(frozen=True)
class Onset:
    onset_step: int | None
    first_step: int | None
    forgotten: bool


def memorization_onsets(steps: Sequence[int], memorized: Any) -> list[Onset]:
    """Per window, from `memorized` bool [n_checkpoints, n_windows] (rows in training order).

    onset: first checkpoint i with memorized[j] for every j >= i (None unless memorized at the last);
    first: first checkpoint memorized at all; forgotten: memorized, then not, at a later checkpoint.
    """
    mem = np.asarray(memorized, dtype=bool)
    if mem.ndim != 2 or mem.shape[0] != len(steps):
        raise ValueError(f"memorized must be [n_checkpoints={len(steps)}, n_windows], got {mem.shape}")
    # stays[i] = memorized at i and at every later checkpoint (a reverse cumulative AND)
    stays = np.flip(np.logical_and.accumulate(np.flip(mem, 0), axis=0), 0)
    onset_idx, first_idx = stays.argmax(axis=0), mem.argmax(axis=0)
    ever, at_end = mem.any(axis=0), mem[-1]
    out = []
    for w in range(mem.shape[1]):
        onset = int(steps[onset_idx[w]]) if at_end[w] else None
        first = int(steps[first_idx[w]]) if ever[w] else None
        forgotten = bool(ever[w] and (not at_end[w] or onset_idx[w] > first_idx[w]))
        out.append(Onset(onset, first, forgotten))
    return out


def group_onset(onsets: Sequence[int | None]) -> int | None:
    """The lower median of onsets, None (never) ranking last; None when fewer than half have one."""
    if not onsets:
        return None
    finite = sorted(o for o in onsets if o is not None)
    position = math.ceil(len(onsets) / 2)   # 1-based rank of the lower median
    return finite[position - 1] if len(finite) >= position else None


def onsets_by_group(onsets: Sequence[Onset], groups: Sequence[str], order: Sequence[str]) -> tuple[dict, dict]:
    """(onset_by_group, detail by group) for windows labelled by `groups`, in group `order`."""
    headline: dict[str, int | None] = {}
    detail: dict[str, dict[str, Any]] = {}
    for g in order:
        members = [o for o, gg in zip(onsets, groups, strict=True) if gg == g]
        finite = [o.onset_step for o in members if o.onset_step is not None]
        firsts = [o.first_step for o in members if o.first_step is not None]
        headline[g] = group_onset([o.onset_step for o in members])
        detail[g] = {"n": len(members), "memorized_at_last": len(finite),
                     "onset_step": headline[g],
                     "median_onset_of_memorized": float(np.median(finite)) if finite else None,
                     "earliest_onset": min(finite) if finite else None,
                     "latest_onset": max(finite) if finite else None,
                     "ever_memorized": len(firsts),
                     "earliest_first_step": min(firsts) if firsts else None,
                     "forgotten": sum(o.forgotten for o in members)}
    return headline, detail


def jaccard(a: set[Any] | None, b: set[Any] | None) -> float | None:
    """|a & b| / |a | b|; None when either set is undefined; 1.0 for two empty sets."""
    if a is None or b is None:
        return None
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def weighted_jaccard(w: Any | None, v: Any | None) -> float | None:
    """sum min / sum max of |w| and |v|, each normalized to sum 1; None when either is missing or all zero."""
    if w is None or v is None:
        return None
    w, v = np.abs(np.asarray(w, np.float64)), np.abs(np.asarray(v, np.float64))
    if w.shape != v.shape:
        raise ValueError(f"score vectors differ in shape: {w.shape} vs {v.shape}")
    if w.sum() == 0 or v.sum() == 0:
        return None
    w, v = w / w.sum(), v / v.sum()
    return float(np.minimum(w, v).sum() / np.maximum(w, v).sum())


def overlap_matrix(items: Sequence[Any], measure: Any) -> list[list[float | None]]:
    """measure(items[i], items[j]) for every pair (symmetric; computed once per pair)."""
    n = len(items)
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            out[i][j] = out[j][i] = measure(items[i], items[j])
    return out


# -- inputs ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything a unit or the aggregate needs, read and checked before anything is written."""

    checkpoints: list[Checkpoint]
    windows: list[Window]
    group_order: list[str]
    metrics: tuple[str, ...]
    inputs: list[dict[str, Any]]
    unit_fingerprints: list[str]
    final_signature: dict[str, Any]
    pairs: list[Pair] | None = None
    pairs_sha: str | None = None


def _read_windows(stage_dir: Path, limit: int | None) -> tuple[list[Window], list[str], dict[str, Any]]:
    manifest = read_manifest(stage_dir, what="memorization")
    rows = list(art.read_jsonl(stage_dir / art.SCORES_JSONL))[:limit]
    if not rows:
        raise InputError(f"{stage_dir}/{art.SCORES_JSONL} holds no windows; re-run memorization_score")
    missing = [k for k in ("id", "tokens", "prefix_len", "doc") if k not in rows[0]]
    if missing:
        raise InputError(f"{stage_dir}/{art.SCORES_JSONL} rows lack {', '.join(missing)}; re-run memorization_score")
    windows = [Window(id=r["id"], tokens=np.asarray(r["tokens"], np.int64), prefix_len=r["prefix_len"],
                      source=r.get("source", ""), doc=str(r["doc"]), offset=r.get("offset", 0),
                      group=r.get("group")) for r in rows]
    seen = [str(w.group if w.group is not None else "all") for w in windows]
    summary_path = stage_dir / art.SUMMARY_JSON
    listed = list(art.read_json(summary_path).get("groups", {})) if summary_path.is_file() else []
    order = [g for g in listed if g in set(seen)] + [g for g in dict.fromkeys(seen) if g not in listed]
    return windows, order, manifest


def _metrics(cfg: DynamicsConfig) -> tuple[str, ...]:
    from memcirc.scoring import GENERATION_METRICS, TEACHER_FORCED_METRICS

    extra = (cfg.memorized_by,) if cfg.memorized_by in GENERATION_METRICS else ()
    return (*TEACHER_FORCED_METRICS, *extra)


def _unit_fingerprint(cfg: DynamicsConfig, ckpt: Checkpoint, windows_run: str, metrics: Sequence[str],
                      pairs_sha: str | None) -> str:
    """What a unit's files depend on: the checkpoint, precision, windows, metrics and circuit method.

    Not its index, label or step (the aggregate takes those from the current checkpoint list)."""
    from memcirc.models import resolve_device, resolve_dtype
    from memcirc.models.device import dtype_name

    dtype = dtype_name(resolve_dtype(cfg.dtype, resolve_device(cfg.device)))
    circuits = ({k: getattr(cfg, k) for k in CIRCUIT_KEYS} | {"pairs_sha256": pairs_sha}) if cfg.circuits else None
    return art.sha256_json({"method": METHOD_VERSION, "name_or_path": ckpt.name_or_path, "revision": ckpt.revision,
                            "gguf_file": cfg.gguf_file, "dtype": dtype, "attn_implementation": cfg.attn_implementation,
                            "seed": cfg.seed, "windows_run_id": windows_run, "limit": cfg.limit,
                            "metrics": list(metrics), "circuits": circuits})


def plan(cfg: DynamicsConfig, checkpoints: list[Checkpoint], check: Sequence[int]) -> Plan:
    """Read and check the inputs. `check`: the checkpoints whose config and tokenizer are compared with
    the final checkpoint's (every one for a full run; the unit's own for an array task)."""
    final = checkpoints[-1]
    final_sig = checkpoint_signature(final.spec(cfg))
    todo = [c for c in checkpoints[:-1] if c.index in set(check)]
    sigs = [checkpoint_signature(c.spec(cfg)) for c in progress(todo, "checking checkpoints", total=len(todo))]
    check_same_architecture([*todo, final], [*sigs, final_sig])
    upstream = cfg.upstream_dir
    assert upstream is not None
    windows, order, manifest = _read_windows(upstream, cfg.limit)
    bad = [w.id for w in windows if w.tokens.min() < 0 or w.tokens.max() >= final_sig["d_vocab"]
           or len(w.tokens) > final_sig["n_ctx"]]
    if bad:
        raise InputError(f"window {bad[0]} of {upstream} does not fit the checkpoints (vocabulary "
                         f"{final_sig['d_vocab']}, context {final_sig['n_ctx']}): score windows of this model")
    _check_upstream_model(manifest.get("model"), final_sig, "memorization windows")
    inputs = [{"path": str(upstream), "run_id": manifest["run_id"]}]
    pairs = pairs_sha = None
    if cfg.circuits:
        from memcirc.pairs import pairs_input, read_pairs

        pairs_dir = Path(cfg.pairs_dir) if cfg.pairs_dir else Path(cfg.output_dir) / "contrastive"
        pairs_path, pairs_manifest, pairs_sha = pairs_input(pairs_dir)
        pairs = read_pairs(pairs_path, vocab_size=final_sig["d_vocab"], max_len=final_sig["n_ctx"])
        if not any(p.split == "discovery" for p in pairs):
            raise InputError(f"{pairs_path} has no discovery pairs; re-run contrastive_dataset with more data "
                             "(or pass --no-circuits)")
        _check_upstream_model(pairs_manifest.get("model"), final_sig, "contrastive pairs")
        inputs.append({"path": str(pairs_path), "run_id": pairs_manifest.get("run_id"), "sha256": pairs_sha})
    metrics = _metrics(cfg)
    fps = [_unit_fingerprint(cfg, c, manifest["run_id"], metrics, pairs_sha) for c in checkpoints]
    return Plan(checkpoints, windows, order, metrics, inputs, fps, final_sig, pairs, pairs_sha)


def unit_status(directory: Path, fingerprint: str) -> str:
    """'done' (done.json of this fingerprint, files intact), 'other' (done for another config) or 'todo'."""
    path = directory / UNIT_DONE
    if not path.is_file():
        return "todo"
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "todo"
    if marker.get("fingerprint") != fingerprint:
        return "other"
    for name, sha in marker.get("outputs", {}).items():
        if not (directory / name).is_file() or art.sha256_file(directory / name) != sha:
            log.warning("%s changed after its unit finished; the unit is recomputed", directory / name)
            return "todo"
    return "done"


# -- one checkpoint unit ----------------------------------------------------------------------

def _unit_row(row: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    out = {"id": row["id"], "doc": row["doc"]}
    if "group" in row:
        out["group"] = row["group"]
    return out | {m: row[m] for m in metrics if m in row}


def _unit_circuit(cfg: DynamicsConfig, pairs: Sequence[Pair], pairs_sha: str, loaded: LoadedModel,
                  directory: Path) -> dict[str, Any]:
    """Attribution, minimal circuit (discovery pairs) and held-out faithfulness of one checkpoint.

    Writes prune_scores.safetensors and circuit.json; returns circuit.json without its edge list.
    Undefined faithfulness (M(full) = M(empty)) is recorded, not raised: early checkpoints can be there.
    """
    from memcirc.circuits import (
        CIRCUIT_JSON,
        PRUNE_SCORES,
        SCORE_DEFINITION,
        Ablation,
        FaithfulnessEvaluator,
        attribute_edges,
        build_graph,
        circuit_edges,
        edge_ranking,
        make_batches,
        minimal_circuit,
        model_key,
        save_prune_scores,
    )

    graph = build_graph(loaded, cfg.weight_processing)
    discovery = [p for p in pairs if p.split == "discovery"]
    heldout = [p for p in pairs if p.split == "heldout"]
    batches = make_batches(discovery, cfg.batch_size, loaded.device)
    result: dict[str, Any] = {
        "edges_total": graph.n_edges, "n_discovery": len(discovery), "n_heldout": len(heldout),
        "metric": cfg.faithfulness_metric, "ablation": cfg.ablation, "target": cfg.target,
        "minimal_edges": None, "faithfulness_discovery": None, "faithfulness_heldout": None,
        "metric_full": None, "metric_empty": None, "heldout_metric_full": None, "heldout_metric_empty": None,
        "monotone": None, "non_monotone_steps": [], "curve": [], "notes": []}
    try:
        evaluator: FaithfulnessEvaluator | None = FaithfulnessEvaluator(graph, batches, cfg.ablation,
                                                                         cfg.faithfulness_metric)
        ablation = evaluator.ablation
        result.update(metric_full=evaluator.m_full, metric_empty=evaluator.m_empty)
    except InputError as e:  # M(full) == M(empty): attribution is still defined, faithfulness is not
        evaluator, ablation = None, Ablation(graph, batches, cfg.ablation)
        result["notes"].append(f"discovery: {e}")
    scores = attribute_edges(graph, batches, ablation, ig_steps=cfg.ig_steps, grad_function=cfg.grad_function,
                             loss=cfg.loss)
    ranking = edge_ranking(scores)
    edges: list[dict[str, Any]] = []
    if evaluator is not None:
        search = minimal_circuit(lambda ks: evaluator.at_counts(ranking, ks), graph.n_edges, cfg.target,
                                 cfg.curve_points)
        k = search.minimal_edges
        result.update(minimal_edges=k, faithfulness_discovery=search.faithfulness, monotone=search.monotone,
                      non_monotone_steps=search.non_monotone_steps,
                      curve=[{"edges": e, "faithfulness": f} for e, f in search.evaluated])
        edges = circuit_edges(graph, scores, ranking, k)
        if heldout:
            try:
                held = FaithfulnessEvaluator(graph, make_batches(heldout, cfg.batch_size, loaded.device),
                                             cfg.ablation, cfg.faithfulness_metric)
                result.update(faithfulness_heldout=float(held.at_counts(ranking, [k])[0]),
                              heldout_metric_full=held.m_full, heldout_metric_empty=held.m_empty)
            except InputError as e:
                result["notes"].append(f"heldout: {e}")
        else:
            result["notes"].append("no held-out pairs")
    key = model_key(loaded)
    method = {k: getattr(cfg, k) for k in CIRCUIT_KEYS} | {"score_definition": SCORE_DEFINITION,
                                                          "normalization": "mean over pairs and IG points"}
    save_prune_scores(directory / PRUNE_SCORES, graph, scores, {
        "format": "memcirc prune scores v1", "model_sha256": art.sha256_json(key), "model": key,
        "pairs_sha256": pairs_sha, "pairs_split": "discovery", "n_pairs": len(discovery), "limit": cfg.limit,
        "method": method, "modules": graph.modules, "n_edges": graph.n_edges})
    art.write_json(directory / CIRCUIT_JSON, {**result, "ranking": "|score| descending, ties in the graph's edge "
                                              "order", "circuit": edges})
    return result


def run_unit(cfg: DynamicsConfig, p: Plan, ckpt: Checkpoint) -> dict[str, Any]:
    """Compute one checkpoint's unit (scores, then circuits) and write its done.json last."""
    import torch

    from memcirc.circuits import CIRCUIT_JSON, PRUNE_SCORES
    from memcirc.models import load
    from memcirc.scoring import score_windows
    from memcirc.sharding import run_chunked

    directory = unit_dir(cfg.stage_dir, ckpt.index)
    fingerprint = p.unit_fingerprints[ckpt.index]
    art.ensure_writable(directory)
    (directory / UNIT_DONE).unlink(missing_ok=True)   # a unit of another config is replaced, never mixed
    art.clean_stale_temp_files(directory)
    torch.manual_seed(cfg.seed)
    loaded = load(ckpt.spec(cfg))
    sig = signature(loaded.model.config, loaded.tokenizer)
    if (diff := _signature_difference(sig, p.final_signature)) is not None:
        raise InputError(f"checkpoint {ckpt.label!r} (index {ckpt.index}) loaded with {diff} unlike the final "
                         "checkpoint")
    pad = loaded.tokenizer.pad_token_id

    def work(batch: Sequence[Window]) -> list[dict[str, Any]]:
        rows = score_windows(loaded.model, batch, pad_id=pad, batch_size=cfg.batch_size, metrics=p.metrics)
        return [_unit_row(r, p.metrics) for r in rows]

    store = art.ChunkStore(directory / art.CHUNKS_DIR, fingerprint)
    data = run_chunked(p.windows, work, store, cfg.chunk_size, f"scoring {ckpt.label}")
    art.atomic_write_bytes(directory / art.SCORES_JSONL, data)
    names = [art.SCORES_JSONL]
    circuit = None
    if p.pairs is not None:
        assert p.pairs_sha is not None
        circuit = _unit_circuit(cfg, p.pairs, p.pairs_sha, loaded, directory)
        names += [PRUNE_SCORES, CIRCUIT_JSON]
    marker = {"fingerprint": fingerprint, "index": ckpt.index, "label": ckpt.label, "step": ckpt.step,
              "checkpoint": ckpt.as_dict(), "model": loaded.identity(), "signature": sig,
              "n_windows": len(p.windows), "outputs": {n: art.sha256_file(directory / n) for n in names}}
    if circuit is not None:
        marker["circuit"] = {k: circuit[k] for k in ("minimal_edges", "faithfulness_discovery",
                                                     "faithfulness_heldout", "metric_full", "metric_empty")}
    art.write_json(directory / UNIT_DONE, marker)
    art.remove_tree(directory / art.CHUNKS_DIR)
    exact = float(np.mean([json.loads(line)["exact"] for line in data.splitlines()]))
    log.info("checkpoint %d (%s, step %d) done: exact-match rate %.3f%s", ckpt.index, ckpt.label, ckpt.step,
             exact, "" if circuit is None else f"; circuit {circuit['minimal_edges']} of {circuit['edges_total']} "
             f"edges, faithfulness {_fmt(circuit['faithfulness_discovery'])} discovery / "
             f"{_fmt(circuit['faithfulness_heldout'])} held-out")
    return marker


# -- the aggregate ----------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _gap(full: float | None, empty: float | None) -> float | None:
    return None if full is None or empty is None else full - empty


def _ill_conditioned(gap: float | None, final_gap: float | None) -> bool | None:
    if gap is None:
        return None
    return bool(gap <= 0 or (final_gap is not None and abs(gap) < ILL_CONDITIONED * abs(final_gap)))


def _flat_scores(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return np.concatenate([tensors[k].reshape(-1).astype(np.float64) for k in sorted(tensors)])


def aggregate(cfg: DynamicsConfig, p: Plan, markers: Sequence[dict[str, Any]]) -> tuple[dict, list[dict], dict]:
    """(summary, onset rows, overlap) from finished units; reads only unit files."""
    from memcirc.circuits import CIRCUIT_JSON, PRUNE_SCORES

    steps = [c.step for c in p.checkpoints]
    ids = [w.id for w in p.windows]
    groups = [str(w.group if w.group is not None else "all") for w in p.windows]
    values: list[list[float]] = []
    extra: dict[str, list[list[Any]]] = {"tf_accuracy": [], "lcp": []}
    for ckpt in p.checkpoints:
        directory = unit_dir(cfg.stage_dir, ckpt.index)
        rows = list(art.read_jsonl(directory / art.SCORES_JSONL))
        if [r["id"] for r in rows] != ids:
            raise InputError(f"{directory}/{art.SCORES_JSONL} scores other windows than {cfg.upstream_dir}; "
                             "re-run the stage with --force")
        values.append([float(r[cfg.memorized_by]) for r in rows])
        for k in extra:
            extra[k].append([r[k] for r in rows])
    memorized = np.asarray(values) >= cfg.threshold
    onsets = memorization_onsets(steps, memorized)
    headline, detail = onsets_by_group(onsets, groups, p.group_order)
    onset_rows = [{"id": ids[w], "group": groups[w], "doc": p.windows[w].doc, "onset_step": o.onset_step,
                   "first_step": o.first_step, "forgotten": o.forgotten,
                   "memorized": memorized[:, w].tolist(), "tf_accuracy": [row[w] for row in extra["tf_accuracy"]],
                   "lcp": [row[w] for row in extra["lcp"]]} for w, o in enumerate(onsets)]

    circuits: list[dict[str, Any] | None] = []
    edge_sets: list[set[str] | None] = []
    score_vectors: list[np.ndarray | None] = []
    for ckpt in p.checkpoints:
        directory = unit_dir(cfg.stage_dir, ckpt.index)
        if p.pairs is None:
            circuits.append(None)
            edge_sets.append(None)
            score_vectors.append(None)
            continue
        c = art.read_json(directory / CIRCUIT_JSON)
        circuits.append(c)
        edge_sets.append({e["edge"] for e in c["circuit"]} if c["minimal_edges"] is not None else None)
        score_vectors.append(_flat_scores(directory / PRUNE_SCORES))
    jac = overlap_matrix(edge_sets, jaccard)
    wjac = overlap_matrix(score_vectors, weighted_jaccard)
    last = len(p.checkpoints) - 1
    final_c = circuits[-1]
    final_gap = _gap(final_c["metric_full"], final_c["metric_empty"]) if final_c else None
    final_held_gap = _gap(final_c["heldout_metric_full"], final_c["heldout_metric_empty"]) if final_c else None

    entries = []
    for i, ckpt in enumerate(p.checkpoints):
        in_group = {g: [w for w in range(len(ids)) if groups[w] == g] for g in p.group_order}
        entry: dict[str, Any] = {
            "index": ckpt.index, "label": ckpt.label, "step": ckpt.step, "model": ckpt.name_or_path,
            "revision": ckpt.revision,
            "memorization": {g: float(memorized[i, ws].mean()) for g, ws in in_group.items()},
            "memorized": int(memorized[i].sum()),
            "memorized_fraction": float(memorized[i].mean()),
        }
        c = circuits[i]
        if c is not None:
            gap = _gap(c["metric_full"], c["metric_empty"])
            held_gap = _gap(c["heldout_metric_full"], c["heldout_metric_empty"])
            entry.update({
                "circuit_edges": c["minimal_edges"], "edges_total": c["edges_total"],
                "edge_fraction": c["minimal_edges"] / c["edges_total"] if c["minimal_edges"] is not None else None,
                "faithfulness_discovery": c["faithfulness_discovery"],
                "faithfulness_heldout": c["faithfulness_heldout"],
                "metric_full": c["metric_full"], "metric_empty": c["metric_empty"],
                "heldout_metric_full": c["heldout_metric_full"], "heldout_metric_empty": c["heldout_metric_empty"],
                "ill_conditioned": _ill_conditioned(gap, final_gap),
                "heldout_ill_conditioned": _ill_conditioned(held_gap, final_held_gap),
                "monotone": c["monotone"],
                "jaccard_final": jac[i][last], "jaccard_previous": jac[i][i - 1] if i else None,
                "weighted_final": wjac[i][last], "weighted_previous": wjac[i][i - 1] if i else None,
                "notes": c["notes"]})
        entries.append(entry)
    summary = {
        "n_checkpoints": len(p.checkpoints), "n_windows": len(ids), "memorized_by": cfg.memorized_by,
        "threshold": cfg.threshold, "steps": steps, "circuits": p.pairs is not None,
        "onset_by_group": headline, "onset_detail_by_group": detail, "checkpoints": entries,
        "definitions": {"onset": ONSET_DEFINITION, "onset_by_group": GROUP_ONSET_DEFINITION,
                        "jaccard": JACCARD_DEFINITION, "weighted_jaccard": WEIGHTED_DEFINITION,
                        "ill_conditioned": ILL_DEFINITION}}
    if p.pairs is not None:
        summary["target"] = cfg.target
        summary["pairs"] = {"discovery": sum(x.split == "discovery" for x in p.pairs),
                            "heldout": sum(x.split == "heldout" for x in p.pairs), "sha256": p.pairs_sha}
    overlap = {"labels": [c.label for c in p.checkpoints], "steps": steps, "jaccard": jac, "weighted_jaccard": wjac,
               "definitions": {"jaccard": JACCARD_DEFINITION, "weighted_jaccard": WEIGHTED_DEFINITION}}
    return summary, onset_rows, overlap


# -- figures --------------------------------------------------------------------------------

def _step_axis(ax: Any, steps: Sequence[int]) -> None:
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("symlog", linthresh=max(1, min(positive)))
    ax.set_xlabel("training step")


def memorization_figure(summary: dict[str, Any], path: Path) -> None:
    from memcirc.plots import plt, save_figure

    steps = summary["steps"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in summary["onset_by_group"]:
        rates = [c["memorization"][g] for c in summary["checkpoints"]]
        onset = summary["onset_by_group"][g]
        ax.plot(steps, rates, marker="o", label=f"{g} (onset {onset if onset is not None else 'never'})")
    _step_axis(ax, steps)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"memorized fraction ({summary['memorized_by']} >= {summary['threshold']})")
    ax.set_title(f"memorization over training: {summary['n_windows']} windows, {len(steps)} checkpoints")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def circuit_figure(summary: dict[str, Any], path: Path) -> None:
    from memcirc.plots import plt, save_figure

    steps = summary["steps"]
    cps = summary["checkpoints"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    a.plot(steps, [x["circuit_edges"] if x["circuit_edges"] is not None else np.nan for x in cps], marker="o")
    a.set_ylabel("minimal circuit edges")
    a.set_title(f"minimal circuit (F >= {summary.get('target')}, discovery pairs)")
    for key, name in (("faithfulness_discovery", "discovery"), ("faithfulness_heldout", "held-out")):
        b.plot(steps, [x[key] if x[key] is not None else np.nan for x in cps], marker="o", label=name)
    lo, hi = FAITHFULNESS_YLIM
    ill = [(s, min(max(x[key], lo), hi)) for s, x in zip(steps, cps, strict=True)
           for key, flag in (("faithfulness_discovery", "ill_conditioned"),
                             ("faithfulness_heldout", "heldout_ill_conditioned")) if x[flag] and x[key] is not None]
    if ill:
        b.scatter(*zip(*ill, strict=True), s=160, facecolors="none", edgecolors="red",
                  label="ill-conditioned: M(full) - M(empty) ~ 0")
    for s, x in zip(steps, cps, strict=True):  # off-scale values (ill-conditioned ratios) are written out
        for key in ("faithfulness_discovery", "faithfulness_heldout"):
            f = x[key]
            if f is not None and not lo <= f <= hi:
                b.annotate(f"{f:.3g}", (s, min(max(f, lo), hi)), textcoords="offset points", xytext=(6, -10),
                           fontsize=7, color="red")
    b.set_ylim(lo, hi)
    b.axhline(summary.get("target") or 0, color="grey", lw=0.8, ls="--")
    b.set_ylabel("faithfulness of the minimal circuit")
    b.set_title(f"faithfulness (dashed: target; y clipped to {lo}..{hi})", fontsize=10)
    b.legend(fontsize=8, loc="lower right")
    for key, name in (("jaccard_final", "Jaccard vs final"), ("jaccard_previous", "Jaccard vs previous"),
                      ("weighted_final", "weighted vs final"), ("weighted_previous", "weighted vs previous")):
        c.plot(steps, [x[key] if x[key] is not None else np.nan for x in cps], marker="o", label=name)
    c.set_ylim(-0.03, 1.03)
    c.set_ylabel("edge overlap")
    c.set_title("circuit overlap")
    c.legend(fontsize=8)
    for ax in (a, b, c):
        _step_axis(ax, steps)
    save_figure(fig, path)


def overlap_figure(overlap: dict[str, Any], path: Path) -> None:
    from memcirc.plots import plt, save_figure

    labels = [str(s) for s in overlap["steps"]]
    n = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(9 + 0.8 * n, 3.5 + 0.4 * n), constrained_layout=True)
    for ax, key, title in ((axes[0], "jaccard", "Jaccard of circuit edges"),
                           (axes[1], "weighted_jaccard", "weighted Jaccard of |prune scores|")):
        m = np.array([[np.nan if v is None else v for v in row] for row in overlap[key]], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, rotation=90 if n > 8 else 0, fontsize=7 if n > 12 else 9)
        ax.set_yticks(range(n), labels, fontsize=7 if n > 12 else 9)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if not np.isnan(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if m[i, j] < 0.6 else "black")
        ax.set_xlabel("training step")
        ax.set_ylabel("training step")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def format_table(summary: dict[str, Any]) -> str:
    """Per checkpoint: memorized fraction of each group, circuit size, faithfulness, overlap with the final."""
    groups = list(summary["onset_by_group"])
    head = f"{'step':>8} " + " ".join(f"{g:>7}" for g in groups)
    if summary["circuits"]:
        head += f" {'edges':>6} {'F_disc':>7} {'F_held':>7} {'J_final':>7} {'Jw_final':>8}"
    lines = [head]
    for c in summary["checkpoints"]:
        line = f"{c['step']:>8} " + " ".join(f"{c['memorization'][g]:>7.3f}" for g in groups)
        if summary["circuits"]:
            flag = " (ill-conditioned)" if c["ill_conditioned"] else ""
            line += (f" {c['circuit_edges'] if c['circuit_edges'] is not None else '-':>6} "
                     f"{_fmt(c['faithfulness_discovery']):>7} {_fmt(c['faithfulness_heldout']):>7} "
                     f"{_fmt(c['jaccard_final']):>7} {_fmt(c['weighted_final']):>8}{flag}")
        lines.append(line)
    onset = ", ".join(f"{g}: {v if v is not None else 'never'}" for g, v in summary["onset_by_group"].items())
    lines.append(f"onset (median step, memorized for good): {onset}")
    return "\n".join(lines)


# -- the stage ------------------------------------------------------------------------------

def run(cfg: DynamicsConfig) -> dict[str, Any] | None:
    """training_dynamics: every unit not yet done, then the aggregate; or one unit (`checkpoint_index`,
    a SLURM array task; returns None); or only the aggregate (`merge`)."""
    checkpoints = resolve_checkpoints(cfg)
    index = None if cfg.merge else resolve_checkpoint_index(cfg.checkpoint_index, len(checkpoints))
    final = len(checkpoints) - 1
    check = [] if cfg.merge else [index] if index is not None else list(range(final))
    p = plan(cfg, checkpoints, check)
    stage = StageRun.for_config(cfg, p.inputs, units=p.unit_fingerprints,
                                    checkpoints=[c.as_dict() for c in checkpoints])
    if (done := stage.open(cfg.force)) is not None:
        print(format_table(done))
        return done if index is None else None
    status = [unit_status(unit_dir(cfg.stage_dir, c.index), fp) for c, fp in zip(checkpoints, p.unit_fingerprints,
                                                                                  strict=True)]
    if cfg.merge:
        missing = [i for i, s in enumerate(status) if s != "done"]
        if missing:
            raise InputError(f"checkpoint units {missing} of {len(checkpoints)} have not finished for this config "
                             f"(no matching {UNIT_DONE} in {cfg.stage_dir / UNITS_DIR}/<index>): run them "
                             "(--checkpoint-index i), then --merge")
    todo = [i for i, s in enumerate(status) if s != "done"] if index is None else [index]
    other = [i for i in todo if status[i] == "other"]
    if other and not cfg.force:
        raise InputError(f"checkpoint units {other} in {cfg.stage_dir / UNITS_DIR} hold results of another config "
                         "or input; pass --force to replace them, or choose another --output-dir")
    if index is not None:   # with --force the aggregate of another config goes: it is stale once a unit changes
        stage.start(cfg.force, task_dir=unit_dir(cfg.stage_dir, index))
        if status[index] == "done":
            log.info("checkpoint unit %d (%s) is complete for this config; nothing to do", index,
                     checkpoints[index].label)
        else:
            run_unit(cfg, p, checkpoints[index])
            log.info("checkpoint unit %d of %d done; run with --merge once all units are done", index,
                     len(checkpoints))
        return None
    stage.start(cfg.force)
    if len(todo) < len(checkpoints) and not cfg.merge:
        log.info("resuming: %d of %d checkpoint units already done", len(checkpoints) - len(todo), len(checkpoints))
    for i in progress(todo, "checkpoints", total=len(todo)):
        run_unit(cfg, p, checkpoints[i])
    markers = [art.read_json(unit_dir(cfg.stage_dir, c.index) / UNIT_DONE) for c in checkpoints]
    for c, m in zip(checkpoints, markers, strict=True):
        if (diff := _signature_difference(m["signature"], markers[-1]["signature"])) is not None:
            raise InputError(f"checkpoints {c.label!r} (index {c.index}) and {checkpoints[-1].label!r} (index "
                             f"{final}) differ in {diff}: all checkpoints must share one architecture and tokenizer")
    return _finish(cfg, p, stage, markers)


def _finish(cfg: DynamicsConfig, p: Plan, stage: StageRun, markers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary, onset_rows, overlap = aggregate(cfg, p, markers)
    d = cfg.stage_dir
    n = art.write_jsonl(d / ONSETS_JSONL, onset_rows)
    art.write_json(d / OVERLAP_JSON, overlap)
    art.write_json(d / art.SUMMARY_JSON, summary)
    memorization_figure(summary, d / MEMORIZATION_PNG)
    outputs: dict[str, int | None] = {ONSETS_JSONL: n, OVERLAP_JSON: None, art.SUMMARY_JSON: None,
                                      MEMORIZATION_PNG: None}
    if summary["circuits"]:
        circuit_figure(summary, d / CIRCUIT_PNG)
        overlap_figure(overlap, d / OVERLAP_PNG)
        outputs |= {CIRCUIT_PNG: None, OVERLAP_PNG: None}
    for c, m in zip(p.checkpoints, markers, strict=True):
        rel = unit_dir(Path(""), c.index)
        for name in [*m["outputs"], UNIT_DONE]:
            outputs[str(rel / name)] = len(p.windows) if name == art.SCORES_JSONL else None
    from memcirc.scoring import METRIC_DEFINITIONS

    stage.finish(outputs, model=markers[-1]["model"], seed=cfg.seed,
                 checkpoints=[{**c.as_dict(), "fingerprint": fp, "model": m["model"]}
                              for c, fp, m in zip(p.checkpoints, p.unit_fingerprints, markers, strict=True)],
                 signature=p.final_signature,
                 metric={"memorized_by": cfg.memorized_by, "threshold": cfg.threshold,
                         "definitions": {k: METRIC_DEFINITIONS[k] for k in p.metrics}, **summary["definitions"]})
    print(format_table(summary))
    return summary
