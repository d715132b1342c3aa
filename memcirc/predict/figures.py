"""The predict_memorization stage's figures: ROC, precision-recall, permutation importance, feature
distributions and onset. Each takes plain data (labels, out-of-fold probabilities, the summary) and the
PNG path; the house style and the atomic write are `memcirc.plots`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Rectangle

from memcirc.plots import footer_room, group_colours, save_figure, subplots
from memcirc.predict.evaluate import DECISION_THRESHOLD, pr_points, roc_points
from memcirc.predict.features import CONTROL, FeatureTable
from memcirc.predict.report import num

FEATURE_UNITS = {   # the x axis of each feature's histogram (definitions: features.FEATURE_DEFINITIONS)
    "logprob_mean": "mean token log-probability (nats)", "logprob_min": "lowest token log-probability (nats)",
    "logprob_std": "sd of token log-probabilities (nats)",
    "suffix_logprob_mean": "mean suffix token log-probability (nats)",
    "dup_mean": "mean n-gram log(1 + corpus count)", "dup_max": "max n-gram log(1 + corpus count)",
    "dup_min": "min n-gram log(1 + corpus count)", "dup_prefix_min": "min prefix n-gram log(1 + corpus count)",
    "dup_novel_share": "share of n-grams unseen in the corpus", "zlib_ratio": "zlib bytes / raw bytes",
    "distinct_token_share": "distinct tokens / tokens", "repeated_bigram_share": "1 - distinct bigrams / bigrams",
    "rare_token_share": "share of rare tokens", "unigram_logfreq_mean": "mean token log relative frequency",
    "length": "tokens", "offset": "token offset in the document", "train_index": "position in training order",
    CONTROL: "as dup_mean, rows shuffled (no information)",
}
CONSTANT_SHARE = 0.98   # a feature with one value in this share of the rows has nothing to show


def _interval(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def _legend(summary: dict[str, Any], name: str, metric: str) -> str:
    return f"{name}: {_interval(summary['classifiers'][name]['cv'][metric])}"


def _baseline_legend(summary: dict[str, Any], metric: str) -> str:
    """The baseline's entry: its metric over the same folds (or over all rows when no folds were scored)."""
    b = summary["baseline"]
    cv = (b.get("cv") or {}).get(metric)
    value = _interval(cv) if cv else f"{b['all'][metric]:.3f} (all rows)"
    return f"baseline {b['source']}: {value}"


def roc_figure(y: np.ndarray, oof: dict[str, np.ndarray], base_pred: np.ndarray | None, summary: dict[str, Any],
               path: Path, source: str | None = None) -> None:
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
                   label=_baseline_legend(summary, "auroc") if a is ax else None)
    zoom.set_xlim(0, 0.05)
    zoom.set_ylim(0, 1.02)
    zoom.set_title("FPR <= 0.05", fontsize=8)
    zoom.tick_params(labelsize=7)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (out-of-fold), {summary['n_memorized']} of {summary['n_sequences']} memorized")
    ax.legend(fontsize=8, loc="lower right", title="AUROC mean [95% CI over folds]", title_fontsize=8)
    save_figure(fig, path, source=source)


def pr_figure(y: np.ndarray, oof: dict[str, np.ndarray], base_pred: np.ndarray | None, summary: dict[str, Any],
              path: Path, source: str | None = None) -> None:
    """Out-of-fold precision-recall curve per classifier (CV mean PR-AUC and interval in the legend), the
    baseline. Drawn as the step function average precision sums, up to the first threshold that reaches
    full recall: lower thresholds only add false positives (a vertical drop to the prevalence at recall 1
    that adds no area)."""
    fig, ax = subplots(figsize=(5.5, 5))
    for name, p in oof.items():
        recall, precision = pr_points(y, p)
        end = int(np.argmax(recall >= recall.max())) + 1   # the first point at full recall
        ax.plot(np.r_[0.0, recall[:end]], np.r_[precision[0], precision[:end]], drawstyle="steps-pre",
                label=_legend(summary, name, "pr_auc"))
    if base_pred is not None:
        m = summary["baseline"]["all"]
        ax.plot(m["recall"], m["precision"], "k*", ms=12, label=_baseline_legend(summary, "pr_auc"))
    ax.axhline(summary["prevalence"], color="grey", lw=0.8, ls=":", label=f"prevalence {summary['prevalence']:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"precision-recall (out-of-fold), {summary['n_memorized']} of {summary['n_sequences']} memorized",
                 fontsize=10)
    ax.text(0.5, 0.55, "drawn as the steps average precision sums; each curve ends\nwhere recall first reaches "
            "its maximum: lower thresholds only\nadd false positives (precision falls to the prevalence, no area)",
            transform=ax.transAxes, ha="center", va="center", fontsize=7, color="0.35")
    ax.legend(fontsize=8, loc="lower left", title="PR-AUC mean [95% CI over folds]", title_fontsize=8)
    save_figure(fig, path, source=source)


