"""The training_dynamics stage: memorization and circuits across training checkpoints.

For each checkpoint of the sweep (`memcirc.dynamics.checkpoints`) the units
(`memcirc.dynamics.units`, one per checkpoint, each possibly one SLURM array task) re-score the
memorization stage's windows and, with the contrastive stage's pairs, find the checkpoint's circuit.
Once every unit is done (`--merge` does only this step) the stage merges them into `onsets.jsonl`
(per window: onset step, first step memorized, forgotten, memorized per checkpoint), `overlap.json`
(Jaccard and weighted Jaccard of every pair of checkpoints' circuits), `summary.json`
(`onset_by_group` and one entry per checkpoint), three figures (`memcirc.dynamics.figures`) and
`manifest.json` last.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from memcirc import artifacts as art
from memcirc.data import ScoredWindow, memorized, read_scores
from memcirc.dynamics.checkpoints import Checkpoint, CheckpointList, resolve_checkpoint_index, resolve_checkpoints
from memcirc.dynamics.figures import circuit_size_figure, memorization_figure, overlap_figure
from memcirc.dynamics.heads import (
    head_scores_possible,
    merge_heads,
    read_unit_heads,
    summary_entry,
    write_head_outputs,
)
from memcirc.dynamics.onsets import (
    GROUP_ONSET_DEFINITION,
    ILL_DEFINITION,
    JACCARD_DEFINITION,
    ONSET_DEFINITION,
    WEIGHTED_DEFINITION,
    ill_conditioned,
    jaccard,
    memorization_onsets,
    metric_gap,
    onsets_by_group,
    overlap_matrix,
    weighted_jaccard,
)
from memcirc.dynamics.units import (
    UNIT_DONE,
    UNITS_DIR,
    UnitSpec,
    check_same_architecture,
    check_upstream_model,
    checkpoint_signature,
    read_unit_circuit,
    run_unit,
    unit_dir,
    unit_fingerprint,
    unit_metrics,
    unit_status,
)
from memcirc.errors import InputError
from memcirc.logs import progress, show
from memcirc.manifest import StageRun, read_manifest, read_output
from memcirc.models.loading import load_config_and_tokenizer
from memcirc.models.preflight import check_model
from memcirc.option_groups import CircuitOptions, MemorizedRule
from memcirc.pairs import PAIRS_JSONL, Pair, pairs_input, read_pairs
from memcirc.plots import figure_source
from memcirc.scoring import METRIC_DEFINITIONS
from memcirc.stages.configs.training_dynamics import DynamicsConfig
from memcirc.tasks.source import generate_for

log = logging.getLogger(__name__)

ONSETS_JSONL = "onsets.jsonl"
OVERLAP_JSON = "overlap.json"
MEMORIZATION_PNG = "memorization_over_training.png"
CIRCUIT_PNG = "circuit_over_training.png"
OVERLAP_PNG = "overlap_heatmap.png"


# -- inputs ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything the units and the merge need, read and checked before anything is written."""

    checkpoints: list[Checkpoint]
    units: UnitSpec                 # what every unit shares
    group_order: list[str]
    inputs: list[dict[str, Any]]
    unit_fingerprints: list[str]


def make_plan(cfg: DynamicsConfig, checkpoints: list[Checkpoint], check: Sequence[int]) -> Plan:
    """Read and check the inputs. `check`: the checkpoints whose config and tokenizer are compared with
    the final checkpoint's (every one for a full run; the unit's own for an array task)."""
    base = cfg.model_spec()
    final_sig = _check_architectures(base, checkpoints, check)
    upstream = cfg.upstream_dir
    assert upstream is not None
    windows, manifest = _read_windows(upstream, cfg.limit, final_sig)
    inputs = [{"path": str(upstream), "run_id": manifest["run_id"]}]
    pairs, pairs_sha = None, None
    if cfg.circuits:
        pairs, pairs_sha, pairs_entry = _read_pairs(cfg, final_sig, checkpoints[-1].spec(base))
        inputs.append(pairs_entry)
    units = UnitSpec(model=base, windows=windows, windows_run_id=manifest["run_id"],
                     metrics=unit_metrics(cfg.memorized_by), final_signature=final_sig, seed=cfg.seed,
                     limit=cfg.limit, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                     circuit=cfg.options(CircuitOptions) if cfg.circuits else None, pairs=pairs, pairs_sha=pairs_sha,
                     heads=head_scores_possible(cfg.head_scores, checkpoints[-1].spec(base)),
                     prepend_bos=cfg.prepend_bos)
    return Plan(checkpoints, units, _group_order(upstream, windows), inputs,
                [unit_fingerprint(units, c) for c in checkpoints])


