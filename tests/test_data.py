import json

import numpy as np
import pytest

from memcirc.data import Columns, load_documents, make_windows, validate_windows
from memcirc.errors import InputError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def windows_of(source, tokenizer, prefix=4, suffix=4, **kw):
    return make_windows(load_documents(source, kw.pop("columns", Columns())), tokenizer, source,
                        prefix, suffix, **kw)


def test_token_table_like_pythia_memorized_evals(tmp_path, tiny_tokenizer):
    rows = [{"index": 1000 + i, "tokens": list(range(i, i + 12))} for i in range(3)]
    rows.append({"index": 7, "tokens": [1, 2, 3]})  # shorter than a window: skipped, counted
    ws = windows_of(write_jsonl(tmp_path / "m.jsonl", rows), tiny_tokenizer)
    assert [w.doc for w in ws.windows] == ["1000", "1001", "1002"]
    assert ws.n_documents == 4 and ws.n_short_skipped == 1
    assert ws.windows[1].tokens.tolist() == list(range(1, 9)) and ws.windows[1].prefix_len == 4
    assert ws.windows[0].provenance() == {"source": str(tmp_path / "m.jsonl"), "doc": "1000", "offset": 0}


def test_sliding_windows_and_groups(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "t.jsonl", [{"tokens": list(range(20)), "group": "k=4"}])
    ws = windows_of(src, tiny_tokenizer, windowing="sliding", stride=5)
    assert [w.offset for w in ws.windows] == [0, 5, 10]
    assert all(w.group == "k=4" for w in ws.windows)
    assert ws.windows[2].tokens.tolist() == list(range(10, 18))
    assert len(windows_of(src, tiny_tokenizer, windowing="sliding", stride=5, limit=2).windows) == 2


def test_text_is_tokenized_once(tmp_path, tiny_tokenizer):
    text = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer"
    ws = windows_of(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tiny_tokenizer)
    assert ws.windows[0].tokens.tolist() == tiny_tokenizer(text)["input_ids"][:8]


def test_parquet_npy_and_txt_agree(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokens = np.arange(30, dtype=np.int64).reshape(3, 10)
    pq.write_table(pa.table({"tokens": tokens.tolist()}), tmp_path / "d.parquet")
    np.save(tmp_path / "d.npy", tokens)
    a = windows_of(str(tmp_path / "d.parquet"), tiny_tokenizer).windows
    b = windows_of(str(tmp_path / "d.npy"), tiny_tokenizer).windows
    assert [w.tokens.tolist() for w in a] == [w.tokens.tolist() for w in b] == [r[:8] for r in tokens.tolist()]
    (tmp_path / "play.txt").write_text("Now is the winter of our discontent made glorious summer")
    txt = windows_of(str(tmp_path / "play.txt"), tiny_tokenizer).windows
    assert txt[0].doc == "play.txt"


def test_folder_goes_through_datasets(tmp_path, tiny_tokenizer):
    """A local folder takes the same `datasets.load_dataset` path as a Hub id (offline here)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"tokens": list(range(i, i + 10)), "group": "corpus"} for i in range(5)]
    write_jsonl(folder / "train.jsonl", rows)
    via_datasets = windows_of(str(folder), tiny_tokenizer).windows
    via_file = windows_of(str(folder / "train.jsonl"), tiny_tokenizer).windows
    assert [w.tokens.tolist() for w in via_datasets] == [w.tokens.tolist() for w in via_file]
    streamed = make_windows(load_documents(str(folder), streaming=True), tiny_tokenizer, "s", 4, 4)
    assert len(streamed.windows) == 5


def test_missing_columns_list_what_was_found(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "meta": 1}])
    with pytest.raises(InputError, match="columns found: body, meta"):
        windows_of(src, tiny_tokenizer)
    with pytest.raises(InputError, match="no token column 'ids'; columns found: body, meta"):
        windows_of(src, tiny_tokenizer, columns=Columns(tokens="ids"))


def test_bad_sources(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="data file not found"):
        windows_of(str(tmp_path / "missing.jsonl"), tiny_tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"tokens": [1]}\n{oops}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: malformed JSON"):
        windows_of(str(tmp_path / "bad.jsonl"), tiny_tokenizer)
    np.save(tmp_path / "obj.npy", np.arange(5))
    with pytest.raises(InputError, match="2-D integer token array"):
        windows_of(str(tmp_path / "obj.npy"), tiny_tokenizer)
    with pytest.raises(InputError, match="could not load dataset|neither a local file"):
        windows_of("no-such-org/no-such-dataset", tiny_tokenizer)


def test_validation(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "t.jsonl", [{"tokens": [1, 2, 3, 999, 5, 6, 7, 8]}])
    with pytest.raises(InputError, match="token id 999 outside the model vocabulary"):
        validate_windows(windows_of(src, tiny_tokenizer), vocab_size=300, n_ctx=64)
    with pytest.raises(InputError, match="exceeds the model context 6"):
        validate_windows(windows_of(src, tiny_tokenizer), vocab_size=1000, n_ctx=6)
    with pytest.raises(InputError, match="no windows left .* 1 shorter than one window"):
        validate_windows(windows_of(src, tiny_tokenizer, prefix=10, suffix=10), vocab_size=1000, n_ctx=64)


def test_duplicate_document_ids_are_refused(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", [{"index": 3, "tokens": list(range(10))}] * 2)
    with pytest.raises(InputError, match="share the id '3@0'"):
        validate_windows(windows_of(src, tiny_tokenizer), vocab_size=1000, n_ctx=64)


# -- BOS on every window -----------------------------------------------------------------------

WORDS = "the quick brown fox jumps over lazy dog and then runs far away into a dark green wood".split()


def build_bos_tokenizer():
    """A word-level tokenizer whose post-processor puts <s> (id 1) in front, as Llama/Gemma ones do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bos_tokenizer():
    return build_bos_tokenizer()


def _text_windows(tmp_path, tokenizer, mode, **kw):
    from memcirc.models.tokenizer import bos_policy

    src = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(WORDS * 2)}])
    return make_windows(load_documents(src), tokenizer, src, 4, 4, windowing="sliding", stride=3,
                        bos=bos_policy(tokenizer, mode), **kw)


