"""The stage lifecycle's guarantees: one writer per folder (a second run refuses at once, a dead run's
lock is taken over), resumable chunks that are verified (cut, edited or unrecorded chunks and a corrupt
state.json are recomputed), an unreadable own manifest is recomputed, and upstream files are checked
against their manifest's sha256 (and the manifest against its config_sha256)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from memcirc import artifacts as art
from memcirc import locks
from memcirc.cli import main
from memcirc.errors import InputError
from memcirc.kfac.factors import FactorOptions
from memcirc.kfac.resume import PARTIAL, FactorCollection
from memcirc.kfac.targets import resolve_targets
from memcirc.manifest import StageRun, read_manifest, read_output
from memcirc.sharding import read_marker

CONFIG = str(REPO / "configs" / "testbed.yaml")
ARGS = ["--config", CONFIG, "--device", "cpu", "--limit", "64", "--chunk-size", "16",
        "--metrics", "exact", "lcp", "tf_accuracy"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def score(out, *extra):
    return main("memorization_score", ["--output-dir", str(out), *ARGS, *extra])


def one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A clean in-process run: scores.jsonl of 64 windows in 4 chunks of 16."""
    out = tmp_path_factory.mktemp("ref")
    assert score(out) == 0
    return out / "memorization"


def copy_ref(ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ref, out / "memorization")
    return out


# -- the lock --------------------------------------------------------------------------------

class Holder:
    """Another process holding a memcirc lock on `directory` until closed."""

    CODE = ("import sys; from pathlib import Path; from memcirc import locks; "
            "locks.acquire(Path(sys.argv[1]), exclusive=sys.argv[2] == 'ex'); print('locked', flush=True); "
            "sys.stdin.read()")

    def __init__(self, directory, mode="ex"):
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(directory), mode], cwd=REPO, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def close(self):
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _run(stage_dir, fingerprint="f"):
    return StageRun(stage_dir, "s", {}, fingerprint=fingerprint, run_root=stage_dir.parent)


def test_a_folder_another_process_writes_is_refused_before_anything_is_touched(tmp_path):
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    (stage_dir / art.MANIFEST).write_text("{}")
    run = _run(stage_dir)
    assert run.open(force=True) is None
    holder = Holder(stage_dir)   # starts between this run's open and its start
    try:
        with pytest.raises(InputError) as e:
            _run(stage_dir).open(force=True)
        assert str(e.value) == (f"another memcirc run (pid {holder.proc.pid}, host {os.uname().nodename}) is "
                                f"writing {stage_dir}; wait for it or stop it")
        with pytest.raises(InputError, match="another memcirc run"):
            run.start(force=True)
        assert (stage_dir / art.MANIFEST).read_text() == "{}"   # --force deleted nothing
        assert not (stage_dir / art.LOG_TXT).exists()
    finally:
        holder.close()
    run = _run(stage_dir)
    assert run.open(force=True) is None   # the holder is gone: its lock went with it
    run.start(force=True)


def test_array_tasks_share_the_stage_folder_and_a_merge_excludes_them(tmp_path):
    stage_dir = tmp_path / "stage"
    other_task = Holder(stage_dir, "sh")   # another array task of the stage
    try:
        task = _run(stage_dir)
        assert task.open(force=False) is None
        task.start(force=False, task_dir=stage_dir / "shards" / "00001")
        assert set(locks.held()) == {stage_dir, stage_dir / "shards" / "00001"}
        merge = _run(stage_dir)
        assert merge.open(force=False) is None   # a shared holder does not stop open ...
        with pytest.raises(InputError, match="another memcirc run"):
            merge.start(force=False)              # ... but a merge cannot start beside a task
    finally:
        other_task.close()
    assert not locks.held()


