"""safetensors files laid out and read for a model that takes the file's tensors as its own.

The format: an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte range; padding
with spaces allowed), then the tensors' bytes with no holes. The safetensors library packs tensors at 8-byte
alignment and returns views of a memory map; a model would have to copy those (two copies of the weights at
the peak while the mapped pages are resident) and unaligned operands take other kernel paths.

Written here: the header padded so the data starts at a 64-byte boundary, and the tensors whose size is a
multiple of 64 bytes first, so that each of them starts aligned (at GLIP widths nearly every weight).
Read here: an aligned tensor is a copy-on-write view of a memory map (on disk until used, like an official
`.pth` loaded with torch's mmap); any other is read into fresh memory with a plain file read. The library
reads these files unchanged (tests/test_model.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

ALIGNMENT = 64  # bytes: c10's CPU allocator alignment

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write CPU tensors as a safetensors file with 64-byte aligned data (see the module docstring)."""
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGNMENT != 0, k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _NAMES:
            raise TypeError(f"{k}: dtype {t.dtype} cannot be stored")
        header[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in order:
            if tensors[k].numel():
                f.write(_bytes(tensors[k].detach().cpu()))


def read_header(path: str | Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """The header of a safetensors file, checked against the file's size: (where the data starts, name →
    (dtype, shape, first byte, end byte) relative to it). Nothing else is read. A damaged header raises
    CheckpointError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
            shape, (begin, end) = tuple(int(d) for d in info["shape"]), (int(o) for o in info["data_offsets"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0 or 8 + n + end > size:
                raise ValueError(f"{name}: data offsets {begin}..{end} do not hold a {info['dtype']} {list(shape)} tensor")
            entries[name] = (dtype, shape, begin, end)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    return 8 + n, entries


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file: aligned ones memory-mapped (copy-on-write), the others read into
    fresh memory. A damaged file raises CheckpointError."""
    path = Path(path)
    start, entries = read_header(path)
    mapped, out = None, {}
    try:
        with open(path, "rb") as f:
            for name, (dtype, shape, begin, end) in entries.items():
                pos = start + begin
                if end > begin and pos % ALIGNMENT == 0:  # the map starts at a page, so the address is aligned too
                    if mapped is None:
                        mapped = np.memmap(path, dtype=np.uint8, mode="c")
                    out[name] = torch.from_numpy(mapped[pos:start + end]).view(dtype).view(shape)
                    continue
                t = torch.empty(shape, dtype=dtype)
                f.seek(pos)
                if end > begin and f.readinto(_bytes(t)) != end - begin:
                    raise ValueError(f"{name}: the file ends inside its data")
                out[name] = t
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    return out
