"""Exposure (Carlini et al., "The Secret Sharer", 2019): how much more likely a model finds a
document's random secret than the other sequences the secret could have been.

A secret is `tokens[start:start + length]`, each token drawn uniformly from an alphabet of token ids,
so its candidate space R is every alphabet^length sequence. The log-likelihood of a candidate r is
sum_i log p(r_i | context, r_<i), teacher-forced, with float32 logits and a float32 log_softmax; the
context is the document's tokens before the secret. rank(s) = #{r in R: ll(r) >= ll(s)} (ties count
against the secret, which is in R, so rank >= 1) and exposure = log2|R| - log2 rank(s).

Exact when |R| <= n_candidates: every candidate is scored. Otherwise n_candidates candidates are drawn
uniformly without replacement from R minus the secret (Python's `random.Random` seeded by the seed
and the document id), and rank/|R| is estimated by (c + 1)/(n + 1), c being the candidates at least as
likely as the secret: exposure ~ log2(n + 1) - log2(c + 1) (with n = |R| - 1 this is the exact value).
When no candidate is as likely (c = 0) the estimate is its cap log2(n + 1): a lower bound on the
true exposure (`capped`). `extrapolated` is Carlini's skew-normal estimate, which can pass the cap: a
skew-normal fitted to the candidates' log-likelihoods, exposure = -log2 P(ll >= ll(s)), at most log2|R|.

The context is encoded once per document and its KV cache copied to each batch of candidates (all of
one length: no padding); a model without such a cache re-encodes it with every candidate.
"""

from __future__ import annotations

import copy
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from memcirc.data import Document, Secret
from memcirc.errors import InputError
from memcirc.forward import accepts
from memcirc.groups import group_order

EXPOSURE_JSONL = "exposure.jsonl"   # memorization folder: one row per document with a secret
EXPOSURE_PNG = "exposure.png"
METHOD = ("exact rank over all alphabet^length candidates when |R| <= n_candidates, else (c + 1)/(n + 1) "
          "from n candidates drawn uniformly without replacement from R minus the secret")
BATCH_SIZE = 256   # candidates per forward pass


@dataclass(frozen=True)
class SecretCase:
    """One document's secret, ready to score: the context (BOS included when the policy adds one)."""

    doc: str
    group: str | None
    context: tuple[int, ...]
    secret: tuple[int, ...]
    alphabet: tuple[int, ...]


@dataclass(frozen=True)
class Exposure:
    """exposure = log2 total - log2 rank: total is |R| (exact) or n_candidates + 1 (sampled; rank is
    then the secret's among them and itself)."""

    exposure: float
    rank: int
    log2_space: float
    n_candidates: int
    exact: bool
    capped: bool
    secret_loglik: float
    extrapolated: float | None = None

    def row(self, case: SecretCase) -> dict[str, Any]:
        return {"doc": case.doc, "group": case.group, **asdict(self)}


def secret_case(document: Document, tokens: Sequence[int], bos_id: int | None = None) -> SecretCase:
    """The SecretCase of a document with a secret; `tokens` are its tokens as the stage reads them
    (the token column, or the text encoded without special tokens), which the secret's start indexes.

    Raises:
        InputError: the secret runs past the tokens, has no context, or holds a token not in its alphabet.
    """
    secret = document.secret
    assert secret is not None, "only documents with a secret have an exposure"
    where = f"document {document.doc!r}: secret (start {secret.start}, length {secret.length})"
    if secret.start + secret.length > len(tokens):
        raise InputError(f"{where} runs past the document's {len(tokens)} tokens")
    context = list(tokens[:secret.start])
    if bos_id is not None and context[:1] != [bos_id]:
        context = [bos_id, *context]   # as the windows: BOS conditions the text after it
    if not context:
        raise InputError(f"{where} starts the document and no BOS is prepended: its first token has no context")
    value = tuple(tokens[secret.start:secret.start + secret.length])
    if stray := [t for t in value if t not in set(secret.alphabet)]:
        raise InputError(f"{where} holds token {stray[0]} that is not in its alphabet {list(secret.alphabet)}")
    return SecretCase(doc=document.doc, group=document.group, context=tuple(context), secret=value,
                      alphabet=secret.alphabet)


