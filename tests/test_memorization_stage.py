"""The memorization_score stage end to end: artifacts, idempotency, shards, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from memcirc.cli import main

FAST = ["--limit", "120", "--prefix-len", "32", "--suffix-len", "32", "--device", "cpu"]


def score(argv):
    return main("memorization_score", argv)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_and_manifest(tmp_path, capsys):
    assert score(["--output-dir", str(tmp_path), *FAST, "--metrics", "exact", "token_match"]) == 0
    stage = tmp_path / "memorization"
    names = {p.name for p in stage.iterdir()}
    assert {"scores.jsonl", "summary.json", "histogram.png", "manifest.json", "log.txt"} <= names
    assert "chunks" not in names
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"][0]["rows"] == 120
    assert manifest["model"]["family"] == "gpt_neox" and "token_match" in manifest["metric"]["definitions"]
    # The manifest is the last file written.
    assert all(os.path.getmtime(stage / "manifest.json") >= os.path.getmtime(stage / n)
               for n in ("scores.jsonl", "summary.json", "histogram.png"))
    rows = read_rows(stage / "scores.jsonl")
    assert {"id", "source", "doc", "offset", "group", "tokens", "exact", "lcp", "token_match"} <= set(rows[0])
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["n_windows"] == 120 and set(summary["groups"]) and "exact" in summary["metrics"]
    assert "exact" in capsys.readouterr().out  # the per-group table


def test_rerun_is_a_noop_and_config_change_needs_force(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path), *FAST]
    assert score(argv) == 0
    manifest = tmp_path / "memorization" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.read_bytes())
    assert score(argv + ["--batch-size", "5"]) == 0  # batch size cannot change results: no-op
    assert (manifest.stat().st_mtime_ns, manifest.read_bytes()) == before
    capsys.readouterr()
    assert score(argv + ["--suffix-len", "30"]) == 2
    assert "--force" in capsys.readouterr().err
    assert score(argv + ["--suffix-len", "30", "--force"]) == 0
    assert read_rows(tmp_path / "memorization" / "scores.jsonl")[0]["suffix_len"] == 30


def test_shards_then_merge_equal_one_job(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    assert score(["--output-dir", str(one), *FAST]) == 0
    for i in range(3):
        assert score(["--output-dir", str(many), *FAST, "--num-shards", "3", "--shard-index", str(i)]) == 0
    assert not (many / "memorization" / "manifest.json").exists()
    assert score(["--output-dir", str(many), *FAST, "--num-shards", "3", "--merge"]) == 0
    manifest = (many / "memorization" / "manifest.json").read_bytes()
    assert score(["--output-dir", str(many), *FAST, "--merge"]) == 0  # merging again is a no-op
    assert (many / "memorization" / "manifest.json").read_bytes() == manifest
    a, b = read_rows(one / "memorization" / "scores.jsonl"), read_rows(many / "memorization" / "scores.jsonl")
    assert [(r["id"], r["exact"], r["lcp"], r["tf_accuracy"]) for r in a] == \
           [(r["id"], r["exact"], r["lcp"], r["tf_accuracy"]) for r in b]
    assert np.allclose([r["suffix_nll"] for r in a], [r["suffix_nll"] for r in b], atol=1e-4)


def test_shards_default_from_slurm_array(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert score(["--output-dir", str(tmp_path), *FAST]) == 0
    assert (tmp_path / "memorization" / "shards" / "00001" / "done.json").is_file()
    assert score(["--output-dir", str(tmp_path), *FAST, "--merge"]) == 2  # shard 0 has not run


def _cli(out, *extra):
    return [sys.executable, str(REPO / "memorization_score.py"), "--output-dir", str(out), "--device", "cpu",
            "--prefix-len", "32", "--suffix-len", "32", "--chunk-size", "8", "--batch-size", "8",
            "--limit", "240", "--metrics", "exact", "token_match", "bleu4", *extra]


def test_sigterm_then_resume_is_byte_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_cli(whole), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(cut), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = cut / "memorization" / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(chunks.glob("*.jsonl"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    done = len(list(chunks.glob("*.jsonl")))
    assert 3 <= done and not (cut / "memorization" / "manifest.json").exists()
    resumed = subprocess.run(_cli(cut), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of" in resumed.stderr
    assert (cut / "memorization" / "scores.jsonl").read_bytes() == \
           (whole / "memorization" / "scores.jsonl").read_bytes()


# -- bad input: exit 2, one clear line on stderr, nothing written ---------------------------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def bad_inputs(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("prefix_len: 32\nbatchsize: 4\n")
    return {
        "missing file": (["--dataset", str(tmp_path / "none.jsonl")], "data file not found"),
        "malformed jsonl": (["--dataset", str(_malformed(tmp_path))], "m.jsonl:2: malformed JSON"),
        "missing column": (["--dataset", _jsonl(tmp_path / "c.jsonl", [{"body": "x"}])],
                           "columns found: body"),
        "token id >= vocab": (["--dataset", _jsonl(tmp_path / "v.jsonl", [{"tokens": [1] * 63 + [10 ** 6]}])],
                              "outside the model vocabulary"),
        "window > context": (["--dataset", _jsonl(tmp_path / "l.jsonl", [{"tokens": [1] * 300}]),
                              "--prefix-len", "100", "--suffix-len", "100"], "exceeds the model context"),
        "nothing left": (["--dataset", _jsonl(tmp_path / "s.jsonl", [{"tokens": [1, 2, 3]}])],
                         "no windows left"),
        "unknown config key": (["--config", str(yaml_file)], "unknown config key 'batchsize'"),
        "bad dtype": (["--dtype", "float64"], "'dtype'"),
        "bad device": (["--device", "tpu"], "tpu"),
        "not writable": (["--output-dir", str(blocker / "sub")], "not writable"),
        "input dir without manifest": (["--input-dir", str(tmp_path)], "no manifest.json"),
    }


def _malformed(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"tokens": [1, 2]}\n{"tokens": [1, \n')
    return path


CASES = ["missing file", "malformed jsonl", "missing column", "token id >= vocab", "window > context",
         "nothing left", "unknown config key", "bad dtype", "bad device", "not writable",
         "input dir without manifest"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, bad_inputs, tmp_path, capsys):
    argv, message = bad_inputs[case]
    out = tmp_path / "run"
    code = score(["--output-dir", str(out), "--device", "cpu", "--prefix-len", "32", "--suffix-len", "32",
                  *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_bad_input_from_the_command_line(tmp_path):
    """The same contract through the real script: exit 2, exactly one line on stderr."""
    done = subprocess.run([sys.executable, str(REPO / "memorization_score.py"), "--output-dir", str(tmp_path),
                           "--device", "cpu", "--dataset", _jsonl(tmp_path / "s.jsonl", [{"tokens": [1, 2]}])],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "no windows left" in done.stderr
    assert not (tmp_path / "memorization").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert score(["--output-dir", str(tmp_path / "run"), "--dry-run", "--prefix-len", "7"]) == 0
    assert "prefix_len: 7" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# -- data checked before the weights load; document ids; BOS; progress -------------------------

def test_bad_rows_are_reported_before_the_weights_load(tmp_path, monkeypatch, capsys):
    import memcirc.stages.memorization_score as stage

    def no_weights(*_args, **_kw):
        raise AssertionError("the model weights were loaded before the data was checked")

    monkeypatch.setattr(stage, "load", no_weights)
    rows = [{"text": "a line of text"}] * 41 + [{"text": ["a", "list"]}]
    cases = [(["--dataset", _jsonl(tmp_path / "t.jsonl", rows)],
              "t.jsonl: line 42: column 'text' holds a list, expected a string"),
             (["--dataset", _jsonl(tmp_path / "d.jsonl", [{"name": "x", "tokens": [1] * 64}]),
               "--doc-column", "title"], "no document-id column 'title'; columns found: name, tokens"),
             (["--dataset", _jsonl(tmp_path / "v.jsonl", [{"tokens": [1] * 63 + [10 ** 6]}])],
              "outside the model vocabulary"),
             (["--dataset", _jsonl(tmp_path / "l.jsonl", [{"tokens": [1] * 300}]), "--prefix-len", "100",
               "--suffix-len", "100"], "exceeds the model context")]
    for argv, message in cases:
        out = tmp_path / "run"
        assert score(["--output-dir", str(out), "--device", "cpu", "--prefix-len", "32", "--suffix-len", "32",
                      *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and message in err, err
        assert not out.exists()


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A tiny random llama whose tokenizer adds BOS itself (the SmolLM2 / Llama convention)."""
    from conftest import build_tiny_model
    from test_data import build_bos_tokenizer

    folder = tmp_path_factory.mktemp("bos_model")
    build_tiny_model("llama").save_pretrained(folder)
    build_bos_tokenizer().save_pretrained(folder)
    return folder


