"""Memorization metrics (DESIGN §5) and the memorization_score stage.

For a window with prefix P and true suffix S:

* One teacher-forced forward pass gives `exact`, `lcp`, `tf_accuracy`, `suffix_nll` and
  `suffix_entropy`. Greedy decoding reproduces the suffix up to position j iff the argmax at
  every earlier suffix position is the true token, so exact match and the longest common prefix
  of the greedy continuation are read off the argmax without generating anything.
* `token_match`, `bleu4` and `levenshtein` need the greedy continuation itself. It equals the
  truth up to the first divergence `lcp`, and its token there is the teacher-forced argmax, so
  generation runs only for windows that are not exact, and only from `lcp + 1` on.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from memcirc import artifacts as art
from memcirc.data import Columns, Window, WindowSet, load_documents, make_windows, validate_windows
from memcirc.errors import InputError
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, load
from memcirc.models.arch import n_ctx
from memcirc.plots import score_histogram
from memcirc.sharding import chunk_aligned_bounds, resolve_shards, run_chunked
from memcirc.stages.memorization_score import ScoreConfig
from memcirc.testbed import EVAL_DOCUMENTS, TESTBED_NAME

log = logging.getLogger(__name__)

STAGE = "memorization_score"
SHARD_DONE = "done.json"   # written by a shard job after its scores.jsonl
METRIC_VERSION = 1
TEACHER_FORCED_METRICS = ("exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy")
GENERATION_METRICS = ("token_match", "bleu4", "levenshtein")
METRIC_DEFINITIONS = {
    "exact": "greedy decoding reproduces the whole true suffix (teacher-forced argmax == truth at "
             "every suffix position)",
    "lcp": "number of leading suffix tokens greedy decoding reproduces (k-extractability)",
    "tf_accuracy": "fraction of suffix positions whose teacher-forced argmax is the true token",
    "suffix_nll": "mean negative log-likelihood (nats) of the true suffix tokens",
    "suffix_entropy": "mean entropy (nats) of the next-token distribution at suffix positions",
    "token_match": "fraction of suffix positions where the greedy continuation equals the truth "
                   "(the predecessor's 'memorization score')",
    "bleu4": "BLEU-4 on token ids of the greedy continuation against the true suffix, add-one "
             "smoothing on every order (Lin & Och 2004; Google NMT compute_bleu(smooth=True))",
    "levenshtein": "token edit distance between greedy continuation and true suffix / suffix length; "
                   "loose_match = (1 - levenshtein >= threshold)",
}


# -- text-similarity metrics on token ids ----------------------------------------------------

def _ngrams(tokens: Sequence[int], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypothesis: Sequence[int], reference: Sequence[int], smooth: bool = True) -> float:
    """Sentence BLEU-4 with one reference, as Google NMT's `compute_bleu` (the predecessor's)."""
    log_precision = 0.0
    for n in range(1, 5):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum((hyp & ref).values())
        possible = max(len(hypothesis) - n + 1, 0)
        if smooth:
            precision = (matches + 1.0) / (possible + 1.0)
        else:
            precision = matches / possible if possible else 0.0
        if precision == 0.0:
            return 0.0
        log_precision += math.log(precision) / 4
    ratio = len(hypothesis) / len(reference) if reference else 0.0
    brevity = 1.0 if ratio > 1.0 else (math.exp(1 - 1.0 / ratio) if ratio > 0 else 0.0)
    return math.exp(log_precision) * brevity


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    return Levenshtein.distance(list(a), list(b))


# -- the teacher-forced pass -----------------------------------------------------------------

@dataclass
class WindowScore:
    window: Window
    exact: bool
    lcp: int
    tf_accuracy: float
    suffix_nll: float
    suffix_entropy: float
    first_divergent_token: int | None   # greedy token at position lcp (None when exact)
    generated: list[int] | None = None  # greedy continuation (S tokens), where computed


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of a batch of token sequences padded to one width on `side`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        start = 0 if side == "right" else width - len(seq)
        ids[i, start:start + len(seq)] = torch.as_tensor(seq)
        mask[i, start:start + len(seq)] = 1
    return ids, mask


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


@torch.inference_mode()
def teacher_forced(model: torch.nn.Module, windows: Sequence[Window], pad_id: int,
                   padding_side: str = "right") -> list[WindowScore]:
    """Score a batch of windows (any mix of lengths) with one forward pass."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([w.tokens for w in windows], pad_id, padding_side)
    width = ids.shape[1]
    # Position ids from the mask, so left padding does not shift positions.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # First position whose logits predict a suffix token, per row, in padded coordinates.
    starts = [(0 if padding_side == "right" else width - len(w.tokens)) + w.prefix_len - 1 for w in windows]
    kwargs: dict[str, Any] = {}
    keep_from = 0
    if _accepts(model, "logits_to_keep"):   # skip the unembedding of prefix positions
        keep_from = min(starts)
        kwargs["logits_to_keep"] = width - keep_from
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device), use_cache=False, **kwargs).logits
    lengths = torch.tensor([w.suffix_len for w in windows])
    longest = int(lengths.max())
    truth = torch.zeros((len(windows), longest), dtype=torch.long)
    for i, w in enumerate(windows):
        truth[i, :w.suffix_len] = torch.as_tensor(w.tokens[w.prefix_len:])
    offsets = torch.arange(longest)
    valid = offsets[None, :] < lengths[:, None]
    if len(set(starts)) == 1:  # the usual case, fixed-size windows: a view, no copy
        suffix_logits = logits[:, starts[0] - keep_from: starts[0] - keep_from + longest]
    else:  # gather every row's suffix predictions into one (batch, max suffix, vocab) block
        rows = torch.arange(len(windows))[:, None].expand(-1, longest)
        cols = (torch.tensor(starts)[:, None] - keep_from + offsets[None, :]).clamp(max=logits.shape[1] - 1)
        suffix_logits = logits[rows.to(device), cols.to(device)]
    return _scores(windows, suffix_logits.float(), truth.to(device), valid.to(device))


