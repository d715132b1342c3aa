"""Classifiers of memorized vs not, their cross-validation, metrics and permutation importance.

- Classifiers: scikit-learn GradientBoostingClassifier with class-balanced sample weights, and
  LogisticRegression(class_weight="balanced") on standardized features. StratifiedKFold (shuffled,
  seeded); every classifier sees the same folds; predictions are out-of-fold.
- Metrics are sklearn.metrics': AUROC (Mann-Whitney, ties counted one half), PR-AUC as average
  precision (step-wise sum, no interpolation), and precision / recall / F1 at probability >= 0.5 of
  the class-balanced model, a fixed rule that never looks at a test fold. Per-fold values -> mean
  and a 95 % Student-t interval over the folds (scipy.stats.t, clipped to [0, 1]), `fold_statistics`.
- Importance: permutation importance on each held-out fold (sklearn.inspection, seeded): the drop in
  held-out PR-AUC (with rare positives AUROC is dominated by the many easy negatives and barely moves),
  per feature and per feature group (a group's columns permuted together with one permutation, so
  correlated features of one kind are not hidden by each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from scipy.stats import sem, t
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Bunch
from sklearn.utils.class_weight import compute_sample_weight

from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.predict.features import FeatureTable

DECISION_THRESHOLD = 0.5
CLASSIFIERS = ("gradient_boosting", "logistic_regression")
CLASSIFICATION_METRICS = ("auroc", "pr_auc", "precision", "recall", "f1")


# -- metrics: sklearn.metrics and scipy.stats, with the edge cases this stage reports ----------------

def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC (Mann-Whitney: ties count one half); NaN without both classes (sklearn raises there)."""
    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, score)) if _both_classes(y) else float("nan")


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (step-wise, no interpolation); NaN without a positive (sklearn warns, gives 0)."""
    y = np.asarray(y).astype(int)
    return float(average_precision_score(y, score)) if y.any() else float("nan")


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0)."""
    fpr, tpr, _ = roc_curve(np.asarray(y).astype(int), score, drop_intermediate=False)
    return fpr, tpr


def pr_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, highest first (sklearn's closing (0, 1) left off)."""
    precision, recall, _ = precision_recall_curve(np.asarray(y).astype(int), score)
    return recall[-2::-1], precision[-2::-1]


def threshold_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = DECISION_THRESHOLD) -> dict[str, float]:
    """precision, recall, F1 of `prob >= threshold` (0 where undefined)."""
    pred = (np.asarray(prob) >= threshold).astype(int)
    p, r, f, _ = precision_recall_fscore_support(np.asarray(y).astype(int), pred, average="binary", pos_label=1,
                                                 zero_division=0)  # pyright: ignore[reportArgumentType] (stub: str)
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def all_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = DECISION_THRESHOLD) -> dict[str, float]:
    return {"auroc": roc_auc(y, prob), "pr_auc": average_precision(y, prob), **threshold_metrics(y, prob, threshold)}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (e.g. per-fold scores), clipped to [0, 1]; a point
    when the values do not vary (scipy gives NaN for a zero scale)."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if v.size < 2 or float(v.std(ddof=1)) == 0.0:
        return (mean, mean)
    lo, hi = t.interval(confidence, v.size - 1, loc=mean, scale=sem(v))
    return (max(float(lo), 0.0), min(float(hi), 1.0))


