"""attention_bypass's figure, tradeoff.png: the per-block view (memorization and the perplexity ratio
against the bypassed block, then the block sets) and the exact-match-vs-perplexity scatter.

Drawn from the stage's summary.json alone (`memcirc.plots` style).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Normalize

from memcirc.plots import label_points, save_figure, subplots

# the generation metrics (greedy continuation) the stage measures; teacher-forced accuracy is left out:
# it understates the bypass's effect
MEMORIZATION_BARS = (("exact", "exact match", "#4c72b0"), ("loose_match", "loose match", "#55a868"),
                     ("token_match", "token match", "#8172b2"))
SET_COLOR = "#c44e52"


def run_label(layer: int | list[int]) -> str:
    """A block as "2", a block set as "{0,1}"."""
    return "{" + ",".join(map(str, layer)) + "}" if isinstance(layer, list) else str(layer)


def tradeoff_figure(summary: dict[str, Any], path: Path, source: str | None = None) -> None:
    """Left: exact / loose / token match per bypassed block (and set), the baseline dashed. Middle: the
    perplexity ratio per run. Right: exact match against perplexity, colour = block index (colour bar),
    sets as squares. With lm-eval results, one more panel of each task's first metric per run.
    `source`: the footer (`memcirc.plots.figure_source`)."""
    rows = summary["layers"]
    tasks = _lm_eval_tasks(summary)
    ncols = 3 + bool(tasks)
    width = max(4.5, 0.45 * len(rows) + 2)
    fig, axes = subplots(1, ncols, figsize=(2 * width + 5.5 + 4 * bool(tasks), 4.6), constrained_layout=True,
                         gridspec_kw={"width_ratios": [width, width, 5.5] + [4] * bool(tasks)})
    _memorization_bars(axes[0], summary)
    _ppl_bars(axes[1], summary)
    _scatter(axes[2], fig, summary)
    if tasks:
        _lm_eval_panel(axes[3], summary, tasks)
    n_sets = sum(isinstance(r["layer"], list) for r in rows)
    fig.suptitle(f"attention bypass ({summary['mode']}) of {_count(len(rows) - n_sets, 'block')}"
                 + (f" and {_count(n_sets, 'block set')}" if n_sets else "")
                 + f": {summary['n_windows']} memorized windows, perplexity on {summary['n_ppl_blocks']} "
                   f"held-out blocks", fontsize=11)
    save_figure(fig, path, source=source)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _positions(rows: list[dict[str, Any]]) -> np.ndarray:
    """x of each run: blocks at 0..n-1, the sets after a gap of one."""
    n_single = sum(not isinstance(r["layer"], list) for r in rows)
    return np.array([i + (i >= n_single) for i in range(len(rows))], dtype=float)


def _block_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    x = _positions(rows)
    ax.set_xticks(x, [run_label(r["layer"]) for r in rows], fontsize=9,
                  rotation=45 if any(len(run_label(r["layer"])) > 5 for r in rows) else 0)
    for tick, r in zip(ax.get_xticklabels(), rows, strict=True):
        if isinstance(r["layer"], list):
            tick.set_color(SET_COLOR)
    n_single = sum(not isinstance(r["layer"], list) for r in rows)
    if 0 < n_single < len(rows):
        ax.axvline(n_single, color="0.6", lw=0.8, ls=":")
    pad = max(0.6, (3 - (x.max() - x.min())) / 2)   # a lone bar is not drawn as wide as the panel
    ax.set_xlim(x.min() - pad, x.max() + pad)
    ax.set_xlabel("bypassed block" + (" (red: a set, bypassed together)" if n_single < len(rows) else ""))
    ax.grid(alpha=0.3, axis="y")


def _memorization_bars(ax: Any, summary: dict[str, Any]) -> None:
    rows = summary["layers"]
    bars = [m for m in MEMORIZATION_BARS if m[0] in summary["baseline"]]
    x = _positions(rows)
    width = 0.8 / len(bars)
    for i, (key, name, color) in enumerate(bars):
        ax.bar(x - 0.4 + (i + 0.5) * width, [r[key] for r in rows], width, color=color,
               label=f"{name} (baseline {summary['baseline'][key]:.2f})")
    ax.axhline(summary["baseline"]["exact"], color="black", lw=1, ls="--", label="baseline exact")
    ax.set_ylim(0, 1.3)   # room for the legend above the baseline
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("memorized windows reproduced (greedy)")
    ax.set_title("memorization per bypassed block", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    _block_axis(ax, rows)


def _ppl_bars(ax: Any, summary: dict[str, Any]) -> None:
    rows = summary["layers"]
    base = summary["baseline"]["ppl"]
    ratio = [r.get("ppl_ratio", r["ppl"] / base) for r in rows]
    x = _positions(rows)
    ax.bar(x, ratio, 0.6, color=[SET_COLOR if isinstance(r["layer"], list) else "#937860" for r in rows])
    for xi, v in zip(x, ratio, strict=True):
        ax.annotate(f"{v:.2f}", (xi, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--", label=f"baseline (ppl {base:.1f})")
    top = max(ratio + [1.0])
    if top > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("held-out perplexity / baseline")
    ax.set_title("perplexity cost per bypassed block", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    _block_axis(ax, rows)


def _scatter(ax: Any, fig: Any, summary: dict[str, Any]) -> None:
    """Exact match against perplexity; runs on the same spot share one label ("0 & 2")."""
    base = summary["baseline"]
    rows = summary["layers"]
    singles = [r for r in rows if not isinstance(r["layer"], list)]
    sets = [r for r in rows if isinstance(r["layer"], list)]
    ax.scatter([base["ppl"]], [base["exact"]], color="black", marker="*", s=160, label="baseline (none)", zorder=3)
    if singles:
        blocks = [r["layer"] for r in singles]
        norm = Normalize(min(blocks), max(blocks) if max(blocks) > min(blocks) else min(blocks) + 1)
        points = ax.scatter([r["ppl"] for r in singles], [r["exact"] for r in singles], c=blocks, cmap="viridis",
                            norm=norm, s=60, edgecolors="black", linewidths=0.5, zorder=2)
        ax.scatter([], [], color="0.6", edgecolors="black", linewidths=0.5, s=60,
                   label="one block (colour: block index)")   # a neutral legend entry, not block 0's colour
        if len(set(blocks)) > 1:
            bar = fig.colorbar(points, ax=ax, fraction=0.05, pad=0.02)
            bar.set_label("bypassed block")
            if len(set(blocks)) <= 12:
                bar.set_ticks(sorted(set(blocks)))
    if sets:
        ax.scatter([r["ppl"] for r in sets], [r["exact"] for r in sets], marker="s", color=SET_COLOR, s=55,
                   edgecolors="black", linewidths=0.5, label="block set", zorder=2)
    if max(r["ppl"] for r in rows + [base]) > 10 * base["ppl"]:
        ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity")
    ax.set_ylabel("exact match (memorized windows)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("exact match against perplexity", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    spots: dict[tuple[float, float], list[str]] = {}
    for r in rows:
        spots.setdefault((round(r["ppl"], 1), round(r["exact"], 3)), []).append(run_label(r["layer"]))
    xs, ys = [p[0] for p in spots], [p[1] for p in spots]
    if label_points(ax, xs, ys, [" & ".join(v) for v in spots.values()], fontsize=8):
        ax.text(0.01, 0.99, "some labels left out where they would overlap", transform=ax.transAxes, va="top",
                fontsize=7, color="0.35")


def _lm_eval_tasks(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) of each lm-eval task the rows carry: its first metric ("acc" when there is one)."""
    first = (summary["baseline"].get("lm_eval") or {})
    out = []
    for task, metrics in first.items():
        names = [m for m in metrics if m not in ("n_samples", "num_fewshot")]
        if names:
            out.append((task, "acc" if "acc" in names else names[0]))
    return out


def _lm_eval_panel(ax: Any, summary: dict[str, Any], tasks: list[tuple[str, str]]) -> None:
    rows = summary["layers"]
    x = _positions(rows)
    for i, (task, metric) in enumerate(tasks):
        values = [((r.get("lm_eval") or {}).get(task) or {}).get(metric) for r in rows]
        line = ax.plot(x, [np.nan if v is None else v for v in values], marker="o", label=f"{task} {metric}",
                       color=f"C{i}")
        base = summary["baseline"]["lm_eval"][task].get(metric)
        if base is not None:
            ax.axhline(base, color=line[0].get_color(), lw=0.8, ls="--")
    ax.set_ylabel("lm-eval score (dashed: baseline)")
    ax.set_title("lm-eval per bypassed block", fontsize=10)
    ax.legend(fontsize=7)
    _block_axis(ax, rows)
