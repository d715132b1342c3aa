"""Circuit discovery and verification (find_circuits, verify_circuit) on tiny models and the testbed.

Unit level: the one faithfulness code path reproduces the clean run with every edge and the ablated
run with none (for every ablation), F(all) = 1 and F(none) = 0, attribution and evaluation agree with
auto-circuit's own functions, the minimal search equals a brute-force scan. Stage level: both scripts
through `memcirc.cli.main` on a tiny random GPT-Neo and on the testbed, idempotent re-runs, and bad
input (exit 2, one line, nothing written).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rerecord

from memcirc import artifacts as art
from memcirc.bootstrap import PairBootstrap
from memcirc.circuits import (
    Ablation,
    FaithfulnessEvaluator,
    attribute_edges,
    build_graph,
    circuit_outputs,
    discover_circuit,
    edge_ranking,
    load_prune_scores,
    make_batches,
    minimal_circuit,
    top_k,
)
from memcirc.circuits.faithfulness import faithfulness
from memcirc.cli import main
from memcirc.errors import InputError
from memcirc.manifest import StageRun
from memcirc.option_groups import CircuitOptions
from memcirc.pairs import Pair, read_pairs
from memcirc.testbed import GROUND_TRUTH

ABLATIONS = ("resample", "zero", "mean")


# -- fixtures: pairs written as a finished contrastive stage -----------------------------------

def write_pairs_stage(out: Path, rows: list[dict], identity: dict) -> Path:
    """A complete contrastive/ folder holding `rows`, as the contrastive stage would leave it."""
    stage_dir = out / "contrastive"
    stage = StageRun(stage_dir, "contrastive_dataset", {"fixture": True}, art.sha256_json(rows), run_root=out)
    stage.open(force=True)
    stage.start(force=True)
    n = art.write_jsonl(stage_dir / "pairs.jsonl", rows)
    stage.finish({"pairs.jsonl": n}, model=identity)
    return stage_dir


def random_pairs(n: int, lengths: tuple[int, ...], vocab: int, seed: int = 0,
                 heldout_every: int = 3) -> list[dict]:
    """Random clean prompts; corrupt = one token replaced; random answer and wrong token."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        clean = [rng.randrange(1, vocab) for _ in range(length)]
        corrupt = list(clean)
        j = rng.randrange(length)
        corrupt[j] = (clean[j] + 1 + rng.randrange(vocab - 2)) % (vocab - 1) + 1
        answer, wrong = rng.sample(range(1, vocab), 2)
        doc = f"doc-{i // 2}"
        split = "heldout" if (i // 2) % heldout_every == 0 else "discovery"
        rows.append({"id": f"p{i}", "window_id": doc, "source": "fixture", "doc": doc, "group": None,
                     "mode": "divergence", "split": split, "clean": clean, "corrupt": corrupt,
                     "answer": answer, "wrong": wrong, "position": length})
    return rows


def canary_pairs(model: torch.nn.Module, lengths: tuple[int, ...] = (8, 14)) -> list[dict]:
    """Pairs from memorized testbed canaries (k = 16, 32): clean = the canary's first L tokens
    (greedy predicts the true next token), corrupt = one token replaced, answer = the true next
    token, wrong = the corrupt run's argmax (kept only when it differs). Every third canary is held out."""
    canaries = [c for c in json.loads(Path(GROUND_TRUTH).read_text())["canaries"] if c["k"] in (16, 32)]
    rows = []
    for ci, canary in enumerate(canaries):
        ids = canary["token_ids"]
        for length in lengths:
            clean = ids[:length]
            with torch.no_grad():
                if int(model(torch.tensor([clean])).logits[0, -1].argmax()) != ids[length]:
                    continue
                for j in range(length - 1, -1, -1):
                    corrupt = list(clean)
                    corrupt[j] = (clean[j] + 97) % 2000 + 1
                    wrong = int(model(torch.tensor([corrupt])).logits[0, -1].argmax())
                    if wrong != ids[length]:
                        rows.append({"id": f"{canary['id']}@{length}", "window_id": canary["id"],
                                     "source": "testbed", "doc": canary["id"], "group": f"k={canary['k']}",
                                     "mode": "divergence", "split": "heldout" if ci % 3 == 0 else "discovery",
                                     "clean": clean, "corrupt": corrupt, "answer": ids[length],
                                     "wrong": wrong, "position": length})
                        break
    return rows


@pytest.fixture(scope="module")
def neox(tiny_loaded):
    """Tiny random GPT-NeoX (parallel attn+MLP, 102 edges), its graph and pairs of two lengths."""
    loaded = tiny_loaded["gpt_neox"]
    graph = build_graph(loaded)
    rows = random_pairs(12, (5, 7), vocab=300, heldout_every=10 ** 6)
    pairs = [Pair(r["id"], r["doc"], r["split"], tuple(r["clean"]), tuple(r["corrupt"]), r["answer"],
                  r["wrong"]) for r in rows]
    return loaded, graph, pairs


def _hf_last_logits(loaded, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(tokens).logits[:, -1].float()


# -- the one evaluation code path --------------------------------------------------------------

@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_edge_is_the_clean_run_and_none_the_ablated_run(neox, ablation):
    loaded, graph, pairs = neox
    if ablation == "mean":  # one corrupt prompt for all pairs: its mean is that prompt's run
        pairs = [Pair(p.id, p.doc, p.split, p.clean, pairs[0].corrupt, p.answer, p.wrong)
                 for p in pairs if len(p.clean) == len(pairs[0].clean)]
    batches = make_batches(pairs, 4, "cpu")
    n = graph.n_edges
    kept = torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    ablated = Ablation(graph, batches, ablation)
    outs = {(b.key, j): logits for b, j, logits in circuit_outputs(graph, batches, ablated, kept)}
    tl = graph.pm.wrapped_model
    for batch in batches:
        with torch.no_grad():
            clean = tl(batch.clean)[:, -1]
            if ablation == "zero":  # no source left: the final residual is the attention output biases
                b_o = sum(block.attn.b_O for block in tl.blocks)
                ablated = tl.unembed(tl.ln_final(b_o.expand(*batch.clean.shape, -1).clone()))[:, -1]
            else:
                ablated = tl(batch.corrupt)[:, -1]
        torch.testing.assert_close(outs[batch.key, 0], clean, atol=1e-5, rtol=0)
        hf = _hf_last_logits(loaded, batch.clean)
        torch.testing.assert_close(outs[batch.key, 0], hf, atol=1e-4, rtol=0)
        torch.testing.assert_close(outs[batch.key, 1], ablated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_faithfulness_of_all_edges_is_one_and_of_none_zero(neox, ablation):
    loaded, graph, pairs = neox
    evaluator = FaithfulnessEvaluator(graph, make_batches(pairs, 5, "cpu"), ablation, "logit_diff")
    # the baselines came from batches of 5; evaluate again with batches of 2 (other float sums)
    other = FaithfulnessEvaluator(graph, make_batches(pairs, 2, "cpu"), ablation, "logit_diff")
    n = graph.n_edges
    metrics = other.metrics(torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]))
    f = faithfulness(metrics, evaluator.m_empty, evaluator.m_full)
    # float32 sums in another batching: 1.2e-6 apart on an AVX2 CPU (below 1e-6 with AVX-512)
    np.testing.assert_allclose(f, [1.0, 0.0], atol=1e-5)
    # M(full) is the clean run's mean logit difference, whatever the ablation
    batch = make_batches(pairs, 100, "cpu")
    diffs = []
    for b in batch:
        logits = _hf_last_logits(loaded, b.clean)
        diffs += (logits.gather(1, b.answers) - logits.gather(1, b.wrong_answers)).squeeze(1).tolist()
    assert evaluator.m_full == pytest.approx(float(np.mean(diffs)), abs=1e-4)


def test_batches_hold_one_length_and_every_pair(neox):
    _, _, pairs = neox
    batches = make_batches(pairs, 4, "cpu")
    assert sum(b.clean.shape[0] for b in batches) == len(pairs)
    assert [b.key for b in batches] == list(range(len(batches)))
    assert all(b.clean.shape == b.corrupt.shape and b.answers.shape == (b.clean.shape[0], 1) for b in batches)
    assert sorted({b.clean.shape[1] for b in batches}) == [5, 7]


# -- agreement with auto-circuit ---------------------------------------------------------------

@pytest.mark.parametrize(("ablation", "ig_steps"), [("resample", 3), ("zero", 2), ("resample", 0)])
def test_attribution_equals_auto_circuit_mask_gradient(neox, ablation, ig_steps):
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.types import AblationType

    _, graph, pairs = neox
    same = [p for p in pairs if len(p.clean) == 5][:6]
    ours = attribute_edges(graph, make_batches(same, 3, "cpu"), Ablation(graph, make_batches(same, 3, "cpu"),
                                                                         ablation), ig_steps=ig_steps)
    ds = PromptDataset(torch.tensor([p.clean for p in same]), torch.tensor([p.corrupt for p in same]),
                       [torch.tensor([p.answer]) for p in same], [torch.tensor([p.wrong]) for p in same])
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=3, shuffle=False)
    kwargs = {"mask_val": 0.0} if ig_steps == 0 else {"integrated_grad_samples": ig_steps}
    theirs = mask_gradient_prune_scores(
        graph.pm, loader, None, grad_function="logit", answer_function="avg_diff",
        ablation_type=AblationType[ablation.upper()],
        clean_corrupt="corrupt" if ablation == "resample" else None, **kwargs)
    graph.pm.zero_grad(set_to_none=True)
    n_points, n_batches = ig_steps + 1, 2
    torch.testing.assert_close(ours * n_points * n_batches, graph.flatten(theirs), rtol=1e-4, atol=1e-6)
    assert (ours != 0).sum() > graph.n_edges // 2


