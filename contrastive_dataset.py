#!/usr/bin/env python3
"""Build contrastive token-id pairs from memorized windows (stage 2 of the memcirc pipeline).

Reads <output-dir>/memorization/ and writes <output-dir>/contrastive/: pairs.jsonl (clean and
corrupt token ids of equal length, answer and wrong next-token ids, provenance, split),
summary.json, divergence.png, manifest.json (last).

examples:
  python contrastive_dataset.py --config configs/testbed.yaml --output-dir runs/testbed
  python contrastive_dataset.py --output-dir runs/testbed --contrastive-mode dataset --similarity embedding
  python contrastive_dataset.py --output-dir runs/x --memorized-by token_match --threshold 0.75 --metric bleu
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("contrastive_dataset", doc=__doc__))
