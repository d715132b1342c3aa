"""contrastive_dataset: the fast divergence finder against the predecessor's brute force, pair
invariants, splits, and the stage contract."""

import json

import pytest

from memcirc.cli import main
from memcirc.contrastive import (
    divergence_pairs,
    find_divergences,
    find_divergences_bruteforce,
    split_by_document,
)


@pytest.fixture(scope="module")
def memorized(scored):
    rows = [json.loads(line) for line in (scored / "memorization" / "scores.jsonl").read_text().splitlines()]
    return [r for r in rows if r["exact"]]


def test_fast_finder_equals_brute_force(testbed, memorized):
    """One teacher-forced pass + generation at candidate lengths == regenerating at every length."""
    assert len(memorized) > 20
    fast = find_divergences(testbed.model, memorized, metric="bleu")
    slow = find_divergences_bruteforce(testbed.model, memorized, metric="bleu")
    for a, b in zip(fast, slow):
        assert (a.position, a.resolved, a.generated) == (b.position, b.resolved, b.generated), a.window["id"]
        assert a.score_before == pytest.approx(b.score_before, abs=1e-12)
        assert a.score_after == pytest.approx(b.score_after, abs=1e-12)
    assert 0 < sum(d.resolved for d in fast) < len(fast)  # both outcomes were exercised


def test_divergence_pairs_follow_the_rule(testbed, memorized):
    divergences = find_divergences(testbed.model, memorized[:20], metric="memorization")
    pairs, _ = divergence_pairs(divergences)
    assert pairs
    by_id = {d.window["id"]: d for d in divergences}
    for p in pairs:
        d = by_id[p["window_id"]]
        L, whole = p["position"], d.window["tokens"]
        assert len(p["clean"]) == len(p["corrupt"]) == L + 1
        assert p["clean"][:L] == p["corrupt"][:L] == whole[:L]
        assert p["clean"][L] == whole[L] != p["corrupt"][L] == d.generated[0]
        assert (p["answer"], p["wrong"]) == (whole[L + 1], d.generated[1]) and p["answer"] != p["wrong"]


def test_split_by_document_is_disjoint_and_deterministic():
    docs = [f"d{i}" for i in range(50)] * 3
    split = split_by_document(docs, 0.3, seed=0)
    assert split == split_by_document(list(reversed(docs)), 0.3, seed=0)
    assert sum(v == "heldout" for v in split.values()) == 15
    assert split != split_by_document(docs, 0.3, seed=1)
    assert set(split_by_document(["a", "b"], 0.01, seed=0).values()) == {"heldout", "discovery"}


def contrastive(argv):
    return main("contrastive_dataset", argv)


def test_stage_outputs_splits_and_rerun(scored, capsys):
    argv = ["--config", "configs/testbed.yaml", "--output-dir", str(scored), "--device", "cpu"]
    assert contrastive(argv) == 0
    stage = scored / "contrastive"
    pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["clean"]) == len(p["corrupt"]) for p in pairs)
    docs = {s: {p["doc"] for p in pairs if p["split"] == s} for s in ("discovery", "heldout")}
    assert docs["discovery"] and docs["heldout"] and not docs["discovery"] & docs["heldout"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"][0]["run_id"]
    before = (stage / "manifest.json").read_bytes(), (stage / "pairs.jsonl").read_bytes()
    assert contrastive(argv) == 0
    assert ((stage / "manifest.json").read_bytes(), (stage / "pairs.jsonl").read_bytes()) == before
    assert (stage / "divergence.png").stat().st_size > 0


def test_dataset_mode_pairs_share_the_decision_token(scored, tmp_path):
    out = tmp_path / "ds"
    argv = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--device", "cpu",
            "--input-dir", str(scored / "memorization"), "--contrastive-mode", "dataset",
            "--similarity", "token_overlap", "--low-max-lcp", "32"]
    assert contrastive(argv) == 0
    rows = {json.loads(x)["id"]: json.loads(x)
            for x in (scored / "memorization" / "scores.jsonl").read_text().splitlines()}
    pairs = [json.loads(x) for x in (out / "contrastive" / "pairs.jsonl").read_text().splitlines()]
    for p in pairs:
        d = p["position"]
        low = rows[p["corrupt_window_id"]]["tokens"]
        assert p["corrupt"] == low[:d] and low[d] == p["wrong"] == rows[p["window_id"]]["tokens"][d]
        assert p["doc"] != p["corrupt_doc"]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input(scored, tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "bad"
    base = ["--output-dir", str(out), "--device", "cpu", "--input-dir", str(scored / "memorization")]
    assert contrastive(base + ["--memorized-by", "tf_accuracy", "--threshold", "1.5"]) == 2
    assert "lower --threshold or score more data" in _one_error_line(capsys)
    assert contrastive(["--output-dir", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "no manifest.json" in _one_error_line(capsys)
    assert contrastive(base + ["--model", str(tiny_model_dirs["gpt_neox"])]) == 2
    assert "memorization scores belong to model 'testbed'" in _one_error_line(capsys)
    assert contrastive(base + ["--memorized-by", "bleu4"]) == 2
    assert "no 'bleu4' column" in _one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "nothing" / "contrastive").exists()
