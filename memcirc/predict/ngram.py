"""The n-gram duplication index of a training corpus: its two backends, reuse, and the corpus readers.

Backends (`--ngram-index`): `tokengrams` (default), EleutherAI's suffix array on disk beside the
descriptor (`memcirc.predict.suffixindex`: any corpus size, any n), and `hash`, 64-bit n-gram hashes
in memory (`memcirc.predict.hashindex`: one n, the corpus's distinct n-grams must fit in memory).
Both count every n-gram inside each document, never across two; on the same corpus they give equal
counts (tests). `auto` is tokengrams. The descriptor `ngram_index.safetensors` (`indexfile`) names the
backend; a run reuses its own index when corpus and tokenizer match, or one given by --index-file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memcirc import artifacts as art
from memcirc.data import Columns, load_documents
from memcirc.errors import InputError
from memcirc.logs import progress
from memcirc.predict.hashindex import build_index
from memcirc.predict.hashindex import from_descriptor as hash_index
from memcirc.predict.indexfile import BACKENDS, HASH, TOKENGRAMS, read_descriptor
from memcirc.predict.suffixindex import build_suffix_index
from memcirc.predict.suffixindex import from_descriptor as suffix_index
from memcirc.testbed import CORPUS_DIR, GROUND_TRUTH, TESTBED_NAME

log = logging.getLogger(__name__)

INDEX_CHOICES = ("auto", *BACKENDS)


class NgramIndex(Protocol):
    """What the features and the summary read of an index, whichever the backend."""

    n: int
    unigram: np.ndarray         # int64, one corpus count per token id
    meta: dict[str, Any]        # n_tokens, n_documents, tokenizer_sha256, corpus, backend details
    backend: str

    @property
    def distinct(self) -> int: ...

    def ngram_counts(self, tokens: np.ndarray) -> np.ndarray: ...

    def files(self, path: Path) -> list[str]: ...

    def save(self, path: Path) -> None: ...


def resolve_backend(choice: str) -> str:
    """`auto` -> tokengrams. Measured (one thread, build + 114k 8-gram counts, CPU s): testbed 248k tokens
    hash 0.2 / tokengrams 0.6; 20 M tokens 10 / 18; 100 M tokens 65 / 120, where the hash index peaked at
    7 GB of memory and tokengrams at none beyond its memory-mapped files (10 B per token on disk). The
    hash index is faster but its memory grows with the corpus: a fallback, never chosen by `auto`."""
    if choice not in INDEX_CHOICES:
        raise InputError(f"unknown n-gram index {choice!r}; choose from {', '.join(INDEX_CHOICES)}")
    return TOKENGRAMS if choice == "auto" else choice


def load_index(path: Path, n: int | None = None) -> NgramIndex:
    """The index whose descriptor is `path` (its token and table files beside it); `n`: count n-grams
    of this n instead of the recorded one (tokengrams only: a hash index has one n)."""
    meta, tensors = read_descriptor(Path(path))
    if meta["backend"] == HASH:
        return hash_index(meta, tensors)
    index = suffix_index(meta, tensors, Path(path).parent, str(path))
    if n is not None:
        index.n = n
    return index


def index_meta(tokenizer_sha: str, corpus: dict[str, Any]) -> dict[str, Any]:
    """What an index records besides n: the tokenizer's vocab hash and the corpus identity."""
    return {"tokenizer_sha256": tokenizer_sha, "corpus": json.dumps(corpus, sort_keys=True)}


def check_index(index: NgramIndex, n: int, tokenizer_sha: str, where: str) -> None:
    """A given index must count n-grams of this tokenizer's ids (of this n, for a hash index)."""
    if index.meta.get("tokenizer_sha256") != tokenizer_sha:
        raise InputError(f"the n-gram index {where} was built with another tokenizer than the reference model's: "
                         "rebuild it (drop --index-file)")
    if index.n != n:
        raise InputError(f"the n-gram index {where} counts {index.n}-grams, this run asks for --ngram {n}: pass "
                         f"--ngram {index.n} or rebuild it (drop --index-file, or use --ngram-index tokengrams)")


def reusable_index(path: Path, n: int, meta: dict[str, Any], backend: str) -> NgramIndex | None:
    """The index saved at `path` when it is of `backend` and counts this `meta`'s corpus with its
    tokenizer (and this n, for a hash index), else None."""
    if not path.is_file():
        return None
    try:
        index = load_index(path, n if backend == TOKENGRAMS else None)
    except InputError:
        return None
    if index.backend == backend and index.n == n and all(index.meta.get(k) == v for k, v in meta.items()):
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


def index_for(path: Path, n: int, corpus: Corpus, tokenizer: Any, vocab_size: int, meta: dict[str, Any],
              backend: str = TOKENGRAMS) -> NgramIndex:
    """The index at `path` when it was built with `meta` (corpus, tokenizer), n and `backend`; else
    build it (beside `path`: the descriptor and, for tokengrams, its token and table files)."""
    if (index := reusable_index(path, n, meta, backend)) is not None:
        log.info("reusing the n-gram index %s", path)
        if index.meta.get("distinct_n", str(n)) != str(n):
            index.save(path)    # a suffix index counts any n: the descriptor now records this one
        return index
    log.info("building the %d-gram index (%s) of corpus %s", n, backend, corpus.source)
    documents = progress(corpus_documents(corpus, tokenizer), "n-gram index")
    if backend == TOKENGRAMS:
        index = build_suffix_index(documents, n, vocab_size, path, corpus.max_tokens, meta)
    else:
        index = build_index(documents, n, vocab_size, corpus.max_tokens)
        index.meta.update(meta)
        index.save(path)
        for stale in (path.with_suffix(".tokens"), path.with_suffix(".table")):
            stale.unlink(missing_ok=True)   # a suffix index's files: the stage folder holds only its outputs
    log.info("n-gram index: %s tokens, %d distinct %d-grams", index.meta["n_tokens"], index.distinct, n)
    return index
