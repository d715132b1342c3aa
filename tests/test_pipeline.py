"""The orchestrator end to end on the testbed: every stage folder complete, and a second run
recomputes nothing (manifests and outputs byte-identical)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

STAGES = ("memorization", "contrastive", "circuits", "verify", "bypass", "kfac", "dynamics", "predict")  # testbed.yaml


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "log.txt"}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(REPO / "run_pipeline.sh"), "--config", str(REPO / "configs" / "testbed.yaml"),
           "--output-dir", str(out), "--device", "cpu"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = _snapshot(out)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second, snapshot


def test_every_stage_is_complete(pipeline_run):
    out, first, _, _ = pipeline_run
    for stage in STAGES:
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
    report = first.stdout[first.stdout.rindex("memorization ("):].splitlines()
    for headline in ("contrastive (", "circuit:", "held-out: faithfulness", "attention bypass:", "K-FAC edit",
                     "training dynamics (", "circuit over training", "predictor ("):
        assert any(line.startswith(headline) for line in report), headline


def test_second_run_recomputes_nothing(pipeline_run):
    out, _, second, snapshot = pipeline_run
    assert _snapshot(out) == snapshot
    assert second.stderr.count("nothing to do") == len(STAGES), second.stderr[-3000:]
