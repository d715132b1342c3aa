"""The memorization_score stage: score every window of a corpus for verbatim memorization.

Writes scores.jsonl (one row per window: id, provenance, tokens, metrics), summary.json (means
overall and per group), histogram.png and manifest.json (last). With N shards (a SLURM job array)
each job scores its slice of whole chunks into shards/<i>/ and `--merge` concatenates them: the
merged outputs equal a one-job run's byte for byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from memcirc import artifacts as art
from memcirc.data import (
    SCORES_PARQUET,
    Columns,
    Document,
    Window,
    WindowSet,
    load_documents,
    make_windows,
    read_scores,
    validate_windows,
)
from memcirc.errors import InputError
from memcirc.exposure import (
    EXPOSURE_JSONL,
    EXPOSURE_PNG,
    SecretCase,
    check_vocab,
    exposure_rows,
    secret_case,
    summarize_exposure,
)
from memcirc.logs import show
from memcirc.manifest import StageRun, read_manifest
from memcirc.memorization_figures import exposure_figure, score_histogram
from memcirc.models import LoadedModel, load
from memcirc.models.arch import dims, embedding_rows
from memcirc.models.identity import results_key
from memcirc.models.loading import load_config_and_tokenizer
from memcirc.models.tokenizer import BosPolicy, bos_policy, checked_documents, encode, tokenizer_check_of
from memcirc.plots import figure_source
from memcirc.scoring import (
    GENERATION_METRICS,
    METRIC_DEFINITIONS,
    METRIC_VERSION,
    TEACHER_FORCED_METRICS,
    add_texts,
    parquet_bytes,
    score_windows,
    summarize,
)
from memcirc.sharding import chunk_aligned_bounds, read_marker, resolve_shards, run_chunked_by_batch, shard_damage
from memcirc.stages.configs.memorization_score import ScoreConfig
from memcirc.stages.registry import DONE_MARKER

log = logging.getLogger(__name__)


def run(cfg: ScoreConfig) -> dict[str, Any] | None:
    """Score every window; write scores.jsonl, summary.json, the histogram, then the manifest.

    Returns the summary (None for a shard job, whose outputs wait for `--merge`).
    """
    torch.manual_seed(cfg.seed)
    if cfg.merge:
        return _merge_shards(cfg)
    num_shards, shard_index = resolve_shards(cfg.num_shards, cfg.shard_index)
    # Config and tokenizer first: every data row is read and checked before the weights load.
    config, tokenizer = load_config_and_tokenizer(cfg.model_spec())
    windows, inputs, secrets = _stage_windows(cfg, config, tokenizer)
    loaded = load(cfg.model_spec())
    loaded.tokenizer_check = tokenizer_check_of(tokenizer)   # in the manifest's model identity
    _check_embedding_rows(windows, loaded, config, secrets)
    stage = StageRun.for_config(cfg, inputs, model=results_key(loaded))
    if (summary := stage.open(cfg.force)) is not None:
        show(format_summary(summary))
        return summary
    shard_dir = cfg.stage_dir / art.SHARDS_DIR / f"{shard_index:05d}"
    # the other shards write next to this one at the same time
    stage.start(cfg.force, task_dir=shard_dir if num_shards > 1 else None)

    def work(chunk: Sequence[Window], advance: Callable[[int], None]) -> list[dict[str, Any]]:
        # load() gives a tokenizer without a pad token eos as pad; the stubs type special-token ids as str | list[str]
        rows = score_windows(loaded.model, chunk, pad_id=cast(int, loaded.tokenizer.pad_token_id),
                             batch_size=cfg.batch_size, metrics=cfg.metrics, padding_side=cfg.padding_side,
                             levenshtein_threshold=cfg.levenshtein_threshold, advance=advance)
        if cfg.decode_text:   # in the chunks, so shards and resumed runs carry the text too
            add_texts(rows, loaded.tokenizer, continuation=any(m in GENERATION_METRICS for m in cfg.metrics))
        return rows

    context = {"inputs": inputs, "model": loaded.identity(), "windows": windows.summary()}
    if num_shards == 1:
        store = art.ChunkStore(cfg.stage_dir / art.CHUNKS_DIR, stage.fingerprint)
        data = run_chunked_by_batch(windows.windows, work, store, cfg.chunk_size, "scoring", "windows")
        context["exposure"] = exposure_rows(loaded.model, secrets, cfg.exposure_candidates, cfg.seed)
        return _finish(cfg, stage, data, context)
    if shard_done(shard_dir, stage.fingerprint, num_shards) and not cfg.force:   # a re-submitted finished shard
        log.info("shard %d/%d is done for this config (%s); nothing to do", shard_index, num_shards, shard_dir)
        stage.release()
        return None
    (shard_dir / DONE_MARKER).unlink(missing_ok=True)
    start, stop = chunk_aligned_bounds(len(windows.windows), cfg.chunk_size, num_shards, shard_index)
    store = art.ChunkStore(shard_dir / art.CHUNKS_DIR, stage.fingerprint)
    data = run_chunked_by_batch(windows.windows[start:stop], work, store, cfg.chunk_size,
                                f"scoring shard {shard_index}", "windows") if stop > start else b""
    # shard 0 scores every secret, after its (resumable) chunks; the rows reach the merge in its done
    # record's context
    context["exposure"] = exposure_rows(loaded.model, secrets, cfg.exposure_candidates, cfg.seed) \
        if shard_index == 0 else []
    art.atomic_write_bytes(shard_dir / art.SCORES_JSONL, data)
    art.write_json(shard_dir / DONE_MARKER, {"fingerprint": stage.fingerprint, "num_shards": num_shards,
                                             "shard_index": shard_index, "rows": data.count(b"\n"),
                                             "sha256": art.sha256_bytes(data), "context": context})
    art.remove_tree(shard_dir / art.CHUNKS_DIR)
    log.info("shard %d/%d done (%d windows); run with --merge once all shards are done",
             shard_index, num_shards, stop - start)
    stage.release()   # the task's outputs are complete: its folder is free for the merge
    return None


# -- inputs ----------------------------------------------------------------------------------

def _stage_windows(cfg: ScoreConfig, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
                   ) -> tuple[WindowSet, list[dict[str, Any]], list[SecretCase]]:
    """The windows to score, checked against the model config, the input descriptors the
    fingerprint covers and the documents' secrets (for exposure). Needs no weights: it runs before
    the model loads."""
    policy = bos_policy(tokenizer, cfg.prepend_bos)
    secrets: list[Document] = []
    if cfg.input_dir:  # re-score the windows of an earlier memorization run (e.g. another checkpoint)
        upstream = read_manifest(Path(cfg.input_dir), what="memorization")
        windows = WindowSet(list(read_scores(Path(cfg.input_dir), cfg.limit)), source=str(cfg.input_dir),
                            bos=(upstream.get("windows") or {}).get("bos"))
        inputs = [{"path": str(cfg.input_dir), "run_id": upstream["run_id"]}]
        if windows.bos is not None and windows.bos != policy.to_dict():
            log.warning("the windows of %s were cut with BOS policy %s; this model's is %s. They are "
                        "re-scored as they are", cfg.input_dir, windows.bos, policy.to_dict())
    else:
        columns = Columns(text=cfg.text_column, tokens=cfg.token_column, group=cfg.group_column,
                          doc=cfg.doc_column)
        docs = load_documents(cfg.data_path("dataset"), columns, split=cfg.split, dataset_config=cfg.dataset_config,
                              streaming=cfg.streaming)
        # the tokenizer's sanity check on the first documents' text, before any weights load
        docs = checked_documents(docs, tokenizer, dims(config).d_vocab)
        if cfg.exposure_candidates:
            docs = _keeping_secrets(docs, secrets)
        windows = make_windows(docs, tokenizer, cfg.dataset, cfg.prefix_len, cfg.suffix_len,
                               cfg.windowing, cfg.stride, cfg.limit, bos=policy)
        local = Path(cfg.data_path("dataset"))
        entry: dict[str, Any] = {"dataset": cfg.dataset, "split": cfg.split, "config": cfg.dataset_config}
        if local.is_file():
            entry["sha256"] = art.sha256_file(local)
        inputs = [entry]
    size = dims(config)
    validate_windows(windows, vocab_size=size.d_vocab, n_ctx=size.n_ctx)
    log.info("%d windows from %d documents (%d shorter than a window, skipped); BOS policy %s",
             len(windows.windows), windows.n_documents, windows.n_short_skipped, policy.to_dict())
    if not cfg.input_dir:
        _warn_window_pitfalls(cfg, windows)
    cases = [_secret_case(d, tokenizer, policy) for d in secrets]
    check_vocab(cases, vocab_size=size.d_vocab, n_ctx=size.n_ctx)
    if cases:
        log.info("%d documents hold a secret: exposure from up to %d candidates each", len(cases),
                 cfg.exposure_candidates)
    return windows, inputs, cases


def _keeping_secrets(documents: Iterator[Document], secrets: list[Document]) -> Iterator[Document]:
    """`documents` unchanged; those with a secret are also appended to `secrets` as they pass."""
    for document in documents:
        if document.secret is not None:
            secrets.append(document)
        yield document


def _secret_case(document: Document, tokenizer: PreTrainedTokenizerBase, policy: BosPolicy) -> SecretCase:
    """The secret's start indexes the document's tokens: its token column, or its text encoded."""
    if document.tokens is not None:
        return secret_case(document, document.tokens, policy.bos_id)
    try:
        return secret_case(document, encode(tokenizer, document.text or ""), policy.bos_id)
    except InputError as e:   # e.g. a row whose secret indexes its token column, not its re-encoded text
        raise InputError(f"{e} (its text as the model's tokenizer encodes it; --token-column names a token "
                         "column to index instead)") from None


def _warn_window_pitfalls(cfg: ScoreConfig, windows: WindowSet) -> None:
    """Overlapping sliding windows and skipped short documents are legal but easy to get by accident:
    without --config the window is 50 + 50 tokens, the testbed's 32 + 32."""
    length = cfg.prefix_len + cfg.suffix_len
    size = f"{length} tokens (--prefix-len {cfg.prefix_len} + --suffix-len {cfg.suffix_len})"
    if cfg.windowing == "sliding" and cfg.stride is not None and cfg.stride < length:
        log.warning("--stride %d is shorter than a window of %s: consecutive windows share %d tokens, so "
                    "text is scored more than once; pass --stride %d (the default) for disjoint windows",
                    cfg.stride, size, length - cfg.stride, length)
    if windows.n_short_skipped:
        log.warning("%d of %d documents are shorter than a window of %s and were skipped; lower "
                    "--prefix-len/--suffix-len to score them", windows.n_short_skipped, windows.n_documents, size)


