"""The kfac_edit stage: K-FAC factors, an eigenbasis edit keeping a fraction rho of the importance,
memorization and perplexity before and after.

Reads the memorized windows of memorization/ and writes kfac/: factors.safetensors (the factor
sums, reusable with --factors-file), summary.json (the formula x rho sweep), rho_curve.png,
deltas.safetensors and edited_model/ (the saved setting, with a model card README.md; not with
--no-save-model), manifest.json last. With N shards (a
SLURM job array) each job collects the factor sums of its slice of the factor batches into
shards/<i>/ and `--merge` adds them up and runs the edit: the outputs equal a one-job run's.
The method and its choices: memcirc/kfac/__init__.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from memcirc import __version__
from memcirc import artifacts as art
from memcirc.benchmarks import Benchmarks, check_tasks
from memcirc.benchmarks import evaluate as run_benchmarks
from memcirc.data import ScoredWindow
from memcirc.errors import InputError
from memcirc.evaluation import (
    describe_blocks,
    forward_rows,
    heldout_blocks,
    memorization,
    memorized_windows,
    perplexity,
    ppl_block_len,
)
from memcirc.kfac.budget import factor_dims, measured_warning, rank_report, rank_warning, resolve_factor_tokens
from memcirc.kfac.card import card_data, write_card
from memcirc.kfac.edit import ModelEdit
from memcirc.kfac.factors import (
    FACTORS_FILE,
    MAX_FACTOR_BLOCK,
    FactorOptions,
    Factors,
    load_factors,
    n_predicted,
    read_factor_tokens,
    token_blocks,
)
from memcirc.kfac.report import format_table, rho_curve
from memcirc.kfac.resume import FactorCollection
from memcirc.kfac.shards import collect_shard, merge_shards
from memcirc.kfac.targets import Target, check_targets, resolve_targets
from memcirc.logs import progress, show
from memcirc.manifest import StageRun, git_info, read_manifest
from memcirc.models import LoadedModel, load
from memcirc.models.arch import arch_for, dims
from memcirc.models.identity import check_same_model, results_key
from memcirc.models.loading import load_config_and_tokenizer
from memcirc.models.tokenizer import BosPolicy, bos_policy
from memcirc.option_groups import LmEval, MemorizedRule
from memcirc.plots import figure_source
from memcirc.sharding import resolve_shards
from memcirc.stages.configs.kfac_edit import KfacConfig
from memcirc.stress import StressPlan, StressRun, stage_stress
from memcirc.stress_figures import stress_figure, stress_line

log = logging.getLogger(__name__)


MEMORIZED = MemorizedRule()          # the windows kfac_edit edits out: exact == 1 (the default rule)
FACTORS = FACTORS_FILE
DELTAS = "deltas.safetensors"
EDITED_MODEL = "edited_model"
RHO_CURVE = "rho_curve.png"
STRESS_PNG = "stress.png"            # --stress: exact before/after per prefix perturbation
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
    ppl_len = _check_before_loading(cfg)
    bench = check_tasks(cfg.options(LmEval))   # lm-eval task names and data, before the weights load
    loaded = load(cfg.model_spec())
    warnings = [check_same_model(upstream.get("model", {}), loaded, "memorization scores")]
    layers, roles, targets = _targets(cfg, loaded)
    if reused is not None:
        assert cfg.factors_file is not None   # reused is read from it
        warnings.append(_check_reused(cfg.factors_file, reused, loaded, targets))
    bos = bos_policy(loaded.tokenizer, cfg.prepend_bos)
    blocks = heldout_blocks(cfg.data_path("heldout"), loaded.tokenizer, ppl_len, cfg.ppl_blocks, bos)
    plan = _factor_plan(cfg, loaded, targets, reused, bos)
    warnings.append(plan.warning)
    stage = StageRun.for_config(cfg, _inputs(cfg, upstream), model=results_key(loaded),
                                factor_sampling=FACTOR_SAMPLING, **_stress_part(cfg))
    if (done := stage.open(cfg.force)) is not None:
        show(format_table(done))
        return done
    shard_sums, n_merged = (merge_shards(cfg.stage_dir / art.SHARDS_DIR, stage.fingerprint, cfg.num_shards)
                            if cfg.merge else (None, 1))
    shard_dir = cfg.stage_dir / art.SHARDS_DIR / f"{shard_index:05d}"
    # the other factor shards write next to this one at the same time
    stage.start(cfg.force, task_dir=shard_dir if num_shards > 1 else None)
    for warning in filter(None, warnings):
        log.warning(warning)
    log.info("perplexity on %s", describe_blocks(blocks))

    identity = loaded.identity()
    collection = FactorCollection(loaded.model, targets, plan.batches, FactorOptions(labels=cfg.labels, seed=cfg.seed),
                                  stage.fingerprint, identity, cfg.chunk_size)
    meta: dict[str, Any] = {"factor_data": cfg.factor_data, "seed": cfg.seed, "block_len": plan.block_len}
    if bos.bos_id is not None:
        meta["bos_token_id"] = bos.bos_id
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if num_shards > 1:
        collect_shard(collection, (num_shards, shard_index), shard_dir, meta, labels=cfg.labels, force=cfg.force)
        stage.release()   # the shard is complete: its folder is free for the merge
        return None
    factors = _factors(cfg, collection, reused, shard_sums, meta)
    factors.save(cfg.stage_dir / FACTORS, identity, targets)
    timings["factors_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    edit = ModelEdit(loaded.model, targets, factors, cfg.damping)
    timings["eigh_s"] = time.perf_counter() - t0
    rank = rank_report(edit.bases, factors.n_tokens)
    if (measured := measured_warning(rank)) is not None:
        log.warning(measured)
        warnings.append(measured)
    lm_before = _benchmarks(cfg, loaded, bench, timings)   # unedited (the edit is applied per setting below)
    stress = _stress_before(cfg, loaded, windows, blocks, timings)
    t0 = time.perf_counter()
    evaluate = partial(_evaluate, cfg, loaded, windows, blocks)
    sweep = _sweep(cfg, edit, evaluate)
    timings["sweep_s"] = time.perf_counter() - t0
    saved = _apply_saved_setting(cfg, edit, sweep, evaluate)

    summary = {
        "model": identity["name_or_path"], "n_memorized": len(windows), "layers": layers,
        "projections": roles, "modules": [t.name for t in targets],
        "labels": factors.labels, "factor_tokens": factors.n_tokens, "factor_token_budget": plan.budget,
        "factor_rank": rank, "damping": cfg.damping, "heldout": cfg.heldout, "n_ppl_blocks": len(blocks),
        "ppl_block_len": ppl_len, "ppl_tokens": sum(len(b) - 1 for b in blocks), "bos": bos.to_dict(),
        "warnings": [w for w in warnings if w], **sweep, "saved": saved,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if stress is not None:  # the saved setting is still applied
        t0 = time.perf_counter()
        summary["stress"] = stress.result(loaded.model, {"formula": saved["formula"], "rho": saved["rho"]})
        summary["timings"]["stress_s"] = round(timings["stress_s"] + time.perf_counter() - t0, 3)
    if bench is not None:   # lm-eval before the edit and with the saved setting, still applied here
        lm_after = _benchmarks(cfg, loaded, bench, timings)
        summary["lm_eval"] = {**bench.describe(), "before": lm_before, "after": lm_after}
        summary["timings"]["lm_eval_s"] = round(timings["lm_eval_s"], 3)
    _write_edited_model(cfg, loaded, summary)   # the saved setting is still applied
    edit.restore()
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    rho_curve(summary, cfg.stage_dir / RHO_CURVE, PPL_LIMIT, source=figure_source(cfg.model, cfg.output_dir,
                                                                                   cfg.revision))
    outputs: dict[str, int | None] = {FACTORS: None, DELTAS: None, art.SUMMARY_JSON: None, RHO_CURVE: None}
    if _stress_figure(cfg, summary):
        outputs[STRESS_PNG] = None
    if cfg.save_model:
        for f in sorted((cfg.stage_dir / EDITED_MODEL).iterdir()):
            outputs[f"{EDITED_MODEL}/{f.name}"] = None
    stage.finish(outputs, model=identity, seed=cfg.seed, factor_shards=n_merged)   # drops chunks and shards
    show(format_table(summary))
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


def _check_before_loading(cfg: KfacConfig) -> int:
    """--layers, --projections and --ppl-block-len checked against config.json alone (a bad value exits
    before the weights load); returns the perplexity block length."""
    config, _ = load_config_and_tokenizer(cfg.model_spec())
    arch, sizes = arch_for(config), dims(config)
    check_targets(arch, sizes.n_layers, cfg.layers, cfg.projections or arch.mlp_in_roles)
    return ppl_block_len(cfg.ppl_block_len, sizes.n_ctx)


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

@dataclass(frozen=True)
class FactorPlan:
    """The factor batches to collect (none with --factors-file), the token budget they hold, their
    block length and the rank warning for that many tokens (None when there are enough)."""

    batches: list[torch.Tensor]
    budget: int | None
    block_len: int
    warning: str | None


def _factor_plan(cfg: KfacConfig, loaded: LoadedModel, targets: list[Target],
                 reused: tuple[Factors, Any, Any] | None, bos: BosPolicy) -> FactorPlan:
    """The budget (--factor-tokens, default scaled to the widest factor), the factor data cut into
    blocks of min(n_ctx, 512) tokens holding exactly that many (fewer if the data runs out), batched
    so a forward's logits stay bounded, and the rank warning."""
    widths = factor_dims(loaded.model, targets)
    block_len = min(dims(loaded.model).n_ctx, MAX_FACTOR_BLOCK)
    if reused is not None:
        return FactorPlan([], None, block_len, rank_warning(reused[0].n_tokens, widths))
    budget = resolve_factor_tokens(cfg.factor_tokens, max(max(w) for w in widths.values()))
    rows = forward_rows(loaded.model, block_len, cfg.batch_size)
    if rows < cfg.batch_size:
        log.info("K-FAC factors: %d block(s) per forward/backward pass (bounded logits)", rows)
    factor_ids = read_factor_tokens(cfg.data_path("factor_data"), loaded.tokenizer, budget, bos)
    batches = token_blocks(factor_ids, block_len, budget, rows, bos.bos_id)
    n = n_predicted(batches)
    return FactorPlan(batches, budget, block_len, rank_warning(n, widths, short_of_budget=n < budget))


