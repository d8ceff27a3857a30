"""Where and how the model runs: device names and numeric precision (autocast).

One place turns what a user types ("auto", "cuda:1", "bf16") into torch objects, so that the library,
the CLI and the benchmarks refuse the same inputs with the same one-line messages.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import torch

from .errors import ConfigError

# The names `predict(precision=...)` accepts → the autocast dtype (None: plain fp32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "float32": None,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


# glibc serves an allocation from its own memory mapping, returned to the OS when freed, above this size.
# Its default threshold starts at 128 KiB but rises to the size of each large block freed (up to 32 MiB), so
# after the first predict the activations of the next ones are carved out of a heap that fragments and does
# not shrink. Every mapping is zero-filled by the kernel when first touched: a lower threshold saves more
# memory and costs more time (docs/performance.md).
HEAP_MMAP_THRESHOLD = 16 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_heap_policy = {"done": False, "applied": False}
_heap_lock = threading.Lock()


def fix_heap_threshold() -> bool:
    """With `GLIP_HEAP=bounded`: fix glibc's mmap threshold at `HEAP_MMAP_THRESHOLD`, so that freed activations
    go back to the OS (a lower peak RSS for a slower predict); once per process, at the first inference. Off by
    default, off Linux/glibc, and when the user set `MALLOC_MMAP_THRESHOLD_` (their own policy). Returns whether
    the threshold is fixed."""
    with _heap_lock:
        if not _heap_policy["done"]:
            _heap_policy["done"] = True
            if (sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ
                    and os.environ.get("GLIP_HEAP", "") == "bounded"):
                try:
                    libc = ctypes.CDLL(None)
                    _heap_policy["applied"] = bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
                except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                    pass
        return _heap_policy["applied"]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: its own high-water mark (VmHWM), not `ru_maxrss`, which Linux
    carries over from the parent at fork + exec (a child of a large process would report the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (bytes on macOS, KB elsewhere)

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def host_tiled(t: torch.Tensor) -> bool:
    """Whether inference on `t` runs in cache-sized tiles and in place (Swin's slices, banded norms, DyReLU's
    bands, the DCN's chunks): on the CPU, where that keeps the working set in cache and the peak memory low.
    On a GPU each tile is more kernel launches, and a branch on a tile's contents a host sync, for no gain:
    there the same work runs as a few whole-map kernels."""
    return t.device.type == "cpu"


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
    dtype = check_precision(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_precision(precision: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None for fp32); ConfigError where it cannot run. A long job
    calls it before its first write, so that it stops at once instead of failing every batch."""
    dtype = autocast_dtype(precision)
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    return dtype


__all__ = ["PRECISIONS", "autocast", "autocast_dtype", "check_precision", "fix_heap_threshold", "peak_rss_mb", "resolve_device"]
