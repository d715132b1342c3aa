"""Before/after measurements shared by the intervention stages (attention bypass, K-FAC edit):
memorization of the memorized windows and perplexity on held-out text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.config import MemorizedRule
from memcirc.data import Columns, ScoredWindow, Window, load_documents, memorized, read_scores
from memcirc.errors import InputError
from memcirc.scoring import pad_batch, score_windows, summarize


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
    """Mean of every DESIGN §5 metric over `windows` (strict = exact, loose = loose_match)."""
    rows = score_windows(model, windows, pad_id=pad_id, batch_size=batch_size, metrics=metrics,
                         levenshtein_threshold=levenshtein_threshold)
    return summarize(rows)["metrics"]


def heldout_blocks(source: str, tokenizer: Any, block_len: int, max_blocks: int | None = None) -> list[np.ndarray]:
    """Held-out text (a file, folder or Hub id) cut into consecutive token blocks of `block_len`."""
    blocks: list[np.ndarray] = []
    for doc in load_documents(source, Columns()):
        tokens = doc.tokens if doc.tokens is not None else tokenizer(doc.text)["input_ids"]
        for start in range(0, len(tokens) - 1, block_len):
            block = np.asarray(tokens[start:start + block_len], np.int64)
            if len(block) >= 2:
                blocks.append(block)
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    if not blocks:
        raise InputError(f"held-out text {source} holds no token blocks")
    return blocks


@torch.inference_mode()
def perplexity(model: torch.nn.Module, blocks: Sequence[np.ndarray], *, pad_id: int, batch_size: int) -> float:
    """exp(total NLL / total predicted tokens); padding is masked out of both sums."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for b in range(0, len(blocks), batch_size):
        batch = blocks[b:b + batch_size]
        ids, mask = (t.to(device) for t in pad_batch(batch, pad_id, "right"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        target_mask = mask[:, 1:].float()
        total_nll += float((nll * target_mask).sum())
        total_tokens += int(target_mask.sum())
    return math.exp(total_nll / total_tokens)
