"""Data files of stage 1 (and the other stages' data flags): the review's d, n, p, s and h cases,
and our own."""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from fuzz.build import (
    Payload,
    jsonl,
    npy,
    parquet,
    parquet_corrupt_pages,
    token_rows,
    tokens,
    truncate,
    words_text,
    write,
)
from fuzz.table import COMPLETE, Case, Ctx

INPUTS = "inputs"


def data(name: str, make) -> tuple:
    """(builder, argv) for `--dataset {tmp}/<name>`, the file written by `make(path)`."""
    def build(ctx: Ctx) -> None:
        make(ctx.tmp / name)
    return build, ("--dataset", f"{{tmp}}/{name}")


def rows(name: str, rows_: list) -> tuple:
    return data(name, lambda p: jsonl(p, rows_))


def raw(name: str, blob: bytes | str) -> tuple:
    return data(name, lambda p: write(p, blob))


def case(id: str, review: str, source: tuple, rc: int = 2, words: tuple = (), owner: str = INPUTS,
         extra: tuple[str, ...] = (), **kw) -> Case:
    build, argv = source
    return Case(id, review, "memorization_score", (*argv, *extra), rc=rc, words=words, build=build, owner=owner,
                **kw)


def _garbage() -> bytes:
    return bytes((i * 131 + 7) % 256 for i in range(8192))


def _latin1() -> bytes:
    good = json.dumps(token_rows(1)[0]).encode()
    return good + b'\n{"text": "caf\xe9 ' + words_text(80).encode() + b'"}\n'


