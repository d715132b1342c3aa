"""attention_bypass: the self-only intervention against the paper's identity attention pattern for every
family, independence from the attention implementation, cached generation, hook removal, the zero
and mean variants, the sweep on every family, the stage contract on the testbed, and --layers (only
those blocks' runs; bad block numbers refused before the model loads)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import cast

import numpy as np
import pytest
import torch
from conftest import REPO, rerecord

from memcirc.bypass import bypass_attention, mean_attention_outputs, sweep, windows_from_file
from memcirc.cli import main
from memcirc.data import Window
from memcirc.models import ModelSpec, load
from memcirc.models import arch as A
from memcirc.scoring import greedy_generate

FAMILIES = list(A.SPECS)
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 77, 8, 140, 61, 12, 200],
                    [33, 2, 180, 64, 9, 120, 45, 270, 11, 90, 155, 7]])


@pytest.fixture(scope="module")
def eager(tiny_model_dirs):
    """family -> the tiny model loaded with eager attention (the paper's patched path)."""
    return {f: load(ModelSpec(str(d), device="cpu", attn_implementation="eager")) for f, d in tiny_model_dirs.items()}


def identity_mask(batch: int, n: int) -> torch.Tensor:
    """A 4-D additive mask that lets position t see only position t (llm-memorization's eye(q))."""
    mask = torch.full((batch, 1, n, n), torch.finfo(torch.float32).min)
    mask[:, :, range(n), range(n)] = 0.0
    return mask


@torch.no_grad()
def identity_pattern_logits(loaded, layers: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The hand computation: eager attention whose pattern in `layers` is the identity, made by
    handing those attention modules an identity mask (softmax over one key = 1, output = own V)."""
    def swap_mask(_m, args, kwargs):
        return args, {**kwargs, "attention_mask": identity_mask(*ids.shape)}

    handles = [A.get_module(loaded.model, loaded.arch, "attn", i).register_forward_pre_hook(swap_mask, with_kwargs=True)
               for i in layers]
    try:
        return loaded.model(ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_self_bypass_equals_identity_attention_pattern(eager, family):
    loaded = eager[family]
    assert loaded.model.config._attn_implementation == "eager"
    n = A.n_layers(loaded.model)
    with torch.no_grad():
        clean = loaded.model(IDS).logits
    for layers in [[i] for i in range(n)] + [list(range(n))]:
        expected = identity_pattern_logits(loaded, layers, IDS)
        with torch.no_grad(), bypass_attention(loaded.model, loaded.arch, layers, "self"):
            got = loaded.model(IDS).logits
        assert (got - expected).abs().max() <= 1e-5, (family, layers)
        assert (got - clean).abs().max() > 1e-2  # the intervention does something
    with torch.no_grad():
        whole = loaded.model(IDS, attention_mask=identity_mask(*IDS.shape)).logits  # every block at once
        with bypass_attention(loaded.model, loaded.arch, range(n), "self"):
            assert (loaded.model(IDS).logits - whole).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_self_bypass_equals_hand_projection(tiny_loaded, family):
    """Block output by hand from the raw weights: W_O (W_V x + b_V) + b_O per token, kv head of
    each query head for GQA, Conv1D weights transposed."""
    loaded = tiny_loaded[family]
    model, spec, d = loaded.model, loaded.arch, A.dims(loaded.model)
    layer = A.n_layers(model) - 1

    def linear(role: str, x: torch.Tensor) -> torch.Tensor:
        m = A.get_module(model, spec, role, layer)
        weight, bias = cast(torch.Tensor, m.weight), cast("torch.Tensor | None", getattr(m, "bias", None))
        w = weight.T if spec.conv1d_weights else weight
        return x @ w.T + (bias if bias is not None else 0)

    def by_hand(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        if spec.attn_qkv:
            fused = linear("attn_qkv", x)
            if spec.qkv_interleaved:
                v = fused.view(*x.shape[:-1], d.n_heads, 3, d.d_head)[..., 2, :]
            else:
                v = fused.split(d.d_model, dim=-1)[2].reshape(*x.shape[:-1], d.n_heads, d.d_head)
        else:
            v = linear("attn_v", x).view(*x.shape[:-1], d.n_kv_heads, d.d_head)
            v = v[..., [h * d.n_kv_heads // d.n_heads for h in range(d.n_heads)], :]
        return (linear("attn_out", v.reshape(*x.shape[:-1], -1)),) + tuple(out[1:])

    handle = A.get_module(model, spec, "attn", layer).register_forward_hook(by_hand, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        handle.remove()
    with torch.no_grad(), bypass_attention(model, spec, [layer], "self"):
        got = model(IDS).logits
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa(tiny_model_dirs, eager, family):
    if not type(eager[family].model)._supports_sdpa:
        pytest.skip(f"{family} has no sdpa attention in transformers (eager or flash-attention 2 only)")
    sdpa = load(ModelSpec(str(tiny_model_dirs[family]), device="cpu", attn_implementation="sdpa"))
    assert sdpa.model.config._attn_implementation == "sdpa"
    n = A.n_layers(sdpa.model)
    for layers in [[0], [n - 1], list(range(n))]:
        out = []
        for loaded in (eager[family], sdpa):
            with torch.no_grad(), bypass_attention(loaded.model, loaded.arch, layers, "self"):
                out.append(loaded.model(IDS).logits)
        assert (out[0] - out[1]).abs().max() <= 1e-5, layers


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_holds_the_bypass(tiny_loaded, family):
    """Greedy generation (KV cache) under the bypass == teacher-forced argmax under the bypass, and
    the logits of every cached step equal the teacher-forced ones (not the unbypassed ones)."""
    loaded = tiny_loaded[family]
    model, spec = loaded.model, loaded.arch
    prompts = [row.numpy() for row in IDS[:, :6]]
    with bypass_attention(model, spec, [0], "self"), torch.no_grad():
        generated = greedy_generate(model, prompts, 8, pad_id=0)
        out = model.generate(input_ids=IDS[:, :6], attention_mask=torch.ones_like(IDS[:, :6]), max_new_tokens=8,
                             do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
        whole = torch.cat([IDS[:, :6], torch.as_tensor(generated)], dim=1)
        forced = model(whole).logits[:, 5:-1]
    with torch.no_grad():
        plain = model(whole).logits[:, 5:-1]
    assert torch.equal(forced.argmax(-1), torch.as_tensor(generated))
    assert torch.equal(out.sequences[:, 6:], torch.as_tensor(generated))
    steps = torch.stack(out.logits, dim=1)
    assert (steps - forced).abs().max() <= 1e-4
    assert (steps - plain).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_model_unchanged_after_exit(tiny_loaded, family):
    loaded = tiny_loaded[family]
    model, spec = loaded.model, loaded.arch
    blocks = [IDS[0].numpy(), IDS[1].numpy()]
    means = mean_attention_outputs(model, spec, blocks, pad_id=0, batch_size=2)
    with torch.no_grad():
        before = model(IDS).logits
        for mode in ("self", "zero", "mean"):
            with bypass_attention(model, spec, [0, 1], mode, means):
                assert not torch.equal(model(IDS).logits, before)
        with pytest.raises(RuntimeError), bypass_attention(model, spec, [1], "self"):
            raise RuntimeError("an error inside the context")
        after = model(IDS).logits
    assert torch.equal(before, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])
def test_zero_and_mean_change_only_the_intended_block(tiny_loaded, family):
    loaded = tiny_loaded[family]
    model, spec = loaded.model, loaded.arch
    means = mean_attention_outputs(model, spec, [IDS[0].numpy(), IDS[1].numpy()], pad_id=0, batch_size=2)

    def attn_outputs() -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        handles = [A.get_module(model, spec, "attn", i).register_forward_hook(
            lambda _m, _i, out: seen.append(out[0].clone())) for i in range(A.n_layers(model))]
        try:
            with torch.no_grad():
                model(IDS)
        finally:
            for h in handles:
                h.remove()
        return seen

    clean = attn_outputs()
    # The mean over the reference set is the mean of the clean outputs over its tokens.
    assert torch.allclose(means[1], clean[1].mean((0, 1)), atol=1e-6)
    with bypass_attention(model, spec, [1], "zero"):
        zero = attn_outputs()
    with bypass_attention(model, spec, [1], "mean", means):
        mean = attn_outputs()
    for edited, want in ((zero, torch.zeros_like(clean[1])), (mean, means[1].expand_as(clean[1]))):
        assert torch.equal(edited[0], clean[0])   # the block before is untouched
        assert torch.allclose(edited[1], want)


def test_bad_layers_and_mode(tiny_loaded):
    from memcirc.errors import InputError

    loaded = tiny_loaded["llama"]
    with pytest.raises(InputError, match="outside the model"), bypass_attention(loaded.model, loaded.arch, [2]):
        pass
    with pytest.raises(InputError, match="mode"), bypass_attention(loaded.model, loaded.arch, [0], "half"):
        pass
    with pytest.raises(InputError, match="mean"), bypass_attention(loaded.model, loaded.arch, [0], "mean"):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_runs_on_every_family(tiny_loaded, family):
    """Windows the tiny model 'memorized' (its own greedy continuations): exact = 1 at baseline."""
    loaded = tiny_loaded[family]
    model, spec = loaded.model, loaded.arch
    prompts = [np.arange(3, 11) + 20 * i for i in range(4)]
    suffixes = greedy_generate(model, prompts, 8, pad_id=0)
    windows = [Window(id=str(i), tokens=np.concatenate([p, s]).astype(np.int64), prefix_len=8, source="tiny",
                      doc=str(i), offset=0) for i, (p, s) in enumerate(zip(prompts, suffixes))]
    blocks = [np.arange(1, 25) * (i + 1) % 300 for i in range(3)]
    summary = sweep(model, spec, windows, blocks, pad_id=0, batch_size=4, layer_sets=[[0, 1]])
    assert summary["baseline"]["exact"] == 1.0
    assert [e["layer"] for e in summary["layers"]] == [0, 1, [0, 1]]
    for e in summary["layers"]:
        assert {"exact", "token_match", "loose_match", "ppl"} <= set(e) and np.isfinite(e["ppl"])
        assert e["ppl_ratio"] == pytest.approx(e["ppl"] / summary["baseline"]["ppl"], rel=1e-5)


# -- the stage on the testbed -----------------------------------------------------------------

def bypass(argv):
    return main("attention_bypass", argv)


def test_stage_outputs_and_rerun(scored, capsys):
    argv = ["--config", "configs/testbed.yaml", "--output-dir", str(scored), "--device", "cpu",
            "--ppl-blocks", "8", "--layer-sets", "1,2", "--lm-eval-limit", "20", "--lm-eval-tasks", "heldout_lastword"]
    assert bypass(argv) == 0
    stage = scored / "bypass"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["baseline"]["exact"] == 1.0 and summary["n_windows"] >= 32
    assert [e["layer"] for e in summary["layers"]] == [0, 1, 2, 3, [1, 2]]
    for e in summary["layers"]:
        assert 0.0 <= e["exact"] <= 1.0 and e["ppl"] > 1.0 and "token_match" in e
    assert min(e["exact"] for e in summary["layers"]) < 0.5   # some block carries the memorization
    assert summary["lm_eval"]["tasks"] == ["heldout_lastword"]   # the shipped offline task, on every run
    assert all(e["lm_eval"]["heldout_lastword"]["n_samples"] == 20 for e in [summary["baseline"], *summary["layers"]])
    assert (stage / "tradeoff.png").stat().st_size > 0
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "attention_bypass" and manifest["status"] == "complete"
    assert "bypassed" in capsys.readouterr().out
    mtime = (stage / "manifest.json").stat().st_mtime_ns
    assert bypass(argv) == 0                                   # same config: a no-op
    assert (stage / "manifest.json").stat().st_mtime_ns == mtime
    assert bypass(argv[:-2] + ["--mode", "zero"]) == 2         # another config: refuses without --force


def test_memorized_npy_file(scored, tmp_path):
    rows = [json.loads(line) for line in (scored / "memorization" / "scores.jsonl").read_text().splitlines()]
    tokens = np.array([r["tokens"] for r in rows if r["exact"]][:8], dtype=np.int32)
    np.save(tmp_path / "memorized.npy", tokens)
    out = tmp_path / "out"
    shutil.copytree(scored / "memorization", out / "memorization")   # prefix_len (32) comes from here
    assert bypass(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--device", "cpu",
                   "--ppl-blocks", "2", "--memorized-file", str(tmp_path / "memorized.npy"), "--mode", "mean"]) == 0
    summary = json.loads((out / "bypass" / "summary.json").read_text())
    assert summary["n_windows"] == 8 and summary["baseline"]["exact"] == 1.0
    assert summary["mode"] == "mean" and summary["n_mean_reference_blocks"] == 2   # blocks after the ppl ones
    manifest = json.loads((out / "bypass" / "manifest.json").read_text())
    assert manifest["inputs"][0]["prefix_len"] == 32


def test_bad_input_exits_2_and_writes_nothing(scored, tmp_path, capsys):
    base = ["--config", "configs/testbed.yaml", "--device", "cpu", "--ppl-blocks", "2"]
    out = tmp_path / "a"
    cases = {
        "outside": ["--output-dir", str(out), "--input-dir", str(scored / "memorization"), "--layer-sets", "2,9"],
        "memorization": ["--output-dir", str(tmp_path / "missing")],                 # no upstream
    }
    empty = tmp_path / "empty" / "memorization"
    shutil.copytree(scored / "memorization", empty)
    rows = [json.loads(line) for line in (empty / "scores.jsonl").read_text().splitlines()]
    (empty / "scores.jsonl").write_text("".join(json.dumps({**r, "exact": 0}) + "\n" for r in rows))
    rerecord(empty)
    cases["no memorized windows"] = ["--output-dir", str(tmp_path / "empty")]
    np.save(tmp_path / "none.npy", np.zeros((0, 64), np.int32))
    cases["holds no rows"] = ["--output-dir", str(out), "--memorized-file", str(tmp_path / "none.npy")]
    for needle, argv in cases.items():
        capsys.readouterr()
        assert bypass(base + argv) == 2, needle
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (out / "bypass").exists() and not (tmp_path / "missing").exists()
    assert not (tmp_path / "empty" / "bypass").exists()


def test_bad_input_from_the_command_line(tmp_path):
    """The exit-code wiring through the real script: exit 2, exactly one line on stderr."""
    done = subprocess.run([sys.executable, str(REPO / "attention_bypass.py"), "--output-dir", str(tmp_path),
                           "--device", "cpu", "--memorized-file", str(tmp_path / "none.npy")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "memorized file not found" in done.stderr
    assert not (tmp_path / "bypass").exists()


def test_memorized_jsonl_without_upstream_splits_rows_in_half(scored, tmp_path):
    rows = [json.loads(line) for line in (scored / "memorization" / "scores.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["exact"]][:4]
    path = tmp_path / "memorized.jsonl"
    path.write_text("".join(json.dumps({"tokens": r["tokens"][:40]}) + "\n" for r in keep))
    out = tmp_path / "out"   # no memorization/ here: the 40-token rows split 20 + 20
    assert bypass(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--device", "cpu",
                   "--ppl-blocks", "2", "--memorized-file", str(path)]) == 0
    manifest = json.loads((out / "bypass" / "manifest.json").read_text())
    assert manifest["inputs"][0]["prefix_len"] == 20
    assert json.loads((out / "bypass" / "summary.json").read_text())["n_windows"] == 4


# -- --layers (issue 11) ------------------------------------------------------------------------

def test_sweep_runs_only_the_chosen_blocks(tiny_loaded):
    from memcirc.bypass import parse_layers
    from memcirc.errors import InputError

    loaded = tiny_loaded["qwen2"]
    windows = [Window(id="0", tokens=np.arange(3, 19, dtype=np.int64), prefix_len=8, source="t", doc="0", offset=0)]
    blocks = [np.arange(1, 25) * (i + 1) % 300 for i in range(2)]
    summary = sweep(loaded.model, loaded.arch, windows, blocks, pad_id=0, batch_size=2, layers=[1],
                    layer_sets=[[0, 1]])
    assert [e["layer"] for e in summary["layers"]] == [1, [0, 1]]
    assert parse_layers([], 24) is None and parse_layers([5, 3, 5], 24) == [3, 5]
    with pytest.raises(InputError, match=r"--layers: blocks \[24\] are outside the model \(blocks 0..23\)"):
        parse_layers([3, 24], 24)


def test_layers_limit_the_stage_runs(scored, tmp_path):
    out = tmp_path / "layers"
    shutil.copytree(scored / "memorization", out / "memorization")
    assert bypass(["--config", "configs/testbed.yaml", "--output-dir", str(out), "--device", "cpu", "--limit", "4",
                   "--ppl-blocks", "3", "--ppl-block-len", "48", "--layers", "3", "1", "--layer-sets", "0,1"]) == 0
    summary = json.loads((out / "bypass" / "summary.json").read_text())
    assert [e["layer"] for e in summary["layers"]] == [1, 3, [0, 1]]
    assert summary["ppl_block_len"] == 48 and summary["n_ppl_blocks"] == 3 and summary["ppl_tokens"] == 3 * 47
    log = (out / "bypass" / "log.txt").read_text()
    assert "3 held-out blocks of 48 tokens (144 tokens)" in log and "2 single-block runs + 1 sets" in log


def test_bad_layers_exit_2_before_the_model_loads(scored, tmp_path, capsys, monkeypatch):
    import memcirc.stages.attention_bypass as stage

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(stage, "load", no_load)
    base = ["--config", "configs/testbed.yaml", "--device", "cpu", "--input-dir", str(scored / "memorization")]
    for extra, needle in ((["--layers", "1", "4"], "--layers: blocks [4] are outside the model (blocks 0..3)"),
                          (["--layer-sets", "2,9"], "outside the model"),
                          (["--ppl-block-len", "200"], "exceeds the model's context (128 tokens)")):
        out = tmp_path / extra[0].strip("-")
        capsys.readouterr()
        assert bypass(base + ["--output-dir", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()


def test_memorized_file_rows_of_a_bos_run_keep_their_bos_in_the_prefix(tmp_path):
    # an upstream run with BOS cut [BOS] + prefix_len + suffix windows: the split must not shift
    path = tmp_path / "mem.jsonl"
    rows = [{"tokens": [1, 10, 11, 12, 20, 21]}, {"tokens": [10, 11, 12, 20, 21]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_bos, without = windows_from_file(str(path), prefix_len=3, bos_id=1)
    assert with_bos.tokens[:with_bos.prefix_len].tolist() == [1, 10, 11, 12]
    assert without.tokens[:without.prefix_len].tolist() == [10, 11, 12]
    assert [w.prefix_len for w in windows_from_file(str(path), prefix_len=3)] == [3, 3]   # no BOS run: as before


@pytest.mark.parametrize("family", FAMILIES)
def test_api_bypass_resolves_the_architecture(tiny_loaded, family):
    """memcirc.bypass_attention(model, layers) on the bare HF model = bypass_attention(model, arch, layers)."""
    import memcirc

    loaded = tiny_loaded[family]
    with torch.no_grad():
        with bypass_attention(loaded.model, loaded.arch, [0], "self"):
            expected = loaded.model(IDS).logits
        with memcirc.bypass_attention(loaded.model, 0):
            got = loaded.model(IDS).logits
        clean = loaded.model(IDS).logits
    assert torch.equal(got, expected) and not torch.equal(got, clean)
