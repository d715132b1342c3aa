"""The house figure style: figures rendered with Agg and written as PNG atomically.

Each stage's figures live in a figure module (`memcirc.memorization_figures`, `memcirc.dynamics.figures`,
...) drawn with `subplots` and these shared pieces (group order and colours, Wilson intervals, labels
that avoid each other, the training-step axis), and are written with `save_figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from memcirc.artifacts import atomic_write_bytes
from memcirc.groups import dose_of as dose_of  # re-exported: figures colour and order groups
from memcirc.groups import family_of as family_of
from memcirc.groups import group_order as group_order


def use_agg() -> None:
    """Render with Agg: there is no display on SLURM nodes or CI. Call before the first figure."""
    matplotlib.use("Agg")


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`plt.subplots` on the Agg backend."""
    use_agg()
    return plt.subplots(*args, **kwargs)


def figure_source(model: str, run_dir: str | Path, revision: str | None = None) -> str:
    """What a figure was made from, for its footer: "model EleutherAI/pythia-160m@step3000 · run testbed".
    The run is the run root's folder name (the last part of --output-dir)."""
    name = f"{model}@{revision}" if revision else model
    return f"model {name} · run {Path(run_dir).resolve().name}"


def save_figure(fig: Any, path: Path, source: str | None = None) -> None:
    """Write `fig` as PNG at `path`; `source` (from `figure_source`) is printed in its bottom-left corner
    so a figure copied out of its run still says which model and run it shows."""
    if source:   # below the figure's frame (the tight bbox grows to hold it): it never covers an axis label
        fig.text(0.005, -0.01, source, fontsize=7, color="0.35", ha="left", va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def edge_count_axis(ax: Any, n_edges: int, label: bool = True) -> None:
    """The x axis of a faithfulness-against-k plot (find_circuits' and verify_circuit's): symlog, with the
    graph's total edge count as the last tick (a dotted line there: every edge kept)."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.2, n_edges * 1.3)
    decades = [10 ** i for i in range(int(math.log10(max(n_edges, 1))) + 1) if 10 ** i < n_edges / 2]
    ax.set_xticks([0, *decades, n_edges], ["0", *map(str, decades), f"{n_edges}\n(all)"])
    ax.axvline(n_edges, color="0.6", ls=":", lw=0.8)
    if label:
        ax.set_xlabel(f"edges kept of {n_edges} (top-k by |score|; symlog axis, 0 = every edge ablated)")


# -- groups of windows (canaries inserted k times, the corpus) -----------------------------------

def group_colours(groups: Iterable[str]) -> dict[str, Any]:
    """One colour per group, the same in every figure and run (it does not depend on which groups are
    present): canaries on viridis by log2(k + 1), dark k = 0 to light k >= 32; other groups (e.g. the
    corpus) dark grey, then tab10."""
    ordered = group_order(groups)
    scale = matplotlib.colormaps["viridis"]
    colours = {g: scale(0.9 * min(math.log2(k + 1) / math.log2(33), 1.0)) for g in ordered
               if (k := dose_of(g)) is not None}
    others = [g for g in ordered if dose_of(g) is None]
    palette = ["0.35", *(matplotlib.colormaps["tab10"](i) for i in range(1, 10))]
    colours.update({g: palette[i % len(palette)] for i, g in enumerate(others)})
    return colours


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (scipy); (nan, nan) for n = 0. It stays inside
    [0, 1] and is not degenerate at 0/n or n/n, where the normal interval is."""
    if n == 0:
        return math.nan, math.nan
    from scipy.stats import binomtest  # a second or so to import: only when a figure is drawn

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


# -- labels and axes ---------------------------------------------------------------------------

OFFSETS = ((6, 4), (6, -11), (-6, 4), (-6, -11), (0, 9), (0, -15))   # points; right first, then left, above, below
CHAR_W, LINE_H = 5.2, 9.0                                            # pixel size of an 8 pt character at dpi 100


def label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], *, color: Any = "black",
                 fontsize: float = 8, taken: list[tuple[float, float, float, float]] | None = None) -> int:
    """Annotate (x, y) with text where it fits; `taken` (pixel boxes) is shared across calls so two
    series' labels avoid each other. Returns how many labels were left out."""
    taken = [] if taken is None else taken
    ax.figure.draw_without_rendering()   # settles limits and layout: transData maps points where they are drawn
    scale = fontsize / 8 * ax.figure.dpi / 100
    left_out = 0
    for x, y, text in zip(xs, ys, texts, strict=True):
        px, py = ax.transData.transform((x, y))
        w, h = CHAR_W * scale * len(text), LINE_H * scale
        for dx, dy in OFFSETS:
            ox, oy = px + dx * ax.figure.dpi / 72, py + dy * ax.figure.dpi / 72
            box = (ox - w if dx < 0 else ox - w / 2 if dx == 0 else ox, oy, w, h)
            if not any(_overlap(box, t) for t in taken):
                taken.append(box)
                ha = "right" if dx < 0 else "center" if dx == 0 else "left"
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="bottom",
                            fontsize=fontsize, color=color)
                break
        else:
            left_out += 1
    return left_out


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def footer_room(fig: Any, height: float = 0.035) -> None:
    """Keep a strip at the bottom of a constrained-layout figure free for the model/run footer, so it
    does not print over the x labels."""
    fig.get_layout_engine().set(rect=(0, height, 1, 1 - height))


def step_axis(ax: Any, steps: Sequence[int]) -> None:
    """Training steps: log when they span more than two decades (symlog when step 0 is among them),
    each checkpoint a tick when there are few."""
    positive = [s for s in steps if s > 0]
    if positive and max(positive) / min(positive) > 100:
        if len(positive) < len(steps):
            ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
        else:
            ax.set_xscale("log")
    if len(steps) <= 12:
        ax.set_xticks(list(steps), [str(s) for s in steps], rotation=45 if len(steps) > 6 else 0)
        ax.minorticks_off()
    note = {"log": " (log axis)", "symlog": " (symlog axis: step 0 at the left)"}.get(ax.get_xscale(), "")
    ax.set_xlabel("training step" + note)
