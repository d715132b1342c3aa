"""Predicting memorization from the data alone (the predict_memorization stage; the seed "Predicting
Memorization", after Biderman et al. 2023, "Emergent and Predictable Memorization").

Labels: the windows of a memorization run (`memorized_by >= threshold` in `scores.jsonl`), or a
table of memorized sequences (pythia-memorized-evals style: `tokens`, `index`) plus a random-control
table (`Tokens`, `Index`), optionally labelled by a score column. Features never look at the target
model: surprisal under a smaller reference model, n-gram duplication and token rarity in the training
corpus (an index built once and saved), zlib compressibility, repetition inside the sequence, length
and position, the source/domain, and `control_shuffled` (a shuffled copy of `dup_mean`: where "no
information" sits in the importance ranking). The label's own provenance (the testbed's `group`,
which is k, or which table a row came from) is never a feature.

Choices:
- n-gram index: each n-gram of token ids is hashed to 64 bits (polynomial hash mod 2^64, then the
  splitmix64 finalizer); the index is the sorted unique hashes with their counts, and the corpus
  unigram counts, in `ngram_index.safetensors` with metadata (kind, n, tokenizer vocab hash, corpus
  identity, token count). N-grams never cross a document boundary. A lookup is `searchsorted`.
- Classifiers: scikit-learn GradientBoostingClassifier with class-balanced sample weights, and
  LogisticRegression(class_weight="balanced") on standardized features. StratifiedKFold (shuffled,
  seeded); every classifier sees the same folds; predictions are out-of-fold.
- Metrics are computed here (numpy/scipy; tests check them against sklearn.metrics): AUROC (Mann-
  Whitney, ties counted one half), PR-AUC as average precision (sklearn's step-wise sum, no
  interpolation), and precision / recall / F1 at probability >= 0.5 of the class-balanced model, a
  fixed rule that never looks at a test fold. Per-fold values -> mean and a 95 % Student-t interval
  over the folds (clipped to [0, 1]); pooled out-of-fold values are reported too.
- Best classifier: the highest mean cross-validated AUROC (ties: PR-AUC).
- Importance: permutation importance on each held-out fold (sklearn.inspection, seeded): the drop in
  held-out PR-AUC (with rare positives AUROC is dominated by the many easy negatives and barely moves),
  per feature and per feature group (a group's columns permuted together with one permutation, so
  correlated features of one kind are not hidden by each other).
- Baseline (the seed's): "memorized by a smaller model": a model scored here with the same
  definition, a table of its memorized sequences, or a score column of the label tables.
- "When" (optional, --dynamics-dir): for the windows a training_dynamics run finds memorized for good,
  a GradientBoostingRegressor on the same features predicts log(1 + onset step), out of fold (KFold,
  seeded); reported as Spearman rho, mean absolute error in steps and the share snapped to the right
  checkpoint, against predicting the training folds' median onset.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.data import Columns, Window, load_documents, load_hub_dataset
from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, ModelSpec, load
from memcirc.scoring import pad_batch, score_windows
from memcirc.stages.predict_memorization import PredictConfig
from memcirc.testbed import CHECKPOINTS_DIR, CORPUS_DIR, GROUND_TRUTH, TESTBED_NAME, checkpoint_folders

log = logging.getLogger(__name__)

STAGE = "predict_memorization"
FEATURES_JSONL = "features.jsonl"
PREDICTIONS_JSONL = "predictions.jsonl"
NGRAM_INDEX = "ngram_index.safetensors"
ROC_PNG = "roc.png"
PR_PNG = "pr.png"
IMPORTANCE_PNG = "importance.png"
FEATURES_PNG = "features.png"
ONSET_PNG = "onset.png"
ONSETS_JSONL = "onsets.jsonl"    # written by training_dynamics: per window onset_step (None: not memorized at the end)
INDEX_KIND = "memcirc-ngram-index"
INDEX_VERSION = 1
DECISION_THRESHOLD = 0.5
CONTROL = "control_shuffled"
DOC_KIND = "doc_kind"            # domain_column value: the document id's leading word (canary, corpus)
RARE_MASS = 0.9                  # a token is rare outside the most frequent tokens holding 90 % of the corpus
TOKEN_COLUMNS = ("tokens", "Tokens", "input_ids", "token_ids")
INDEX_COLUMNS = ("index", "Index")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
CLASSIFIERS = ("gradient_boosting", "logistic_regression")
METRICS = ("auroc", "pr_auc", "precision", "recall", "f1")

FEATURE_GROUPS = {
    "logprob_mean": "surprisal", "logprob_min": "surprisal", "logprob_std": "surprisal",
    "suffix_logprob_mean": "surprisal",
    "dup_mean": "duplication", "dup_max": "duplication", "dup_min": "duplication",
    "dup_prefix_min": "duplication", "dup_novel_share": "duplication",
    "zlib_ratio": "compressibility",
    "distinct_token_share": "repetition", "repeated_bigram_share": "repetition",
    "rare_token_share": "rarity", "unigram_logfreq_mean": "rarity",
    "length": "length/position", "offset": "length/position", "train_index": "length/position",
    CONTROL: "control",
}
FEATURE_DEFINITIONS = {
    "logprob_mean": "mean log-probability (nats) of the sequence's tokens under the reference model (each token "
                    "given the ones before it; the first token has no prediction)",
    "logprob_min": "lowest token log-probability under the reference model",
    "logprob_std": "standard deviation of the token log-probabilities under the reference model",
    "suffix_logprob_mean": "mean log-probability of the suffix tokens (the part a memorizing model must "
                           "reproduce) under the reference model",
    "dup_mean": "mean over the sequence's n-grams of log(1 + corpus count)",
    "dup_max": "max over the sequence's n-grams of log(1 + corpus count)",
    "dup_min": "min over the sequence's n-grams of log(1 + corpus count)",
    "dup_prefix_min": "min over the prefix's n-grams of log(1 + corpus count) (an upper bound of the count of "
                      "the exact prefix)",
    "dup_novel_share": "share of the sequence's n-grams that never occur in the corpus",
    "zlib_ratio": "zlib-compressed / raw UTF-8 bytes of the decoded text (lower = more compressible)",
    "distinct_token_share": "distinct tokens / tokens",
    "repeated_bigram_share": "1 - distinct token bigrams / bigrams",
    "rare_token_share": f"share of tokens outside the most frequent corpus tokens that hold {RARE_MASS:.0%} of the "
                        "corpus (unseen tokens are rare)",
    "unigram_logfreq_mean": "mean log relative corpus frequency of the tokens (add-one smoothed)",
    "length": "tokens in the sequence",
    "offset": "token offset of the window inside its document",
    "train_index": "the table's index column (position in the training order)",
    "domain=<value>": "one-hot source/domain (domain_column)",
    CONTROL: "dup_mean with its rows shuffled (seeded): carries no information about the label",
}


# -- labelled sequences ----------------------------------------------------------------------

@dataclass
class Example:
    """One labelled sequence: `tokens[:prefix_len]` is the prompt, the rest the suffix."""

    id: str
    tokens: np.ndarray
    prefix_len: int
    label: int
    origin: str                     # scores | labels | controls (provenance only, never a feature)
    domain: str | None = None
    offset: int | None = None
    train_index: int | None = None
    baseline_score: float | None = None   # value of --baseline-column

    def window(self) -> Window:
        return Window(id=self.id, tokens=self.tokens, prefix_len=self.prefix_len, source=self.origin,
                      doc=self.id, offset=self.offset or 0)


def doc_kind(doc: str) -> str:
    """The leading word of a document id: 'canary-k08-03' -> 'canary', 'corpus-0001' -> 'corpus'
    (never the k inside a canary id)."""
    match = re.match(r"[A-Za-z_]+", doc)
    return match.group(0).rstrip("_") if match else "other"


def examples_from_scores(stage_dir: Path, memorized_by: str, threshold: float, domain_column: str,
                         testbed_data: bool) -> list[Example]:
    """Every window of a finished memorization run, labelled `memorized_by >= threshold`."""
    rows = list(art.read_jsonl(stage_dir / art.SCORES_JSONL))
    if not rows:
        raise InputError(f"{stage_dir}/scores.jsonl holds no windows")
    if memorized_by not in rows[0]:
        raise InputError(f"{stage_dir}/scores.jsonl has no '{memorized_by}' column; score it with --metrics "
                         f"{memorized_by} or choose another --memorized-by")
    if domain_column == "group" and testbed_data:
        raise InputError("domain_column 'group' is the testbed's k=<k> (how often a canary was inserted): it "
                         f"encodes the label; use '{DOC_KIND}' (canary / corpus) or 'source'")
    out = []
    for r in rows:
        domain = doc_kind(str(r.get("doc", ""))) if domain_column == DOC_KIND else r.get(domain_column)
        out.append(Example(id=r["id"], tokens=np.asarray(r["tokens"], np.int64), prefix_len=int(r["prefix_len"]),
                           label=int(float(r[memorized_by]) >= threshold), origin="scores",
                           domain=None if domain is None else str(domain), offset=int(r.get("offset", 0))))
    return out


def table_rows(source: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a local JSONL/Parquet file, or of a dataset folder or Hub id (🤗 datasets, `split`)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise InputError(f"{path} is not a readable Parquet file ({e})") from None
            for batch in table.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
            return
        if path.suffix not in TABLE_SUFFIXES:
            raise InputError(f"{path}: label tables are JSONL or Parquet files (or a dataset folder / Hub id)")
        yield from art.read_jsonl(path)
        return
    if path.suffix in TABLE_SUFFIXES or source.startswith((".", "/")) and not path.exists():
        raise InputError(f"label table not found: {source}")
    yield from load_hub_dataset(source, split, what="label table")


def _pick(row: dict[str, Any], names: Sequence[str]) -> str | None:
    return next((c for c in names if c in row), None)


def examples_from_tables(cfg: PredictConfig) -> list[Example]:
    """--labels-file rows (label 1, or `label_column >= threshold`) and --controls-file rows (label 0,
    or the same rule). Rows are cut to prefix_len + suffix_len tokens; a sequence in both tables is
    kept once, memorized (the random controls of a training set contain memorized sequences)."""
    tables = [("labels", cfg.labels_file, cfg.labels_split, 1)]
    if cfg.controls_file:
        tables.append(("controls", cfg.controls_file, cfg.controls_split, 0))
    length = cfg.prefix_len + cfg.suffix_len if cfg.prefix_len and cfg.suffix_len else None
    by_tokens: dict[tuple[int, ...], Example] = {}
    short = 0
    for origin, source, split, default_label in tables:
        n_rows = 0
        for i, row in enumerate(table_rows(source, split)):
            if cfg.limit is not None and i >= cfg.limit:   # smoke runs: at most --limit rows of each table
                break
            n_rows += 1
            token_col = _pick(row, TOKEN_COLUMNS)
            if token_col is None or not isinstance(row[token_col], (list, tuple, np.ndarray)):
                raise InputError(f"{source}: row {i} has no token list (columns {', '.join(TOKEN_COLUMNS)}); "
                                 f"columns found: {', '.join(row)}")
            tokens = np.asarray(row[token_col], np.int64)
            if length is None:
                length = len(tokens)
            if len(tokens) < length or length < 2:
                short += 1
                continue
            tokens = tokens[:length]
            index_col = _pick(row, INDEX_COLUMNS)
            index = int(row[index_col]) if index_col else None
            label = default_label
            if cfg.label_column and cfg.label_column in row:
                label = int(float(row[cfg.label_column]) >= cfg.threshold)
            baseline = None
            if cfg.baseline_column:
                if cfg.baseline_column not in row:
                    raise InputError(f"{source}: no baseline column '{cfg.baseline_column}'; columns found: "
                                     f"{', '.join(row)}")
                baseline = float(row[cfg.baseline_column])
            domain = row.get(cfg.domain_column)
            example = Example(id=f"{origin}:{index if index is not None else i}", tokens=tokens,
                              prefix_len=cfg.prefix_len or length // 2, label=label, origin=origin,
                              domain=None if domain is None else str(domain), train_index=index,
                              baseline_score=baseline)
            key = tuple(tokens.tolist())
            if key in by_tokens:
                by_tokens[key].label = max(by_tokens[key].label, label)
            else:
                by_tokens[key] = example
        if n_rows == 0:
            raise InputError(f"the {origin} table {source} holds no rows")
    if short:
        log.info("%d table rows shorter than %d tokens skipped", short, length)
    examples = list(by_tokens.values())
    if not examples:
        raise InputError(f"every row of {cfg.labels_file} is shorter than {length} tokens (prefix + suffix)")
    if not 1 <= examples[0].prefix_len < length:
        raise InputError(f"prefix_len {examples[0].prefix_len} leaves no suffix in {length}-token rows")
    return examples


def check_classes(examples: Sequence[Example], folds: int, where: str) -> None:
    n_pos = sum(e.label for e in examples)
    n_neg = len(examples) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "memorized" if n_neg == 0 else "non-memorized"
        raise InputError(f"the labels from {where} hold one class only ({len(examples)} {only} sequences): a "
                         "classifier needs both; add controls (--controls-file) or change --threshold")
    if min(n_pos, n_neg) < folds:
        raise InputError(f"{min(n_pos, n_neg)} {'memorized' if n_pos < n_neg else 'non-memorized'} sequences "
                         f"in {where} cannot fill {folds} stratified folds: use fewer --folds or more data")


def check_tokens(examples: Sequence[Example], model: torch.nn.Module, what: str) -> None:
    """Every token id must be one the model can embed, every sequence fit its context."""
    from memcirc.models.arch import n_ctx

    vocab = model.get_input_embeddings().weight.shape[0]
    context = n_ctx(model)
    longest = max(len(e.tokens) for e in examples)
    if context is not None and longest > context:
        raise InputError(f"sequences of {longest} tokens exceed the {what}'s context ({context}): use shorter rows "
                         "(--prefix-len / --suffix-len)")
    for e in examples:
        if int(e.tokens.max()) >= vocab or int(e.tokens.min()) < 0:
            bad = int(e.tokens.max()) if int(e.tokens.max()) >= vocab else int(e.tokens.min())
            raise InputError(f"sequence {e.id} has token id {bad} outside the {what}'s vocabulary (size {vocab}): "
                             "the labels were tokenized for another model")


def tokenizer_sha256(tokenizer: Any) -> str:
    """Identity of a tokenizer's vocabulary (token -> id), independent of its padding settings."""
    return art.sha256_json(sorted(tokenizer.get_vocab().items()))


