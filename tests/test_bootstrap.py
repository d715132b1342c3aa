"""Bootstrap intervals over pairs (memcirc.bootstrap) and the faithfulness intervals of find_circuits and
verify_circuit.

Library: the vectorized intervals equal a plain loop over the same resamples computing the statistic
the obvious way; the draws are seeded and a stream of their own; an interval holds the estimate of a
smooth statistic, narrows with more pairs, and is off (resamples = 0) or refused (one pair). Evaluator:
the per-pair metric it now keeps averages to the M it reports. Stages: the intervals are written to
the summaries, the report and the figures, and turning them off changes no other number.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_circuits import FAST, FAST_VERIFY, circuits, neox, random_pairs, verify, write_pairs_stage

from memcirc.bootstrap import (
    PairBootstrap,
    as_interval,
    bootstrap_info,
    bootstrap_rng,
    pair_bootstrap,
    percentile_interval,
)
from memcirc.circuits import FaithfulnessEvaluator, make_batches, top_k
from memcirc.circuits.faithfulness import faithfulness_of_means
from memcirc.circuits.figures import faithfulness_curve_figure, faithfulness_vs_edges_figure
from memcirc.circuits.search import MinimalCircuit
from memcirc.report import NUMBERS
from memcirc.stages.registry import STAGES

__all__ = ["neox"]   # the tiny GPT-NeoX fixture of test_circuits, used here too

LEVEL = 0.9


def _per_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(circuits [3, n], empty [n], full [n]): metric values with a clear full-empty gap."""
    rng = np.random.default_rng(seed)
    empty = rng.normal(-1.0, 1.0, n)
    full = rng.normal(2.0, 1.0, n)
    circuits_pp = empty + np.array([[0.2], [0.6], [0.9]]) * (full - empty) + rng.normal(0, 0.3, (3, n))
    return circuits_pp, empty, full


def _loop_faithfulness(boot: PairBootstrap, circuits_pp, empty, full) -> np.ndarray:
    """The slow obvious way: for each resample, M of each circuit, of empty and of full, then F."""
    out = []
    for idx in boot.indices:
        m_empty, m_full = float(np.mean(empty[idx])), float(np.mean(full[idx]))
        out.append([(float(np.mean(c[idx])) - m_empty) / (m_full - m_empty) for c in circuits_pp])
    lo, hi = np.percentile(np.array(out), [100 * (1 - boot.level) / 2, 100 * (1 + boot.level) / 2], axis=0)
    return np.stack([lo, hi], axis=-1)


def test_faithfulness_interval_equals_a_loop_over_the_resamples():
    circuits_pp, empty, full = _per_pair(37)
    boot = PairBootstrap.draw(37, resamples=300, level=LEVEL, seed=5)
    fast = boot.interval_of_means(faithfulness_of_means, circuits_pp, empty, full)
    assert fast.shape == (3, 2)
    np.testing.assert_allclose(fast, _loop_faithfulness(boot, circuits_pp, empty, full), rtol=1e-10, atol=1e-12)


def test_generic_interval_equals_a_loop_for_a_statistic_that_is_not_a_mean():
    values = np.random.default_rng(1).exponential(1.0, (2, 25))
    boot = PairBootstrap.draw(25, resamples=200, level=LEVEL, seed=2)
    fast = boot.interval(lambda v: np.median(v, axis=-1), values)
    slow = np.percentile([[np.median(row[idx]) for row in values] for idx in boot.indices], [5, 95], axis=0).T
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_random_circuit_mean_interval_is_the_mean_of_their_faithfulness_on_each_resample():
    """verify's random baseline: F of the circuits' averaged per-pair metric = mean of their F, resample by resample."""
    circuits_pp, empty, full = _per_pair(30, seed=3)
    boot = PairBootstrap.draw(30, resamples=250, level=LEVEL, seed=0)
    fast = boot.interval_of_means(faithfulness_of_means, circuits_pp.mean(axis=0), empty, full)
    means = []
    for idx in boot.indices:
        m_empty, m_full = np.mean(empty[idx]), np.mean(full[idx])
        means.append(np.mean([(np.mean(c[idx]) - m_empty) / (m_full - m_empty) for c in circuits_pp]))
    np.testing.assert_allclose(fast, np.percentile(means, [5, 95]), rtol=1e-10)


