"""The run report: `python -m memcirc.report RUN` prints every finished stage's headline and saves
report.json (the headline numbers, taken from each summary.json) and report.md (Markdown tables)."""

import json
import shutil

import pytest

from memcirc import artifacts as art
from memcirc.report import REPORT_JSON, REPORT_MD, main, report
from memcirc.stages.registry import STAGES


def _cv(mean):
    return {"mean": mean, "ci95": [mean - 0.05, min(mean + 0.05, 1.0)], "folds": [mean] * 5}


PREDICT = {   # the keys predict_memorization's summary.json has, with made-up numbers
    "n_sequences": 112, "n_memorized": 40, "prevalence": 0.357, "best_classifier": "logistic_regression",
    "auroc": 0.9, "auroc_ci95": [0.85, 0.95], "pr_auc": 0.8, "pr_auc_ci95": [0.7, 0.9], "f1": 0.75,
    "precision": 0.7, "recall": 0.8, "top_features": ["dup_min", "dup_mean", "zlib_ratio"], "control_rank": 5,
    "n_features": 9, "folds": 5, "decision_threshold": 0.5,
    "classifiers": {"logistic_regression": {
        "cv": {m: _cv(v) for m, v in {"auroc": 0.9, "pr_auc": 0.8, "f1": 0.75, "precision": 0.7,
                                      "recall": 0.8}.items()},
        "group_importance": [{"group": "duplication", "mean": 0.4}]}},
    "baseline": {"source": "testbed step-652", "definition": "exact >= 1.0",
                 "all": {"auroc": 0.8, "pr_auc": 0.7, "precision": 1.0, "recall": 0.6, "f1": 0.61},
                 "cv": {m: _cv(v) for m, v in {"auroc": 0.8, "pr_auc": 0.7, "f1": 0.55, "precision": 0.9,
                                                "recall": 0.6}.items()}},
}


@pytest.fixture
def run(scored, tmp_path):
    """A finished memorization stage (copied from the session's) and a predict folder beside it."""
    out = tmp_path / "run"
    shutil.copytree(scored / "memorization", out / "memorization")
    predict = out / STAGES["predict_memorization"].folder
    predict.mkdir()
    manifest = art.read_json(out / "memorization" / art.MANIFEST)
    art.write_json(predict / art.MANIFEST, {**manifest, "stage": "predict_memorization"})
    art.write_json(predict / art.SUMMARY_JSON, PREDICT)
    return out


def test_the_report_is_printed_and_saved_and_agrees_with_the_summaries(run, capsys):
    assert main([str(run)]) == 0
    printed = capsys.readouterr().out
    assert printed == report(run) + "\n"
    data = json.loads((run / REPORT_JSON).read_text())
    assert data["stages"] == ["memorization_score", "predict_memorization"]
    assert data["model"]["name_or_path"] == "testbed"

    summary = art.read_json(run / "memorization" / art.SUMMARY_JSON)
    mem = data["results"]["memorization_score"]
    assert mem["values"]["n_windows"] == summary["n_windows"] and mem["values"]["exact"] == summary["metrics"]["exact"]
    table = mem["tables"][0]
    assert table["columns"][:3] == ["group", "windows", "exact-match rate"]
    assert "tokens" in next(c for c in table["columns"] if c.startswith("lcp"))   # a count, not a rate
    cols = [c for c in ("exact", "lcp", "tf_accuracy", "token_match", "loose_match") if c in summary["metrics"]]
    assert len(table["columns"]) == 2 + len(cols)
    assert table["rows"] == [[g, s["n"], *(s[c] for c in cols)] for g, s in summary["groups"].items()] + [
        ["all", summary["n_windows"], *(summary["metrics"][c] for c in cols)]]
    assert mem["headline"] in printed

    pred = data["results"]["predict_memorization"]
    assert pred["values"]["f1"] == PREDICT["f1"] and "fold mean" in pred["labels"]["f1"]
    assert pred["values"]["baseline_f1"] == PREDICT["baseline"]["cv"]["f1"]["mean"]   # the same way as the classifier
    assert "fold mean" in pred["labels"]["baseline_f1"] and "pooled" in pred["labels"]["baseline_f1_pooled"]
    assert "baseline (testbed step-652) F1 0.550" in printed and "(fold means" in printed

    md = (run / REPORT_MD).read_text()
    assert md.startswith("# memcirc run report: run\n") and "## predict_memorization (`predict/`)" in md
    assert "| k=32 | 16 | 1.000 | 32.000 |" in md
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 4   # quantities and per group; quantities and cross-validation
    for lines in tables:   # a header, its rule, rows: every row has the header's number of cells
        assert lines[1].startswith("|---") and {ln.count("|") for ln in lines} == {lines[0].count("|")}
    assert md.split("## Headlines as printed\n\n```\n")[1] == printed + "```\n"
    assert not list(run.glob(".*.tmp"))   # written atomically


def test_no_write_prints_only(run, capsys):
    assert main([str(run), "--no-write"]) == 0
    assert capsys.readouterr().out.startswith("memorization (")
    assert not (run / REPORT_MD).exists() and not (run / REPORT_JSON).exists()


def test_a_run_without_its_first_stage_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds no finished memorization stage" in err
    assert not (tmp_path / REPORT_MD).exists()
