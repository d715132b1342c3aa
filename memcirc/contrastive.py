"""Contrastive pairs for circuit discovery: the divergence finder and the pair builders behind the
contrastive_dataset stage. They read scored windows (`memcirc.data.Window`) and build
`memcirc.pairs.Pair`s.

`divergence` mode (the branch decision): for each memorized window, shorten the context one token
at a time from the end (L = P, P-1, ..., 1) and let the model regenerate the rest; memorization
breaks at the first L where the score of the regenerated text (BLEU-4 or token accuracy) drops
by more than `drop` relative to the previous L *and* the first regenerated token differs from
the truth (memorization_circuits' rule). Pair: clean = context[:L] + true token, corrupt =
context[:L] + model token; answer = next true token, wrong = the model's next token.

memorization_circuits regenerated the whole remainder at every L. Here one teacher-forced pass over the
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

import dataclasses
import hashlib
import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memcirc.data import Window
from memcirc.logs import Meter, progress
from memcirc.pairs import Pair
from memcirc.scoring import bleu4, greedy_generate, pad_batch

# -- scores that drive detection -------------------------------------------------------------

def token_accuracy(generated: Sequence[int], reference: Sequence[int]) -> float:
    return float(np.mean(np.asarray(generated) == np.asarray(reference)))


SCORERS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "bleu": bleu4, "memorization": token_accuracy}


@dataclass
class Divergence:
    """Where memorization of one window breaks. `position` is the context length L."""

    window: Window
    position: int
    score_before: float
    score_after: float
    generated: list[int]            # greedy continuation from context length `position`
    resolved: bool


# -- the fast divergence finder --------------------------------------------------------------

@torch.inference_mode()
def argmax_path(model: torch.nn.Module, sequences: Sequence[Sequence[int] | np.ndarray],
                batch_size: int, desc: str = "teacher-forced pass") -> list[np.ndarray]:
    """pred[t] = greedy next token after sequence[:t+1], for every t (one teacher-forced pass)."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    with Meter(desc, total=len(sequences), unit="windows") as meter:
        for b in range(0, len(sequences), batch_size):
            batch = sequences[b:b + batch_size]
            ids, mask = pad_batch(batch, 0, "right")  # right padding: real tokens never attend to pads
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            pred = logits.argmax(-1).cpu().numpy()
            out.extend(pred[i, :len(s)] for i, s in enumerate(batch))
            meter.update(len(batch))
    return out


@dataclass
class _BreakSearch:
    """The search for where one window's memorization breaks: the state of its descending-L loop."""

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


def find_divergences(model: torch.nn.Module, windows: Sequence[Window], *, metric: str = "bleu",
                     drop: float = 0.3, batch_size: int = 32, pad_id: int = 0) -> list[Divergence]:
    """memorization_circuits' divergence rule, computed with one teacher-forced pass per window and
    greedy generation only at candidate lengths (see the module docstring)."""
    score = SCORERS[metric]
    preds = argmax_path(model, [w.tokens for w in windows], batch_size, "divergence: teacher-forced pass")
    searches = [_BreakSearch(w.tokens, pred, w.prefix_len, L=w.prefix_len) for w, pred in zip(windows, preds)]
    for round_ in itertools.count(1):
        requests = _advance(searches, score, drop, windows)
        if not requests:
            break
        # Each round generates one continuation per unresolved window (most of the work is round 1);
        # how many rounds follow is not known in advance, so each round has its own meter.
        resolved = sum(s.result is not None for s in searches)
        desc = f"divergence round {round_} ({resolved}/{len(searches)} windows resolved)"
        with Meter(desc, total=len(requests), unit="continuations") as meter:
            _generate_candidates(model, requests, batch_size, pad_id, meter.update)
    return [_finished(s) for s in searches]


def _finished(search: _BreakSearch) -> Divergence:
    """The result of a search `_advance` has run to the end (it stops only when every search has one)."""
    assert search.result is not None, "no more candidate requests: every search has its result"
    return search.result


def _advance(searches: list[_BreakSearch], score: Callable, drop: float,
             windows: Sequence[Window]) -> list[tuple[_BreakSearch, int]]:
    """Run each unresolved window's loop until it needs a continuation nobody has generated yet."""
    requests = []
    for search, window in zip(searches, windows):
        while search.result is None:
            if search.L < 1:  # never broke: memorization_circuits records L = P with scores 1.0
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


