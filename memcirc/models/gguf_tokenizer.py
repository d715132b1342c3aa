"""The tokenizer of a GGUF file, corrected where transformers' own GGUF conversion is wrong.

transformers 4.57 (`integrations/ggml.py`) gets these wrong, and each one changes every score:

- **Gemma 2/3**: `GGUFGemmaConverter` builds a *Unigram* model from `tokenizer.ggml.scores`. Those
  scores are the sentencepiece *BPE* model's merge priorities (a piece with a higher score is merged
  earlier), not log-probabilities: Unigram then prefers many short pieces ("Permission is hereby
  granted" -> Per mi ss ion ▁is ▁h ere by ...) though `Permission` and `▁hereby` are tokens. It also
  renames `<0x09>` to "\\t" where "\\t" is a token already, which loses an id (262,143 entries for a
  262,144-row embedding). `gemma_bpe` builds the BPE model sentencepiece runs instead.
- **llama-style tokenizers** (`GGUFLlamaConverter`): the EOS token is set to tokens[bos_token_id].
- `tokenizer.ggml.add_bos_token` / `add_eos_token` are ignored: the Llama and Gemma classes add BOS
  by default even where the GGUF says the model does not (SmolLM2).

`from_gguf` returns the corrected tokenizer and the list of corrections; `memcirc.models.gguf` saves
it in the converted folder, so every later load reads a plain tokenizer.json.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from gguf import GGUFReader, Keys, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, GemmaTokenizerFast, PreTrainedTokenizerBase

from memcirc.errors import InputError

log = logging.getLogger(__name__)

# GGUF architectures whose tokenizer transformers converts with GGUFGemmaConverter (a Unigram model).
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
SPECIAL_IDS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
               "pad": Keys.Tokenizer.PAD_ID}
# HF's GemmaConverter marks these user-defined pieces special (they delimit chat turns).
_GEMMA_SPECIAL_USER_DEFINED = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of a GGUF file (keys `tokenizer.ggml.*`)."""

    architecture: str
    model: str                        # "llama" (sentencepiece), "gpt2" (byte-level BPE), ...
    tokens: list[str]
    scores: list[float] | None
    types: list[int] | None
    merges: list[str] | None
    special_ids: dict[str, int]       # bos / eos / unk / pad -> id, where the GGUF names one
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_vocab(path: Path) -> GGUFVocab:
    """The tokenizer metadata of the GGUF file at `path`.

    Raises:
        InputError: not a readable GGUF file, or one without a token list.
    """
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable GGUF file ({err})") from err
    tokens = _field(reader, Keys.Tokenizer.LIST)
    if not tokens:
        raise InputError(f"GGUF file {path} has no tokenizer ({Keys.Tokenizer.LIST}); pass --tokenizer")
    ids = {name: _field(reader, key) for name, key in SPECIAL_IDS.items()}
    return GGUFVocab(
        architecture=str(_field(reader, Keys.General.ARCHITECTURE)),
        model=str(_field(reader, Keys.Tokenizer.MODEL)),
        tokens=list(tokens), scores=_field(reader, Keys.Tokenizer.SCORES),
        types=_field(reader, Keys.Tokenizer.TOKEN_TYPE), merges=_field(reader, Keys.Tokenizer.MERGES),
        special_ids={name: int(i) for name, i in ids.items() if i is not None},
        add_bos=_field(reader, Keys.Tokenizer.ADD_BOS), add_eos=_field(reader, Keys.Tokenizer.ADD_EOS),
        chat_template=_field(reader, Keys.Tokenizer.CHAT_TEMPLATE),
    )


