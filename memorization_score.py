#!/usr/bin/env python3
"""Score every window of a corpus for verbatim memorization (stage 1 of the memcirc pipeline).

Writes <output-dir>/memorization/: scores.jsonl (one row per window: id, provenance, tokens,
metrics), summary.json (means overall and per group), histogram.png, manifest.json (last).

examples:
  python memorization_score.py --config configs/testbed.yaml --output-dir runs/testbed
  python memorization_score.py --model EleutherAI/pythia-160m --dataset timaeus/pile-wikipedia_en \
      --prefix-len 32 --suffix-len 32 --metrics exact lcp tf_accuracy token_match bleu4 --dtype bfloat16
  # SLURM job array: each task scores one shard, then one merge step
  sbatch --array=0-7 --wrap "python memorization_score.py --config my.yaml --output-dir runs/x"
  python memorization_score.py --config my.yaml --output-dir runs/x --merge --num-shards 8
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("memorization_score", doc=__doc__))
