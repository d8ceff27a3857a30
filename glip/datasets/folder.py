"""`folder:DIR` — a folder of images with same-stem `.txt` captions (img2dataset's "files" layout:
`00000/000000012.jpg` + `00000/000000012.txt` + optional `.json`), nested folders allowed.

Records come in sorted order of their relative paths; the key is that path without its extension.
An image without a caption file is yielded with `caption=None` (a labeller rejects it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from glip.errors import DataError

from .records import IMAGE_EXTENSIONS, Dataset, Record
from .writers import atomic_write_bytes, image_bytes


def read_text(data: bytes, where: str) -> tuple[str | None, str | None]:
    """(caption, error): UTF-8 text without surrounding whitespace."""
    try:
        return data.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        return None, f"{where}: caption is not UTF-8 text"


class FolderDataset(Dataset):
    def __init__(self, root: str | Path, spec: str = ""):
        super().__init__(spec or f"folder:{root}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.spec}: folder not found: {self.root}")
        self._images = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                               and p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)),
                              key=lambda p: p.relative_to(self.root).as_posix())

    def __len__(self) -> int:
        return len(self._images)

    def _records(self) -> Iterator[Record]:
        for p in self._images:
            rel = p.relative_to(self.root).as_posix()
            caption, error, meta = None, None, {}
            txt = p.with_suffix(".txt")
            if txt.is_file():
                caption, error = read_text(txt.read_bytes(), str(txt))
            side = p.with_suffix(".json")
            if side.is_file():
                try:
                    meta = json.loads(side.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    error = error or f"{side}: not valid JSON"
            yield Record(key=rel.rsplit(".", 1)[0], file_name=rel, image=p, caption=caption, error=error,
                         meta=meta if isinstance(meta, dict) else {})


def write_folder(records: Iterable[Record], out_dir: str | Path) -> int:
    """Write each record as `<file_name>` (image) + same-stem `.txt` (caption). Returns the count."""
    out = Path(out_dir)
    n = 0
    for r in records:
        path = out / r.file_name
        data, ext = image_bytes(r, Path(r.file_name).suffix.lower())
        if ext != path.suffix.lower():
            path = path.with_suffix(ext)
        atomic_write_bytes(path, data)
        if r.caption is not None:
            atomic_write_bytes(path.with_suffix(".txt"), r.caption.encode("utf-8"))
        n += 1
    return n


__all__ = ["FolderDataset", "read_text", "write_folder"]