def test_scores_do_not_depend_on_the_batch_size(neox):
    _, graph, pairs = neox
    a = attribute_edges(graph, b := make_batches(pairs, 2, "cpu"), Ablation(graph, b, "mean"), ig_steps=2,
                        grad_function="logprob", loss="neg_avg_diff")
    c = attribute_edges(graph, b := make_batches(pairs, 50, "cpu"), Ablation(graph, b, "mean"), ig_steps=2,
                        grad_function="logprob", loss="neg_avg_diff")
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)


def test_evaluation_equals_auto_circuit_run_circuits(neox):
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune import run_circuits
    from auto_circuit.types import AblationType, PatchType

    _, graph, pairs = neox
    same = [p for p in pairs if len(p.clean) == 7]
    batches = make_batches(same, len(same), "cpu")
    ranking = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))
    # strictly decreasing scores along the ranking: no ties, so run_circuits keeps exactly k edges
    unique = torch.empty(graph.n_edges)
    unique[ranking] = torch.arange(graph.n_edges, 0, -1, dtype=torch.float)
    counts = [0, 3, 17, 60, graph.n_edges]
    kept = top_k(edge_ranking(unique), counts, graph.n_edges)
    resample = Ablation(graph, batches, "resample")
    ours = {j: logits for _, j, logits in circuit_outputs(graph, batches, resample, kept)}
    ds = PromptDataset(torch.tensor([p.clean for p in same]), torch.tensor([p.corrupt for p in same]),
                       [torch.tensor([p.answer]) for p in same], [torch.tensor([p.wrong]) for p in same])
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=len(same), shuffle=False)
    theirs = run_circuits(graph.pm, loader, counts, graph.unflatten(unique), patch_type=PatchType.TREE_PATCH,
                          ablation_type=AblationType.RESAMPLE)
    for j, k in enumerate(counts):
        torch.testing.assert_close(ours[j], next(iter(theirs[k].values())), atol=1e-5, rtol=0)


