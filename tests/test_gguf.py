"""memcirc.models.gguf (convert once, cached by sha256) and gguf_tokenizer (the Gemma BPE fix).

Tiny GGUF files are written here with gguf.GGUFWriter: a llama model with a byte-level BPE
tokenizer, and a gemma3 model whose sentencepiece-BPE vocabulary comes from a BPE trained here, so
the BPE the GGUF describes is known independently of the conversion under test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import gguf as gguf_lib
import numpy as np
import pytest
import torch
from conftest import MIT_LICENCE as MIT
from conftest import build_tiny_model
from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, AutoTokenizer

from memcirc.errors import InputError
from memcirc.models import ModelSpec, gguf, load
from memcirc.models.gguf_tokenizer import from_gguf, higher_scores_merge_first
from memcirc.models.identity import results_key, weights_key
from memcirc.models.loading import load_config_and_tokenizer
from memcirc.models.preflight import check_model
from memcirc.models.tokenizer import check_tokenizer, encode

pytestmark = pytest.mark.usefixtures("memcirc_cache")   # a fresh GGUF cache per test
T = gguf_lib.TokenType
OTHER = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question:",
         "Now is the winter of our discontent made glorious summer by this sun of York."]
TEXTS = [MIT, *OTHER, "The Software is provided as is, without warranty of any kind."]


def _writer(cfg: Any, path: Path, arch: str) -> gguf_lib.GGUFWriter:
    """A GGUF writer for a tiny float32 `arch` model with the keys every architecture has."""
    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(gguf_lib.LlamaFileType.ALL_F32)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    return writer


def _finish(writer: gguf_lib.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- a tiny llama GGUF (byte-level BPE tokenizer, like SmolLM2) -----------------------------------

def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (transformers' GGUF loader undoes it)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_llama_gguf(model, tokenizer, path: Path) -> None:
    cfg = model.config
    writer = _writer(cfg, path, "llama")
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_token_types([T.CONTROL if t in tokenizer.all_special_tokens else T.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    names = gguf_lib.get_tensor_name_map(gguf_lib.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        array = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            array = _llama_permute(array, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            array = _llama_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    _finish(writer)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple:
    """(source HF model, folder holding tiny.gguf)."""
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama-gguf")
    write_llama_gguf(model, tiny_tokenizer, folder / "tiny.gguf")
    return model, folder


def _ids(n: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, 290, (2, n), generator=gen)


def test_converted_once_and_logits_equal_direct_gguf_loading(llama_gguf: tuple, memcirc_cache: Path) -> None:
    source, folder = llama_gguf
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu")
    loaded = load(spec)
    sha = hashlib.sha256((folder / "tiny.gguf").read_bytes()).hexdigest()
    converted = memcirc_cache / "gguf" / sha
    assert (gguf.read_marker(converted) or {})["gguf_sha256"] == sha
    assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()
    assert (converted / "tokenizer.json").is_file() and not (converted / "tokenizer.model").exists()
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        logits = loaded.model(ids).logits
        assert torch.equal(logits, direct(ids).logits)   # the conversion changes no weight
        assert (logits - source(ids).logits).abs().max() <= 1e-5
    ident = loaded.identity()
    assert (ident["gguf_file"], ident["gguf_sha256"], ident["converted_path"]) == ("tiny.gguf", sha, str(converted))
    assert ident["local_path"] == str(folder.resolve())
    assert weights_key(loaded)["gguf_sha256"] == sha == results_key(loaded)["gguf_sha256"]


def test_second_load_reads_the_conversion(llama_gguf: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = llama_gguf
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu")
    first = load(spec)
    marker = Path(first.identity()["converted_path"]) / gguf.MARKER
    stamp = marker.stat().st_mtime_ns

    def no_conversion(*_args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_write_conversion", no_conversion)
    # nor re-hashed: the sha256 is remembered by (path, size, mtime)
    monkeypatch.setattr(gguf.art, "sha256_file", no_conversion)
    again = load(spec)
    assert marker.stat().st_mtime_ns == stamp
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, first.model(ids).logits)
    assert again.identity()["gguf_sha256"] == first.identity()["gguf_sha256"]


def test_sha256_is_hashed_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"a" * 100)
    assert gguf.gguf_file(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"GGUF" + b"b" * 101)
    assert gguf.gguf_file(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_incomplete_folder_is_never_used(llama_gguf: tuple) -> None:
    """A folder without its marker (a crash, a copy cut short) is converted again, not loaded."""
    _, folder = llama_gguf
    src = gguf.gguf_file(folder / "tiny.gguf")
    src.folder.mkdir(parents=True)
    (src.folder / "config.json").write_text("{}")
    assert gguf.converted(src) is None
    assert gguf.convert(src) == src.folder and gguf.read_marker(src.folder) is not None
    assert not list(src.folder.parent.glob(".tmp-*"))


def test_config_and_tokenizer_before_conversion(llama_gguf: tuple, memcirc_cache: Path, tiny_tokenizer) -> None:
    """Cheap checks before the weights load read the GGUF's metadata: no conversion; the same
    tokenizer as the conversion's."""
    _, folder = llama_gguf
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu")
    config, tokenizer = load_config_and_tokenizer(spec)
    assert not (memcirc_cache / "gguf" / gguf.gguf_file(folder / "tiny.gguf").sha256).exists()
    assert config.model_type == "llama"
    loaded = load(spec)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
        assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    # transformers' GGUF tokenizer sets eos to the BOS token and adds BOS against the GGUF's word
    assert loaded.tokenizer.eos_token == tiny_tokenizer.eos_token
    assert load_config_and_tokenizer(spec)[1].get_vocab() == tokenizer.get_vocab()


