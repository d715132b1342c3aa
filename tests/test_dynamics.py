"""training_dynamics: checkpoint lists, onset detection, overlap, and the stage on the testbed checkpoints.

The end-to-end tests share one module-scoped run over the 112 testbed canaries and its 5 checkpoints;
its memorization rates are checked against the rates the testbed build measured (ground_truth.json),
its final checkpoint's circuit against find_circuits on the same pairs, and its outputs against the
same units run one at a time (as SLURM array tasks) and merged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, build_tiny_model, build_tiny_tokenizer

from memcirc import artifacts as art
from memcirc.cli import main
from memcirc.dynamics.checkpoints import (
    PYTHIA_STEPS,
    CheckpointList,
    resolve_checkpoint_index,
    resolve_checkpoints,
    schedule_steps,
)
from memcirc.dynamics.onsets import (
    Onset,
    group_onset,
    jaccard,
    memorization_onsets,
    onsets_by_group,
    overlap_matrix,
    weighted_jaccard,
)
from memcirc.dynamics.units import UNIT_DONE, unit_dir
from memcirc.errors import InputError
from memcirc.manifest import read_manifest
from memcirc.stages.training_dynamics import DynamicsConfig, array_tasks
from memcirc.testbed import CHECKPOINTS_DIR, GROUND_TRUTH, MODEL_DIR

CONFIG = str(REPO / "configs" / "testbed.yaml")
UNIT_FILES = ("scores.jsonl", "prune_scores.safetensors", "circuit.json")
STAGE_FILES = ("summary.json", "onsets.jsonl", "overlap.json")


# -- onsets on a hand-made score table ---------------------------------------------------------

def test_onsets_of_a_hand_made_table():
    steps = [10, 20, 30, 40]
    columns = {                      # memorized at each checkpoint -> (onset, first, forgotten)
        "never": ("FFFF", None, None, False),
        "always": ("TTTT", 10, 10, False),
        "last only": ("FFFT", 40, 40, False),
        "from 20": ("FTTT", 20, 20, False),
        "forgotten": ("TTFF", None, 10, True),
        "relearned": ("TFTT", 30, 10, True),
        "flickers": ("FTFT", 40, 20, True),
    }
    table = np.array([[c == "T" for c in pattern] for pattern, *_ in columns.values()]).T  # [ckpt, window]
    got = memorization_onsets(steps, table)
    assert got == [Onset(onset, first, forgotten) for _, onset, first, forgotten in columns.values()]


def test_onsets_agree_with_the_definition_on_random_tables():
    rng = np.random.default_rng(0)
    steps = [0, 1, 2, 4, 8, 16]
    table = rng.random((len(steps), 300)) < 0.6
    for w, o in enumerate(memorization_onsets(steps, table)):
        col = table[:, w].tolist()
        stays = [i for i in range(len(steps)) if all(col[i:])]
        assert o.onset_step == (steps[stays[0]] if stays else None)
        assert o.first_step == (steps[col.index(True)] if any(col) else None)
        assert o.forgotten == any(col[i] and not col[j] for i in range(len(col)) for j in range(i + 1, len(col)))


def test_group_onset_is_the_first_step_with_half_the_group_memorized_for_good():
    assert group_onset([222] * 15 + [333]) == 222
    assert group_onset([222] + [333] * 15) == 333
    assert group_onset([333] * 3 + [444] * 9 + [None] * 4) == 444
    assert group_onset([100] * 8 + [None] * 8) == 100          # exactly half: the 8th of 16
    assert group_onset([100] * 7 + [None] * 9) is None         # fewer than half ever memorized for good
    assert group_onset([None] * 5) is None and group_onset([]) is None
    onsets = [Onset(10, 10, False), Onset(None, 10, True), Onset(20, 20, False), Onset(None, None, False)]
    headline, detail = onsets_by_group(onsets, ["a", "a", "b", "c"], ["c", "b", "a"])
    assert list(headline) == ["c", "b", "a"]
    assert headline == {"c": None, "b": 20, "a": 10}
    assert detail["a"] == {"n": 2, "memorized_at_last": 1, "onset_step": 10, "median_onset_of_memorized": 10.0,
                           "earliest_onset": 10, "latest_onset": 10, "ever_memorized": 2,
                           "earliest_first_step": 10, "forgotten": 1}


# -- overlap on hand-made circuits -------------------------------------------------------------

def test_jaccard_of_hand_made_circuits():
    a, b, empty = {"e1", "e2", "e3"}, {"e2", "e3", "e4"}, set()
    assert jaccard(a, b) == 0.5
    assert jaccard(a, {"e1"}) == pytest.approx(1 / 3)
    assert jaccard(a, empty) == 0.0 and jaccard(empty, empty) == 1.0
    assert jaccard(a, None) is None
    m = overlap_matrix([a, b, None], jaccard)
    assert m == [[1.0, 0.5, None], [0.5, 1.0, None], [None, None, None]]


def test_weighted_jaccard_of_hand_made_scores():
    # |w| normalized: (.75, .25, 0, 0); v: (.25, .25, .25, .25); sum min = .5, sum max = 1.5
    assert weighted_jaccard([3, -1, 0, 0], [1, 1, -1, 1]) == pytest.approx(1 / 3)
    assert weighted_jaccard([2, 0], [0, 5]) == 0.0
    assert weighted_jaccard([1, 2, 3], [-10, 20, -30]) == pytest.approx(1.0)   # scale and sign free
    assert weighted_jaccard([0, 0], [1, 1]) is None and weighted_jaccard(None, [1]) is None
    rng = np.random.default_rng(1)
    w, v = rng.normal(size=50), rng.normal(size=50)
    assert weighted_jaccard(w, v) == pytest.approx(weighted_jaccard(v, w))


# -- checkpoint lists --------------------------------------------------------------------------

def _checkpoints(**values):
    """The checkpoint list of a training_dynamics config with these values."""
    return resolve_checkpoints(DynamicsConfig(**values).options(CheckpointList))


def test_testbed_checkpoints_come_from_ground_truth_without_importing_torch():
    truth = json.loads(GROUND_TRUTH.read_text())["checkpoints"]
    cps = _checkpoints()
    assert [c.step for c in cps] == [t["step"] for t in truth] == [54, 218, 435, 652, 870]
    assert [c.index for c in cps] == list(range(5))
    assert cps[-1].name_or_path == "testbed" and cps[-1].revision is None
    assert [Path(c.name_or_path) for c in cps[:-1]] == [CHECKPOINTS_DIR / f"step-{s}" for s in (54, 218, 435, 652)]
    assert array_tasks(DynamicsConfig()) == 5                 # what memcirc.slurm sizes the job array with
    code = ("import sys; from memcirc.dynamics import CheckpointList, resolve_checkpoints;"
            "opts = CheckpointList('testbed', [], [], None, 1000, 143000, 1000, 8);"
            "n = len(resolve_checkpoints(opts)); print(n, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "False"]


def test_revisions_and_schedules():
    cps = _checkpoints(model="EleutherAI/pythia-160m", checkpoints=["step1000", "step3000"])
    assert [(c.label, c.step, c.name_or_path, c.revision) for c in cps] == [
        ("step1000", 1000, "EleutherAI/pythia-160m", "step1000"),
        ("step3000", 3000, "EleutherAI/pythia-160m", "step3000")]
    cps = _checkpoints(model="EleutherAI/pythia-160m", schedule="log")
    assert [c.revision for c in cps] == [f"step{s}" for s in (1000, 2000, 4000, 8000, 17000, 35000, 70000, 143000)]
    # 500, 1500, 2500 snap to 512, 1000 (a tie: the lower), 2000 (a tie); the end is already there
    assert schedule_steps("linear", 500, 2500, every=1000) == [512, 1000, 2000]
    assert schedule_steps("linear", 0, 3000, every=1000) == [0, 1000, 2000, 3000]
    assert schedule_steps("linear", 0, 3500, every=1000) == [0, 1000, 2000, 3000]   # the end snaps inside the range
    assert schedule_steps("log", 0, 1000, points=4) == [0, 1, 32, 1000]
    tigges = schedule_steps("exp_plus_detail", 0, 143000)
    assert tigges[:11] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and tigges[-3:] == [130000, 140000, 143000]
    assert len(tigges) == 44 and set(tigges) <= set(PYTHIA_STEPS)
    assert schedule_steps("exp_plus_detail", 10000, 30000) == [10000, 11000, 12000, 13000, 14000, 15000, 20000,
                                                                25000, 30000]


def test_local_folders_and_bad_lists(tmp_path):
    for name in ("ckpt-100", "ckpt_250", "final"):
        (tmp_path / name).mkdir()
    folders = [str(tmp_path / n) for n in ("ckpt-100", "ckpt_250")]
    cps = _checkpoints(checkpoints=folders)
    assert [(c.label, c.step, c.revision) for c in cps] == [("ckpt-100", 100, None), ("ckpt_250", 250, None)]
    cps = _checkpoints(checkpoints=[*folders, str(tmp_path / "final")], steps=[1, 2, 3])
    assert [c.step for c in cps] == [1, 2, 3]
    hub = "EleutherAI/pythia-70m"
    bad = {
        "pass --steps": DynamicsConfig(checkpoints=[*folders, str(tmp_path / "final")]),
        "must increase": DynamicsConfig(checkpoints=folders[::-1]),
        "listed twice": DynamicsConfig(model=hub, checkpoints=["step1000", "step1000"], steps=[1, 2]),
        "3 values for 2": DynamicsConfig(checkpoints=folders, steps=[1, 2, 3]),
        "not both": DynamicsConfig(model=hub, checkpoints=["step1000"], schedule="log"),
        "does not exist": DynamicsConfig(checkpoints=[str(tmp_path / "missing")]),
        "revisions apply only to Hub ids": DynamicsConfig(checkpoints=["step1000"]),
        "is local": DynamicsConfig(schedule="linear"),
        "no checkpoints": DynamicsConfig(model=hub),
        "only to an explicit": DynamicsConfig(model=hub, schedule="log", steps=[1]),
        "no Pythia revision": DynamicsConfig(model=hub, schedule="linear", schedule_start=600, schedule_end=900),
    }
    for needle, cfg in bad.items():
        with pytest.raises(InputError, match=needle):
            resolve_checkpoints(cfg.options(CheckpointList))


def test_checkpoint_index_defaults_from_a_slurm_array(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    assert resolve_checkpoint_index(None, 5) is None
    assert resolve_checkpoint_index(4, 5) == 4
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert resolve_checkpoint_index(None, 5) == 2
    assert resolve_checkpoint_index(0, 5) == 0           # an explicit index wins
    with pytest.raises(InputError, match="outside 0..1"):
        resolve_checkpoint_index(None, 2)


# -- bad input: checkpoints that do not belong together ----------------------------------------

def _save_model(folder: Path, tokenizer, **overrides) -> str:
    build_tiny_model("gpt_neox", **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("differ", ["architecture", "tokenizer"])
def test_checkpoints_of_different_models_are_refused(tmp_path, capsys, differ):
    tok = build_tiny_tokenizer()
    first = _save_model(tmp_path / "step-1", tok)
    if differ == "architecture":
        second = _save_model(tmp_path / "step-2", tok, num_hidden_layers=3)
    else:
        other = build_tiny_tokenizer()
        other.add_tokens(["<extra-token>"])
        second = _save_model(tmp_path / "step-2", other)
    out = tmp_path / "run"
    code = main("training_dynamics", ["--output-dir", str(out), "--checkpoints", first, second,
                                               "--no-circuits", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "'step-1' (index 0) and 'step-2' (index 1)" in err[0]
    assert ("n_layers 2 vs 3" if differ == "architecture" else "tokenizer (vocabulary sha256") in err[0]
    assert not out.exists()


# -- the stage on the testbed checkpoints ------------------------------------------------------

def _dynamics(out: Path, scored: Path, *extra: str) -> int:
    return main("training_dynamics", ["--config", CONFIG, "--output-dir", str(out), "--input-dir",
                                               str(scored / "memorization"), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def pairs_run(scored, tmp_path_factory):
    """Contrastive pairs from the 112 scored canaries (made with the final model), in a run folder of its own."""

    out = tmp_path_factory.mktemp("dynamics")
    assert main("contrastive_dataset", ["--config", CONFIG, "--output-dir", str(out), "--input-dir",
                                                     str(scored / "memorization"), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def dynamics_run(pairs_run, scored):
    assert _dynamics(pairs_run, scored) == 0
    return pairs_run / "dynamics"


def _summary(stage: Path) -> dict:
    return json.loads((stage / "summary.json").read_text())


def test_onset_per_k_on_the_testbed(dynamics_run):
    onset = _summary(dynamics_run)["onset_by_group"]
    assert onset == {"k=0": None, "k=1": None, "k=2": None, "k=4": 652, "k=8": 652, "k=16": 435, "k=32": 435}
    rows = list(art.read_jsonl(dynamics_run / "onsets.jsonl"))
    assert len(rows) == 112
    for row in rows:  # every onset is consistent with the per-checkpoint flags it came from
        mem = row["memorized"]
        assert (row["onset_step"] is None) == (not mem[-1])
        assert row["forgotten"] is False or any(mem)


def test_memorization_rates_match_the_testbed_build(dynamics_run):
    """The rates the testbed build measured at each checkpoint (an independent computation)."""
    truth = json.loads(GROUND_TRUTH.read_text())["checkpoints"]
    summary = _summary(dynamics_run)
    assert [c["step"] for c in summary["checkpoints"]] == [t["step"] for t in truth]
    for entry, t in zip(summary["checkpoints"], truth, strict=True):
        for group, rate in entry["memorization"].items():
            assert rate == pytest.approx(t["exact_match"][group]), (entry["step"], group)
    for c in summary["checkpoints"]:
        rows = list(art.read_jsonl(unit_dir(dynamics_run, c["index"]) / "scores.jsonl"))
        assert sum(r["exact"] for r in rows) == c["memorized"]


def test_circuit_metrics_for_every_checkpoint(dynamics_run):
    summary = _summary(dynamics_run)
    for c in summary["checkpoints"]:
        assert 1 <= c["circuit_edges"] <= c["edges_total"] == 463
        assert np.isfinite(c["faithfulness_discovery"]) and np.isfinite(c["faithfulness_heldout"])
        assert c["ill_conditioned"] in (True, False)
        for key in ("jaccard_final", "weighted_final"):
            assert 0.0 <= c[key] <= 1.0
        assert (c["jaccard_previous"] is None) == (c["index"] == 0)
        if not c["ill_conditioned"]:
            assert c["faithfulness_discovery"] >= 0.85
    final = summary["checkpoints"][-1]
    assert final["jaccard_final"] == final["weighted_final"] == 1.0 and not final["ill_conditioned"]
    for name in ("memorization_over_training.png", "circuit_over_training.png", "overlap_heatmap.png"):
        assert (dynamics_run / name).read_bytes()[:4] == b"\x89PNG"
    manifest = read_manifest(dynamics_run)
    assert manifest["stage"] == "training_dynamics" and len(manifest["checkpoints"]) == 5


def test_overlap_matrices_match_the_unit_circuits(dynamics_run):
    overlap = json.loads((dynamics_run / "overlap.json").read_text())
    sets = [{e["edge"] for e in json.loads((unit_dir(dynamics_run, i) / "circuit.json").read_text())["circuit"]}
            for i in range(5)]
    for i in range(5):
        assert overlap["jaccard"][i][i] == 1.0
        for j in range(5):
            assert overlap["jaccard"][i][j] == pytest.approx(len(sets[i] & sets[j]) / len(sets[i] | sets[j]))
            assert overlap["weighted_jaccard"][i][j] == overlap["weighted_jaccard"][j][i]
    summary = _summary(dynamics_run)
    assert [c["jaccard_final"] for c in summary["checkpoints"]] == [row[-1] for row in overlap["jaccard"]]


def test_final_unit_equals_find_circuits(dynamics_run, pairs_run):
    """The final checkpoint's unit and find_circuits on the same model and pairs: same scores, same circuit."""

    assert main("find_circuits", ["--config", CONFIG, "--output-dir", str(pairs_run),
                                               "--device", "cpu"]) == 0
    ours = art.load_tensors(unit_dir(dynamics_run, 4) / "prune_scores.safetensors")
    theirs = art.load_tensors(pairs_run / "circuits" / "prune_scores.safetensors")
    assert set(ours) == set(theirs) and all((ours[k] == theirs[k]).all() for k in ours)
    found = json.loads((pairs_run / "circuits" / "summary.json").read_text())
    final = _summary(dynamics_run)["checkpoints"][-1]
    assert final["circuit_edges"] == found["minimal_edges"]
    assert final["faithfulness_discovery"] == pytest.approx(found["faithfulness"], abs=1e-9)
    assert final["metric_full"] == pytest.approx(found["metric_full"]) and final["model"] == "testbed"


