"""Head scores over training: the units' heads.json merged into tables, role consistency and the
induction circuit's presence per checkpoint (what training_dynamics writes as heads.json and draws).

Roles: a score's role heads at a checkpoint are its TOP_K heads; `role_overlap_final` is the Jaccard of
a checkpoint's role heads with the final checkpoint's (do the same heads play the role all along?).
The induction circuit: the final checkpoint's top induction head I, and the top previous-token head P
in a layer below it; per checkpoint with a circuit, whether the circuit holds the edge P -> I's key
input (the K-composition of Olsson et al.) and any edge out of I.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.dynamics.onsets import jaccard
from memcirc.dynamics.units import HEADS_JSON, unit_dir
from memcirc.errors import InputError
from memcirc.heads.scores import SCORES, top_heads
from memcirc.models import ModelSpec
from memcirc.models.preflight import check_model

log = logging.getLogger(__name__)

TOP_K = 3
ROLE_DEFINITION = (f"role heads: a score's top {TOP_K} heads at a checkpoint; role_overlap_final: their Jaccard "
                   "with the final checkpoint's")
INDUCTION_CIRCUIT_DEFINITION = (
    "induction_head: the final checkpoint's top induction head I; previous_token_head: the top previous-token head "
    "P in a layer below I; per checkpoint: k_composition = the circuit holds the edge P -> I.K, "
    "induction_head_out = it holds an edge out of I")


def head_scores_possible(enabled: bool, final: ModelSpec) -> bool:
    """Head scores run on TransformerLens: for a family it cannot convert they are skipped with a warning,
    so memorization alone still runs there (config.json alone tells; no weights are read)."""
    if not enabled:
        return False
    try:
        check_model(final, needs_tl=True, what="head scores")
    except InputError as e:
        log.warning("%s: skipped (--no-head-scores silences this)", e)
        return False
    return True


def read_unit_heads(stage_dir: Path, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [art.read_json(unit_dir(stage_dir, i) / HEADS_JSON) for i in indices]


def role_heads(tables: dict[str, list[list[float]]]) -> dict[str, list[dict[str, Any]]]:
    return {s: top_heads(tables[s], TOP_K) for s in SCORES if s in tables}


def induction_pair(final: dict[str, list[list[float]]]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(I, P): the top induction head and the top previous-token head in a layer below it (None in layer 0)."""
    ind = top_heads(final["induction"], 1)[0]
    below = [row if layer < ind["layer"] else [float("-inf")] * len(row)
             for layer, row in enumerate(final["previous_token"])]
    prev = top_heads(below, 1)[0] if ind["layer"] > 0 else None
    return (ind["layer"], ind["head_index"]), (prev["layer"], prev["head_index"]) if prev else None


def _induction_edges(edges: set[str] | None, ind: tuple[int, int], prev: tuple[int, int] | None) -> dict[str, Any]:
    if edges is None:
        return {"k_composition": None, "induction_head_out": None}
    src = f"A{ind[0]}.{ind[1]}"
    k_edge = f"A{prev[0]}.{prev[1]}->{src}.K" if prev else None
    return {"k_composition": k_edge in edges if k_edge else False,
            "induction_head_out": any(e.startswith(src + "->") for e in edges)}


def merge_heads(steps: Sequence[int], units: Sequence[dict[str, Any]],
                edge_sets: Sequence[set[str] | None] | None) -> dict[str, Any]:
    """heads.json of the stage: per checkpoint the score tables, role heads and repeated-token loss; the
    role overlap with the final checkpoint; the induction circuit per checkpoint (with circuits)."""
    final = units[-1]["scores"]
    final_roles = {s: {h["head"] for h in hs} for s, hs in role_heads(final).items()}
    ind, prev = induction_pair(final)
    rows = []
    for i, (step, unit) in enumerate(zip(steps, units, strict=True)):
        roles = role_heads(unit["scores"])
        row = {"step": step, "scores": unit["scores"], "repeated_loss": unit["repeated_loss"], "roles": roles,
               "role_overlap_final": {s: jaccard({h["head"] for h in hs}, final_roles[s]) for s, hs in roles.items()},
               "induction_head_score": unit["scores"]["induction"][ind[0]][ind[1]]}
        if edge_sets is not None:
            row |= _induction_edges(edge_sets[i], ind, prev)
        rows.append(row)
    return {"checkpoints": rows, "induction_head": f"L{ind[0]}H{ind[1]}",
            "previous_token_head": f"L{prev[0]}H{prev[1]}" if prev else None,
            "definitions": {**units[-1]["definitions"], "ov_input": units[-1]["ov_input"], "roles": ROLE_DEFINITION,
                            "induction_circuit": INDUCTION_CIRCUIT_DEFINITION}}


def summary_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's head results in summary.json: the top head of each score and the repeated-token loss."""
    return {"top_heads": {s: hs[0] for s, hs in row["roles"].items()},
            "role_overlap_final": row["role_overlap_final"], "repeated_loss": row["repeated_loss"],
            "induction_head_score": row["induction_head_score"],
            **{k: row[k] for k in ("k_composition", "induction_head_out") if k in row}}


HEADS_PNG = "heads_over_training.png"
HEADS_FINAL_PNG = "heads_final.png"
PHASE_PNG = "induction_phase_change.png"


def write_head_outputs(stage_dir: Path, heads: dict[str, Any], summary: dict[str, Any], task: str | None,
                       source: str | None) -> dict[str, int | None]:
    """heads.json and the three head figures; their names for the manifest."""
    from memcirc.heads.figures import head_heatmaps, heads_over_training, phase_change_figure

    rows = heads["checkpoints"]
    steps = [r["step"] for r in rows]
    art.write_json(stage_dir / HEADS_JSON, heads)
    heads_over_training(steps, [r["scores"] for r in rows], stage_dir / HEADS_PNG,
                        title="attention-head component scores over training", source=source)
    head_heatmaps(rows[-1]["scores"], stage_dir / HEADS_FINAL_PNG,
                  title=f"attention-head component scores at the final checkpoint (step {steps[-1]})", source=source)
    faithfulness = [c.get("faithfulness_heldout") for c in summary["checkpoints"]]
    accuracy = [c.get("heldout_accuracy") for c in summary["checkpoints"]]
    phase_change_figure(steps, [r["induction_head_score"] for r in rows],
                        [r["repeated_loss"]["gain"] for r in rows], faithfulness, accuracy, stage_dir / PHASE_PNG,
                        head=heads["induction_head"], circuit_label=f"task {task}" if task else "memorization pairs",
                        edges=[c.get("circuit_edges") for c in summary["checkpoints"]],
                        edges_total=next((c.get("edges_total") for c in summary["checkpoints"]), None),
                        title="induction over training: top induction head, repeated-token loss, circuit",
                        source=source)
    return {HEADS_JSON: None, HEADS_PNG: None, HEADS_FINAL_PNG: None, PHASE_PNG: None}
