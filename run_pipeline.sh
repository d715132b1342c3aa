#!/usr/bin/env bash
# Run the memcirc stages in order on one config. Each stage reads the previous stage's folder
# under the run root and writes its own; a finished stage with the same config is a no-op, so
# re-running resumes where a previous run stopped. Only folders are passed, never file names.
#
#   ./run_pipeline.sh --config configs/testbed.yaml --output-dir runs/testbed
#   ./run_pipeline.sh --config configs/pythia-160m.yaml --output-dir runs/p160 --from-stage find_circuits
#   (the predecessor's flags work too: --model_name, --prompt_tokens, --generation_tokens, --dataset,
#    --output_dir, --threshold, --metric, --contrastive_mode, --mem_batch_size,
#    --contrastive_batch_size, --eap_batch_size, --global_batch_size)
# Which stages run is the config's `pipeline:` list, run in the order of memcirc/stages/registry.py
# (`python -m memcirc.config pipeline CONFIG` prints it); default: the four circuit stages.
#   ./run_pipeline.sh --slurm --config my.yaml --output-dir runs/x [--num-shards 8] [--dry-run] [--wait]
# --slurm submits the same stages to SLURM instead (resources from the config's slurm: section):
# scoring, K-FAC factors and training_dynamics checkpoints as job arrays, each merge and stage
# after its upstream; --dry-run prints the sbatch scripts; job ids and scripts go to <output>/slurm/.
# Submitting again after a failure recomputes only what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
CONFIG=configs/testbed.yaml
OUTPUT_DIR=runs/testbed
FROM_STAGE=
TO_STAGE=
COMMON=()        # flags every stage accepts
SLURM=() USE_SLURM=0   # --slurm: flags of memcirc.slurm submit
# stage-specific flags: ARGS_<stage> (an array per stage, created on first use)

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_pipeline.sh: $*" >&2; exit 2; }
index_of() {
  local i; for i in "${!STAGES[@]}"; do [[ ${STAGES[$i]} == "$1" ]] && { echo "$i"; return; }; done
  die "unknown stage '$1' (stages: ${STAGES[*]})"
}
need() { [[ $# -ge 2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --output-dir|--output_dir) need "$@"; OUTPUT_DIR=$2; shift 2 ;;
    --from-stage|--from_stage) need "$@"; FROM_STAGE=$2; shift 2 ;;
    --to-stage|--to_stage) need "$@"; TO_STAGE=$2; shift 2 ;;
    --slurm) USE_SLURM=1; shift ;;
    --wait) SLURM+=(--wait); shift ;;
    --num-shards|--num_shards) need "$@"; SLURM+=(--num-shards "$2"); shift 2 ;;
    --dry-run) COMMON+=("$1"); SLURM+=("$1"); shift ;;
    --force) COMMON+=("$1"); shift ;;
    --device|--dtype|--log-level|--limit|--seed|--revision) need "$@"; COMMON+=("$1" "$2"); shift 2 ;;
    --model|--model_name) need "$@"; COMMON+=(--model "$2"); shift 2 ;;
    # stage-specific, in the predecessor's spelling or ours
    --dataset) need "$@"; ARGS_memorization_score+=(--dataset "$2"); shift 2 ;;
    --prompt_tokens|--prefix-len) need "$@"; ARGS_memorization_score+=(--prefix-len "$2"); shift 2 ;;
    --generation_tokens|--suffix-len) need "$@"; ARGS_memorization_score+=(--suffix-len "$2"); shift 2 ;;
    --mem_batch_size) need "$@"; ARGS_memorization_score+=(--batch-size "$2"); shift 2 ;;
    --threshold)  # the predecessor thresholded its per-token match score
      need "$@"; ARGS_memorization_score+=(--metrics exact lcp tf_accuracy suffix_nll suffix_entropy token_match bleu4)
      ARGS_contrastive_dataset+=(--memorized-by token_match --threshold "$2"); shift 2 ;;
    --metric) need "$@"; ARGS_contrastive_dataset+=(--metric "$2"); shift 2 ;;
    --contrastive_mode|--contrastive-mode) need "$@"; ARGS_contrastive_dataset+=(--contrastive-mode "$2"); shift 2 ;;
    --contrastive_batch_size) need "$@"; ARGS_contrastive_dataset+=(--batch-size "$2"); shift 2 ;;
    --eap_batch_size) need "$@"; ARGS_find_circuits+=(--batch-size "$2"); ARGS_verify_circuit+=(--batch-size "$2"); shift 2 ;;
    --global_batch_size)
      need "$@"; ARGS_memorization_score+=(--batch-size "$2"); ARGS_contrastive_dataset+=(--batch-size "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -f $CONFIG ]] || die "config file not found: $CONFIG"
# The stage list comes from the config's `pipeline:` key (default: the four circuit stages), in the
# registry's order (memcirc/stages/registry.py).
listed=$("$PYTHON" -m memcirc.config pipeline "$CONFIG") || exit 2
mapfile -t STAGES <<< "$listed"
first=$(index_of "${FROM_STAGE:-${STAGES[0]}}"); last=$(index_of "${TO_STAGE:-${STAGES[-1]}}")
(( first <= last )) || die "--from-stage $FROM_STAGE comes after --to-stage $TO_STAGE"

stage_flags() {  # point `extra` at the stage's flag array (declared empty when no flag went to it)
  unset -n extra 2>/dev/null || true
  declare -g -a "ARGS_$1"
  declare -g -n extra="ARGS_$1"
}

if (( USE_SLURM )); then
  # Each stage's flags travel as --stage-arg=STAGE=ARG (any characters, no re-quoting); --dry-run
  # prints the job scripts instead of asking each stage for its plan.
  args=(--config "$CONFIG" --output-dir "$OUTPUT_DIR" --python "$PYTHON" --stages "${STAGES[@]:first:last-first+1}")
  for a in "${COMMON[@]}"; do [[ $a == --dry-run ]] || args+=("--common-arg=$a"); done
  for stage in "${STAGES[@]:first:last-first+1}"; do
    stage_flags "$stage"
    for a in "${extra[@]}"; do args+=("--stage-arg=$stage=$a"); done
  done
  rc=0
  "$PYTHON" -m memcirc.slurm submit "${args[@]}" "${SLURM[@]}" || rc=$?
  if (( rc == 0 )) && [[ " ${SLURM[*]} " == *" --wait "* && " ${SLURM[*]} " != *" --dry-run "* ]]; then
    "$PYTHON" -m memcirc.report "$OUTPUT_DIR"
  fi
  exit "$rc"
fi
(( ${#SLURM[@]} == 0 )) || [[ ${SLURM[*]} == --dry-run ]] || die "--wait and --num-shards need --slurm"

# One process runs the rest (memcirc.pipeline): each stage's model is checked from its config.json first
# (no weights; not for --dry-run), so a family TransformerLens cannot convert is refused before
# scoring and contrastive have run; then the stages in order, through the same memcirc.cli.main as
# `python <stage>.py`, paying the torch/transformers/TransformerLens imports once; then the report,
# whose headline numbers end the log (also saved as report.md and report.json in the run folder).
args=(--config "$CONFIG" --output-dir "$OUTPUT_DIR" --from-stage "${STAGES[first]}" --to-stage "${STAGES[last]}")
args+=("${COMMON[@]}")
for stage in "${STAGES[@]:first:last-first+1}"; do
  stage_flags "$stage"
  for a in "${extra[@]}"; do args+=("--stage-arg=$stage=$a"); done
done
exec "$PYTHON" -m memcirc pipeline "${args[@]}"
