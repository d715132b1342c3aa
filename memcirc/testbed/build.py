"""Build the embedded testbed from the committed corpus slice: tokenizer, canaries, training set,
a tiny GPT-NeoX trained on CPU, checkpoints, ground truth and the default eval documents.

    python -m memcirc.testbed.build --threads 1     # full build into memcirc/testbed/ (`make testbed`)
    python -m memcirc.testbed.build --out /tmp/tb --epochs 1 --max-corpus-chunks 50 --canaries-per-k 2
                                                    # smoke build (seconds)

Memorization is known by construction: canary i with repeat count k occupies exactly k of the
training examples, each starting at position 0 (Pythia protocol, so a scoring window taken from
the document start is exactly what training saw), and the model sees every example once per epoch.
Everything is seeded; on one thread the build is deterministic.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from memcirc.testbed import CHECKPOINTS_DIR, CORPUS_DIR, EVAL_DOCUMENTS, GROUND_TRUTH, MODEL_DIR, TESTBED_DIR
from memcirc.testbed.canaries import (
    CANARY_MIN_TOKENS,
    FAMILIES,
    INDUCTION_EXAMPLES,
    INDUCTION_PROBES,
    INDUCTION_SEGMENT,
    REPEAT_COUNTS,
    SECRET_DIGITS,
    SHARED_MEMBERS,
    SHARED_PREFIX_TOKENS,
    TEMPLATES,
    Canary,
    induction_example,
    induction_segments,
    make_canaries,
)
from memcirc.testbed.tokens import (
    PREFIX_LEN,
    SEQ_LEN,
    SUFFIX_LEN,
    build_tokenizer,
    chunk_corpus,
    corpus_words,
    encode,
    exact_match,
    heldout_perplexity,
    repeated_segment_loss,
)

log = logging.getLogger("memcirc.testbed.build")

SCHEMA_VERSION = 2
CHECKPOINT_FRACTIONS = (1 / 16, 1 / 4, 1 / 2, 3 / 4)  # the final model is MODEL_DIR (float32)
PROBE_EVERY = 10          # optimizer steps between two measurements of the repeated-segment loss
EXACT_DEFINITION = (
    "exact = greedy decoding reproduces the 32-token suffix from the 32-token prefix; computed from one "
    "teacher-forced forward pass over the first 64 tokens of the document: argmax(logits[t-1]) == "
    "tokens[t] for every t in [32, 64)"
)

# Output layout relative to the testbed root, so `--out` builds mirror the package folder.
MODEL_SUBDIR = MODEL_DIR.relative_to(TESTBED_DIR)
CHECKPOINTS_SUBDIR = CHECKPOINTS_DIR.relative_to(TESTBED_DIR)
EVAL_DOCUMENTS_NAME = EVAL_DOCUMENTS.relative_to(TESTBED_DIR)
GROUND_TRUTH_NAME = GROUND_TRUTH.relative_to(TESTBED_DIR)


@dataclass
class BuildConfig:
    out: Path = TESTBED_DIR
    corpus_dir: Path = CORPUS_DIR
    seed: int = 1234
    threads: int = 1
    vocab_size: int = 2048
    canaries_per_k: int = 16
    max_corpus_chunks: int | None = None
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    model: dict[str, Any] = field(default_factory=lambda: dict(
        num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=SEQ_LEN, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu",
    ))


# ---------------------------------------------------------------- training set


def build_training_set(chunks: list[list[int]], canaries: list[Canary], corpus_ids: list[int],
                       segments: list[list[int]], rng: np.random.Generator) -> torch.Tensor:
    """Corpus chunks first (example i = chunk i), then one example per canary occurrence:
    canary tokens at position 0, `<|endoftext|>`, then corpus tokens from a random offset as filler;
    then one example per induction segment (the segment twice, then filler)."""
    examples = [list(c) for c in chunks]
    for canary in canaries:
        for _ in range(canary.k):
            canary.training_examples.append(len(examples))
            examples.append(canary.token_ids + [0] + _filler(corpus_ids, SEQ_LEN - len(canary.token_ids) - 1, rng))
    for segment in segments:
        examples.append(induction_example(segment, _filler(corpus_ids, SEQ_LEN, rng)))
    return torch.tensor(examples, dtype=torch.long)


def _filler(corpus_ids: list[int], need: int, rng: np.random.Generator) -> list[int]:
    start = int(rng.integers(len(corpus_ids) - need))
    return corpus_ids[start:start + need]


# ---------------------------------------------------------------- model and training


def make_model(cfg: BuildConfig, vocab_size: int) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                           attention_dropout=0.0, hidden_dropout=0.0, **cfg.model)
    config.architectures = ["GPTNeoXForCausalLM"]  # TransformerLens' converter needs it
    torch.manual_seed(cfg.seed)
    return GPTNeoXForCausalLM(config)


def make_optimizer(model: torch.nn.Module, cfg: BuildConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases/LayerNorm), linear warmup then cosine decay to min_lr_ratio * lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    warmup = max(1, round(cfg.warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_orders(n_examples: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The shuffled example order of every epoch, fixed up front so exposure steps can be recorded."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_examples, generator=gen) for _ in range(epochs)]


def checkpoint_steps(total_steps: int) -> list[int]:
    return sorted({min(total_steps - 1, max(1, round(f * total_steps))) for f in CHECKPOINT_FRACTIONS})


class TrainStats(TypedDict):
    steps: int
    final_train_loss: float
    training_wall_s: float


def train(model: GPTNeoXForCausalLM, examples: torch.Tensor, orders: list[torch.Tensor], cfg: BuildConfig,
          on_checkpoint: Callable[[int], None], on_probe: Callable[[int], None] = lambda _step: None
          ) -> TrainStats:
    """AdamW over the epochs' orders; `on_checkpoint(step)` at the checkpoint steps and
    `on_probe(step)` every PROBE_EVERY steps (and at step 0 and the last), in eval mode."""
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * len(orders)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    save_at = set(checkpoint_steps(total))
    log_every = max(1, total // 20)
    model.train()
    step, start, running = 0, time.perf_counter(), []
    bar = tqdm(total=total, desc="train", unit="step", disable=None)
    _evaluating(model, on_probe, 0)
    for epoch, order in enumerate(orders):
        for batch_idx in order.split(cfg.batch_size):
            batch = examples[batch_idx]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{running[-1]:.3f}")
            if step % log_every == 0 or step == total:
                elapsed = time.perf_counter() - start
                log.info("step %d/%d epoch %d loss %.4f lr %.2e %.0f tok/s", step, total, epoch,
                         float(np.mean(running[-log_every:])), scheduler.get_last_lr()[0],
                         step * cfg.batch_size * SEQ_LEN / elapsed)
            if step in save_at:
                _evaluating(model, on_checkpoint, step)
            if step % PROBE_EVERY == 0 or step == total:
                _evaluating(model, on_probe, step)
    bar.close()
    model.eval()
    return {"steps": step, "final_train_loss": float(np.mean(running[-steps_per_epoch:])),
            "training_wall_s": round(time.perf_counter() - start, 1)}


def _evaluating(model: torch.nn.Module, fn: Callable[[int], None], step: int) -> None:
    model.eval()
    fn(step)
    model.train()


def record_exposures(canaries: list[Canary], orders: list[torch.Tensor], batch_size: int) -> None:
    """Optimizer step (1-based) at which each occurrence of each canary was trained on."""
    step_of: dict[int, list[int]] = {}
    for epoch, order in enumerate(orders):
        steps_per_epoch = math.ceil(len(order) / batch_size)
        for position, example in enumerate(order.tolist()):
            step_of.setdefault(example, []).append(epoch * steps_per_epoch + position // batch_size + 1)
    for canary in canaries:
        canary.exposure_steps = sorted(s for e in canary.training_examples for s in step_of[e])


# ---------------------------------------------------------------- measurement


def group_rates(groups: list[str], hits: torch.Tensor) -> dict[str, float]:
    order = [Canary("", k, "", [], family=f).group for f in FAMILIES for k in REPEAT_COUNTS] + ["corpus"]
    pairs = list(zip(groups, hits.tolist(), strict=True))
    return {g: round(float(np.mean([h for gg, h in pairs if gg == g])), 4) for g in order if g in groups}


# ---------------------------------------------------------------- writing


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place (os.replace cannot overwrite a non-empty folder)."""
    old = final.with_name(final.name + ".old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model: GPTNeoXForCausalLM, tok: PreTrainedTokenizerFast, folder: Path,
                    dtype: torch.dtype) -> None:
    """A self-contained HF folder (config, safetensors weights, tokenizer) that from_pretrained loads."""
    folder.mkdir(parents=True, exist_ok=True)
    # A cast copy, so config.json records the stored dtype and training continues in float32.
    # The ignore: transformers' `@wraps(nn.Module.to)` on PreTrainedModel.to hides the bound self from pyright.
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True)  # pyright: ignore[reportArgumentType]
    tok.save_pretrained(folder)


