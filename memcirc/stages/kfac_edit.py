"""The kfac_edit stage: K-FAC factors, an eigenbasis edit keeping a fraction rho of the importance,
memorization and perplexity before and after.

Reads the memorized windows of memorization/ and writes kfac/: factors.safetensors (the factor
sums, reusable with --factors-file), summary.json (the formula x rho sweep), rho_curve.png,
deltas.safetensors and edited_model/ (the saved setting), manifest.json last. With N shards (a
SLURM job array) each job collects the factor sums of its slice of the factor batches into
shards/<i>/ and `--merge` adds them up and runs the edit: the outputs equal a one-job run's.
The method and its choices: memcirc/kfac/__init__.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.config import HeldoutEval, MemorizedRule, Sharding, StageConfig, option
from memcirc.data import ScoredWindow
from memcirc.errors import InputError
from memcirc.evaluation import heldout_blocks, memorization, memorized_windows, perplexity
from memcirc.kfac.edit import FORMULAS, ModelEdit
from memcirc.kfac.factors import (
    LABELS,
    MAX_FACTOR_BLOCK,
    FactorOptions,
    Factors,
    load_factors,
    read_factor_tokens,
    token_blocks,
)
from memcirc.kfac.resume import FactorCollection
from memcirc.kfac.targets import Target, resolve_targets
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, load
from memcirc.models.arch import dims
from memcirc.models.identity import check_same_model, results_key
from memcirc.plots import save_figure, subplots
from memcirc.sharding import resolve_shards, shard_bounds
from memcirc.stages.registry import DONE_MARKER

log = logging.getLogger(__name__)


@dataclass
class KfacConfig(HeldoutEval, Sharding, StageConfig):
    """kfac_edit: K-FAC factors, eigenbasis edit keeping a fraction rho of importance, before/after."""

    stage: ClassVar[str] = "kfac_edit"

    layers: list[int] = option([], "blocks to edit (default: the second half of the model)")
    projections: list[str] = option([], "arch roles of the linear modules to edit (mlp_in, mlp_out, "
                                    "mlp_gate for gated MLPs; default: the MLP input projections, "
                                    "gate and up where gated, as the paper)")
    labels: str = option("sampled", "gradient labels: sampled from the model (true Fisher) or the data",
                         choices=LABELS)
    factor_tokens: int = option(200_000, "token budget for collecting the factors", minimum=1)
    factor_data: str = option("testbed", "text the factors are collected on ('testbed': the training "
                              "corpus slice)")
    rhos: list[float] = option([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "fractions of importance to keep")
    formulas: list[str] = option(["original", "modified"], "importance: original = lambda*mu, "
                                 "modified = lambda*mu*|C|^2", choices=FORMULAS)
    damping: float = option(0.0, "added to both factors' eigenvalues")
    save_rho: float | None = option(None, "save the edited model folder at this rho (default: the "
                                    "smallest rho whose perplexity rise is <= 20%)")
    save_formula: str = option("original", "formula of the saved edited model", choices=FORMULAS)
    factors_file: str | None = option(None, "reuse factors.safetensors of a previous kfac run (same model "
                                      "and modules) instead of collecting them")
    batch_size: int = option(32, "sequences per forward/backward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    chunk_size: int = option(16, "factor batches between resumable saves of the running sums", minimum=1,
                             hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [r for r in self.rhos if not 0.0 < r <= 1.0]
        if bad or (self.save_rho is not None and not 0.0 < self.save_rho <= 1.0):
            raise InputError(f"config key 'rhos' must lie in (0, 1], got {bad or [self.save_rho]}")


Config = KfacConfig

MEMORIZED = MemorizedRule()          # the windows kfac_edit edits out: exact == 1 (the default rule)
FACTORS = "factors.safetensors"
DELTAS = "deltas.safetensors"
EDITED_MODEL = "edited_model"
RHO_CURVE = "rho_curve.png"
PPL_LIMIT = 0.20                     # the default saved setting: ppl rise <= 20 %
FACTOR_SAMPLING = "per-block seeds, float64 sums"  # changes the fingerprint when the collection changes


def run(cfg: KfacConfig) -> dict[str, Any] | None:
    """Collect (or reuse) the K-FAC factors, sweep formula x rho, save the edited model of one setting.

    Returns the summary; None for a factor shard job (its sums wait for `--merge`).
    """
    torch.manual_seed(cfg.seed)
    num_shards, shard_index = _shard_job(cfg)
    upstream, windows = _memorized_windows(cfg)
    reused = load_factors(Path(cfg.factors_file)) if cfg.factors_file else None   # before the model load
    loaded = load(cfg.model_spec())
    warnings = [check_same_model(upstream.get("model", {}), loaded, "memorization scores")]
    layers, roles, targets = _targets(cfg, loaded)
    if reused is not None:
        assert cfg.factors_file is not None   # reused is read from it
        warnings.append(_check_reused(cfg.factors_file, reused, loaded, targets))
    n_ctx = dims(loaded.model).n_ctx
    blocks = heldout_blocks(cfg.data_path("heldout"), loaded.tokenizer, n_ctx, cfg.ppl_blocks)
    block_len = min(n_ctx, MAX_FACTOR_BLOCK)
    factor_ids = (None if reused else
                  read_factor_tokens(cfg.data_path("factor_data"), loaded.tokenizer, cfg.factor_tokens))
    batches = [] if factor_ids is None else token_blocks(factor_ids, block_len, cfg.factor_tokens, cfg.batch_size)
    stage = StageRun.for_config(cfg, _inputs(cfg, upstream), model=results_key(loaded),
                                factor_sampling=FACTOR_SAMPLING)
    if (done := stage.open(cfg.force)) is not None:
        print(format_table(done))
        return done
    shard_sums, n_merged = _merge_shards(cfg, stage.fingerprint) if cfg.merge else (None, 1)
    shard_dir = cfg.stage_dir / art.SHARDS_DIR / f"{shard_index:05d}"
    # the other factor shards write next to this one at the same time
    stage.start(cfg.force, task_dir=shard_dir if num_shards > 1 else None)
    for warning in filter(None, warnings):
        log.warning(warning)

    identity = loaded.identity()
    collection = FactorCollection(loaded.model, targets, batches, FactorOptions(labels=cfg.labels, seed=cfg.seed),
                                  stage.fingerprint, identity, cfg.chunk_size)
    meta = {"factor_data": cfg.factor_data, "seed": cfg.seed, "block_len": block_len}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if num_shards > 1:
        _collect_shard(cfg, collection, (num_shards, shard_index), shard_dir, meta)
        return None
    factors = _factors(cfg, collection, reused, shard_sums, meta)
    factors.save(cfg.stage_dir / FACTORS, identity, targets)
    timings["factors_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    edit = ModelEdit(loaded.model, targets, factors, cfg.damping)
    timings["eigh_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate = partial(_evaluate, cfg, loaded, windows, blocks)
    sweep = _sweep(cfg, edit, evaluate)
    timings["sweep_s"] = time.perf_counter() - t0
    saved = _save_edited_model(cfg, loaded, edit, sweep, evaluate)

    summary = {
        "model": identity["name_or_path"], "n_memorized": len(windows), "layers": layers,
        "projections": roles, "modules": [t.name for t in targets],
        "labels": factors.labels, "factor_tokens": factors.n_tokens, "damping": cfg.damping,
        **sweep, "saved": saved, "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    rho_curve(summary, cfg.stage_dir / RHO_CURVE)
    outputs: dict[str, int | None] = {FACTORS: None, DELTAS: None, art.SUMMARY_JSON: None, RHO_CURVE: None}
    for f in sorted((cfg.stage_dir / EDITED_MODEL).iterdir()):
        outputs[f"{EDITED_MODEL}/{f.name}"] = None
    stage.finish(outputs, model=identity, seed=cfg.seed, factor_shards=n_merged)
    art.remove_tree(cfg.stage_dir / art.CHUNKS_DIR)
    art.remove_tree(cfg.stage_dir / art.SHARDS_DIR)
    print(format_table(summary))
    return summary


# -- inputs ----------------------------------------------------------------------------------

def _shard_job(cfg: KfacConfig) -> tuple[int, int]:
    """(num_shards, shard_index) of this job (a --merge job is one job)."""
    num_shards, shard_index = (1, 0) if cfg.merge else resolve_shards(cfg.num_shards, cfg.shard_index)
    if cfg.factors_file and (num_shards > 1 or cfg.merge):
        raise InputError("--num-shards/--merge split the factor collection, and with --factors-file there is "
                         "none: run kfac_edit as one job")
    return num_shards, shard_index


def _memorized_windows(cfg: KfacConfig) -> tuple[dict[str, Any], list[ScoredWindow]]:
    """The upstream manifest and its memorized windows (the first --limit of them); none is an InputError."""
    upstream_dir = cfg.upstream_dir
    assert upstream_dir is not None   # kfac_edit needs memorization_score: there is always an upstream folder
    upstream = read_manifest(upstream_dir, what="memorization")
    windows = memorized_windows(upstream_dir, MEMORIZED)
    return upstream, windows[:cfg.limit] if cfg.limit else windows


def _targets(cfg: KfacConfig, loaded: LoadedModel) -> tuple[list[int], list[str], list[Target]]:
    """The layers and projections to edit (defaults: the second half, the MLP input projections)."""
    n_layers = dims(loaded.model).n_layers
    layers = list(cfg.layers) or list(range(n_layers // 2, n_layers))
    roles = list(cfg.projections) or list(loaded.arch.mlp_in_roles)
    return layers, roles, resolve_targets(loaded.model, loaded.arch, layers, roles)


def _check_reused(path: str, reused: tuple[Factors, dict[str, Any], list[dict[str, Any]]], loaded: LoadedModel,
                  targets: list[Target]) -> str | None:
    """A --factors-file must come from this model and hold every target (returns a dtype warning)."""
    factors, recorded, modules = reused
    warning = check_same_model(recorded, loaded, f"factors in {path}")
    missing = [t.name for t in targets if t.name not in factors.A]
    if missing:
        raise InputError(f"{path} has no factors for {missing}; it holds {', '.join(m['name'] for m in modules)}")
    return warning


def _inputs(cfg: KfacConfig, upstream: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = [{"path": str(cfg.upstream_dir), "run_id": upstream["run_id"]}]
    if cfg.factors_file:
        inputs.append({"path": str(cfg.factors_file), "sha256": art.sha256_file(Path(cfg.factors_file))})
    return inputs


# -- the factors ----------------------------------------------------------------------------

def _factors(cfg: KfacConfig, collection: FactorCollection, reused: tuple[Factors, Any, Any] | None,
             shard_sums: Factors | None, meta: dict[str, Any]) -> Factors:
    """The targets' float32 factor sums: of a --factors-file, of the merged shards, or collected here."""
    if reused is not None:
        return reused[0].only(collection.targets)
    if shard_sums is None:
        log.info("collecting K-FAC factors (%s labels) for %d modules on up to %d tokens", cfg.labels,
                 len(collection.targets), cfg.factor_tokens)
        shard_sums = collection.resumable(0, len(collection.batches), cfg.stage_dir / art.CHUNKS_DIR, "factors")
    factors = shard_sums.to(torch.float32)
    factors.meta = meta
    return factors


