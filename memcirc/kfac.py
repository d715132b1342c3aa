"""K-FAC memorization editing (the kfac_edit stage; Merullo et al. 2025, arXiv 2510.24256).

For a linear map y = W a (W: [out, in]) the K-FAC approximation of its Fisher is G ⊗ A with
A = E[a aᵀ] over the layer's inputs and G = E[g gᵀ] over the gradients of the loss w.r.t. its
output (pre-activation). In the joint eigenbasis (U_G, U_A) component (i, j) has curvature λ_i μ_j.
The edit writes W in that basis, C = U_Gᵀ W U_A, keeps the smallest set of components that holds a
fraction ρ of the total importance and zeroes the rest: W' = U_G (C ⊙ M) U_Aᵀ.

Choices (and where they differ from goodfire-ai/memorization_kfac):
- Factors are the inputs *without* a bias column (as the original); biases are never edited.
  GPT-2's Conv1D stores [in, out]; it is transposed to [out, in] on read and back on write.
- Factors are stored as SUMS Σ a aᵀ, Σ g gᵀ with the token count, so shards add up; the edit
  uses the means. The per-token loss is summed (not averaged) so G has no batch-size factor.
- Labels: sampled from the model's own next-token distribution with a seeded torch.Generator
  (true Fisher, default) or the data's next tokens (empirical Fisher). Every position but the
  last of each block contributes (the last has no data label).
- Eigendecomposition in float64 of the symmetrized factor, negative eigenvalues clamped to 0,
  optional damping added to both spectra.
- Selection is vectorized: sort all importances (descending, ties in row-major (i, j) order),
  cumulative sum, `searchsorted` for the first prefix whose mass reaches ρ · total. The original
  runs a Python heap over up to 45 M pairs. ρ = 1 keeps every component (W unchanged), including
  components of zero importance that the "smallest set" would drop.
- Importance: `original` λ_i μ_j; `modified` λ_i μ_j |C_ij|² (the omrifahn / smarter variant).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.evaluation import check_same_model, heldout_blocks, memorization, memorized_windows, perplexity
from memcirc.logs import progress
from memcirc.manifest import StageRun, read_manifest
from memcirc.models import LoadedModel, load
from memcirc.models.arch import ArchSpec, dims, get_module
from memcirc.sharding import resolve_shards, shard_bounds
from memcirc.stages.kfac_edit import KfacConfig

log = logging.getLogger(__name__)

STAGE = "kfac_edit"
FACTORS = "factors.safetensors"
DELTAS = "deltas.safetensors"
EDITED_MODEL = "edited_model"
RHO_CURVE = "rho_curve.png"
EDIT_ROLES = ("mlp_gate", "mlp_in", "mlp_out")   # linear roles the stage edits
PPL_LIMIT = 0.20                                 # the default saved setting: ppl rise <= 20 %
MAX_FACTOR_BLOCK = 512
PARTIAL = "partial.safetensors"                  # running factor sums of an unfinished job
SHARD_DONE = "done.json"                         # written by a factor shard job after its sums
FACTOR_SAMPLING = "per-block seeds, float64 sums"  # changes the fingerprint when the collection changes


# -- modules ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One edited linear module: its name in the model and how its weight is laid out."""

    name: str             # dotted module path, e.g. gpt_neox.layers.2.mlp.dense_h_to_4h
    role: str
    layer: int
    transposed: bool      # GPT-2 Conv1D: weight stored [in, out]

    @property
    def param(self) -> str:
        return f"{self.name}.weight"


def resolve_targets(model: torch.nn.Module, arch: ArchSpec, layers: Sequence[int],
                    roles: Sequence[str]) -> list[Target]:
    """The modules to edit; an unknown role or layer is an InputError that lists the valid ones."""
    n = dims(model).n_layers
    valid_roles = [r for r in EDIT_ROLES if arch.path(r) is not None]
    bad_roles = [r for r in roles if r not in valid_roles]
    if bad_roles:
        raise InputError(f"projections {bad_roles} are not linear MLP modules of this {arch.family} model; "
                         f"valid: {', '.join(valid_roles)}")
    bad_layers = [x for x in layers if not 0 <= x < n]
    if bad_layers:
        raise InputError(f"layers {bad_layers} are not in the model; valid: 0..{n - 1}")
    if not roles:
        raise InputError(f"config key 'projections' is empty; valid: {', '.join(valid_roles)}")
    targets = []
    for layer in layers:
        for role in roles:
            name = arch.path(role).format(layer=layer)
            module = get_module(model, arch, role, layer)
            if not hasattr(module, "weight") or module.weight.dim() != 2:
                raise InputError(f"{name} has no 2-D weight; it cannot be edited")
            targets.append(Target(name, role, layer, arch.conv1d_weights))
    return targets


