"""The house figure style: figures rendered with Agg and written as PNG atomically.

Each stage draws its own figures (in its `memcirc/stages/<stage>.py`, or a library module such as
`memcirc.dynamics.figures`) with `subplots` and writes them with `save_figure`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from memcirc.artifacts import atomic_write_bytes


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
    if source:
        fig.text(0.005, 0.002, source, fontsize=7, color="0.35", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def edge_count_axis(ax: Any, n_edges: int) -> None:
    """The x axis of a faithfulness-against-k plot (find_circuits' and verify_circuit's)."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.2, n_edges * 1.3)
    ax.set_xlabel("edges kept (top-k by |score|; symlog axis, 0 = every edge ablated)")
