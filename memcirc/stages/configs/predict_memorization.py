r"""Predict which sequences a model memorizes from the data alone (the predict_memorization stage).

Reads the labels from <output-dir>/memorization/ (memorized = memorized_by >= threshold), or from a
pythia-memorized-evals-style table (--labels-file) plus random controls (--controls-file). Features:
surprisal under a smaller reference model, n-gram duplication and token rarity in the training corpus,
zlib compressibility, repetition, length/position, domain, and a shuffled control column. Writes
<output-dir>/predict/: features.jsonl, predictions.jsonl (out-of-fold probabilities, baseline),
summary.json (auroc, pr_auc of the best classifier with 95% intervals over folds), roc.png, pr.png,
importance.png, ngram_index.safetensors, manifest.json (last).

examples:
  python predict_memorization.py --config configs/testbed.yaml --output-dir runs/testbed
  python predict_memorization.py --output-dir runs/testbed --domain-column doc_kind --folds 10
  python predict_memorization.py --model EleutherAI/pythia-1.4b-deduped --output-dir runs/pythia \
      --labels-file EleutherAI/pythia-memorized-evals --labels-split deduped.1.4b \
      --controls-file EleutherAI/pile-deduped-pythia-random-sampled --label-column 1.4B \
      --baseline-column 160M --reference-model EleutherAI/pythia-70m-deduped \
      --corpus monology/pile-uncopyrighted --corpus-streaming --corpus-tokens 200000000 --prefix-len 32
  python predict_memorization.py --output-dir runs/b --index-file runs/a/predict/ngram_index.safetensors
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.option_groups import MemorizedRule


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
    ngram_index: str = option("auto", "n-gram index backend: tokengrams (suffix array on disk, any corpus size; "
                              "auto) or hash (in memory, small corpora)", choices=("auto", "tokengrams", "hash"),
                              hashed=False)
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
