"""predict_memorization: features on hand-made sequences, both n-gram index backends (tokengrams, hash)
against a Counter and each other, the reported metrics against hand-computed values and the formulas
of tests/reference.py, grouped permutation importance against sklearn.inspection, and the stage on
the testbed canaries (labels from scores.jsonl or from tables) with its bad input."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from typing import cast

import numpy as np
import pytest
from conftest import REPO, build_tiny_model, build_tiny_tokenizer, rerecord
from reference import (
    average_precision_steps,
    pr_points_steps,
    roc_auc_pairs,
    roc_points_steps,
    threshold_counts,
)

from memcirc.cli import main
from memcirc.errors import InputError
from memcirc.predict.evaluate import (
    all_metrics,
    average_precision,
    fit_classifier,
    fold_statistics,
    group_permutation_importance,
    make_classifier,
    pr_auc_scorer,
    pr_points,
    roc_auc,
    roc_points,
    t_interval,
    threshold_metrics,
)
from memcirc.predict.features import (
    CONTROL,
    duplication_features,
    rare_tokens,
    rarity_features,
    repetition_features,
    token_logprobs,
    zlib_ratio,
)
from memcirc.predict.hashindex import HashIndex, build_index, ngram_hashes
from memcirc.predict.labels import doc_kind
from memcirc.predict.ngram import load_index
from memcirc.predict.suffixindex import build_suffix_index
from memcirc.stages.predict_memorization import headline
from memcirc.testbed import CHECKPOINTS_DIR, GROUND_TRUTH

CONFIG = ["--config", str(REPO / "configs" / "testbed.yaml"), "--device", "cpu"]


def predict(argv):
    return main("predict_memorization", [*CONFIG, *argv])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the n-gram index and the features -------------------------------------------------------

def _build(backend, docs, n, vocab_size, folder, **kw):
    if backend == "hash":
        return build_index(iter(docs), n, vocab_size=vocab_size, **kw)
    return build_suffix_index(iter(docs), n, vocab_size, folder / "ngram_index.safetensors", **kw)


@pytest.mark.parametrize("backend", ["hash", "tokengrams"])
def test_a_hand_made_corpus_gives_the_hand_counted_bigrams(backend, tmp_path):
    # bigrams of [1 2 3 1 2] and [2 3 1 2]: (1,2) 3 times, (2,3) and (3,1) twice; (2,2) only across the border
    index = _build(backend, [np.array([1, 2, 3, 1, 2]), np.array([2, 3, 1, 2])], 2, 5, tmp_path)
    counts = {q: int(index.ngram_counts(np.array(q))[0]) for q in [(1, 2), (2, 3), (3, 1), (2, 2), (4, 1)]}
    assert counts == {(1, 2): 3, (2, 3): 2, (3, 1): 2, (2, 2): 0, (4, 1): 0}
    assert index.distinct == 3 and index.unigram.tolist() == [0, 3, 4, 2, 0]
    np.testing.assert_array_equal(index.ngram_counts(np.array([2, 3, 1, 2, 2])), [2, 2, 3, 0])


@pytest.mark.parametrize("backend", ["hash", "tokengrams"])
def test_index_counts_equal_a_counter_of_tuples(backend, tmp_path):
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 50, 12)
    docs = [np.concatenate([rng.integers(0, 50, rng.integers(3, 30)), motif, rng.integers(0, 50, 5)])
            for _ in range(40)] + [rng.integers(0, 50, 2)]          # one document shorter than n
    n = 4
    truth = Counter(tuple(d[i:i + n].tolist()) for d in docs for i in range(len(d) - n + 1))
    index = _build(backend, docs, n, 50, tmp_path)
    queries = list(truth) + [tuple(rng.integers(0, 50, n).tolist()) for _ in range(200)]
    expected = np.array([truth.get(q, 0) for q in queries])
    np.testing.assert_array_equal([int(index.ngram_counts(np.array(q))[0]) for q in queries], expected)
    assert index.distinct == len(truth)
    np.testing.assert_array_equal(index.unigram, np.bincount(np.concatenate(docs), minlength=50))
    budget = _build(backend, docs, n, 50, tmp_path / "budget", token_budget=100)
    assert int(budget.meta["n_tokens"]) == 100 and budget.unigram.sum() == 100
    if backend == "hash":     # merged partial counts; the hashes are sorted
        chunked = build_index(iter(docs), n, vocab_size=50, flush_every=7)
        np.testing.assert_array_equal(chunked.count(ngram_hashes(np.array(queries), n)[:, 0]), expected)
        assert isinstance(index, HashIndex) and np.all(np.diff(index.hashes.astype(np.float64)) >= 0)
    else:                     # one suffix index counts every n
        for m in (1, 3, 9):
            other = Counter(tuple(d[i:i + m].tolist()) for d in docs for i in range(len(d) - m + 1))
            again = load_index(tmp_path / "ngram_index.safetensors", m)
            assert again.distinct == len(other)
            assert [int(again.ngram_counts(np.array(q))[0]) for q in list(other)[:50]] == list(other.values())[:50]


def test_both_backends_count_the_same_on_a_random_corpus(tmp_path):
    rng = np.random.default_rng(10)
    docs = [rng.integers(0, 30, rng.integers(1, 200)) for _ in range(300)]
    docs += docs[:40]                                                  # duplicated documents
    hashed, suffix = _build("hash", docs, 6, 70000, tmp_path), _build("tokengrams", docs, 6, 70000, tmp_path)
    assert suffix.meta["token_dtype"] == "uint32"                      # 70000 ids do not fit in uint16
    assert hashed.distinct == suffix.distinct and hashed.meta["n_tokens"] == suffix.meta["n_tokens"]
    for q in docs[::7] + [rng.integers(0, 30, 50) for _ in range(20)]:
        np.testing.assert_array_equal(hashed.ngram_counts(q), suffix.ngram_counts(q))


def test_index_round_trips_through_safetensors(tmp_path):
    index = build_index(iter([np.arange(20) % 7, np.arange(9)]), 3, vocab_size=10)
    index.meta.update(tokenizer_sha256="abc", corpus=json.dumps({"corpus": "x"}))
    index.save(tmp_path / "i.safetensors")
    back = load_index(tmp_path / "i.safetensors")
    assert back.n == 3 and back.meta["tokenizer_sha256"] == "abc" and back.meta["corpus"] == '{"corpus": "x"}'
    for name in ("hashes", "counts", "unigram"):
        np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
    assert isinstance(back, HashIndex) and back.hashes.dtype == np.uint64 and back.backend == "hash"


def test_a_suffix_index_round_trips_and_needs_its_files(tmp_path):
    path = tmp_path / "ngram_index.safetensors"
    index = build_suffix_index(iter([np.arange(20) % 7, np.arange(9)]), 3, 10, path, meta={"tokenizer_sha256": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(index.files(path)) == [
        "ngram_index.safetensors", "ngram_index.table", "ngram_index.tokens"]
    assert (tmp_path / "ngram_index.table").stat().st_size == 8 * (29 + 2)     # a u64 per token and separator
    back = load_index(path)
    assert back.backend == "tokengrams" and back.meta["tokenizer_sha256"] == "abc" and back.distinct == index.distinct
    np.testing.assert_array_equal(back.ngram_counts(np.arange(7)), index.ngram_counts(np.arange(7)))
    (tmp_path / "ngram_index.table").unlink()
    with pytest.raises(InputError, match="lacks ngram_index.table"):
        load_index(path)


@pytest.mark.parametrize("backend", ["hash", "tokengrams"])
def test_a_sequence_repeated_in_the_corpus_gets_the_higher_duplication_count(backend, tmp_path):
    rng = np.random.default_rng(1)
    repeated, once, unseen = (rng.integers(0, 200, 24) for _ in range(3))
    corpus = [repeated, rng.integers(0, 200, 50), repeated, once, repeated, rng.integers(0, 200, 50)]
    index = _build(backend, corpus, 4, 200, tmp_path)
    a, b, c = (duplication_features(s, 12, index) for s in (repeated, once, unseen))
    assert a["dup_min"] == pytest.approx(np.log(4)) and b["dup_min"] == pytest.approx(np.log(2))
    for key in ("dup_mean", "dup_max", "dup_min", "dup_prefix_min"):
        assert a[key] > b[key] > c[key], key
    assert c["dup_novel_share"] == 1.0 and a["dup_novel_share"] == b["dup_novel_share"] == 0.0


def test_a_repetitive_sequence_compresses_better_and_repeats_more():
    rng = np.random.default_rng(2)
    words = ["castle", "honour", "tempest", "dagger", "crown", "ghost", "island", "storm", "night", "blood"]
    varied = " ".join(rng.choice(words, 40))
    repetitive = " ".join(["the ghost walks"] * 14)
    assert zlib_ratio(repetitive) < zlib_ratio(varied)
    loop, mixed = np.tile([5, 6, 7], 20), rng.permutation(60)
    r_loop, r_mixed = repetition_features(loop), repetition_features(mixed)
    assert r_loop["distinct_token_share"] == pytest.approx(3 / 60) and r_mixed["distinct_token_share"] == 1.0
    assert r_loop["repeated_bigram_share"] == pytest.approx(1 - 3 / 59) and r_mixed["repeated_bigram_share"] == 0.0


def test_rare_tokens_are_the_tail_outside_ninety_percent_of_the_mass():
    unigram = np.array([50, 30, 9, 5, 3, 2, 1, 0])           # total 100
    rare = rare_tokens(unigram, 0.9)
    # 50 + 30 + 9 = 89 < 90, so the 4th most frequent (5) is still common; the rest are rare
    np.testing.assert_array_equal(rare, [False, False, False, False, True, True, True, True])
    f = rarity_features(np.array([0, 0, 4, 7]), unigram, rare)
    assert f["rare_token_share"] == 0.5
    assert f["unigram_logfreq_mean"] == pytest.approx(np.mean(np.log((unigram[[0, 0, 4, 7]] + 1) / 108)))


def test_batched_logprobs_equal_one_sequence_at_a_time(testbed):
    import torch

    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 2048, n) for n in (9, 30, 17, 30)]
    batched = token_logprobs(testbed.model, seqs, pad_id=0, batch_size=3)
    for s, lp in zip(seqs, batched):
        with torch.no_grad():
            logits = testbed.model(input_ids=torch.as_tensor(s)[None]).logits[0, :-1].double()
        direct = torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.as_tensor(s[1:])].numpy()
        np.testing.assert_allclose(lp, direct, atol=2e-5)


# -- the reported metrics against hand-computed values and tests/reference.py ------------------

def test_metrics_of_a_hand_made_input_equal_the_hand_computed_values():
    # positives score 0.9, 0.6, 0.4; negatives 0.6, 0.3, 0.1 (one tie)
    y, score = np.array([1, 1, 0, 1, 0, 0]), np.array([0.9, 0.6, 0.6, 0.4, 0.3, 0.1])
    m = all_metrics(y, score)
    assert m["auroc"] == pytest.approx((3 + 2.5 + 2) / 9)                 # pairs won, the tie one half
    assert m["pr_auc"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)   # ΔR·P at 0.9, 0.6, 0.4
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))   # >= 0.5: 2 tp, 1 fp
    fpr, tpr = roc_points(y, score)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1, 1])
    recall, precision = pr_points(y, score)
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(precision, [1, 2 / 3, 3 / 4, 3 / 5, 1 / 2])
    assert np.isnan(roc_auc(np.ones(3), score[:3])) and np.isnan(average_precision(np.zeros(3), score[:3]))


def _fixed_input():
    rng = np.random.default_rng(4)
    y = (rng.random(200) < 0.15).astype(int)
    score = np.round(np.clip(0.3 * y + rng.random(200) * 0.8, 0, 1), 1)   # rounded: many ties
    return y, score


def test_ranking_metrics_equal_the_reference_formulas():
    y, score = _fixed_input()
    yl, sl = y.tolist(), score.tolist()
    assert roc_auc(y, score) == pytest.approx(roc_auc_pairs(yl, sl), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(average_precision_steps(yl, sl), abs=1e-12)
    ours = (*roc_points(y, score), *pr_points(y, score))
    for a, b in zip(ours, (*roc_points_steps(yl, sl), *pr_points_steps(yl, sl)), strict=True):
        np.testing.assert_allclose(a, b)


@pytest.mark.parametrize("threshold", [0.5, 0.75, 2.0])     # 2.0: nothing predicted positive
def test_threshold_metrics_equal_the_confusion_counts(threshold):
    y, score = _fixed_input()
    assert threshold_metrics(y, score, threshold) == pytest.approx(threshold_counts(y.tolist(), score.tolist(),
                                                                                    threshold))


def test_t_interval_equals_the_hand_computed_one_and_covers_the_mean():
    values = [0.91, 0.97, 0.88, 0.95, 0.93]      # mean 0.928, sample variance 0.00488 / 4; t(0.975, 4) = 2.776445
    half = 2.776445105 * (0.00488 / 4 / 5) ** 0.5
    assert t_interval(values) == pytest.approx((0.928 - half, 0.928 + half), abs=1e-9)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5) and t_interval([0.9, 1.0, 1.0])[1] == 1.0   # clipped
    rng = np.random.default_rng(5)                                   # coverage over 2000 samples of 5 folds
    samples = 0.6 + 0.05 * rng.standard_normal((2000, 5))
    covered = np.mean([lo <= 0.6 <= hi for lo, hi in map(t_interval, samples)])
    assert 0.93 <= covered <= 0.97


def test_fold_statistics_report_mean_interval_and_folds():
    per_fold = [{"auroc": a, "pr_auc": a - 0.1, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
                for a in (0.9, 0.8, 1.0)]
    out = fold_statistics(per_fold)
    assert out["auroc"]["mean"] == pytest.approx(0.9) and out["auroc"]["folds"] == [0.9, 0.8, 1.0]
    assert out["auroc"]["ci95"] == pytest.approx(list(t_interval([0.9, 0.8, 1.0])), abs=1e-6)
    assert out["precision"]["ci95"] == [1.0, 1.0]


def test_grouped_importance_of_single_columns_equals_sklearn():
    from sklearn.inspection import permutation_importance
    from sklearn.utils import Bunch

    rng = np.random.default_rng(6)
    X = rng.standard_normal((120, 4))
    y = (X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.standard_normal(120) > 0.8).astype(int)
    model = fit_classifier("logistic_regression", make_classifier("logistic_regression", 0), X, y)
    ref = cast(Bunch, permutation_importance(model, X, y, scoring=pr_auc_scorer, n_repeats=5, random_state=7))
    ours = group_permutation_importance(model, X, y, {f"x{j}": [j] for j in range(4)}, 5, 7)
    for j in range(4):
        np.testing.assert_allclose(ours[f"x{j}"], ref.importances[j], atol=1e-12)
    both = group_permutation_importance(model, X, y, {"x0+x1": [0, 1], "x3": [3]}, 5, 7)
    assert both["x0+x1"].mean() > ours["x0"].mean() > both["x3"].mean()


def test_doc_kind_never_keeps_the_k_of_a_canary_id():
    assert doc_kind("canary-k08-03") == "canary" and doc_kind("corpus-0001") == "corpus"
    assert doc_kind("123") == "other"


# -- the stage on the testbed canaries -------------------------------------------------------

@pytest.fixture(scope="module")
def predicted(scored):
    assert predict(["--output-dir", str(scored)]) == 0
    return scored / "predict"


def test_stage_separates_memorized_windows_and_ranks_the_control_below_duplication(predicted, scored):
    summary = json.loads((predicted / "summary.json").read_text())
    assert summary["n_sequences"] == 112 and summary["n_memorized"] == 63
    assert summary["auroc"] > 0.9 and summary["pr_auc"] > 0.8
    assert summary["auroc_ci95"][0] <= summary["auroc"] <= summary["auroc_ci95"][1]
    assert set(summary["classifiers"]) == {"gradient_boosting", "logistic_regression"}
    assert "group" not in summary["features"] and not any("k=" in f for f in summary["features"])
    assert {"length", "offset"} <= set(summary["dropped_constant"])   # every window: 64 tokens at offset 0
    for name, c in summary["classifiers"].items():
        groups = {g["group"]: g["mean"] for g in c["group_importance"]}
        assert groups["duplication"] > 0.1 and groups["duplication"] > groups["control"] + 0.1, name
        assert abs(groups["control"]) < 0.05, name
    lr = {r["feature"]: r["mean"] for r in summary["classifiers"]["logistic_regression"]["importance"]}
    assert max(lr[f] for f in ("dup_mean", "dup_min", "dup_max", "dup_prefix_min")) > lr[CONTROL]
    manifest = json.loads((predicted / "manifest.json").read_text())
    assert manifest["stage"] == "predict_memorization" and manifest["status"] == "complete"
    written = {o["path"] for o in manifest["outputs"]}
    assert written == {"features.jsonl", "predictions.jsonl", "summary.json", "roc.png", "pr.png", "importance.png",
                       "features.png", "ngram_index.safetensors", "ngram_index.tokens", "ngram_index.table"}
    assert all((predicted / p).stat().st_size > 0 for p in written)


def test_summary_metrics_equal_the_reference_formulas_on_the_written_predictions(predicted):
    summary = json.loads((predicted / "summary.json").read_text())
    rows = _jsonl(predicted / "predictions.jsonl")
    y = [r["label"] for r in rows]
    fold = np.array([r["fold"] for r in rows])
    assert set(fold) == set(range(5))
    sizes = [(fold == k).sum() for k in range(5)]
    positives = [np.array(y)[fold == k].sum() for k in range(5)]
    assert max(sizes) - min(sizes) <= 1 and max(positives) - min(positives) <= 1     # stratified
    for name, c in summary["classifiers"].items():
        p = [r[f"p_{name}"] for r in rows]
        assert c["pooled"]["auroc"] == pytest.approx(roc_auc_pairs(y, p), abs=1e-5)
        assert c["pooled"]["pr_auc"] == pytest.approx(average_precision_steps(y, p), abs=1e-5)
        assert c["pooled"]["f1"] == pytest.approx(threshold_counts(y, p, 0.5)["f1"], abs=1e-5)
        for k in range(5):
            yk, pk = [v for v, f in zip(y, fold) if f == k], [v for v, f in zip(p, fold) if f == k]
            assert c["cv"]["auroc"]["folds"][k] == pytest.approx(roc_auc_pairs(yk, pk), abs=1e-5)
            assert c["cv"]["pr_auc"]["folds"][k] == pytest.approx(average_precision_steps(yk, pk), abs=1e-5)
    best = summary["classifiers"][summary["best_classifier"]]
    assert summary["auroc"] == max(c["cv"]["auroc"]["mean"] for c in summary["classifiers"].values())
    assert summary["pr_auc"] == best["cv"]["pr_auc"]["mean"]


def test_baseline_is_the_step_652_memorized_set_and_dup_counts_are_the_insertions(predicted, scored):
    """Two independent computations: the testbed build measured step-652's exact match per group, and
    knows how often each canary was inserted (k); the stage's baseline and n-gram counts must agree."""
    truth = json.loads(GROUND_TRUTH.read_text())
    step652 = next(c for c in truth["checkpoints"] if c["dir"].endswith("step-652"))["exact_match"]
    groups = {r["id"]: r["group"] for r in _jsonl(scored / "memorization" / "scores.jsonl")}
    preds = _jsonl(predicted / "predictions.jsonl")
    for group in {g for g in groups.values()}:
        hits = [r["baseline"] for r in preds if groups[r["id"]] == group]
        assert np.mean(hits) == pytest.approx(step652[group]), group
    feats = {r["id"]: r for r in _jsonl(predicted / "features.jsonl")}
    k_of = {f"{c['id']}@0": c["k"] for c in truth["canaries"] if f"{c['id']}@0" in feats}
    assert len(k_of) == 112   # the scored run's canaries (the random-word family)
    counts = {i: round(float(np.expm1(feats[i]["dup_min"]))) for i in k_of}
    assert all(counts[i] >= k for i, k in k_of.items())                  # every n-gram was inserted k times
    assert np.mean([counts[i] == k for i, k in k_of.items()]) > 0.9       # and (almost) nowhere else


