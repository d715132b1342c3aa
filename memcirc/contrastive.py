"""Contrastive pairs for circuit discovery (the contrastive_dataset stage).

`divergence` mode (the branch decision): for each memorized window, shorten the context one token
at a time from the end (L = P, P-1, ..., 1) and let the model regenerate the rest; memorization
breaks at the first L where the score of the regenerated text (BLEU-4 or token accuracy) drops
by more than `drop` relative to the previous L *and* the first regenerated token differs from
the truth (memorization_circuits' rule). Pair: clean = context[:L] + true token, corrupt =
context[:L] + model token; answer = next true token, wrong = the model's next token.

The predecessor regenerated the whole remainder at every L. Here one teacher-forced pass over the
window says, for every L, how far greedy decoding stays on the true text: the argmax at position
j-1 is the greedy token after whole[:j] whenever the text before it is the truth. So from context
length L greedy decoding copies the truth up to the first mismatch j >= L, and from there it is
exactly the continuation from context length j. Generation runs only at such mismatch positions
("candidate lengths"), once each, and only for windows the rule has not resolved yet.

`dataset` mode (the memorization decision): pair each memorized context, cut at its divergence
position d, with a non-memorized context that has the same token at d and whose greedy next
token there is that token; candidates are indexed by (position, token) and ranked by cosine
similarity of mean-pooled last hidden states (or Jaccard token overlap).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.evaluation import check_same_model
from memcirc.logs import progress
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import load
from memcirc.scoring import bleu4, greedy_generate, pad_batch
from memcirc.stages.contrastive_dataset import ContrastiveConfig

log = logging.getLogger(__name__)

STAGE = "contrastive_dataset"
PAIRS_JSONL = "pairs.jsonl"
DIVERGENCE_PNG = "divergence.png"


# -- scores that drive detection -------------------------------------------------------------

def token_accuracy(generated: Sequence[int], reference: Sequence[int]) -> float:
    return float(np.mean(np.asarray(generated) == np.asarray(reference)))


SCORERS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "bleu": bleu4, "memorization": token_accuracy}


@dataclass
class Divergence:
    """Where memorization of one window breaks. `position` is the context length L."""

    window: dict[str, Any]          # the scores.jsonl row
    position: int
    score_before: float
    score_after: float
    generated: list[int]            # greedy continuation from context length `position`
    resolved: bool


# -- the fast divergence finder --------------------------------------------------------------

@torch.inference_mode()
def argmax_path(model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """pred[t] = greedy next token after sequence[:t+1], for every t (one teacher-forced pass)."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for b in range(0, len(sequences), batch_size):
        batch = sequences[b:b + batch_size]
        ids, mask = pad_batch(batch, 0, "right")  # right padding: real tokens never attend to pads
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        pred = logits.argmax(-1).cpu().numpy()
        out.extend(pred[i, :len(s)] for i, s in enumerate(batch))
    return out


@dataclass
class _Search:
    """Per-window state of the descending-L loop."""

    whole: np.ndarray
    pred: np.ndarray
    prefix_len: int
    L: int = 0
    prev: float = 1.0
    memo: dict[int, list[int]] = field(default_factory=dict)   # candidate length -> continuation
    result: Divergence | None = None

    def next_mismatch(self, L: int) -> int | None:
        """First j >= L where the greedy token after whole[:j] is not whole[j]."""
        for j in range(L, len(self.whole)):
            if self.pred[j - 1] != self.whole[j]:
                return j
        return None

    def continuation(self, L: int) -> list[int] | int:
        """Greedy continuation from context length L, or the candidate length still to generate."""
        j = self.next_mismatch(L)
        if j is None:
            return self.whole[L:].tolist()
        if j not in self.memo:
            return j
        return self.whole[L:j].tolist() + self.memo[j]


def find_divergences(model: torch.nn.Module, windows: Sequence[dict[str, Any]], *, metric: str = "bleu",
                     drop: float = 0.3, batch_size: int = 32, pad_id: int = 0) -> list[Divergence]:
    """The predecessor's divergence rule, computed with one teacher-forced pass per window and
    greedy generation only at candidate lengths (see the module docstring)."""
    score = SCORERS[metric]
    wholes = [np.asarray(w["tokens"], dtype=np.int64) for w in windows]
    preds = argmax_path(model, wholes, batch_size)
    searches = [_Search(whole, pred, w["prefix_len"], L=w["prefix_len"])
                for w, whole, pred in zip(windows, wholes, preds)]
    while True:
        requests = _advance(searches, score, drop, windows)
        if not requests:
            break
        _generate_candidates(model, requests, batch_size, pad_id)
    return [s.result for s in searches]


