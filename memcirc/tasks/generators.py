"""Clean/corrupt prompt generators of the standard circuit tasks, from the committed lexicon.

Every generator is offline, seeded (a `random.Random` it is given) and tokenizer-aware: it keeps only
the words the tokenizer encodes as ONE token (with a leading space), so the clean and corrupt prompts
of a pair have equal length and differ exactly at the substituted positions, and every answer is one
token. When the tokenizer leaves too few usable words the generator says so (`InputError`), naming them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from memcirc.errors import InputError
from memcirc.models.tokenizer import BosPolicy, encode

LEXICON = Path(__file__).with_name("lexicon.json")
MAX_TRIES = 50           # draws per wanted prompt before a generator gives up
MIN_WORDS = 4            # fewest single-token words a slot needs


@dataclass(frozen=True)
class TaskPrompt:
    """One clean/corrupt pair of a task, as token ids.

    Attributes:
        answers / wrongs: the tokens the metric counts for and against (one each, except greater-than's
            year sets); the first of each is the pair's `answer` / `wrong` in pairs.jsonl.
        detail: what was substituted (names, years, ...), kept in the pairs.jsonl row.
    """

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    answers: tuple[int, ...]
    wrongs: tuple[int, ...]
    detail: dict[str, Any] = field(default_factory=dict)


Generator = Callable[[Any, int, random.Random, BosPolicy], list[TaskPrompt]]


@cache
def lexicon() -> dict[str, Any]:
    return json.loads(LEXICON.read_text())


def single_token(tokenizer: Any, word: str) -> int | None:
    """The id of `word` when the tokenizer encodes it as one token that is not special (an unknown word
    is one token too: the unknown token), else None."""
    ids = encode(tokenizer, word)
    return ids[0] if len(ids) == 1 and ids[0] not in tokenizer.all_special_ids else None


def usable_words(tokenizer: Any, words: Sequence[str], what: str, need: int = MIN_WORDS) -> dict[str, int]:
    """word -> id of the words that are one token with a leading space (' Mary'); refuses fewer than `need`."""
    found = {w: i for w in words if (i := single_token(tokenizer, " " + w)) is not None}
    if len(found) < need:
        raise InputError(f"this tokenizer encodes only {len(found)} of the {len(words)} {what} as one token "
                         f"({', '.join(found) or 'none'}); the task needs {need}: the model cannot run it")
    return found


def _pair(tokenizer: Any, bos: BosPolicy, clean: str, corrupt: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Clean and corrupt ids when they have equal length (BPE merges across a substitution can break it)."""
    a, b = bos.apply(encode(tokenizer, clean)), bos.apply(encode(tokenizer, corrupt))
    return (tuple(a), tuple(b)) if len(a) == len(b) else None


def _draw(n: int, make: Callable[[], TaskPrompt | None], task: str) -> list[TaskPrompt]:
    """n prompts from `make`, which returns None for a draw the tokenizer does not allow."""
    out: list[TaskPrompt] = []
    for _ in range(n * MAX_TRIES):
        if len(out) == n:
            return out
        if (p := make()) is not None:
            out.append(p)
    if len(out) < n:
        raise InputError(f"{task}: only {len(out)} of {n} prompts tokenize into equal-length clean/corrupt "
                         "pairs with this tokenizer")
    return out


# -- the tasks ------------------------------------------------------------------------------

def ioi(tokenizer: Any, n: int, rng: random.Random, bos: BosPolicy) -> list[TaskPrompt]:
    """Indirect object identification: "When Mary and John went to the store, John gave a drink to" -> Mary.

    Answer: the indirect object (A), wrong: the subject (B). Corrupt: the same template with three other
    names (A, B -> C, D and the repeated B -> E: the "ABC" distribution of Wang et al.), so no name repeats.
    """
    lex = lexicon()
    names = usable_words(tokenizer, lex["names"]["male"] + lex["names"]["female"], "names", need=5)
    templates, places, objects = lex["ioi"]["templates"], lex["ioi"]["places"], lex["ioi"]["objects"]

    def make() -> TaskPrompt | None:
        template, place, obj = rng.choice(templates), rng.choice(places), rng.choice(objects)
        a, b, c, d, e = rng.sample(sorted(names), 5)
        fill = template.replace("{place}", place).replace("{object}", obj)
        ids = _pair(tokenizer, bos, fill.format(A=a, B=b), _abc(fill, c, d, e))
        if ids is None:
            return None
        return TaskPrompt(*ids, (names[a],), (names[b],), {"io": a, "s": b, "corrupt_names": [c, d, e],
                                                          "template": templates.index(template)})
    return _draw(n, make, "ioi")


