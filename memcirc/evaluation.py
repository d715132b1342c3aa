"""Before/after measurements shared by the intervention stages (attention bypass, K-FAC edit):
memorization of the memorized windows and perplexity on held-out text.

Perplexity runs at real scale: blocks are `ppl_block_len` tokens (default min(n_ctx, 1024), not the
whole context: 32k-token blocks of a 150k vocabulary are 20 GB of logits), a forward holds at most
`LOGITS_BYTES` of logits (fewer blocks per forward when a block's logits are large), and the NLL is
taken from the model's own logits, upcast to float32 a chunk of rows at a time (never a float copy
of the whole [B, S, V] tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.data import Columns, ScoredWindow, Window, encode_prefix, load_documents, memorized, read_scores
from memcirc.errors import InputError
from memcirc.models.arch import dims
from memcirc.models.tokenizer import BosPolicy, encode
from memcirc.option_groups import MemorizedRule
from memcirc.scoring import pad_batch, score_windows, summarize

DEFAULT_PPL_BLOCK = 1024          # default perplexity block length (tokens, BOS included), capped at n_ctx
LOGITS_BYTES = 1 << 30            # logits one forward may hold ([rows, S, V], counted as float32)
NLL_CHUNK_BYTES = 64 << 20        # float32 logits upcast at a time for the cross entropy
NO_BOS = BosPolicy("never", None)


def memorized_windows(stage_dir: Path, rule: MemorizedRule | None = None) -> list[ScoredWindow]:
    """The memorized windows (by `rule`, default exact match) of a finished memorization stage; an
    empty set is an InputError."""
    rule = rule or MemorizedRule()
    windows = read_scores(stage_dir)
    chosen = [w for w, m in zip(windows, memorized(windows, rule, f"{stage_dir}/{art.SCORES_JSONL}")) if m]
    if not chosen:
        raise InputError(f"no memorized windows in {stage_dir} ({rule.memorized_by} >= {rule.threshold} in none "
                         f"of {len(windows)}): score more data")
    return chosen


def memorization(model: torch.nn.Module, windows: Sequence[Window], *, pad_id: int, batch_size: int,
                 metrics: Sequence[str] = ("exact", "token_match", "levenshtein"),
                 levenshtein_threshold: float = 0.75) -> dict[str, float]:
    """Mean of every metric of docs/memorization_score.md over `windows` (strict = exact, loose = loose_match)."""
    rows = score_windows(model, windows, pad_id=pad_id, batch_size=batch_size, metrics=metrics,
                         levenshtein_threshold=levenshtein_threshold)
    return summarize(rows)["metrics"]


# -- held-out blocks -------------------------------------------------------------------------

def ppl_block_len(requested: int | None, n_ctx: int) -> int:
    """--ppl-block-len resolved: None -> min(n_ctx, DEFAULT_PPL_BLOCK); longer than the context is refused."""
    if requested is None:
        return min(n_ctx, DEFAULT_PPL_BLOCK)
    if requested > n_ctx:
        raise InputError(f"--ppl-block-len {requested} exceeds the model's context ({n_ctx} tokens)")
    return requested


def heldout_blocks(source: str, tokenizer: Any, block_len: int, max_blocks: int | None = None,
                   bos: BosPolicy = NO_BOS) -> list[np.ndarray]:
    """Held-out text (any source `load_documents` reads) cut into consecutive blocks of at most
    `block_len` tokens, BOS included: text is encoded without special tokens, a token document loses
    a leading BOS, and every block gets `bos.apply` (so each block of a BOS model starts with BOS).
    A document's last block is shorter; blocks of fewer than 2 tokens predict nothing and are dropped."""
    step = block_len - bos.n_prepended
    if step < 1:
        raise InputError(f"--ppl-block-len {block_len} leaves no room for text after the BOS token")
    blocks: list[np.ndarray] = []
    for doc in load_documents(source, Columns()):
        if doc.tokens is not None:
            tokens = bos.strip(doc.tokens)
        elif max_blocks is not None:   # only the text of the blocks still wanted is tokenized
            tokens = encode_prefix(tokenizer, doc.text or "", (max_blocks - len(blocks)) * step)
        else:
            tokens = encode(tokenizer, doc.text or "")
        for start in range(0, len(tokens), step):
            block = np.asarray(bos.apply(tokens[start:start + step]), np.int64)
            if len(block) >= 2:
                blocks.append(block)
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    if not blocks:
        raise InputError(f"held-out text {source} holds no token blocks")
    return blocks


def describe_blocks(blocks: Sequence[np.ndarray]) -> str:
    """The blocks as they are, for the log: '3 held-out blocks: 2 of 1024 tokens, 1 shorter (147);
    2,195 tokens'."""
    lengths = [len(b) for b in blocks]
    longest, total = max(lengths), sum(lengths)
    plural = "s" if len(blocks) != 1 else ""
    shorter = [n for n in lengths if n < longest]
    if not shorter:
        return f"{len(blocks)} held-out block{plural} of {longest} tokens ({total:,} tokens)"
    span = f"{min(shorter)}" if min(shorter) == max(shorter) else f"{min(shorter)}-{max(shorter)}"
    return (f"{len(blocks)} held-out block{plural}: {len(blocks) - len(shorter)} of {longest} tokens, "
            f"{len(shorter)} shorter ({span}); {total:,} tokens")


# -- perplexity ------------------------------------------------------------------------------

def forward_rows(model: torch.nn.Module, seq_len: int, batch_size: int) -> int:
    """Sequences per forward pass: at most `batch_size`, and few enough that the [rows, seq_len, V]
    logits stay within LOGITS_BYTES (counted as float32); at least one."""
    return max(1, min(batch_size, LOGITS_BYTES // (4 * dims(model).d_vocab * max(seq_len, 1))))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of one sequence's [T, V] logits (any dtype) against [T] targets, in
    float64; the logits are upcast NLL_CHUNK_BYTES at a time."""
    step = max(1, NLL_CHUNK_BYTES // (4 * logits.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for s in range(0, len(targets), step):
        chunk = torch.nn.functional.cross_entropy(logits[s:s + step].float(), targets[s:s + step], reduction="sum")
        total += chunk.double()
    return total


@torch.inference_mode()
def nll_and_tokens(model: torch.nn.Module, blocks: Sequence[np.ndarray], *, pad_id: int,
                   batch_size: int) -> tuple[float, int]:
    """(total NLL, predicted tokens) over `blocks`: each block predicts its tokens 1..len-1; padding
    is never a target (each row is read to its own length)."""
    device = next(model.parameters()).device
    rows = forward_rows(model, max(len(b) for b in blocks), batch_size)
    total, count = 0.0, 0
    for b in range(0, len(blocks), rows):
        batch = blocks[b:b + rows]
        ids, mask = (t.to(device) for t in pad_batch(batch, pad_id, "right"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll = sum((_nll_sum(logits[r, :len(block) - 1], ids[r, 1:len(block)]) for r, block in enumerate(batch)),
                  torch.zeros((), dtype=torch.float64, device=device))
        total += float(nll)
        count += sum(len(block) - 1 for block in batch)
        del logits
    return total, count


def perplexity(model: torch.nn.Module, blocks: Sequence[np.ndarray], *, pad_id: int, batch_size: int) -> float:
    """exp(total NLL / total predicted tokens); padding is masked out of both sums."""
    total, count = nll_and_tokens(model, blocks, pad_id=pad_id, batch_size=batch_size)
    return math.exp(total / count)
