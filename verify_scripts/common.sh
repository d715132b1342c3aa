# Sourced by the experiment scripts: their flags, the checkout root, and a plain run_stage when the
# script runs without memcirc.slurm (which inlines the pre-emption-aware one).
#   --config FILE       the run's YAML config (model, data, stage sections, slurm:)   [configs/testbed.yaml]
#   --output-dir DIR    the run root; memorization/ is shared, each experiment writes DIR/<experiment>/
#   --python PATH       interpreter        [$PYTHON, else .venv/bin/python, else python on PATH]
#   --experiments E...  (ablations, random_baseline) the circuits to re-verify   [branch_decision memorization_decision]
#   -- FLAGS...         passed to every stage (e.g. -- --device cpu --limit 400)
CONFIG=configs/testbed.yaml
OUT=runs/testbed
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
EXPERIMENTS=(branch_decision memorization_decision)
FLAGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --output-dir) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --experiments) shift; EXPERIMENTS=(); while [[ $# -gt 0 && $1 != --* ]]; do EXPERIMENTS+=("$1"); shift; done ;;
    --) shift; FLAGS=("$@"); break ;;
    *) echo "${EXPERIMENT:-$(basename "$0")}: unknown option '$1' (flags: --config --output-dir --python --experiments -- STAGE FLAGS)" >&2
       exit 2 ;;
  esac
done
declare -F run_stage >/dev/null || run_stage() { "$@"; }

# circuit_experiments: the experiments of --experiments whose circuit is there (others are named and skipped)
circuit_experiments() {
  local e
  for e in "${EXPERIMENTS[@]}"; do
    if [[ -f $OUT/$e/circuits/manifest.json ]]; then echo "$e"
    else echo "${EXPERIMENT:-$(basename "$0")}: no finished circuit in $OUT/$e/circuits; run verify_scripts/$e.sh first, skipping" >&2
    fi
  done
}
