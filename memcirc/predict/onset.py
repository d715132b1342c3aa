"""When: predicting the onset checkpoint of the windows a training_dynamics run finds memorized for good.

A GradientBoostingRegressor on the same features predicts log(1 + onset step), out of fold (KFold,
seeded); it is scored as Spearman rho, mean absolute error in steps and the share snapped to the right
checkpoint, against predicting the training folds' median onset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.model_selection import KFold

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.manifest import read_manifest, read_output
from memcirc.predict.labels import Example

ONSETS_JSONL = "onsets.jsonl"    # written by training_dynamics: per window onset_step (None: not memorized at the end)


@dataclass
class OnsetTargets:
    """What a training_dynamics folder says about the examples."""

    manifest: dict[str, Any]        # the dynamics run's manifest
    rows: np.ndarray                # indices of the examples with an onset
    steps: np.ndarray               # their onset steps
    checkpoints: list[int]          # the checkpoint steps of the run


def onset_targets(dynamics_dir: Path, examples: Sequence[Example], folds: int) -> OnsetTargets:
    """The onsets of the examples that the run in `dynamics_dir` finds memorized for good."""
    manifest = read_manifest(dynamics_dir, what="training_dynamics")
    onsets_path = read_output(dynamics_dir, ONSETS_JSONL, "training_dynamics", manifest)
    onsets = {r["id"]: r.get("onset_step") for r in art.read_jsonl(onsets_path)}
    onset_of = {k: v for k, v in onsets.items() if v is not None}
    summary = art.read_json(read_output(dynamics_dir, art.SUMMARY_JSON, "training_dynamics", manifest))
    steps = sorted({int(c["step"]) for c in summary.get("checkpoints", [])
                    if c.get("step") is not None})
    matched = [i for i, e in enumerate(examples) if e.id in onsets]
    if not matched:
        raise InputError(f"no sequence of the labels has a row in {dynamics_dir}/{ONSETS_JSONL}: run "
                         "training_dynamics on the same memorization run")
    rows = [i for i in matched if examples[i].id in onset_of]
    target = np.array([float(onset_of[examples[i].id]) for i in rows])
    if len(rows) < max(folds, 2) or len(set(target.tolist())) < 2:
        raise InputError(f"{len(rows)} windows of {dynamics_dir} have an onset ({len(set(target.tolist()))} distinct "
                         f"steps): predicting when needs at least {max(folds, 2)} and two distinct steps")
    return OnsetTargets(manifest, np.array(rows), target, steps or sorted(set(target.astype(int).tolist())))


def _scores(predicted: np.ndarray, target: np.ndarray, snapped: np.ndarray) -> dict[str, Any]:
    rho = float("nan")
    if np.ptp(predicted) > 0:
        # scipy makes SignificanceResult with _make_tuple_bunch: pyright sees a class "_" without its fields
        rho = spearmanr(predicted, target).statistic  # pyright: ignore[reportAttributeAccessIssue]
    return {"spearman": None if math.isnan(rho) else round(float(rho), 6),
            "mae_steps": round(float(np.abs(predicted - target).mean()), 3),
            "checkpoint_accuracy": round(float((snapped == target).mean()), 6)}


def predict_onsets(X: np.ndarray, target: np.ndarray, steps: Sequence[int], *, folds: int, seed: int
                   ) -> dict[str, Any]:
    """Out-of-fold onset predictions (regression on log(1 + step)) and their scores against the median."""
    predicted, median = np.zeros(len(target)), np.zeros(len(target))
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        model = GradientBoostingRegressor(random_state=seed).fit(X[train], np.log1p(target[train]))
        predicted[test] = np.expm1(model.predict(X[test]))
        median[test] = np.median(target[train])
    grid = np.asarray(steps, np.float64)

    def snap(v: np.ndarray) -> np.ndarray:   # the nearest checkpoint on a log scale
        return grid[np.abs(np.log1p(v)[:, None] - np.log1p(grid)[None, :]).argmin(axis=1)]

    return {"n": len(target), "steps": list(map(int, steps)), "predicted": predicted, "snapped": snap(predicted),
            "model": _scores(predicted, target, snap(predicted)),
            "median_baseline": _scores(median, target, snap(median))}
