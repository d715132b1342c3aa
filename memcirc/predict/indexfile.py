"""What both n-gram index backends share: the descriptor file and the one pass over the corpus.

The descriptor, `ngram_index.safetensors`, is what a run names (`--index-file`) and reuses: the
corpus unigram counts (a tensor) and the metadata (kind, backend, n, token and document counts,
tokenizer vocab hash, corpus identity), plus the hash backend's tables. The tokengrams backend keeps
its token and suffix files beside it and records their names and sizes. Written last, atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from memcirc import artifacts as art
from memcirc.errors import InputError

INDEX_KIND = "memcirc-ngram-index"
HASH, TOKENGRAMS = "hash", "tokengrams"
BACKENDS = (HASH, TOKENGRAMS)

_UNIGRAM_FLUSH = 1 << 22   # tokens per unigram bincount: one vocab-sized pass per few M tokens, not per document


@dataclass
class CorpusCounts:
    """What one pass over the corpus counts besides the n-grams."""

    unigram: np.ndarray       # int64, one count per token id
    n_tokens: int = 0
    n_documents: int = 0

    def meta(self) -> dict[str, str]:
        return {"n_tokens": str(self.n_tokens), "n_documents": str(self.n_documents)}


def counted_documents(documents: Iterable[np.ndarray], vocab_size: int, token_budget: int | None,
                      counts: CorpusCounts) -> Iterator[np.ndarray]:
    """The documents as int64 arrays, cut at `token_budget` tokens in all, ids checked against the
    vocabulary; `counts` holds the unigram, token and document counts once the iterator is spent."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for tokens in documents:
        tokens = np.asarray(tokens, np.int64)
        if token_budget is not None:
            tokens = tokens[:token_budget - counts.n_tokens]
        if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
            raise InputError(f"corpus token id {int(tokens.max())} is outside the tokenizer's vocabulary "
                             f"({vocab_size}): pretokenized corpus of another tokenizer?")
        counts.n_tokens += tokens.size
        counts.n_documents += 1
        pending.append(tokens)
        n_pending += tokens.size
        if n_pending >= _UNIGRAM_FLUSH:
            counts.unigram += np.bincount(np.concatenate(pending), minlength=vocab_size)
            pending, n_pending = [], 0
        yield tokens
        if token_budget is not None and counts.n_tokens >= token_budget:
            break
    if pending:
        counts.unigram += np.bincount(np.concatenate(pending), minlength=vocab_size)
    if counts.n_tokens == 0:
        raise InputError("the corpus holds no tokens: nothing to count n-grams in")


def write_descriptor(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """The descriptor: tensors + string metadata (non-strings as JSON), the same bytes in every process."""
    strings = {"kind": INDEX_KIND, **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                      for k, v in meta.items()}}
    art.atomic_write_bytes(path, art.canonical_safetensors(save(tensors, metadata=strings)))


def read_descriptor(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata without `kind`, tensors) of an index descriptor; InputError for anything else."""
    if not Path(path).is_file():
        raise InputError(f"n-gram index file not found: {path}")
    try:
        with safe_open(str(path), "np") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise InputError(f"{path} is not a safetensors n-gram index ({e})") from None
    if meta.pop("kind", None) != INDEX_KIND or "unigram" not in tensors or "n" not in meta:
        raise InputError(f"{path} is not an n-gram index written by predict_memorization")
    meta.setdefault("backend", HASH)   # indexes written before the tokengrams backend
    if meta["backend"] not in BACKENDS:
        raise InputError(f"{path}: unknown n-gram index backend {meta['backend']!r}")
    return meta, tensors