def eval_documents(canaries: list[Canary], chunks: list[list[int]],
                   tok: PreTrainedTokenizerFast) -> list[dict[str, Any]]:
    rows = [{"doc": c.id, "group": c.group, "tokens": c.token_ids, "text": c.text,
             **({"secret": c.secret} if c.secret else {})} for c in canaries]
    rows += [{"doc": f"corpus-{i:04d}", "group": "corpus", "tokens": chunk, "text": tok.decode(chunk)}
             for i, chunk in enumerate(chunks)]
    return rows


def write_eval_documents(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_ground_truth(path: Path, cfg: BuildConfig, recipe_extra: dict[str, Any], canaries: list[Canary],
                       measured: dict[str, Any], checkpoints: list[dict[str, Any]],
                       induction: dict[str, Any]) -> None:
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("out", "corpus_dir", "threads")}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "recipe": {**recipe, **recipe_extra},
        "layout": ("training examples [0, n_corpus_chunks) are corpus chunks: example i = corpus tokens "
                   f"[{SEQ_LEN}i, {SEQ_LEN}(i+1)); then one example per canary occurrence: canary "
                   "tokens at position 0, <|endoftext|>, then corpus filler to "
                   f"{SEQ_LEN} tokens; the last {INDUCTION_EXAMPLES} examples each hold a random segment of "
                   f"{INDUCTION_SEGMENT} tokens twice, <|endoftext|>, then corpus filler. Each epoch visits "
                   "every example once in a seeded shuffled order; "
                   "exposures = k * epochs; exposure_steps are the 1-based optimizer steps that saw it."),
        "measured": measured,
        "checkpoints": checkpoints,
        "induction": induction,
        "canaries": [{"id": c.id, "k": c.k, "family": c.family, "group": c.group, "exposures": c.k * cfg.epochs,
                      "text": c.text, "token_ids": c.token_ids,
                      **{key: v for key, v in (("template", c.template), ("secret", c.secret),
                                               ("shared_with", c.shared_with)) if v is not None},
                      "training_examples": c.training_examples,
                      "exposure_steps": c.exposure_steps} for c in canaries],
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


