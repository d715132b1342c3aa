#!/usr/bin/env python3
"""Verify a circuit on held-out pairs (stage 4 of the memcirc pipeline).

Reads <output-dir>/circuits/ (prune scores, minimal circuit size) and, through its manifest, the
contrastive pairs; evaluates the top-k circuit on the held-out split under each ablation type
(baselines recomputed per ablation) against random circuits of the same size. Refuses prune scores
computed for another model or another pairs file. Writes <output-dir>/verify/: summary.json,
faithfulness_vs_edges.png, manifest.json (last).

examples:
  python verify_circuit.py --config configs/testbed.yaml --output-dir runs/testbed
  python verify_circuit.py --output-dir runs/neo --model EleutherAI/gpt-neo-125m \
      --ablations resample zero mean --random-circuits 20 --edge-counts 14 141 332
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("verify_circuit", doc=__doc__))
