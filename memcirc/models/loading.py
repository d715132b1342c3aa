"""`load(spec)`: the one way memcirc loads a causal LM, its tokenizer and its ArchSpec.

The code path is always `AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained`, for a local
folder, a Hub id (through the HF cache; `revision` selects e.g. a Pythia `step3000`), or the embedded
testbed (the name "testbed"). A GGUF file (in a folder or a Hub repo) is converted once to a plain
folder (`memcirc.models.gguf`), which every load then reads; until it is, config and tokenizer come
from the GGUF's metadata, so checks before the weights load stay cheap. Weights are safetensors only
and no model's own code runs (`memcirc.models.weights`); `LoadedModel.weights_sha256` identifies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from memcirc import hub
from memcirc.errors import InputError
from memcirc.models import gguf, weights
from memcirc.models.arch import ArchSpec, arch_for
from memcirc.models.device import (
    check_device_name,
    check_dtype_name,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from memcirc.models.gguf_tokenizer import from_gguf
from memcirc.models.tokenizer import quiet_tokenizer_warnings
from memcirc.testbed import MODEL_DIR, TESTBED_NAME

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """Which model to load and how.

    Attributes:
        name_or_path: a local HF folder, a Hub id ("EleutherAI/pythia-160m") or "testbed".
        revision: Hub branch, tag or commit (e.g. "step3000"); Hub ids only.
        gguf_file: a GGUF file name inside `name_or_path` (a folder or Hub repo); converted once to a
            safetensors folder in the memcirc cache, which is what loads.
        tokenizer: a tokenizer folder, Hub id or .gguf file used instead of the model's own.
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
    gguf: dict[str, Any] | None = None         # the GGUF the weights came from (`gguf.identity`)
    weights_sha256: str | None = None          # content hash of the safetensors files (None for a GGUF)
    tokenizer_check: dict[str, Any] | None = None  # `tokenizer.check_tokenizer` on the data, if run

    def identity(self) -> dict[str, Any]:
        """What a manifest records about this model (JSON-serializable); memcirc.models.identity
        names the subsets that identify the weights and the results."""
        config = self.model.config
        ident = {
            "name_or_path": self.spec.name_or_path,
            "local_path": str(self.local_path) if self.local_path else None,
            "revision": self.spec.revision,
            "commit_hash": self.commit_hash,
            "gguf_file": self.spec.gguf_file,
            "gguf_sha256": (self.gguf or {}).get("gguf_sha256"),
            "weights_sha256": self.weights_sha256,
            "converted_path": (self.gguf or {}).get("converted_path"),
            "tokenizer": self.spec.tokenizer,
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
        return ident if self.tokenizer_check is None else {**ident, "tokenizer_check": self.tokenizer_check}


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
    hub.offline_unless_reachable()   # an unreachable Hub: the cache, or the error at once, not ~50 s of retries
    return _Source(name, None, is_hub=True)


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """from_pretrained arguments (revision, gguf_file) of every file read from the source. (Every
    from_pretrained call here passes trust_remote_code=False itself: a repository's code never runs.)"""
    kw = {"revision": spec.revision, "gguf_file": spec.gguf_file}
    return {k: v for k, v in kw.items() if v is not None}


def _not_cached(src: _Source, spec: ModelSpec) -> InputError:
    rev = f" (revision {spec.revision})" if spec.revision else ""
    return InputError(
        f"model {src.ref!r}{rev} is neither a local folder nor in the Hugging Face cache "
        f"({hf_constants.HF_HUB_CACHE}), and the Hub is unreachable or has no such repo/revision; "
        f"pass a local folder or download it where there is network"
    )


def _plain(folder: Path) -> _Source:
    return _Source(str(folder), folder, is_hub=False)


def _gguf_path(src: _Source, spec: ModelSpec) -> Path:
    """The GGUF file on disk: in the local folder, or in the HF cache (downloaded where online)."""
    assert spec.gguf_file is not None
    if not src.is_hub:
        assert src.local_path is not None
        return src.local_path / spec.gguf_file
    try:
        return Path(hf_hub_download(src.ref, spec.gguf_file, revision=spec.revision))
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise _not_cached(src, spec) from err


def _files(spec: ModelSpec) -> tuple[_Source, gguf.GGUFFile | None, Path | None]:
    """The source, its GGUF file (None: not a GGUF model) and that file's conversion (None: not yet)."""
    src = _resolve_source(spec)
    if spec.gguf_file is None:
        return src, None, None
    gg = gguf.gguf_file(_gguf_path(src, spec))
    return src, gg, gguf.converted(gg)


def _load_config(src: _Source, spec: ModelSpec, kwargs: dict[str, Any] | None = None) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(src.ref, trust_remote_code=False,
                                          **(_hub_kwargs(spec) if kwargs is None else kwargs))
    except OSError as err:
        if not src.is_hub:
            raise InputError(f"cannot read the model config in {src.ref}: {_first_line(err)}") from err
        raise _not_cached(src, spec) from err
    except ValueError as err:  # e.g. a model_type this transformers version does not know
        raise InputError(_custom_code(src.ref, "config.json", err)
                         or f"cannot read the model config of {src.ref}: {_first_line(err)}") from err


def _config(src: _Source, spec: ModelSpec, gg: gguf.GGUFFile | None, folder: Path | None) -> PretrainedConfig:
    """The config: of the conversion, else of the GGUF's metadata (no weights read), else the source's."""
    if folder is not None:
        return _load_config(_plain(folder), spec, {})
    if gg is not None:
        return _load_config(_plain(gg.path.parent), spec, {"gguf_file": gg.name})
    return _load_config(src, spec)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _custom_code(ref: str, where: str, err: BaseException) -> str | None:
    """The refusal of a model that needs its own Python code (an `auto_map` transformers has no class
    for), in memcirc's words: transformers asks for trust_remote_code=True, which memcirc never passes."""
    if "trust_remote_code" not in str(err):
        return None
    return (f"{ref} needs its own Python code (the auto_map of its {where} names classes transformers does not "
            "have); memcirc never runs a model's code: use a model of a family transformers supports")


def _pretrained_tokenizer(ref: str, kwargs: dict[str, Any], what: str) -> PreTrainedTokenizerBase:
    try:
        with quiet_tokenizer_warnings():
            return AutoTokenizer.from_pretrained(ref, trust_remote_code=False, **kwargs)
    except Exception as err:   # transformers' OSError/ValueError/...; tokenizers raises a bare Exception
        raise InputError(_custom_code(what, "tokenizer_config.json", err)
                         or f"no usable tokenizer for {what}: {_first_line(err)}") from err


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _override_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`--tokenizer`: a folder, a .gguf file (its corrected tokenizer) or a Hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"--tokenizer {name} is a file; pass the folder holding tokenizer.json, "
                             "a Hub id or a .gguf file")
        with quiet_tokenizer_warnings():
            return from_gguf(gguf.gguf_file(path).path)[0]
    if not path.exists() and _looks_like_path(name):
        raise InputError(f"--tokenizer {name} does not exist")
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise InputError(f"no usable tokenizer for --tokenizer {name}: the folder has none of "
                         f"{', '.join(_TOKENIZER_FILES)}")
    if not path.exists():
        hub.offline_unless_reachable()
    return _pretrained_tokenizer(str(path.resolve()) if path.exists() else name, {}, f"--tokenizer {name}")


