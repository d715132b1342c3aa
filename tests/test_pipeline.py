"""run_pipeline.sh end to end on the testbed: every stage folder complete, the report's numbers are the
stage summaries', and a second run recomputes nothing (manifests and outputs byte-identical).

The default tier runs the four circuit stages (the default pipeline); the `slow` tier all eight."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from memcirc.config import pipeline_stages
from memcirc.manifest import finished_summary
from memcirc.stages.registry import DEFAULT_PIPELINE, STAGES

CONFIG = REPO / "configs" / "testbed.yaml"


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "log.txt"}


def _run_twice(out, stages):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(REPO / "run_pipeline.sh"), "--config", str(CONFIG), "--output-dir", str(out), "--device", "cpu",
           "--to-stage", stages[-1]]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = _snapshot(out)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "stages": stages, "first": first, "second": second, "snapshot": snapshot}


@pytest.fixture(scope="module", params=[pytest.param(tuple(DEFAULT_PIPELINE), id="circuit-stages"),
                                        pytest.param(tuple(pipeline_stages(CONFIG)), id="all-stages",
                                                     marks=pytest.mark.slow)])
def pipeline_run(request, tmp_path_factory):
    return _run_twice(tmp_path_factory.mktemp("pipeline"), request.param)


def test_exactly_the_requested_stages_are_complete(pipeline_run):
    out = pipeline_run["out"]
    for stage in STAGES.values():
        manifest = out / stage.folder / "manifest.json"
        if stage.name in pipeline_run["stages"]:
            assert json.loads(manifest.read_text())["status"] == "complete", stage.name
        else:
            assert not manifest.exists(), stage.name


def _report(stdout):
    return stdout[stdout.rindex("memorization ("):]


def test_report_numbers_are_the_summaries(pipeline_run):
    out, report = pipeline_run["out"], _report(pipeline_run["first"].stdout)
    summaries = {s: finished_summary(out / STAGES[s].folder) for s in pipeline_run["stages"]}
    assert report.strip() == "\n".join(STAGES[s].headline(summaries[s], out / STAGES[s].folder)
                                       for s in pipeline_run["stages"])
    # and the numbers a reader takes from it are the summaries' (not only that a headline is there)
    memorization = summaries["memorization_score"]
    for group, stats in memorization["groups"].items():
        row = next(line.split() for line in report.splitlines() if line.split()[:1] == [group])
        assert int(row[1]) == stats["n"] and float(row[2]) == round(stats["exact"], 3), group
    circuits = summaries["find_circuits"]
    assert (f"circuit: {circuits['minimal_edges']} of {circuits['edges_total']} edges reach faithfulness "
            f"{circuits['faithfulness']:.3f}") in report
    verify = summaries["verify_circuit"]
    assert f"held-out: faithfulness {verify['faithfulness_heldout']:.3f};" in report
    contrastive = summaries["contrastive_dataset"]
    assert f"{contrastive['n_pairs']} pairs ({contrastive['n_discovery']} discovery" in report
    if "kfac_edit" in summaries:
        first = summaries["kfac_edit"]["results"][0]
        assert f"rho exact/ppl {first['rho']}: {first['exact_after']:.2f}/{first['ppl_after']:.1f}" in report


def test_second_run_recomputes_nothing(pipeline_run):
    assert _snapshot(pipeline_run["out"]) == pipeline_run["snapshot"]
    # each stage's log says it found its complete run (one no-op line per stage)
    stderr = pipeline_run["second"].stderr
    for stage in pipeline_run["stages"]:
        folder = pipeline_run["out"] / STAGES[stage].folder
        assert f"{folder} is complete for this config" in stderr, stage