def test_bos_model_every_window_starts_with_bos_and_doc_ids_flow(tmp_path, bos_model_dir):
    from test_data import WORDS

    data = _jsonl(tmp_path / "d.jsonl", [{"name": f"text-{i}", "text": " ".join(WORDS[i:] + WORDS[:i])}
                                         for i in range(3)])
    argv = ["--model", str(bos_model_dir), "--dataset", data, "--device", "cpu", "--prefix-len", "8",
            "--suffix-len", "8", "--windowing", "sliding", "--stride", "2", "--doc-column", "name"]
    for mode, bos_id in (("auto", 1), ("never", None)):
        out = tmp_path / mode
        assert score(["--output-dir", str(out), "--prepend-bos", mode, *argv]) == 0
        rows = read_rows(out / "memorization" / "scores.jsonl")
        assert len(rows) == 3 * 2 and [r["id"] for r in rows[:2]] == ["text-0@0", "text-0@2"]
        assert all(r["doc"].startswith("text-") for r in rows)
        if bos_id is None:
            assert all(1 not in r["tokens"] and r["prefix_len"] == 8 for r in rows)
        else:
            assert all(r["tokens"][0] == 1 and 1 not in r["tokens"][1:] and r["prefix_len"] == 9 for r in rows)
        manifest = json.loads((out / "memorization" / "manifest.json").read_text())
        summary = json.loads((out / "memorization" / "summary.json").read_text())
        assert manifest["windows"]["bos"] == summary["windows"]["bos"] == {"prepend_bos": mode,
                                                                           "bos_token_id": bos_id}


