"""memcirc.models: device/dtype, load(spec) (local, Hub cache + revision, GGUF), TL conversion, preflight."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformer_lens.loading_from_pretrained as tl_loading
import transformers
from conftest import build_tiny_model

from memcirc import artifacts as art
from memcirc import hub
from memcirc import preflight as pipeline_preflight
from memcirc.errors import InputError
from memcirc.models import ModelSpec, load, loading, preflight, resolve_device, resolve_dtype
from memcirc.models.arch import SPECS, TL_HOOK_NAMES, dims, parallel_attn_mlp, tl_hook_name
from memcirc.models.tl import check_circuit_flags, to_hooked_transformer, weight_processing_of

REPO = Path(__file__).resolve().parent.parent
TL_FAMILIES = [f for f, spec in SPECS.items() if spec.tl_supported]
NO_TL_FAMILIES = [f for f, spec in SPECS.items() if not spec.tl_supported]
ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("memcirc_cache")   # GGUF conversions into a fresh cache per test


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def input_ids(loaded, n: int = 12) -> torch.Tensor:
    """A fixed batch of real token ids (2 x n)."""
    text = "To be, or not to be, that is the question: the quick brown fox."
    ids = loaded.tokenizer(text)["input_ids"][:n]
    return torch.tensor([ids, ids[::-1]])


# --- device and dtype ----------------------------------------------------------------------------

def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    accelerated = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert (resolve_device("auto").type != "cpu") == accelerated


@pytest.mark.parametrize("name", ["tpu", "gpu:0", "cuda:x", "cuda:-1", ""])
def test_bad_device_names_the_value_and_choices(name: str) -> None:
    with pytest.raises(InputError, match=r"device .* accepted: auto, cpu, cuda, cuda:N, mps") as err:
        resolve_device(name)
    assert repr(name) in one_line_error(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_unavailable_accelerator_is_an_input_error() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="is not available"):
            resolve_device(name)


def test_resolve_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16  # no GPU needed
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    for bad in ("fp32", "int8", "float64"):
        with pytest.raises(InputError, match=r"dtype .* accepted: auto, float32, bfloat16, float16") as err:
            resolve_dtype(bad, cpu)
        one_line_error(err)


# --- load: errors ----------------------------------------------------------------------------------

def test_model_spec_checks_spelling_at_construction() -> None:
    with pytest.raises(InputError, match="dtype 'fp16'"):
        ModelSpec("x", dtype="fp16")
    with pytest.raises(InputError, match="device 'gpu'"):
        ModelSpec("x", device="gpu")
    with pytest.raises(InputError, match="empty"):
        ModelSpec(" ")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        load(ModelSpec(str(tmp_path / "nope"), device="cpu"))
    assert str(tmp_path / "nope") in one_line_error(err)


def test_folder_without_config_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no config.json") as err:
        load(ModelSpec(str(tmp_path), device="cpu"))
    one_line_error(err)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match="is a file"):
        load(ModelSpec(str(tmp_path / "weights.bin"), device="cpu"))


def test_folder_without_tokenizer_or_weights(tmp_path: Path, tiny_tokenizer) -> None:
    model = build_tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    # the weights are checked first, from the folder listing (memcirc.models.weights)
    with pytest.raises(InputError, match=r"has no safetensors weights \(model.safetensors") as err:
        load(ModelSpec(str(tmp_path), device="cpu"))
    one_line_error(err)
    model.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="no usable tokenizer for") as err:
        load(ModelSpec(str(tmp_path), device="cpu"))
    one_line_error(err)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="cannot load the model weights from .*nope"):
        load(ModelSpec(str(tmp_path), device="cpu", attn_implementation="nope"))
    assert load(ModelSpec(str(tmp_path), device="cpu")).arch.family == "gpt2"


def test_unknown_family(tmp_path: Path) -> None:
    transformers.OPTConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    message = r"unsupported model_type 'opt'; supported families: .*gpt_neox"
    with pytest.raises(InputError, match=message) as err:
        load(ModelSpec(str(tmp_path), device="cpu"))
    one_line_error(err)


def test_bad_dtype_and_device_at_load(tiny_model_dirs: dict) -> None:
    spec = ModelSpec(str(tiny_model_dirs["gpt2"]), device="cpu")
    spec.dtype = "fp8"  # bypasses the construction check, as a mutated config would
    with pytest.raises(InputError, match="dtype 'fp8'"):
        load(spec)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda:3' is not available"):
            load(ModelSpec(str(tiny_model_dirs["gpt2"]), device="cuda:3"))


def test_hub_id_not_in_cache_is_one_clear_line() -> None:
    with pytest.raises(InputError, match="neither a local folder nor in the Hugging Face cache") as err:
        load(ModelSpec("nobody-here/no-such-model", device="cpu"))
    assert "Hub is unreachable" in one_line_error(err)


@pytest.fixture
def hub_down(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Hub unreachable (HF_ENDPOINT on a closed local port) and no offline choice of the user's (the
    tests' HF_HUB_OFFLINE=1 undone, also in the modules that copied it). Returns the host of every name
    lookup: the probe's is 127.0.0.1, a huggingface_hub request would look up huggingface.co (refused here,
    so no test reaches the network)."""
    import datasets.config
    import huggingface_hub.constants
    import transformers.utils.hub

    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for module, attribute in hub._IMPORTED_COPIES:
        monkeypatch.setattr(sys.modules[module], attribute, False)
    monkeypatch.setattr(hub, "_probed", None)
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counted(host, *args, **kwargs):
        lookups.append(host)
        if host != "127.0.0.1":
            raise socket.gaierror(socket.EAI_NONAME, "no network in tests")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counted)
    assert not (datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE
                or transformers.utils.hub.is_offline_mode())
    return lookups


