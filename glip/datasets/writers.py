"""What every writer shares: atomic files (temporary name, then `os.replace`) and image bytes.

A reader never sees a half-written file: a killed writer leaves at most a `*.tmp` behind, which the
next write of the same file replaces.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

from PIL import Image


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(out_dir: str | Path) -> Path:
    """Create `out_dir` and prove a file can be written and renamed there (ConfigError otherwise): what a long
    job checks before any work, so that a bad output folder fails in seconds rather than after hours."""
    from glip.errors import ConfigError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = atomic_write_text(out / ".write-test", "ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {out} ({e.strerror or e.__class__.__name__})") from None
    return out


@contextlib.contextmanager
def output_folder(out_dir: str | Path):
    """`check_writable(out_dir)` for the block's duration; if the block fails and the folder was created here
    and is still empty, it is removed again (a command that stops before writing leaves nothing behind)."""
    out = Path(out_dir)
    created = not out.exists()
    check_writable(out)
    try:
        yield out
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only an empty folder goes
        raise


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def image_bytes(record, ext: str = ".png") -> tuple[bytes, str]:
    """(encoded bytes, extension) of a record's image: files and tar members are copied as they are
    (no re-encoding), decoded images are written as PNG (lossless)."""
    src = record.image
    if callable(src) and not isinstance(src, Image.Image):
        src = src()
    if isinstance(src, (str, Path)):
        return Path(src).read_bytes(), Path(src).suffix.lower() or ext
    if isinstance(src, (bytes, bytearray)):
        return bytes(src), ext if ext else ".jpg"
    if isinstance(src, Image.Image):
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    raise TypeError(f"{record.key}: no image to write")


__all__ = ["atomic_write_bytes", "atomic_write_text", "image_bytes", "jsonl_bytes"]
