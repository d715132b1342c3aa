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
