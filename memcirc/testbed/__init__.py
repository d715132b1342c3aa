"""The embedded testbed: a tiny GPT-NeoX model trained here on Shakespeare plus canaries.

Canaries are random-word sequences inserted k times into the training data, so which sequences
the model memorized is known by construction. `make testbed` rebuilds everything below from the
committed corpus slice (see build.py); the trained weights are committed so nothing needs training.
"""

import json
from pathlib import Path

TESTBED_DIR = Path(__file__).resolve().parent
MODEL_DIR = TESTBED_DIR / "model"              # HF folder: config.json, model.safetensors, tokenizer
CHECKPOINTS_DIR = TESTBED_DIR / "checkpoints"  # HF folders step-<N>/ saved during training
CORPUS_DIR = TESTBED_DIR / "corpus"            # train.txt, heldout.txt (committed slice)
EVAL_DOCUMENTS = TESTBED_DIR / "eval_documents.jsonl"  # documents the default scoring run reads
GROUND_TRUTH = TESTBED_DIR / "ground_truth.json"       # canaries: text, token ids, k, positions

# The name that models.load and data.load_documents resolve to the folders above.
TESTBED_NAME = "testbed"


def checkpoint_folders() -> list[tuple[int, Path]]:
    """(training step, folder) of every checkpoint ground_truth.json lists, in training order; the
    last is the final model (MODEL_DIR). Raises InputError when the testbed lists none."""
    from memcirc.errors import InputError

    entries = json.loads(GROUND_TRUTH.read_text()).get("checkpoints", []) if GROUND_TRUTH.is_file() else []
    if not entries:
        raise InputError(f"{GROUND_TRUTH} lists no checkpoints; rebuild the testbed (make testbed)")
    return [(int(e["step"]), (TESTBED_DIR / e["dir"]).resolve()) for e in entries]
