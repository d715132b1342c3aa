"""Per-family architecture data: module paths, config names, quirks, TransformerLens facts.

This is the only module that knows how a model family is laid out. Stages ask it for a module by
role (`get_module(model, arch, "mlp_out", layer=3)`) or for a dimension (`d_mlp(model)`); they never
spell a module path or a hook name themselves. Every entry is plain data, selected by the HF
`config.model_type`, and tested against a tiny random model of its family (tests/test_arch.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, cast

import torch

from memcirc.errors import InputError

# Roles that exist once per layer; their templates contain "{layer}".
LAYER_ROLES = (
    "block", "attn", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out",
    "mlp", "mlp_gate", "mlp_in", "mlp_out",
)
# Roles that exist once per model.
MODEL_ROLES = ("embed", "blocks", "ln_final", "unembed")
ROLES = MODEL_ROLES + LAYER_ROLES


@dataclass(frozen=True)
class ArchSpec:
    """What one model family looks like. Module fields are dotted paths from the `*ForCausalLM` root.

    A module field of None means the family has no such module (e.g. `attn_qkv` where Q, K and V are
    separate, `mlp_gate` without a gated MLP). `{layer}` in a template is the block index.
    """

    family: str
    model_types: tuple[str, ...]          # HF `config.model_type` values that select this spec
    hf_architecture: str                  # the `*ForCausalLM` class name (config.architectures[0])
    # --- module paths -------------------------------------------------------------------------
    embed: str
    blocks: str                           # the ModuleList of blocks
    attn: str                             # the attention sub-layer whose output joins the residual
    attn_out: str                         # attention output projection (d_model <- n_heads * d_head)
    mlp: str
    mlp_in: str                           # MLP up projection (d_mlp <- d_model)
    mlp_out: str                          # MLP down projection (d_model <- d_mlp)
    ln_final: str
    unembed: str
    attn_q: str | None = None
    attn_k: str | None = None
    attn_v: str | None = None
    attn_qkv: str | None = None           # fused Q/K/V projection
    mlp_gate: str | None = None           # SwiGLU/GeGLU gate projection (d_mlp <- d_model)
    # The base model (embeddings, blocks, final norm): its output[0] is the final-normed hidden state and
    # `unembed` of it is exactly the logits. None where the *ForCausalLM does more after the head (e.g.
    # Gemma-3's final logit soft-capping). memcirc.forward uses it to unembed only scored positions.
    body: str | None = None
    # --- HF config attribute names --------------------------------------------------------------
    cfg_n_layers: str = "num_hidden_layers"
    cfg_n_heads: str = "num_attention_heads"
    cfg_d_model: str = "hidden_size"
    cfg_d_mlp: str = "intermediate_size"  # a None value there means 4 * d_model
    cfg_n_ctx: str = "max_position_embeddings"
    cfg_d_head: str | None = None         # None (or a None value) means d_model // n_heads
    cfg_n_kv_heads: str | None = None     # None (or a None value) means n_heads (no GQA)
    cfg_parallel_attn_mlp: str | None = None  # per-model override of the parallel_attn_mlp flag
    # --- quirks (each one is something a stage has to get right) ---------------------------------
    # `gated_mlp` and `attn_nested` are properties below, derived from `mlp_gate` and `attn_out`.
    norm: str = "layernorm"               # "layernorm" | "rmsnorm"
    conv1d_weights: bool = False
    parallel_attn_mlp: bool = False
    qkv_interleaved: bool = False
    prepend_bos: bool = True
    gqa: bool = False
    attn_returns_tuple: bool = True       # every family here: (hidden, weights); hooks edit [0] only
    # The attention module's input argument (the normed residual): passed as args[0] or by this keyword;
    # the attention bypass recomputes the self-only output from it with the module's own projections.
    attn_input: str = "hidden_states"
    # --- documentation only ---------------------------------------------------------------------
    # No code reads these. They record how each family differs from the GPT-2 baseline, so that a
    # stage that starts to depend on one of these differences finds it stated here first.
    norm_placement: str = "pre"           # "pre" | "post" (norm on sub-layer outputs) | "sandwich"
    attn_scaled: bool = True              # scores scaled by 1/sqrt(d_head) (or a family-specific factor)
    local_attn_layers: bool = False       # some layers use sliding-window (local) attention
    qk_norm: bool = False                 # a norm on q and k before the scores
    embed_scaled: bool = False            # embeddings multiplied by sqrt(d_model)
    # --- TransformerLens 2.18 -----------------------------------------------------------------
    tl_supported: bool = False
    tl_note: str = ""                     # why not, when tl_supported is False
    # TL config keys that TL's converter hard-codes or ignores -> HF attribute that holds the truth.
    tl_cfg_from_hf: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Keys TL's converter reads from the HF config.json under another name: TL key -> HF attribute.
    tl_hf_config_aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def path(self, role: str) -> str | None:
        """The path template of `role` (None when the family lacks it)."""
        if role not in ROLES:
            raise InputError(f"unknown module role {role!r}; roles: {', '.join(ROLES)}")
        if role == "block":
            return self.blocks + ".{layer}"
        return getattr(self, role)

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (SwiGLU/GeGLU: down(act(gate(x)) * up(x))), i.e. has `mlp_gate`."""
        return self.mlp_gate is not None

    @property
    def attn_nested(self) -> bool:
        """Whether the attention projections live one module deeper, in `.attn.attention` (GPT-Neo)."""
        return ".attn.attention." in self.attn_out

    @property
    def mlp_in_roles(self) -> tuple[str, ...]:
        """Roles of every MLP input projection (gate first when the MLP is gated)."""
        return ("mlp_gate", "mlp_in") if self.mlp_gate else ("mlp_in",)

    @property
    def attn_in_roles(self) -> tuple[str, ...]:
        """Roles of the attention input projections (one fused or three separate)."""
        return ("attn_qkv",) if self.attn_qkv else ("attn_q", "attn_k", "attn_v")