def _scores(windows: Sequence[Window], logits: torch.Tensor, truth: torch.Tensor,
            valid: torch.Tensor) -> list[WindowScore]:
    """Metrics of a batch from its suffix logits (batch, S, vocab); `valid` masks short suffixes."""
    predicted = logits.argmax(dim=-1)
    match = (predicted == truth) | ~valid
    # lcp = index of the first mismatch (S if none): the length of the leading run of matches.
    lcp = match.long().cumprod(dim=-1).sum(-1)
    n = valid.sum(-1)
    hits = ((predicted == truth) & valid).sum(-1) / n
    # One logsumexp serves both: nll = lse - logit[truth], entropy = lse - E_p[logit].
    lse = torch.logsumexp(logits, dim=-1)
    nll = ((lse - logits.gather(-1, truth[..., None]).squeeze(-1)) * valid).sum(-1) / n
    expected_logit = (torch.exp(logits - lse[..., None]) * logits).sum(-1)
    entropy = ((lse - expected_logit) * valid).sum(-1) / n
    first = predicted.gather(-1, lcp.clamp(max=truth.shape[1] - 1)[:, None]).squeeze(-1)
    lcp, n, hits, nll, entropy, first = (t.cpu().tolist() for t in (lcp, n, hits, nll, entropy, first))
    return [WindowScore(window=w, exact=lcp[i] >= n[i], lcp=min(lcp[i], n[i]), tf_accuracy=hits[i],
                        suffix_nll=nll[i], suffix_entropy=entropy[i],
                        first_divergent_token=None if lcp[i] >= n[i] else first[i])
            for i, w in enumerate(windows)]


# -- greedy continuation from the divergence -------------------------------------------------

