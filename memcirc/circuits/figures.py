"""The circuit figures (`memcirc.plots` style):

- `faithfulness_curve_figure` (find_circuits, faithfulness_curve.png): F against k on the discovery pairs;
- `circuit_graph_figure` (find_circuits, circuit.png): the minimal circuit's edges, nodes by layer;
- `faithfulness_vs_edges_figure` (verify_circuit, faithfulness_vs_edges.png): held-out F against k per
  ablation, over random circuits of the same size.

Each takes what its stage has in memory or writes (`MinimalCircuit`, circuit.json rows, summary rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from memcirc.circuits.search import MinimalCircuit
from memcirc.plots import edge_count_axis, save_figure, subplots

MAX_DRAWN_EDGES = 300  # a bigger circuit is drawn by its strongest edges (the title says so)
DROP_COLOUR = "#dd8452"
# where an edge enters its destination: a head's query, key or value input, or a residual read (MLP, logits)
INPUT_STYLE = {"Q": ("#c44e52", "-"), "K": ("#55a868", "--"), "V": ("#8172b3", ":"), None: ("#4c72b0", "-")}
INPUT_NAMES = {"Q": "into a head's query (Q)", "K": "into a head's key (K)", "V": "into a head's value (V)",
               None: "into an MLP or the logits"}
ABLATION_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3")


# -- faithfulness_curve.png -------------------------------------------------------------------

def faithfulness_curve_figure(search: MinimalCircuit, n_edges: int, path: Path, title: str,
                              source: str | None = None, intervals: Mapping[int, Sequence[float]] | None = None,
                              level: float = 0.95, verify_folder: str = "verify") -> None:
    """F against k: the log-spaced curve, the bisection probes, the target, the minimal circuit, and the
    steps where F drops as edges are added (drawn thick, their k range shaded). `intervals`: k -> the
    bootstrap interval of F (a band along the curve, an error bar on the minimal circuit). `source`: the footer."""
    fig, ax = subplots(figsize=(8.5, 4.8), constrained_layout=True)
    ks, fs = zip(*search.curve, strict=True)
    intervals = intervals or {}
    if all(k in intervals for k in ks):
        ax.fill_between(ks, [intervals[k][0] for k in ks], [intervals[k][1] for k in ks], color="#4c72b0",
                        alpha=0.18, lw=0, zorder=1, label=f"{level * 100:g}% bootstrap interval over pairs")
    ax.plot(ks, fs, "o-", color="#4c72b0", label="curve (log-spaced k)", zorder=2)
    for step in search.non_monotone_steps:
        lo, hi = step["from_edges"], step["to_edges"]
        # at least a tenth of a decade wide: a drop between neighbouring k is visible on the symlog axis
        ax.axvspan(lo / 1.12, hi * 1.12, color=DROP_COLOUR, alpha=0.3, lw=0, zorder=0)
        ax.plot([lo, hi], [step["from_faithfulness"], step["to_faithfulness"]], color=DROP_COLOUR, lw=4,
                solid_capstyle="round", zorder=3)
    if search.non_monotone_steps:
        ax.add_artist(ax.legend(handles=[Patch(color=DROP_COLOUR, alpha=0.5)], fontsize=8, loc="upper left",
                                labels=[f"F drops as edges are added ({len(search.non_monotone_steps)} steps)"]))
    if search.probes:
        pk, pf = zip(*search.probes, strict=True)
        ax.plot(pk, pf, "x", color="#55a868", ms=7, label="bisection probes", zorder=4)
    by_lower = " (for the interval's lower end)" if search.selected_by == "lower" else ""
    ax.axhline(search.target, color="grey", ls="--", lw=0.8, label=f"target {search.target}{by_lower}")
    minimal_ci = intervals.get(search.minimal_edges)
    if minimal_ci is not None:
        _bars(ax, [search.minimal_edges], [minimal_ci[0]], [minimal_ci[1]], "#c44e52", zorder=5)
    ci = f" [{minimal_ci[0]:.3f}, {minimal_ci[1]:.3f}]" if minimal_ci is not None else ""
    ax.plot([search.minimal_edges], [search.faithfulness], "*", ms=15, color="#c44e52", zorder=5,
            label=f"minimal: {search.minimal_edges} edges, F = {search.faithfulness:.3f}{ci}")
    edge_count_axis(ax, n_edges)
    ax.set_ylabel("faithfulness F (discovery pairs)")
    ax.set_title(f"{title}\nrandom circuits of the same size: {verify_folder}/faithfulness_vs_edges.png",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, source)


# -- circuit.png ------------------------------------------------------------------------------

def _node(name: str) -> tuple[str, str | None]:
    """A destination 'A1.2.Q' is drawn on head node 'A1.2' (the edge's colour and style say Q/K/V)."""
    parts = name.split(".")
    if name.startswith("A") and len(parts) == 3 and parts[2] in INPUT_STYLE:
        return ".".join(parts[:2]), parts[2]
    return name, None


def _block(node: str) -> int | None:
    """The transformer block of 'A1.2' or 'MLP 1'; None for 'Resid Start' / 'Resid End'."""
    if node.startswith("MLP "):
        return int(node[4:])
    if node.startswith("A") and node[1:].split(".")[0].isdigit():
        return int(node[1:].split(".")[0])
    return None


def _layout(edges: Sequence[Mapping[str, Any]]) -> tuple[dict[str, tuple[float, int]], dict[int, str]]:
    """Node positions (one row per auto-circuit graph layer; heads, then the MLP) and a label per row."""
    layer: dict[str, int] = {}
    for e in edges:
        src, dest = _node(e["src"])[0], _node(e["dest"])[0]
        layer[src] = min(layer.get(src, e["src_layer"]), e["src_layer"])
        layer.setdefault(dest, e["dest_layer"])   # a head node sits where its output enters the residual
    rows: dict[int, list[str]] = {}
    for node in sorted(layer, key=lambda n: (layer[n], n.startswith("MLP"), n)):
        rows.setdefault(layer[node], []).append(node)
    pos = {n: ((i + 1) / (len(row) + 1), lay) for lay, row in rows.items() for i, n in enumerate(row)}
    labels = {}
    for lay, row in rows.items():
        kinds = sorted({("attn" if n.startswith("A") else "MLP", b) for n in row if (b := _block(n)) is not None},
                       key=lambda kb: (kb[1], kb[0] == "MLP"))
        blocks = sorted({b for _, b in kinds})
        if not kinds:
            labels[lay] = "embeddings" if "Resid Start" in row else "logits" if "Resid End" in row else ""
        elif len(blocks) == 1:
            labels[lay] = f"block {blocks[0]}\n" + " + ".join(k for k, _ in kinds)
        else:
            labels[lay] = ", ".join(f"{k} {b}" for k, b in kinds)
    return pos, labels


def circuit_graph_figure(edges: Sequence[Mapping[str, Any]], path: Path, title: str,
                         source: str | None = None) -> None:
    """Nodes by layer (bottom: embeddings, top: logits); an edge's width is its |score|, its colour and style
    where it enters (Q, K, V input of a head, or a residual read); a negative score has a flat head."""
    import networkx as nx

    drawn = list(edges[:MAX_DRAWN_EDGES])
    fig, ax = subplots(figsize=(12, 8), constrained_layout=True)
    ax.set_title(title, fontsize=10)
    if not drawn:
        ax.text(0.5, 0.5, "empty circuit: no edge is needed to reach the target", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path, source)
        return
    pos, row_labels = _layout(drawn)
    g = nx.MultiDiGraph()
    g.add_nodes_from(pos)
    top = max(abs(e["score"]) for e in drawn) or 1.0
    node_size = 1900
    for e in reversed(drawn):   # the strongest edges on top
        src, (dest, letter) = _node(e["src"])[0], _node(e["dest"])
        colour, style = INPUT_STYLE[letter]
        width = 0.6 + 5.4 * abs(e["score"]) / top
        rad = {"Q": 0.06, "K": 0.16, "V": 0.26, None: 0.1}[letter]   # a head's Q/K/V edges from one source fan out
        nx.draw_networkx_edges(g, pos, edgelist=[(src, dest)], width=width, edge_color=colour, alpha=0.75,
                               style=style, arrows=True, node_size=node_size,
                               min_target_margin=4 if e["score"] >= 0 else 8,
                               arrowstyle="-|>" if e["score"] >= 0 else "-[,widthB=1.3,lengthB=0.45",
                               arrowsize=10 + 2 * width,
                               connectionstyle=f"arc3,rad={rad}", ax=ax)
    heads = [n for n in pos if _block(n) is not None and not n.startswith("MLP")]
    others = [n for n in pos if n not in heads]
    nx.draw_networkx_nodes(g, pos, nodelist=heads, node_size=node_size, node_color="#f4f4f4",
                           edgecolors="#333333", ax=ax)
    nx.draw_networkx_nodes(g, pos, nodelist=others, node_size=node_size, node_shape="s", node_color="#e4ecf7",
                           edgecolors="#333333", ax=ax)
    nx.draw_networkx_labels(g, pos, labels={n: n.replace("Resid ", "Resid\n") for n in pos}, font_size=10, ax=ax)
    ax.set_yticks(sorted(row_labels), [row_labels[lay] for lay in sorted(row_labels)], fontsize=9)
    ax.tick_params(left=True, labelleft=True, bottom=False, labelbottom=False)
    ax.set_ylabel("auto-circuit graph layer: embeddings, then each block's attention and MLP\n"
                  "(one row when the model runs them in parallel, as GPT-NeoX does), then the logits", fontsize=9)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
    ax.set_xlim(0, 1)
    ax.legend(handles=_circuit_legend(drawn, top), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              title=f"{len(drawn)} edges drawn" + ("" if len(drawn) == len(edges) else
                                                    f" (the strongest of {len(edges)})"), title_fontsize=8)
    save_figure(fig, path, source)


def _circuit_legend(drawn: Sequence[Mapping[str, Any]], top: float) -> list[Any]:
    present = {_node(e["dest"])[1] for e in drawn}
    handles: list[Any] = [Line2D([], [], color=INPUT_STYLE[k][0], ls=INPUT_STYLE[k][1], lw=2, label=INPUT_NAMES[k])
                          for k in ("Q", "K", "V", None) if k in present]
    handles.append(Line2D([], [], color="none", label="width = |EAP-IG score|:"))
    handles += [Line2D([], [], color="0.4", lw=0.6 + 5.4 * f, label=f"  {f * top:.3g}") for f in (1.0, 0.5, 0.1)]
    handles += [Line2D([], [], color="none", label="\u25b6 arrowhead: positive score"),
                Line2D([], [], color="none", label="\u22a3 flat head: negative score")]
    return handles


# -- faithfulness_vs_edges.png ----------------------------------------------------------------

def faithfulness_vs_edges_figure(results: Mapping[str, Mapping[str, Any]], minimal_edges: int, n_edges: int,
                                 path: Path, title: str, source: str | None = None, level: float = 0.95) -> None:
    """One panel per ablation: the circuit's held-out F against k over the random circuits' mean +- sd band
    (hatched, outlined); where the rows hold bootstrap intervals over pairs, the circuit's as a band in
    its colour and the random mean's as error bars. The legend sits below the panels. `source`: the footer."""
    names = list(results)
    fig, axes = subplots(1, max(len(names), 1), figsize=(max(4.6 * len(names) + 0.6, 8), 4.8), sharey=True,
                         squeeze=False, constrained_layout=True)
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=False)):
        colour = ABLATION_COLOURS[i % len(ABLATION_COLOURS)]
        rows: Sequence[Mapping[str, float]] = results[name]["faithfulness_at_edges"]
        ks = [r["edges"] for r in rows]
        lo = [r["random_mean"] - r["random_sd"] for r in rows]
        hi = [r["random_mean"] + r["random_sd"] for r in rows]
        ax.fill_between(ks, lo, hi, facecolor="0.85", edgecolor="0.45", hatch="///", lw=0.6,
                        label="random circuits: mean ± sd")
        ax.plot(ks, [r["random_mean"] for r in rows], color="0.3", lw=1, ls="--", label="random circuits: mean")
        _interval_marks(ax, rows, colour, level)
        ax.plot(ks, [r["faithfulness"] for r in rows], "o-", color=colour, ms=5, label="circuit (top-k edges)")
        ax.axvline(minimal_edges, color="#c44e52", ls=":", lw=1.2, label=f"minimal circuit ({minimal_edges} edges)")
        edge_count_axis(ax, n_edges)
        ax.xaxis.label.set_fontsize(8)
        r = results[name]
        found = " (as discovered)" if i == 0 else ""
        ax.set_title(f"{name} ablation{found}: F = {r['faithfulness_heldout']:.3f}"
                     f"{_bracket(r.get('faithfulness_heldout_ci'))} at {minimal_edges} edges\n"
                     f"random {r['random_faithfulness_mean']:.3f} ± {r['random_faithfulness_sd']:.3f}"
                     f"{_bracket(r.get('random_faithfulness_ci'), ', mean in ')}", fontsize=9)
    axes[0][0].set_ylabel("faithfulness F (held-out pairs)")
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3 if len(names) > 1 else 2, fontsize=8,
               frameon=False)
    save_figure(fig, path, source)


