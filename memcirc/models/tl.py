"""Convert a loaded HF model into a TransformerLens `HookedTransformer`, offline.

TL's `from_pretrained` refuses local folders and fetches configs from the Hub, so this follows
route P4 of notes/dependencies.md §3: stage the loaded model's config.json and tokenizer in a fresh
temporary folder, let TL convert that config (`convert_hf_model_config`), correct the values TL
hard-codes or ignores (`ArchSpec.tl_cfg_from_hf`), and convert the weights from the in-memory HF
model (`get_pretrained_state_dict(..., hf_model=...)`). Nothing is read from the Hub or re-read from
the original files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import transformer_lens.loading_from_pretrained as tl_loading
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from memcirc.errors import InputError
from memcirc.models.arch import ArchSpec, require_tl
from memcirc.models.loading import LoadedModel
from memcirc.models.tokenizer import quiet_tokenizer_warnings

WEIGHT_PROCESSING = ("none", "tl_default")
# Where the weight processing used is recorded on the returned model.
WEIGHT_PROCESSING_ATTR = "memcirc_weight_processing"
# TL 2.18 picks the architecture by substring of the *path* before reading config.json: a folder
# whose path contains one of these is treated as an official Llama/Gemma name and crashes.
_TL_PATH_SNIFFS = ("llama", "gemma")


def to_hooked_transformer(loaded: LoadedModel, weight_processing: str = "none") -> HookedTransformer:
    """Convert `loaded.model` into a HookedTransformer ready for auto-circuit.

    Args:
        loaded: the output of `memcirc.models.load`.
        weight_processing: "none" (logits identical to HF) or "tl_default" (TL's `from_pretrained`
            processing: fold_ln, center_writing_weights (LayerNorm models only), center_unembed,
            fold_value_biases; log-probs identical to HF, raw logits shifted per position).

    Returns:
        The HookedTransformer on `loaded.device` in `loaded.dtype`, eval mode, grads off, with
        use_attn_result, use_split_qkv_input and use_hook_mlp_in on (and GQA ungrouped).

    Raises:
        InputError: an unknown weight_processing, or a family TransformerLens 2.18 cannot convert.
    """
    arch = loaded.arch
    if weight_processing not in WEIGHT_PROCESSING:
        choices = ", ".join(WEIGHT_PROCESSING)
        raise InputError(f"weight_processing {weight_processing!r} is not one of {choices}")
    require_tl(arch)
    process = weight_processing == "tl_default"
    with tempfile.TemporaryDirectory(prefix="memcirc-tl-") as tmp:
        folder = _stage_folder(loaded, Path(tmp) / "model")
        cfg = _tl_config(loaded, folder, process)
        state = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model=loaded.model,
                                                     dtype=loaded.dtype)
        # Some TL converters create tensors on the CPU (e.g. GPT-Neo's zero Q/K/V biases), which
        # breaks fold_ln on a GPU: put the whole state dict where the model lives.
        state = {name: tensor.to(loaded.device) for name, tensor in state.items()}
        # TL re-reads the tokenizer by its name_or_path, so it must come from a folder on disk. Both
        # reads would print transformers' false "incorrect regex pattern" warning (qwen2, gemma3).
        with quiet_tokenizer_warnings():
            model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    model.load_and_process_state_dict(
        state, fold_ln=process, center_writing_weights=process and arch.norm == "layernorm",
        center_unembed=process, fold_value_biases=process, refactor_factored_attn_matrices=False,
    )
    _set_circuit_flags(model)
    model.eval().requires_grad_(False)
    setattr(model, WEIGHT_PROCESSING_ATTR, weight_processing)
    return model


def _stage_folder(loaded: LoadedModel, folder: Path) -> Path:
    """Write config.json (with `architectures`) and the tokenizer where TL can read them."""
    if any(word in str(folder).lower() for word in _TL_PATH_SNIFFS):
        raise InputError(f"temporary folder {folder} contains one of {_TL_PATH_SNIFFS}, which "
                         "TransformerLens mistakes for a model name; set TMPDIR to another folder")
    folder.mkdir(parents=True)
    hf_config = loaded.model.config
    config = hf_config.to_dict()
    # TL reads this with its own AutoConfig call (trust_remote_code not pinned there): no code to point at
    config.pop("auto_map", None)
    # TL reads config.architectures[0]; configs saved without a model (or from GGUF) lack it.
    config["architectures"] = [loaded.arch.hf_architecture]
    for tl_key, hf_attr in loaded.arch.tl_hf_config_aliases.items():
        config.setdefault(tl_key, getattr(hf_config, hf_attr))
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    loaded.tokenizer.save_pretrained(folder)
    return folder


def _tl_config(loaded: LoadedModel, folder: Path, process: bool) -> HookedTransformerConfig:
    """TL's conversion of the staged config, corrected and finished like TL's from_pretrained."""
    cfg: dict[str, Any] = tl_loading.convert_hf_model_config(str(folder))
    cfg.update(_hf_overrides(loaded.arch, loaded.model.config))
    cfg.update(
        model_name=loaded.spec.name_or_path.rstrip("/").split("/")[-1],
        d_vocab=loaded.model.config.vocab_size,  # embedding rows, not tokenizer length (Pythia)
        init_weights=False,                      # weights come from the HF model
        device=str(loaded.device), n_devices=1, dtype=loaded.dtype,
        default_prepend_bos=loaded.arch.prepend_bos,
        from_checkpoint=False,
    )
    if process:  # folded norms keep only the normalization, TL's "Pre" variants
        cfg["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}.get(
            cfg["normalization_type"], cfg["normalization_type"])
    return HookedTransformerConfig.from_dict(cfg)


def _hf_overrides(arch: ArchSpec, hf_config: Any) -> dict[str, Any]:
    """TL config values that TL's converter hard-codes or ignores, read from the HF config."""
    found = {key: getattr(hf_config, attr, None) for key, attr in arch.tl_cfg_from_hf.items()}
    return {key: value for key, value in found.items() if value is not None}


def _set_circuit_flags(model: HookedTransformer) -> None:
    """The flags auto-circuit's factorized graph asserts (notes/dependencies.md §2)."""
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if model.cfg.n_key_value_heads is not None:
        # Per-head K/V hooks then have n_heads entries, so edges line up with query heads.
        model.set_ungroup_grouped_query_attention(True)


def check_circuit_flags(model: HookedTransformer) -> None:
    """Raise InputError unless `model` has the flags auto-circuit needs (call where consumed)."""
    missing = [flag for flag in ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")
               if not getattr(model.cfg, flag)]
    if missing:
        raise InputError(f"HookedTransformer lacks {', '.join(missing)}; build it with "
                         "memcirc.models.tl.to_hooked_transformer")


def weight_processing_of(model: HookedTransformer) -> str | None:
    """The weight processing recorded by `to_hooked_transformer` (None if built elsewhere)."""
    return getattr(model, WEIGHT_PROCESSING_ATTR, None)