def _symlink_loop(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(path.name, path)


def _npz_as_npy(path) -> None:
    np.savez(path.with_suffix(".npz"), a=np.ones((2, 64), np.int64))
    path.with_suffix(".npz").rename(path)


def _truncated_npy(path) -> None:
    npy(path, np.ones((4, 64), np.int64))
    truncate(path, 0.6)


def _truncated_parquet(path) -> None:
    parquet(path, {"text": [words_text(200)] * 4})
    truncate(path, 0.5)


def _evil_dataset_folder(ctx: Ctx) -> None:
    folder = ctx.tmp / "evilds"
    write(folder / "evilds.py", f"import pathlib\npathlib.Path({str(ctx.marker)!r}).touch()\n")
    jsonl(folder / "data.jsonl", [{"text": words_text(100)}])


def _fifo(ctx: Ctx) -> None:
    path = ctx.tmp / "fifo.jsonl"
    os.mkfifo(path)

    def feed() -> None:   # a reader that opened the FIFO gets one row and EOF instead of blocking forever
        with open(path, "w") as fh:
            fh.write(json.dumps(token_rows(1)[0]) + "\n")
    threading.Thread(target=feed, daemon=True).start()


def _dev_zero(ctx: Ctx) -> None:
    os.symlink("/dev/zero", ctx.tmp / "z.jsonl")


def _newline_path(ctx: Ctx) -> None:
    write(ctx.tmp / "bad\nname.jsonl", "")


def _spy_tokenizer(ctx: Ctx) -> None:
    """Record the longest text handed to the tokenizer in one call (d16: a 2 MB document must not be
    tokenized whole to cut one 64-token window)."""
    from transformers import PreTrainedTokenizerFast

    seen: list[int] = []
    original = PreTrainedTokenizerFast._batch_encode_plus

    def spy(self, batch_text_or_text_pairs, *args, **kwargs):
        seen.append(max((len(t) for t in batch_text_or_text_pairs if isinstance(t, str)), default=0))
        return original(self, batch_text_or_text_pairs, *args, **kwargs)
    ctx.monkeypatch.setattr(PreTrainedTokenizerFast, "_batch_encode_plus", spy)
    ctx.extra["tokenized"] = seen
    jsonl(ctx.tmp / "huge.jsonl", [{"text": words_text(400_000)}])


def _bounded_tokenization(ctx: Ctx, _output: str) -> None:
    seen = ctx.extra["tokenized"]
    assert seen, "the tokenizer spy saw no call"
    assert max(seen) <= 200_000, f"a {max(seen):,}-character text went to the tokenizer for one 64-token window"


def _ids(expected: list[str]):
    def check(ctx: Ctx, _output: str) -> None:
        got = [json.loads(line)["id"] for line in (ctx.out / "memorization" / "scores.jsonl").read_text().splitlines()]
        assert got == expected, got
    return check


UNICODE_DOCS = ["ü-文書-🙂-0", "ü-文書-🙂-1"]
ROW = json.dumps(token_rows(1)[0])

CASES = [
    case("d01", "H", raw("empty.jsonl", ""), words=("empty.jsonl",)),
    case("d02", "B: UnicodeDecodeError traceback in artifacts.read_jsonl", raw("garbage.jsonl", _garbage()),
         words=("garbage.jsonl", "utf-8")),
    case("d03", "B (as d02)", raw("latin1.jsonl", _latin1()), words=("latin1.jsonl", ("line 2", ":2:"), "utf-8")),
    case("d04", "B: path.read_text() traceback", raw("doc.txt", b"caf\xe9 " + words_text(100).encode()),
         words=("doc.txt", "utf-8")),
    case("d05", "H", rows("col.jsonl", [{"body": "x"}]), words=("columns found", "body")),
    case("d06", "H", rows("neg.jsonl", [{"tokens": [-1] + tokens(63)}]), words=("-1", "vocabulary")),
    case("d07", "H", rows("oov.jsonl", [{"tokens": tokens(63) + [999999]}]), words=("999999", "vocabulary")),
    case("d08", "B: 5.7 silently truncated to 5 and scored", rows("float.jsonl", [{"tokens": [5.7] * 64}]),
         words=("float.jsonl", ("line 1", ":1:"), "5.7")),
    case("d09", "B: ValueError traceback in int(t)", rows("str.jsonl", [{"tokens": ["a"] * 64}]),
         words=("str.jsonl", ("line 1", ":1:"))),
    case("d10", "B: true silently scored as token 1", rows("bool.jsonl", [{"tokens": [True] * 64}]),
         words=("bool.jsonl", ("line 1", ":1:"), "true")),
    case("d11", "B: OverflowError traceback", raw("big.jsonl", '{"tokens": [1e30' + ", 5" * 63 + "]}\n"),
         words=("big.jsonl", ("line 1", ":1:"))),
    case("d12", "B: TypeError traceback", rows("nested.jsonl", [{"tokens": [[1, 2]] * 64}]),
         words=("nested.jsonl", ("line 1", ":1:"))),
    case("d13", "H", rows("null.jsonl", [{"tokens": None}]), words=(("line 1", ":1:"), "null")),
    case("d14", "H", raw("array.json", json.dumps([1, 2, 3])), words=("array.json",)),
    case("d15", "H", rows("mixed.jsonl", [token_rows(1)[0], {"text": words_text(100)}]),
         words=("mixed.jsonl", ("line 2", ":2:"))),
    Case("d16", "H, but 4 min 54 s and 6.5 GB RSS for one window (the whole 30 MB document tokenized)",
         "memorization_score", ("--dataset", "{tmp}/huge.jsonl"), rc=0, state=COMPLETE, build=_spy_tokenizer,
         check=_bounded_tokenization, owner=INPUTS,
         reason="2 MB instead of 30 MB, and no wall-time assert: a spy checks that no call tokenizes more than "
                "200,000 characters (windowing: start needs 64 tokens)"),
    case("n01", "H", data("f32.npy", lambda p: npy(p, np.ones((2, 64), np.float32))), words=("float32",)),
    case("n02", "H", data("1d.npy", lambda p: npy(p, np.ones(64, np.int64))), words=("2-d",)),
    case("n03", "H", data("3d.npy", lambda p: npy(p, np.ones((2, 2, 64), np.int64))), words=("2-d",)),
    Case("n04", "H (allow_pickle=False)", "memorization_score", ("--dataset", "{tmp}/obj.npy"), words=("obj.npy",),
         build=lambda ctx: npy(ctx.tmp / "obj.npy", np.array([Payload(ctx.marker)] * 2, dtype=object)),
         owner=INPUTS),
    case("n05", "B: AttributeError 'NpzFile' has no attribute 'ndim'", data("npz.npy", _npz_as_npy),
         words=("npz.npy",)),
    case("n06", "H", data("trunc.npy", _truncated_npy), words=("trunc.npy",)),
    case("n07", "H", data("bool.npy", lambda p: npy(p, np.ones((2, 64), bool))), words=("bool",)),
    case("n08", "H (the message shows the wrapped negative id)",
         data("u64.npy", lambda p: npy(p, np.full((2, 64), 2 ** 63 + 5, np.uint64))),
         words=("u64.npy", "9223372036854775813")),
    case("p01", "H", data("col.parquet", lambda p: parquet(p, {"body": ["x"]})), words=("columns found",)),
    case("p02", "H", data("int.parquet", lambda p: parquet(p, {"text": [1, 2]})), words=("expected a string",)),
    case("p03", "H", data("trunc.parquet", _truncated_parquet), words=("trunc.parquet",)),
    case("p04", "H", raw("rand.parquet", _garbage()), words=("rand.parquet",)),
    case("p05", "B: OSError (corrupt snappy data) escapes from iter_batches",
         data("pages.parquet", parquet_corrupt_pages), words=("pages.parquet",)),
    case("s01", "H ('data file not found': misleading but fine)", data("loop.jsonl", _symlink_loop),
         words=("loop.jsonl",)),
    Case("s02", "H", "memorization_score", ("--dataset", "{tmp}/dir ü/data ü.jsonl", "--output-dir", "{tmp}/out ü x"),
         rc=0, state=COMPLETE, build=lambda ctx: jsonl(ctx.tmp / "dir ü" / "data ü.jsonl", token_rows(2)),
         owner=INPUTS),
    Case("h01", "B: datasets' RuntimeError (dataset scripts) not mapped; the script was not run",
         "memorization_score", ("--dataset", "{tmp}/evilds"), words=("evilds",), build=_evil_dataset_folder,
         owner=INPUTS),

    # -- our own -------------------------------------------------------------------------------------------
    Case("x-dir-dataset", "new: an empty directory as --dataset", "memorization_score", ("--dataset", "{tmp}/adir"),
         words=("adir",), build=lambda ctx: (ctx.tmp / "adir").mkdir(), owner=INPUTS),
    Case("x-fifo", "new: a FIFO named .jsonl as --dataset", "memorization_score", ("--dataset", "{tmp}/fifo.jsonl"),
         words=("fifo.jsonl",), build=_fifo, owner=INPUTS,
         reason="a FIFO is not a regular file: refused by name, never read (reading would block on a writer)"),
    Case("x-dev-zero", "new: a .jsonl symlink to /dev/zero", "memorization_score", ("--dataset", "{tmp}/z.jsonl"),
         words=("z.jsonl",), build=_dev_zero, owner=INPUTS),
    Case("x-newline-path", "new: a dataset path holding a newline (an empty file)", "memorization_score",
         ("--dataset", "{tmp}/bad\nname.jsonl"), words=("name.jsonl",), build=_newline_path, owner="config-cli",
         reason="the promise is one line even when a named file has a line break in its name"),
    case("x-unicode-ids", "new: unicode document ids", rows("u.jsonl", [{"doc": d, "tokens": tokens()}
                                                                        for d in UNICODE_DOCS]),
         rc=0, state=COMPLETE, check=_ids([f"{d}@0" for d in UNICODE_DOCS])),
    case("x-crlf", "new: CRLF line ends", raw("crlf.jsonl", f"{ROW}\r\n{ROW.replace('[5,', '[6,')}\r\n"), rc=0,
         state=COMPLETE, check=_ids(["0@0", "1@0"]), reason="JSON allows \\r as whitespace: CRLF files read as LF"),
    case("x-bom-jsonl", "new: JSONL starting with a UTF-8 BOM", raw("bom.jsonl", "\ufeff" + ROW + "\n"), rc=0,
         state=COMPLETE, check=_ids(["0@0"]),
         reason="decided: accept a UTF-8 BOM at the start of a file (Windows editors write one; utf-8-sig)"),
    Case("x-dataset-empty-string", "new: --dataset ''", "memorization_score", ("--dataset", ""), words=("dataset",),
         owner=INPUTS),
    case("x-nan-token", "new: NaN as a token", raw("nan.jsonl", '{"tokens": [NaN' + ", 5" * 63 + "]}\n"),
         words=("nan.jsonl", ("line 1", ":1:"))),
    case("x-inf-token", "new: Infinity as a token", raw("inf.jsonl", '{"tokens": [Infinity' + ", 5" * 63 + "]}\n"),
         words=("inf.jsonl", ("line 1", ":1:"))),
    case("x-bigint-token", "new: 2**64 as a JSON integer token",
         rows("huge.jsonl", [{"tokens": [2 ** 64] + tokens(63)}]), words=("18446744073709551616",)),
    case("x-whole-float-token", "new: tokens 2.0", rows("f2.jsonl", [{"tokens": [float(t) for t in tokens()]}]),
         rc=0, state=COMPLETE, reason="in docs/memorization_score.md: whole floats are ids (Arrow stores a list "
                                      "column with one float as floats); 2.5 is refused (d08)"),
    case("x-deep-json", "new: a JSONL line nested 100,000 deep",
         raw("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"), words=("deep.jsonl", ("line 1", ":1:"))),
    case("x-array-line", "new: a JSONL line that is an array", raw("arr.jsonl", "[1, 2]\n"),
         words=("arr.jsonl", ("line 1", ":1:"))),
    case("x-dup-doc-ids", "new: two rows with one doc id", rows("dup.jsonl", [{"doc": "same", "tokens": tokens()}] * 2),
         words=("same",)),
    case("x-doc-null", "new: doc id null", rows("docnull.jsonl", [{"doc": None, "tokens": tokens()}]),
         words=("doc",)),
    case("x-empty-parquet", "new: a 0-byte .parquet", raw("empty.parquet", b""), words=("empty.parquet",)),
    case("x-npy-0-rows", "new: a (0, 64) .npy", data("rows0.npy", lambda p: npy(p, np.zeros((0, 64), np.int64))),
         words=("rows0.npy",)),
    case("x-empty-txt", "new: an empty .txt", raw("empty.txt", ""), words=("empty.txt",)),
]
