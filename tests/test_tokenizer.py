"""memcirc.models.tokenizer: the sanity check, the --tokenizer override, the quiet transformers warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import MIT_LICENCE as MIT
from conftest import build_tiny_model
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from memcirc.errors import InputError
from memcirc.models import ModelSpec, load
from memcirc.models.tl import to_hooked_transformer
from memcirc.models.tokenizer import (
    check_tokenizer,
    checked_documents,
    quiet_tokenizer_warnings,
    sample_texts,
    tokenizer_check_of,
)

EOT = "<|endoftext|>"


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def byte_bpe(vocab_size: int = 600, merges: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the MIT licence (whole-word tokens like 'Ġhereby'); with
    merges=False the same vocabulary without its merges: the "wrongly merged" broken tokenizer."""
    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tk.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    tk.train_from_iterator([MIT] * 10, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not merges:
        spec = json.loads(tk.to_str())
        spec["model"]["merges"] = []
        tk = Tokenizer.from_str(json.dumps(spec))
    return wrap(tk)


def char_level(n_extra: int) -> PreTrainedTokenizerFast:
    """One token per byte, padded with unused tokens to a large vocabulary."""
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    vocab.update({f"<extra_{i}>": len(vocab) + i for i in range(n_extra)})
    tk = Tokenizer(BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tk.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    return wrap(tk)


ROWS = len(byte_bpe())   # the licence, fully merged: every word one token


@pytest.fixture(scope="module")
def good() -> PreTrainedTokenizerFast:
    return byte_bpe()


# --- the sanity check -----------------------------------------------------------------------------

def test_a_good_tokenizer_passes_and_its_numbers_are_recorded(good: PreTrainedTokenizerFast) -> None:
    check = check_tokenizer(good, ROWS, [MIT, "The quick brown fox."])
    assert not check.warnings and check.round_trip == "exact"
    assert (check.tokenizer_len, check.embedding_rows, check.id_gaps) == (ROWS, ROWS, 0)
    assert check.sample_chars == len(MIT) + 1 + len("The quick brown fox.")
    assert check.chars_per_token == round(check.sample_chars / check.sample_tokens, 3) > 3
    assert check.whole_words >= 20 and check.whole_words_split == 0
    json.dumps(check.to_dict())


def test_a_wrongly_merged_tokenizer_is_refused(good: PreTrainedTokenizerFast) -> None:
    broken = byte_bpe(merges=False)
    assert broken.get_vocab() == good.get_vocab()   # same vocabulary: only the merges are wrong
    with pytest.raises(InputError, match=r"splits \d+ of \d+ sample words that are single tokens.*--tokenizer"):
        check_tokenizer(broken, ROWS, [MIT])


def test_a_char_level_tokenizer_with_a_large_vocabulary_is_refused() -> None:
    with pytest.raises(InputError, match=r"1\.\d\d characters per token with a 40,257-token vocabulary"):
        check_tokenizer(char_level(40_000), 40_257, [MIT])
    check = check_tokenizer(char_level(0), 257, [MIT])   # a small vocabulary may be char-level
    assert check.chars_per_token is not None and check.chars_per_token < 1.5


def test_sizes_against_the_embedding(good: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InputError, match=f"has {ROWS:,} tokens but the model's embedding only 400 rows") as err:
        check_tokenizer(good, 400, [MIT])
    assert "\n" not in str(err.value)
    assert any("is it this model's tokenizer" in w for w in check_tokenizer(good, 4 * ROWS, [MIT]).warnings)
    extra = byte_bpe()
    extra.add_special_tokens({"additional_special_tokens": ["<image>"]})
    warnings = check_tokenizer(extra, ROWS, [MIT]).warnings
    assert len(warnings) == 1 and "<image>" in warnings[0] and f"beyond the {ROWS} embedding rows" in warnings[0]


def test_a_lossy_round_trip_warns(good: PreTrainedTokenizerFast) -> None:
    vocab = {**{c: i for i, c in enumerate(sorted(set(MIT)))}, "[UNK]": len(set(MIT))}
    lossy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(BPE(vocab, [], unk_token="[UNK]")),
                                    unk_token="[UNK]")
    check = check_tokenizer(lossy, len(vocab), [MIT + " é"])
    assert check.round_trip == "lossy" and any("does not give the text back" in w for w in check.warnings)
    assert check_tokenizer(good, ROWS, []).round_trip is None   # token-id data: sizes only


def test_documents_pass_through_unchanged(good: PreTrainedTokenizerFast) -> None:
    class Doc:
        def __init__(self, i: int) -> None:
            self.text, self.i = f"{MIT} {i}", i

    docs, texts = sample_texts((Doc(i) for i in range(50)), chars=2000)
    assert len(texts) == -(-2000 // len(f"{MIT} 0")) and [d.i for d in docs] == list(range(50))
    checked = checked_documents((Doc(i) for i in range(5)), good, ROWS)
    assert [d.i for d in checked] == list(range(5))
    assert (tokenizer_check_of(good) or {})["whole_words_split"] == 0


# --- the stage refuses a broken tokenizer before the weights load --------------------------------

@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory, good: PreTrainedTokenizerFast) -> dict:
    root = tmp_path_factory.mktemp("tok-stage")
    model = root / "model"
    build_tiny_model("gpt2", vocab_size=ROWS).save_pretrained(model)
    good.save_pretrained(model)
    byte_bpe(merges=False).save_pretrained(root / "broken")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"{MIT} {i}"}) + "\n" for i in range(6)))
    return {"model": model, "broken": root / "broken", "data": data, "root": root}