def _advance(searches: list[_Search], score: Callable, drop: float,
             windows: Sequence[dict[str, Any]]) -> list[tuple[_Search, int]]:
    """Run each unresolved window's loop until it needs a continuation nobody has generated yet."""
    requests = []
    for search, window in zip(searches, windows):
        while search.result is None:
            if search.L < 1:  # never broke: the predecessor records L = P with scores 1.0
                P = search.prefix_len
                search.result = Divergence(window, P, 1.0, 1.0, search.whole[P:].tolist(), False)
                break
            generated = search.continuation(search.L)
            if isinstance(generated, int):
                requests.append((search, generated))
                break
            current = score(generated, search.whole[search.L:].tolist())
            relative = (search.prev - current) / search.prev if search.prev > 0 else 0.0
            if relative > drop and generated[0] != search.whole[search.L]:
                search.result = Divergence(window, search.L, search.prev, current, generated, True)
            else:
                search.prev = current
                search.L -= 1
    return requests


def _generate_candidates(model: torch.nn.Module, requests: list[tuple[_Search, int]], batch_size: int,
                         pad_id: int) -> None:
    """Continuations at candidate lengths j: the (known) greedy token after whole[:j], then greedy."""
    requests.sort(key=lambda r: r[1])
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        prompts = [np.append(s.whole[:j], s.pred[j - 1]) for s, j in batch]
        n_new = max(len(s.whole) - j - 1 for s, j in batch)
        generated = greedy_generate(model, prompts, n_new, pad_id) if n_new > 0 else None
        for i, (s, j) in enumerate(batch):
            tail = generated[i, :len(s.whole) - j - 1].tolist() if generated is not None else []
            s.memo[j] = [int(s.pred[j - 1])] + tail


def find_divergences_bruteforce(model: torch.nn.Module, windows: Sequence[dict[str, Any]], *,
                                metric: str = "bleu", drop: float = 0.3, batch_size: int = 32,
                                pad_id: int = 0) -> list[Divergence]:
    """The predecessor's implementation: at every L, regenerate the whole remainder greedily for
    every unresolved window (batched per L, as it did). The reference for tests and bench/."""
    score = SCORERS[metric]
    wholes = [np.asarray(w["tokens"], dtype=np.int64) for w in windows]
    prev = [1.0] * len(windows)
    results: list[Divergence | None] = [None] * len(windows)
    for L in range(max(w["prefix_len"] for w in windows), 0, -1):
        todo = [i for i, w in enumerate(windows) if results[i] is None and L <= w["prefix_len"]]
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            n_new = max(len(wholes[i]) - L for i in idx)
            generated = greedy_generate(model, [wholes[i][:L] for i in idx], n_new, pad_id)
            for row, i in enumerate(idx):
                gen = generated[row, :len(wholes[i]) - L].tolist()
                current = score(gen, wholes[i][L:].tolist())
                relative = (prev[i] - current) / prev[i] if prev[i] > 0 else 0.0
                if relative > drop and gen[0] != wholes[i][L]:
                    results[i] = Divergence(windows[i], L, prev[i], current, gen, True)
                else:
                    prev[i] = current
    for i, w in enumerate(windows):
        if results[i] is None:
            P = w["prefix_len"]
            results[i] = Divergence(w, P, 1.0, 1.0, wholes[i][P:].tolist(), False)
    return results  # type: ignore[return-value]


# -- pairs -----------------------------------------------------------------------------------

