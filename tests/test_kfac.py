"""kfac_edit: factors add up over shards, the edit is the identity at rho = 1, the vectorized
selection equals brute force (and the original heap), the stage contract and its bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CONFIGS
from reference import select_bruteforce

from bench.baselines import select_heap
from memcirc.cli import main
from memcirc.config import MemorizedRule
from memcirc.data import memorized, read_scores
from memcirc.errors import InputError
from memcirc.evaluation import memorization
from memcirc.kfac.edit import apply_edit, eigenbasis, select_mask, select_product
from memcirc.kfac.factors import FactorOptions, collect_factors
from memcirc.kfac.targets import resolve_targets, weight_of
from memcirc.models import ModelSpec, load
from memcirc.stages.kfac_edit import KfacConfig


def _batches(vocab, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3, 12), generator=g) for _ in range(n)]


# -- factors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("labels", ["data", "sampled"])
def test_factors_of_one_run_equal_the_sum_of_two_half_runs(family, labels, tiny_loaded):
    lm = tiny_loaded[family]
    roles = [r for r in ("mlp_gate", "mlp_in", "mlp_out") if lm.arch.path(r)]
    targets = resolve_targets(lm.model, lm.arch, [1], roles)
    batches = _batches(lm.model.config.vocab_size)
    full = collect_factors(lm.model, targets, batches,
                           FactorOptions(labels=labels, generator=torch.Generator().manual_seed(3)))
    halves = FactorOptions(labels=labels, generator=torch.Generator().manual_seed(3))   # the halves continue
    half = (collect_factors(lm.model, targets, batches[:2], halves)                     # one random stream,
            + collect_factors(lm.model, targets, batches[2:], halves))                  # as one run does
    assert full.n_tokens == half.n_tokens == 4 * 3 * 11
    for t in targets:
        W = weight_of(lm.model, t)
        assert full.A[t.name].shape == (W.shape[1],) * 2 and full.G[t.name].shape == (W.shape[0],) * 2
        assert full.A[t.name].dtype == torch.float32
        torch.testing.assert_close(full.A[t.name], half.A[t.name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.G[t.name], half.G[t.name], rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_factors_match_a_hand_computation(tiny_loaded):
    """A = Σ x xᵀ over the inputs, G = Σ g gᵀ over d(summed CE)/d(output), last position dropped;
    GPT-2's Conv1D is read as [out, in]."""
    lm = tiny_loaded["gpt2"]
    (t,) = resolve_targets(lm.model, lm.arch, [0], ["mlp_in"])
    ids = _batches(lm.model.config.vocab_size, n=1)[0]
    f = collect_factors(lm.model, [t], [ids], FactorOptions(labels="data"))
    module = lm.model.get_submodule(t.name)
    saved = {}
    h = module.register_forward_hook(lambda m, i, o: saved.update(x=i[0], y=o))
    with torch.enable_grad():
        lm.model.requires_grad_(False)
        emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=emb).logits[:, :-1]
        saved["y"].retain_grad()
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").backward()
    h.remove()
    x = saved["x"][:, :-1].reshape(-1, saved["x"].shape[-1])
    g = saved["y"].grad[:, :-1].reshape(-1, saved["y"].shape[-1])
    torch.testing.assert_close(f.A[t.name], x.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.G[t.name], g.t() @ g, rtol=1e-4, atol=1e-7)
    assert weight_of(lm.model, t).shape == (48, 32)  # [out = d_mlp, in = d_model]


# -- the edit --------------------------------------------------------------------------------

def _random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, generator=g)
    return X @ X.t()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_rho_one_leaves_weights_unchanged(family, tiny_model_dirs):
    lm = load(ModelSpec(str(tiny_model_dirs[family]), device="cpu"))
    roles = [r for r in ("mlp_gate", "mlp_in", "mlp_out") if lm.arch.path(r)]
    targets = resolve_targets(lm.model, lm.arch, [0, 1], roles)
    f = collect_factors(lm.model, targets, _batches(lm.model.config.vocab_size, 2),
                        FactorOptions(labels="sampled", generator=torch.Generator().manual_seed(0)))
    bases = {t.name: eigenbasis(weight_of(lm.model, t), f.A[t.name], f.G[t.name], f.n_tokens) for t in targets}
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for formula in ("original", "modified"):
        kept = apply_edit(lm.model, targets, bases, formula, 1.0)
        assert kept["kept_fraction"] == 1.0
        for k, v in lm.model.state_dict().items():
            assert (v - before[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_selection_equals_brute_force(seed):
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed))
    basis = eigenbasis(W, _random_psd(5, seed), _random_psd(7, seed + 100), n_tokens=3)
    for formula in ("original", "modified"):
        P = basis.importance(formula)
        for rho in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0):
            fast, slow = select_mask(P, rho), select_bruteforce(P, rho)
            assert torch.equal(fast, slow), (formula, rho)
            if rho < 1:   # the smallest prefix: dropping its last element falls short of rho
                kept = P[fast].sort().values
                assert kept.sum() >= rho * P.sum() - 1e-12 and kept[1:].sum() < rho * P.sum()


