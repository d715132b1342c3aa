"""Features of a sequence that never look at the target model.

Surprisal under a smaller reference model, n-gram duplication and token rarity in the training
corpus (an `NgramIndex`), zlib compressibility, repetition inside the sequence, length and position,
the source/domain, and `control_shuffled`: a shuffled copy of `dup_mean`, which marks where "no
information" sits in the importance ranking.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from memcirc.logs import progress
from memcirc.models import LoadedModel
from memcirc.predict.labels import Example
from memcirc.predict.ngram import NgramIndex
from memcirc.scoring import pad_batch

log = logging.getLogger(__name__)

CONTROL = "control_shuffled"
RARE_MASS = 0.9                  # a token is rare outside the most frequent tokens holding 90 % of the corpus

FEATURE_GROUPS = {
    "logprob_mean": "surprisal", "logprob_min": "surprisal", "logprob_std": "surprisal",
    "suffix_logprob_mean": "surprisal",
    "dup_mean": "duplication", "dup_max": "duplication", "dup_min": "duplication",
    "dup_prefix_min": "duplication", "dup_novel_share": "duplication",
    "zlib_ratio": "compressibility",
    "distinct_token_share": "repetition", "repeated_bigram_share": "repetition",
    "rare_token_share": "rarity", "unigram_logfreq_mean": "rarity",
    "length": "length/position", "offset": "length/position", "train_index": "length/position",
    CONTROL: "control",
}
FEATURE_DEFINITIONS = {
    "logprob_mean": "mean log-probability (nats) of the sequence's tokens under the reference model (each token "
                    "given the ones before it; the first token has no prediction)",
    "logprob_min": "lowest token log-probability under the reference model",
    "logprob_std": "standard deviation of the token log-probabilities under the reference model",
    "suffix_logprob_mean": "mean log-probability of the suffix tokens (the part a memorizing model must "
                           "reproduce) under the reference model",
    "dup_mean": "mean over the sequence's n-grams of log(1 + corpus count)",
    "dup_max": "max over the sequence's n-grams of log(1 + corpus count)",
    "dup_min": "min over the sequence's n-grams of log(1 + corpus count)",
    "dup_prefix_min": "min over the prefix's n-grams of log(1 + corpus count) (an upper bound of the count of "
                      "the exact prefix)",
    "dup_novel_share": "share of the sequence's n-grams that never occur in the corpus",
    "zlib_ratio": "zlib-compressed / raw UTF-8 bytes of the decoded text (lower = more compressible)",
    "distinct_token_share": "distinct tokens / tokens",
    "repeated_bigram_share": "1 - distinct token bigrams / bigrams",
    "rare_token_share": f"share of tokens outside the most frequent corpus tokens that hold {RARE_MASS:.0%} of the "
                        "corpus (unseen tokens are rare)",
    "unigram_logfreq_mean": "mean log relative corpus frequency of the tokens (add-one smoothed)",
    "length": "tokens in the sequence",
    "offset": "token offset of the window inside its document",
    "train_index": "the table's index column (position in the training order)",
    "domain=<value>": "one-hot source/domain (domain_column)",
    CONTROL: "dup_mean with its rows shuffled (seeded): carries no information about the label",
}


def zlib_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def repetition_features(tokens: np.ndarray) -> dict[str, float]:
    t = np.asarray(tokens)
    bigrams = {(int(a), int(b)) for a, b in zip(t[:-1], t[1:])}
    return {"distinct_token_share": len(set(t.tolist())) / len(t),
            "repeated_bigram_share": 1.0 - len(bigrams) / max(len(t) - 1, 1)}


def duplication_features(tokens: np.ndarray, prefix_len: int, index: NgramIndex) -> dict[str, float]:
    counts = index.ngram_counts(tokens)
    if counts.size == 0:
        return {"dup_mean": 0.0, "dup_max": 0.0, "dup_min": 0.0, "dup_prefix_min": 0.0, "dup_novel_share": 1.0}
    logc = np.log1p(counts)
    prefix = logc[:max(prefix_len - index.n + 1, 1)]
    return {"dup_mean": float(logc.mean()), "dup_max": float(logc.max()), "dup_min": float(logc.min()),
            "dup_prefix_min": float(prefix.min()), "dup_novel_share": float((counts == 0).mean())}


def rare_tokens(unigram: np.ndarray, mass: float = RARE_MASS) -> np.ndarray:
    """Boolean per token id: outside the most frequent tokens that together hold `mass` of the corpus."""
    order = np.argsort(-unigram, kind="stable")
    cum = np.cumsum(unigram[order])
    common = int(np.searchsorted(cum, mass * cum[-1])) + 1 if cum[-1] > 0 else 0
    rare = np.ones(unigram.size, bool)
    rare[order[:common]] = False
    return rare


def rarity_features(tokens: np.ndarray, unigram: np.ndarray, rare: np.ndarray) -> dict[str, float]:
    freq = (unigram[tokens] + 1.0) / (unigram.sum() + unigram.size)
    return {"rare_token_share": float(rare[tokens].mean()), "unigram_logfreq_mean": float(np.log(freq).mean())}


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, sequences: Sequence[np.ndarray], pad_id: int,
                   batch_size: int) -> list[np.ndarray]:
    """log p(t_i | t_<i) for i >= 1 of every sequence (length L - 1 each), one forward pass per batch."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = [np.empty(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    starts = range(0, len(order), batch_size)
    for b in progress(starts, "reference log-probs", total=len(starts)):
        idx = order[b:b + batch_size]
        # pad_batch takes len() and torch.as_tensor of each row: an int ndarray row serves as a Sequence[int]
        ids, mask = pad_batch(cast("list[Sequence[int]]", [sequences[i] for i in idx]), pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()   # (B, L-1, V)
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu().numpy()   # (B, L-1)
        for row, i in enumerate(idx):
            out[i] = lp[row, :len(sequences[i]) - 1].astype(np.float64)
    return out


def surprisal_features(logprobs: np.ndarray, prefix_len: int) -> dict[str, float]:
    suffix = logprobs[max(prefix_len - 1, 0):]
    return {"logprob_mean": float(logprobs.mean()), "logprob_min": float(logprobs.min()),
            "logprob_std": float(logprobs.std()), "suffix_logprob_mean": float(suffix.mean())}


@dataclass
class FeatureTable:
    names: list[str]
    X: np.ndarray                   # float64 [n, features]
    groups: dict[str, str]          # feature -> group
    dropped: list[str]              # constant columns left out

    def group_columns(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for j, name in enumerate(self.names):
            out.setdefault(self.groups[name], []).append(j)
        return out


def _named_features(examples: Sequence[Example], reference: LoadedModel, index: NgramIndex,
                    batch_size: int) -> list[dict[str, float]]:
    """One dict of the named (non-domain, non-control) features per example."""
    tok = reference.tokenizer
    # transformers' tokenizer __getattr__ types special-token ids as str | list[str]
    pad_token_id = cast("int | None", tok.pad_token_id)
    pad = pad_token_id if pad_token_id is not None else 0
    logprobs = token_logprobs(reference.model, [e.tokens for e in examples], pad, batch_size)
    rare = rare_tokens(index.unigram)
    texts = tok.batch_decode([e.tokens.tolist() for e in examples])
    rows: list[dict[str, float]] = []
    for e, lp, text in zip(examples, logprobs, texts):
        row = {**surprisal_features(lp, e.prefix_len), **duplication_features(e.tokens, e.prefix_len, index),
               "zlib_ratio": zlib_ratio(text), **repetition_features(e.tokens),
               **rarity_features(e.tokens, index.unigram, rare), "length": float(len(e.tokens))}
        if e.offset is not None:
            row["offset"] = float(e.offset)
        if e.train_index is not None:
            row["train_index"] = float(e.train_index)
        rows.append(row)
    return rows


def compute_features(examples: Sequence[Example], reference: LoadedModel, index: NgramIndex, *, batch_size: int,
                     seed: int) -> FeatureTable:
    """Every feature of every example; constant columns are dropped (and listed)."""
    rows = _named_features(examples, reference, index, batch_size)
    names = [n for n in FEATURE_GROUPS if n != CONTROL and all(n in r for r in rows)]
    groups = {n: FEATURE_GROUPS[n] for n in names}
    columns = [np.array([r[n] for r in rows]) for n in names]
    for d in sorted({e.domain for e in examples if e.domain is not None}):
        names.append(f"domain={d}")
        groups[names[-1]] = "domain"
        columns.append(np.array([float(e.domain == d) for e in examples]))
    rng = np.random.default_rng(seed)
    names.append(CONTROL)
    groups[CONTROL] = "control"
    columns.append(rng.permutation(columns[names.index("dup_mean")]))
    X = np.stack(columns, axis=1)
    keep = [j for j in range(X.shape[1]) if np.ptp(X[:, j]) > 0]
    dropped = [names[j] for j in range(X.shape[1]) if j not in keep]
    if dropped:
        log.info("constant features left out: %s", ", ".join(dropped))
    names = [names[j] for j in keep]
    return FeatureTable(names, X[:, keep], {n: groups[n] for n in names}, dropped)
