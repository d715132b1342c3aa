import json

import pytest
import torch

from memcirc import artifacts as art
from memcirc.errors import InputError


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
        art.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running", "schema_version": 1}))
    with pytest.raises(InputError, match="incomplete"):
        art.read_manifest(tmp_path)


def test_stage_run_idempotency(tmp_path):
    stage_dir = tmp_path / "stage"
    run = art.StageRun(stage_dir, "s", {"a": 1}, fingerprint="f1")
    assert not run.is_done(force=False)
    run.begin(force=False)
    art.write_jsonl(stage_dir / "out.jsonl", [{"x": 1}])
    manifest = run.finish({"out.jsonl": 1})
    assert art.read_manifest(stage_dir)["run_id"] == manifest["run_id"]
    assert manifest["outputs"][0]["sha256"] == art.sha256_file(stage_dir / "out.jsonl")
    assert art.StageRun(stage_dir, "s", {"a": 1}, fingerprint="f1").is_done(force=False)
    with pytest.raises(InputError, match="different config"):
        art.StageRun(stage_dir, "s", {"a": 2}, fingerprint="f2").is_done(force=False)
    assert not art.StageRun(stage_dir, "s", {"a": 2}, fingerprint="f2").is_done(force=True)


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