def test_rerun_is_a_no_op_another_config_refuses(predicted, scored, capsys):
    before = (predicted / "manifest.json").read_bytes()
    assert predict(["--output-dir", str(scored)]) == 0
    assert (predicted / "manifest.json").read_bytes() == before
    assert "PR-AUC" in capsys.readouterr().out
    line = headline(json.loads((predicted / "summary.json").read_text()), predicted)
    assert line.startswith("predictor (") and "baseline (testbed step-652)" in line and "\n" not in line
    assert predict(["--output-dir", str(scored), "--folds", "4"]) == 2


def test_a_saved_index_is_reused_the_hash_backend_agrees_and_its_other_n_refused(predicted, scored, tmp_path,
                                                                                  capsys):
    index = predicted / "ngram_index.safetensors"       # the default backend's: tokengrams
    mem = ["--input-dir", str(scored / "memorization"), "--classifiers", "logistic_regression"]
    a = {r["id"]: r for r in _jsonl(predicted / "features.jsonl")}
    assert predict(["--output-dir", str(tmp_path / "reuse"), *mem, "--index-file", str(index)]) == 0
    assert a == {r["id"]: r for r in _jsonl(tmp_path / "reuse" / "predict" / "features.jsonl")}
    manifest = json.loads((tmp_path / "reuse" / "predict" / "manifest.json").read_text())
    assert not any(o["path"].startswith("ngram_index") for o in manifest["outputs"])
    assert any(i.get("path") == str(index) for i in manifest["inputs"])
    hashed = tmp_path / "hash" / "predict"              # the other backend counts the same n-grams
    assert predict(["--output-dir", str(hashed.parent), *mem, "--ngram-index", "hash"]) == 0
    assert a == {r["id"]: r for r in _jsonl(hashed / "features.jsonl")}
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (predicted, hashed))
    assert (ours["distinct_ngrams"], ours["corpus_tokens"]) == (theirs["distinct_ngrams"], theirs["corpus_tokens"])
    manifest = json.loads((hashed / "manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"] if o["path"].startswith("ngram_index")] == [
        "ngram_index.safetensors"]
    capsys.readouterr()                                 # a hash index has one n
    assert predict(["--output-dir", str(tmp_path / "n4"), *mem, "--index-file", str(hashed / "ngram_index.safetensors"),
                    "--ngram", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8-grams" in err and not (tmp_path / "n4").exists()


def _table_rows(scored):
    rows = _jsonl(scored / "memorization" / "scores.jsonl")
    return [r for r in rows if r["exact"]], [r for r in rows if not r["exact"]]


def test_labels_from_a_memorized_table_and_random_controls(scored, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    memorized, others = _table_rows(scored)
    controls = others + memorized[:3]   # random controls hold a few memorized sequences too
    order = np.random.default_rng(9).permutation(len(memorized) + len(controls)).tolist()  # training positions
    pq.write_table(pa.table({"index": order[:len(memorized)], "tokens": [r["tokens"] for r in memorized]}),
                   tmp_path / "memorized.parquet")
    folder = tmp_path / "controls"      # a dataset folder: read through datasets.load_dataset
    folder.mkdir()
    pq.write_table(pa.table({"Index": order[len(memorized):], "Tokens": [r["tokens"] + [0] * 8 for r in controls]}),
                   folder / "train.parquet")
    baseline = tmp_path / "small_model_memorized.jsonl"          # a smaller model's memorized set
    baseline.write_text("".join(json.dumps({"tokens": r["tokens"]}) + "\n" for r in memorized[:20]))
    out = tmp_path / "tables"
    assert predict(["--output-dir", str(out), "--labels-file", str(tmp_path / "memorized.parquet"),
                    "--controls-file", str(folder), "--baseline-model", str(baseline)]) == 0
    summary = json.loads((out / "predict" / "summary.json").read_text())
    assert summary["labels"] == "tables" and summary["n_sequences"] == 112 and summary["n_memorized"] == 63
    assert "train_index" in summary["features"]   # the index column is the training-order position
    assert summary["baseline"]["n_predicted"] == 20 and summary["baseline"]["all"]["precision"] == 1.0
    assert summary["baseline"]["all"]["recall"] == pytest.approx(20 / 63, abs=1e-6)
    feats = _jsonl(out / "predict" / "features.jsonl")
    assert {r["origin"] for r in feats if r["label"] == 0} == {"controls"} and len(feats) == 112


def test_labels_and_baseline_from_score_columns(scored, tmp_path):
    memorized, others = _table_rows(scored)
    table = tmp_path / "sampled.jsonl"     # pile-*-pythia-random-sampled style: a score per model size
    rows = [{"Index": i, "Tokens": r["tokens"], "big": float(r["exact"]), "small": float(r["lcp"] == 32 and i % 2)}
            for i, r in enumerate(memorized + others)]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "columns"
    assert predict(["--output-dir", str(out), "--labels-file", str(table), "--label-column", "big",
                    "--baseline-column", "small", "--classifiers", "logistic_regression"]) == 0
    summary = json.loads((out / "predict" / "summary.json").read_text())
    assert summary["n_memorized"] == 63 and summary["baseline"]["source"] == "column small"
    small = np.array([r["small"] for r in rows]) >= 1.0
    big = np.array([r["big"] for r in rows]) >= 1.0
    assert summary["baseline"]["all"]["recall"] == pytest.approx((small & big).sum() / big.sum(), abs=1e-6)


def test_when_the_onset_checkpoint_is_predicted_from_a_dynamics_run(scored, tmp_path):

    out = tmp_path / "when"
    mem = ["--input-dir", str(scored / "memorization")]
    assert main("training_dynamics", [*CONFIG, "--output-dir", str(out), *mem, "--no-circuits"]) == 0
    assert predict(["--output-dir", str(out), *mem, "--dynamics-dir", str(out / "dynamics"),
                    "--classifiers", "logistic_regression"]) == 0
    summary = json.loads((out / "predict" / "summary.json").read_text())
    onset = summary["onset"]
    truth = {r["id"]: r["onset_step"] for r in _jsonl(out / "dynamics" / "onsets.jsonl")}
    rows = [r for r in _jsonl(out / "predict" / "predictions.jsonl") if "onset_step" in r]
    assert onset["n"] == len(rows) == sum(v is not None for v in truth.values()) == 63
    assert all(r["onset_step"] == truth[r["id"]] and r["onset_checkpoint"] in onset["steps"] for r in rows)
    # the insertion count (in the duplication features) orders the onsets: k=16 and 32 first, then 4 and 8
    assert onset["model"]["spearman"] > 0.5
    assert onset["model"]["checkpoint_accuracy"] > onset["median_baseline"]["checkpoint_accuracy"]
    assert (out / "predict" / "onset.png").stat().st_size > 0
    assert predict(["--output-dir", str(out), *mem, "--dynamics-dir", "auto", "--classifiers", "logistic_regression",
                    "--force"]) == 0                          # auto: the run's own dynamics folder
    again = json.loads((out / "predict" / "summary.json").read_text())["onset"]
    assert again["model"] == onset["model"] and again["dynamics_dir"] == str(out / "dynamics")


# -- bad input -------------------------------------------------------------------------------

def _tiny_scored(tmp_path):
    """A memorization run of a tiny random GPT-NeoX with its own tokenizer (ids < 300, all inside the
    testbed vocabulary); half its windows are marked memorized so that only the tokenizer differs."""
    folder = tmp_path / "tiny-neox"
    build_tiny_model("gpt_neox").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    rng = np.random.default_rng(8)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"doc": f"d{i}", "tokens": rng.integers(1, 300, 64).tolist()}) + "\n"
                            for i in range(20)))
    out = tmp_path / "tiny-run"
    assert main("memorization_score", ["--model", str(folder), "--dataset", str(data), "--output-dir", str(out),
                                           "--prefix-len", "32", "--suffix-len", "32", "--device", "cpu",
                                           "--metrics", "exact"]) == 0
    scores = out / "memorization" / "scores.jsonl"
    scores.write_text("".join(json.dumps({**r, "exact": i % 2 == 0}) + "\n" for i, r in enumerate(_jsonl(scores))))
    rerecord(scores.parent)
    return folder, out


