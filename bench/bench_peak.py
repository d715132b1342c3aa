#!/usr/bin/env python3
"""Benchmark: the teacher-forced scorer as a fraction of the machine's fp32 matmul peak, one process.

Peak: `torch.mm` of two 2048 x 2048 fp32 matrices, best of 5, in GFLOP/s of process (CPU) time,
measured before and after the scorer (the better of the two is the peak).

Useful FLOPs of a window of T = P + S tokens (what any implementation has to compute):
    2 * N_body * T  +  2 * d * V * (S + 1)
N_body is the parameter count of the transformer blocks (no embeddings, no LM head); the second term
is the LM head at the S + 1 positions that predict (or follow) the suffix. Attention scores (T^2),
norms and the metric epilogue are not counted: they are overhead by this definition.

Bound: the same useful FLOPs over the time of the model's own GEMMs alone at their exact shapes
(every Linear/Conv1D of the blocks as addmm (B*T, d_in) x (d_in, d_out), plus the head at the kept
positions), as a fraction of the peak: what a scorer made only of those GEMMs would reach.

Also: the fused epilogue vs the old formulas, and `causal_lm_logits` vs the full `model(...).logits`,
on one batch of each case (best of 3, interleaved), and the top ops of one scorer batch (torch.profiler).

  OMP_NUM_THREADS=1 python bench/bench_peak.py                # both cases
  OMP_NUM_THREADS=1 python bench/bench_peak.py --case neo --neo-windows 64

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch

from memcirc.data import Columns, Window, load_documents, make_windows
from memcirc.forward import causal_lm_logits
from memcirc.models.arch import arch_for, dims, get_module
from memcirc.scoring import TEACHER_FORCED_METRICS, pad_batch, score_windows
from memcirc.suffix_metrics import position_metrics


def best_cpu(repeats: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n ** 3 / best_cpu(repeats, lambda: torch.mm(a, b)) / 1e9


# -- cases ----------------------------------------------------------------------------------------

def testbed_case(_args: argparse.Namespace) -> tuple[torch.nn.Module, list[Window], int, int]:
    from memcirc.models import ModelSpec, load
    from memcirc.testbed import EVAL_DOCUMENTS

    loaded = load(ModelSpec("testbed", device="cpu", dtype="float32"))
    windows = make_windows(load_documents(str(EVAL_DOCUMENTS), Columns()), loaded.tokenizer, "testbed",
                           32, 32).windows
    return loaded.model, list(windows), cast(int, loaded.tokenizer.pad_token_id), 64


def neo_case(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Window], int, int]:
    """GPT-Neo-125M shape (as bench_scoring.py), random weights and tokens, P = S = 50."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12, window_size=256,
                          attention_types=[[["global", "local"], 6]], vocab_size=50257)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    windows = [Window(id=str(i), tokens=rng.integers(0, 50257, 100), prefix_len=50, source="random",
                      doc=str(i), offset=0) for i in range(args.neo_windows)]
    return model, windows, 50256, args.neo_windows


# -- FLOPs and the GEMM-shape bound -----------------------------------------------------------------

