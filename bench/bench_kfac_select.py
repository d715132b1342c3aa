#!/usr/bin/env python3
"""Benchmark: K-FAC component selection, ours vs the original code's heap, on a 2048 x 8192 layer.

Ours (`memcirc.kfac.edit.select_product`, the `original` formula): bisection over the boundary value
of λ_i μ_j with one vectorized `searchsorted` per step, then the kept mask. Baseline: the
selection of goodfire-ai/memorization_kfac (KFACTreatmentPairwise.apply_kfac_by_product): a lazy
k-way merge over λ_i μ_j with a max-heap seeded at (0, 0), pushing (i+1, j) and (i, j+1), a `seen`
set and `.item()` per element on torch tensors, until the mass reaches ρ (Σλ)(Σμ)
(`bench/baselines.py select_heap`).

Both produce the dense 0/1 mask (the original builds it from the heap's pairs); the heap
always runs in full, no extrapolation. The heap's cost grows with the number of kept pairs K
(O(K log K) Python steps), ours with the layer size (the mask is N = d_out * d_in booleans), so
the ratio depends on the spectra and ρ: a grid of cases is timed.

Spectra (random PSD): `lognormal` exp(2 z) eigenvalues, a heavy top as real K-FAC factors have
(few pairs hold most of the mass: the heap's best case); `wishart` Marchenko-Pastur eigenvalues
of a Gaussian sample covariance (flat: many pairs kept).

Second part, "modified selection vs full sort": the `modified` formula's importance λ_i μ_j C_ij²
(C Gaussian, the spectra as above) selected by `select_modified` (radix select over the bit
patterns) against `select_mask` (the full float64 sort it replaces), CPU time, interleaved, best of
`--repeats`; `same_kept_set`: the two masks are equal.

The last line printed is a JSON object: ours_s, baseline_s, ratio (baseline / ours) of the WORST
case of the grid, same (every case: ours == heap == full sort), the whole grid, and `modified`
(its worst ratio, same_kept_set, its cases).

  OMP_NUM_THREADS=1 python bench/bench_kfac_select.py
  OMP_NUM_THREADS=1 python bench/bench_kfac_select.py --cases lognormal:0.6 --modified wishart:0.6
  OMP_NUM_THREADS=1 python bench/bench_kfac_select.py --cases    # the modified cases alone
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from baselines import select_heap  # bench/baselines.py

from memcirc.kfac.edit import Eigenbasis, select_mask, select_modified, select_product


def spectra(kind: str, d_out: int, d_in: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ of G [d_out], μ of A [d_in]), descending. `lognormal`: exp(2 z), a heavy top like real
    K-FAC factors; `wishart`: Marchenko-Pastur, the eigenvalues of X Xᵀ / n for a Gaussian
    X [d_in, 4 d_in] (for d_out their quantiles, interpolated)."""
    if kind == "lognormal":
        lam = torch.randn(d_out, generator=g, dtype=torch.float64).mul(2.0).exp()
        mu = torch.randn(d_in, generator=g, dtype=torch.float64).mul(2.0).exp()
    else:
        X = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
        mu = torch.linalg.eigvalsh(X @ X.t() / (4 * d_in)).clamp_min(0)
        q = torch.linspace(0, 1, d_out, dtype=torch.float64) * (d_in - 1)
        lo = q.floor().long().clamp_max(d_in - 2)
        lam = mu[lo] + (q - lo) * (mu[lo + 1] - mu[lo])
    return lam.sort(descending=True).values, mu.sort(descending=True).values


def to_mask(pairs: set, shape: tuple[int, int]) -> torch.Tensor:
    """The original then builds the 0/1 mask from the selected pairs."""
    mask = torch.zeros(shape, dtype=torch.bool)
    idx = torch.tensor(sorted(pairs), dtype=torch.long)
    mask[idx[:, 0], idx[:, 1]] = True
    return mask