def _load_tokenizer(src: _Source, spec: ModelSpec, gg: gguf.GGUFFile | None, folder: Path | None,
                    override: PreTrainedTokenizerBase | None = None) -> tuple[PreTrainedTokenizerBase, bool]:
    """The override, else the conversion's, else the GGUF's (corrected, no weights read), else the source's."""
    if override is not None:
        tok = override
    elif spec.tokenizer is not None:
        tok = _override_tokenizer(spec.tokenizer)
    elif folder is not None:
        tok = _pretrained_tokenizer(str(folder), {}, str(folder))
    elif gg is not None:
        with quiet_tokenizer_warnings():
            tok = from_gguf(gg.path)[0]
    else:
        tok = _pretrained_tokenizer(src.ref, _hub_kwargs(spec), src.ref)
    pad_from_eos = tok.pad_token is None and tok.eos_token is not None
    if pad_from_eos:
        # Batching needs a pad id; eos is the common choice. Padding side is left as the model's own.
        tok.pad_token = tok.eos_token
    return tok, pad_from_eos


def _cache_location(
    src: _Source, spec: ModelSpec, config: PretrainedConfig, gg: gguf.GGUFFile | None
) -> tuple[Path | None, str | None]:
    """The HF cache snapshot folder and commit hash a Hub model was loaded from."""
    if not src.is_hub:
        return src.local_path, None
    if gg is not None:   # hf_hub_download put it in <snapshots>/<commit>/
        return gg.path.parent, gg.path.parent.name
    cached = try_to_load_from_cache(src.ref, "config.json", revision=spec.revision)
    folder = Path(cached).parent if isinstance(cached, str) else None
    return folder, getattr(config, "_commit_hash", None) or (folder.name if folder else None)


def _load_weights(ref: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> PreTrainedModel:
    try:   # safetensors only: a pickle checkpoint is never opened (memcirc.models.weights)
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                                                    **kwargs)
    except (OSError, ValueError) as err:  # no (readable) weight files; a bad attn_implementation
        raise InputError(f"cannot load the model weights from {ref}: {_first_line(err)}") from err


def _check_local_weights(src: _Source, gg: gguf.GGUFFile | None) -> None:
    """A local folder's weights must be safetensors (pickle-only or none: refused before anything loads)."""
    if src.local_path is not None and gg is None:
        weights.weight_files(src.local_path)