# -- the minimal circuit -----------------------------------------------------------------------

def _brute_force(curve: np.ndarray, target: float) -> int:
    return int(np.argmax(curve >= target))


def test_minimal_search_equals_brute_force_on_a_monotone_curve():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1000):
        curve = np.concatenate([[0.0], np.sort(rng.random(n - 1)), [1.0]]) if n > 1 else np.array([0.0, 1.0])
        for target in (0.05, 0.5, 0.85, 0.999, 1.0):
            for points in (2, 5, 16):
                calls: list[int] = []

                def f(ks, curve=curve, calls=calls):
                    calls.extend(ks)
                    return curve[ks]

                result = minimal_circuit(f, n, target, points)
                assert result.minimal_edges == _brute_force(curve, target), (n, target, points)
                assert result.monotone and result.faithfulness == curve[result.minimal_edges]
                assert len(calls) <= points + 2 + int(np.ceil(np.log2(n + 1)))


def test_minimal_search_by_the_lower_end_equals_a_scan_of_the_lower_ends():
    """select_by lower: the smallest k whose lower interval end reaches the target; F stays the point."""
    rng = np.random.default_rng(1)
    for n in (1, 7, 100, 1000):
        curve = np.concatenate([[0.0], np.sort(rng.random(n - 1)), [1.0]]) if n > 1 else np.array([0.0, 1.0])
        lower = 1.1 * curve - 0.1   # below F, monotone, 1 at the full circuit
        for target in (0.05, 0.5, 0.85, 1.0):
            result = minimal_circuit(lambda ks, c=curve: c[ks], n, target, 5, lambda ks, lo=lower: lo[ks])
            k = result.minimal_edges
            assert k == _brute_force(lower, target) >= _brute_force(curve, target), (n, target)
            assert result.selected_by == "lower" and result.faithfulness == curve[k]
            assert dict(result.lower)[k] == lower[k] >= target
            if k > 0:   # the bisection ends on the count below, which misses the target
                assert dict(result.lower)[k - 1] < target
    assert minimal_circuit(lambda ks: curve[ks], n, 0.85, 5).selected_by == "point"