def _abc(fill: str, c: str, d: str, e: str) -> str:
    """The corrupt IOI prompt: the first {A}, {B} become C, D and the repeated {B} becomes E."""
    first_b = fill.index("{B}")
    second_b = fill.index("{B}", first_b + 3)
    return (fill[:second_b] + e + fill[second_b + 3:]).format(A=c, B=d)


def greater_than(tokenizer: Any, n: int, rng: random.Random, bos: BosPolicy) -> list[TaskPrompt]:
    """Greater-than: "The war lasted from the year 1732 to the year 17" -> a year after 32.

    Metric: probability difference, P(answers) - P(wrongs), summed over the year tokens. Corrupt: the
    start year's last two digits are 01. With a tokenizer that has two-digit tokens the answers are the
    years YY' > YY and the wrongs YY' <= YY (Hanna et al.); with one that splits digits (SmolLM2, Llama)
    the next token is the tens digit: answers the digits above YY's tens digit, wrongs the ones below
    (the equal digit is ambiguous and counts for neither).
    """
    lex = lexicon()["greater_than"]
    form, digit_ids = year_form(tokenizer)
    nouns = usable_words(tokenizer, lex["nouns"], "greater-than nouns")
    template = lex["templates"][0]

    def make() -> TaskPrompt | None:
        noun, century = rng.choice(sorted(nouns)), rng.choice(lex["centuries"])
        yy = rng.randrange(2, 99) if form == "two_digit" else 10 * rng.randrange(1, 9) + rng.randrange(10)
        ids = _pair(tokenizer, bos, template.format(noun=noun, century=century, yy=f"{yy:02d}"),
                    template.format(noun=noun, century=century, yy=lex["corrupt_yy"]))
        if ids is None:
            return None
        if form == "two_digit":
            answers, wrongs = [digit_ids[y] for y in range(yy + 1, 100)], [digit_ids[y] for y in range(yy + 1)]
        else:
            answers, wrongs = [digit_ids[t] for t in range(yy // 10 + 1, 10)], [digit_ids[t] for t in range(yy // 10)]
        return TaskPrompt(*ids, tuple(answers), tuple(wrongs), {"yy": yy, "century": century, "form": form})
    return _draw(n, make, "greater_than")


def year_form(tokenizer: Any) -> tuple[str, list[int]]:
    """("two_digit", ids of "00".."99") when " year 1732" encodes as " year 17" then one token "32";
    ("digit", ids of "0".."9") when it encodes as " year 17" then "3", "2"; otherwise the task cannot be
    posed (InputError). The answer is the token after the century, so that is what must be one token."""
    year, prefix = encode(tokenizer, " year 1732"), encode(tokenizer, " year 17")
    two = [single_token(tokenizer, f"{y:02d}") for y in range(100)]
    if all(t is not None for t in two) and year == prefix + [two[32]]:
        return "two_digit", [t for t in two if t is not None]
    one = [single_token(tokenizer, str(d)) for d in range(10)]
    if all(t is not None for t in one) and year == prefix + [one[3], one[2]]:
        return "digit", [t for t in one if t is not None]
    raise InputError(f"greater_than: this tokenizer encodes ' year 1732' as {year} after ' year 17' = {prefix}: "
                     "neither one two-digit token nor two digit tokens follow the century; the task cannot be posed")


def sva(tokenizer: Any, n: int, rng: random.Random, bos: BosPolicy) -> list[TaskPrompt]:
    """Subject-verb agreement: "The keys near the cabinet" -> are (not is).

    The clean subject is singular or plural at random; corrupt: the same prompt with the subject's
    number flipped. The attractor noun's number is random (and the same in both).
    """
    lex = lexicon()["sva"]
    flat = [w for pair in lex["nouns"] for w in pair]
    ok = usable_words(tokenizer, flat, "nouns (singular and plural)")
    nouns = [(s, p) for s, p in lex["nouns"] if s in ok and p in ok]
    if len(nouns) < MIN_WORDS:
        raise InputError(f"sva: only {len(nouns)} nouns are one token in both numbers with this tokenizer")
    verbs = {v: single_token(tokenizer, " " + v) for v in lex["verbs"]}
    if None in verbs.values():
        raise InputError(f"sva: the verbs {lex['verbs']} must each be one token (with a leading space)")
    singular, plural = (verbs[v] for v in lex["verbs"])
    assert singular is not None and plural is not None

    def make() -> TaskPrompt | None:
        template = rng.choice(lex["templates"])
        subject, attractor = rng.sample(nouns, 2)
        number, attractor_number = rng.randrange(2), rng.randrange(2)
        fill = template.replace("{attractor}", attractor[attractor_number])
        ids = _pair(tokenizer, bos, fill.format(subject=subject[number]), fill.format(subject=subject[1 - number]))
        if ids is None:
            return None
        right, wrong = (singular, plural) if number == 0 else (plural, singular)
        return TaskPrompt(*ids, (right,), (wrong,), {"subject": subject[number], "plural": bool(number)})
    return _draw(n, make, "sva")


def gender(tokenizer: Any, n: int, rng: random.Random, bos: BosPolicy) -> list[TaskPrompt]:
    """Gendered pronoun: "So John is such a good cook, isn't" -> he (not she).

    Corrupt: the same template with a name of the other gender; answer and wrong swap with it.
    """
    lex = lexicon()
    male = usable_words(tokenizer, lex["names"]["male"], "male names")
    female = usable_words(tokenizer, lex["names"]["female"], "female names")
    pronoun = {g: single_token(tokenizer, " " + p) for g, p in lex["gender"]["pronouns"].items()}
    if None in pronoun.values():
        raise InputError("gender: the pronouns ' he' and ' she' must each be one token")
    he, she = pronoun["male"], pronoun["female"]
    assert he is not None and she is not None

    def make() -> TaskPrompt | None:
        template = rng.choice(lex["gender"]["templates"])
        m, f = rng.choice(sorted(male)), rng.choice(sorted(female))
        is_male = rng.randrange(2) == 0
        clean, corrupt = (m, f) if is_male else (f, m)
        ids = _pair(tokenizer, bos, template.format(name=clean), template.format(name=corrupt))
        if ids is None:
            return None
        return TaskPrompt(*ids, (he if is_male else she,), (she if is_male else he,), {"name": clean})
    return _draw(n, make, "gender")


INDUCTION_SEGMENT = 16   # random tokens in the first copy
INDUCTION_PREFIX = 8     # tokens of the second copy before the answer


def induction(tokenizer: Any, n: int, rng: random.Random, bos: BosPolicy) -> list[TaskPrompt]:
    """Induction on repeated random tokens: A (16 tokens), then A's first 8 -> A's 9th.

    Corrupt: the first copy replaced by other random tokens B (the second part, A's first 8, is the
    same), so nothing earlier says what comes next; wrong: B's 9th token (where the answer sits in the
    clean first copy). Tokens are drawn without repeats from the tokenizer's ordinary tokens (not
    special, and decoding then encoding gives the token back).
    """
    pool = ordinary_tokens(tokenizer)
    need = 2 * INDUCTION_SEGMENT
    if len(pool) < need:
        raise InputError(f"induction: the tokenizer has only {len(pool)} ordinary tokens; {need} are needed")

    def make() -> TaskPrompt:
        ids = rng.sample(pool, need)
        a, b = ids[:INDUCTION_SEGMENT], ids[INDUCTION_SEGMENT:]
        second = a[:INDUCTION_PREFIX]
        clean, corrupt = bos.apply(a + second), bos.apply(b + second)
        return TaskPrompt(tuple(clean), tuple(corrupt), (a[INDUCTION_PREFIX],), (b[INDUCTION_PREFIX],))
    return _draw(n, make, "induction")


def ordinary_tokens(tokenizer: Any) -> list[int]:
    """Ids that are not special and survive decode -> encode as themselves (no byte fragments)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        if encode(tokenizer, tokenizer.decode([i])) == [i]:
            out.append(i)
    return out


GENERATORS: dict[str, Generator] = {"ioi": ioi, "greater_than": greater_than, "sva": sva, "gender": gender,
                                    "induction": induction}
