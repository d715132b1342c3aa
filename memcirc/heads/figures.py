"""Figures of the head scores (`memcirc.plots` style).

- `head_heatmaps`: every score over (layer, head) at one checkpoint, one panel per score.
- `heads_over_training`: every score of every head over the checkpoints, one panel per score (rows:
  heads L0H0.., columns: checkpoints).
- `phase_change_figure`: the induction phase change: the best induction head's score, the in-context
  gain on repeated tokens and the task's circuit faithfulness over training, on one step axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.heads.scores import SCORES
from memcirc.plots import save_figure, step_axis, subplots

LABELS = {"induction": "induction", "previous_token": "previous token", "duplicate_token": "duplicate token",
          "successor": "successor", "copy_suppression": "copy suppression"}


def _present(tables: dict[str, Any]) -> list[str]:
    return [s for s in SCORES if s in tables]


def head_heatmaps(scores: dict[str, list[list[float]]], path: Path, title: str, source: str | None = None) -> None:
    """One (layer x head) heat map per score, colour scale [0, 1] (every score is a fraction)."""
    names = _present(scores)
    fig, axes = subplots(1, len(names), figsize=(2.6 * len(names) + 1, 3.2), squeeze=False, constrained_layout=True)
    image = None
    for ax, name in zip(axes[0], names, strict=True):
        table = np.asarray(scores[name], dtype=float)
        image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (layer, head), v in np.ndenumerate(table):
            ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("head")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
    axes[0][0].set_ylabel("layer")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, source)


def heads_over_training(steps: Sequence[int], per_checkpoint: Sequence[dict[str, list[list[float]]]], path: Path,
                        title: str, source: str | None = None) -> None:
    """Per score, a (head x checkpoint) heat map: how each head's score moves over training."""
    names = _present(per_checkpoint[-1])
    fig, axes = subplots(1, len(names), figsize=(1.6 + 0.45 * len(steps) * len(names) + 1.2 * len(names), 0.9 +
                         0.22 * _n_heads(per_checkpoint[-1])), squeeze=False, constrained_layout=True)
    image = None
    for ax, name in zip(axes[0], names, strict=True):
        table = np.array([np.asarray(c[name], dtype=float).reshape(-1) for c in per_checkpoint]).T   # [heads, ckpt]
        image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
        ax.set_xlabel("checkpoint step")
        ax.set_yticks(range(table.shape[0]), _head_labels(per_checkpoint[-1][name]), fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, source)


def _n_heads(scores: dict[str, list[list[float]]]) -> int:
    first = next(iter(scores.values()))
    return len(first) * len(first[0])


def _head_labels(table: list[list[float]]) -> list[str]:
    return [f"L{layer}H{h}" for layer, row in enumerate(table) for h in range(len(row))]


def phase_change_figure(steps: Sequence[int], induction: Sequence[float], gain: Sequence[float | None],
                        faithfulness: Sequence[float | None], accuracy: Sequence[float | None], path: Path, *,
                        head: str, circuit_label: str, title: str, edges: Sequence[int | None] = (),
                        edges_total: int | None = None, source: str | None = None) -> None:
    """Top: `head`'s induction score and the in-context gain (loss on the first copy minus the second,
    nats) on twin axes. Bottom: the circuit's held-out faithfulness and the whole model's accuracy on the
    held-out pairs (None: undefined there, or no circuits)."""
    fig, (top, bottom) = subplots(2, 1, figsize=(7, 5.2), sharex=True, constrained_layout=True)
    top.plot(steps, induction, marker="o", color="tab:blue", label=f"induction score of {head}")
    top.set_ylabel("induction score", color="tab:blue")
    top.set_ylim(-0.05, 1.05)
    twin = top.twinx()
    twin.plot(steps, [np.nan if g is None else g for g in gain], marker="s", color="tab:orange",
              label="in-context gain (nats)")
    twin.set_ylabel("loss first copy - second copy (nats)", color="tab:orange")
    lines = top.get_lines() + twin.get_lines()
    top.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    bottom.plot(steps, [np.nan if f is None else f for f in faithfulness], marker="o", color="tab:green",
                label="faithfulness of the minimal circuit")
    bottom.plot(steps, [np.nan if a is None else a for a in accuracy], marker="^", color="tab:purple",
                label="accuracy of the whole model (answer > wrong)")
    for step, f, k in zip(steps, faithfulness, edges, strict=False):   # a circuit of every edge explains nothing
        if f is not None and k is not None:
            bottom.annotate(f"{k}" + (f"/{edges_total}" if edges_total else "") + " edges", (step, f),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="tab:green")
    bottom.axhline(0, color="0.7", lw=0.8)
    bottom.set_ylim(-0.1, 1.25)
    bottom.set_ylabel(f"held-out pairs\n({circuit_label})")
    bottom.legend(loc="lower right", fontsize=8)
    step_axis(bottom, list(steps))
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, source)