def test_lower_end_selection_equals_a_scan_on_a_tiny_model(neox):
    """The lower ends find_circuits compares with the target, against intervals computed for every k."""
    _, graph, pairs = neox
    batches = make_batches(pairs, 12, "cpu")
    evaluator = FaithfulnessEvaluator(graph, batches, "resample", "logit_diff")
    ranking = edge_ranking(attribute_edges(graph, batches, evaluator.ablation, ig_steps=2))
    n = graph.n_edges
    boot = PairBootstrap.draw(len(pairs), 300, 0.9, seed=3)
    evaluator.at_counts(ranking, list(range(n + 1)))
    every = np.stack([evaluator.per_pair_at[k] for k in range(n + 1)])
    lower = evaluator.intervals(every, boot)[:, 0]
    found = discover_circuit(graph, batches, CircuitOptions(ig_steps=2, curve_points=8, target=0.8), evaluator, boot)
    assert found.search is not None and found.search.selected_by == "lower"
    ks = [k for k, _ in found.search.lower]
    np.testing.assert_allclose([lo for _, lo in found.search.lower], lower[ks], rtol=1e-9, atol=1e-12)
    k = found.search.minimal_edges
    assert lower[k] >= 0.8 and (k == 0 or lower[k - 1] < 0.8)   # a real crossing of the lower ends
    if np.all(np.diff(lower[:k + 1]) >= -1e-9):
        assert k == _brute_force(lower, 0.8)
    point = discover_circuit(graph, batches, CircuitOptions(ig_steps=2, curve_points=8, target=0.8,
                                                            select_by="point"), evaluator, boot)
    assert point.search is not None and point.search.minimal_edges <= found.search.minimal_edges


def test_lower_end_selection_needs_intervals():
    with pytest.raises(InputError, match="select_by lower needs the bootstrap interval"):
        CircuitOptions(bootstrap_resamples=0)
    assert CircuitOptions(bootstrap_resamples=0, select_by="point").select_by == "point"


def test_minimal_search_reports_a_non_monotone_curve():
    curve = np.array([0.0, 0.3, 0.9, 0.4, 0.5, 0.6, 0.95, 1.0])  # k = 2 passes, 3..5 fail again
    result = minimal_circuit(lambda ks: curve[ks], 7, 0.85, 7)
    assert result.minimal_edges == 2 and not result.monotone
    assert result.non_monotone_steps[0]["from_edges"] == 2 and result.non_monotone_steps[0]["to_edges"] == 3
    with pytest.raises(InputError, match="no circuit reaches"):
        minimal_circuit(lambda ks: curve[ks], 7, 1.01, 4)


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_minimal_search_equals_a_scan_over_every_k_on_a_tiny_model(neox, ablation):
    _, graph, pairs = neox
    batches = make_batches(pairs, 12, "cpu")
    evaluator = FaithfulnessEvaluator(graph, batches, ablation, "logit_diff")
    ranking = edge_ranking(attribute_edges(graph, batches, evaluator.ablation, ig_steps=2))
    n = graph.n_edges
    scan = evaluator.at_counts(ranking, list(range(n + 1)))
    np.testing.assert_allclose(scan[[0, n]], [0.0, 1.0], atol=1e-6)
    for target in (0.5, 0.85, 0.95):
        brute = _brute_force(scan, target)
        result = minimal_circuit(lambda ks: evaluator.at_counts(ranking, ks), n, target, 8)
        k = result.minimal_edges
        assert scan[k] >= target and (k == 0 or scan[k - 1] < target)  # a real crossing, same numbers
        assert result.faithfulness == pytest.approx(scan[k], abs=1e-6)
        if np.all(np.diff(scan[:brute + 1]) >= -1e-5) and result.monotone:
            assert k == brute
        # with a point at every k the search is the scan itself
        every_k = minimal_circuit(lambda ks: evaluator.at_counts(ranking, ks), n, target, n)
        assert every_k.minimal_edges == brute


