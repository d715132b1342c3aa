"""Model folders: the review's m01-m07, u05-u07, and our own broken folders."""

from __future__ import annotations

import shutil

from fuzz.build import model_copy, pickle_model, remote_code_model, snapshot, truncate, write
from fuzz.table import CHECKPOINTS, COMPLETE, CONFIG, UNCHANGED, Case, Ctx

MODELS = "models"
SCORE_112 = ["--limit", "112", "--metrics", "exact"]   # the canaries: 44 memorized by the final model


def folder(build_model):
    """A builder writing the model folder tmp/m with `build_model(ctx, path)`."""
    def build(ctx: Ctx) -> None:
        build_model(ctx, ctx.tmp / "m")
    return build


def model_case(id: str, review: str, build_model, rc: int = 2, words: tuple = (), **kw) -> Case:
    return Case(id, review, "memorization_score", ("--model", "{tmp}/m"), rc=rc, words=words,
                build=folder(build_model), owner=kw.pop("owner", MODELS), **kw)


def _no_config(_ctx: Ctx, path) -> None:
    model_copy(path)
    (path / "config.json").unlink()


def _weights(kind: str, keep: float):
    def build(_ctx: Ctx, path) -> None:
        model_copy(path)
        if keep:
            truncate(path / "model.safetensors", keep)
        else:
            write(path / "model.safetensors", b"")
    return build


def _broken_file(name: str, blob: bytes):
    def build(_ctx: Ctx, path) -> None:
        model_copy(path)
        write(path / name, blob)
    return build


def _scored_then_swapped(ctx: Ctx) -> None:
    """Score with a copy of the final model, then put step-54's weights into that folder (u05, u07)."""
    from memcirc.cli import main

    model_copy(ctx.tmp / "m")
    argv = ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(ctx.out), "--model", str(ctx.tmp / "m"),
            *SCORE_112]
    assert main("memorization_score", argv) == 0
    shutil.copy2(CHECKPOINTS / "step-54" / "model.safetensors", ctx.tmp / "m" / "model.safetensors")
    ctx.snapshot = snapshot(ctx.out)


CASES = [
    model_case("m01", "H", _no_config, words=("config.json",)),
    model_case("m02", "H (torch weights_only refused it; the message mentions 'TF 2.0'; no marker)",
               lambda ctx, p: pickle_model(p, ctx.marker, "raw"), words=("safetensors",)),
    model_case("m03", "H (no marker)", lambda ctx, p: pickle_model(p, ctx.marker, "zip"), words=("safetensors",)),
    model_case("m04", "B: a legit pickle pytorch_model.bin is loaded (restricted unpickler)",
               lambda ctx, p: pickle_model(p, ctx.marker, "legit"), words=("safetensors",)),
    model_case("m05", "H (stdin /dev/null: refused, no marker)", lambda ctx, p: remote_code_model(p, ctx.marker),
               words=(), stdin=""),
    Case("m07", "B (security): evil.py executed when the user answers y to transformers' prompt", "memorization_score",
         covered_by="tests/test_model_safety.py", words=("auto_map", '"y\\n"'), owner=MODELS,
         reason="the stdin-'y' malicious folders are models' tests (tests/test_model_safety.py); not duplicated"),
    model_case("m06", "H (the local tokenizer class is used, no marker)",
               lambda ctx, p: remote_code_model(p, ctx.marker, tokenizer_only=True), rc=0, state=COMPLETE),
    Case("u05", "B: scores of one model used with another (same folder path, weights swapped)",
         "contrastive_dataset", ("--model", "{tmp}/m", "--input-dir", "{out}/memorization"), words=("model",),
         build=_scored_then_swapped, fast=False, owner=MODELS),
    Case("u07", "B: stage 1 re-run after the swap says 'nothing to do' and keeps stale scores",
         "memorization_score", ("--model", "{tmp}/m", *SCORE_112), words=("--force",), state=UNCHANGED,
         build=_scored_then_swapped, owner=MODELS,
         reason="changed weights are a changed input: like a changed config, the complete run is named and "
                "--force replaces it (exit 2), never silently kept"),
    Case("u06", "H (false refusal, but the message is clear)", "contrastive_dataset",
         ("--model", "{model}"), rc=0, state=COMPLETE, owner=MODELS,
         reason="the same weights under two spellings (testbed, its folder path) are one model"),

    # -- our own ----------------------------------------------------------------------------------------
    model_case("x-safetensors-0b", "new: a 0-byte model.safetensors", _weights("zero", 0),
               words=("model.safetensors",)),
    model_case("x-safetensors-cut", "new: a truncated model.safetensors", _weights("cut", 0.5),
               words=("model.safetensors",)),
    model_case("x-config-garbage", "new: config.json that is not JSON", _broken_file("config.json", b"{not json"),
               words=("config.json",)),
    model_case("x-config-binary", "new: config.json of binary bytes", _broken_file("config.json", bytes(range(256))),
               words=("config.json",)),
    model_case("x-tokenizer-garbage", "new: tokenizer.json that is not JSON",
               _broken_file("tokenizer.json", b"{not json"), words=("tokenizer",)),
    Case("x-model-missing", "new: --model a folder that does not exist", "memorization_score",
         ("--model", "{tmp}/nope"), words=("nope",), owner=MODELS),
    Case("x-model-empty-string", "new: --model ''", "memorization_score", ("--model", ""), words=("empty",),
         owner=MODELS),
    Case("x-tokenizer-missing", "new: --tokenizer a folder that does not exist", "memorization_score",
         ("--tokenizer", "{tmp}/nope"), words=("nope",), owner=MODELS),
    Case("x-model-file", "new: --model a regular file", "memorization_score", ("--model", "{tmp}/file.txt"),
         words=("file.txt",), build=lambda ctx: write(ctx.tmp / "file.txt", "x"), owner=MODELS),
]
