"""memcirc.stress: each prefix perturbation on hand-made windows (exact token lists, skips counted,
BOS kept in front, seeded and deterministic), the evaluation against score_windows run directly, the
before/after comparison, and kfac_edit / attention_bypass with --stress on the testbed."""

import json

import numpy as np
import pytest
from conftest import REPO

from memcirc.cli import main
from memcirc.data import Window
from memcirc.evaluation import memorized_windows
from memcirc.scoring import score_windows
from memcirc.stages.attention_bypass import headline as bypass_headline
from memcirc.stages.kfac_edit import headline as kfac_headline
from memcirc.stress import (
    ORIGINAL,
    Perturbation,
    StressPlan,
    build,
    compare,
    dropped,
    longer_prefix,
    neutral_passage,
    original,
    prepended,
    score,
    shifted,
    shorter_prefix,
    substituted,
    table,
    upstream_documents,
)

DOC = list(range(100, 120))            # one document of 20 tokens
DOCS = {"d": DOC}


def window(tokens, prefix_len, offset, doc="d", wid=None):
    return Window(id=wid or f"{doc}@{offset}", tokens=np.asarray(tokens, np.int64), prefix_len=prefix_len,
                  source="hand", doc=doc, offset=offset)


W = window(DOC[4:11], 4, 4)            # prefix 104..107, suffix 108..110
W_BOS = window([0, *DOC[4:11]], 5, 4)  # the same with BOS (id 0) in front


def tokens(p: Perturbation) -> list[list[int]]:
    return [w.tokens.tolist() for w in p.windows]


# -- builders --------------------------------------------------------------------------------

def test_shifts_move_the_window_inside_its_document():
    assert tokens(shifted([W], DOCS, -2)) == [DOC[2:9]]
    assert tokens(shifted([W], DOCS, 2)) == [DOC[6:13]]
    late = shifted([W], DOCS, 9)                              # the window ends at the document's end
    assert tokens(late) == [DOC[13:20]] and late.windows[0].offset == 13 and late.windows[0].prefix_len == 4
    for s in (-5, 10):                                          # no room: skipped and counted
        p = shifted([W], DOCS, s)
        assert p.windows == [] and p.n_skipped == 1
    assert shifted([W], DOCS, 2).name == "shift+2" and shifted([W], DOCS, -2).name == "shift-2"


def test_longer_and_shorter_prefixes_keep_the_suffix():
    longer = longer_prefix([W], DOCS, 3)
    assert tokens(longer) == [DOC[1:11]] and longer.windows[0].prefix_len == 7 and longer.windows[0].offset == 1
    assert longer_prefix([W], DOCS, 5).n_skipped == 1           # only 4 tokens before the window
    shorter = shorter_prefix([W], 2)
    assert tokens(shorter) == [[106, 107, 108, 109, 110]] and shorter.windows[0].prefix_len == 2
    assert shorter_prefix([W], 4).n_skipped == 1                # at least one prefix token is left


def test_prepended_passage_goes_before_the_prefix_after_bos():
    p = prepended([W, W_BOS], [1, 2], bos_id=0)
    assert tokens(p) == [[1, 2, *DOC[4:11]], [0, 1, 2, *DOC[4:11]]]
    assert [w.prefix_len for w in p.windows] == [6, 7] and p.name == "prepend2"


def test_bos_stays_in_front():
    bos = 0
    assert tokens(shifted([W_BOS], DOCS, 2, bos)) == [[0, *DOC[6:13]]]
    assert tokens(longer_prefix([W_BOS], DOCS, 3, bos)) == [[0, *DOC[1:11]]]
    short = shorter_prefix([W_BOS], 2, bos)
    assert tokens(short) == [[0, 106, 107, 108, 109, 110]] and short.windows[0].prefix_len == 3
    assert tokens(dropped([W_BOS], 3, 0, bos)) == [[0, 107, 108, 109, 110]]


def test_document_tokens_must_match_the_window():
    other = {"d": [1] * 20}                                      # another tokenization of the document
    assert shifted([W], other, 1).n_skipped == 1 and longer_prefix([W], {}, 1).n_skipped == 1


