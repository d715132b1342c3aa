"""Test-only reference implementations: slow, obviously correct versions the tests compare the
library with. Nothing in memcirc imports this file (tests: `from reference import ...`).
"""

from __future__ import annotations

import math

import torch

# -- memcirc.kfac.edit: component selection ---------------------------------------------------

def select_bruteforce(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Walk every entry in descending order (ties row-major), stop at rho * total: the oracle of
    `select_mask` and `select_product`."""
    flat = importance.reshape(-1).double().tolist()
    if rho >= 1.0:
        return torch.ones_like(importance, dtype=torch.bool)
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    target = rho * math.fsum(flat)
    mask = torch.zeros(len(flat), dtype=torch.bool)
    total = 0.0
    for i in order:
        mask[i] = True
        total += flat[i]
        if total >= target:
            break
    return mask.view(importance.shape)


# -- memcirc.predict.evaluate: the classification metrics (the formulas it used before sklearn) -----

def roc_auc_pairs(y: list[int], score: list[float]) -> float:
    """P(a positive outscores a negative), ties one half, over every (positive, negative) pair."""
    pos = [s for s, t in zip(score, y) if t]
    neg = [s for s, t in zip(score, y) if not t]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _counts_at(y: list[int], score: list[float]) -> list[tuple[float, int, int]]:
    """(threshold, tp, fp) of `score >= threshold` at every distinct score, highest first."""
    rows = []
    for th in sorted(set(score), reverse=True):
        above = [t for s, t in zip(score, y) if s >= th]
        rows.append((th, sum(above), len(above) - sum(above)))
    return rows


def average_precision_steps(y: list[int], score: list[float]) -> float:
    """Σ_k (R_k - R_{k-1}) P_k over the distinct thresholds, highest first (no interpolation)."""
    total, prev_recall, n_pos = 0.0, 0.0, sum(y)
    for _, tp, fp in _counts_at(y, score):
        total += (tp / n_pos - prev_recall) * tp / (tp + fp)
        prev_recall = tp / n_pos
    return total


def roc_points_steps(y: list[int], score: list[float]) -> tuple[list[float], list[float]]:
    """(fpr, tpr) from (0, 0), one point per distinct threshold."""
    n_pos, n_neg = sum(y), len(y) - sum(y)
    rows = _counts_at(y, score)
    return [0.0] + [fp / n_neg for _, _, fp in rows], [0.0] + [tp / n_pos for _, tp, _ in rows]


def pr_points_steps(y: list[int], score: list[float]) -> tuple[list[float], list[float]]:
    """(recall, precision), one point per distinct threshold, highest first."""
    rows = _counts_at(y, score)
    return [tp / sum(y) for _, tp, _ in rows], [tp / (tp + fp) for _, tp, fp in rows]


def threshold_counts(y: list[int], prob: list[float], threshold: float) -> dict[str, float]:
    """precision, recall, F1 of `prob >= threshold` from the confusion counts (0 where undefined)."""
    tp = sum(1 for p, t in zip(prob, y) if t and p >= threshold)
    fp = sum(1 for p, t in zip(prob, y) if not t and p >= threshold)
    fn = sum(1 for p, t in zip(prob, y) if t and p < threshold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