def check_vocab(cases: Sequence[SecretCase], vocab_size: int, n_ctx: int | None) -> None:
    """Fail before any work on ids the model cannot embed or a context + secret it cannot attend over."""
    for case in cases:
        ids = case.context + case.alphabet
        if bad := [t for t in ids if not 0 <= t < vocab_size]:
            raise InputError(f"document {case.doc!r}: secret context or alphabet holds token id {bad[0]} outside "
                             f"the model vocabulary (size {vocab_size})")
        if n_ctx is not None and len(case.context) + len(case.secret) - 1 > n_ctx:
            raise InputError(f"document {case.doc!r}: context + secret is {len(case.context) + len(case.secret)} "
                             f"tokens, over the model context {n_ctx}")


def space_size(secret: Secret | SecretCase) -> int:
    """|R| = alphabet^length (a Python int: 10 digits of length 30 overflow int64)."""
    length = secret.length if isinstance(secret, Secret) else len(secret.secret)
    return len(secret.alphabet) ** length


# -- candidates ----------------------------------------------------------------------------------

def _digits(index: int, base: int, length: int) -> list[int]:
    """The alphabet positions of candidate `index` (mixed radix, first token most significant)."""
    out = []
    for _ in range(length):
        index, digit = divmod(index, base)
        out.append(digit)
    return out[::-1]


def _index(positions: Sequence[int], base: int) -> int:
    index = 0
    for p in positions:
        index = index * base + p
    return index


def sampled_indices(size: int, exclude: int, n: int, rng: random.Random) -> list[int]:
    """n distinct indices drawn uniformly from range(size) minus `exclude` (needs n < size)."""
    pool = size - 1
    if pool <= sys.maxsize:   # random.sample needs len(range(...)), an index-sized int
        picks = rng.sample(range(pool), n)
    else:   # 10^19 and up: collisions are so rare that rejection costs nothing
        chosen: set[int] = set()
        while len(chosen) < n:
            chosen.add(rng.randrange(pool))
        picks = sorted(chosen)
        rng.shuffle(picks)
    return [i + (i >= exclude) for i in picks]