def test_every_sliding_window_starts_with_bos(tmp_path, bos_tokenizer):
    assert bos_tokenizer("fox")["input_ids"] == [1, 6]   # the fixture adds BOS itself
    text_ids = bos_tokenizer(" ".join(WORDS * 2), add_special_tokens=False)["input_ids"]
    for mode in ("auto", "always"):
        ws = _text_windows(tmp_path, bos_tokenizer, mode)
        assert len(ws.windows) == (len(text_ids) - 8) // 3 + 1 > 5
        for w in ws.windows:
            assert w.tokens[0] == 1 and 1 not in w.tokens[1:].tolist()    # BOS once, in front
            assert w.prefix_len == 5 and w.suffix_len == 4                  # prefix_len counts the BOS
            assert w.tokens[1:].tolist() == text_ids[w.offset:w.offset + 8]
        assert ws.summary()["bos"] == {"prepend_bos": mode, "bos_token_id": 1}
    never = _text_windows(tmp_path, bos_tokenizer, "never")
    assert all(1 not in w.tokens.tolist() and w.prefix_len == 4 for w in never.windows)
    assert [w.tokens.tolist() for w in never.windows] == [text_ids[w.offset:w.offset + 8] for w in never.windows]


def test_gpt2_style_tokenizer_gets_no_bos_in_auto(tmp_path, tiny_tokenizer):
    from memcirc.models.tokenizer import bos_policy

    assert bos_policy(tiny_tokenizer, "auto").bos_id is None      # it has a BOS token, but never adds it
    text = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer"
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    ws = make_windows(load_documents(src), tiny_tokenizer, src, 4, 4, windowing="sliding", stride=2)
    ids = tiny_tokenizer(text)["input_ids"]
    assert [w.tokens.tolist() for w in ws.windows] == [ids[w.offset:w.offset + 8] for w in ws.windows]
    assert all(w.prefix_len == 4 for w in ws.windows) and ws.summary()["bos"]["bos_token_id"] is None
    forced = make_windows(load_documents(src), tiny_tokenizer, src, 4, 4, windowing="sliding", stride=2,
                          bos=bos_policy(tiny_tokenizer, "always"))
    assert all(w.tokens[0] == tiny_tokenizer.bos_token_id and w.prefix_len == 5 for w in forced.windows)


