"""Model layer: `load(spec)` -> LoadedModel (HF model, tokenizer, ArchSpec); TL conversion in `tl`.

`to_hooked_transformer` is imported lazily: TransformerLens takes seconds to import and most stages
never need it.
"""

from typing import TYPE_CHECKING, Any

from memcirc.models.arch import ArchSpec, Dims, arch_for, dims, get_module, tl_hook_name
from memcirc.models.device import resolve_device, resolve_dtype
from memcirc.models.loading import LoadedModel, ModelSpec, load

if TYPE_CHECKING:  # the real import is lazy, in __getattr__ below
    from memcirc.models.tl import to_hooked_transformer

__all__ = [
    "ArchSpec", "Dims", "LoadedModel", "ModelSpec", "arch_for", "dims", "get_module", "load",
    "resolve_device", "resolve_dtype", "tl_hook_name", "to_hooked_transformer",
]


def __getattr__(name: str) -> Any:
    if name == "to_hooked_transformer":
        from memcirc.models.tl import to_hooked_transformer
        return to_hooked_transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