def test_bad_input_exits_2_with_one_line_and_writes_nothing(scored, tmp_path, capsys):
    memorized, others = _table_rows(scored)
    only = tmp_path / "only_memorized.jsonl"
    only.write_text("".join(json.dumps({"tokens": r["tokens"]}) + "\n" for r in memorized))
    foreign = tmp_path / "foreign.jsonl"                    # ids of a 50k-token vocabulary
    foreign.write_text("".join(json.dumps({"tokens": [t + 40000 * (i == 0) for t in r["tokens"]]}) + "\n"
                               for i, r in enumerate(others)))
    controls = tmp_path / "controls.jsonl"
    controls.write_text("".join(json.dumps({"tokens": r["tokens"]}) + "\n" for r in others))
    long_mem, long_ctl = tmp_path / "long_mem.jsonl", tmp_path / "long_ctl.jsonl"   # 256 tokens > context 128
    long_mem.write_text("".join(json.dumps({"tokens": r["tokens"] * 4}) + "\n" for r in memorized))
    long_ctl.write_text("".join(json.dumps({"tokens": r["tokens"] * 4}) + "\n" for r in others))
    tiny, tiny_run = _tiny_scored(tmp_path)
    mem = ["--input-dir", str(scored / "memorization")]
    step54, step652 = str(CHECKPOINTS_DIR / "step-54"), str(CHECKPOINTS_DIR / "step-652")
    cases = {
        "one class only": ["--labels-file", str(only)],
        "outside the reference model's vocabulary": ["--labels-file", str(only), "--controls-file", str(foreign)],
        "fewer --folds": [*mem, "--folds", "50"],
        "exceed the reference model's context": ["--labels-file", str(long_mem), "--controls-file", str(long_ctl),
                                                 "--prefix-len", "100", "--suffix-len", "100"],
        "--reference-model is required": ["--labels-file", str(only), "--controls-file", str(controls), "--model",
                                          str(tiny)],
        "encodes the label": [*mem, "--domain-column", "group"],
        "belong to model": [*mem, "--model", str(tiny), "--reference-model", step54, "--baseline-model", step652],
        "vocabulary differs": ["--output-dir", str(tiny_run), "--model", str(tiny), "--reference-model", step54,
                               "--baseline-model", step652, "--corpus", str(REPO / "memcirc/testbed/corpus/train.txt")],
        "training_dynamics folder": [*mem, "--dynamics-dir", str(tmp_path / "nowhere")],
        "no memorization run": [],
    }
    for needle, argv in cases.items():
        out = tmp_path / f"out-{abs(hash(needle))}"
        if not any(a == "--output-dir" for a in argv):
            argv = ["--output-dir", str(out), *argv]
        capsys.readouterr()
        assert predict(argv) == 2, needle
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert needle.replace("no memorization run", "memorization folder") in err, err
        assert not (out / "predict").exists() and not (tiny_run / "predict").exists()


def test_the_script_exits_2_on_a_one_class_scores_file(scored, tmp_path):
    run_dir = tmp_path / "allneg"
    shutil.copytree(scored / "memorization", run_dir / "memorization")
    scores = run_dir / "memorization" / "scores.jsonl"
    scores.write_text("".join(json.dumps({**r, "exact": False}) + "\n" for r in _jsonl(scores)))
    rerecord(run_dir / "memorization")
    r = subprocess.run([sys.executable, "predict_memorization.py", *CONFIG, "--output-dir", str(run_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "one class" in r.stderr, r.stderr
    assert not (run_dir / "predict").exists()
