#!/usr/bin/env bash
# Random baseline (the predecessor's mem_decision_random.sh): the circuits of the branch- and
# memorization-decision experiments against 100 random circuits of the same size (and at each
# reported edge count), with the overlap of the random circuits with the real one. A flag after --
# overrides (-- --random-circuits 20). Results go to <output-dir>/random_baseline/<experiment>/verify/.
#   bash verify_scripts/random_baseline.sh --config configs/pythia-160m.yaml --output-dir runs/p160
#   python -m memcirc.slurm grid --config my.yaml --output-dir runs/x   (after both experiments)
#   interpreter: PYTHON=/path/to/python (or --python PATH), else .venv/bin/python, else python
#SBATCH --job-name=memcirc-random_baseline
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# memcirc: run_stage
set -euo pipefail
[[ -n ${SLURM_JOB_ID:-} ]] || cd "$(dirname "$0")/.."
EXPERIMENT=random_baseline
source verify_scripts/common.sh

for e in $(circuit_experiments); do
  run_stage "$PY" verify_circuit.py --config "$CONFIG" --output-dir "$OUT/random_baseline/$e" \
    --input-dir "$OUT/$e/circuits" --random-circuits 100 "${FLAGS[@]}"
done
