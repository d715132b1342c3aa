"""memcirc.tasks: every generator's pairs (equal length, single-token answers, the corrupt prompt differs
exactly where the task substitutes), the split, the refusal of tokenizers that cannot pose a task, and
`--task` through find_circuits and verify_circuit on the testbed.

The tokenizers are built here (HF `tokenizers`, word level): one that splits numbers into two-digit
tokens (GPT-2-like years: ' 17', '32') and one that splits them into digits (SmolLM2, Llama).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from memcirc.errors import InputError
from memcirc.models.tokenizer import BosPolicy, encode
from memcirc.pairs import read_pairs, write_pairs
from memcirc.tasks import TASKS
from memcirc.tasks.generators import (
    GENERATORS,
    INDUCTION_PREFIX,
    INDUCTION_SEGMENT,
    lexicon,
    year_form,
)
from memcirc.tasks.source import task_pairs

NO_BOS = BosPolicy("never", None)


def word_tokenizer(numbers: str) -> PreTrainedTokenizerFast:
    """Every lexicon word (with and without a leading space), punctuation and numbers as tokens.
    numbers: "two_digit" (' 17', '32') or "digit" (' 1', '7', '3', '2')."""
    lex = lexicon()
    words = set(lex["names"]["male"] + lex["names"]["female"] + lex["ioi"]["places"] + lex["ioi"]["objects"]
                + lex["greater_than"]["nouns"] + [w for pair in lex["sva"]["nouns"] for w in pair]
                + lex["sva"]["verbs"] + list(lex["gender"]["pronouns"].values()))
    for template in (lex["ioi"]["templates"] + lex["greater_than"]["templates"] + lex["sva"]["templates"]
                     + lex["gender"]["templates"]):
        words.update(w for w in template.replace("{", " ").replace("}", " ").replace(",", " ").replace(".", " ")
                     .replace("'", " ").split())
    digits = [f"{i:02d}" for i in range(100)] if numbers == "two_digit" else [str(i) for i in range(10)]
    vocab = ["<unk>", "<bos>", ",", ".", "'", *sorted({f" {w}" for w in words} | words), *digits,
             *(f" {d}" for d in digits)]
    number = r" ?\d\d" if numbers == "two_digit" else r" ?\d"
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf" ?[A-Za-z]+|{number}|\S"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")


@pytest.fixture(scope="module", params=["two_digit", "digit"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return word_tokenizer(request.param)


def differing(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def test_the_registry_and_the_generators_name_the_same_tasks() -> None:
    from memcirc.option_groups import TaskChoice

    assert set(TASKS) == set(GENERATORS) == {"ioi", "greater_than", "sva", "gender", "induction"}
    assert TaskChoice.__dataclass_fields__["task"].metadata["choices"] == tuple(TASKS)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_pairs_have_equal_length_and_one_token_answers(tokenizer: PreTrainedTokenizerFast, task: str) -> None:
    prompts = GENERATORS[task](tokenizer, 40, random.Random(0), NO_BOS)
    assert len(prompts) == 40
    for p in prompts:
        assert len(p.clean) == len(p.corrupt)
        assert p.answers and p.wrongs and not set(p.answers) & set(p.wrongs)
        for t in (*p.answers, *p.wrongs):   # each answer is one vocabulary entry
            assert encode(tokenizer, tokenizer.convert_ids_to_tokens(t)) == [t]


def test_ioi_corrupt_replaces_exactly_the_three_names(tokenizer: PreTrainedTokenizerFast) -> None:
    for p in GENERATORS["ioi"](tokenizer, 30, random.Random(1), NO_BOS):
        io, s = p.answers[0], p.wrongs[0]
        assert p.clean.count(io) == 1 and p.clean.count(s) == 2   # IO once, the subject twice
        subject = [i for i, t in enumerate(p.clean) if t == s]
        assert differing(p.clean, p.corrupt) == sorted([p.clean.index(io), *subject])
        names = {tokenizer.convert_ids_to_tokens(t) for t in p.corrupt} & {f" {n}" for n in p.detail["corrupt_names"]}
        assert len(names) == 3 and io not in p.corrupt and s not in p.corrupt   # ABC: three new names


def test_greater_than_years_split_at_the_start_year(tokenizer: PreTrainedTokenizerFast) -> None:
    form, ids = year_form(tokenizer)
    for p in GENERATORS["greater_than"](tokenizer, 30, random.Random(2), NO_BOS):
        yy = p.detail["yy"]
        where = differing(p.clean, p.corrupt)
        if form == "two_digit":
            assert [ids.index(t) for t in p.answers] == list(range(yy + 1, 100))
            assert [ids.index(t) for t in p.wrongs] == list(range(yy + 1))
            assert len(where) == 1 and p.clean[where[0]] == ids[yy] and p.corrupt[where[0]] == ids[1]
        else:   # the next token is the tens digit: above yy's for, below against, equal for neither
            tens = yy // 10
            assert [ids.index(t) for t in p.answers] == list(range(tens + 1, 10))
            assert [ids.index(t) for t in p.wrongs] == list(range(tens))
            assert 1 <= len(where) <= 2 and where[-1] - where[0] <= 1


def test_sva_and_gender_flip_one_token_and_swap_the_answers(tokenizer: PreTrainedTokenizerFast) -> None:
    pronouns = {encode(tokenizer, " he")[0], encode(tokenizer, " she")[0]}
    verbs = {encode(tokenizer, " is")[0], encode(tokenizer, " are")[0]}
    for task, answers in (("sva", verbs), ("gender", pronouns)):
        prompts = GENERATORS[task](tokenizer, 40, random.Random(3), NO_BOS)
        for p in prompts:
            assert len(differing(p.clean, p.corrupt)) == 1
            assert {p.answers[0], p.wrongs[0]} == answers
        assert len({p.answers[0] for p in prompts}) == 2    # both answers occur


def test_induction_corrupt_changes_only_the_first_copy(tokenizer: PreTrainedTokenizerFast) -> None:
    for p in GENERATORS["induction"](tokenizer, 20, random.Random(4), NO_BOS):
        assert differing(p.clean, p.corrupt) == list(range(INDUCTION_SEGMENT))
        assert p.clean[INDUCTION_SEGMENT:] == p.clean[:INDUCTION_PREFIX]       # the second copy so far
        assert p.answers[0] == p.clean[INDUCTION_PREFIX] and p.wrongs[0] == p.corrupt[INDUCTION_PREFIX]


def test_task_pairs_split_half_and_half_and_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path) -> None:
    pairs = task_pairs("greater_than", tokenizer, 20, 0, NO_BOS)
    assert [p.split for p in pairs].count("heldout") == 10
    assert pairs == task_pairs("greater_than", tokenizer, 20, 0, NO_BOS)             # seeded
    assert [p.clean for p in pairs] != [p.clean for p in task_pairs("greater_than", tokenizer, 20, 1, NO_BOS)]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    back = read_pairs(tmp_path / "pairs.jsonl", vocab_size=len(tokenizer), max_len=64)
    assert [(p.answers, p.wrongs) for p in back] == [(p.answers, p.wrongs) for p in pairs]


def test_a_tokenizer_without_the_words_is_refused() -> None:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, " Mark": 1, " the": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+|\S"), behavior="isolated")
    small = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(InputError, match=r"only 1 of the 60 names as one token \(Mark\)"):
        GENERATORS["ioi"](small, 4, random.Random(0), NO_BOS)
    with pytest.raises(InputError, match="greater_than: this tokenizer encodes"):
        year_form(small)


# -- through the stages (the testbed) -------------------------------------------------------

def test_find_and_verify_a_task_circuit_on_the_testbed(tmp_path) -> None:
    from memcirc.cli import main

    common = ["--output-dir", str(tmp_path), "--task", "induction", "--bootstrap-resamples", "50"]
    assert main("find_circuits", [*common, "--task-pairs", "24", "--ig-steps", "1", "--curve-points", "4"]) == 0
    found = tmp_path / "circuits-induction"
    manifest = json.loads((found / "manifest.json").read_text())
    assert "pairs.jsonl" in [o["path"] for o in manifest["outputs"]]
    assert manifest["inputs"][0]["generated"]["task"] == "induction"
    summary = json.loads((found / "summary.json").read_text())
    assert summary["task"]["n_pairs"] == 12 and 0 <= summary["task"]["accuracy"] <= 1
    assert main("verify_circuit", ["--output-dir", str(tmp_path), "--task", "induction", "--bootstrap-resamples",
                                   "50", "--random-circuits", "2", "--ablations", "resample"]) == 0
    verify = json.loads((tmp_path / "verify-induction" / "summary.json").read_text())
    assert verify["n_pairs"] == 12 and verify["circuit_edges"] == summary["minimal_edges"]
    # the memorization circuit's folder is another one: verify without --task does not read the task's
    with pytest.raises(InputError, match="no manifest.json"):
        from memcirc.stages.configs.verify_circuit import VerifyConfig
        from memcirc.stages.verify_circuit import run
        run(VerifyConfig(output_dir=str(tmp_path)))


def test_a_task_the_testbed_cannot_pose_fails_before_any_work(tmp_path) -> None:
    from memcirc.cli import main

    assert main("find_circuits", ["--output-dir", str(tmp_path), "--task", "ioi"]) != 0
    assert not (tmp_path / "circuits-ioi").exists()


def test_greater_than_takes_its_probability_metric() -> None:
    from memcirc.stages.configs.find_circuits import CircuitsConfig

    greater = CircuitsConfig(task="greater_than")
    assert (greater.faithfulness_metric, greater.grad_function) == ("prob_diff", "prob")
    kept = CircuitsConfig(task="greater_than", faithfulness_metric="answer_logprob")
    assert kept.faithfulness_metric == "answer_logprob"          # configured explicitly: kept (the stage warns)
    assert CircuitsConfig(task="ioi").faithfulness_metric == "logit_diff"