def _interval_marks(ax: Any, rows: Sequence[Mapping[str, Any]], colour: str, level: float) -> None:
    """The circuit's interval as a band, the random mean's as error bars (rows without one: none)."""
    ks = [r["edges"] for r in rows]
    if all(r.get("faithfulness_ci") for r in rows):
        ax.fill_between(ks, [r["faithfulness_ci"][0] for r in rows], [r["faithfulness_ci"][1] for r in rows],
                        color=colour, alpha=0.25, lw=0, label=f"circuit: {level * 100:g}% bootstrap interval")
    marked = [r for r in rows if r.get("random_mean_ci")]
    if marked:
        _bars(ax, [r["edges"] for r in marked], [r["random_mean_ci"][0] for r in marked],
              [r["random_mean_ci"][1] for r in marked], "0.15",
              label=f"random circuits' mean: {level * 100:g}% bootstrap interval")


def _bars(ax: Any, ks: Sequence[float], lo: Sequence[float], hi: Sequence[float], colour: str,
          label: str | None = None, zorder: float = 3) -> None:
    """Interval bars with caps. Not errorbar: a percentile interval need not contain the point estimate,
    and errorbar refuses the negative lengths that gives."""
    ax.vlines(ks, lo, hi, colors=colour, lw=1.1, zorder=zorder, label=label)
    ax.plot([*ks, *ks], [*lo, *hi], "_", color=colour, ms=7, mew=1.1, zorder=zorder)


def _bracket(ci: Sequence[float] | None, prefix: str = " ") -> str:
    return f"{prefix}[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
