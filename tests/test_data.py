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
