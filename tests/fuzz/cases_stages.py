"""Stages 2-8 and their upstream folders: the review's t02-t05, u01-u04, v, e, k07-k15, b, q and y
cases, and our own. Each reads the tiny finished run (`{run}`) or a doctored copy of one of its folders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from fuzz.build import Payload, jsonl, npy, pickle_model, reseal, rewrite_jsonl, token_rows, truncate, write
from fuzz.table import Case, Ctx

LIFECYCLE, INPUTS, MODELS, CONFIG_CLI = "lifecycle", "inputs", "models", "config-cli"
UP = "{tmp}/up"          # where `upstream` builders put their doctored copies
DYN = ("--input-dir", "{run}/memorization", "--no-circuits", "--limit", "16")   # training_dynamics without FAST


def upstream(folder: str, edit=None):
    """A builder copying the run's `folder` to tmp/up/<folder>, then `edit(path, ctx)` on the copy."""
    def build(ctx: Ctx) -> None:
        path = ctx.copy_stage(folder)
        if edit is not None:
            edit(path, ctx)
    return build


def file_builder(name: str, make):
    def build(ctx: Ctx) -> None:
        make(ctx.tmp / name, ctx)
    return build


def _edit_manifest(change):
    def edit(path: Path, _ctx: Ctx) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        write(path / "manifest.json", json.dumps(manifest, indent=2))
    return edit


def _bogus_config(manifest: dict) -> None:
    manifest["config"]["prefix_len"] = 16
    manifest["config_sha256"] = "0" * 64


def _flip_to_exact(path: Path, _ctx: Ctx) -> None:
    flipped = iter(range(20))

    def edit(_i: int, row: dict) -> dict:
        if row["exact"] < 1 and next(flipped, None) is not None:
            row.update(exact=1.0, lcp=row["suffix_len"])
        return row
    rewrite_jsonl(path / "scores.jsonl", edit)


def _drop_tokens(path: Path, _ctx: Ctx) -> None:
    rewrite_jsonl(path / "scores.jsonl", lambda i, row: {k: v for k, v in row.items() if k != "tokens" or i != 2})
    reseal(path, "scores.jsonl")


def _binary_scores(path: Path, _ctx: Ctx) -> None:
    blob = (path / "scores.jsonl").read_bytes()
    write(path / "scores.jsonl", blob[:200] + b"\xff\xfe\x80" + blob[200:])
    reseal(path, "scores.jsonl")


def _pairs(change, seal: bool = False):
    """Edit the first pair of a contrastive copy (`change(pair)`), resealing its sha256 when `seal`."""
    def edit(path: Path, _ctx: Ctx) -> None:
        rewrite_jsonl(path / "pairs.jsonl", lambda i, row: change(row) or row if i == 0 else row)
        if seal:
            reseal(path, "pairs.jsonl")
    return edit


def _set_token(value):
    def change(pair: dict) -> None:
        pair["clean"][0] = value
    return change


def _shorten(pair: dict) -> None:
    pair["corrupt"] = pair["corrupt"][1:]


def _pickled_prune_scores(path: Path, ctx: Ctx) -> None:
    write(path / "prune_scores.safetensors", pickle.dumps(Payload(ctx.marker)))


def _cut_factors(path: Path, ctx: Ctx) -> None:
    assert ctx.run is not None
    write(path, (ctx.run / "kfac" / "factors.safetensors").read_bytes())
    truncate(path, 0.5)


def _non_utf8(path: Path, _ctx: Ctx) -> None:
    write(path, b"caf\xe9 the king and his men rode to the castle\n" * 50)


def stage_case(id: str, review: str, stage: str, argv: tuple[str, ...], words: tuple = (), owner: str = "",
               **kw) -> Case:
    return Case(id, review, stage, argv, words=words, owner=owner, **kw)


C, CI, V, B, K, D, P = ("contrastive_dataset", "find_circuits", "verify_circuit", "attention_bypass", "kfac_edit",
                        "training_dynamics", "predict_memorization")
MEM_UP = ("--input-dir", f"{UP}/memorization")
GARBAGE = bytes((i * 131 + 7) % 256 for i in range(4096))   # not UTF-8
FLOAT_ROWS = [{"tokens": [5.5] * 64}]

