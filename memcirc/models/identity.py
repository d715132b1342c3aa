"""Model identity: which weights, and "is this the model that made that artifact?".

Three named key sets of `LoadedModel.identity()` (what a manifest records as `model`):

- `WEIGHTS_KEYS` (+ n_params, + the GGUF's sha256 for a GGUF model): which weights, not where or in
  which dtype they run. Prune scores, circuits and checkpoint units are keyed by `weights_key`.
- `RESULTS_KEYS`: what determines a stage's numbers (the weights and the dtype); stage
  fingerprints use `results_key`.
- `signature`: what the checkpoints of one training run share (architecture and vocabulary).

`check_same_model` is the one comparison of a recorded identity with the loaded model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memcirc import artifacts as art
from memcirc.errors import InputError

if TYPE_CHECKING:
    from memcirc.models.loading import LoadedModel

WEIGHTS_KEYS = ("name_or_path", "revision", "commit_hash", "gguf_file", "model_type")
RESULTS_KEYS = (*WEIGHTS_KEYS, "dtype")
COMPARED_KEYS = ("name_or_path", "revision", "gguf_file", "gguf_sha256", "model_type", "n_params",
                 "commit_hash")
# Recorded only where set (a GGUF model), so the keys of every other model stay as they were.
_GGUF_KEY = "gguf_sha256"


def _with_gguf(key: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    return {**key, _GGUF_KEY: identity[_GGUF_KEY]} if identity.get(_GGUF_KEY) else key


def weights_key(loaded: LoadedModel) -> dict[str, Any]:
    """What identifies the weights (not where or in which dtype they run)."""
    identity = loaded.identity()
    return _with_gguf({**{k: identity[k] for k in WEIGHTS_KEYS}, "n_params": identity["n_params"]}, identity)


def results_key(loaded: LoadedModel) -> dict[str, Any]:
    """What determines a stage's numbers: which weights, in which dtype."""
    identity = loaded.identity()
    return _with_gguf({k: identity[k] for k in RESULTS_KEYS}, identity)


def tokenizer_sha256(tokenizer: Any) -> str:
    """Identity of a tokenizer's vocabulary (token -> id), independent of its padding settings."""
    return art.sha256_json(sorted(tokenizer.get_vocab().items()))


def signature(config: Any, tokenizer: Any) -> dict[str, Any]:
    """What checkpoints of one training run share: family, sizes, and the tokenizer's vocabulary."""
    from memcirc.models.arch import dims

    d = dims(config)
    return {"model_type": config.model_type, "n_layers": d.n_layers, "d_model": d.d_model, "n_heads": d.n_heads,
            "n_kv_heads": d.n_kv_heads, "d_head": d.d_head, "d_mlp": d.d_mlp, "d_vocab": d.d_vocab,
            "n_ctx": d.n_ctx, "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def check_same_model(recorded: dict[str, Any] | None, loaded: LoadedModel, what: str) -> str | None:
    """InputError unless `recorded` (an identity stored with an artifact: scores, pairs, factors) names
    the loaded weights. Keys the record lacks are not compared; the commit hash only when both know it.

    Returns a warning to log once the stage has started when only the dtype differs, else None.
    """
    recorded = recorded or {}
    here = loaded.identity()
    both = [k for k in COMPARED_KEYS if k in recorded and (k != "commit_hash" or recorded[k] and here.get(k))]
    diff = [k for k in both if recorded[k] != here.get(k)]
    if diff:
        raise InputError(f"the {what} belong to model {recorded.get('name_or_path')!r} "
                         f"({', '.join(f'{k}={recorded.get(k)!r}' for k in diff)}); this run loads "
                         f"{here['name_or_path']!r} (revision {here['revision']!r}): pass --model "
                         f"{recorded.get('name_or_path')} or use {what} of this model")
    if recorded.get("dtype") and recorded["dtype"] != here["dtype"]:
        return (f"the {what} were made in {recorded['dtype']}, this run uses {here['dtype']}: memorized "
                "status can differ between precisions")
    return None
