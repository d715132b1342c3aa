"""The Python API: memcirc's measurements and interventions on a model you loaded yourself.

Every call takes a plain `transformers` causal LM (or a `memcirc.models.LoadedModel`) and runs the
same code as the stages: `score_texts` cuts windows with `memcirc.data.make_windows` under the
tokenizer's BOS policy and scores them with `memcirc.scoring.score_windows`, so its rows are the
rows of the memorization stage's scores.jsonl; `bypass_attention` is the attention_bypass stage's
intervention; `kfac_edit` applies the weights a kfac_edit run saved.

    import memcirc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    rows = memcirc.score_texts(model, tokenizer, texts, prefix_len=32, suffix_len=32)
    with memcirc.bypass_attention(model, layers=[1]):
        bypassed = memcirc.score_texts(model, tokenizer, texts, prefix_len=32, suffix_len=32)
    with memcirc.kfac_edit(model, "runs/testbed/kfac"):
        edited = memcirc.score_texts(model, tokenizer, texts, prefix_len=32, suffix_len=32)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from memcirc.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from memcirc.data import Window
    from memcirc.kfac.edit import SavedEdit
    from memcirc.models.arch import ArchSpec

log = logging.getLogger(__name__)

__all__ = ["bypass_attention", "kfac_edit", "score_texts"]

DEFAULT_METRICS = ("exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy")


def _unwrap(model: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any, ArchSpec]:
    """(HF model, tokenizer, ArchSpec) of a plain HF model or a LoadedModel."""
    from memcirc.models.arch import arch_for
    from memcirc.models.loading import LoadedModel

    if isinstance(model, LoadedModel):
        return model.model, tokenizer if tokenizer is not None else model.tokenizer, model.arch
    return model, tokenizer, arch_for(model)


def _pad_id(tokenizer: Any) -> int:
    """The pad id memcirc.models.load gives a tokenizer: its pad token, else EOS (padding is masked)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    return 0


def _documents(texts: Sequence[str | Sequence[int]], ids: Sequence[str] | None,
               groups: Sequence[str | None] | None) -> Iterator[Any]:
    from memcirc.data import Document
    from memcirc.token_ids import token_list

    if isinstance(texts, str):
        raise InputError("texts must be a list of strings (or of token-id lists), not one string")
    for name, given in (("ids", ids), ("groups", groups)):
        if given is not None and len(given) != len(texts):
            raise InputError(f"{name} has {len(given)} entries for {len(texts)} texts")
    for i, text in enumerate(texts):
        doc = str(ids[i]) if ids is not None else str(i)   # the stage's default: the 0-based row number
        group = None if groups is None or groups[i] is None else str(groups[i])
        if isinstance(text, str):
            yield Document(doc=doc, text=text, group=group)
        else:
            yield Document(doc=doc, tokens=token_list(list(text), f"texts[{i}]", "tokens"), group=group)


def windows_of(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str | Sequence[int]], prefix_len: int,
               suffix_len: int, *, prepend_bos: str = "auto", windowing: str = "start", stride: int | None = None,
               ids: Sequence[str] | None = None, groups: Sequence[str | None] | None = None,
               source: str = "texts") -> list[Window]:
    """The windows the memorization stage would cut from `texts` (checked against the model)."""
    from memcirc.data import make_windows, validate_windows
    from memcirc.models.arch import dims, embedding_rows
    from memcirc.models.tokenizer import bos_policy

    if windowing not in ("start", "sliding"):
        raise InputError(f"windowing must be 'start' or 'sliding', got {windowing!r}")
    if prefix_len < 1 or suffix_len < 1:
        raise InputError(f"prefix_len and suffix_len must be >= 1, got {prefix_len} and {suffix_len}")
    policy = bos_policy(tokenizer, prepend_bos)
    windows = make_windows(_documents(texts, ids, groups), tokenizer, source, prefix_len, suffix_len,
                           windowing, stride, bos=policy)
    validate_windows(windows, vocab_size=embedding_rows(model), n_ctx=dims(model).n_ctx)
    if windows.n_short_skipped:
        log.warning("%d of %d texts are shorter than prefix_len + suffix_len = %d tokens and have no row",
                    windows.n_short_skipped, windows.n_documents, prefix_len + suffix_len)
    return windows.windows


