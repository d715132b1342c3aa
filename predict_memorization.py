#!/usr/bin/env python3
"""Predict which sequences a model memorizes from the data alone (the predict_memorization stage).

Reads the labels from <output-dir>/memorization/ (memorized = memorized_by >= threshold), or from a
pythia-memorized-evals-style table (--labels-file) plus random controls (--controls-file). Features:
surprisal under a smaller reference model, n-gram duplication and token rarity in the training corpus,
zlib compressibility, repetition, length/position, domain, and a shuffled control column. Writes
<output-dir>/predict/: features.jsonl, predictions.jsonl (out-of-fold probabilities, baseline),
summary.json (auroc, pr_auc of the best classifier with 95% intervals over folds), roc.png, pr.png,
importance.png, ngram_index.safetensors, manifest.json (last).

examples:
  python predict_memorization.py --config configs/testbed.yaml --output-dir runs/testbed
  python predict_memorization.py --output-dir runs/testbed --domain-column doc_kind --folds 10
  python predict_memorization.py --model EleutherAI/pythia-1.4b-deduped --output-dir runs/pythia \\
      --labels-file EleutherAI/pythia-memorized-evals --labels-split deduped.1.4b \\
      --controls-file EleutherAI/pile-deduped-pythia-random-sampled --label-column 1.4B \\
      --baseline-column 160M --reference-model EleutherAI/pythia-70m-deduped \\
      --corpus monology/pile-uncopyrighted --corpus-streaming --corpus-tokens 200000000 --prefix-len 32
  python predict_memorization.py --output-dir runs/b --index-file runs/a/predict/ngram_index.safetensors
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("predict_memorization", doc=__doc__))