def _score(stage_inputs: dict, out: Path, *extra: str) -> int:
    from memcirc.cli import main

    return main("memorization_score", ["--model", str(stage_inputs["model"]), "--dataset", str(stage_inputs["data"]),
                                       "--output-dir", str(out), "--device", "cpu", "--prefix-len", "8",
                                       "--suffix-len", "8", "--metrics", "exact", *extra])


def test_memorization_stage_records_the_check(stage_inputs: dict, tmp_path: Path) -> None:
    assert _score(stage_inputs, tmp_path) == 0
    manifest = json.loads((tmp_path / "memorization" / "manifest.json").read_text())
    check = manifest["model"]["tokenizer_check"]
    assert check["embedding_rows"] == ROWS and check["whole_words_split"] == 0 and check["round_trip"] == "exact"


def test_memorization_stage_refuses_a_broken_tokenizer(stage_inputs: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from memcirc.stages import memorization_score

    def no_weights(*_args: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(memorization_score, "load", no_weights)
    assert _score(stage_inputs, tmp_path, "--tokenizer", str(stage_inputs["broken"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single tokens of its own vocabulary" in err[0] and "--tokenizer" in err[0]
    assert not (tmp_path / "memorization" / "manifest.json").exists()


# --- the --tokenizer override -----------------------------------------------------------------------

def test_tokenizer_override_is_loaded_and_recorded(tiny_model_dirs: dict, stage_inputs: dict) -> None:
    loaded = load(ModelSpec(str(tiny_model_dirs["gpt2"]), tokenizer=str(stage_inputs["broken"]), device="cpu"))
    assert loaded.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(stage_inputs["broken"]).get_vocab()
    assert loaded.identity()["tokenizer"] == str(stage_inputs["broken"])


@pytest.mark.parametrize("case", ["missing", "a-file", "not-a-tokenizer"])
def test_bad_tokenizer_override(case: str, tiny_model_dirs: dict, tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    value, message = {"missing": (str(tmp_path / "nope"), "does not exist"),
                      "a-file": (str(tmp_path / "vocab.txt"), "is a file"),
                      "not-a-tokenizer": (str(tmp_path / "empty"), "no usable tokenizer")}[case]
    with pytest.raises(InputError, match=message) as err:
        load(ModelSpec(str(tiny_model_dirs["gpt2"]), tokenizer=value, device="cpu"))
    assert "\n" not in str(err.value)


# --- transformers' false "incorrect regex pattern" warning -----------------------------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_the_mistral_regex_warning_is_silenced(tmp_path: Path, transformers_warnings: list[str]) -> None:
    """transformers 4.57.6 warns for a local folder saved by itself with a > 100k vocabulary and a
    pre-tokenizer (any qwen2 model). TransformerLens conversion loads such a folder twice."""
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"tok{i}": len(vocab) + i for i in range(100_100)})
    tk = Tokenizer(BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tk.add_special_tokens([EOT])
    build_tiny_model("qwen2").save_pretrained(tmp_path)
    wrap(tk).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tmp_path)   # the trigger, unfiltered: the warning is real
    assert any("incorrect regex pattern" in m for m in transformers_warnings)
    transformers_warnings.clear()
    with quiet_tokenizer_warnings():
        AutoTokenizer.from_pretrained(tmp_path)
    loaded = load(ModelSpec(str(tmp_path), device="cpu"))
    to_hooked_transformer(loaded)
    assert not any("incorrect regex pattern" in m for m in transformers_warnings)
    AutoTokenizer.from_pretrained(tmp_path)   # the filter is scoped: outside, transformers is unchanged
    assert any("incorrect regex pattern" in m for m in transformers_warnings)
