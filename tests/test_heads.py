"""memcirc.heads.scores: each score on hand-built attention patterns and OV logits with known answers,
and the model-run scores against independent computations (HF's own eager attention weights, the
testbed build's repeated-segment loss)."""

from __future__ import annotations

import pytest
import torch

from memcirc.heads.scores import (
    REPEAT_LEN,
    copy_suppression_score,
    head_scores,
    pattern_scores,
    repeated_loss,
    repeated_tokens,
    successor_score,
    top_heads,
)
from memcirc.models.tokenizer import BosPolicy

SEG, OFFSET = 5, 1   # BOS, then A (5 tokens), then A again: 11 positions


def hand_built_patterns() -> torch.Tensor:
    """[1, 4, 11, 11]: head 0 attends to the previous token, head 1 is an induction head (second copy:
    q - S + 1), head 2 a duplicate-token head (second copy: q - S), head 3 attends to BOS only. Where a
    head has no role it attends to BOS."""
    n = OFFSET + 2 * SEG
    pattern = torch.zeros(1, 4, n, n)
    pattern[..., 0] = 1.0
    for q in range(1, n):
        pattern[0, 0, q] = 0
        pattern[0, 0, q, q - 1] = 1
    for q in range(OFFSET + SEG, n):
        for head, key in ((1, q - SEG + 1), (2, q - SEG)):
            pattern[0, head, q] = 0
            pattern[0, head, q, key] = 1
    return pattern


def test_pattern_scores_of_hand_built_heads() -> None:
    scores = pattern_scores(hand_built_patterns(), OFFSET, SEG)
    # previous-token: q from A's second token on (9 positions); heads 1 and 2 attend to q - 4 and q - 5
    assert scores["previous_token"].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert scores["induction"].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert scores["duplicate_token"].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0])
    half = hand_built_patterns() * 0.5 + 0.5 / 11                                     # mixed with uniform attention
    assert pattern_scores(half, OFFSET, SEG)["induction"][1] == pytest.approx(0.5 + 0.5 / 11)


def test_successor_and_copy_suppression_of_hand_built_ov_logits() -> None:
    n = 6
    successor = torch.zeros(n, n)
    successor[torch.arange(n - 1), torch.arange(1, n)] = 3.0            # member i -> i + 1
    copier = torch.eye(n) * 2.0                                        # raises the token it reads
    suppressor = -torch.eye(n) * 2.0                                   # lowers the token it reads
    half = torch.eye(n)
    half[: n // 2] *= -1.0                                             # suppresses half the tokens
    ov = torch.stack([successor, copier, suppressor, half])
    predecessor = torch.zeros(n, n)
    predecessor[torch.arange(1, n), torch.arange(n - 1)] = 3.0
    predecessor[0, n - 1] = 3.0                                        # member i -> i - 1 (0 -> the last)
    assert successor_score(torch.stack([successor, copier, predecessor])).tolist() == pytest.approx([1.0, 0.0, 0.0])
    # successor rows: one logit (the successor's) above the diagonal's 0, of n - 1; the last row none
    assert copy_suppression_score(ov).tolist() == pytest.approx([1 / n, 0.0, 1.0, 0.5])


def test_top_heads_orders_by_score() -> None:
    table = [[0.1, 0.9], [0.5, 0.2]]
    assert [h["head"] for h in top_heads(table, 3)] == ["L0H1", "L1H0", "L1H1"]


@pytest.fixture(scope="module")
def testbed():
    from memcirc.models import ModelSpec, load
    from memcirc.models.tl import to_hooked_transformer

    loaded = load(ModelSpec("testbed", device="cpu", dtype="float32"))
    return loaded, to_hooked_transformer(loaded, "none")


def test_pattern_scores_agree_with_hf_eager_attention(testbed) -> None:
    """TransformerLens' hook_pattern (what head_scores reads) against HF's own attention weights."""
    from transformers import AutoModelForCausalLM

    from memcirc.tasks.generators import ordinary_tokens

    loaded, tl = testbed
    pool = ordinary_tokens(loaded.tokenizer)
    got = head_scores(tl, loaded.tokenizer, pool, BosPolicy("never", None), seed=3)
    hf = AutoModelForCausalLM.from_pretrained(loaded.local_path, attn_implementation="eager",
                                              torch_dtype=torch.float32).eval()
    tokens = repeated_tokens(pool, 3, BosPolicy("never", None))
    with torch.no_grad():
        out = hf(input_ids=tokens, output_attentions=True)
    for layer, attention in enumerate(out.attentions):
        expected = pattern_scores(attention, 0, REPEAT_LEN)
        for name in ("induction", "previous_token", "duplicate_token"):
            assert got["scores"][name][layer] == pytest.approx(expected[name].tolist(), abs=1e-5)
    # the repeated-token loss against the testbed build's own probe loss (another implementation)
    from memcirc.testbed.tokens import repeated_segment_loss

    with torch.no_grad():
        first, second = repeated_segment_loss(hf, tokens)
    assert got["repeated_loss"]["first_copy"] == pytest.approx(first, abs=1e-4)
    assert got["repeated_loss"]["second_copy"] == pytest.approx(second, abs=1e-4)
    assert got["n_ordinal_sequences"] >= 1 and set(got["scores"]) == {"induction", "previous_token",
                                                                       "duplicate_token", "successor",
                                                                       "copy_suppression"}


def test_repeated_loss_of_a_perfect_copier_is_zero_on_the_second_copy() -> None:
    tokens = torch.tensor([[9, 1, 2, 3, 1, 2, 3]])                 # BOS, A = 1 2 3, A
    logits = torch.full((1, 7, 10), -30.0)
    for t in range(6):
        logits[0, t, tokens[0, t + 1]] = 30.0                      # predicts every next token exactly
    loss = repeated_loss(logits, tokens, 1, 3)
    assert loss["second_copy"] == pytest.approx(0.0, abs=1e-6) and loss["first_copy"] == pytest.approx(0.0, abs=1e-6)
    logits[0, 1:3] = 0.0                                           # the first copy is a guess: log 10 each
    assert repeated_loss(logits, tokens, 1, 3)["gain"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-4)