def weight_of(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """W as [out, in] (a view for nn.Linear, a transposed view for Conv1D)."""
    w = model.get_submodule(target.name).weight
    return w.t() if target.transposed else w


# -- factors ---------------------------------------------------------------------------------

@dataclass
class Factors:
    """Sums A = Σ a aᵀ, G = Σ g gᵀ (float32) per module name, and the tokens they sum over."""

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    n_tokens: int
    labels: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Factors) -> Factors:
        if set(self.A) != set(other.A) or self.labels != other.labels:
            raise InputError("cannot add factors of different modules or label modes")
        return Factors({k: self.A[k] + other.A[k] for k in self.A}, {k: self.G[k] + other.G[k] for k in self.G},
                       self.n_tokens + other.n_tokens, self.labels, dict(self.meta))

    def to(self, dtype: torch.dtype) -> Factors:
        return Factors({k: v.to(dtype) for k, v in self.A.items()}, {k: v.to(dtype) for k, v in self.G.items()},
                       self.n_tokens, self.labels, dict(self.meta))

    def save(self, path: Path, model_identity: dict[str, Any], targets: Sequence[Target]) -> None:
        tensors = {f"{k}.A": v for k, v in self.A.items()} | {f"{k}.G": v for k, v in self.G.items()}
        meta = {"model": json.dumps(model_identity, sort_keys=True), "n_tokens": str(self.n_tokens),
                "labels": self.labels, "modules": json.dumps([t.__dict__ for t in targets]),
                "extra": json.dumps(self.meta, sort_keys=True)}
        art.save_tensors(path, tensors, metadata=meta)


def load_factors(path: Path) -> tuple[Factors, dict[str, Any], list[dict[str, Any]]]:
    """(factors, model identity, module list) from a factors.safetensors file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise InputError(f"factors file not found: {path}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise InputError(f"{path} is not a safetensors factors file ({e})") from None
    if "model" not in meta or "modules" not in meta:
        raise InputError(f"{path} has no K-FAC metadata (model, modules): not written by kfac_edit")
    tensors = art.load_tensors(path)
    modules = json.loads(meta["modules"])
    A = {m["name"]: tensors[f"{m['name']}.A"] for m in modules}
    G = {m["name"]: tensors[f"{m['name']}.G"] for m in modules}
    return (Factors(A, G, int(meta["n_tokens"]), meta["labels"], json.loads(meta.get("extra", "{}"))),
            json.loads(meta["model"]), modules)


def block_seed(seed: int, block: int) -> int:
    """The sampling seed of factor block `block`: labels depend on the block alone, not on the batch
    or the shard that holds it, so shards and a one-job run draw the same labels."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0]) >> 1


