"""The attention_bypass stage: bypass the attention of each block (or of the --layers chosen, and of
--layer-sets block sets) and measure memorization of the memorized windows against held-out perplexity.

Writes summary.json (baseline and one entry per bypassed block or set), tradeoff.png and
manifest.json (last). The interventions and the sweep are in `memcirc.bypass`, the figure (the per-block
view) in `memcirc.bypass_figures`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.benchmarks import check_tasks
from memcirc.bypass import (
    METRICS,
    bypass_attention,
    mean_attention_outputs,
    parse_layer_sets,
    parse_layers,
    sweep,
    windows_from_file,
)
from memcirc.bypass_figures import tradeoff_figure
from memcirc.data import Window
from memcirc.errors import InputError
from memcirc.evaluation import (
    LOGITS_BYTES,
    describe_blocks,
    forward_rows,
    heldout_blocks,
    memorized_windows,
    ppl_block_len,
)
from memcirc.logs import show
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, load
from memcirc.models.arch import embedding_rows, n_ctx, n_layers
from memcirc.models.identity import check_same_model, results_key
from memcirc.models.loading import load_config_and_tokenizer
from memcirc.models.tokenizer import bos_policy
from memcirc.option_groups import LmEval
from memcirc.plots import figure_source
from memcirc.stages.configs.attention_bypass import BypassConfig
from memcirc.stress import StressPlan, stage_stress
from memcirc.stress_figures import stress_figure, stress_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

TRADEOFF_PNG = "tradeoff.png"
STRESS_PNG = "stress.png"     # --stress: exact before/after per prefix perturbation
TABLE_COLUMNS = ("exact", "lcp", "token_match", "loose_match")


def run(cfg: BypassConfig) -> dict[str, Any]:
    """Baseline, each chosen block (default: every block) bypassed alone, then each block set:
    memorization and perplexity."""
    torch.manual_seed(cfg.seed)
    windows, inputs, upstream = _memorized(cfg)
    if cfg.limit:
        windows = windows[:cfg.limit]
    layers, layer_sets, block_len = _check_blocks(cfg)   # from config.json, before the weights load
    bench = check_tasks(cfg.options(LmEval))              # lm-eval task names and data, likewise
    loaded = load(cfg.model_spec())
    model, tok = loaded.model, loaded.tokenizer
    warning = None
    if upstream is not None and not cfg.memorized_file:
        warning = check_same_model(upstream.get("model"), loaded, "memorization scores")
    _check_vocab(windows, model)
    bos = bos_policy(tok, cfg.prepend_bos)
    # Mode mean: the reference mean comes from the held-out blocks after the perplexity blocks, so
    # perplexity is never measured on the text the replacement was averaged over (unless too short).
    every = heldout_blocks(cfg.data_path("heldout"), tok, block_len, 2 * cfg.ppl_blocks, bos)
    blocks, reference = every[:cfg.ppl_blocks], every[cfg.ppl_blocks:]
    if cfg.mode == "mean" and not reference:
        log.warning("held-out text %s has no blocks beyond the %d perplexity blocks: the mean attention "
                    "outputs are averaged over the perplexity blocks themselves", cfg.heldout, len(blocks))
        reference = blocks
    if cfg.heldout != "testbed" and Path(cfg.heldout).is_file():
        inputs.append({"path": cfg.heldout, "sha256": art.sha256_file(Path(cfg.heldout))})
    stage = StageRun.for_config(cfg, inputs, model=results_key(loaded), **_stress_part(cfg))
    if (done := stage.open(cfg.force)) is not None:
        show(format_table(done))
        return done
    stage.start(cfg.force)
    if warning:
        log.warning("%s", warning)
    n_single = n_layers(model) if layers is None else len(layers)
    log.info("%d memorized windows; %s; mode %s; %d single-block runs + %d sets", len(windows),
             describe_blocks(blocks), cfg.mode, n_single, len(layer_sets))
    if (rows := forward_rows(model, block_len, cfg.batch_size)) < cfg.batch_size:
        log.info("perplexity: %d block(s) per forward pass (the logits of one pass are kept under %d MiB)",
                 rows, LOGITS_BYTES >> 20)
    # special-token ids come from the tokenizer's __getattr__, which the stubs type as str | list[str]
    pad_token_id = cast("int | None", tok.pad_token_id)
    pad = pad_token_id if pad_token_id is not None else 0
    summary = sweep(model, loaded.arch, windows, blocks, pad_id=pad, batch_size=cfg.batch_size, mode=cfg.mode,
                    layers=layers, layer_sets=layer_sets, levenshtein_threshold=cfg.levenshtein_threshold,
                    tokenizer=tok, benchmarks=bench, reference_blocks=reference)
    summary["heldout"] = cfg.heldout
    summary["ppl_block_len"] = block_len
    summary["bos"] = bos.to_dict()
    if bench is not None:
        summary["lm_eval"] = bench.describe()   # the setting; each run's results are in its row's "lm_eval"
    if cfg.stress:
        summary["stress"] = _stress(cfg, loaded, windows, every, summary, pad)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    source = figure_source(cfg.model, cfg.output_dir, cfg.revision)
    tradeoff_figure(summary, cfg.stage_dir / TRADEOFF_PNG, source=source)
    outputs: dict[str, int | None] = {art.SUMMARY_JSON: None, TRADEOFF_PNG: None}
    (cfg.stage_dir / STRESS_PNG).unlink(missing_ok=True)   # an old run's, with another config
    if "stress" in summary:
        edit = summary["stress"]["edit"]
        stress_figure(summary["stress"], cfg.stage_dir / STRESS_PNG,
                      f"the attention bypass ({edit['mode']}) of {_blocks(edit['layers'])}", source=source)
        outputs[STRESS_PNG] = None
    stage.finish(outputs, model=loaded.identity(), seed=cfg.seed,
                 metric={"memorization": list(METRICS), "levenshtein_threshold": cfg.levenshtein_threshold,
                         "ppl": "exp(total NLL / total predicted tokens) over held-out blocks, padding masked"})
    show(format_table(summary))
    return summary


# -- inputs ----------------------------------------------------------------------------------

def _memorized(cfg: BypassConfig) -> tuple[Sequence[Window], list[dict[str, Any]], dict[str, Any] | None]:
    """(windows, fingerprint inputs, upstream manifest or None)."""
    upstream_dir = cfg.upstream_dir
    if cfg.memorized_file:
        upstream = None
        if upstream_dir is not None and (upstream_dir / art.MANIFEST).is_file():
            upstream = read_manifest(upstream_dir, what="memorization")
        prefix_len = (upstream or {}).get("config", {}).get("prefix_len")
        # the upstream run's windows are [BOS] + prefix_len + suffix when it prepended BOS
        bos_id = (((upstream or {}).get("windows") or {}).get("bos") or {}).get("bos_token_id")
        windows = windows_from_file(cfg.memorized_file, prefix_len, bos_id)
        inputs = [{"path": cfg.memorized_file, "sha256": art.sha256_file(Path(cfg.memorized_file)),
                   "prefix_len": windows[0].prefix_len}]
        return windows, inputs, upstream
    assert upstream_dir is not None, "attention_bypass needs memorization_score: its upstream folder is known"
    upstream = read_manifest(upstream_dir, what="memorization")
    windows = memorized_windows(upstream_dir)
    return windows, [{"path": str(upstream_dir), "run_id": upstream["run_id"]}], upstream


def _check_blocks(cfg: BypassConfig) -> tuple[list[int] | None, list[list[int]], int]:
    """(--layers or None for every block, --layer-sets, the perplexity block length), checked against
    the model's config.json alone, so a bad block number exits before the weights load."""
    config, _ = load_config_and_tokenizer(cfg.model_spec())
    blocks = n_layers(config)
    return (parse_layers(cfg.layers, blocks), parse_layer_sets(cfg.layer_sets, blocks),
            ppl_block_len(cfg.ppl_block_len, n_ctx(config)))


