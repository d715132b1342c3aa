"""K-FAC selection: the vectorized and radix selections equal brute force, the sort and the original
heap (ties in row-major order), and the float32 reconstruction stays within 2e-6 of float64."""

import pytest
import torch
from reference import select_bruteforce

from bench.baselines import select_heap
from memcirc.errors import InputError
from memcirc.kfac.edit import eigenbasis, select_mask, select_product
from memcirc.stages.kfac_edit import KfacConfig


def _random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, generator=g)
    return X @ X.t()


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_selection_equals_brute_force(seed):
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed))
    basis = eigenbasis(W, _random_psd(5, seed), _random_psd(7, seed + 100), n_tokens=3)
    for formula in ("original", "modified"):
        P = basis.importance(formula)
        for rho in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0):
            fast, slow = select_mask(P, rho), select_bruteforce(P, rho)
            assert torch.equal(fast, slow), (formula, rho)
            if rho < 1:   # the smallest prefix: dropping its last element falls short of rho
                kept = P[fast].sort().values
                assert kept.sum() >= rho * P.sum() - 1e-12 and kept[1:].sum() < rho * P.sum()


def test_selection_with_ties_takes_row_major_order():
    """Equal importances: the kept SET size and mass are unique, membership at the boundary is not;
    both implementations break ties in row-major (i, j) order."""
    P = torch.tensor([[4.0, 2.0, 2.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    for rho in (0.3, 0.5, 0.6, 0.75, 0.9):
        assert torch.equal(select_mask(P, rho), select_bruteforce(P, rho))
    # 4 + 2 = 6 >= 0.5 * 12: the first 2 of the three tied at 2.0 in row-major order is (0, 1)
    assert select_mask(P, 0.5).tolist() == [[True, True, False], [False, False, False]]


@pytest.mark.parametrize("seed", range(40))
def test_threshold_search_equals_the_sort(seed):
    """select_product (original formula, no product matrix) == select_mask on lam * mu; with
    integer spectra (many ties at the boundary value) too."""
    g = torch.Generator().manual_seed(seed)
    n, m = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    if seed % 2:
        lam = torch.rand(n, generator=g, dtype=torch.float64)
        mu = torch.rand(m, generator=g, dtype=torch.float64)
        mu[torch.rand(m, generator=g) < 0.2] = 0.0     # clamped eigenvalues
    else:
        lam = torch.randint(1, 4, (n,), generator=g).double()
        mu = torch.randint(0, 4, (m,), generator=g).double()
        mu[0] = 1.0
    lam, mu = lam.sort(descending=True).values, mu.sort(descending=True).values
    for rho in (0.01, 0.2, 0.5, 0.6, 0.9, 0.999, 1.0):
        assert torch.equal(select_product(lam, mu, rho), select_mask(lam[:, None] * mu[None, :], rho)), rho


def test_heap_baseline_selects_the_same_set():
    """bench_kfac_select.py times the original's heap (bench/baselines.py) against select_product."""
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(30, generator=g, dtype=torch.float64).sort(descending=True).values
    mu = torch.rand(40, generator=g, dtype=torch.float64).sort(descending=True).values
    for rho in (0.2, 0.6, 0.95):
        mask = select_product(lam, mu, rho)
        assert set(map(tuple, mask.nonzero().tolist())) == select_heap(lam, mu, rho)


def test_rho_outside_unit_interval_is_refused():
    with pytest.raises(InputError):
        select_mask(torch.ones(2, 2), 0.0)
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(InputError, match="rho"):
            KfacConfig(rhos=[float(bad)])


def _importances(kind, n, m, g):
    if kind == 0:
        return torch.rand(n, m, generator=g, dtype=torch.float64)
    if kind == 1:   # integers: heavy ties at the boundary, zeros
        return torch.randint(0, 4, (n, m), generator=g).double()
    if kind == 2:   # lognormal with zeros
        P = torch.randn(n, m, generator=g, dtype=torch.float64).mul(3).exp()
        P[torch.rand(n, m, generator=g) < 0.3] = 0.0
        return P
    if kind == 3:   # one repeated value
        return torch.full((n, m), 0.1, dtype=torch.float64)
    if kind == 4:   # tiny values (subnormal range)
        return torch.randn(n, m, generator=g, dtype=torch.float64).square() * 1e-300
    lam = torch.rand(n, generator=g, dtype=torch.float64)   # the modified formula's shape
    mu = torch.rand(m, generator=g, dtype=torch.float64)
    return lam[:, None] * mu * torch.randn(n, m, generator=g).double().square()


@pytest.mark.parametrize("small", [0, 4096])
@pytest.mark.parametrize("seed", range(24))
def test_radix_select_equals_the_sort(seed, small, monkeypatch):
    """select_modified (the modified formula, no sort) == select_mask, ties in row-major order; with
    `_SMALL` = 0 every digit of the radix select runs (not only the residual's sort)."""
    import memcirc.kfac.select as select

    monkeypatch.setattr(select, "_SMALL", small)
    g = torch.Generator().manual_seed(seed)
    n, m = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 80, (1,), generator=g))
    P = _importances(seed % 6, n, m, g)
    for rho in (1e-9, 0.01, 0.2, 0.5, 0.6, 0.9, 0.999, 1.0):
        assert torch.equal(select.select_modified(P, rho), select_mask(P, rho)), rho


def test_radix_select_edge_cases():
    """All zero (the sort keeps the first entry), -0.0, negative and non-finite importances (the sort)."""
    from memcirc.kfac.select import select_modified

    cases = [torch.zeros(3, 4, dtype=torch.float64), torch.tensor([[-0.0, 1.0, 2.0, 0.0]], dtype=torch.float64),
             torch.tensor([[-1.0, 3.0, 2.0]], dtype=torch.float64), torch.tensor([[1.0, float("inf"), 2.0]])]
    for P in cases:
        for rho in (0.3, 0.7):
            assert torch.equal(select_modified(P, rho), select_mask(P, rho)), (P, rho)


def test_radix_select_on_a_large_layer_equals_the_sort():
    """A 512 x 2048 modified-formula importance: several digits and a large residual before the sort."""
    from memcirc.kfac.select import select_modified

    g = torch.Generator().manual_seed(0)
    lam = torch.randn(512, generator=g, dtype=torch.float64).mul(2).exp()
    mu = torch.randn(2048, generator=g, dtype=torch.float64).mul(2).exp()
    P = lam[:, None] * mu[None, :] * torch.randn(512, 2048, generator=g, dtype=torch.float64).square()
    for rho in (0.1, 0.6, 0.95):
        assert torch.equal(select_modified(P, rho), select_mask(P, rho)), rho


@pytest.mark.parametrize("shape", [(256, 1024), (512, 128), (128, 512)])   # random, and testbed sizes
def test_float32_reconstruction_is_within_1e6_of_float64(shape):
    """Eigenbasis.weight (float32 products) vs weight64 (float64), kept sets chosen on the float64 C:
    the relative max error is < 2e-6 of max |W| for both formulas and every rho."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    X, Y = torch.randn(4 * d_in, d_in, generator=g), torch.randn(4 * d_out, d_out, generator=g)
    basis = eigenbasis(W, X.t() @ X, Y.t() @ Y, n_tokens=4 * d_in)
    for formula in ("original", "modified"):
        P = basis.importance(formula)
        for rho in (0.1, 0.6, 0.9, 1.0):
            mask = select_mask(P, rho)
            exact = basis.weight64(mask)
            err = float((basis.weight(mask).double() - exact).abs().max()) / float(W.abs().max())
            assert err < 2e-6, (formula, rho, err)