def test_discover_circuit_records_undefined_faithfulness(neox):
    """Pairs whose corrupt prompt is the clean one: attribution is defined, faithfulness is not."""
    _, graph, pairs = neox
    same = [Pair(p.id, p.doc, p.split, p.clean, p.clean, p.answer, p.wrong) for p in pairs]
    found = discover_circuit(graph, make_batches(same, 12, "cpu"), CircuitOptions(ig_steps=1))
    assert found.evaluator is None and found.search is None and found.edges == []
    assert found.note is not None and "faithfulness is undefined" in found.note
    assert found.scores.shape == (graph.n_edges,) and len(found.ranking) == graph.n_edges


# -- pairs input checks ------------------------------------------------------------------------

def test_read_pairs_checks_every_row(tmp_path):
    good = random_pairs(4, (5,), vocab=50)
    path = tmp_path / "pairs.jsonl"

    def check(rows, message, **kw):
        art.write_jsonl(path, rows)
        with pytest.raises(InputError, match=message):
            read_pairs(path, vocab_size=50, max_len=64, **kw)

    check([*good, {**good[0], "corrupt": good[0]["corrupt"][:-1]}], "row 5: clean has 5 tokens, corrupt 4")
    check([{**good[0], "answer": 50}], "token id 50 is outside")
    check([{**good[0], "clean": [1] * 70, "corrupt": [1] * 70}], "exceed the model's context")
    check([good[0], {**good[1], "doc": good[0]["doc"], "split": "heldout" if good[0]["split"] == "discovery"
                     else "discovery"}], "in both splits")
    check([{k: v for k, v in good[0].items() if k != "wrong"}], "missing wrong")
    art.write_jsonl(path, good)
    assert len(read_pairs(path, vocab_size=50, max_len=64, split="discovery", limit=1)) == 1


# -- the stages end to end ---------------------------------------------------------------------

FAST = ["--device", "cpu", "--ig-steps", "2", "--curve-points", "6"]
FAST_VERIFY = ["--device", "cpu", "--ablations", "resample", "zero", "--random-circuits", "3",
               "--edge-counts", "1", "5", "20"]


def circuits(argv):
    return main("find_circuits", argv)


def verify(argv):
    return main("verify_circuit", argv)


@pytest.fixture(scope="module")
def neo_run(tmp_path_factory, tiny_model_dirs, tiny_loaded):
    """find_circuits + verify_circuit on a tiny random GPT-Neo (the predecessor's architecture)."""
    out = tmp_path_factory.mktemp("neo")
    model = str(tiny_model_dirs["gpt_neo"])
    write_pairs_stage(out, random_pairs(24, (6, 9), vocab=300), tiny_loaded["gpt_neo"].identity())
    assert circuits(["--output-dir", str(out), "--model", model, *FAST]) == 0
    assert verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY]) == 0
    return out, model