# ---------------------------------------------------------------- orchestration


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TrainingData:
    tok: PreTrainedTokenizerFast
    corpus_ids: list[int]
    chunks: list[list[int]]
    canaries: list[Canary]
    probes: torch.Tensor            # [INDUCTION_PROBES, 2 * INDUCTION_SEGMENT] held-out repeated segments
    examples: torch.Tensor
    orders: list[torch.Tensor]


def prepare_data(cfg: BuildConfig, train_text: str) -> TrainingData:
    rng = np.random.default_rng(cfg.seed)  # one stream, fixed call order: canaries, then filler offsets
    tok = build_tokenizer(train_text, cfg.vocab_size)
    corpus_ids = encode(tok, train_text)
    chunks = chunk_corpus(corpus_ids, cfg.max_corpus_chunks)
    canaries = make_canaries(tok, corpus_words(train_text), train_text, cfg.canaries_per_k, rng)
    segments = induction_segments(len(tok), INDUCTION_EXAMPLES + INDUCTION_PROBES, rng)
    probes = torch.tensor([s + s for s in segments[INDUCTION_EXAMPLES:]], dtype=torch.long)
    examples = build_training_set(chunks, canaries, corpus_ids, segments[:INDUCTION_EXAMPLES], rng)
    orders = epoch_orders(len(examples), cfg.epochs, cfg.seed)
    record_exposures(canaries, orders, cfg.batch_size)
    log.info("tokenizer %d tokens; corpus %d tokens -> %d chunks; %d canaries; %d training examples; "
             "%d epochs x %d steps", len(tok), len(corpus_ids), len(chunks), len(canaries), len(examples),
             cfg.epochs, math.ceil(len(examples) / cfg.batch_size))
    return TrainingData(tok, corpus_ids, chunks, canaries, probes, examples, orders)


