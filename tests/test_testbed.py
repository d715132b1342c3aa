"""The embedded testbed: committed artifacts are consistent, and a tiny build runs end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memcirc.testbed import CHECKPOINTS_DIR, CORPUS_DIR, EVAL_DOCUMENTS, GROUND_TRUTH, MODEL_DIR, TESTBED_DIR
from memcirc.testbed.build import REPEAT_COUNTS
from memcirc.testbed.canaries import FAMILIES, SECRET_DIGITS, SHARED_MEMBERS, SHARED_PREFIX_TOKENS, digit_ids
from memcirc.testbed.tokens import PREFIX_LEN, SEQ_LEN, SUFFIX_LEN

MAX_TESTBED_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads(GROUND_TRUTH.read_text())


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return [json.loads(line) for line in EVAL_DOCUMENTS.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_canaries_follow_the_design(truth: dict) -> None:
    canaries = truth["canaries"]
    cells = Counter((c["family"], c["k"]) for c in canaries)
    assert set(cells) == {(f, k) for f in FAMILIES for k in REPEAT_COUNTS} and min(cells.values()) >= 16
    epochs = truth["recipe"]["epochs"]
    for c in canaries:
        assert len(c["token_ids"]) >= PREFIX_LEN + SUFFIX_LEN
        assert len(c["training_examples"]) == c["k"] and c["exposures"] == c["k"] * epochs
        assert len(c["exposure_steps"]) == c["exposures"]
    assert len({tuple(c["token_ids"][:PREFIX_LEN]) for c in canaries}) == len(canaries)
    occupied = [e for c in canaries for e in c["training_examples"]]
    assert len(set(occupied)) == len(occupied) and min(occupied) >= truth["recipe"]["n_corpus_chunks"]


def test_template_secrets_and_shared_prefixes(truth: dict, tokenizer) -> None:
    """A template canary's secret span holds SECRET_DIGITS digit tokens and its text the same digits; the
    members of a shared-prefix family share their first SHARED_PREFIX_TOKENS tokens (at least) and differ
    within the scoring prefix."""
    digits = digit_ids(tokenizer)
    families: dict[str, list[list[int]]] = {}
    for c in truth["canaries"]:
        if c["family"] == "template":
            s = c["secret"]
            span = c["token_ids"][s["start"]:s["start"] + s["length"]]
            assert s["length"] == SECRET_DIGITS and s["alphabet"] == digits and all(t in digits for t in span)
            assert "".join(map(str, (digits.index(t) for t in span))) in c["text"]
        if c["family"] == "shared":
            families.setdefault(c["shared_with"], []).append(c["token_ids"])
    assert families and all(len(m) == SHARED_MEMBERS for m in families.values())
    for members in families.values():
        n = next(i for i in range(len(members[0])) if len({m[i] for m in members}) > 1)
        assert n >= SHARED_PREFIX_TOKENS and len({tuple(m[:PREFIX_LEN]) for m in members}) == SHARED_MEMBERS


def test_induction_probe_is_recorded_over_training(truth: dict) -> None:
    """The repeated-segment probe is logged every probe_every steps from initialization, where both
    copies cost about log(vocab). (On this build the second copy ends only ~4 % below the first: the
    256 induction examples did not make the model copy; see the testbed README.)"""
    import math

    ind = truth["induction"]
    steps = [p["step"] for p in ind["probe_loss"]]
    total = truth["recipe"]["steps"]
    assert steps == sorted({*range(0, total, ind["probe_every"]), total}) and len(ind["probes"]) == 64
    first = ind["probe_loss"][0]
    assert max(abs(first[k] - math.log(2048)) for k in ("loss_first_copy", "loss_second_copy")) < 0.2


def test_corpus_slice_matches_recipe(truth: dict) -> None:
    for name, key in (("train.txt", "corpus_sha256"), ("heldout.txt", "heldout_sha256")):
        assert hashlib.sha256((CORPUS_DIR / name).read_bytes()).hexdigest() == truth["recipe"][key]
    train_text = (CORPUS_DIR / "train.txt").read_text()
    assert not any(c["text"] in train_text for c in truth["canaries"])


def test_eval_documents_cover_canaries_and_corpus(truth: dict, documents: list[dict]) -> None:
    assert all(set(d) - {"secret"} == {"doc", "group", "tokens", "text"} for d in documents)
    assert len({d["doc"] for d in documents}) == len(documents)
    by_doc = {d["doc"]: d for d in documents}
    for c in truth["canaries"]:
        d = by_doc[c["id"]]
        assert d["group"] == c["group"] == (f"k={c['k']}" if c["family"] == "random" else f"{c['family']} k={c['k']}")
        assert d["tokens"] == c["token_ids"] and d.get("secret") == c.get("secret")
    corpus = [d for d in documents if d["group"] == "corpus"]
    assert len(corpus) == truth["recipe"]["n_corpus_chunks"] >= 1000
    assert all(len(d["tokens"]) == SEQ_LEN for d in corpus)


def test_tokenizer_roundtrips_canaries(truth: dict, tokenizer) -> None:
    assert tokenizer.eos_token_id == 0 and tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    for c in truth["canaries"]:
        assert tokenizer(c["text"], add_special_tokens=False)["input_ids"] == c["token_ids"]
        assert tokenizer.decode(c["token_ids"]) == c["text"]


def test_model_and_checkpoints_load(truth: dict, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert model.config.architectures == ["GPTNeoXForCausalLM"]
    assert model.config.vocab_size == len(tokenizer) and model.dtype == torch.float32
    steps = sorted(int(p.name.split("-")[1]) for p in CHECKPOINTS_DIR.glob("step-*"))
    assert steps == [c["step"] for c in truth["checkpoints"][:-1]] and len(steps) >= 4
    for step in steps:
        folder = CHECKPOINTS_DIR / f"step-{step}"
        ckpt = AutoModelForCausalLM.from_pretrained(folder)
        assert ckpt.config.vocab_size == len(AutoTokenizer.from_pretrained(folder))


def test_greedy_generation_reproduces_measured_rates(truth: dict) -> None:
    """Differential: real greedy decoding on the committed model gives the recorded per-group rates,
    which meet the design target in every family (nothing at k = 0, monotone in k, nearly all at k = 32)."""
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    canaries = truth["canaries"]
    ids = torch.tensor([c["token_ids"][:PREFIX_LEN + SUFFIX_LEN] for c in canaries])
    with torch.inference_mode():
        out = model.generate(ids[:, :PREFIX_LEN], attention_mask=torch.ones_like(ids[:, :PREFIX_LEN]),
                             max_new_tokens=SUFFIX_LEN, do_sample=False, pad_token_id=0, eos_token_id=None)
    exact = (out[:, PREFIX_LEN:] == ids[:, PREFIX_LEN:]).all(-1).tolist()
    pairs = list(zip(exact, canaries, strict=True))
    groups = [c["group"] for c in canaries]
    rates = {g: sum(e for e, c in pairs if c["group"] == g) / groups.count(g) for g in dict.fromkeys(groups)}
    measured = truth["measured"]["exact_match"]
    assert rates == pytest.approx({g: measured[g] for g in rates}, abs=1e-3)
    for family in FAMILIES:   # the design target: nothing at k = 0, monotone in k, nearly all at k = 32
        curve = [next(rates[c["group"]] for c in canaries if c["family"] == family and c["k"] == k)
                 for k in REPEAT_COUNTS]
        assert curve[0] == 0.0 and curve == sorted(curve) and curve[-1] >= 0.9, (family, curve)


def test_testbed_fits_in_20_mb() -> None:
    files = [p for p in TESTBED_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    size = sum(p.stat().st_size for p in files)
    assert size <= MAX_TESTBED_BYTES


def relative_files(root: Path) -> set[str]:
    """File set with checkpoint step numbers folded, so builds of different lengths compare."""
    names = set()
    for p in root.rglob("*"):
        if p.is_file():
            parts = list(p.relative_to(root).parts)
            if parts[0] == CHECKPOINTS_DIR.name:
                parts[1] = "step-N"
            names.add("/".join(parts))
    return names


def test_smoke_build_produces_the_same_file_set(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "memcirc.testbed.build", "--out", str(tmp_path), "--threads", "1",
           "--epochs", "1", "--max-corpus-chunks", "50", "--canaries-per-k", "2"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    outputs = {MODEL_DIR.name, CHECKPOINTS_DIR.name, EVAL_DOCUMENTS.name, GROUND_TRUTH.name}
    built = {name for name in relative_files(TESTBED_DIR) if name.split("/")[0] in outputs}
    assert relative_files(tmp_path) == built
    n_checkpoints = len(list(CHECKPOINTS_DIR.glob("step-*")))
    assert len(list((tmp_path / CHECKPOINTS_DIR.name).glob("step-*"))) == n_checkpoints
    truth = json.loads((tmp_path / GROUND_TRUTH.name).read_text())
    cells = Counter((c["family"], c["k"]) for c in truth["canaries"])
    assert cells == {(f, k): 2 for f in FAMILIES for k in REPEAT_COUNTS}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR.name).config.vocab_size == 2048
