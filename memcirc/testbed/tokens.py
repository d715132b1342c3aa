"""The testbed's token layout, tokenizer, corpus chunks and the two measurements its build reports
(exact match of the canaries, held-out perplexity). Used by `memcirc.testbed.build`."""

from __future__ import annotations

import math
import re
from typing import cast

import torch
from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # id 0; Pythia uses it as bos/eos/pad/unk
SEQ_LEN = 128
PREFIX_LEN = SUFFIX_LEN = 32


# ---------------------------------------------------------------- tokenizer and corpus


def build_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2/Pythia, trained on the training text only; `<|endoftext|>` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    # Digits one per token, so a template canary's secret is a sequence over the ten digit tokens.
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  pad_token=EOS)
    assert tok.convert_tokens_to_ids(EOS) == 0, "the special token must be id 0 (Pythia layout)"
    return tok


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    # BatchEncoding["input_ids"] of one unbatched text is a list[int]; its stubs say Any | Encoding.
    return cast(list[int], tok(text, add_special_tokens=False)["input_ids"])


def chunk_corpus(ids: list[int], max_chunks: int | None) -> list[list[int]]:
    """Consecutive SEQ_LEN-token chunks at fixed boundaries; the ragged tail is dropped."""
    n = len(ids) // SEQ_LEN if max_chunks is None else min(max_chunks, len(ids) // SEQ_LEN)
    return [ids[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(n)]


def corpus_words(text: str) -> list[str]:
    """Distinct whole lowercase alphabetic words of the corpus (no fragments of "prov'd"), sorted."""
    return sorted(set(re.findall(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])", text)))


# ---------------------------------------------------------------- measurement


@torch.inference_mode()
def exact_match(model: GPTNeoXForCausalLM, windows: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per window (PREFIX_LEN + SUFFIX_LEN tokens): does greedy decoding reproduce the suffix?
    One teacher-forced pass suffices: greedy matches iff every suffix argmax equals the true token."""
    hits = []
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, PREFIX_LEN - 1:-1]
        hits.append((logits.argmax(-1) == batch[:, PREFIX_LEN:]).all(-1))
    return torch.cat(hits)


@torch.inference_mode()
def heldout_perplexity(model: GPTNeoXForCausalLM, ids: list[int], batch_size: int = 32) -> float:
    chunks = torch.tensor(chunk_corpus(ids, None), dtype=torch.long)
    losses = [model(input_ids=b, labels=b).loss.item() * len(b) for b in chunks.split(batch_size)]
    return float(math.exp(sum(losses) / len(chunks)))


@torch.inference_mode()
def repeated_segment_loss(model: GPTNeoXForCausalLM, probes: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss over the first and over the second copy of repeated random segments
    ([n, 2 S] tokens, segment twice): the second falls far below the first once the model copies
    from context (induction heads); the first stays near log(vocab)."""
    s = probes.shape[1] // 2
    logits = model(input_ids=probes).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), probes[:, 1:], reduction="none")
    return float(nll[:, :s - 1].mean()), float(nll[:, s:].mean())   # position s - 1 predicts the copy's start