def test_rerun_is_a_no_op(dynamics_run, pairs_run, scored, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dynamics_run.rglob("*") if p.is_file()}
    assert _dynamics(pairs_run, scored) == 0
    assert "nothing to do" in capsys.readouterr().err
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dynamics_run.rglob("*") if p.is_file()}
    assert after == before


def test_units_run_separately_then_merged_are_identical(dynamics_run, pairs_run, scored, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "array"
    pairs = ["--pairs-dir", str(pairs_run / "contrastive")]
    for i in range(4):
        assert _dynamics(out, scored, *pairs, "--checkpoint-index", str(i)) == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "14")    # the last task of --array=10-14
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert _dynamics(out, scored, *pairs) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    stage = out / "dynamics"
    assert not (stage / "summary.json").exists()       # array tasks do not aggregate
    capsys.readouterr()
    assert _dynamics(out, scored, *pairs, "--checkpoint-index", "0", "--ig-steps", "1") == 2   # another config
    assert "checkpoint units [0] in" in capsys.readouterr().err
    # a unit killed before its done marker: merge refuses, naming it; a plain run recomputes only it
    (unit_dir(stage, 3) / UNIT_DONE).unlink()
    (unit_dir(stage, 3) / "circuit.json").unlink()
    capsys.readouterr()
    assert _dynamics(out, scored, *pairs, "--merge") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint units [3] of 5 have not finished" in err[0]
    kept = {i: (unit_dir(stage, i) / UNIT_DONE).stat().st_mtime_ns for i in (0, 1, 2, 4)}
    assert _dynamics(out, scored, *pairs) == 0
    assert {i: (unit_dir(stage, i) / UNIT_DONE).stat().st_mtime_ns for i in (0, 1, 2, 4)} == kept
    for name in STAGE_FILES:
        assert (stage / name).read_bytes() == (dynamics_run / name).read_bytes(), name
    for i in range(5):
        for name in UNIT_FILES:
            assert (unit_dir(stage, i) / name).read_bytes() == (unit_dir(dynamics_run, i) / name).read_bytes()
    # --merge of finished units (here: again, with --force) gives the same bytes
    assert _dynamics(out, scored, *pairs, "--merge", "--force") == 0
    for name in STAGE_FILES:
        assert (stage / name).read_bytes() == (dynamics_run / name).read_bytes(), name