def test_draws_are_seeded_and_a_stream_of_their_own():
    a, b = PairBootstrap.draw(9, 50, seed=7), PairBootstrap.draw(9, 50, seed=7)
    assert np.array_equal(a.indices, b.indices) and a.indices.shape == (50, 9)
    assert np.array_equal(a.indices, bootstrap_rng(7).integers(0, 9, size=(50, 9)))
    assert not np.array_equal(a.indices, np.random.default_rng(7).integers(0, 9, size=(50, 9)))
    assert not np.array_equal(a.indices, PairBootstrap.draw(9, 50, seed=8).indices)
    assert np.allclose(a.weights.sum(axis=1), 1.0)
    assert np.array_equal(a.weights * 9, [np.bincount(idx, minlength=9) for idx in a.indices])


def test_interval_holds_the_estimate_and_narrows_with_more_pairs():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 2000):
        x = rng.normal(1.0, 1.0, n)
        lo, hi = PairBootstrap.draw(n, 1000, seed=1).interval_of_means(lambda m: m, x)
        assert lo < x.mean() < hi
        widths.append(hi - lo)
    # the width of a mean's interval goes as 1 / sqrt(n): 10x narrower here, within sampling noise
    assert 6 < widths[0] / widths[1] < 16


def test_off_and_degenerate_inputs():
    assert pair_bootstrap(50, 0, 0.95, 0) is None
    assert "off" in bootstrap_info(None, 50, 0, 0.95, 0)["note"]
    assert pair_bootstrap(1, 1000, 0.95, 0) is None
    assert "1 pair(s)" in bootstrap_info(None, 1, 1000, 0.95, 0)["note"]
    with pytest.raises(ValueError, match="at least 2 pairs"):
        PairBootstrap.draw(1)
    with pytest.raises(ValueError, match="at least 1 resample"):
        PairBootstrap.draw(5, resamples=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        PairBootstrap.draw(5, level=1.0)
    with pytest.raises(ValueError, match="drawn for 5"):
        PairBootstrap.draw(5, 10).means(np.zeros(4))
    boot = pair_bootstrap(2, 100, 0.95, 0)
    assert boot is not None and boot.info()["n_pairs"] == 2
    # a resample whose statistic is not finite is left out; with none finite the interval is null
    samples = np.array([1.0, 2.0, np.inf, 3.0, np.nan])
    assert np.allclose(percentile_interval(samples, 0.5), np.percentile([1.0, 2.0, 3.0], [25, 75]))
    assert as_interval(percentile_interval(np.full(4, np.nan), 0.9)) is None
    assert as_interval(np.array([0.1, 0.2])) == [0.1, 0.2]


# -- the evaluator's per-pair metric ----------------------------------------------------------

def test_per_pair_metric_averages_to_m_and_follows_the_pairs(neox):
    _, graph, pairs = neox
    kept = torch.rand(3, graph.n_edges, generator=torch.Generator().manual_seed(0)) < 0.5
    by_batch = {}
    for size in (3, 5):
        ev = FaithfulnessEvaluator(graph, make_batches(pairs, size, "cpu"), "resample", "logit_diff")
        m, per_pair = ev.metrics_per_pair(kept)
        assert per_pair.shape == (3, len(pairs)) and np.array_equal(m, ev.metrics(kept))
        np.testing.assert_allclose(per_pair.mean(axis=1), m, rtol=1e-12)
        np.testing.assert_allclose([ev.full_per_pair.mean(), ev.empty_per_pair.mean()], [ev.m_full, ev.m_empty],
                                   rtol=1e-12)
        f = ev.at_counts(torch.arange(graph.n_edges), [0, 4])
        assert set(ev.per_pair_at) == {0, 4}
        np.testing.assert_allclose(f, ev.faithfulness(top_k(torch.arange(graph.n_edges), [0, 4], graph.n_edges)))
        by_batch[size] = np.sort(per_pair, axis=1)
    # another batching groups the same pairs differently: the same values, each pair once
    np.testing.assert_allclose(by_batch[3], by_batch[5], rtol=1e-5, atol=1e-6)


# -- the stages -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def boot_run(tmp_path_factory, tiny_model_dirs, tiny_loaded):
    """find_circuits + verify_circuit on a tiny GPT-Neo, with 200 resamples at level 0.9."""
    out = tmp_path_factory.mktemp("boot")
    model = str(tiny_model_dirs["gpt_neo"])
    write_pairs_stage(out, random_pairs(24, (6, 9), vocab=300), tiny_loaded["gpt_neo"].identity())
    opts = ["--bootstrap-resamples", "200", "--interval-level", str(LEVEL)]
    assert circuits(["--output-dir", str(out), "--model", model, *FAST, *opts]) == 0
    assert verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY, *opts]) == 0
    return out, model