def collect_factors(model: torch.nn.Module, targets: Sequence[Target], token_batches: Iterable[torch.Tensor], *,
                    labels: str = "sampled", token_budget: int | None = None,
                    generator: torch.Generator | None = None, seed: int | None = None, first_block: int = 0,
                    initial: Factors | None = None, checkpoint: Callable[[int, Factors], None] | None = None,
                    checkpoint_every: int = 16, float64: bool = False) -> Factors:
    """Accumulate A and G sums over `token_batches` ([B, T] int64, unpadded blocks).

    A token is one predicted position (every position but the last of a block). The budget is
    checked per batch: collection stops after the batch that reaches it (so shards that split the
    batch list add up exactly). Labels: `sampled` draws y ~ softmax(logits) (true Fisher), `data`
    uses the next tokens (empirical Fisher). With `seed`, block r (counting from `first_block`)
    draws its labels with its own generator `block_seed(seed, r)`, so the labels do not depend on
    batching or sharding; otherwise one `generator` stream serves all batches. The loss is the SUM
    of the per-token cross entropies, so g is the gradient of the summed loss w.r.t. the layer output.

    Each batch's a aᵀ is computed in float32 and added to float64 running sums (float32 on MPS,
    which has no float64), so sums over different groupings of the same batches (shards) agree to
    float64 rounding. `initial` continues earlier sums (a resumed or later shard); `checkpoint(n, sums)`
    is called every `checkpoint_every` batches and after the last, with the batches done in this call.
    Returns float32 sums unless `float64`.
    """
    if labels not in ("sampled", "data"):
        raise InputError(f"labels must be 'sampled' or 'data', got {labels!r}")
    device = next(model.parameters()).device
    acc = torch.float32 if device.type == "mps" else torch.float64
    A: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
    G: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
    if initial is not None:
        A = {t.name: initial.A[t.name].to(device, acc) for t in targets}
        G = {t.name: initial.G[t.name].to(device, acc) for t in targets}
    handles = []
    was_training = model.training
    params = [model.get_submodule(t.name).weight for t in targets]
    flags = [p.requires_grad for p in params]

    def fwd_hook(name: str):
        def hook(module, inputs, output):  # noqa: ANN001, ANN202
            if not torch.is_grad_enabled():
                return
            x = inputs[0].detach()[:, :-1].reshape(-1, inputs[0].shape[-1]).float()
            a = (x.t() @ x).to(acc)
            A[name] = a if A[name] is None else A[name] + a

            def grad_hook(g: torch.Tensor) -> None:
                g2 = g.detach()[:, :-1].reshape(-1, g.shape[-1]).float()
                gg = (g2.t() @ g2).to(acc)
                G[name] = gg if G[name] is None else G[name] + gg
            output.register_hook(grad_hook)
        return hook

    def sums(dtype: torch.dtype) -> Factors:
        return Factors({k: v.to("cpu", dtype) for k, v in A.items()}, {k: v.to("cpu", dtype) for k, v in G.items()},
                       n_tokens, labels)

    n_tokens = initial.n_tokens if initial is not None else 0
    block = first_block
    done = 0
    try:
        model.eval()  # no dropout: the Fisher of the deployed model
        for p in params:
            p.requires_grad_(True)  # the graph must reach the edited layers' outputs
        for t in targets:
            handles.append(model.get_submodule(t.name).register_forward_hook(fwd_hook(t.name)))
        for ids in token_batches:
            if token_budget is not None and n_tokens >= token_budget:
                break
            ids = ids.to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                if labels == "data":
                    y = ids[:, 1:]
                else:
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach(), -1)
                        if seed is not None:
                            y = torch.stack([torch.multinomial(
                                probs[r], 1, generator=torch.Generator(device).manual_seed(block_seed(seed, block + r)))
                                for r in range(ids.shape[0])]).view(ids.shape[0], -1)
                        else:
                            gen_device = generator.device if generator is not None else device
                            y = torch.multinomial(probs.reshape(-1, logits.shape[-1]).to(gen_device), 1,
                                                  generator=generator)
                            y = y.view(ids.shape[0], -1).to(device)
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="sum")
                loss.backward()
            for p in params:
                p.grad = None
            n_tokens += ids.shape[0] * (ids.shape[1] - 1)
            block += ids.shape[0]
            done += 1
            if checkpoint is not None and done % checkpoint_every == 0:
                checkpoint(done, sums(acc))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    if n_tokens == 0:
        raise InputError("no tokens to collect K-FAC factors on (empty factor data or zero budget)")
    result = sums(torch.float64 if float64 else torch.float32)
    if checkpoint is not None and done % checkpoint_every:
        checkpoint(done, result if float64 else sums(acc))
    return result


