"""Tokenizer conventions memcirc must get right on real models: whether every sequence starts with BOS.

A model trained with BOS at the start of each sequence (Llama-2, Gemma) scores a window
without it as out-of-distribution text: teacher-forced accuracy on famous texts drops from ~0.9 to
~0.4. Windows and perplexity blocks are slices of one tokenized document, so the tokenizer's own
`add_special_tokens` only puts BOS on the first slice. memcirc therefore encodes text without special
tokens and prepends BOS to every window and block itself, by one `BosPolicy`.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from memcirc.errors import InputError

log = logging.getLogger(__name__)

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


# -- quiet loading -----------------------------------------------------------------------------
# transformers 4.57.3-4.57.x warns that a local tokenizer has "an incorrect regex pattern ... Mistral"
# for any folder whose config.json was saved by those versions, when the vocabulary has > 100k tokens
# and a pre-tokenizer (tokenization_utils_base._patch_mistral_regex): every converted GGUF folder and
# every folder TransformerLens is given (qwen2, gemma3). memcirc never loads Mistral tokenizers with
# that regex; the message is false, so it is filtered - that one message only, only while loading.

_MISTRAL_REGEX_WARNING = "with an incorrect regex pattern"
_TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


def _not_mistral_regex_warning(record: logging.LogRecord) -> bool:
    return _MISTRAL_REGEX_WARNING not in record.getMessage()


@contextmanager
def quiet_tokenizer_warnings() -> Iterator[None]:
    """Drop transformers' false "incorrect regex pattern ... Mistral" warning inside the block."""
    logger = logging.getLogger(_TOKENIZER_LOGGER)
    logger.addFilter(_not_mistral_regex_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_mistral_regex_warning)


# -- sanity check: is this the right tokenizer for this model and this data? ---------------------
# A wrong tokenizer gives plausible-looking, meaningless numbers (the Gemma-3 GGUF case: 2.2x the
# tokens, teacher-forced accuracy 0.13 instead of 0.77). Checked on every load that reads text.

SAMPLE_CHARS = 20_000          # text measured: the first documents, up to this many characters
LARGE_VOCAB = 30_000           # a vocabulary this large gives ~4 characters per token on English
MIN_CHARS_PER_TOKEN = 1.5      # below this on English-like text: a broken tokenizer
ENGLISH_LIKE = 0.8             # fraction of ASCII letters and spaces that makes text English-like
MIN_WHOLE_WORDS = 20           # words that are one vocabulary token, needed before judging splits
MAX_SPLIT_FRACTION = 0.25      # more of them split into pieces: the merges/scores are broken (real: 0)
FEW_ROWS_USED = 0.9            # a tokenizer using less of the embedding than this: another model's?
_WORD = re.compile(r"(?<= )[A-Za-z]{3,}\b")
_WORD_MARKERS = ("▁", "Ġ")     # how sentencepiece and byte-level BPE spell a leading space
_FIX = "pass --tokenizer with the model's own tokenizer (a folder, Hub id or .gguf file)"


@dataclass(frozen=True)
class TokenizerCheck:
    """What the sanity check measured (a manifest records `to_dict()`)."""

    tokenizer_len: int                 # len(tokenizer): base vocabulary + added tokens
    base_vocab: int                    # tokenizer.vocab_size (without added tokens)
    embedding_rows: int
    id_gaps: int                       # ids below the highest that no token maps to (duplicates)
    sample_chars: int
    sample_tokens: int
    chars_per_token: float | None
    round_trip: str | None             # exact | whitespace (equal up to whitespace) | lossy; None: no text
    whole_words: int                   # distinct sample words that are one token of the vocabulary
    whole_words_split: int             # ... that the tokenizer splits into pieces nevertheless
    split_examples: tuple[str, ...]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "split_examples": list(self.split_examples), "warnings": list(self.warnings)}


def check_tokenizer(tokenizer: Any, embedding_rows: int, texts: Sequence[str] = ()) -> TokenizerCheck:
    """Check that `tokenizer` fits a model with `embedding_rows` input rows and makes sense on `texts`.

    Refuses (InputError, naming the fix) what certainly breaks results: a base vocabulary larger
    than the embedding; English-like text at < 1.5 characters per token with a > 30k vocabulary;
    most sample words that are one token of the vocabulary split into pieces. Warns (logged, and in
    `warnings`) about a lossy encode -> decode round trip, added tokens beyond the embedding, a
    tokenizer using far fewer rows than the model has, and ids without a token.
    """
    total = len(tokenizer)
    base = int(getattr(tokenizer, "vocab_size", total) or total)
    warnings = _size_warnings(tokenizer, base, total, embedding_rows)
    sample = _sample(texts)
    ids = encode(tokenizer, sample) if sample else []
    round_trip = _round_trip(tokenizer, sample) if sample else None
    if round_trip == "lossy":
        warnings.append("encode -> decode does not give the text back (lossy tokenizer: unknown "
                        "characters or a normalizer); scores are of the text as the tokenizer sees it")
    cpt = len(sample) / len(ids) if ids else None
    words, split = _whole_words_split(tokenizer, sample, ids)
    check = TokenizerCheck(total, base, embedding_rows, _id_gaps(tokenizer), len(sample), len(ids),
                           None if cpt is None else round(cpt, 3), round_trip, len(words), len(split),
                           tuple(split[:8]), tuple(warnings))
    for message in warnings:
        log.warning("tokenizer check: %s", message)
    _refuse_if_broken(check, sample)
    log.info("tokenizer check: %d tokens (%d embedding rows), %s chars/token on %d sample chars, "
             "round trip %s, %d/%d whole-word tokens split", total, embedding_rows,
             "n/a" if cpt is None else f"{cpt:.2f}", len(sample), round_trip or "n/a", len(split), len(words))
    return check


