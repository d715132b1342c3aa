"""kfac_edit: factors add up over shards, sampled labels follow the model's distribution and do not
depend on batching, the edit is the identity at rho = 1, the factor-token budget is exact and too few
tokens warn, the stage contract (model card, --no-save-model) and its bad input. The selection's
tests are in test_kfac_select.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CONFIGS

from memcirc.cli import main
from memcirc.data import memorized, read_scores
from memcirc.errors import InputError
from memcirc.evaluation import memorization
from memcirc.kfac.edit import apply_edit, eigenbasis, select_mask
from memcirc.kfac.factors import FactorOptions, collect_factors
from memcirc.kfac.targets import resolve_targets, weight_of
from memcirc.models import ModelSpec, load
from memcirc.option_groups import MemorizedRule
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


def test_sampled_labels_follow_softmax():
    """The inverse-CDF draw against the exact probabilities: 40,000 draws per row of a 6-token
    vocabulary (one token at -inf, never drawn), every frequency within 4.5 standard errors."""
    from memcirc.kfac.factors import _inverse_cdf

    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0, -3.0], [0.0] * 5 + [-40.0]])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for row in logits:
        y = _inverse_cdf(row.expand(n, -1), u)
        freq = torch.bincount(y, minlength=6).double() / n
        p = torch.softmax(row.double(), -1)
        assert float(((freq - p).abs() - 4.5 * (p * (1 - p) / n).sqrt()).max()) <= 1e-12
    assert _inverse_cdf(logits[:1, :3], torch.tensor([1 - 2.0 ** -24])).tolist() == [2]   # u * total < total
    with pytest.raises(FloatingPointError):
        _inverse_cdf(torch.tensor([[0.0, float("nan")]]), torch.tensor([0.5]))


def test_seeded_labels_do_not_depend_on_the_batching():
    """Block r draws with block_seed(seed, r): batches of 2 and of 3 blocks, starting at block 5,
    draw the same labels for the same blocks."""
    from memcirc.kfac.factors import _draw_labels

    logits = torch.randn(6, 9, 11, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(6, 10, dtype=torch.long)
    opts = FactorOptions(labels="sampled", seed=4)
    def draw(size):
        return torch.cat([_draw_labels(logits[i:i + size], ids[i:i + size], opts, 5 + i) for i in range(0, 6, size)])
    assert torch.equal(draw(2), draw(3)) and draw(6).shape == (6, 9)
    assert not torch.equal(_draw_labels(logits, ids, opts, 5), _draw_labels(logits, ids, opts, 6))


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


# -- the factor-token budget and the rank of the factors (issue 11) ----------------------------

@pytest.mark.parametrize("bos_id", [None, 7])
@pytest.mark.parametrize("block_len, budget", [(128, 1024), (128, 127), (128, 50), (16, 1000), (2, 9)])
def test_factor_blocks_hold_exactly_the_budget(block_len, budget, bos_id):
    """The 1,024-asked / 1,533-collected case: ceil(budget / (L - 1)) whole blocks overshot. Now a last
    shorter block makes the count exact; every block starts with BOS when there is one, and the blocks'
    text is the stream's prefix, in order."""
    from memcirc.kfac.factors import n_predicted, token_blocks

    stream = np.arange(10, 10 + 5000, dtype=np.int64)
    batches = token_blocks(stream, block_len, budget, 4, bos_id)
    assert n_predicted(batches) == budget
    assert all(b.shape[1] <= block_len and b.shape[0] <= 4 for b in batches)
    rows = [row for b in batches for row in b]
    if bos_id is not None:
        assert all(int(row[0]) == bos_id for row in rows)
        rows = [row[1:] for row in rows]
    text = torch.cat(rows).numpy()
    assert np.array_equal(text, stream[:len(text)])


def test_factor_blocks_use_all_the_data_when_it_holds_less_than_the_budget():
    """The data ends the collection: its whole blocks only (the testbed's 174k-token slice under the
    200k default: 1,360 blocks of 128, as before the budget was made exact)."""
    from memcirc.kfac.factors import n_predicted, token_blocks

    batches = token_blocks(np.arange(174_084, dtype=np.int64), 128, 200_000, 32)
    assert n_predicted(batches) == 1360 * 127 == 172_720
    assert {b.shape[1] for b in batches} == {128}
    with pytest.raises(InputError, match="fewer than one block"):
        token_blocks(np.arange(100, dtype=np.int64), 128, 200_000, 32)


def test_default_budget_scales_with_the_widest_factor():
    from memcirc.kfac.budget import FACTOR_TOKENS_FLOOR, default_factor_tokens, resolve_factor_tokens

    assert KfacConfig().factor_tokens is None
    assert default_factor_tokens(512) == FACTOR_TOKENS_FLOOR == 200_000        # the testbed, small models
    assert default_factor_tokens(4864) == 200_000                              # qwen2-0.5B's MLP width
    assert default_factor_tokens(11_008) == 32 * 11_008                        # llama-2-7B's
    assert resolve_factor_tokens(1024, 4864) == 1024


def _rank_case(lm, n_tokens):
    """Factors of the tiny llama's gate and up projections (G: 48 wide, A: 32) on `n_tokens` tokens."""
    from memcirc.kfac.budget import factor_dims, rank_report, rank_warning
    from memcirc.kfac.edit import ModelEdit
    from memcirc.kfac.factors import n_predicted, token_blocks

    targets = resolve_targets(lm.model, lm.arch, [1], ["mlp_gate", "mlp_in"])
    stream = torch.randint(0, 300, (4 * n_tokens,), generator=torch.Generator().manual_seed(1)).numpy()
    batches = token_blocks(stream, 16, n_tokens, 8)
    assert n_predicted(batches) == n_tokens
    factors = collect_factors(lm.model, targets, batches, FactorOptions(labels="sampled", seed=0))
    report = rank_report(ModelEdit(lm.model, targets, factors).bases, factors.n_tokens)
    return rank_warning(factors.n_tokens, factor_dims(lm.model, targets)), report