CASES = [
    # -- upstream manifests and files --------------------------------------------------------------
    stage_case("t02", "H", C, MEM_UP, ("manifest.json",), LIFECYCLE,
               build=upstream("memorization", lambda p, _c: truncate(p / "manifest.json"))),
    stage_case("t03", "B (minor): config_sha256 never verified", C, MEM_UP, (("config_sha256", "manifest"),), LIFECYCLE,
               build=upstream("memorization", _edit_manifest(_bogus_config))),
    stage_case("t04", "B: an edited scores.jsonl used silently (64 memorized instead of 44)", C, MEM_UP,
               ("scores.jsonl",), LIFECYCLE, build=upstream("memorization", _flip_to_exact)),
    stage_case("t05", "B: KeyError in evaluation.memorized_windows", B, MEM_UP, ("tokens",), INPUTS,
               build=upstream("memorization", _drop_tokens),
               reason="the doctored file is resealed (its sha256 put in the manifest) so the row check itself is "
                      "tested, not the integrity check"),
    stage_case("x-upstream-list-manifest", "new: upstream manifest.json holds a JSON list", C, MEM_UP,
               ("manifest.json",), LIFECYCLE, build=upstream("memorization", lambda p, _c: write(p / "manifest.json",
                                                                                               "[1, 2]"))),
    stage_case("x-upstream-manifest-dir", "new: upstream manifest.json is a folder", C, MEM_UP, ("manifest.json",),
               LIFECYCLE, build=upstream("memorization", lambda p, _c: ((p / "manifest.json").unlink(),
                                                                       (p / "manifest.json").mkdir()))),
    stage_case("x-upstream-no-scores", "new: upstream scores.jsonl deleted", C, MEM_UP, ("scores.jsonl",), LIFECYCLE,
               build=upstream("memorization", lambda p, _c: (p / "scores.jsonl").unlink())),
    stage_case("x-upstream-running", "new: upstream manifest status 'running'", C, MEM_UP, ("incomplete",), LIFECYCLE,
               build=upstream("memorization", _edit_manifest(lambda m: m.update(status="running")))),
    stage_case("x-upstream-binary-scores", "new: non-UTF-8 bytes in a resealed upstream scores.jsonl", C, MEM_UP,
               ("scores.jsonl", "utf-8"), INPUTS, build=upstream("memorization", _binary_scores)),
    # -- scores of another model ------------------------------------------------------------------------
    *[stage_case(i, "H", s, ("--input-dir", "{other}/memorization"), ("step-652",), MODELS)
      for i, s in (("u01", C), ("u02", K), ("u03", B), ("u04", P))],
    # -- circuits and verify ----------------------------------------------------------------------------
    stage_case("v01", "H (sha check: 'changed after its stage wrote it')", CI, ("--input-dir", f"{UP}/contrastive"),
               ("pairs.jsonl",), LIFECYCLE, build=upstream("contrastive", _pairs(_set_token(999999)))),
    stage_case("v02", "H", CI, ("--input-dir", f"{UP}/contrastive"), ("pairs.jsonl",), LIFECYCLE,
               build=upstream("contrastive", _pairs(_shorten))),
    stage_case("v03", "H", CI, ("--input-dir", "{run}/memorization"), ("memorization",), LIFECYCLE),
    stage_case("x-pairs-oov", "new: a resealed pairs.jsonl with a token >= vocab", CI,
               ("--input-dir", f"{UP}/contrastive"), ("999999",), INPUTS,
               build=upstream("contrastive", _pairs(_set_token(999999), seal=True))),
    stage_case("x-pairs-float", "new: a resealed pairs.jsonl with a float token", CI,
               ("--input-dir", f"{UP}/contrastive"), ("pairs.jsonl", "token ids"), INPUTS,
               build=upstream("contrastive", _pairs(_set_token(5.5), seal=True))),
    stage_case("x-pairs-unequal", "new: a resealed pairs.jsonl with clean/corrupt of unequal length", CI,
               ("--input-dir", f"{UP}/contrastive"), ("pairs.jsonl", "length"), INPUTS,
               build=upstream("contrastive", _pairs(_shorten, seal=True))),
    stage_case("e01", "H", V, ("--edge-counts", "-5", "3"), ("edge",), CONFIG_CLI),
    stage_case("e02", "H", V, ("--edge-counts", "100000"), ("100000",), CONFIG_CLI),
    stage_case("e03", "H (no marker)", V, ("--input-dir", f"{UP}/circuits"), ("prune_scores",), LIFECYCLE,
               build=upstream("circuits", _pickled_prune_scores)),
    stage_case("e04", "H ('re-run find_circuits': it could say the folder is another stage's)", V,
               ("--input-dir", "{run}/memorization"), ("memorization",), LIFECYCLE),
    # -- kfac_edit ------------------------------------------------------------------------------------------
    stage_case("k07", "H", K, ("--factors-file", "{tmp}/f.safetensors"), ("f.safetensors",), LIFECYCLE,
               build=file_builder("f.safetensors", _cut_factors)),
    stage_case("k08", "H (no marker)", K, ("--factors-file", "{tmp}/pk.safetensors"), ("pk.safetensors",), LIFECYCLE,
               build=file_builder("pk.safetensors", lambda p, c: write(p, pickle.dumps(Payload(c.marker))))),
    stage_case("x-factors-empty", "new: a 0-byte --factors-file", K, ("--factors-file", "{tmp}/e.safetensors"),
               ("e.safetensors",), LIFECYCLE, build=file_builder("e.safetensors", lambda p, _c: write(p, b""))),
    stage_case("k09", "H", K, ("--rhos", "0"), ("rhos",), CONFIG_CLI),
    stage_case("k10", "H", K, ("--rhos", "0.5", "1.5"), ("rhos", "1.5"), CONFIG_CLI),
    stage_case("k11", "B (minor): the message names rhos, not save_rho", K, ("--save-rho", "-0.2"), ("save_rho",),
               CONFIG_CLI),
    stage_case("k12", "H (lists the valid ones)", K, ("--projections", "mlp_foo"), ("mlp_foo",), MODELS),
    stage_case("k13", "H", K, ("--layers", "7"), ("7",), MODELS),
    stage_case("k14", "H", K, ("--layers", "-1"), ("-1",), MODELS),
    stage_case("k15", "B: NaN written into summary and manifest (not valid JSON)", K, ("--damping", "nan"),
               ("damping",), CONFIG_CLI),
    stage_case("x-factor-data-binary", "new: non-UTF-8 --factor-data .txt", K, ("--factor-data", "{tmp}/bin.txt"),
               ("bin.txt", "utf-8"), INPUTS, build=file_builder("bin.txt", _non_utf8)),
    # -- attention_bypass -----------------------------------------------------------------------------------
    stage_case("b01", "H", B, ("--layer-sets", "a,b"), ("a,b",), CONFIG_CLI),
    stage_case("b02", "H", B, ("--layer-sets", "0,9"), ("9",), MODELS),
    stage_case("b03", "H", B, ("--memorized-file", "{tmp}/obj.npy"), ("obj.npy",), INPUTS,
               build=file_builder("obj.npy", lambda p, c: npy(p, np.array([Payload(c.marker)] * 2, dtype=object)))),
    stage_case("b04", "H", B, ("--memorized-file", "{tmp}/oov.npy"), ("vocabulary",), INPUTS,
               build=file_builder("oov.npy", lambda p, _c: npy(p, np.full((2, 64), 999999, np.int64)))),
    stage_case("x-memfile-float", "new: float tokens in --memorized-file", B, ("--memorized-file", "{tmp}/mf.jsonl"),
               ("mf.jsonl",), INPUTS, build=file_builder("mf.jsonl", lambda p, _c: jsonl(p, FLOAT_ROWS))),
    stage_case("x-heldout-binary", "new: non-UTF-8 --heldout .txt", B, ("--heldout", "{tmp}/bin.txt"),
               ("bin.txt", "utf-8"), INPUTS, build=file_builder("bin.txt", _non_utf8)),
    # -- predict_memorization -------------------------------------------------------------------------------
    stage_case("q01", "H", P, ("--labels-file", "{tmp}/lab.jsonl"), ("class",), INPUTS,
               build=file_builder("lab.jsonl", lambda p, _c: jsonl(p, token_rows(12)))),
    stage_case("q02", "H", P, ("--dynamics-dir", "{run}/kfac"), ("kfac",), LIFECYCLE),
    stage_case("q03", "B (same root as d02)", P, ("--labels-file", "{tmp}/lab.jsonl"), ("lab.jsonl", "utf-8"), INPUTS,
               build=file_builder("lab.jsonl", lambda p, _c: write(p, GARBAGE))),
    stage_case("x-labels-float", "new: float tokens in --labels-file", P, ("--labels-file", "{tmp}/lab.jsonl"),
               ("lab.jsonl",), INPUTS, build=file_builder("lab.jsonl", lambda p, _c: jsonl(p, FLOAT_ROWS))),
    # -- training_dynamics ----------------------------------------------------------------------------------
    stage_case("y01", "H", D, (*DYN, "--checkpoints", "{tmp}/final", "{model}"), ("step",), MODELS, fast=False,
               build=lambda ctx: _ckpt_copy(ctx, "final")),
    stage_case("y02", "H", D, (*DYN, "--checkpoints", "{ckpt}/step-652", "{model}", "--steps", "652"), ("steps",),
               MODELS, fast=False),
    stage_case("y03", "B: dynamics/checkpoints/00000/ and an empty log.txt left (no marker)", D,
               (*DYN, "--checkpoints", "{tmp}/evil", "{model}", "--steps", "1", "2"), ("safetensors",), MODELS,
               fast=False, build=lambda ctx: pickle_model(ctx.tmp / "evil", ctx.marker, "raw")),
    stage_case("y04", "H", D, (*DYN, "--checkpoints", "{tmp}/nope", "{model}", "--steps", "1", "2"), ("nope",),
               MODELS, fast=False),
    stage_case("y05", "H", D, (*DYN, "--checkpoints", "{tmp}/noconf", "{model}", "--steps", "1", "2"),
               ("config.json",), MODELS, fast=False, build=lambda ctx: _ckpt_copy(ctx, "noconf", drop="config.json")),
    stage_case("y06", "B: a legit pickle checkpoint is loaded (as m04)", D,
               (*DYN, "--checkpoints", "{tmp}/legit", "{model}", "--steps", "1", "2"), ("safetensors",), MODELS,
               fast=False, build=lambda ctx: pickle_model(ctx.tmp / "legit", ctx.marker, "legit")),
    stage_case("x-steps-decreasing", "new: --steps 870 652 (not training order)", D,
               (*DYN, "--checkpoints", "{ckpt}/step-652", "{model}", "--steps", "870", "652"), ("steps",), MODELS,
               fast=False),
    stage_case("x-heldout-empty", "new: an empty --heldout file", B, ("--heldout", "{tmp}/empty.txt"), ("empty.txt",),
               INPUTS, build=file_builder("empty.txt", lambda p, _c: write(p, ""))),
    stage_case("x-factor-data-empty", "new: an empty --factor-data file", K, ("--factor-data", "{tmp}/empty.txt"),
               ("factor data",), INPUTS, build=file_builder("empty.txt", lambda p, _c: write(p, ""))),
    stage_case("x-memfile-empty", "new: an empty --memorized-file", B, ("--memorized-file", "{tmp}/empty.jsonl"),
               ("empty.jsonl",), INPUTS, build=file_builder("empty.jsonl", lambda p, _c: write(p, ""))),
    stage_case("x-labels-empty", "new: an empty --labels-file", P, ("--labels-file", "{tmp}/empty.jsonl"),
               ("empty.jsonl",), INPUTS, build=file_builder("empty.jsonl", lambda p, _c: write(p, ""))),
    stage_case("x-dyn-index-99", "new: --checkpoint-index 99 of 2", D, ("--checkpoint-index", "99"), ("99",),
               LIFECYCLE),
]


def _ckpt_copy(ctx: Ctx, name: str, drop: str | None = None) -> None:
    from fuzz.build import model_copy
    from fuzz.table import CHECKPOINTS

    model_copy(ctx.tmp / name, CHECKPOINTS / "step-652")
    if drop:
        (ctx.tmp / name / drop).unlink()
