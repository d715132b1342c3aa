"""The predecessors' methods, kept as independent computations: the baselines the benchmarks time
ours against, and the oracles the tests compare ours with (`from bench.baselines import ...`).
Nothing in memcirc imports this file.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memcirc.contrastive import SCORERS, Divergence
from memcirc.data import Window
from memcirc.scoring import greedy_generate

# -- memorization_circuits' memorization_score.py --------------------------------------------

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


def full_generation_metrics(model: torch.nn.Module, windows: Sequence[Window], pad_id: int, batch_size: int = 32,
                            metrics: Sequence[str] = ("token_match", "bleu4", "levenshtein"),
                            threshold: float = 0.75) -> list[dict[str, Any]]:
    """`full_generation_scores`, then the continuation metrics computed from its generation (the
    predecessor's method for every metric: generate all S tokens, compare with the truth)."""
    from memcirc.scoring import WindowScore, generation_metrics

    rows = full_generation_scores(model, windows, pad_id, batch_size)
    for w, r in zip(windows, rows):
        score = WindowScore(w, r["exact"], r["lcp"], 0.0, 0.0, 0.0, None, r["generated"])
        r.update(generation_metrics(score, metrics, threshold))
    return rows


# -- memorization_circuits' contrastive_dataset.py (divergence mode) ------------------------

def find_divergences_bruteforce(model: torch.nn.Module, windows: Sequence[Window], *,
                                metric: str = "bleu", drop: float = 0.3, batch_size: int = 32,
                                pad_id: int = 0) -> list[Divergence]:
    """The predecessor's implementation: at every L, regenerate the whole remainder greedily for
    every unresolved window (batched per L, as it did). The reference for
    tests/test_contrastive.py and bench_divergence.py."""
    score = SCORERS[metric]
    wholes = [w.tokens for w in windows]
    prev = [1.0] * len(windows)
    results: list[Divergence | None] = [None] * len(windows)
    for L in range(max(w.prefix_len for w in windows), 0, -1):
        todo = [i for i, w in enumerate(windows) if results[i] is None and L <= w.prefix_len]
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
            P = w.prefix_len
            results[i] = Divergence(w, P, 1.0, 1.0, wholes[i][P:].tolist(), False)
    return results  # type: ignore[return-value]


# -- goodfire-ai/memorization_kfac's K-FAC component selection --------------------------------

def select_heap(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> set[tuple[int, int]]:
    """The original selection (KFACTreatmentPairwise.apply_kfac_by_product): a lazy k-way merge over
    λ_i μ_j (both sorted descending) with a max-heap seeded at (0, 0), pushing (i+1, j) and (i, j+1),
    a `seen` set, and the tensors indexed and `.item()`-ed per element, as in the original, until the
    mass reaches ρ (Σλ)(Σμ). Returns the kept (i, j) pairs. The baseline of bench_kfac_select.py;
    tests/test_kfac_select.py checks it keeps the set `memcirc.kfac.edit.select_product` keeps."""
    target = rho * (lam.sum() * mu.sum()).item()
    heap = [(-(lam[0] * mu[0]).item(), 0, 0)]
    seen = {(0, 0)}
    kept: set[tuple[int, int]] = set()
    mass = 0.0
    while heap and mass < target:
        neg, i, j = heapq.heappop(heap)
        kept.add((i, j))
        mass += -neg
        if i + 1 < len(lam) and (i + 1, j) not in seen:
            seen.add((i + 1, j))
            heapq.heappush(heap, (-(lam[i + 1] * mu[j]).item(), i + 1, j))
        if j + 1 < len(mu) and (i, j + 1) not in seen:
            seen.add((i, j + 1))
            heapq.heappush(heap, (-(lam[i] * mu[j + 1]).item(), i, j + 1))
    return kept


# -- memcirc's own sampled K-FAC labels before issue 14 ----------------------------------------

def multinomial_labels(logits: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Row r's labels by torch.multinomial over softmax(logits[r]) with a generator seeded `seeds[r]`:
    one row at a time, V exponential variates per position. The baseline of bench_kfac_labels.py."""
    return torch.stack([torch.multinomial(torch.softmax(logits[r].detach(), -1), 1,
                                          generator=torch.Generator(logits.device).manual_seed(s))
                        for r, s in enumerate(seeds)]).view(len(seeds), -1)
