"""Hostile model folders and model identity (review cases m02-m07, u05-u07, y03, y06).

A model folder runs no code and is never unpickled, even with "y" on stdin (the answer transformers'
trust_remote_code prompt would take): a pickle `pytorch_model.bin` (a `__reduce__` payload, raw or in
torch's zip format, or a legit state dict), a config or tokenizer whose `auto_map` points at local
Python, exit 2 with one line, create no marker file and leave nothing in the output folder - in stage 1
and as training_dynamics checkpoints. In-process (stdin replaced) to stay fast; the remote-code case and
the Hub cache case also as real subprocesses of the stage script (the Hub cache is read at import).

Identity is the weights' content: new weights in a folder invalidate what was made with the old ones
(downstream refuses, stage 1 recomputes), and the same weights under another spelling or in a copy
are the same model.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from memcirc import artifacts as art
from memcirc.cli import main
from memcirc.dynamics.checkpoints import Checkpoint
from memcirc.dynamics.units import UnitSpec, unit_fingerprint
from memcirc.errors import InputError
from memcirc.models import ModelSpec, load
from memcirc.models import cache as file_cache
from memcirc.models.identity import check_same_model
from memcirc.models.loading import local_weights_sha256
from memcirc.models.weights import weight_files, weights_sha256

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "testbed.yaml")
TESTBED = REPO / "memcirc" / "testbed" / "model"
STEP54 = REPO / "memcirc" / "testbed" / "checkpoints" / "step-54"


class _Touch:
    """Unpickling this runs `touch marker` (the payload of a malicious pickle checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _copy(folder: Path, *, weights: bool = True) -> Path:
    """The testbed model's files in `folder` (without model.safetensors unless `weights`)."""
    shutil.copytree(TESTBED, folder, ignore=None if weights else shutil.ignore_patterns("model.safetensors"))
    return folder


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- the hostile folders -------------------------------------------------------------------------

def _raw_pickle(folder: Path, marker: Path) -> None:
    (_copy(folder, weights=False) / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))


def _torch_zip_pickle(folder: Path, marker: Path) -> None:
    torch.save({"gpt_neox.embed_in.weight": _Touch(marker)}, _copy(folder, weights=False) / "pytorch_model.bin")


def _legit_pickle(folder: Path, marker: Path) -> None:
    torch.save(load_file(TESTBED / "model.safetensors"), _copy(folder, weights=False) / "pytorch_model.bin")


def _pickle_named_safetensors(folder: Path, marker: Path) -> None:
    (_copy(folder, weights=False) / "model.safetensors").write_bytes(pickle.dumps(_Touch(marker)))


def _evil_module(folder: Path, name: str, marker: Path, base: str) -> None:
    (folder / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                       f"from transformers import {base}\nclass Evil({base}):\n"
                                       "    model_type = 'evilcfg'\n")


def _remote_config(folder: Path, marker: Path) -> None:
    _copy(folder)
    _edit_json(folder / "config.json", model_type="evilcfg",
               auto_map={"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"})
    _evil_module(folder, "evil", marker, "PretrainedConfig")


def _remote_tokenizer(folder: Path, marker: Path) -> None:
    _copy(folder)
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
               auto_map={"AutoTokenizer": ["evil_tok.Evil", "evil_tok.Evil"]})
    _evil_module(folder, "evil_tok", marker, "PreTrainedTokenizerFast")


HOSTILE = {   # builder, words of the one stderr line
    "raw_pickle": (_raw_pickle, "holds only pickle weights (pytorch_model.bin); memcirc never unpickles"),
    "torch_zip_pickle": (_torch_zip_pickle, "holds only pickle weights (pytorch_model.bin)"),
    "legit_pickle": (_legit_pickle, "save_pretrained("),
    "pickle_named_safetensors": (_pickle_named_safetensors, "is not a complete safetensors file"),
    "remote_config": (_remote_config, "needs its own Python code (the auto_map of its config.json"),
    "remote_tokenizer": (_remote_tokenizer, "needs its own Python code (the auto_map of its tokenizer_config.json"),
}


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / script), "--config", CONFIG, "--device", "cpu", *args],
                          input="y\n", capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=env or dict(os.environ))


