"""Metrics: independent computations must agree (teacher-forced vs generated, ours vs nltk)."""

import copy
import io
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from nltk.translate.bleu_score import sentence_bleu

from bench.baselines import full_generation_scores
from memcirc.data import Columns, Window, load_documents, make_windows
from memcirc.scoring import add_texts, bleu4, levenshtein, parquet_bytes, score_windows, summarize
from memcirc.testbed import EVAL_DOCUMENTS

GEN_METRICS = ["exact", "lcp", "tf_accuracy", "token_match", "bleu4", "levenshtein"]


def _dp_levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _add_one(p_n, *args, **kwargs):
    # Lin & Och add-one on every order, applied to nltk's raw n-gram counts.
    return [(p.numerator + 1) / (p.denominator + 1) for p in p_n]


def test_bleu4_agrees_with_nltk():
    rng = random.Random(0)
    for _ in range(200):
        ref = [rng.randrange(6) for _ in range(rng.randint(8, 40))]
        hyp = [t if rng.random() < 0.7 else rng.randrange(6) for t in ref][: rng.randint(6, len(ref))]
        ours = bleu4(hyp, ref, smooth=False)
        assert ours == pytest.approx(sentence_bleu([ref], hyp), abs=1e-12)
        if set(hyp) & set(ref):  # nltk returns 0 early when no unigram matches, before smoothing
            assert bleu4(hyp, ref) == pytest.approx(sentence_bleu([ref], hyp, smoothing_function=_add_one))
    assert bleu4([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 1.0
    # No overlap at all: add-one gives (1/5 * 1/4 * 1/3 * 1/2) ** (1/4), never exactly 0.
    assert bleu4([9, 9, 9, 9], [1, 2, 3, 4]) == pytest.approx((1 / 120) ** 0.25)


def test_levenshtein_agrees_with_dynamic_programming():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.randrange(5) for _ in range(rng.randint(0, 15))]
        b = [rng.randrange(5) for _ in range(rng.randint(0, 15))]
        assert levenshtein(a, b) == _dp_levenshtein(a, b)


@pytest.fixture(scope="module")
def testbed_windows(testbed):
    docs = load_documents(str(EVAL_DOCUMENTS), Columns())
    return make_windows(docs, testbed.tokenizer, "testbed", 32, 32).windows


@pytest.fixture(scope="module")
def ours(testbed, testbed_windows):
    return score_windows(testbed.model, testbed_windows, pad_id=testbed.tokenizer.pad_token_id,
                         batch_size=64, metrics=GEN_METRICS)


def test_teacher_forced_equals_full_generation(testbed, testbed_windows, ours):
    """exact and lcp from one forward pass == those of greedy generation of the whole suffix;
    token_match generated only from the divergence == full generation's, on every window."""
    reference = full_generation_scores(testbed.model, testbed_windows, testbed.tokenizer.pad_token_id, 64)
    assert len(ours) == len(reference) == len(testbed_windows)
    for mine, ref in zip(ours, reference):
        assert (mine["exact"], mine["lcp"]) == (ref["exact"], ref["lcp"]), mine["id"]
        assert mine["token_match"] == pytest.approx(ref["token_match"], abs=1e-6), mine["id"]
        if not mine["exact"]:
            assert mine["generated"] == ref["generated"], mine["id"]
    # The testbed has both memorized and non-memorized windows, so this compared both paths.
    assert 0 < sum(r["exact"] for r in ours) < len(ours)
    assert len({r["lcp"] for r in ours}) > 5


def test_generation_metrics_of_exact_windows(ours):
    exact = [r for r in ours if r["exact"]]
    assert all(r["token_match"] == 1.0 and r["bleu4"] == 1.0 and r["levenshtein"] == 0.0 for r in exact)
    assert all("generated" not in r for r in exact)
    inexact = [r for r in ours if not r["exact"]]
    assert all(len(r["generated"]) == r["suffix_len"] for r in inexact)
    assert all(r["generated"][: r["lcp"]] == r["tokens"][r["prefix_len"]: r["prefix_len"] + r["lcp"]]
               for r in inexact)


def _mixed_lengths(windows, n=60):
    """Windows of different prefix and suffix lengths, so batches need padding."""
    rng = np.random.default_rng(0)
    picked = [windows[i] for i in rng.choice(len(windows), n, replace=False)]
    out = []
    for w in picked:
        cut = int(rng.integers(0, 12))
        p = int(rng.integers(20, 33))
        out.append(Window(id=w.id, tokens=w.tokens[cut:], prefix_len=p - cut,
                          source=w.source, doc=w.doc, offset=w.offset + cut, group=w.group))
    return out


def test_scores_do_not_depend_on_batch_size_or_padding_side(testbed, testbed_windows):
    # random-word canaries k >= 16 and corpus chunks: a cut start keeps some canaries exact (template and
    # shared-prefix canaries need their first tokens)
    windows = _mixed_lengths(testbed_windows[80:112] + testbed_windows[336:366])   # k = 16, 32; corpus
    pad = testbed.tokenizer.pad_token_id
    runs = [score_windows(testbed.model, windows, pad_id=pad, batch_size=b, metrics=GEN_METRICS,
                          padding_side=side) for b, side in [(1, "right"), (7, "right"), (64, "left"),
                                                             (5, "left")]]
    base = runs[0]
    assert len({len(w.tokens) for w in windows}) > 5 and 0 < sum(r["exact"] for r in base) < len(base)
    for other in runs[1:]:
        for a, b in zip(base, other):
            for key in ("exact", "lcp", "tf_accuracy", "token_match", "generated"):
                assert a.get(key) == b.get(key), (a["id"], key)
            for key in ("suffix_nll", "suffix_entropy", "bleu4", "levenshtein"):
                assert a[key] == pytest.approx(b[key], abs=1e-4), (a["id"], key)


def test_summary_groups(ours):
    summary = summarize(ours)
    assert summary["n_windows"] == len(ours)
    groups = summary["groups"]
    assert list(groups)[:7] == ["k=0", "k=1", "k=2", "k=4", "k=8", "k=16", "k=32"]
    assert sum(g["n"] for g in groups.values()) == len(ours)
    assert summary["metrics"]["exact"] == pytest.approx(np.mean([r["exact"] for r in ours]), abs=1e-6)


def test_progress_counts_every_window_once_and_changes_nothing(testbed, testbed_windows, ours):
    """`advance` is told per batch; the counts add up to the windows and the rows are the same bytes."""
    pad = testbed.tokenizer.pad_token_id
    for metrics, batch_size in ((GEN_METRICS, 64), (["exact"], 100)):
        calls = []
        rows = score_windows(testbed.model, testbed_windows, pad_id=pad, batch_size=batch_size,
                             metrics=metrics, advance=calls.append)
        assert sum(calls) == len(testbed_windows)
        n_tf = -(-len(testbed_windows) // batch_size)
        if metrics == ["exact"]:
            assert len(calls) == n_tf and calls[:-1] == [batch_size] * (n_tf - 1)
        else:
            assert rows == ours
            # One call per teacher-forced batch (its exact windows) plus one per decoded generation batch
            # (default 4 * batch_size rows, pooled across teacher-forced batches).
            n_gen = -(-sum(not r["exact"] for r in ours) // (4 * batch_size))
            assert n_tf + 1 <= len(calls) <= n_tf + n_gen + 1


def test_meter_lines_carry_rate_and_eta(monkeypatch):
    import logging

    import memcirc.logs as logs

    clock = iter([0.0, 5.0, 10.0, 40.0])   # start, two updates, close
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("memcirc.progress")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with logs.Meter("scoring", total=40, unit="windows", every_s=1.0) as meter:
            meter.update(10)      # t = 5: 2 windows/s, 30 to go -> ETA 15 s
            meter.update_to(20)   # t = 10: 2 windows/s, ETA 10 s
            meter.update_to(5)    # behind the count: nothing
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert messages == ["scoring: 10/40 windows (25%), 2 windows/s, ETA 15 s",
                        "scoring: 20/40 windows (50%), 2 windows/s, ETA 10 s",
                        "scoring: done, 20 windows in 40 s (0.5 windows/s)"]
    assert logs.duration(185) == "3 min 05 s" and logs.duration(7620) == "2 h 07 min"


def test_decoded_texts_show_every_token(testbed, ours):
    """prefix_text + suffix_text is the window's tokens decoded one by one (no token dropped or merged);
    continuation_text is the greedy continuation's, the true suffix's where exact."""
    rows = copy.deepcopy(ours)
    add_texts(rows, testbed.tokenizer, continuation=True)
    tok = testbed.tokenizer

    def one_by_one(ids):
        return "".join(tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids)

    for r in rows:
        assert r["prefix_text"] + r["suffix_text"] == one_by_one(r["tokens"]), r["id"]
        assert r["prefix_text"] == one_by_one(r["tokens"][:r["prefix_len"]])
        assert r["continuation_text"] == (r["suffix_text"] if r["exact"] else one_by_one(r["generated"]))
    assert any(r["continuation_text"] != r["suffix_text"] for r in rows)
    teacher_forced_only = [{k: v for k, v in r.items() if k in ("tokens", "prefix_len")} for r in ours[:3]]
    add_texts(teacher_forced_only, tok, continuation=False)
    assert all(set(r) == {"tokens", "prefix_len", "prefix_text", "suffix_text"} for r in teacher_forced_only)


def test_special_tokens_are_kept_in_the_text(testbed):
    tok = testbed.tokenizer
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    row = {"tokens": [eos, 100, 101, eos], "prefix_len": 2}
    add_texts([row], tok, continuation=False)
    assert row["prefix_text"].startswith(tok.eos_token) and row["suffix_text"].endswith(tok.eos_token)


def test_parquet_rows_equal_the_jsonl_rows(ours):
    """Every key of any row is a column; a row without it (exact windows have no 'generated') reads None."""
    rows = copy.deepcopy([r for r in ours if r["exact"]][:20] + [r for r in ours if not r["exact"]][:20])
    rows[1]["note"] = "only here"   # a key only one row has
    table = pq.read_table(io.BytesIO(parquet_bytes(rows)))
    names = list(dict.fromkeys(k for r in rows for k in r))
    assert table.column_names == names
    assert table.to_pylist() == [{k: r.get(k) for k in names} for r in rows]


def _old_path_rows(model, windows, pad, batch_size, padding_side):
    """The re-encoding reference: teacher-forced scores, then HF generate from P + lcp + 1 tokens."""
    from memcirc.scoring import continue_from_divergence, teacher_forced

    scores = []
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].tokens))
    by_index = {}
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        by_index.update(zip(idx, teacher_forced(model, [windows[i] for i in idx], pad, padding_side)))
    scores = [by_index[i] for i in range(len(windows))]
    continue_from_divergence(model, scores, pad, batch_size)
    return scores


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2", "olmo2", "gemma3"])
def test_continuation_from_the_cache_equals_re_encoding(tiny_loaded, family):
    """Decoding from the teacher-forced KV cache == HF generate from re-encoded prompts, every family
    (GPT-Neo local and Gemma 3 sliding-window layers included), both padding sides, mixed lengths,
    generation batches that pool several teacher-forced batches and ones smaller than them."""
    model = tiny_loaded[family].model
    rng = np.random.default_rng(1)
    windows = []
    for i in range(23):
        p, s = int(rng.integers(3, 12)), int(rng.integers(1, 14))
        windows.append(Window(id=str(i), tokens=rng.integers(1, 300, p + s), prefix_len=p, source="r",
                              doc=str(i), offset=0))
    # Make some windows (partly) greedy so that lcp > 0 and exact rows occur.
    for i in range(0, 23, 3):
        w = windows[i]
        ref = _old_path_rows(model, [w], 0, 1, "right")[0]
        cut = w.prefix_len + (0 if ref.exact else ref.lcp)
        tail = ref.generated if not ref.exact else w.tokens[w.prefix_len:].tolist()
        tokens = np.concatenate([w.tokens[:w.prefix_len], tail[:cut - w.prefix_len + 5]])
        windows[i] = Window(id=w.id, tokens=tokens[:len(w.tokens)], prefix_len=w.prefix_len, source="r",
                            doc=w.id, offset=0)
    for side, batch, gen_batch in [("right", 5, 12), ("left", 4, 3), ("right", 23, 64)]:
        ref = _old_path_rows(model, windows, 0, batch, side)
        rows = score_windows(model, windows, pad_id=0, batch_size=batch, metrics=GEN_METRICS, padding_side=side,
                             generation_batch_size=gen_batch)
        assert any(r["exact"] for r in rows) or any(r["lcp"] > 0 for r in rows)
        for r, s in zip(rows, ref):
            assert (r["exact"], r["lcp"]) == (s.exact, s.lcp), (family, side, r["id"])
            assert r.get("generated", r["tokens"][r["prefix_len"]:]) == s.generated, (family, side, r["id"])
