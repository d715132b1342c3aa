"""Regenerate heldout_lastword.jsonl from the testbed's held-out plays (`python -m
memcirc.lm_eval_tasks.heldout_lastword.build`; the output is committed, the build is deterministic).

An item is the opening of one speech, whole verse lines (newlines kept, as the plays print them) up to
the first line end at which the passage holds at least MIN_WORDS words, and at most MAX_WORDS (so
that it fits the testbed's 128-token context); its last word, stripped of trailing punctuation, is
the target. LAMBADA's format: the
`text` field is the passage, the target is its last space-separated word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from memcirc.testbed import CORPUS_DIR

OUT = Path(__file__).resolve().parent / "heldout_lastword.jsonl"
MIN_WORDS, MAX_WORDS = 16, 60
N_TEST, N_FEWSHOT = 200, 16
SPEAKER = re.compile(r"[A-Z][A-Z .'-]+")      # a speech starts with its speaker's name in capitals
TARGET = re.compile(r"[A-Za-z]{3,}")          # a plain word: no digits, dashes or apostrophes


def _speeches(lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number of the speech's first line, its text lines up to a stage direction)."""
    i = 0
    while i < len(lines):
        if SPEAKER.fullmatch(lines[i].strip()) and i + 1 < len(lines) and lines[i + 1].strip():
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("["):
                body.append(lines[i].strip())   # a stage direction ends the passage: it stays contiguous text
                i += 1
            yield start, body
        i += 1


def _item(body: list[str]) -> str | None:
    """The passage: whole lines until >= MIN_WORDS words, ending on a plain word; None if none fits."""
    kept: list[str] = []
    n_words = 0
    for line in body:
        words = line.split()
        kept.append(" ".join(words))
        n_words += len(words)
        if n_words > MAX_WORDS:
            return None
        if n_words >= MIN_WORDS:
            last = re.sub(r"[^A-Za-z]+$", "", words[-1])
            if len(words) < 2 or not TARGET.fullmatch(last):   # the target must follow a space on its line
                return None
            return "\n".join(kept[:-1] + [" ".join(words[:-1] + [last])])
    return None


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def build(source: Path = CORPUS_DIR / "heldout.txt") -> list[dict]:
    lines = source.read_text().splitlines()
    candidates = [(line, text) for line, body in _speeches(lines) if (text := _item(body)) is not None]
    test = set(_spread(len(candidates), N_TEST))
    rest = [i for i in range(len(candidates)) if i not in test]
    fewshot = {rest[j] for j in _spread(len(rest), N_FEWSHOT)}
    return [{"split": "test" if i in test else "fewshot", "line": line, "text": text}
            for i, (line, text) in enumerate(candidates) if i in test or i in fewshot]


if __name__ == "__main__":
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{OUT}: {sum(r['split'] == 'test' for r in rows)} test + {sum(r['split'] == 'fewshot' for r in rows)} "
          "few-shot items")
