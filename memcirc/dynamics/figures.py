"""The training_dynamics stage's figures, drawn from its summary and overlap data (`memcirc.plots` style).

- `memorization_figure`: the memorized fraction of each group at every checkpoint, one small panel
  per group (groups with equal values, e.g. all at 0, would hide each other on one axis).
- `circuit_size_figure`: memorization, the minimal circuit's size, its faithfulness and its overlap
  over training, on one shared step axis.
- `overlap_figure`: the Jaccard and weighted Jaccard of every pair of checkpoints (lower triangles).

Each takes the plain dicts the stage writes (`summary.json`, `overlap.json`), the PNG's path and the
footer (`memcirc.plots.figure_source`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.plots import group_colours, save_figure, step_axis, subplots, wilson_interval

FAITHFULNESS_YLIM = (-0.25, 1.25)
WEIGHTED = "weighted Jaccard: sum min(w, v) / sum max(w, v) over every edge, w = |prune score| normalized to sum 1"


def _or_nan(values: Sequence[float | None]) -> list[float]:
    return [v if v is not None else np.nan for v in values]


def _onset_text(onset: int | None) -> str:
    return f"onset {onset}" if onset is not None else "onset: never"


def memorization_figure(summary: dict[str, Any], path: Path, source: str | None = None) -> None:
    """Small multiples: one panel per group (shared axes), its memorized fraction with the 95 % Wilson
    band, the onset dashed; the other groups faint grey behind it for comparison."""
    steps = summary["steps"]
    groups = list(summary["onset_by_group"])
    colors = group_colours(groups)
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.1 * cols + 0.6, 2.5 * rows + 1.1), sharex=True, sharey=True,
                         squeeze=False, constrained_layout=True)
    rates = {g: [c["memorization"][g] for c in summary["checkpoints"]] for g in groups}
    details = summary.get("onset_detail_by_group", {})
    for ax, g in zip(axes.flat, groups):
        for other in groups:
            if other != g:
                ax.plot(steps, rates[other], color="0.85", lw=0.8, zorder=1)
        n = (details.get(g) or {}).get("n")
        if n:
            lo, hi = zip(*(wilson_interval(round(r * n), n) for r in rates[g]), strict=True)
            ax.fill_between(steps, lo, hi, color=colors[g], alpha=0.2, lw=0, zorder=2)
        ax.plot(steps, rates[g], marker="o", ms=4, color=colors[g], zorder=3)
        onset = summary["onset_by_group"][g]
        if onset is not None:
            ax.axvline(onset, color=colors[g], ls="--", lw=1)
        ax.set_title(f"{g}" + (f" (n={n})" if n else "") + f": {_onset_text(onset)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.03, 1.03)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    for ax in axes[-1]:
        step_axis(ax, steps)
    for ax in axes[:, 0]:
        ax.set_ylabel("memorized fraction")
    fig.suptitle(f"memorization over training ({summary['memorized_by']} >= {summary['threshold']}): "
                 f"{summary['n_windows']} windows, {len(steps)} checkpoints; one panel per group, band 95 % "
                 "Wilson, dashed onset, grey: the other groups", fontsize=10)
    save_figure(fig, path, source=source)


def circuit_size_figure(summary: dict[str, Any], path: Path, source: str | None = None) -> None:
    """Four panels on one step axis: memorization, the minimal circuit's size, its faithfulness
    (clipped, ill-conditioned circled) and its overlap with the final and the previous checkpoint."""
    steps = summary["steps"]
    cps = summary["checkpoints"]
    fig, axes = subplots(2, 2, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    (mem, size), (faith, overlap) = axes
    _memorization_panel(mem, summary)
    size.plot(steps, _or_nan([x["circuit_edges"] for x in cps]), marker="o", color="#4c72b0")
    size.set_ylabel("minimal circuit edges")
    total = next((x.get("edges_total") for x in cps if x.get("edges_total")), None)
    size.set_title(f"minimal circuit (F >= {summary.get('target')} on the discovery pairs)"
                   + (f", of {total} edges" if total else ""), fontsize=10)
    _faithfulness_panel(faith, steps, cps, summary.get("target"))
    for key, name, color, ls in (("jaccard_final", "Jaccard vs final", "#4c72b0", "-"),
                                 ("jaccard_previous", "Jaccard vs previous", "#4c72b0", "--"),
                                 ("weighted_final", "weighted vs final", "#dd8452", "-"),
                                 ("weighted_previous", "weighted vs previous", "#dd8452", "--")):
        overlap.plot(steps, _or_nan([x[key] for x in cps]), marker="o", ms=4, color=color, ls=ls, label=name)
    overlap.set_ylim(-0.03, 1.03)
    overlap.set_ylabel("edge overlap")
    overlap.set_title("circuit overlap. Jaccard: of the circuits' edge sets;\nweighted: sum min(w, v) / sum max(w, v), "
                      "w = |prune score| of every edge, normalized", fontsize=9)
    overlap.legend(fontsize=8, loc="lower right")
    colors = group_colours(list(summary["onset_by_group"]))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for g, onset in summary["onset_by_group"].items():   # the onsets, to read circuit growth against them
            if onset is not None:
                ax.axvline(onset, color=colors[g], ls=":", lw=1.2, zorder=0)
    for ax in axes[1]:
        step_axis(ax, steps)
    pairs = summary.get("pairs") or {}
    fig.suptitle(f"circuit over training: {len(steps)} checkpoints, {pairs.get('discovery', '?')} discovery / "
                 f"{pairs.get('heldout', '?')} held-out pairs", fontsize=11)
    save_figure(fig, path, source=source)


def _memorization_panel(ax: Any, summary: dict[str, Any]) -> None:
    """The memorized fraction of every window and of each group that is memorized at some checkpoint."""
    steps = summary["steps"]
    cps = summary["checkpoints"]
    groups = list(summary["onset_by_group"])
    colors = group_colours(groups)
    ax.plot(steps, [c["memorized_fraction"] for c in cps], color="black", lw=2, marker="o", ms=4,
            label="all windows")
    never = []
    for g in groups:
        rates = [c["memorization"][g] for c in cps]
        if max(rates) > 0:
            ax.plot(steps, rates, marker="o", ms=3, lw=1, color=colors[g],
                    label=f"{g} ({_onset_text(summary['onset_by_group'][g])})")
        else:
            never.append(g)
    if never:
        ax.text(0.01, 0.97, f"never memorized: {', '.join(never)}", transform=ax.transAxes, fontsize=7,
                va="top", color="0.3")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"memorized fraction ({summary['memorized_by']} >= {summary['threshold']})")
    ax.set_title("memorization (dotted in every panel: the groups' onsets)", fontsize=10)
    ax.legend(fontsize=7, loc="center left")


def _faithfulness_panel(b: Any, steps: Sequence[int], cps: Sequence[dict[str, Any]], target: float | None) -> None:
    """Both splits' faithfulness, clipped to the y range: an off-scale value is drawn at the edge as a
    triangle with its value written; ill-conditioned points circled red."""
    lo, hi = FAITHFULNESS_YLIM
    keys = (("faithfulness_discovery", "ill_conditioned", "discovery", "#4c72b0"),
            ("faithfulness_heldout", "heldout_ill_conditioned", "held-out", "#55a868"))
    clipped_any = False
    for key, _, name, color in keys:
        raw = np.array(_or_nan([x[key] for x in cps]), dtype=float)
        b.plot(steps, np.clip(raw, lo, hi), marker="o", ms=4, color=color, label=name)
        for s, f in zip(steps, raw, strict=True):
            if np.isfinite(f) and not lo <= f <= hi:
                clipped_any = True
                b.scatter([s], [hi if f > hi else lo], marker="^" if f > hi else "v", s=70, color=color, zorder=4)
                b.annotate(f"{f:.3g}", (s, hi if f > hi else lo), textcoords="offset points",
                           xytext=(7, -12 if f > hi else 4), fontsize=8, color=color)
    ill = [(s, min(max(x[key], lo), hi)) for s, x in zip(steps, cps, strict=True)
           for key, flag, _, _ in keys if x[flag] and x[key] is not None]
    if ill:
        b.scatter(*zip(*ill, strict=True), s=160, facecolors="none", edgecolors="red",
                  label="ill-conditioned: M(full) - M(empty) ~ 0", zorder=5)
    if target is not None:
        b.axhline(target, color="grey", lw=0.8, ls="--", label=f"target {target}")
    b.set_ylim(lo - 0.05, hi + 0.05)
    b.set_ylabel("faithfulness of the minimal circuit")
    b.set_title("faithfulness" + (f" (clipped to {lo}..{hi}: triangles, value written)" if clipped_any else ""),
                fontsize=10)
    b.legend(fontsize=7, loc="lower right")


def overlap_figure(overlap: dict[str, Any], path: Path, source: str | None = None) -> None:
    """The Jaccard and weighted Jaccard of every pair of checkpoints: the matrices are symmetric, so
    each shows its lower triangle (diagonal included) with the values written."""
    labels = [str(s) for s in overlap["steps"]]
    n = len(labels)
    side = 2.2 + 0.55 * n
    fig, axes = subplots(1, 2, figsize=(2 * side + 1.5, side + 0.6), constrained_layout=True)
    for ax, key, title in ((axes[0], "jaccard", "Jaccard of the circuits' edge sets"),
                           (axes[1], "weighted_jaccard", "weighted Jaccard of |prune scores|")):
        m = np.array([_or_nan(row) for row in overlap[key]], dtype=float)
        m[np.triu_indices(n, 1)] = np.nan
        im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, rotation=90 if n > 8 else 0, fontsize=8 if n > 12 else 9)
        ax.set_yticks(range(n), labels, fontsize=8 if n > 12 else 9)
        if n <= 16:
            _write_values(ax, m, fontsize=9 if n <= 8 else 7)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xlabel("training step")
        ax.set_ylabel("training step")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"circuit overlap between checkpoints ({WEIGHTED})", fontsize=9)
    save_figure(fig, path, source=source)


def _write_values(ax: Any, m: np.ndarray, fontsize: float) -> None:
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if m[i, j] < 0.6 else "black")