class _LeftPaddedPrompts(logging.Filter):
    """generate() warns about right padding when any prompt ends in the pad id. Our prompts are
    left-padded; one legitimately ends in EOS (= pad for GPT-NeoX) when EOS is the greedy token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "right-padding was detected" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_LeftPaddedPrompts())


@torch.inference_mode()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[np.ndarray], n_new: int, pad_id: int) -> np.ndarray:
    """Greedy continuation of `n_new` tokens for a batch of prompts (left-padded, mask passed).

    No EOS stopping: a memorized suffix may contain EOS, and stopping (or forbidding EOS with
    min_new_tokens, as the predecessor did) would make the continuation differ from greedy decoding.
    """
    device = next(model.parameters()).device
    ids, mask = pad_batch(prompts, pad_id, "left")
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_new,
                         do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:].cpu().numpy()


def continue_from_divergence(model: torch.nn.Module, scores: Sequence[WindowScore], pad_id: int,
                             batch_size: int) -> None:
    """Fill `generated` for every non-exact score: truth up to lcp, the argmax there, then greedy."""
    todo = [s for s in scores if not s.exact]
    for s in scores:
        if s.exact:
            s.generated = s.window.tokens[s.window.prefix_len:].tolist()
    # Sorting by prompt length keeps batches nearly pad-free.
    todo.sort(key=lambda s: (s.window.prefix_len + s.lcp, s.window.id))
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        prompts = [np.append(s.window.tokens[:s.window.prefix_len + s.lcp], s.first_divergent_token)
                   for s in batch]
        n_new = max(s.window.suffix_len - s.lcp - 1 for s in batch)
        generated = greedy_generate(model, prompts, n_new, pad_id) if n_new > 0 else None
        for i, s in enumerate(batch):
            head = prompts[i][s.window.prefix_len:].tolist()
            tail = generated[i, :s.window.suffix_len - len(head)].tolist() if generated is not None else []
            s.generated = head + tail


def generation_metrics(score: WindowScore, metrics: Sequence[str], threshold: float) -> dict[str, Any]:
    truth = score.window.tokens[score.window.prefix_len:].tolist()
    generated = score.generated
    assert generated is not None and len(generated) == len(truth)
    out: dict[str, Any] = {}
    if "token_match" in metrics:
        out["token_match"] = float(np.mean(np.asarray(generated) == np.asarray(truth)))
    if "bleu4" in metrics:
        out["bleu4"] = bleu4(generated, truth)
    if "levenshtein" in metrics:
        distance = levenshtein(generated, truth) / len(truth)
        out["levenshtein"] = distance
        out["loose_match"] = bool(1.0 - distance >= threshold)
    return out


# -- scoring a list of windows ---------------------------------------------------------------

def score_windows(model: torch.nn.Module, windows: Sequence[Window], *, pad_id: int, batch_size: int = 32,
                  metrics: Sequence[str] = TEACHER_FORCED_METRICS, padding_side: str = "right",
                  levenshtein_threshold: float = 0.75) -> list[dict[str, Any]]:
    """Rows of `scores.jsonl` for `windows`, in order. Deterministic for a given batch layout."""
    # Group by length so the teacher-forced batches carry as little padding as possible.
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].tokens))
    by_index: dict[int, WindowScore] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        for i, s in zip(idx, teacher_forced(model, [windows[i] for i in idx], pad_id, padding_side)):
            by_index[i] = s
    scores = [by_index[i] for i in range(len(windows))]
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if wanted:
        continue_from_divergence(model, scores, pad_id, batch_size)
    return [_row(s, wanted, levenshtein_threshold) for s in scores]


def _row(score: WindowScore, generation: Sequence[str], threshold: float) -> dict[str, Any]:
    w = score.window
    row: dict[str, Any] = {"id": w.id, **w.provenance(), "prefix_len": w.prefix_len,
                           "suffix_len": w.suffix_len, "tokens": w.tokens.tolist(),
                           "exact": score.exact, "lcp": score.lcp,
                           "tf_accuracy": round(score.tf_accuracy, 6),
                           "suffix_nll": round(score.suffix_nll, 6),
                           "suffix_entropy": round(score.suffix_entropy, 6)}
    if generation:
        for key, value in generation_metrics(score, generation, threshold).items():
            row[key] = round(value, 6) if isinstance(value, float) else value
        if not score.exact:
            row["generated"] = score.generated
    return row


# -- the predecessor's method (an independent computation for tests and bench/) -------------

@torch.inference_mode()
def full_generation_scores(model: torch.nn.Module, windows: Sequence[Window], pad_id: int,
                           batch_size: int = 32) -> list[dict[str, Any]]:
    """Greedy `generate` of the whole suffix for every window, then compare with the truth.

    This is what memorization_circuits' memorization_score.py did (KV cache, exactly S new
    tokens, per-token accuracy), with one fix: it forced length with min_new_tokens, which bans
    EOS and so departs from greedy decoding wherever EOS is the argmax (it is, inside one testbed
    canary). Here nothing stops generation early and nothing is banned. Windows are grouped by
    prefix length, so no prompt is padded. Returns per window: generated, exact, lcp, token_match.
    """
    device = next(model.parameters()).device
    rows: dict[int, dict[str, Any]] = {}
    order = sorted(range(len(windows)), key=lambda i: (windows[i].prefix_len, windows[i].suffix_len))
    for b in range(0, len(order), batch_size):
        for (p, s), group in _by_shape([(i, windows[i]) for i in order[b:b + batch_size]]).items():
            prompts = torch.as_tensor(np.stack([w.tokens[:p] for _, w in group]), device=device)
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=s, eos_token_id=None, do_sample=False, num_beams=1,
                                 pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
            for (i, w), generated in zip(group, out[:, p:].cpu().numpy()):
                match = generated == w.tokens[p:]
                rows[i] = {"generated": generated.tolist(), "exact": bool(match.all()),
                           "lcp": int(match.argmin()) if not match.all() else s,
                           "token_match": float(match.mean())}
    return [rows[i] for i in range(len(windows))]


def _by_shape(items: Sequence[tuple[int, Window]]) -> dict[tuple[int, int], list[tuple[int, Window]]]:
    groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for i, w in items:
        groups.setdefault((w.prefix_len, w.suffix_len), []).append((i, w))
    return groups


# -- summaries -------------------------------------------------------------------------------

def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = list(TEACHER_FORCED_METRICS) + [m for m in GENERATION_METRICS if rows and m in rows[0]]
    if rows and "loose_match" in rows[0]:
        names.append("loose_match")
    return names


def _means(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    return {m: round(float(np.mean([float(r[m]) for r in rows])), 6) for m in names}


def _group_key(group: str) -> tuple[int, float, str]:
    """k=0 < k=1 < ... < k=32 < anything else (e.g. 'corpus'), alphabetically."""
    if group.startswith("k=") and group[2:].isdigit():
        return (0, int(group[2:]), group)
    return (1, 0.0, group)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = metric_columns(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("group", "all")), []).append(r)
    return {
        "n_windows": len(rows),
        "metrics": _means(rows, names),
        "groups": {g: {"n": len(groups[g]), **_means(groups[g], names)}
                   for g in sorted(groups, key=_group_key)},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The per-group table the stage prints last."""
    cols = [c for c in ("exact", "lcp", "tf_accuracy", "token_match", "loose_match")
            if c in summary["metrics"]]
    lines = [f"{'group':<10} {'n':>6} " + " ".join(f"{c:>12}" for c in cols)]
    for group, stats in summary["groups"].items():
        lines.append(f"{group:<10} {stats['n']:>6} " + " ".join(f"{stats[c]:>12.3f}" for c in cols))
    lines.append(f"{'all':<10} {summary['n_windows']:>6} "
                 + " ".join(f"{summary['metrics'][c]:>12.3f}" for c in cols))
    return "\n".join(lines)


