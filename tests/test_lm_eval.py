"""lm-evaluation-harness benchmarks (memcirc.benchmarks): task checks before the model loads, the shipped
offline task, agreement with our own teacher-forced scoring, and both stages' summaries."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from memcirc import benchmarks, hub
from memcirc.cli import main
from memcirc.data import Window
from memcirc.errors import InputError
from memcirc.lm_eval_tasks import TASKS_DIR
from memcirc.lm_eval_tasks.heldout_lastword import build as lastword_build
from memcirc.lm_eval_tasks.heldout_lastword.data import DATA
from memcirc.option_groups import LmEval
from memcirc.scoring import teacher_forced
from memcirc.testbed import GROUND_TRUTH

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (make install installs it)")

SHIPPED = "heldout_lastword"


def our_lastword(model, tokenizer, texts):
    """(acc, perplexity) of last-word prediction by our own teacher-forced pass, on lm-eval's definitions:
    the context is the text before its last space, the continuation ' ' + the last word, split as lm-eval
    splits a pair (the tokens of context + continuation after those of the context); acc = every
    continuation token is the argmax, perplexity = exp(-mean over items of the continuation's log-likelihood)."""
    windows = []
    for i, text in enumerate(texts):
        context, _, last = text.rpartition(" ")
        ctx, whole = tokenizer(context)["input_ids"], tokenizer(f"{context} {last}")["input_ids"]
        windows.append(Window(id=str(i), tokens=np.asarray(whole, np.int64), prefix_len=len(ctx), source="t",
                              doc=str(i), offset=0))
    scores = [s for b in range(0, len(windows), 16) for s in teacher_forced(model, windows[b:b + 16], pad_id=0)]
    acc = float(np.mean([s.exact for s in scores]))
    return acc, math.exp(float(np.mean([s.suffix_nll * s.window.suffix_len for s in scores])))


def test_shipped_data_is_its_build_output():
    """heldout_lastword.jsonl is what build.py makes from the committed held-out plays."""
    committed = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert committed == lastword_build.build()
    test = [r for r in committed if r["split"] == "test"]
    assert len(test) == 200 and len(committed) == 216
    held = (REPO / "memcirc" / "testbed" / "corpus" / "heldout.txt").read_text()
    held = "\n".join(" ".join(line.split()) for line in held.splitlines())   # as build.py spaces the lines
    for row in committed:   # each passage is the play's text with the last word's punctuation dropped
        assert row["text"].rpartition(" ")[0] in held and row["text"].rpartition(" ")[2].isalpha()


def test_shipped_task_agrees_with_our_teacher_forced_scoring(testbed):
    bench = benchmarks.check_tasks(LmEval(lm_eval_tasks=[SHIPPED]))
    assert bench is not None
    state = torch.get_rng_state()
    result = benchmarks.evaluate(testbed.model, testbed.tokenizer, bench, batch_size=32)[SHIPPED]
    assert torch.equal(torch.get_rng_state(), state)          # lm-eval's seeding is undone
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()]
    texts = [t for t, line in zip(texts, DATA.read_text().splitlines()) if json.loads(line)["split"] == "test"]
    acc, ppl = our_lastword(testbed.model, testbed.tokenizer, texts)
    assert result["n_samples"] == 200 and result["num_fewshot"] == 0
    assert result["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert set(result) == {"acc", "perplexity", "n_samples", "num_fewshot"}


def test_include_path_task_on_memorized_canaries(testbed, tmp_path):
    """A local JSON task (dataset_path: json) from --lm-eval-include-path: the canaries the testbed saw 32
    times end on the right word, the never-seen ones do not; lm-eval and our scoring agree on both. The
    random-word family only: a k = 0 template canary still ends on words of its (trained) template."""
    canaries = json.loads(GROUND_TRUTH.read_text())["canaries"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for k in (0, 32):
        rows = [{"text": " ".join(c["text"].split()[:24])} for c in canaries if c["k"] == k and c["family"] == "random"]
        (tmp_path / f"k{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"canary_k{k}.yaml").write_text(
            f"task: canary_k{k}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/k{k}.jsonl\n"
            f"  cache_dir: {tmp_path}/cache\noutput_type: loglikelihood\ntest_split: test\n"
            "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
            "target_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    bench = benchmarks.check_tasks(LmEval(lm_eval_tasks=["canary_k32", "canary_k0"],
                                          lm_eval_include_path=str(tasks)))
    assert bench is not None
    results = benchmarks.evaluate(testbed.model, testbed.tokenizer, bench, batch_size=8)
    assert results["canary_k32"]["acc"] == 1.0 and results["canary_k0"]["acc"] <= 0.25
    for k in (0, 32):
        texts = [json.loads(line)["text"] for line in (tmp_path / f"k{k}.jsonl").read_text().splitlines()]
        assert results[f"canary_k{k}"]["acc"] == our_lastword(testbed.model, testbed.tokenizer, texts)[0]


def test_limit_and_fewshot(testbed):
    bench = benchmarks.check_tasks(LmEval(lm_eval_tasks=[SHIPPED], lm_eval_limit=5, lm_eval_num_fewshot=2))
    assert bench is not None
    result = benchmarks.evaluate(testbed.model, testbed.tokenizer, bench, batch_size=8)[SHIPPED]
    assert (result["n_samples"], result["num_fewshot"]) == (5, 2)
    assert bench.describe() | {"lm_eval_version": None} == {
        "tasks": [SHIPPED], "limit": 5, "num_fewshot": 2, "include_path": None, "lm_eval_version": None}


def test_tidy_results_is_json_safe():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "perplexity,none": math.inf,
                             "exact_match,strict-match": 0.25, "word_perplexity,none": math.nan}},
           "n-samples": {"t": {"original": 9, "effective": 4}}, "n-shot": {"t": 0}}
    tidy = benchmarks.tidy_results(out)
    assert tidy == {"t": {"acc": 0.5, "perplexity": None, "exact_match,strict-match": 0.25, "word_perplexity": None,
                          "n_samples": 4, "num_fewshot": 0}}
    json.dumps(tidy, allow_nan=False)


