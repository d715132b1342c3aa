"""Builders of hostile files: data files, YAML, model folders, pickle payloads. Each writes under a
case's tmp folder and returns the path; none of them needs the network or a GPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fuzz.table import TESTBED_MODEL

WINDOW = 64          # prefix_len + suffix_len of the testbed config (32 + 32)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def jsonl(path: Path, rows: list[Any]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def tokens(n: int = WINDOW, start: int = 5) -> list[int]:
    """`n` in-vocabulary testbed token ids."""
    return [start + (i * 7) % 500 for i in range(n)]


def token_rows(n_rows: int = 2, **extra: Any) -> list[dict[str, Any]]:
    return [{"tokens": tokens(start=5 + r), **extra} for r in range(n_rows)]


def words_text(n_words: int) -> str:
    """English-like text the testbed tokenizer splits into about one token per word."""
    vocab = ("the king and his men rode to the castle where a storm was rising over the hills "
             "of the north while the queen waited in the hall").split()
    return " ".join(vocab[i % len(vocab)] for i in range(n_words))


# -- NumPy / Parquet ---------------------------------------------------------------------------

def npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=array.dtype == object)
    return path


def parquet(path: Path, columns: dict[str, list[Any]], compression: str = "snappy") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, compression=compression)
    return path


def parquet_corrupt_pages(path: Path) -> Path:
    """A Parquet file whose footer is intact (it opens) but whose first data page is garbage
    (reading the rows fails inside pyarrow's decompressor)."""
    import pyarrow.parquet as pq

    parquet(path, {"text": [words_text(400 + i) for i in range(40)]})
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    blob = bytearray(path.read_bytes())
    # keep the page header's first bytes, scramble the compressed payload behind it
    for i in range(start + 24, start + column.total_compressed_size - 8):
        blob[i] = (blob[i] * 31 + 17) % 256
    path.write_bytes(bytes(blob))
    return path


# -- model folders -----------------------------------------------------------------------------

class Payload:
    """Unpickling this runs `touch MARKER`: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def model_copy(dest: Path, source: Path = TESTBED_MODEL, weights: bool = True) -> Path:
    """A copy of a testbed model folder (without its weights file when `weights` is False)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if weights or f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
    return dest


def pickle_model(dest: Path, marker: Path, kind: str, source: Path = TESTBED_MODEL) -> Path:
    """A model folder whose only weights are a `pytorch_model.bin`: `raw` (a bare pickle whose
    `__reduce__` touches `marker`), `zip` (the same payload in torch.save's zip format) or `legit`
    (the real weights, torch.save'd: a harmless pickle, still a pickle)."""
    import torch
    from safetensors.torch import load_file

    model_copy(dest, source, weights=False)
    target = dest / "pytorch_model.bin"
    if kind == "raw":
        target.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "zip":
        torch.save(Payload(marker), target)
    else:
        torch.save(load_file(str(source / "model.safetensors")), target)
    return dest


def remote_code_model(dest: Path, marker: Path, tokenizer_only: bool = False) -> Path:
    """A folder whose config (or only its tokenizer config) maps to a local `evil.py` that touches
    `marker` when imported. `tokenizer_only`: the real testbed model with a tokenizer `auto_map`."""
    evil = (f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
            "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evilcfg'\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    if tokenizer_only:
        model_copy(dest)
        config = json.loads((dest / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        write(dest / "tokenizer_config.json", json.dumps(config))
    else:
        model_copy(dest, weights=False)
        config = json.loads((dest / "config.json").read_text())
        config.update(model_type="evilcfg", auto_map={"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForCausalLM": "evil.EvilModel"})
        write(dest / "config.json", json.dumps(config))
    write(dest / "evil.py", evil)
    return dest


def truncate(path: Path, keep: float = 0.5) -> Path:
    blob = path.read_bytes()
    path.write_bytes(blob[:max(1, int(len(blob) * keep))])
    return path


def rewrite_jsonl(path: Path, edit: Any) -> Path:
    """Apply `edit(row_index, row) -> row | None` (None drops the row) to a JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in (edit(i, row) for i, row in enumerate(rows)) if r is not None]
    return write(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def reseal(stage_dir: Path, name: str) -> None:
    """Record `name`'s current sha256 (and row count) in the stage's manifest, as if the stage had
    written it so: the file is then consistent, only its content is bad."""
    from memcirc.artifacts import sha256_file

    manifest_path = stage_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest.get("outputs", []):
        if entry.get("path") == name:
            entry["sha256"] = sha256_file(stage_dir / name)
            if entry.get("rows") is not None:
                entry["rows"] = sum(1 for line in (stage_dir / name).read_bytes().splitlines() if line.strip())
    write(manifest_path, json.dumps(manifest, indent=2) + "\n")


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}
