"""The n-gram duplication index of a training corpus, and the corpus readers that feed it.

Each n-gram of token ids is hashed to 64 bits (polynomial hash mod 2^64, then the splitmix64
finalizer); the index is the sorted unique hashes with their counts, plus the corpus unigram counts,
saved in `ngram_index.safetensors` with metadata (kind, n, tokenizer vocab hash, corpus identity,
token count). N-grams never cross a document boundary. A lookup is `searchsorted`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from memcirc import artifacts as art
from memcirc.data import Columns, load_documents
from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.testbed import CORPUS_DIR, GROUND_TRUTH, TESTBED_NAME

log = logging.getLogger(__name__)

INDEX_KIND = "memcirc-ngram-index"
INDEX_VERSION = 1

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
        meta = {"kind": INDEX_KIND, "version": str(INDEX_VERSION), "n": str(self.n),
                **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in self.meta.items()}}
        blob = save({"hashes": self.hashes, "counts": self.counts, "unigram": self.unigram}, metadata=meta)
        art.atomic_write_bytes(path, art.canonical_safetensors(blob))   # same bytes in every process


def load_index(path: Path) -> NgramIndex:
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


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One (sorted unique hashes, counts) from partial ones."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    hashes, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    return hashes, np.bincount(inverse, weights=np.concatenate([p[1] for p in parts])).round()


def build_index(documents: Iterable[np.ndarray], n: int, vocab_size: int, token_budget: int | None = None,
                flush_every: int = 1 << 23) -> NgramIndex:
    """Count the n-grams (within each document) and tokens of `documents`, up to `token_budget` tokens."""
    unigram = np.zeros(vocab_size, np.int64)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[np.ndarray] = []
    n_pending = n_tokens = n_docs = 0
    for tokens in documents:
        tokens = np.asarray(tokens, np.int64)
        if token_budget is not None:
            tokens = tokens[:token_budget - n_tokens]
        if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
            raise InputError(f"corpus token id {int(tokens.max())} is outside the tokenizer's vocabulary "
                             f"({vocab_size}): pretokenized corpus of another tokenizer?")
        unigram += np.bincount(tokens, minlength=vocab_size)
        pending.append(ngram_hashes(tokens, n))
        n_pending += pending[-1].size
        n_tokens += tokens.size
        n_docs += 1
        if n_pending >= flush_every:   # bound the memory: count what is pending, keep only the counts
            parts.append(np.unique(np.concatenate(pending), return_counts=True))
            pending, n_pending = [], 0
        if token_budget is not None and n_tokens >= token_budget:
            break
    if pending:
        parts.append(np.unique(np.concatenate(pending), return_counts=True))
    if n_tokens == 0:
        raise InputError("the corpus holds no tokens: nothing to count n-grams in")
    hashes, counts = _merge(parts)
    return NgramIndex(n, hashes.astype(np.uint64), np.asarray(counts, np.int64), unigram,
                      {"n_tokens": str(n_tokens), "n_documents": str(n_docs)})


def index_meta(tokenizer_sha: str, corpus: dict[str, Any]) -> dict[str, Any]:
    """What an index records besides n: the tokenizer's vocab hash and the corpus identity."""
    return {"tokenizer_sha256": tokenizer_sha, "corpus": json.dumps(corpus, sort_keys=True)}


def check_index(index: NgramIndex, n: int, tokenizer_sha: str, where: str) -> None:
    """A given index must count n-grams of this tokenizer's ids."""
    if index.meta.get("tokenizer_sha256") != tokenizer_sha:
        raise InputError(f"the n-gram index {where} was built with another tokenizer than the reference model's: "
                         "rebuild it (drop --index-file)")
    if index.n != n:
        raise InputError(f"the n-gram index {where} counts {index.n}-grams, this run asks for --ngram {n}: pass "
                         f"--ngram {index.n} or rebuild it (drop --index-file)")


def reusable_index(path: Path, n: int, meta: dict[str, Any]) -> NgramIndex | None:
    """The index saved at `path` when it counts n-grams with this `meta` (tokenizer, corpus), else None."""
    if not path.is_file():
        return None
    try:
        index = load_index(path)
    except InputError:
        return None
    if index.n == n and all(index.meta.get(k) == v for k, v in meta.items()):
        return index
    return None


# -- corpora -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    """The training corpus the n-grams are counted in."""

    source: str = TESTBED_NAME      # file, folder or Hub id; 'testbed': the testbed's training set
    split: str = "train"            # of a Hub / folder corpus
    streaming: bool = False
    max_tokens: int | None = None   # read at most this many tokens


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


def corpus_documents(corpus: Corpus, tokenizer: Any) -> Iterator[np.ndarray]:
    """The token ids of every document of `corpus` (text is tokenized without special tokens)."""
    if corpus.source == TESTBED_NAME:
        yield from testbed_corpus(tokenizer)
        return
    for doc in load_documents(corpus.source, Columns(), split=corpus.split, streaming=corpus.streaming):
        ids = doc.tokens if doc.tokens is not None else tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        yield np.asarray(ids, np.int64)


def corpus_identity(corpus: Corpus) -> dict[str, Any]:
    """What the n-gram counts depend on (besides n and the tokenizer)."""
    ident: dict[str, Any] = {"corpus": corpus.source, "corpus_tokens": corpus.max_tokens}
    if corpus.source == TESTBED_NAME:
        ident.update(train_sha256=art.sha256_file(CORPUS_DIR / "train.txt"),
                     ground_truth_sha256=art.sha256_file(GROUND_TRUTH))
        return ident
    path = Path(corpus.source)
    if path.is_file():
        ident["sha256"] = art.sha256_file(path)
    elif path.is_dir():
        ident["files"] = art.sha256_json(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                                for p in path.rglob("*") if p.is_file()))
    else:
        ident.update(split=corpus.split, streaming=corpus.streaming)
    return ident


def index_for(path: Path, n: int, corpus: Corpus, tokenizer: Any, vocab_size: int,
              meta: dict[str, Any]) -> NgramIndex:
    """The index at `path` when it was built with `meta` (corpus, tokenizer) and n; else build and save it."""
    if (index := reusable_index(path, n, meta)) is not None:
        log.info("reusing the n-gram index %s", path)
        return index
    log.info("building the %d-gram index of corpus %s", n, corpus.source)
    index = build_index(progress(corpus_documents(corpus, tokenizer), "n-gram index"), n, vocab_size,
                        corpus.max_tokens)
    index.meta.update(meta)
    index.save(path)
    log.info("n-gram index: %s tokens, %d distinct %d-grams", index.meta["n_tokens"], index.hashes.size, n)
    return index