# -- refused before the model loads ------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Both stages' model load fails the test: a refusal must come before it."""
    import memcirc.stages.attention_bypass as bypass_stage
    import memcirc.stages.kfac_edit as kfac_stage

    def load(*_a, **_k):
        raise AssertionError("the model was loaded before the lm-eval tasks were checked")

    monkeypatch.setattr(bypass_stage, "load", load)
    monkeypatch.setattr(kfac_stage, "load", load)


@pytest.fixture
def no_builtin_index(monkeypatch):
    """lm-eval's 15k built-in tasks (10-20 s to index) left out: names resolve against our paths only."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    class OurPathsOnly(real):
        def __init__(self, *args, include_defaults=True, **kwargs):
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OurPathsOnly)


def _refused(stage, scored, tmp_path, extra, capsys):
    capsys.readouterr()
    out = tmp_path / "run"
    args = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir", str(scored / "memorization"),
            "--device", "cpu", *extra]
    assert main(stage, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())          # nothing written
    return err


@pytest.mark.parametrize("stage", ["attention_bypass", "kfac_edit"])
def test_not_installed_exits_2_before_loading(stage, scored, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # `import lm_eval` raises ImportError
    err = _refused(stage, scored, tmp_path, ["--lm-eval-tasks", SHIPPED], capsys)
    assert "pip install memcirc[lm-eval]" in err


@pytest.mark.parametrize("stage", ["attention_bypass", "kfac_edit"])
def test_unknown_task_exits_2_naming_it(stage, scored, tmp_path, capsys, no_model_load, no_builtin_index):
    err = _refused(stage, scored, tmp_path, ["--lm-eval-tasks", SHIPPED, "heldout_lastwrd", "no_such_task"], capsys)
    assert "unknown lm-eval task(s): heldout_lastwrd, no_such_task" in err
    assert "did you mean heldout_lastword for heldout_lastwrd?" in err


def test_task_without_local_data_exits_2(scored, tmp_path, capsys, no_model_load, no_builtin_index):
    """A task whose Hub dataset is not cached (tests run offline): one line naming the task, no traceback."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("task: remote_task\ndataset_path: memcirc-test/not-cached-anywhere\n"
                                       "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{text}}'\n"
                                       "doc_to_target: '{{text}}'\n")
    err = _refused("attention_bypass", scored, tmp_path,
                   ["--lm-eval-tasks", "remote_task", "--lm-eval-include-path", str(tasks)], capsys)
    assert "lm-eval task remote_task cannot be loaded" in err and "network" in err


def test_only_a_task_outside_the_shipped_ones_probes_the_hub(tmp_path, monkeypatch, no_builtin_index):
    """The shipped task never asks the network; a Hub task probes once (memcirc.hub goes offline when nothing
    answers), and its offline miss says why."""
    probes = []
    monkeypatch.setattr(hub, "offline_unless_reachable", lambda: probes.append(1) or True)
    assert benchmarks.check_tasks(LmEval(lm_eval_tasks=[SHIPPED])) is not None and probes == []
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("task: remote_task\ndataset_path: memcirc-test/not-cached-anywhere\n"
                                       "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{text}}'\n"
                                       "doc_to_target: '{{text}}'\n")
    with pytest.raises(InputError, match="lm-eval task remote_task cannot be loaded") as err:
        benchmarks.check_tasks(LmEval(lm_eval_tasks=["remote_task"], lm_eval_include_path=str(tasks)))
    assert probes == [1] and "offline mode is on (HF_HUB_OFFLINE=1)" in str(err.value)


