"""auto-circuit's factorized edge graph of a model, with one fixed edge order, and the pair batches.

The graph is auto-circuit's factorized residual graph of a TransformerLens model
(`patchable_model(factorized=True, slice_output="last_seq", separate_qkv=True, seq_len=None)`):
sources are the embedding ("Resid Start"), every attention head and every MLP; destinations are the
Q, K and V input of every head, every MLP input and the final residual ("Resid End"). An edge is
patched at every token position at once; only the last position's logits are read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memcirc.errors import InputError
from memcirc.models import LoadedModel
from memcirc.pairs import Pair

if TYPE_CHECKING:  # auto-circuit and TransformerLens take seconds to import: imported where used
    from auto_circuit.data import PromptPairBatch
    from auto_circuit.utils.patchable_model import PatchableModel

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# -- pairs -------------------------------------------------------------------------------------

def make_batches(pairs: Sequence[Pair], batch_size: int, device: torch.device | str) -> list[PromptPairBatch]:
    """auto-circuit batches of at most `batch_size` pairs, each holding prompts of ONE length.

    Pairs are grouped by prompt length (in file order within a length), so no prompt is padded and
    no attention mask is needed; every pair is used (no `drop_last`). Batch keys are 0, 1, 2, ...
    """
    from auto_circuit.data import PromptPairBatch

    by_len: dict[int, list[Pair]] = {}
    for p in pairs:
        by_len.setdefault(len(p.clean), []).append(p)
    batches = []
    for length in sorted(by_len):
        group = by_len[length]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            clean = torch.tensor([p.clean for p in chunk], dtype=torch.long, device=device)
            corrupt = torch.tensor([p.corrupt for p in chunk], dtype=torch.long, device=device)
            answers, wrong = _answer_tensors(chunk, device)
            diverge = int((clean != corrupt).int().argmax(dim=1).min())
            batches.append(PromptPairBatch(len(batches), diverge, clean, corrupt, answers, wrong))
    return batches


def _answer_tensors(chunk: Sequence[Pair], device: torch.device | str) -> tuple[Any, Any]:
    """[b, 1] long tensors of answer and wrong; with answer sets (a task's), one tensor per pair each
    (auto-circuit's `list[Tensor]` form: the sets differ in size)."""
    if all(len(p.answers) == 1 and len(p.wrongs) == 1 for p in chunk):
        return (torch.tensor([[p.answer] for p in chunk], dtype=torch.long, device=device),
                torch.tensor([[p.wrong] for p in chunk], dtype=torch.long, device=device))
    return ([torch.tensor(p.answers, dtype=torch.long, device=device) for p in chunk],
            [torch.tensor(p.wrongs, dtype=torch.long, device=device) for p in chunk])


def n_pairs(batches: Sequence[PromptPairBatch]) -> int:
    return sum(int(b.clean.shape[0]) for b in batches)


def answer_values(values: torch.Tensor, batch: PromptPairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(v[answer], v[wrong]) per pair from last-position values [b, vocab]: a pair with answer sets
    (greater-than's years) gets the SUM over its set (of probabilities, the task's metric: P(answers))."""
    answers, wrongs = batch.answers, batch.wrong_answers
    if isinstance(answers, torch.Tensor) and isinstance(wrongs, torch.Tensor):
        return values.gather(-1, answers).squeeze(-1), values.gather(-1, wrongs).squeeze(-1)
    return (torch.stack([values[i, a].sum() for i, a in enumerate(answers)]),
            torch.stack([values[i, w].sum() for i, w in enumerate(wrongs)]))


# -- the edge graph ----------------------------------------------------------------------------

@dataclass
class EdgeGraph:
    """auto-circuit's patchable model plus one fixed order of its edges.

    Edge i of the flat order is element `i - offsets[j]` (row-major) of the mask of destination
    module `modules[j]`; modules are ordered by (layer, name). Prune scores, rankings and circuits
    are flat vectors in this order.
    """

    pm: PatchableModel
    modules: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    edge_names: list[str]
    edge_src: list[str]
    edge_dest: list[str]
    edge_layers: list[tuple[int, int]]
    wrappers: dict[str, Any] = field(repr=False)

    @property
    def n_edges(self) -> int:
        return len(self.edge_names)

    @property
    def device(self) -> torch.device:
        return next(iter(self.wrappers.values())).patch_mask.device

    def flatten(self, per_module: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([per_module[m].detach().reshape(-1).float().cpu() for m in self.modules])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: flat[o:o + math.prod(s)].reshape(s).clone()
                for m, s, o in zip(self.modules, self.shapes, self.offsets, strict=True)}

    def check_scores(self, scores: dict[str, torch.Tensor], what: str) -> None:
        """InputError unless `scores` has exactly this graph's modules and mask shapes."""
        expected = dict(zip(self.modules, self.shapes, strict=True))
        got = {k: tuple(v.shape) for k, v in scores.items()}
        if got != expected:
            wrong = sorted(set(expected) ^ set(got)) or [m for m in self.modules if got[m] != expected[m]]
            detail = ", ".join(f"{m}: {got.get(m)} vs {expected.get(m)}" for m in wrong[:3])
            raise InputError(f"{what} do not fit this model's graph ({self.n_edges} edges; {detail}): they "
                             "were computed for another model; re-run find_circuits")

    def set_ablated(self, ablated: torch.Tensor) -> None:
        """Set every mask: 1.0 = the edge carries its ablated value, 0.0 = its clean value."""
        with torch.no_grad():
            for m, s, o in zip(self.modules, self.shapes, self.offsets, strict=True):
                mask = self.wrappers[m].patch_mask
                mask.data.copy_(ablated[o:o + math.prod(s)].reshape(s).to(mask.device, mask.dtype))


def build_graph(loaded: LoadedModel, weight_processing: str = "none") -> EdgeGraph:
    """Convert to a HookedTransformer offline and wrap it in auto-circuit's factorized graph."""
    from auto_circuit.utils.graph_utils import patchable_model

    from memcirc.models.tl import to_hooked_transformer

    tl = to_hooked_transformer(loaded, weight_processing)
    # Prompts are never padded. TL infers an attention mask from pad ids when the tokenizer pads on
    # the left, which would mask genuine pad-id tokens (pad = eos = bos in GPT-NeoX and GPT-Neo).
    if tl.tokenizer is not None:
        tl.tokenizer.padding_side = "right"
    pm = patchable_model(tl, factorized=True, slice_output="last_seq", seq_len=None, separate_qkv=True,
                         device=loaded.device)
    wrappers = {w.module_name: w for w in pm.dest_wrappers}
    layer_of: dict[str, int] = {}
    for d in pm.dests:
        layer_of[d.module_name] = min(layer_of.get(d.module_name, d.layer), d.layer)
    modules = sorted(wrappers, key=lambda m: (layer_of[m], m))
    for m in modules:
        if not _SAFE_NAME.match(m):
            raise InputError(f"unexpected destination module name {m!r} in the auto-circuit graph")
    shapes = [tuple(wrappers[m].patch_mask.shape) for m in modules]
    offsets = list(np.cumsum([0] + [math.prod(s) for s in shapes[:-1]]).tolist())
    n = sum(math.prod(s) for s in shapes)
    names: list[str | None] = [None] * n
    src: list[str] = [""] * n
    dest: list[str] = [""] * n
    layers: list[tuple[int, int]] = [(0, 0)] * n
    where = {m: (o, s) for m, o, s in zip(modules, offsets, shapes, strict=True)}
    for edge in pm.edges:
        o, s = where[edge.dest.module_name]
        i = o + int(np.ravel_multi_index(edge.patch_idx, s))
        names[i], src[i], dest[i] = edge.name, edge.src.name, edge.dest.name
        layers[i] = (edge.src.layer, edge.dest.layer)
    if any(x is None for x in names) or len(pm.edges) != n:
        raise RuntimeError("auto-circuit's edges do not match its masks")
    return EdgeGraph(pm, modules, shapes, offsets, names, src, dest, layers, wrappers)  # type: ignore[arg-type]