def _check_architectures(base: Any, checkpoints: list[Checkpoint], check: Sequence[int]) -> dict[str, Any]:
    """The final checkpoint's signature, after comparing the `check` checkpoints' with it (no weights read)."""
    final = checkpoints[-1]
    final_sig = checkpoint_signature(final.spec(base))
    todo = [c for c in checkpoints[:-1] if c.index in set(check)]
    sigs = [checkpoint_signature(c.spec(base)) for c in progress(todo, "checking checkpoints", total=len(todo))]
    check_same_architecture([*todo, final], [*sigs, final_sig])
    return final_sig


def _read_windows(upstream: Path, limit: int | None,
                  final_sig: dict[str, Any]) -> tuple[list[ScoredWindow], dict[str, Any]]:
    windows = read_scores(upstream, limit)
    if not windows:
        raise InputError(f"{upstream}/{art.SCORES_JSONL} holds no windows; re-run memorization_score")
    manifest = read_manifest(upstream, what="memorization")
    bad = [w.id for w in windows if w.tokens.min() < 0 or w.tokens.max() >= final_sig["d_vocab"]
           or len(w.tokens) > final_sig["n_ctx"]]
    if bad:
        raise InputError(f"window {bad[0]} of {upstream} does not fit the checkpoints (vocabulary "
                         f"{final_sig['d_vocab']}, context {final_sig['n_ctx']}): score windows of this model")
    check_upstream_model(manifest.get("model"), final_sig, "memorization windows")
    return windows, manifest


def _read_pairs(cfg: DynamicsConfig, final_sig: dict[str, Any],
                final_spec: Any) -> tuple[list[Pair], str, dict[str, Any]]:
    """(the contrastive stage's pairs, or --task's generated for the final checkpoint's tokenizer, their
    sha256, their entry in the manifest's inputs)."""
    if cfg.task:
        _, tokenizer = load_config_and_tokenizer(final_spec)
        generated = generate_for(cfg.task, tokenizer, cfg.task_pairs, cfg.seed, cfg.prepend_bos)
        return generated.pairs, generated.sha256, {"generated": generated.describe()}
    pairs_dir = Path(cfg.pairs_dir) if cfg.pairs_dir else cfg.stage_folder("contrastive_dataset")
    pairs_path, pairs_manifest, pairs_sha = pairs_input(pairs_dir)
    pairs = read_pairs(pairs_path, vocab_size=final_sig["d_vocab"], max_len=final_sig["n_ctx"])
    if not any(p.split == "discovery" for p in pairs):
        raise InputError(f"{pairs_path} has no discovery pairs; re-run contrastive_dataset with more data "
                         "(or pass --no-circuits)")
    check_upstream_model(pairs_manifest.get("model"), final_sig, "contrastive pairs")
    return pairs, pairs_sha, {"path": str(pairs_path), "run_id": pairs_manifest.get("run_id"), "sha256": pairs_sha}


def _group(window: ScoredWindow) -> str:
    return str(window.group if window.group is not None else "all")


def _group_order(upstream: Path, windows: Sequence[ScoredWindow]) -> list[str]:
    """The windows' groups in the memorization stage's summary order, then any it does not list."""
    seen = [_group(w) for w in windows]
    listed = list(art.read_json(read_output(upstream, art.SUMMARY_JSON, "memorization")).get("groups", {}))
    return [g for g in listed if g in set(seen)] + [g for g in dict.fromkeys(seen) if g not in listed]


