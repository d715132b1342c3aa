"""The predict_memorization stage: which sequences does a model memorize, predicted from the data alone.

Labels: the windows of a memorization run (the memorized rule on `scores.jsonl`), or a table of
memorized sequences plus random controls (`memcirc.predict.labels`). Features never look at the target
model (`memcirc.predict.features`; the corpus n-gram index is built once and saved,
`memcirc.predict.ngram`). Classifiers are cross-validated and compared with the seed's baseline,
"memorized by a smaller model" (`memcirc.predict.evaluate`, `memcirc.predict.baseline`). The best
classifier is the one with the highest mean cross-validated AUROC (ties: PR-AUC). Optionally
(--dynamics-dir) the onset checkpoint of each window memorized for good is predicted too
(`memcirc.predict.onset`).

Writes <output-dir>/predict/: features.jsonl, predictions.jsonl (out-of-fold probabilities, baseline,
onsets), summary.json, roc.png, pr.png, importance.png, features.png, onset.png (with dynamics),
ngram_index.safetensors (unless --index-file; with tokengrams also its ngram_index.tokens and
ngram_index.table) and manifest.json last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.logs import show
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, ModelSpec, load
from memcirc.models.arch import embedding_rows
from memcirc.models.identity import check_recorded_model, results_key, tokenizer_sha256
from memcirc.option_groups import MemorizedRule
from memcirc.plots import figure_source
from memcirc.predict import report
from memcirc.predict.baseline import column_predictions, memorized_table_tokens, model_predictions, table_predictions
from memcirc.predict.evaluate import DECISION_THRESHOLD, cross_validate
from memcirc.predict.features import CONTROL, FEATURE_DEFINITIONS, compute_features
from memcirc.predict.figures import features_figure, importance_figure, onset_figure, pr_figure, roc_figure
from memcirc.predict.labels import (
    DOC_KIND,
    TABLE_SUFFIXES,
    Example,
    Table,
    TableOptions,
    check_classes,
    check_tokens,
    examples_from_scores,
    examples_from_tables,
    recorded_tokenizer_sha256,
)
from memcirc.predict.ngram import (
    Corpus,
    NgramIndex,
    check_index,
    corpus_identity,
    index_for,
    index_meta,
    load_index,
    resolve_backend,
)
from memcirc.predict.onset import OnsetTargets, onset_targets, predict_onsets
from memcirc.stages.configs.predict_memorization import PredictConfig
from memcirc.testbed import CHECKPOINTS_DIR, TESTBED_NAME, checkpoint_folders

log = logging.getLogger(__name__)

FEATURES_JSONL = "features.jsonl"
PREDICTIONS_JSONL = "predictions.jsonl"
NGRAM_INDEX = "ngram_index.safetensors"
ROC_PNG = "roc.png"
PR_PNG = "pr.png"
IMPORTANCE_PNG = "importance.png"
FEATURES_PNG = "features.png"
ONSET_PNG = "onset.png"


# -- inputs: labels, models, the dynamics run, the n-gram index -----------------------------------

@dataclass
class Labels:
    examples: list[Example]
    inputs: list[dict[str, Any]]    # what the fingerprint and the manifest record about them
    upstream: dict[str, Any] | None  # the memorization run's manifest (labels from scores.jsonl)
    where: str                      # for messages


def _label_tables(cfg: PredictConfig) -> Labels:
    if cfg.domain_column == DOC_KIND:
        raise InputError(f"domain_column '{DOC_KIND}' needs document ids (a memorization run); name a column "
                         "of the label tables instead")
    assert cfg.labels_file is not None   # _labels reads tables only with --labels-file
    tables = [Table(cfg.labels_file, cfg.labels_split, "labels", 1)]
    if cfg.controls_file:
        tables.append(Table(cfg.controls_file, cfg.controls_split, "controls", 0))
    opts = TableOptions(prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len, label_column=cfg.label_column,
                        threshold=cfg.threshold, baseline_column=cfg.baseline_column,
                        domain_column=cfg.domain_column, limit=cfg.limit)
    examples = examples_from_tables(tables, opts)
    inputs = [{"path": t.source, **({"sha256": art.sha256_file(Path(t.source))} if Path(t.source).is_file()
                                    else {"split": t.split})} for t in tables]
    return Labels(examples, inputs, None, " + ".join(t.source for t in tables))


def _labels(cfg: PredictConfig) -> Labels:
    """The labelled sequences (at most --limit), with both classes in every fold."""
    if cfg.labels_file:
        labels = _label_tables(cfg)
    elif cfg.controls_file:
        raise InputError("--controls-file goes with --labels-file (the memorized table)")
    else:
        upstream_dir = cfg.upstream_dir
        assert upstream_dir is not None   # predict_memorization needs memorization_score: always an upstream folder
        upstream = read_manifest(upstream_dir, what="memorization")
        testbed_data = upstream.get("config", {}).get("dataset") == TESTBED_NAME
        examples = examples_from_scores(upstream_dir, cfg.options(MemorizedRule), cfg.domain_column, testbed_data)
        labels = Labels(examples, [{"path": str(upstream_dir), "run_id": upstream["run_id"]}], upstream,
                        f"{upstream_dir}")
    if cfg.limit:
        labels.examples = labels.examples[:cfg.limit]
    check_classes(labels.examples, cfg.folds, labels.where)
    return labels


def _check_scores_model(cfg: PredictConfig, labels: Labels) -> None:
    """The memorization scores must be of the model this run is for (its weights, not its spelling)."""
    check_recorded_model((labels.upstream or {}).get("model"), cfg.model_spec(),
                         f"memorization scores in {cfg.upstream_dir}")


def _check_corpus_and_n(cfg: PredictConfig, labels: Labels) -> None:
    """A corpus for a model other than the testbed; n no longer than the shortest sequence."""
    if cfg.corpus == TESTBED_NAME and cfg.model != TESTBED_NAME and not cfg.index_file:
        raise InputError(f"--corpus is required for model {cfg.model!r} (its training data: a file, folder or Hub "
                         "id), or a saved n-gram index with --index-file")
    shortest = min(len(e.tokens) for e in labels.examples)
    if cfg.ngram > shortest:
        raise InputError(f"--ngram {cfg.ngram} is longer than the shortest sequence ({shortest} tokens)")


def _testbed_checkpoints() -> list[Path]:
    """The testbed's intermediate checkpoint folders in training order (the final model left out)."""
    found = [folder for _, folder in checkpoint_folders()[:-1]]
    if not found:
        raise InputError(f"the testbed has no intermediate checkpoints in {CHECKPOINTS_DIR}: run `make testbed`")
    return found