def test_a_dead_runs_lock_is_taken_over_and_a_finished_folder_has_none(tmp_path):
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (stage_dir / locks.LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "gone"}))
    run = _run(stage_dir)
    assert run.open(force=False) is None
    run.start(force=False)
    info = json.loads((stage_dir / locks.LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == os.uname().nodename and "started" in info
    art.write_json(stage_dir / art.SUMMARY_JSON, {"n": 1})
    run.finish({art.SUMMARY_JSON: None})
    assert not (stage_dir / locks.LOCK_FILE).exists() and not locks.held()


def test_a_second_run_in_the_same_process_after_an_error_starts(tmp_path):
    stage_dir = tmp_path / "stage"
    first = _run(stage_dir)
    first.open(force=False)
    first.start(force=False)   # ... and stops with an error: no finish
    second = _run(stage_dir)
    assert second.open(force=False) is None
    second.start(force=False)
    art.write_json(stage_dir / art.SUMMARY_JSON, {"n": 1})
    second.finish({art.SUMMARY_JSON: None})
    assert not locks.held()


# Two real processes on one folder (the second refuses at once with the one line; the first's outputs
# equal a solo run's) are the fuzz table's cases cc1 and cc2: tests/fuzz/process.py.


# -- chunks ----------------------------------------------------------------------------------

def _chunked(ref, tmp_path):
    """An unfinished run of `ref`'s config: its 4 chunks on disk, no outputs yet."""
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (ref / art.SCORES_JSONL).read_text().splitlines()]
    store = art.ChunkStore(out / "memorization" / art.CHUNKS_DIR, read_manifest(ref)["fingerprint"])
    for i in range(4):
        store.write(i, rows[16 * i:16 * (i + 1)])
    return out, store


def test_cut_chunks_are_recomputed(ref, tmp_path, capsys):
    """r01, r02: chunk 1 cut at a line boundary, chunk 2 mid-line; the run equals a clean one."""
    out, store = _chunked(ref, tmp_path)
    lines = store.path(1).read_bytes().splitlines(keepends=True)
    store.path(1).write_bytes(b"".join(lines[:8]))
    data = store.path(2).read_bytes()
    store.path(2).write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    assert score(out) == 0
    err = capsys.readouterr().err
    assert f"chunk 1 in {store.directory} is damaged (8 rows, 16 recorded); recomputing it" in err
    assert f"chunk 2 in {store.directory} is damaged" in err and "resuming: 2 of 4 chunks" in err
    assert (out / "memorization" / art.SCORES_JSONL).read_bytes() == (ref / art.SCORES_JSONL).read_bytes()
    assert read_manifest(out / "memorization")["outputs"][0]["rows"] == 64


def test_edited_and_unrecorded_chunks_are_recomputed(ref, tmp_path, capsys):
    out, store = _chunked(ref, tmp_path)
    store.path(0).write_bytes(store.path(0).read_bytes().replace(b'"lcp":', b'"lcp": ', 1))   # same rows
    (store.directory / "00003.json").unlink()
    capsys.readouterr()
    assert score(out) == 0
    err = capsys.readouterr().err
    assert "chunk 0 in" in err and "is damaged (its sha256 differs from the one recorded)" in err
    assert "chunk 3 in" in err and "is damaged (no record of its row count and sha256)" in err
    assert (out / "memorization" / art.SCORES_JSONL).read_bytes() == (ref / art.SCORES_JSONL).read_bytes()


@pytest.mark.parametrize("state", [b'{"fingerp', b"\xff\xfe", b"[1, 2]", b""])
def test_a_corrupt_state_json_starts_the_chunks_over(ref, tmp_path, capsys, state):
    out, store = _chunked(ref, tmp_path)
    (store.directory / art.CHUNK_STATE).write_bytes(state)
    capsys.readouterr()
    assert score(out) == 0
    err = capsys.readouterr().err
    assert "state.json is unreadable" in err and "resuming" not in err and "Traceback" not in err
    assert (out / "memorization" / art.SCORES_JSONL).read_bytes() == (ref / art.SCORES_JSONL).read_bytes()


def test_chunks_without_a_state_are_not_adopted(tmp_path):
    store = art.ChunkStore(tmp_path / "chunks", "f1")
    store.write(0, [{"a": 1}])
    (store.directory / art.CHUNK_STATE).unlink()
    assert not art.ChunkStore(tmp_path / "chunks", "f1").done(0)


def test_concatenate_checks_every_chunk(tmp_path):
    store = art.ChunkStore(tmp_path / "chunks", "f")
    store.write(0, [{"a": 1}, {"a": 2}])
    store.write(1, [{"a": 3}])
    assert store.concatenate(2) == b'{"a":1}\n{"a":2}\n{"a":3}\n'
    store.path(1).write_bytes(b'{"a":4}\n')
    with pytest.raises(InputError, match="chunk 1 in .* is damaged .*: re-run the same command"):
        store.concatenate(2)
    assert not store.path(1).exists()   # the re-run recomputes it


def test_an_unreadable_or_mismatched_shard_is_not_done(ref, tmp_path, capsys):
    out = tmp_path / "run"
    shards = out / "memorization" / art.SHARDS_DIR
    for i in (0, 1):
        assert score(out, "--num-shards", "2", "--shard-index", str(i)) == 0
    assert not [p for p in shards.rglob(locks.LOCK_FILE) if p.parent != out / "memorization"]   # released
    (shards / "00001" / "done.json").write_text('{"fingerprint": "')
    capsys.readouterr()
    assert score(out, "--merge") == 2
    one_line_error(capsys, "shards [1] of 2 have not finished; re-run them, then --merge")
    scores = shards / "00000" / art.SCORES_JSONL
    scores.write_bytes(scores.read_bytes()[:-10])
    for i in (0, 1):   # both recomputed: one has no done marker, the other's scores differ from it
        assert score(out, "--num-shards", "2", "--shard-index", str(i)) == 0
        assert "is done for this config" not in capsys.readouterr().err
    assert score(out, "--merge") == 0
    assert (out / "memorization" / art.SCORES_JSONL).read_bytes() == (ref / art.SCORES_JSONL).read_bytes()
    assert not (out / "memorization" / locks.LOCK_FILE).exists() and not shards.exists()


@pytest.mark.parametrize("text", ['{"fingerprint": "f", "num_sh', "[]", '{"fingerprint": "f"}', "\udcff"])
def test_an_unreadable_done_marker_means_not_done(tmp_path, text):
    path = tmp_path / "done.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_marker(path) is None


# -- the own manifest --------------------------------------------------------------------------

@pytest.mark.parametrize("force", [False, True])
def test_a_truncated_own_manifest_is_recomputed(ref, tmp_path, capsys, force):
    """t01: exit 0 with and without --force; the outputs are those of a clean run."""
    out = copy_ref(ref, tmp_path)
    manifest = out / "memorization" / art.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:100])
    capsys.readouterr()
    assert score(out, *(["--force"] if force else [])) == 0
    assert f"{manifest} is unreadable" in capsys.readouterr().err
    assert read_manifest(out / "memorization")["fingerprint"] == read_manifest(ref)["fingerprint"]
    assert (out / "memorization" / art.SCORES_JSONL).read_bytes() == (ref / art.SCORES_JSONL).read_bytes()


