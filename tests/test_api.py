"""The Python API (memcirc.score_texts, bypass_attention, kfac_edit) on a plain AutoModelForCausalLM:
score_texts gives the memorization stage's rows, the context managers change the model inside and
restore it bit for bit, and `import memcirc` imports no torch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

import memcirc
from memcirc.errors import InputError
from memcirc.kfac import edit as kfac_edit_lib
from memcirc.stages import kfac_edit as kfac_stage
from memcirc.testbed import EVAL_DOCUMENTS, MODEL_DIR

N_SCORED = 112    # the `scored` fixture's --limit: the testbed's 112 canaries
PROMPT = torch.tensor([[87, 269, 258, 298, 264, 295, 1182, 726, 515, 308, 481, 67]])


@pytest.fixture(scope="module")
def hf():
    """The testbed loaded as any transformers user would (a private copy: the tests edit it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, trust_remote_code=False)
    return model.eval(), AutoTokenizer.from_pretrained(MODEL_DIR, trust_remote_code=False)


@pytest.fixture(scope="module")
def documents():
    return [json.loads(line) for line in EVAL_DOCUMENTS.read_text().splitlines()[:N_SCORED]]


def score(model, tokenizer, documents, **kw):
    return memcirc.score_texts(model, tokenizer, [d["text"] for d in documents], 32, 32, batch_size=64,
                               ids=[d["doc"] for d in documents], groups=[d["group"] for d in documents],
                               source="testbed", **kw)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- import ----------------------------------------------------------------------------------