def test_find_circuits_and_verify_on_tiny_gpt_neo(neo_run):
    out, _ = neo_run
    stage = out / "circuits"
    names = {p.name for p in stage.iterdir()}
    assert {"prune_scores.safetensors", "circuit.json", "summary.json", "faithfulness_curve.png",
            "circuit.png", "manifest.json", "log.txt"} <= names
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["edges_total"] == 110 and summary["n_pairs"] == 16
    assert summary["faithfulness"] >= 0.85 and 0 < summary["minimal_edges"] <= 110
    assert {"monotone", "curve", "bisection", "non_monotone_steps", "target"} <= set(summary)
    circuit = json.loads((stage / "circuit.json").read_text())
    assert len(circuit["circuit"]) == summary["minimal_edges"]
    assert all("->" in e["edge"] and e["edge"] == f"{e['src']}->{e['dest']}" for e in circuit["circuit"])
    scores = [abs(e["score"]) for e in circuit["circuit"]]
    assert scores == sorted(scores, reverse=True)
    tensors, meta = load_prune_scores(stage / "prune_scores.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 110
    assert {"model_sha256", "pairs_sha256", "method", "model"} <= set(meta)
    assert json.loads(meta["method"])["ig_steps"] == 2
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] == meta["pairs_sha256"]
    v = json.loads((out / "verify" / "summary.json").read_text())
    assert v["n_pairs"] == 8 and v["circuit_edges"] == summary["minimal_edges"]
    assert set(v["ablations"]) == {"resample", "zero"}
    for key in ("faithfulness_heldout", "random_faithfulness_mean", "random_faithfulness_sd",
                "random_overlap_mean"):
        assert np.isfinite(v[key]) and v[key] == v["ablations"]["resample"][key]
    edges = [row["edges"] for row in v["faithfulness_at_edges"]]
    assert {0, 1, 5, 20, 110, summary["minimal_edges"]} == set(edges)
    assert (out / "verify" / "faithfulness_vs_edges.png").stat().st_size > 0


def test_rerun_is_a_noop(neo_run, capsys):
    out, model = neo_run
    manifests = [out / "circuits" / "manifest.json", out / "verify" / "manifest.json"]
    before = [(m.stat().st_mtime_ns, m.read_bytes()) for m in manifests]
    assert circuits(["--output-dir", str(out), "--model", model, *FAST, "--batch-size", "3"]) == 0
    assert verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY]) == 0
    assert [(m.stat().st_mtime_ns, m.read_bytes()) for m in manifests] == before
    capsys.readouterr()
    assert circuits(["--output-dir", str(out), "--model", model, *FAST, "--target", "0.9"]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory, testbed):
    out = tmp_path_factory.mktemp("testbed")
    rows = canary_pairs(testbed.model)
    write_pairs_stage(out, rows, testbed.identity())
    assert circuits(["--output-dir", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    assert verify(["--output-dir", str(out), "--device", "cpu", "--dtype", "float32", "--ablations",
                   "resample", "--random-circuits", "4", "--edge-counts", "10", "100"]) == 0
    return out, rows


def test_find_circuits_and_verify_on_the_testbed(testbed_run):
    out, rows = testbed_run
    summary = json.loads((out / "circuits" / "summary.json").read_text())
    assert summary["edges_total"] == 463  # 4 layers x 4 heads, parallel attn+MLP, separate Q/K/V
    assert summary["n_pairs"] == sum(r["split"] == "discovery" for r in rows) > 20
    assert summary["metric_full"] > 0 > summary["metric_empty"]  # clean predicts the canary, corrupt does not
    assert summary["faithfulness"] >= 0.85 and summary["minimal_edges"] < summary["edges_total"] / 2
    v = json.loads((out / "verify" / "summary.json").read_text())
    assert v["n_pairs"] == sum(r["split"] == "heldout" for r in rows)
    # the circuit beats random circuits of its size on pairs it never saw
    assert v["faithfulness_heldout"] > v["random_faithfulness_mean"] + 2 * v["random_faithfulness_sd"]


# -- bad input: exit 2, one line, nothing written ----------------------------------------------

def _one_line_error(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_circuits_bad_input(tmp_path, tiny_model_dirs, tiny_loaded, capsys):
    model = str(tiny_model_dirs["gpt_neo"])
    identity = tiny_loaded["gpt_neo"].identity()
    cases = {
        "missing upstream": (None, "has no manifest.json"),
        "token id >= vocab": ([{**random_pairs(4, (5,), 300)[0], "answer": 5000}],
                              "outside the model's vocabulary"),
        # another model's weights (their content hash; a mere other name for the same weights is accepted)
        "another model": ({"model": {**identity, "name_or_path": "EleutherAI/gpt-neo-125m",
                                     "weights_sha256": "0" * 64}},
                          "contrastive pairs belong to model 'EleutherAI/gpt-neo-125m'"),
        "no discovery pairs": ([{**r, "split": "heldout"} for r in random_pairs(4, (5,), 300)],
                               "no discovery pairs"),
    }
    for name, (content, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        if isinstance(content, list):
            write_pairs_stage(out, content, identity)
        elif isinstance(content, dict):
            write_pairs_stage(out, random_pairs(4, (5,), 300), content["model"])
        code = circuits(["--output-dir", str(out), "--model", model, *FAST])
        _one_line_error(capsys, code, message)
        assert not (out / "circuits").exists(), name


def test_verify_bad_input(tmp_path, neo_run, tiny_model_dirs, tiny_loaded, capsys):
    src, model = neo_run

    def fresh(name):
        out = tmp_path / name
        shutil.copytree(src / "contrastive", out / "contrastive")
        shutil.copytree(src / "circuits", out / "circuits")
        manifest = json.loads((out / "circuits" / "manifest.json").read_text())
        manifest["inputs"][0]["path"] = str(out / "contrastive" / "pairs.jsonl")
        art.write_json(out / "circuits" / "manifest.json", manifest)
        return out

    def check(out, message, model=model):
        code = verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY])
        _one_line_error(capsys, code, message)
        assert not (out / "verify").exists()

    check(tmp_path / "empty", "has no manifest.json")  # missing upstream stage folder

    out = fresh("another_model")  # prune scores computed for another model
    check(out, "prune_scores.safetensors belong to model", model=str(tiny_model_dirs["gpt_neox"]))

    out = fresh("another_dataset")  # the pairs were rebuilt (consistently) after find_circuits ran
    write_pairs_stage(out, random_pairs(24, (6, 9), vocab=300, seed=1), tiny_loaded["gpt_neo"].identity())
    check(out, "were computed for pairs sha256")

    out = fresh("wrong_shape")  # same provenance, but tensors that do not fit this graph
    path = out / "circuits" / "prune_scores.safetensors"
    tensors, meta = load_prune_scores(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name].reshape(-1), torch.zeros(1)])
    art.save_tensors(path, tensors, metadata=meta)
    rerecord(out / "circuits")
    check(out, "do not fit this model's graph")

    out = fresh("edited_pairs")  # pairs.jsonl edited by hand after its stage wrote it
    with open(out / "contrastive" / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps(random_pairs(1, (6,), 300)[0]) + "\n")
    check(out, "changed after its stage wrote it")

    out = fresh("old_manifest")  # a circuits manifest without every circuit setting
    manifest = json.loads((out / "circuits" / "manifest.json").read_text())
    del manifest["config"]["curve_points"]
    art.write_json(out / "circuits" / "manifest.json", manifest)
    rerecord(out / "circuits")
    check(out, "records no curve_points in its config (written by an older memcirc); re-run find_circuits")

    out = fresh("bad_edge_count")
    code = verify(["--output-dir", str(out), "--model", model, *FAST_VERIFY[:-4], "--edge-counts", "999"])
    _one_line_error(capsys, code, "outside 0..110")
    assert not (out / "verify").exists()