def _check_hub_weights(src: _Source, spec: ModelSpec) -> None:
    """A Hub repo's weights must be safetensors; checked first, as transformers, given a pickle-only `main`
    and use_safetensors=True, would start the Hub's conversion service on it."""
    found = weights.hub_has_safetensors(src.ref, spec.revision)
    if found is None:
        raise _not_cached(src, spec)
    if not found:
        rev = f", revision={spec.revision!r}" if spec.revision else ""
        raise InputError(
            f"Hub model {src.ref!r}{rev} has no safetensors weights ({weights.SAFE_WEIGHTS} or "
            f"{weights.SAFE_INDEX}); memcirc never unpickles: use a revision that has them, or convert it once "
            f"in an environment you trust: python -c \"from transformers import AutoModelForCausalLM as M, "
            f"AutoTokenizer as T; r = '{src.ref}'; M.from_pretrained(r{rev}, trust_remote_code=False)"
            f".save_pretrained('DIR', safe_serialization=True); T.from_pretrained(r{rev}, trust_remote_code=False)"
            f".save_pretrained('DIR')\" and pass --model DIR")


def _weights_sha256(folder: Path | None) -> str | None:
    return weights.weights_sha256(weights.weight_files(folder)) if folder is not None else None


def local_weights_sha256(spec: ModelSpec | str) -> str | None:
    """The `weights_sha256` that `load(spec)` records, without loading: for a local folder of safetensors
    weights (None for a Hub id or a GGUF, identified by revision / gguf_sha256).

    Raises:
        InputError: as `load` does for a missing folder or one without safetensors weights.
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    src = _resolve_source(spec)
    if src.local_path is None or spec.gguf_file is not None or gguf.identity(src.local_path) is not None:
        return None
    return _weights_sha256(src.local_path)


def load_config(spec: ModelSpec | str) -> PretrainedConfig:
    """The config `load(spec)` would use, from config.json (or a GGUF's metadata) alone.

    Raises:
        InputError: as `load` does for a missing folder or GGUF file, or an unavailable Hub id.
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    src, gg, folder = _files(spec)
    return _config(src, spec, gg, folder)


def load_config_and_tokenizer(spec: ModelSpec | str) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer `load(spec)` would use, without reading any weights.

    For cheap up-front checks (e.g. that checkpoints share one architecture and tokenizer, or that
    every data row tokenizes). A GGUF not converted yet is not converted here: both come from its
    metadata, the tokenizer corrected as the conversion corrects it.

    Raises:
        InputError: as `load` does for a missing folder, an unavailable Hub id or an unsupported family.
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    src, gg, folder = _files(spec)
    config = _config(src, spec, gg, folder)
    arch_for(config)
    _check_local_weights(src, gg)
    tokenizer, _ = _load_tokenizer(src, spec, gg, folder)
    return config, tokenizer


def load(spec: ModelSpec | str) -> LoadedModel:
    """Load an HF causal LM, its tokenizer and its ArchSpec, ready for inference.

    A GGUF model is converted on its first load (`memcirc.models.gguf`); later loads read the
    conversion.

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
    src, gg, folder = _files(spec)
    config = _config(src, spec, gg, folder)
    arch = arch_for(config)  # fail on an unknown family before reading (or converting) any weights
    _check_local_weights(src, gg)
    # cheap: a bad --tokenizer fails before any conversion or weights
    override = _override_tokenizer(spec.tokenizer) if spec.tokenizer is not None else None
    if gg is not None and folder is None:
        folder = gguf.convert(gg)
    source = _plain(folder) if folder is not None else src
    kwargs: dict[str, Any] = {} if folder is not None else _hub_kwargs(spec)
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    tokenizer, pad_from_eos = _load_tokenizer(src, spec, gg, folder, override)  # before the weights
    if source.is_hub:
        _check_hub_weights(src, spec)
    model = _load_weights(source.ref, dtype, kwargs)
    # PreTrainedModel.to is `@wraps(nn.Module.to)`, which type checkers read as an unbound function;
    # the upcast only picks nn.Module's signature (the call still runs PreTrainedModel.to).
    cast(torch.nn.Module, model).to(device).eval().requires_grad_(False)
    local_path, commit = _cache_location(src, spec, model.config, gg)
    from_gguf_file = gguf.identity(source.local_path) if source.local_path else None
    loaded = LoadedModel(model, tokenizer, arch, device, dtype, spec, local_path, commit, pad_from_eos,
                         gguf=from_gguf_file,
                         weights_sha256=None if from_gguf_file else _weights_sha256(source.local_path or local_path))
    log.info("loaded %s (%s, %s params) on %s as %s", spec.name_or_path, arch.family,
             f"{loaded.identity()['n_params']:,}", device, dtype_name(dtype))
    return loaded
