"""A model's weight files: safetensors only, never pickle, and their content hash (`weights_sha256`).

memcirc loads weights with `from_pretrained(use_safetensors=True, trust_remote_code=False)`, so a pickle checkpoint
(`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) is never opened: torch's restricted unpickler is the
only barrier against a malicious one, and it has had bypasses. A folder without safetensors weights is
refused before anything loads (`weight_files`), naming the one-line conversion; a Hub repo without
them is refused before transformers would ask the Hub to convert it (`hub_has_safetensors`).

`weights_sha256` identifies the weights whatever the folder is called or where it lies: the sha256 of
`model.safetensors`, or of the `sha256sum`-style listing ("<sha256>  <name>" lines, by name) of the
index and its shards. Each file is hashed once (`memcirc.models.cache.sha256_cached`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.models.cache import sha256_cached

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# What transformers (or torch) would unpickle; a Hugging Face pickle is converted by from_pretrained.
HF_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100_000_000   # the safetensors format's own limit on the header


def weight_files(folder: Path, what: str | None = None) -> list[Path]:
    """The files `from_pretrained(folder, use_safetensors=True, trust_remote_code=False)` reads:
    model.safetensors, else the index and every shard it lists.

    Raises:
        InputError: only pickle weights, no weights, an unreadable index, or a shard missing.
    """
    folder = Path(folder)
    what = what or f"model folder {folder}"
    if (folder / SAFE_WEIGHTS).is_file():
        files = [folder / SAFE_WEIGHTS]
    elif (index := folder / SAFE_INDEX).is_file():
        files = [index, *(folder / name for name in _shard_names(index))]
    else:
        raise no_safetensors(folder, what)
    for path in files:
        if path.suffix == ".safetensors":
            _check_header(path)
    return files


def _check_header(path: Path) -> None:
    """A safetensors file is its header's length (8 bytes, little-endian), the header (a JSON object
    giving each tensor's byte range) and the tensor bytes, exactly: checked up front from the header
    alone, so a pickle renamed `.safetensors` or a truncated copy is refused before any stage writes."""
    if _described_size(path) != path.stat().st_size:
        raise InputError(f"{path} is not a complete safetensors file (its header does not describe its "
                         f"{path.stat().st_size} bytes): copy it again, or save the model with "
                         "save_pretrained(DIR, safe_serialization=True)")


def _described_size(path: Path) -> int | None:
    """The file size a safetensors header describes (None: no readable header)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= min(_MAX_HEADER, path.stat().st_size - 8):
                return None
            header = json.loads(fh.read(size))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + size + max(ends, default=0)


def _shard_names(index: Path) -> list[str]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index} is not a safetensors index (no readable weight_map): save the model again "
                         "with save_pretrained") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise InputError(f"{index} lists shard {name!r}, which is not a file name in its folder: save the "
                             "model again with save_pretrained")
        if not (index.parent / name).is_file():
            raise InputError(f"{index} lists shard {name}, which is not in {index.parent}: copy the whole folder")
    return names


def _pickles(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(
            (*PICKLE_SUFFIXES, HF_PICKLES[1])))
    except OSError:
        return []


def no_safetensors(folder: Path, what: str) -> InputError:
    """The one-line refusal of a folder without safetensors weights (naming the conversion)."""
    pickles = _pickles(folder)
    if not pickles:
        return InputError(f"{what} has no safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}): save the model "
                          "with save_pretrained(DIR, safe_serialization=True)")
    found = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
    if any(name.startswith("pytorch_model") for name in pickles):
        how = (f"python -c \"from transformers import AutoModelForCausalLM as M; "
               f"M.from_pretrained('{folder}', trust_remote_code=False)"
               f".save_pretrained('{folder}', safe_serialization=True)\"")
    else:
        how = (f"python -c \"import torch; from safetensors.torch import save_file; "
               f"save_file(torch.load('{folder / pickles[0]}', weights_only=True), "
               f"'{folder / SAFE_WEIGHTS}')\" (a plain state dict)")
    return InputError(f"{what} holds only pickle weights ({found}); memcirc never unpickles: convert it once to "
                      f"safetensors in an environment you trust: {how}")


def _cached(repo: str, names: Sequence[str], revision: str | None) -> bool:
    return any(isinstance(try_to_load_from_cache(repo, name, revision=revision), str) for name in names)


def hub_has_safetensors(repo: str, revision: str | None) -> bool | None:
    """Whether a Hub repo (at `revision`) has safetensors weights: True when cached or on the Hub (then
    downloaded); False when the Hub says it has neither file, or, offline, the cache holds only a pickle;
    None when that cannot be told (offline and nothing cached)."""
    names = (SAFE_WEIGHTS, SAFE_INDEX)
    if _cached(repo, names, revision):
        return True
    for name in names:
        try:
            hf_hub_download(repo, name, revision=revision)
            return True
        except LocalEntryNotFoundError:   # offline, or the Hub unreachable (a subclass of the next)
            return False if _cached(repo, HF_PICKLES, revision) else None
        except EntryNotFoundError:        # the Hub answered: no such file
            continue
        except OSError:                   # another HTTP or connection error
            return None
    return False


def weights_sha256(files: Sequence[Path]) -> str:
    """The content hash of a model's weight files (`weight_files`): one file's own sha256, or the
    sha256 of the `sha256sum` listing of several, sorted by name (so it can be checked by hand)."""
    digests = sorted((Path(f).name, sha256_cached(Path(f))) for f in files)
    if len(digests) == 1:
        return digests[0][1]
    return art.sha256_bytes("".join(f"{sha}  {name}\n" for name, sha in digests).encode())