# -- the stage -------------------------------------------------------------------------------

def run(cfg: ScoreConfig) -> dict[str, Any] | None:
    """memorization_score: score every window, write scores.jsonl, summary.json, a histogram.

    Returns the summary (None for a shard job, whose outputs wait for `--merge`).
    """
    torch.manual_seed(cfg.seed)
    if cfg.merge:
        return _merge_shards(cfg)
    num_shards, shard_index = resolve_shards(cfg.num_shards, cfg.shard_index)
    loaded = load(cfg.model_spec())
    windows, inputs = _stage_windows(cfg, loaded)
    identity = loaded.identity()
    stage = StageRun.for_config(cfg, inputs, model=loaded.results_identity())
    fingerprint = stage.fingerprint
    if (summary := stage.open(cfg.force)) is not None:
        print(format_summary(summary))
        return summary
    # only now, after every input check: bad input leaves nothing behind
    shard_dir = cfg.stage_dir / art.SHARDS_DIR / f"{shard_index:05d}"
    # the other shards write next to this one at the same time
    stage.start(cfg.force, task_dir=shard_dir if num_shards > 1 else None)

    def work(batch: Sequence[Window]) -> list[dict[str, Any]]:
        return score_windows(loaded.model, batch, pad_id=loaded.tokenizer.pad_token_id,
                             batch_size=cfg.batch_size, metrics=cfg.metrics, padding_side=cfg.padding_side,
                             levenshtein_threshold=cfg.levenshtein_threshold)

    context = {"inputs": inputs, "model": identity, "windows": windows.summary()}
    if num_shards == 1:
        store = art.ChunkStore(cfg.stage_dir / art.CHUNKS_DIR, fingerprint)
        return _finish(cfg, stage, run_chunked(windows.windows, work, store, cfg.chunk_size, "scoring"), context)
    start, stop = chunk_aligned_bounds(len(windows.windows), cfg.chunk_size, num_shards, shard_index)
    if shard_done(shard_dir, fingerprint, num_shards) and not cfg.force:   # a re-submitted finished shard
        log.info("shard %d/%d is done for this config (%s); nothing to do", shard_index, num_shards, shard_dir)
        return None
    (shard_dir / SHARD_DONE).unlink(missing_ok=True)
    store = art.ChunkStore(shard_dir / art.CHUNKS_DIR, fingerprint)
    data = run_chunked(windows.windows[start:stop], work, store, cfg.chunk_size,
                       f"scoring shard {shard_index}") if stop > start else b""
    art.atomic_write_bytes(shard_dir / art.SCORES_JSONL, data)
    art.write_json(shard_dir / SHARD_DONE, {"fingerprint": fingerprint, "num_shards": num_shards,
                                            "shard_index": shard_index, "rows": data.count(b"\n"),
                                            "context": context})
    art.remove_tree(shard_dir / art.CHUNKS_DIR)
    log.info("shard %d/%d done (%d windows); run with --merge once all shards are done",
             shard_index, num_shards, stop - start)
    return None