def test_token_document_with_bos_is_not_doubled(tmp_path, bos_tokenizer):
    from memcirc.models.tokenizer import bos_policy

    src = write_jsonl(tmp_path / "t.jsonl", [{"doc": "a", "tokens": [1] + list(range(3, 15))},
                                             {"doc": "b", "tokens": list(range(3, 15))}])
    ws = make_windows(load_documents(src), bos_tokenizer, src, 4, 4, windowing="sliding", stride=4,
                      bos=bos_policy(bos_tokenizer, "auto"))
    by_doc = {}
    for w in ws.windows:
        by_doc.setdefault(w.doc, []).append((w.offset, w.tokens.tolist()))
    # The leading BOS is stripped and put back on each window: both documents give the same windows.
    assert by_doc["a"] == by_doc["b"] == [(0, [1, 3, 4, 5, 6, 7, 8, 9, 10]), (4, [1, 7, 8, 9, 10, 11, 12, 13, 14])]


def test_teacher_forced_scores_of_a_bos_window_match_a_direct_forward(tmp_path, bos_tokenizer):
    """score_windows on a BOS window == log-probs of the suffix given [BOS] + prefix, computed by hand."""
    import torch
    from conftest import build_tiny_model

    from memcirc.scoring import score_windows

    model = build_tiny_model("llama")
    ws = _text_windows(tmp_path, bos_tokenizer, "auto").windows[:3]
    rows = score_windows(model, ws, pad_id=0, batch_size=2)
    text_ids = bos_tokenizer(" ".join(WORDS * 2), add_special_tokens=False)["input_ids"]
    for w, row in zip(ws, rows):
        ids = torch.tensor([[1] + text_ids[w.offset:w.offset + 8]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        nll = -np.mean([logp[t - 1, ids[0, t]].item() for t in range(5, 9)])   # the 4 suffix tokens
        assert row["prefix_len"] == 5 and row["suffix_len"] == 4
        assert row["suffix_nll"] == pytest.approx(nll, abs=1e-4)


# -- row errors: the type named, the place in the file -------------------------------------------

def test_row_type_errors_name_the_type_and_the_file_line(tmp_path, tiny_tokenizer):
    rows = [{"text": f"line {i} of the file"} for i in range(40)] + [{"text": ["a", "list"]}]
    src = tmp_path / "t.jsonl"
    # a blank line (skipped, still a line of the file): the bad row is line 42
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]) + "\n"
                   + "".join(json.dumps(r) + "\n" for r in rows[20:]))
    with pytest.raises(InputError, match=r"t.jsonl: line 42: column 'text' holds a list, expected a string$"):
        windows_of(str(src), tiny_tokenizer)
    src = write_jsonl(tmp_path / "n.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(InputError, match=r"line 2: column 'text' holds null, expected a string"):
        windows_of(src, tiny_tokenizer)
    src = write_jsonl(tmp_path / "k.jsonl", [{"tokens": [1, 2]}, {"tokens": "1 2 3"}])
    with pytest.raises(InputError, match=r"line 2: column 'tokens' holds a string, expected a list of token ids"):
        windows_of(src, tiny_tokenizer)
    src = write_jsonl(tmp_path / "f.jsonl", [{"tokens": [1, 2.0, 3.5]}])   # 2.0 is an id, 3.5 is not
    with pytest.raises(InputError, match=r"line 1: column 'tokens' holds a number at position 2 \(3.5\), "
                                         "expected integer token ids"):
        windows_of(src, tiny_tokenizer)
    src = write_jsonl(tmp_path / "m.jsonl", [{"text": "fine"}, {"body": "x"}])
    with pytest.raises(InputError, match=r"line 2 has no column 'text' \(columns: body\)"):
        windows_of(src, tiny_tokenizer)


def test_row_errors_in_parquet_and_datasets_are_0_based_rows(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one two three four five six seven eight nine", None]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d.parquet: row 1 \(0-based\): column 'text' holds null"):
        windows_of(str(tmp_path / "d.parquet"), tiny_tokenizer)
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"tokens": list(range(10))}, {"tokens": list(range(10))},
                                         {"tokens": [1, 2, -3.5]}])
    with pytest.raises(InputError, match=r"row 2 \(0-based\): column 'tokens' holds a number at position 2"):
        windows_of(str(folder), tiny_tokenizer)


# -- document ids ----------------------------------------------------------------------------------