# -- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_stages_on_the_gpu_match_the_cpu(testbed_run, tmp_path):
    """float32 on CUDA gives the CPU's circuit; the GPU default (bfloat16) runs end to end."""
    cpu_out, rows = testbed_run
    cpu = json.loads((cpu_out / "circuits" / "summary.json").read_text())
    for dtype in ("float32", "auto"):
        out = tmp_path / dtype
        shutil.copytree(cpu_out / "contrastive", out / "contrastive")
        assert circuits(["--output-dir", str(out), "--device", "cuda", "--dtype", dtype]) == 0
        assert verify(["--output-dir", str(out), "--device", "cuda", "--dtype", dtype, "--ablations",
                       "resample", "mean", "--random-circuits", "4", "--edge-counts", "10", "100"]) == 0
        gpu = json.loads((out / "circuits" / "summary.json").read_text())
        manifest = json.loads((out / "circuits" / "manifest.json").read_text())
        assert manifest["model"]["device"].startswith("cuda")
        assert gpu["faithfulness"] >= gpu["target"]
        if dtype == "float32":
            assert abs(gpu["minimal_edges"] - cpu["minimal_edges"]) <= 2
            assert gpu["metric_full"] == pytest.approx(cpu["metric_full"], abs=1e-3)
            assert gpu["metric_empty"] == pytest.approx(cpu["metric_empty"], abs=1e-3)
        else:
            assert manifest["model"]["dtype"] == "bfloat16"
