#!/usr/bin/env python3
"""Benchmark: our scorer vs the predecessor's method, same model, same windows, one process.

Ours: one teacher-forced forward pass per batch (exact, lcp, tf_accuracy, suffix_nll, entropy);
with token_match on, greedy generation runs only for non-exact windows and only from their
first divergence. Baseline (memorization_circuits' memorization_score.py): greedy `generate`
of the whole suffix for every window, then per-token accuracy.

The last line printed is a JSON object: ours_s, baseline_s, ratio (baseline/ours) and agree for
the default metrics, and the same with token_match on (ours_tm_s, ratio_token_match, agree_tm), and
for the testbed config's memorization metrics (configs/testbed.yaml: teacher-forced + token_match,
bleu4, levenshtein) against full generation + the same metrics from it: ours_default_s,
ratio_default, agree_default (exact/lcp/token_match/bleu4/levenshtein identical per window) and
bound_default = baseline / (teacher-forced only + the decode steps ours runs, at the baseline's cost
per row-step); bound_free_decode = baseline / teacher-forced only (decoding for free).
Times are CPU seconds (time.process_time) on CPU, wall seconds on a GPU; best of --repeats.

  OMP_NUM_THREADS=1 python bench/bench_scoring.py                       # testbed, CPU
  python bench/bench_scoring.py --random-gpt-neo-125m --device cuda    # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from baselines import full_generation_metrics, full_generation_scores  # bench/baselines.py

from memcirc.data import Columns, Window, load_documents, make_windows
from memcirc.models import ModelSpec, load
from memcirc.scoring import score_windows
from memcirc.testbed import EVAL_DOCUMENTS


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        clock = time.perf_counter if torch.cuda.is_available() else time.process_time
        start = clock()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times), result


def testbed_case(args):
    loaded = load(ModelSpec("testbed", device=args.device, dtype=args.dtype))
    windows = make_windows(load_documents(str(EVAL_DOCUMENTS), Columns()), loaded.tokenizer, "testbed",
                           args.prefix_len, args.suffix_len, limit=args.limit).windows
    return loaded.model, windows, loaded.tokenizer.pad_token_id, "testbed"


def random_neo_case(args):
    """GPT-Neo-125M shape, random weights, random token windows (nothing is memorized)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from memcirc.models.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    config = GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12, window_size=256,
                          attention_types=[[["global", "local"], 6]], vocab_size=50257)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).to(device, resolve_dtype(args.dtype, device)).eval()
    rng = np.random.default_rng(0)
    n = args.limit or 512
    windows = [Window(id=str(i), tokens=rng.integers(0, 50257, args.prefix_len + args.suffix_len),
                      prefix_len=args.prefix_len, source="random", doc=str(i), offset=0) for i in range(n)]
    return model, windows, 50256, "random-gpt-neo-125m"


def agree(ours, reference, with_token_match: bool) -> bool:
    for mine, ref in zip(ours, reference):
        if (mine["exact"], mine["lcp"]) != (ref["exact"], ref["lcp"]):
            return False
        if with_token_match and abs(mine["token_match"] - ref["token_match"]) > 1e-6:
            return False
    return len(ours) == len(reference)


def default_metrics() -> list[str]:
    """The memorization metrics of configs/testbed.yaml (what `make pipeline` scores)."""
    import yaml

    config = Path(__file__).resolve().parent.parent / "configs" / "testbed.yaml"
    return list(yaml.safe_load(config.read_text())["memorization"]["metrics"])


def agree_all(ours, reference, names) -> bool:
    keys = [k for k in ("exact", "lcp", "token_match", "bleu4", "levenshtein") if k in names or k in ("exact", "lcp")]
    return len(ours) == len(reference) and all(round(m[k], 6) == round(r[k], 6) if isinstance(m[k], float)
                                               else m[k] == r[k] for m, r in zip(ours, reference) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-gpt-neo-125m", action="store_true")
    args = parser.parse_args()
    if args.random_gpt_neo_125m and args.prefix_len == 32:
        args.prefix_len = args.suffix_len = 50  # the predecessor's setting
    model, windows, pad, name = (random_neo_case if args.random_gpt_neo_125m else testbed_case)(args)

    def ours(metrics):
        return score_windows(model, windows, pad_id=pad, batch_size=args.batch_size, metrics=metrics)

    baseline_s, reference = best_of(args.repeats, lambda: full_generation_scores(model, windows, pad,
                                                                                  args.batch_size))
    ours_s, rows = best_of(args.repeats, lambda: ours(["exact", "lcp", "tf_accuracy", "suffix_nll"]))
    ours_tm_s, rows_tm = best_of(args.repeats, lambda: ours(["exact", "lcp", "token_match"]))
    names = default_metrics()
    generation = [m for m in names if m in ("token_match", "bleu4", "levenshtein")]
    base_default_s, reference_default = best_of(args.repeats, lambda: full_generation_metrics(
        model, windows, pad, args.batch_size, generation))
    ours_default_s, rows_default = best_of(args.repeats, lambda: ours(names))
    tf_only_s, _ = best_of(args.repeats, lambda: ours([m for m in names if m not in generation]))
    # Row-steps: the baseline decodes S per window (prefill counted as decode: generous to the bound);
    # ours decodes S - lcp - 1 per non-exact window.
    steps_base = sum(w.suffix_len for w in windows)
    steps_ours = sum(r["suffix_len"] - r["lcp"] - 1 for r in rows_default if not r["exact"])
    result = {
        "case": name, "device": str(next(model.parameters()).device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "n_windows": len(windows), "exact_rate": float(np.mean([r["exact"] for r in rows])),
        "batch_size": args.batch_size, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
        "baseline_s": round(baseline_s, 4),
        "ours_s": round(ours_s, 4), "ratio": round(baseline_s / ours_s, 2),
        "agree": agree(rows, reference, False),
        "ours_tm_s": round(ours_tm_s, 4), "ratio_token_match": round(baseline_s / ours_tm_s, 2),
        "agree_tm": agree(rows_tm, reference, True),
        "default_metrics": names, "baseline_default_s": round(base_default_s, 4),
        "ours_default_s": round(ours_default_s, 4), "ratio_default": round(base_default_s / ours_default_s, 2),
        "agree_default": agree_all(rows_default, reference_default, names),
        "tf_only_s": round(tf_only_s, 4), "decode_row_steps_ours": steps_ours, "decode_row_steps_baseline": steps_base,
        "bound_default": round(base_default_s / (tf_only_s + base_default_s * steps_ours / steps_base), 2),
        "bound_free_decode": round(base_default_s / tf_only_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
