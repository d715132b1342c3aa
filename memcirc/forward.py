"""A causal LM forward pass that unembeds only the positions a caller scores.

The LM head is V x d per position: for GPT-Neo-125M it is 26 % of a teacher-forced batch, and half
of it is spent on prefix positions nobody reads. HF models with `logits_to_keep` skip those
themselves, but GPT-Neo (transformers 4.57) has no such argument, and HF applies the head to a
strided 3-D slice, which runs as a slow bmm. So where `memcirc.models.arch.lm_body` knows the split,
the base model runs alone and the head is one 2-D GEMM over the kept hidden states; otherwise
`logits_to_keep` where accepted, else the full forward, sliced.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from memcirc.models.arch import lm_body


def accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether `model.forward` takes `argument` by name."""
    return argument in inspect.signature(model.forward).parameters


def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, keep_from: int,
                     use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """Logits (B, T - keep_from, V) of positions keep_from.. and the past_key_values (None without use_cache)."""
    width = input_ids.shape[1]
    if not 0 <= keep_from < width:   # logits_to_keep=0 would mean "all" to HF: refuse an empty request
        raise ValueError(f"keep_from must be in [0, {width}), got {keep_from}")
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache)
    parts = lm_body(model)
    if parts is not None:
        body, head = parts
        out = body(**kwargs, return_dict=True)
        return _unembed(head, out.last_hidden_state[:, keep_from:]), out.past_key_values if use_cache else None
    if accepts(model, "logits_to_keep"):
        out = model(**kwargs, logits_to_keep=width - keep_from)
        return out.logits, out.past_key_values if use_cache else None
    out = model(**kwargs)   # the family applies more than the head: slice the full logits
    return out.logits[:, keep_from:], out.past_key_values if use_cache else None


def _unembed(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) for a (B, K, d) slice, as one 2-D GEMM.

    A strided 3-D slice (what HF's logits_to_keep passes) makes the head a bmm against a broadcast
    weight, measured 4x slower per FLOP than addmm on the testbed; copying the B*K*d rows is cheap.
    """
    batch, kept, width = hidden.shape
    return head(hidden.reshape(batch * kept, width)).view(batch, kept, -1)