def test_import_is_light_and_names_are_lazy():
    code = ("import sys, memcirc; f = memcirc.score_texts; b = memcirc.bypass_attention; k = memcirc.kfac_edit; "
            "assert {'score_texts', 'kfac_edit'} <= set(dir(memcirc)); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        memcirc.nothing  # noqa: B018   (a name the API does not export)


# -- score_texts -----------------------------------------------------------------------------

def test_score_texts_equals_the_stage_rows(hf, documents, scored):
    stage = [json.loads(line) for line in (scored / "memorization" / "scores.jsonl").read_text().splitlines()]
    rows = score(hf[0], hf[1], documents, metrics=["exact", "token_match"])
    assert len(rows) == len(stage) == N_SCORED
    assert rows == stage          # every row and column of scores.jsonl (decoded text too), value for value
    assert "continuation_text" in rows[0]
    assert any(r["exact"] for r in rows) and not all(r["exact"] for r in rows)
    assert "generated" in rows[0] or "generated" in rows[-1]


def test_decoded_text_is_the_window(hf, documents):
    model, tokenizer = hf
    rows = score(model, tokenizer, documents[-8:], metrics=["exact", "bleu4"])
    for row in rows:
        ids = row["tokens"]
        assert tokenizer(row["prefix_text"], add_special_tokens=False)["input_ids"] == ids[:32]
        assert tokenizer(row["suffix_text"], add_special_tokens=False)["input_ids"] == ids[32:]
        if row["exact"]:
            assert row["continuation_text"] == row["suffix_text"]
        else:
            assert tokenizer.decode(row["generated"]) == row["continuation_text"] != row["suffix_text"]
    assert "continuation_text" not in score(model, tokenizer, documents[-2:])[0]   # no continuation computed
    assert "prefix_text" not in score(model, tokenizer, documents[-2:], decode=False)[0]


def test_loaded_model_token_ids_and_frame_agree(hf, testbed, documents):
    model, tokenizer = hf
    plain = score(model, tokenizer, documents[:20], decode=False)
    assert score(testbed, None, documents[:20], decode=False) == plain    # a memcirc LoadedModel
    ids = [tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in documents[:20]]
    by_ids = memcirc.score_texts(model, tokenizer, ids, 32, 32, batch_size=64, ids=[d["doc"] for d in documents[:20]],
                                 groups=[d["group"] for d in documents[:20]], source="testbed", decode=False)
    assert by_ids == plain
    frame = score(model, tokenizer, documents[:20], as_frame=True, decode=False)
    assert list(frame["id"]) == [r["id"] for r in plain] and list(frame["lcp"]) == [r["lcp"] for r in plain]


def test_bos_policy_and_short_texts(hf, documents, caplog):
    model, tokenizer = hf
    texts = [documents[0]["text"], "too short"]
    logger = logging.getLogger("memcirc.api")   # memcirc's loggers may not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        rows = memcirc.score_texts(model, tokenizer, texts, 32, 32, prepend_bos="always")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(rows) == 1 and "shorter than" in caplog.text                 # the short text has no row
    (row,) = rows
    assert row["prefix_len"] == 33 and row["tokens"][0] == tokenizer.bos_token_id
    plain = score(model, tokenizer, documents[:1])[0]["prefix_text"]
    assert row["doc"] == "0" and row["prefix_text"] == tokenizer.decode([tokenizer.bos_token_id]) + plain
    sliding = memcirc.score_texts(model, tokenizer, [documents[0]["text"]], 8, 8, windowing="sliding", stride=16)
    assert [r["offset"] for r in sliding] == list(range(0, 16 * len(sliding), 16)) and len(sliding) > 1


@pytest.mark.parametrize("bad, match", [
    (dict(texts="one string"), "not one string"),
    (dict(metrics=["exact", "rouge"]), "unknown metrics"),
    (dict(ids=["a"]), "ids has 1 entries"),
    (dict(prepend_bos="sometimes"), "prepend-bos"),
    (dict(windowing="random"), "windowing"),
])
def test_bad_arguments_are_input_errors(hf, documents, bad, match):
    kw = {"texts": [d["text"] for d in documents[:2]], "prefix_len": 32, "suffix_len": 32, **bad}
    with pytest.raises(InputError, match=match):
        memcirc.score_texts(hf[0], hf[1], **kw)


# -- bypass_attention ------------------------------------------------------------------------

def test_bypass_changes_generation_inside_and_restores_it(hf):
    model, tokenizer = hf
    before = state(model)

    def greedy() -> list[int]:
        out = model.generate(PROMPT, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return out[0].tolist()

    clean = greedy()
    with memcirc.bypass_attention(model, layers=1):
        bypassed = greedy()
    assert bypassed != clean and greedy() == clean and same(state(model), before)
    with pytest.raises(RuntimeError, match="boom"), memcirc.bypass_attention(model, [0, 2], mode="zero"):
        raise RuntimeError("boom")                        # the hooks go on an exception too
    assert greedy() == clean
    with pytest.raises(InputError, match="outside the model"), memcirc.bypass_attention(model, [9]):
        pass


# -- kfac_edit -------------------------------------------------------------------------------

def test_stage_file_names_are_the_stage_constants():
    assert (kfac_edit_lib.DELTAS_FILE, kfac_edit_lib.EDITED_MODEL_DIR) == (kfac_stage.DELTAS, kfac_stage.EDITED_MODEL)


def test_kfac_edit_equals_the_edited_model_and_restores_bitwise(hf, kfac_run):
    model, _ = hf
    before = state(model)
    saved = load_file(str(kfac_run / "kfac" / "edited_model" / "model.safetensors"))
    for where in (kfac_run, kfac_run / "kfac"):                   # the run folder or the stage folder
        with memcirc.kfac_edit(model, where) as info:
            assert info.source == "edited_model" and info.rho == 0.6 and info.formula == "original"
            now = state(model)
            assert same({k: now[k] for k in saved}, saved)        # bitwise the saved edited model
            assert not same(now, before)
        assert same(state(model), before)                          # bitwise the original again


def test_kfac_deltas_alone_and_a_hand_made_edit(hf, kfac_run, tmp_path):
    model, _ = hf
    before = state(model)
    deltas_file = tmp_path / "deltas.safetensors"
    shutil.copy(kfac_run / "kfac" / "deltas.safetensors", deltas_file)     # no edited_model/ next to it
    saved = load_file(str(kfac_run / "kfac" / "edited_model" / "model.safetensors"))
    with memcirc.kfac_edit(model, deltas_file) as info:
        assert info.source == "deltas" and info.params
        for name in info.params:   # weight + delta: the saved tensor up to one float32 rounding
            assert torch.allclose(model.get_parameter(name), saved[name], rtol=0, atol=1e-7)
    assert same(state(model), before)
    name = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    delta = torch.full_like(before[name], 0.25)
    with pytest.raises(RuntimeError, match="boom"), memcirc.kfac_edit(model, {name: delta}):
        assert torch.equal(model.get_parameter(name), before[name] + delta)
        raise RuntimeError("boom")                                 # restored on an exception too
    assert same(state(model), before)


def test_kfac_edit_refuses_what_does_not_fit(hf, kfac_run, tmp_path):
    model, _ = hf
    before = state(model)
    stage = tmp_path / "kfac"
    shutil.copytree(kfac_run / "kfac", stage)
    deltas = load_file(str(stage / "deltas.safetensors"))
    save_file({k: 2 * v for k, v in deltas.items()}, str(stage / "deltas.safetensors"))   # not edited_model - model
    (empty := tmp_path / "empty").mkdir()
    cases = [(stage, "another model"), (tmp_path / "nothing", "not found"), (empty, "no deltas.safetensors"),
             ({"gpt_neox.nope.weight": torch.zeros(2)}, "does not have"),
             ({"gpt_neox.layers.0.mlp.dense_4h_to_h.weight": torch.zeros(2, 2)}, "shape")]
    for edit, match in cases:
        with pytest.raises(InputError, match=match), memcirc.kfac_edit(model, edit):
            pass
    assert same(state(model), before)
