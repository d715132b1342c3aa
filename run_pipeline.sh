#!/usr/bin/env bash
# Run the memcirc stages in order on one config. Each stage reads the previous stage's folder
# under the run root and writes its own; a finished stage with the same config is a no-op, so
# re-running resumes where a previous run stopped.
#
#   ./run_pipeline.sh --config configs/testbed.yaml --output-dir runs/testbed
#   ./run_pipeline.sh --config configs/pythia-160m.yaml --output-dir runs/p160 --from-stage memorization_score
set -euo pipefail
cd "$(dirname "$0")"

STAGES=(memorization_score)
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
CONFIG=configs/testbed.yaml
OUTPUT_DIR=runs/testbed
FROM_STAGE=${STAGES[0]}
TO_STAGE=${STAGES[-1]}
EXTRA=()

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; echo "stages: ${STAGES[*]}"; }
die() { echo "run_pipeline.sh: $*" >&2; exit 2; }
index_of() {
  local i; for i in "${!STAGES[@]}"; do [[ ${STAGES[$i]} == "$1" ]] && { echo "$i"; return; }; done
  die "unknown stage '$1' (stages: ${STAGES[*]})"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --output-dir|--output_dir) OUTPUT_DIR=$2; shift 2 ;;
    --from-stage|--from_stage) FROM_STAGE=$2; shift 2 ;;
    --to-stage|--to_stage) TO_STAGE=$2; shift 2 ;;
    --force|--dry-run) EXTRA+=("$1"); shift ;;
    --device|--dtype|--log-level|--limit) EXTRA+=("$1" "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -f $CONFIG ]] || die "config file not found: $CONFIG"
first=$(index_of "$FROM_STAGE"); last=$(index_of "$TO_STAGE")
(( first <= last )) || die "--from-stage $FROM_STAGE comes after --to-stage $TO_STAGE"

echo "memcirc pipeline: config=$CONFIG output=$OUTPUT_DIR stages=${STAGES[*]:first:last-first+1}"
for stage in "${STAGES[@]:first:last-first+1}"; do
  echo "== $stage"
  "$PYTHON" "$stage.py" --config "$CONFIG" --output-dir "$OUTPUT_DIR" "${EXTRA[@]}"
done
# The headline numbers last, so they end the log.
"$PYTHON" -m memcirc.report "$OUTPUT_DIR"