def test_doc_column_names_the_windows(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "t.jsonl", [{"name": f"licence-{i}", "id": i, "tokens": list(range(12))}
                                             for i in range(2)])
    named = windows_of(src, tiny_tokenizer, columns=Columns(doc="name"), windowing="sliding", stride=4)
    assert [w.id for w in named.windows] == ["licence-0@0", "licence-0@4", "licence-1@0", "licence-1@4"]
    assert [w.id for w in windows_of(src, tiny_tokenizer).windows] == ["0@0", "1@0"]   # auto: 'id'
    unnamed = write_jsonl(tmp_path / "u.jsonl", [{"tokens": list(range(12))}] * 2)
    assert [w.doc for w in windows_of(unnamed, tiny_tokenizer).windows] == ["0", "1"]   # row numbers
    with pytest.raises(InputError, match="no document-id column 'title'; columns found: name, id, tokens"):
        windows_of(src, tiny_tokenizer, columns=Columns(doc="title"))
    gap = write_jsonl(tmp_path / "g.jsonl", [{"name": "a", "tokens": list(range(12))}, {"tokens": list(range(12))}])
    with pytest.raises(InputError, match="line 2: column 'name' holds null, expected a document id"):
        windows_of(gap, tiny_tokenizer, columns=Columns(doc="name"))
    np.save(tmp_path / "d.npy", np.arange(20).reshape(2, 10))
    with pytest.raises(InputError, match="--doc-column applies to JSONL, Parquet and Hub datasets"):
        windows_of(str(tmp_path / "d.npy"), tiny_tokenizer, columns=Columns(doc="name"))


# -- strict token ids (review d08-d12, n08) ------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ([1, 2, 5.7], r"position 2 \(5.7\), expected integer token ids"),
    ([1, True], r"holds a boolean at position 1 \(True\)"),
    (["7"], r"holds a string at position 0 \('7'\)"),
    ([1, [2, 3]], r"holds a list at position 1 \(\[2, 3\]\)"),
    ([1, None], r"holds null at position 1"),
    ([1e30], r"position 0 \(1e\+30\), outside the int64 range of token ids"),
    ([2 ** 70], r"\(1180591620717411303424\), outside the int64 range"),
    ([float("nan")], r"\(nan\), expected integer token ids"),
    (np.array([3, 2 ** 63 + 5], np.uint64), r"position 1 \(9223372036854775813\), outside the int64 range"),
    (np.array([1.0, 2.5]), r"position 1 \(2.5\)"),
    (np.array([True]), "holds a boolean"),
    (np.array([[1, 2]]), "holds a 2-D array, expected a flat list"),
    ("1 2 3", "holds a string, expected a list of token ids"),
])
def test_token_ids_are_refused_never_coerced(values, message):
    from memcirc.token_ids import token_list

    with pytest.raises(InputError, match=r"^f.jsonl: line 3: column 'tokens' " + ".*" + message):
        token_list(values, "f.jsonl: line 3", "tokens")


def test_token_ids_accepted_in_every_integer_form():
    from memcirc.token_ids import token_array, token_list

    forms = [[5, 0, 2], (5, 0, 2), [5.0, 0.0, 2.0], [5, 0.0, 2], [np.int32(5), 0, 2], np.array([5, 0, 2], np.uint16),
             np.array([5, 0, 2], np.int64), np.array([5.0, 0, 2]), np.array([5, 0, 2], object)]
    for values in forms:
        ids = token_list(values, "x", "tokens")
        assert ids == [5, 0, 2] and all(type(t) is int for t in ids), values
        assert token_array(values, "x", "tokens").dtype == np.int64
    assert token_list([], "x", "tokens") == [] and token_list([-1], "x", "tokens") == [-1]  # vocab range: later


# -- bad files: exit 2, one line naming the file and line, nothing written (review d02-d16, n05, n08, p05,
#    h01, s01) --------------------------------------------------------------------------------------

