"""Model identity: which weights, and "is this the model that made that artifact?".

Three named key sets of `LoadedModel.identity()` (what a manifest records as `model`):

- `WEIGHTS_KEYS` (+ n_params, + the content hash: `weights_sha256` of the safetensors files, or
  `gguf_sha256` of a GGUF): which weights, not where or in which dtype they run. Prune scores,
  circuits and checkpoint units are keyed by `weights_key`.
- `RESULTS_KEYS`: what determines a stage's numbers (the weights and the dtype); stage
  fingerprints use `results_key`, so new weights in the same folder make every stage recompute.
- `signature`: what the checkpoints of one training run share (architecture and vocabulary).

`check_same_model` is the one comparison of a recorded identity with the loaded model: by content
hash where both sides have one (so a folder's spelling or location does not matter, and weights
swapped at the same path are refused), else, for records made before memcirc hashed weights, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memcirc import artifacts as art
from memcirc.errors import InputError

if TYPE_CHECKING:
    from memcirc.models.loading import LoadedModel, ModelSpec

WEIGHTS_KEYS = ("name_or_path", "revision", "commit_hash", "gguf_file", "model_type")
RESULTS_KEYS = (*WEIGHTS_KEYS, "dtype")
COMPARED_KEYS = ("name_or_path", "revision", "gguf_file", "gguf_sha256", "weights_sha256", "model_type",
                 "n_params", "commit_hash")
# The content hashes, each recorded only where set: weights_sha256 for safetensors weights, gguf_sha256
# for a GGUF (whose converted folder is memcirc's own).
CONTENT_KEYS = ("weights_sha256", "gguf_sha256")
# Compared besides a content hash both sides have: not the spelling or place (name_or_path, revision, ...).
_WITH_CONTENT = ("model_type", "n_params")


def _with_content(key: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    return {**key, **{k: identity[k] for k in CONTENT_KEYS if identity.get(k)}}


def weights_key(loaded: LoadedModel) -> dict[str, Any]:
    """What identifies the weights (not where or in which dtype they run)."""
    identity = loaded.identity()
    return _with_content({**{k: identity[k] for k in WEIGHTS_KEYS}, "n_params": identity["n_params"]}, identity)


def results_key(loaded: LoadedModel) -> dict[str, Any]:
    """What determines a stage's numbers: which weights, in which dtype."""
    identity = loaded.identity()
    return _with_content({k: identity[k] for k in RESULTS_KEYS}, identity)


def check_recorded_model(recorded: dict[str, Any] | None, spec: ModelSpec, what: str) -> None:
    """`check_same_model` for a model this run does not load (`spec` names it): by the weights' content
    hash where the record has one and `spec` is a local folder of safetensors weights, else by name.

    Raises:
        InputError: the record is of other weights, or (without hashes) of a model of another name.
    """
    from memcirc.models.loading import local_weights_sha256

    recorded = recorded or {}
    name, sha = recorded.get("name_or_path"), None
    if recorded.get("weights_sha256"):
        try:
            sha = local_weights_sha256(spec)
        except InputError:   # no such folder or no weights there: only the name can be compared
            sha = None
    if sha is not None and sha != recorded["weights_sha256"]:
        raise InputError(f"the {what} belong to model {name!r} (weights_sha256 {recorded['weights_sha256'][:12]}), "
                         f"not to the weights in {spec.name_or_path!r} (weights_sha256 {sha[:12]}): the weights "
                         f"changed or are another model's; re-make the {what} with these weights")
    if sha is None and name not in (None, spec.name_or_path):
        raise InputError(f"the {what} belong to model {name!r}, this run is for {spec.name_or_path!r}: pass "
                         f"--model {name}")


def _other_keys(recorded: dict[str, Any], here: dict[str, Any], diff: list[str], content: str) -> str:
    return "".join(f", {k} {recorded[k]!r} vs {here.get(k)!r}" for k in diff if k != content)


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
    the loaded weights: by the content hash when both sides have the same kind (`CONTENT_KEYS`), with
    model_type and n_params; else by name, revision and the other `COMPARED_KEYS` the record has (the
    commit hash only when both know it).

    Returns a warning to log once the stage has started when only the dtype differs, else None.
    """
    recorded = recorded or {}
    here = loaded.identity()
    content = next((k for k in CONTENT_KEYS if recorded.get(k) and here.get(k)), None)
    if content is not None:
        diff = [k for k in (content, *_WITH_CONTENT) if k in recorded and recorded[k] != here.get(k)]
        if diff:
            raise InputError(f"the {what} belong to model {recorded.get('name_or_path')!r} ({content} "
                             f"{str(recorded[content])[:12]}), not to the weights this run loads from "
                             f"{here['name_or_path']!r} ({content} {str(here[content])[:12]}"
                             f"{_other_keys(recorded, here, diff, content)}): the weights changed or are another "
                             f"model's; re-make the {what} with these weights, or load the weights they were "
                             "made with")
    else:
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