@dataclass
class Models:
    reference_spec: ModelSpec
    baseline_spec: ModelSpec | None     # the baseline as a model scored here
    baseline_table: str | None          # ... or as a table of its memorized sequences (else: --baseline-column)
    reference: LoadedModel | None = None
    reference_sha: str = ""             # the reference tokenizer's vocab hash
    baseline: LoadedModel | None = None
    memorized_table: set[tuple[int, ...]] | None = None


def _model_specs(cfg: PredictConfig) -> Models:
    """The reference model and the baseline (a model, a table, or neither for --baseline-column)."""
    testbed = cfg.model == TESTBED_NAME
    if not testbed and not cfg.reference_model:
        raise InputError(f"--reference-model is required for model {cfg.model!r} (a smaller model of the same "
                         "tokenizer, e.g. EleutherAI/pythia-70m for Pythia)")
    if not testbed and not (cfg.baseline_model or cfg.baseline_column):
        raise InputError(f"--baseline-model (a smaller model, or a table of its memorized sequences) or "
                         f"--baseline-column is required for model {cfg.model!r}")
    reference = cfg.reference_model or str(_testbed_checkpoints()[0])
    spec = ModelSpec(reference, revision=cfg.reference_revision, dtype=cfg.dtype, device=cfg.device,
                     attn_implementation=cfg.attn_implementation)
    if cfg.baseline_column:
        return Models(spec, None, None)
    baseline = cfg.baseline_model or str(_testbed_checkpoints()[-1])
    if Path(baseline).is_file() and Path(baseline).suffix in TABLE_SUFFIXES:
        return Models(spec, None, baseline)
    return Models(spec, ModelSpec(baseline, revision=cfg.baseline_revision, dtype=cfg.dtype, device=cfg.device,
                                  attn_implementation=cfg.attn_implementation), None)


