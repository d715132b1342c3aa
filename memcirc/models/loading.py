"""`load(spec)`: the one way memcirc loads a causal LM, its tokenizer and its ArchSpec.

The code path is always `AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained`, for a local
folder, a Hub id (through the HF cache; `revision` selects e.g. a Pythia `step3000`), a GGUF file in
a folder, or the embedded testbed (the name "testbed").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from memcirc.errors import InputError
from memcirc.models.arch import ArchSpec, arch_for
from memcirc.models.device import (
    check_device_name,
    check_dtype_name,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from memcirc.testbed import MODEL_DIR, TESTBED_NAME

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """Which model to load and how.

    Attributes:
        name_or_path: a local HF folder, a Hub id ("EleutherAI/pythia-160m") or "testbed".
        revision: Hub branch, tag or commit (e.g. "step3000"); Hub ids only.
        gguf_file: a GGUF file name inside `name_or_path`; it is dequantized to `dtype`.
        tokenizer: a tokenizer folder or Hub id used instead of the model's own.
        dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16" or "float16".
        device: "auto" (best accelerator, else CPU) or a device name; see `device.DEVICE_CHOICES`.
        attn_implementation: passed to `from_pretrained` ("eager", "sdpa", ...); None = its default.
    """

    name_or_path: str
    revision: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        # Spelling only: whether the device exists is checked at load time, on the machine that runs.
        self.dtype = check_dtype_name(self.dtype)
        self.device = check_device_name(self.device)
        if not str(self.name_or_path).strip():
            raise InputError("model name_or_path is empty; pass a local folder, a Hub id or 'testbed'")


@dataclass
class LoadedModel:
    """A loaded model: HF causal LM (eval mode, no grads, on `device`), tokenizer and ArchSpec."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec
    local_path: Path | None = None   # the folder the files came from (local or HF cache snapshot)
    commit_hash: str | None = None   # known when loaded from the HF cache
    pad_from_eos: bool = field(default=False)  # True when the tokenizer had no pad token

    def identity(self) -> dict[str, Any]:
        """What a manifest records about this model (JSON-serializable); memcirc.models.identity
        names the subsets that identify the weights and the results."""
        config = self.model.config
        return {
            "name_or_path": self.spec.name_or_path,
            "local_path": str(self.local_path) if self.local_path else None,
            "revision": self.spec.revision,
            "commit_hash": self.commit_hash,
            "gguf_file": self.spec.gguf_file,
            "model_type": config.model_type,
            "family": self.arch.family,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "padding_side": self.tokenizer.padding_side,
            "pad_token": self.tokenizer.pad_token,
            "pad_from_eos": self.pad_from_eos,
        }


@dataclass(frozen=True)
class _Source:
    ref: str                  # what from_pretrained receives
    local_path: Path | None   # set for local folders
    is_hub: bool


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is meant as a path.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _local_source(path: Path, spec: ModelSpec) -> _Source:
    if not path.is_dir():
        raise InputError(f"model path {path} is a file; pass the folder that holds config.json")
    if spec.revision is not None:
        raise InputError(f"revision={spec.revision!r} only applies to Hub ids; {path} is a local folder")
    if spec.gguf_file is not None:
        if not (path / spec.gguf_file).is_file():
            raise InputError(f"GGUF file {spec.gguf_file!r} not found in {path}")
    elif not (path / "config.json").is_file():
        raise InputError(f"model folder {path} has no config.json; save it with save_pretrained")
    return _Source(str(path), path, is_hub=False)


def _resolve_source(spec: ModelSpec) -> _Source:
    name = str(spec.name_or_path)
    if name == TESTBED_NAME:
        if not MODEL_DIR.is_dir():
            raise InputError(f"the testbed model is not built yet ({MODEL_DIR} missing); run `make testbed`")
        return _local_source(MODEL_DIR, spec)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path.resolve(), spec)
    if _looks_like_path(name):
        raise InputError(f"model folder {name} does not exist")
    return _Source(name, None, is_hub=True)


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """from_pretrained arguments of every file read; a repository's own Python code is never run."""
    kw = {"revision": spec.revision, "gguf_file": spec.gguf_file}
    return {**{k: v for k, v in kw.items() if v is not None}, "trust_remote_code": False}


