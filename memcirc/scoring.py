"""Memorization metrics (docs/memorization_score.md): the library behind memorization_score and the before/after
measurements of the intervention stages.

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

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from memcirc.continuation import CachedContinuation
from memcirc.data import TEXT_COLUMNS, Window
from memcirc.forward import causal_lm_logits
from memcirc.groups import group_order
from memcirc.suffix_metrics import position_metrics

if TYPE_CHECKING:
    from transformers import GenerationMixin

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
                   "(memorization_circuits' 'memorization score')",
    "bleu4": "BLEU-4 on token ids of the greedy continuation against the true suffix, add-one "
             "smoothing on every order (Lin & Och 2004; Google NMT compute_bleu(smooth=True))",
    "levenshtein": "token edit distance between greedy continuation and true suffix / suffix length; "
                   "loose_match = (1 - levenshtein >= threshold)",
}


# -- text-similarity metrics on token ids ----------------------------------------------------

def _ngrams(tokens: Sequence[int], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypothesis: Sequence[int], reference: Sequence[int], smooth: bool = True) -> float:
    """Sentence BLEU-4 with one reference, as Google NMT's `compute_bleu` (as memorization_circuits computes it)."""
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


def pad_batch(sequences: Sequence[Sequence[int] | np.ndarray], pad_id: int,
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


@torch.inference_mode()
def teacher_forced(model: torch.nn.Module, windows: Sequence[Window], pad_id: int,
                   padding_side: str = "right") -> list[WindowScore]:
    """Score a batch of windows (any mix of lengths) with one forward pass."""
    return _teacher_forced(model, windows, pad_id, padding_side, None)[0]


def _teacher_forced(model: torch.nn.Module, windows: Sequence[Window], pad_id: int, padding_side: str,
                    continuation: CachedContinuation | None) -> tuple[list[WindowScore], bool]:
    """`teacher_forced`; with `continuation`, the pass also keeps its KV cache and hands the non-exact
    rows to it (their true-token slots), so their greedy continuation needs no re-encoding. Returns the
    scores and whether it did (not where the cache was cropped: sliding-window cache layers)."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([w.tokens for w in windows], pad_id, padding_side)
    width = ids.shape[1]
    # Position ids from the mask, so left padding does not shift positions.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # First position whose logits predict a suffix token, per row, in padded coordinates.
    starts = [(0 if padding_side == "right" else width - len(w.tokens)) + w.prefix_len - 1 for w in windows]
    keep_from = min(starts)   # skip the unembedding of prefix positions
    logits, cache = causal_lm_logits(model, ids.to(device), mask.to(device), positions.to(device), keep_from,
                                     use_cache=continuation is not None)
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
    scores = _scores(windows, suffix_logits.float(), truth.to(device), valid.to(device))
    if continuation is None or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return scores, False
    _hand_over(continuation, cache, scores, width, padding_side)
    return scores, True


def _hand_over(continuation: CachedContinuation, cache: Any, scores: Sequence[WindowScore], width: int,
               padding_side: str) -> None:
    """Give the non-exact rows to `continuation`: slots of the P + lcp true tokens, the divergent token."""
    rows = [i for i, s in enumerate(scores) if not s.exact]
    wins = [scores[i].window for i in rows]
    continuation.add(cache, rows,
                     offsets=[0 if padding_side == "right" else width - len(w.tokens) for w in wins],
                     lengths=[w.prefix_len + scores[i].lcp for i, w in zip(rows, wins)],
                     first=[_divergent_token(scores[i]) for i in rows],
                     n_new=[w.suffix_len - scores[i].lcp - 1 for i, w in zip(rows, wins)],
                     owners=[scores[i] for i in rows])


def _scores(windows: Sequence[Window], logits: torch.Tensor, truth: torch.Tensor,
            valid: torch.Tensor) -> list[WindowScore]:
    """Metrics of a batch from its suffix logits (batch, S, vocab); `valid` masks short suffixes."""
    # One fused chunked pass (memcirc.suffix_metrics): no (B, S, V) temporaries next to the logits.
    predicted, token_nll, token_entropy = position_metrics(logits, truth)
    match = (predicted == truth) | ~valid
    # lcp = index of the first mismatch (S if none): the length of the leading run of matches.
    lcp = match.long().cumprod(dim=-1).sum(-1)
    n = valid.sum(-1)
    hits = ((predicted == truth) & valid).sum(-1) / n
    nll = (token_nll * valid).sum(-1) / n
    entropy = (token_entropy * valid).sum(-1) / n
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


_LEFT_PADDED_PROMPTS = _LeftPaddedPrompts()


@torch.inference_mode()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[np.ndarray], n_new: int, pad_id: int) -> np.ndarray:
    """Greedy continuation of `n_new` tokens for a batch of prompts (left-padded, mask passed).

    No EOS stopping: a memorized suffix may contain EOS, and stopping (or forbidding EOS with
    min_new_tokens, as memorization_circuits did) would make the continuation differ from greedy decoding.
    """
    logging.getLogger("transformers.generation.utils").addFilter(_LEFT_PADDED_PROMPTS)  # no-op if there
    device = next(model.parameters()).device
    ids, mask = pad_batch(prompts, pad_id, "left")
    # An HF causal LM; torch types a Module's attributes as Tensor | Module. Without
    # return_dict_in_generate, generate() returns the token ids tensor.
    generate = cast("GenerationMixin", model).generate
    out = cast(torch.Tensor, generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=None,
                                      pad_token_id=pad_id, temperature=None, top_p=None, top_k=None))
    return out[:, ids.shape[1]:].cpu().numpy()


def continue_from_divergence(model: torch.nn.Module, scores: Sequence[WindowScore], pad_id: int,
                             batch_size: int, advance: Callable[[int], None] | None = None) -> None:
    """Fill `generated` for every non-exact score: truth up to lcp, the argmax there, then greedy.
    `advance(n)` is told after each generation batch of n windows."""
    todo = [s for s in scores if not s.exact]
    for s in scores:
        if s.exact:
            s.generated = s.window.tokens[s.window.prefix_len:].tolist()
    # Sorting by prompt length keeps batches nearly pad-free.
    todo.sort(key=lambda s: (s.window.prefix_len + s.lcp, s.window.id))
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        prompts = [np.append(s.window.tokens[:s.window.prefix_len + s.lcp], _divergent_token(s)) for s in batch]
        n_new = max(s.window.suffix_len - s.lcp - 1 for s in batch)
        generated = greedy_generate(model, prompts, n_new, pad_id) if n_new > 0 else None
        for i, s in enumerate(batch):
            head = prompts[i][s.window.prefix_len:].tolist()
            tail = generated[i, :s.window.suffix_len - len(head)].tolist() if generated is not None else []
            s.generated = head + tail
        if advance is not None:
            advance(len(batch))


def _divergent_token(score: WindowScore) -> int:
    """The greedy token at the first divergence; set for every non-exact score."""
    assert score.first_divergent_token is not None, "a non-exact score has a first divergent token"
    return score.first_divergent_token


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

@torch.inference_mode()   # the teacher-forced passes and the decode: no autograd
def score_windows(model: torch.nn.Module, windows: Sequence[Window], *, pad_id: int, batch_size: int = 32,
                  metrics: Sequence[str] = TEACHER_FORCED_METRICS, padding_side: str = "right",
                  levenshtein_threshold: float = 0.75, generation_batch_size: int | None = None,
                  advance: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Rows of `scores.jsonl` for `windows`, in order. Deterministic for a given batch layout.

    With continuation metrics, the non-exact windows are decoded from the teacher-forced pass's KV
    cache (memcirc.continuation), `generation_batch_size` rows at a time (default 4 * batch_size:
    larger decode batches amortize the per-step cost; memory is that many rows of cache).

    `advance(n)` (progress) is told after every batch how many more windows are fully scored: all of
    a teacher-forced batch without continuation metrics; with them, its exact windows there (they need
    no generation) and the rest after their generation batch. The counts add up to len(windows).
    """
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    generation_batch = generation_batch_size or 4 * batch_size
    continuation = None
    if wanted:
        def done(decoded: list[tuple[WindowScore, list[int]]]) -> None:
            for score, tail in decoded:   # truth up to lcp, the divergent token, the decoded rest
                w = score.window
                score.generated = w.tokens[w.prefix_len:w.prefix_len + score.lcp].tolist() + [
                    _divergent_token(score)] + tail
            if advance is not None:
                advance(len(decoded))
        continuation = CachedContinuation(model, generation_batch, done)
    # Group by length so the teacher-forced batches carry as little padding as possible.
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].tokens))
    by_index: dict[int, WindowScore] = {}
    re_encode: list[WindowScore] = []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch, handed = _teacher_forced(model, [windows[i] for i in idx], pad_id, padding_side, continuation)
        by_index.update(zip(idx, batch))
        for s in batch:
            if s.exact and wanted:
                s.generated = s.window.tokens[s.window.prefix_len:].tolist()
            elif wanted and not handed:
                re_encode.append(s)   # a cropped (sliding-window) cache: no slots to decode from
        if advance is not None:
            advance(sum(s.exact for s in batch) if wanted else len(batch))
    if continuation is not None:
        continuation.flush()
    if re_encode:
        continue_from_divergence(model, re_encode, pad_id, generation_batch, advance)
    scores = [by_index[i] for i in range(len(windows))]
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


