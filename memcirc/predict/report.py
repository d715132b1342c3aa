"""What the predict_memorization stage writes about its evaluation: summary.json, the rows of
features.jsonl and predictions.jsonl, and the text table. Plain data in (an `Evaluation`, a
`RunFacts`), dicts and strings out; the stage (`memcirc.stages.predict_memorization`) fills them in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.models import ModelSpec
from memcirc.option_groups import MemorizedRule
from memcirc.predict.evaluate import DECISION_THRESHOLD, CVResult, all_metrics, fold_statistics, ranking
from memcirc.predict.features import CONTROL, FeatureTable
from memcirc.predict.labels import Example
from memcirc.predict.ngram import NgramIndex
from memcirc.testbed import CHECKPOINTS_DIR

INTERVAL = "95% Student-t over folds"


@dataclass
class Evaluation:
    """What the stage computed, for the summary, the prediction rows and the figures."""

    features: FeatureTable
    y: np.ndarray                   # the labels
    fold_of: np.ndarray             # each sequence's held-out fold
    results: dict[str, CVResult]
    base_pred: np.ndarray | None    # the baseline's 0/1 prediction
    onset: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunFacts:
    """What summary.json records about the run's settings and inputs."""

    labels: str                 # "tables" or "scores"
    rule: MemorizedRule         # the memorized rule (also the baseline's definition)
    folds: int
    reference_model: str        # `model_name` of the reference model
    baseline_source: str        # the baseline model / table / column, for the summary and the figures
    ngram_index: str            # the index file used (a given --index-file, else the stage's own)
    corpus: str | None
    domain_column: str


def model_name(spec: ModelSpec) -> str:
    """A model's name for the summary: `testbed step-N` for a testbed checkpoint, else its id[@revision]."""
    path = Path(spec.name_or_path).resolve()
    if path.parent == CHECKPOINTS_DIR:
        return f"testbed {path.name}"
    return spec.name_or_path + (f"@{spec.revision}" if spec.revision else "")


def _classifier_summary(res: CVResult, y: np.ndarray) -> dict[str, Any]:
    importance = ranking(res.importance)
    return {
        "cv": fold_statistics(res.per_fold),
        "pooled": {k: round(v, 6) for k, v in all_metrics(y, res.oof).items()},
        "importance": importance,
        "group_importance": [{"group": r["feature"], "mean": r["mean"], "sd": r["sd"]}
                             for r in ranking(res.group_importance)],
        "control_rank": next(i for i, r in enumerate(importance, 1) if r["feature"] == CONTROL)
        if CONTROL in res.importance else None,
    }


def _baseline_summary(ev: Evaluation, facts: RunFacts) -> dict[str, Any] | None:
    if ev.base_pred is None:
        return None
    y, pred = ev.y, ev.base_pred
    per_fold = [all_metrics(y[ev.fold_of == k], pred[ev.fold_of == k]) for k in range(facts.folds)]
    return {"source": facts.baseline_source, "definition": f"{facts.rule.memorized_by} >= {facts.rule.threshold}",
            "n_predicted": int(pred.sum()), "all": {k: round(v, 6) for k, v in all_metrics(y, pred).items()},
            "cv": fold_statistics(per_fold)}


def build_summary(ev: Evaluation, facts: RunFacts, index: NgramIndex) -> dict[str, Any]:
    """summary.json (without the onset and the timings, which the stage adds)."""
    y, features = ev.y, ev.features
    classifiers = {name: _classifier_summary(res, y) for name, res in ev.results.items()}
    best = max(classifiers, key=lambda n: (classifiers[n]["cv"]["auroc"]["mean"],
                                           classifiers[n]["cv"]["pr_auc"]["mean"]))
    b = classifiers[best]
    means = {f: {"memorized": round(float(features.X[y == 1, j].mean()), 6),
                 "not_memorized": round(float(features.X[y == 0, j].mean()), 6)}
             for j, f in enumerate(features.names)}
    return {
        "n_sequences": len(y), "n_memorized": int(y.sum()), "prevalence": round(float(y.mean()), 6),
        "labels": facts.labels,
        "memorized_by": facts.rule.memorized_by, "threshold": facts.rule.threshold,
        "best_classifier": best,
        "auroc": b["cv"]["auroc"]["mean"], "auroc_ci95": b["cv"]["auroc"]["ci95"],
        "pr_auc": b["cv"]["pr_auc"]["mean"], "pr_auc_ci95": b["cv"]["pr_auc"]["ci95"],
        "f1": b["cv"]["f1"]["mean"], "precision": b["cv"]["precision"]["mean"], "recall": b["cv"]["recall"]["mean"],
        "top_features": [r["feature"] for r in b["importance"][:5]],
        "control_rank": b["control_rank"], "n_features": len(features.names),
        "classifiers": classifiers, "baseline": _baseline_summary(ev, facts),
        "folds": facts.folds, "decision_threshold": DECISION_THRESHOLD, "interval": INTERVAL,
        "features": features.names, "feature_groups": features.groups, "dropped_constant": features.dropped,
        "feature_means": means,
        "reference_model": facts.reference_model, "ngram": index.n,
        "ngram_index": facts.ngram_index,
        "corpus": facts.corpus,
        "corpus_tokens": int(index.meta.get("n_tokens", 0)), "distinct_ngrams": int(index.distinct),
        "domain_column": facts.domain_column,
    }


