"""The figures of stages 5-8 (bypass, K-FAC, dynamics, predict) drawn from small summaries, including
the edge cases a run can produce: one block, block sets, lm-eval rows, one rho, one checkpoint, step 0.
The figure functions read plain dicts: no model is loaded."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import pytest

from memcirc.bypass_figures import run_label, tradeoff_figure
from memcirc.dynamics.figures import circuit_size_figure, memorization_figure, overlap_figure
from memcirc.kfac.report import rho_curve
from memcirc.plots import figure_source, group_colours, label_points, subplots
from memcirc.predict.figures import importance_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE = "model tiny · run test"


def _png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return data


# -- bypass ------------------------------------------------------------------------------------

def _bypass(layers: list[Any], lm_eval: bool = False) -> dict[str, Any]:
    base: dict[str, Any] = {"exact": 1.0, "token_match": 1.0, "loose_match": 1.0, "levenshtein": 0.0, "ppl": 100.0}
    if lm_eval:
        base["lm_eval"] = {"heldout_lastword": {"acc": 0.5, "n_samples": 10}}
    rows = []
    for i, layer in enumerate(layers):
        row: dict[str, Any] = {"layer": layer, "exact": 0.0 if i % 2 == 0 else 0.4, "token_match": 0.1,
                               "loose_match": 0.0, "levenshtein": 0.9, "ppl": 150.0, "ppl_ratio": 1.5}
        if lm_eval:
            row["lm_eval"] = {"heldout_lastword": {"acc": 0.3, "n_samples": 10}}
        rows.append(row)
    return {"mode": "self", "n_windows": 4, "n_ppl_blocks": 2, "baseline": base, "layers": rows}


@pytest.mark.parametrize("layers, lm_eval", [([0], False), ([0, 1, 2, 3], False), ([0, 1, [0, 1], [1, 2, 3]], True)])
def test_bypass_figure_renders(tmp_path: Path, layers: list[Any], lm_eval: bool) -> None:
    # blocks 0 and 2 share a spot (exact 0.0, ppl 150): one label "0 & 2", not two on top of each other
    tradeoff_figure(_bypass(layers, lm_eval), tmp_path / "t.png", source=SOURCE)
    _png(tmp_path / "t.png")


def test_layer_sets_are_labelled_as_sets() -> None:
    assert run_label(3) == "3"
    assert run_label([0, 1]) == "{0,1}"


# -- kfac --------------------------------------------------------------------------------------

def _kfac(rhos: list[float], formulas: tuple[str, ...] = ("original", "modified")) -> dict[str, Any]:
    results = [{"formula": f, "rho": r, "exact_after": r / 2, "loose_after": r / 1.5, "ppl_before": 100.0,
                "ppl_after": 100.0 + 30 * (1 - r)} for f in formulas for r in rhos]
    saved = {**results[0], "rho": results[0]["rho"]}
    return {"model": "tiny", "n_memorized": 4, "layers": [1], "projections": ["mlp_in"], "n_ppl_blocks": 2,
            "ppl_block_len": 16, "results": results, "before": {"exact": 1.0, "ppl": 100.0},
            "ablated": {"exact": 0.25, "ppl": 125.0}, "saved": saved}


@pytest.mark.parametrize("rhos, formulas", [([0.9], ("original",)), ([0.3, 0.6, 0.9], ("original", "modified"))])
def test_rho_curve_renders(tmp_path: Path, rhos: list[float], formulas: tuple[str, ...]) -> None:
    rho_curve(_kfac(rhos, formulas), tmp_path / "rho.png", 0.2, source=SOURCE)
    _png(tmp_path / "rho.png")


def test_figures_are_reproducible(tmp_path: Path) -> None:
    """Two draws of one summary give the same bytes (the review checked the PNGs' md5 across runs)."""
    for name in ("a.png", "b.png"):
        rho_curve(_kfac([0.3, 0.6, 0.9]), tmp_path / name, 0.2, source=SOURCE)
    assert _png(tmp_path / "a.png") == _png(tmp_path / "b.png")


# -- dynamics ----------------------------------------------------------------------------------

GROUPS = ("k=0", "k=1", "k=8", "corpus")


def _dynamics(steps: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    n = len(steps)
    cps = [{"memorization": {g: (i / max(n - 1, 1) if g == "k=8" else 0.0) for g in GROUPS},
            "memorized_fraction": 0.1 * i, "circuit_edges": 3 + i, "edges_total": 40,
            "faithfulness_discovery": 10.3 if i == 0 else 0.9, "faithfulness_heldout": -2.0 if i == 0 else 0.8,
            "ill_conditioned": i == 0, "heldout_ill_conditioned": i == 0, "jaccard_final": 0.5,
            "jaccard_previous": None if i == 0 else 0.6, "weighted_final": 0.7,
            "weighted_previous": None if i == 0 else 0.8} for i in range(n)]
    summary = {"steps": steps, "checkpoints": cps, "n_windows": 64, "memorized_by": "exact", "threshold": 1.0,
               "onset_by_group": {g: (steps[-1] if g == "k=8" else None) for g in GROUPS},
               "onset_detail_by_group": {g: {"n": 16} for g in GROUPS}, "target": 0.85,
               "pairs": {"discovery": 4, "heldout": 2}}
    m = [[1.0 if i == j else 0.5 for j in range(n)] for i in range(n)]
    return summary, {"steps": steps, "jaccard": m, "weighted_jaccard": m}


@pytest.mark.parametrize("steps", [[100], [0, 10, 1000, 143000], [1, 2, 4, 8]])
def test_dynamics_figures_render(tmp_path: Path, steps: list[int]) -> None:
    summary, overlap = _dynamics(steps)
    memorization_figure(summary, tmp_path / "m.png", source=SOURCE)
    circuit_size_figure(summary, tmp_path / "c.png", source=SOURCE)
    overlap_figure(overlap, tmp_path / "o.png", source=SOURCE)
    for name in ("m.png", "c.png", "o.png"):
        _png(tmp_path / name)


def test_k_colours_are_ordinal() -> None:
    """k=2 < k=16 < k=128 by the number, not the string, on one viridis scale that does not depend on
    which groups are present; groups without a k are grey."""
    colors = group_colours(["k=16", "k=2", "corpus", "k=128"])
    viridis = matplotlib.colormaps["viridis"]
    assert [colors[g] for g in ("k=2", "k=16", "k=128")] == [
        viridis(0.9 * min(math.log2(k + 1) / math.log2(33), 1.0)) for k in (2, 16, 128)]
    assert colors["k=16"] == group_colours(["k=16"])["k=16"]
    assert colors["corpus"] == "0.35"


# -- predict -----------------------------------------------------------------------------------

def test_importance_figure_renders(tmp_path: Path) -> None:
    rows = [{"feature": f, "mean": m, "sd": 0.01} for f, m in (("dup_min", 0.03), ("logprob_min", 0.001))]
    groups = [{"group": "duplication", "mean": 0.9, "sd": 0.02}, {"group": "surprisal", "mean": 0.0, "sd": 0.01}]
    clf = {"importance": rows, "group_importance": groups}
    summary = {"classifiers": {"logistic_regression": clf}, "best_classifier": "logistic_regression",
               "feature_groups": {"dup_min": "duplication", "logprob_min": "surprisal"}}
    importance_figure(summary, tmp_path / "i.png", source=SOURCE)
    _png(tmp_path / "i.png")


# -- helpers -----------------------------------------------------------------------------------

def test_labels_on_one_spot_do_not_overlap() -> None:
    """Three labels at one point: each placed label's box is clear of the others (or left out)."""
    fig, ax = subplots()
    ax.plot([0, 1], [0, 1])
    taken: list[tuple[float, float, float, float]] = []
    left_out = label_points(ax, [0.5] * 3, [0.5] * 3, ["aa", "bb", "cc"], taken=taken)
    assert left_out == 0 and len(taken) == 3
    for i, a in enumerate(taken):
        for b in taken[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3])


def test_figure_source_names_model_and_run(tmp_path: Path) -> None:
    assert figure_source("EleutherAI/pythia-70m", tmp_path / "testbed", "step3000") == \
        "model EleutherAI/pythia-70m@step3000 · run testbed"

