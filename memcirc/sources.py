"""Reading local data files and 🤗 datasets into rows, arrays or text: every way a file can be
unreadable (not UTF-8, an .npz named .npy, a corrupt Parquet page, a dataset script) becomes one
InputError line naming the file and, where there is one, the line or row. `memcirc.data` turns
what these return into documents.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memcirc import hub
from memcirc.artifacts import open_input
from memcirc.errors import InputError
from memcirc.token_ids import INT64_MAX


def read_text(path: Path) -> str:
    """A text file's content, decoded as UTF-8 whatever the locale; other bytes name their line."""
    with open_input(path) as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); text files are read as "
                         "UTF-8 (latin-1: convert it with iconv -f latin1 -t utf-8)") from None


def npy_tokens(path: Path) -> np.ndarray:
    """The 2-D integer token array of an .npy file (one row per document), checked."""
    # allow_pickle=False: an object array would need unpickling, which we never do.
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise InputError(f"{path} is not a plain NumPy token array ({e})") from None
    if not isinstance(array, np.ndarray):   # np.load goes by the file's magic: an .npz under any name
        array.close()
        raise InputError(f"{path} is an .npz archive, not an .npy array: save the token array alone with np.save")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path} must hold a 2-D integer token array, got shape {array.shape} "
                         f"dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.unsignedinteger) and array.size and array.max() > INT64_MAX:
        row, position = np.argwhere(array > INT64_MAX)[0]   # compared unsigned: shown as stored, not wrapped
        raise InputError(f"{path}: row {row} (0-based) holds {array[row, position]} at position {position}, "
                         "outside the int64 range of token ids")
    return array


def parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file, batch by batch."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path} is not a readable Parquet file ({e})") from None
    batches, start = table.iter_batches(batch_size=1024), 0
    while True:
        # a valid footer says nothing of the data pages: a corrupt page fails here, batch by batch
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except (OSError, ValueError) as e:   # pyarrow's ArrowIOError / ArrowInvalid subclass these
            raise InputError(f"{path}: row {start} (0-based) and on cannot be read, the file is corrupt "
                             f"({first_line(e)})") from None
        if batch is None:
            return
        yield from rows
        start += len(rows)


def load_hub_dataset(source: str, split: str, dataset_config: str | None = None, streaming: bool = False,
                     what: str = "dataset") -> Iterator[dict[str, Any]]:
    """The rows of `datasets.load_dataset` (Hub or local cache); a missing or unreadable dataset, or
    a row that cannot be read, is an InputError."""
    import datasets
    from datasets.exceptions import DatasetsError

    local = Path(source).is_dir()
    if not local:   # an unreachable Hub: the cache, or the error at once, not ~50 s of retries
        hub.offline_unless_reachable()
    try:
        with _quiet_datasets(local):
            dataset = datasets.load_dataset(source, dataset_config, split=split, streaming=streaming)
    except FileNotFoundError:
        raise InputError(f"{what} {source!r} is neither a local file or folder nor a dataset "
                         f"found on the Hub or in the local cache{_offline_hint(local)}") from None
    except RuntimeError as e:   # datasets >= 4 refuses a folder or repo holding a loading script
        raise InputError(f"could not load {what} {source!r}: {first_line(e)}; memcirc reads data files "
                         "(JSONL, Parquet, text) and never runs a dataset script") from None
    except (ConnectionError, OSError, ValueError, DatasetsError) as e:   # DatasetGenerationError: a bad file
        hint = _offline_hint(local) if isinstance(e, ConnectionError) or hub.is_offline() else ""
        raise InputError(f"could not load {what} {source!r} (split {split!r}): {first_line(e)}{hint}") from None
    return _hub_rows(dataset, source, what, local)


def _offline_hint(local: bool) -> str:
    """What to do about a Hub dataset that is not in the cache while the Hub cannot be used."""
    if local:
        return ""
    return (f"; {hub.offline_reason()}: pass a local JSONL, Parquet or TXT file (or a folder of them), "
            "or download the dataset once where there is network (it is then cached)")


def _hub_rows(dataset: Any, source: str, what: str, local: bool) -> Iterator[dict[str, Any]]:
    """The rows of a loaded dataset; a streamed file that turns out unreadable is an InputError."""
    rows = iter(dataset)
    for i in itertools.count():
        try:
            with _quiet_datasets(local and i == 0):   # a streamed file is opened at the first row
                row = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError) as e:   # pyarrow's errors subclass these, as do UnicodeDecodeError
            raise InputError(f"{what} {source!r}: row {i} (0-based) and on cannot be read: {first_line(e)}") from None
        yield row


@contextlib.contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    """For a local folder: no progress bars and no error log lines of datasets' own (the error they
    announce comes as one InputError line). A Hub download keeps its progress bars."""
    import datasets

    if not quiet or datasets.are_progress_bars_disabled():
        yield
        return
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity(level)


def first_line(error: BaseException) -> str:
    """The first line of an error, or of its cause (datasets wraps the reader's error in a vaguer one)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    cause = error.__cause__
    return f"{text}: {str(cause).splitlines()[0]}" if cause is not None and str(cause) else text
