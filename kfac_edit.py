#!/usr/bin/env python3
"""Edit memorization out of a model with K-FAC (the kfac_edit stage of the memcirc pipeline).

Reads <output-dir>/memorization/ (the memorized windows) and writes <output-dir>/kfac/:
factors.safetensors (K-FAC sums with token count and model provenance), summary.json (one entry
per formula and rho: exact / loose match and held-out perplexity before and after), deltas.safetensors
(weight changes of the saved setting), edited_model/ (from_pretrained folder), rho_curve.png,
manifest.json (last).

examples:
  python kfac_edit.py --config configs/testbed.yaml --output-dir runs/testbed
  python kfac_edit.py --output-dir runs/testbed --layers 2 3 --projections mlp_in --rhos 0.9 0.6
  python kfac_edit.py --output-dir runs/b --factors-file runs/a/kfac/factors.safetensors
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("kfac_edit", doc=__doc__))