def _inside(ci, value) -> bool:
    return ci[0] - 1e-9 <= value <= ci[1] + 1e-9


def test_find_circuits_writes_the_discovery_intervals(boot_run):
    out, _ = boot_run
    s = json.loads((out / "circuits" / "summary.json").read_text())
    assert s["bootstrap"]["resamples"] == 200 and s["bootstrap"]["level"] == LEVEL
    assert s["bootstrap"]["n_pairs"] == s["n_pairs"] == 16
    assert len(s["faithfulness_ci"]) == 2 and s["faithfulness_ci"][0] <= s["faithfulness_ci"][1]
    rows = {r["edges"]: r for r in (*s["curve"], *s["bisection"])}
    assert rows[s["minimal_edges"]]["faithfulness_ci"] == s["faithfulness_ci"]
    assert all(len(r["faithfulness_ci"]) == 2 for r in rows.values())
    assert rows[0]["faithfulness_ci"] == [0.0, 0.0] and rows[110]["faithfulness_ci"] == [1.0, 1.0]
    # select_by lower (the default): the circuit's lower end reaches the target, one edge fewer misses it
    k = s["minimal_edges"]
    assert s["selected_by"] == "lower" and s["faithfulness_ci"][0] >= s["target"]
    assert rows[k - 1]["faithfulness_ci"][0] < s["target"]


def test_point_selection_is_the_smaller_circuit_on_the_same_scores(boot_run, tmp_path):
    out, model = boot_run
    other = tmp_path / "point"
    shutil.copytree(out / "contrastive", other / "contrastive")
    opts = ["--bootstrap-resamples", "200", "--interval-level", str(LEVEL), "--select-by", "point"]
    assert circuits(["--output-dir", str(other), "--model", model, *FAST, *opts]) == 0
    lower, point = (json.loads((d / "circuits" / "summary.json").read_text()) for d in (out, other))
    assert point["selected_by"] == "point" and point["faithfulness"] >= point["target"]
    assert point["score_abs_sum"] == lower["score_abs_sum"]   # the same attribution, another criterion
    assert point["minimal_edges"] <= lower["minimal_edges"]
    rows = {r["edges"]: r for r in (*point["curve"], *point["bisection"])}
    assert rows[point["minimal_edges"] - 1]["faithfulness"] < point["target"]


def test_verify_writes_the_heldout_and_random_intervals(boot_run):
    out, _ = boot_run
    v = json.loads((out / "verify" / "summary.json").read_text())
    c = json.loads((out / "circuits" / "summary.json").read_text())
    assert v["discovery_faithfulness_ci"] == c["faithfulness_ci"]
    assert v["bootstrap"]["resamples"] == 200 and v["bootstrap"]["n_pairs"] == v["n_pairs"] == 8
    assert "MEAN" in v["bootstrap"]["random_faithfulness_ci"]
    for name, r in v["ablations"].items():
        assert len(r["faithfulness_heldout_ci"]) == 2 and len(r["random_faithfulness_ci"]) == 2, name
        for row in r["faithfulness_at_edges"]:
            assert len(row["faithfulness_ci"]) == 2 and len(row["random_mean_ci"]) == 2
            if row["edges"] in (0, 110):   # every circuit is the same circuit there
                assert row["random_mean_ci"] == row["faithfulness_ci"] == [float(row["edges"] == 110)] * 2
    primary = v["ablations"][v["ablation"]]
    assert v["faithfulness_heldout_ci"] == primary["faithfulness_heldout_ci"]
    assert v["random_faithfulness_ci"] == primary["random_faithfulness_ci"]
    # the mean of a few random circuits sits inside its interval on this model (smooth, small F)
    assert _inside(v["random_faithfulness_ci"], v["random_faithfulness_mean"])