def recorded_tokenizer_sha256(identity: dict[str, Any]) -> str | None:
    """The vocab hash of the tokenizer a manifest's model used (from its folder or the HF cache)."""
    if identity.get("tokenizer_sha256"):
        return identity["tokenizer_sha256"]
    from transformers import AutoTokenizer

    from memcirc.testbed import MODEL_DIR

    candidates = [(identity.get("local_path"), {})]
    if identity.get("name_or_path") == TESTBED_NAME:
        candidates.append((str(MODEL_DIR), {}))
    else:
        candidates.append((identity.get("name_or_path"), {"revision": identity.get("revision")}))
    for ref, kwargs in candidates:
        if not ref:
            continue
        try:
            return tokenizer_sha256(AutoTokenizer.from_pretrained(ref, **{k: v for k, v in kwargs.items() if v}))
        except (OSError, ValueError, TypeError):
            continue
    return None


# -- the n-gram index ------------------------------------------------------------------------

_MULT = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the polynomial hash over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every n-gram along the last axis: [..., L] -> [..., L - n + 1]."""
    t = np.asarray(tokens).astype(np.uint64)
    m = t.shape[-1] - n + 1
    if m <= 0:
        return np.empty((*t.shape[:-1], 0), np.uint64)
    h = np.zeros((*t.shape[:-1], m), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + (t[..., j:j + m] + np.uint64(1))
        return _mix64(h)


@dataclass
class NgramIndex:
    """Counts of the corpus's n-grams (sorted unique hashes) and of its tokens."""

    n: int
    hashes: np.ndarray        # uint64, sorted, unique
    counts: np.ndarray        # int64
    unigram: np.ndarray       # int64, one count per token id
    meta: dict[str, Any] = field(default_factory=dict)

    def count(self, hashes: np.ndarray) -> np.ndarray:
        """Corpus count of each hash (0 where absent), same shape."""
        if self.hashes.size == 0:
            return np.zeros(hashes.shape, np.int64)
        pos = np.searchsorted(self.hashes, hashes).clip(max=self.hashes.size - 1)
        return np.where(self.hashes[pos] == hashes, self.counts[pos], 0)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save

        meta = {"kind": INDEX_KIND, "version": str(INDEX_VERSION), "n": str(self.n),
                **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in self.meta.items()}}
        blob = save({"hashes": self.hashes, "counts": self.counts, "unigram": self.unigram}, metadata=meta)
        art.atomic_write_bytes(path, art.canonical_safetensors(blob))   # same bytes in every process


