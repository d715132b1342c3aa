"""The predict_memorization stage's figures: ROC, precision-recall, permutation importance, feature
distributions and onset. Each takes plain data (labels, out-of-fold probabilities, the summary) and the
PNG path; the house style and the atomic write are `memcirc.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.plots import save_figure, subplots
from memcirc.predict.evaluate import DECISION_THRESHOLD, pr_points, roc_points
from memcirc.predict.features import CONTROL, FeatureTable
from memcirc.predict.report import num


def _legend(summary: dict[str, Any], name: str, metric: str) -> str:
    m = summary["classifiers"][name]["cv"][metric]
    return f"{name}: {m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def roc_figure(y: np.ndarray, oof: dict[str, np.ndarray], base_pred: np.ndarray | None, summary: dict[str, Any],
               path: Path) -> None:
    """Out-of-fold ROC curve per classifier (CV mean AUROC and interval in the legend), the baseline."""
    fig, ax = subplots(figsize=(5.5, 5))
    zoom = ax.inset_axes([0.42, 0.32, 0.53, 0.38])   # the low false-positive end, where rare positives live
    for name, p in oof.items():
        fpr, tpr = roc_points(y, p)
        for a in (ax, zoom):
            a.plot(fpr, tpr, drawstyle="steps-post", label=_legend(summary, name, "auroc") if a is ax else None)
    if base_pred is not None:
        m = summary["baseline"]["all"]
        fpr_b = float(((base_pred >= DECISION_THRESHOLD) & (y == 0)).sum() / max((y == 0).sum(), 1))
        for a in (ax, zoom):
            a.plot(fpr_b, m["recall"], "k*", ms=12 if a is ax else 8,
                   label=f"baseline: {summary['baseline']['source']}" if a is ax else None)
    zoom.set_xlim(0, 0.05)
    zoom.set_ylim(0, 1.02)
    zoom.set_title("FPR <= 0.05", fontsize=8)
    zoom.tick_params(labelsize=7)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (out-of-fold), {summary['n_memorized']} of {summary['n_sequences']} memorized")
    ax.legend(fontsize=8, loc="lower right", title="AUROC mean [95% CI over folds]", title_fontsize=8)
    save_figure(fig, path)


def pr_figure(y: np.ndarray, oof: dict[str, np.ndarray], base_pred: np.ndarray | None, summary: dict[str, Any],
              path: Path) -> None:
    """Out-of-fold precision-recall curve per classifier (CV mean PR-AUC and interval in the legend), the baseline."""
    fig, ax = subplots(figsize=(5.5, 5))
    for name, p in oof.items():
        recall, precision = pr_points(y, p)
        ax.plot(np.r_[0.0, recall], np.r_[precision[0], precision], drawstyle="steps-pre",
                label=_legend(summary, name, "pr_auc"))
    if base_pred is not None:
        m = summary["baseline"]["all"]
        ax.plot(m["recall"], m["precision"], "k*", ms=12, label=f"baseline: {summary['baseline']['source']}")
    ax.axhline(summary["prevalence"], color="grey", lw=0.8, ls=":", label=f"prevalence {summary['prevalence']:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("precision-recall (out-of-fold)")
    ax.legend(fontsize=8, loc="lower left", title="PR-AUC mean [95% CI over folds]", title_fontsize=8)
    save_figure(fig, path)


def importance_figure(summary: dict[str, Any], path: Path) -> None:
    """Left: drop in held-out PR-AUC per feature and classifier, ordered by the best classifier, the
    shuffled control in red. Right: the same per feature group."""
    names = list(summary["classifiers"])
    best = summary["classifiers"][summary["best_classifier"]]
    order = [r["feature"] for r in best["importance"]][::-1]
    groups = [r["group"] for r in best["group_importance"]][::-1]
    fig, (left, right) = subplots(1, 2, figsize=(12, max(4.0, 0.3 * len(order) + 1.5)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        by_feature = {r["feature"]: r for r in summary["classifiers"][name]["importance"]}
        by_group = {r["group"]: r for r in summary["classifiers"][name]["group_importance"]}
        pos = np.arange(len(order)) + i * height - 0.4 + height / 2
        left.barh(pos, [by_feature[f]["mean"] for f in order], height, xerr=[by_feature[f]["sd"] for f in order],
                  label=name, capsize=2)
        gpos = np.arange(len(groups)) + i * height - 0.4 + height / 2
        right.barh(gpos, [by_group[g]["mean"] for g in groups], height, xerr=[by_group[g]["sd"] for g in groups],
                   label=name, capsize=2)
    for ax, labels in ((left, order), (right, groups)):
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
        for tick, label in zip(ax.get_yticklabels(), labels):
            if label in (CONTROL, "control"):
                tick.set_color("#c44e52")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("drop in held-out PR-AUC when permuted")
    left.set_title("permutation importance per feature (mean ± sd over folds x repeats)")
    right.set_title("per feature group (columns permuted together)")
    left.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def features_figure(features: FeatureTable, y: np.ndarray, summary: dict[str, Any], path: Path) -> None:
    """Distribution of the most important features (best classifier) and the control, per label."""
    ranked = [r["feature"] for r in summary["classifiers"][summary["best_classifier"]]["importance"]]
    shown = [f for f in ranked if f != CONTROL][:7] + ([CONTROL] if CONTROL in ranked else [])
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, shown):
        x = features.X[:, features.names.index(name)]
        bins = np.histogram_bin_edges(x, bins=20)
        for label, color, text in ((0, "#4c72b0", "not memorized"), (1, "#dd8452", "memorized")):
            ax.hist(x[y == label], bins=bins, density=True, alpha=0.6, color=color, label=text)
        ax.set_title(name, fontsize=9, color="#c44e52" if name == CONTROL else "black")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("feature distributions by label (density), most important first", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def onset_figure(target: np.ndarray, result: dict[str, Any], path: Path) -> None:
    """Predicted (out-of-fold) vs found onset checkpoint per window, log-scaled steps."""
    fig, ax = subplots(figsize=(5.5, 5))
    jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(target))
    ax.scatter(np.log1p(target) + jitter, np.log1p(result["predicted"]), s=18, alpha=0.7)
    ticks = np.log1p(result["steps"])
    ax.plot([ticks.min(), ticks.max()], [ticks.min(), ticks.max()], color="grey", lw=0.8, ls=":")
    ax.set_xticks(ticks, [str(s) for s in result["steps"]], fontsize=8)
    ax.set_yticks(ticks, [str(s) for s in result["steps"]], fontsize=8)
    m, b = result["model"], result["median_baseline"]
    ax.set_xlabel("onset checkpoint (training_dynamics)")
    ax.set_ylabel("predicted onset (out of fold)")
    ax.set_title(f"when: Spearman {num(m['spearman'])}, right checkpoint {m['checkpoint_accuracy']:.2f} "
                 f"(median: {b['checkpoint_accuracy']:.2f})", fontsize=9)
    save_figure(fig, path)
