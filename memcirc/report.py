"""`python -m memcirc.report RUN_DIR [--no-write]`: the headline numbers of a finished run.

Prints one headline per finished stage, in pipeline order, each written by its stage from its
summary (`headline` in the stage module), and saves the run report next to the stage folders:

  report.json  the model, the stages, and per stage its headline numbers (taken from its
               summary.json) with a label and unit for each, and its tables;
  report.md    the same as Markdown tables, to paste into notes, ending with the printed text.

`--no-write` prints only. Both files are written atomically (memcirc.artifacts).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.manifest import finished_summary, read_manifest
from memcirc.stages.registry import STAGES

SCHEMA_VERSION = 1
REPORT_MD = "report.md"
REPORT_JSON = "report.json"

Numbers = tuple[list[tuple[str, str, Any]], list[dict[str, Any]]]   # (key, label, value) rows, tables


def _finished(run_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(stage, stage folder, summary) of every finished stage, in pipeline order."""
    done = []
    for stage in STAGES.values():
        stage_dir = Path(run_dir) / stage.folder
        summary = finished_summary(stage_dir)
        if summary is None:
            if not stage.needs:   # the first stage: without it there is no run to report
                raise InputError(f"{run_dir} holds no finished {stage.folder} stage")
            continue
        done.append((stage.name, stage_dir, summary))
    return done


def report(run_dir: Path) -> str:
    """The printed report: every finished stage's headline."""
    return "\n".join(STAGES[name].headline(summary, stage_dir) for name, stage_dir, summary in _finished(run_dir))


def report_data(run_dir: Path) -> dict[str, Any]:
    """What report.json holds: the run's model and stages, and each stage's headline numbers."""
    finished = _finished(run_dir)
    model = read_manifest(Path(run_dir) / STAGES[finished[0][0]].folder).get("model") or {}
    stages = {}
    for name, stage_dir, summary in finished:
        rows, tables = NUMBERS[name](summary) if name in NUMBERS else ([], [])
        stages[name] = {"folder": STAGES[name].folder, "headline": STAGES[name].headline(summary, stage_dir),
                        "values": {key: value for key, _, value in rows},
                        "labels": {key: label for key, label, _ in rows}, "tables": tables}
    return {"schema_version": SCHEMA_VERSION, "run_dir": str(Path(run_dir).resolve()),
            "model": {"name_or_path": model.get("name_or_path"), "revision": model.get("revision"),
                      "commit_hash": model.get("commit_hash"), "dtype": model.get("dtype")},
            "stages": list(stages), "results": stages}


