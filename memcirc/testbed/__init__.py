"""The embedded testbed: a tiny GPT-NeoX model trained here on Shakespeare plus canaries.

Canaries are random-word sequences inserted k times into the training data, so which sequences
the model memorized is known by construction. `make testbed` rebuilds everything below from the
committed corpus slice (see build.py); the trained weights are committed so nothing needs training.
"""

from pathlib import Path

TESTBED_DIR = Path(__file__).resolve().parent
MODEL_DIR = TESTBED_DIR / "model"              # HF folder: config.json, model.safetensors, tokenizer
CHECKPOINTS_DIR = TESTBED_DIR / "checkpoints"  # HF folders step-<N>/ saved during training
CORPUS_DIR = TESTBED_DIR / "corpus"            # train.txt, heldout.txt (committed slice)
EVAL_DOCUMENTS = TESTBED_DIR / "eval_documents.jsonl"  # documents the default scoring run reads
GROUND_TRUTH = TESTBED_DIR / "ground_truth.json"       # canaries: text, token ids, k, positions

# The name that models.load and data.load_documents resolve to the folders above.
TESTBED_NAME = "testbed"
