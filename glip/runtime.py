"""Where and how the model runs: device names and numeric precision (autocast).

One place turns what a user types ("auto", "cuda:1", "bf16") into torch objects, so that the library,
the CLI and the benchmarks refuse the same inputs with the same one-line messages.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

# The names `predict(precision=...)` accepts → the autocast dtype (None: plain fp32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "float32": None,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "mps" → a torch.device that exists here.

    Checked up front because torch reports a missing CUDA as an AssertionError deep inside `.to()`."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"Device {name!r} is not available: {why}; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"Device {name!r} is not available: {torch.cuda.device_count()} CUDA device(s) visible.")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"Device {name!r} is not available on this machine; use --device cpu.")
        return dev
    raise ConfigError(f"Unsupported device {name!r}; use auto, cpu, cuda or cuda:N.")


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32)."""
    if precision is None:
        return None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str | None):
    """A context that runs the enclosed ops in `precision` on `device`: nothing for fp32, torch.autocast otherwise.

    fp16 is CUDA-only: CPU kernels for half matmuls are slow or missing, bf16 is the CPU's reduced precision."""
    device = torch.device(device)
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and dtype == torch.float16:
        raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast", "autocast_dtype", "resolve_device"]
