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