def _check_vocab(windows: Sequence[Window], model: PreTrainedModel) -> None:
    vocab = embedding_rows(model)
    high = max(int(w.tokens.max()) for w in windows)
    if high >= vocab or min(int(w.tokens.min()) for w in windows) < 0:
        raise InputError(f"memorized windows hold token ids outside the model's vocabulary (0..{vocab - 1}): "
                         "were they tokenized for another model?")


# -- the stress test (--stress) --------------------------------------------------------------

def _stress_part(cfg: BypassConfig) -> dict[str, Any]:
    """The fingerprint part of --stress: its plan when on, nothing when off (the fingerprint of a run
    without it is the one it had before the option existed)."""
    return {"stress": StressPlan().to_dict()} if cfg.stress else {}


def _stress(cfg: BypassConfig, loaded: LoadedModel, windows: Sequence[Window], heldout: list[np.ndarray],
            summary: dict[str, Any], pad: int) -> dict[str, Any]:
    """The stress block: the run that lowers exact match most (ties: the lower perplexity, then the first)
    bypassed again, the memorized windows scored under prefix perturbations before and with it."""
    chosen = min(summary["layers"], key=lambda e: (e["exact"], e["ppl"]))
    layers = chosen["layer"] if isinstance(chosen["layer"], list) else [chosen["layer"]]
    upstream = cfg.upstream_dir   # a --memorized-file may come without a memorization run
    upstream = upstream if upstream is not None and (upstream / art.MANIFEST).is_file() else None
    stress = stage_stress(loaded, windows, upstream, heldout, pad_id=pad, batch_size=cfg.batch_size,
                          documents=not cfg.memorized_file)
    stress.measure_before(loaded.model)
    # mode mean: the same reference means as the sweep's (the held-out blocks after the perplexity blocks)
    reference = heldout[cfg.ppl_blocks:] or heldout[:cfg.ppl_blocks]
    means = (mean_attention_outputs(loaded.model, loaded.arch, reference, pad_id=pad, batch_size=cfg.batch_size)
             if cfg.mode == "mean" else None)
    with bypass_attention(loaded.model, loaded.arch, layers, cfg.mode, means):
        return stress.result(loaded.model, {"mode": cfg.mode, "layers": layers, "exact": chosen["exact"],
                                            "ppl": chosen["ppl"]})