def _check_tokenizers(cfg: PredictConfig, labels: Labels, models: Models) -> None:
    """The scored windows and the testbed corpus must be in the reference model's token ids (same vocabulary)."""
    if labels.upstream is not None:
        scored_sha = recorded_tokenizer_sha256(labels.upstream.get("model", {}))
        if scored_sha is None:
            log.warning("cannot load the scoring model's tokenizer to compare it with the reference model's; "
                        "only the token ids were checked")
        elif scored_sha != models.reference_sha:
            raise InputError(f"the memorization run was tokenized by {labels.upstream['model'].get('name_or_path')!r}"
                             f", whose vocabulary differs from the reference model "
                             f"{models.reference_spec.name_or_path!r}'s: use a reference model with the same tokenizer")
    if cfg.corpus == TESTBED_NAME and not cfg.index_file:
        testbed = AutoTokenizer.from_pretrained(str(_testbed_checkpoints()[0]), trust_remote_code=False)
        if tokenizer_sha256(testbed) != models.reference_sha:
            raise InputError("the testbed corpus is tokenized with the testbed tokenizer; the reference model has "
                             "another vocabulary: pass --corpus")


def _load_models(cfg: PredictConfig, labels: Labels) -> Models:
    """Load the reference (and baseline) model and check that they read the labels' token ids."""
    _check_scores_model(cfg, labels)
    models = _model_specs(cfg)
    _check_corpus_and_n(cfg, labels)
    models.reference = load(models.reference_spec)
    models.reference_sha = tokenizer_sha256(models.reference.tokenizer)
    check_tokens(labels.examples, models.reference.model, "reference model")
    _check_tokenizers(cfg, labels, models)
    if models.baseline_spec is not None:
        models.baseline = load(models.baseline_spec)
        if tokenizer_sha256(models.baseline.tokenizer) != models.reference_sha:
            raise InputError(f"the baseline model {models.baseline_spec.name_or_path!r} has another tokenizer than "
                             "the reference model: the baseline must read the same token ids")
        check_tokens(labels.examples, models.baseline.model, "baseline model")
    if models.baseline_table:
        models.memorized_table = memorized_table_tokens(Path(models.baseline_table), len(labels.examples[0].tokens))
    return models


def _onset_inputs(cfg: PredictConfig, examples: Sequence[Example]) -> tuple[str | None, OnsetTargets | None]:
    """(the training_dynamics folder, its onsets of the examples), or (None, None) without one."""
    dynamics_dir = cfg.dynamics_dir
    if dynamics_dir == "auto":   # the run's own training_dynamics folder, when that stage has finished
        candidate = cfg.stage_folder("training_dynamics")
        dynamics_dir = str(candidate) if (candidate / art.MANIFEST).is_file() else None
    if not dynamics_dir:
        return None, None
    return dynamics_dir, onset_targets(Path(dynamics_dir), examples, cfg.folds)


def _given_index(cfg: PredictConfig, tokenizer_sha: str) -> NgramIndex | None:
    """--index-file, checked against this run's tokenizer and n."""
    if not cfg.index_file:
        return None
    index = load_index(Path(cfg.index_file), cfg.ngram)   # a tokengrams index counts any n
    check_index(index, cfg.ngram, tokenizer_sha, cfg.index_file)
    return index


def _baseline_identity(cfg: PredictConfig, models: Models) -> dict[str, Any]:
    if models.baseline is not None:
        return results_key(models.baseline)
    if models.baseline_table:
        return {"table": models.baseline_table, "sha256": art.sha256_file(Path(models.baseline_table))}
    return {"column": cfg.baseline_column}


def _baseline_predictions(cfg: PredictConfig, examples: Sequence[Example], models: Models) -> np.ndarray | None:
    """1 where the smaller model memorized the sequence (same definition as the labels), else 0."""
    if cfg.baseline_column:
        return column_predictions(examples, cfg.threshold)
    if models.memorized_table is not None:
        return table_predictions(examples, models.memorized_table)
    if models.baseline is None:
        return None
    return model_predictions(examples, models.baseline, cfg.options(MemorizedRule), cfg.batch_size)