def _sample(texts: Sequence[str]) -> str:
    """The first texts, joined by newlines, up to SAMPLE_CHARS characters."""
    parts, size = [], 0
    for text in texts:
        if size >= SAMPLE_CHARS:
            break
        parts.append(text[: SAMPLE_CHARS - size])
        size += len(parts[-1]) + 1
    return "\n".join(parts)


def _size_warnings(tokenizer: Any, base: int, total: int, rows: int) -> list[str]:
    if base > rows:
        raise InputError(f"the tokenizer has {base:,} tokens but the model's embedding only {rows:,} rows "
                         f"(wrong tokenizer for this model); {_FIX}")
    warnings = []
    if total > rows:
        beyond = sorted(t for t, i in tokenizer.get_added_vocab().items() if i >= rows)
        warnings.append(f"{total - rows} added token(s) have ids beyond the {rows:,} embedding rows "
                        f"({', '.join(beyond[:5])}): text containing them cannot be scored")
    if (gaps := _id_gaps(tokenizer)) > 0:
        warnings.append(f"{gaps} id(s) below the highest have no token (a piece listed twice?): the "
                        "tokenizer cannot produce them")
    if total < FEW_ROWS_USED * rows:
        warnings.append(f"the tokenizer has {total:,} tokens for {rows:,} embedding rows: is it this "
                        f"model's tokenizer? If not, {_FIX}")
    return warnings


def _id_gaps(tokenizer: Any) -> int:
    ids = set(tokenizer.get_vocab().values())
    return max(ids) + 1 - len(ids) if ids else 0


def _round_trip(tokenizer: Any, text: str) -> str:
    back = tokenizer.decode(encode(tokenizer, text), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    if back == text:
        return "exact"
    return "whitespace" if back.split() == text.split() else "lossy"


def _whole_words_split(tokenizer: Any, text: str, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """Distinct words of `text` (after a space) whose spelling with a leading-space marker is one
    vocabulary token, and those of them the tokenizer never produced for `text`."""
    vocab = tokenizer.get_vocab()
    produced = set(tokenizer.convert_ids_to_tokens(list(ids)))
    words, split = [], []
    for word in dict.fromkeys(_WORD.findall(text)):
        spelled = [m + word for m in _WORD_MARKERS if m + word in vocab]
        if spelled:
            words.append(word)
            if not any(s in produced for s in spelled):
                split.append(word)
    return words, split


def _refuse_if_broken(check: TokenizerCheck, sample: str) -> None:
    english = sum(c.isascii() and (c.isalpha() or c == " ") for c in sample) >= ENGLISH_LIKE * len(sample)
    cpt = check.chars_per_token
    if cpt is not None and english and check.tokenizer_len > LARGE_VOCAB and cpt < MIN_CHARS_PER_TOKEN:
        raise InputError(f"the tokenizer cuts English-like text into {cpt:.2f} characters per token with a "
                         f"{check.tokenizer_len:,}-token vocabulary (real tokenizers: ~4): it is broken; {_FIX}")
    if check.whole_words >= MIN_WHOLE_WORDS and check.whole_words_split > MAX_SPLIT_FRACTION * check.whole_words:
        raise InputError(f"the tokenizer splits {check.whole_words_split} of {check.whole_words} sample words "
                         f"that are single tokens of its own vocabulary (e.g. {', '.join(check.split_examples[:3])}): "
                         f"its merges or scores are broken (known case: a Gemma GGUF tokenizer converted by "
                         f"transformers); {_FIX}")


def sample_texts(documents: Iterable[Any], chars: int = SAMPLE_CHARS) -> tuple[Iterator[Any], list[str]]:
    """The documents again (nothing lost) and the texts of the first ones, up to `chars` characters."""
    it = iter(documents)
    head, texts, size = [], [], 0
    for document in it:
        head.append(document)
        text = getattr(document, "text", None)
        if isinstance(text, str):
            texts.append(text)
            size += len(text)
        if size >= chars:
            break
    return itertools.chain(head, it), texts


# Where `checked_documents` leaves its result on the tokenizer it checked (read by `tokenizer_check_of`).
CHECK_ATTR = "memcirc_tokenizer_check"


def checked_documents(documents: Iterable[Any], tokenizer: Any, embedding_rows: int) -> Iterator[Any]:
    """`documents` unchanged, after `check_tokenizer` ran on the first ones' text.

    For a stage that cuts text before the weights load: `embedding_rows` is then the config's
    vocab_size. The measurements stay on the tokenizer; `tokenizer_check_of` reads them for the
    manifest (`LoadedModel.tokenizer_check`).
    """
    documents, texts = sample_texts(documents)
    setattr(tokenizer, CHECK_ATTR, check_tokenizer(tokenizer, embedding_rows, texts).to_dict())
    return documents


def tokenizer_check_of(tokenizer: Any) -> dict[str, Any] | None:
    """What `checked_documents` measured on `tokenizer` (None: it was not checked)."""
    return getattr(tokenizer, CHECK_ATTR, None)
