#!/usr/bin/env python3
"""Bypass the attention of each block (self-only attention, or zero/mean ablation) and measure
memorization of the memorized windows against held-out perplexity (stage 5 of the memcirc pipeline).

Reads <output-dir>/memorization/ (or --memorized-file) and writes <output-dir>/bypass/: summary.json
(baseline and one entry per block / block set: exact, token_match, loose_match, ..., ppl),
tradeoff.png, log.txt, manifest.json (last).

examples:
  python attention_bypass.py --config configs/testbed.yaml --output-dir runs/testbed
  python attention_bypass.py --output-dir runs/testbed --mode zero --layer-sets 0,1 2,3
  python attention_bypass.py --model EleutherAI/gpt-neo-1.3B --memorized-file memorized.npy \\
      --output-dir runs/neo --lm-eval-tasks lambada_openai
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("attention_bypass", doc=__doc__))