# -- factor shards (a SLURM job array) -------------------------------------------------------

def _collect_shard(cfg: KfacConfig, collection: FactorCollection, shard: tuple[int, int], shard_dir: Path,
                   meta: dict[str, Any]) -> None:
    """One array task: the float64 factor sums of its slice of the batches, then its done marker."""
    num_shards, shard_index = shard
    marker = shard_dir / DONE_MARKER
    if marker.is_file() and not cfg.force:
        done = json.loads(marker.read_text())
        if (done.get("fingerprint") == collection.fingerprint and done.get("num_shards") == num_shards
                and (done.get("n_tokens") == 0 or (shard_dir / FACTORS).is_file())):
            log.info("factor shard %d/%d is done for this config (%s); nothing to do", shard_index, num_shards,
                     shard_dir)
            return
    marker.unlink(missing_ok=True)
    first, last = shard_bounds(len(collection.batches), num_shards, shard_index)
    entry = {"fingerprint": collection.fingerprint, "num_shards": num_shards, "shard_index": shard_index,
             "batches": [first, last]}
    if last <= first:   # more shards than factor batches: this one has nothing to add
        art.write_json(marker, {**entry, "n_tokens": 0})
        log.info("factor shard %d/%d: no batches (the factor data holds %d); nothing to collect", shard_index,
                 num_shards, len(collection.batches))
        return
    log.info("collecting K-FAC factors (%s labels), shard %d/%d: batches %d..%d of %d", cfg.labels, shard_index,
             num_shards, first, last - 1, len(collection.batches))
    sums = collection.resumable(first, last, shard_dir / art.CHUNKS_DIR, f"factors shard {shard_index}")
    sums.meta = meta
    sums.save(shard_dir / FACTORS, collection.identity, collection.targets)
    art.write_json(marker, {**entry, "n_tokens": sums.n_tokens})
    art.remove_tree(shard_dir / art.CHUNKS_DIR)
    log.info("factor shard %d/%d done (%d tokens); run with --merge once all shards are done", shard_index,
             num_shards, sums.n_tokens)