def token_blocks(tokens: np.ndarray, block_len: int, token_budget: int, batch_size: int) -> list[torch.Tensor]:
    """Consecutive blocks of `block_len` tokens, batched, up to the token budget (T-1 per block)."""
    n_blocks = min(len(tokens) // block_len, math.ceil(token_budget / (block_len - 1)))
    if n_blocks == 0:
        raise InputError(f"factor data holds {len(tokens)} tokens, fewer than one block of {block_len}")
    blocks = torch.as_tensor(tokens[:n_blocks * block_len].reshape(n_blocks, block_len), dtype=torch.long)
    return list(blocks.split(batch_size))


# -- the edit --------------------------------------------------------------------------------

@dataclass
class Eigenbasis:
    """One module's factor spectra and W in the K-FAC eigenbasis (float64)."""

    lam: torch.Tensor     # eigenvalues of G (mean), descending, clamped >= 0 (+ damping)
    U_G: torch.Tensor
    mu: torch.Tensor      # eigenvalues of A (mean)
    U_A: torch.Tensor
    C: torch.Tensor       # U_Gᵀ W U_A

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


def spectrum(factor: torch.Tensor, n_tokens: int, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors) of the symmetrized mean factor, in float64."""
    F = factor.double() / n_tokens
    F = 0.5 * (F + F.t())
    evals, evecs = torch.linalg.eigh(F)
    evals = evals.clamp_min(0.0) + damping
    return evals.flip(0), evecs.flip(1)


def eigenbasis(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, n_tokens: int, damping: float = 0.0) -> Eigenbasis:
    mu, U_A = spectrum(A, n_tokens, damping)
    lam, U_G = spectrum(G, n_tokens, damping)
    C = U_G.t() @ W.detach().to(U_A.device, torch.float64) @ U_A   # on the factors' device (CPU)
    return Eigenbasis(lam, U_G, mu, U_A, C)


def select_mask(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean mask of the smallest set of entries whose importance sum reaches rho * total.

    Vectorized: sort descending (stable, so equal importances are taken in row-major order),
    cumulative sum in float64, `searchsorted` for the first prefix that reaches the target.
    rho = 1 keeps everything (zero-importance entries included), so the weights are unchanged.
    """
    if not 0.0 < rho <= 1.0:
        raise InputError(f"rho must lie in (0, 1], got {rho}")
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
    if not 0.0 < rho <= 1.0:
        raise InputError(f"rho must lie in (0, 1], got {rho}")
    lam, mu = lam.double(), mu.double()
    n, m = len(lam), len(mu)
    if rho >= 1.0:
        return torch.ones(n, m, dtype=torch.bool)
    mu_asc = mu.flip(0)
    prefix = torch.cat([mu.new_zeros(1), torch.cumsum(mu, 0)])
    total = float(lam.sum() * mu.sum())
    target = rho * total

    def counts(tau: float, strict: bool) -> torch.Tensor:
        # columns j with λ_i μ_j >= tau (or > tau); the division is corrected on the products
        safe = lam.clamp_min(torch.finfo(torch.float64).tiny)
        c = m - torch.searchsorted(mu_asc, tau / safe, right=strict)
        # The division can be off by an ulp: fix c on the real products, jumping a whole run of
        # equal mu values at a time (equal mu give equal products).
        while True:
            last = lam * mu[(c - 1).clamp_min(0)]
            bad = (c > 0) & ((last <= tau) if strict else (last < tau))
            if not bool(bad.any()):
                break
            c = torch.where(bad, m - torch.searchsorted(mu_asc, mu[(c - 1).clamp_min(0)], right=True), c)
        while True:
            nxt = lam * mu[c.clamp_max(m - 1)]
            more = (c < m) & ((nxt > tau) if strict else (nxt >= tau))
            if not bool(more.any()):
                break
            c = torch.where(more, m - torch.searchsorted(mu_asc, mu[c.clamp_max(m - 1)], right=False), c)
        return c

    def mass(c: torch.Tensor) -> float:
        return float((lam * prefix[c]).sum())

    # The bisection runs on the shorter spectrum with plain division (no ulp fix-up); the exact
    # counts below then check its result, and a failed check repeats it with exact counts.
    lam_asc = lam.flip(0)
    prefix_lam = torch.cat([lam.new_zeros(1), torch.cumsum(lam, 0)])
    tiny = torch.finfo(torch.float64).tiny

    def approx_mass(tau: float) -> float:
        if n > m:   # per column j: rows i with λ_i ≥ τ / μ_j
            r = n - torch.searchsorted(lam_asc, tau / mu.clamp_min(tiny))
            return float((mu * prefix_lam[r]).sum())
        return mass(m - torch.searchsorted(mu_asc, tau / lam.clamp_min(tiny)))

    def exact_mass(tau: float) -> float:
        return mass(counts(tau, strict=False))

    # Bisection over the bit patterns of non-negative doubles (monotone as int64): at most 64 steps.
    # Invariant: the products >= lo hold >= target, the products >= hi hold < target.
    as_bits = lambda x: int(torch.tensor([x], dtype=torch.float64).view(torch.int64))  # noqa: E731
    as_float = lambda b: float(torch.tensor([b], dtype=torch.int64).view(torch.float64))  # noqa: E731
    top = as_bits(float(lam[0] * mu[0])) + 1
    for mass_of in (approx_mass, exact_mass):
        lo_b, hi_b = 0, top
        while hi_b - lo_b > 1:
            mid = (lo_b + hi_b) // 2
            if mass_of(as_float(mid)) >= target:
                lo_b = mid
            else:
                hi_b = mid
        if exact_mass(as_float(lo_b)) >= target and mass(counts(as_float(lo_b), strict=True)) < target:
            break
    tau = as_float(lo_b)                    # no double lies strictly between tau and hi: the boundary value
    c_ge = counts(tau, strict=False)
    c_gt = counts(tau, strict=True)
    above = mass(c_gt)
    ties = c_ge - c_gt                      # components equal to tau, per row (contiguous columns)
    keep = c_gt
    n_ties = int(ties.sum())
    if n_ties and tau > 0:
        k = min(n_ties, max(1, math.ceil((target - above) / tau)))
        while k > 1 and above + (k - 1) * tau >= target:   # ceil may overshoot by one ulp
            k -= 1
        before = torch.cumsum(ties, 0) - ties   # ties in the rows above (row-major order)
        keep = c_gt + (k - before).clamp(min=0).minimum(ties)
    elif n_ties:                            # tau == 0: only zero components are left to add
        keep = c_ge if above < target else c_gt
    return torch.arange(m)[None, :] < keep[:, None]


def select_bruteforce(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Reference: walk every entry in descending order (ties row-major), stop at rho * total."""
    flat = importance.reshape(-1).double().tolist()
    if rho >= 1.0:
        return torch.ones_like(importance, dtype=torch.bool)
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    target = rho * math.fsum(flat)
    mask = torch.zeros(len(flat), dtype=torch.bool)
    total = 0.0
    for i in order:
        mask[i] = True
        total += flat[i]
        if total >= target:
            break
    return mask.view(importance.shape)


def select_heap(lam: Sequence[float], mu: Sequence[float], rho: float) -> set[tuple[int, int]]:
    """The original code's selection (goodfire-ai/memorization_kfac, KFACTreatmentPairwise): a lazy
    k-way merge over λ_i μ_j (both sorted descending) with a max-heap and a `seen` set, pure
    Python. Kept as the benchmark baseline; never used by the stage."""
    import heapq

    target = rho * (sum(lam) * sum(mu))
    heap = [(-(lam[0] * mu[0]), 0, 0)]
    seen = {(0, 0)}
    kept: set[tuple[int, int]] = set()
    total = 0.0
    while heap and total < target:
        neg, i, j = heapq.heappop(heap)
        kept.add((i, j))
        total += -neg
        if i + 1 < len(lam) and (i + 1, j) not in seen:
            seen.add((i + 1, j))
            heapq.heappush(heap, (-(lam[i + 1] * mu[j]), i + 1, j))
        if j + 1 < len(mu) and (i, j + 1) not in seen:
            seen.add((i, j + 1))
            heapq.heappush(heap, (-(lam[i] * mu[j + 1]), i, j + 1))
    return kept


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


# -- the stage -------------------------------------------------------------------------------

def _factor_tokens(cfg: KfacConfig, loaded: LoadedModel) -> np.ndarray:
    from memcirc.data import Columns, load_documents
    from memcirc.testbed import CORPUS_DIR, TESTBED_NAME

    source = str(CORPUS_DIR / "train.txt") if cfg.factor_data == TESTBED_NAME else cfg.factor_data
    eos = loaded.tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    n = 0
    for doc in load_documents(source, Columns()):
        ids = doc.tokens if doc.tokens is not None else loaded.tokenizer(doc.text)["input_ids"]
        parts.append(np.asarray(ids, np.int64))
        if eos is not None:
            parts.append(np.asarray([eos], np.int64))
        n += len(ids) + 1
        if n >= 2 * cfg.factor_tokens + MAX_FACTOR_BLOCK:
            break
    if not parts:
        raise InputError(f"factor data {cfg.factor_data} holds no documents")
    return np.concatenate(parts)


def _evaluate(cfg: KfacConfig, loaded: LoadedModel, windows: list, blocks: list) -> dict[str, Any]:
    pad = loaded.tokenizer.pad_token_id
    mem = memorization(loaded.model, windows, pad_id=pad, batch_size=cfg.batch_size,
                       levenshtein_threshold=cfg.levenshtein_threshold)
    return {**mem, "ppl": perplexity(loaded.model, blocks, pad_id=pad, batch_size=cfg.batch_size)}


def _saved_setting(cfg: KfacConfig, results: list[dict[str, Any]]) -> float:
    """--save-rho, else the smallest rho of the save formula whose perplexity rose <= 20 %."""
    if cfg.save_rho is not None:
        return cfg.save_rho
    ok = [r["rho"] for r in results if r["formula"] == cfg.save_formula
          and r["ppl_after"] <= (1 + PPL_LIMIT) * r["ppl_before"]]
    return min(ok) if ok else max(cfg.rhos)


def run(cfg: KfacConfig) -> dict[str, Any] | None:
    torch.manual_seed(cfg.seed)
    upstream_dir = cfg.upstream_dir
    upstream = read_manifest(upstream_dir, what="memorization")
    windows = memorized_windows(upstream_dir)
    if cfg.limit:
        windows = windows[:cfg.limit]
    loaded = load(cfg.model_spec())
    check_same_model(upstream.get("model", {}), loaded)
    n_layers = dims(loaded.model).n_layers
    layers = list(cfg.layers) or list(range(n_layers // 2, n_layers))
    roles = list(cfg.projections) or list(loaded.arch.mlp_in_roles)
    targets = resolve_targets(loaded.model, loaded.arch, layers, roles)
    reused = None
    if cfg.factors_file:
        reused, recorded, modules = load_factors(Path(cfg.factors_file))
        check_same_model(recorded, loaded, f"factors in {cfg.factors_file}")
        missing = [t.name for t in targets if t.name not in reused.A]
        if missing:
            raise InputError(f"{cfg.factors_file} has no factors for {missing}; it holds "
                             f"{', '.join(m['name'] for m in modules)}")
    n_ctx = dims(loaded.model).n_ctx
    blocks = heldout_blocks(cfg.heldout, loaded.tokenizer, n_ctx, cfg.ppl_blocks)
    factor_ids = None if reused else _factor_tokens(cfg, loaded)
    inputs = [{"path": str(upstream_dir), "run_id": upstream["run_id"]}]
    if cfg.factors_file:
        inputs.append({"path": str(cfg.factors_file), "sha256": art.sha256_file(Path(cfg.factors_file))})
    identity = loaded.identity()
    stage = StageRun.for_config(cfg, inputs, model=loaded.results_identity(),
                                    factor_sampling=FACTOR_SAMPLING)
    num_shards, shard_index = (1, 0) if cfg.merge else resolve_shards(cfg.num_shards, cfg.shard_index)
    if reused is not None and (num_shards > 1 or cfg.merge):
        raise InputError("--num-shards/--merge split the factor collection, and with --factors-file there is "
                         "none: run kfac_edit as one job")
    block_len = min(n_ctx, MAX_FACTOR_BLOCK)
    batches = [] if reused else token_blocks(factor_ids, block_len, cfg.factor_tokens, cfg.batch_size)
    if (done := stage.open(cfg.force)) is not None:
        print(format_table(done))
        return done
    shard_sums, n_merged = _finished_shards(cfg, stage.fingerprint) if cfg.merge else (None, 1)
    shard_dir = cfg.stage_dir / art.SHARDS_DIR / f"{shard_index:05d}"
    # the other factor shards write next to this one at the same time
    stage.start(cfg.force, task_dir=shard_dir if num_shards > 1 else None)
    timings: dict[str, float] = {}
    import time

    t0 = time.perf_counter()
    meta = {"factor_data": cfg.factor_data, "seed": cfg.seed, "block_len": block_len}
    if num_shards > 1:
        _collect_shard(cfg, loaded, targets, batches, stage.fingerprint, num_shards, shard_index, shard_dir,
                       identity, meta)
        return None
    if shard_sums is not None:
        factors = shard_sums.to(torch.float32)
        factors.meta = meta
    elif reused is None:
        log.info("collecting K-FAC factors (%s labels) for %d modules on up to %d tokens", cfg.labels,
                 len(targets), cfg.factor_tokens)
        factors = _collect_resumable(cfg, loaded, targets, batches, 0, len(batches), stage.fingerprint,
                                     cfg.stage_dir / art.CHUNKS_DIR, "factors").to(torch.float32)
        factors.meta = meta
    else:
        factors = Factors({t.name: reused.A[t.name] for t in targets}, {t.name: reused.G[t.name] for t in targets},
                          reused.n_tokens, reused.labels, reused.meta)
    factors.save(cfg.stage_dir / FACTORS, identity, targets)
    timings["factors_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    originals = {t.name: weight_of(loaded.model, t).detach().clone() for t in targets}
    bases = {t.name: eigenbasis(originals[t.name], factors.A[t.name], factors.G[t.name], factors.n_tokens,
                                cfg.damping) for t in targets}
    timings["eigh_s"] = time.perf_counter() - t0

    def restore() -> None:
        with torch.no_grad():
            for t in targets:
                weight_of(loaded.model, t).copy_(originals[t.name])

    t0 = time.perf_counter()
    before = _evaluate(cfg, loaded, windows, blocks)
    results = []
    for formula in cfg.formulas:
        for rho in cfg.rhos:
            kept = apply_edit(loaded.model, targets, bases, formula, rho)
            after = _evaluate(cfg, loaded, windows, blocks)
            restore()
            results.append(_result(formula, rho, before, after, kept))
            log.info("%s rho=%.3f: exact %.3f -> %.3f, ppl %.2f -> %.2f", formula, rho, before["exact"],
                     after["exact"], before["ppl"], after["ppl"])
    # Reference point: the edited weights zeroed (the rho -> 0 limit, i.e. deleting the modules).
    with torch.no_grad():
        for t in targets:
            weight_of(loaded.model, t).zero_()
    ablated = _evaluate(cfg, loaded, windows, blocks)
    restore()
    timings["sweep_s"] = time.perf_counter() - t0

    save_rho = _saved_setting(cfg, results)
    kept = apply_edit(loaded.model, targets, bases, cfg.save_formula, save_rho)
    saved_eval = _evaluate(cfg, loaded, windows, blocks)
    deltas = {t.param: (loaded.model.get_submodule(t.name).weight.detach()
                        - (originals[t.name].t() if t.transposed else originals[t.name])).cpu()
              for t in targets}
    art.save_tensors(cfg.stage_dir / DELTAS, deltas, metadata={"formula": cfg.save_formula, "rho": str(save_rho)})
    edited_dir = cfg.stage_dir / EDITED_MODEL
    art.remove_tree(edited_dir)
    loaded.model.save_pretrained(edited_dir)
    loaded.tokenizer.save_pretrained(edited_dir)
    restore()

    summary = {
        "model": identity["name_or_path"], "n_memorized": len(windows), "layers": layers,
        "projections": roles, "modules": [t.name for t in targets],
        "labels": factors.labels, "factor_tokens": factors.n_tokens, "damping": cfg.damping,
        "before": before, "results": results, "ablated": ablated,
        "saved": {"formula": cfg.save_formula, "rho": save_rho, **_result(cfg.save_formula, save_rho, before,
                                                                           saved_eval, kept)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    art.write_json(cfg.stage_dir / art.SUMMARY_JSON, summary)
    rho_curve(summary, cfg.stage_dir / RHO_CURVE)
    outputs = {FACTORS: None, DELTAS: None, art.SUMMARY_JSON: None, RHO_CURVE: None}
    for f in sorted(edited_dir.iterdir()):
        outputs[f"{EDITED_MODEL}/{f.name}"] = None
    stage.finish(outputs, model=identity, seed=cfg.seed, factor_shards=n_merged)
    art.remove_tree(cfg.stage_dir / art.CHUNKS_DIR)
    art.remove_tree(cfg.stage_dir / art.SHARDS_DIR)
    print(format_table(summary))
    return summary


# -- factor shards (a SLURM job array) and resumable collection ------------------------------

def _collect_resumable(cfg: KfacConfig, loaded: LoadedModel, targets: Sequence[Target], batches: list[torch.Tensor],
                       first: int, last: int, fingerprint: str, directory: Path, desc: str) -> Factors:
    """float64 sums over batches[first:last]; the running sums are saved every `chunk_size` batches, so a
    job stopped by SIGTERM resumes from its last save (and adds up exactly as an uninterrupted run)."""
    partial = directory / PARTIAL
    key = {"fingerprint": fingerprint, "first": first, "last": last}
    start, initial = first, None
    if partial.is_file():
        sums, _, _ = load_factors(partial)
        if {k: sums.meta.get(k) for k in key} == key:
            start, initial = sums.meta["next"], sums
            log.info("resuming: %d of %d factor batches already done in %s", start - first, last - first, directory)
        else:
            log.info("discarding partial factor sums of another configuration in %s", directory)
    art.ensure_writable(directory)
    identity = loaded.identity()

    def save(n_done: int, sums: Factors) -> None:
        sums.meta = {**key, "next": start + n_done}
        sums.save(partial, identity, targets)

    first_block = sum(len(b) for b in batches[:start])
    todo = batches[start:last]
    if not todo:
        return initial
    return collect_factors(loaded.model, targets, progress(todo, desc, len(todo)), labels=cfg.labels,
                           seed=cfg.seed, first_block=first_block, initial=initial, checkpoint=save,
                           checkpoint_every=cfg.chunk_size, float64=True)


def _collect_shard(cfg: KfacConfig, loaded: LoadedModel, targets: Sequence[Target], batches: list[torch.Tensor],
                   fingerprint: str, num_shards: int, shard_index: int, shard_dir: Path, identity: dict[str, Any],
                   meta: dict[str, Any]) -> None:
    """One array task: the float64 factor sums of its slice of the batches, then a done marker."""
    marker = shard_dir / SHARD_DONE
    if marker.is_file() and not cfg.force:
        done = json.loads(marker.read_text())
        if (done.get("fingerprint") == fingerprint and done.get("num_shards") == num_shards
                and (done.get("n_tokens") == 0 or (shard_dir / FACTORS).is_file())):
            log.info("factor shard %d/%d is done for this config (%s); nothing to do", shard_index, num_shards,
                     shard_dir)
            return
    marker.unlink(missing_ok=True)
    first, last = shard_bounds(len(batches), num_shards, shard_index)
    entry = {"fingerprint": fingerprint, "num_shards": num_shards, "shard_index": shard_index,
             "batches": [first, last]}
    if last <= first:   # more shards than factor batches: this one has nothing to add
        art.write_json(marker, {**entry, "n_tokens": 0})
        log.info("factor shard %d/%d: no batches (the factor data holds %d); nothing to collect", shard_index,
                 num_shards, len(batches))
        return
    log.info("collecting K-FAC factors (%s labels), shard %d/%d: batches %d..%d of %d", cfg.labels, shard_index,
             num_shards, first, last - 1, len(batches))
    sums = _collect_resumable(cfg, loaded, targets, batches, first, last, fingerprint, shard_dir / art.CHUNKS_DIR,
                              f"factors shard {shard_index}")
    sums.meta = meta
    sums.save(shard_dir / FACTORS, identity, targets)
    art.write_json(marker, {**entry, "n_tokens": sums.n_tokens})
    art.remove_tree(shard_dir / art.CHUNKS_DIR)
    log.info("factor shard %d/%d done (%d tokens); run with --merge once all shards are done", shard_index,
             num_shards, sums.n_tokens)


def _finished_shards(cfg: KfacConfig, fingerprint: str) -> tuple[Factors, int]:
    """The float64 sum of every factor shard, in shard order; InputError unless all are there for this config."""
    shards_dir = cfg.stage_dir / art.SHARDS_DIR
    done = [art.read_json(p) for p in sorted(shards_dir.glob(f"*/{SHARD_DONE}"))]
    if not done:
        raise InputError(f"no finished factor shards in {shards_dir}: run the shard jobs first, then --merge")
    num_shards = cfg.num_shards or done[0]["num_shards"]
    done = [d for d in done if d["num_shards"] == num_shards]
    stale = sorted(d["shard_index"] for d in done if d["fingerprint"] != fingerprint)
    if stale:
        raise InputError(f"factor shards {stale} in {shards_dir} come from another config; re-run the shard "
                         "jobs with this config, then --merge")
    missing = sorted(set(range(num_shards)) - {d["shard_index"] for d in done})
    if missing:
        raise InputError(f"factor shards {missing} of {num_shards} have not finished; re-run them, then --merge")
    total = None
    for d in sorted(done, key=lambda d: d["shard_index"]):
        if d["n_tokens"]:
            sums, _, _ = load_factors(shards_dir / f"{d['shard_index']:05d}" / FACTORS)
            total = sums if total is None else total + sums
    return total, num_shards


def _result(formula: str, rho: float, before: dict[str, Any], after: dict[str, Any],
            kept: dict[str, float]) -> dict[str, Any]:
    return {"formula": formula, "rho": rho,
            "exact_before": before["exact"], "exact_after": after["exact"],
            "loose_before": before["loose_match"], "loose_after": after["loose_match"],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "ppl_ratio": after["ppl"] / before["ppl"],
            "after": {k: v for k, v in after.items() if k != "ppl"}, **kept}


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'formula':<9} {'rho':>6} {'exact':>13} {'loose':>13} {'ppl':>17} {'kept':>7}"]
    for r in summary["results"]:
        lines.append(f"{r['formula']:<9} {r['rho']:>6.3f} {r['exact_before']:>6.3f}>{r['exact_after']:<6.3f} "
                     f"{r['loose_before']:>6.3f}>{r['loose_after']:<6.3f} {r['ppl_before']:>8.2f}>"
                     f"{r['ppl_after']:<8.2f} {r['kept_fraction']:>7.3f}")
    a = summary["ablated"]
    lines.append(f"edited weights zeroed: exact {a['exact']:.3f}, loose {a['loose_match']:.3f}, ppl {a['ppl']:.2f}")
    s = summary["saved"]
    lines.append(f"saved edited_model: {s['formula']} rho={s['rho']} (exact {s['exact_after']:.3f}, "
                 f"ppl {s['ppl_after']:.2f})")
    return "\n".join(lines)


def rho_curve(summary: dict[str, Any], path: Path) -> None:
    """Exact match and perplexity ratio against rho, one line per formula."""
    from memcirc.plots import plt, save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = sorted((r for r in summary["results"] if r["formula"] == formula), key=lambda r: r["rho"])
        rhos = [r["rho"] for r in rows]
        left.plot(rhos, [r["exact_after"] for r in rows], marker="o", label=f"{formula} exact")
        left.plot(rhos, [r["loose_after"] for r in rows], marker="x", ls="--", label=f"{formula} loose")
        right.plot(rhos, [r["ppl_after"] for r in rows], marker="o", label=formula)
    left.axhline(summary["before"]["exact"], color="grey", lw=0.8)
    left.axhline(summary["ablated"]["exact"], color="black", lw=0.8, ls=":", label="weights zeroed")
    left.set_xlabel("rho (fraction of importance kept)")
    left.set_ylabel("memorized windows reproduced")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=8)
    left.set_title(f"{summary['n_memorized']} memorized windows")
    right.axhline(summary["before"]["ppl"], color="grey", lw=0.8, label="before")
    right.axhline(summary["before"]["ppl"] * (1 + PPL_LIMIT), color="grey", lw=0.8, ls=":", label="+20 %")
    right.axhline(summary["ablated"]["ppl"], color="black", lw=0.8, ls=":", label="weights zeroed")
    right.set_xlabel("rho (fraction of importance kept)")
    right.set_ylabel("held-out perplexity")
    right.legend(fontsize=8)
    save_figure(fig, path)