# -- upstream files ----------------------------------------------------------------------------

def test_an_edited_upstream_file_is_refused(ref, tmp_path, capsys):
    """t04: a scores.jsonl with rows flipped to exact after its stage wrote it."""
    out = copy_ref(ref, tmp_path)
    scores = out / "memorization" / art.SCORES_JSONL
    data = scores.read_bytes()
    scores.write_bytes(data.replace(b'"exact":false', b'"exact":true'))
    assert scores.read_bytes() != data
    assert main("contrastive_dataset", ["--config", CONFIG, "--output-dir", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys, f"{scores} changed after its stage wrote it (sha256 ")
    assert "re-run memorization_score or restore the file" in str(pytest.raises(
        InputError, read_output, out / "memorization", art.SCORES_JSONL).value)
    assert not (out / "contrastive").exists()


def test_a_manifest_whose_config_was_edited_is_refused(ref, tmp_path, capsys):
    """t03: the config edited, config_sha256 left as it was."""
    out = copy_ref(ref, tmp_path)
    path = out / "memorization" / art.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["config"]["prefix_len"] = 16
    art.write_json(path, manifest)
    assert main("contrastive_dataset", ["--config", CONFIG, "--output-dir", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys, "its config does not match its config_sha256")
    assert not (out / "contrastive").exists()


def test_read_output_needs_the_file_in_the_manifest(ref, tmp_path):
    out = copy_ref(ref, tmp_path)
    assert read_output(out / "memorization", art.SUMMARY_JSON) == out / "memorization" / art.SUMMARY_JSON
    with pytest.raises(InputError, match="has no log.txt: re-run memorization_score"):
        read_output(out / "memorization", art.LOG_TXT)   # on disk, but not an output
    (out / "memorization" / art.SUMMARY_JSON).unlink()
    with pytest.raises(InputError, match="has no summary.json"):
        read_output(out / "memorization", art.SUMMARY_JSON)


# -- K-FAC's running sums ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["cut", "garbage", "empty"])
def test_a_damaged_partial_factor_file_is_recollected(tiny_loaded, tmp_path, caplog, monkeypatch, damage):
    """k06: the running sums of a killed collection, cut or overwritten: collected again, not an error."""
    monkeypatch.setattr(logging.getLogger("memcirc"), "propagate", True)   # main() turns it off
    lm = tiny_loaded["gpt2"]
    targets = resolve_targets(lm.model, lm.arch, [1], ["mlp_in"])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, lm.model.config.vocab_size, (2, 8), generator=g) for _ in range(3)]
    collection = FactorCollection(lm.model, targets, batches, FactorOptions(labels="data", seed=0), "f",
                                  {"name_or_path": "tiny"}, chunk_size=1)
    clean = collection.resumable(0, 3, tmp_path / "clean", "factors")
    partial = tmp_path / "clean" / PARTIAL
    data = partial.read_bytes()
    partial.write_bytes({"cut": data[:len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    again = collection.resumable(0, 3, tmp_path / "clean", "factors")
    assert "is damaged" in caplog.text and "collecting the factors from the start" in caplog.text
    assert again.n_tokens == clean.n_tokens
    for name in clean.A:
        assert torch.equal(again.A[name], clean.A[name]) and torch.equal(again.G[name], clean.G[name])


@pytest.mark.parametrize("content", [b'{"status": "comp', b"\xff\xfe garbage", b"[1, 2]"])
def test_cut_markers_count_as_not_done_for_dynamics_units_and_slurm_status(tmp_path, content):
    from memcirc.dynamics.units import UNIT_DONE, unit_status
    from memcirc.slurm.status import _marker_done
    from memcirc.stages.registry import STAGES

    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / UNIT_DONE).write_bytes(content)
    assert unit_status(unit, "fp") == "todo"
    folder = tmp_path / STAGES["memorization_score"].folder
    folder.mkdir()
    (folder / art.MANIFEST).write_bytes(content)
    assert not _marker_done(tmp_path, "memorization_score", None)