def _merge_shards(cfg: KfacConfig, fingerprint: str) -> tuple[Factors | None, int]:
    """The float64 sum of every factor shard, in shard order (None when no shard holds tokens); InputError
    unless all are there for this config."""
    shards_dir = cfg.stage_dir / art.SHARDS_DIR
    done = [art.read_json(p) for p in sorted(shards_dir.glob(f"*/{DONE_MARKER}"))]
    if not done:
        raise InputError(f"no finished factor shards in {shards_dir}: run the shard jobs first, then --merge")
    num_shards = cfg.num_shards or done[0]["num_shards"]
    done = [d for d in done if d["num_shards"] == num_shards]
    stale = sorted(d["shard_index"] for d in done if d["fingerprint"] != fingerprint)
    if stale:
        raise InputError(f"factor shards {stale} in {shards_dir} come from another config; re-run the shard "
                         "jobs with this config, then --merge")
    missing = sorted(set(range(num_shards)) - {d["shard_index"] for d in done})
    if missing:
        raise InputError(f"factor shards {missing} of {num_shards} have not finished; re-run them, then --merge")
    total: Factors | None = None
    for d in sorted(done, key=lambda d: d["shard_index"]):
        if d["n_tokens"]:
            sums, _, _ = load_factors(shards_dir / f"{d['shard_index']:05d}" / FACTORS)
            total = sums if total is None else total + sums
    return total, num_shards


