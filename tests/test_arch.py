"""ArchSpec entries against tiny random models of every family (fixtures in conftest.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from memcirc.errors import InputError
from memcirc.models import arch as A

FAMILIES = list(A.SPECS)
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_gate", "mlp_in", "mlp_out")


def expected_in_out(role: str, d: A.Dims) -> tuple[int, int]:
    """(in_features, out_features) every family's projection for `role` must have."""
    q, kv = d.n_heads * d.d_head, d.n_kv_heads * d.d_head
    return {
        "attn_q": (d.d_model, q), "attn_k": (d.d_model, kv), "attn_v": (d.d_model, kv),
        "attn_qkv": (d.d_model, q + 2 * kv), "attn_out": (q, d.d_model),
        "mlp_gate": (d.d_model, d.d_mlp), "mlp_in": (d.d_model, d.d_mlp), "mlp_out": (d.d_mlp, d.d_model),
    }[role]


def in_out(module: torch.nn.Module, spec: A.ArchSpec) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (rows, cols) if spec.conv1d_weights else (cols, rows)  # Conv1D is [in, out]


def test_model_type_selects_family(tiny_loaded: dict) -> None:
    for family, loaded in tiny_loaded.items():
        assert A.arch_for(loaded.model) is A.SPECS[family]
        assert A.arch_for(loaded.model.config) is A.SPECS[family]
        assert type(loaded.model).__name__ == A.SPECS[family].hf_architecture


@pytest.mark.parametrize("config", [transformers.OPTConfig(), transformers.BertConfig()])
def test_unknown_model_type_lists_families(config: transformers.PretrainedConfig) -> None:
    with pytest.raises(InputError, match=r"unsupported model_type .*gpt_neox.*gemma3 \(gemma3_text\)") as err:
        A.arch_for(config)
    assert "\n" not in str(err.value)