def _check_embedding_rows(windows: WindowSet, loaded: LoadedModel, config: PretrainedConfig,
                          secrets: list[SecretCase]) -> None:
    """The windows were checked against config.vocab_size; re-check when the embedding has other rows."""
    rows = embedding_rows(loaded.model)
    if rows != dims(config).d_vocab:
        validate_windows(windows, vocab_size=rows, n_ctx=dims(config).n_ctx)
        check_vocab(secrets, vocab_size=rows, n_ctx=dims(config).n_ctx)


# -- shards ----------------------------------------------------------------------------------

def shard_done(shard_dir: Path, fingerprint: str, num_shards: int) -> bool:
    """True when `shard_dir` holds a finished, intact shard of this config and shard count."""
    done = read_marker(shard_dir / DONE_MARKER)
    return (done is not None and done["fingerprint"] == fingerprint and done["num_shards"] == num_shards
            and shard_damage(shard_dir / art.SCORES_JSONL, done) is None)


def _finished_shards(shards_dir: Path) -> list[dict[str, Any]]:
    """The done records of every shard of one config, in shard order; an incomplete set is an InputError."""
    done = [d for p in sorted(shards_dir.glob(f"*/{DONE_MARKER}")) if (d := read_marker(p)) is not None]
    if not done:
        raise InputError(f"no finished shards in {shards_dir}: run the shard jobs first, then --merge")
    num_shards = done[0]["num_shards"]
    if len({d["fingerprint"] for d in done}) != 1 or any(d["num_shards"] != num_shards for d in done):
        raise InputError(f"shards in {shards_dir} come from different configs or shard counts; "
                         "re-run them with one config")
    missing = sorted(set(range(num_shards)) - {d["shard_index"] for d in done})
    if missing:
        raise InputError(f"shards {missing} of {num_shards} have not finished; re-run them, then --merge")
    for d in done:
        if (why := shard_damage(shards_dir / f"{d['shard_index']:05d}" / art.SCORES_JSONL, d)) is not None:
            raise InputError(f"shard {d['shard_index']} is damaged ({why}): re-run it (--shard-index "
                             f"{d['shard_index']}), then --merge")
    return sorted(done, key=lambda d: d["shard_index"])


