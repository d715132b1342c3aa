"""What an ablated edge carries: the source outputs of the corrupt run, zero, or their mean.

`resample` = the source's output on the corrupt prompt of the same pair (auto-circuit RESAMPLE),
`zero` = 0 (auto-circuit ZERO), `mean` = the source's output averaged over the corrupt prompts of
the evaluated split, position by position (auto-circuit TOKENWISE_MEAN_CORRUPT generalized to prompts
of different lengths: position p averages the prompts that have a token at p).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from memcirc.circuits.graph import EdgeGraph
from memcirc.errors import InputError

if TYPE_CHECKING:
    from auto_circuit.data import PromptPairBatch

ABLATION_NAMES = {"resample": "RESAMPLE", "zero": "ZERO", "mean": "TOKENWISE_MEAN_CORRUPT (any length)"}


class Ablation:
    """The source outputs an ablated edge carries, per batch: `ablation(batch)` -> [srcs, b, seq, d].

    Computed lazily per batch (the whole dataset's activations need not fit in memory) and cached
    while the cache stays under `cache_bytes`.
    """

    def __init__(self, graph: EdgeGraph, batches: Sequence[PromptPairBatch], kind: str,
                 cache_bytes: int = 1 << 30) -> None:
        if kind not in ABLATION_NAMES:
            raise InputError(f"ablation {kind!r} is not one of {', '.join(ABLATION_NAMES)}")
        self.graph, self.kind, self.cache_bytes = graph, kind, cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached = 0
        self._mean: torch.Tensor | None = self._positionwise_mean(batches) if kind == "mean" else None

    def _src_outs(self, tokens: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """Every source's output on `tokens` (auto-circuit RESAMPLE), or zeros of that shape (ZERO)."""
        from auto_circuit.types import AblationType
        from auto_circuit.utils.ablation_activations import src_ablations

        return src_ablations(self.graph.pm, tokens, AblationType.ZERO if zero else AblationType.RESAMPLE)

    def _positionwise_mean(self, batches: Sequence[PromptPairBatch]) -> torch.Tensor:
        total: torch.Tensor | None = None
        count = torch.zeros(max(int(b.corrupt.shape[1]) for b in batches), dtype=torch.float64)
        for batch in batches:
            outs = self._src_outs(batch.corrupt).double().sum(dim=1)  # [srcs, seq, d]
            if total is None:
                total = torch.zeros(outs.shape[0], len(count), *outs.shape[2:], dtype=torch.float64,
                                    device=outs.device)
            total[:, :outs.shape[1]] += outs
            count[:outs.shape[1]] += batch.corrupt.shape[0]
        assert total is not None
        return total / count.to(total.device).view(1, -1, *([1] * (total.ndim - 2)))

    def __call__(self, batch: PromptPairBatch) -> torch.Tensor:
        if batch.key in self._cache:
            return self._cache[batch.key]
        if self.kind == "resample":
            outs = self._src_outs(batch.corrupt)
        elif self.kind == "zero":
            outs = self._src_outs(batch.clean, zero=True)
        else:
            assert self._mean is not None
            b, s = batch.clean.shape
            mean = self._mean[:, :s].unsqueeze(1)
            dtype = next(self.graph.pm.parameters()).dtype
            outs = mean.expand(mean.shape[0], b, *mean.shape[2:]).to(dtype).contiguous()
        size = outs.numel() * outs.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[batch.key] = outs
            self._cached += size
        return outs