def _checkpoint_list(cfg: DynamicsConfig) -> CheckpointList:
    """The config's fields of the sweep as a CheckpointList (what `StageConfig.options` does, for a plain
    frozen dataclass rather than an OptionGroup: the config has checked the values already)."""
    return CheckpointList(**{f.name: getattr(cfg, f.name) for f in fields(CheckpointList)})


# -- the stage ------------------------------------------------------------------------------

def run(cfg: DynamicsConfig) -> dict[str, Any] | None:
    """training_dynamics: every unit not yet done, then the merge; or only the merge (`merge`); or one unit.

    One unit (`checkpoint_index`, default: this SLURM array task's) is one task of a job array: it
    returns None, because the stage's summary exists only once a `--merge` job has merged all units.
    Otherwise it returns the summary.
    """
    checkpoints = resolve_checkpoints(_checkpoint_list(cfg))
    if cfg.circuits and not cfg.merge:   # circuits need TransformerLens: config.json alone tells
        check_model(checkpoints[-1].spec(cfg.model_spec()), needs_tl=True, what="training_dynamics")
    index = None if cfg.merge else resolve_checkpoint_index(cfg.checkpoint_index, len(checkpoints))
    check = [] if cfg.merge else [index] if index is not None else list(range(len(checkpoints) - 1))
    plan = make_plan(cfg, checkpoints, check)
    stage = StageRun.for_config(cfg, plan.inputs, units=plan.unit_fingerprints,
                                checkpoints=[c.as_dict() for c in checkpoints])
    if (done := stage.open(cfg.force)) is not None:
        show(format_table(done))
        return done if index is None else None
    todo = _units_to_run(cfg, plan, index)
    if index is not None:   # with --force the merge of another config goes: it is stale once a unit changes
        stage.start(cfg.force, task_dir=unit_dir(cfg.stage_dir, index))
        if todo:
            _run_unit(cfg, plan, checkpoints[index])
            log.info("checkpoint unit %d of %d done; run with --merge once all units are done", index,
                     len(checkpoints))
        else:
            log.info("checkpoint unit %d (%s) is complete for this config; nothing to do", index,
                     checkpoints[index].label)
        stage.release()   # the unit is complete: its folder is free for the merge
        return None
    stage.start(cfg.force)
    if len(todo) < len(checkpoints) and not cfg.merge:
        log.info("resuming: %d of %d checkpoint units already done", len(checkpoints) - len(todo), len(checkpoints))
    for i in progress(todo, "checkpoints", total=len(todo)):
        _run_unit(cfg, plan, checkpoints[i])
    markers = [art.read_json(unit_dir(cfg.stage_dir, c.index) / UNIT_DONE) for c in checkpoints]
    check_same_architecture(checkpoints, [m["signature"] for m in markers])
    summary = _write_outputs(cfg, plan, stage, markers)
    show(format_table(summary))
    return summary


def _units_to_run(cfg: DynamicsConfig, plan: Plan, index: int | None) -> list[int]:
    """The unit indices this job computes: the unfinished ones (only `index` for an array task).

    Raises:
        InputError: a merge with unfinished units; a unit holding another config's results (without --force).
    """
    status = [unit_status(unit_dir(cfg.stage_dir, c.index), fp)
              for c, fp in zip(plan.checkpoints, plan.unit_fingerprints, strict=True)]
    unfinished = [i for i, s in enumerate(status) if s != "done"]
    if cfg.merge and unfinished:
        raise InputError(f"checkpoint units {unfinished} of {len(status)} have not finished for this config "
                         f"(no matching {UNIT_DONE} in {cfg.stage_dir / UNITS_DIR}/<index>): run them "
                         "(--checkpoint-index i), then --merge")
    todo = unfinished if index is None else [i for i in (index,) if status[i] != "done"]
    other = [i for i in todo if status[i] == "other"]
    if other and not cfg.force:
        raise InputError(f"checkpoint units {other} in {cfg.stage_dir / UNITS_DIR} hold results of another config "
                         "or input; pass --force to replace them, or choose another --output-dir")
    return todo