def _generate_candidates(model: torch.nn.Module, requests: list[tuple[_BreakSearch, int]], batch_size: int,
                         pad_id: int, advance: Callable[[int], None]) -> None:
    """Continuations at candidate lengths j: the (known) greedy token after whole[:j], then greedy.
    `advance(n)` after each batch of n."""
    requests.sort(key=lambda r: r[1])
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        prompts = [np.append(s.whole[:j], s.pred[j - 1]) for s, j in batch]
        n_new = max(len(s.whole) - j - 1 for s, j in batch)
        generated = greedy_generate(model, prompts, n_new, pad_id) if n_new > 0 else None
        for i, (s, j) in enumerate(batch):
            tail = generated[i, :len(s.whole) - j - 1].tolist() if generated is not None else []
            s.memo[j] = [int(s.pred[j - 1])] + tail
        advance(len(batch))


# -- pairs -----------------------------------------------------------------------------------

def divergence_pairs(divergences: Sequence[Divergence]) -> tuple[list[Pair], dict[str, int]]:
    """(clean = context + true token, corrupt = context + model token) -> (next true, next model).
    The pairs have no split yet (`split` is empty)."""
    pairs, skipped = [], {"unresolved": 0, "same_next_token": 0, "too_short": 0}
    for d in divergences:
        if not d.resolved:
            skipped["unresolved"] += 1
            continue
        whole, L, gen = d.window.tokens.tolist(), d.position, d.generated   # lists: + concatenates
        truth = whole[L:]
        if len(truth) < 2:
            skipped["too_short"] += 1
            continue
        if truth[1] == gen[1]:  # nothing to contrast at the last position (memorization_circuits' filter)
            skipped["same_next_token"] += 1
            continue
        pairs.append(_pair(d.window, "divergence", whole[:L] + [truth[0]], whole[:L] + [gen[0]],
                           answer=truth[1], wrong=gen[1], position=L,
                           score_before=round(d.score_before, 6), score_after=round(d.score_after, 6)))
    return pairs, skipped


def _pair(window: Window, mode: str, clean: list[int], corrupt: list[int], *, answer: int, wrong: int,
          **extra: Any) -> Pair:
    assert len(clean) == len(corrupt), "pairs are equal length by construction"
    return Pair(id=f"{window.id}#{mode}", doc=window.doc, split="", clean=tuple(int(t) for t in clean),
                corrupt=tuple(int(t) for t in corrupt), answer=int(answer), wrong=int(wrong), window_id=window.id,
                source=window.source, group=window.group, mode=mode, extra=extra)


def with_splits(pairs: Sequence[Pair], split: dict[str, str]) -> list[Pair]:
    """The pairs, each in its document's split, without duplicates (same tokens, answer and wrong)."""
    seen, out = set(), []
    for p in pairs:
        key = (p.clean, p.corrupt, p.answer, p.wrong)
        if key not in seen:
            seen.add(key)
            out.append(dataclasses.replace(p, split=split[p.doc]))
    return out


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


def dataset_pairs(model: torch.nn.Module, divergences: Sequence[Divergence], non_memorized: Sequence[Window],
                  split_of: Callable[[str], str], similarity: str,
                  batch_size: int) -> tuple[list[Pair], dict[str, int]]:
    """Memorized context[:d] vs a non-memorized context[:d] with the same token at d that the model
    predicts there. Candidates come from a (position, token) index, never a pairwise scan, and
    only from documents of the same split (so no document lands in both splits). The pairs have no
    split yet (`split` is empty)."""
    skipped = {"unresolved": 0, "no_candidate": 0}
    resolved = [d for d in divergences if d.resolved]
    skipped["unresolved"] = len(divergences) - len(resolved)
    positions = sorted({d.position for d in resolved})
    candidate_tokens = [w.tokens.tolist() for w in non_memorized]
    index: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, tokens in enumerate(candidate_tokens):
        for d in positions:
            if d < len(tokens):
                index[(d, tokens[d])].append(i)
    candidate_pred = argmax_path(model, candidate_tokens, batch_size, "candidates: teacher-forced pass") \
        if non_memorized else []
    pairs = []
    for div in progress(resolved, desc="matching", total=len(resolved), unit="windows"):
        d, memorized, tokens = div.position, div.window, div.window.tokens.tolist()
        target = tokens[d]
        candidates = [i for i in index.get((d, target), [])
                      if non_memorized[i].doc != memorized.doc
                      and split_of(non_memorized[i].doc) == split_of(memorized.doc)
                      and candidate_pred[i][d - 1] == target]   # the model predicts the target there
        if not candidates:
            skipped["no_candidate"] += 1
            continue
        sims = _similarities(model, tokens[:d], [candidate_tokens[i][:d] for i in candidates], similarity,
                             batch_size)
        best = candidates[int(np.argmax(sims))]
        pairs.append(_pair(memorized, "dataset", tokens[:d], candidate_tokens[best][:d],
                           answer=div.generated[0], wrong=target, position=d,
                           corrupt_window_id=non_memorized[best].id, corrupt_doc=non_memorized[best].doc,
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