def _run_facts(cfg: PredictConfig, models: Models, index: NgramIndex, given: bool) -> report.RunFacts:
    """What summary.json records about this run's settings (the baseline's source, the index, the corpus)."""
    baseline_source = (report.model_name(models.baseline_spec) if models.baseline_spec else
                       models.baseline_table or f"column {cfg.baseline_column}")
    ngram_index = NGRAM_INDEX
    if given:
        assert cfg.index_file is not None   # an index is given by --index-file alone
        ngram_index = cfg.index_file
    return report.RunFacts(labels="tables" if cfg.labels_file else "scores", rule=cfg.options(MemorizedRule),
                           folds=cfg.folds, reference_model=report.model_name(models.reference_spec),
                           baseline_source=baseline_source, ngram_index=ngram_index,
                           corpus=cfg.corpus if not given else index.meta.get("corpus"),
                           domain_column=cfg.domain_column)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


# -- the stage ------------------------------------------------------------------------------------

def run(cfg: PredictConfig) -> dict[str, Any]:
    """Labels, models and every input check first (bad input leaves nothing behind); then the index,
    the features, cross-validation, the baseline and (with a dynamics run) the onsets; outputs last."""
    torch.manual_seed(cfg.seed)
    labels = _labels(cfg)
    examples = labels.examples
    models = _load_models(cfg, labels)
    reference = models.reference
    assert reference is not None   # _load_models loads it
    dynamics_dir, targets = _onset_inputs(cfg, examples)
    inputs = list(labels.inputs)
    if targets is not None:
        inputs.append({"path": dynamics_dir, "run_id": targets.manifest["run_id"]})
    given = _given_index(cfg, models.reference_sha)
    corpus = Corpus(cfg.corpus, cfg.corpus_split, cfg.corpus_streaming, cfg.corpus_tokens)
    corpus_ident = corpus_identity(corpus) if not cfg.index_file else {"index_file": cfg.index_file}
    if cfg.index_file:
        inputs.append({"path": cfg.index_file, "sha256": art.sha256_file(Path(cfg.index_file))})
    baseline_ident = _baseline_identity(cfg, models)
    stage = StageRun.for_config(cfg, inputs, reference=results_key(reference),
                                reference_tokenizer=models.reference_sha, corpus=corpus_ident,
                                baseline=baseline_ident)
    if (done := stage.open(cfg.force)) is not None:
        show(report.format_table(done))
        return done
    stage.start(cfg.force)

    timings: dict[str, float] = {}
    with _timed(timings, "index_s"):
        vocab = max(len(reference.tokenizer), embedding_rows(reference.model))
        index = given or index_for(cfg.stage_dir / NGRAM_INDEX, cfg.ngram, corpus, reference.tokenizer, vocab,
                                   index_meta(models.reference_sha, corpus_ident), resolve_backend(cfg.ngram_index))
    with _timed(timings, "features_s"):
        features = compute_features(examples, reference, index, batch_size=cfg.batch_size, seed=cfg.seed)
    with _timed(timings, "baseline_s"):
        base_pred = _baseline_predictions(cfg, examples, models)
    y = np.array([e.label for e in examples])
    with _timed(timings, "cv_s"):
        log.info("%d sequences (%d memorized), %d features; %d-fold cross-validation of %s", len(y), int(y.sum()),
                 len(features.names), cfg.folds, ", ".join(cfg.classifiers))
        fold_of, results = cross_validate(features, y, list(cfg.classifiers), folds=cfg.folds, seed=cfg.seed,
                                          repeats=cfg.permutation_repeats)
    ev = report.Evaluation(features, y, fold_of, results, base_pred)
    if targets is not None:
        ev.onset = predict_onsets(features.X[targets.rows], targets.steps, targets.checkpoints, folds=cfg.folds,
                                  seed=cfg.seed)

    summary = report.build_summary(ev, _run_facts(cfg, models, index, given is not None), index)
    if ev.onset is not None:
        summary["onset"] = {k: v for k, v in ev.onset.items() if k not in ("predicted", "snapped")}
        summary["onset"]["dynamics_dir"] = dynamics_dir
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    source = figure_source(cfg.model, cfg.output_dir, cfg.revision)
    outputs = _write_outputs(cfg.stage_dir, examples, ev, targets, summary, source)
    if given is None:
        outputs.update(dict.fromkeys(index.files(cfg.stage_dir / NGRAM_INDEX)))
    if targets is not None and ev.onset is not None:
        onset_figure(targets.steps, ev.onset, cfg.stage_dir / ONSET_PNG,
                     groups=[examples[int(i)].window.group for i in targets.rows], source=source)
        outputs[ONSET_PNG] = None
    stage.finish(outputs, reference=reference.identity(), baseline=baseline_ident, seed=cfg.seed,
                 metric={"threshold": DECISION_THRESHOLD, "interval": report.INTERVAL,
                         "auroc": "Mann-Whitney, ties count 1/2", "pr_auc": "average precision (step-wise)",
                         "importance": "drop in held-out PR-AUC under permutation",
                         "features": FEATURE_DEFINITIONS})
    show(report.format_table(summary))
    return summary


