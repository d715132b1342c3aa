"""memcirc: find, explain and remove verbatim memorization in causal language models."""

__version__ = "0.1.0"

# -- the Python API (memcirc/api.py), imported on first use: `import memcirc` stays free of torch ------
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:   # for type checkers and editors; at run time __getattr__ imports them
    from memcirc.api import bypass_attention as bypass_attention
    from memcirc.api import kfac_edit as kfac_edit
    from memcirc.api import score_texts as score_texts

_API = ("score_texts", "bypass_attention", "kfac_edit")


def __getattr__(name: str) -> Any:
    if name in _API:
        from memcirc import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
