"""The predict_memorization stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import MemorizedRule, StageConfig, option


@dataclass
class PredictConfig(MemorizedRule, StageConfig):
    """predict_memorization: features from the data alone -> classifiers of memorized vs not."""

    stage: ClassVar[str] = "predict_memorization"

    labels_file: str | None = option(None, "table of memorized sequences (pythia-memorized-evals style: JSONL/"
                                     "Parquet file, dataset folder or Hub id with a tokens/Tokens column, optional "
                                     "index/Index); default: the labels of <input-dir>/scores.jsonl")
    labels_split: str = option("train", "split of --labels-file when it is a dataset folder or Hub id")
    controls_file: str | None = option(None, "random-control table (label 0) to go with --labels-file")
    controls_split: str = option("train", "split of --controls-file when it is a dataset folder or Hub id")
    label_column: str | None = option(None, "table column holding a memorization score (e.g. '1.4B' in "
                                      "pile-*-pythia-random-sampled): label = score >= threshold where present")
    prefix_len: int | None = option(None, "table rows: prefix tokens (default: half the row)", minimum=1)
    suffix_len: int | None = option(None, "table rows: suffix tokens; rows are cut to prefix_len + suffix_len "
                                    "(default: the first row's length)", minimum=1)
    reference_model: str | None = option(None, "smaller reference model for the surprisal features (Hub id or "
                                         "folder; default for the testbed: its earliest checkpoint)")
    reference_revision: str | None = option(None, "revision of the reference model")
    baseline_model: str | None = option(None, "the seed's baseline predictor: 'memorized' = memorized by this "
                                        "(smaller) model, scored here, or a JSONL/Parquet table of its memorized "
                                        "sequences (default for the testbed: its last checkpoint)")
    baseline_revision: str | None = option(None, "revision of the baseline model")
    baseline_column: str | None = option(None, "instead of --baseline-model: a label-table column with a smaller "
                                         "model's memorization score (e.g. '160M'), memorized = score >= threshold")
    corpus: str = option("testbed", "training corpus for n-gram duplication counts and token rarity (file, "
                         "folder or Hub id; 'testbed': the testbed's training set, canaries repeated k times)")
    corpus_split: str = option("train", "split of a Hub / folder corpus")
    corpus_streaming: bool = option(False, "stream a Hub corpus (with --corpus-tokens)")
    corpus_tokens: int | None = option(None, "read at most this many corpus tokens into the n-gram index", minimum=1)
    ngram: int = option(8, "n of the n-gram duplication index", minimum=1)
    index_file: str | None = option(None, "reuse a saved ngram_index.safetensors instead of building one")
    domain_column: str = option("source", "window / table field used as the source/domain feature ('doc_kind': "
                                "the document id's leading word, e.g. canary / corpus on the testbed)")
    classifiers: list[str] = option(["gradient_boosting", "logistic_regression"], "classifiers to compare",
                                    choices=("gradient_boosting", "logistic_regression"))
    folds: int = option(5, "stratified cross-validation folds", minimum=2)
    permutation_repeats: int = option(10, "shuffles per feature for permutation importance", minimum=1)
    dynamics_dir: str | None = option(None, "optional: a training_dynamics folder; also predict the onset "
                                      "checkpoint of each memorized window ('auto': <output-dir>/dynamics when "
                                      "that stage has finished)")
    batch_size: int = option(32, "sequences per forward pass", aliases=("--batch_size",), minimum=1, hashed=False)


Config = PredictConfig


def run(cfg: PredictConfig) -> Any:
    from memcirc.predict import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's line in the run report."""
    from memcirc.predict import headline as _headline

    return _headline(summary)
