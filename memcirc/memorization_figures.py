"""memorization_score's figures. histogram.png: how far greedy decoding reproduces each window, and the
exact-match rate of each group (a dose-response against k for canaries inserted k times).
exposure.png: the exposure of each document's secret, by group.

Drawn from the stage's rows and summary (`memcirc.plots` style).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memcirc.plots import dose_of, family_of, group_colours, group_order, save_figure, subplots, wilson_interval


def score_histogram(rows: Sequence[dict[str, Any]], summary: dict[str, Any], path: Path,
                    source: str | None = None) -> None:
    """Left: the lcp (k-extractable length) of every window, stacked by group. Right: exact match per
    group with 95 % Wilson intervals, against log2 k for canary groups "k=<k>". `source`: the footer."""
    fig, (left, right) = subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_group.setdefault(str(r.get("group", "all")), []).append(r)
    names = group_order(by_group)
    colours = group_colours(names)
    _lcp_panel(left, by_group, names, colours, summary)
    _exact_panel(right, by_group, names, colours, summary)
    save_figure(fig, path, source)


def _lcp_panel(ax: Any, by_group: dict[str, list[dict[str, Any]]], names: list[str], colours: dict[str, Any],
               summary: dict[str, Any]) -> None:
    rows = [r for g in names for r in by_group[g]]
    longest = max((r["suffix_len"] for r in rows), default=summary.get("suffix_len") or 1)
    ax.hist([[r["lcp"] for r in by_group[g]] for g in names] or [[]], bins=[b - 0.5 for b in range(longest + 2)],
            stacked=True, color=[colours[g] for g in names] or None, label=[f"{g} (n={len(by_group[g])})"
                                                                        for g in names] or None, edgecolor="white",
            linewidth=0.3)
    if rows:   # a log axis needs a positive count
        ax.set_yscale("log")
    ax.set_xlabel("lcp: suffix tokens greedy decoding reproduces before the first mistake")
    ax.set_ylabel("windows (log scale; groups stacked)")
    ax.set_title(f"{len(rows)} windows; lcp = {longest} is an exact match", fontsize=10)
    if names:
        ax.legend(fontsize=7, loc="upper center", ncol=2, title="group", title_fontsize=7)


def _exact_panel(ax: Any, by_group: dict[str, list[dict[str, Any]]], names: list[str], colours: dict[str, Any],
                 summary: dict[str, Any]) -> None:
    counts = {g: (sum(bool(r["exact"]) for r in by_group[g]), len(by_group[g])) for g in names}
    doses = [g for g in names if dose_of(g) is not None]
    if len(doses) >= 2:
        _dose_response(ax, doses, counts, colours)
        for g in (g for g in names if dose_of(g) is None):   # e.g. the corpus: a reference band
            hit, n = counts[g]
            lo, hi = wilson_interval(hit, n)
            ax.axhspan(lo, hi, color=colours[g], alpha=0.25, lw=0)
            ax.axhline(hit / n, color=colours[g], ls="--", lw=1,
                       label=f"{g}: {hit}/{n} (band: 95 % CI)")
        if len(doses) < len(names):
            ax.legend(fontsize=8, loc="upper left")
    else:
        _group_bars(ax, names, counts, colours)
    ax.set_ylim(-0.03, 1.1)
    suffix = summary.get("suffix_len")
    prefix = summary.get("prefix_len")
    metric = (f"exact match: greedy {suffix}-token continuation of the {prefix}-token prefix = true suffix"
              if suffix and prefix else "exact match: greedy continuation = true suffix")
    ax.set_ylabel("exact-match rate (95 % Wilson CI)")
    ax.set_title(metric, fontsize=9)


MARKERS = "osD^v"   # one per family of canary groups ("k=8", "template k=8", ...)


def _dose_response(ax: Any, doses: list[str], counts: dict[str, tuple[int, int]], colours: dict[str, Any]) -> None:
    """Exact match against log2 k, one line per family; k = 0 sits one octave left of the smallest
    k > 0, past an axis break."""
    ks = [dose_of(g) or 0 for g in doses]
    positive = [k for k in ks if k > 0]
    zero_at = math.log2(min(positive)) - 1 if positive else 0.0
    x_of = {g: math.log2(k) if k > 0 else zero_at for g, k in zip(doses, ks, strict=True)}
    families = list(dict.fromkeys(family_of(g) or "" for g in doses))
    for f, family in enumerate(families):
        members = [g for g in doses if (family_of(g) or "") == family]
        rates = [counts[g][0] / counts[g][1] for g in members]
        ax.plot([x_of[g] for g in members], rates, color="0.3", lw=1, zorder=1,
                ls="-" if f == 0 else ("--", ":", "-.")[(f - 1) % 3],
                marker=MARKERS[f % len(MARKERS)], ms=0, label=(family or "k=<k>") if len(families) > 1 else None)
        for g, rate in zip(members, rates, strict=True):
            lo, hi = wilson_interval(*counts[g])
            ax.errorbar([x_of[g]], [rate], yerr=[[rate - lo], [hi - rate]], fmt=MARKERS[f % len(MARKERS)], ms=7,
                        color=colours[g], capsize=3, zorder=2)
            ax.annotate(f"{counts[g][0]}/{counts[g][1]}", (x_of[g], hi), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=7)
    ticks = sorted(set(x_of.values()))
    ax.set_xticks(ticks, [str(k) for k in sorted(set(ks))])
    if 0 in ks and positive:   # the gap between k = 0 and k = 1 is not an octave: mark the break
        mid = (zero_at + math.log2(min(positive))) / 2
        ax.text(mid, -0.03, "//", ha="center", va="center", fontsize=10, color="0.3",
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("k: times the canary was inserted into the training data (log2 axis)")


def _group_bars(ax: Any, names: list[str], counts: dict[str, tuple[int, int]], colours: dict[str, Any]) -> None:
    """No k groups to order: one bar per group with its Wilson interval."""
    for i, g in enumerate(names):
        hit, n = counts[g]
        lo, hi = wilson_interval(hit, n)
        ax.bar(i, hit / n, color=colours[g], yerr=[[hit / n - lo], [hi - hit / n]], capsize=3)
        ax.text(i, hi, f"{hit}/{n}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0)
    ax.set_xlabel("group")


def exposure_figure(rows: Sequence[dict[str, Any]], block: dict[str, Any], path: Path,
                    source: str | None = None) -> None:
    """exposure.png: each secret's exposure by group (groups by k), the group mean, the log2|R|
    ceiling and, for sampled estimates, the cap log2(n + 1) (a capped point is a lower bound)."""
    fig, ax = subplots(figsize=(min(16.0, 0.6 * len(block["groups"]) + 5), 4.6), constrained_layout=True)
    names = list(block["groups"])
    colours = group_colours(names)
    for i, g in enumerate(names):
        part = [r for r in rows if ("all" if r["group"] is None else str(r["group"])) == g]
        xs = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(part))]   # a deterministic jitter
        for x, r in zip(xs, part, strict=True):
            ax.plot([x], [r["exposure"]], "^" if r["capped"] else "o", ms=5, color=colours[g], alpha=0.8,
                    mfc="none" if r["capped"] else colours[g])
        ax.plot([i - 0.3, i + 0.3], [block["groups"][g]["mean"]] * 2, color="black", lw=1.5)
        ceiling = max(r["log2_space"] for r in part)
        ax.plot([i - 0.4, i + 0.4], [ceiling] * 2, color="tab:red", lw=1, ls="--")
        caps = {math.log2(r["n_candidates"] + 1) for r in part if not r["exact"]}
        for cap in caps:
            ax.plot([i - 0.4, i + 0.4], [cap] * 2, color="tab:orange", lw=1, ls=":")
    ax.plot([], [], color="black", lw=1.5, label="group mean")
    ax.plot([], [], color="tab:red", lw=1, ls="--", label="log2|R|: the most exposure possible")
    if any(not r["exact"] for r in rows):
        ax.plot([], [], color="tab:orange", lw=1, ls=":", label="cap log2(n + 1) of a sampled estimate")
    if any(r["capped"] for r in rows):
        ax.plot([], [], "^", mfc="none", color="0.3", label="capped: a lower bound")
    ax.set_xticks(range(len(names)), [f"{g}\n(n={block['groups'][g]['n']})" for g in names],
                  rotation=45 if len(names) > 6 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("exposure (bits) = log2|R| - log2 rank")
    ax.set_xlabel("group")
    ax.set_title(f"exposure of {len(rows)} secrets ({block['n_candidates']} candidates each, seed {block['seed']})",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: points fill the axes
    save_figure(fig, path, source)