def importance_figure(summary: dict[str, Any], path: Path, source: str | None = None) -> None:
    """Left: drop in held-out PR-AUC per feature and classifier, ordered by the best classifier, the
    shuffled control in red. Right: the same per feature group, with the left panel's x range shaded;
    the note below says why the two scales differ."""
    names = list(summary["classifiers"])
    best = summary["classifiers"][summary["best_classifier"]]
    order = [r["feature"] for r in best["importance"]][::-1]
    groups = [r["group"] for r in best["group_importance"]][::-1]
    fig, (left, right) = subplots(1, 2, figsize=(12, max(4.0, 0.3 * len(order) + 2.0)),
                                  gridspec_kw={"width_ratios": [3, 2]}, constrained_layout=True)
    footer_room(fig, 0.09)
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        by_feature = {r["feature"]: r for r in summary["classifiers"][name]["importance"]}
        by_group = {r["group"]: r for r in summary["classifiers"][name]["group_importance"]}
        pos = np.arange(len(order)) + i * height - 0.4 + height / 2
        left.barh(pos, [by_feature[f]["mean"] for f in order], height, xerr=[by_feature[f]["sd"] for f in order],
                  label=name, capsize=2, color=f"C{i}", error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
        gpos = np.arange(len(groups)) + i * height - 0.4 + height / 2
        right.barh(gpos, [by_group[g]["mean"] for g in groups], height, xerr=[by_group[g]["sd"] for g in groups],
                   label=name, capsize=2, color=f"C{i}", error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
    for ax, labels in ((left, order), (right, groups)):
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
        for tick, label in zip(ax.get_yticklabels(), labels):
            if label in (CONTROL, "control"):
                tick.set_color("#c44e52")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("drop in held-out PR-AUC when permuted")
    lo, hi = left.get_xlim()
    right.axvspan(lo, hi, color="0.85", alpha=0.6, lw=0, zorder=0, label="the left panel's x range")
    left.set_title("permutation importance per feature (mean ± sd over folds x repeats)", fontsize=10)
    right.set_title("per feature group (the group's columns permuted together)", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    right.legend(fontsize=8, loc="lower right")
    fig.text(0.5, 0.045, "\n".join(textwrap.wrap(_importance_note(summary, hi), 170)), ha="center", va="top",
             fontsize=8, color="0.25")
    save_figure(fig, path, source=source)


def _importance_note(summary: dict[str, Any], left_hi: float) -> str:
    best = summary["classifiers"][summary["best_classifier"]]
    top_group = best["group_importance"][0]
    members = [r for r in best["importance"] if summary["feature_groups"].get(r["feature"]) == top_group["group"]]
    single = max((r["mean"] for r in members), default=0.0)
    return (f"The x ranges differ (left up to {left_hi:.2f}): the features of a group stand in for each other, so "
            f"permuting one {top_group['group']} feature costs at most {single:.3f} PR-AUC, while permuting the "
            f"group together costs {top_group['mean']:.2f} ({summary['best_classifier']}). Read the group panel "
            "for what matters; error bars larger than a bar mean that feature's own drop is not distinguishable "
            "from 0.")


def _informative(x: np.ndarray) -> bool:
    """False when one value holds CONSTANT_SHARE of the rows (a histogram with nothing to show)."""
    if len(x) == 0:
        return False
    _, counts = np.unique(x, return_counts=True)
    return counts.max() / len(x) < CONSTANT_SHARE


def features_figure(features: FeatureTable, y: np.ndarray, summary: dict[str, Any], path: Path,
                    source: str | None = None) -> None:
    """Distribution of the most important features per label, in importance.png's order (the best
    classifier's ranking, the shuffled control where it ranks); features with one value in nearly every
    row are left out, and named."""
    ranked = [r["feature"] for r in summary["classifiers"][summary["best_classifier"]]["importance"]]
    ranked = [f for f in ranked if f in features.names]
    flat = [f for f in ranked if not _informative(features.X[:, features.names.index(f)])]
    shown = [f for f in ranked if f not in flat][:8]
    if CONTROL in ranked and CONTROL not in shown and CONTROL not in flat:
        shown = shown[:7] + [CONTROL]
    cols = min(4, max(len(shown), 1))
    rows = max(math.ceil(len(shown) / cols), 1)
    fig, axes = subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows + 0.9), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, shown):
        x = features.X[:, features.names.index(name)]
        bins = np.histogram_bin_edges(x, bins=20)
        for label, color, text in ((0, "#4c72b0", "not memorized"), (1, "#dd8452", "memorized")):
            ax.hist(x[y == label], bins=bins, density=True, alpha=0.6, color=color, label=text)
        ax.set_title(f"#{ranked.index(name) + 1} {name}", fontsize=9, color="#c44e52" if name == CONTROL else "black")
        ax.set_xlabel(FEATURE_UNITS.get(name, "value"), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("density (per label)", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if shown:
        axes.flat[0].legend(fontsize=7)
    note = (f"; left out (one value in >= {CONSTANT_SHARE:.0%} of rows): {', '.join(flat)}" if flat else "")
    fig.suptitle(f"feature distributions by label, in importance.png's order (#rank, "
                 f"{summary['best_classifier']}){note}", fontsize=10)
    save_figure(fig, path, source=source)


def onset_figure(target: np.ndarray, result: dict[str, Any], path: Path, groups: Sequence[str | None] | None = None,
                 source: str | None = None) -> None:
    """Predicted (out-of-fold, before snapping) against found onset checkpoint per window, log-scaled
    steps, coloured by group (k). Dotted: the snapping boundaries (a prediction counts as the nearest
    checkpoint on the log scale); green cells: where a prediction snaps to the right checkpoint."""
    fig, ax = subplots(figsize=(6.2, 5.4), constrained_layout=True)
    steps = np.asarray(result["steps"], dtype=float)
    ticks = np.log1p(steps)
    edges = np.r_[-np.inf, (ticks[:-1] + ticks[1:]) / 2, np.inf]
    pad = 0.5 * (np.diff(ticks).min() if len(ticks) > 1 else 1.0)
    y_lo = min(ticks.min(), float(np.log1p(np.min(result["predicted"])))) - pad
    y_hi = max(ticks.max(), float(np.log1p(np.max(result["predicted"])))) + pad
    for i, t in enumerate(ticks):   # the right-checkpoint cell of each found onset
        ax.add_patch(Rectangle((t - 0.35 * pad, max(edges[i], y_lo)), 0.7 * pad,
                               min(edges[i + 1], y_hi) - max(edges[i], y_lo), color="#55a868", alpha=0.12, lw=0))
    for e in edges[1:-1]:
        ax.axhline(e, color="0.5", lw=0.8, ls=":")
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(target)) * pad
    right = np.asarray(result["snapped"]) == np.asarray(target)
    labels = [g or "windows" for g in groups] if groups is not None else ["windows"] * len(target)
    colors = group_colours(list(dict.fromkeys(labels)))
    for g in dict.fromkeys(labels):
        sel = np.array([lab == g for lab in labels])
        for ok, marker in ((True, "o"), (False, "X")):
            m = sel & (right == ok)
            if m.any():
                ax.scatter(np.log1p(target[m]) + jitter[m], np.log1p(result["predicted"][m]), s=26, alpha=0.8,
                           marker=marker, color=colors[g], edgecolors="none",
                           label=f"{g} (n={int(sel.sum())})" if ok or not (sel & right).any() else None)
    ax.plot([ticks.min(), ticks.max()], [ticks.min(), ticks.max()], color="grey", lw=0.8, ls="--")
    ax.set_xticks(ticks, [str(int(s)) for s in steps], fontsize=8)
    ax.set_yticks(ticks, [str(int(s)) for s in steps], fontsize=8)
    ax.set_ylim(y_lo, y_hi)
    m, b = result["model"], result["median_baseline"]
    ax.set_xlabel("onset checkpoint (training_dynamics; log axis, jittered)")
    ax.set_ylabel("predicted onset step (out of fold; log axis)")
    ax.set_title(f"when: Spearman {num(m['spearman'])}, right checkpoint {m['checkpoint_accuracy']:.2f} "
                 f"(median: {b['checkpoint_accuracy']:.2f})\ndotted: snapping boundaries; green: snaps right; "
                 "o right, X wrong", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", title="group", title_fontsize=7)
    save_figure(fig, path, source=source)
