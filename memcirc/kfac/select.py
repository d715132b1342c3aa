"""Component selection: the smallest set of components whose importance reaches ρ · total.

`select_mask` is the reference (a full sort); `select_product` (the `original` formula, from the
two spectra, no product matrix) and `select_modified` (any importance matrix >= 0, a radix select
over the float64 bit patterns) keep the same set without the sort.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import torch

from memcirc.errors import InputError

_TINY = torch.finfo(torch.float64).tiny


# -- selection ---------------------------------------------------------------------------------

def _check_rho(rho: float) -> None:
    if not 0.0 < rho <= 1.0:
        raise InputError(f"rho must lie in (0, 1], got {rho}")


def select_mask(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean mask of the smallest set of entries whose importance sum reaches rho * total.

    Vectorized: sort descending (stable, so equal importances are taken in row-major order),
    cumulative sum in float64, `searchsorted` for the first prefix that reaches the target.
    rho = 1 keeps everything (zero-importance entries included), so the weights are unchanged.
    """
    _check_rho(rho)
    flat = importance.reshape(-1).double()
    if rho >= 1.0:
        return torch.ones_like(importance, dtype=torch.bool)
    values, order = torch.sort(flat, descending=True, stable=True)
    csum = torch.cumsum(values, 0)
    target = rho * float(csum[-1])
    k = int(torch.searchsorted(csum, torch.tensor([target], dtype=csum.dtype, device=csum.device), right=False)) + 1
    k = min(k, flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.view(importance.shape)


def _bits(x: float) -> int:
    """A non-negative double's bit pattern as int64 (monotone in x)."""
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def _double(b: int) -> float:
    return float(torch.tensor([b], dtype=torch.int64).view(torch.float64))


class _Staircase:
    """The products λ_i μ_j of two descending spectra >= 0, never materialized: for a value τ, row
    i's kept columns are the first c_i(τ) = #{j: λ_i μ_j ≥ τ}, and their mass is Σ_i λ_i Σ_{j<c_i} μ_j."""

    def __init__(self, lam: torch.Tensor, mu: torch.Tensor) -> None:
        self.lam, self.mu = lam, mu
        self.n, self.m = len(lam), len(mu)
        self.mu_asc, self.lam_asc = mu.flip(0), lam.flip(0)
        self.prefix_mu = torch.cat([mu.new_zeros(1), torch.cumsum(mu, 0)])
        self.prefix_lam = torch.cat([lam.new_zeros(1), torch.cumsum(lam, 0)])

    def mass(self, c: torch.Tensor) -> float:
        """The mass of the staircase with row counts `c`."""
        return float((self.lam * self.prefix_mu[c]).sum())

    def counts(self, tau: float, strict: bool) -> torch.Tensor:
        """Per row, the columns j with λ_i μ_j >= tau (> tau if `strict`), exact on the products."""
        c = self.m - torch.searchsorted(self.mu_asc, tau / self.lam.clamp_min(_TINY), right=strict)
        # The division can be off by an ulp: fix c on the real products, jumping a whole run of
        # equal mu values at a time (equal mu give equal products).
        return self._grow(self._shrink(c, tau, strict), tau, strict)

    def _shrink(self, c: torch.Tensor, tau: float, strict: bool) -> torch.Tensor:
        while True:
            last = self.mu[(c - 1).clamp_min(0)]
            bad = (c > 0) & ((self.lam * last <= tau) if strict else (self.lam * last < tau))
            if not bool(bad.any()):
                return c
            c = torch.where(bad, self.m - torch.searchsorted(self.mu_asc, last, right=True), c)

    def _grow(self, c: torch.Tensor, tau: float, strict: bool) -> torch.Tensor:
        while True:
            nxt = self.mu[c.clamp_max(self.m - 1)]
            more = (c < self.m) & ((self.lam * nxt > tau) if strict else (self.lam * nxt >= tau))
            if not bool(more.any()):
                return c
            c = torch.where(more, self.m - torch.searchsorted(self.mu_asc, nxt, right=False), c)

    def exact_mass(self, tau: float) -> float:
        return self.mass(self.counts(tau, strict=False))

    def approx_mass(self, tau: float) -> float:
        """The mass of the products >= tau by plain division (no ulp fix-up), over the shorter spectrum."""
        if self.n > self.m:   # per column j: rows i with λ_i ≥ τ / μ_j
            r = self.n - torch.searchsorted(self.lam_asc, tau / self.mu.clamp_min(_TINY))
            return float((self.mu * self.prefix_lam[r]).sum())
        return self.mass(self.m - torch.searchsorted(self.mu_asc, tau / self.lam.clamp_min(_TINY)))


def _bisect(mass_of: Callable[[float], float], top: int, target: float) -> int:
    """Bisection over the bit patterns of non-negative doubles (at most 64 steps). Invariant: the
    products >= lo hold >= target, the products >= hi hold < target. Returns lo's bit pattern."""
    lo, hi = 0, top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mass_of(_double(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def _boundary_value(stairs: _Staircase, target: float) -> float:
    """The product value τ* at which the kept mass first reaches `target`: the bisection runs on the
    approximate mass; the exact counts then check its result, and a failed check repeats it with
    exact counts."""
    top = _bits(float(stairs.lam[0] * stairs.mu[0])) + 1
    for mass_of in (stairs.approx_mass, stairs.exact_mass):
        lo = _bisect(mass_of, top, target)
        tau = _double(lo)
        if stairs.exact_mass(tau) >= target and stairs.mass(stairs.counts(tau, strict=True)) < target:
            break
    return tau                    # no double lies strictly between tau and hi: the boundary value


def _kept_counts(stairs: _Staircase, tau: float, target: float) -> torch.Tensor:
    """Per row, the kept columns: every product above tau, and of those equal to tau as many as
    needed to reach `target`, in row-major order (the tie rule of `select_mask`)."""
    c_ge = stairs.counts(tau, strict=False)
    c_gt = stairs.counts(tau, strict=True)
    above = stairs.mass(c_gt)
    ties = c_ge - c_gt                      # components equal to tau, per row (contiguous columns)
    n_ties = int(ties.sum())
    if not n_ties:
        return c_gt
    if tau == 0:                            # only zero components are left to add
        return c_ge if above < target else c_gt
    k = min(n_ties, max(1, math.ceil((target - above) / tau)))
    while k > 1 and above + (k - 1) * tau >= target:   # ceil may overshoot by one ulp
        k -= 1
    before = torch.cumsum(ties, 0) - ties   # ties in the rows above (row-major order)
    return c_gt + (k - before).clamp(min=0).minimum(ties)


def select_product(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """`select_mask(lam[:, None] * mu[None, :], rho)` without materializing or sorting the products
    (the `original` formula, both spectra sorted descending and >= 0): a threshold search.

    The kept set is a staircase: row i keeps the first c_i(τ) columns, c_i = #{j: λ_i μ_j ≥ τ},
    with mass m(τ) = Σ_i λ_i Σ_{j<c_i} μ_j. Bisection over τ (m is a step function, each step
    one product value) finds the boundary value τ*; components strictly above it are kept, and of
    the components equal to τ* as many as needed, in row-major order (the tie rule of
    `select_mask`). Each step is one vectorized `searchsorted` over the rows: O(n_G log n_A).
    The kept mass is summed per row, not in sorted order, so where a prefix's mass equals
    ρ · total to within float rounding the two may differ by that one component.
    """
    _check_rho(rho)
    lam, mu = lam.double(), mu.double()
    if rho >= 1.0:
        return torch.ones(len(lam), len(mu), dtype=torch.bool, device=lam.device)
    target = rho * float(lam.sum() * mu.sum())
    stairs = _Staircase(lam, mu)
    keep = _kept_counts(stairs, _boundary_value(stairs, target), target)
    return torch.arange(len(mu), device=keep.device)[None, :] < keep[:, None]


# -- the modified formula: radix select over the bit patterns ---------------------------------

# (shift, mask) of the lower digits of a double's bit pattern; the top digit is its highest 16 bits
_DIGITS = ((32, 0xFFFF), (16, 0xFFFF), (0, 0xFFFF))
_SMALL = 4096             # a residual this small is finished by sorting it


def _on_cpu(flat: torch.Tensor) -> bool:
    return flat.device.type == "cpu" and sys.byteorder == "little"


def _top_digit(flat: torch.Tensor) -> torch.Tensor:
    """The highest 16 bits (sign, exponent, 4 mantissa bits) of each double, as int16. On a CPU the
    last int16 of each double, copied by numpy (SIMD, about 2x torch's strided copy)."""
    if _on_cpu(flat):
        return torch.from_numpy(np.ascontiguousarray(flat.numpy().view(np.int16)[3::4]))
    return (flat.view(torch.int64) >> 48).to(torch.int16)


def _split(top: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the entries with digit > b, the positions of those with digit == b, ascending); on a
    CPU by numpy, whose int16 compare and flatnonzero are 3-8x torch's."""
    if top.device.type == "cpu":
        t = top.numpy()
        return torch.from_numpy(t > b), torch.from_numpy(np.flatnonzero(t == b))
    return top > b, (top == b).nonzero().squeeze(1)


def _boundary_bin(hist: torch.Tensor, above: float, target: float) -> tuple[int, float]:
    """(digit b holding the boundary, the mass above its bin): the largest b whose mass in bins >= b,
    plus `above`, reaches `target`; where per-bin rounding leaves the whole bin short of it, the
    lowest bin with mass."""
    cum = above + hist.flip(0).cumsum(0).flip(0)
    n_ok = int((cum >= target).sum())
    b = n_ok - 1 if n_ok else int(hist.nonzero()[0, 0])
    return b, float(cum[b + 1]) if b + 1 < len(cum) else above


def _residual_keep(values: torch.Tensor, above: float, target: float) -> torch.Tensor:
    """Of the residual entries (row-major order), the positions to keep: the sort of `select_mask`
    over them, its prefix sum starting at the mass `above` them."""
    if bool(values.min() == values.max()):      # ties alone (integer importances): no sort needed
        order = torch.arange(len(values), device=values.device)
        csum = above + torch.cumsum(values, 0)
    else:
        sorted_values, order = torch.sort(values, descending=True, stable=True)
        csum = above + torch.cumsum(sorted_values, 0)
    k = int(torch.searchsorted(csum, torch.tensor([target], dtype=csum.dtype, device=csum.device), right=False)) + 1
    return order[:min(k, len(values))]


def select_modified(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """`select_mask(importance, rho)` (the `modified` formula λ_i μ_j C_ij²) without the full sort.

    Non-negative doubles order as their int64 bit patterns, so the boundary value is found digit by
    digit, most significant first: one `bincount` weighted by the values gives the mass per digit
    (the top digit, the highest 16 bits, is read straight from memory), the digit whose mass
    cumulated from the top first reaches ρ · total holds the boundary, entries in higher digits are
    kept, and only that digit's entries go on to the next digit. A residual of <= 4096 entries (or
    of one value: ties) is finished as `select_mask` does, equal importances taken in row-major
    order. A few O(N) passes in all (the residual after the top digit is usually small).
    The total and the mass above the residual are summed per bin, not in sorted order, so where a
    prefix's mass equals ρ · total to within float rounding the two may differ by that one component.
    Negative or non-finite importances go to `select_mask`.
    """
    _check_rho(rho)
    if rho >= 1.0:
        return torch.ones_like(importance, dtype=torch.bool)
    flat = importance.detach().reshape(-1).double().contiguous()
    if flat.numel() == 0:
        return select_mask(importance, rho)
    top = _top_digit(flat)
    lo, hi = (int(v) for v in torch.aminmax(top))
    if lo < 0 and bool(flat.min() >= 0):        # -0.0 (sign bit set): make it +0.0
        flat = flat + 0.0
        top = _top_digit(flat)
        lo, hi = (int(v) for v in torch.aminmax(top))
    if lo < 0 or hi >= 0x7FF0:                  # negative, inf or nan: the sort
        return select_mask(importance, rho)
    hist = torch.bincount(top, weights=flat, minlength=hi + 1)
    target = rho * float(hist.sum())
    if target <= 0:                             # all zero: the sort keeps its first maximum
        return _first_max(importance)
    b, above = _boundary_bin(hist, 0.0, target)
    mask, idx = _split(top, b)
    values = flat[idx]
    for shift, width in _DIGITS:
        if len(values) <= _SMALL:
            break
        digit = (values.view(torch.int64) >> shift) & width
        b, above = _boundary_bin(torch.bincount(digit, weights=values, minlength=width + 1), above, target)
        mask[idx[digit > b]] = True
        inside = (digit == b).nonzero().squeeze(1)
        idx, values = idx[inside], values[inside]
    mask[idx[_residual_keep(values, above, target)]] = True
    return mask.view(importance.shape)


def _first_max(importance: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(importance.numel(), dtype=torch.bool, device=importance.device)
    mask[int(importance.reshape(-1).argmax())] = True
    return mask.view(importance.shape)