def test_specs_are_declarative_and_consistent() -> None:
    model_types = [mt for spec in A.SPECS.values() for mt in spec.model_types]
    assert len(model_types) == len(set(model_types))
    for family, spec in A.SPECS.items():
        assert spec.family == family
        for role in A.ROLES:
            template = spec.path(role)
            if template is not None:
                assert ("{layer}" in template) == (role in A.LAYER_ROLES), (family, role)
        assert spec.tl_supported or spec.tl_note
        assert (spec.attn_qkv is None) == (spec.attn_q is not None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        A.SPECS["gpt2"].family = "x"  # type: ignore[misc]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_resolves_with_declared_shape(tiny_loaded: dict, family: str) -> None:
    loaded = tiny_loaded[family]
    model, spec, d = loaded.model, loaded.arch, A.dims(loaded.model)
    assert len(A.get_module(model, spec, "blocks")) == d.n_layers
    assert A.get_module(model, spec, "embed").weight.shape == (d.d_vocab, d.d_model)
    assert A.get_module(model, spec, "unembed").weight.shape == (d.d_vocab, d.d_model)
    assert A.get_module(model, spec, "ln_final").weight.shape == (d.d_model,)
    for layer in range(d.n_layers):
        assert A.get_module(model, spec, "block", layer) is A.get_module(model, spec, "blocks")[layer]
        A.get_module(model, spec, "attn", layer)
        A.get_module(model, spec, "mlp", layer)
        for role in LINEAR_ROLES:
            if spec.path(role) is None:
                continue
            module = A.get_module(model, spec, role, layer)
            assert (type(module).__name__ == "Conv1D") == spec.conv1d_weights, role
            assert in_out(module, spec) == expected_in_out(role, d), (role, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_quirk_flags_match_the_model(tiny_loaded: dict, family: str) -> None:
    loaded = tiny_loaded[family]
    config, spec, d = loaded.model.config, loaded.arch, A.dims(loaded.model)
    assert spec.parallel_attn_mlp == bool(getattr(config, "use_parallel_residual", False))
    assert A.parallel_attn_mlp(loaded.model) == spec.parallel_attn_mlp
    if spec.gqa:  # the fixtures build every GQA-capable family with fewer K/V heads
        assert d.n_kv_heads < d.n_heads
    assert len(spec.attn_in_roles) == (1 if spec.attn_qkv else 3)
    norm = A.get_module(loaded.model, spec, "ln_final")
    assert ("RMSNorm" in type(norm).__name__) == (spec.norm == "rmsnorm")
    assert set(A.quirks(spec)) >= {"conv1d_weights", "parallel_attn_mlp", "prepend_bos", "tl_supported"}


def test_mlp_and_attention_roles_of_two_families() -> None:
    llama, gpt_neo = A.SPECS["llama"], A.SPECS["gpt_neo"]
    assert llama.gated_mlp and llama.mlp_in_roles == ("mlp_gate", "mlp_in")
    assert not gpt_neo.gated_mlp and gpt_neo.mlp_in_roles == ("mlp_in",)
    assert gpt_neo.attn_nested and not llama.attn_nested


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_a_hook_on_every_role(tiny_loaded: dict, family: str) -> None:
    loaded = tiny_loaded[family]
    model, spec, d = loaded.model, loaded.arch, A.dims(loaded.model)
    roles = [r for r in A.ROLES if spec.path(r) and r != "blocks"]  # a ModuleList never runs forward
    seen: dict[str, object] = {}
    handles = []
    for role in roles:
        layers = range(d.n_layers) if role in A.LAYER_ROLES else [None]
        for layer in layers:
            module = A.get_module(model, spec, role, layer)
            hook = lambda _m, _i, out, key=(role, layer): seen.__setitem__(key, out)  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    ids = torch.arange(1, 9)[None]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (1, 8, d.d_vocab)
    expected = {(r, i) for r in roles for i in (range(d.n_layers) if r in A.LAYER_ROLES else [None])}
    assert set(seen) == expected
    for layer in range(d.n_layers):
        attn_out = seen[("attn", layer)]
        assert isinstance(attn_out, tuple) == spec.attn_returns_tuple
        assert attn_out[0].shape == (1, 8, d.d_model)
        assert seen[("mlp", layer)].shape == (1, 8, d.d_model)
        for role in LINEAR_ROLES:
            if spec.path(role):
                assert seen[(role, layer)].shape[-1] == expected_in_out(role, d)[1]
    assert seen[("unembed", None)].shape == logits.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_hook_edits_only_the_hidden_state(tiny_loaded: dict, family: str) -> None:
    """Zeroing element [0] of the attention output changes the logits (the bypass contract)."""
    loaded = tiny_loaded[family]
    attn = A.get_module(loaded.model, loaded.arch, "attn", 0)

    def zero_hidden(_m: torch.nn.Module, _i: tuple, out: tuple) -> tuple:
        return (torch.zeros_like(out[0]),) + tuple(out[1:])

    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        clean = loaded.model(ids).logits
        handle = attn.register_forward_hook(zero_hidden)
        try:
            edited = loaded.model(ids).logits
        finally:
            handle.remove()
        again = loaded.model(ids).logits
    assert not torch.allclose(clean, edited)
    assert torch.equal(clean, again)


def test_dims_use_family_config_names() -> None:
    gpt2 = A.dims(transformers.GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=32, vocab_size=50))
    assert gpt2 == A.Dims(n_layers=3, n_heads=2, n_kv_heads=2, d_model=16, d_head=8, d_mlp=64,
                          d_vocab=50, n_ctx=32)  # n_inner=None means 4 * n_embd
    neo = transformers.GPTNeoConfig(num_layers=2, num_heads=4, hidden_size=32, intermediate_size=40,
                                    attention_types=[[["global"], 2]])
    sizes = (A.n_layers(neo), A.n_heads(neo), A.d_model(neo), A.d_mlp(neo), A.n_ctx(neo))
    assert sizes == (2, 4, 32, 40, 2048)
    llama = A.dims(transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                            head_dim=32, num_hidden_layers=1))
    assert (llama.d_head, llama.n_kv_heads) == (32, 1)


def test_get_module_errors(tiny_loaded: dict) -> None:
    loaded = tiny_loaded["gpt2"]
    model, spec = loaded.model, loaded.arch
    cases = [("mlp_gate", 0, "no 'mlp_gate'"), ("mlp_out", None, "needs a layer"),
             ("mlp_out", 2, r"needs a layer in \[0, 2\)"), ("embed", 0, "not per-layer"),
             ("mlp_up", 0, "unknown module role")]
    for role, layer, message in cases:
        with pytest.raises(InputError, match=message):
            A.get_module(model, spec, role, layer)


def test_tl_hook_names() -> None:
    assert A.tl_hook_name("attn_out", 3) == "blocks.3.hook_attn_out"
    assert A.tl_hook_name("embed") == "hook_embed"
    with pytest.raises(InputError, match="needs a layer"):
        A.tl_hook_name("mlp_in")
    with pytest.raises(InputError, match="unknown TL hook role"):
        A.tl_hook_name("attn_in", 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_input_argument(tiny_loaded: dict, family: str) -> None:
    """`attn_input` names the attention module's first argument, and the block really passes the
    normed residual through it (positionally or by keyword): the attention bypass reads it there."""
    import inspect

    loaded = tiny_loaded[family]
    model, spec, d = loaded.model, loaded.arch, A.dims(loaded.model)
    attn = A.get_module(model, spec, "attn", 0)
    assert next(iter(inspect.signature(attn.forward).parameters)) == spec.attn_input
    seen = []

    def grab(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs[spec.attn_input])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(1, 9)[None])
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 8, d.d_model)
