"""Attention-head component scores: induction, previous-token, duplicate-token, successor, copy suppression.

Pattern scores read the attention patterns on repeated random tokens (BOS?, A, A with A of
`REPEAT_LEN` tokens; Olsson et al. 2022):
  previous-token  mean attention from position q to q - 1 (every q after A's first token)
  duplicate-token mean attention from q in the second copy to q - S (the same token's first occurrence)
  induction       mean attention from q in the second copy to q - S + 1 (the token after that occurrence)
OV scores read one head's OV circuit as logits: the residual a token leaves at the head's input (the
token alone, `OV_INPUT_DEFINITION`), through the head's value and output weights, the final norm and the
unembedding:
  successor       fraction of an ordinal sequence's members (1..9, Monday.., January.., one.., A..) whose
                  top logit among the sequence's members is their successor (Gould et al. 2023)
  copy suppression mean over sampled tokens of the fraction of the other sampled tokens whose logit is
                  above the token's own: 1 = the head lowers exactly what it attends to (McDougall et al.
                  2023 find this in copy-suppression heads; a weights-only proxy, not their CSPA)
The pure functions take patterns / OV logits, so tests can hand-build them; `head_scores` runs a model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from memcirc.models.arch import tl_hook_name
from memcirc.models.tokenizer import BosPolicy, encode

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SCORES = ("induction", "previous_token", "duplicate_token", "successor", "copy_suppression")
REPEAT_LEN = 24          # tokens per copy of the repeated random sequence
REPEAT_BATCH = 16        # repeated sequences the pattern scores average over
COPY_SAMPLE = 256        # tokens the copy-suppression score samples
ORDINAL_SEQUENCES = (
    "1 2 3 4 5 6 7 8 9", "one two three four five six seven eight nine ten",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January February March April May June July August September October November December",
    "A B C D E F G H I J K L M N O P", "first second third fourth fifth sixth seventh eighth ninth tenth",
)
OV_INPUT_DEFINITION = ("the residual stream at the head's layer input (blocks.L.hook_resid_pre) when the "
                       "model reads the token alone (a sequence of one token, no BOS)")
DEFINITIONS = {
    "induction": f"mean attention from q to q - S + 1 over the second copy of BOS?, A, A (S = {REPEAT_LEN} "
                 f"random tokens, {REPEAT_BATCH} sequences)",
    "previous_token": "mean attention from q to q - 1 over every position after A's first token",
    "duplicate_token": "mean attention from q to q - S over the second copy",
    "successor": "fraction of ordinal-sequence members whose top OV logit among the sequence is the successor",
    "copy_suppression": "mean fraction of other sampled tokens with a higher OV logit than the token itself",
    "repeated_loss": "mean next-token loss over the first copy (after its first token) and the second copy; "
                     "gain = first - second",
}


# -- scores from patterns and OV logits --------------------------------------------------------

def pattern_scores(pattern: torch.Tensor, offset: int, seg: int) -> dict[str, torch.Tensor]:
    """Previous-token, duplicate-token and induction scores of every head from attention patterns.

    Args:
        pattern: [batch, heads, q, k] of sequences `offset` tokens (BOS) then A, A with |A| = seg.
    Returns:
        score name -> [heads]
    """
    pattern = pattern.float()
    q = torch.arange(offset + 1, offset + 2 * seg)
    second = torch.arange(offset + seg, offset + 2 * seg)
    return {
        "previous_token": pattern[:, :, q, q - 1].mean(dim=(0, 2)),
        "duplicate_token": pattern[:, :, second, second - seg].mean(dim=(0, 2)),
        "induction": pattern[:, :, second, second - seg + 1].mean(dim=(0, 2)),
    }


def successor_score(ov_logits: torch.Tensor) -> torch.Tensor:
    """[heads] fraction of rows i < n - 1 of ov_logits [heads, n, n] (member i -> logits over the n
    members, in order) whose argmax is i + 1."""
    top = ov_logits[:, :-1].argmax(dim=-1)
    return (top == torch.arange(1, ov_logits.shape[-1])).float().mean(dim=-1)


def copy_suppression_score(ov_logits: torch.Tensor) -> torch.Tensor:
    """[heads] mean over rows i of ov_logits [heads, n, n] of the fraction of j != i with logit above
    the diagonal's: 1 when every token's own logit is its lowest, 0 when it is its highest (copying)."""
    n = ov_logits.shape[-1]
    diag = ov_logits.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    return ((ov_logits > diag).float().sum(dim=-1) / (n - 1)).mean(dim=-1)


def repeated_loss(logits: torch.Tensor, tokens: torch.Tensor, offset: int, seg: int) -> dict[str, float]:
    """Mean next-token loss over the first copy (its tokens after the first) and over the second copy (its
    tokens after the first) of BOS?, A, A; `gain` = first - second, what copying from context saves
    (Olsson et al.'s in-context score)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    # nll[:, t] is the loss of token t + 1; the second copy's first token follows A's last, which has no
    # earlier occurrence, so it is not predictable from context and is left out (as the testbed's probes do)
    first = float(nll[:, offset:offset + seg - 1].mean())
    second = float(nll[:, offset + seg:offset + 2 * seg - 1].mean())
    return {"first_copy": first, "second_copy": second, "gain": first - second}


# -- running a model ------------------------------------------------------------------------

def repeated_tokens(pool: Sequence[int], seed: int, bos: BosPolicy) -> torch.Tensor:
    """[REPEAT_BATCH, bos + 2 REPEAT_LEN]: BOS?, A, A with A drawn from `pool` without repeats."""
    rng = random.Random(f"heads:{seed}")
    rows = []
    for _ in range(REPEAT_BATCH):
        a = rng.sample(list(pool), REPEAT_LEN)
        rows.append(bos.apply(a + a))
    return torch.tensor(rows, dtype=torch.long)


def ordinal_ids(tokenizer: Any) -> list[list[int]]:
    """The ORDINAL_SEQUENCES whose members are each one token (with a leading space, else without)."""
    out = []
    for seq in ORDINAL_SEQUENCES:
        for prefix in (" ", ""):
            ids = [encode(tokenizer, prefix + w) for w in seq.split()]
            if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
                out.append([i[0] for i in ids])
                break
    return out


@torch.no_grad()
def ov_logits(model: HookedTransformer, tokens: Sequence[int]) -> torch.Tensor:
    """[layers, heads, n, n]: every head's OV logits from each of `tokens` to each of them."""
    ids = torch.tensor(list(tokens), dtype=torch.long, device=model.cfg.device).unsqueeze(1)
    names = [tl_hook_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    out = []
    for layer in range(model.cfg.n_layers):
        block: Any = model.blocks[layer]                                           # TL's stubs say Tensor
        x = block.ln1(cache[names[layer]])[:, 0]                                   # [n, d_model]
        w_v, w_o = block.attn.W_V, block.attn.W_O                                  # [H, d, dh], [H, dh, d]
        heads = torch.einsum("nd,hde,hef->hnf", x, w_v, w_o)                        # [H, n, d_model]
        # only the n columns of the unembedding: [H, n, vocab] would be GBs at a real vocabulary
        out.append(model.ln_final(heads) @ model.W_U[:, ids[:, 0]] + model.b_U[ids[:, 0]])
    return torch.stack(out).float()


@torch.no_grad()
def head_scores(model: HookedTransformer, tokenizer: Any, pool: Sequence[int], bos: BosPolicy,
                seed: int = 0) -> dict[str, Any]:
    """Every score of every head: score name -> [layers][heads] (lists), plus what they were measured on.

    Args:
        pool: ordinary token ids (memcirc.tasks.generators.ordinary_tokens) for the random sequences.
    """
    tokens = repeated_tokens(pool, seed, bos).to(model.cfg.device)
    names = [tl_hook_name("attn_pattern", layer) for layer in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    per_layer = [pattern_scores(cache[n], bos.n_prepended, REPEAT_LEN) for n in names]
    scores = {k: torch.stack([p[k] for p in per_layer]) for k in ("induction", "previous_token", "duplicate_token")}
    ordinals = ordinal_ids(tokenizer)
    if ordinals:
        scores["successor"] = torch.stack([successor_score(ov_logits(model, seq).flatten(0, 1)).reshape(
            model.cfg.n_layers, model.cfg.n_heads) for seq in ordinals]).mean(dim=0)
    sample = random.Random(f"copy:{seed}").sample(list(pool), min(COPY_SAMPLE, len(pool)))
    scores["copy_suppression"] = copy_suppression_score(ov_logits(model, sample).flatten(0, 1)).reshape(
        model.cfg.n_layers, model.cfg.n_heads)
    return {"scores": {k: v.cpu().tolist() for k, v in scores.items()},
            "repeated_loss": repeated_loss(cast(torch.Tensor, logits), tokens, bos.n_prepended, REPEAT_LEN),
            "n_ordinal_sequences": len(ordinals), "copy_sample": len(sample),
            "definitions": {k: v for k, v in DEFINITIONS.items() if k in scores or k == "repeated_loss"},
            "ov_input": OV_INPUT_DEFINITION}


def top_heads(scores: Sequence[Sequence[float]], k: int = 3) -> list[dict[str, Any]]:
    """The k highest-scoring heads of one score table [layers][heads], best first."""
    flat = [(v, layer, h) for layer, row in enumerate(scores) for h, v in enumerate(row)]
    return [{"head": f"L{layer}H{h}", "layer": layer, "head_index": h, "score": v}
            for v, layer, h in sorted(flat, reverse=True)[:k]]