def test_memorization_only_on_listed_folders(scored, tmp_path):
    """--no-circuits needs no pairs; a folder without a step number in its name gets one from --steps."""
    out = tmp_path / "mem-only"
    assert _dynamics(out, scored, "--no-circuits", "--checkpoints", str(CHECKPOINTS_DIR / "step-435"), str(MODEL_DIR),
                     "--steps", "435", "870") == 0
    summary = _summary(out / "dynamics")
    assert summary["circuits"] is False and summary["steps"] == [435, 870]
    assert summary["onset_by_group"]["k=32"] == 435 and summary["onset_by_group"]["k=8"] == 870
    assert not (unit_dir(out / "dynamics", 0) / "prune_scores.safetensors").exists()
    overlap = json.loads((out / "dynamics" / "overlap.json").read_text())
    assert overlap["jaccard"] == [[None, None], [None, None]]
    # another config in the same folder is refused without --force
    assert _dynamics(out, scored, "--no-circuits", "--checkpoints", str(CHECKPOINTS_DIR / "step-435"),
                     str(MODEL_DIR), "--steps", "435", "870", "--threshold", "0.5") == 2


def test_memorized_by_token_match_gives_the_exact_onsets(scored, tmp_path):
    """token_match needs generation; token_match == 1 is exact match by definition, so the onsets agree."""
    common = ["--no-circuits", "--checkpoints", str(CHECKPOINTS_DIR / "step-652"), str(MODEL_DIR), "--steps", "652",
              "870"]
    assert _dynamics(tmp_path / "exact", scored, *common) == 0
    assert _dynamics(tmp_path / "tm", scored, *common, "--memorized-by", "token_match") == 0
    rows = [list(art.read_jsonl(tmp_path / run / "dynamics" / "onsets.jsonl")) for run in ("exact", "tm")]
    assert [r["onset_step"] for r in rows[0]] == [r["onset_step"] for r in rows[1]]
    assert _summary(tmp_path / "tm" / "dynamics")["onset_by_group"]["k=16"] == 652
    scores = list(art.read_jsonl(unit_dir(tmp_path / "tm" / "dynamics", 0) / "scores.jsonl"))
    assert all((r["token_match"] == 1.0) == r["exact"] for r in scores)