def divergence_pairs(divergences: Sequence[Divergence]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(clean = context + true token, corrupt = context + model token) -> (next true, next model)."""
    pairs, skipped = [], {"unresolved": 0, "same_next_token": 0, "too_short": 0}
    for d in divergences:
        if not d.resolved:
            skipped["unresolved"] += 1
            continue
        whole, L, gen = d.window["tokens"], d.position, d.generated
        truth = whole[L:]
        if len(truth) < 2:
            skipped["too_short"] += 1
            continue
        if truth[1] == gen[1]:  # nothing to contrast at the last position (predecessor's filter)
            skipped["same_next_token"] += 1
            continue
        pairs.append(_pair(d.window, "divergence", whole[:L] + [truth[0]], whole[:L] + [gen[0]],
                           answer=truth[1], wrong=gen[1], position=L,
                           score_before=round(d.score_before, 6), score_after=round(d.score_after, 6)))
    return pairs, skipped


def _pair(window: dict[str, Any], mode: str, clean: list[int], corrupt: list[int], *, answer: int, wrong: int,
          **extra: Any) -> dict[str, Any]:
    assert len(clean) == len(corrupt), "pairs are equal length by construction"
    return {"id": f"{window['id']}#{mode}", "window_id": window["id"], "source": window["source"],
            "doc": window["doc"], "group": window.get("group"), "mode": mode, "clean": clean,
            "corrupt": corrupt, "answer": int(answer), "wrong": int(wrong), **extra}


@torch.inference_mode()
def pooled_states(model: torch.nn.Module, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                  batch_size: int) -> torch.Tensor:
    """Mean of the last hidden state over sequence[:length] for each (sequence, length)."""
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(sequences), batch_size):
        batch = [list(s[:n]) for s, n in zip(sequences[b:b + batch_size], lengths[b:b + batch_size])]
        ids, mask = pad_batch(batch, 0, "right")
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       output_hidden_states=True).hidden_states[-1].float()
        m = mask.to(device)[..., None].float()
        out.append(((hidden * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def dataset_pairs(model: torch.nn.Module, divergences: Sequence[Divergence], low: Sequence[dict[str, Any]],
                  split_of: Callable[[str], str], similarity: str, batch_size: int) -> tuple[list[dict], dict]:
    """Memorized context[:d] vs a non-memorized context[:d] with the same token at d that the model
    predicts there. Candidates come from a (position, token) index, never a pairwise scan, and
    only from documents of the same split (so no document lands in both splits)."""
    skipped = {"unresolved": 0, "no_candidate": 0}
    resolved = [d for d in divergences if d.resolved]
    skipped["unresolved"] = len(divergences) - len(resolved)
    positions = sorted({d.position for d in resolved})
    index: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, w in enumerate(low):
        for d in positions:
            if d < len(w["tokens"]):
                index[(d, w["tokens"][d])].append(i)
    low_pred = argmax_path(model, [w["tokens"] for w in low], batch_size) if low else []
    pairs = []
    for div in progress(resolved, desc="matching", total=len(resolved)):
        d, high = div.position, div.window
        target = high["tokens"][d]
        candidates = [i for i in index.get((d, target), [])
                      if low[i]["doc"] != high["doc"] and split_of(low[i]["doc"]) == split_of(high["doc"])
                      and low_pred[i][d - 1] == target]   # the model predicts the target there
        if not candidates:
            skipped["no_candidate"] += 1
            continue
        sims = _similarities(model, high["tokens"][:d], [low[i]["tokens"][:d] for i in candidates], similarity,
                             batch_size)
        best = candidates[int(np.argmax(sims))]
        pairs.append(_pair(high, "dataset", high["tokens"][:d], low[best]["tokens"][:d],
                           answer=div.generated[0], wrong=target, position=d,
                           corrupt_window_id=low[best]["id"], corrupt_doc=low[best]["doc"],
                           similarity=round(float(np.max(sims)), 6)))
    return pairs, skipped


def _similarities(model: torch.nn.Module, query: list[int], candidates: list[list[int]], similarity: str,
                  batch_size: int) -> np.ndarray:
    if similarity == "token_overlap":
        q = set(query)
        return np.array([len(q & set(c)) / max(len(q | set(c)), 1) for c in candidates])
    states = pooled_states(model, [query] + candidates, [len(query)] * (len(candidates) + 1), batch_size)
    return torch.nn.functional.cosine_similarity(states[:1], states[1:]).numpy()


def split_by_document(docs: Sequence[str], heldout_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic split by a seeded hash of the document id; both splits non-empty when >= 2 docs."""
    unique = sorted(set(docs), key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n_heldout = round(heldout_fraction * len(unique))
    if len(unique) >= 2:
        n_heldout = min(max(n_heldout, 1), len(unique) - 1)
    return {d: ("heldout" if i < n_heldout else "discovery") for i, d in enumerate(unique)}


# -- the stage -------------------------------------------------------------------------------

def run(cfg: ContrastiveConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    upstream_dir = cfg.upstream_dir
    upstream = read_manifest(upstream_dir, what="memorization")
    rows = list(art.read_jsonl(upstream_dir / art.SCORES_JSONL))
    memorized, low = _select(rows, cfg)
    loaded = load(cfg.model_spec())
    check_same_model(upstream.get("model", {}), loaded)
    inputs = [{"path": str(upstream_dir), "run_id": upstream["run_id"]}]
    stage = StageRun.for_config(cfg, inputs)
    if (done := stage.open(cfg.force)) is not None:
        return done
    pad = loaded.tokenizer.pad_token_id
    log.info("%d memorized windows (%s >= %s) of %d; finding where memorization breaks", len(memorized),
             cfg.memorized_by, cfg.threshold, len(rows))
    divergences = find_divergences(loaded.model, memorized, metric=cfg.metric, drop=cfg.drop,
                                   batch_size=cfg.batch_size, pad_id=pad)
    if cfg.contrastive_mode == "divergence":
        pairs, skipped = divergence_pairs(divergences)
        # Split the documents that have pairs, so the held-out fraction is a fraction of pairs.
        split = split_by_document([p["doc"] for p in pairs], cfg.heldout_fraction, cfg.seed)
    else:
        # A dataset pair holds two documents; candidates come from the high document's split.
        split = split_by_document([r["doc"] for r in rows], cfg.heldout_fraction, cfg.seed)
        pairs, skipped = dataset_pairs(loaded.model, divergences, low, split.__getitem__, cfg.similarity,
                                       cfg.batch_size)
    pairs = _dedup([{**p, "split": split[p["doc"]]} for p in pairs])
    summary = _summary(cfg, rows, memorized, divergences, pairs, skipped)
    if not pairs:  # checked before the stage folder exists: nothing partial is left behind
        raise InputError(f"no contrastive pairs from {len(memorized)} memorized windows ({skipped}); "
                         "score more data or lower --threshold")
    stage.start(cfg.force)
    n = art.write_jsonl(cfg.stage_dir / PAIRS_JSONL, pairs)
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    _plot(divergences, cfg.stage_dir / DIVERGENCE_PNG)
    stage.finish({PAIRS_JSONL: n, art.SUMMARY_JSON: None, DIVERGENCE_PNG: None}, model=loaded.identity(),
                 seed=cfg.seed, tokenizer={"name_or_path": loaded.tokenizer.name_or_path,
                                           "vocab_size": len(loaded.tokenizer)})
    print(f"contrastive ({cfg.contrastive_mode}): {n} pairs ({summary['n_discovery']} discovery, "
          f"{summary['n_heldout']} held-out) from {len(memorized)} memorized windows")
    return summary


def _select(rows: list[dict[str, Any]], cfg: ContrastiveConfig) -> tuple[list[dict], list[dict]]:
    """(memorized windows, non-memorized candidates for dataset mode)."""
    if rows and cfg.memorized_by not in rows[0]:
        raise InputError(f"scores.jsonl has no '{cfg.memorized_by}' column; re-run memorization_score "
                         f"with --metrics ... {cfg.memorized_by}, or use --memorized-by exact")
    memorized = [r for r in rows if float(r[cfg.memorized_by]) >= cfg.threshold]
    if cfg.limit:
        memorized = memorized[:cfg.limit]
    if not memorized:
        raise InputError(f"no memorized windows: none of the {len(rows)} scored windows has "
                         f"{cfg.memorized_by} >= {cfg.threshold}; lower --threshold or score more data")
    low = [r for r in rows if not r["exact"] and r["lcp"] <= cfg.low_max_lcp]
    return memorized, low


def _dedup(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in pairs:
        key = (tuple(p["clean"]), tuple(p["corrupt"]), p["answer"], p["wrong"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _summary(cfg: ContrastiveConfig, rows: list[dict], memorized: list[dict], divergences: list[Divergence],
             pairs: list[dict], skipped: dict[str, int]) -> dict[str, Any]:
    resolved = [d for d in divergences if d.resolved]
    return {
        "mode": cfg.contrastive_mode, "n_windows": len(rows), "n_memorized": len(memorized),
        "n_resolved": len(resolved), "n_pairs": len(pairs),
        "n_discovery": sum(p["split"] == "discovery" for p in pairs),
        "n_heldout": sum(p["split"] == "heldout" for p in pairs),
        "skipped": skipped,
        "divergence_position": ({"mean": float(np.mean([d.position for d in resolved])),
                                 "min": min(d.position for d in resolved),
                                 "max": max(d.position for d in resolved)} if resolved else None),
    }


def _plot(divergences: Sequence[Divergence], path: Path) -> None:
    from memcirc.plots import divergence_figure

    divergence_figure([(d.position, d.window["prefix_len"], d.score_before, d.score_after, d.resolved,
                        d.window.get("group") or "all") for d in divergences], path)