def _in_process(stage: str, *args: str, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess[str]:
    """`main(stage, args)` as `_run` would run the script, "y" on stdin."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))
    capsys.readouterr()
    code = main(stage, ["--config", CONFIG, "--device", "cpu", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(stage, code, captured.out, captured.err)


def _refused(done: subprocess.CompletedProcess[str], words: str, marker: Path, out: Path) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not marker.exists(), "the folder's code ran"
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_folder_runs_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    build, words = HOSTILE[case]
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    build(tmp_path / "model", marker)
    done = _in_process("memorization_score", "--model", str(tmp_path / "model"), "--limit", "8", "--output-dir",
                       str(out), monkeypatch=monkeypatch, capsys=capsys)
    _refused(done, words, marker, out)


@pytest.mark.parametrize("case", ["remote_config", "torch_zip_pickle"])
def test_hostile_model_folder_runs_nothing_in_the_script(case: str, tmp_path: Path) -> None:
    build, words = HOSTILE[case]
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    build(tmp_path / "model", marker)
    done = _run("memorization_score.py", "--model", str(tmp_path / "model"), "--limit", "8", "--output-dir", str(out))
    _refused(done, words, marker, out)


@pytest.mark.parametrize("case", ["torch_zip_pickle", "legit_pickle", "pickle_named_safetensors"])
def test_bad_checkpoint_of_a_sweep_leaves_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """y03 / y06: every checkpoint is checked before the stage folder (or a unit folder) exists."""
    build, words = HOSTILE[case]
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    build(tmp_path / "step-100", marker)
    done = _in_process("training_dynamics", "--checkpoints", str(STEP54), str(tmp_path / "step-100"),
                       "--no-circuits", "--output-dir", str(out), monkeypatch=monkeypatch, capsys=capsys)
    _refused(done, words, marker, out)


def test_hub_repo_with_pickle_weights_only(tmp_path: Path, tiny_tokenizer) -> None:
    """A Hub repo cached with only pytorch_model.bin (offline): refused before transformers would look
    for, or ask the Hub to make, a safetensors file."""
    commit = "c" * 40
    snapshot = tmp_path / "hub" / "models--org--pickled" / "snapshots" / commit
    _legit_pickle(snapshot, tmp_path / "MARKER")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    done = _run("memorization_score.py", "--model", "org/pickled", "--limit", "8", "--output-dir", str(out), env=env)
    _refused(done, "Hub model 'org/pickled' has no safetensors weights", tmp_path / "MARKER", out)


def test_known_family_with_auto_map_loads_transformers_own_classes(tmp_path: Path) -> None:
    """m06: an auto_map next to a model_type / tokenizer class transformers has is ignored, never run."""
    marker = tmp_path / "MARKER"
    folder = _copy(tmp_path / "model")
    _edit_json(folder / "config.json", auto_map={"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"})
    _edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Evil", "evil.Evil"]})
    _evil_module(folder, "evil", marker, "PretrainedConfig")
    loaded = load(ModelSpec(str(folder), device="cpu"))
    assert loaded.arch.family == "gpt_neox" and not marker.exists()
    assert loaded.identity()["weights_sha256"] == art.sha256_file(TESTBED / "model.safetensors")


def test_refusals_name_the_conversion(tmp_path: Path) -> None:
    plain = _copy(tmp_path / "plain", weights=False)
    with pytest.raises(InputError, match=r"has no safetensors weights \(model.safetensors or model.safetensors"):
        weight_files(plain)
    torch.save(load_file(TESTBED / "model.safetensors"), plain / "model.pt")
    with pytest.raises(InputError, match=r"only pickle weights \(model.pt\).*save_file\(torch.load\("):
        weight_files(plain)
    cut = _copy(tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(InputError, match="is not a complete safetensors file"):
        weight_files(cut)


# -- the content hash ----------------------------------------------------------------------------

def test_weights_sha256_of_one_file_and_of_shards(tmp_path: Path) -> None:
    assert weights_sha256(weight_files(TESTBED)) == art.sha256_file(TESTBED / "model.safetensors")
    sharded = tmp_path / "sharded"
    load(ModelSpec("testbed", device="cpu")).model.save_pretrained(sharded, max_shard_size="1MB")
    files = weight_files(sharded)
    assert files[0].name == "model.safetensors.index.json" and len(files) > 2
    listing = "".join(f"{art.sha256_file(f)}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    assert weights_sha256(files) == art.sha256_bytes(listing.encode())   # `sha256sum` of the files, hashed
    (sharded / files[-1].name).unlink()
    with pytest.raises(InputError, match=f"lists shard {files[-1].name}, which is not in"):
        weight_files(sharded)


def test_hash_is_cached_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(file_cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = file_cache.sha256_cached(path)
    monkeypatch.setattr(art, "sha256_file", lambda p: pytest.fail(f"{p} hashed again"))
    assert file_cache.sha256_cached(path) == first
    monkeypatch.undo()
    monkeypatch.setenv(file_cache.CACHE_ENV, str(tmp_path / "cache"))
    stat = path.stat()
    path.write_bytes(b"b" * 1000)                                  # same size, rewritten in place ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))        # ... with the old mtime put back
    assert file_cache.sha256_cached(path) == art.sha256_bytes(b"b" * 1000) != first


def _identity(**fields: Any) -> Any:
    """A stand-in for a LoadedModel: only its identity() is read."""
    base = {"name_or_path": "testbed", "revision": None, "commit_hash": None, "gguf_file": None,
            "gguf_sha256": None, "weights_sha256": "a" * 64, "model_type": "gpt_neox", "n_params": 10,
            "dtype": "float32"}
    return SimpleNamespace(identity=lambda: {**base, **fields})


def test_check_same_model_compares_content_not_spelling() -> None:
    here = _identity(name_or_path="/copies/model")
    old = here.identity()
    assert check_same_model({**old, "name_or_path": "testbed", "revision": "x"}, here, "scores") is None
    with pytest.raises(InputError, match=r"belong to model '/copies/model' \(weights_sha256 bbbbbbbbbbbb\), not "
                                         r"to the weights this run loads from '/copies/model' \(weights_sha256 aaaa"):
        check_same_model({**old, "weights_sha256": "b" * 64}, here, "scores")
    with pytest.raises(InputError, match="n_params 11 vs 10"):
        check_same_model({**old, "n_params": 11}, here, "scores")
    # records made before weights were hashed: by name, as before
    legacy = {k: v for k, v in old.items() if k != "weights_sha256"}
    assert check_same_model(legacy, here, "scores") is None
    with pytest.raises(InputError, match="belong to model 'testbed' \\(name_or_path='testbed'\\)"):
        check_same_model({**legacy, "name_or_path": "testbed"}, here, "scores")
    # a GGUF: its file's sha256, whatever the file or folder is called
    gguf = _identity(weights_sha256=None, gguf_sha256="g" * 64, gguf_file="a.gguf", name_or_path="/x")
    assert check_same_model({**gguf.identity(), "gguf_file": "b.gguf", "name_or_path": "/y"}, gguf, "pairs") is None
    assert "bfloat16" in str(check_same_model({**old, "dtype": "bfloat16"}, here, "scores"))


def test_checkpoint_units_are_keyed_by_content(tmp_path: Path) -> None:
    spec = UnitSpec(model=ModelSpec("testbed", device="cpu"), windows=[], windows_run_id="r", metrics=("exact",),
                    final_signature={}, seed=0, limit=None, batch_size=1, chunk_size=1)
    copy = _copy(tmp_path / "step-9")

    def fingerprint(path: Path | str) -> str:
        return unit_fingerprint(spec, Checkpoint(0, "x", 9, str(path)))

    assert fingerprint(copy) == fingerprint("testbed") == fingerprint(TESTBED)
    shutil.copyfile(STEP54 / "model.safetensors", copy / "model.safetensors")
    assert fingerprint(copy) == fingerprint(STEP54) != fingerprint("testbed")
    assert local_weights_sha256(str(copy)) == art.sha256_file(STEP54 / "model.safetensors")


# -- through the stages ------------------------------------------------------------------------

def _stage(name: str, out: Path, model: str, *extra: str) -> int:
    return main(name, ["--config", CONFIG, "--output-dir", str(out), "--model", model, "--device", "cpu", *extra])


def test_swapped_weights_invalidate_downstream(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """u05, u07: new weights at the same path - contrastive refuses the old scores, stage 1 does not call
    them current (and recomputes with --force)."""
    model, out = str(_copy(tmp_path / "model")), tmp_path / "run"
    score = ("--limit", "112", "--metrics", "exact")   # the 112 canaries: some memorized
    assert _stage("memorization_score", out, model, *score) == 0
    scores = out / "memorization" / "scores.jsonl"
    before = scores.read_bytes()
    shutil.copyfile(STEP54 / "model.safetensors", Path(model) / "model.safetensors")   # as `cp` does: in place
    capsys.readouterr()
    assert _stage("contrastive_dataset", out, model) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not to the weights this run loads from" in err, err
    assert not (out / "contrastive").exists()
    # stage 1 no longer calls its old scores current: a complete run of another input is replaced on --force only
    assert _stage("memorization_score", out, model, *score) == 2
    assert "holds a complete run with a different config or input" in capsys.readouterr().err
    assert _stage("memorization_score", out, model, *score, "--force") == 0
    assert "nothing to do" not in capsys.readouterr().err
    manifest = art.read_json(out / "memorization" / "manifest.json")
    assert manifest["model"]["weights_sha256"] == art.sha256_file(STEP54 / "model.safetensors")
    assert scores.read_bytes() != before   # step-54 has memorized less than the final model


def test_same_weights_under_two_spellings_are_one_model(scored: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """u06: scores made with 'testbed' are this model's, spelled as a relative path or copied elsewhere."""
    monkeypatch.chdir(REPO)
    copy = str(_copy(tmp_path / "elsewhere"))
    for i, spelling in enumerate(("memcirc/testbed/model", copy)):
        assert _stage("contrastive_dataset", tmp_path / str(i), spelling, "--input-dir",
                      str(scored / "memorization")) == 0, spelling


def test_a_model_not_loaded_is_checked_by_content_too(tmp_path: Path) -> None:
    """predict_memorization never loads --model: its scores' record is compared with the folder's files."""
    from memcirc.models.identity import check_recorded_model

    record = {"name_or_path": "testbed", "weights_sha256": art.sha256_file(TESTBED / "model.safetensors")}
    check_recorded_model(record, ModelSpec(str(_copy(tmp_path / "copy"))), "scores")
    with pytest.raises(InputError, match=r"belong to model 'testbed' \(weights_sha256 .*not to the weights in"):
        check_recorded_model(record, ModelSpec(str(STEP54)), "scores")
    with pytest.raises(InputError, match="belong to model 'testbed', this run is for 'org/hub-model'"):
        check_recorded_model(record, ModelSpec("org/hub-model"), "scores")
    check_recorded_model({"name_or_path": "org/hub-model"}, ModelSpec("org/hub-model"), "scores")
