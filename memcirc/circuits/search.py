"""The minimal faithful circuit: the smallest k whose top-k circuit reaches the target faithfulness."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memcirc.errors import InputError

MONOTONE_TOLERANCE = 1e-5  # a drop of F smaller than this between larger circuits is float noise


def log_spaced_counts(n_edges: int, points: int) -> list[int]:
    """0, `points` log-spaced edge counts in [1, n_edges] (rounded, deduplicated), and n_edges."""
    inner = np.unique(np.round(np.geomspace(1, n_edges, points)).astype(int)) if n_edges else []
    return sorted({0, n_edges, *map(int, inner)})


@dataclass
class MinimalCircuit:
    """The outcome of `minimal_circuit`; `evaluated` holds every (k, F) computed, sorted by k, and
    `lower` every (k, lower end of F's interval) the search compared with the target (`selected_by`
    'lower'; empty for 'point')."""

    minimal_edges: int
    faithfulness: float
    target: float
    curve: list[tuple[int, float]]
    probes: list[tuple[int, float]]
    bracket: tuple[int, int] | None
    evaluated: list[tuple[int, float]]
    non_monotone_steps: list[dict[str, float]]
    selected_by: str = "point"
    lower: list[tuple[int, float]] = field(default_factory=list)

    @property
    def monotone(self) -> bool:
        return not self.non_monotone_steps

    @property
    def monotone_in_bracket(self) -> bool:
        if self.bracket is None:
            return True
        lo, hi = self.bracket
        return not any(lo <= s["from_edges"] and s["to_edges"] <= hi for s in self.non_monotone_steps)


def minimal_circuit(faithfulness_at: Callable[[list[int]], Sequence[float] | np.ndarray], n_edges: int,
                    target: float, curve_points: int,
                    lower_at: Callable[[list[int]], Sequence[float] | np.ndarray] | None = None) -> MinimalCircuit:
    """The smallest k whose top-k circuit reaches `target` faithfulness, to the exact edge.

    1. F at 0, `curve_points` log-spaced counts and n_edges (one pass over the pairs).
    2. The first curve point k_hi that reaches the target and the curve point k_lo before it bracket
       the answer; bisection inside (k_lo, k_hi] finds k that reaches it where k - 1 does not.
    3. Monotonicity is checked, not assumed: every evaluated (k, F), curve and probes, is sorted by
       k and each drop of F larger than MONOTONE_TOLERANCE is reported. When F is monotone the
       result equals a scan over every k; when it is not, a k outside the probed points could
       also reach the target, and `non_monotone_steps` says where the assumption broke.

    Args:
        faithfulness_at: F for a list of edge counts (top-k circuits of one ranking).
        lower_at: with it, k reaches the target when the lower end of F's interval does (called
            after `faithfulness_at` on the same counts, whose per-pair values it may reuse); without
            it, when F does.
    """
    lower: dict[int, float] = {}

    def reaching(counts: list[int], fs: Sequence[float]) -> list[bool]:
        if lower_at is None:
            return [f >= target for f in fs]
        lower.update(zip(counts, map(float, lower_at(counts)), strict=True))
        return [lower[k] >= target for k in counts]

    counts = log_spaced_counts(n_edges, curve_points)
    curve = list(zip(counts, map(float, faithfulness_at(counts)), strict=True))
    known = dict(curve)
    probes: list[tuple[int, float]] = []
    passing = [k for k, ok in zip(counts, reaching(counts, [f for _, f in curve]), strict=True) if ok]
    if not passing:  # only when target > F(all) = 1 (or no resample defines F's interval)
        raise InputError(f"no circuit reaches faithfulness {target} (the full circuit has 1.0); "
                         "lower --target")
    hi = passing[0]
    bracket = None
    if hi > 0:
        lo = max(k for k, _ in curve if k < hi)
        bracket = (lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            f = float(faithfulness_at([mid])[0])
            probes.append((mid, f))
            known[mid] = f
            if reaching([mid], [f])[0]:
                hi = mid
            else:
                lo = mid
    evaluated = sorted(known.items())
    steps = [{"from_edges": a, "to_edges": b, "from_faithfulness": fa, "to_faithfulness": fb}
             for (a, fa), (b, fb) in zip(evaluated, evaluated[1:], strict=False)
             if fb < fa - MONOTONE_TOLERANCE]
    return MinimalCircuit(hi, known[hi], target, curve, probes, bracket, evaluated, steps,
                          selected_by="point" if lower_at is None else "lower", lower=sorted(lower.items()))
