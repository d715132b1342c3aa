r"""Score every window of a corpus for verbatim memorization (stage 1 of the memcirc pipeline).

Writes <output-dir>/memorization/: scores.jsonl (one row per window: id, provenance, tokens,
metrics), summary.json (means overall and per group), histogram.png, manifest.json (last).

examples:
  python memorization_score.py --config configs/testbed.yaml --output-dir runs/testbed
  python memorization_score.py --model EleutherAI/pythia-160m --dataset timaeus/pile-wikipedia_en \
      --prefix-len 32 --suffix-len 32 --metrics exact lcp tf_accuracy token_match bleu4 --dtype bfloat16
  # SLURM job array: each task scores one shard, then one merge step
  sbatch --array=0-7 --wrap "python memorization_score.py --config my.yaml --output-dir runs/x"
  python memorization_score.py --config my.yaml --output-dir runs/x --merge
"""
# This docstring is the --help text of the stage: first paragraph the description, the rest the epilog
# (raw, so an example line that ends in a backslash prints as written).

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcirc.config import StageConfig, option
from memcirc.errors import InputError
from memcirc.option_groups import Sharding


@dataclass
class ScoreConfig(Sharding, StageConfig):
    """memorization_score: score every window of a corpus."""

    stage: ClassVar[str] = "memorization_score"

    dataset: str = option("testbed", "Hub dataset id, local JSONL/Parquet/text/NPY file or folder, "
                          "or 'testbed'")
    dataset_config: str | None = option(None, "Hub dataset configuration name")
    split: str = option("train", "dataset split")
    streaming: bool = option(False, "stream a Hub dataset instead of downloading it whole")
    text_column: str = option("text", "column holding raw text")
    token_column: str | None = option(None, "column holding token ids (default: 'tokens' if present)")
    group_column: str = option("group", "optional column copied into each window's provenance")
    doc_column: str | None = option(None, "column holding the document id that window ids (doc@offset) "
                                    "carry (default: the first of doc, index, id present, else the "
                                    "0-based row number)")
    prefix_len: int = option(50, "prefix (prompt) tokens", aliases=("--prompt_tokens",), minimum=1)
    suffix_len: int = option(50, "suffix (continuation) tokens", aliases=("--generation_tokens",),
                             minimum=1)
    windowing: str = option("start", "'start': one window from each document start (Pythia "
                            "protocol); 'sliding': every stride tokens", choices=("start", "sliding"))
    stride: int | None = option(None, "sliding-window stride (default: prefix_len + suffix_len)",
                                minimum=1)
    metrics: list[str] = option(["exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy"],
                                "metrics to compute (token_match, bleu4, levenshtein need generation)",
                                choices=("exact", "lcp", "tf_accuracy", "suffix_nll", "suffix_entropy",
                                         "token_match", "bleu4", "levenshtein"))
    levenshtein_threshold: float = option(0.75, "loose match: 1 - Lev/S >= threshold", within="[0, 1]")
    batch_size: int = option(32, "windows per forward pass", aliases=("--batch_size",), minimum=1,
                             hashed=False)
    padding_side: str = option("right", "padding side of the teacher-forced pass (generation "
                               "always left-pads)", choices=("left", "right"), hashed=False)
    chunk_size: int = option(256, "windows per resumable chunk file", minimum=1, hashed=False)
    decode_text: bool = option(True, "add prefix_text, suffix_text (and continuation_text with token_match, "
                               "bleu4 or levenshtein) to scores.jsonl, decoded with the model's tokenizer")
    parquet: bool = option(False, "also write scores.parquet (the same rows) beside scores.jsonl")
    exposure_candidates: int = option(1000, "exposure of documents with a 'secret': candidates scored per "
                                      "secret (every one when alphabet^length is at most this; 0: no exposure)",
                                      minimum=0)

    GENERATION_METRICS: ClassVar[tuple[str, ...]] = ("token_match", "bleu4", "levenshtein")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.metrics:
            raise InputError("config key 'metrics' must name at least one metric")


Config = ScoreConfig
