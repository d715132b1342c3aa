"""The edit: each module's weight in the K-FAC eigenbasis, the components kept, W' written back; and
`saved_edit`, a saved edit (the stage's deltas.safetensors / edited_model/) applied to any model and
undone on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcirc.errors import InputError
from memcirc.kfac.choices import FORMULAS as FORMULAS  # re-exported
from memcirc.kfac.factors import Factors
from memcirc.kfac.select import select_mask as select_mask  # re-exported
from memcirc.kfac.select import select_modified as select_modified  # re-exported
from memcirc.kfac.select import select_product as select_product  # re-exported
from memcirc.kfac.targets import Target, stored_weight, weight_of


@dataclass
class Eigenbasis:
    """One module's factor spectra and W in the K-FAC eigenbasis (float64; the reconstruction float32)."""

    lam: torch.Tensor     # eigenvalues of G (mean), descending, clamped >= 0 (+ damping)
    U_G: torch.Tensor
    mu: torch.Tensor      # eigenvalues of A (mean)
    U_A: torch.Tensor
    C: torch.Tensor       # U_Gᵀ W U_A
    rank_G: int = -1      # numerical ranks of the factors (before damping; -1: not measured)
    rank_A: int = -1
    _f32: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def importance(self, formula: str) -> torch.Tensor:
        P = self.lam[:, None] * self.mu[None, :]
        if formula == "modified":
            P = P * self.C.square()
        elif formula != "original":
            raise InputError(f"unknown importance formula {formula!r}; choose original or modified")
        return P

    def weight(self, mask: torch.Tensor | None) -> torch.Tensor:
        """U_G (C ⊙ M) U_Aᵀ in float32 (2x float64's speed on a CPU, more on a GPU): the kept set is
        chosen on the float64 C, and the two products add a relative error ~1e-6 of max |W|
        (tests/test_kfac.py), below the float32 weights' own rounding of a sum of d terms."""
        U_G, C, U_A = self._float32()
        return U_G @ (C if mask is None else C * mask.to(C.device)) @ U_A.t()

    def weight64(self, mask: torch.Tensor | None) -> torch.Tensor:
        """The float64 reconstruction (the reference of `weight`)."""
        C = self.C if mask is None else self.C * mask.to(self.C.device, torch.float64)
        return self.U_G @ C @ self.U_A.t()

    def _float32(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._f32 is None:      # made once per module, reused by every (formula, rho) of a sweep
            self._f32 = (self.U_G.float(), self.C.float(), self.U_A.float())
        return self._f32


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
    C = U_G.t() @ W.detach().to(U_A.device, torch.float64) @ U_A   # on the factors' device
    return Eigenbasis(lam, U_G, mu, U_A, C, rank_G, rank_A)


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
        # original: threshold search on the two spectra; modified: radix select on the importances
        mask = select_product(basis.lam, basis.mu, rho) if formula == "original" else select_modified(P, rho)
        kept += int(mask.sum())
        total += mask.numel()
        mass_kept += float(P[mask].sum() / P.sum()) if float(P.sum()) > 0 else 1.0
        W = weight_of(model, t)
        W.copy_(basis.weight(mask).to(W.device, W.dtype))
    return {"kept_fraction": kept / total, "kept_importance": mass_kept / len(targets)}


def _on(W: torch.Tensor, factors: Factors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's factors on its weight's device, where eigh and the products run (GPU float64 is
    seconds where a CPU takes minutes); MPS has no float64, so its edit stays on the CPU."""
    device = torch.device("cpu") if W.device.type == "mps" else W.device
    return factors.A[name].to(device), factors.G[name].to(device)


class ModelEdit:
    """The targets' original weights and eigenbases: edit the model in place, zero the targets,
    restore them, and the difference an edit made."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[Target], factors: Factors,
                 damping: float = 0.0) -> None:
        self.model, self.targets = model, list(targets)
        self.originals = {t.name: weight_of(model, t).detach().clone() for t in targets}
        self.bases = {t.name: eigenbasis(self.originals[t.name], *_on(self.originals[t.name], factors, t.name),
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
