"""kfac_edit's report: the table it prints and the figure it draws (rho_curve.png: memorization and
perplexity against rho, and the memorization-vs-perplexity trade-off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D

from memcirc.plots import label_points, save_figure, subplots, wilson_interval
from memcirc.stress_figures import stress_line


def format_table(summary: dict[str, Any]) -> str:
    """The table kfac_edit prints last: one line per formula x rho, the zeroed weights, the saved setting."""
    lines = [f"{'formula':<9} {'rho':>6} {'exact':>13} {'loose':>13} {'ppl':>17} {'kept':>7}"]
    for r in summary["results"]:
        lines.append(f"{r['formula']:<9} {r['rho']:>6.3f} {r['exact_before']:>6.3f}>{r['exact_after']:<6.3f} "
                     f"{r['loose_before']:>6.3f}>{r['loose_after']:<6.3f} {r['ppl_before']:>8.2f}>"
                     f"{r['ppl_after']:<8.2f} {r['kept_fraction']:>7.3f}")
    a = summary["ablated"]
    lines.append(f"edited weights zeroed: exact {a['exact']:.3f}, loose {a['loose_match']:.3f}, ppl {a['ppl']:.2f}")
    s = summary["saved"]
    where = "saved edited_model" if s.get("edited_model", "edited_model") else "saved setting (deltas only)"
    lines.append(f"{where}: {s['formula']} rho={s['rho']} (exact {s['exact_after']:.3f}, ppl {s['ppl_after']:.2f})")
    if "stress" in summary:
        lines.append(stress_line(summary["stress"]))
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


FORMULA_COLORS = {"original": "#4c72b0", "modified": "#dd8452"}   # one colour per formula, in every panel
BEFORE = {"color": "0.45", "lw": 1.0, "ls": "-"}                    # the unedited model
ZEROED = {"color": "black", "lw": 1.0, "ls": "-."}                  # the edited weights set to zero
BUDGET = "#c44e52"                                                  # the saved setting's ppl budget
SAVED = {"marker": "*", "s": 260, "facecolor": "gold", "edgecolor": "black", "zorder": 5}


def rho_curve(summary: dict[str, Any], path: Path, ppl_limit: float, source: str | None = None) -> None:
    """Three panels, one colour per formula throughout: memorization against rho (exact solid with its
    95 % Wilson band, loose dashed), perplexity against rho, and the trade-off (exact match against the
    perplexity ratio, points labelled by rho: the K-FAC paper's figure). One legend below for all three.
    `ppl_limit`: the relative rise the default saved setting allows; `source`: the footer
    (`memcirc.plots.figure_source`)."""
    fig, (mem, ppl, trade) = subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    by_formula = _by_formula(summary["results"])
    colors = {f: FORMULA_COLORS.get(f, f"C{i + 2}") for i, f in enumerate(by_formula)}
    n = summary["n_memorized"]
    for formula, rows in by_formula.items():
        _rho_lines(mem, ppl, trade, rows, colors[formula], n)
    _mark_saved(summary["saved"], (mem, ppl, trade))
    _references(summary, mem, ppl, trade, ppl_limit)
    for ax in (mem, ppl):
        ax.set_xlabel("rho (fraction of importance kept)")
    for ax in (mem, ppl, trade):
        ax.grid(alpha=0.3)
    mem.set_ylabel("memorized windows reproduced")
    mem.set_ylim(-0.05, 1.05)
    mem.set_title("memorization against rho (band: 95 % Wilson interval of exact)", fontsize=10)
    ppl.set_ylabel("held-out perplexity")
    ppl.set_title(f"perplexity on {summary['n_ppl_blocks']} held-out blocks of {summary['ppl_block_len']} tokens",
                  fontsize=10)
    trade.set_xlabel("held-out perplexity / before the edit")
    trade.set_ylabel("exact match (memorized windows)")
    trade.set_ylim(-0.05, 1.05)
    trade.set_title("trade-off: exact match against perplexity, points labelled by rho", fontsize=10)
    taken: list[tuple[float, float, float, float]] = []
    left_out = sum(label_points(trade, [r["ppl_after"] / r["ppl_before"] for r in rows],
                                [r["exact_after"] for r in rows], [f"{r['rho']:g}" for r in rows],
                                color=colors[f], taken=taken) for f, rows in by_formula.items())
    if left_out:
        trade.text(0.99, 0.99, f"{left_out} rho label(s) left out where they would overlap", transform=trade.transAxes,
                   ha="right", va="top", fontsize=7, color="0.35")
    fig.legend(handles=_legend_handles(colors, ppl_limit, summary["saved"]), loc="outside lower center", ncols=5,
               fontsize=8, frameon=False)
    fig.suptitle(f"K-FAC edit of {summary['model']}: layers {', '.join(map(str, summary['layers']))}, "
                 f"{', '.join(summary['projections'])}; {n} memorized windows (exact == 1)", fontsize=11)
    save_figure(fig, path, source=source)


def _by_formula(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {f: sorted((r for r in results if r["formula"] == f), key=lambda r: r["rho"])
            for f in dict.fromkeys(r["formula"] for r in results)}


def _rho_lines(mem: Any, ppl: Any, trade: Any, rows: list[dict[str, Any]], color: str, n: int) -> None:
    rhos = [r["rho"] for r in rows]
    exact = [r["exact_after"] for r in rows]
    mem.plot(rhos, exact, marker="o", color=color)
    if n:
        lo, hi = zip(*(wilson_interval(round(e * n), n) for e in exact), strict=True)
        mem.fill_between(rhos, lo, hi, color=color, alpha=0.15, lw=0)
    mem.plot(rhos, [r["loose_after"] for r in rows], marker="x", ls="--", color=color)
    ppl.plot(rhos, [r["ppl_after"] for r in rows], marker="o", color=color)
    trade.plot([r["ppl_after"] / r["ppl_before"] for r in rows], exact, marker="o", color=color)


def _mark_saved(s: dict[str, Any], axes: tuple[Any, Any, Any]) -> None:
    mem, ppl, trade = axes
    mem.scatter([s["rho"]], [s["exact_after"]], **SAVED)
    ppl.scatter([s["rho"]], [s["ppl_after"]], **SAVED)
    trade.scatter([s["ppl_after"] / s["ppl_before"]], [s["exact_after"]], **SAVED)


def _references(summary: dict[str, Any], mem: Any, ppl: Any, trade: Any, ppl_limit: float) -> None:
    """Before (grey solid), weights zeroed (black dash-dot), the ppl budget (red dotted, shaded beyond)."""
    before, zeroed = summary["before"], summary["ablated"]
    mem.axhline(before["exact"], **BEFORE)
    mem.axhline(zeroed["exact"], **ZEROED)
    ppl.axhline(before["ppl"], **BEFORE)
    ppl.axhline(zeroed["ppl"], **ZEROED)
    limit = before["ppl"] * (1 + ppl_limit)
    ppl.axhline(limit, color=BUDGET, lw=1.2, ls=":")
    top = max(limit, zeroed["ppl"], *(r["ppl_after"] for r in summary["results"]))
    ppl.axhspan(limit, limit + 1.05 * (top - limit) + 0.02 * limit, color=BUDGET, alpha=0.07, lw=0)
    trade.scatter([1.0], [before["exact"]], marker="o", s=70, color=BEFORE["color"], zorder=4)
    trade.scatter([zeroed["ppl"] / before["ppl"]], [zeroed["exact"]], marker="X", s=90, color="black", zorder=4)
    trade.axvline(1 + ppl_limit, color=BUDGET, lw=1.2, ls=":")
    right = max(1 + ppl_limit, zeroed["ppl"] / before["ppl"], *(r["ppl_after"] / r["ppl_before"]
                                                                 for r in summary["results"]))
    trade.axvspan(1 + ppl_limit, right + 0.05 * (right - 1) + 0.01, color=BUDGET, alpha=0.07, lw=0)


def _legend_handles(colors: dict[str, str], ppl_limit: float, saved: dict[str, Any]) -> list[Any]:
    """The figure's one legend: proxy artists, not the drawn ones (those differ per panel)."""
    handles = [Line2D([], [], color=c, marker="o", label=f"{f} formula") for f, c in colors.items()]
    handles += [Line2D([], [], color="0.2", ls="-", label="exact match"),
                Line2D([], [], color="0.2", ls="--", marker="x", label="loose match"),
                Line2D([], [], marker="*", ms=14, ls="", markerfacecolor="gold", markeredgecolor="black",
                       label=f"saved setting: {saved['formula']} rho={saved['rho']:g}"),
                Line2D([], [], label="before the edit (dot in the trade-off)", **BEFORE),
                Line2D([], [], label="edited weights zeroed (X in the trade-off)", **ZEROED),
                Line2D([], [], color=BUDGET, lw=1.2, ls=":",
                       label=f"ppl budget +{ppl_limit:.0%} (the default saved setting; shaded: over it)")]
    return handles
