"""Exposure (memcirc.exposure): exact rank against a hand count and a brute-force enumeration, the
sampled estimate, the cap, ties, bad secrets, and the memorization_score stage's exposure outputs."""

import itertools
import json
import math
import random

import pytest
import torch

from memcirc.cli import main
from memcirc.data import Columns, Document, Secret, load_documents
from memcirc.errors import InputError
from memcirc.exposure import (
    SecretCase,
    _reencoded_logliks,
    candidate_logliks,
    exposure,
    sampled_indices,
    secret_case,
)

VOCAB = 8


class Bigram(torch.nn.Module):
    """A "model" whose logits at each position are a fixed row of `table` picked by the current token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


def scored_alphabet(scores):
    """A table where every context scores token t as scores[t] (others far below): ll order = score sum."""
    row = torch.full((VOCAB,), -30.0)
    for token, value in scores.items():
        row[token] = value
    return Bigram(row.expand(VOCAB, -1).clone())


def brute_force(model, context, secret, alphabet):
    """rank by enumerating R with one plain full forward per candidate (no batching, no cache)."""
    def ll(candidate):
        ids = torch.tensor([list(context) + list(candidate)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(candidate))
    values = {c: ll(c) for c in itertools.product(alphabet, repeat=len(secret))}
    return sum(v >= values[tuple(secret)] - 1e-9 for v in values.values()), values


def case(context, secret, alphabet, doc="d"):
    return SecretCase(doc=doc, group="g", context=tuple(context), secret=tuple(secret), alphabet=tuple(alphabet))


@pytest.mark.parametrize(("secret", "rank"), [((2, 2), 6), ((1, 1), 1), ((3, 3), 9), ((1, 2), 3), ((2, 3), 8)])
def test_exact_rank_by_hand(secret, rank):
    # scores 4, 2, 1: candidates at least as likely as (2, 2) score >= 4: 11 12 21 13 31 22; (1, 2) ties
    # (2, 1) exactly (a + b == b + a in floats), and a tie counts against the secret
    model = scored_alphabet({1: 4.0, 2: 2.0, 3: 1.0})
    result = exposure(model, case([5], secret, (1, 2, 3)), n_candidates=1000)
    assert result.exact and not result.capped and result.rank == rank and result.n_candidates == 9
    assert result.exposure == pytest.approx(math.log2(9) - math.log2(rank))
    assert result.log2_space == pytest.approx(math.log2(9))


def test_exact_rank_equals_brute_force_on_a_random_table():
    torch.manual_seed(0)
    model = Bigram(torch.randn(VOCAB, VOCAB) * 2)
    alphabet, context = (1, 3, 4, 6), (0, 2, 5)
    for secret in [(1, 1, 1), (6, 3, 4), (4, 4, 1)]:
        rank, values = brute_force(model, context, secret, alphabet)
        result = exposure(model, case(context, secret, alphabet), n_candidates=64, seed=3)
        assert result.exact and result.rank == rank
        assert result.secret_loglik == pytest.approx(values[secret], abs=1e-5)


def test_hf_model_cache_and_reencoding_agree_with_brute_force(tiny_loaded):
    for family in ("gpt2", "llama"):
        model = tiny_loaded[family].model
        alphabet, context, secret = (11, 12, 13, 14, 15), (40, 41, 42, 43), (13, 11, 15)
        rows = torch.tensor(list(itertools.product(alphabet, repeat=3)))
        cached = candidate_logliks(model, context, rows, batch_size=16)
        assert torch.allclose(cached, _reencoded_logliks(model, context, rows, 7), atol=1e-4)
        rank, values = brute_force(model, context, secret, alphabet)
        assert torch.allclose(cached, torch.tensor([values[tuple(r)] for r in rows.tolist()], dtype=torch.float64),
                              atol=1e-4)
        assert exposure(model, case(context, secret, alphabet), n_candidates=125).rank == rank


def test_sampled_with_every_other_candidate_equals_exact():
    torch.manual_seed(1)
    model = Bigram(torch.randn(VOCAB, VOCAB))
    c = case((0,), (2, 5, 7), (2, 5, 7))   # |R| = 27
    exact = exposure(model, c, n_candidates=27)
    sampled = exposure(model, c, n_candidates=26)   # drawn without replacement: all of R minus the secret
    assert exact.exact and not sampled.exact and sampled.n_candidates == 26
    assert sampled.rank == exact.rank and sampled.exposure == pytest.approx(exact.exposure)
    assert sampled.capped == (exact.rank == 1)


def test_sampled_estimate_is_near_the_exact_one_and_seeded():
    torch.manual_seed(2)
    model = Bigram(torch.randn(VOCAB, VOCAB))
    c = case((0,), (3, 4, 5, 6), tuple(range(1, 8)))   # |R| = 2401
    exact = exposure(model, c, n_candidates=5000)
    a, b = exposure(model, c, n_candidates=600, seed=7), exposure(model, c, n_candidates=600, seed=7)
    assert a == b and not a.exact
    assert abs(a.rank / 601 - exact.rank / 2401) < 0.06   # 600 of 2400 drawn: a few % at most
    other = exposure(model, case((0,), c.secret, c.alphabet, doc="e"), n_candidates=600, seed=7)
    assert other.secret_loglik == a.secret_loglik


def test_cap_when_no_candidate_is_as_likely():
    model = scored_alphabet({t: 5.0 if t == 3 else 0.0 for t in range(VOCAB)})
    alphabet = tuple(range(VOCAB))
    result = exposure(model, case((0,), (3,) * 6, alphabet), n_candidates=50)
    assert result.capped and result.rank == 1 and result.exposure == pytest.approx(math.log2(51))
    assert result.log2_space == pytest.approx(18.0)
    assert result.extrapolated is not None and math.log2(51) <= result.extrapolated <= 18.0


def test_ties_count_against_the_secret():
    model = scored_alphabet({1: 1.0, 2: 1.0, 3: 1.0})   # every candidate equally likely
    result = exposure(model, case([5], (2, 3), (1, 2, 3)))
    assert result.rank == 9 and result.exposure == 0.0
    sampled = exposure(model, case([5], (2, 3, 1, 1, 2, 3, 3), (1, 2, 3)), n_candidates=100)
    assert sampled.rank == 101 and sampled.exposure == 0.0 and not sampled.capped
    assert sampled.extrapolated is None   # all tie: no distribution to fit


def test_sampled_indices_are_distinct_uniform_draws_without_the_secret():
    picks = sampled_indices(50, 7, 49, random.Random(0))
    assert sorted(picks) == [i for i in range(50) if i != 7]
    huge = sampled_indices(10 ** 30, 5, 200, random.Random(0))
    assert len(set(huge)) == 200 and 5 not in huge and all(0 <= i < 10 ** 30 for i in huge)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("secret", "message"), [
    ({"start": 1, "length": 0, "alphabet": [1]}, "length"),
    ({"start": -1, "length": 2, "alphabet": [1]}, "start"),
    ({"start": 1, "length": 2, "alphabet": []}, "non-empty"),
    ({"start": 1, "length": 2, "alphabet": [1, 1]}, "distinct"),
    ({"start": 1, "length": 2, "alphabet": ["1"]}, "alphabet"),
    ({"start": 1, "length": 2}, "start, length and alphabet"),
    ([1, 2], "object"),
])
def test_bad_secret_metadata_is_an_input_error(tmp_path, secret, message):
    path = write_rows(tmp_path / "d.jsonl", [{"doc": "a", "tokens": [1, 2, 3], "secret": secret}])
    with pytest.raises(InputError, match=message) as info:
        list(load_documents(str(path), Columns()))
    assert "line 1" in str(info.value) and "\n" not in str(info.value)


def test_secret_is_read_and_rows_without_one_have_none(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"doc": "a", "tokens": [1, 2, 3], "secret":
                                              {"start": 1, "length": 2, "alphabet": [2, 3]}},
                                             {"doc": "b", "tokens": [1, 2, 3]}])
    a, b = load_documents(str(path), Columns())
    assert a.secret == Secret(start=1, length=2, alphabet=(2, 3)) and b.secret is None


@pytest.mark.parametrize(("tokens", "secret", "bos", "message"), [
    ([1, 2, 3], Secret(2, 2, (3,)), None, "runs past"),
    ([1, 2, 3], Secret(0, 2, (1, 2)), None, "no context"),
    ([1, 2, 3], Secret(1, 2, (2, 4)), None, "not in its alphabet"),
])
def test_secret_out_of_place_is_an_input_error(tokens, secret, bos, message):
    with pytest.raises(InputError, match=message):
        secret_case(Document(doc="a", tokens=tokens, secret=secret), tokens, bos)


def test_secret_at_the_start_takes_bos_as_context():
    document = Document(doc="a", tokens=[1, 2, 3], secret=Secret(0, 2, (1, 2)))
    assert secret_case(document, [1, 2, 3], bos_id=0).context == (0,)
    assert secret_case(Document(doc="a", tokens=[0, 1, 2], secret=Secret(1, 2, (1, 2))), [0, 1, 2], 0).context == (0,)


# -- the stage ---------------------------------------------------------------------------------

DIGITS = list(range(300, 310))


def secret_documents(path):
    """Five testbed-vocabulary documents: four with a secret (a 2-digit one is exact with 100 candidates)."""
    rng = random.Random(0)
    rows = []
    for i in range(5):
        tokens = [rng.randrange(400, 1000) for _ in range(30)]
        row = {"doc": f"s{i}", "group": ["k=1", "template k=8", "k=1", "corpus", "template k=8"][i], "tokens": tokens}
        if i != 3:
            length = 2 if i == 0 else 6
            tokens[12:12 + length] = [rng.choice(DIGITS) for _ in range(length)]
            row["secret"] = {"start": 12, "length": length, "alphabet": DIGITS}
        rows.append(row)
    return write_rows(path, rows)


def stage_argv(tmp_path, out):
    return ["--output-dir", str(out), "--dataset", str(secret_documents(tmp_path / "docs.jsonl")),
            "--token-column", "tokens", "--prefix-len", "8", "--suffix-len", "8", "--device", "cpu",
            "--metrics", "exact", "lcp", "--exposure-candidates", "100", "--no-decode-text"]


def test_stage_writes_exposure_rows_summary_and_figure(tmp_path):
    argv = stage_argv(tmp_path, tmp_path / "run")
    assert main("memorization_score", argv) == 0
    stage = tmp_path / "run" / "memorization"
    rows = [json.loads(line) for line in (stage / "exposure.jsonl").read_text().splitlines()]
    assert [r["doc"] for r in rows] == ["s0", "s1", "s2", "s4"]
    assert {"doc", "group", "exposure", "rank", "log2_space", "n_candidates", "exact", "capped",
            "secret_loglik"} <= set(rows[0])
    assert rows[0]["exact"] and rows[0]["n_candidates"] == 100 and not rows[1]["exact"]
    assert all(0 <= r["exposure"] <= r["log2_space"] + 1e-9 for r in rows)
    block = json.loads((stage / "summary.json").read_text())["exposure"]
    assert list(block["groups"]) == ["k=1", "template k=8"] and block["groups"]["k=1"]["n"] == 2
    assert block["n_candidates"] == 100 and block["seed"] == 0 and block["method"]
    assert block["groups"]["k=1"]["min"] == min(rows[0]["exposure"], rows[2]["exposure"])
    manifest = json.loads((stage / "manifest.json").read_text())
    assert {"exposure.jsonl", "exposure.png"} <= {o["path"] for o in manifest["outputs"]}
    before = (stage / "manifest.json").read_bytes()
    assert main("memorization_score", argv) == 0   # a re-run is a no-op
    assert (stage / "manifest.json").read_bytes() == before


def test_stage_exposure_from_shards_equals_one_job(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    assert main("memorization_score", stage_argv(tmp_path, one)) == 0
    for i in range(2):
        assert main("memorization_score", [*stage_argv(tmp_path, many), "--num-shards", "2",
                                           "--shard-index", str(i)]) == 0
    assert main("memorization_score", [*stage_argv(tmp_path, many), "--num-shards", "2", "--merge"]) == 0
    assert (one / "memorization" / "exposure.jsonl").read_bytes() == \
           (many / "memorization" / "exposure.jsonl").read_bytes()


def test_stage_without_exposure(tmp_path):
    assert main("memorization_score", [*stage_argv(tmp_path, tmp_path / "run"), "--exposure-candidates", "0"]) == 0
    stage = tmp_path / "run" / "memorization"
    assert not (stage / "exposure.jsonl").exists()
    assert "exposure" not in json.loads((stage / "summary.json").read_text())


def test_stage_refuses_a_misplaced_secret(tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", [{"doc": "a", "tokens": list(range(400, 430)),
                                              "secret": {"start": 3, "length": 2, "alphabet": DIGITS}}])
    argv = ["--output-dir", str(tmp_path / "run"), "--dataset", str(path), "--token-column", "tokens",
            "--prefix-len", "8", "--suffix-len", "8", "--device", "cpu"]
    assert main("memorization_score", argv) == 2
    assert "not in its alphabet" in capsys.readouterr().err


def test_stage_names_the_token_column_when_a_text_secret_does_not_fit(tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", [{"doc": "a", "text": "the king is dead, long live the king " * 4,
                                              "secret": {"start": 3, "length": 2, "alphabet": DIGITS}}])
    argv = ["--output-dir", str(tmp_path / "run"), "--dataset", str(path), "--prefix-len", "8",
            "--suffix-len", "8", "--device", "cpu"]
    assert main("memorization_score", argv) == 2
    err = capsys.readouterr().err
    assert "not in its alphabet" in err and "--token-column" in err