def measure(model: GPTNeoXForCausalLM, docs: list[dict[str, Any]], windows: torch.Tensor,
            heldout_ids: list[int]) -> dict[str, Any]:
    groups = [d["group"] for d in docs]
    hits = exact_match(model, windows)
    rates = group_rates(groups, hits)
    return {"definition": EXACT_DEFINITION, "prefix_len": PREFIX_LEN, "suffix_len": SUFFIX_LEN,
            "exact_match": rates, "n": {g: groups.count(g) for g in rates},
            "exact_canaries": [d["doc"] for d, h in zip(docs, hits.tolist(), strict=True)
                               if h and d["group"] != "corpus"],
            "heldout_perplexity": round(heldout_perplexity(model, heldout_ids), 3)}


def recipe_extra(data: TrainingData, steps: int, train_text: str, heldout_text: str) -> dict[str, Any]:
    """The parts of the recipe that follow from the data (the rest is BuildConfig)."""
    return {
        "steps": steps, "steps_per_epoch": steps // len(data.orders),
        "seq_len": SEQ_LEN, "prefix_len": PREFIX_LEN, "suffix_len": SUFFIX_LEN,
        "canary_min_tokens": CANARY_MIN_TOKENS, "repeat_counts": list(REPEAT_COUNTS),
        "families": list(FAMILIES), "templates": list(TEMPLATES), "secret_digits": SECRET_DIGITS,
        "shared_members": SHARED_MEMBERS, "shared_prefix_tokens": SHARED_PREFIX_TOKENS,
        "n_corpus_chunks": len(data.chunks), "n_training_examples": len(data.examples),
        "corpus_sha256": sha256_text(train_text), "heldout_sha256": sha256_text(heldout_text),
        "optimizer": "AdamW betas (0.9, 0.95), no decay on biases/LayerNorm",
        "schedule": "linear warmup, cosine decay to min_lr_ratio * lr",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def induction_record(data: TrainingData, probe_log: list[dict[str, float]]) -> dict[str, Any]:
    """The induction ground truth: the held-out probes and their loss over training."""
    return {"definition": ("probes: held-out random segments of segment_len tokens, each repeated once "
                           "(never trained on); loss_first_copy / loss_second_copy: mean next-token loss "
                           "over the first copy and over the second, measured every probe_every steps "
                           "(step 0 = the initialization)"),
            "segment_len": INDUCTION_SEGMENT, "training_examples": INDUCTION_EXAMPLES,
            "probe_every": PROBE_EVERY, "probes": data.probes.tolist(), "probe_loss": probe_log}


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Regenerate every testbed artifact under cfg.out; return the final measurements."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(cfg.threads)
    train_text = (cfg.corpus_dir / "train.txt").read_text()
    heldout_text = (cfg.corpus_dir / "heldout.txt").read_text()
    data = prepare_data(cfg, train_text)
    docs = eval_documents(data.canaries, data.chunks, data.tok)
    windows = torch.tensor([d["tokens"][:PREFIX_LEN + SUFFIX_LEN] for d in docs], dtype=torch.long)
    model = make_model(cfg, len(data.tok))

    # Folders are written under *.tmp names and swapped in at the end: a killed build leaves the
    # previous testbed intact.
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_tmp, model_tmp = (cfg.out / (sub.name + ".tmp") for sub in (CHECKPOINTS_SUBDIR, MODEL_SUBDIR))
    for tmp in (ckpt_tmp, model_tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    checkpoints: list[dict[str, Any]] = []

    def on_checkpoint(step: int) -> None:
        save_checkpoint(model, data.tok, ckpt_tmp / f"step-{step}", torch.float16)
        rates = group_rates([d["group"] for d in docs], exact_match(model, windows))
        checkpoints.append({"step": step, "dir": str(CHECKPOINTS_SUBDIR / f"step-{step}"),
                            "dtype": "float16", "exact_match": rates})
        log.info("checkpoint step-%d exact-match %s", step, rates)

    probe_log: list[dict[str, float]] = []

    def on_probe(step: int) -> None:
        first, second = repeated_segment_loss(model, data.probes)
        probe_log.append({"step": step, "loss_first_copy": round(first, 4), "loss_second_copy": round(second, 4)})

    stats = train(model, data.examples, data.orders, cfg, on_checkpoint, on_probe)
    measured = {**measure(model, docs, windows, encode(data.tok, heldout_text)),
                "final_train_loss": round(stats["final_train_loss"], 4),
                "training_wall_s": stats["training_wall_s"], "threads": cfg.threads}
    checkpoints.append({"step": stats["steps"], "dir": str(MODEL_SUBDIR), "dtype": "float32",
                        "exact_match": measured["exact_match"]})

    save_checkpoint(model, data.tok, model_tmp, torch.float32)
    replace_dir(model_tmp, cfg.out / MODEL_SUBDIR)
    if ckpt_tmp.exists():
        replace_dir(ckpt_tmp, cfg.out / CHECKPOINTS_SUBDIR)
    write_eval_documents(cfg.out / EVAL_DOCUMENTS_NAME, docs)
    write_ground_truth(cfg.out / GROUND_TRUTH_NAME, cfg,
                       recipe_extra(data, stats["steps"], train_text, heldout_text),
                       data.canaries, measured, checkpoints, induction_record(data, probe_log))
    return measured


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    d = BuildConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=d.out, help="testbed root to write (default: the package)")
    p.add_argument("--corpus-dir", type=Path, default=d.corpus_dir)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (1 on a shared box)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--canaries-per-k", type=int, default=d.canaries_per_k)
    p.add_argument("--max-corpus-chunks", type=int, default=None, help="truncate the corpus (smoke builds)")
    a = p.parse_args(argv)
    for flag in ("threads", "epochs", "batch_size", "vocab_size", "canaries_per_k", "max_corpus_chunks"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for name in ("train.txt", "heldout.txt"):
        if not (a.corpus_dir / name).is_file():
            p.error(f"{a.corpus_dir / name} is missing; the corpus slice is committed "
                    "(regenerate it with python -m memcirc.testbed.slice_corpus)")
    return BuildConfig(out=a.out, corpus_dir=a.corpus_dir, seed=a.seed, threads=a.threads, epochs=a.epochs,
                       lr=a.lr, batch_size=a.batch_size, vocab_size=a.vocab_size,
                       canaries_per_k=a.canaries_per_k, max_corpus_chunks=a.max_corpus_chunks)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    cfg = parse_args(argv)
    measured = build(cfg)
    print(f"exact-match ({PREFIX_LEN}/{SUFFIX_LEN} teacher-forced), {measured['training_wall_s']} s "
          f"training on {cfg.threads} thread(s):")
    for group, rate in measured["exact_match"].items():
        print(f"  {group:8s} {rate:.3f}  (n={measured['n'][group]})")
    print(f"  held-out perplexity {measured['heldout_perplexity']}")


if __name__ == "__main__":
    sys.exit(main())
