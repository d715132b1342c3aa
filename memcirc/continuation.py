"""Greedy continuation from the first divergence, decoded from the teacher-forced pass's own KV cache.

A window that is not exact (lcp l < S) continues as: the true tokens up to l, the teacher-forced argmax
at l, then greedy decoding. The teacher-forced pass already computed the keys and values of positions
[0, P + l) from the true tokens, so nothing is re-encoded: those cache slots are copied out
(`add`), rows of several teacher-forced batches are pooled, and a small greedy loop (`flush`) feeds
the divergent token at position P + l and decodes S - l - 1 more tokens. No EOS stop, nothing banned.

Each pooled row's valid slots are left-padded to a common width W (mask 0 in front), exactly the
layout HF `generate` used for left-padded prompts, so slot distance = position distance within a row
and sliding-window / local attention (GPT-Neo, Gemma 3) masks stay right.

Memory: the pool holds at most `generation_batch + batch_size` rows of (P + S) cache slots, i.e.
2 * layers * rows * (P + S) * d_kv floats (Pythia-1B fp32, 320 rows of 64 tokens: about 5 GB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


@dataclass
class _Block:
    keys: list[torch.Tensor]     # per layer [R, H, W, D]
    values: list[torch.Tensor]
    mask: torch.Tensor           # [R, W] long, 0 on the left padding
    position: torch.Tensor       # [R] position of the divergent token (P + l)
    first: torch.Tensor          # [R] the divergent token
    n_new: list[int]             # tokens to decode after it (S - l - 1)
    owners: list[Any]


@dataclass
class CachedContinuation:
    """Pool non-exact rows of teacher-forced batches and decode them `generation_batch` at a time.
    `done([(owner, tokens), ...])` gets each row's decoded tokens (n_new of them) once per decoded batch."""

    model: torch.nn.Module
    generation_batch: int
    done: Callable[[list[tuple[Any, list[int]]]], None]
    _pool: list[_Block] = field(default_factory=list)

    def add(self, cache: Any, rows: Sequence[int], offsets: Sequence[int], lengths: Sequence[int],
            first: Sequence[int], n_new: Sequence[int], owners: Sequence[Any]) -> None:
        """Take rows `rows` of a teacher-forced `cache`: row r's true tokens sit in slots
        [offsets[r], offsets[r] + lengths[r]) at positions [0, lengths[r]). Rows with nothing to decode
        are finished at once."""
        if finished := [(owners[i], []) for i, n in enumerate(n_new) if n == 0]:
            self.done(finished)
        keep = [i for i, n in enumerate(n_new) if n > 0]
        if not keep:
            return
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        device = layers[0][0].device
        pick = torch.tensor([rows[i] for i in keep], device=device)
        length = torch.tensor([lengths[i] for i in keep], device=device)
        width = int(length.max())
        slot = torch.arange(width, device=device)[None, :]
        pad = slot < (width - length)[:, None]
        src = (torch.tensor([offsets[i] for i in keep], device=device)[:, None] + length[:, None] - width
               + slot).clamp(min=0)
        keys, values = [], []
        for k, v in layers:
            index = src[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keys.append(k[pick].gather(2, index))
            values.append(v[pick].gather(2, index))
        self._pool.append(_Block(keys, values, (~pad).long(), length, torch.tensor([first[i] for i in keep]),
                                 [n_new[i] for i in keep], [owners[i] for i in keep]))
        if sum(len(b.owners) for b in self._pool) >= self.generation_batch:
            self.flush()

    def flush(self) -> None:
        """Decode every pooled row."""
        blocks, self._pool = self._pool, []
        if blocks:
            _decode(self.model, _concat(blocks), self.done)


def _concat(blocks: list[_Block]) -> _Block:
    """One block, left-padded to the widest; rows sorted by n_new, longest first (see `_decode`)."""
    width = max(b.mask.shape[1] for b in blocks)

    def left(t: torch.Tensor, b: _Block, dim: int) -> torch.Tensor:
        extra = width - b.mask.shape[1]
        if extra == 0:
            return t
        spec = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
        return F.pad(t, spec)

    n_layers = len(blocks[0].keys)
    n_new = [n for b in blocks for n in b.n_new]
    order = sorted(range(len(n_new)), key=lambda i: -n_new[i])
    o = torch.tensor(order)
    od = o.to(blocks[0].keys[0].device)
    return _Block(
        keys=[torch.cat([left(b.keys[j], b, 2) for b in blocks])[od] for j in range(n_layers)],
        values=[torch.cat([left(b.values[j], b, 2) for b in blocks])[od] for j in range(n_layers)],
        mask=torch.cat([left(b.mask, b, 1) for b in blocks])[od],
        position=torch.cat([b.position for b in blocks])[od],
        first=torch.cat([b.first for b in blocks])[o],
        n_new=[n_new[i] for i in order],
        owners=[[w for b in blocks for w in b.owners][i] for i in order])


class _Preallocated(DynamicLayer):
    """A cache layer with room for `extra` more slots: decoding writes in place instead of
    DynamicLayer's per-step torch.cat of the whole cache (57 % of decode time on the testbed)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = keys.shape[2]
        self.buffers = []
        for t in (keys, values):
            buffer = t.new_empty((t.shape[0], t.shape[1], self.length + extra, t.shape[3]))
            buffer[:, :, :self.length] = t
            self.buffers.append(buffer)
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None  # noqa: ARG002 (HF's signature)
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[2]
        for buffer, t in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length:self.length + n] = t
        self.length += n
        self._views()
        return self.buffers[0][:, :, :self.length], self.buffers[1][:, :, :self.length]

    def keep_rows(self, n: int) -> None:
        self.buffers = [b[:n] for b in self.buffers]
        self._views()


@torch.inference_mode()
def _decode(model: torch.nn.Module, block: _Block, done: Callable[[list[tuple[Any, list[int]]]], None]) -> None:
    """Greedy loop over the cache. Rows are sorted by n_new descending, so the rows still decoding are
    a prefix: the batch is cut to it whenever a quarter of it has finished."""
    device = block.mask.device
    steps = block.n_new[0]
    layers = [_Preallocated(k, v, steps) for k, v in zip(block.keys, block.values)]
    block.keys, block.values = [], []   # the buffers hold the only copy now
    cache = DynamicCache()
    cache.layers = list[CacheLayerMixin](layers)
    width = block.mask.shape[1]
    mask = torch.cat([block.mask, torch.ones((len(block.n_new), steps), dtype=torch.long, device=device)], 1)
    token = block.first.to(device)
    position = block.position
    out = torch.empty((len(block.n_new), steps), dtype=torch.long, device=device)
    active = len(block.n_new)
    for t in range(steps):
        still = sum(n > t for n in block.n_new)
        if still <= active * 3 // 4:   # drop finished rows from the batch
            active = still
            for layer in layers:
                layer.keep_rows(active)
            token, mask, position = token[:active], mask[:active], position[:active]
        logits = model(input_ids=token[:, None], attention_mask=mask[:, :width + t + 1],
                       position_ids=(position + t)[:, None], past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([width + t], device=device)).logits
        token = logits[:, -1].argmax(-1)
        out[:active, t] = token
    rows = out.cpu().tolist()
    done([(owner, rows[i][:block.n_new[i]]) for i, owner in enumerate(block.owners)])