def _linears(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """(weight, bias, weight is [in, out]) of every Linear / HF Conv1D in the blocks."""
    blocks = get_module(model, arch_for(model), "blocks")
    out = []
    for module in blocks.modules():
        if isinstance(module, torch.nn.Linear):
            out.append((module.weight, module.bias, False))
        elif type(module).__name__ == "Conv1D":   # GPT-2: weight stored [in, out]
            out.append((module.weight, module.bias, True))
    return out


def useful_flops(model: torch.nn.Module, windows: Sequence[Window]) -> float:
    body = sum(p.numel() for p in get_module(model, arch_for(model), "blocks").parameters())
    d, vocab = dims(model).d_model, dims(model).d_vocab
    return float(sum(2 * body * len(w.tokens) + 2 * d * vocab * (w.suffix_len + 1) for w in windows))


def gemm_seconds(model: torch.nn.Module, windows: Sequence[Window], batch_size: int) -> float:
    """CPU time of the blocks' GEMMs and the kept-position head GEMM at the scorer's batch shapes."""
    head = get_module(model, arch_for(model), "unembed")
    total = 0.0
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            rows = len(batch) * max(len(w.tokens) for w in batch)
            kept = len(batch) * (max(w.suffix_len for w in batch) + 1)
            for weight, bias, in_out in _linears(model):
                w = weight if in_out else weight.t()
                x = torch.randn(rows, w.shape[0])
                total += _time_gemm(x, w, bias)
            weight, bias = cast(torch.Tensor, head.weight), cast("torch.Tensor | None", head.bias)
            total += _time_gemm(torch.randn(kept, weight.shape[1]), weight.t(), bias)
    return total


def _time_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> float:
    fn = (lambda: torch.mm(x, w)) if bias is None else (lambda: torch.addmm(bias, x, w))
    fn()
    return best_cpu(3, fn)


# -- components: epilogue and unembedding ---------------------------------------------------------

def _old_epilogue(logits: torch.Tensor, truth: torch.Tensor) -> None:
    """The formulas `_scores` used before memcirc.suffix_metrics."""
    logits.argmax(dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    _ = lse - logits.gather(-1, truth[..., None]).squeeze(-1)
    _ = lse - (torch.exp(logits - lse[..., None]) * logits).sum(-1)


def components(model: torch.nn.Module, batch: Sequence[Window], pad_id: int) -> dict[str, float]:
    ids, mask = pad_batch([w.tokens for w in batch], pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefix, suffix = batch[0].prefix_len, batch[0].suffix_len
    truth = torch.as_tensor(np.stack([w.tokens[prefix:] for w in batch]))
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        logits = causal_lm_logits(model, ids, mask, positions, prefix - 1)[0][:, :suffix]
        runs = {
            "full_logits_s": lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                           use_cache=False).logits,
            "kept_logits_s": lambda: causal_lm_logits(model, ids, mask, positions, prefix - 1),
            "epilogue_old_s": lambda: _old_epilogue(logits, truth),
            "epilogue_new_s": lambda: position_metrics(logits, truth),
        }
        for _ in range(3):   # interleaved, best of 3
            for name, fn in runs.items():
                times.setdefault(name, []).append(best_cpu(1, fn))
    return {k: round(min(v), 4) for k, v in times.items()}


def top_ops(model: torch.nn.Module, batch: Sequence[Window], pad_id: int, n: int = 12) -> list[list[Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _score(model, batch, pad_id, len(batch))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [[e.key, round(100 * e.self_cpu_time_total / total, 1)] for e in events[:n]]


@torch.inference_mode()   # keep autograd out of the timing, whatever score_windows' internals do
def _score(model: torch.nn.Module, windows: Sequence[Window], pad_id: int, batch_size: int) -> None:
    score_windows(model, windows, pad_id=pad_id, batch_size=batch_size, metrics=TEACHER_FORCED_METRICS)


# -- one case ---------------------------------------------------------------------------------------

def run_case(name: str, model: torch.nn.Module, windows: list[Window], pad_id: int, batch_size: int,
             repeats: int) -> dict[str, Any]:
    before = peak_gflops()
    scorer_s = best_cpu(repeats, lambda: _score(model, windows, pad_id, batch_size))
    after = peak_gflops()
    peak = max(before, after)
    flops = useful_flops(model, windows)
    gemm_s = gemm_seconds(model, windows, batch_size)
    rate = flops / scorer_s / 1e9
    return {
        "case": name, "n_windows": len(windows), "batch_size": batch_size,
        "peak_gflops_before": round(before, 1), "peak_gflops_after": round(after, 1),
        "useful_gflop": round(flops / 1e9, 1), "scorer_cpu_s": round(scorer_s, 3),
        "gflops": round(rate, 1), "fraction_of_peak": round(rate / peak, 3),
        "gemm_cpu_s": round(gemm_s, 3), "bound": round(flops / gemm_s / 1e9 / peak, 3),
        **components(model, windows[:batch_size], pad_id),
        "top_ops": top_ops(model, windows[:batch_size], pad_id),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--case", choices=["both", "testbed", "neo"], default="both")
    parser.add_argument("--neo-windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    cases = {"testbed": ("testbed", testbed_case), "neo": ("random-gpt-neo-125m", neo_case)}
    for key, (name, build) in cases.items():
        if args.case in ("both", key):
            model, windows, pad_id, batch_size = build(args)
            result = run_case(name, model, windows, pad_id, batch_size, args.repeats)
            print(json.dumps(result))
            results.append(result)
    print(json.dumps({"threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "target_fraction": 0.55, "cases": results}))


if __name__ == "__main__":
    main()
