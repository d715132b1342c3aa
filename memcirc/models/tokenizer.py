"""Tokenizer conventions memcirc must get right on real models: whether every sequence starts with BOS.

A model trained with BOS at the start of each sequence (Llama, Gemma, SmolLM2 GGUF) scores a window
without it as out-of-distribution text: teacher-forced accuracy on famous texts drops from ~0.9 to
~0.4. Windows and perplexity blocks are slices of one tokenized document, so the tokenizer's own
`add_special_tokens` only puts BOS on the first slice. memcirc therefore encodes text without special
tokens and prepends BOS to every window and block itself, by one `BosPolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memcirc.errors import InputError

BOS_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class BosPolicy:
    """What to put before every window / block.

    Attributes:
        mode: auto (what the tokenizer does on its own), always or never.
        bos_id: the id prepended to each sequence; None when nothing is prepended.
    """

    mode: str
    bos_id: int | None

    def strip(self, tokens: Sequence[int]) -> list[int]:
        """A document's tokens without a leading BOS (it is put back on each slice by `apply`)."""
        tokens = list(tokens)
        return tokens[1:] if self.bos_id is not None and tokens[:1] == [self.bos_id] else tokens

    def apply(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` with BOS in front (once) when the policy prepends one."""
        tokens = list(tokens)
        if self.bos_id is None or tokens[:1] == [self.bos_id]:
            return tokens
        return [self.bos_id, *tokens]

    @property
    def n_prepended(self) -> int:
        return 0 if self.bos_id is None else 1

    def to_dict(self) -> dict[str, Any]:
        return {"prepend_bos": self.mode, "bos_token_id": self.bos_id}


def adds_bos(tokenizer: Any) -> bool:
    """Does the tokenizer itself put BOS in front of encoded text (the model's training convention)?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def bos_policy(tokenizer: Any, mode: str = "auto") -> BosPolicy:
    """The BOS policy for `--prepend-bos mode` with this tokenizer.

    Raises:
        InputError: an unknown mode, or `always` for a tokenizer without a BOS token.
    """
    if mode not in BOS_MODES:
        raise InputError(f"--prepend-bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "never" or (mode == "auto" and not adds_bos(tokenizer)):
        return BosPolicy(mode, None)
    if tokenizer.bos_token_id is None:
        raise InputError("--prepend-bos always: this tokenizer has no BOS token; use --prepend-bos never")
    return BosPolicy(mode, int(tokenizer.bos_token_id))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any special tokens (the BosPolicy adds BOS per sequence)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
