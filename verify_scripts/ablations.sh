#!/usr/bin/env bash
# Ablations (the predecessor's ablations_mem_decision.sh / ablations_branch.sh): the circuits of the
# branch- and memorization-decision experiments verified on their held-out pairs under every ablation
# type (resample: the corrupt run; zero; mean over the pairs), each with its own M(full) and M(empty).
# Results go to <output-dir>/ablations/<experiment>/verify/.
#   bash verify_scripts/ablations.sh --config configs/pythia-160m.yaml --output-dir runs/p160
#   python -m memcirc.slurm grid --config my.yaml --output-dir runs/x   (after both experiments)
#   interpreter: PYTHON=/path/to/python (or --python PATH), else .venv/bin/python, else python
#SBATCH --job-name=memcirc-ablations
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# memcirc: run_stage
set -euo pipefail
[[ -n ${SLURM_JOB_ID:-} ]] || cd "$(dirname "$0")/.."
EXPERIMENT=ablations
source verify_scripts/common.sh

for e in $(circuit_experiments); do
  run_stage "$PY" verify_circuit.py --config "$CONFIG" --output-dir "$OUT/ablations/$e" --input-dir "$OUT/$e/circuits" \
    --ablations resample zero mean "${FLAGS[@]}"
done