def _load_config(src: _Source, spec: ModelSpec) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(src.ref, **_hub_kwargs(spec))
    except OSError as err:
        if not src.is_hub:
            raise InputError(f"cannot read the model config in {src.ref}: {_first_line(err)}") from err
        rev = f" (revision {spec.revision})" if spec.revision else ""
        raise InputError(
            f"model {src.ref!r}{rev} is neither a local folder nor in the Hugging Face cache "
            f"({hf_constants.HF_HUB_CACHE}), and the Hub is unreachable or has no such repo/revision; "
            f"pass a local folder or download it where there is network"
        ) from err
    except ValueError as err:  # e.g. a model_type this transformers version does not know
        raise InputError(f"cannot read the model config of {src.ref}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _load_tokenizer(src: _Source, spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, bool]:
    try:
        tok = AutoTokenizer.from_pretrained(src.ref, **_hub_kwargs(spec))
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"no usable tokenizer for {src.ref}: {_first_line(err)}") from err
    pad_from_eos = tok.pad_token is None and tok.eos_token is not None
    if pad_from_eos:
        # Batching needs a pad id; eos is the common choice. Padding side is left as the model's own.
        tok.pad_token = tok.eos_token
    return tok, pad_from_eos


def _cache_location(
    src: _Source, spec: ModelSpec, config: PretrainedConfig
) -> tuple[Path | None, str | None]:
    """The HF cache snapshot folder and commit hash a Hub model was loaded from."""
    if not src.is_hub:
        return src.local_path, None
    cached = try_to_load_from_cache(src.ref, spec.gguf_file or "config.json", revision=spec.revision)
    folder = Path(cached).parent if isinstance(cached, str) else None
    return folder, getattr(config, "_commit_hash", None) or (folder.name if folder else None)


def _load_weights(src: _Source, dtype: torch.dtype, kwargs: dict[str, Any]) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(src.ref, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:  # no (readable) weight files; a bad attn_implementation
        raise InputError(f"cannot load the model weights from {src.ref}: {_first_line(err)}") from err


def load_config_and_tokenizer(spec: ModelSpec | str) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer `load(spec)` would use, without reading any weights.

    For cheap up-front checks (e.g. that checkpoints share one architecture and tokenizer).

    Raises:
        InputError: as `load` does for a missing folder, an unavailable Hub id or an unsupported family.
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    src = _resolve_source(spec)
    config = _load_config(src, spec)
    arch_for(config)
    tokenizer, _ = _load_tokenizer(src, spec)
    return config, tokenizer


def load(spec: ModelSpec | str) -> LoadedModel:
    """Load an HF causal LM, its tokenizer and its ArchSpec, ready for inference.

    Args:
        spec: what to load (a bare string is `ModelSpec(name_or_path=spec)`).

    Returns:
        The LoadedModel: model in eval mode with requires_grad False, on the resolved device/dtype.

    Raises:
        InputError: missing folder or config.json, a Hub id not available offline, an unsupported
            family, a bad dtype or device.
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    src = _resolve_source(spec)
    config = _load_config(src, spec)
    arch = arch_for(config)  # fail on an unknown family before reading any weights
    kwargs = _hub_kwargs(spec)
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    tokenizer, pad_from_eos = _load_tokenizer(src, spec)  # cheap: fail before reading weights
    model = _load_weights(src, dtype, kwargs)
    # PreTrainedModel.to is `@wraps(nn.Module.to)`, which type checkers read as an unbound function;
    # the upcast only picks nn.Module's signature (the call still runs PreTrainedModel.to).
    cast(torch.nn.Module, model).to(device).eval().requires_grad_(False)
    local_path, commit = _cache_location(src, spec, model.config)
    loaded = LoadedModel(model, tokenizer, arch, device, dtype, spec, local_path, commit, pad_from_eos)
    log.info("loaded %s (%s, %s params) on %s as %s", spec.name_or_path, arch.family,
             f"{loaded.identity()['n_params']:,}", device, dtype_name(dtype))
    return loaded
