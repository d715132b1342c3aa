"""memcirc.evaluation at real scale: the chunked perplexity equals the old float-copy formula with
padding masked, a forward holds at most the logits budget, held-out blocks of --ppl-block-len tokens
start with BOS and cover the text, and the log describes the blocks as they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB


def old_perplexity(model, blocks, *, pad_id, batch_size):
    """The formula before issue 11 (a float copy of the whole [B, S, V] logits), as the reference."""
    from memcirc.scoring import pad_batch

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(blocks), batch_size):
            ids, mask = pad_batch(blocks[b:b + batch_size], pad_id, "right")
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total_nll += float((nll * mask[:, 1:].float()).sum())
            total_tokens += int(mask[:, 1:].sum())
    return float(np.exp(total_nll / total_tokens))


RAGGED = [np.arange(1, 25) * (i + 1) % 300 for i in range(3)] + [np.array([5, 9, 77]), np.array([3, 4])]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_perplexity_equals_the_old_formula_and_masks_padding(tiny_loaded, family, monkeypatch):
    """Blocks of different lengths (padding in every batch): the chunked NLL equals the old float-copy
    formula, one block per batch (no padding at all), and a forward bounded to one block."""
    from memcirc import evaluation

    model = tiny_loaded[family].model
    new = evaluation.perplexity(model, RAGGED, pad_id=0, batch_size=5)
    assert new == pytest.approx(old_perplexity(model, RAGGED, pad_id=0, batch_size=5), rel=1e-6)
    assert new == pytest.approx(evaluation.perplexity(model, RAGGED, pad_id=0, batch_size=1), rel=1e-6)
    monkeypatch.setattr(evaluation, "NLL_CHUNK_BYTES", 1)    # one row of logits upcast at a time
    assert evaluation.perplexity(model, RAGGED, pad_id=0, batch_size=5) == pytest.approx(new, rel=1e-6)


def test_a_forward_holds_at_most_the_logits_budget(tiny_loaded, monkeypatch):
    from memcirc import evaluation

    model = tiny_loaded["llama"].model
    seen = []
    handle = model.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.logits.shape)))
    try:
        evaluation.perplexity(model, RAGGED, pad_id=0, batch_size=5)
        assert seen == [(5, 24, TINY_VOCAB)]
        seen.clear()
        # room for two 24-token rows of float32 logits: batches of 2, 2, 1 whatever --batch-size says
        monkeypatch.setattr(evaluation, "LOGITS_BYTES", 2 * 24 * TINY_VOCAB * 4)
        assert evaluation.forward_rows(model, 24, 5) == 2 and evaluation.forward_rows(model, 10**6, 5) == 1
        evaluation.perplexity(model, RAGGED, pad_id=0, batch_size=5)
        assert [s[0] for s in seen] == [2, 2, 1]
    finally:
        handle.remove()


def test_heldout_blocks_start_with_bos_and_cover_the_text(tiny_tokenizer, tmp_path):
    from memcirc.errors import InputError
    from memcirc.evaluation import NO_BOS, heldout_blocks
    from memcirc.models.tokenizer import BosPolicy, encode

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3
    (tmp_path / "h.txt").write_text(text)
    ids = encode(tiny_tokenizer, text)
    bos = BosPolicy("always", 0)
    blocks = heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 16, bos=bos)
    assert all(b[0] == 0 and len(b) <= 16 for b in blocks) and len(blocks[0]) == 16   # the BOS counts
    assert np.concatenate([b[1:] for b in blocks]).tolist() == ids
    plain = heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 16, bos=NO_BOS)
    assert np.concatenate(plain).tolist() == ids and len(plain[0]) == 16
    assert len(heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 16, max_blocks=2, bos=bos)) == 2
    # token documents: a leading BOS is stripped, then put back on every block
    (tmp_path / "t.jsonl").write_text(json.dumps({"tokens": [0, *ids[:20]]}) + "\n")
    blocks = heldout_blocks(str(tmp_path / "t.jsonl"), tiny_tokenizer, 8, bos=bos)
    assert [b.tolist() for b in blocks] == [[0, *ids[:20][i:i + 7]] for i in range(0, 20, 7)]
    with pytest.raises(InputError, match="no room"):
        heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 1, bos=bos)


def test_block_length_default_bounds_and_honest_description():
    from memcirc.errors import InputError
    from memcirc.evaluation import describe_blocks, ppl_block_len
    from memcirc.stages.attention_bypass import BypassConfig

    assert ppl_block_len(None, 32_768) == 1024 and ppl_block_len(None, 128) == 128 and ppl_block_len(64, 128) == 64
    with pytest.raises(InputError, match="exceeds the model's context"):
        ppl_block_len(4096, 2048)
    with pytest.raises(InputError, match="ppl_block_len"):
        BypassConfig(ppl_block_len=1)
    assert describe_blocks([np.zeros(147)]) == "1 held-out block of 147 tokens (147 tokens)"
    assert describe_blocks([np.zeros(1024)] * 2 + [np.zeros(147)]) == \
        "3 held-out blocks: 2 of 1024 tokens, 1 shorter (147); 2,195 tokens"


# -- upstream rows and label files: the schema checked, the line named (review t05, q03) ------------

DROP = object()   # scored_row(..., key=DROP): the row lacks `key`


def fake_memorization_stage(folder, rows):
    """A finished memorization folder holding `rows` as scores.jsonl, its manifest consistent with it
    (so the rows reach the schema check: an edited real scores.jsonl fails its sha256 first)."""
    from memcirc import artifacts as art
    from memcirc.manifest import SCHEMA_VERSION

    folder.mkdir(parents=True)
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    art.write_json(folder / "manifest.json", {
        "stage": "memorization_score", "status": "complete", "schema_version": SCHEMA_VERSION, "run_id": "x",
        "config": {}, "config_sha256": art.sha256_json({}),
        "outputs": [{"path": "scores.jsonl", "sha256": art.sha256_file(folder / "scores.jsonl")}]})
    return folder


def scored_row(i, **change):
    row = {"id": f"{i}@0", "source": "s", "doc": str(i), "offset": 0, "prefix_len": 4, "suffix_len": 4,
           "tokens": list(range(i, i + 8)), "exact": i % 2 == 0}
    return {k: v for k, v in {**row, **change}.items() if v is not DROP}


@pytest.mark.parametrize("change, message", [
    ({"tokens": DROP}, r"scores.jsonl:2: row '1@0' lacks tokens"),
    ({"id": DROP, "doc": DROP}, r"scores.jsonl:2: row '\?' lacks id, doc"),
    ({"tokens": [1, 2.5, 3, 4, 5]}, r"scores.jsonl:2: column 'tokens' holds a number at position 1 \(2.5\)"),
    ({"tokens": "1 2 3"}, r"scores.jsonl:2: column 'tokens' holds a string"),
    ({"prefix_len": 8}, r"scores.jsonl:2: prefix_len 8 is not a whole number between 1 and 7"),
    ({"prefix_len": True}, r"scores.jsonl:2: prefix_len True"),
    ({"offset": -1}, r"scores.jsonl:2: offset -1 is not a whole number >= 0"),
    ({"doc": ["a"]}, r"scores.jsonl:2: 'doc' holds a list, expected a string"),
    ({"exact": DROP}, r"scores.jsonl: window '1@0' has no 'exact', expected a number"),
    ({"exact": "yes"}, r"scores.jsonl: window '1@0' has a string in 'exact', expected a number"),
])
def test_upstream_scores_rows_are_checked(tmp_path, change, message):
    """t05: evaluation.memorized_windows (attention_bypass, kfac_edit) on a row it cannot use."""
    from memcirc.errors import InputError
    from memcirc.evaluation import memorized_windows

    stage = fake_memorization_stage(tmp_path / "memorization", [scored_row(0), scored_row(1, **change), scored_row(2)])
    with pytest.raises(InputError, match=message):
        memorized_windows(stage)


def _one_line(capsys, code, words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and err.startswith("error: ") and words in err, err


def test_a_row_without_tokens_stops_attention_bypass_with_one_line(tmp_path, capsys):
    """t05 as the review ran it: attention_bypass on an upstream row lacking `tokens`."""
    from memcirc.cli import main

    stage = fake_memorization_stage(tmp_path / "memorization", [scored_row(0), scored_row(1, tokens=DROP)])
    out = tmp_path / "run"
    code = main("attention_bypass", ["--input-dir", str(stage), "--output-dir", str(out), "--device", "cpu"])
    _one_line(capsys, code, f"{stage}/scores.jsonl:2: row '1@0' lacks tokens")
    assert not out.exists()


def test_bad_label_files_stop_predict_with_one_line(tmp_path, capsys):
    """q03 (a binary --labels-file) and label rows whose tokens or numbers are not what they claim."""
    from memcirc.cli import main

    ok = list(range(10, 74))
    cases = {"binary.jsonl": (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)), "binary.jsonl:1: not UTF-8 text"),
             "float.jsonl": (json.dumps({"tokens": ok[:9] + [9.5]}), "float.jsonl: row 0: column 'tokens' holds a "
                                                                     "number at position 9 (9.5)"),
             "bool.jsonl": (json.dumps({"tokens": [True] * 64}), "column 'tokens' holds a boolean at position 0"),
             "index.jsonl": (json.dumps({"index": "seven", "tokens": ok}), "index.jsonl: row 0: column 'index' holds "
                                                                         "a string ('seven'), expected a whole number")}
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else (content + "\n").encode())
        out = tmp_path / "run"
        code = main("predict_memorization", ["--labels-file", str(path), "--output-dir", str(out), "--device", "cpu"])
        _one_line(capsys, code, words)
        assert not out.exists(), name


def test_heldout_blocks_of_a_prefix_equal_the_whole_tokenization(tiny_tokenizer, tmp_path):
    """With max_blocks only the text of the wanted blocks is tokenized; the blocks are the same."""
    from memcirc.evaluation import heldout_blocks
    from memcirc.models.tokenizer import BosPolicy

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 400
    (tmp_path / "h.txt").write_text(text)
    bos = BosPolicy("always", 0)
    every = heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 16, bos=bos)
    for n in (1, 3, 50):
        got = heldout_blocks(str(tmp_path / "h.txt"), tiny_tokenizer, 16, max_blocks=n, bos=bos)
        assert [b.tolist() for b in got] == [b.tolist() for b in every[:n]]