def score_texts(model: Any, tokenizer: Any, texts: Sequence[str | Sequence[int]], prefix_len: int = 50,
                suffix_len: int = 50, *, metrics: Sequence[str] = DEFAULT_METRICS, batch_size: int = 32,
                prepend_bos: str = "auto", windowing: str = "start", stride: int | None = None,
                padding_side: str = "right", levenshtein_threshold: float = 0.75,
                ids: Sequence[str] | None = None, groups: Sequence[str | None] | None = None,
                source: str = "texts", decode: bool = True, as_frame: bool = False) -> Any:
    """Memorization metrics of `texts` under `model`: the rows of the memorization stage's scores.jsonl.

    Each text (a string, or a list of token ids) gives one window of `prefix_len` prompt tokens and
    `suffix_len` true-suffix tokens from its start (`windowing="sliding"`: one every `stride` tokens),
    BOS in front when the tokenizer's policy says so (`prepend_bos`: auto, always, never); a text
    shorter than one window has no row (logged). The teacher-forced metrics (exact, lcp, tf_accuracy,
    suffix_nll, suffix_entropy) are always computed; token_match, bleu4 and levenshtein (+ loose_match)
    when named in `metrics`, with the greedy continuation in `generated` where it differs from the
    truth. `decode` adds the decoded prefix_text, suffix_text and (with a continuation metric)
    continuation_text, as the stage's `--decode-text` does.

    Args:
        model: an HF causal LM (eval mode; any device and dtype) or a memcirc `LoadedModel`.
        tokenizer: its tokenizer (None with a LoadedModel: the loaded one).
        ids, groups, source: the rows' `doc` (default: "0", "1", ...), `group` and `source` columns.
        as_frame: return a pandas DataFrame (one row per window) instead of a list of dicts.

    Returns:
        One dict per window, in text order, with the keys of scores.jsonl (id, source, doc, offset,
        group, prefix_len, suffix_len, tokens, the metrics, generated, the decoded text).
    """
    from memcirc.scoring import GENERATION_METRICS, TEACHER_FORCED_METRICS, add_texts, score_windows

    hf_model, tokenizer, _arch = _unwrap(model, tokenizer)
    if tokenizer is None:
        raise InputError("score_texts needs the model's tokenizer")
    unknown = [m for m in metrics if m not in TEACHER_FORCED_METRICS + GENERATION_METRICS]
    if unknown:
        raise InputError(f"unknown metrics {unknown}; choose from "
                         f"{', '.join(TEACHER_FORCED_METRICS + GENERATION_METRICS)}")
    if hf_model.training:
        log.warning("the model is in training mode (dropout on): call model.eval() for deterministic scores")
    windows = windows_of(hf_model, tokenizer, texts, prefix_len, suffix_len, prepend_bos=prepend_bos,
                         windowing=windowing, stride=stride, ids=ids, groups=groups, source=source)
    rows = score_windows(hf_model, windows, pad_id=_pad_id(tokenizer), batch_size=batch_size, metrics=metrics,
                         padding_side=padding_side, levenshtein_threshold=levenshtein_threshold)
    if decode:
        add_texts(rows, tokenizer, continuation=any(m in GENERATION_METRICS for m in metrics))
    if as_frame:
        import pandas as pd

        return pd.DataFrame(rows)
    return rows


def bypass_attention(model: Any, layers: int | Sequence[int], mode: str = "self", *,
                     mean_outputs: dict[int, torch.Tensor] | None = None) -> AbstractContextManager[None]:
    """A context manager: inside it, the attention of every block in `layers` is bypassed.

    `mode`: `self` (each token attends only to itself, llm-memorization's short-circuiting), `zero`
    (attention output zeroed) or `mean` (replaced by `mean_outputs[layer]`, a [d_model] vector, e.g.
    from `memcirc.bypass.mean_attention_outputs`). The architecture is read from the model's config;
    the hooks are removed on exit, so the model is unchanged afterwards.
    """
    from memcirc.bypass import bypass_attention as bypass

    hf_model, _, arch = _unwrap(model)
    blocks = [layers] if isinstance(layers, int) else list(layers)
    return bypass(hf_model, arch, blocks, mode, mean_outputs)


def kfac_edit(model: Any, edit: str | Path | dict[str, torch.Tensor]) -> AbstractContextManager[SavedEdit]:
    """A context manager: inside it, the model carries a saved K-FAC edit; on exit its weights are
    restored bit for bit.

    `edit`: a kfac_edit stage folder (`<run>/kfac`) or its run folder, a `deltas.safetensors` file,
    or a dict {parameter name: edited minus original weight}. From a stage folder with
    `edited_model/` the edited tensors are taken from there (bitwise the saved edited model);
    otherwise weight + delta (equal to it up to one float rounding). The `SavedEdit` it yields names
    the parameters, the formula and rho.
    """
    from memcirc.kfac.edit import saved_edit

    hf_model, _, _ = _unwrap(model)
    return saved_edit(hf_model, edit)