def load_index(path: Path) -> NgramIndex:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise InputError(f"n-gram index file not found: {path}")
    try:
        with safe_open(str(path), "np") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise InputError(f"{path} is not a safetensors n-gram index ({e})") from None
    if meta.get("kind") != INDEX_KIND or not {"hashes", "counts", "unigram"} <= set(tensors):
        raise InputError(f"{path} is not an n-gram index written by predict_memorization")
    n = int(meta.pop("n"))
    meta.pop("kind")
    meta.pop("version", None)
    return NgramIndex(n, tensors["hashes"], tensors["counts"], tensors["unigram"], meta)


def build_index(documents: Iterable[np.ndarray], n: int, vocab_size: int, token_budget: int | None = None,
                flush_every: int = 1 << 23) -> NgramIndex:
    """Count the n-grams (within each document) and tokens of `documents`, up to `token_budget` tokens."""
    unigram = np.zeros(vocab_size, np.int64)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[np.ndarray] = []
    n_pending = n_tokens = n_docs = 0

    def flush() -> None:
        nonlocal n_pending
        if pending:
            parts.append(np.unique(np.concatenate(pending), return_counts=True))
            pending.clear()
            n_pending = 0

    for tokens in documents:
        tokens = np.asarray(tokens, np.int64)
        if token_budget is not None:
            tokens = tokens[:token_budget - n_tokens]
        if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
            raise InputError(f"corpus token id {int(tokens.max())} is outside the tokenizer's vocabulary "
                             f"({vocab_size}): pretokenized corpus of another tokenizer?")
        unigram += np.bincount(tokens, minlength=vocab_size)
        h = ngram_hashes(tokens, n)
        pending.append(h)
        n_pending += h.size
        n_tokens += tokens.size
        n_docs += 1
        if n_pending >= flush_every:
            flush()
        if token_budget is not None and n_tokens >= token_budget:
            break
    flush()
    if n_tokens == 0:
        raise InputError("the corpus holds no tokens: nothing to count n-grams in")
    if len(parts) == 1:
        hashes, counts = parts[0]
    elif parts:
        hashes, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts])).round()
    else:
        hashes, counts = np.empty(0, np.uint64), np.empty(0, np.int64)
    return NgramIndex(n, hashes.astype(np.uint64), np.asarray(counts, np.int64), unigram,
                      {"n_tokens": str(n_tokens), "n_documents": str(n_docs)})


def testbed_corpus(tokenizer: Any) -> Iterator[np.ndarray]:
    """The testbed's training set as training saw it: train.txt in fixed seq_len chunks, then each
    canary's tokens k times (the corpus filler after a canary is counted once, as train.txt)."""
    truth = art.read_json(GROUND_TRUTH)
    seq_len = int(truth["recipe"]["seq_len"])
    ids = np.asarray(tokenizer((CORPUS_DIR / "train.txt").read_text(), add_special_tokens=False)["input_ids"],
                     np.int64)
    for i in range(len(ids) // seq_len):
        yield ids[i * seq_len:(i + 1) * seq_len]
    for canary in truth["canaries"]:
        for _ in range(int(canary["k"])):
            yield np.asarray(canary["token_ids"], np.int64)


def corpus_documents(cfg: PredictConfig, tokenizer: Any) -> Iterator[np.ndarray]:
    if cfg.corpus == TESTBED_NAME:
        yield from testbed_corpus(tokenizer)
        return
    docs = load_documents(cfg.corpus, Columns(), split=cfg.corpus_split, streaming=cfg.corpus_streaming)
    for doc in docs:
        ids = doc.tokens if doc.tokens is not None else tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        yield np.asarray(ids, np.int64)


def corpus_identity(cfg: PredictConfig) -> dict[str, Any]:
    """What the n-gram counts depend on (besides n and the tokenizer)."""
    ident: dict[str, Any] = {"corpus": cfg.corpus, "corpus_tokens": cfg.corpus_tokens}
    if cfg.corpus == TESTBED_NAME:
        ident.update(train_sha256=art.sha256_file(CORPUS_DIR / "train.txt"),
                     ground_truth_sha256=art.sha256_file(GROUND_TRUTH))
        return ident
    path = Path(cfg.corpus)
    if path.is_file():
        ident["sha256"] = art.sha256_file(path)
    elif path.is_dir():
        ident["files"] = art.sha256_json(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                                for p in path.rglob("*") if p.is_file()))
    else:
        ident.update(split=cfg.corpus_split, streaming=cfg.corpus_streaming)
    return ident


# -- features --------------------------------------------------------------------------------

