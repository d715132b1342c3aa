"""The training_dynamics stage's figures, drawn from its summary and overlap data (`memcirc.plots` style).

- `memorization_figure`: the memorized fraction of each group at every checkpoint.
- `circuit_size_figure`: the minimal circuit's size, faithfulness and overlap over training.
- `overlap_figure`: heatmaps of the Jaccard and weighted Jaccard of every pair of checkpoints.

Each takes the plain dicts the stage writes (`summary.json`, `overlap.json`) and the PNG's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.plots import save_figure, subplots

FAITHFULNESS_YLIM = (-0.25, 1.25)


def _step_axis(ax: Any, steps: Sequence[int]) -> None:
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("symlog", linthresh=max(1, min(positive)))
    ax.set_xlabel("training step")


def _or_nan(values: Sequence[float | None]) -> list[float]:
    return [v if v is not None else np.nan for v in values]


def memorization_figure(summary: dict[str, Any], path: Path) -> None:
    """The memorized fraction of each group at every checkpoint."""
    steps = summary["steps"]
    fig, ax = subplots(figsize=(7, 4.5))
    for g in summary["onset_by_group"]:
        rates = [c["memorization"][g] for c in summary["checkpoints"]]
        onset = summary["onset_by_group"][g]
        ax.plot(steps, rates, marker="o", label=f"{g} (onset {onset if onset is not None else 'never'})")
    _step_axis(ax, steps)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"memorized fraction ({summary['memorized_by']} >= {summary['threshold']})")
    ax.set_title(f"memorization over training: {summary['n_windows']} windows, {len(steps)} checkpoints")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def circuit_size_figure(summary: dict[str, Any], path: Path) -> None:
    """Over training: the minimal circuit's size, its faithfulness, and its overlap with the final and previous."""
    steps = summary["steps"]
    cps = summary["checkpoints"]
    fig, (a, b, c) = subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    a.plot(steps, _or_nan([x["circuit_edges"] for x in cps]), marker="o")
    a.set_ylabel("minimal circuit edges")
    a.set_title(f"minimal circuit (F >= {summary.get('target')}, discovery pairs)")
    _faithfulness_panel(b, steps, cps, summary.get("target"))
    for key, name in (("jaccard_final", "Jaccard vs final"), ("jaccard_previous", "Jaccard vs previous"),
                      ("weighted_final", "weighted vs final"), ("weighted_previous", "weighted vs previous")):
        c.plot(steps, _or_nan([x[key] for x in cps]), marker="o", label=name)
    c.set_ylim(-0.03, 1.03)
    c.set_ylabel("edge overlap")
    c.set_title("circuit overlap")
    c.legend(fontsize=8)
    for ax in (a, b, c):
        _step_axis(ax, steps)
    save_figure(fig, path)


def _faithfulness_panel(b: Any, steps: Sequence[int], cps: Sequence[dict[str, Any]], target: float | None) -> None:
    """Both splits' faithfulness, y clipped; ill-conditioned points circled, off-scale values written out."""
    keys = (("faithfulness_discovery", "ill_conditioned"), ("faithfulness_heldout", "heldout_ill_conditioned"))
    for (key, _), name in zip(keys, ("discovery", "held-out"), strict=True):
        b.plot(steps, _or_nan([x[key] for x in cps]), marker="o", label=name)
    lo, hi = FAITHFULNESS_YLIM
    ill = [(s, min(max(x[key], lo), hi)) for s, x in zip(steps, cps, strict=True)
           for key, flag in keys if x[flag] and x[key] is not None]
    if ill:
        b.scatter(*zip(*ill, strict=True), s=160, facecolors="none", edgecolors="red",
                  label="ill-conditioned: M(full) - M(empty) ~ 0")
    off_scale = [(s, x[key]) for s, x in zip(steps, cps, strict=True) for key, _ in keys
                 if x[key] is not None and not lo <= x[key] <= hi]
    for s, f in off_scale:
        b.annotate(f"{f:.3g}", (s, min(max(f, lo), hi)), textcoords="offset points", xytext=(6, -10),
                   fontsize=7, color="red")
    b.set_ylim(lo, hi)
    b.axhline(target or 0, color="grey", lw=0.8, ls="--")
    b.set_ylabel("faithfulness of the minimal circuit")
    b.set_title(f"faithfulness (dashed: target; y clipped to {lo}..{hi})", fontsize=10)
    b.legend(fontsize=8, loc="lower right")


def overlap_figure(overlap: dict[str, Any], path: Path) -> None:
    """Heatmaps of the Jaccard and weighted Jaccard of every pair of checkpoints."""
    labels = [str(s) for s in overlap["steps"]]
    n = len(labels)
    fig, axes = subplots(1, 2, figsize=(9 + 0.8 * n, 3.5 + 0.4 * n), constrained_layout=True)
    for ax, key, title in ((axes[0], "jaccard", "Jaccard of circuit edges"),
                           (axes[1], "weighted_jaccard", "weighted Jaccard of |prune scores|")):
        m = np.array([_or_nan(row) for row in overlap[key]], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, rotation=90 if n > 8 else 0, fontsize=7 if n > 12 else 9)
        ax.set_yticks(range(n), labels, fontsize=7 if n > 12 else 9)
        if n <= 12:
            _write_values(ax, m)
        ax.set_xlabel("training step")
        ax.set_ylabel("training step")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def _write_values(ax: Any, m: np.ndarray) -> None:
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
