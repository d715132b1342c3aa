"""The seed's baseline predictor: "memorized by a smaller model".

Three sources, each giving 1 (memorized) or 0 per example: a smaller model scored here with the
labels' own memorized rule, a table of the sequences a smaller model memorized, or a score column of
the label tables (`score >= threshold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np

from memcirc.data import ScoredWindow, memorized
from memcirc.errors import InputError
from memcirc.models import LoadedModel
from memcirc.option_groups import MemorizedRule
from memcirc.predict.labels import Example, file_rows, row_tokens
from memcirc.scoring import score_windows


def model_predictions(examples: Sequence[Example], baseline: LoadedModel, rule: MemorizedRule,
                      batch_size: int) -> np.ndarray:
    """1 where `baseline` memorizes the sequence by `rule` (scored here, as the labels were)."""
    # transformers' tokenizer __getattr__ types special-token ids as str | list[str]
    pad_token_id = cast("int | None", baseline.tokenizer.pad_token_id)
    pad = pad_token_id if pad_token_id is not None else 0
    rows = score_windows(baseline.model, [e.window for e in examples], pad_id=pad, batch_size=batch_size,
                         metrics=[rule.memorized_by])
    return np.array(memorized([ScoredWindow.from_row(r) for r in rows], rule), np.float64)


def memorized_table_tokens(path: Path, length: int) -> set[tuple[int, ...]]:
    """The sequences (first `length` tokens) of a local table of a smaller model's memorized sequences."""
    out = set()
    for i, row in enumerate(file_rows(path)):
        out.add(tuple(row_tokens(row, str(path), i)[:length].tolist()))   # ids checked, never cast
    if not out:
        raise InputError(f"the baseline table {path} holds no rows")
    return out


def table_predictions(examples: Sequence[Example], memorized_tokens: set[tuple[int, ...]]) -> np.ndarray:
    """1 where the sequence is in a smaller model's table of memorized sequences."""
    return np.array([tuple(e.tokens.tolist()) in memorized_tokens for e in examples], np.float64)


def column_predictions(examples: Sequence[Example], threshold: float) -> np.ndarray:
    """1 where the label table's baseline column (a smaller model's score) is >= threshold."""
    return np.array([_baseline_score(e) >= threshold for e in examples], np.float64)


def _baseline_score(example: Example) -> float:
    if example.baseline_score is None:
        raise InputError(f"sequence {example.id} has no baseline column value: --baseline-column reads a column "
                         "of the label tables (--labels-file)")
    return float(example.baseline_score)
