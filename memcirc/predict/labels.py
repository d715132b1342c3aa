"""Labelled sequences: the windows of a memorization run, or label tables (memorized + controls).

A memorization run labels its windows with the memorized rule (`memcirc.data.memorized`). A table
(pythia-memorized-evals style: a `tokens`/`Tokens` column, optional `index`/`Index`) labels its rows 1
(memorized) or 0 (random controls), or by a score column (`label_column >= threshold`). The label's
own provenance (the testbed's `group`, which is k, or which table a row came from) is never a feature.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import AutoTokenizer

from memcirc import artifacts as art
from memcirc.data import TOKEN_COLUMNS, Window, load_hub_dataset, memorized, parquet_rows, read_scores
from memcirc.errors import InputError
from memcirc.models.arch import embedding_rows, n_ctx
from memcirc.models.identity import tokenizer_sha256
from memcirc.option_groups import MemorizedRule
from memcirc.testbed import MODEL_DIR, TESTBED_NAME
from memcirc.token_ids import kind, token_array

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DOC_KIND = "doc_kind"            # domain_column value: the document id's leading word (canary, corpus)
INDEX_COLUMNS = ("index", "Index")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Example:
    """One labelled sequence: `window.tokens[:window.prefix_len]` is the prompt, the rest the suffix."""

    window: Window                  # a ScoredWindow for the labels of a memorization run
    label: int
    origin: str                     # scores | labels | controls (provenance only, never a feature)
    domain: str | None = None
    offset: int | None = None       # token offset inside its document (windows of a run only)
    train_index: int | None = None  # a table's index column (position in the training order)
    baseline_score: float | None = None   # value of --baseline-column

    @property
    def id(self) -> str:
        return self.window.id

    @property
    def tokens(self) -> np.ndarray:
        return self.window.tokens

    @property
    def prefix_len(self) -> int:
        return self.window.prefix_len


def doc_kind(doc: str) -> str:
    """The leading word of a document id: 'canary-k08-03' -> 'canary', 'corpus-0001' -> 'corpus'
    (never the k inside a canary id)."""
    match = re.match(r"[A-Za-z_]+", doc)
    return match.group(0).rstrip("_") if match else "other"


# -- the windows of a memorization run ---------------------------------------------------------

def examples_from_scores(stage_dir: Path, rule: MemorizedRule, domain_column: str,
                         testbed_data: bool) -> list[Example]:
    """Every window of a finished memorization run, labelled by `rule`."""
    windows = read_scores(stage_dir)
    if not windows:
        raise InputError(f"{stage_dir}/scores.jsonl holds no windows")
    labels = memorized(windows, rule, f"{stage_dir}/scores.jsonl")
    if domain_column == "group" and testbed_data:
        raise InputError("domain_column 'group' is the testbed's k=<k> (how often a canary was inserted): it "
                         f"encodes the label; use '{DOC_KIND}' (canary / corpus) or 'source'")
    out = []
    for w, label in zip(windows, labels):
        domain = doc_kind(w.doc) if domain_column == DOC_KIND else w.row.get(domain_column)
        out.append(Example(w, int(label), "scores", domain=None if domain is None else str(domain), offset=w.offset))
    return out


# -- label tables ------------------------------------------------------------------------------

def file_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a local JSONL or Parquet table."""
    if path.suffix == ".parquet":
        return parquet_rows(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise InputError(f"{path}: label tables are JSONL or Parquet files (or a dataset folder / Hub id)")
    return art.read_jsonl(path)


def table_rows(source: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a local JSONL/Parquet file, or of a dataset folder or Hub id (🤗 datasets, `split`)."""
    path = Path(source)
    if path.is_file():
        yield from file_rows(path)
        return
    if path.suffix in TABLE_SUFFIXES or source.startswith((".", "/")) and not path.exists():
        raise InputError(f"label table not found: {source}")
    yield from load_hub_dataset(source, split, what="label table")


@dataclass(frozen=True)
class Table:
    """One label table: where its rows come from and the label a row gets without a score column."""

    source: str                     # file, dataset folder or Hub id
    split: str                      # split of a dataset folder or Hub id
    origin: str                     # labels | controls
    label: int


@dataclass(frozen=True)
class TableOptions:
    """How table rows become examples."""

    prefix_len: int | None = None   # default: half the row
    suffix_len: int | None = None   # rows are cut to prefix_len + suffix_len (default: the first row's length)
    label_column: str | None = None  # label = label_column >= threshold where the row has it
    threshold: float = 1.0
    baseline_column: str | None = None
    domain_column: str = "source"
    limit: int | None = None        # at most this many rows of each table


def _pick(row: dict[str, Any], names: Sequence[str]) -> str | None:
    return next((c for c in names if c in row), None)


def row_tokens(row: dict[str, Any], source: str, i: int) -> np.ndarray:
    """The token list of a table row (the first of TOKEN_COLUMNS it has)."""
    col = _pick(row, TOKEN_COLUMNS)
    if col is None or not isinstance(row[col], (list, tuple, np.ndarray)):
        raise InputError(f"{source}: row {i} has no token list (columns {', '.join(TOKEN_COLUMNS)}); "
                         f"columns found: {', '.join(row)}")
    return token_array(row[col], f"{source}: row {i}", col)   # strict: 5.7 or true is refused, never cast


def _row_example(row: dict[str, Any], i: int, tokens: np.ndarray, table: Table, opts: TableOptions) -> Example:
    """The example of one table row (`tokens` already cut to the row length)."""
    index_col = _pick(row, INDEX_COLUMNS)
    where = f"{table.source}: row {i}"
    index = int(_number(row, index_col, where, whole=True)) if index_col else None
    label = table.label
    if opts.label_column and opts.label_column in row:
        label = int(_number(row, opts.label_column, where) >= opts.threshold)
    baseline = None
    if opts.baseline_column:
        if opts.baseline_column not in row:
            raise InputError(f"{table.source}: no baseline column '{opts.baseline_column}'; columns found: "
                             f"{', '.join(row)}")
        baseline = _number(row, opts.baseline_column, where)
    domain = row.get(opts.domain_column)
    ident = f"{table.origin}:{index if index is not None else i}"
    window = Window(id=ident, tokens=tokens, prefix_len=opts.prefix_len or len(tokens) // 2, source=table.origin,
                    doc=ident, offset=0)
    return Example(window, label, table.origin, domain=None if domain is None else str(domain), train_index=index,
                   baseline_score=baseline)


def _number(row: dict[str, Any], column: str, where: str, whole: bool = False) -> float:
    """A numeric cell of a table row (a boolean score counts as 0/1), or an InputError naming it."""
    value = row[column]
    ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if whole:
        ok = ok and not isinstance(value, (bool, np.bool_)) and float(value).is_integer()
    if not ok:
        raise InputError(f"{where}: column '{column}' holds {kind(value)} ({value!r:.40}), expected "
                         f"{'a whole number' if whole else 'a number'}")
    return float(value)


def examples_from_tables(tables: Sequence[Table], opts: TableOptions) -> list[Example]:
    """The rows of `tables` (label tables first), cut to prefix_len + suffix_len tokens; a sequence in
    two tables is kept once, memorized (the random controls of a training set contain memorized
    sequences)."""
    length = opts.prefix_len + opts.suffix_len if opts.prefix_len and opts.suffix_len else None
    by_tokens: dict[tuple[int, ...], Example] = {}
    short = 0
    for table in tables:
        n_rows = 0
        for i, row in enumerate(table_rows(table.source, table.split)):
            if opts.limit is not None and i >= opts.limit:   # smoke runs: at most --limit rows of each table
                break
            n_rows += 1
            tokens = row_tokens(row, table.source, i)
            length = length or len(tokens)
            if len(tokens) < length or length < 2:
                short += 1
                continue
            example = _row_example(row, i, tokens[:length], table, opts)
            key = tuple(example.tokens.tolist())
            if key in by_tokens:
                by_tokens[key].label = max(by_tokens[key].label, example.label)
            else:
                by_tokens[key] = example
        if n_rows == 0:
            raise InputError(f"the {table.origin} table {table.source} holds no rows")
    if short:
        log.info("%d table rows shorter than %d tokens skipped", short, length)
    examples = list(by_tokens.values())
    if not examples:
        raise InputError(f"every row of {tables[0].source} is shorter than {length} tokens (prefix + suffix)")
    assert length is not None   # set by the first row read: a table without rows raised above
    if not 1 <= examples[0].prefix_len < length:
        raise InputError(f"prefix_len {examples[0].prefix_len} leaves no suffix in {length}-token rows")
    return examples


# -- checks --------------------------------------------------------------------------------------

def check_classes(examples: Sequence[Example], folds: int, where: str) -> None:
    """Both classes, each with at least one sequence per stratified fold."""
    n_pos = sum(e.label for e in examples)
    n_neg = len(examples) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "memorized" if n_neg == 0 else "non-memorized"
        raise InputError(f"the labels from {where} hold one class only ({len(examples)} {only} sequences): a "
                         "classifier needs both; add controls (--controls-file) or change --threshold")
    if min(n_pos, n_neg) < folds:
        raise InputError(f"{min(n_pos, n_neg)} {'memorized' if n_pos < n_neg else 'non-memorized'} sequences "
                         f"in {where} cannot fill {folds} stratified folds: use fewer --folds or more data")


def check_tokens(examples: Sequence[Example], model: PreTrainedModel, what: str) -> None:
    """Every token id must be one the model can embed, every sequence fit its context."""
    # nn.Module.__getattr__ is typed Tensor | Module; an embedding's weight is a Parameter
    vocab = embedding_rows(model)
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


def recorded_tokenizer_sha256(identity: dict[str, Any]) -> str | None:
    """The vocab hash of the tokenizer a manifest's model used (recorded, else from its folder or the
    HF cache); None when it cannot be loaded."""
    if identity.get("tokenizer_sha256"):
        return identity["tokenizer_sha256"]
    candidates = [(identity.get("local_path"), {})]
    if identity.get("name_or_path") == TESTBED_NAME:
        candidates.append((str(MODEL_DIR), {}))
    else:
        candidates.append((identity.get("name_or_path"), {"revision": identity.get("revision")}))
    for ref, kwargs in candidates:
        if not ref:
            continue
        try:
            options = {k: v for k, v in kwargs.items() if v}
            return tokenizer_sha256(AutoTokenizer.from_pretrained(ref, trust_remote_code=False, **options))
        except (OSError, ValueError, TypeError):
            continue
    return None