def test_substitution_and_drop_spare_the_last_prefix_token():
    w = window([0, 0, 0, 0, 1, 1], 4, 0)
    # vocab 2: a substitution flips the token; 3 of the 3 positions before the last
    assert tokens(substituted([w], 3, vocab_size=2)) == [[1, 1, 1, 0, 1, 1]]
    assert substituted([w], 4, vocab_size=2).n_skipped == 1
    assert tokens(dropped([w], 3)) == [[0, 1, 1]] and dropped([w], 3).windows[0].prefix_len == 1
    assert dropped([w], 4).n_skipped == 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_substitution_is_seeded_and_per_window(k):
    windows = [window(DOC[i:i + 12], 8, i, wid=f"w{i}") for i in range(6)]
    a = substituted(windows, k, vocab_size=50, seed=3)
    assert tokens(a) == tokens(substituted(windows, k, vocab_size=50, seed=3))
    assert tokens(a)[2:3] == tokens(substituted(windows[2:3], k, vocab_size=50, seed=3))   # alone: the same
    assert tokens(a) != tokens(substituted(windows, k, vocab_size=50, seed=4))
    for w, new in zip(windows, a.windows, strict=True):
        changed = np.flatnonzero(w.tokens != new.tokens)
        assert len(changed) == k and changed.max() < w.prefix_len - 1 and new.tokens[changed].max() < 50
    d = dropped(windows, k, seed=3)
    assert tokens(d) == tokens(dropped(windows, k, seed=3))
    for w, new in zip(windows, d.windows, strict=True):
        assert new.prefix_len == w.prefix_len - k and new.tokens[new.prefix_len - 1] == w.tokens[w.prefix_len - 1]
        assert new.tokens[new.prefix_len:].tolist() == w.tokens[w.prefix_len:].tolist()


def test_build_names_origins_and_context_skips():
    windows = [W, window(DOC[0:7], 4, 0, wid="start")]
    plan = StressPlan(shifts=(2,), longer=(3,), shorter=(2,), substitute=(1,), drop=(1,), prepend=2)
    built = build(windows, plan, documents=DOCS, vocab_size=50, passage=[1, 2, 3], max_len=9)
    by = {p.name: p for p in built}
    assert list(by) == [ORIGINAL, "shift-2", "shift+2", "prefix+3", "prefix-2", "sub1", "drop1", "prepend2"]
    assert by["shift-2"].n_skipped == 1 and by["shift-2"].origins == [W.id]    # the start window has no room
    assert by["prefix+3"].n_skipped == 2        # the start window: no room; W's: 10 tokens > max_len 9
    assert by["prepend2"].n_skipped == 0 and tokens(by["prepend2"])[0] == [1, 2, *DOC[4:11]]
    assert all(len(p.windows) == len(p.origins) for p in built)
    assert [w.id for w in by["sub1"].windows] == [f"{W.id}|sub1", "start|sub1"]


def test_neutral_passage(testbed):
    ids = neutral_passage(testbed.tokenizer, 40)
    assert len(ids) == 40 and ids == neutral_passage(testbed.tokenizer, 40)


# -- evaluation ------------------------------------------------------------------------------

def test_compare_counts_what_comes_back():
    windows = [window(DOC[i:i + 7], 4, i, wid=f"w{i}") for i in range(4)]
    perts = [original(windows), shorter_prefix(windows, 1)]
    rows = lambda exact: [{"exact": e, "tf_accuracy": float(e), "lcp": 3 * e} for e in exact]   # noqa: E731
    before = {ORIGINAL: rows([1, 1, 1, 1]), "prefix-1": rows([1, 1, 0, 1])}
    after = {ORIGINAL: rows([0, 0, 1, 0]), "prefix-1": rows([1, 0, 0, 0])}   # w0 comes back without 1 token
    c = compare(perts, before, after)
    assert c["removed_standard"] == 0.75 and c["n_resurfaced"] == 1 and c["resurfaced"] == ["w0"]
    assert c["removed_under_stress"] == 0.5 and not c["passes"] and c["exceeds_original"] == []
    assert c["perturbations"]["prefix-1"]["survival"] == pytest.approx(1 / 3, abs=1e-6)
    assert c["perturbations"]["prefix-1"]["removed"] == pytest.approx(2 / 3, abs=1e-6)
    assert c["perturbations"]["prefix-1"]["n_resurfaced"] == 1 and c["perturbations"][ORIGINAL]["n_resurfaced"] == 0
    assert c["perturbations"][ORIGINAL]["after"] == {"exact": 0.25, "tf_accuracy": 0.25, "lcp": 0.75}
    assert c["perturbations"]["prefix-1"]["unperturbed_after"] == 0.25
    after[ORIGINAL] = rows([1, 0, 1, 0])
    assert compare(perts, before, after)["passes"]
    # a perturbation of some windows only is held against the same windows unperturbed
    part = Perturbation("part", windows[1:2], ["w1"])
    c = compare([*perts, part], {**before, "part": rows([1])}, {**after, "part": rows([1])})
    assert c["perturbations"]["part"]["unperturbed_after"] == 0.0 and c["exceeds_original"] == ["part"]
    assert c["resurfaced"] == ["w1"] and c["removed_under_stress"] == 0.25 and not c["passes"]


@pytest.fixture(scope="module")
def testbed_perturbations(scored, testbed):
    windows = memorized_windows(scored / "memorization")[:8]
    documents = upstream_documents(scored / "memorization", {w.doc for w in windows}, testbed.tokenizer)
    assert set(documents) == {w.doc for w in windows}
    plan = StressPlan(shifts=(2,), longer=(), shorter=(8,), substitute=(2,), drop=(1,), prepend=8)
    return windows, build(windows, plan, documents=documents, vocab_size=len(testbed.tokenizer),
                          passage=neutral_passage(testbed.tokenizer, 8))


