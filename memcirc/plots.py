"""Figures a researcher wants next to the numbers (PNG, written atomically)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on SLURM nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from memcirc.artifacts import atomic_write_bytes  # noqa: E402


def save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def score_histogram(rows: Sequence[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Left: distribution of lcp (k-extractable length). Right: exact-match rate per group."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lcp = [r["lcp"] for r in rows]
    longest = max(r["suffix_len"] for r in rows)
    left.hist(lcp, bins=[b - 0.5 for b in range(longest + 2)], color="#4c72b0", edgecolor="white")
    left.set_yscale("log")
    left.set_xlabel("reproduced suffix tokens before the first divergence (lcp)")
    left.set_ylabel("windows")
    left.set_title(f"{len(rows)} windows; lcp = {longest} means exact")
    groups = summary["groups"]
    names = list(groups)
    right.bar(names, [groups[g]["exact"] for g in names], color="#dd8452")
    for i, g in enumerate(names):
        right.text(i, groups[g]["exact"], f"n={groups[g]['n']}", ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, 1.1)
    right.set_ylabel("exact-match rate")
    right.set_title("exact match per group")
    right.tick_params(axis="x", rotation=45)
    save_figure(fig, path)


def divergence_figure(points: Sequence[tuple[int, int, float, float, bool, str]], path: Path) -> None:
    """points: (position, prefix_len, score_before, score_after, resolved, group) per window.
    Left: context length at which memorization breaks, per group. Right: the score drop there."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    resolved = [p for p in points if p[4]]
    groups = sorted({p[5] for p in resolved})
    longest = max((p[1] for p in points), default=1)
    left.hist([[p[0] for p in resolved if p[5] == g] for g in groups] or [[]], bins=range(0, longest + 2),
              stacked=True, label=groups or None)
    if groups:
        left.legend(fontsize=8)
    left.set_xlabel("context length where memorization breaks (divergence position)")
    left.set_ylabel("memorized windows")
    left.set_title(f"{len(resolved)} of {len(points)} memorized windows break")
    right.scatter([p[2] for p in resolved], [p[3] for p in resolved], s=12, alpha=0.7)
    right.plot([0, 1], [0, 1], color="grey", lw=0.8)
    right.set_xlabel("score before the break")
    right.set_ylabel("score at the break")
    right.set_title("score drop at the divergence")
    save_figure(fig, path)