# -- the sweep and the saved edit ------------------------------------------------------------

def _evaluate(cfg: KfacConfig, loaded: LoadedModel, windows: list[ScoredWindow],
              blocks: list[np.ndarray]) -> dict[str, Any]:
    """Memorization of the windows and held-out perplexity of the model as it is now."""
    # transformers' tokenizer __getattr__ types special-token ids as str | list[str]
    pad = cast("int | None", loaded.tokenizer.pad_token_id)
    if pad is None:
        raise InputError(f"the tokenizer of {loaded.spec.name_or_path} has no pad token (nor an EOS token to pad "
                         "with): cannot batch the evaluation windows")
    mem = memorization(loaded.model, windows, pad_id=pad, batch_size=cfg.batch_size,
                       levenshtein_threshold=cfg.levenshtein_threshold)
    return {**mem, "ppl": perplexity(loaded.model, blocks, pad_id=pad, batch_size=cfg.batch_size)}


def _sweep(cfg: KfacConfig, edit: ModelEdit, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """before, one result per (formula, rho), and the edited weights zeroed (the rho -> 0 limit)."""
    before = evaluate()
    results = []
    for formula in cfg.formulas:
        for rho in cfg.rhos:
            kept = edit.apply(formula, rho)
            after = evaluate()
            edit.restore()
            results.append(_result(formula, rho, before, after, kept))
            log.info("%s rho=%.3f: exact %.3f -> %.3f, ppl %.2f -> %.2f", formula, rho, before["exact"],
                     after["exact"], before["ppl"], after["ppl"])
    edit.zero()
    ablated = evaluate()
    edit.restore()
    return {"before": before, "results": results, "ablated": ablated}


def _saved_setting(cfg: KfacConfig, results: list[dict[str, Any]]) -> float:
    """--save-rho, else the smallest rho of the save formula whose perplexity rose <= 20 %."""
    if cfg.save_rho is not None:
        return cfg.save_rho
    ok = [r["rho"] for r in results if r["formula"] == cfg.save_formula
          and r["ppl_after"] <= (1 + PPL_LIMIT) * r["ppl_before"]]
    return min(ok) if ok else max(cfg.rhos)


def _save_edited_model(cfg: KfacConfig, loaded: LoadedModel, edit: ModelEdit, sweep: dict[str, Any],
                       evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Write the deltas and the edited model folder of the saved setting; its result for the summary."""
    rho = _saved_setting(cfg, sweep["results"])
    kept = edit.apply(cfg.save_formula, rho)
    after = evaluate()
    art.save_tensors(cfg.stage_dir / DELTAS, edit.deltas(), metadata={"formula": cfg.save_formula, "rho": str(rho)})
    edited_dir = cfg.stage_dir / EDITED_MODEL
    art.remove_tree(edited_dir)
    loaded.model.save_pretrained(edited_dir)
    loaded.tokenizer.save_pretrained(edited_dir)
    edit.restore()
    return {"formula": cfg.save_formula, "rho": rho, **_result(cfg.save_formula, rho, sweep["before"], after, kept)}


def _result(formula: str, rho: float, before: dict[str, Any], after: dict[str, Any],
            kept: dict[str, float]) -> dict[str, Any]:
    return {"formula": formula, "rho": rho,
            "exact_before": before["exact"], "exact_after": after["exact"],
            "loose_before": before["loose_match"], "loose_after": after["loose_match"],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "ppl_ratio": after["ppl"] / before["ppl"],
            "after": {k: v for k, v in after.items() if k != "ppl"}, **kept}


# -- reporting -------------------------------------------------------------------------------

def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'formula':<9} {'rho':>6} {'exact':>13} {'loose':>13} {'ppl':>17} {'kept':>7}"]
    for r in summary["results"]:
        lines.append(f"{r['formula']:<9} {r['rho']:>6.3f} {r['exact_before']:>6.3f}>{r['exact_after']:<6.3f} "
                     f"{r['loose_before']:>6.3f}>{r['loose_after']:<6.3f} {r['ppl_before']:>8.2f}>"
                     f"{r['ppl_after']:<8.2f} {r['kept_fraction']:>7.3f}")
    a = summary["ablated"]
    lines.append(f"edited weights zeroed: exact {a['exact']:.3f}, loose {a['loose_match']:.3f}, ppl {a['ppl']:.2f}")
    s = summary["saved"]
    lines.append(f"saved edited_model: {s['formula']} rho={s['rho']} (exact {s['exact_after']:.3f}, "
                 f"ppl {s['ppl_after']:.2f})")
    return "\n".join(lines)


def rho_curve(summary: dict[str, Any], path: Path) -> None:
    """Exact match and perplexity ratio against rho, one line per formula."""
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = sorted((r for r in summary["results"] if r["formula"] == formula), key=lambda r: r["rho"])
        rhos = [r["rho"] for r in rows]
        left.plot(rhos, [r["exact_after"] for r in rows], marker="o", label=f"{formula} exact")
        left.plot(rhos, [r["loose_after"] for r in rows], marker="x", ls="--", label=f"{formula} loose")
        right.plot(rhos, [r["ppl_after"] for r in rows], marker="o", label=formula)
    left.axhline(summary["before"]["exact"], color="grey", lw=0.8)
    left.axhline(summary["ablated"]["exact"], color="black", lw=0.8, ls=":", label="weights zeroed")
    left.set_xlabel("rho (fraction of importance kept)")
    left.set_ylabel("memorized windows reproduced")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=8)
    left.set_title(f"{summary['n_memorized']} memorized windows")
    right.axhline(summary["before"]["ppl"], color="grey", lw=0.8, label="before")
    right.axhline(summary["before"]["ppl"] * (1 + PPL_LIMIT), color="grey", lw=0.8, ls=":", label="+20 %")
    right.axhline(summary["ablated"]["ppl"], color="black", lw=0.8, ls=":", label="weights zeroed")
    right.set_xlabel("rho (fraction of importance kept)")
    right.set_ylabel("held-out perplexity")
    right.legend(fontsize=8)
    save_figure(fig, path)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's lines in the run report: one per importance formula."""
    lines = []
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = [r for r in summary["results"] if r["formula"] == formula]
        curve = ", ".join(f"{r['rho']}: {r['exact_after']:.2f}/{r['ppl_after']:.1f}" for r in rows)
        lines.append(f"K-FAC edit ({formula}): before exact {rows[0]['exact_before']:.2f}, ppl "
                     f"{rows[0]['ppl_before']:.1f}; rho exact/ppl {curve}")
    return "\n".join(lines)


def array_tasks(cfg: KfacConfig) -> int | None:
    """SLURM array size (memcirc.slurm.plan): reused factors leave nothing to collect or shard, so one
    job; else None, as many factor shards as asked for."""
    return 1 if cfg.factors_file else None