def test_rank_warning_fires_at_a_tiny_budget_and_not_at_an_adequate_one(tiny_loaded):
    lm = tiny_loaded["llama"]
    warning, report = _rank_case(lm, 20)
    assert warning is not None and "20 tokens" in warning and "48 wide" in warning and "at least 48" in warning
    assert report["tokens_for_full_rank"] == 48
    for factors in report["modules"].values():     # rank <= N, measured
        assert factors["G"]["rank"] <= 20 and factors["A"]["rank"] <= 20
    assert report["zero_eigenvalue_fraction"] >= 1 - 20 / 48 - 1e-6   # rounded to 6 digits
    warning, report = _rank_case(lm, 32 * 48)
    assert warning is None
    assert report["zero_eigenvalue_fraction"] == 0.0
    assert all(f["rank"] == f["dim"] for m in report["modules"].values() for f in m.values())


# -- the stage: the budget, the rank warning, --no-save-model, the model card ------------------

def test_model_card_numbers_equal_the_summary(edited):
    from memcirc.kfac.card import read_card

    stage, _ = edited
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["factor_tokens"] == summary["factor_token_budget"] == 2000      # exact: 15 x 127 + 95
    assert summary["warnings"] == [] and summary["factor_rank"]["tokens_for_full_rank"] == 512
    card = read_card(stage / "edited_model" / "README.md")
    saved = summary["saved"]
    for key in ("exact_before", "exact_after", "loose_before", "loose_after", "ppl_before", "ppl_after"):
        assert card["measured"][key] == saved[key], key
    assert card["edit"]["rho"] == saved["rho"] and card["edit"]["formula"] == saved["formula"]
    assert card["edit"]["layers"] == summary["layers"] and card["edit"]["projections"] == summary["projections"]
    assert card["edit"]["factor_tokens"] == 2000 and card["source_model"]["name_or_path"] == "testbed"
    assert card["measured"]["ppl_block_len"] == summary["ppl_block_len"] == 128
    assert card["produced_by"]["memcirc"] and "commit" in card["produced_by"]
    text = (stage / "edited_model" / "README.md").read_text()
    assert f"| held-out perplexity | {saved['ppl_before']:.3f} | {saved['ppl_after']:.3f} |" in text
    manifest = json.loads((stage / "manifest.json").read_text())
    assert "edited_model/README.md" in {o["path"] for o in manifest["outputs"]}


def test_tiny_budget_warns_and_no_save_model_writes_no_model(scored, tmp_path):
    out = tmp_path / "tiny"
    args = ["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir", str(scored / "memorization"),
            "--limit", "4", "--factor-tokens", "300", "--rhos", "0.6", "--formulas", "original", "--ppl-blocks", "2",
            "--device", "cpu", "--no-save-model"]
    assert main("kfac_edit", args) == 0
    stage = out / "kfac"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["factor_tokens"] == 300                     # 2 blocks of 128 + one of 47: exact
    (warning,) = summary["warnings"]
    assert "300 tokens" in warning and "at least 512" in warning and warning in (out / "kfac" / "log.txt").read_text()
    assert summary["factor_rank"]["zero_eigenvalue_fraction"] >= 1 - 300 / 512 - 1e-6
    assert not (stage / "edited_model").exists() and (stage / "deltas.safetensors").is_file()
    assert summary["saved"]["edited_model"] is None
    outputs = {o["path"] for o in json.loads((stage / "manifest.json").read_text())["outputs"]}
    assert not any(p.startswith("edited_model/") for p in outputs) and "deltas.safetensors" in outputs


def test_bad_layers_are_refused_before_the_model_loads(scored, tmp_path, capsys, monkeypatch):
    import memcirc.stages.kfac_edit as stage

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(stage, "load", no_load)
    for extra, needle in ((["--layers", "4"], "layers [4]"), (["--ppl-block-len", "129"], "context (128")):
        out = tmp_path / needle.split()[0]
        err = _refused(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--input-dir",
                        str(scored / "memorization"), *QUICK, *extra], capsys)
        assert needle in err and not out.exists()


def test_apply_edit_keeps_the_float64_selection(tiny_loaded):
    """apply_edit (float32 reconstruction) writes the float64 reconstruction of the same kept set to
    float32 rounding: the kept set is chosen before, on the float64 C."""
    lm = tiny_loaded["gpt2"]
    targets = resolve_targets(lm.model, lm.arch, [1], ["mlp_in", "mlp_out"])
    f = collect_factors(lm.model, targets, _batches(lm.model.config.vocab_size, 2),
                        FactorOptions(labels="data"))
    bases = {t.name: eigenbasis(weight_of(lm.model, t), f.A[t.name], f.G[t.name], f.n_tokens) for t in targets}
    originals = {t.name: weight_of(lm.model, t).detach().clone() for t in targets}
    try:
        apply_edit(lm.model, targets, bases, "modified", 0.6)
        for t in targets:
            mask = select_mask(bases[t.name].importance("modified"), 0.6)
            exact = bases[t.name].weight64(mask)
            err = (weight_of(lm.model, t).double() - exact).abs().max() / originals[t.name].abs().max()
            assert float(err) < 2e-6
    finally:
        with torch.no_grad():
            for t in targets:
                weight_of(lm.model, t).copy_(originals[t.name])
