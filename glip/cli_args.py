"""Argument checking shared by every `python -m glip` command: one-line errors, never a traceback.

    p = Parser(prog="python -m glip")                      # parse errors: "error: …" on one line, exit 2
    s.add_argument("--n", type=positive_int, default=200)  # 0, -3, "x" → one-line error
    s.add_argument("--device", type=device, default="auto")
    s.add_argument("--threads", type=threads, default=None)
    sys.exit(run_command(a.fn, a))                         # GLIPError → "error: …", exit 2

Validators are argparse `type=` callables: they run while the command line is parsed, before any model
is loaded, and raise `argparse.ArgumentTypeError`, which argparse reports as "argument --n: …".
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, DataWarning, GLIPError

USAGE_ERROR = 2   # bad arguments or input (argparse's own code for usage errors)
INTERRUPTED = 130


def one_line(message: str) -> str:
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as ONE line on stderr ("error: …; see --help"), exit code 2.
    Subparsers made by `add_subparsers` are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with "-" and a digit ("-1/4", "-3e2") is a value, as argparse reads it from Python
        # 3.13 on; before, only plain negative numbers were, and "--shard -1/4" failed as "expected one argument"
        # instead of saying what is wrong with -1/4.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # noqa: D102 - argparse's hook
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def run_command(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; a user-facing error (GLIPError) becomes one stderr line and exit code 2. Anything else
    is a bug and keeps its traceback."""
    try:
        from . import gemm

        gemm.library()  # a bad GLIP_CPU_GEMM stops here, before any work
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(fn(args) or 0)
    except GLIPError as e:
        _close_progress_bars()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        _close_progress_bars()
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings as one line each; anything else as Python shows it."""
    if issubclass(category, DataWarning):
        tqdm = sys.modules.get("tqdm")  # above any progress bar, which stays
        write = getattr(getattr(tqdm, "tqdm", None), "write", None)
        text = f"warning: {one_line(message)}"
        write(text, file=sys.stderr) if write is not None else print(text, file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _close_progress_bars() -> None:
    """End the line of any progress bar the failed command left open, so that the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


# --- validators (argparse `type=`) ------------------------------------------------------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high] (high None: no upper bound)."""
    def check(text: str) -> int:
        v = _int(text)
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {'≥ ' + str(low) if high is None else f'in {low}..{high}'}, got {v}")
        return v
    check.__name__ = "int"  # argparse names the type in its messages
    return check


def float_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high]; `*_open` excludes that end."""
    def check(text: str) -> float:
        v = _float(text)
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            if math.isinf(high):
                raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '≥'} {low:g}, got {v:g}")
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {v:g}")
        return v
    check.__name__ = "float"
    return check


positive_int = int_range(1)            # counts: --n, --steps, --runs, --batch-size
nonnegative_int = int_range(0)         # offsets and seeds: --start, --seed
probability = float_range(0.0, 1.0)    # score thresholds
iou = float_range(0.0, 1.0, low_open=True)   # NMS / matching IoU thresholds
nonnegative_float = float_range(0.0, math.inf)


def threads(text: str) -> int:
    """CPU threads for torch: a whole number ≥ 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (the number of CPU threads), got {v}")
    return v


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N — and present on this machine ("cuda" on a CPU-only build is refused here)."""
    from .runtime import resolve_device

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return str(resolve_device(text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(one_line(e)) from None


def existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not p.exists() else f"{text} is not a file")
    return p


def existing_dir(text: str) -> Path:
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder" if not p.exists() else f"{text} is not a folder")
    return p


def output_path(text: str) -> Path:
    """A file to write: its folder must exist (nothing is created silently somewhere unexpected)."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {p.parent} does not exist")
    return p


def image_output(text: str) -> Path:
    """An image file to write, with an extension PIL can encode (.png, .jpg, …)."""
    from PIL import Image

    p = output_path(text)
    if p.suffix.lower() not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{text}: unknown image type {p.suffix or '(no extension)'!r}; use .png or .jpg")
    return p


__all__ = ["Parser", "run_command", "one_line", "int_range", "float_range", "positive_int", "nonnegative_int",
           "probability", "iou", "nonnegative_float", "threads", "device", "existing_file", "existing_dir",
           "output_path", "image_output", "USAGE_ERROR"]
