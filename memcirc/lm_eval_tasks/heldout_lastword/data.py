"""The heldout_lastword data, for lm-eval's `custom_dataset` (see heldout_lastword.yaml).

Not `dataset_path: json` with `data_files`: datasets resolves a relative `data_files` against the
working directory, not the YAML, so the task would only work from one folder. This reads the JSONL
next to this file, in memory (no datasets cache, no network), one split per `split` value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().with_name("heldout_lastword.jsonl")
SPLITS = ("test", "fewshot")


def load(**_metadata: Any) -> Any:
    """A DatasetDict {test, fewshot}; lm-eval passes the task's metadata as keywords (unused)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list([r for r in rows if r["split"] == split])
                                 for split in SPLITS})
