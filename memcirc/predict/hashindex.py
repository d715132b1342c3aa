"""The in-memory hash n-gram index: the fallback backend of the duplication counts (`--ngram-index hash`).

Each n-gram of token ids is hashed to 64 bits (polynomial hash mod 2^64, then the splitmix64
finalizer); the index is the sorted unique hashes with their counts, in `ngram_index.safetensors`
beside the unigram counts. N-grams never cross a document boundary. A lookup is `searchsorted`. It
holds 16 bytes per distinct n-gram in memory, and one fixed n: the tokengrams backend does neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.predict.indexfile import HASH, CorpusCounts, counted_documents, write_descriptor

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
class HashIndex:
    """Counts of the corpus's n-grams (sorted unique hashes) and of its tokens."""

    n: int
    hashes: np.ndarray        # uint64, sorted, unique
    counts: np.ndarray        # int64
    unigram: np.ndarray       # int64, one count per token id
    meta: dict[str, Any] = field(default_factory=dict)
    backend: str = HASH

    @property
    def distinct(self) -> int:
        return int(self.hashes.size)

    def count(self, hashes: np.ndarray) -> np.ndarray:
        """Corpus count of each hash (0 where absent), same shape."""
        if self.hashes.size == 0:
            return np.zeros(hashes.shape, np.int64)
        pos = np.searchsorted(self.hashes, hashes).clip(max=self.hashes.size - 1)
        return np.where(self.hashes[pos] == hashes, self.counts[pos], 0)

    def ngram_counts(self, tokens: np.ndarray) -> np.ndarray:
        """Corpus count of each n-gram of `tokens` (1-D), in order."""
        return self.count(ngram_hashes(tokens, self.n))

    def files(self, path: Path) -> list[str]:
        """The files of the index saved at `path` (the manifest's output names)."""
        return [path.name]

    def save(self, path: Path) -> None:
        meta = {**self.meta, "backend": HASH, "version": str(INDEX_VERSION), "n": str(self.n)}
        write_descriptor(path, {"hashes": self.hashes, "counts": self.counts, "unigram": self.unigram}, meta)


def from_descriptor(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> HashIndex:
    n = int(meta.pop("n"))
    for key in ("backend", "version"):
        meta.pop(key, None)
    return HashIndex(n, tensors["hashes"], tensors["counts"], tensors["unigram"], meta)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One (sorted unique hashes, counts) from partial ones."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    hashes, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    return hashes, np.bincount(inverse, weights=np.concatenate([p[1] for p in parts])).round()


def build_index(documents: Iterable[np.ndarray], n: int, vocab_size: int, token_budget: int | None = None,
                flush_every: int = 1 << 23) -> HashIndex:
    """Count the n-grams (within each document) and tokens of `documents`, up to `token_budget` tokens."""
    counts = CorpusCounts(np.zeros(vocab_size, np.int64))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    for tokens in counted_documents(documents, vocab_size, token_budget, counts):
        pending.append(ngram_hashes(tokens, n))
        n_pending += pending[-1].size
        if n_pending >= flush_every:   # bound the memory: count what is pending, keep only the counts
            parts.append(np.unique(np.concatenate(pending), return_counts=True))
            pending, n_pending = [], 0
    if pending:
        parts.append(np.unique(np.concatenate(pending), return_counts=True))
    hashes, ngram_counts = _merge(parts)
    return HashIndex(n, hashes.astype(np.uint64), np.asarray(ngram_counts, np.int64), counts.unigram, counts.meta())
