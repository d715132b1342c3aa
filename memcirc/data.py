"""Corpus readers and fixed-length token windows with provenance.

Sources (`load_documents`): a local JSONL / Parquet / text / NPY file (a text file is
one document); a Hub dataset id or a local folder of data files, both through
`datasets.load_dataset` (streaming allowed). Rows carry either raw text
(tokenized once here) or token ids (a `tokens` column, as in EleutherAI/pythia-memorized-evals;
a 2-D NPY array is the llm-memorization format, one row per document).

A window is `prefix_len + suffix_len` tokens taken from a document's start (Pythia protocol) or
sliding with a stride, with BOS in front of *every* window when the `BosPolicy` says so (then the
window's `prefix_len` counts the BOS). Documents shorter than one window are skipped and counted:
padding never becomes a scored target.

Rows are checked as they are read, and an error names the place in the file: `line N` (1-based)
for JSONL, `row N (0-based)` for Parquet and 🤗 datasets, whose rows are indexed that way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memcirc.artifacts import SCORES_JSONL, read_jsonl_numbered, unreadable
from memcirc.errors import InputError
from memcirc.sources import load_hub_dataset, npy_tokens, parquet_rows, read_text
from memcirc.token_ids import kind, token_array, token_list

if TYPE_CHECKING:
    from memcirc.models.tokenizer import BosPolicy
    from memcirc.option_groups import MemorizedRule

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".npy")
TOKEN_COLUMNS = ("tokens", "Tokens", "input_ids", "token_ids")  # tried in order when none is named
DOC_COLUMNS = ("doc", "index", "id")                  # stable document ids, when a source has them


@dataclass(frozen=True)
class Secret:
    """A row's optional `secret`: tokens[start:start + length] of the document, each token drawn
    uniformly from `alphabet` (the exposure metric, `memcirc.exposure`)."""

    start: int
    length: int
    alphabet: tuple[int, ...]


@dataclass(frozen=True)
class Document:
    doc: str                        # stable id inside its source
    tokens: list[int] | None = None
    text: str | None = None
    group: str | None = None
    secret: Secret | None = None


@dataclass(frozen=True)
class Window:
    """One scored sequence: `tokens[:prefix_len]` is the prompt, the rest the true suffix."""

    id: str
    tokens: np.ndarray              # int64, (prefix_len + suffix_len,)
    prefix_len: int
    source: str
    doc: str
    offset: int                     # token offset of the window inside its document
    group: str | None = None

    @property
    def suffix_len(self) -> int:
        return len(self.tokens) - self.prefix_len

    def provenance(self) -> dict[str, Any]:
        row = {"source": self.source, "doc": self.doc, "offset": self.offset}
        if self.group is not None:
            row["group"] = self.group
        return row


@dataclass
class WindowSet:
    windows: list[Window]
    source: str
    n_documents: int = 0
    n_short_skipped: int = 0        # documents shorter than one window
    bos: dict[str, Any] | None = None   # the BosPolicy the windows were cut with (`to_dict()`)

    def summary(self) -> dict[str, Any]:
        out = {"source": self.source, "n_documents": self.n_documents,
               "n_short_skipped": self.n_short_skipped, "n_windows": len(self.windows)}
        return out if self.bos is None else {**out, "bos": self.bos}


# -- reading documents -----------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    text: str = "text"
    tokens: str | None = None       # None: auto-detect one of TOKEN_COLUMNS
    group: str = "group"
    doc: str | None = None          # None: the first of DOC_COLUMNS present, else the 0-based row number


def load_documents(source: str, columns: Columns = Columns(), *, split: str = "train",
                   dataset_config: str | None = None, streaming: bool = False) -> Iterator[Document]:
    """Documents of any supported source, in a stable order."""
    if not source.strip():
        raise InputError("--dataset is empty: give a data file, a folder or a Hub dataset id")
    path = Path(source)
    if path.is_file():
        return _local_documents(path, columns)
    if os.path.lexists(path) and not path.exists():   # a symlink loop, or a symlink to nothing
        raise InputError(unreadable(path))
    if path.suffix in LOCAL_SUFFIXES or (source.startswith((".", "/")) and not path.exists()):
        raise InputError(f"data file not found: {source}")
    # A Hub id, or a local folder: 🤗 datasets reads both the same way (one row per JSONL line,
    # Parquet row or text line), so a folder exercises the real Hub code path offline.
    return _hub_documents(source, columns, split, dataset_config, streaming)


def _local_documents(path: Path, columns: Columns) -> Iterator[Document]:
    if path.suffix in (".npy", ".txt") and columns.doc is not None:
        raise InputError(f"{path} has no columns, so no document-id column '{columns.doc}'; --doc-column "
                         "applies to JSONL, Parquet and Hub datasets")
    if path.suffix == ".npy":
        return _npy_documents(path)
    if path.suffix == ".txt":
        return iter([Document(doc=path.name, text=read_text(path))])
    if path.suffix == ".parquet":
        return _rows_to_documents(_row_numbered(parquet_rows(path)), columns, str(path))
    return _rows_to_documents(_line_numbered(path), columns, str(path))


def _npy_documents(path: Path) -> Iterator[Document]:
    for i, row in enumerate(npy_tokens(path)):
        yield Document(doc=str(i), tokens=row.astype(np.int64).tolist())


def _hub_documents(source: str, columns: Columns, split: str, dataset_config: str | None,
                   streaming: bool) -> Iterator[Document]:
    rows = load_hub_dataset(source, split, dataset_config, streaming)
    return _rows_to_documents(_row_numbered(rows), columns, source)


# A row and where it is, as an error message names it ("line 42", "row 41 (0-based)").
Located = tuple[str, dict[str, Any]]


def _line_numbered(path: Path) -> Iterator[Located]:
    """JSONL rows with their 1-based line numbers (blank lines are skipped but counted)."""
    return ((f"line {lineno}", row) for lineno, row in read_jsonl_numbered(path))


def _row_numbered(rows: Iterator[dict[str, Any]]) -> Iterator[Located]:
    # Parquet and 🤗 datasets index rows from 0 (dataset[41]), so the message does too, and says so.
    for i, row in enumerate(rows):
        yield f"row {i} (0-based)", row


def _rows_to_documents(rows: Iterator[Located], columns: Columns, where: str) -> Iterator[Document]:
    first = next(rows, None)
    if first is None:
        return
    token_col = _pick_token_column(first[1], columns, where)
    doc_col = _pick_doc_column(first[1], columns, where)
    for i, (at, row) in enumerate(_chain(first, rows)):
        doc = _doc_id(row, doc_col, f"{where}: {at}") if doc_col else str(i)
        group = row.get(columns.group)
        group = None if group is None else str(group)
        secret = _secret(row["secret"], f"{where}: {at}") if row.get("secret") is not None else None
        if token_col:
            yield Document(doc=doc, tokens=_token_ids(row, token_col, f"{where}: {at}"), group=group, secret=secret)
        else:
            yield Document(doc=doc, text=_text(row, columns.text, f"{where}: {at}"), group=group, secret=secret)


def _secret(value: Any, at: str) -> Secret:
    """The `secret` column, its shape checked (its place in the tokens is checked by memcirc.exposure)."""
    if not isinstance(value, dict) or not {"start", "length", "alphabet"} <= set(value):
        raise InputError(f"{at}: 'secret' must be an object with start, length and alphabet, got {kind(value)}")
    start, length = value["start"], value["length"]
    if not _is_int(start) or start < 0 or not _is_int(length) or length < 1:
        raise InputError(f"{at}: secret start {start!r} and length {length!r} must be whole numbers, "
                         "start >= 0 and length >= 1")
    alphabet = token_list(value["alphabet"], at, "secret.alphabet")
    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise InputError(f"{at}: secret alphabet {alphabet} must be a non-empty list of distinct token ids")
    return Secret(start=start, length=length, alphabet=tuple(alphabet))


def _text(row: dict[str, Any], column: str, at: str) -> str:
    if column not in row:
        raise InputError(f"{at} has no column '{column}' (columns: {', '.join(row)})")
    text = row[column]
    if not isinstance(text, str):
        raise InputError(f"{at}: column '{column}' holds {kind(text)}, expected a string")
    return text


def _token_ids(row: dict[str, Any], column: str, at: str) -> list[int]:
    if column not in row:
        raise InputError(f"{at} has no column '{column}' (columns: {', '.join(row)})")
    return token_list(row[column], at, column)   # strict: 5.7, true, "5", 1e30 refused, never coerced


def _doc_id(row: dict[str, Any], column: str, at: str) -> str:
    value = row.get(column)
    if value is None or isinstance(value, (list, tuple, dict, np.ndarray)):
        raise InputError(f"{at}: column '{column}' holds {kind(value)}, expected a document id "
                         "(a string or a number)")
    return str(value)


def _pick_doc_column(row: dict[str, Any], columns: Columns, where: str) -> str | None:
    if columns.doc is None:
        return next((c for c in DOC_COLUMNS if c in row), None)
    if columns.doc not in row:
        raise InputError(f"{where}: no document-id column '{columns.doc}'; columns found: {', '.join(row)}")
    return columns.doc


def _pick_token_column(row: dict[str, Any], columns: Columns, where: str) -> str | None:
    if columns.tokens:
        if columns.tokens not in row:
            raise InputError(f"{where}: no token column '{columns.tokens}'; columns found: "
                             f"{', '.join(row)}")
        return columns.tokens
    if columns.text in row:
        return None
    found = next((c for c in TOKEN_COLUMNS if c in row), None)
    if found is None:
        raise InputError(f"{where}: no text column '{columns.text}' and no token column "
                         f"({', '.join(TOKEN_COLUMNS)}); columns found: {', '.join(row)}. "
                         "Name one with --text-column or --token-column")
    return found


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# -- windows ---------------------------------------------------------------------------------

def make_windows(documents: Iterator[Document], tokenizer: Any, source: str, prefix_len: int,
                 suffix_len: int, windowing: str = "start", stride: int | None = None,
                 limit: int | None = None, *, bos: BosPolicy | None = None) -> WindowSet:
    """Cut documents into windows of `prefix_len + suffix_len` document tokens, BOS in front of each.

    Text is encoded without special tokens and a token document loses a leading BOS; `bos` (default:
    the tokenizer's `auto` policy) then puts BOS before every window, not only the document's first,
    as a BOS-trained model saw every sequence. A window's `prefix_len` counts that BOS; `offset`
    counts document tokens (after the stripped BOS).
    """
    # memcirc.models pulls in transformers, which readers of token data need not import
    from memcirc.models.tokenizer import bos_policy

    policy = bos or bos_policy(tokenizer, "auto")
    length = prefix_len + suffix_len
    step = stride or length
    result = WindowSet(windows=[], source=source, bos=policy.to_dict())
    for document in documents:
        result.n_documents += 1
        # the tokens the windows can use: a 'start' window (or --limit windows) needs only a prefix
        remaining = None if limit is None else limit - len(result.windows)
        needed = length if windowing == "start" else None if remaining is None else (remaining - 1) * step + length
        tokens = _document_tokens(document, tokenizer, policy, needed)
        if len(tokens) < length:
            result.n_short_skipped += 1
            continue
        offsets = [0] if windowing == "start" else range(0, len(tokens) - length + 1, step)
        for offset in offsets:
            piece = tokens[offset:offset + length]
            window = policy.apply(piece)   # BOS is part of the prompt: it conditions the prefix
            result.windows.append(Window(
                id=f"{document.doc}@{offset}", tokens=np.asarray(window, np.int64),
                prefix_len=prefix_len + len(window) - len(piece), source=source, doc=document.doc,
                offset=offset, group=document.group))
            if limit is not None and len(result.windows) >= limit:
                return result
    return result


def _document_tokens(document: Document, tokenizer: Any, policy: BosPolicy, needed: int | None) -> list[int]:
    """The document's tokens: all of them, or (`needed`) at least its first `needed`, as they are in
    the whole document's tokenization."""
    from memcirc.models.tokenizer import encode

    if document.tokens is not None:
        return policy.strip(document.tokens)
    assert document.text is not None, "a Document holds token ids or text"
    if needed is not None:
        return encode_prefix(tokenizer, document.text, needed)
    if len(document.text) > HUGE_DOCUMENT_CHARS:
        log.warning("document %s has %s characters and is tokenized whole for sliding windows (about %d GB "
                    "of memory); split it into several rows, or use --limit or --windowing start",
                    document.doc, f"{len(document.text):,}", len(document.text) * BYTES_PER_CHAR // 10**9)
    return encode(tokenizer, document.text)


# A text cut short may end in other tokens than the whole text has there (a merge across the cut, a
# word split differently), so a cut's tokens are trusted only CUT_MARGIN tokens before its end, and
# only when a cut twice as long gives the same ones.
CHARS_PER_TOKEN = 8          # the first cut: 8 characters per needed token (English BPE has ~4)
MIN_CUT = 256                # ... and at least this many characters
CUT_MARGIN = 16
HUGE_DOCUMENT_CHARS = 10**7  # tokenizing a whole document this long is worth a warning
BYTES_PER_CHAR = 190         # peak memory of a fast tokenizer per character of text (measured, 30 MB)


def encode_prefix(tokenizer: Any, text: str, needed: int) -> list[int]:
    """At least the first `needed` tokens of `encode(tokenizer, text)` (all of them when the text has
    fewer), from a bounded prefix of the text: one 64-token window of a 30 MB document needs ~1 KB.

    The cut grows 4x at a time until its first `needed` tokens are followed by CUT_MARGIN more and
    agree with those of a cut twice as long; a cut reaching the end is the whole tokenization.
    """
    from memcirc.models.tokenizer import encode

    cut = max(needed * CHARS_PER_TOKEN, MIN_CUT)
    while 2 * cut < len(text):
        ids = encode(tokenizer, text[:cut])
        if len(ids) >= needed + CUT_MARGIN and encode(tokenizer, text[:2 * cut])[:needed] == ids[:needed]:
            return ids[:needed]
        cut *= 4
    return encode(tokenizer, text)


def validate_windows(windows: WindowSet, vocab_size: int, n_ctx: int | None) -> None:
    """Fail before any work on token ids the model cannot embed or windows it cannot attend over."""
    if not windows.windows:
        raise InputError(f"no windows left from {windows.source}: {windows.n_documents} documents read, "
                         f"{windows.n_short_skipped} shorter than one window (prefix_len + suffix_len)")
    seen: set[str] = set()
    for w in windows.windows:
        if w.id in seen:
            raise InputError(f"two windows share the id {w.id!r}: document ids in {windows.source} "
                             "must be unique")
        seen.add(w.id)
    longest = max(len(w.tokens) for w in windows.windows)
    if n_ctx is not None and longest > n_ctx:
        parts = "prefix_len + suffix_len" + (" + BOS" if (windows.bos or {}).get("bos_token_id") is not None else "")
        raise InputError(f"window length {longest} ({parts}) exceeds the model context "
                         f"{n_ctx}; lower --prefix-len/--suffix-len")
    for w in windows.windows:
        bad = w.tokens[(w.tokens >= vocab_size) | (w.tokens < 0)]
        if bad.size:
            raise InputError(f"window {w.id} has token id {int(bad[0])} outside the model vocabulary "
                             f"(size {vocab_size}): data and model tokenizers differ?")


# -- scored windows (a memorization stage's scores.jsonl) --------------------------------------

WINDOW_KEYS = ("id", "tokens", "prefix_len", "source", "doc", "offset")
# Decoded text for readers (`--decode-text`); no stage reads it back: read_scores drops it, so results
# cannot depend on a tokenizer's decoding.
TEXT_COLUMNS = ("prefix_text", "suffix_text", "continuation_text")
SCORES_PARQUET = "scores.parquet"   # `--parquet`: scores.jsonl's rows in Parquet (memorization folder)


@dataclass(frozen=True)
class ScoredWindow(Window):
    """A window as a memorization stage scored it: the Window plus its scores.jsonl row."""

    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def score(self, column: str) -> Any:
        return self.row[column]

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "scores.jsonl") -> ScoredWindow:
        """The window of one scores.jsonl row, its schema checked; `where` names the row ("FILE:LINE")."""
        missing = [k for k in WINDOW_KEYS if k not in row]
        if missing:
            raise InputError(f"{where}: row {row.get('id', '?')!r} lacks {', '.join(missing)}; is this a "
                             "memorization stage's scores.jsonl?")
        tokens = token_array(row["tokens"], where, "tokens")
        prefix_len, offset = row["prefix_len"], row["offset"]
        if not _is_int(prefix_len) or not 1 <= prefix_len < len(tokens):
            raise InputError(f"{where}: prefix_len {prefix_len!r} is not a whole number between 1 and "
                             f"{len(tokens) - 1} (the row has {len(tokens)} tokens)")
        if not _is_int(offset) or offset < 0:
            raise InputError(f"{where}: offset {offset!r} is not a whole number >= 0")
        group = row.get("group")
        return cls(id=_label(row, "id", where), tokens=tokens, prefix_len=prefix_len,
                   source=_label(row, "source", where), doc=_label(row, "doc", where), offset=offset,
                   group=None if group is None else _label(row, "group", where), row=row)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _label(row: dict[str, Any], key: str, where: str) -> str:
    """An id-like field of an upstream row: a string (or a number, as hand-made tables hold)."""
    value = row[key]
    if isinstance(value, str) or _is_int(value):
        return str(value)
    raise InputError(f"{where}: '{key}' holds {kind(value)}, expected a string")


def read_scores(stage_dir: Path, limit: int | None = None) -> list[ScoredWindow]:
    """The scored windows of a finished memorization stage folder (its manifest and the file's sha256
    are checked first), without the decoded-text columns."""
    from memcirc.manifest import read_output

    path = read_output(Path(stage_dir), SCORES_JSONL, what="memorization")
    rows = []
    for lineno, row in read_jsonl_numbered(path):
        if limit is not None and len(rows) >= limit:
            break
        for column in TEXT_COLUMNS:
            row.pop(column, None)
        rows.append(ScoredWindow.from_row(row, f"{path}:{lineno}"))   # a bad row names its line
    return rows


def memorized(windows: list[ScoredWindow], rule: MemorizedRule, where: str = "scores.jsonl") -> list[bool]:
    """For each window: is it memorized by `rule` (`rule.memorized_by >= rule.threshold`)?"""
    column = rule.memorized_by
    if windows and column not in windows[0].row:
        raise InputError(f"{where} has no '{column}' column; re-run memorization_score with "
                         f"--metrics ... {column}, or use --memorized-by exact")
    out = []
    for w in windows:
        value = w.row.get(column)
        if not isinstance(value, (bool, int, float)):   # a row the file's writer did not make
            held = f"{kind(value)} in '{column}'" if column in w.row else f"no '{column}'"
            raise InputError(f"{where}: window {w.id!r} has {held}, expected a number")
        out.append(float(value) >= rule.threshold)
    return out
