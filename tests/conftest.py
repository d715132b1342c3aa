"""Shared pytest fixtures. Each section is owned by the layer named in its header."""

from __future__ import annotations

import os

# Before torch/transformers are imported: offline, and one thread (2 torch threads on 2 shared
# cores run 3-40x slower).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF conversions made by tests go to a per-session folder, never the user's ~/.cache/memcirc.
if "MEMCIRC_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MEMCIRC_CACHE"] = tempfile.mkdtemp(prefix="memcirc-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEMCIRC_CACHE"], ignore_errors=True)

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parent.parent
# The MIT licence body: whole-word text for tokenizer fixtures (a BPE trained on it has 'Ġhereby').
MIT_LICENCE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
       "and associated documentation files (the \"Software\"), to deal in the Software without restriction, "
       "including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, "
       "and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so, "
       "subject to the following conditions: The above copyright notice and this permission notice shall be "
       "included in all copies or substantial portions of the Software.")


@pytest.fixture
def memcirc_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty GGUF conversion cache for one test ($MEMCIRC_CACHE)."""
    from memcirc.models import gguf

    root = tmp_path_factory.mktemp("memcirc-cache")
    monkeypatch.setenv(gguf.CACHE_ENV, str(root))
    return root


def pytest_configure(config: pytest.Config) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def scored(tmp_path_factory):
    """A memorization run over the 112 testbed canaries (k = 0 ... 32). Stages under test may add
    their own folders next to memorization/, never change it."""
    from memcirc.cli import main

    out = tmp_path_factory.mktemp("scored")
    assert main("memorization_score", ["--config", str(REPO / "configs" / "testbed.yaml"), "--output-dir", str(out),
                                   "--limit", "112", "--device", "cpu", "--metrics", "exact", "token_match"]) == 0
    return out


@pytest.fixture(scope="session")
def kfac_run(scored, tmp_path_factory):
    """The quickest kfac_edit run that saves an edit (12 memorized windows of `scored`, one rho); read-only."""
    from memcirc.cli import main

    out = tmp_path_factory.mktemp("kfac-run")
    assert main("kfac_edit", ["--config", str(REPO / "configs" / "testbed.yaml"), "--output-dir", str(out),
                              "--input-dir", str(scored / "memorization"), "--limit", "12", "--factor-tokens",
                              "2000", "--rhos", "0.6", "--ppl-blocks", "4", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def testbed():
    """The committed testbed model, loaded like any model (read-only: never modify it)."""
    from memcirc.models import ModelSpec, load

    return load(ModelSpec("testbed", device="cpu", dtype="float32"))

# ---------------------------------------------------------------------------------------------
# models layer: a tiny random HF model of every family, saved with a tiny BPE tokenizer.
# Session-scoped and read-only: tests that change a model must work on a copy.
# ---------------------------------------------------------------------------------------------

from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    import transformers

    from memcirc.models import LoadedModel

TINY_VOCAB = 320  # model embedding rows; the tokenizer has fewer tokens (like Pythia)
_TINY_COMMON = dict(vocab_size=TINY_VOCAB, initializer_range=0.1)
_LLAMA_COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=32, intermediate_size=48, max_position_embeddings=64)
# Per family: (transformers config class name, kwargs). Sizes follow the brief: 2 layers, d_model
# 32, 4 heads; GQA where the family has it; non-default values wherever TL might ignore them.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=32, n_inner=48, n_positions=1024)),
    "gpt_neo": ("GPTNeoConfig", dict(num_layers=2, num_heads=4, hidden_size=32,
                                     intermediate_size=48, max_position_embeddings=64, window_size=4,
                                     attention_types=[[["global", "local"], 1]])),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                       intermediate_size=48, max_position_embeddings=64,
                                       rotary_pct=0.25, use_parallel_residual=True,
                                       rotary_emb_base=5000)),
    "llama": ("LlamaConfig", dict(_LLAMA_COMMON, rope_theta=5000.0)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_COMMON, rope_theta=5000.0)),
    "olmo2": ("Olmo2Config", dict(_LLAMA_COMMON)),
    "gemma3": ("Gemma3TextConfig", dict(_LLAMA_COMMON, head_dim=8, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"])),
}
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "def f(x):\n    return x * 2  # tabs\tand spaces",
] * 4


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (about 300 tokens) trained here, wrapped as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, unk_token=eot)


def build_tiny_model(family: str, seed: int = 0, **overrides: object) -> transformers.PreTrainedModel:
    """A random model of `family`, with norm parameters and biases moved off their init values."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**_TINY_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norms init to 1/0 and biases to 0: offsets make the TL parity check cover them.
            if "norm" in name.lower() or ".ln_" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory,
                    tiny_tokenizer: transformers.PreTrainedTokenizerFast) -> dict[str, Path]:
    """family -> a folder holding save_pretrained model + tokenizer files."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in TINY_CONFIGS:
        folder = root / family
        build_tiny_model(family).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        dirs[family] = folder
    return dirs


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    """family -> LoadedModel, loaded through memcirc.models.load (the real from_pretrained path)."""
    from memcirc.models import ModelSpec, load

    return {family: load(ModelSpec(str(folder), device="cpu")) for family, folder in tiny_model_dirs.items()}


def rerecord(stage_dir: Path) -> None:
    """Record a stage folder's outputs (and config) in its manifest as they are now: a test that edits a
    finished stage's files by hand, to build an input, makes them look as if the stage had written them
    (downstream stages refuse a file that differs from its manifest's sha256)."""
    from memcirc import artifacts as art

    manifest = art.read_json(stage_dir / art.MANIFEST)
    for entry in manifest["outputs"]:
        entry["sha256"] = art.sha256_file(stage_dir / entry["path"])
    manifest["config_sha256"] = art.sha256_json(manifest["config"])
    art.write_json(stage_dir / art.MANIFEST, manifest)