# -- decoded text and Parquet (what a reader sees; no later stage reads them) ----------------

def add_texts(rows: Sequence[dict[str, Any]], tokenizer: Any, continuation: bool) -> None:
    """Add TEXT_COLUMNS to rows of `score_windows`: the prefix and true suffix and, with `continuation`
    (generation metrics were computed), the greedy continuation (the true suffix where exact).

    Decoded with `skip_special_tokens=False` and no clean-up of spaces, so the text shows every token
    the model saw or produced (a BOS in front, an EOS inside a memorized suffix). Each part is decoded
    alone: a character whose bytes straddle the prefix/suffix cut shows as U+FFFD in both.
    """
    parts = [[r["tokens"][:r["prefix_len"]], r["tokens"][r["prefix_len"]:]] for r in rows]
    if continuation:
        for r, p in zip(rows, parts):
            p.append(r.get("generated", p[1]))   # no 'generated': exact, the continuation is the suffix
    flat = tokenizer.batch_decode([t for p in parts for t in p], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
    width = 3 if continuation else 2
    for i, r in enumerate(rows):
        r.update(zip(TEXT_COLUMNS[:width], flat[i * width:(i + 1) * width]))


def parquet_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """scores.jsonl's rows as one Parquet file: a column per key of any row, null where a row lacks it
    ('generated' of exact windows, 'group' without a group column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(k for r in rows for k in r))   # every key, in first-seen order
    table = pa.table({k: [r.get(k) for r in rows] for k in names})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# -- summaries -------------------------------------------------------------------------------

def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = list(TEACHER_FORCED_METRICS) + [m for m in GENERATION_METRICS if rows and m in rows[0]]
    if rows and "loose_match" in rows[0]:
        names.append("loose_match")
    return names


def _means(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    return {m: round(float(np.mean([float(r[m]) for r in rows])), 6) for m in names}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = metric_columns(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("group", "all")), []).append(r)
    return {
        "n_windows": len(rows),
        "metrics": _means(rows, names),
        "groups": {g: {"n": len(groups[g]), **_means(groups[g], names)}
                   for g in group_order(groups)},
    }