def _write_outputs(stage_dir: Path, examples: Sequence[Example], ev: report.Evaluation, targets: OnsetTargets | None,
                   summary: dict[str, Any], source: str | None = None) -> dict[str, int | None]:
    """features.jsonl, predictions.jsonl, summary.json and the four figures (`source`: their footer);
    their manifest entries."""
    n_rows = art.write_jsonl(stage_dir / FEATURES_JSONL, report.feature_rows(examples, ev.features))
    onset_of = {}
    if targets is not None and ev.onset is not None:
        onset_of = {int(i): (float(t), float(p), int(q)) for i, t, p, q in
                    zip(targets.rows, targets.steps, ev.onset["predicted"], ev.onset["snapped"])}
    art.write_jsonl(stage_dir / PREDICTIONS_JSONL, report.prediction_rows(examples, ev, onset_of))
    art.write_json(stage_dir / art.SUMMARY_JSON, summary)
    oof = {name: res.oof for name, res in ev.results.items()}
    roc_figure(ev.y, oof, ev.base_pred, summary, stage_dir / ROC_PNG, source=source)
    pr_figure(ev.y, oof, ev.base_pred, summary, stage_dir / PR_PNG, source=source)
    importance_figure(summary, stage_dir / IMPORTANCE_PNG, source=source)
    features_figure(ev.features, ev.y, summary, stage_dir / FEATURES_PNG, source=source)
    return {FEATURES_JSONL: n_rows, PREDICTIONS_JSONL: n_rows, art.SUMMARY_JSON: None, ROC_PNG: None, PR_PNG: None,
            IMPORTANCE_PNG: None, FEATURES_PNG: None}


# -- the run report -------------------------------------------------------------------------------

def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report (memcirc.report)."""
    best = summary["classifiers"][summary["best_classifier"]]
    group = best["group_importance"][0]
    auroc, pr_auc = summary["auroc_ci95"], summary["pr_auc_ci95"]
    line = (f"predictor ({summary['best_classifier']}, {summary['n_memorized']} of {summary['n_sequences']} "
            f"memorized): AUROC {summary['auroc']:.3f} [{auroc[0]:.3f}, {auroc[1]:.3f}], PR-AUC "
            f"{summary['pr_auc']:.3f} [{pr_auc[0]:.3f}, {pr_auc[1]:.3f}], F1 {summary['f1']:.3f} (fold means, "
            "95% t-intervals)")
    if summary.get("baseline"):   # the fold mean too, as the classifier's (its pooled F1 is in report.json)
        line += f"; baseline ({summary['baseline']['source']}) F1 {summary['baseline']['cv']['f1']['mean']:.3f}"
    line += (f"; top group {group['group']} ({group['mean']:.2f}), features {', '.join(summary['top_features'][:3])}"
             f"; {CONTROL} rank {summary['control_rank']}/{summary['n_features']}")
    if summary.get("onset"):
        m = summary["onset"]["model"]
        line += (f"; when: right checkpoint {m['checkpoint_accuracy']:.2f} (median "
                 f"{summary['onset']['median_baseline']['checkpoint_accuracy']:.2f})")
    return line