def _merge_shards(cfg: ScoreConfig) -> dict[str, Any]:
    """Concatenate finished shards in order; every shard of one config must be there."""
    shards_dir = cfg.stage_dir / art.SHARDS_DIR
    if not any(shards_dir.glob(f"*/{DONE_MARKER}")) and (cfg.stage_dir / art.MANIFEST).is_file():
        log.info("%s is already merged; nothing to do", cfg.stage_dir)   # the shards were cleaned up
        return art.read_json(cfg.stage_dir / art.SUMMARY_JSON)
    done = _finished_shards(shards_dir)
    stage = StageRun.for_config(cfg, fingerprint=done[0]["fingerprint"])
    if (summary := stage.open(cfg.force)) is not None:
        return summary
    stage.start(cfg.force)
    data = b"".join((shards_dir / f"{i:05d}" / art.SCORES_JSONL).read_bytes() for i in range(len(done)))
    context = dict(done[0]["context"])
    context["num_shards"] = len(done)   # in the manifest only: the outputs equal a one-job run's
    return _finish(cfg, stage, data, context)


# -- outputs ---------------------------------------------------------------------------------

def _finish(cfg: ScoreConfig, stage: StageRun, data: bytes, context: dict[str, Any]) -> dict[str, Any]:
    """Write scores.jsonl, summary.json and the histogram, then the manifest, then drop chunks."""
    rows = [json.loads(line) for line in data.splitlines()]
    if len(rows) != context["windows"]["n_windows"]:   # the chunks are checked; this would be a bug
        raise RuntimeError(f"{len(rows)} scored rows for {context['windows']['n_windows']} windows in {cfg.stage_dir}")
    art.atomic_write_bytes(cfg.stage_dir / art.SCORES_JSONL, data)
    outputs: dict[str, int | None] = {art.SCORES_JSONL: len(rows)}
    if cfg.parquet:
        art.atomic_write_bytes(cfg.stage_dir / SCORES_PARQUET, parquet_bytes(rows))
        outputs[SCORES_PARQUET] = len(rows)
    summary = summarize(rows)
    summary.update(prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len, windows=context["windows"])
    source = figure_source(cfg.model, cfg.output_dir, cfg.revision)
    score_histogram(rows, summary, cfg.stage_dir / art.HISTOGRAM_PNG, source=source)
    if exposures := context.get("exposure"):
        outputs[EXPOSURE_JSONL] = art.write_jsonl(cfg.stage_dir / EXPOSURE_JSONL, exposures)
        summary["exposure"] = summarize_exposure(exposures, cfg.exposure_candidates, cfg.seed)
        exposure_figure(exposures, summary["exposure"], cfg.stage_dir / EXPOSURE_PNG, source=source)
        outputs[EXPOSURE_PNG] = None
    else:   # a --force run without secrets: no exposure files of an earlier config stay behind
        for name in (EXPOSURE_JSONL, EXPOSURE_PNG):
            (cfg.stage_dir / name).unlink(missing_ok=True)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    computed = TEACHER_FORCED_METRICS + tuple(m for m in cfg.metrics if m in GENERATION_METRICS)
    stage.inputs = context["inputs"]
    stage.finish({**outputs, art.SUMMARY_JSON: None, art.HISTOGRAM_PNG: None},
                 model=context["model"], seed=cfg.seed, windows=context["windows"],
                 num_shards=context.get("num_shards", 1),
                 metric={"version": METRIC_VERSION, "decoding": "greedy",
                         "levenshtein_threshold": cfg.levenshtein_threshold,
                         "definitions": {m: METRIC_DEFINITIONS[m] for m in computed}})   # drops chunks, shards
    show(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The per-group table the stage prints last (and the exposure table, when secrets were scored)."""
    cols = [c for c in ("exact", "lcp", "tf_accuracy", "token_match", "loose_match")
            if c in summary["metrics"]]
    groups = summary["groups"]
    if list(groups) == ["all"]:   # no group column: summarize's one group is the 'all' row below
        groups = {}
    width = max([10, *map(len, groups)])
    lines = [f"{'group':<{width}} {'n':>6} " + " ".join(f"{c:>12}" for c in cols)]
    for group, stats in groups.items():
        lines.append(f"{group:<{width}} {stats['n']:>6} " + " ".join(f"{stats[c]:>12.3f}" for c in cols))
    lines.append(f"{'all':<{width}} {summary['n_windows']:>6} "
                 + " ".join(f"{summary['metrics'][c]:>12.3f}" for c in cols))
    if block := summary.get("exposure"):
        lines.append(format_exposure(block))
    return "\n".join(lines)


def format_exposure(block: dict[str, Any]) -> str:
    """Exposure per group (bits), from summary.json's `exposure` block."""
    width = max([10, *map(len, block["groups"])])
    stats = ("mean", "median", "min", "max")
    lines = [f"\nexposure (bits; {block['n_candidates']} candidates per secret)",
             f"{'group':<{width}} {'n':>6} " + " ".join(f"{c:>8}" for c in (*stats, "capped"))]
    for group, s in block["groups"].items():
        lines.append(f"{group:<{width}} {s['n']:>6} " + " ".join(f"{s[c]:>8.2f}" for c in stats)
                     + f" {s['n_capped']:>8}")
    return "\n".join(lines)


def headline(summary: dict[str, Any], stage_dir: Path) -> str:
    """The stage's lines in the run report."""
    return (f"memorization ({stage_dir}): per group, the mean over its n windows of exact (exact-match rate), "
            f"lcp (reproduced suffix tokens, of {summary['suffix_len']}), tf_accuracy (teacher-forced token "
            "accuracy), token_match and loose_match (fractions)\n" + format_summary(summary))