def _blocks(layers: list[int]) -> str:
    return f"block {layers[0]}" if len(layers) == 1 else "blocks " + ",".join(map(str, layers))


# -- outputs ---------------------------------------------------------------------------------

def format_table(summary: dict[str, Any]) -> str:
    """The table the stage prints last: memorization and perplexity per bypassed block or set."""
    cols = [c for c in TABLE_COLUMNS if c in summary["baseline"]] + ["ppl"]
    lines = [f"{'bypassed':<10} " + " ".join(f"{c:>12}" for c in cols)]

    def line(label: str, row: dict[str, Any]) -> str:
        return f"{label:<10} " + " ".join(f"{row[c]:>12.4f}" if c != "ppl" else f"{row[c]:>12.3f}" for c in cols)

    lines.append(line("none", summary["baseline"]))
    for entry in summary["layers"]:
        layer = entry["layer"]
        lines.append(line(",".join(map(str, layer)) if isinstance(layer, list) else str(layer), entry))
    if "stress" in summary:
        lines.append(f"{_blocks(summary['stress']['edit']['layers'])} bypassed: " + stress_line(summary["stress"]))
    return "\n".join(lines)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    blocks = ", ".join(f"{e['layer']}: {e['exact']:.2f}/{e['ppl']:.1f}" for e in summary["layers"])
    line = (f"attention bypass: baseline exact {summary['baseline']['exact']:.2f}, ppl "
            f"{summary['baseline']['ppl']:.1f}; per block exact/ppl {blocks} (block: exact-match rate / "
            "held-out perplexity with its attention bypassed)")
    if summary.get("stress"):
        chosen = _blocks(summary["stress"]["edit"]["layers"])
        line += f"\nattention bypass of {chosen}: " + stress_line(summary["stress"])
    return line
