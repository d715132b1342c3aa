"""Test-only reference implementations: slow, obviously correct versions the tests compare the
library with. Nothing in memcirc imports this file (tests: `from reference import ...`).
"""

from __future__ import annotations

import math

import torch

# -- memcirc.kfac.edit: component selection ---------------------------------------------------

def select_bruteforce(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Walk every entry in descending order (ties row-major), stop at rho * total: the oracle of
    `select_mask` and `select_product`."""
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