def _bad_files(tmp_path):
    """case -> (dataset path, words the one stderr line must hold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    ok = list(range(10, 74))

    def jsonl(name, text):
        (d / name).write_text(text)
        return d / name

    (d / "binary.jsonl").write_bytes(b"\x89PNG\r\n" + bytes(range(128, 256)) * 8)
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (d / "latin1.txt").write_bytes(b"first line\ncaf\xe9\n")
    np.savez(d / "arrays.npz", a=np.arange(128).reshape(2, 64))
    (d / "arrays.npz").rename(d / "npz.npy")
    np.save(d / "big.npy", np.full((2, 64), 2 ** 63 + 5, np.uint64))
    pq.write_table(pa.table({"tokens": [list(range(i, i + 64)) for i in range(300)]}), d / "p.parquet",
                   compression="snappy")
    blob = bytearray((d / "p.parquet").read_bytes())
    blob[100:2000] = bytes(b ^ 0x5A for b in blob[100:2000])   # data pages; the footer stays valid
    (d / "p.parquet").write_bytes(bytes(blob))
    (d / "script").mkdir()
    (d / "script" / "script.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w')\n")
    (d / "loop.jsonl").symlink_to(d / "loop2.jsonl")
    (d / "loop2.jsonl").symlink_to(d / "loop.jsonl")
    (d / "dangling.jsonl").symlink_to(d / "gone.jsonl")
    (d / "folder").mkdir()
    (d / "folder" / "train.jsonl").write_bytes(b'{"tokens": [1, 2' + bytes(range(128, 256)))
    return {
        "d02 binary jsonl": (d / "binary.jsonl", "binary.jsonl:1: not UTF-8 text (byte 0x89"),
        "d03 latin-1 jsonl": (d / "latin1.jsonl", "latin1.jsonl:2: not UTF-8 text (byte 0xe9"),
        "d04 latin-1 txt": (d / "latin1.txt", "latin1.txt:2: not UTF-8 text (byte 0xe9); text files are read as UTF-8"),
        "d08 float": (jsonl("f.jsonl", json.dumps({"tokens": ok[:5] + [5.7] + ok[6:]}) + "\n"),
                      "f.jsonl: line 1: column 'tokens' holds a number at position 5 (5.7), expected integer"),
        "d09 string": (jsonl("s.jsonl", json.dumps({"tokens": ["a"] * 64}) + "\n"), "holds a string at position 0"),
        "d10 boolean": (jsonl("b.jsonl", '{"tokens": [' + ", ".join(["true"] * 64) + "]}\n"),
                        "holds a boolean at position 0 (True)"),
        "d11 1e30": (jsonl("e.jsonl", '{"tokens": [1, 1e30]}\n'), "(1e+30), outside the int64 range of token ids"),
        "d12 nested": (jsonl("n.jsonl", json.dumps({"tokens": [[1, 2]] * 64}) + "\n"), "holds a list at position 0"),
        "null inside": (jsonl("z.jsonl", json.dumps({"tokens": ok[:3] + [None]}) + "\n"), "holds null at position 3"),
        "2**70": (jsonl("o.jsonl", json.dumps({"tokens": [2 ** 70]}) + "\n"), "(1180591620717411303424), outside"),
        "n05 npz named npy": (d / "npz.npy", "npz.npy is an .npz archive, not an .npy array"),
        "n08 uint64 >= 2**63": (d / "big.npy", "big.npy: row 0 (0-based) holds 9223372036854775813 at position 0"),
        "p05 corrupt page": (d / "p.parquet", "p.parquet: row 0 (0-based) and on cannot be read, the file is corrupt"),
        "h01 dataset script": (d / "script", "never runs a dataset script"),
        "s01 symlink loop": (d / "loop.jsonl", "loop.jsonl cannot be read (symlink loop)"),
        "dangling symlink": (d / "dangling.jsonl", "dangling.jsonl is a symlink to"),
        "deep nesting": (jsonl("deep.jsonl", '{"tokens": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
                         "deep.jsonl:1: JSON nested too deeply"),
        "folder, bad file": (d / "folder", "could not load dataset"),
        "folder, bad file, streamed": (d / "folder", "row 0 (0-based) and on cannot be read", "--streaming"),
    }


def test_bad_files_exit_2_with_one_line_before_the_weights_load(tmp_path, monkeypatch, capsys):
    """Every case through the stage's command line: exit 2, one line with the file (and line), no output
    (nor datasets' progress bars or log lines for a local folder)."""
    import memcirc.stages.memorization_score as stage
    from memcirc.cli import main

    def no_weights(*_args, **_kw):
        raise AssertionError("the model weights were loaded before the data was checked")

    monkeypatch.setattr(stage, "load", no_weights)
    for case, (dataset, words, *extra) in _bad_files(tmp_path).items():
        out = tmp_path / "run"
        code = main("memorization_score", ["--output-dir", str(out), "--device", "cpu", "--prefix-len", "32",
                                           "--suffix-len", "32", "--dataset", str(dataset), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.splitlines() == [err] and err.startswith("error: ") and words in err, (case, err)
        assert not out.exists(), case
    assert not (tmp_path / "RAN").exists()   # the dataset script never ran


def test_a_utf8_bom_is_not_json_trouble(tmp_path, tiny_tokenizer):
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"tokens": list(range(10))}).encode() + b"\n")
    assert windows_of(str(tmp_path / "b.jsonl"), tiny_tokenizer).windows[0].tokens.tolist() == list(range(8))


