#!/usr/bin/env bash
# Memorization decision (the predecessor's verify_mem_decision*.sh): memorized or not? Pairs of a
# memorized context and a non-memorized one sharing the token at the decision position (ranked by
# embedding similarity), the minimal circuit on the discovery pairs, then held-out faithfulness under
# every ablation of verify: ablations, against random circuits of the same size. Model, data, loss, metric,
# IG steps and ablations come from --config; results go to <output-dir>/memorization_decision/.
#   bash verify_scripts/memorization_decision.sh --config configs/pythia-160m.yaml --output-dir runs/p160
#   python -m memcirc.slurm grid --config my.yaml --output-dir runs/x --experiments memorization_decision
#   sbatch verify_scripts/memorization_decision.sh --config my.yaml --output-dir runs/x   (defaults below)
#   interpreter: PYTHON=/path/to/python (or --python PATH), else .venv/bin/python, else python
#SBATCH --job-name=memcirc-memorization_decision
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# memcirc: run_stage
set -euo pipefail
[[ -n ${SLURM_JOB_ID:-} ]] || cd "$(dirname "$0")/.."
EXPERIMENT=memorization_decision
source verify_scripts/common.sh

run_stage "$PY" memorization_score.py --config "$CONFIG" --output-dir "$OUT" "${FLAGS[@]}"
X=$OUT/memorization_decision
run_stage "$PY" contrastive_dataset.py --config "$CONFIG" --output-dir "$X" --input-dir "$OUT/memorization" \
  --contrastive-mode dataset "${FLAGS[@]}"
run_stage "$PY" find_circuits.py --config "$CONFIG" --output-dir "$X" "${FLAGS[@]}"
run_stage "$PY" verify_circuit.py --config "$CONFIG" --output-dir "$X" "${FLAGS[@]}"
