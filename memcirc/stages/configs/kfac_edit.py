r"""Edit memorization out of a model with K-FAC (the kfac_edit stage of the memcirc pipeline).

Reads <output-dir>/memorization/ (the memorized windows) and writes <output-dir>/kfac/:
factors.safetensors (K-FAC sums with token count and model provenance), summary.json (one entry
per formula and rho: exact / loose match and held-out perplexity before and after), deltas.safetensors
(weight changes of the saved setting), edited_model/ (from_pretrained folder), rho_curve.png,
manifest.json (last).

examples:
  python kfac_edit.py --config configs/testbed.yaml --output-dir runs/testbed
  python kfac_edit.py --output-dir runs/testbed --layers 2 3 --projections mlp_in --rhos 0.9 0.6
  python kfac_edit.py --output-dir runs/b --factors-file runs/a/kfac/factors.safetensors
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.kfac.choices import FORMULAS, LABELS
from memcirc.option_groups import HeldoutEval, LmEval, Sharding


@dataclass
class KfacConfig(HeldoutEval, LmEval, Sharding, StageConfig):
    """kfac_edit: K-FAC factors, eigenbasis edit keeping a fraction rho of importance, before/after."""

    stage: ClassVar[str] = "kfac_edit"

    layers: list[int] = option([], "blocks to edit (default: the second half of the model)")
    projections: list[str] = option([], "arch roles of the linear modules to edit (mlp_in, mlp_out, "
                                    "mlp_gate for gated MLPs; default: the MLP input projections, "
                                    "gate and up where gated, as the paper)")
    labels: str = option("sampled", "gradient labels: sampled from the model (true Fisher) or the data",
                         choices=LABELS)
    factor_tokens: int | None = option(None, "factor-token budget, collected exactly (default: max(32 x the "
                                       "widest edited factor, 200,000); memcirc/kfac/budget.py)", minimum=1)
    factor_data: str = option("testbed", "text the factors are collected on ('testbed': the training "
                              "corpus slice)")
    rhos: list[float] = option([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "fractions of importance to keep",
                               within="(0, 1]")
    formulas: list[str] = option(["original", "modified"], "importance: original = lambda*mu, "
                                 "modified = lambda*mu*|C|^2", choices=FORMULAS)
    # >= 0: the edit ranks components by products of the (clamped >= 0) eigenvalues and never inverts
    # them, so 0 is well defined; a negative damping would make importances negative.
    damping: float = option(0.0, "added to both factors' eigenvalues", within="[0, inf)")
    save_rho: float | None = option(None, "save the edited model folder at this rho (default: the "
                                    "smallest rho whose perplexity rise is <= 20%)",
                                    within="(0, 1]")
    save_formula: str = option("original", "formula of the saved edited model", choices=FORMULAS)
    save_model: bool = option(True, "write edited_model/ (the saved setting as a from_pretrained folder, "
                              "with a model card README.md); --no-save-model: deltas.safetensors only")
    # not hashed: a run without --stress keeps the fingerprint it had before the option existed; the
    # stage adds the stress plan to the fingerprint when it is on (a toggle is a changed run)
    stress: bool = option(False, "after the saved edit, measure memorization under prefix perturbations (shifted "
                          "windows, longer/shorter prefixes, substituted/dropped tokens, prepended text) before "
                          "and after: a 'stress' block in summary.json and stress.png (memcirc/stress.py)",
                          hashed=False)
    factors_file: str | None = option(None, "reuse factors.safetensors of a previous kfac run (same model "
                                      "and modules) instead of collecting them")
    batch_size: int = option(32, "sequences per forward/backward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    chunk_size: int = option(16, "factor batches between resumable saves of the running sums", minimum=1,
                             hashed=False)


Config = KfacConfig
