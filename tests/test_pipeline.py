"""run_pipeline.sh end to end on the testbed: every stage folder complete, the report's numbers are the
stage summaries', and a second run recomputes nothing (manifests and outputs byte-identical).

The default tier runs the four circuit stages (the default pipeline); the `slow` tier all eight."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from memcirc.config import pipeline_stages
from memcirc.errors import InputError
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
        # group names may hold a space ("template k=8"): the row is the group, then n and exact
        row = next(line[len(group):].split() for line in report.splitlines() if line.startswith(group + " "))
        assert int(row[0]) == stats["n"] and float(row[1]) == round(stats["exact"], 3), group
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


# -- memcirc pipeline: the stages in one process (memcirc.pipeline) --------------------------------

def test_pipeline_flags_split_into_common_and_per_stage():
    from memcirc import pipeline

    argv = ["--config", "c.yaml", "--device=cpu", "--output-dir", "o", "--limit", "5", "--force",
            "--stage-arg=kfac_edit=--rhos", "--stage-arg", "kfac_edit=0.5 0.6", "--from-stage", "kfac_edit"]
    args, common = pipeline.split_argv(argv)
    assert common == ["--device=cpu", "--limit", "5", "--force"]   # as typed, in order
    assert (args.config, args.output_dir, args.from_stage, args.to_stage) == ("c.yaml", "o", "kfac_edit", None)
    assert pipeline.stage_argv(args.stage_args) == {"kfac_edit": ["--rhos", "0.5 0.6"]}
    with pytest.raises(InputError, match="STAGE=ARG"):
        pipeline.stage_argv(["nostage=--x"])
    assert pipeline.selected_stages(str(CONFIG), "kfac_edit", None) == ["kfac_edit", "training_dynamics",
                                                                         "predict_memorization"]
    with pytest.raises(InputError, match="comes after"):
        pipeline.selected_stages(str(CONFIG), "kfac_edit", "find_circuits")
    with pytest.raises(InputError, match="unknown stage 'x'"):
        pipeline.selected_stages(str(CONFIG), "x", None)


def test_memcirc_pipeline_command_is_listed_and_dry_runs_like_the_stages(tmp_path, capsys):
    from memcirc.__main__ import main as memcirc_command
    from memcirc.cli import main

    assert memcirc_command(["--help"]) == 0 and "  pipeline " in capsys.readouterr().out
    flags = ["--config", str(CONFIG), "--output-dir", str(tmp_path), "--dry-run", "--limit", "3"]
    assert memcirc_command(["pipeline", *flags, "--to-stage", "contrastive_dataset",
                            "--stage-arg=memorization_score=--prefix-len", "--stage-arg=memorization_score=7"]) == 2
    together = capsys.readouterr()   # the report of a dry run finds no finished stage: exit 2, as before
    assert together.err.splitlines()[-1].startswith("error: ") and "holds no finished" in together.err
    expected = []
    for stage, extra in (("memorization_score", ["--prefix-len", "7"]), ("contrastive_dataset", [])):
        assert main(stage, flags + extra) == 0
        expected.append(f"== {stage}\n" + capsys.readouterr().out)
    assert together.out.split("\n", 1)[1] == "".join(expected)
    assert "prefix_len: 7" in expected[0]


def test_a_failing_stage_stops_the_pipeline_with_its_code(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "memcirc", "pipeline", "--config", str(CONFIG), "--output-dir",
                           str(tmp_path), "--from-stage", "contrastive_dataset", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: ") and "memorization" in done.stderr.splitlines()[-1]
    assert "== contrastive_dataset" in done.stdout and "== find_circuits" not in done.stdout
    assert not (tmp_path / "circuits").exists()


def _log_messages(path, run_dir):
    """log.txt without what differs between any two runs: timestamps, timings, the run folder, and the
    progress lines (a loop logs its "done" line only when it ran 5 s or longer)."""
    lines = [line.split(" ", 3)[-1] for line in path.read_text().splitlines() if " memcirc.progress: " not in line]
    return [re.sub(r"\d+(\.\d+)? ?(s|ms|min)\b", "T", line.replace(str(run_dir), "RUN")) for line in lines]


@pytest.mark.slow   # about 2 min alone (three processes' imports); the default tier's fixture runs the same path
def test_one_process_matches_one_process_per_stage(tmp_path):
    """The same outputs (the manifests' digests) and log.txt messages as the stage scripts run apart; and no
    handler is left on the memcirc logger after a stage (nothing leaks into the next one)."""
    import logging

    from memcirc import pipeline

    common = ["--config", str(CONFIG), "--device", "cpu", "--limit", "112"]
    score = ["--metrics", "exact", "token_match"]
    apart, together = tmp_path / "apart" / "run", tmp_path / "together" / "run"   # figures print the name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage, extra in (("memorization_score", score), ("contrastive_dataset", [])):
        done = subprocess.run([sys.executable, str(REPO / STAGES[stage].script), *common, "--output-dir", str(apart),
                               *extra], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    argv = [*common, "--output-dir", str(together), "--to-stage", "contrastive_dataset",
            *[f"--stage-arg=memorization_score={a}" for a in score]]
    assert pipeline.main(argv) == 0
    assert not logging.getLogger("memcirc").handlers
    for stage in ("memorization_score", "contrastive_dataset"):
        folder = STAGES[stage].folder
        manifests = [json.loads((run / folder / "manifest.json").read_text()) for run in (apart, together)]
        assert manifests[0]["outputs"] == manifests[1]["outputs"], stage   # names, sha256 and row counts
        assert ([_log_messages(run / folder / "log.txt", run) for run in (apart, together)]
                == [_log_messages(apart / folder / "log.txt", apart)] * 2), stage
