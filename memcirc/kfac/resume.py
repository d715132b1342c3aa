"""Resumable factor collection: the running sums are saved every few batches, so a job stopped by
SIGTERM (SLURM preemption) continues from its last save and adds up exactly as an uninterrupted run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.kfac.factors import Checkpoint, FactorOptions, Factors, collect_factors, load_factors
from memcirc.kfac.targets import Target
from memcirc.logs import progress

log = logging.getLogger(__name__)

PARTIAL = "partial.safetensors"    # running factor sums of an unfinished job


def _saved_sums(partial: Path) -> Factors | None:
    """The running sums saved in `partial`; None when there are none, or when the file is damaged (cut,
    overwritten): that is logged and the file dropped, so the sums are collected again from the start,
    rather than failing on every re-run."""
    if not partial.is_file():
        return None
    try:
        sums, _, _ = load_factors(partial)
        if not isinstance(sums.meta.get("next"), int):
            raise ValueError("no batch count in its metadata")
    except Exception as e:  # noqa: BLE001 - our own save, unreadable in any way: collect again
        log.warning("%s is damaged (%s); discarding it and collecting the factors from the start", partial, e)
        partial.unlink(missing_ok=True)
        return None
    return sums


@dataclass
class FactorCollection:
    """The factor collection of one stage run: the model and its targets, the token batches, how the
    labels are drawn (`opts`), and what the saves are keyed and labelled with."""

    model: torch.nn.Module
    targets: Sequence[Target]
    batches: list[torch.Tensor]
    opts: FactorOptions
    fingerprint: str               # the stage's: a save of another configuration is discarded
    identity: dict[str, Any]       # the model identity written into the saves
    chunk_size: int = 16           # batches between saves

    def resumable(self, first: int, last: int, directory: Path, desc: str) -> Factors:
        """float64 sums over batches[first:last], saved into `directory` every `chunk_size` batches."""
        partial = directory / PARTIAL
        key = {"fingerprint": self.fingerprint, "first": first, "last": last}
        start, initial = first, None
        if (sums := _saved_sums(partial)) is not None:
            if {k: sums.meta.get(k) for k in key} == key and first <= sums.meta["next"] <= last:
                start, initial = sums.meta["next"], sums
                log.info("resuming: %d of %d factor batches already done in %s", start - first, last - first,
                         directory)
            else:
                log.info("discarding partial factor sums of another configuration in %s", directory)
        art.ensure_writable(directory)

        def save(n_done: int, sums: Factors) -> None:
            sums.meta = {**key, "next": start + n_done}
            sums.save(partial, self.identity, self.targets)

        todo = self.batches[start:last]
        if not todo:
            if initial is None:   # first >= last: collect_factors would find no tokens either
                raise InputError("no tokens to collect K-FAC factors on (empty factor data or zero budget)")
            return initial
        # the label seeds count blocks from the first batch of the whole list
        opts = replace(self.opts, first_block=sum(len(b) for b in self.batches[:start]), float64=True)
        return collect_factors(self.model, self.targets, progress(todo, desc, len(todo)), opts, initial,
                               Checkpoint(save, self.chunk_size))
