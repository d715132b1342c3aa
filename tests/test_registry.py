"""The stage registry is the only list of stages: every consumer follows it, and a new stage needs a
registry record and its own module only (the README's "Adding a stage", run here for real)."""

import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import REPO

from memcirc import artifacts as art
from memcirc.cli import main
from memcirc.config import StageConfig, option
from memcirc.data import memorized, read_scores
from memcirc.manifest import StageRun
from memcirc.option_groups import MemorizedRule
from memcirc.report import report
from memcirc.stages import registry
from memcirc.stages.registry import STAGES, Stage


def test_every_stage_has_a_root_script_and_a_module():
    for stage in STAGES.values():
        script = (REPO / stage.script).read_text()
        assert f'main("{stage.name}")' in script, stage.name
        assert stage.config.stage == stage.name
        assert callable(stage.module.run) and callable(stage.module.headline)
        assert all(n in STAGES and list(STAGES).index(n) < list(STAGES).index(stage.name) for n in stage.needs)
        assert (stage.array is None) == (stage.tasks_folder is None)
    assert len({s.folder for s in STAGES.values()}) == len(STAGES)


def test_run_pipeline_takes_its_stage_list_from_the_registry(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pipeline: [verify_circuit, memorization_score, find_circuits]\n")
    listed = subprocess.run([sys.executable, "-m", "memcirc.config", "pipeline", str(config)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["memorization_score", "find_circuits", "verify_circuit"]   # registry order
    config.write_text("pipeline: [no_such_stage]\n")
    bad = subprocess.run([str(REPO / "run_pipeline.sh"), "--config", str(config), "--output-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no_such_stage" in bad.stderr


# -- the README's example stage, added at run time -----------------------------------------------

@dataclass
class MyConfig(MemorizedRule, StageConfig):
    stage: ClassVar[str] = "my_stage"
    top_k: int = option(10, "windows to keep", minimum=1)


def _run(cfg: MyConfig) -> dict:
    assert cfg.upstream_dir is not None
    windows = read_scores(cfg.upstream_dir, cfg.limit)
    keep = memorized(windows, cfg.options(MemorizedRule))
    stage = StageRun.for_config(cfg, [{"path": str(cfg.upstream_dir)}])
    if (done := stage.open(cfg.force)) is not None:
        return done
    stage.start(cfg.force)
    summary = {"n_memorized": sum(keep)}
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    stage.finish({art.SUMMARY_JSON: None})
    return summary


def _headline(summary: dict, _stage_dir: Path) -> str:
    return f"my stage: {summary['n_memorized']} memorized"


@pytest.fixture
def my_stage(monkeypatch):
    module = types.ModuleType("memcirc.stages.my_stage")
    vars(module).update(Config=MyConfig, run=_run, headline=_headline)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.STAGES, "my_stage", Stage("my_stage", "mine", needs=("memorization_score",)))
    return module


def test_a_new_stage_is_one_record_and_its_module(my_stage, scored, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "memorization").parent.mkdir(parents=True)
    (out / "memorization").symlink_to(scored / "memorization")
    config = tmp_path / "c.yaml"
    config.write_text("mine:\n  threshold: 1.0\n  top_k: 3\n")   # its YAML section is its folder
    assert main("my_stage", ["--config", str(config), "--output-dir", str(out)]) == 0
    summary = art.read_json(out / "mine" / art.SUMMARY_JSON)
    expected = sum(r["exact"] >= 1.0 for r in art.read_jsonl(scored / "memorization" / art.SCORES_JSONL))
    assert summary == {"n_memorized": expected} and expected > 0
    assert report(out).splitlines()[-1] == f"my stage: {expected} memorized"
    assert main("my_stage", ["--config", str(config), "--output-dir", str(out)]) == 0   # a no-op now
    assert "is complete for this config" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["find_circuits", "verify_circuit", "training_dynamics"])
def test_the_script_exits_2_with_one_line_on_bad_input(name, tmp_path):
    """Exit-code wiring of the stages whose test files test bad input in-process only."""
    done = subprocess.run([sys.executable, str(REPO / STAGES[name].script), "--output-dir", str(tmp_path),
                           "--target", "1.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'target'" in done.stderr or "unrecognized arguments" in done.stderr
    assert not any(tmp_path.iterdir())
