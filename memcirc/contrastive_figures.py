"""contrastive_dataset's figure, divergence.png: the context length at which memorization of each memorized
window breaks (the windows that never break as their own bar), and the score drop at the break.

Drawn from the stage's `memcirc.contrastive.Divergence`s (`memcirc.plots` style).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memcirc.contrastive import Divergence
from memcirc.plots import group_colours, group_order, save_figure, subplots

SCORE_NAMES = {"bleu": "BLEU-4", "memorization": "token accuracy"}
SHORT_CONTEXT = 2   # a break at a context this short means the pairs (and the circuit) are 2-token prompts


def divergence_figure(divergences: Sequence[Divergence], path: Path, metric: str = "bleu",
                      drop: float | None = None, source: str | None = None) -> None:
    """Left: the context length where memorization breaks, stacked by group, and a "never" bar. Right: the
    `metric` score ("bleu", "memorization") of the greedy continuation with one more context token and at
    the break (`drop`: the relative drop that marks a break). A note warns when most windows break at
    context length <= 2. `source`: the footer."""
    fig, (left, right) = subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    groups = [d.window.group or "all" for d in divergences]
    names = group_order(groups)
    colours = group_colours(names)
    _position_panel(left, divergences, groups, names, colours)
    _drop_panel(right, divergences, groups, colours, SCORE_NAMES.get(metric, metric), drop)
    save_figure(fig, path, source)


def _position_panel(ax: Any, divergences: Sequence[Divergence], groups: list[str], names: list[str],
                    colours: dict[str, Any]) -> None:
    longest = max((d.window.prefix_len for d in divergences), default=1)
    never_at = longest + 3   # the "never" bar, right of the longest context past a gap
    bottom = np.zeros(never_at + 1)
    for g in names:
        counts = np.zeros(never_at + 1)
        for d, dg in zip(divergences, groups, strict=True):
            if dg == g:
                counts[d.position if d.resolved else never_at] += 1
        ax.bar(np.arange(never_at + 1), counts, bottom=bottom, width=0.85, color=colours[g],
               label=f"{g} ({int(counts.sum())})")
        bottom += counts
    ticks = sorted({1, *range(5, longest + 1, 5)} - {0})
    ax.set_xticks([*ticks, never_at], [*map(str, ticks), "never"])
    ax.axvline(longest + 1.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlim(-0.5, never_at + 1)
    ax.set_xlabel("context length L where memorization breaks (tokens of the prefix kept)")
    ax.set_ylabel("memorized windows (groups stacked)")
    resolved = [d for d in divergences if d.resolved]
    ax.set_title(f"{len(resolved)} of {len(divergences)} memorized windows break; "
                 f"{len(divergences) - len(resolved)} never do", fontsize=10)
    if names:
        ax.legend(fontsize=8, loc="upper center", title="group (windows)", title_fontsize=8)
    if (warning := short_context_warning(divergences)) is not None:
        ax.text(0.5, 0.62, warning, transform=ax.transAxes, ha="center", va="center", fontsize=8.5,
                color="#8b0000", bbox={"boxstyle": "round", "fc": "#fff3f0", "ec": "#c44e52"})


def short_context_warning(divergences: Sequence[Divergence]) -> str | None:
    """The figure's warning when most windows that break do so at context length <= SHORT_CONTEXT."""
    resolved = [d for d in divergences if d.resolved]
    short = sum(d.position <= SHORT_CONTEXT for d in resolved)
    if not resolved or short <= len(resolved) / 2:
        return None
    return (f"{short} of {len(resolved)} break at L <= {SHORT_CONTEXT}: their pairs are prompts\n"
            f"of <= {SHORT_CONTEXT + 1} tokens, so the circuit is found on short prompts")


def _drop_panel(ax: Any, divergences: Sequence[Divergence], groups: list[str], colours: dict[str, Any],
                score: str, drop: float | None) -> None:
    """Each break as a vertical segment: from the score with one more context token to the score at the break."""
    broken = [(d, g) for d, g in zip(divergences, groups, strict=True) if d.resolved]
    at = Counter(d.position for d, _ in broken)
    seen: Counter[int] = Counter()
    for d, g in broken:   # windows that break at the same L side by side, so their segments do not overlap
        x = d.position + (0.8 * seen[d.position] / (at[d.position] - 1) - 0.4 if at[d.position] > 1 else 0.0)
        seen[d.position] += 1
        ax.plot([x, x], [d.score_before, d.score_after], color=colours[g], lw=1, alpha=0.8)
        ax.plot([x], [d.score_before], "o", mfc="white", mec=colours[g], ms=5)
        ax.plot([x], [d.score_after], "o", color=colours[g], ms=5)
    ax.plot([], [], "o", mfc="white", mec="0.3", label="with L + 1 context tokens")
    ax.plot([], [], "o", color="0.3", label="at the break (L tokens)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlim(left=0)
    ax.set_xlabel("context length L of the break")
    ax.set_ylabel(f"{score} of the greedy continuation vs the true text")
    rule = f": {score} falls by > {drop:.0%} and the first token differs" if drop is not None else ""
    ax.set_title(f"{score} at the break, {len(broken)} windows (break{rule})", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