_HUB_DOCS = [{"doc": f"d{i}", "tokens": [(7 * i + 3 * j) % 250 + 1 for j in range(16)]} for i in range(6)]


def test_pythia_style_revisions_from_the_hf_cache(tmp_path, tiny_tokenizer):
    """A schedule over Hub revisions, loaded offline from a fake HF cache (fresh processes read HF_HUB_CACHE)."""
    import os

    import torch

    from memcirc.data import Window
    from memcirc.scoring import score_windows

    repo = tmp_path / "hub" / "models--org--tiny-pythia"
    models = {}
    for i, rev in enumerate(("step1000", "step3000")):
        commit = f"{i + 7:040x}"
        models[rev] = (commit, build_tiny_model("gpt_neox", seed=i))
        models[rev][1].save_pretrained(repo / "snapshots" / commit)
        tiny_tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    docs = tmp_path / "docs.jsonl"
    art.write_jsonl(docs, _HUB_DOCS)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--model", "org/tiny-pythia", "--device", "cpu", "--dtype", "float32"]
    for cmd in (["memorization_score.py", *common, "--revision", "step3000", "--dataset", str(docs),
                 "--prefix-len", "8", "--suffix-len", "8"],
                ["training_dynamics.py", *common, "--schedule", "linear", "--schedule-start", "1000",
                 "--schedule-end", "3000", "--schedule-every", "2000", "--no-circuits"]):
        done = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    stage = out / "dynamics"
    assert _summary(stage)["steps"] == [1000, 3000]
    windows = [Window(id=f"{d['doc']}@0", tokens=np.asarray(d["tokens"][:16]), prefix_len=8, source=str(docs),
                      doc=d["doc"], offset=0) for d in _HUB_DOCS]
    for i, (rev, (commit, model)) in enumerate(models.items()):
        marker = json.loads((unit_dir(stage, i) / UNIT_DONE).read_text())
        assert (marker["model"]["revision"], marker["model"]["commit_hash"]) == (rev, commit)
        with torch.no_grad():
            expected = score_windows(model, windows, pad_id=tiny_tokenizer.pad_token_id or 0)
        got = list(art.read_jsonl(unit_dir(stage, i) / "scores.jsonl"))
        assert [r["id"] for r in got] == [w.id for w in windows]
        for g, e in zip(got, expected, strict=True):
            assert (g["lcp"], g["exact"]) == (e["lcp"], e["exact"])
            assert g["tf_accuracy"] == pytest.approx(e["tf_accuracy"]) and g["suffix_nll"] == pytest.approx(
                e["suffix_nll"], abs=1e-5)