# -- markdown --------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or 0.001 <= abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def markdown(data: dict[str, Any]) -> str:
    """report.md: a section per stage (its numbers and tables), then the printed headlines."""
    model = data["model"]
    revision = f"@{model['revision']}" if model.get("revision") else ""
    lines = [f"# memcirc run report: {Path(data['run_dir']).name}", "",
             f"- run: `{data['run_dir']}`", f"- model: `{model['name_or_path']}{revision}` ({model['dtype']})",
             f"- stages: {', '.join(data['stages'])}"]
    for name, stage in data["results"].items():
        lines += ["", f"## {name} (`{stage['folder']}/`)", ""]
        if stage["values"]:
            lines += _table(["quantity", "value"], [[stage["labels"][k], v] for k, v in stage["values"].items()])
        for table in stage["tables"]:
            lines += ["", f"{table['title']}:", "", *_table(table["columns"], table["rows"])]
        if not stage["values"] and not stage["tables"]:
            lines.append(stage["headline"])
    lines += ["", "## Headlines as printed", "", "```",
              *(stage["headline"] for stage in data["results"].values()), "```"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> dict[str, Any]:
    """Write report.json and report.md into the run folder; returns the report.json data."""
    data = report_data(run_dir)
    art.write_json(Path(run_dir) / REPORT_JSON, data)
    art.atomic_write_text(Path(run_dir) / REPORT_MD, markdown(data))
    return data


# -- the headline numbers of each stage, from its summary.json --------------------------------

_METRIC_LABELS = {"exact": "exact-match rate", "lcp": "lcp: mean reproduced suffix tokens",
                  "tf_accuracy": "teacher-forced token accuracy", "token_match": "token-match fraction",
                  "loose_match": "loose-match rate"}


def _memorization(s: dict[str, Any]) -> Numbers:
    cols = [c for c in _METRIC_LABELS if c in s["metrics"]]
    rows = [("n_windows", "windows scored", s["n_windows"]), ("prefix_len", "prefix (tokens)", s["prefix_len"]),
            ("suffix_len", "suffix (tokens)", s["suffix_len"])]
    rows += [(c, f"{_METRIC_LABELS[c]} (all windows)", s["metrics"][c]) for c in cols]
    of_suffix = f" (of {s['suffix_len']})"
    labels = [_METRIC_LABELS[c] + (of_suffix if c == "lcp" else "") for c in cols]
    table = {"title": "per group (mean over the group's windows)", "columns": ["group", "windows", *labels],
             "rows": [[g, st["n"], *(st[c] for c in cols)] for g, st in s["groups"].items()]
             + [["all", s["n_windows"], *(s["metrics"][c] for c in cols)]]}
    return rows, [table]


def _contrastive(s: dict[str, Any]) -> Numbers:
    pos = s.get("divergence_position") or {}
    return [("mode", "mode", s["mode"]), ("n_memorized", "memorized windows", s["n_memorized"]),
            ("n_resolved", "windows whose memorization breaks", s["n_resolved"]),
            ("n_pairs", "pairs", s["n_pairs"]), ("n_discovery", "discovery pairs", s["n_discovery"]),
            ("n_heldout", "held-out pairs", s["n_heldout"]),
            ("divergence_position_mean", "mean divergence position (tokens of context)", pos.get("mean"))], []


def _interval(s: dict[str, Any]) -> str:
    """What a summary's intervals are, for their labels: '95% bootstrap interval over pairs'."""
    b = s.get("bootstrap") or {}
    return f"{b.get('level', 0.95) * 100:g}% bootstrap interval over pairs"


def _circuits(s: dict[str, Any]) -> Numbers:
    rows = [("minimal_edges", "edges in the minimal circuit", s["minimal_edges"]),
            ("edges_total", "edges in the graph", s["edges_total"]),
            ("faithfulness", f"faithfulness on discovery pairs ({s['metric']}, {s['ablation']} ablation)",
             s["faithfulness"])]
    if "faithfulness_ci" in s:   # summaries from before the intervals have none
        rows.append(("faithfulness_ci", f"faithfulness on discovery pairs: {_interval(s)}", s["faithfulness_ci"]))
    target = "faithfulness target" + (" (met by the interval's lower end)" if s.get("selected_by") == "lower" else "")
    return rows + [("target", target, s["target"]), ("n_pairs", "discovery pairs", s["n_pairs"]),
                   ("monotone", "faithfulness monotone in edges", s["monotone"])], []


def _verify(s: dict[str, Any]) -> Numbers:
    ci = _interval(s)
    with_ci = "faithfulness_heldout_ci" in s   # summaries from before the intervals have none
    rows = [("circuit_edges", "edges in the circuit", s["circuit_edges"]),
            ("faithfulness_heldout", f"held-out faithfulness ({s['ablation']} ablation)", s["faithfulness_heldout"])]
    if with_ci:
        rows.append(("faithfulness_heldout_ci", f"held-out faithfulness: {ci}", s["faithfulness_heldout_ci"]))
    rows.append(("random_faithfulness_mean", "random circuits of the same size: mean", s["random_faithfulness_mean"]))
    if with_ci:
        rows.append(("random_faithfulness_ci", f"random circuits of the same size: mean, {ci}",
                     s["random_faithfulness_ci"]))
    rows += [("random_faithfulness_sd", "random circuits of the same size: sd", s["random_faithfulness_sd"]),
             ("n_pairs", "held-out pairs", s["n_pairs"])]
    if with_ci:
        rows += [("discovery_faithfulness", "discovery faithfulness (find_circuits)", s.get("discovery_faithfulness")),
                 ("discovery_faithfulness_ci", f"discovery faithfulness: {ci}", s.get("discovery_faithfulness_ci"))]
    ablations = s.get("ablations", {})
    columns = ["ablation", "faithfulness", "random circuits: mean", "random circuits: sd"]
    table = {"title": "per ablation (held-out pairs)", "columns": columns,
             "rows": [[a, r["faithfulness_heldout"], r["random_faithfulness_mean"], r["random_faithfulness_sd"]]
                      for a, r in ablations.items()]}
    if with_ci:
        table["columns"] = [*columns, f"faithfulness: {ci}", f"random mean: {ci}"]
        for row, r in zip(table["rows"], ablations.values(), strict=True):
            row += [r.get("faithfulness_heldout_ci"), r.get("random_faithfulness_ci")]
    return rows, [table] if table["rows"] else []


def _bypass(s: dict[str, Any]) -> Numbers:
    rows = [("mode", "mode", s["mode"]), ("n_windows", "memorized windows", s["n_windows"]),
            ("baseline_exact", "exact-match rate, nothing bypassed", s["baseline"]["exact"]),
            ("baseline_ppl", "held-out perplexity, nothing bypassed", s["baseline"]["ppl"])]
    table = {"title": "per bypassed block", "columns": ["block", "exact-match rate", "held-out perplexity",
                                                        "perplexity ratio"],
             "rows": [[e["layer"], e["exact"], e["ppl"], e.get("ppl_ratio")] for e in s["layers"]]}
    return rows, [table]


def _kfac(s: dict[str, Any]) -> Numbers:
    saved = s.get("saved") or {}
    rows = [("n_memorized", "memorized windows", s["n_memorized"]),
            ("exact_before", "exact-match rate before the edit", s["before"]["exact"]),
            ("ppl_before", "held-out perplexity before the edit", s["before"]["ppl"]),
            ("saved_formula", "saved setting: formula", saved.get("formula")),
            ("saved_rho", "saved setting: rho (kept importance)", saved.get("rho")),
            ("saved_exact_after", "saved setting: exact-match rate after", saved.get("exact_after")),
            ("saved_ppl_after", "saved setting: held-out perplexity after", saved.get("ppl_after"))]
    table = {"title": "formula x rho (after the edit)",
             "columns": ["formula", "rho", "exact-match rate", "loose-match rate", "held-out perplexity",
                         "kept fraction of weights"],
             "rows": [[r["formula"], r["rho"], r["exact_after"], r["loose_after"], r["ppl_after"], r["kept_fraction"]]
                      for r in s["results"]]}
    return rows, [table]


def _dynamics(s: dict[str, Any]) -> Numbers:
    rows = [("n_checkpoints", "checkpoints", s["n_checkpoints"])]
    tables = [{"title": "memorization onset per group (median step; – never)", "columns": ["group", "onset step"],
               "rows": [[g, v] for g, v in s["onset_by_group"].items()]}]
    if s.get("circuits"):
        tables.append({"title": "the circuit at each checkpoint",
                       "columns": ["step", "edges", "held-out faithfulness", "Jaccard with the final circuit",
                                   "ill-conditioned"],
                       "rows": [[c["step"], c["circuit_edges"], c["faithfulness_heldout"], c["jaccard_final"],
                                 c["ill_conditioned"]] for c in s["checkpoints"]]})
    return rows, tables


def _predict(s: dict[str, Any]) -> Numbers:
    rows = [("n_sequences", "sequences", s["n_sequences"]), ("n_memorized", "memorized", s["n_memorized"]),
            ("best_classifier", "best classifier", s["best_classifier"]),
            ("auroc", "AUROC (fold mean)", s["auroc"]), ("auroc_ci95", "AUROC 95% t-interval", s["auroc_ci95"]),
            ("pr_auc", "PR-AUC (fold mean)", s["pr_auc"]),
            ("pr_auc_ci95", "PR-AUC 95% t-interval", s["pr_auc_ci95"]),
            ("f1", f"F1 at {s.get('decision_threshold', 0.5)} (fold mean)", s["f1"])]
    cvs = [(n, c["cv"]) for n, c in s["classifiers"].items()]
    if s.get("baseline"):
        b = s["baseline"]
        rows += [("baseline_f1", f"baseline ({b['source']}) F1 (fold mean)", b["cv"]["f1"]["mean"]),
                 ("baseline_f1_pooled", f"baseline ({b['source']}) F1 (pooled over all rows)", b["all"]["f1"])]
        cvs.append(("baseline", b["cv"]))
    rows.append(("control_rank", f"rank of the shuffled control feature (of {s['n_features']})", s["control_rank"]))
    table = {"title": f"{s['folds']}-fold cross-validation (fold means)",
             "columns": ["classifier", "AUROC", "PR-AUC", "F1", "precision", "recall"],
             "rows": [[n, *(cv[m]["mean"] for m in ("auroc", "pr_auc", "f1", "precision", "recall"))]
                      for n, cv in cvs]}
    return rows, [table]


NUMBERS: dict[str, Callable[[dict[str, Any]], Numbers]] = {
    "memorization_score": _memorization, "contrastive_dataset": _contrastive, "find_circuits": _circuits,
    "verify_circuit": _verify, "attention_bypass": _bypass, "kfac_edit": _kfac, "training_dynamics": _dynamics,
    "predict_memorization": _predict}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    write = "--no-write" not in args
    args = [a for a in args if a != "--no-write"]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m memcirc.report RUN_DIR [--no-write]", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    try:
        print(report(run_dir))
        if write:
            write_report(run_dir)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # the printed report stands; the files could not be written (full, read-only)
        print(f"error: could not write {REPORT_MD} and {REPORT_JSON} into {run_dir}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
