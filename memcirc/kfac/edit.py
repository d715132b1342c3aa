"""The edit: each module's weight in the K-FAC eigenbasis, the components kept, W' written back; and
`saved_edit`, a saved edit (the stage's deltas.safetensors / edited_model/) applied to any model and
undone on exit."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from memcirc.errors import InputError
from memcirc.kfac.choices import FORMULAS as FORMULAS  # re-exported
from memcirc.kfac.factors import Factors
from memcirc.kfac.targets import Target, stored_weight, weight_of

_TINY = torch.finfo(torch.float64).tiny


@dataclass
class Eigenbasis:
    """One module's factor spectra and W in the K-FAC eigenbasis (float64)."""

    lam: torch.Tensor     # eigenvalues of G (mean), descending, clamped >= 0 (+ damping)
    U_G: torch.Tensor
    mu: torch.Tensor      # eigenvalues of A (mean)
    U_A: torch.Tensor
    C: torch.Tensor       # U_Gᵀ W U_A
    rank_G: int = -1      # numerical ranks of the factors (before damping; -1: not measured)
    rank_A: int = -1

    def importance(self, formula: str) -> torch.Tensor:
        P = self.lam[:, None] * self.mu[None, :]
        if formula == "modified":
            P = P * self.C.square()
        elif formula != "original":
            raise InputError(f"unknown importance formula {formula!r}; choose original or modified")
        return P

    def weight(self, mask: torch.Tensor | None) -> torch.Tensor:
        C = self.C if mask is None else self.C * mask
        return self.U_G @ C @ self.U_A.t()