def fold_statistics(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric: the mean over the folds, its 95 % t-interval and the per-fold values (rounded)."""
    out = {}
    for m in CLASSIFICATION_METRICS:
        values = [f[m] for f in per_fold]
        lo, hi = t_interval(values)
        out[m] = {"mean": round(float(np.mean(values)), 6), "ci95": [round(lo, 6), round(hi, 6)],
                  "folds": [round(float(v), 6) for v in values]}
    return out


# -- classifiers and importance ------------------------------------------------------------------

def make_classifier(name: str, seed: int) -> Any:
    if name == "gradient_boosting":
        return GradientBoostingClassifier(random_state=seed)
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000))
    raise InputError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def fit_classifier(name: str, model: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """Class imbalance: balanced sample weights (boosting) or class_weight='balanced' (logistic)."""
    if name == "gradient_boosting":
        return model.fit(X, y, sample_weight=compute_sample_weight("balanced", y))
    return model.fit(X, y)


def pr_auc_scorer(estimator: Any, X: np.ndarray, y: np.ndarray) -> float:
    """The permutation-importance score: held-out average precision."""
    return average_precision(y, estimator.predict_proba(X)[:, 1])


def group_permutation_importance(estimator: Any, X: np.ndarray, y: np.ndarray, groups: dict[str, list[int]],
                                 n_repeats: int, seed: int,
                                 scorer: Callable[[Any, np.ndarray, np.ndarray], float] = pr_auc_scorer
                                 ) -> dict[str, np.ndarray]:
    """Score drop when a group's columns are shuffled together (one row permutation for all of them).

    The random stream is sklearn.inspection.permutation_importance's (one seed drawn from `seed`, each
    group restarts it; permutations compose over repeats), so a one-column group gives exactly
    sklearn's numbers for that column.
    """
    base = scorer(estimator, X, y)
    group_seed = np.random.RandomState(seed).randint(np.iinfo(np.int32).max + 1)
    out = {}
    for name, cols in groups.items():
        rs = np.random.RandomState(group_seed)
        Xp = X.copy()
        idx = np.arange(X.shape[0])
        drops = []
        for _ in range(n_repeats):
            rs.shuffle(idx)
            Xp[:, cols] = Xp[np.ix_(idx, np.asarray(cols, np.intp))]
            drops.append(base - scorer(estimator, Xp, y))
        out[name] = np.asarray(drops)
    return out


@dataclass
class CVResult:
    name: str
    oof: np.ndarray                                  # out-of-fold probability of "memorized"
    per_fold: list[dict[str, float]]
    importance: dict[str, list[float]]               # feature -> drops (folds x repeats)
    group_importance: dict[str, list[float]]


def _evaluate_fold(res: CVResult, features: FeatureTable, y: np.ndarray, train: np.ndarray, test: np.ndarray, *,
                   fold: int, seed: int, repeats: int) -> None:
    """Fit `res.name` on `train`; record its held-out probabilities, metrics and importances on `test`."""
    X = features.X
    model = fit_classifier(res.name, make_classifier(res.name, seed), X[train], y[train])
    prob = model.predict_proba(X[test])[:, 1]
    res.oof[test] = prob
    res.per_fold.append(all_metrics(y[test], prob))
    # one scorer: sklearn returns a single Bunch (its dict[str, Bunch] is for several scorers)
    imp = cast(Bunch, permutation_importance(model, X[test], y[test], scoring=pr_auc_scorer, n_repeats=repeats,
                                             random_state=seed + fold))
    for j, f in enumerate(features.names):
        res.importance[f].extend(imp.importances[j].tolist())
    for g, drops in group_permutation_importance(model, X[test], y[test], features.group_columns(), repeats,
                                                 seed + fold).items():
        res.group_importance[g].extend(drops.tolist())


def cross_validate(features: FeatureTable, y: np.ndarray, names: Sequence[str], *, folds: int, seed: int,
                   repeats: int) -> tuple[np.ndarray, dict[str, CVResult]]:
    """Stratified k-fold: every classifier on the same folds; out-of-fold probabilities, per-fold
    metrics, permutation importance on each held-out fold. Returns (fold of each row, results)."""
    fold_of = np.full(len(y), -1)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features.X, y))
    for k, (_, test) in enumerate(splits):
        fold_of[test] = k
    results = {n: CVResult(n, np.zeros(len(y)), [], {f: [] for f in features.names},
                           {g: [] for g in features.group_columns()}) for n in names}
    for k, (train, test) in enumerate(progress(splits, "cross-validation", total=folds)):
        for name in names:
            _evaluate_fold(results[name], features, y, train, test, fold=k, seed=seed, repeats=repeats)
    return fold_of, results


def ranking(importance: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Features (or groups) by mean importance, highest first, with their sd."""
    rows = [{"feature": f, "mean": round(float(np.mean(v)), 6), "sd": round(float(np.std(v)), 6)}
            for f, v in importance.items()]
    return sorted(rows, key=lambda r: (-r["mean"], r["feature"]))
