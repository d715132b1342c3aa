"""Device and dtype resolution: the one place that names accelerator backends.

Library code elsewhere takes a `torch.device` from `resolve_device` and never spells a backend name,
so the same code runs on a laptop (cpu/mps) and on a GPU node.
"""

from __future__ import annotations

import os
import re

import torch

from memcirc.errors import InputError

_CUDA = "cuda"
DEVICE_CHOICES = ("auto", "cpu", _CUDA, f"{_CUDA}:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def _bad_device(name: str, why: str) -> InputError:
    return InputError(f"device {name!r} {why}; accepted: {', '.join(DEVICE_CHOICES)}")


def check_device_name(name: str) -> str:
    """Normalize a device flag and check its spelling only (not whether the device exists here).

    Raises:
        InputError: the name is not one of `DEVICE_CHOICES`.
    """
    norm = str(name).strip().lower()
    if norm not in ("auto", "cpu", "mps") and re.fullmatch(rf"{_CUDA}(:\d+)?", norm) is None:
        raise _bad_device(name, "is not a device name")
    return norm


def check_dtype_name(name: str) -> str:
    """Normalize a dtype flag and check its spelling.

    Raises:
        InputError: the name is not one of `DTYPE_CHOICES`.
    """
    norm = str(name).strip().lower()
    if norm not in DTYPE_CHOICES:
        raise InputError(f"dtype {name!r} is not supported; accepted: {', '.join(DTYPE_CHOICES)}")
    return norm


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS: 2 torch threads on 2 shared cores run 3-40x slower."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def resolve_device(name: str) -> torch.device:
    """Turn a device flag into a `torch.device`.

    Args:
        name: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".

    Returns:
        The device.

    Raises:
        InputError: an unknown name, or an accelerator that is not available here.
    """
    name = check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(_CUDA)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise _bad_device(name, "is not available on this machine")
        return torch.device("mps")
    index = int(name.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise _bad_device(name, f"is not available ({torch.cuda.device_count()} GPUs visible)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """Turn a dtype flag into a `torch.dtype`.

    Args:
        name: "auto" (float32 on CPU, bfloat16 on an accelerator), "float32", "bfloat16", "float16".
        device: where the model will run (decides "auto").

    Raises:
        InputError: an unknown dtype name.
    """
    name = check_dtype_name(name)
    if name == "auto":
        # CPU kernels are fastest and exact in fp32; accelerators get bf16 (fp32 range, half memory).
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The flag spelling of a torch dtype ("float32", ...), for manifests."""
    return str(dtype).removeprefix("torch.")
