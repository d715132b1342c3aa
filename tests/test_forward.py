"""memcirc.forward (unembed only kept positions) and memcirc.suffix_metrics (fused epilogue), each
against the computation it replaces: the full model's logits, and the old (B, S, V) formulas."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, build_tiny_model

import memcirc.forward as forward
import memcirc.suffix_metrics as suffix_metrics
from memcirc.data import Window
from memcirc.models.arch import SPECS, arch_for, lm_body
from memcirc.scoring import _scores
from memcirc.suffix_metrics import position_metrics


def test_every_arch_family_has_a_tiny_model() -> None:
    assert set(SPECS) == set(TINY_CONFIGS)


def _batch(vocab: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 3, with mask-derived position ids (as teacher_forced)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=sorted(TINY_CONFIGS), scope="module")
def tiny(request: pytest.FixtureRequest) -> Any:   # a PreTrainedModel (config typed loosely)
    return build_tiny_model(request.param)


PATHS = ["body", "logits_to_keep", "full"]


def _force(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make causal_lm_logits take `path` (where the family allows it)."""
    if path != "body":
        monkeypatch.setattr(forward, "lm_body", lambda model: None)
    if path == "full":
        monkeypatch.setattr(forward, "accepts", lambda model, arg: False)


@pytest.mark.parametrize("keep_from", [0, 5, 11])
@pytest.mark.parametrize("path", PATHS)
@torch.inference_mode()
def test_kept_logits_equal_the_full_forward(tiny: Any, keep_from: int, path: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _force(path, monkeypatch)
    ids, mask, pos = _batch(tiny.config.vocab_size)
    full = tiny(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    logits, cache = forward.causal_lm_logits(tiny, ids, mask, pos, keep_from)
    assert cache is None
    assert logits.shape == (2, ids.shape[1] - keep_from, tiny.config.vocab_size)
    torch.testing.assert_close(logits, full[:, keep_from:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@torch.inference_mode()
def test_cache_continues_the_sequence(tiny: Any, path: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _force(path, monkeypatch)
    ids, mask, pos = _batch(tiny.config.vocab_size, width=13)
    full = tiny(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
    _, cache = forward.causal_lm_logits(tiny, ids[:, :-1], mask[:, :-1], pos[:, :-1], 10, use_cache=True)
    assert cache is not None
    step = tiny(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_gpt_neo_unembeds_only_kept_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny_model("gpt_neo")
    assert not forward.accepts(model, "logits_to_keep")   # why the base-model path exists
    parts = lm_body(model)
    assert parts is not None and parts[1] is model.get_submodule(arch_for(model).unembed)
    seen: list[tuple[int, ...]] = []
    parts[1].register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    ids, mask, pos = _batch(model.config.vocab_size)
    with torch.inference_mode():
        forward.causal_lm_logits(model, ids, mask, pos, 9)
    assert seen == [(2 * 3, model.config.hidden_size)]   # 2 rows x 3 kept positions, one 2-D GEMM


def test_keep_from_out_of_range_is_refused() -> None:
    model = build_tiny_model("gpt2")
    ids, mask, pos = _batch(model.config.vocab_size)
    with pytest.raises(ValueError):
        forward.causal_lm_logits(model, ids, mask, pos, ids.shape[1])


# -- the fused epilogue vs the formulas it replaced ---------------------------------------------

def _reference(logits: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The old `_scores` formulas, per position: argmax, lse - logit[truth], lse - E_p[logit]."""
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, truth[..., None]).squeeze(-1)
    return logits.argmax(dim=-1), nll, lse - (torch.exp(logits - lse[..., None]) * logits).sum(-1)


def _random_logits(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 10.0, 1000.0])[torch.randint(0, 4, (batch, length, 1), generator=gen)]
    logits = torch.randn(batch, length, vocab, generator=gen) * scale
    logits[0, 0, 1:] = logits[0, 0, 0]                                # ties everywhere: first index wins
    logits[0, 1, :: 3] = -torch.inf                                   # -inf logits (masked vocabulary)
    logits[-1, -1] = torch.randint(-3, 3, (vocab,), generator=gen).float()  # integer ties
    return logits


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 6, 2048), (2, 3, 50257), (1, 40, 2)])
def test_position_metrics_equal_the_old_formulas(shape: tuple[int, int, int]) -> None:
    logits = _random_logits(*shape, seed=sum(shape))
    truth = torch.randint(0, shape[2], shape[:2], generator=torch.Generator().manual_seed(1))
    truth[0, 1] = 1   # a -inf truth logit: nll = inf on both sides
    predicted, nll, entropy = position_metrics(logits, truth)
    ref_pred, ref_nll, _ = _reference(logits, truth)
    assert torch.equal(predicted, ref_pred)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    # Entropy vs the old formula in float64 (the old float32 lse - E[x] cancels on peaked rows and
    # gives NaN on -inf logits, where the entropy is well defined: 0 log 0 = 0).
    finite = torch.where(torch.isinf(logits), torch.finfo(torch.float64).min, logits.double())
    ref_entropy = _reference(finite, truth)[2].float()
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1 << 18, 700])   # whole sequences per chunk; spans of 2 rows
def test_position_metrics_on_a_strided_view_and_half_precision(chunk: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suffix_metrics, "CHUNK_VALUES", chunk)
    logits = _random_logits(5, 9, 300, seed=3)
    truth = torch.randint(0, 300, (5, 8))
    view = logits[:, 1:]                       # what teacher_forced passes: a non-contiguous slice
    assert not view.is_contiguous()
    for got, want in zip(position_metrics(view, truth), position_metrics(view.contiguous(), truth)):
        assert torch.equal(got, want)
    ref_pred, ref_nll, _ = _reference(view, truth)
    assert torch.equal(position_metrics(view, truth)[0], ref_pred)
    torch.testing.assert_close(position_metrics(view, truth)[1], ref_nll, rtol=1e-5, atol=1e-5)
    half = view.half()
    got = position_metrics(half, truth)
    want = position_metrics(half.float(), truth)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _old_scores(windows, logits, truth, valid):   # the replaced `_scores`, verbatim
    predicted = logits.argmax(dim=-1)
    match = (predicted == truth) | ~valid
    lcp = match.long().cumprod(dim=-1).sum(-1)
    n = valid.sum(-1)
    hits = ((predicted == truth) & valid).sum(-1) / n
    lse = torch.logsumexp(logits, dim=-1)
    nll = ((lse - logits.gather(-1, truth[..., None]).squeeze(-1)) * valid).sum(-1) / n
    expected_logit = (torch.exp(logits - lse[..., None]) * logits).sum(-1)
    entropy = ((lse - expected_logit) * valid).sum(-1) / n
    first = predicted.gather(-1, lcp.clamp(max=truth.shape[1] - 1)[:, None]).squeeze(-1)
    return [t.tolist() for t in (lcp, n, hits, nll, entropy, first)]


def test_scores_equal_the_old_scores() -> None:
    batch, length, vocab = 16, 12, 500
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, length, vocab, generator=gen) * 4
    truth = logits.argmax(-1)
    truth[torch.rand(batch, length, generator=gen) < 0.15] = 3     # some mismatches: lcp varies
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    valid = torch.arange(length)[None, :] < lengths[:, None]
    windows = [Window(id=str(i), tokens=np.zeros(20 + int(lengths[i]), dtype=np.int64), prefix_len=20,
                      source="t", doc=str(i), offset=0) for i in range(batch)]
    new = _scores(windows, logits, truth, valid)
    lcp, n, hits, nll, entropy, first = _old_scores(windows, logits, truth, valid)
    assert any(0 < s.lcp < s.window.suffix_len for s in new) and any(s.exact for s in new)
    for i, s in enumerate(new):
        assert (s.exact, s.lcp, s.tf_accuracy) == (lcp[i] >= n[i], min(lcp[i], n[i]), hits[i])
        assert s.first_divergent_token == (None if s.exact else first[i])
        assert s.suffix_nll == pytest.approx(nll[i], rel=1e-5)
        assert s.suffix_entropy == pytest.approx(entropy[i], rel=1e-5, abs=1e-5)
