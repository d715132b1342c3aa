"""The suffix-array n-gram index on disk (EleutherAI tokengrams): exact counts of any n-gram of a corpus
too large for memory; the default backend of the duplication counts (`--ngram-index tokengrams`).

The corpus is written once as a flat token file beside the descriptor (`<name>.tokens`: uint16 ids,
uint32 for vocabularies over 65 535), each document followed by a separator id (the vocabulary size)
that no query holds, so no counted n-gram crosses a document boundary, as in the hash index;
tokengrams sorts the suffixes into `<name>.table` (uint64 positions): 10 bytes per corpus token (12
with uint32 ids) on disk, memory-mapped, so a count pages in only what its binary search touches.
One index counts every n; the number of distinct n-grams (summary.json) is one pass over the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.errors import InputError
from memcirc.predict.indexfile import TOKENGRAMS, CorpusCounts, counted_documents, write_descriptor

INDEX_VERSION = 2
_CHUNK = 1 << 18   # suffixes per step of the distinct count (chunk x n int64 gather: 16 MB at n = 8)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian ids that hold the vocabulary and the separator (= vocab_size), as tokengrams reads them."""
    return np.dtype("<u2") if vocab_size + 1 <= 1 << 16 else np.dtype("<u4")


def distinct_ngrams(tokens: np.ndarray, table: np.ndarray, n: int, separator: int) -> int:
    """Distinct n-grams without a separator. Suffixes that share their first n tokens are adjacent in
    the sorted table, so each distinct n-gram is one valid suffix whose first n tokens differ from the
    previous suffix's. Windows past the end read the final token, a separator."""
    last = tokens.size - 1
    offsets = np.arange(n)
    total, prev = 0, None
    for a in range(0, table.size, _CHUNK):
        windows = tokens[np.minimum(np.asarray(table[a:a + _CHUNK], np.int64)[:, None] + offsets, last)]
        new = np.ones(len(windows), bool)
        new[1:] = (windows[1:] != windows[:-1]).any(1)
        if prev is not None:
            new[0] = bool((windows[0] != prev).any())
        total += int((new & (windows != separator).all(1)).sum())
        prev = windows[-1]
    return total


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """tokengrams' build prints 'Sorting indices...' from Rust straight to fd 1, where the stage prints
    its result table; the stage logs its own line instead."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class SuffixIndex:
    """A tokengrams MemmapIndex over `<descriptor>.tokens` / `.table`, with the unigram counts."""

    n: int
    unigram: np.ndarray
    folder: Path                                   # where the token and table files lie
    meta: dict[str, Any] = field(default_factory=dict)
    backend: str = TOKENGRAMS

    @property
    def tokens_path(self) -> Path:
        return self.folder / self.meta["tokens_file"]

    @property
    def table_path(self) -> Path:
        return self.folder / self.meta["table_file"]

    @property
    def separator(self) -> int:
        return int(self.meta["separator"])

    @cached_property
    def engine(self) -> Any:
        import tokengrams  # only this backend needs it

        return tokengrams.MemmapIndex(str(self.tokens_path), str(self.table_path), vocab=self.separator + 1)

    @property
    def distinct(self) -> int:
        """Distinct n-grams of the corpus for this n: recorded, else one pass over the table (kept)."""
        if self.meta.get("distinct_n") != str(self.n):
            tokens = np.memmap(self.tokens_path, token_dtype(self.separator), "r")
            count = distinct_ngrams(tokens, np.memmap(self.table_path, "<u8", "r"), self.n, self.separator)
            self.meta.update(distinct=str(count), distinct_n=str(self.n))
        return int(self.meta["distinct"])

    def ngram_counts(self, tokens: np.ndarray) -> np.ndarray:
        """Corpus count of each n-gram of `tokens` (1-D), in order."""
        t = np.asarray(tokens).tolist()
        return np.array([self.engine.count(t[i:i + self.n]) for i in range(len(t) - self.n + 1)], np.int64)

    def files(self, path: Path) -> list[str]:
        return [path.name, self.meta["tokens_file"], self.meta["table_file"]]

    def save(self, path: Path) -> None:
        """The descriptor, for this n (its distinct count with it)."""
        meta = {**self.meta, "backend": TOKENGRAMS, "version": str(INDEX_VERSION), "n": str(self.n),
                "distinct": str(self.distinct), "distinct_n": str(self.n)}
        write_descriptor(path, {"unigram": self.unigram}, meta)

    def check_files(self, where: str) -> None:
        """The token and table files are there, of the sizes the descriptor records."""
        for key in ("tokens", "table"):
            p = self.folder / self.meta[f"{key}_file"]
            if not p.is_file() or p.stat().st_size != int(self.meta[f"{key}_bytes"]):
                raise InputError(f"the n-gram index {where} lacks {p.name} beside it, or it changed size: "
                                 "copy the three files together, or rebuild it (drop --index-file)")


def from_descriptor(meta: dict[str, str], tensors: dict[str, np.ndarray], folder: Path, where: str) -> SuffixIndex:
    n = int(meta.pop("n"))
    for key in ("backend", "version"):
        meta.pop(key, None)
    index = SuffixIndex(n, tensors["unigram"], folder, meta)
    index.check_files(where)
    return index


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")   # artifacts.clean_stale_temp_files drops leftovers


def _write_tokens(documents: Iterable[np.ndarray], path: Path, vocab_size: int, token_budget: int | None,
                  counts: CorpusCounts) -> str:
    """Each document, then the separator, as little-endian ids into `path`; their sha256."""
    dtype, digest = token_dtype(vocab_size), hashlib.sha256()
    with open(path, "wb") as fh:
        for tokens in counted_documents(documents, vocab_size, token_budget, counts):
            block = np.append(tokens, vocab_size).astype(dtype).tobytes()
            digest.update(block)
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest()


def build_suffix_index(documents: Iterable[np.ndarray], n: int, vocab_size: int, path: Path,
                       token_budget: int | None = None, meta: dict[str, Any] | None = None) -> SuffixIndex:
    """Write the corpus tokens and their suffix table beside descriptor `path`, then the descriptor
    (with `meta`). Temp names until complete; an old descriptor goes first: a killed build is never reused."""
    import tokengrams

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    tokens_path, table_path = path.with_suffix(".tokens"), path.with_suffix(".table")
    counts = CorpusCounts(np.zeros(vocab_size, np.int64))
    tmp_tokens, tmp_table = _tmp(tokens_path), _tmp(table_path)
    try:
        sha = _write_tokens(documents, tmp_tokens, vocab_size, token_budget, counts)
        with _quiet_stdout():
            engine = tokengrams.MemmapIndex.build(str(tmp_tokens), str(tmp_table), vocab=vocab_size + 1)
        with open(tmp_table, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_tokens, tokens_path)
        os.replace(tmp_table, table_path)
    finally:
        tmp_tokens.unlink(missing_ok=True)
        tmp_table.unlink(missing_ok=True)
    files = {**counts.meta(), "tokens_file": tokens_path.name, "table_file": table_path.name,
            "tokens_bytes": str(tokens_path.stat().st_size), "table_bytes": str(table_path.stat().st_size),
            "tokens_sha256": sha, "separator": str(vocab_size), "token_dtype": token_dtype(vocab_size).name,
            "tokengrams": _version()}
    index = SuffixIndex(n, counts.unigram, path.parent, {**files, **(meta or {})})
    index.__dict__["engine"] = engine   # its maps follow the renamed files; reopening re-checks the whole table
    index.save(path)
    return index


def _version() -> str:
    from importlib import metadata

    return metadata.version("tokengrams")