def _factors(cfg: KfacConfig, collection: FactorCollection, reused: tuple[Factors, Any, Any] | None,
             shard_sums: Factors | None, meta: dict[str, Any]) -> Factors:
    """The targets' float32 factor sums: of a --factors-file, of the merged shards, or collected here."""
    if reused is not None:
        return reused[0].only(collection.targets)
    if shard_sums is None:
        log.info("collecting K-FAC factors (%s labels) for %d modules on %d tokens", cfg.labels,
                 len(collection.targets), n_predicted(collection.batches))
        shard_sums = collection.resumable(0, len(collection.batches), cfg.stage_dir / art.CHUNKS_DIR, "factors")
    factors = shard_sums.to(torch.float32)
    factors.meta = meta
    return factors


# -- the sweep and the saved edit ------------------------------------------------------------

def _evaluate(cfg: KfacConfig, loaded: LoadedModel, windows: list[ScoredWindow],
              blocks: list[np.ndarray]) -> dict[str, Any]:
    """Memorization of the windows and held-out perplexity of the model as it is now."""
    pad = _pad_id(loaded)
    mem = memorization(loaded.model, windows, pad_id=pad, batch_size=cfg.batch_size,
                       levenshtein_threshold=cfg.levenshtein_threshold)
    return {**mem, "ppl": perplexity(loaded.model, blocks, pad_id=pad, batch_size=cfg.batch_size)}