def zlib_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def repetition_features(tokens: np.ndarray) -> dict[str, float]:
    t = np.asarray(tokens)
    bigrams = {(int(a), int(b)) for a, b in zip(t[:-1], t[1:])}
    return {"distinct_token_share": len(set(t.tolist())) / len(t),
            "repeated_bigram_share": 1.0 - len(bigrams) / max(len(t) - 1, 1)}


def duplication_features(tokens: np.ndarray, prefix_len: int, index: NgramIndex) -> dict[str, float]:
    counts = index.count(ngram_hashes(tokens, index.n))
    if counts.size == 0:
        return {"dup_mean": 0.0, "dup_max": 0.0, "dup_min": 0.0, "dup_prefix_min": 0.0, "dup_novel_share": 1.0}
    logc = np.log1p(counts)
    prefix = logc[:max(prefix_len - index.n + 1, 1)]
    return {"dup_mean": float(logc.mean()), "dup_max": float(logc.max()), "dup_min": float(logc.min()),
            "dup_prefix_min": float(prefix.min()), "dup_novel_share": float((counts == 0).mean())}


def rare_tokens(unigram: np.ndarray, mass: float = RARE_MASS) -> np.ndarray:
    """Boolean per token id: outside the most frequent tokens that together hold `mass` of the corpus."""
    order = np.argsort(-unigram, kind="stable")
    cum = np.cumsum(unigram[order])
    common = int(np.searchsorted(cum, mass * cum[-1])) + 1 if cum[-1] > 0 else 0
    rare = np.ones(unigram.size, bool)
    rare[order[:common]] = False
    return rare


def rarity_features(tokens: np.ndarray, unigram: np.ndarray, rare: np.ndarray) -> dict[str, float]:
    freq = (unigram[tokens] + 1.0) / (unigram.sum() + unigram.size)
    return {"rare_token_share": float(rare[tokens].mean()), "unigram_logfreq_mean": float(np.log(freq).mean())}


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, sequences: Sequence[np.ndarray], pad_id: int,
                   batch_size: int) -> list[np.ndarray]:
    """log p(t_i | t_<i) for i >= 1 of every sequence (length L - 1 each), one forward pass per batch."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = [np.empty(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    starts = range(0, len(order), batch_size)
    for b in progress(starts, "reference log-probs", total=len(starts)):
        idx = order[b:b + batch_size]
        ids, mask = pad_batch([sequences[i] for i in idx], pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = lp[row, :len(sequences[i]) - 1].astype(np.float64)
    return out


def surprisal_features(logprobs: np.ndarray, prefix_len: int) -> dict[str, float]:
    suffix = logprobs[max(prefix_len - 1, 0):]
    return {"logprob_mean": float(logprobs.mean()), "logprob_min": float(logprobs.min()),
            "logprob_std": float(logprobs.std()), "suffix_logprob_mean": float(suffix.mean())}


@dataclass
class FeatureTable:
    names: list[str]
    X: np.ndarray                   # float64 [n, features]
    groups: dict[str, str]          # feature -> group
    dropped: list[str]              # constant columns left out

    def group_columns(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for j, name in enumerate(self.names):
            out.setdefault(self.groups[name], []).append(j)
        return out


def compute_features(examples: Sequence[Example], reference: LoadedModel, index: NgramIndex, *, batch_size: int,
                     seed: int) -> FeatureTable:
    """Every feature of every example; constant columns are dropped (and listed)."""
    tok = reference.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    logprobs = token_logprobs(reference.model, [e.tokens for e in examples], pad, batch_size)
    rare = rare_tokens(index.unigram)
    texts = tok.batch_decode([e.tokens.tolist() for e in examples])
    rows: list[dict[str, float]] = []
    for e, lp, text in zip(examples, logprobs, texts):
        row = {**surprisal_features(lp, e.prefix_len), **duplication_features(e.tokens, e.prefix_len, index),
               "zlib_ratio": zlib_ratio(text), **repetition_features(e.tokens),
               **rarity_features(e.tokens, index.unigram, rare), "length": float(len(e.tokens))}
        if e.offset is not None:
            row["offset"] = float(e.offset)
        if e.train_index is not None:
            row["train_index"] = float(e.train_index)
        rows.append(row)
    names = [n for n in FEATURE_GROUPS if n != CONTROL and all(n in r for r in rows)]
    groups = {n: FEATURE_GROUPS[n] for n in names}
    columns = [np.array([r[n] for r in rows]) for n in names]
    domains = sorted({e.domain for e in examples if e.domain is not None})
    if domains:
        for d in domains:
            names.append(f"domain={d}")
            groups[names[-1]] = "domain"
            columns.append(np.array([float(e.domain == d) for e in examples]))
    rng = np.random.default_rng(seed)
    names.append(CONTROL)
    groups[CONTROL] = "control"
    columns.append(rng.permutation(columns[names.index("dup_mean")]))
    X = np.stack(columns, axis=1)
    keep = [j for j in range(X.shape[1]) if np.ptp(X[:, j]) > 0]
    dropped = [names[j] for j in range(X.shape[1]) if j not in keep]
    if dropped:
        log.info("constant features left out: %s", ", ".join(dropped))
    names = [names[j] for j in keep]
    return FeatureTable(names, X[:, keep], {n: groups[n] for n in names}, dropped)


# -- metrics (checked against sklearn.metrics in tests) --------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative) + 1/2 P(tie) (Mann-Whitney U)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(score, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _descending_counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tp, fp) at every distinct score, from the highest down."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    s, t = score[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]   # the last row of each distinct score
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    return s[last], tp.astype(np.float64), fp.astype(np.float64)


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Σ_k (R_k - R_{k-1}) P_k over the distinct thresholds, highest first (no interpolation)."""
    _, tp, fp = _descending_counts(y, score)
    if tp[-1] == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0)."""
    _, tp, fp = _descending_counts(y, score)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def pr_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, highest first."""
    _, tp, fp = _descending_counts(y, score)
    return tp / tp[-1], tp / (tp + fp)