def test_an_unreadable_streamed_dataset_names_the_row(tmp_path, tiny_tokenizer):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(bytes(range(128, 256)) * 8)
    for streaming in (False, True):
        with pytest.raises(InputError, match="could not load dataset|row 0 \\(0-based\\) and on cannot be read"):
            list(load_documents(str(folder), streaming=streaming))


# -- bounded tokenization for `windowing: start` (review d16) --------------------------------------

PHRASES = ["the quick brown fox", "jumps over the lazy dog", "and then the quick dog", "runs over the brown fox"]


def _merging_bpe(pre_tokenized):
    """A BPE trained on repeated phrases. Without a pre-tokenizer its merges cross spaces (tokens like
    'the quick brown'), so cutting a text anywhere inside one changes the tokens just before the cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenized:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre_tokenized else list("abcdefghijklmnopqrstuvwxyz .")
    tk.train_from_iterator([" ".join(PHRASES * 3)] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"], show_progress=False, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


@pytest.mark.parametrize("pre_tokenized", [False, True])
def test_encode_prefix_equals_the_whole_tokenization(pre_tokenized, monkeypatch):
    """At every first-cut size the bounded tokens equal the whole text's, although a plain cut often
    differs from them (merges across the cut); and only a bounded prefix is ever tokenized."""
    import random

    from memcirc import data
    from memcirc.models.tokenizer import encode

    tokenizer = _merging_bpe(pre_tokenized)
    rng = random.Random(0)
    text = " ".join(rng.choice(PHRASES) for _ in range(4000)) + "."
    whole = encode(tokenizer, text)
    naive_differs = 0
    for needed in (1, 7, 64, 300):
        for first_cut in range(11, 420, 17):
            monkeypatch.setattr(data, "CHARS_PER_TOKEN", 1)
            monkeypatch.setattr(data, "MIN_CUT", first_cut)
            seen = []
            got = data.encode_prefix(_Recording(tokenizer, seen), text, needed)
            assert got[:needed] == whole[:needed], (needed, first_cut)
            assert max(seen) < len(text) // 4                         # never the whole text
            cut = max(needed, first_cut)
            naive_differs += encode(tokenizer, text[:cut])[:needed] != whole[:needed]
    assert naive_differs > 0   # the test would catch a plain cut
    assert data.encode_prefix(tokenizer, "the quick", 64) == encode(tokenizer, "the quick")   # short: all


class _Recording:
    """A tokenizer that records the length of every text it encodes."""

    def __init__(self, tokenizer, seen):
        self.tokenizer, self.seen = tokenizer, seen

    def __call__(self, text, **kw):
        self.seen.append(len(text))
        return self.tokenizer(text, **kw)


def test_start_windows_of_a_huge_document_tokenize_a_prefix(tmp_path, tiny_tokenizer, monkeypatch):
    """d16: one window of a 210 KB document tokenizes ~1 KB, and equals the window of the whole tokenization;
    sliding windows under --limit are bounded the same way."""
    from memcirc.models.tokenizer import encode

    text = ("To be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 2_500)
    src = write_jsonl(tmp_path / "big.jsonl", [{"text": text}])
    whole = encode(tiny_tokenizer, text)
    seen = []
    recording = _Recording(tiny_tokenizer, seen)
    start = make_windows(load_documents(src), recording, src, 32, 32, bos=_no_bos())
    assert [w.tokens.tolist() for w in start.windows] == [whole[:64]] and max(seen) <= 4096
    seen.clear()
    sliding = make_windows(load_documents(src), recording, src, 32, 32, windowing="sliding", stride=16, limit=5,
                           bos=_no_bos())
    assert [w.tokens.tolist() for w in sliding.windows] == [whole[o:o + 64] for o in range(0, 80, 16)]
    assert max(seen) <= 4096


def _no_bos():
    from memcirc.models.tokenizer import BosPolicy

    return BosPolicy("never", None)
