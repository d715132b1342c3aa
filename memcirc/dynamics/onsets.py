"""Memorization onsets and circuit overlap across checkpoints: pure functions of finished units' numbers.

A window's onset is the first checkpoint from which it stays memorized; a group's onset is the lower
median of its windows' onsets. Two checkpoints' circuits are compared by the Jaccard index of their
edge sets and by a weighted Jaccard of their whole prune-score vectors. The definitions below are
written into the stage's summary.json and manifest as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ILL_CONDITIONED = 0.1  # |M(full) - M(empty)| below this share of the final checkpoint's gap is flagged

ONSET_DEFINITION = (
    "onset = the step of the first checkpoint from which the window is memorized (memorized_by >= "
    "threshold) at that and every later checkpoint; null when it is not memorized at the last checkpoint. "
    "first_step = the first checkpoint at which it is memorized at all; forgotten = memorized at some "
    "checkpoint and not memorized at a later one")
GROUP_ONSET_DEFINITION = (
    "onset_by_group[g] = the lower median of the onsets of ALL windows of group g, a never-memorized window "
    "counting as later than every checkpoint: the first step by which at least half of the group is "
    "memorized for good; null when fewer than half of the group's windows are memorized at the last "
    "checkpoint (a group with none memorized is null)")
JACCARD_DEFINITION = ("|A & B| / |A | B| of the two checkpoints' minimal-circuit edge sets (null when either "
                      "circuit is undefined)")
WEIGHTED_DEFINITION = ("sum_e min(w_e, v_e) / sum_e max(w_e, v_e), w = |prune score| of every edge normalized "
                       "to sum 1 per checkpoint (all edges, not only the circuit's)")
ILL_DEFINITION = (f"ill_conditioned: M(full) - M(empty) <= 0 or |M(full) - M(empty)| < {ILL_CONDITIONED} x "
                  "that of the last checkpoint on the same pairs; faithfulness is a ratio of that gap, so it "
                  "is noise there")


# -- onsets ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Onset:
    onset_step: int | None
    first_step: int | None
    forgotten: bool


def memorization_onsets(steps: Sequence[int], memorized: Any) -> list[Onset]:
    """Per window, from `memorized` bool [n_checkpoints, n_windows] (rows in training order).

    onset: first checkpoint i with memorized[j] for every j >= i (None unless memorized at the last);
    first: first checkpoint memorized at all; forgotten: memorized, then not, at a later checkpoint.
    """
    mem = np.asarray(memorized, dtype=bool)
    if mem.ndim != 2 or mem.shape[0] != len(steps):
        raise ValueError(f"memorized must be [n_checkpoints={len(steps)}, n_windows], got {mem.shape}")
    # stays[i] = memorized at i and at every later checkpoint (a reverse cumulative AND)
    stays = np.flip(np.logical_and.accumulate(np.flip(mem, 0), axis=0), 0)
    onset_idx, first_idx = stays.argmax(axis=0), mem.argmax(axis=0)
    ever, at_end = mem.any(axis=0), mem[-1]
    out = []
    for w in range(mem.shape[1]):
        onset = int(steps[onset_idx[w]]) if at_end[w] else None
        first = int(steps[first_idx[w]]) if ever[w] else None
        forgotten = bool(ever[w] and (not at_end[w] or onset_idx[w] > first_idx[w]))
        out.append(Onset(onset, first, forgotten))
    return out


def group_onset(onsets: Sequence[int | None]) -> int | None:
    """The lower median of onsets, None (never) ranking last; None when fewer than half have one."""
    if not onsets:
        return None
    finite = sorted(o for o in onsets if o is not None)
    position = math.ceil(len(onsets) / 2)   # 1-based rank of the lower median
    return finite[position - 1] if len(finite) >= position else None


def onsets_by_group(onsets: Sequence[Onset], groups: Sequence[str], order: Sequence[str]) -> tuple[dict, dict]:
    """(onset_by_group, detail by group) for windows labelled by `groups`, in group `order`."""
    headline: dict[str, int | None] = {}
    detail: dict[str, dict[str, Any]] = {}
    for g in order:
        members = [o for o, gg in zip(onsets, groups, strict=True) if gg == g]
        finite = [o.onset_step for o in members if o.onset_step is not None]
        firsts = [o.first_step for o in members if o.first_step is not None]
        headline[g] = group_onset([o.onset_step for o in members])
        detail[g] = {"n": len(members), "memorized_at_last": len(finite),
                     "onset_step": headline[g],
                     "median_onset_of_memorized": float(np.median(finite)) if finite else None,
                     "earliest_onset": min(finite) if finite else None,
                     "latest_onset": max(finite) if finite else None,
                     "ever_memorized": len(firsts),
                     "earliest_first_step": min(firsts) if firsts else None,
                     "forgotten": sum(o.forgotten for o in members)}
    return headline, detail


# -- circuit overlap -------------------------------------------------------------------------

def jaccard(a: set[Any] | None, b: set[Any] | None) -> float | None:
    """|a & b| / |a | b|; None when either set is undefined; 1.0 for two empty sets."""
    if a is None or b is None:
        return None
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def weighted_jaccard(w: Any | None, v: Any | None) -> float | None:
    """sum min / sum max of |w| and |v|, each normalized to sum 1; None when either is missing or all zero."""
    if w is None or v is None:
        return None
    a, b = np.abs(np.asarray(w, np.float64)), np.abs(np.asarray(v, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"score vectors differ in shape: {a.shape} vs {b.shape}")
    if a.sum() == 0 or b.sum() == 0:
        return None
    a, b = a / a.sum(), b / b.sum()
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def overlap_matrix(items: Sequence[Any], measure: Callable[[Any, Any], float | None]) -> list[list[float | None]]:
    """measure(items[i], items[j]) for every pair (symmetric; computed once per pair)."""
    n = len(items)
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            out[i][j] = out[j][i] = measure(items[i], items[j])
    return out


# -- faithfulness conditioning ---------------------------------------------------------------

def metric_gap(full: float | None, empty: float | None) -> float | None:
    """M(full) - M(empty), the denominator of faithfulness; None when either is undefined."""
    return None if full is None or empty is None else full - empty


def ill_conditioned(gap: float | None, final_gap: float | None) -> bool | None:
    """Whether a checkpoint's faithfulness is noise (ILL_DEFINITION); None when its gap is undefined."""
    if gap is None:
        return None
    return bool(gap <= 0 or (final_gap is not None and abs(gap) < ILL_CONDITIONED * abs(final_gap)))