def feature_rows(examples: Sequence[Example], features: FeatureTable) -> Iterator[dict[str, Any]]:
    """features.jsonl: one row per sequence, its label, origin and feature values."""
    for e, x in zip(examples, features.X):
        yield {"id": e.id, "label": e.label, "origin": e.origin,
               **{n: round(float(v), 6) for n, v in zip(features.names, x)}}


def prediction_rows(examples: Sequence[Example], ev: Evaluation, onsets: dict[int, tuple[float, float, int]]
                    ) -> Iterator[dict[str, Any]]:
    """predictions.jsonl: out-of-fold probabilities, the baseline and (row -> found, predicted, snapped) onsets."""
    for i, e in enumerate(examples):
        row: dict[str, Any] = {"id": e.id, "label": int(ev.y[i]), "fold": int(ev.fold_of[i])}
        for name, res in ev.results.items():
            row[f"p_{name}"] = float(res.oof[i])   # full precision: the summary metrics are recomputable
        row["baseline"] = None if ev.base_pred is None else int(ev.base_pred[i])
        if i in onsets:
            row["onset_step"], row["onset_predicted"], row["onset_checkpoint"] = onsets[i]
        yield row


def num(value: float | None) -> str:
    """A metric with three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def _ci(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def format_table(summary: dict[str, Any]) -> str:
    """The text table the stage prints: every classifier and the baseline, the best one's top features."""
    lines = [f"predict_memorization: {summary['n_sequences']} sequences, {summary['n_memorized']} memorized "
             f"({summary['prevalence']:.1%}); {summary['folds']}-fold CV, mean [95% t-interval over folds]",
             f"{'classifier':<22} {'AUROC':>22} {'PR-AUC':>22} {'F1@0.5':>7} {'prec':>6} {'recall':>6}"]
    rows = [(n, c["cv"]) for n, c in summary["classifiers"].items()]
    if summary.get("baseline"):
        rows.append(("baseline", summary["baseline"]["cv"]))
    for name, cv in rows:
        lines.append(f"{name:<22} {_ci(cv['auroc']):>22} {_ci(cv['pr_auc']):>22} {cv['f1']['mean']:>7.3f} "
                     f"{cv['precision']['mean']:>6.3f} {cv['recall']['mean']:>6.3f}")
    best = summary["classifiers"][summary["best_classifier"]]
    top = ", ".join(f"{r['feature']} {r['mean']:.3f}" for r in best["importance"][:5])
    lines.append(f"best {summary['best_classifier']}; PR-AUC drop under permutation: {top}; {CONTROL} ranks "
                 f"{summary['control_rank']} of {summary['n_features']}")
    if summary.get("onset"):
        m, b = summary["onset"]["model"], summary["onset"]["median_baseline"]
        lines.append(f"when ({summary['onset']['n']} windows memorized for good): Spearman {num(m['spearman'])}, "
                     f"right checkpoint {m['checkpoint_accuracy']:.3f}, MAE {m['mae_steps']:.1f} steps (median onset: "
                     f"right checkpoint {b['checkpoint_accuracy']:.3f}, MAE {b['mae_steps']:.1f})")
    if summary.get("baseline"):
        lines.append(f"baseline: memorized ({summary['baseline']['definition']}) by {summary['baseline']['source']}")
    return "\n".join(lines)