def _offline_everywhere() -> bool:
    import datasets.config
    import huggingface_hub.constants
    import transformers.utils.hub

    return (os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
            and huggingface_hub.constants.HF_HUB_OFFLINE and transformers.utils.hub.is_offline_mode()
            and datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE)


def test_unreachable_hub_sets_offline_mode_and_fails_at_once(hub_down: list[str]) -> None:
    """One probe, no retries: offline mode is on everywhere and the miss is the usual clear line."""
    with pytest.raises(InputError, match="neither a local folder nor in the Hugging Face cache") as err:
        load(ModelSpec("nobody-here/no-such-model", device="cpu"))
    assert "Hub is unreachable" in one_line_error(err)
    assert _offline_everywhere()
    assert hub_down == ["127.0.0.1"]   # the probe only: huggingface_hub never tried the network
    with pytest.raises(InputError, match="no usable tokenizer for --tokenizer nobody-here/tok"):
        load(ModelSpec(str(REPO / "memcirc" / "testbed" / "model"), tokenizer="nobody-here/tok", device="cpu"))
    assert hub_down == ["127.0.0.1"]   # probed once per process


def test_unreachable_hub_dataset_names_the_way_out(hub_down: list[str]) -> None:
    from memcirc.sources import load_hub_dataset

    with pytest.raises(InputError) as err:
        load_hub_dataset("nobody-here/no-such-dataset", "train")
    message = one_line_error(err)
    assert "could not load dataset 'nobody-here/no-such-dataset'" in message
    assert "did not answer, so memcirc ran offline" in message and "local JSONL, Parquet or TXT file" in message
    assert _offline_everywhere() and hub_down == ["127.0.0.1"]


