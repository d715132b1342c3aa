"""Attention bypass, the library behind the attention_bypass stage: per-block attention interventions
and the sweep that measures memorization of the memorized windows against general ability
(held-out perplexity, optional lm-eval tasks).

`self` is llm-memorization's "short-circuiting" (arXiv 2501.05078): the attention pattern of the
block is the identity, so the attention output at position t is out_proj(v_t) — per query head the
value of the token itself (for GQA its kv head), biases kept. Pre-attention norm, MLP and residual
(parallel or sequential) are untouched. `zero` zeroes the attention output, `mean` replaces it by its
mean over a reference set (the held-out blocks, measured on the unmodified model).

The intervention is a forward hook on the attention module that replaces only the hidden-state
element of the returned tuple, recomputed from the module's own projections of its input. It does
not depend on the attention implementation (eager, sdpa, flash) and holds during cached generation
(each new position's output depends on that position's input only; the KV cache is still filled
by the original module, and nothing reads it in a bypassed block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc.benchmarks import Benchmarks, evaluate
from memcirc.data import Columns, Window, load_documents
from memcirc.errors import InputError
from memcirc.evaluation import forward_rows, memorization, perplexity
from memcirc.logs import progress
from memcirc.models.arch import ArchSpec, d_model, dims, get_module, n_layers
from memcirc.scoring import pad_batch

MODES = ("self", "zero", "mean")
METRICS = ("exact", "token_match", "levenshtein")


# -- the intervention ------------------------------------------------------------------------

def self_attention_output(model: torch.nn.Module, arch: ArchSpec, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The attention output of block `layer` when every token attends only to itself:
    out_proj(concat_h v_{kv(h)}(hidden)), from the module's own projections (biases kept)."""
    d = dims(model)
    if arch.attn_qkv:
        fused = get_module(model, arch, "attn_qkv", layer)(hidden)
        if arch.qkv_interleaved:  # per head [q | k | v] (GPT-NeoX)
            value = fused.view(*hidden.shape[:-1], d.n_heads, 3 * d.d_head)[..., 2 * d.d_head:]
        else:                     # [all q | all k | all v] (GPT-2)
            q, kv = d.n_heads * d.d_head, d.n_kv_heads * d.d_head
            value = fused[..., q + kv:q + 2 * kv].reshape(*hidden.shape[:-1], d.n_kv_heads, d.d_head)
    else:
        value = get_module(model, arch, "attn_v", layer)(hidden)
        value = value.view(*hidden.shape[:-1], d.n_kv_heads, d.d_head)
    if value.shape[-2] != d.n_heads:  # GQA: query head h reads kv head h // (n_heads / n_kv_heads)
        value = value.repeat_interleave(d.n_heads // value.shape[-2], dim=-2)
    return get_module(model, arch, "attn_out", layer)(value.reshape(*hidden.shape[:-1], d.n_heads * d.d_head))


def _replace_hidden(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new.to(output[0].dtype),) + tuple(output[1:])
    return new.to(output.dtype)


def _hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def bypass_attention(model: torch.nn.Module, arch: ArchSpec, layers: Sequence[int], mode: str = "self",
                     mean_outputs: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, the attention of every block in `layers` is bypassed (`mode`: self, zero,
    mean; mean needs `mean_outputs[layer]`, a [d_model] vector, e.g. from `mean_attention_outputs`).
    The hooks are removed on exit, whatever happens: the model is unchanged afterwards."""
    if mode not in MODES:
        raise InputError(f"bypass mode must be one of {', '.join(MODES)}, got {mode!r}")
    n = n_layers(model)
    bad = [i for i in layers if not 0 <= int(i) < n]
    if bad:
        raise InputError(f"blocks {bad} are outside the model (blocks 0..{n - 1})")
    if mode == "mean" and (mean_outputs is None or any(int(i) not in mean_outputs for i in layers)):
        raise InputError("mode 'mean' needs the mean attention output of every bypassed block")

    def hook_for(layer: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            current = _hidden_of(output)
            if mode == "zero":
                return _replace_hidden(output, torch.zeros_like(current))
            if mode == "mean":
                assert mean_outputs is not None, "checked above: mode 'mean' has mean outputs"
                mean = mean_outputs[layer].to(device=current.device, dtype=current.dtype)
                return _replace_hidden(output, mean.expand_as(current).clone())
            hidden = args[0] if args else kwargs[arch.attn_input]
            return _replace_hidden(output, self_attention_output(model, arch, layer, hidden))
        return hook

    handles = []
    try:
        for layer in sorted({int(i) for i in layers}):
            module = get_module(model, arch, "attn", layer)
            handles.append(module.register_forward_hook(hook_for(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def mean_attention_outputs(model: torch.nn.Module, arch: ArchSpec, blocks: Sequence[np.ndarray], *, pad_id: int,
                           batch_size: int) -> dict[int, torch.Tensor]:
    """Per block, the mean attention output (fp32, [d_model]) over every real token of `blocks`."""
    n = n_layers(model)
    sums = {i: torch.zeros(d_model(model), dtype=torch.float64) for i in range(n)}
    count = 0
    mask_now: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(_m: torch.nn.Module, _i: tuple, output: Any) -> None:
            m = mask_now[0][..., None].to(torch.float64)
            sums[layer] += (_hidden_of(output).to(torch.float64) * m).sum((0, 1)).cpu()
        return hook

    handles = [get_module(model, arch, "attn", i).register_forward_hook(hook_for(i)) for i in range(n)]
    device = next(model.parameters()).device
    rows = forward_rows(model, max(len(b) for b in blocks), batch_size)   # the logits of a forward are bounded
    try:
        for b in range(0, len(blocks), rows):
            batch = blocks[b:b + rows]
            ids, mask = pad_batch(batch, pad_id, "right")
            mask_now[:] = [mask.to(device)]
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {i: (s / max(count, 1)).float() for i, s in sums.items()}


# -- the sweep -------------------------------------------------------------------------------

def parse_layers(layers: Sequence[int], n_blocks: int) -> list[int] | None:
    """--layers: the blocks bypassed one at a time (sorted, deduplicated); None (every block) when empty."""
    if not layers:
        return None
    bad = sorted({i for i in layers if not 0 <= i < n_blocks})
    if bad:
        raise InputError(f"--layers: blocks {bad} are outside the model (blocks 0..{n_blocks - 1})")
    return sorted(set(layers))


def parse_layer_sets(specs: Sequence[str], n_blocks: int) -> list[list[int]]:
    """'0,1' -> [0, 1]; every index must be a block of the model."""
    out = []
    for spec in specs:
        try:
            layers = sorted({int(x) for x in str(spec).replace(" ", "").split(",") if x != ""})
        except ValueError:
            raise InputError(f"layer set {spec!r} is not a comma-separated list of block indices") from None
        bad = [i for i in layers if not 0 <= i < n_blocks]
        if not layers or bad:
            raise InputError(f"layer set {spec!r}: blocks {bad or '(none)'} are outside the model "
                             f"(blocks 0..{n_blocks - 1})")
        out.append(layers)
    return out


def _measure(model: torch.nn.Module, windows: Sequence[Window], blocks: Sequence[np.ndarray], *, pad_id: int,
             batch_size: int, levenshtein_threshold: float, tokenizer: Any = None,
             benchmarks: Benchmarks | None = None) -> dict[str, Any]:
    row: dict[str, Any] = dict(memorization(model, windows, pad_id=pad_id, batch_size=batch_size, metrics=METRICS,
                                            levenshtein_threshold=levenshtein_threshold))
    row["ppl"] = round(perplexity(model, blocks, pad_id=pad_id, batch_size=batch_size), 6)
    if benchmarks is not None:   # lm-evaluation-harness on the (patched) in-memory model
        row["lm_eval"] = evaluate(model, tokenizer, benchmarks, batch_size)
    return row


def sweep(model: torch.nn.Module, arch: ArchSpec, windows: Sequence[Window], blocks: Sequence[np.ndarray], *,
          pad_id: int, batch_size: int = 32, mode: str = "self", layers: Sequence[int] | None = None,
          layer_sets: Sequence[Sequence[int]] = (),
          levenshtein_threshold: float = 0.75, tokenizer: Any = None, benchmarks: Benchmarks | None = None,
          reference_blocks: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Baseline, then each of `layers` alone (default: every block), then each of `layer_sets`:
    memorization means and perplexity on `blocks`, all with the same batch settings. Mode `mean`
    replaces attention outputs by their mean over `reference_blocks` (default: `blocks` themselves)
    on the unmodified model."""
    if not windows:
        raise InputError("no memorized windows to measure the bypass on")
    n = n_layers(model)
    singles = range(n) if layers is None else layers
    runs: list[list[int]] = [[int(i)] for i in singles] + [sorted({int(i) for i in s}) for s in layer_sets]
    for bypassed in runs:
        if not bypassed or any(not 0 <= i < n for i in bypassed):
            raise InputError(f"layer set {bypassed} is outside the model (blocks 0..{n - 1})")
    model.eval()
    reference = blocks if reference_blocks is None else reference_blocks
    means = (mean_attention_outputs(model, arch, reference, pad_id=pad_id, batch_size=batch_size)
             if mode == "mean" else None)
    kw: dict[str, Any] = dict(pad_id=pad_id, batch_size=batch_size, levenshtein_threshold=levenshtein_threshold,
                              tokenizer=tokenizer, benchmarks=benchmarks)
    baseline = _measure(model, windows, blocks, **kw)
    entries = []
    for bypassed in progress(runs, desc=f"bypass ({mode})", total=len(runs)):
        with bypass_attention(model, arch, bypassed, mode, means):
            row = _measure(model, windows, blocks, **kw)
        row["ppl_ratio"] = round(row["ppl"] / baseline["ppl"], 6)   # held-out perplexity relative to baseline
        entries.append({"layer": bypassed[0] if len(bypassed) == 1 else bypassed, **row})
    return {"mode": mode, "n_windows": len(windows), "n_ppl_blocks": len(blocks),
            "n_mean_reference_blocks": len(reference) if mode == "mean" else None,
            "ppl_tokens": int(sum(len(b) - 1 for b in blocks)), "baseline": baseline, "layers": entries}


# -- inputs ----------------------------------------------------------------------------------

def windows_from_file(path: str, prefix_len: int | None, bos_id: int | None = None) -> list[Window]:
    """Every row of a token file as one window. Each row is prefix + suffix tokens: the prefix is
    `prefix_len` tokens (the upstream memorization run's, when there is one), else half the row. A row
    that starts with `bos_id` (the upstream run prepended BOS) has that BOS in its prefix too."""
    if not Path(path).is_file():
        raise InputError(f"memorized file not found: {path}")
    windows = []
    for doc in load_documents(path, Columns()):
        if doc.tokens is None:
            raise InputError(f"{path}: rows need token ids (a 'tokens'/'input_ids' column or a 2-D .npy array)")
        tokens = np.asarray(doc.tokens, np.int64)
        p = prefix_len if prefix_len is not None and 0 < prefix_len < len(tokens) else len(tokens) // 2
        if prefix_len is not None and bos_id is not None and tokens[0] == bos_id:
            p = min(p + 1, len(tokens) - 1)
        if p < 1 or len(tokens) - p < 1:
            raise InputError(f"{path}: row {doc.doc} has {len(tokens)} tokens; a window needs a prefix and a suffix")
        windows.append(Window(id=f"{doc.doc}", tokens=tokens, prefix_len=p, source=path, doc=doc.doc, offset=0,
                              group=doc.group))
    if not windows:
        raise InputError(f"the memorized file {path} holds no rows")
    return windows
