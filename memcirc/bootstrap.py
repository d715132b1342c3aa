"""Percentile bootstrap over pairs: the uncertainty of a statistic of per-pair values.

A resample draws n of the n pairs with replacement; the statistic is recomputed on every resample
and the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled statistic
(numpy's default linear interpolation). Each pair is one unit: every per-pair array handed to one
`PairBootstrap` (a circuit's metric, the empty circuit's, the full circuit's) is resampled with the
same indices, so a ratio of pair means such as faithfulness is recomputed from resampled means, never
averaged from per-pair ratios.

The draws: `indices`, int [resamples, n], from numpy default_rng(SeedSequence(seed, spawn_key=(1,))):
a stream of its own: independent of a stage's other draws from default_rng(seed) (verify's random
circuits), which stay the same with the bootstrap on or off. A statistic of pair means is vectorized: the
resample counts form a weight matrix W [resamples, n] (W[b, i] = times pair i is in resample b, / n)
and the means of values [..., n] on every resample are values @ W.T. Memory: 16 bytes per
resample and pair (indices and W), e.g. 16 MB for 1000 resamples of 1000 pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
METHOD = "percentile bootstrap over pairs (resampled with replacement, n of n)"
RNG = "numpy default_rng(SeedSequence(seed, spawn_key=(1,)))"


def bootstrap_rng(seed: int) -> np.random.Generator:
    """The bootstrap's generator for a stage seed: a child stream, not default_rng(seed) itself."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))


def percentile_interval(samples: np.ndarray, level: float) -> np.ndarray:
    """[..., 2]: the (lo, hi) quantiles over axis 0 of `samples` [resamples, ...].

    A resample whose statistic is not finite (e.g. a ratio whose denominator is 0 on it) is left out;
    the interval is NaN where no resample is finite."""
    samples = np.where(np.isfinite(samples), samples, np.nan)
    q = [(1 - level) / 2, (1 + level) / 2]
    with warnings.catch_warnings():   # numpy warns on an all-NaN slice: NaN is the documented answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.moveaxis(np.nanquantile(samples, q, axis=0), 0, -1)


@dataclass(frozen=True)
class PairBootstrap:
    """`resamples` draws of n pair indices with replacement, and intervals of statistics over them."""

    indices: np.ndarray   # int [resamples, n]
    level: float
    seed: int

    @classmethod
    def draw(cls, n: int, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
             seed: int = 0) -> PairBootstrap:
        """Draw the resamples of n pairs. ValueError for n < 2 (every resample of one pair is that pair:
        the interval would be a point, claiming a certainty one pair cannot give), resamples < 1 or
        a level outside (0, 1)."""
        if n < 2:
            raise ValueError(f"a bootstrap over pairs needs at least 2 pairs, got {n}")
        if resamples < 1:
            raise ValueError(f"a bootstrap needs at least 1 resample, got {resamples}")
        if not 0 < level < 1:
            raise ValueError(f"interval level must be in (0, 1), got {level}")
        return cls(bootstrap_rng(seed).integers(0, n, size=(resamples, n)), level, seed)

    @property
    def n(self) -> int:
        return self.indices.shape[1]

    @property
    def resamples(self) -> int:
        return self.indices.shape[0]

    @cached_property
    def weights(self) -> np.ndarray:
        """float [resamples, n]: how often each pair is drawn in each resample, divided by n."""
        b, n = self.indices.shape
        flat = (self.indices + n * np.arange(b)[:, None]).ravel()
        return np.bincount(flat, minlength=b * n).reshape(b, n) / n

    def means(self, values: np.ndarray) -> np.ndarray:
        """[resamples, ...]: the mean over pairs (last axis) of `values` [..., n] on every resample."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-1] != self.n:
            raise ValueError(f"values hold {values.shape[-1]} pairs; the bootstrap was drawn for {self.n}")
        return np.moveaxis(values @ self.weights.T, -1, 0)

    def interval_of_means(self, statistic: Callable[..., np.ndarray], *values: np.ndarray) -> np.ndarray:
        """[..., 2]: the interval of statistic(*pair means), each `values` array [..., n] (vectorized:
        `statistic` gets the resampled means [resamples, ...] and must broadcast over them)."""
        return percentile_interval(np.asarray(statistic(*(self.means(v) for v in values))), self.level)

    def interval(self, statistic: Callable[..., np.ndarray], *values: np.ndarray) -> np.ndarray:
        """[..., 2]: the interval of any statistic of per-pair arrays. `statistic` gets each array
        resampled, [resamples, ..., n] (pairs last), and returns [resamples, ...]. It holds every
        resample in memory at once; for a statistic of means `interval_of_means` needs far less."""
        resampled = [np.moveaxis(np.asarray(v)[..., self.indices], -2, 0) for v in values]
        return percentile_interval(np.asarray(statistic(*resampled)), self.level)

    def info(self) -> dict[str, Any]:
        """How the intervals were computed (the `bootstrap` entry of a summary)."""
        return {"resamples": self.resamples, "level": self.level, "seed": self.seed, "n_pairs": self.n,
                "method": METHOD, "rng": RNG}


def pair_bootstrap(n: int, resamples: int, level: float, seed: int) -> PairBootstrap | None:
    """The resamples a stage uses, or None when intervals are off (resamples = 0) or undefined (n < 2)."""
    return PairBootstrap.draw(n, resamples, level, seed) if resamples > 0 and n >= 2 else None


def bootstrap_info(boot: PairBootstrap | None, n: int, resamples: int, level: float, seed: int) -> dict[str, Any]:
    """A summary's `bootstrap` entry; with no bootstrap it says why the intervals are null."""
    if boot is not None:
        return boot.info()
    why = "off (bootstrap_resamples = 0)" if resamples == 0 else f"undefined: {n} pair(s), a bootstrap needs 2"
    return {"resamples": 0, "level": level, "seed": seed, "n_pairs": n, "method": METHOD, "rng": RNG,
            "note": f"no intervals: {why}"}


def as_interval(pair: np.ndarray | None) -> list[float] | None:
    """A JSON interval [lo, hi], or None when there is none or it is not finite."""
    if pair is None or not np.all(np.isfinite(pair)):
        return None
    return [float(pair[0]), float(pair[1])]


def ci_text(ci: list[float], level: float, digits: int = 3) -> str:
    """'95% CI [lo, hi]' for a headline or log line."""
    return f"{level * 100:g}% CI [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
