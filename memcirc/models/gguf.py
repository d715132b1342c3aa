"""A GGUF model is converted once to a plain HF folder, cached by the GGUF's sha256.

Dequantizing a GGUF takes 25 s (SmolLM2-135M) to minutes and GBs of memory, and transformers' own
GGUF tokenizer is wrong for Gemma (`memcirc.models.gguf_tokenizer`). So the first load converts the
file into `<cache root>/gguf/<sha256>/` - safetensors weights (float32: dequantized values are exact
there), config.json, the corrected tokenizer - and every later load of any stage reads that folder.

The cache root is `$MEMCIRC_CACHE`, else `~/.cache/memcirc`. A folder is written under a temporary
name and renamed into place once complete; its marker file `memcirc_gguf.json` (written last) names
the GGUF (file name, size, sha256) and what the conversion corrected. A folder without a current
marker is never used. `python -m memcirc.models convert FOLDER FILE.gguf [--out DIR]` converts
ahead of time and prints the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.errors import InputError, exit_code
from memcirc.models.cache import CACHE_ENV, cache_root, sha256_cached

__all__ = ["CACHE_ENV", "GGUFFile", "cache_root", "convert", "converted", "gguf_file", "identity", "main",
           "read_marker"]

log = logging.getLogger(__name__)

MARKER = "memcirc_gguf.json"
# Bump when the conversion changes what it writes: folders of an older format are converted again.
FORMAT_VERSION = 2
_STALE_TEMP_S = 24 * 3600   # a temporary folder this old belongs to a conversion that died


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF file and its content hash."""

    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def folder(self) -> Path:
        """Where the cache keeps its conversion."""
        return cache_root() / "gguf" / self.sha256


def gguf_file(path: Path) -> GGUFFile:
    """The GGUF at `path` with its sha256 (hashed once: `memcirc.models.cache.sha256_cached`).

    Raises:
        InputError: no such file, or not a GGUF file.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"GGUF file {path} not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return GGUFFile(path, sha256_cached(path))


# -- the converted folder ----------------------------------------------------------------------

def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete conversion in `folder` (None: not one, or of an older format)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION else None


def converted(src: GGUFFile, out: Path | None = None) -> Path | None:
    """The complete conversion of `src` (in `out`, else the cache), or None when there is none yet."""
    folder = Path(out) if out is not None else src.folder
    marker = read_marker(folder)
    return folder if marker is not None and marker.get("gguf_sha256") == src.sha256 else None


def identity(folder: Path) -> dict[str, Any] | None:
    """What a manifest records of the GGUF a converted folder came from (None: not a conversion)."""
    marker = read_marker(folder)
    if marker is None:
        return None
    return {"gguf_file": marker["gguf_file"], "gguf_sha256": marker["gguf_sha256"],
            "converted_path": str(Path(folder).resolve())}


def convert(src: GGUFFile, out: Path | None = None) -> Path:
    """The folder holding the conversion of `src`: converted now unless it exists already.

    Args:
        src: the GGUF file.
        out: where to put it (default: the cache, `src.folder`). An existing `out` must be a
            conversion of the same file, or empty.

    Raises:
        InputError: `out` holds something else; the file cannot be converted.
    """
    folder = Path(out).expanduser().resolve() if out is not None else src.folder
    if (done := converted(src, folder)) is not None:
        return done
    if out is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--out {folder} exists and is not a conversion of {src.name}; "
                         "pass an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(cache_root() / "gguf" / "locks" / f"{src.sha256}.lock"):
        if (done := converted(src, folder)) is not None:   # another process converted it meanwhile
            return done
        _clean_stale_temps(folder.parent)
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            started = time.monotonic()
            log.info("converting %s (sha256 %s) to %s, once", src.path, src.sha256[:12], folder)
            _write_conversion(src, tmp)
            _move_into_place(tmp, folder)
            log.info("converted %s in %.1f s", src.name, time.monotonic() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_conversion(src: GGUFFile, tmp: Path) -> None:
    """Dequantize weights to float32, save them with the corrected tokenizer; the marker last."""
    import gguf as gguf_lib
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from memcirc.models.gguf_tokenizer import from_gguf
    from memcirc.models.tokenizer import quiet_tokenizer_warnings

    with quiet_tokenizer_warnings():
        tokenizer, fixes = from_gguf(src.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path.parent, trust_remote_code=False, gguf_file=src.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise InputError(f"cannot convert {src.path}: {str(err).strip().splitlines()[0][:300]}") from err
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for fix in fixes:
        log.info("GGUF tokenizer: %s", fix)
    art.write_json(tmp / MARKER, {
        "format": FORMAT_VERSION, "gguf_file": src.name, "gguf_sha256": src.sha256,
        "gguf_size": src.path.stat().st_size, "source_path": str(src.path),
        "dtype": "float32", "tokenizer_fixes": fixes,
        "versions": {"transformers": transformers.__version__, "gguf": _version(gguf_lib)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _version(module: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return "unknown"


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`; an outdated folder there is moved aside first."""
    if folder.exists():
        old = folder.parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
        folder.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(folder)


def _clean_stale_temps(parent: Path) -> None:
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One conversion of a file at a time (SLURM shards start together); best effort where the
    file system has no locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            log.debug("no lock on %s; converting without one", path)
        yield


# -- CLI ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m memcirc.models convert FOLDER FILE.gguf [--out DIR]`: print the folder."""
    parser = argparse.ArgumentParser(prog="python -m memcirc.models", allow_abbrev=False,
                                     description="Convert a GGUF model once to a safetensors folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", allow_abbrev=False,   # --o is not --out
                          help="convert FOLDER/FILE.gguf (default: into the cache) and print the folder")
    conv.add_argument("folder", help="the folder holding the GGUF file")
    conv.add_argument("file", help="the GGUF file name inside FOLDER")
    conv.add_argument("--out", help="write the folder here instead of the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def work() -> None:
        folder = Path(args.folder).expanduser()
        if not folder.is_dir():
            raise InputError(f"model folder {folder} does not exist")
        print(convert(gguf_file(folder / args.file), Path(args.out) if args.out else None))

    return exit_code(work)