def candidates(case: SecretCase, n_candidates: int, seed: int) -> tuple[torch.Tensor, int, bool]:
    """(rows of candidate token ids, the secret's row, exact): all of R, or the secret then n samples."""
    base, length = len(case.alphabet), len(case.secret)
    size = space_size(case)
    lookup = {t: i for i, t in enumerate(case.alphabet)}
    secret_index = _index([lookup[t] for t in case.secret], base)
    alphabet = torch.tensor(case.alphabet, dtype=torch.long)
    if size <= n_candidates:
        index = torch.arange(size)
        powers = base ** torch.arange(length - 1, -1, -1)
        return alphabet[(index[:, None] // powers) % base], secret_index, True
    rng = random.Random(f"{seed}:{case.doc}")   # str seeds hash with sha512: stable across processes
    picks = [secret_index, *sampled_indices(size, secret_index, n_candidates, rng)]
    return alphabet[torch.tensor([_digits(i, base, length) for i in picks])], 0, False


# -- scoring -------------------------------------------------------------------------------------

@torch.inference_mode()
def candidate_logliks(model: torch.nn.Module, context: Sequence[int], rows: torch.Tensor,
                      batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """ll of each row (N, L) after `context`: sum of float32 log-probs, teacher-forced, as float64.

    The context runs once and its KV cache is copied to each batch of candidates (3.5x faster than
    re-encoding it per candidate on the testbed: 20 context tokens, 6 secret tokens); a model without
    a batch-expandable cache re-encodes it, one forward over context + candidate.
    """
    device = next(model.parameters()).device
    prompt = torch.tensor([list(context)], dtype=torch.long, device=device)
    out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return _reencoded_logliks(model, context, rows, batch_size)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()   # p(first secret token | context)
    width = len(context) + rows.shape[1] - 1
    parts = []
    for batch in rows.split(batch_size):
        ll = first[batch[:, 0]].double()
        if batch.shape[1] > 1:
            grown = copy.deepcopy(cache)   # the forward appends to the cache it is given
            grown.batch_repeat_interleave(len(batch))
            ids = batch[:, :-1].to(device)
            logits = model(input_ids=ids, past_key_values=grown, use_cache=True,
                           attention_mask=torch.ones((len(batch), width), dtype=torch.long, device=device),
                           position_ids=torch.arange(len(context), width, device=device).expand(len(batch), -1)).logits
            ll = ll + _picked(logits, batch[:, 1:].to(device))
        parts.append(ll)
    return torch.cat(parts)


def _reencoded_logliks(model: torch.nn.Module, context: Sequence[int], rows: torch.Tensor,
                       batch_size: int) -> torch.Tensor:
    """`candidate_logliks` by one forward over context + candidate per row (no cache)."""
    device = next(model.parameters()).device
    prompt = torch.tensor(context, dtype=torch.long)
    width = len(context) + rows.shape[1] - 1
    # any causal LM (not only memcirc's families): logits_to_keep where the model takes it
    keep = {"logits_to_keep": rows.shape[1]} if accepts(model, "logits_to_keep") else {}
    parts = []
    for batch in rows.split(batch_size):
        ids = torch.cat([prompt.expand(len(batch), -1), batch[:, :-1]], dim=1).to(device)
        positions = torch.arange(width, device=device).expand(len(batch), -1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                       **keep).logits[:, -rows.shape[1]:]   # the positions before each secret token
        parts.append(_picked(logits, batch.to(device)))
    return torch.cat(parts)


def _picked(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum over positions of log_softmax(logits) at `tokens` (float32 softmax, float64 sum, on the CPU)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0].double().sum(-1).cpu()


def exposure(model: torch.nn.Module, case: SecretCase, n_candidates: int = 1000, seed: int = 0,
             batch_size: int = BATCH_SIZE) -> Exposure:
    """The exposure of `case`'s secret (module docstring: exact, or sampled with the cap)."""
    if n_candidates < 1:
        raise InputError(f"n_candidates must be >= 1, got {n_candidates}")
    rows, at, exact = candidates(case, n_candidates, seed)
    ll = candidate_logliks(model, case.context, rows, batch_size)
    rank = int((ll >= ll[at]).sum())
    log2_space = len(case.secret) * math.log2(len(case.alphabet))
    total = log2_space if exact else math.log2(len(rows))   # rows: R, or the secret and n candidates
    extrapolated = None if exact else _skewnorm_exposure(ll[1:], float(ll[at]), log2_space)
    return Exposure(exposure=total - math.log2(rank), rank=rank, log2_space=log2_space,
                    n_candidates=len(rows) - (not exact), exact=exact, capped=not exact and rank == 1,
                    secret_loglik=float(ll[at]), extrapolated=extrapolated)


def _skewnorm_exposure(logliks: torch.Tensor, secret: float, log2_space: float) -> float | None:
    """Carlini's extrapolation: -log2 P(ll >= secret) under a skew-normal fitted to the candidates'
    log-likelihoods, clipped to [0, log2|R|]; None when the fit fails (e.g. all candidates tie)."""
    from scipy.stats import skewnorm  # imported only when a sampled exposure is computed

    values = logliks.numpy()
    if values.std() == 0:
        return None
    shape, loc, scale = skewnorm.fit(values)
    log_sf = float(skewnorm.logsf(secret, shape, loc, scale))
    if not math.isfinite(log_sf):
        return log2_space
    return min(max(-log_sf / math.log(2), 0.0), log2_space)


# -- a stage's documents -------------------------------------------------------------------------

def exposure_rows(model: torch.nn.Module, cases: Sequence[SecretCase], n_candidates: int,
                  seed: int) -> list[dict[str, Any]]:
    """One exposure.jsonl row per case, in order."""
    from memcirc.logs import Meter

    rows = []
    with Meter("exposure", total=len(cases), unit="secrets") as meter:
        for case in cases:
            rows.append(exposure(model, case, n_candidates, seed).row(case))
            meter.update()
    return rows


def summarize_exposure(rows: Sequence[dict[str, Any]], n_candidates: int, seed: int) -> dict[str, Any]:
    """summary.json's `exposure` block: per group n, mean, median, min, max (and how many are capped)."""

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("all" if r["group"] is None else str(r["group"]), []).append(r)

    def stats(part: list[dict[str, Any]]) -> dict[str, Any]:
        values = torch.tensor([r["exposure"] for r in part], dtype=torch.float64)
        return {"n": len(part), "mean": float(values.mean()), "median": float(values.quantile(0.5)),
                "min": float(values.min()), "max": float(values.max()),
                "n_capped": sum(bool(r["capped"]) for r in part), "n_exact": sum(bool(r["exact"]) for r in part)}

    return {"n_documents": len(rows), "n_candidates": n_candidates, "seed": seed, "method": METHOD,
            "groups": {g: stats(groups[g]) for g in group_order(groups)}}
