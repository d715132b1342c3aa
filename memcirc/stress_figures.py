"""stress.png (kfac_edit and attention_bypass with --stress): the exact-match rate of the memorized
windows before and after the edit, per prefix perturbation (memcirc.stress). Drawn from the `stress`
block of the stage's summary.json alone (`memcirc.plots` style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from memcirc.plots import save_figure, subplots

BEFORE_COLOR, AFTER_COLOR, OVER = "#8c8c8c", "#4c72b0", "#c44e52"


def stress_line(block: dict[str, Any]) -> str:
    """One line for a stage's printed table: how much of the removal the perturbations leave."""
    measured = [(n, r["after"]["exact"]) for n, r in block["perturbations"].items() if r["after"]["exact"] is not None]
    worst = max(measured, key=lambda item: item[1], default=("original", 0.0))
    return (f"stress ({len(block['perturbations']) - 1} prefix perturbations): removed "
            f"{block['removed_standard']:.3f} of {block['n_windows']} by the standard test, "
            f"{block['removed_under_stress']:.3f} under every perturbation ({block['n_resurfaced']} come back); "
            f"highest exact after: {worst[0]} {worst[1]:.3f}; "
            + ("removal holds" if block["passes"] else "removal FAILS the stress test"))


def stress_figure(stress: dict[str, Any], path: Path, edit: str, source: str | None = None) -> None:
    """Grouped bars per perturbation: exact before (grey) and after (blue; red where above the unperturbed
    windows' exact after, the black tick: the same windows unperturbed), n under each group, skipped
    perturbations (n = 0) greyed. `edit`: the title's description of the edit."""
    rows = stress["perturbations"]
    names = list(rows)
    x = np.arange(len(names), dtype=float)
    fig, ax = subplots(figsize=(max(7.0, 0.62 * len(names) + 2.5), 4.8), constrained_layout=True)
    before = [rows[n]["before"]["exact"] for n in names]
    after = [rows[n]["after"]["exact"] for n in names]
    same = [rows[n].get("unperturbed_after") for n in names]
    ax.bar(x - 0.2, [np.nan if v is None else v for v in before], 0.4, color=BEFORE_COLOR, label="before the edit")
    colors = [OVER if n in stress["exceeds_original"] else AFTER_COLOR for n in names]
    ax.bar(x + 0.2, [np.nan if v is None else v for v in after], 0.4, color=colors)
    for xi, v, u, n in zip(x, after, same, names, strict=True):   # a zero bar is invisible: its value says it
        text, y = ("all skipped", 0.1) if rows[n]["n"] == 0 else (f"{v:.2f}", max(v, u or 0.0) + 0.01)
        ax.annotate(text, (xi + 0.2 if rows[n]["n"] else xi, y), textcoords="offset points", xytext=(0, 2),
                    ha="center", fontsize=7, color="0.35" if rows[n]["n"] == 0 else "black",
                    rotation=90 if rows[n]["n"] == 0 else 0, va="bottom")
    ax.scatter(x + 0.2, [np.nan if v is None else v for v in same], marker="_", s=260, color="black", lw=1.5,
               zorder=3)
    handles = [Patch(color=BEFORE_COLOR, label="before the edit"), Patch(color=AFTER_COLOR, label="after the edit"),
               Patch(color=OVER, label="after, above the unperturbed after"),
               Line2D([], [], color="black", marker="_", ms=14, mew=1.5, ls="",
                      label="unperturbed after, same windows")]
    labels = [f"{n}\nn={rows[n]['n']}" + (f"\n({rows[n]['n_skipped']} skipped)" if rows[n]["n_skipped"] else "")
              for n in names]
    ax.set_xticks(x, labels, fontsize=7)
    for tick, n in zip(ax.get_xticklabels(), names, strict=True):
        if rows[n]["n"] == 0:
            tick.set_color("0.6")
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("exact-match rate (greedy reproduces the suffix)")
    ax.set_xlabel("prefix perturbation (n: windows perturbed; skipped: no room in the document / prefix)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(handles=handles, fontsize=7, loc="upper right", ncols=2)
    n, gone = stress["n_windows"], round(stress["removed_standard"] * stress["n_windows"])
    verdict = "holds" if stress["passes"] else "fails"
    ax.set_title(f"stress test of {edit}: removal {verdict}\n{n} memorized windows: {gone} removed by the standard "
                 f"test (unperturbed prefix),\n{stress['n_resurfaced']} of them reproduced again under some "
                 f"perturbation; {len(stress['exceeds_original'])} perturbation(s) with exact after above the "
                 "unperturbed rate",
                 fontsize=10)
    save_figure(fig, path, source=source)