def test_bad_include_path_and_limit(scored, tmp_path, capsys, no_model_load):
    err = _refused("kfac_edit", scored, tmp_path,
                   ["--lm-eval-tasks", SHIPPED, "--lm-eval-include-path", str(tmp_path / "nope")], capsys)
    assert "is not a folder" in err
    assert "'lm_eval_limit'" in _refused("kfac_edit", scored, tmp_path, ["--lm-eval-limit", "0"], capsys)
    assert "'lm_eval_num_fewshot'" in _refused("attention_bypass", scored, tmp_path,
                                               ["--lm-eval-num-fewshot", "-1"], capsys)


@pytest.mark.slow
def test_builtin_hub_task_offline_exits_2(scored, tmp_path, capsys, no_model_load):
    """The issue's case: lambada_openai, a built-in task whose data is on the Hub, offline (indexes lm-eval's
    built-in tasks: 10-20 s)."""
    err = _refused("attention_bypass", scored, tmp_path, ["--lm-eval-tasks", "lambada_openai"], capsys)
    assert "lm-eval task lambada_openai cannot be loaded" in err


# -- both stages ---------------------------------------------------------------------------------

def test_bypass_stage_reports_lm_eval_per_run(scored, tmp_path):
    out = tmp_path / "bypass"
    args = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir", str(scored / "memorization"),
            "--device", "cpu", "--limit", "8", "--ppl-blocks", "2", "--layers", "0", "3",
            "--lm-eval-tasks", SHIPPED, "--lm-eval-limit", "40"]
    assert main("attention_bypass", args) == 0
    summary = json.loads((out / "bypass" / "summary.json").read_text())
    assert summary["lm_eval"]["tasks"] == [SHIPPED] and summary["lm_eval"]["limit"] == 40
    base = summary["baseline"]["lm_eval"][SHIPPED]
    assert base["n_samples"] == 40 and 0.0 <= base["acc"] <= 1.0
    per_block = [e["lm_eval"][SHIPPED]["perplexity"] for e in summary["layers"]]
    assert len(per_block) == 2 and all(p != base["perplexity"] for p in per_block)   # the hooks are measured


def test_kfac_stage_reports_lm_eval_before_and_after(scored, tmp_path, testbed):
    out = tmp_path / "kfac"
    args = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir", str(scored / "memorization"),
            "--limit", "4", "--factor-tokens", "300", "--rhos", "0.6", "--formulas", "original", "--ppl-blocks", "2",
            "--device", "cpu", "--no-save-model", "--lm-eval-tasks", SHIPPED, "--lm-eval-limit", "40"]
    assert main("kfac_edit", args) == 0
    stage = out / "kfac"
    summary = json.loads((stage / "summary.json").read_text())
    lm = summary["lm_eval"]
    assert lm["tasks"] == [SHIPPED] and summary["timings"]["lm_eval_s"] > 0
    # two computations: the testbed as loaded, and the testbed plus the saved deltas, scored here
    bench = benchmarks.check_tasks(LmEval(lm_eval_tasks=[SHIPPED], lm_eval_limit=40))
    assert bench is not None
    assert lm["before"] == benchmarks.evaluate(testbed.model, testbed.tokenizer, bench, 32)
    from memcirc.artifacts import load_tensors
    from memcirc.models import ModelSpec, load

    edited = load(ModelSpec("testbed", device="cpu", dtype="float32"))
    with torch.no_grad():
        for name, delta in load_tensors(stage / "deltas.safetensors").items():
            edited.model.get_parameter(name).add_(delta)
    after = benchmarks.evaluate(edited.model, edited.tokenizer, bench, 32)
    assert lm["after"][SHIPPED]["acc"] == after[SHIPPED]["acc"]
    assert lm["after"][SHIPPED]["perplexity"] == pytest.approx(after[SHIPPED]["perplexity"], rel=1e-4)
    assert lm["after"] != lm["before"]


def test_tasks_folder_is_the_package_data():
    assert (TASKS_DIR / SHIPPED / f"{SHIPPED}.yaml").is_file() and DATA.is_file()
    with pytest.raises(InputError, match="not a folder"):
        benchmarks.check_tasks(LmEval(lm_eval_tasks=[SHIPPED], lm_eval_include_path=str(DATA)))
