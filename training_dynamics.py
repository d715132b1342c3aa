#!/usr/bin/env python3
"""Memorization and circuits across training checkpoints (the training_dynamics stage of memcirc).

For each checkpoint (Hub revisions of --model such as Pythia's step1000 ... step143000, listed or
built by --schedule linear|log|exp_plus_detail; local checkpoint folders; the testbed's own
checkpoints by default) re-scores the windows of <output-dir>/memorization/ and, with the pairs of
<output-dir>/contrastive/, runs attribution, the minimal circuit and its held-out faithfulness.
Each checkpoint is one unit, <output-dir>/dynamics/checkpoints/<index>/ (scores.jsonl,
prune_scores.safetensors, circuit.json, done.json last), so it can be a SLURM array task. Once
every unit is done, the merge (merge_units; --merge runs only this step) merges the finished units
into onsets.jsonl, overlap.json, summary.json, memorization_over_training.png,
circuit_over_training.png, overlap_heatmap.png and manifest.json (last) in <output-dir>/dynamics/.

examples:
  python training_dynamics.py --config configs/testbed.yaml --output-dir runs/testbed
  python training_dynamics.py --output-dir runs/p160 --model EleutherAI/pythia-160m --schedule log \
      --schedule-points 10 --dtype float32
  python training_dynamics.py --output-dir runs/x --checkpoints ckpts/step-100 ckpts/step-200 ckpts/final \
      --steps 100 200 300 --no-circuits
  sbatch --array=0-9 ... python training_dynamics.py --output-dir runs/p160 --schedule log   # one unit each
  python training_dynamics.py --output-dir runs/p160 --schedule log --merge                  # then merge
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("training_dynamics", doc=__doc__))