def from_gguf(path: Path) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The tokenizer of the GGUF file at `path`, and what was corrected (empty: nothing).

    Gemma GGUFs get `gemma_bpe`; the rest transformers' conversion, with the special tokens and the
    BOS/EOS convention the GGUF states.
    """
    vocab = read_vocab(path)
    fixes: list[str] = []
    if vocab.architecture in GEMMA_ARCHITECTURES and vocab.model == "llama":
        tokenizer: PreTrainedTokenizerBase = _gemma_tokenizer(vocab)
        fixes.append("gemma: BPE from the GGUF's pieces, scores and types (transformers builds a Unigram model)")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"cannot build the tokenizer of {path}: {str(err).splitlines()[0][:300]}") from err
    # transformers keeps the GGUF as the tokenizer's `vocab_file`: save_pretrained would copy the whole
    # model file as "tokenizer.model" (a sentencepiece file it is not). tokenizer.json is the tokenizer.
    if getattr(tokenizer, "vocab_file", None) is not None:
        tokenizer.vocab_file = None  # type: ignore[attr-defined]
    fixes += _fix_special_tokens(tokenizer, vocab)
    fixes += _fix_bos_eos(tokenizer, vocab)
    if vocab.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = vocab.chat_template
    return tokenizer, fixes


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, vocab: GGUFVocab) -> list[str]:
    """Set bos/eos/unk/pad to the tokens the GGUF names by id (transformers swaps eos for bos)."""
    fixes = []
    for name, token_id in vocab.special_ids.items():
        if not 0 <= token_id < len(vocab.tokens):
            continue
        token = cast(Any, tokenizer).convert_ids_to_tokens(token_id)
        current = getattr(tokenizer, f"{name}_token")
        if isinstance(token, str) and current != token:
            setattr(tokenizer, f"{name}_token", token)
            fixes.append(f"{name}_token {current!r} -> {token!r} (GGUF id {token_id})")
    return fixes


def _fix_bos_eos(tokenizer: PreTrainedTokenizerBase, vocab: GGUFVocab) -> list[str]:
    """Follow the GGUF's add_bos_token / add_eos_token where the tokenizer class has the switch."""
    fixes = []
    for name, wanted in (("add_bos_token", vocab.add_bos), ("add_eos_token", vocab.add_eos)):
        if wanted is None or not isinstance(getattr(type(tokenizer), name, None), property):
            continue  # the GGUF says nothing, or the class has no such switch (e.g. Qwen2: never BOS)
        if bool(getattr(tokenizer, name)) != bool(wanted):
            setattr(tokenizer, name, bool(wanted))   # the property setter rebuilds the post-processor
            fixes.append(f"{name} -> {bool(wanted)} (as the GGUF states)")
    return fixes


# -- Gemma: the sentencepiece BPE model ------------------------------------------------------

def _gemma_tokenizer(vocab: GGUFVocab) -> GemmaTokenizerFast:
    names = {name: vocab.tokens[i] for name, i in vocab.special_ids.items() if 0 <= i < len(vocab.tokens)}
    return GemmaTokenizerFast(
        tokenizer_object=gemma_bpe(vocab), bos_token=names.get("bos", "<bos>"),
        eos_token=names.get("eos", "<eos>"), unk_token=names.get("unk", "<unk>"),
        pad_token=names.get("pad", "<pad>"),
        add_bos_token=True if vocab.add_bos is None else bool(vocab.add_bos),
        add_eos_token=bool(vocab.add_eos),
    )


def gemma_pieces(vocab: GGUFVocab) -> list[str]:
    """The pieces as HF's Gemma tokenizer spells them, one per id."""
    # llama.cpp writes the "▁" of user-defined pieces as a space ("pre-normalized"); the model sees "▁".
    pieces = [t.replace(" ", "▁") for t in vocab.tokens]
    types = vocab.types or [TokenType.NORMAL] * len(pieces)
    present = set(pieces)
    used = {c for piece, kind in zip(pieces, types, strict=True) if kind == TokenType.NORMAL for c in piece}
    for i, (piece, kind) in enumerate(zip(pieces, types, strict=True)):
        # A one-byte character that occurs in pieces but is no piece itself (Gemma's "\t" in "\t\t")
        # must be one for BPE to merge it (sentencepiece merges unknown characters, HF's BPE does
        # not): its byte piece takes its name, as HF's GemmaConverter does for "\t" - but only where
        # the name is free (HF renames <0x09> even where "\t" exists, and loses an id).
        if kind == TokenType.BYTE and len(piece) == 6 and piece.startswith("<0x"):
            char = chr(int(piece[3:5], 16))
            if char.isascii() and char in used and char not in present:
                pieces[i] = char
                present.add(char)
    return pieces


