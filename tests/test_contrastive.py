"""contrastive_dataset: the fast divergence finder against the predecessor's brute force, pair
invariants, splits, and the stage contract."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from bench.baselines import find_divergences_bruteforce
from memcirc.cli import main
from memcirc.contrastive import divergence_pairs, find_divergences, split_by_document
from memcirc.data import Window, read_scores
from memcirc.pairs import Pair


@pytest.fixture(scope="module")
def memorized(scored):
    return [w for w in read_scores(scored / "memorization") if w.score("exact")]


def test_fast_finder_equals_brute_force(testbed, memorized):
    """One teacher-forced pass + generation at candidate lengths == regenerating at every length."""
    assert len(memorized) > 20
    fast = find_divergences(testbed.model, memorized, metric="bleu")
    slow = find_divergences_bruteforce(testbed.model, memorized, metric="bleu")
    for a, b in zip(fast, slow):
        assert (a.position, a.resolved, a.generated) == (b.position, b.resolved, b.generated), a.window.id
        assert a.score_before == pytest.approx(b.score_before, abs=1e-12)
        assert a.score_after == pytest.approx(b.score_after, abs=1e-12)
    assert 0 < sum(d.resolved for d in fast) < len(fast)  # both outcomes were exercised


def test_divergence_pairs_follow_the_rule(testbed, memorized):
    divergences = find_divergences(testbed.model, memorized[:20], metric="memorization")
    pairs, _ = divergence_pairs(divergences)
    assert pairs and all(isinstance(p, Pair) for p in pairs)
    by_id = {d.window.id: d for d in divergences}
    for p in pairs:
        d = by_id[p.window_id]
        L, whole = p.extra["position"], d.window.tokens.tolist()
        assert len(p.clean) == len(p.corrupt) == L + 1
        assert list(p.clean[:L]) == list(p.corrupt[:L]) == whole[:L]
        assert p.clean[L] == whole[L] != p.corrupt[L] == d.generated[0]
        assert (p.answer, p.wrong) == (whole[L + 1], d.generated[1]) and p.answer != p.wrong
        assert all(type(t) is int for t in (*p.clean, *p.corrupt, p.answer, p.wrong))   # JSON-ready ids


def test_pairs_of_windows_are_token_lists_not_broadcast_arrays():
    """A Window's tokens are an ndarray: `tokens[:L] + [t]` would add t to every token instead of
    appending it. The pair builders must concatenate."""
    from memcirc.contrastive import Divergence

    window = Window(id="w", tokens=np.arange(10, 20, dtype=np.int64), prefix_len=5, source="s", doc="d", offset=0)
    pairs, _ = divergence_pairs([Divergence(window, 3, 1.0, 0.1, [99, 98, 97, 96, 95, 94, 93], True)])
    assert pairs[0].clean == (10, 11, 12, 13) and pairs[0].corrupt == (10, 11, 12, 99)
    assert (pairs[0].answer, pairs[0].wrong) == (14, 98)


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


def test_dataset_mode_pairs_share_the_decision_token(tmp_path):
    """Dataset mode needs non-memorized windows that share the decision token: the 112 random-word
    canaries of `scored` hold too few (49), so this scores the 336 canaries and 264 corpus chunks."""
    out = tmp_path / "ds"
    assert main("memorization_score", ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--limit", "600",
                                       "--metrics", "exact", "token_match", "--exposure-candidates", "0",
                                       "--device", "cpu"]) == 0
    argv = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--device", "cpu",
            "--contrastive-mode", "dataset", "--similarity", "token_overlap", "--low-max-lcp", "32"]
    assert contrastive(argv) == 0
    rows = {json.loads(x)["id"]: json.loads(x)
            for x in (out / "memorization" / "scores.jsonl").read_text().splitlines()}
    pairs = [json.loads(x) for x in (out / "contrastive" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
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


def test_bad_input_from_the_command_line(tmp_path):
    """The exit-code wiring through the real script: exit 2, exactly one line on stderr."""
    done = subprocess.run([sys.executable, str(REPO / "contrastive_dataset.py"), "--output-dir", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "no manifest.json" in done.stderr
    assert not (tmp_path / "contrastive").exists()


def test_divergence_search_reports_progress_per_batch(testbed, memorized, monkeypatch):
    import memcirc.contrastive as contrastive
    from memcirc.logs import Meter

    made = []

    class Recording(Meter):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.updates = []
            made.append(self)

        def update(self, n=1):
            self.updates.append(n)
            super().update(n)

    plain = find_divergences(testbed.model, memorized, metric="bleu", batch_size=8)
    monkeypatch.setattr(contrastive, "Meter", Recording)
    counted = find_divergences(testbed.model, memorized, metric="bleu", batch_size=8)
    assert [(d.position, d.generated) for d in counted] == [(d.position, d.generated) for d in plain]
    first, rounds = made[0], made[1:]
    assert first.desc == "divergence: teacher-forced pass" and first.total == len(memorized)
    assert sum(first.updates) == len(memorized) and max(first.updates) == 8
    assert rounds and all(sum(m.updates) == m.total and max(m.updates) <= 8 for m in rounds)
    assert rounds[0].desc.startswith("divergence round 1 (") and "windows resolved)" in rounds[0].desc
    assert rounds[0].unit == "continuations"


def test_break_position_summary_counts_each_group():
    """The summary's break-position distribution on hand-made breaks: quartiles, counts per L, the
    share beyond L = 4 overall and per group, and the headline that quotes it."""
    from memcirc.contrastive import Divergence
    from memcirc.stages.contrastive_dataset import _positions, headline

    def div(pos, group):
        w = Window(id=f"{group}-{pos}", tokens=np.zeros(8, dtype=np.int64), prefix_len=4, source="t", doc="d",
                   offset=0, group=group)
        return Divergence(w, pos, 1.0, 0.0, [], True)

    breaks = [div(1, "k=8"), div(1, "k=8"), div(13, "shared k=8"), div(15, "template k=8"), div(5, "template k=8")]
    pos = _positions(breaks)
    assert pos is not None and pos["quartiles"] == [1.0, 5.0, 13.0]
    assert pos["counts"] == {"1": 2, "5": 1, "13": 1, "15": 1}
    assert pos["beyond_short_context"] == 3 and pos["fraction_beyond_short_context"] == 0.6
    assert pos["groups"]["template k=8"] == {"n": 2, "median": 10.0, "beyond_short_context": 2}
    assert pos["groups"]["k=8"]["beyond_short_context"] == 0 and _positions([]) is None
    summary = {"mode": "divergence", "n_pairs": 5, "n_discovery": 3, "n_heldout": 2, "n_memorized": 9,
               "n_resolved": 5, "divergence_position": pos}
    assert headline(summary, None).endswith("breaks at context length L: median 5, 3 of 5 beyond L = 4")  # type: ignore[arg-type]
