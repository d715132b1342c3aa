#!/usr/bin/env python3
"""Find the circuit behind a memorization decision (stage 3 of the memcirc pipeline).

Reads <output-dir>/contrastive/pairs.jsonl (discovery split), scores every edge of auto-circuit's
factorized graph by mask gradients (EAP-IG; --ig-steps 0 = plain EAP) and finds the smallest top-k
circuit whose faithfulness F = (M(circuit) - M(empty)) / (M(full) - M(empty)) reaches --target.
Writes <output-dir>/circuits/: prune_scores.safetensors, circuit.json, summary.json,
faithfulness_curve.png, circuit.png, manifest.json (last).

examples:
  python find_circuits.py --config configs/testbed.yaml --output-dir runs/testbed
  python find_circuits.py --model EleutherAI/gpt-neo-125m --output-dir runs/neo --ig 5 \
      --ablation resample --faithfulness-metric logit_diff --target 0.85 --dtype float32
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("find_circuits", doc=__doc__))