def test_table_equals_score_windows_on_the_perturbed_windows(testbed, testbed_perturbations):
    windows, perts = testbed_perturbations
    by = {p.name: p for p in perts}
    assert len(by["shift+2"].windows) > 0 and by["shift-2"].n_skipped == len(windows)   # 'start' windows
    for w, o in zip(by["shift+2"].windows, by["shift+2"].origins, strict=True):   # really the document's text
        assert o == w.id.split("|")[0] and w.offset == 2
    got = table(perts, score(testbed.model, perts, pad_id=0, batch_size=5))
    for p in perts:
        direct = score_windows(testbed.model, p.windows, pad_id=0, batch_size=3)   # another batch layout
        assert got[p.name]["n"] == len(p.windows) and got[p.name]["n_skipped"] == p.n_skipped
        for m in ("exact", "tf_accuracy", "lcp"):
            expected = round(float(np.mean([float(r[m]) for r in direct])), 6) if direct else None
            assert got[p.name][m] == pytest.approx(expected, abs=1e-6)
    assert got[ORIGINAL]["exact"] == 1.0   # the memorized windows, unperturbed


# -- the stages ------------------------------------------------------------------------------

QUICK = ["--factor-tokens", "2000", "--rhos", "0.6", "--ppl-blocks", "4", "--device", "cpu"]


def _check_block(stress, stage):
    rows = stress["perturbations"]
    assert list(rows)[0] == ORIGINAL and len(rows) == 13
    assert rows[ORIGINAL]["before"]["exact"] == 1.0 and rows[ORIGINAL]["n_skipped"] == 0
    assert rows["shift-4"]["n"] == 0 and rows["shift-4"]["n_skipped"] == rows[ORIGINAL]["n"]   # 'start' windows
    assert stress["n_documents"] == rows[ORIGINAL]["n"] and stress["prepended"] == "held-out text"
    assert 0.0 <= stress["removed_under_stress"] <= stress["removed_standard"] <= 1.0
    manifest = json.loads((stage / "manifest.json").read_text())
    assert "stress.png" in {o["path"] for o in manifest["outputs"]} and (stage / "stress.png").stat().st_size > 0


def test_kfac_stress_block(scored, tmp_path):
    args = ["--config", str(REPO / "configs" / "testbed.yaml"), "--output-dir", str(tmp_path), "--input-dir",
            str(scored / "memorization"), "--limit", "12", *QUICK]
    assert main("kfac_edit", [*args, "--stress"]) == 0
    stage = tmp_path / "kfac"
    summary = json.loads((stage / "summary.json").read_text())
    stress = summary["stress"]
    _check_block(stress, stage)
    assert stress["edit"] == {"formula": summary["saved"]["formula"], "rho": summary["saved"]["rho"]}
    # the unperturbed windows after the edit: the saved setting's own measurement
    assert stress["perturbations"][ORIGINAL]["after"]["exact"] == pytest.approx(summary["saved"]["exact_after"])
    before = (stage / "manifest.json").read_bytes()
    assert main("kfac_edit", [*args, "--stress"]) == 0          # same config: a no-op
    assert (stage / "manifest.json").read_bytes() == before
    line = kfac_headline(summary, stage).splitlines()[-1]      # the run report's stress line
    assert line.startswith(f"K-FAC edit ({stress['edit']['formula']} rho={stress['edit']['rho']}) stress (")
    off = [*args, "--no-stress"]                                 # configs/testbed.yaml turns it on
    assert main("kfac_edit", off) == 2                           # --stress off is another run: --force
    assert main("kfac_edit", [*off, "--force"]) == 0
    assert "stress" not in json.loads((stage / "summary.json").read_text()) and not (stage / "stress.png").exists()


def test_bypass_stress_block(scored, tmp_path):
    args = ["--config", str(REPO / "configs" / "testbed.yaml"), "--output-dir", str(tmp_path), "--input-dir",
            str(scored / "memorization"), "--limit", "12", "--layers", "0", "1", "--ppl-blocks", "4",
            "--device", "cpu", "--stress"]
    assert main("attention_bypass", args) == 0
    stage = tmp_path / "bypass"
    summary = json.loads((stage / "summary.json").read_text())
    stress = summary["stress"]
    _check_block(stress, stage)
    chosen = min(summary["layers"], key=lambda e: (e["exact"], e["ppl"]))
    assert stress["edit"]["layers"] == [chosen["layer"]] and stress["edit"]["mode"] == "self"
    assert stress["perturbations"][ORIGINAL]["after"]["exact"] == pytest.approx(chosen["exact"])
    line = bypass_headline(summary, stage).splitlines()[-1]     # the run report's stress line
    assert line.startswith(f"attention bypass of block {chosen['layer']}: stress (")
