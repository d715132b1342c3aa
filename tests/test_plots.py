"""memcirc.plots helpers and the figures of stages 1-4 on edge cases (no group, no break, empty circuit)."""

import math

import numpy as np
import pytest

from memcirc.circuits.figures import circuit_graph_figure, faithfulness_curve_figure, faithfulness_vs_edges_figure
from memcirc.circuits.search import MinimalCircuit
from memcirc.contrastive import Divergence
from memcirc.contrastive_figures import divergence_figure, short_context_warning
from memcirc.data import Window
from memcirc.memorization_figures import score_histogram
from memcirc.plots import figure_source, group_colours, group_order, save_figure, subplots, wilson_interval


def _wilson_closed_form(x, n, z=1.959963984540054):
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("x", "n"), [(0, 16), (12, 16), (16, 16), (3, 1360)])
def test_wilson_interval_matches_the_closed_form(x, n):
    assert wilson_interval(x, n) == pytest.approx(_wilson_closed_form(x, n), abs=1e-9)


def test_wilson_interval_of_no_trials_is_nan():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_groups_sort_by_k_and_keep_their_colour():
    assert group_order(["k=16", "corpus", "k=8", "k=0", "k=32"]) == ["k=0", "k=8", "k=16", "k=32", "corpus"]
    assert group_colours(["k=8", "k=16"])["k=8"] == group_colours(["k=0", "k=8", "corpus"])["k=8"]


def test_save_figure_prints_the_source(tmp_path):
    source = figure_source("EleutherAI/pythia-160m", tmp_path / "runs" / "testbed", "step3000")
    assert source == "model EleutherAI/pythia-160m@step3000 · run testbed"
    fig, _ = subplots()
    save_figure(fig, tmp_path / "f.png", source)
    assert (tmp_path / "f.png").stat().st_size > 0 and source in [t.get_text() for t in fig.texts]


def _divergence(position, resolved=True, group=None):
    window = Window("d@0", np.zeros(8, dtype=np.int64), 4, "s", "d", 0, group)
    return Divergence(window, position, 1.0, 0.1 if resolved else 1.0, [], resolved)


def test_short_context_warning_when_most_break_at_two_tokens_or_fewer():
    assert short_context_warning([_divergence(1), _divergence(2), _divergence(4)]) is not None
    assert short_context_warning([_divergence(1), _divergence(3), _divergence(4, resolved=False)]) is None
    assert short_context_warning([_divergence(4, resolved=False)]) is None


def test_figures_render_edge_cases(tmp_path):
    rows = [{"lcp": i % 3, "suffix_len": 4, "exact": i == 0} for i in range(5)]   # no group column
    score_histogram(rows, {"prefix_len": 4, "suffix_len": 4}, tmp_path / "h1.png", source="s")
    score_histogram([], {"suffix_len": 4}, tmp_path / "h0.png")
    divergence_figure([], tmp_path / "d0.png")
    divergence_figure([_divergence(4, resolved=False, group="k=8")], tmp_path / "d1.png", "memorization", 0.3)
    circuit_graph_figure([], tmp_path / "c0.png", "empty")
    circuit_graph_figure([{"src": "Resid Start", "dest": "A0.1.K", "score": -0.5, "src_layer": 0, "dest_layer": 1}],
                         tmp_path / "c1.png", "one edge")
    search = MinimalCircuit(0, 1.0, 0.85, [(0, 1.0), (10, 1.0)], [], None, [(0, 1.0)], [])
    faithfulness_curve_figure(search, 10, tmp_path / "f.png", "k = 0")
    rows_v = [{"edges": k, "faithfulness": 1.0, "random_mean": 0.5, "random_sd": 0.1} for k in (0, 5, 10)]
    result = {"faithfulness_at_edges": rows_v, "faithfulness_heldout": 1.0, "random_faithfulness_mean": 0.5,
              "random_faithfulness_sd": 0.1}
    faithfulness_vs_edges_figure({"zero": result}, 5, 10, tmp_path / "v.png", "one ablation")
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("*.png")) and len(list(tmp_path.glob("*.png"))) == 8