def gemma_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers` BPE model equivalent to the Gemma sentencepiece BPE model of a GGUF.

    Byte fallback for characters that are no piece; control pieces as special added tokens,
    user-defined pieces as added tokens (as HF's GemmaConverter); the normalizer, pre-tokenizer and
    decoder of HF's Gemma tokenizer (spaces become "▁", no prefix space).
    """
    pieces = gemma_pieces(vocab)
    types = list(vocab.types or [TokenType.NORMAL] * len(pieces))
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if ids.setdefault(piece, i) != i:
            log.warning("GGUF piece %r appears twice (ids %d and %d); id %d is unreachable", piece, ids[piece], i, i)
    if vocab.merges:
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    else:
        merges = merges_from_scores(pieces, _scores(vocab, len(pieces)), types)
    unk = vocab.special_ids.get("unk")
    model = BPE(ids, [(a, b) for a, b in merges], unk_token=pieces[unk] if unk is not None else None,
                fuse_unk=True, byte_fallback=True, dropout=None)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")  # type: ignore[assignment]
    # HF's GemmaConverter's pre-tokenizer (a no-op once the normalizer has replaced every space)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # type: ignore[assignment]
    tokenizer.decoder = decoders.Sequence(  # type: ignore[assignment]
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens(_added_tokens(pieces, types))
    return tokenizer


def _scores(vocab: GGUFVocab, n: int) -> list[float]:
    if vocab.scores is not None and len(vocab.scores) == n and len(set(vocab.scores)) > 1:
        return [float(s) for s in vocab.scores]
    # Without scores the id order is the rank order (sentencepiece sorts its pieces by score).
    log.warning("the GGUF has no usable tokenizer.ggml.scores: merges ranked by piece id")
    return [-float(i) for i in range(n)]


def _added_tokens(pieces: Sequence[str], types: Sequence[int]) -> list[AddedToken]:
    added = []
    for piece, kind in zip(pieces, types, strict=True):
        if kind not in (TokenType.CONTROL, TokenType.USER_DEFINED):
            continue
        special = kind == TokenType.CONTROL or piece in _GEMMA_SPECIAL_USER_DEFINED
        # Sentencepiece matches user-defined pieces in the normalized text: a piece spelled with "▁"
        # (a run of spaces) must be matched after spaces became "▁".
        added.append(AddedToken(piece, normalized="▁" in piece, special=special))
    return added


def merges_from_scores(pieces: Sequence[str], scores: Sequence[float],
                       types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE vocabulary: every split (left, right) of a normal piece into
    two normal pieces, ranked by the merged piece's priority, as sentencepiece merges.

    Which way the scores run is checked, not assumed (`higher_scores_merge_first`). Ties among the
    splits of one piece: longer left part first (HF's `generate_merges` order).
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types, strict=True)) if t == TokenType.NORMAL}
    sign = 1.0 if higher_scores_merge_first(pieces, scores, types) else -1.0
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-sign * scores[i], -len(left), -len(right), i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def higher_scores_merge_first(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bool:
    """Whether a higher score means an earlier merge (sentencepiece's convention).

    In a consistent BPE vocabulary a merged piece comes after the pieces it is made of. Count the
    pieces that have a split into two earlier pieces (single characters always count as earlier)
    under each reading of the scores; the reading with more such pieces is the right one.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types, strict=True)) if t == TokenType.NORMAL}
    votes = {1.0: 0, -1.0: 0}
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in normal and b in normal]
        for sign in votes:
            own = sign * scores[i]
            def earlier(part: str, sign: float = sign, own: float = own) -> bool:
                return len(part) == 1 or sign * scores[normal[part]] > own
            votes[sign] += any(earlier(a) and earlier(b) for a, b in splits)
    return votes[1.0] >= votes[-1.0]