def test_no_probe_for_local_names_or_a_users_choice(hub_down: list[str], tiny_model_dirs: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    load(ModelSpec(str(tiny_model_dirs["gpt2"]), device="cpu"))
    assert hub_down == [] and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # the user wants the Hub: no probe, no offline mode
    assert not hub.offline_unless_reachable() and hub_down == []


def test_a_hub_that_answers_is_used(monkeypatch: pytest.MonkeyPatch, hub_down: list[str]) -> None:
    """An HTTP answer below 500 (here a local server's 404) counts as reachable: offline mode stays off."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert not hub.offline_unless_reachable()
    finally:
        thread.join(10)
        server.server_close()
    assert "HF_HUB_OFFLINE" not in os.environ and hub_down == ["127.0.0.1"]


def test_revision_and_gguf_file_need_the_right_source(tiny_model_dirs: dict) -> None:
    folder = str(tiny_model_dirs["gpt2"])
    with pytest.raises(InputError, match="only applies to Hub ids"):
        load(ModelSpec(folder, revision="step3000", device="cpu"))
    with pytest.raises(InputError, match="GGUF file 'x.gguf' not found"):
        load(ModelSpec(folder, gguf_file="x.gguf", device="cpu"))


def test_testbed_name_resolves_to_the_testbed_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loading, "MODEL_DIR", tmp_path / "absent")
    with pytest.raises(InputError, match=r"testbed model is not built yet .*absent.*make testbed"):
        load(ModelSpec("testbed", device="cpu"))


# --- load: success ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(SPECS))
def test_loaded_model_is_ready_for_inference(tiny_loaded: dict, tiny_model_dirs: dict, family: str) -> None:
    loaded = tiny_loaded[family]
    assert loaded.arch is SPECS[family]
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cpu")}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}  # auto on CPU
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token and loaded.pad_from_eos
    assert loaded.tokenizer.padding_side == "right"  # recorded, not changed
    ident = loaded.identity()
    json.dumps(ident)
    assert ident["local_path"] == str(tiny_model_dirs[family].resolve())
    assert (ident["family"], ident["dtype"], ident["device"]) == (family, "float32", "cpu")
    assert ident["n_params"] == sum(p.numel() for p in loaded.model.parameters())
    assert ident["revision"] is None and ident["commit_hash"] is None


def test_dtype_and_attn_implementation_are_passed_through(tiny_model_dirs: dict) -> None:
    loaded = load(ModelSpec(str(tiny_model_dirs["llama"]), dtype="bfloat16", device="cpu",
                            attn_implementation="eager"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    ident = loaded.identity()
    assert (ident["dtype"], ident["attn_implementation"]) == ("bfloat16", "eager")


def test_bare_string_and_tilde_paths(tiny_model_dirs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model_dirs["gpt_neo"]
    monkeypatch.setenv("HOME", str(folder.parent))
    loaded = load(f"~/{folder.name}")
    assert loaded.local_path == folder.resolve()


# --- Hub cache and revisions (offline) ---------------------------------------------------------------

_HUB_SCRIPT = """
import json, sys, torch
from memcirc.errors import InputError
from memcirc.models import ModelSpec, load
out = {}
for rev in ("step1000", "step3000"):
    loaded = load(ModelSpec("org/tiny-neox", revision=rev, device="cpu"))
    with torch.no_grad():
        logits = loaded.model(torch.arange(1, 11)[None]).logits[0, -1]
    out[rev] = {"identity": loaded.identity(), "logits": logits.tolist()}
try:
    load(ModelSpec("org/tiny-neox", revision="step9999", device="cpu"))
except InputError as err:
    out["missing_revision"] = str(err)
print(json.dumps(out))
"""


def test_revisions_load_from_the_hf_cache_offline(tmp_path: Path, tiny_tokenizer) -> None:
    """A fake HF hub cache with two revisions; a fresh process reads HF_HUB_CACHE at import."""
    repo = tmp_path / "hub" / "models--org--tiny-neox"
    sources = {}
    for i, rev in enumerate(("step1000", "step3000")):
        commit = f"{i + 1:040x}"
        sources[rev] = (commit, build_tiny_model("gpt_neox", seed=i))
        snapshot = repo / "snapshots" / commit
        sources[rev][1].save_pretrained(snapshot)
        tiny_tokenizer.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for rev, (commit, model) in sources.items():
        with torch.no_grad():
            expected = model(torch.arange(1, 11)[None]).logits[0, -1]
        assert torch.allclose(torch.tensor(out[rev]["logits"]), expected, atol=1e-6), rev
        ident = out[rev]["identity"]
        assert (ident["revision"], ident["commit_hash"]) == (rev, commit)
        assert ident["local_path"] == str(repo / "snapshots" / commit)
        # the content of the cached snapshot's weights, as for a local folder
        assert ident["weights_sha256"] == art.sha256_file(repo / "snapshots" / commit / "model.safetensors")
    assert out["step1000"]["logits"] != out["step3000"]["logits"]
    assert "neither a local folder nor in the Hugging Face cache" in out["missing_revision"]
    assert "revision step9999" in out["missing_revision"]


# --- GGUF --------------------------------------------------------------------------------------------

_CONV1D_GGUF = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")  # llama.cpp stores these [out, in]


def write_gpt2_gguf(model: transformers.GPT2LMHeadModel, tokenizer, path: Path) -> None:
    """Write `model` (fp32 tensors) and its byte-level BPE tokenizer as a llama.cpp-style GGUF."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("tiny-gpt2")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens
                            else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to token_embd; an absent output.weight tells transformers so
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        array = tensor.detach().float().numpy()
        if suffix == "weight" and gguf_name.rsplit(".", 1)[-1] in _CONV1D_GGUF:
            array = array.T
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple:
    # GGUF gpt2 metadata has no n_inner and takes vocab_size from the token list.
    model = build_tiny_model("gpt2", n_inner=None, vocab_size=len(tiny_tokenizer))
    folder = tmp_path_factory.mktemp("gguf")
    write_gpt2_gguf(model, tiny_tokenizer, folder / "tiny-f32.gguf")
    return model, folder


def test_gguf_file_loads_with_identical_logits(gguf_source: tuple, tiny_tokenizer) -> None:
    source, folder = gguf_source
    loaded = load(ModelSpec(str(folder), gguf_file="tiny-f32.gguf", device="cpu"))
    assert loaded.arch.family == "gpt2" and not (folder / "config.json").exists()
    # a GGUF is identified by its own file's sha256; its conversion is memcirc's and not hashed again
    assert loaded.identity()["weights_sha256"] is None and loaded.identity()["gguf_sha256"]
    text = "The quick brown fox jumps over the lazy dog."
    assert loaded.tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    ids = input_ids(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, source(ids).logits)
    assert loaded.identity()["gguf_file"] == "tiny-f32.gguf"
    tl = to_hooked_transformer(loaded)  # config from GGUF has no `architectures`: staged anyway
    with torch.no_grad():
        assert (tl(ids) - source(ids).logits).abs().max() <= ATOL


# --- TransformerLens ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tl_models(tiny_loaded: dict) -> dict:
    """(family, weight_processing) -> HookedTransformer."""
    return {(f, wp): to_hooked_transformer(tiny_loaded[f], wp)
            for f in TL_FAMILIES for wp in ("none", "tl_default")}


@pytest.mark.parametrize("family", TL_FAMILIES)
def test_tl_logits_equal_hf_logits(tiny_loaded: dict, tl_models: dict, family: str) -> None:
    loaded, tl = tiny_loaded[family], tl_models[(family, "none")]
    ids = input_ids(loaded)
    with torch.no_grad():
        hf_logits = loaded.model(ids).logits
        assert (tl(ids) - hf_logits).abs().max() <= ATOL  # with the auto-circuit flags on
        flags = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")
        assert all(getattr(tl.cfg, flag) for flag in flags)
        check_circuit_flags(tl)
        for flag in flags:
            getattr(tl, f"set_{flag}")(False)
        try:
            assert (tl(ids) - hf_logits).abs().max() <= ATOL  # and with them off
            with pytest.raises(InputError, match="lacks use_attn_result"):
                check_circuit_flags(tl)
        finally:
            for flag in flags:
                getattr(tl, f"set_{flag}")(True)


@pytest.mark.parametrize("family", TL_FAMILIES)
def test_tl_default_processing_keeps_log_probs(tiny_loaded: dict, tl_models: dict, family: str) -> None:
    loaded, tl = tiny_loaded[family], tl_models[(family, "tl_default")]
    ids = input_ids(loaded)
    with torch.no_grad():
        expected = loaded.model(ids).logits.log_softmax(-1)
        assert (tl(ids).log_softmax(-1) - expected).abs().max() <= ATOL
    assert weight_processing_of(tl) == "tl_default"
    assert weight_processing_of(tl_models[(family, "none")]) == "none"


@pytest.mark.parametrize("family", TL_FAMILIES)
def test_tl_model_is_frozen_and_shaped_like_hf(tiny_loaded: dict, tl_models: dict, family: str) -> None:
    loaded, tl = tiny_loaded[family], tl_models[(family, "none")]
    d = dims(loaded.model)
    assert not tl.training and not any(p.requires_grad for p in tl.parameters())
    assert (tl.cfg.n_layers, tl.cfg.d_model, tl.cfg.n_heads, tl.cfg.d_mlp, tl.cfg.d_vocab) == (
        d.n_layers, d.d_model, d.n_heads, d.d_mlp, d.d_vocab)
    assert tl.cfg.default_prepend_bos == loaded.arch.prepend_bos
    assert tl.cfg.parallel_attn_mlp == parallel_attn_mlp(loaded.model)
    if d.n_kv_heads < d.n_heads:
        assert tl.cfg.ungroup_grouped_query_attention
    for role in TL_HOOK_NAMES:
        if role == "resid_mid" and loaded.arch.parallel_attn_mlp:
            continue
        for layer in range(d.n_layers):
            assert tl_hook_name(role, layer) in tl.hook_dict, role


def test_tl_sequential_neox(tmp_path: Path, tiny_tokenizer) -> None:
    """TL hard-codes parallel_attn_mlp for NeoX; the ArchSpec override follows the config."""
    build_tiny_model("gpt_neox", use_parallel_residual=False).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load(ModelSpec(str(tmp_path), device="cpu"))
    tl = to_hooked_transformer(loaded)
    ids = input_ids(loaded)
    with torch.no_grad():
        assert (tl(ids) - loaded.model(ids).logits).abs().max() <= ATOL
    assert not tl.cfg.parallel_attn_mlp and not parallel_attn_mlp(loaded.model)


@pytest.mark.parametrize("family", NO_TL_FAMILIES)
def test_tl_unsupported_family(tiny_loaded: dict, family: str) -> None:
    message = rf"cannot convert family {family} .*supported: gpt2, gpt_neo"
    with pytest.raises(InputError, match=message) as err:
        to_hooked_transformer(tiny_loaded[family])
    one_line_error(err)


def test_tl_bad_weight_processing(tiny_loaded: dict) -> None:
    with pytest.raises(InputError, match="weight_processing 'fold'"):
        to_hooked_transformer(tiny_loaded["gpt2"], "fold")


@pytest.mark.gpu
@pytest.mark.parametrize("family", TL_FAMILIES)
def test_load_and_tl_on_the_gpu(tiny_model_dirs: dict, family: str) -> None:
    """dtype auto is bf16 on a GPU; TL conversion keeps every tensor there (GPT-Neo's converter
    made CPU biases that broke fold_ln on CUDA)."""
    auto = load(ModelSpec(str(tiny_model_dirs[family])))
    assert auto.device.type != "cpu"
    assert {p.dtype for p in auto.model.parameters()} == {torch.bfloat16}
    loaded = load(ModelSpec(str(tiny_model_dirs[family]), dtype="float32"))
    ids = input_ids(loaded).to(loaded.device)
    with torch.no_grad():
        expected = loaded.model(ids).logits.log_softmax(-1)
        for processing in ("none", "tl_default"):
            tl = to_hooked_transformer(loaded, processing)
            assert {p.device for p in tl.parameters()} == {ids.device}
            assert (tl(ids).log_softmax(-1) - expected).abs().max() <= ATOL


# --- preflight: family and TransformerLens support from config.json alone --------------------------

def _neutral_config_dir(tmp_path: Path, family: str) -> Path:
    """config.json with `architectures`, in a folder whose path TL does not sniff as a model name."""
    folder = tmp_path / "m"
    folder.mkdir()
    hf_config = build_tiny_model(family).config
    config = {**hf_config.to_dict(), "architectures": [SPECS[family].hf_architecture]}
    for tl_key, hf_attr in SPECS[family].tl_hf_config_aliases.items():  # as tl._stage_folder writes them
        config.setdefault(tl_key, getattr(hf_config, hf_attr))
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


@pytest.mark.parametrize("family", list(SPECS))
def test_tl_support_in_arch_matches_transformer_lens(family: str, tmp_path: Path) -> None:
    """`ArchSpec.tl_supported` is what TransformerLens 2.18 itself can do with a config.json."""
    folder = _neutral_config_dir(tmp_path, family)
    if SPECS[family].tl_supported:
        assert tl_loading.convert_hf_model_config(str(folder))["original_architecture"] == SPECS[family].hf_architecture
    else:
        with pytest.raises(NotImplementedError, match="is not currently supported"):
            tl_loading.convert_hf_model_config(str(folder))


@pytest.mark.parametrize("family", list(SPECS))
def test_preflight_from_config_alone(family: str, tiny_model_dirs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_weights)
    spec = ModelSpec(str(tiny_model_dirs[family]), device="cpu")
    assert preflight.check_model(spec).family == family
    if SPECS[family].tl_supported:
        preflight.check_model(spec, needs_tl=True)
    else:
        with pytest.raises(InputError, match=rf"find_circuits needs TransformerLens: .*family {family}") as err:
            preflight.check_model(spec, needs_tl=True, what="find_circuits")
        one_line_error(err)


def test_preflight_does_not_convert_a_gguf(gguf_source: tuple, memcirc_cache: Path) -> None:
    _, folder = gguf_source
    assert preflight.check_model(ModelSpec(str(folder), gguf_file="tiny-f32.gguf"), needs_tl=True).family == "gpt2"
    assert not (memcirc_cache / "gguf").exists() or not any((memcirc_cache / "gguf").glob("[0-9a-f]*"))


def test_preflight_command(tiny_model_dirs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert preflight.main(["--model", str(tiny_model_dirs["llama"]), "--needs-tl"]) == 0
    assert preflight.main(["--model", str(tiny_model_dirs["gemma3"])]) == 0
    for argv in (["--model", str(tiny_model_dirs["gemma3"]), "--needs-tl"], ["--model", str(tmp_path / "nope")],
                 ["--needs-tl"]):
        assert preflight.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_pipeline_preflight_checks_each_stage(tiny_model_dirs: dict) -> None:
    gemma = ["--model", str(tiny_model_dirs["gemma3"])]
    pipeline_preflight.check_stages(["memorization_score", "contrastive_dataset", "attention_bypass"], gemma)
    pipeline_preflight.check_stages(["training_dynamics"], [*gemma, "--no-circuits"])
    for stage in ("find_circuits", "verify_circuit", "training_dynamics"):
        with pytest.raises(InputError, match=f"{stage} needs TransformerLens"):
            pipeline_preflight.check_stages(["memorization_score", stage], gemma)
    pipeline_preflight.check_stages(["find_circuits"], ["--model", str(tiny_model_dirs["qwen2"])])


def test_head_scores_are_skipped_where_transformer_lens_cannot_convert(tiny_model_dirs: dict) -> None:
    import logging

    from memcirc.dynamics.heads import head_scores_possible
    from memcirc.models import ModelSpec

    assert head_scores_possible(True, ModelSpec(str(tiny_model_dirs["qwen2"])))
    assert not head_scores_possible(False, ModelSpec(str(tiny_model_dirs["qwen2"])))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append   # type: ignore[method-assign]  (the stage's log setup may stop propagation)
    logger = logging.getLogger("memcirc.dynamics.heads")
    logger.addHandler(handler)
    try:
        assert not head_scores_possible(True, ModelSpec(str(tiny_model_dirs["gemma3"])))
    finally:
        logger.removeHandler(handler)
    text = " ".join(r.getMessage() for r in records)
    assert "head scores needs TransformerLens" in text and "skipped" in text


def test_circuit_stage_refuses_gemma3_before_reading_anything(tiny_model_dirs: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from memcirc.cli import main

    for stage in ("find_circuits", "verify_circuit"):
        assert main(stage, ["--model", str(tiny_model_dirs["gemma3"]), "--output-dir", str(tmp_path)]) == 2
        assert "needs TransformerLens" in capsys.readouterr().err   # not "no contrastive pairs"


def test_run_pipeline_refuses_gemma3_before_the_first_stage(tiny_model_dirs: dict, tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(REPO / "run_pipeline.sh"), "--config", str(REPO / "configs" / "testbed.yaml"),
                          "--output-dir", str(tmp_path / "run"), "--model", str(tiny_model_dirs["gemma3"])],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "find_circuits needs TransformerLens" in run.stderr and "== memorization_score" not in run.stdout
    assert not (tmp_path / "run").exists()
