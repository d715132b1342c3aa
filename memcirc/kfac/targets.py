"""The linear modules the K-FAC edit reads and writes, and their weights as [out, in]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from memcirc.errors import InputError
from memcirc.models.arch import ArchSpec, dims, get_module

EDIT_ROLES = ("mlp_gate", "mlp_in", "mlp_out")   # linear roles the stage edits


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


def check_targets(arch: ArchSpec, n_layers: int, layers: Sequence[int], roles: Sequence[str]) -> None:
    """An unknown role or layer is an InputError that lists the valid ones (needs only the model's
    config: callable before the weights load)."""
    valid_roles = [r for r in EDIT_ROLES if arch.path(r) is not None]
    bad_roles = [r for r in roles if r not in valid_roles]
    if bad_roles:
        raise InputError(f"projections {bad_roles} are not linear MLP modules of this {arch.family} model; "
                         f"valid: {', '.join(valid_roles)}")
    bad_layers = [x for x in layers if not 0 <= x < n_layers]
    if bad_layers:
        raise InputError(f"layers {bad_layers} are not in the model; valid: 0..{n_layers - 1}")
    if not roles:
        raise InputError(f"config key 'projections' is empty; valid: {', '.join(valid_roles)}")


def resolve_targets(model: torch.nn.Module, arch: ArchSpec, layers: Sequence[int],
                    roles: Sequence[str]) -> list[Target]:
    """The modules to edit; an unknown role or layer is an InputError that lists the valid ones."""
    check_targets(arch, dims(model).n_layers, layers, roles)
    targets = []
    for layer in layers:
        for role in roles:
            template = arch.path(role)
            assert template is not None   # every role is in valid_roles, whose paths are set
            name = template.format(layer=layer)
            module = get_module(model, arch, role, layer)
            # nn.Module.__getattr__ is typed Tensor | Module; a linear module's weight is a Parameter
            if not hasattr(module, "weight") or cast(torch.Tensor, module.weight).dim() != 2:
                raise InputError(f"{name} has no 2-D weight; it cannot be edited")
            targets.append(Target(name, role, layer, arch.conv1d_weights))
    return targets


def stored_weight(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """The weight parameter in its own layout ([in, out] for Conv1D)."""
    # nn.Module.__getattr__ is typed Tensor | Module; the target's weight is a Parameter (resolve_targets)
    return cast(torch.Tensor, model.get_submodule(target.name).weight)


def weight_of(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """W as [out, in] (a view for nn.Linear, a transposed view for Conv1D)."""
    w = stored_weight(model, target)
    return w.t() if target.transposed else w
