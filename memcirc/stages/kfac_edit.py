"""The kfac_edit stage: its config and orchestration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from memcirc.config import HeldoutEval, Sharding, StageConfig, option
from memcirc.errors import InputError


@dataclass
class KfacConfig(HeldoutEval, Sharding, StageConfig):
    """kfac_edit: K-FAC factors, eigenbasis edit keeping a fraction rho of importance, before/after."""

    stage: ClassVar[str] = "kfac_edit"

    layers: list[int] = option([], "blocks to edit (default: the second half of the model)")
    projections: list[str] = option([], "arch roles of the linear modules to edit (mlp_in, mlp_out, "
                                    "mlp_gate for gated MLPs; default: the MLP input projections, "
                                    "gate and up where gated, as the paper)")
    labels: str = option("sampled", "gradient labels: sampled from the model (true Fisher) or the data",
                         choices=("sampled", "data"))
    factor_tokens: int = option(200_000, "token budget for collecting the factors", minimum=1)
    factor_data: str = option("testbed", "text the factors are collected on ('testbed': the training "
                              "corpus slice)")
    rhos: list[float] = option([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "fractions of importance to keep")
    formulas: list[str] = option(["original", "modified"], "importance: original = lambda*mu, "
                                 "modified = lambda*mu*|C|^2", choices=("original", "modified"))
    damping: float = option(0.0, "added to both factors' eigenvalues")
    save_rho: float | None = option(None, "save the edited model folder at this rho (default: the "
                                    "smallest rho whose perplexity rise is <= 20%)")
    save_formula: str = option("original", "formula of the saved edited model", choices=("original", "modified"))
    factors_file: str | None = option(None, "reuse factors.safetensors of a previous kfac run (same model "
                                      "and modules) instead of collecting them")
    batch_size: int = option(32, "sequences per forward/backward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    chunk_size: int = option(16, "factor batches between resumable saves of the running sums", minimum=1,
                             hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [r for r in self.rhos if not 0.0 < r <= 1.0]
        if bad or (self.save_rho is not None and not 0.0 < self.save_rho <= 1.0):
            raise InputError(f"config key 'rhos' must lie in (0, 1], got {bad or [self.save_rho]}")


Config = KfacConfig


def run(cfg: KfacConfig) -> Any:
    from memcirc.kfac import run as _run  # the orchestrator moves here

    return _run(cfg)


def headline(summary: dict[str, Any], _stage_dir: Path) -> str:
    """The stage's lines in the run report: one per importance formula."""
    lines = []
    for formula in dict.fromkeys(r["formula"] for r in summary["results"]):
        rows = [r for r in summary["results"] if r["formula"] == formula]
        curve = ", ".join(f"{r['rho']}: {r['exact_after']:.2f}/{r['ppl_after']:.1f}" for r in rows)
        lines.append(f"K-FAC edit ({formula}): before exact {rows[0]['exact_before']:.2f}, ppl "
                     f"{rows[0]['ppl_before']:.1f}; rho exact/ppl {curve}")
    return "\n".join(lines)
