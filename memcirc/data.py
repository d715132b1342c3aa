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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memcirc.artifacts import SCORES_JSONL, read_jsonl, read_jsonl_numbered
from memcirc.errors import InputError

if TYPE_CHECKING:
    from memcirc.config import MemorizedRule
    from memcirc.models.tokenizer import BosPolicy

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".npy")
TOKEN_COLUMNS = ("tokens", "Tokens", "input_ids", "token_ids")  # tried in order when none is named
DOC_COLUMNS = ("doc", "index", "id")                  # stable document ids, when a source has them


@dataclass(frozen=True)
class Document:
    doc: str                        # stable id inside its source
    tokens: list[int] | None = None
    text: str | None = None
    group: str | None = None


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
    path = Path(source)
    if path.is_file():
        return _local_documents(path, columns)
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
        return iter([Document(doc=path.name, text=path.read_text())])
    if path.suffix == ".parquet":
        return _rows_to_documents(_row_numbered(parquet_rows(path)), columns, str(path))
    return _rows_to_documents(_line_numbered(path), columns, str(path))


def _npy_documents(path: Path) -> Iterator[Document]:
    # allow_pickle=False: an object array would need unpickling, which we never do.
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path} is not a plain NumPy token array ({e})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path} must hold a 2-D integer token array, got shape {array.shape} "
                         f"dtype {array.dtype}")
    for i, row in enumerate(array):
        yield Document(doc=str(i), tokens=row.astype(np.int64).tolist())


def parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file, batch by batch."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path} is not a readable Parquet file ({e})") from None
    for batch in table.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def load_hub_dataset(source: str, split: str, dataset_config: str | None = None, streaming: bool = False,
                     what: str = "dataset") -> Any:
    """`datasets.load_dataset` (Hub or local cache); a missing or unreadable dataset is an InputError."""
    import datasets

    try:
        return datasets.load_dataset(source, dataset_config, split=split, streaming=streaming)
    except FileNotFoundError:
        raise InputError(f"{what} {source!r} is neither a local file or folder nor a dataset "
                         "found on the Hub or in the local cache") from None
    except (ConnectionError, OSError, ValueError) as e:
        raise InputError(f"could not load {what} {source!r} (split {split!r}): "
                         f"{str(e).splitlines()[0]}") from None


def _hub_documents(source: str, columns: Columns, split: str, dataset_config: str | None,
                   streaming: bool) -> Iterator[Document]:
    dataset = load_hub_dataset(source, split, dataset_config, streaming)
    return _rows_to_documents(_row_numbered(iter(dataset)), columns, source)


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
        if token_col:
            yield Document(doc=doc, tokens=_token_ids(row, token_col, f"{where}: {at}"), group=group)
        else:
            yield Document(doc=doc, text=_text(row, columns.text, f"{where}: {at}"), group=group)


def _kind(value: Any) -> str:
    """A value's type as a data file's reader thinks of it (JSON names)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object", np.ndarray: "an array"}
    return names.get(type(value), f"a {type(value).__name__}")


def _text(row: dict[str, Any], column: str, at: str) -> str:
    if column not in row:
        raise InputError(f"{at} has no column '{column}' (columns: {', '.join(row)})")
    text = row[column]
    if not isinstance(text, str):
        raise InputError(f"{at}: column '{column}' holds {_kind(text)}, expected a string")
    return text


def _token_ids(row: dict[str, Any], column: str, at: str) -> list[int]:
    if column not in row:
        raise InputError(f"{at} has no column '{column}' (columns: {', '.join(row)})")
    tokens = row[column]
    if not isinstance(tokens, (list, tuple, np.ndarray)):
        raise InputError(f"{at}: column '{column}' holds {_kind(tokens)}, expected a list of token ids")
    ids = []
    for k, t in enumerate(tokens):
        # Arrow stores a list column with one float in it as floats throughout, so a whole number is
        # an id; bool (an int subclass) and a fractional number are refused, never truncated.
        whole = isinstance(t, (int, np.integer)) or (isinstance(t, (float, np.floating)) and float(t).is_integer())
        if isinstance(t, bool) or not whole:
            raise InputError(f"{at}: column '{column}' holds {_kind(t)} at position {k} ({t!r}), "
                             "expected integer token ids")
        ids.append(int(t))
    return ids


def _doc_id(row: dict[str, Any], column: str, at: str) -> str:
    value = row.get(column)
    if value is None or isinstance(value, (list, tuple, dict, np.ndarray)):
        raise InputError(f"{at}: column '{column}' holds {_kind(value)}, expected a document id "
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
        tokens = _document_tokens(document, tokenizer, policy)
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


def _document_tokens(document: Document, tokenizer: Any, policy: BosPolicy) -> list[int]:
    from memcirc.models.tokenizer import encode

    if document.tokens is not None:
        return policy.strip(document.tokens)
    assert document.text is not None, "a Document holds token ids or text"
    return encode(tokenizer, document.text)


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


@dataclass(frozen=True)
class ScoredWindow(Window):
    """A window as a memorization stage scored it: the Window plus its scores.jsonl row."""

    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def score(self, column: str) -> Any:
        return self.row[column]

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "scores.jsonl") -> ScoredWindow:
        missing = [k for k in WINDOW_KEYS if k not in row]
        if missing:
            raise InputError(f"{where}: row {row.get('id', '?')!r} lacks {', '.join(missing)}; is this a "
                             "memorization stage's scores.jsonl?")
        return cls(id=row["id"], tokens=np.asarray(row["tokens"], np.int64), prefix_len=row["prefix_len"],
                   source=row["source"], doc=row["doc"], offset=row["offset"], group=row.get("group"), row=row)


def read_scores(stage_dir: Path, limit: int | None = None) -> list[ScoredWindow]:
    """The scored windows of a finished memorization stage folder (its manifest is checked first)."""
    from memcirc.manifest import read_manifest

    read_manifest(stage_dir, what="memorization")
    path = Path(stage_dir) / SCORES_JSONL
    rows = []
    for row in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(ScoredWindow.from_row(row, str(path)))
    return rows


def memorized(windows: list[ScoredWindow], rule: MemorizedRule, where: str = "scores.jsonl") -> list[bool]:
    """For each window: is it memorized by `rule` (`rule.memorized_by >= rule.threshold`)?"""
    if windows and rule.memorized_by not in windows[0].row:
        raise InputError(f"{where} has no '{rule.memorized_by}' column; re-run memorization_score with "
                         f"--metrics ... {rule.memorized_by}, or use --memorized-by exact")
    return [float(w.row[rule.memorized_by]) >= rule.threshold for w in windows]
