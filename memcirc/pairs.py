"""Contrastive pairs: the one type the contrastive stage writes and the circuit stages read.

A pair is a clean and a corrupt prompt of equal length, with a single-token answer (what the
model says after the clean prompt) and a wrong answer (after the corrupt one); a task pair
(memcirc.tasks) may carry sets of them instead (`answer_set`, `wrong_set`: greater-than's years), which
the metrics sum over. `pairs.jsonl` holds one `Pair.to_row()` per line; `read_pairs` checks every
row against the model it is read for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.manifest import output_sha256, read_manifest, read_output

PAIRS_JSONL = "pairs.jsonl"
SPLITS = ("discovery", "heldout")
REQUIRED = ("id", "doc", "split", "clean", "corrupt", "answer", "wrong")
KNOWN = (*REQUIRED, "window_id", "source", "group", "mode")
SETS = ("answer_set", "wrong_set")    # optional: the tokens a set metric sums over


@dataclass(frozen=True)
class Pair:
    """One contrastive pair: token ids of equal length, single-token answer and wrong answer."""

    id: str
    doc: str
    split: str
    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    answer: int
    wrong: int
    window_id: str = ""                 # provenance: the scored window it came from
    source: str = ""
    group: str | None = None
    mode: str = ""                      # how it was built (divergence / dataset)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)   # mode-specific details

    @property
    def answers(self) -> tuple[int, ...]:
        """The tokens the metric counts for: `answer_set` when the pair has one, else (answer,)."""
        return tuple(self.extra.get("answer_set") or (self.answer,))

    @property
    def wrongs(self) -> tuple[int, ...]:
        """The tokens the metric counts against: `wrong_set` when the pair has one, else (wrong,)."""
        return tuple(self.extra.get("wrong_set") or (self.wrong,))

    def to_row(self) -> dict[str, Any]:
        """The pairs.jsonl row."""
        return {"id": self.id, "window_id": self.window_id, "source": self.source, "doc": self.doc,
                "group": self.group, "mode": self.mode, "clean": list(self.clean), "corrupt": list(self.corrupt),
                "answer": self.answer, "wrong": self.wrong, **self.extra, "split": self.split}


def _ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_ids(row: dict[str, Any], where: str, vocab_size: int) -> None:
    for key in SETS:
        if key in row and not _ids(row[key]):
            raise InputError(f"{where}: {key} must be a non-empty list of token ids")
    ids = [*row["clean"], *row["corrupt"], row["answer"], row["wrong"], *row.get("answer_set", []),
           *row.get("wrong_set", [])]
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = max(ids) if max(ids) >= vocab_size else min(ids)
        raise InputError(f"{where}: token id {bad} is outside the model's vocabulary "
                         f"(0..{vocab_size - 1}); "
                         "the pairs were built with another tokenizer or model")


def read_pairs(path: Path, *, vocab_size: int, max_len: int, split: str | None = None,
               limit: int | None = None) -> list[Pair]:
    """Read and check every row of a contrastive `pairs.jsonl`; keep one split (and `limit` rows).

    Every row is checked, not only the kept ones: ids must fit the model's vocabulary (a pairs file
    from another tokenizer fails here), clean and corrupt must have equal length, and no document
    may appear in both splits.

    Raises:
        InputError: naming the row and the problem.
    """
    pairs: list[Pair] = []
    doc_split: dict[str, str] = {}
    for i, row in enumerate(art.read_jsonl(path), 1):
        where = f"{path} row {i}"
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}; is this a contrastive pairs.jsonl?")
        clean, corrupt, answer, wrong = row["clean"], row["corrupt"], row["answer"], row["wrong"]
        if not (_ids(clean) and _ids(corrupt)):
            raise InputError(f"{where}: clean and corrupt must be non-empty lists of token ids")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (answer, wrong)):
            raise InputError(f"{where}: answer and wrong must be single token ids")
        if len(clean) != len(corrupt):
            raise InputError(f"{where}: clean has {len(clean)} tokens, corrupt {len(corrupt)}; pairs must "
                             "have equal length")
        if len(clean) > max_len:
            raise InputError(f"{where}: {len(clean)} tokens exceed the model's context of {max_len}")
        _check_ids(row, where, vocab_size)
        if row["split"] not in SPLITS:
            raise InputError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        doc = str(row["doc"])
        if doc_split.setdefault(doc, row["split"]) != row["split"]:
            raise InputError(f"{where}: document {doc!r} is in both splits; rebuild the pairs "
                             "(splits must be disjoint by document)")
        if split is None or row["split"] == split:
            extra = {k: v for k, v in row.items() if k not in KNOWN}
            pairs.append(Pair(str(row["id"]), doc, row["split"], tuple(clean), tuple(corrupt), answer, wrong,
                              window_id=str(row.get("window_id", "")), source=str(row.get("source", "")),
                              group=row.get("group"), mode=str(row.get("mode", "")), extra=extra))
    return pairs[:limit] if limit is not None else pairs


def write_pairs(path: Path, pairs: list[Pair]) -> int:
    """Write pairs.jsonl atomically; returns the row count."""
    return art.write_jsonl(path, (p.to_row() for p in pairs))


def pairs_input(stage_dir: Path, what: str = "contrastive") -> tuple[Path, dict[str, Any], str]:
    """(pairs.jsonl path, its stage manifest, its sha256), checked against the manifest."""
    manifest = read_manifest(stage_dir, what)
    path = read_output(stage_dir, PAIRS_JSONL, what, manifest)
    sha = output_sha256(manifest, PAIRS_JSONL)
    assert sha is not None   # read_output has checked the file against it
    return path, manifest, sha
