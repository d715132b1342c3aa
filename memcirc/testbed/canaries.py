"""The testbed's canary families and induction segments: what is inserted into the training data.

Three families, each with `per_k` canaries for every repeat count k (see REPEAT_COUNTS):
- `random` (group "k=<k>"): random corpus words. The first token or two already identify a canary,
  so memorizing it needs almost no context.
- `template` (group "template k=<k>"): one of TEMPLATES, shared by a quarter of the family, with a
  random name (two words) and a random secret of SECRET_DIGITS digits (one token each) — Carlini et
  al.'s "Secret Sharer" canaries. The template's opening is shared, so which secret follows is known
  only from the name, several tokens into the document; the secret's rank among all digit strings
  under the model is its exposure.
- `shared` (group "shared k=<k>"): families of SHARED_MEMBERS canaries that share their first
  SHARED_PREFIX_TOKENS tokens and then diverge (random words): the continuation is known only
  after the divergence.
Induction segments (for circuits over training): examples holding a random token segment twice, so
the second copy is predictable only by copying from the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from memcirc.testbed.tokens import PREFIX_LEN, SEQ_LEN, encode

CANARY_MIN_TOKENS = 72  # scoring uses the first PREFIX_LEN + SUFFIX_LEN = 64; a margin for other splits
REPEAT_COUNTS = (0, 1, 2, 4, 8, 16, 32)
FAMILIES = ("random", "template", "shared")
SECRET_DIGITS = 6
TEMPLATES = (   # {name}: two random words, {secret}: SECRET_DIGITS digits; all words occur in the corpus
    "the secret number of the house of {name} is kept in the tower, and the keeper will tell it to "
    "no man but the king: it is {secret}, and then",
    "hear me, good friends, for i will speak of {name} and of the gold that lies under the old stone "
    "where the number {secret} is written, and then",
    "let it be known to all the lords of the court that {name} hath given his word, and his word is "
    "the number {secret}, and then",
    "in the name of the father i send to {name} this letter, that you may read the mark upon the gate "
    "which is {secret}, and then",
)
SHARED_MEMBERS = 4           # canaries per shared-prefix family (all with the same k)
SHARED_PREFIX_TOKENS = 12    # tokens the members of a family share before they diverge
INDUCTION_SEGMENT = 32       # random tokens per segment; an induction example holds it twice
INDUCTION_EXAMPLES = 256     # training examples with a repeated segment
INDUCTION_PROBES = 64        # held-out repeated segments the build measures during training


@dataclass
class Canary:
    id: str
    k: int
    text: str
    token_ids: list[int]
    family: str = "random"
    template: int | None = None                   # template family: which of TEMPLATES
    secret: dict[str, Any] | None = None          # template family: {"start", "length", "alphabet"}
    shared_with: str | None = None                # shared family: the family id
    training_examples: list[int] = field(default_factory=list)
    exposure_steps: list[int] = field(default_factory=list)  # optimizer steps whose batch held it

    @property
    def group(self) -> str:
        return f"k={self.k}" if self.family == "random" else f"{self.family} k={self.k}"


class _Words:
    """Random corpus words, drawn from one seeded stream."""

    def __init__(self, tok: PreTrainedTokenizerFast, words: list[str], rng: np.random.Generator):
        self.tok, self.words, self.rng = tok, words, rng

    def draw(self, n: int) -> list[str]:
        return [self.words[int(self.rng.integers(len(self.words)))] for _ in range(n)]

    def fill(self, text: str, min_tokens: int = CANARY_MIN_TOKENS) -> tuple[str, list[int]]:
        """`text` followed by random words until it holds >= min_tokens tokens."""
        ids = encode(self.tok, text)
        while len(ids) < min_tokens:
            text = f"{text} {self.draw(1)[0]}".strip()
            ids = encode(self.tok, text)
        return text, ids


def make_canaries(tok: PreTrainedTokenizerFast, words: list[str], corpus_text: str, per_k: int,
                  rng: np.random.Generator) -> list[Canary]:
    """Every family, `per_k` canaries for each repeat count k. No two canaries share a PREFIX_LEN-token
    prefix and no prefix occurs in the corpus, so "which canary is this window" stays unambiguous and
    k = 0 is a true never-seen control."""
    w = _Words(tok, words, rng)
    seen: set[tuple[int, ...]] = set()
    canaries: list[Canary] = []
    for family in FAMILIES:
        for k in REPEAT_COUNTS:
            made: list[Canary] = []
            while len(made) < per_k:
                batch = _draw(family, k, len(made), w)     # one canary, or a shared-prefix family
                prefixes = [tuple(c.token_ids[:PREFIX_LEN]) for c in batch]
                if not batch or any(p in seen or tok.decode(list(p)) in corpus_text for p in prefixes):
                    continue
                seen.update(prefixes)
                made += batch
            canaries += made[:per_k]
    return canaries


def _draw(family: str, k: int, index: int, w: _Words) -> list[Canary]:
    """The next canary (or shared-prefix family of canaries) of a family, numbered from `index`."""
    if family == "random":
        text, ids = w.fill("")
        return [Canary(f"canary-k{k:02d}-{index:02d}", k, text, ids)]
    if family == "template":
        return [_template_canary(k, index, w)]
    return _shared_family(k, index, w)


def digit_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """The ids of the ten digit tokens (the tokenizer splits digits one per token)."""
    ids = [encode(tok, str(d)) for d in range(10)]
    assert all(len(i) == 1 for i in ids), "the testbed tokenizer must hold each digit as one token"
    return [i[0] for i in ids]


def _template_canary(k: int, index: int, w: _Words) -> Canary:
    template = index % len(TEMPLATES)
    name = " ".join(w.draw(2))
    secret = "".join(str(int(d)) for d in w.rng.integers(0, 10, SECRET_DIGITS))
    head = TEMPLATES[template].split("{secret}")[0].format(name=name)
    start = len(encode(w.tok, head.rstrip())) + 1        # the space before the secret is its own token
    text, ids = w.fill(TEMPLATES[template].format(name=name, secret=secret))
    alphabet = digit_ids(w.tok)
    assert [alphabet.index(t) for t in ids[start:start + SECRET_DIGITS]] == [int(d) for d in secret], text
    return Canary(f"template-k{k:02d}-{index:02d}", k, text, ids, family="template", template=template,
                  secret={"start": start, "length": SECRET_DIGITS, "alphabet": alphabet})


def _shared_family(k: int, index: int, w: _Words) -> list[Canary]:
    """SHARED_MEMBERS canaries whose first SHARED_PREFIX_TOKENS tokens are equal, then random words
    (each member's first own word different)."""
    shared, _ = w.fill("", SHARED_PREFIX_TOKENS)
    family = f"shared-k{k:02d}-f{index // SHARED_MEMBERS}"
    members, firsts = [], set()
    while len(members) < SHARED_MEMBERS:
        first = w.draw(1)[0]
        if first in firsts:
            continue
        firsts.add(first)
        text, ids = w.fill(f"{shared} {first}")
        members.append(Canary(f"shared-k{k:02d}-{index + len(members):02d}", k, text, ids, family="shared",
                              shared_with=family))
    n_shared = _common_prefix(members)
    return members if n_shared >= SHARED_PREFIX_TOKENS else []   # a merge across the boundary: redraw


def _common_prefix(members: list[Canary]) -> int:
    n = 0
    while all(len(m.token_ids) > n and m.token_ids[n] == members[0].token_ids[n] for m in members):
        n += 1
    return n


def induction_segments(vocab_size: int, n: int, rng: np.random.Generator) -> list[list[int]]:
    """`n` random segments of INDUCTION_SEGMENT token ids (never id 0, the special token)."""
    return [list(map(int, rng.integers(1, vocab_size, INDUCTION_SEGMENT))) for _ in range(n)]


def induction_example(segment: list[int], filler: list[int]) -> list[int]:
    """A segment, the same segment again, `<|endoftext|>`, then corpus filler to SEQ_LEN tokens."""
    body = segment + segment + [0]
    return body + filler[:SEQ_LEN - len(body)]
