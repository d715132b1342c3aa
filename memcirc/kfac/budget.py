"""The factor-token budget of a K-FAC edit, and the rank of the factors it gives.

With N factor tokens, A = Σ a aᵀ (d_in × d_in) and G = Σ g gᵀ (d_out × d_out) are sums of N rank-one
terms, so their rank is at most N. A factor wider than N has at least dim − N zero eigenvalues; every
component on them has zero importance, and any ρ < 1 drops it. (A real run: 1,533 tokens for a
4,864-wide G, ≥ 68 % zero eigenvalues; ρ = 0.5 kept < 0.1 % of the components, i.e. zeroed the MLP.)

Default budget: max(FACTOR_TOKENS_PER_DIM × the widest factor, FACTOR_TOKENS_FLOOR) = max(32 d, 200k).
- Full rank needs N ≥ d; a usable spectrum needs many more. For N independent samples of an isotropic
  d-dimensional distribution the sample covariance's eigenvalues spread over (1 ± √(d/N))²
  (Marchenko–Pastur): 0.68–1.38 at N = 32 d, 0.47–1.73 at 10 d, and the small ones, which the edit
  removes first, are the ones pulled towards 0. Tokens of one text are correlated, so the effective
  sample is smaller than N: 32 d leaves a margin.
- The floor is the previous fixed default (200,000): it is cheap on small models, it decides below
  6,250-wide factors (SmolLM2-135M: 1,536; Qwen2-0.5B: 4,864), and it keeps the testbed's factors
  unchanged (its 174k-token training slice is used whole either way). Llama-2-7B (11,008) gets 352,256.

Too few tokens is a warning, not a refusal: the edit is still well defined (and sound with `--damping`,
which lifts the zero eigenvalues), a small corpus or a smoke run may have no more tokens, and the
warning names the tokens needed — in the log, the summary (`factor_rank`) and the model card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memcirc.kfac.edit import Eigenbasis
from memcirc.kfac.targets import Target, weight_of

FACTOR_TOKENS_PER_DIM = 32
FACTOR_TOKENS_FLOOR = 200_000
MEASURED_ZERO_WARN = 0.10     # numerically zero eigenvalues (with enough tokens) worth a warning


def factor_dims(model: torch.nn.Module, targets: Sequence[Target]) -> dict[str, tuple[int, int]]:
    """Per target, (d_in, d_out): the widths of its A and G factors."""
    return {t.name: (weight_of(model, t).shape[1], weight_of(model, t).shape[0]) for t in targets}


def default_factor_tokens(widest: int) -> int:
    """The default budget for factors up to `widest` wide (see the module docstring)."""
    return max(FACTOR_TOKENS_PER_DIM * widest, FACTOR_TOKENS_FLOOR)


def resolve_factor_tokens(requested: int | None, widest: int) -> int:
    """--factor-tokens, or the default for these modules when it is not given."""
    return default_factor_tokens(widest) if requested is None else requested


def rank_warning(n_tokens: int, dims: Mapping[str, tuple[int, int]], short_of_budget: bool = False) -> str | None:
    """The warning for factors collected on `n_tokens` tokens when that is fewer than the widest
    factor (its rank is then at most n_tokens); None when there are enough tokens for full rank."""
    name, (d_in, d_out) = max(dims.items(), key=lambda item: max(item[1]))
    widest, which = (d_out, "G") if d_out >= d_in else (d_in, "A")
    if n_tokens >= widest:
        return None
    why = " (all the factor data holds)" if short_of_budget else ""
    return (f"K-FAC factors from {n_tokens:,} tokens{why}, but the {which} factor of {name} is {widest:,} wide: "
            f"its rank is at most {n_tokens:,}, so >= {1 - n_tokens / widest:.0%} of its eigenvalues are zero and "
            f"every rho < 1 drops those components (close to zeroing the module); collect at least {widest:,} "
            f"tokens (--factor-tokens, default here {default_factor_tokens(widest):,}; more --factor-data if it "
            "runs out) or set --damping")


def rank_report(bases: Mapping[str, Eigenbasis], n_tokens: int) -> dict[str, Any]:
    """The measured numerical ranks of every factor (summary.json `factor_rank`): per module the
    dimension and rank of A and G, the largest zero-eigenvalue fraction and the tokens full rank needs."""
    modules = {name: {"A": {"dim": int(b.U_A.shape[0]), "rank": b.rank_A},
                      "G": {"dim": int(b.U_G.shape[0]), "rank": b.rank_G}} for name, b in bases.items()}
    factors = [f for m in modules.values() for f in m.values()]
    zero = max(1 - f["rank"] / f["dim"] for f in factors)
    return {"n_tokens": n_tokens, "tokens_for_full_rank": max(f["dim"] for f in factors),
            "zero_eigenvalue_fraction": round(zero, 6), "modules": modules}


def measured_warning(report: dict[str, Any]) -> str | None:
    """A warning when the factors are numerically rank-deficient although there were enough tokens
    (e.g. repetitive factor data); the too-few-tokens case is `rank_warning`'s."""
    zero = report["zero_eigenvalue_fraction"]
    if zero <= MEASURED_ZERO_WARN or report["n_tokens"] < report["tokens_for_full_rank"]:
        return None
    ratio = report["n_tokens"] / report["tokens_for_full_rank"]
    return (f"K-FAC factors are numerically rank-deficient: {zero:.0%} of the eigenvalues of some factor are "
            f"zero with {report['n_tokens']:,} tokens, {ratio:.1f}x the widest factor (the default budget is "
            f"{FACTOR_TOKENS_PER_DIM}x): collect more tokens (--factor-tokens), more varied --factor-data if "
            "it repeats itself, or set --damping")