def _ro(**kw: str) -> Mapping[str, str]:
    return MappingProxyType(kw)


def _llama_like(family: str, model_types: tuple[str, ...], hf_architecture: str, **kw: Any) -> ArchSpec:
    """Llama-family layout: model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj."""
    block = "model.layers.{layer}"
    base: dict[str, Any] = dict(
        family=family, model_types=model_types, hf_architecture=hf_architecture,
        embed="model.embed_tokens", blocks="model.layers", ln_final="model.norm", unembed="lm_head",
        body="model",
        attn=f"{block}.self_attn", attn_q=f"{block}.self_attn.q_proj",
        attn_k=f"{block}.self_attn.k_proj", attn_v=f"{block}.self_attn.v_proj",
        attn_out=f"{block}.self_attn.o_proj", mlp=f"{block}.mlp",
        # A gate projection makes `gated_mlp` True. SwiGLU: down(act(gate(x)) * up(x)); K-FAC edits
        # gate and up separately.
        mlp_gate=f"{block}.mlp.gate_proj", mlp_in=f"{block}.mlp.up_proj",
        mlp_out=f"{block}.mlp.down_proj",
        cfg_d_head="head_dim", cfg_n_kv_heads="num_key_value_heads",
        norm="rmsnorm",
        gqa=True,         # num_key_value_heads < num_attention_heads: K/V projections are narrower
    )
    base.update(kw)
    return ArchSpec(**base)