def shard_done(shard_dir: Path, fingerprint: str, num_shards: int) -> bool:
    """True when `shard_dir` holds a finished shard of this config and shard count."""
    marker = shard_dir / SHARD_DONE
    if not (marker.is_file() and (shard_dir / art.SCORES_JSONL).is_file()):
        return False
    done = json.loads(marker.read_text())
    return done.get("fingerprint") == fingerprint and done.get("num_shards") == num_shards


def _finish(cfg: ScoreConfig, stage: StageRun, data: bytes, context: dict[str, Any]) -> dict[str, Any]:
    """Write scores.jsonl, summary.json and the histogram, then the manifest, then drop chunks."""
    rows = [json.loads(line) for line in data.splitlines()]
    art.atomic_write_bytes(cfg.stage_dir / art.SCORES_JSONL, data)
    summary = summarize(rows)
    summary.update(prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len, windows=context["windows"])
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    score_histogram(rows, summary, cfg.stage_dir / art.HISTOGRAM_PNG)
    computed = TEACHER_FORCED_METRICS + tuple(m for m in cfg.metrics if m in GENERATION_METRICS)
    stage.inputs = context["inputs"]
    stage.finish({art.SCORES_JSONL: len(rows), art.SUMMARY_JSON: None, art.HISTOGRAM_PNG: None},
                 model=context["model"], seed=cfg.seed, windows=context["windows"],
                 num_shards=context.get("num_shards", 1),
                 metric={"version": METRIC_VERSION, "decoding": "greedy",
                         "levenshtein_threshold": cfg.levenshtein_threshold,
                         "definitions": {m: METRIC_DEFINITIONS[m] for m in computed}})
    art.remove_tree(cfg.stage_dir / art.CHUNKS_DIR)
    art.remove_tree(cfg.stage_dir / art.SHARDS_DIR)
    print(format_summary(summary))
    return summary


