#!/usr/bin/env python3
"""Benchmark: K-FAC factor collection with sampled labels (true Fisher), ours vs the per-row multinomial.

Ours (`memcirc.kfac.factors._draw_labels`): one uniform per position from block r's own generator
`block_seed(seed, r)`, then inverse-CDF sampling (exp, cumsum, searchsorted) one row at a time.
Baseline (`bench/baselines.py multinomial_labels`, memcirc before issue 14): `torch.multinomial` over
softmax(logits[r]) with the same per-block generator, which fills V exponential variates per position.
Both collect the testbed's layers 2-3 MLP in/out factors on 128-token blocks in batches of 32 (the
review's setting); `data` labels (no draw at all) are the floor.

Bound: sampled collection cannot be faster than data-label collection, so the ratio
baseline / ours is at most baseline / data (`bound`).

The last line printed is a JSON object: ours_s, baseline_s, data_s (CPU s per collection, best of
--repeats, interleaved), ratio, bound, sampled overhead over data labels before and after, and
draw_ratio (the label draw alone, ours vs baseline, on one batch's logits).

  OMP_NUM_THREADS=1 python bench/bench_kfac_labels.py
  OMP_NUM_THREADS=1 python bench/bench_kfac_labels.py --tokens 32000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from baselines import multinomial_labels  # bench/baselines.py

import memcirc.kfac.factors as factors
from memcirc.kfac.factors import FactorOptions, block_seed, collect_factors, token_blocks
from memcirc.kfac.targets import resolve_targets
from memcirc.models import ModelSpec, load


def best_cpu(repeats: int, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Best CPU seconds of each function, the functions interleaved within each repeat."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            best[k] = min(best[k], time.process_time() - t)
    return best


def _baseline_draw(logits: torch.Tensor, ids: torch.Tensor, opts: FactorOptions, block: int) -> torch.Tensor:
    assert opts.seed is not None
    return multinomial_labels(logits, [block_seed(opts.seed, block + r) for r in range(ids.shape[0])])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16_000, help="factor tokens per collection")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load(ModelSpec("testbed", device="cpu", dtype="float32"))
    targets = resolve_targets(lm.model, lm.arch, [2, 3], ["mlp_in", "mlp_out"])
    vocab = int(lm.model.config.vocab_size)
    stream = np.random.default_rng(0).integers(0, vocab, 2 * args.tokens)
    batches = token_blocks(stream, 128, args.tokens, 32)
    ours_draw = factors._draw_labels

    def collect(labels: str, draw: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            factors._draw_labels = draw
            try:
                return collect_factors(lm.model, targets, batches, FactorOptions(labels=labels, seed=0))
            finally:
                factors._draw_labels = ours_draw
        return run

    times = best_cpu(args.repeats, {"ours": collect("sampled", ours_draw),
                                    "baseline": collect("sampled", _baseline_draw),
                                    "data": collect("data", ours_draw)})
    logits = torch.randn(32, 127, vocab, generator=torch.Generator().manual_seed(0)) * 3
    ids, opts = torch.zeros(32, 128, dtype=torch.long), FactorOptions(seed=0)
    draws = best_cpu(args.repeats, {"ours": lambda: ours_draw(logits, ids, opts, 0),
                                    "baseline": lambda: _baseline_draw(logits, ids, opts, 0)})
    result = {"tokens": args.tokens, "vocab": vocab, "ours_s": round(times["ours"], 3),
              "baseline_s": round(times["baseline"], 3), "data_s": round(times["data"], 3),
              "ratio": round(times["baseline"] / times["ours"], 3),
              "bound": round(times["baseline"] / times["data"], 3),
              "sampled_overhead_before": round(times["baseline"] / times["data"] - 1, 3),
              "sampled_overhead_after": round(times["ours"] / times["data"] - 1, 3),
              "draw_ratio": round(draws["baseline"] / draws["ours"], 2)}
    print(f"collection of {args.tokens} tokens: ours {times['ours']:.2f} s, per-row multinomial "
          f"{times['baseline']:.2f} s, data labels {times['data']:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
