"""Prune scores on disk (safetensors with provenance metadata) and a circuit's edges as JSON rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from memcirc import artifacts as art
from memcirc.circuits.graph import EdgeGraph
from memcirc.errors import InputError

PRUNE_SCORES = "prune_scores.safetensors"
CIRCUIT_JSON = "circuit.json"
PRUNE_SCORES_FORMAT = "memcirc prune scores v1"   # the `format` metadata of every prune_scores file
RANKING = "|score| descending, ties in the graph's edge order"


def save_prune_scores(path: Path, graph: EdgeGraph, scores: torch.Tensor, metadata: dict[str, Any]) -> None:
    """One float32 tensor per destination module (its auto-circuit module name); metadata as strings."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    art.save_tensors(path, graph.unflatten(scores), metadata=meta)


def load_prune_scores(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a prune_scores.safetensors; InputError if missing or unreadable."""
    if not Path(path).is_file():
        raise InputError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from None


def circuit_edges(graph: EdgeGraph, scores: torch.Tensor, ranking: torch.Tensor,
                  k: int) -> list[dict[str, Any]]:
    """The top-k edges of `ranking` as JSON rows (rank, names, score, module, index, layers)."""
    modules = np.searchsorted(np.asarray(graph.offsets), np.arange(graph.n_edges), side="right") - 1
    rows = []
    for rank, i in enumerate(ranking[:k].tolist(), 1):
        m = int(modules[i])
        rows.append({"rank": rank, "edge": graph.edge_names[i], "src": graph.edge_src[i],
                     "dest": graph.edge_dest[i], "score": float(scores[i]), "module": graph.modules[m],
                     "index": i - graph.offsets[m], "src_layer": graph.edge_layers[i][0],
                     "dest_layer": graph.edge_layers[i][1]})
    return rows
