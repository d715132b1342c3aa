"""Figures of the circuit stages: faithfulness curves and the circuit graph (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcirc.plots import plt, save_figure

if TYPE_CHECKING:
    from memcirc.circuits import EdgeGraph, MinimalCircuit

MAX_DRAWN_EDGES = 300  # a bigger circuit is drawn by its strongest edges (the title says so)
_LETTER_STYLE = {"Q": "-", "K": "--", "V": ":"}


def _symlog_x(ax: Any, n_edges: int) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.2, n_edges * 1.3)
    ax.set_xlabel("edges kept (top-k by |score|; symlog axis, 0 = every edge ablated)")


def faithfulness_curve_figure(search: MinimalCircuit, path: Path, title: str) -> None:
    """F against k: the log-spaced curve, the bisection probes, the target and the minimal circuit."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ks, fs = zip(*search.curve, strict=True)
    ax.plot(ks, fs, "o-", color="#4c72b0", label="curve (log-spaced k)")
    if search.probes:
        pk, pf = zip(*search.probes, strict=True)
        ax.plot(pk, pf, "x", color="#55a868", label="bisection probes")
    ax.axhline(search.target, color="grey", ls="--", lw=0.8, label=f"target {search.target}")
    ax.plot([search.minimal_edges], [search.faithfulness], "*", ms=14, color="#c44e52",
            label=f"minimal: {search.minimal_edges} edges, F = {search.faithfulness:.3f}")
    for step in search.non_monotone_steps:
        ax.axvspan(step["from_edges"], step["to_edges"], color="#dd8452", alpha=0.15, lw=0)
    _symlog_x(ax, ks[-1])
    ax.set_ylabel("faithfulness")
    extra = "" if search.monotone else f"; {len(search.non_monotone_steps)} non-monotone step(s) shaded"
    ax.set_title(title + extra, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def _node(name: str) -> tuple[str, str | None]:
    """A destination 'A1.2.Q' is drawn on head node 'A1.2' (edge style says Q/K/V)."""
    parts = name.split(".")
    if name.startswith("A") and len(parts) == 3 and parts[2] in _LETTER_STYLE:
        return ".".join(parts[:2]), parts[2]
    return name, None


def circuit_figure(edges: Sequence[Mapping[str, Any]], graph: EdgeGraph, path: Path, title: str) -> None:
    """Nodes placed by layer (bottom: embedding, top: logits), edge width by |score|, colour by sign."""
    import networkx as nx

    drawn = list(edges[:MAX_DRAWN_EDGES])
    g = nx.DiGraph()
    layer: dict[str, int] = {}
    for e in drawn:
        src, _ = _node(e["src"])
        dest, letter = _node(e["dest"])
        layer[src] = min(layer.get(src, e["src_layer"]), e["src_layer"])
        # a head node sits at its source layer (where its output enters the residual)
        layer.setdefault(dest, e["dest_layer"])
        g.add_edge(src, dest, score=e["score"], letter=letter)
    fig, ax = plt.subplots(figsize=(10, 7))
    if not drawn:
        ax.text(0.5, 0.5, "empty circuit", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title(title)
        save_figure(fig, path)
        return
    rows: dict[int, list[str]] = {}
    for node in sorted(g.nodes, key=lambda n: (layer[n], n)):
        rows.setdefault(layer[node], []).append(node)
    pos = {n: ((i + 1) / (len(row) + 1), lay) for lay, row in rows.items() for i, n in enumerate(row)}
    top = max(abs(e["score"]) for e in drawn) or 1.0
    for u, v, data in g.edges(data=True):
        width = 0.5 + 4.5 * abs(data["score"]) / top
        colour = "#c44e52" if data["score"] > 0 else "#4c72b0"
        nx.draw_networkx_edges(g, pos, edgelist=[(u, v)], width=width, edge_color=colour, alpha=0.7,
                               style=_LETTER_STYLE.get(data["letter"], "-"), arrows=True, arrowsize=8,
                               connectionstyle="arc3,rad=0.08", ax=ax)
    nx.draw_networkx_nodes(g, pos, node_size=500, node_color="#f0f0f0", edgecolors="#333333", ax=ax)
    nx.draw_networkx_labels(g, pos, font_size=7, ax=ax)
    ax.set_ylabel("layer (auto-circuit graph layer)")
    ax.tick_params(left=True, labelleft=True)
    shown = "" if len(drawn) == len(edges) else f" (strongest {len(drawn)} drawn)"
    ax.set_title(f"{title}{shown}\nred: positive score, blue: negative; into heads: Q solid, K dashed, "
                 "V dotted", fontsize=9)
    save_figure(fig, path)


def faithfulness_vs_edges_figure(curves: Mapping[str, Mapping[str, Any]], minimal_edges: int, n_edges: int,
                                 path: Path, title: str) -> None:
    """Per ablation: the circuit's held-out F against k, with the random circuits' mean +- sd band."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#8172b3"]
    for colour, (name, c) in zip(colours, curves.items(), strict=False):
        ks = c["edges"]
        ax.plot(ks, c["faithfulness"], "o-", color=colour, label=f"circuit, {name} ablation")
        lo = [m - s for m, s in zip(c["random_mean"], c["random_sd"], strict=True)]
        hi = [m + s for m, s in zip(c["random_mean"], c["random_sd"], strict=True)]
        ax.fill_between(ks, lo, hi, color=colour, alpha=0.15, lw=0)
        ax.plot(ks, c["random_mean"], ":", color=colour, lw=1, label=f"random circuits (mean ± sd), {name}")
    ax.axvline(minimal_edges, color="grey", ls="--", lw=0.8, label=f"minimal circuit ({minimal_edges} edges)")
    _symlog_x(ax, n_edges)
    ax.set_ylabel("faithfulness (held-out pairs)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)