def _merge_shards(cfg: ScoreConfig) -> dict[str, Any]:
    """Concatenate finished shards in order; every shard of one config must be there."""
    shards_dir = cfg.stage_dir / art.SHARDS_DIR
    done = [art.read_json(p) for p in sorted(shards_dir.glob(f"*/{SHARD_DONE}"))]
    if not done and (cfg.stage_dir / art.MANIFEST).is_file():  # merged before; shards were cleaned up
        log.info("%s is already merged; nothing to do", cfg.stage_dir)
        return art.read_json(cfg.stage_dir / art.SUMMARY_JSON)
    if not done:
        raise InputError(f"no finished shards in {shards_dir}: run the shard jobs first, then --merge")
    num_shards = done[0]["num_shards"]
    if len({d["fingerprint"] for d in done}) != 1 or any(d["num_shards"] != num_shards for d in done):
        raise InputError(f"shards in {shards_dir} come from different configs or shard counts; "
                         "re-run them with one config")
    missing = sorted(set(range(num_shards)) - {d["shard_index"] for d in done})
    if missing:
        raise InputError(f"shards {missing} of {num_shards} have not finished; re-run them, then --merge")
    stage = StageRun.for_config(cfg, fingerprint=done[0]["fingerprint"])
    if (summary := stage.open(cfg.force)) is not None:
        return summary
    stage.start(cfg.force)
    data = b"".join((shards_dir / f"{i:05d}" / art.SCORES_JSONL).read_bytes() for i in range(num_shards))
    context = dict(done[0]["context"])
    context["num_shards"] = num_shards   # in the manifest only: the outputs equal a one-job run's
    return _finish(cfg, stage, data, context)


def _stage_windows(cfg: ScoreConfig, loaded: LoadedModel) -> tuple[WindowSet, list[dict[str, Any]]]:
    """The windows to score and the input descriptors the fingerprint covers."""
    if cfg.input_dir:  # re-score the windows of an earlier memorization run (e.g. another checkpoint)
        upstream = read_manifest(Path(cfg.input_dir))
        rows = list(art.read_jsonl(Path(cfg.input_dir) / art.SCORES_JSONL))[:cfg.limit]
        windows = WindowSet([_window_from_row(r) for r in rows], source=str(cfg.input_dir))
        inputs = [{"path": str(cfg.input_dir), "run_id": upstream["run_id"]}]
    else:
        columns = Columns(text=cfg.text_column, tokens=cfg.token_column, group=cfg.group_column)
        docs = load_documents(cfg.dataset, columns, split=cfg.split, dataset_config=cfg.dataset_config,
                              streaming=cfg.streaming)
        windows = make_windows(docs, loaded.tokenizer, cfg.dataset, cfg.prefix_len, cfg.suffix_len,
                               cfg.windowing, cfg.stride, cfg.limit)
        local = EVAL_DOCUMENTS if cfg.dataset == TESTBED_NAME else Path(cfg.dataset)
        entry: dict[str, Any] = {"dataset": cfg.dataset, "split": cfg.split, "config": cfg.dataset_config}
        if local.is_file():
            entry["sha256"] = art.sha256_file(local)
        inputs = [entry]
    validate_windows(windows, vocab_size=loaded.model.get_input_embeddings().weight.shape[0],
                     n_ctx=n_ctx(loaded.model))
    log.info("%d windows from %d documents (%d shorter than a window, skipped)", len(windows.windows),
             windows.n_documents, windows.n_short_skipped)
    return windows, inputs


def _window_from_row(row: dict[str, Any]) -> Window:
    return Window(id=row["id"], tokens=np.asarray(row["tokens"], np.int64), prefix_len=row["prefix_len"],
                  source=row["source"], doc=row["doc"], offset=row["offset"], group=row.get("group"))