SPECS: Mapping[str, ArchSpec] = MappingProxyType({
    "gpt2": ArchSpec(
        family="gpt2", model_types=("gpt2",), hf_architecture="GPT2LMHeadModel",
        embed="transformer.wte", blocks="transformer.h", ln_final="transformer.ln_f",
        unembed="lm_head", body="transformer",
        attn="transformer.h.{layer}.attn", attn_qkv="transformer.h.{layer}.attn.c_attn",
        attn_out="transformer.h.{layer}.attn.c_proj", mlp="transformer.h.{layer}.mlp",
        mlp_in="transformer.h.{layer}.mlp.c_fc", mlp_out="transformer.h.{layer}.mlp.c_proj",
        cfg_n_layers="n_layer", cfg_n_heads="n_head", cfg_d_model="n_embd", cfg_d_mlp="n_inner",
        cfg_n_ctx="n_positions",
        conv1d_weights=True,  # Conv1D stores weight as [in, out]: transpose before treating as Linear
        tl_supported=True,
        tl_cfg_from_hf=_ro(d_mlp="n_inner"),          # TL hard-codes d_mlp = 4 * n_embd
        tl_hf_config_aliases=_ro(n_ctx="n_positions"),  # TL reads hf_config.n_ctx, gone from GPT2Config
    ),
    "gpt_neo": ArchSpec(
        family="gpt_neo", model_types=("gpt_neo",), hf_architecture="GPTNeoForCausalLM",
        embed="transformer.wte", blocks="transformer.h", ln_final="transformer.ln_f",
        unembed="lm_head", body="transformer",  # lm_head(transformer(...)[0]), nothing between
        attn="transformer.h.{layer}.attn",
        attn_q="transformer.h.{layer}.attn.attention.q_proj",
        attn_k="transformer.h.{layer}.attn.attention.k_proj",
        attn_v="transformer.h.{layer}.attn.attention.v_proj",
        attn_out="transformer.h.{layer}.attn.attention.out_proj", mlp="transformer.h.{layer}.mlp",
        mlp_in="transformer.h.{layer}.mlp.c_fc", mlp_out="transformer.h.{layer}.mlp.c_proj",
        cfg_n_layers="num_layers", cfg_n_heads="num_heads",
        # attn_nested (derived): the projections live in .attn.attention (GPTNeoSelfAttention), not .attn
        attn_scaled=False,       # no 1/sqrt(d_head) on the scores (TL: use_attn_scale=False)
        local_attn_layers=True,  # config.attention_types alternates global/local (window_size) layers
        tl_supported=True,
        tl_cfg_from_hf=_ro(d_mlp="intermediate_size"),  # TL hard-codes d_mlp = 4 * hidden_size
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox", model_types=("gpt_neox",), hf_architecture="GPTNeoXForCausalLM",
        embed="gpt_neox.embed_in", blocks="gpt_neox.layers", ln_final="gpt_neox.final_layer_norm",
        unembed="embed_out", body="gpt_neox",
        attn="gpt_neox.layers.{layer}.attention",
        attn_qkv="gpt_neox.layers.{layer}.attention.query_key_value",
        attn_out="gpt_neox.layers.{layer}.attention.dense", mlp="gpt_neox.layers.{layer}.mlp",
        mlp_in="gpt_neox.layers.{layer}.mlp.dense_h_to_4h",
        mlp_out="gpt_neox.layers.{layer}.mlp.dense_4h_to_h",
        parallel_attn_mlp=True,  # x + attn(ln1(x)) + mlp(ln2(x)): removing attention leaves MLP input
        cfg_parallel_attn_mlp="use_parallel_residual",  # Pythia: True; other NeoX models may differ
        qkv_interleaved=True,    # query_key_value rows are [q,k,v] per head, not [all q, all k, all v]
        prepend_bos=False,       # Pythia was trained without BOS; TL default_prepend_bos=False
        tl_supported=True,
        # TL hard-codes parallel_attn_mlp=True and the default rotary base.
        tl_cfg_from_hf=_ro(parallel_attn_mlp="use_parallel_residual", rotary_base="rope_theta"),
    ),
    "llama": _llama_like(
        "llama", ("llama",), "LlamaForCausalLM",
        tl_supported=True,
        # TL's Llama branch ignores rope_theta (Llama 3: 500000) and head_dim.
        tl_cfg_from_hf=_ro(rotary_base="rope_theta", d_head="head_dim", rotary_dim="head_dim"),
    ),
    "qwen2": _llama_like(
        "qwen2", ("qwen2",), "Qwen2ForCausalLM",
        prepend_bos=False,  # Qwen tokenizers have no BOS; TL default_prepend_bos=False
        tl_supported=True,
    ),
    "olmo2": _llama_like(
        "olmo2", ("olmo2",), "Olmo2ForCausalLM",
        norm_placement="post",  # RMSNorm on attention/MLP outputs (post_*_layernorm), none on inputs
        qk_norm=True,           # RMSNorm over the full q/k projections before RoPE
        prepend_bos=False,      # the OLMo-2 tokenizer adds no BOS
        tl_note="TransformerLens 2.18 HookedTransformer has no OLMo-2 support (only TL>=3 bridges)",
    ),
    "gemma3": _llama_like(
        "gemma3", ("gemma3_text",), "Gemma3ForCausalLM",
        norm_placement="sandwich",  # input + post-attention and pre + post-feedforward RMSNorms
        qk_norm=True,               # per-head RMSNorm on q and k
        local_attn_layers=True,     # config.layer_types: sliding_attention / full_attention
        embed_scaled=True,          # embeddings are multiplied by sqrt(d_model) inside embed_tokens
        body=None,                  # logits are soft-capped (final_logit_softcapping) after lm_head
        attn_scaled=True,           # by query_pre_attn_scalar**-0.5, not head_dim**-0.5
        tl_note="TransformerLens 2.18 builds Gemma-3 configs only for the official Hub names "
                "(hard-coded sizes), not from a config.json",
    ),
})

