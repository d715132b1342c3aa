#!/usr/bin/env python3
"""Benchmark: our divergence finder vs the predecessor's brute force, same memorized windows.

Ours: one teacher-forced pass per window tells, for every context length, how far greedy decoding
stays on the true text; generation runs only at candidate lengths. Brute force
(memorization_circuits' contrastive_dataset.py, divergence mode): shorten the context one token at
a time and regenerate the whole remainder at every length. Both apply the same rule (relative
BLEU-4 drop > 0.3 and a different first token); the results must be equal.

  OMP_NUM_THREADS=1 python bench/bench_divergence.py          # last line: JSON with ratio
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from baselines import find_divergences_bruteforce  # bench/baselines.py

from memcirc.contrastive import find_divergences
from memcirc.data import Columns, load_documents, make_windows
from memcirc.models import ModelSpec, load
from memcirc.scoring import score_windows
from memcirc.testbed import EVAL_DOCUMENTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--metric", default="bleu", choices=("bleu", "memorization"))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    loaded = load(ModelSpec("testbed", device=args.device, dtype="float32"))
    windows = make_windows(load_documents(str(EVAL_DOCUMENTS), Columns()), loaded.tokenizer, "testbed", 32, 32).windows
    rows = score_windows(loaded.model, windows, pad_id=loaded.tokenizer.pad_token_id, batch_size=64)
    memorized = [w for w, r in zip(windows, rows) if r["exact"]]

    def timed(fn):
        start = time.perf_counter()
        out = fn(loaded.model, memorized, metric=args.metric, batch_size=args.batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    ours_s, ours = timed(find_divergences)
    baseline_s, reference = timed(find_divergences_bruteforce)
    agree = all((a.position, a.resolved, a.generated) == (b.position, b.resolved, b.generated)
                and abs(a.score_after - b.score_after) < 1e-12 for a, b in zip(ours, reference))
    print(json.dumps({"device": args.device, "metric": args.metric, "threads": torch.get_num_threads(),
                      "n_memorized": len(memorized), "n_resolved": int(sum(d.resolved for d in ours)),
                      "mean_position": float(np.mean([d.position for d in ours if d.resolved])),
                      "baseline_s": round(baseline_s, 4), "ours_s": round(ours_s, 4),
                      "ratio": round(baseline_s / ours_s, 2), "agree": agree}))


if __name__ == "__main__":
    main()