def threshold_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = DECISION_THRESHOLD) -> dict[str, float]:
    """precision, recall, F1 of `prob >= threshold` (0 where undefined, as zero_division=0)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(prob) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def all_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = DECISION_THRESHOLD) -> dict[str, float]:
    return {"auroc": roc_auc(y, prob), "pr_auc": average_precision(y, prob), **threshold_metrics(y, prob, threshold)}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (e.g. per-fold scores), clipped to [0, 1]."""
    from scipy.stats import t

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if v.size < 2 or float(v.std(ddof=1)) == 0.0:
        return (mean, mean)
    half = float(t.ppf(0.5 + confidence / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return (max(mean - half, 0.0), min(mean + half, 1.0))


def aggregate(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in METRICS:
        values = [f[m] for f in per_fold]
        lo, hi = t_interval(values)
        out[m] = {"mean": round(float(np.mean(values)), 6), "ci95": [round(lo, 6), round(hi, 6)],
                  "folds": [round(float(v), 6) for v in values]}
    return out


# -- classifiers and importance --------------------------------------------------------------

def make_classifier(name: str, seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "gradient_boosting":
        return GradientBoostingClassifier(random_state=seed)
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000))
    raise InputError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def fit_classifier(name: str, model: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """Class imbalance: balanced sample weights (boosting) or class_weight='balanced' (logistic)."""
    if name == "gradient_boosting":
        from sklearn.utils.class_weight import compute_sample_weight

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
            Xp[:, cols] = Xp[np.ix_(idx, cols)]
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


def cross_validate(features: FeatureTable, y: np.ndarray, names: Sequence[str], *, folds: int, seed: int,
                   repeats: int) -> tuple[np.ndarray, dict[str, CVResult]]:
    """Stratified k-fold: every classifier on the same folds; out-of-fold probabilities, per-fold
    metrics, permutation importance on each held-out fold."""
    from sklearn.inspection import permutation_importance
    from sklearn.model_selection import StratifiedKFold

    X = features.X
    fold_of = np.full(len(y), -1)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    for k, (_, test) in enumerate(splits):
        fold_of[test] = k
    results = {n: CVResult(n, np.zeros(len(y)), [], {f: [] for f in features.names},
                           {g: [] for g in features.group_columns()}) for n in names}
    for k, (train, test) in enumerate(progress(splits, "cross-validation", total=folds)):
        for name in names:
            model = fit_classifier(name, make_classifier(name, seed), X[train], y[train])
            prob = model.predict_proba(X[test])[:, 1]
            res = results[name]
            res.oof[test] = prob
            res.per_fold.append(all_metrics(y[test], prob))
            imp = permutation_importance(model, X[test], y[test], scoring=pr_auc_scorer, n_repeats=repeats,
                                         random_state=seed + k)
            for j, f in enumerate(features.names):
                res.importance[f].extend(imp.importances[j].tolist())
            for g, drops in group_permutation_importance(model, X[test], y[test], features.group_columns(),
                                                         repeats, seed + k).items():
                res.group_importance[g].extend(drops.tolist())
    return fold_of, results


def _ranking(importance: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = [{"feature": f, "mean": round(float(np.mean(v)), 6), "sd": round(float(np.std(v)), 6)}
            for f, v in importance.items()]
    return sorted(rows, key=lambda r: (-r["mean"], r["feature"]))


# -- baseline --------------------------------------------------------------------------------

def baseline_predictions(cfg: PredictConfig, examples: Sequence[Example], baseline: LoadedModel | None,
                         memorized_table: set[tuple[int, ...]] | None) -> np.ndarray | None:
    """1 where the smaller model memorized the sequence (same definition as the labels), else 0."""
    if cfg.baseline_column:
        return np.array([float(e.baseline_score) >= cfg.threshold for e in examples], np.float64)
    if memorized_table is not None:
        return np.array([tuple(e.tokens.tolist()) in memorized_table for e in examples], np.float64)
    if baseline is None:
        return None
    tok = baseline.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = score_windows(baseline.model, [e.window() for e in examples], pad_id=pad, batch_size=cfg.batch_size,
                         metrics=[cfg.memorized_by])
    return np.array([float(r[cfg.memorized_by]) >= cfg.threshold for r in rows], np.float64)


def memorized_table_tokens(source: str, split: str, length: int) -> set[tuple[int, ...]]:
    out = set()
    for i, row in enumerate(table_rows(source, split)):
        col = _pick(row, TOKEN_COLUMNS)
        if col is None:
            raise InputError(f"{source}: row {i} has no token list (columns {', '.join(TOKEN_COLUMNS)})")
        out.add(tuple(int(t) for t in row[col][:length]))
    if not out:
        raise InputError(f"the baseline table {source} holds no rows")
    return out


# -- when: the onset checkpoint -------------------------------------------------------------

def onset_targets(dynamics_dir: Path, examples: Sequence[Example], folds: int) -> tuple[dict[str, Any], np.ndarray,
                                                                                         np.ndarray, list[int]]:
    """(dynamics manifest, example indices with an onset, their onset steps, the checkpoint steps)."""
    manifest = read_manifest(dynamics_dir, what="training_dynamics")
    onsets = {r["id"]: r.get("onset_step") for r in art.read_jsonl(dynamics_dir / ONSETS_JSONL)}
    steps = sorted({int(c["step"]) for c in art.read_json(dynamics_dir / art.SUMMARY_JSON).get("checkpoints", [])
                    if c.get("step") is not None})
    matched = [i for i, e in enumerate(examples) if e.id in onsets]
    if not matched:
        raise InputError(f"no sequence of the labels has a row in {dynamics_dir}/{ONSETS_JSONL}: run "
                         "training_dynamics on the same memorization run")
    rows = [i for i in matched if onsets[examples[i].id] is not None]
    target = np.array([float(onsets[examples[i].id]) for i in rows])
    if len(rows) < max(folds, 2) or len(set(target.tolist())) < 2:
        raise InputError(f"{len(rows)} windows of {dynamics_dir} have an onset ({len(set(target.tolist()))} distinct "
                         f"steps): predicting when needs at least {max(folds, 2)} and two distinct steps")
    return manifest, np.array(rows), target, steps or sorted(set(target.astype(int).tolist()))


def predict_onsets(X: np.ndarray, target: np.ndarray, steps: Sequence[int], *, folds: int, seed: int
                   ) -> dict[str, Any]:
    """Out-of-fold onset predictions (regression on log(1 + step)) and their scores against the median."""
    from scipy.stats import spearmanr
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.model_selection import KFold

    predicted, median = np.zeros(len(target)), np.zeros(len(target))
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        model = GradientBoostingRegressor(random_state=seed).fit(X[train], np.log1p(target[train]))
        predicted[test] = np.expm1(model.predict(X[test]))
        median[test] = np.median(target[train])
    grid = np.asarray(steps, np.float64)

    def snap(v: np.ndarray) -> np.ndarray:
        return grid[np.abs(np.log1p(v)[:, None] - np.log1p(grid)[None, :]).argmin(axis=1)]

    def scores(p: np.ndarray) -> dict[str, Any]:
        rho = spearmanr(p, target).statistic if np.ptp(p) > 0 else float("nan")
        return {"spearman": None if math.isnan(rho) else round(float(rho), 6),
                "mae_steps": round(float(np.abs(p - target).mean()), 3),
                "checkpoint_accuracy": round(float((snap(p) == target).mean()), 6)}

    return {"n": len(target), "steps": list(map(int, steps)), "predicted": predicted, "snapped": snap(predicted),
            "model": scores(predicted), "median_baseline": scores(median)}


def onset_figure(target: np.ndarray, result: dict[str, Any], path: Path) -> None:
    from memcirc.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 5))
    jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(target))
    ax.scatter(np.log1p(target) + jitter, np.log1p(result["predicted"]), s=18, alpha=0.7)
    ticks = np.log1p(result["steps"])
    ax.plot([ticks.min(), ticks.max()], [ticks.min(), ticks.max()], color="grey", lw=0.8, ls=":")
    ax.set_xticks(ticks, [str(s) for s in result["steps"]], fontsize=8)
    ax.set_yticks(ticks, [str(s) for s in result["steps"]], fontsize=8)
    m, b = result["model"], result["median_baseline"]
    ax.set_xlabel("onset checkpoint (training_dynamics)")
    ax.set_ylabel("predicted onset (out of fold)")
    ax.set_title(f"when: Spearman {_num(m['spearman'])}, right checkpoint {m['checkpoint_accuracy']:.2f} "
                 f"(median: {b['checkpoint_accuracy']:.2f})", fontsize=9)
    save_figure(fig, path)


# -- the stage -------------------------------------------------------------------------------

def _labelled(cfg: PredictConfig) -> tuple[list[Example], list[dict[str, Any]], dict[str, Any] | None, str]:
    """(examples, fingerprint inputs, upstream manifest or None, where the labels come from)."""
    if cfg.labels_file:
        if cfg.domain_column == DOC_KIND:
            raise InputError(f"domain_column '{DOC_KIND}' needs document ids (a memorization run); name a column "
                             "of the label tables instead")
        examples = examples_from_tables(cfg)
        inputs = []
        for source, split in ((cfg.labels_file, cfg.labels_split), (cfg.controls_file, cfg.controls_split)):
            if source:
                entry: dict[str, Any] = {"path": source}
                entry.update({"sha256": art.sha256_file(Path(source))} if Path(source).is_file() else {"split": split})
                inputs.append(entry)
        where = " + ".join(s for s in (cfg.labels_file, cfg.controls_file) if s)
        return examples, inputs, None, where
    if cfg.controls_file:
        raise InputError("--controls-file goes with --labels-file (the memorized table)")
    upstream_dir = cfg.upstream_dir
    upstream = read_manifest(upstream_dir, what="memorization")
    testbed_data = upstream.get("config", {}).get("dataset") == TESTBED_NAME
    examples = examples_from_scores(upstream_dir, cfg.memorized_by, cfg.threshold, cfg.domain_column, testbed_data)
    return examples, [{"path": str(upstream_dir), "run_id": upstream["run_id"]}], upstream, f"{upstream_dir}"


def _testbed_checkpoints() -> list[Path]:
    """The testbed's intermediate checkpoint folders in training order (the final model left out)."""
    found = [folder for _, folder in checkpoint_folders()[:-1]]
    if not found:
        raise InputError(f"the testbed has no intermediate checkpoints in {CHECKPOINTS_DIR}: run `make testbed`")
    return found


def _model_specs(cfg: PredictConfig) -> tuple[ModelSpec, ModelSpec | None, str | None]:
    """(reference spec, baseline model spec or None, baseline table or None)."""
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
        return spec, None, None
    baseline = cfg.baseline_model or str(_testbed_checkpoints()[-1])
    if Path(baseline).is_file() and Path(baseline).suffix in TABLE_SUFFIXES:
        return spec, None, baseline
    return spec, ModelSpec(baseline, revision=cfg.baseline_revision, dtype=cfg.dtype, device=cfg.device,
                           attn_implementation=cfg.attn_implementation), None


def _model_name(spec: ModelSpec) -> str:
    path = Path(spec.name_or_path).resolve()
    if path.parent == CHECKPOINTS_DIR:
        return f"testbed {path.name}"
    return spec.name_or_path + (f"@{spec.revision}" if spec.revision else "")


def _index_meta(n: int, tok_sha: str, corpus: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer_sha256": tok_sha, "corpus": json.dumps(corpus, sort_keys=True)}


def _check_index(index: NgramIndex, n: int, tok_sha: str, where: str) -> None:
    if index.meta.get("tokenizer_sha256") != tok_sha:
        raise InputError(f"the n-gram index {where} was built with another tokenizer than the reference model's: "
                         "rebuild it (drop --index-file)")
    if index.n != n:
        raise InputError(f"the n-gram index {where} counts {index.n}-grams, this run asks for --ngram {n}: pass "
                         f"--ngram {index.n} or rebuild it (drop --index-file)")


def run(cfg: PredictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    # 1. labels and every cheap check, before any model is loaded
    examples, inputs, upstream, where = _labelled(cfg)
    if cfg.limit:
        examples = examples[:cfg.limit]
    check_classes(examples, cfg.folds, where)
    if upstream is not None and upstream.get("model", {}).get("name_or_path") not in (None, cfg.model):
        raise InputError(f"the memorization scores in {cfg.upstream_dir} belong to model "
                         f"{upstream['model']['name_or_path']!r}, this run is for {cfg.model!r}: pass --model "
                         f"{upstream['model']['name_or_path']}")
    ref_spec, base_spec, base_table = _model_specs(cfg)
    if cfg.corpus == TESTBED_NAME and cfg.model != TESTBED_NAME and not cfg.index_file:
        raise InputError(f"--corpus is required for model {cfg.model!r} (its training data: a file, folder or Hub "
                         "id), or a saved n-gram index with --index-file")
    shortest = min(len(e.tokens) for e in examples)
    if cfg.ngram > shortest:
        raise InputError(f"--ngram {cfg.ngram} is longer than the shortest sequence ({shortest} tokens)")
    # 2. models and tokenizers
    reference = load(ref_spec)
    ref_sha = tokenizer_sha256(reference.tokenizer)
    check_tokens(examples, reference.model, "reference model")
    if upstream is not None:
        scored_sha = recorded_tokenizer_sha256(upstream.get("model", {}))
        if scored_sha is None:
            log.warning("cannot load the scoring model's tokenizer to compare it with the reference model's; "
                        "only the token ids were checked")
        elif scored_sha != ref_sha:
            raise InputError(f"the memorization run was tokenized by {upstream['model'].get('name_or_path')!r}, "
                             f"whose vocabulary differs from the reference model {ref_spec.name_or_path!r}'s: use "
                             "a reference model with the same tokenizer")
    if cfg.corpus == TESTBED_NAME and not cfg.index_file:
        from transformers import AutoTokenizer

        if tokenizer_sha256(AutoTokenizer.from_pretrained(str(_testbed_checkpoints()[0]))) != ref_sha:
            raise InputError("the testbed corpus is tokenized with the testbed tokenizer; the reference model has "
                             "another vocabulary: pass --corpus")
    baseline = None
    if base_spec is not None:
        baseline = load(base_spec)
        if tokenizer_sha256(baseline.tokenizer) != ref_sha:
            raise InputError(f"the baseline model {base_spec.name_or_path!r} has another tokenizer than the reference "
                             "model: the baseline must read the same token ids")
        check_tokens(examples, baseline.model, "baseline model")
    memorized_table = memorized_table_tokens(base_table, "train", len(examples[0].tokens)) if base_table else None
    onset = None
    dynamics_dir = cfg.dynamics_dir
    if dynamics_dir == "auto":   # the run's own training_dynamics folder, when that stage has finished
        candidate = Path(cfg.output_dir) / "dynamics"
        dynamics_dir = str(candidate) if (candidate / art.MANIFEST).is_file() else None
    if dynamics_dir:
        dyn_manifest, onset_rows, onset_steps, ckpt_steps = onset_targets(Path(dynamics_dir), examples, cfg.folds)
        inputs.append({"path": dynamics_dir, "run_id": dyn_manifest["run_id"]})
    # 3. the n-gram index: a given file (checked now), or ours (reused when it matches)
    corpus = corpus_identity(cfg) if not cfg.index_file else {"index_file": cfg.index_file}
    given = None
    if cfg.index_file:
        given = load_index(Path(cfg.index_file))
        _check_index(given, cfg.ngram, ref_sha, cfg.index_file)
        inputs.append({"path": cfg.index_file, "sha256": art.sha256_file(Path(cfg.index_file))})
    parts = {"reference": reference.results_identity(), "reference_tokenizer": ref_sha, "corpus": corpus,
             "baseline": (baseline.results_identity() if baseline else
                          {"table": base_table, "sha256": art.sha256_file(Path(base_table))} if base_table else
                          {"column": cfg.baseline_column})}
    stage = StageRun.for_config(cfg, inputs, **parts)
    if (done := stage.open(cfg.force)) is not None:
        print(format_table(done))
        return done
    stage.start(cfg.force)
    import time

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = given or _stage_index(cfg, reference, ref_sha, corpus)
    timings["index_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = compute_features(examples, reference, index, batch_size=cfg.batch_size, seed=cfg.seed)
    timings["features_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_pred = baseline_predictions(cfg, examples, baseline, memorized_table)
    timings["baseline_s"] = time.perf_counter() - t0
    y = np.array([e.label for e in examples])
    t0 = time.perf_counter()
    log.info("%d sequences (%d memorized), %d features; %d-fold cross-validation of %s", len(y), int(y.sum()),
             len(features.names), cfg.folds, ", ".join(cfg.classifiers))
    fold_of, results = cross_validate(features, y, list(cfg.classifiers), folds=cfg.folds, seed=cfg.seed,
                                      repeats=cfg.permutation_repeats)
    timings["cv_s"] = time.perf_counter() - t0
    if dynamics_dir:
        onset = predict_onsets(features.X[onset_rows], onset_steps, ckpt_steps, folds=cfg.folds, seed=cfg.seed)

    summary = _summary(cfg, examples, features, y, fold_of, results, base_pred, ref_spec, base_spec, base_table,
                       index, given is not None)
    if onset is not None:
        summary["onset"] = {k: v for k, v in onset.items() if k not in ("predicted", "snapped")}
        summary["onset"]["dynamics_dir"] = dynamics_dir
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    n_rows = art.write_jsonl(cfg.stage_dir / FEATURES_JSONL, _feature_rows(examples, features))
    onset_of = {} if onset is None else {int(i): (float(t), float(p), int(q)) for i, t, p, q in
                                         zip(onset_rows, onset_steps, onset["predicted"], onset["snapped"])}
    art.write_jsonl(cfg.stage_dir / PREDICTIONS_JSONL, _prediction_rows(examples, y, fold_of, results, base_pred,
                                                                        onset_of))
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    roc_figure(y, results, base_pred, summary, cfg.stage_dir / ROC_PNG)
    pr_figure(y, results, base_pred, summary, cfg.stage_dir / PR_PNG)
    importance_figure(summary, cfg.stage_dir / IMPORTANCE_PNG)
    features_figure(features, y, summary, cfg.stage_dir / FEATURES_PNG)
    outputs: dict[str, int | None] = {FEATURES_JSONL: n_rows, PREDICTIONS_JSONL: n_rows, art.SUMMARY_JSON: None,
                                      ROC_PNG: None, PR_PNG: None, IMPORTANCE_PNG: None, FEATURES_PNG: None}
    if given is None:
        outputs[NGRAM_INDEX] = None
    if onset is not None:
        onset_figure(onset_steps, onset, cfg.stage_dir / ONSET_PNG)
        outputs[ONSET_PNG] = None
    stage.finish(outputs, reference=reference.identity(), baseline=parts["baseline"], seed=cfg.seed,
                 metric={"threshold": DECISION_THRESHOLD, "interval": "95% Student-t over folds",
                         "auroc": "Mann-Whitney, ties count 1/2", "pr_auc": "average precision (step-wise)",
                         "importance": "drop in held-out PR-AUC under permutation",
                         "features": FEATURE_DEFINITIONS})
    print(format_table(summary))
    return summary


def _stage_index(cfg: PredictConfig, reference: LoadedModel, tok_sha: str, corpus: dict[str, Any]) -> NgramIndex:
    """The stage folder's index when it was built for this corpus, n and tokenizer; else build and save it."""
    path = cfg.stage_dir / NGRAM_INDEX
    meta = _index_meta(cfg.ngram, tok_sha, corpus)
    if path.is_file():
        try:
            index = load_index(path)
        except InputError:
            index = None
        if index is not None and index.n == cfg.ngram and all(index.meta.get(k) == v for k, v in meta.items()):
            log.info("reusing the n-gram index %s", path)
            return index
    log.info("building the %d-gram index of corpus %s", cfg.ngram, cfg.corpus)
    vocab = max(len(reference.tokenizer), reference.model.get_input_embeddings().weight.shape[0])
    index = build_index(progress(corpus_documents(cfg, reference.tokenizer), "n-gram index"), cfg.ngram, vocab,
                        cfg.corpus_tokens)
    index.meta.update(meta)
    index.save(path)
    log.info("n-gram index: %s tokens, %d distinct %d-grams", index.meta["n_tokens"], index.hashes.size, cfg.ngram)
    return index


def _summary(cfg: PredictConfig, examples: Sequence[Example], features: FeatureTable, y: np.ndarray,
             fold_of: np.ndarray, results: dict[str, CVResult], base_pred: np.ndarray | None, ref_spec: ModelSpec,
             base_spec: ModelSpec | None, base_table: str | None, index: NgramIndex, given: bool) -> dict[str, Any]:
    classifiers = {}
    for name, res in results.items():
        ranking = _ranking(res.importance)
        classifiers[name] = {
            "cv": aggregate(res.per_fold),
            "pooled": {k: round(v, 6) for k, v in all_metrics(y, res.oof).items()},
            "importance": ranking,
            "group_importance": [{"group": r["feature"], "mean": r["mean"], "sd": r["sd"]}
                                 for r in _ranking(res.group_importance)],
            "control_rank": next(i for i, r in enumerate(ranking, 1) if r["feature"] == CONTROL)
            if CONTROL in res.importance else None,
        }
    best = max(classifiers, key=lambda n: (classifiers[n]["cv"]["auroc"]["mean"],
                                           classifiers[n]["cv"]["pr_auc"]["mean"]))
    b = classifiers[best]
    baseline: dict[str, Any] | None = None
    if base_pred is not None:
        per_fold = [all_metrics(y[fold_of == k], base_pred[fold_of == k]) for k in range(cfg.folds)]
        baseline = {"source": (_model_name(base_spec) if base_spec else base_table or f"column {cfg.baseline_column}"),
                    "definition": f"{cfg.memorized_by} >= {cfg.threshold}",
                    "n_predicted": int(base_pred.sum()),
                    "all": {k: round(v, 6) for k, v in all_metrics(y, base_pred).items()},
                    "cv": aggregate(per_fold)}
    means = {f: {"memorized": round(float(features.X[y == 1, j].mean()), 6),
                 "not_memorized": round(float(features.X[y == 0, j].mean()), 6)}
             for j, f in enumerate(features.names)}
    return {
        "n_sequences": len(y), "n_memorized": int(y.sum()), "prevalence": round(float(y.mean()), 6),
        "labels": ("tables" if cfg.labels_file else "scores"),
        "memorized_by": cfg.memorized_by, "threshold": cfg.threshold,
        "best_classifier": best,
        "auroc": b["cv"]["auroc"]["mean"], "auroc_ci95": b["cv"]["auroc"]["ci95"],
        "pr_auc": b["cv"]["pr_auc"]["mean"], "pr_auc_ci95": b["cv"]["pr_auc"]["ci95"],
        "f1": b["cv"]["f1"]["mean"], "precision": b["cv"]["precision"]["mean"], "recall": b["cv"]["recall"]["mean"],
        "top_features": [r["feature"] for r in b["importance"][:5]],
        "control_rank": b["control_rank"], "n_features": len(features.names),
        "classifiers": classifiers, "baseline": baseline,
        "folds": cfg.folds, "decision_threshold": DECISION_THRESHOLD, "interval": "95% Student-t over folds",
        "features": features.names, "feature_groups": features.groups, "dropped_constant": features.dropped,
        "feature_means": means,
        "reference_model": _model_name(ref_spec), "ngram": index.n,
        "ngram_index": cfg.index_file if given else NGRAM_INDEX,
        "corpus": cfg.corpus if not given else index.meta.get("corpus"),
        "corpus_tokens": int(index.meta.get("n_tokens", 0)), "distinct_ngrams": int(index.hashes.size),
        "domain_column": cfg.domain_column,
    }


def _feature_rows(examples: Sequence[Example], features: FeatureTable) -> Iterator[dict[str, Any]]:
    for e, x in zip(examples, features.X):
        yield {"id": e.id, "label": e.label, "origin": e.origin,
               **{n: round(float(v), 6) for n, v in zip(features.names, x)}}


def _prediction_rows(examples: Sequence[Example], y: np.ndarray, fold_of: np.ndarray, results: dict[str, CVResult],
                     base_pred: np.ndarray | None, onsets: dict[int, tuple[float, float, int]]
                     ) -> Iterator[dict[str, Any]]:
    for i, e in enumerate(examples):
        row: dict[str, Any] = {"id": e.id, "label": int(y[i]), "fold": int(fold_of[i])}
        for name, res in results.items():
            row[f"p_{name}"] = float(res.oof[i])   # full precision: the summary metrics are recomputable
        row["baseline"] = None if base_pred is None else int(base_pred[i])
        if i in onsets:
            row["onset_step"], row["onset_predicted"], row["onset_checkpoint"] = onsets[i]
        yield row


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"predict_memorization: {summary['n_sequences']} sequences, {summary['n_memorized']} memorized "
             f"({summary['prevalence']:.1%}); {summary['folds']}-fold CV, mean [95% t-interval over folds]",
             f"{'classifier':<22} {'AUROC':>22} {'PR-AUC':>22} {'F1@0.5':>7} {'prec':>6} {'recall':>6}"]

    def ci(m: dict[str, Any]) -> str:
        return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"

    rows = [(n, c["cv"]) for n, c in summary["classifiers"].items()]
    if summary.get("baseline"):
        rows.append(("baseline", summary["baseline"]["cv"]))
    for name, cv in rows:
        lines.append(f"{name:<22} {ci(cv['auroc']):>22} {ci(cv['pr_auc']):>22} {cv['f1']['mean']:>7.3f} "
                     f"{cv['precision']['mean']:>6.3f} {cv['recall']['mean']:>6.3f}")
    best = summary["classifiers"][summary["best_classifier"]]
    top = ", ".join(f"{r['feature']} {r['mean']:.3f}" for r in best["importance"][:5])
    lines.append(f"best {summary['best_classifier']}; PR-AUC drop under permutation: {top}; {CONTROL} ranks "
                 f"{summary['control_rank']} of {summary['n_features']}")
    if summary.get("onset"):
        m, b = summary["onset"]["model"], summary["onset"]["median_baseline"]
        lines.append(f"when ({summary['onset']['n']} windows memorized for good): Spearman {_num(m['spearman'])}, "
                     f"right checkpoint {m['checkpoint_accuracy']:.3f}, MAE {m['mae_steps']:.1f} steps (median onset: "
                     f"right checkpoint {b['checkpoint_accuracy']:.3f}, MAE {b['mae_steps']:.1f})")
    if summary.get("baseline"):
        lines.append(f"baseline: memorized ({summary['baseline']['definition']}) by {summary['baseline']['source']}")
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------

def headline(summary: dict[str, Any]) -> str:
    """One line for the run report (memcirc.report)."""
    best = summary["classifiers"][summary["best_classifier"]]
    group = best["group_importance"][0]
    auroc, pr_auc = summary["auroc_ci95"], summary["pr_auc_ci95"]
    line = (f"predictor ({summary['best_classifier']}, {summary['n_memorized']} of {summary['n_sequences']} "
            f"memorized): AUROC {summary['auroc']:.3f} [{auroc[0]:.3f}, {auroc[1]:.3f}], PR-AUC "
            f"{summary['pr_auc']:.3f} [{pr_auc[0]:.3f}, {pr_auc[1]:.3f}], F1 {summary['f1']:.3f}")
    if summary.get("baseline"):
        line += f"; baseline ({summary['baseline']['source']}) F1 {summary['baseline']['all']['f1']:.3f}"
    line += (f"; top group {group['group']} ({group['mean']:.2f}), features {', '.join(summary['top_features'][:3])}"
             f"; {CONTROL} rank {summary['control_rank']}/{summary['n_features']}")
    if summary.get("onset"):
        m = summary["onset"]["model"]
        line += (f"; when: right checkpoint {m['checkpoint_accuracy']:.2f} (median "
                 f"{summary['onset']['median_baseline']['checkpoint_accuracy']:.2f})")
    return line


def _legend(summary: dict[str, Any], name: str, metric: str) -> str:
    m = summary["classifiers"][name]["cv"][metric]
    return f"{name}: {m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def roc_figure(y: np.ndarray, results: dict[str, CVResult], base_pred: np.ndarray | None, summary: dict[str, Any],
               path: Path) -> None:
    """Out-of-fold ROC curve per classifier (CV mean AUROC and interval in the legend), the baseline."""
    from memcirc.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 5))
    zoom = ax.inset_axes([0.42, 0.32, 0.53, 0.38])   # the low false-positive end, where rare positives live
    for name, res in results.items():
        fpr, tpr = roc_points(y, res.oof)
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


def pr_figure(y: np.ndarray, results: dict[str, CVResult], base_pred: np.ndarray | None, summary: dict[str, Any],
              path: Path) -> None:
    from memcirc.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, res in results.items():
        recall, precision = pr_points(y, res.oof)
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
    """Left: drop in held-out AUROC per feature and classifier, ordered by the best classifier, the
    shuffled control in red. Right: the same per feature group."""
    from memcirc.plots import plt, save_figure

    names = list(summary["classifiers"])
    best = summary["classifiers"][summary["best_classifier"]]
    order = [r["feature"] for r in best["importance"]][::-1]
    groups = [r["group"] for r in best["group_importance"]][::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.3 * len(order) + 1.5)),
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
    from memcirc.plots import plt, save_figure

    ranked = [r["feature"] for r in summary["classifiers"][summary["best_classifier"]]["importance"]]
    shown = [f for f in ranked if f != CONTROL][:7] + ([CONTROL] if CONTROL in ranked else [])
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
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