def test_report_shows_the_intervals(boot_run):
    out, _ = boot_run
    c, v = (json.loads((out / d / "summary.json").read_text()) for d in ("circuits", "verify"))
    (found_rows, _), (held_rows, held_tables) = NUMBERS["find_circuits"](c), NUMBERS["verify_circuit"](v)
    found = {key: (label, value) for key, label, value in found_rows}
    held = {key: (label, value) for key, label, value in held_rows}
    assert found["faithfulness_ci"] == ("faithfulness on discovery pairs: 90% bootstrap interval over pairs",
                                        c["faithfulness_ci"])
    assert held["faithfulness_heldout_ci"][1] == v["faithfulness_heldout_ci"]
    assert held["random_faithfulness_ci"][1] == v["random_faithfulness_ci"]
    assert held_tables[0]["columns"][-2:] == ["faithfulness: 90% bootstrap interval over pairs",
                                              "random mean: 90% bootstrap interval over pairs"]
    assert held_tables[0]["rows"][0][-2:] == [v["faithfulness_heldout_ci"], v["random_faithfulness_ci"]]
    lo, hi = v["faithfulness_heldout_ci"]
    line = STAGES["verify_circuit"].headline(v, out / "verify")
    assert line.startswith(f"held-out: faithfulness {v['faithfulness_heldout']:.3f}; 90% CI [{lo:.3f}, {hi:.3f}];")
    assert "90% CI [" in STAGES["find_circuits"].headline(c, out / "circuits")
    # a summary written before the intervals reports as before
    old = {k: x for k, x in v.items() if not k.endswith("_ci") and k != "bootstrap"}
    old["ablations"] = {a: {k: x for k, x in r.items() if not k.endswith("_ci")} for a, r in v["ablations"].items()}
    rows, tables = NUMBERS["verify_circuit"](old)
    assert not any(key.endswith("_ci") for key, _, _ in rows) and len(tables[0]["columns"]) == 4
    assert " CI " not in STAGES["verify_circuit"].headline(old, out / "verify")


def test_intervals_off_change_no_other_number(boot_run):
    out, model = boot_run
    with_ci = json.loads((out / "verify" / "summary.json").read_text())
    assert verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY, "--bootstrap-resamples", "0",
                   "--force"]) == 0
    without = json.loads((out / "verify" / "summary.json").read_text())
    assert without["faithfulness_heldout_ci"] is None and without["random_faithfulness_ci"] is None
    assert "off" in without["bootstrap"]["note"]
    for key in ("faithfulness_heldout", "random_faithfulness_mean", "random_faithfulness_sd", "random_overlap_mean"):
        assert without[key] == with_ci[key], key
    for name, r in without["ablations"].items():
        assert r["random_faithfulness"] == with_ci["ablations"][name]["random_faithfulness"]   # same random circuits
        assert all(row["faithfulness_ci"] is None for row in r["faithfulness_at_edges"])


def test_figures_draw_intervals_that_miss_the_estimate(tmp_path):
    """A percentile interval need not hold the estimate (a skewed ratio): the figures still draw it."""
    search = MinimalCircuit(5, 0.9, 0.85, [(0, 0.0), (5, 0.9), (10, 1.0)], [], None, [(5, 0.9)], [])
    faithfulness_curve_figure(search, 10, tmp_path / "f.png", "t", intervals={0: [0, 0], 5: [0.92, 1.3],
                                                                              10: [1, 1]})
    rows = [{"edges": k, "faithfulness": f, "faithfulness_ci": [f - 0.1, f + 0.2], "random_mean": 0.2,
             "random_mean_ci": [0.25, 0.4], "random_sd": 0.1} for k, f in ((0, 0.0), (5, 0.9), (10, 1.0))]
    result = {"faithfulness_at_edges": rows, "faithfulness_heldout": 0.9, "faithfulness_heldout_ci": [0.8, 1.1],
              "random_faithfulness_mean": 0.2, "random_faithfulness_sd": 0.1, "random_faithfulness_ci": [0.25, 0.4]}
    faithfulness_vs_edges_figure({"zero": result}, 5, 10, tmp_path / "v.png", "t", level=LEVEL)
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "v.png").stat().st_size > 0