def test_selection_with_ties_takes_row_major_order():
    """Equal importances: the kept SET size and mass are unique, membership at the boundary is not;
    both implementations break ties in row-major (i, j) order."""
    P = torch.tensor([[4.0, 2.0, 2.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    for rho in (0.3, 0.5, 0.6, 0.75, 0.9):
        assert torch.equal(select_mask(P, rho), select_bruteforce(P, rho))
    # 4 + 2 = 6 >= 0.5 * 12: the first 2 of the three tied at 2.0 in row-major order is (0, 1)
    assert select_mask(P, 0.5).tolist() == [[True, True, False], [False, False, False]]


@pytest.mark.parametrize("seed", range(40))
def test_threshold_search_equals_the_sort(seed):
    """select_product (original formula, no product matrix) == select_mask on lam * mu; with
    integer spectra (many ties at the boundary value) too."""
    g = torch.Generator().manual_seed(seed)
    n, m = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    if seed % 2:
        lam = torch.rand(n, generator=g, dtype=torch.float64)
        mu = torch.rand(m, generator=g, dtype=torch.float64)
        mu[torch.rand(m, generator=g) < 0.2] = 0.0     # clamped eigenvalues
    else:
        lam = torch.randint(1, 4, (n,), generator=g).double()
        mu = torch.randint(0, 4, (m,), generator=g).double()
        mu[0] = 1.0
    lam, mu = lam.sort(descending=True).values, mu.sort(descending=True).values
    for rho in (0.01, 0.2, 0.5, 0.6, 0.9, 0.999, 1.0):
        assert torch.equal(select_product(lam, mu, rho), select_mask(lam[:, None] * mu[None, :], rho)), rho


def test_heap_baseline_selects_the_same_set():
    """bench_kfac_select.py times the original's heap (bench/baselines.py) against select_product."""
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(30, generator=g, dtype=torch.float64).sort(descending=True).values
    mu = torch.rand(40, generator=g, dtype=torch.float64).sort(descending=True).values
    for rho in (0.2, 0.6, 0.95):
        mask = select_product(lam, mu, rho)
        assert set(map(tuple, mask.nonzero().tolist())) == select_heap(lam, mu, rho)


def test_rho_outside_unit_interval_is_refused():
    with pytest.raises(InputError):
        select_mask(torch.ones(2, 2), 0.0)
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(InputError, match="rho"):
            KfacConfig(rhos=[float(bad)])


# -- the stage -------------------------------------------------------------------------------

QUICK = ["--factor-tokens", "2000", "--rhos", "1.0", "0.6", "--ppl-blocks", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def edited(scored):
    args = ["--config", "configs/testbed.yaml", "--output-dir", str(scored), "--limit", "12", *QUICK]
    assert main("kfac_edit", args) == 0
    return scored / "kfac", args


def test_stage_outputs(edited, testbed):
    stage, _ = edited
    summary = json.loads((stage / "summary.json").read_text())
    assert [(r["formula"], r["rho"]) for r in summary["results"]] == [
        ("original", 1.0), ("original", 0.6), ("modified", 1.0), ("modified", 0.6)]
    for r in summary["results"]:
        assert {"exact_before", "exact_after", "loose_before", "loose_after", "ppl_before", "ppl_after",
                "kept_fraction"} <= set(r)
        if r["rho"] == 1.0:
            assert r["exact_after"] == r["exact_before"] == 1.0
            assert r["ppl_after"] == pytest.approx(r["ppl_before"], rel=1e-5)
    assert summary["layers"] == [2, 3] and summary["labels"] == "sampled"
    assert {"exact", "loose_match", "ppl"} <= set(summary["ablated"])
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {"factors.safetensors", "deltas.safetensors", "rho_curve.png",
            "edited_model/config.json"} <= {o["path"] for o in manifest["outputs"]}
    from safetensors import safe_open

    with safe_open(str(stage / "deltas.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    # the default projections: the MLP input projections (GPT-NeoX: dense_h_to_4h), as the paper
    assert keys == {f"gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight" for i in (2, 3)}
    assert summary["projections"] == ["mlp_in"]
    with safe_open(str(stage / "factors.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["model"])["name_or_path"] == "testbed" and int(meta["n_tokens"]) >= 2000


def test_edited_folder_reloads_and_scores_like_the_in_memory_edit(edited, scored):
    stage, _ = edited
    summary = json.loads((stage / "summary.json").read_text())
    windows = read_scores(scored / "memorization")
    windows = [w for w, m in zip(windows, memorized(windows, MemorizedRule())) if m][:12]
    reloaded = load(ModelSpec(str(stage / "edited_model"), device="cpu", dtype="float32"))
    base = load(ModelSpec("testbed", device="cpu", dtype="float32"))
    from memcirc.artifacts import load_tensors

    with torch.no_grad():
        for name, delta in load_tensors(stage / "deltas.safetensors").items():
            base.model.get_parameter(name).add_(delta)
    kw = dict(pad_id=0, batch_size=32, levenshtein_threshold=0.75)
    assert memorization(reloaded.model, windows, **kw) == pytest.approx(summary["saved"]["after"])
    for name, p in reloaded.model.named_parameters():   # and the deltas are the edit
        torch.testing.assert_close(p, base.model.get_parameter(name), rtol=0, atol=1e-6)


def test_rerun_is_a_no_op_and_factors_can_be_reused(edited, scored, tmp_path):
    stage, args = edited
    before = (stage / "manifest.json").read_bytes()
    assert main("kfac_edit", args) == 0
    assert (stage / "manifest.json").read_bytes() == before
    out = tmp_path / "reuse"
    assert main("kfac_edit", [*args[:2], "--output-dir", str(out), "--input-dir",
                                       str(scored / "memorization"), "--limit", "12", *QUICK,
                                       "--factors-file", str(stage / "factors.safetensors")]) == 0
    a = json.loads((stage / "summary.json").read_text())["results"]
    b = json.loads((out / "kfac" / "summary.json").read_text())["results"]
    assert [r["exact_after"] for r in a] == [r["exact_after"] for r in b]


def _script(args, cwd=REPO):
    return subprocess.run([sys.executable, "kfac_edit.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _refused(args, capsys):
    """Run the stage in-process on bad input: exit 2, and its one stderr line."""
    capsys.readouterr()
    code = main("kfac_edit", args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_exits_2_one_line_nothing_written(scored, tmp_path, tiny_model_dirs, capsys):
    mem = str(scored / "memorization")
    cases = {
        "projections": ["--projections", "mlp_gate"],         # GPT-NeoX has no gated MLP
        "layers": ["--layers", "7"],
        "rhos": ["--rhos", "1.5"],
    }
    for what, extra in cases.items():
        out = tmp_path / what
        err = _refused(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir", mem,
                        *QUICK, *extra], capsys)
        assert what.rstrip("s") in err, err
        assert not out.exists()
    err = _refused(["--output-dir", str(tmp_path / "p"), "--input-dir", mem, *QUICK, "--projections", "attn_out"],
                   capsys)
    assert "valid: mlp_in, mlp_out" in err
    # factors of another model: collected on a tiny GPT-NeoX (same module names) and handed to a testbed run
    tiny = load(ModelSpec(str(tiny_model_dirs["gpt_neox"]), device="cpu"))
    targets = resolve_targets(tiny.model, tiny.arch, [0, 1], ["mlp_in", "mlp_out"])
    foreign = tmp_path / "foreign.safetensors"
    collect_factors(tiny.model, targets, _batches(64, 1), FactorOptions(labels="data")).save(
        foreign, tiny.identity(), targets)
    other = tmp_path / "other"
    err = _refused(["--output-dir", str(other), "--input-dir", mem, *QUICK, "--factors-file", str(foreign),
                    "--layers", "0", "1"], capsys)
    assert "factors" in err and not other.exists()
    # a factors file that is not there
    missing = tmp_path / "missing"
    err = _refused(["--output-dir", str(missing), "--input-dir", mem, *QUICK, "--factors-file",
                    str(tmp_path / "nope.safetensors")], capsys)
    assert "factors file not found" in err and not missing.exists()
    # an empty memorized set: the first 4 testbed windows are never-trained k=0 canaries
    empty = tmp_path / "empty"
    assert main("memorization_score", ["--config", "configs/testbed.yaml", "--output-dir", str(empty),
                                       "--limit", "4", "--device", "cpu", "--metrics", "exact"]) == 0
    err = _refused(["--output-dir", str(empty), *QUICK], capsys)
    assert "no memorized windows" in err
    assert not (empty / "kfac").exists()


def test_bad_input_from_the_command_line(scored, tmp_path):
    """The script's exit-code wiring: a config error exits 2 with one stderr line, nothing written."""
    out = tmp_path / "rhos"
    r = _script(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir",
                 str(scored / "memorization"), *QUICK, "--rhos", "1.5"])
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "rho" in r.stderr, r.stderr
    assert not out.exists()
