import json

import pytest
import torch

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.manifest import StageRun, read_manifest


def test_atomic_write_leaves_no_temp(tmp_path):
    art.write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(InputError, match=r"d.jsonl:4: malformed JSON"):
        list(art.read_jsonl(path))
    path.write_text('[1, 2]\n')
    with pytest.raises(InputError, match=r"d.jsonl:1: expected a JSON object"):
        list(art.read_jsonl(path))


def test_jsonl_roundtrip_and_tensors(tmp_path):
    rows = [{"id": "a", "v": [1, 2]}, {"id": "b", "v": []}]
    assert art.write_jsonl(tmp_path / "r.jsonl", rows) == 2
    assert list(art.read_jsonl(tmp_path / "r.jsonl")) == rows
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    art.save_tensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    assert torch.equal(art.load_tensors(tmp_path / "t.safetensors")["w"], tensors["w"])


def test_manifest_is_required_and_complete(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running", "schema_version": 1}))
    with pytest.raises(InputError, match="incomplete"):
        read_manifest(tmp_path)


def _run(stage_dir, config, fingerprint):
    return StageRun(stage_dir, "s", config, fingerprint=fingerprint, run_root=stage_dir.parent)


def test_stage_run_idempotency(tmp_path):
    stage_dir = tmp_path / "stage"
    run = _run(stage_dir, {"a": 1}, "f1")
    assert run.open(force=False) is None
    run.start(force=False)
    art.write_jsonl(stage_dir / "out.jsonl", [{"x": 1}])
    art.write_json(stage_dir / art.SUMMARY_JSON, {"n": 1})
    manifest = run.finish({"out.jsonl": 1, art.SUMMARY_JSON: None})
    assert read_manifest(stage_dir)["run_id"] == manifest["run_id"]
    assert manifest["outputs"][0]["sha256"] == art.sha256_file(stage_dir / "out.jsonl")
    assert _run(stage_dir, {"a": 1}, "f1").open(force=False) == {"n": 1}   # a no-op: the finished summary
    with pytest.raises(InputError, match="different config"):
        _run(stage_dir, {"a": 2}, "f2").open(force=False)
    again = _run(stage_dir, {"a": 2}, "f2")
    assert again.open(force=True) is None
    again.start(force=True)
    assert not (stage_dir / art.MANIFEST).exists()   # --force: the old manifest goes before any work


def test_lifecycle_runs_in_one_order(tmp_path):
    run = _run(tmp_path / "stage", {}, "f")
    with pytest.raises(RuntimeError, match="lifecycle"):
        run.start(force=False)          # before open: the writability probe would be skipped
    with pytest.raises(RuntimeError, match="lifecycle"):
        run.finish({})
    run.open(force=False)
    with pytest.raises(RuntimeError, match="lifecycle"):
        run.open(force=False)
    run.start(force=False)
    assert (tmp_path / "stage" / art.LOG_TXT).is_file()


def test_open_probes_the_run_root_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = StageRun(blocker / "stage", "s", {}, fingerprint="f", run_root=blocker)
    with pytest.raises(InputError, match="not writable"):
        run.open(force=False)
    assert not (blocker / "stage").exists()


def test_array_task_starts_in_its_own_folder(tmp_path):
    stage_dir = tmp_path / "stage"
    task = stage_dir / "shards" / "00001"
    other = stage_dir / "shards" / "00000"
    other.mkdir(parents=True)
    (other / ".x.jsonl.123.tmp").write_text("being written by the other task")
    (task / ".y.jsonl.9.tmp").parent.mkdir(parents=True)
    (task / ".y.jsonl.9.tmp").write_text("left by a killed run of this task")
    run = _run(stage_dir, {}, "f")
    run.open(force=False)
    run.start(force=False, task_dir=task)
    assert (other / ".x.jsonl.123.tmp").exists() and not (task / ".y.jsonl.9.tmp").exists()
    assert (task / art.LOG_TXT).is_file() and not (stage_dir / art.LOG_TXT).exists()


def test_chunk_store_discards_other_configs(tmp_path):
    store = art.ChunkStore(tmp_path / "chunks", "f1")
    store.write(0, [{"a": 1}])
    assert art.ChunkStore(tmp_path / "chunks", "f1").done(0)
    assert not art.ChunkStore(tmp_path / "chunks", "f2").done(0)


def test_not_writable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="not writable"):
        art.ensure_writable(blocker / "sub")