def _run_unit(cfg: DynamicsConfig, plan: Plan, ckpt: Checkpoint) -> None:
    run_unit(plan.units, ckpt, unit_dir(cfg.stage_dir, ckpt.index), plan.unit_fingerprints[ckpt.index])


def _write_outputs(cfg: DynamicsConfig, plan: Plan, stage: StageRun,
                   markers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the finished units into the stage's files, manifest.json last; returns the summary."""
    summary, onset_rows, overlap, heads = merge_units(cfg, plan)
    d = cfg.stage_dir
    n = art.write_jsonl(d / ONSETS_JSONL, onset_rows)
    art.write_json(d / OVERLAP_JSON, overlap)
    art.write_json(d / art.SUMMARY_JSON, summary)
    source = figure_source(cfg.model, cfg.output_dir, cfg.revision)
    memorization_figure(summary, d / MEMORIZATION_PNG, source=source)
    outputs: dict[str, int | None] = {ONSETS_JSONL: n, OVERLAP_JSON: None, art.SUMMARY_JSON: None,
                                      MEMORIZATION_PNG: None}
    if summary["circuits"]:
        circuit_size_figure(summary, d / CIRCUIT_PNG, source=source)
        overlap_figure(overlap, d / OVERLAP_PNG, source=source)
        outputs |= {CIRCUIT_PNG: None, OVERLAP_PNG: None}
    if heads is not None:
        outputs |= write_head_outputs(d, heads, summary, cfg.task, source)
    if cfg.task:
        art.atomic_write_bytes(d / PAIRS_JSONL, art.jsonl_bytes(p.to_row() for p in plan.units.pairs or []))
        outputs[PAIRS_JSONL] = len(plan.units.pairs or [])
    for c, m in zip(plan.checkpoints, markers, strict=True):
        rel = unit_dir(Path(""), c.index)
        for name in [*m["outputs"], UNIT_DONE]:
            outputs[str(rel / name)] = len(plan.units.windows) if name == art.SCORES_JSONL else None
    stage.finish(outputs, model=markers[-1]["model"], seed=cfg.seed,
                 checkpoints=[{**c.as_dict(), "fingerprint": fp, "model": m["model"]}
                              for c, fp, m in zip(plan.checkpoints, plan.unit_fingerprints, markers, strict=True)],
                 signature=plan.units.final_signature,
                 metric={"memorized_by": cfg.memorized_by, "threshold": cfg.threshold,
                         "definitions": {k: METRIC_DEFINITIONS[k] for k in plan.units.metrics},
                         **summary["definitions"]})
    return summary


# -- merging the units ----------------------------------------------------------------------

def merge_units(cfg: DynamicsConfig, plan: Plan
                ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """(summary, onset rows, overlap, heads or None) from the finished units; reads only unit files."""
    steps = [c.step for c in plan.checkpoints]
    windows = plan.units.windows
    rescored = [_rescored(cfg, plan, c) for c in plan.checkpoints]
    rule = cfg.options(MemorizedRule)
    mem = np.asarray([memorized(ws, rule, str(unit_dir(cfg.stage_dir, c.index) / art.SCORES_JSONL))
                      for c, ws in zip(plan.checkpoints, rescored, strict=True)])
    onsets = memorization_onsets(steps, mem)
    groups = [_group(w) for w in windows]
    headline, detail = onsets_by_group(onsets, groups, plan.group_order)
    onset_rows = [{"id": w.id, "group": groups[i], "doc": w.doc, "onset_step": o.onset_step,
                   "first_step": o.first_step, "forgotten": o.forgotten, "memorized": mem[:, i].tolist(),
                   "tf_accuracy": [ws[i].row["tf_accuracy"] for ws in rescored],
                   "lcp": [ws[i].row["lcp"] for ws in rescored]} for i, (w, o) in enumerate(zip(windows, onsets,
                                                                                                  strict=True))]
    circuits, edge_sets, score_vectors = _unit_circuits(cfg, plan)
    jac = overlap_matrix(edge_sets, jaccard)
    wjac = overlap_matrix(score_vectors, weighted_jaccard)
    in_group = {g: [i for i in range(len(windows)) if groups[i] == g] for g in plan.group_order}
    heads = None
    if plan.units.heads:
        heads = merge_heads(steps, read_unit_heads(cfg.stage_dir, [c.index for c in plan.checkpoints]),
                            edge_sets if plan.units.circuit is not None else None)
    entries = []
    for i, ckpt in enumerate(plan.checkpoints):
        entry: dict[str, Any] = {
            "index": ckpt.index, "label": ckpt.label, "step": ckpt.step, "model": ckpt.name_or_path,
            "revision": ckpt.revision,
            "memorization": {g: float(mem[i, ws].mean()) for g, ws in in_group.items()},
            "memorized": int(mem[i].sum()),
            "memorized_fraction": float(mem[i].mean()),
        }
        if circuits[i] is not None:
            entry.update(_circuit_entry(circuits[i], circuits[-1], i, jac, wjac))
        if heads is not None:
            entry["heads"] = summary_entry(heads["checkpoints"][i])
        entries.append(entry)
    summary = _summary(cfg, plan, steps, headline, detail, entries)
    if heads is not None:
        summary["heads"] = {k: heads[k] for k in ("induction_head", "previous_token_head")}
    overlap = {"labels": [c.label for c in plan.checkpoints], "steps": steps, "jaccard": jac,
               "weighted_jaccard": wjac,
               "definitions": {"jaccard": JACCARD_DEFINITION, "weighted_jaccard": WEIGHTED_DEFINITION}}
    return summary, onset_rows, overlap, heads


def _rescored(cfg: DynamicsConfig, plan: Plan, ckpt: Checkpoint) -> list[ScoredWindow]:
    """The upstream windows with the scores this checkpoint's unit gave them."""
    path = unit_dir(cfg.stage_dir, ckpt.index) / art.SCORES_JSONL
    rows = list(art.read_jsonl(path))
    if [r["id"] for r in rows] != [w.id for w in plan.units.windows]:
        raise InputError(f"{path} scores other windows than {cfg.upstream_dir}; re-run the stage with --force")
    return [replace(w, row=r) for w, r in zip(plan.units.windows, rows, strict=True)]


def _unit_circuits(cfg: DynamicsConfig, plan: Plan) -> tuple[list[Any], list[Any], list[Any]]:
    """Per checkpoint: circuit.json, its edge set and its prune scores (all None without circuits)."""
    if plan.units.circuit is None:
        none = [None] * len(plan.checkpoints)
        return none, none, none
    found = [read_unit_circuit(unit_dir(cfg.stage_dir, c.index)) for c in plan.checkpoints]
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]


def _circuit_entry(c: dict[str, Any], final: dict[str, Any], i: int, jac: list[list[float | None]],
                   wjac: list[list[float | None]]) -> dict[str, Any]:
    """A checkpoint's circuit in the summary: size, faithfulness, conditioning, overlap with the final and previous."""
    gap = metric_gap(c["metric_full"], c["metric_empty"])
    held_gap = metric_gap(c["heldout_metric_full"], c["heldout_metric_empty"])
    final_gap = metric_gap(final["metric_full"], final["metric_empty"])
    final_held_gap = metric_gap(final["heldout_metric_full"], final["heldout_metric_empty"])
    last = len(jac) - 1
    return {
        "circuit_edges": c["minimal_edges"], "edges_total": c["edges_total"],
        "edge_fraction": c["minimal_edges"] / c["edges_total"] if c["minimal_edges"] is not None else None,
        "faithfulness_discovery": c["faithfulness_discovery"],
        "faithfulness_heldout": c["faithfulness_heldout"],
        "metric_full": c["metric_full"], "metric_empty": c["metric_empty"],
        "accuracy": c.get("accuracy"), "heldout_accuracy": c.get("heldout_accuracy"),
        "heldout_metric_full": c["heldout_metric_full"], "heldout_metric_empty": c["heldout_metric_empty"],
        "ill_conditioned": ill_conditioned(gap, final_gap),
        "heldout_ill_conditioned": ill_conditioned(held_gap, final_held_gap),
        "monotone": c["monotone"],
        "jaccard_final": jac[i][last], "jaccard_previous": jac[i][i - 1] if i else None,
        "weighted_final": wjac[i][last], "weighted_previous": wjac[i][i - 1] if i else None,
        "notes": c["notes"]}


def _summary(cfg: DynamicsConfig, plan: Plan, steps: list[int], headline: dict[str, Any], detail: dict[str, Any],
             entries: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n_checkpoints": len(plan.checkpoints), "n_windows": len(plan.units.windows),
        "memorized_by": cfg.memorized_by, "threshold": cfg.threshold, "steps": steps,
        "circuits": plan.units.circuit is not None, "task": cfg.task, "onset_by_group": headline,
        "onset_detail_by_group": detail,
        "checkpoints": entries,
        "definitions": {"onset": ONSET_DEFINITION, "onset_by_group": GROUP_ONSET_DEFINITION,
                        "jaccard": JACCARD_DEFINITION, "weighted_jaccard": WEIGHTED_DEFINITION,
                        "ill_conditioned": ILL_DEFINITION}}
    if plan.units.circuit is not None:
        pairs = plan.units.pairs or []
        summary["target"] = plan.units.circuit.target
        summary["pairs"] = {"discovery": sum(x.split == "discovery" for x in pairs),
                            "heldout": sum(x.split == "heldout" for x in pairs), "sha256": plan.units.pairs_sha}
    return summary


# -- the text table and the run report -----------------------------------------------------

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
            line += (f" {_or_dash(c['circuit_edges'], 'd'):>6} "
                     f"{_or_dash(c['faithfulness_discovery'], '.3f'):>7} "
                     f"{_or_dash(c['faithfulness_heldout'], '.3f'):>7} "
                     f"{_or_dash(c['jaccard_final'], '.3f'):>7} {_or_dash(c['weighted_final'], '.3f'):>8}{flag}")
        lines.append(line)
    onset = ", ".join(f"{g}: {v if v is not None else 'never'}" for g, v in summary["onset_by_group"].items())
    lines.append(f"onset (median step, memorized for good): {onset}")
    return "\n".join(lines)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's lines in the run report: onsets, and the circuit at each checkpoint."""
    onset = ", ".join(f"{g}: {v if v is not None else 'never'}" for g, v in summary["onset_by_group"].items())
    task = f", task {summary['task']}" if summary.get("task") else ""
    lines = [f"training dynamics ({summary['n_checkpoints']} checkpoints{task}): memorization onset (median step) "
             f"{onset}"]
    if summary["circuits"]:
        per = ", ".join(f"{c['step']}: {_or_dash(c['circuit_edges'], 'd')}/{_or_dash(c['faithfulness_heldout'])}"
                        f"/{_or_dash(c['jaccard_final'])}{'*' if c['ill_conditioned'] else ''}"
                        for c in summary["checkpoints"])
        lines.append(f"circuit over training, per checkpoint step: edges in the minimal circuit / held-out "
                     f"faithfulness / Jaccard overlap with the final circuit (* ill-conditioned: faithfulness is "
                     f"noise there) {per}")
    if summary.get("heads"):
        per = ", ".join(f"{c['step']}: {h['induction_head_score']:.2f}/{h['repeated_loss']['gain']:.2f}"
                        for c in summary["checkpoints"] for h in [c["heads"]])
        lines.append(f"induction head {summary['heads']['induction_head']} over training, per checkpoint step: its "
                     f"induction score / loss saved on repeated tokens (nats) {per}")
    return "\n".join(lines)


def _or_dash(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def array_tasks(cfg: DynamicsConfig) -> int:
    """SLURM array size (memcirc.slurm.plan): one task per checkpoint of the sweep (nothing is loaded)."""
    return len(resolve_checkpoints(_checkpoint_list(cfg)))


def needs_transformer_lens(cfg: DynamicsConfig) -> bool:
    """This stage needs TransformerLens when it finds circuits (head scores are skipped without it)."""
    return bool(cfg.circuits)