def one(kind: str, rho: float, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    lam, mu = spectra(kind, args.d_out, args.d_in, g)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        mask = select_product(lam, mu, rho)
        times.append(time.perf_counter() - start)
    ours_s = min(times)
    kept = int(mask.sum())
    start = time.perf_counter()
    sort_same = torch.equal(select_mask(lam[:, None] * mu[None, :], rho), mask)
    sort_s = time.perf_counter() - start
    start = time.perf_counter()
    heap_mask = to_mask(select_heap(lam, mu, rho), (mask.shape[0], mask.shape[1]))
    baseline_s = time.perf_counter() - start
    same = torch.equal(heap_mask, mask)
    print(f"{kind:>9} rho={rho}: kept {kept} of {mask.numel()} ({kept / mask.numel():.2%}); ours {ours_s:.4f} s, "
          f"full sort {sort_s:.2f} s (same {sort_same}), heap {baseline_s:.2f} s (same {same}), "
          f"ratio {baseline_s / ours_s:.1f}", flush=True)
    return {"spectra": kind, "rho": rho, "kept": kept, "ours_s": round(ours_s, 5), "baseline_s": round(baseline_s, 3),
            "ratio": round(baseline_s / ours_s, 1), "same": bool(same and sort_same), "full_sort_s": round(sort_s, 3)}


def modified(kind: str, rho: float, args: argparse.Namespace) -> dict:
    """select_modified vs the full sort on λ_i μ_j C_ij², CPU seconds, interleaved, best of repeats."""
    g = torch.Generator().manual_seed(1)
    lam, mu = spectra(kind, args.d_out, args.d_in, g)
    P = lam[:, None] * mu[None, :] * torch.randn(args.d_out, args.d_in, generator=g, dtype=torch.float64).square()
    ours, sort = [], []
    same = True
    for _ in range(args.repeats):
        start = time.process_time()
        mask = select_modified(P, rho)
        ours.append(time.process_time() - start)
        start = time.process_time()
        ref = select_mask(P, rho)
        sort.append(time.process_time() - start)
        same = same and torch.equal(mask, ref)
    ours_s, sort_s = min(ours), min(sort)
    print(f"modified {kind:>9} rho={rho}: kept {int(mask.sum())}; radix select {ours_s:.4f} s, full sort "
          f"{sort_s:.2f} s, ratio {sort_s / ours_s:.1f}, same kept set {same}", flush=True)
    return {"spectra": kind, "rho": rho, "kept": int(mask.sum()), "ours_s": round(ours_s, 4),
            "full_sort_s": round(sort_s, 3), "ratio": round(sort_s / ours_s, 1), "same_kept_set": bool(same)}


def reconstruction(args: argparse.Namespace) -> dict:
    """U_G (C ⊙ M) U_Aᵀ in float64 (the old Eigenbasis.weight) vs float32 (the new), CPU seconds,
    interleaved, best of repeats; random factors of the layer's shape (the cost does not depend on
    their values), max_rel_err: the float32 result's max error over max |W|."""
    d_out, d_in = args.recon_shape
    g = torch.Generator().manual_seed(2)
    U_G = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    U_A = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    C = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    M = torch.rand(d_out, d_in, generator=g) < 0.5
    basis = Eigenbasis(torch.ones(d_out), U_G, torch.ones(d_in), U_A, C)
    t64, t32 = [], []
    for _ in range(args.repeats):
        start = time.process_time()
        exact = basis.weight64(M)
        t64.append(time.process_time() - start)
        start = time.process_time()
        fast = basis.weight(M)
        t32.append(time.process_time() - start)
    err = float((fast.double() - exact).abs().max() / exact.abs().max())
    print(f"reconstruction {d_out}x{d_in}: float64 {min(t64):.3f} s, float32 {min(t32):.3f} s, "
          f"ratio {min(t64) / min(t32):.2f}, max rel err {err:.2e}", flush=True)
    return {"case": "reconstruction float64 vs float32", "shape": [d_out, d_in], "float64_s": round(min(t64), 3),
            "float32_s": round(min(t32), 3), "ratio": round(min(t64) / min(t32), 2), "max_rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "K-FAC selection").splitlines()[0])
    ap.add_argument("--d-out", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--cases", nargs="*", default=["lognormal:0.6", "lognormal:0.9", "wishart:0.6"],
                    help="spectra:rho pairs; the heap always runs in full")
    ap.add_argument("--modified", nargs="*", default=["lognormal:0.6", "lognormal:0.9", "wishart:0.6"],
                    help="spectra:rho pairs of the modified-formula case (radix select vs full sort)")
    ap.add_argument("--recon-shape", type=int, nargs=2, default=[4096, 1024], metavar=("D_OUT", "D_IN"),
                    help="layer of the reconstruction case (float64 vs float32); 0 0 skips it")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    grid = [one(c.split(":")[0], float(c.split(":")[1]), args) for c in args.cases]
    mod = [modified(c.split(":")[0], float(c.split(":")[1]), args) for c in args.modified]
    out: dict = {"shape": [args.d_out, args.d_in]}
    if grid:
        worst = min(grid, key=lambda r: r["ratio"])
        out |= {"ours_s": worst["ours_s"], "baseline_s": worst["baseline_s"], "ratio": worst["ratio"],
                "same": all(r["same"] for r in grid), "ratio_is": "the worst case of the grid", "grid": grid}
    if mod:
        worst_mod = min(mod, key=lambda r: r["ratio"])
        out["modified"] = {"case": "modified selection vs full sort", "ours_s": worst_mod["ours_s"],
                           "full_sort_s": worst_mod["full_sort_s"], "ratio": worst_mod["ratio"],
                           "same_kept_set": all(r["same_kept_set"] for r in mod),
                           "ratio_is": "the worst case", "bound": 50, "cases": mod}
    if args.recon_shape[0] > 0:
        out["reconstruction"] = reconstruction(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