def _pad_id(loaded: LoadedModel) -> int:
    # transformers' tokenizer __getattr__ types special-token ids as str | list[str]
    pad = cast("int | None", loaded.tokenizer.pad_token_id)
    if pad is None:
        raise InputError(f"the tokenizer of {loaded.spec.name_or_path} has no pad token (nor an EOS token to pad "
                         "with): cannot batch the evaluation windows")
    return pad


def _benchmarks(cfg: KfacConfig, loaded: LoadedModel, bench: Benchmarks | None,
                timings: dict[str, float]) -> dict[str, Any] | None:
    """lm-eval on the model as it is now (None without --lm-eval-tasks); its time adds to timings."""
    if bench is None:
        return None
    t0 = time.perf_counter()
    results = run_benchmarks(loaded.model, loaded.tokenizer, bench, cfg.batch_size)
    timings["lm_eval_s"] = timings.get("lm_eval_s", 0.0) + time.perf_counter() - t0
    return results


def _sweep(cfg: KfacConfig, edit: ModelEdit, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """before, one result per (formula, rho), and the edited weights zeroed (the rho -> 0 limit)."""
    before = evaluate()
    results = []
    settings = [(formula, rho) for formula in cfg.formulas for rho in cfg.rhos]
    for formula, rho in progress(settings, "K-FAC edit (formula x rho)", total=len(settings), unit="settings"):
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


def _apply_saved_setting(cfg: KfacConfig, edit: ModelEdit, sweep: dict[str, Any],
                         evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Apply the saved setting (left applied for `_write_edited_model`), write its deltas; its result."""
    rho = _saved_setting(cfg, sweep["results"])
    kept = edit.apply(cfg.save_formula, rho)
    after = evaluate()
    art.save_tensors(cfg.stage_dir / DELTAS, edit.deltas(), metadata={"formula": cfg.save_formula, "rho": str(rho)})
    return {"formula": cfg.save_formula, "rho": rho, **_result(cfg.save_formula, rho, sweep["before"], after, kept),
            "edited_model": EDITED_MODEL if cfg.save_model else None}


def _write_edited_model(cfg: KfacConfig, loaded: LoadedModel, summary: dict[str, Any]) -> None:
    """edited_model/: the model as edited now (a from_pretrained folder) and its model card; with
    --no-save-model none, and an old one is removed (it would not match this run)."""
    edited_dir = cfg.stage_dir / EDITED_MODEL
    art.remove_tree(edited_dir)
    if not cfg.save_model:
        return
    loaded.model.save_pretrained(edited_dir)
    loaded.tokenizer.save_pretrained(edited_dir)
    write_card(edited_dir, card_data(summary, loaded.identity(), {"memcirc": __version__, **git_info()}))


def _result(formula: str, rho: float, before: dict[str, Any], after: dict[str, Any],
            kept: dict[str, float]) -> dict[str, Any]:
    return {"formula": formula, "rho": rho,
            "exact_before": before["exact"], "exact_after": after["exact"],
            "loose_before": before["loose_match"], "loose_after": after["loose_match"],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "ppl_ratio": after["ppl"] / before["ppl"],
            "after": {k: v for k, v in after.items() if k != "ppl"}, **kept}


# -- the stress test (--stress) --------------------------------------------------------------

def _stress_part(cfg: KfacConfig) -> dict[str, Any]:
    """The fingerprint part of --stress: its plan when on, nothing when off (the fingerprint of a run
    without it is the one it had before the option existed)."""
    return {"stress": StressPlan().to_dict()} if cfg.stress else {}


def _stress_before(cfg: KfacConfig, loaded: LoadedModel, windows: list[ScoredWindow], blocks: list[np.ndarray],
                   timings: dict[str, float]) -> StressRun | None:
    """With --stress: the perturbed memorized windows scored on the unedited model; else None."""
    if not cfg.stress:
        return None
    t0 = time.perf_counter()
    stress = stage_stress(loaded, windows, cfg.upstream_dir, blocks, pad_id=_pad_id(loaded),
                          batch_size=cfg.batch_size)
    stress.measure_before(loaded.model)
    timings["stress_s"] = time.perf_counter() - t0
    return stress


def _stress_figure(cfg: KfacConfig, summary: dict[str, Any]) -> bool:
    """stress.png of the summary's stress block (an old one is removed without --stress); drawn?"""
    path = cfg.stage_dir / STRESS_PNG
    if "stress" not in summary:
        path.unlink(missing_ok=True)
        return False
    edit = summary["stress"]["edit"]
    stress_figure(summary["stress"], path, f"the K-FAC edit ({edit['formula']}, rho={edit['rho']:g})",
                  source=figure_source(cfg.model, cfg.output_dir, cfg.revision))
    return True


# -- reporting -------------------------------------------------------------------------------

def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's lines in the run report: one per importance formula."""
    lines = []
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = [r for r in summary["results"] if r["formula"] == formula]
        curve = ", ".join(f"{r['rho']}: {r['exact_after']:.2f}/{r['ppl_after']:.1f}" for r in rows)
        lines.append(f"K-FAC edit ({formula}): before exact {rows[0]['exact_before']:.2f}, ppl "
                     f"{rows[0]['ppl_before']:.1f}; rho exact/ppl {curve} (rho: kept importance; exact-match "
                     "rate / held-out perplexity after the edit)")
    if summary.get("stress"):
        edit = summary["stress"]["edit"]
        lines.append(f"K-FAC edit ({edit['formula']} rho={edit['rho']}) " + stress_line(summary["stress"]))
    return "\n".join(lines)


def array_tasks(cfg: KfacConfig) -> int | None:
    """SLURM array size (memcirc.slurm.plan): reused factors leave nothing to collect or shard, so one
    job; else None, as many factor shards as asked for."""
    return 1 if cfg.factors_file else None