def test_hub_gguf_through_the_hf_cache(llama_gguf: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = llama_gguf
    from huggingface_hub import constants

    commit = "c" * 40
    repo = tmp_path / "hub" / "models--org--tiny-gguf"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "tiny.gguf").write_bytes((folder / "tiny.gguf").read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load(ModelSpec("org/tiny-gguf", gguf_file="tiny.gguf", device="cpu"))
    ident = loaded.identity()
    assert (ident["commit_hash"], ident["local_path"]) == (commit, str(repo / "snapshots" / commit))
    assert ident["gguf_sha256"] == gguf.gguf_file(folder / "tiny.gguf").sha256
    with pytest.raises(InputError, match="neither a local folder nor in the Hugging Face cache"):
        load(ModelSpec("org/tiny-gguf", gguf_file="other.gguf", device="cpu"))


def test_convert_command(llama_gguf: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, folder = llama_gguf
    out = tmp_path / "converted"
    assert gguf.main(["convert", str(folder), "tiny.gguf", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    loaded = load(ModelSpec(str(out), device="cpu"))   # a plain HF folder, that knows its GGUF
    assert loaded.identity()["gguf_sha256"] == gguf.gguf_file(folder / "tiny.gguf").sha256
    assert gguf.main(["convert", str(folder), "tiny.gguf", "--out", str(out)]) == 0   # done: a no-op
    assert gguf.main(["convert", str(folder), "tiny.gguf"]) == 0                      # into the cache
    assert Path(capsys.readouterr().out.splitlines()[-1]).parent.parent == Path(os.environ[gguf.CACHE_ENV])


@pytest.mark.parametrize("case", ["missing", "not-gguf", "out-taken", "no-folder"])
def test_convert_command_bad_input(case: str, llama_gguf: tuple, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    _, folder = llama_gguf
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    argv = {"missing": [str(folder), "nope.gguf"], "not-gguf": [str(tmp_path), "x.gguf"],
            "out-taken": [str(folder), "tiny.gguf", "--out", str(tmp_path / "taken")],
            "no-folder": [str(tmp_path / "nowhere"), "tiny.gguf"]}[case]
    assert gguf.main(["convert", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert (tmp_path / "taken" / "file").read_text() == "x"


# --- a tiny gemma3 GGUF whose tokenizer transformers converts wrongly ------------------------------

def train_sentencepiece_like_bpe() -> tuple[Tokenizer, list[str], list[tuple[str, str]]]:
    """A BPE trained like Gemma's sentencepiece model (spaces as "▁", no prefix space, words and
    punctuation apart): (the tokenizer, its alphabet, its merges in rank order)."""
    corpus = [MIT] * 20 + OTHER * 5
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.Replace(" ", "▁")  # type: ignore[assignment]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[assignment]
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"), pre_tokenizers.Punctuation("isolated")])
    alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | set("\n\t"))
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=len(alphabet) + 300, show_progress=False,
                                                              initial_alphabet=alphabet))
    merges = [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    return tokenizer, alphabet, merges


def gemma_vocab(merges, alphabet, higher_first: bool = True) -> tuple[list[str], list[float], list[int]]:
    """Gemma's layout: control/unknown/user-defined pieces, 256 byte pieces, merged pieces, characters.

    Scores rank the merges as sentencepiece BPE's do (the merged piece's score decides; characters
    last), spread like a 262k vocabulary's (-rank**2: whole words far behind their parts, so the
    Unigram reading of them goes as wrong as on the real Gemma-3 GGUF). `higher_first=False` writes
    them the other way round (lower = earlier), which must make no difference.
    """
    sign = -1.0 if higher_first else 1.0
    rows = [("<pad>", 0.0, T.CONTROL), ("<eos>", 0.0, T.CONTROL), ("<bos>", 0.0, T.CONTROL),
            ("<unk>", 0.0, T.UNKNOWN), ("<mask>", 0.0, T.USER_DEFINED), ("<start_of_turn>", 0.0, T.USER_DEFINED),
            ("<end_of_turn>", 0.0, T.USER_DEFINED), ("  ", 0.0, T.USER_DEFINED)]
    rows += [(f"<0x{b:02X}>", 0.0, T.BYTE) for b in range(256)]
    pieces = [left + right for left, right in merges] + list(alphabet)
    rows += [(piece, sign * float(rank) ** 2, T.NORMAL) for rank, piece in enumerate(pieces)]
    return [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows]


def write_gemma3_gguf(model, vocab: tuple, path: Path) -> None:
    cfg = model.config
    tokens, scores, types = vocab
    writer = _writer(cfg, path, "gemma3")
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_tokenizer_model("llama")   # sentencepiece, as llama.cpp writes Gemma's
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    names = gguf_lib.get_tensor_name_map(gguf_lib.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        base, _, suffix = hf_name.rpartition(".")
        array = tensor.detach().float().numpy()
        if "norm" in base:
            array = array + 1.0   # llama.cpp stores Gemma's (1 + w) norm weights; transformers subtracts 1
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    _finish(writer)


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(the trained reference BPE, folder with tiny.gguf and flipped.gguf, embedding rows)."""
    reference, alphabet, merges = train_sentencepiece_like_bpe()
    vocab = gemma_vocab(merges, alphabet)
    model = build_tiny_model("gemma3", vocab_size=len(vocab[0]))
    folder = tmp_path_factory.mktemp("gemma-gguf")
    write_gemma3_gguf(model, vocab, folder / "tiny.gguf")
    write_gemma3_gguf(model, gemma_vocab(merges, alphabet, higher_first=False), folder / "flipped.gguf")
    return reference, folder, len(vocab[0])


def test_transformers_gemma_gguf_tokenizer_is_wrong(gemma_gguf: tuple) -> None:
    """Documents the bug this module fixes (transformers 4.57): a Unigram model over BPE scores."""
    _, folder, rows = gemma_gguf
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file="tiny.gguf")
    pieces = theirs.tokenize("Permission is hereby granted")
    assert "Permission" not in pieces and "▁hereby" not in pieces and len(pieces) > 4
    assert len(theirs) == rows - 1   # the tab rename collides with the "\t" piece: one id lost
    with pytest.raises(InputError, match="splits .* sample words that are single tokens"):
        check_tokenizer(theirs, rows, TEXTS)


@pytest.mark.parametrize("name", ["tiny.gguf", "flipped.gguf"])
def test_our_gemma_tokenizer_is_the_bpe_the_gguf_describes(gemma_gguf: tuple, name: str) -> None:
    reference, folder, rows = gemma_gguf
    tokenizer, fixes = from_gguf(folder / name)
    ours: Any = tokenizer
    assert any("gemma" in f for f in fixes)
    assert ours.tokenize("Permission is hereby granted") == ["Permission", "▁is", "▁hereby", "▁granted"]
    assert len(ours) == rows and ours.vocab_size == rows
    for text in TEXTS:   # two independent computations: the trained BPE and ours from the GGUF
        assert ours.tokenize(text) == reference.encode(text).tokens
    ids = ours("Permission")["input_ids"]
    assert ids[0] == ours.bos_token_id == 2 and ours.eos_token == "<eos>" and ours.pad_token == "<pad>"
    tricky = "Tab\tand  two spaces, é (bytes)\n<start_of_turn>user"
    ids = ours(tricky, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == tricky
    assert "▁▁" in ours.convert_ids_to_tokens(ids)          # the user-defined piece, matched on "▁▁"
    assert "<start_of_turn>" in ours.convert_ids_to_tokens(ids)
    assert ours.decode(ids, skip_special_tokens=True) == tricky.replace("<start_of_turn>", "")
    check = check_tokenizer(ours, rows, TEXTS)
    assert check.whole_words >= 20 and check.whole_words_split == 0 and not check.warnings


def test_score_direction_is_detected(gemma_gguf: tuple) -> None:
    _, alphabet, merges = train_sentencepiece_like_bpe()
    pieces, scores, types = gemma_vocab(merges, alphabet)
    assert higher_scores_merge_first(pieces, scores, [int(t) for t in types])
    assert not higher_scores_merge_first(pieces, [-s for s in scores], [int(t) for t in types])


def test_gemma_conversion_keeps_our_tokenizer_and_the_weights(gemma_gguf: tuple) -> None:
    reference, folder, rows = gemma_gguf
    loaded = load(ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu"))
    assert loaded.arch.family == "gemma3"
    assert loaded.tokenizer.tokenize(MIT) == reference.encode(MIT).tokens and len(loaded.tokenizer) == rows
    marker = gguf.read_marker(Path(loaded.identity()["converted_path"])) or {}
    assert any("gemma" in fix for fix in marker["tokenizer_fixes"])
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([encode(loaded.tokenizer, MIT)[:16]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, direct(ids).logits)


def test_a_gguf_as_tokenizer_override(llama_gguf: tuple, gemma_gguf: tuple) -> None:
    _, llama_folder = llama_gguf
    _, gemma_folder, _ = gemma_gguf
    loaded = load(ModelSpec(str(llama_folder), gguf_file="tiny.gguf", tokenizer=str(gemma_folder / "tiny.gguf"),
                            device="cpu"))
    assert loaded.tokenizer.tokenize("Permission is hereby granted") == ["Permission", "▁is", "▁hereby", "▁granted"]
    assert loaded.identity()["tokenizer"] == str(gemma_folder / "tiny.gguf")


def test_gemma3_gguf_refused_for_transformer_lens_without_converting(gemma_gguf: tuple, memcirc_cache: Path) -> None:
    _, folder, _ = gemma_gguf
    spec = ModelSpec(str(folder), gguf_file="tiny.gguf", device="cpu")
    assert check_model(spec).family == "gemma3"
    with pytest.raises(InputError, match="find_circuits needs TransformerLens: .*family gemma3"):
        check_model(spec, needs_tl=True, what="find_circuits")
    assert not list((memcirc_cache / "gguf").glob("[0-9a-f]*"))