def test_progress_per_batch_with_rate_and_eta(tmp_path, monkeypatch, capsys):
    import memcirc.logs

    monkeypatch.setattr(memcirc.logs, "LOG_EVERY_S", 0.0)   # a log line at every update
    argv = ["--output-dir", str(tmp_path), *FAST, "--limit", "40", "--batch-size", "8", "--chunk-size", "16"]
    assert score(argv + ["--metrics", "exact"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "memcirc.progress: scoring:" in ln]
    counts = [int(ln.split("scoring: ")[1].split("/")[0]) for ln in lines if "windows/s, ETA" in ln]
    assert counts == [8, 16, 24, 32, 40]   # every batch of 8, across chunks of 16 (the last one short)
    assert any("scoring: done, 40 windows in" in ln for ln in lines)


# -- decoded text, Parquet, the printed table, window warnings -----------------------------------

def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _parquet_rows(path):
    """scores.parquet read by pandas, with numpy arrays back as lists and NaN/None as None."""
    import pandas as pd

    def plain(value):
        if hasattr(value, "tolist"):
            return value.tolist()
        return None if value is None or (isinstance(value, float) and value != value) else value

    return [{k: plain(v) for k, v in row.items()} for row in pd.read_parquet(path).to_dict("records")]


def test_decoded_text_and_parquet(tmp_path, testbed):
    """The text columns are the window's parts decoded by the run's tokenizer; --no-decode-text gives the same
    rows without them; no stage reads them back; scores.parquet holds the JSONL rows (pandas and datasets)."""
    import datasets

    from memcirc.data import SCORES_PARQUET, TEXT_COLUMNS, read_scores

    argv = [*FAST, "--limit", "48", "--metrics", "exact", "token_match"]
    assert score(["--output-dir", str(tmp_path / "text"), *argv, "--parquet"]) == 0
    stage = tmp_path / "text" / "memorization"
    rows = read_rows(stage / "scores.jsonl")
    tok = testbed.tokenizer
    for r in rows:
        truth = r["tokens"][r["prefix_len"]:]
        assert r["prefix_text"] == _decode(tok, r["tokens"][:r["prefix_len"]])
        assert r["suffix_text"] == _decode(tok, truth)
        assert r["continuation_text"] == _decode(tok, r.get("generated", truth))
        assert tuple(r)[-3:] == TEXT_COLUMNS
    assert all(not set(TEXT_COLUMNS) & set(w.row) for w in read_scores(stage))
    assert score(["--output-dir", str(tmp_path / "plain"), *argv, "--no-decode-text"]) == 0
    plain = tmp_path / "plain" / "memorization"
    assert read_rows(plain / "scores.jsonl") == [{k: v for k, v in r.items() if k not in TEXT_COLUMNS} for r in rows]
    assert not (plain / SCORES_PARQUET).exists()
    # Parquet: the same rows, a column per key (None where a row lacks it), listed in the manifest
    names = list(dict.fromkeys(k for r in rows for k in r))
    expected = [{k: r.get(k) for k in names} for r in rows]
    assert _parquet_rows(stage / SCORES_PARQUET) == expected
    loaded = datasets.load_dataset("parquet", data_files=str(stage / SCORES_PARQUET), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert list(loaded) == expected
    outputs = {o["path"]: o for o in json.loads((stage / "manifest.json").read_text())["outputs"]}
    assert outputs[SCORES_PARQUET]["rows"] == 48


def test_shards_carry_the_text_and_the_parquet(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    argv = [*FAST, "--limit", "60", "--chunk-size", "16", "--parquet"]
    assert score(["--output-dir", str(one), *argv]) == 0
    for i in range(2):
        assert score(["--output-dir", str(many), *argv, "--num-shards", "2", "--shard-index", str(i)]) == 0
    assert score(["--output-dir", str(many), *argv, "--num-shards", "2", "--merge"]) == 0
    a, b = (read_rows(d / "memorization" / "scores.jsonl") for d in (one, many))
    assert [(r["id"], r["prefix_text"], r["suffix_text"]) for r in a] == \
           [(r["id"], r["prefix_text"], r["suffix_text"]) for r in b]
    assert _parquet_rows(many / "memorization" / "scores.parquet") == b


def test_no_group_column_prints_all_once_and_window_pitfalls_warn(tmp_path, capsys):
    from test_data import WORDS

    text = " ".join(WORDS * 4)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "too short"}])
    argv = ["--output-dir", str(tmp_path), "--dataset", data, "--device", "cpu", "--prefix-len", "8",
            "--suffix-len", "8", "--windowing", "sliding", "--stride", "12", "--metrics", "exact"]
    assert score(argv) == 0
    out, err = capsys.readouterr()
    table = out[out.index("group "):].splitlines()
    assert [ln.split()[0] for ln in table[1:] if ln.strip()] == ["all"]
    assert ("--stride 12 is shorter than a window of 16 tokens (--prefix-len 8 + --suffix-len 8): consecutive "
            "windows share 4 tokens") in err
    assert "1 of 2 documents are shorter than a window of 16 tokens (--prefix-len 8 + --suffix-len 8)" in err