# TransformerLens hook names: identical across families in TL, so one table.
TL_HOOK_NAMES: Mapping[str, str] = MappingProxyType({
    "embed": "hook_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "q_input": "blocks.{layer}.hook_q_input",
    "k_input": "blocks.{layer}.hook_k_input",
    "v_input": "blocks.{layer}.hook_v_input",
    "attn_result": "blocks.{layer}.attn.hook_result",   # per-head outputs (needs use_attn_result)
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_mid": "blocks.{layer}.hook_resid_mid",       # absent when parallel_attn_mlp
    "mlp_in": "blocks.{layer}.hook_mlp_in",             # needs use_hook_mlp_in
    "mlp_post": "blocks.{layer}.mlp.hook_post",         # activations entering the down projection
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "ln_final": "ln_final.hook_normalized",
})

_BY_MODEL_TYPE: Mapping[str, ArchSpec] = MappingProxyType(
    {mt: spec for spec in SPECS.values() for mt in spec.model_types}
)


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def arch_for(model_or_config: Any) -> ArchSpec:
    """Return the ArchSpec for an HF model or config, selected by `config.model_type`.

    Args:
        model_or_config: a `PreTrainedModel` or a `PretrainedConfig`.

    Returns:
        The family's ArchSpec.

    Raises:
        InputError: the model type is not one of the supported families.
    """
    model_type = getattr(_config_of(model_or_config), "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        supported = ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in SPECS.values())
        raise InputError(f"unsupported model_type {model_type!r}; supported families: {supported}")
    return spec


def require_tl(arch: ArchSpec) -> None:
    """InputError unless TransformerLens 2.18 can convert `arch`'s family (decided from the ArchSpec,
    i.e. from config.json alone: `memcirc.models.preflight` calls this before any weights load)."""
    if not arch.tl_supported:
        supported = ", ".join(s.family for s in SPECS.values() if s.tl_supported)
        raise InputError(f"TransformerLens cannot convert family {arch.family} ({arch.tl_note}); "
                         f"supported: {supported}")


def get_module(
    model: torch.nn.Module, arch: ArchSpec, role: str, layer: int | None = None
) -> torch.nn.Module:
    """Return the submodule of `model` that plays `role` (in block `layer` for per-layer roles).

    Args:
        model: the HF causal LM (the `*ForCausalLM` object).
        arch: its ArchSpec.
        role: one of `ROLES`.
        layer: block index; required for per-layer roles, forbidden for whole-model roles.

    Raises:
        InputError: unknown role, a role this family lacks, or a missing/extra/out-of-range layer.
    """
    template = arch.path(role)
    if template is None:
        raise InputError(f"family {arch.family} has no {role!r} module")
    if role in LAYER_ROLES:
        if layer is None or not 0 <= layer < n_layers(model):
            raise InputError(f"role {role!r} needs a layer in [0, {n_layers(model)}), got {layer}")
        template = template.format(layer=layer)
    elif layer is not None:
        raise InputError(f"role {role!r} is not per-layer; do not pass layer={layer}")
    return model.get_submodule(template)


def lm_body(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(base model, LM head) of an HF causal LM whose logits are exactly head(base(...)[0]), else None."""
    arch = arch_for(model)
    if arch.body is None:
        return None
    return model.get_submodule(arch.body), model.get_submodule(arch.unembed)


def tl_hook_name(role: str, layer: int | None = None) -> str:
    """Return the TransformerLens hook name for `role` (formatted with `layer` if per-layer)."""
    if role not in TL_HOOK_NAMES:
        raise InputError(f"unknown TL hook role {role!r}; roles: {', '.join(TL_HOOK_NAMES)}")
    name = TL_HOOK_NAMES[role]
    if "{layer}" in name:
        if layer is None:
            raise InputError(f"TL hook role {role!r} needs a layer")
        return name.format(layer=layer)
    return name


@dataclass(frozen=True)
class Dims:
    """Model sizes in TransformerLens vocabulary."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


def _attr(config: Any, name: str | None) -> Any:
    return getattr(config, name, None) if name else None


def dims(model_or_config: Any) -> Dims:
    """Read the sizes of an HF model or config through its family's config attribute names."""
    config = _config_of(model_or_config)
    arch = arch_for(config)
    d_model = int(getattr(config, arch.cfg_d_model))
    n_heads = int(getattr(config, arch.cfg_n_heads))
    return Dims(
        n_layers=int(getattr(config, arch.cfg_n_layers)),
        n_heads=n_heads,
        n_kv_heads=int(_attr(config, arch.cfg_n_kv_heads) or n_heads),
        d_model=d_model,
        d_head=int(_attr(config, arch.cfg_d_head) or d_model // n_heads),
        d_mlp=int(_attr(config, arch.cfg_d_mlp) or 4 * d_model),
        d_vocab=int(config.vocab_size),
        n_ctx=int(getattr(config, arch.cfg_n_ctx)),
    )


def n_layers(model_or_config: Any) -> int:
    """Number of transformer blocks."""
    return dims(model_or_config).n_layers


def n_heads(model_or_config: Any) -> int:
    """Number of query heads."""
    return dims(model_or_config).n_heads


def d_model(model_or_config: Any) -> int:
    """Residual stream width."""
    return dims(model_or_config).d_model


def d_mlp(model_or_config: Any) -> int:
    """MLP hidden width."""
    return dims(model_or_config).d_mlp


def n_ctx(model_or_config: Any) -> int:
    """Maximum context length the model was built for."""
    return dims(model_or_config).n_ctx


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding: the token ids the model can take (can exceed the tokenizer's length)."""
    # nn.Module.__getattr__ is typed Tensor | Module; an embedding's weight is a Parameter
    return int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])


def parallel_attn_mlp(model_or_config: Any) -> bool:
    """Whether attention and MLP read the same residual (the family flag, unless the config says)."""
    config = _config_of(model_or_config)
    arch = arch_for(config)
    value = _attr(config, arch.cfg_parallel_attn_mlp)
    return arch.parallel_attn_mlp if value is None else bool(value)


def quirks(arch: ArchSpec) -> dict[str, Any]:
    """The quirk flags of `arch` as a dict (for logs and manifests), derived flags included."""
    skip = {"family", "model_types", "hf_architecture", "tl_note", "tl_cfg_from_hf",
            "tl_hf_config_aliases", "body"}
    flags = {f.name: getattr(arch, f.name) for f in fields(arch)
             if f.name not in skip and isinstance(getattr(arch, f.name), (bool, str))
             and not f.name.startswith("cfg_") and f.name not in ROLES}
    return {**flags, "gated_mlp": arch.gated_mlp, "attn_nested": arch.attn_nested}