def spectrum(factor: torch.Tensor, n_tokens: int, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(eigenvalues descending, eigenvectors, numerical rank) of the symmetrized mean factor, in float64.

    The rank counts eigenvalues above max · eps(float32), the resolution of the float32 sums: the null
    directions of a factor from fewer tokens than its width measure ~1e-9 · max (SmolLM2), while real
    activation spectra reach down to ~1e-7 (numpy's max · dim · eps would call 30-50 % of a full-rank
    SmolLM2 factor zero). Measured before the clamp at 0 and the damping."""
    F = factor.double() / n_tokens
    F = 0.5 * (F + F.t())
    evals, evecs = torch.linalg.eigh(F)
    top = float(evals.abs().max()) if evals.numel() else 0.0
    rank = int((evals > top * torch.finfo(torch.float32).eps).sum()) if top > 0 else 0
    evals = evals.clamp_min(0.0) + damping
    return evals.flip(0), evecs.flip(1), rank


def eigenbasis(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, n_tokens: int, damping: float = 0.0) -> Eigenbasis:
    mu, U_A, rank_A = spectrum(A, n_tokens, damping)
    lam, U_G, rank_G = spectrum(G, n_tokens, damping)
    C = U_G.t() @ W.detach().to(U_A.device, torch.float64) @ U_A   # on the factors' device (CPU)
    return Eigenbasis(lam, U_G, mu, U_A, C, rank_G, rank_A)


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
    k = int(torch.searchsorted(csum, torch.tensor([target], dtype=csum.dtype), right=False)) + 1
    k = min(k, flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
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
        return torch.ones(len(lam), len(mu), dtype=torch.bool)
    target = rho * float(lam.sum() * mu.sum())
    stairs = _Staircase(lam, mu)
    keep = _kept_counts(stairs, _boundary_value(stairs, target), target)
    return torch.arange(len(mu))[None, :] < keep[:, None]


# -- writing the edit --------------------------------------------------------------------------

@torch.no_grad()
def apply_edit(model: torch.nn.Module, targets: Sequence[Target], bases: dict[str, Eigenbasis], formula: str,
               rho: float) -> dict[str, float]:
    """Write W' = U_G (C ⊙ M) U_Aᵀ into every target in place; returns the kept fractions."""
    kept = total = 0
    mass_kept = 0.0
    for t in targets:
        basis = bases[t.name]
        P = basis.importance(formula)
        # original: threshold search on the two spectra; modified: sort of the full product matrix
        mask = select_product(basis.lam, basis.mu, rho) if formula == "original" else select_mask(P, rho)
        kept += int(mask.sum())
        total += mask.numel()
        mass_kept += float(P[mask].sum() / P.sum()) if float(P.sum()) > 0 else 1.0
        W = weight_of(model, t)
        W.copy_(basis.weight(mask.to(basis.C.device, torch.float64)).to(W.device, W.dtype))
    return {"kept_fraction": kept / total, "kept_importance": mass_kept / len(targets)}


class ModelEdit:
    """The targets' original weights and eigenbases: edit the model in place, zero the targets,
    restore them, and the difference an edit made."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[Target], factors: Factors,
                 damping: float = 0.0) -> None:
        self.model, self.targets = model, list(targets)
        self.originals = {t.name: weight_of(model, t).detach().clone() for t in targets}
        self.bases = {t.name: eigenbasis(self.originals[t.name], factors.A[t.name], factors.G[t.name],
                                         factors.n_tokens, damping) for t in targets}

    def apply(self, formula: str, rho: float) -> dict[str, float]:
        return apply_edit(self.model, self.targets, self.bases, formula, rho)

    @torch.no_grad()
    def zero(self) -> None:
        """The rho -> 0 limit: the edited weights zeroed (as deleting the modules)."""
        for t in self.targets:
            weight_of(self.model, t).zero_()

    @torch.no_grad()
    def restore(self) -> None:
        for t in self.targets:
            weight_of(self.model, t).copy_(self.originals[t.name])

    def deltas(self) -> dict[str, torch.Tensor]:
        """Edited minus original weight per parameter name, in the parameters' own layout, on CPU."""
        return {t.param: (stored_weight(self.model, t).detach()
                          - (self.originals[t.name].t() if t.transposed else self.originals[t.name])).cpu()
                for t in self.targets}


# -- a saved edit on any model -----------------------------------------------------------------

# The names the kfac_edit stage writes in its folder (memcirc/stages/kfac_edit.py DELTAS, EDITED_MODEL).
DELTAS_FILE = "deltas.safetensors"
EDITED_MODEL_DIR = "edited_model"


@dataclass(frozen=True)
class SavedEdit:
    """What `saved_edit` applied: the edited parameters, where their new values came from, the setting."""

    params: tuple[str, ...]
    source: str                   # "edited_model" (the saved tensors) or "deltas" (weight + delta)
    formula: str | None = None
    rho: float | None = None


def _stage_folder(path: Path) -> Path:
    """The kfac stage folder of `path` (the folder itself, or `<run>/kfac`)."""
    for folder in (path, path / "kfac"):
        if (folder / DELTAS_FILE).is_file():
            return folder
    raise InputError(f"{path} holds no {DELTAS_FILE} (nor kfac/{DELTAS_FILE}): give a kfac_edit stage folder, "
                     "its run folder or a deltas file")


def _read_deltas(edit: str | Path | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                                       Path | None]:
    """(deltas, their metadata, the edited_model folder next to them or None)."""
    if isinstance(edit, dict):
        return dict(edit), {}, None
    from safetensors import safe_open

    path = Path(edit)
    if path.is_dir():
        folder = _stage_folder(path)
        path, edited = folder / DELTAS_FILE, folder / EDITED_MODEL_DIR
    elif path.is_file():
        edited = path.parent / EDITED_MODEL_DIR
    else:
        raise InputError(f"K-FAC edit not found: {path}")
    with safe_open(str(path), "pt") as fh:
        deltas = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata() or {}
    return deltas, metadata, edited if edited.is_dir() else None


def _edited_tensors(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of a saved model folder, read without loading the rest."""
    from safetensors import safe_open

    from memcirc.models.weights import weight_files

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, f"edited model {folder}"):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys() if k in names})
    missing = sorted(set(names) - set(out))
    if missing:
        raise InputError(f"{folder} lacks the edited tensors {missing}")
    return out


def _new_weights(model: torch.nn.Module, deltas: dict[str, torch.Tensor],
                 edited_dir: Path | None) -> dict[str, torch.Tensor]:
    """Per parameter, its edited value (model dtype): the saved edited model's tensor where there is
    one (checked to be weight + delta, i.e. an edit of this model), else weight + delta."""
    params = dict(model.named_parameters())
    missing = sorted(set(deltas) - set(params))
    if missing:
        raise InputError(f"the edit names parameters this model does not have: {missing[:4]}")
    for name, delta in deltas.items():
        if tuple(delta.shape) != tuple(params[name].shape):
            raise InputError(f"edit of {name} has shape {tuple(delta.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    summed = {n: params[n].detach().float() + d.to(params[n].device, torch.float32) for n, d in deltas.items()}
    if edited_dir is None:
        return {n: s.to(params[n].dtype) for n, s in summed.items()}
    saved = _edited_tensors(edited_dir, list(deltas))
    for name, tensor in saved.items():
        W = params[name]
        # weight + delta is the saved tensor up to float rounding, in the model's dtype
        tolerance = 4 * torch.finfo(W.dtype).eps * float(tensor.abs().max().clamp_min(1e-12))
        if float((summed[name] - tensor.to(W.device, torch.float32)).abs().max()) > tolerance:
            raise InputError(f"{edited_dir} does not hold this model plus the edit at {name}: the edit was made "
                             "on another model")
    return {n: t.to(params[n].device, params[n].dtype) for n, t in saved.items()}


@contextlib.contextmanager
def saved_edit(model: torch.nn.Module, edit: str | Path | dict[str, torch.Tensor]) -> Iterator[SavedEdit]:
    """Apply a saved K-FAC edit to `model` in place inside the block; restore the weights bit for bit on
    exit, whatever happens.

    `edit`: a kfac_edit stage folder or its run folder, a deltas.safetensors file (edited minus original
    weight per parameter name, in the parameters' own layout) or such a dict. Where the stage's
    edited_model/ is next to the deltas its tensors are used, so the model equals that folder's weights
    exactly; a deltas file alone gives weight + delta (one float rounding from the saved tensors).
    """
    deltas, metadata, edited_dir = _read_deltas(edit)
    if not deltas:
        raise InputError("the K-FAC edit holds no tensors")
    new = _new_weights(model, deltas, edited_dir)
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in new}
    rho = metadata.get("rho")
    info = SavedEdit(tuple(new), "deltas" if edited_dir is None else "edited_model", metadata.get("formula"),
                     None if rho is None else float(rho))
    try:
        with torch.no_grad():
            for name, value in new.items():
                params[name].copy_(value)
        yield info
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
