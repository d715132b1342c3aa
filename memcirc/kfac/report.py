"""kfac_edit's report: the table it prints and the rho curve it draws (rho_curve.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memcirc.plots import save_figure, subplots


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
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


def rho_curve(summary: dict[str, Any], path: Path, ppl_limit: float) -> None:
    """Exact match and perplexity against rho, one line per formula (`ppl_limit`: the relative rise
    the default saved setting allows, drawn as a line)."""
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = sorted((r for r in summary["results"] if r["formula"] == formula), key=lambda r: r["rho"])
        rhos = [r["rho"] for r in rows]
        left.plot(rhos, [r["exact_after"] for r in rows], marker="o", label=f"{formula} exact")
        left.plot(rhos, [r["loose_after"] for r in rows], marker="x", ls="--", label=f"{formula} loose")
        right.plot(rhos, [r["ppl_after"] for r in rows], marker="o", label=formula)
    left.axhline(summary["before"]["exact"], color="grey", lw=0.8)
    left.axhline(summary["ablated"]["exact"], color="black", lw=0.8, ls=":", label="weights zeroed")
    left.set_xlabel("rho (fraction of importance kept)")
    left.set_ylabel("memorized windows reproduced")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=8)
    left.set_title(f"{summary['n_memorized']} memorized windows")
    right.axhline(summary["before"]["ppl"], color="grey", lw=0.8, label="before")
    right.axhline(summary["before"]["ppl"] * (1 + ppl_limit), color="grey", lw=0.8, ls=":", label=f"+{ppl_limit:.0%}")
    right.axhline(summary["ablated"]["ppl"], color="black", lw=0.8, ls=":", label="weights zeroed")
    right.set_xlabel("rho (fraction of importance kept)")
    right.set_ylabel("held-out perplexity")
    right.legend(fontsize=8)
    save_figure(fig, path)
