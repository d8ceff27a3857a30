"""`jsonl:` `csv:` `tsv:` `parquet:` — a manifest of image–caption pairs, one row each.

The image column holds a path relative to the manifest's folder (absolute paths work too; in Parquet
it may also hold the encoded image bytes, or a {"bytes": ...} struct as Hugging Face datasets store
it). Column names are options of the spec: `jsonl:pairs.jsonl?image=path&caption=text`. Rows are
streamed; a malformed row (invalid JSON, missing column) is yielded with an `error` naming the file
and line, and the run goes on. A column that the header (CSV, TSV), the schema (Parquet) or the first
row (JSONL) lacks is a DataError when the dataset is opened.
"""
from __future__ import annotations

import csv
import json
from contextlib import closing
from pathlib import Path
from typing import Iterable, Iterator

from glip.errors import DataError

from .records import Dataset, Record
from .writers import atomic_write_bytes, image_bytes, jsonl_bytes


class ManifestDataset(Dataset):
    def __init__(self, path: str | Path, fmt: str, spec: str = "", image: str = "image", caption: str = "caption",
                 key: str | None = None):
        """`key`: the column holding each pair's stable key (default: "key" where rows have one, else the
        row number)."""
        super().__init__(spec or f"{fmt}:{path}")
        if fmt not in ("jsonl", "csv", "tsv", "parquet"):
            raise DataError(f"unknown manifest format {fmt!r}")
        self.path, self.fmt = Path(path), fmt
        self.image_col, self.caption_col, self.key_col = image, caption, key or "key"  # "key": when rows have one
        self.root = self.path.parent
        if fmt in ("csv", "tsv"):
            with self.path.open(newline="", encoding="utf-8", errors="replace") as f:
                header = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
            missing = [c for c in (image, caption, key) if c and c not in header]  # key: only when asked for
            if missing:
                raise DataError(f"{self.path}: no column {missing[0]!r} in the header (columns: {', '.join(header)})")
        if fmt == "jsonl":
            self._check_first_row(image, caption, key)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                self._pq = pq.ParquetFile(self.path)
            except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
                raise DataError(f"{self.path}: not a Parquet file ({e.__class__.__name__})") from e
            names = self._pq.schema_arrow.names
            missing = [c for c in (image, caption, key) if c and c not in names]
            if missing:
                raise DataError(f"{self.path}: no column {missing[0]!r} (columns: {', '.join(names)})")

    def _check_first_row(self, *columns: str | None) -> None:
        """JSONL has no header: the first row stands for it, so that a column option naming a key the
        rows do not have stops the run at open instead of rejecting every row. Later rows that lack a
        key are still rejected one by one."""
        with closing(self._rows()) as rows:
            line_no, row, _ = next(rows, (0, None, None))
        if row is None:  # an empty file, or a first row that is not a JSON object (rejected as such)
            return
        missing = [c for c in columns if c and c not in row]  # key: only when asked for
        if missing:
            raise DataError(f"{self.path}:{line_no}: no key {missing[0]!r} in the first row "
                            f"(keys: {', '.join(row) or 'none'})")

    def __len__(self) -> int:
        if self.fmt == "parquet":
            return self._pq.metadata.num_rows
        if self.fmt == "jsonl":
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        with self.path.open(newline="", encoding="utf-8", errors="replace") as f:
            return max(sum(1 for _ in csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ",")) - 1, 0)

    def _rows(self) -> Iterator[tuple[int, dict | None, str | None]]:
        """(line number, row, error)."""
        if self.fmt == "jsonl":
            with self.path.open("rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        yield line_no, None, f"{self.path}:{line_no}: invalid JSON"
                        continue
                    yield line_no, row if isinstance(row, dict) else None, \
                        None if isinstance(row, dict) else f"{self.path}:{line_no}: not a JSON object"
        elif self.fmt in ("csv", "tsv"):
            with self.path.open(newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f, delimiter="\t" if self.fmt == "tsv" else ",")
                for row in reader:
                    yield reader.line_num, row, None
        else:
            line_no = 0
            for batch in self._pq.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    line_no += 1
                    yield line_no, row, None

    def _records(self) -> Iterator[Record]:
        for i, (line_no, row, error) in enumerate(self._rows()):
            where = f"{self.path}:{line_no}"
            key = f"{i:09d}"
            if error is not None:
                yield Record(key=key, file_name="", error=error)
                continue
            if row.get(self.key_col) not in (None, ""):
                key = str(row[self.key_col])
            if row.get(self.image_col) in (None, ""):
                yield Record(key=key, file_name="", error=f"{where}: no {self.image_col!r} value")
                continue
            img = row[self.image_col]
            if isinstance(img, dict):  # Hugging Face image struct
                img = img.get("bytes") or img.get("path")
            if isinstance(img, (bytes, bytearray)):
                image, file_name = bytes(img), f"{key}.jpg"
            else:
                file_name = str(img)
                p = Path(file_name).expanduser()
                image = p if p.is_absolute() else self.root / p
            caption, cap_error = row.get(self.caption_col), None
            if caption is None:
                cap_error = f"{where}: no {self.caption_col!r} value"
            elif not isinstance(caption, str):
                caption, cap_error = None, f"{where}: caption is not text ({type(caption).__name__})"
            else:
                caption = caption.strip()
            meta = {k: v for k, v in row.items() if k not in (self.image_col, self.caption_col)
                    and isinstance(v, (str, int, float, bool))}
            yield Record(key=key, file_name=file_name, image=image, caption=caption, error=cap_error, meta=meta)


def write_manifest(records: Iterable[Record], path: str | Path, fmt: str | None = None,
                   images_dir: str = "images") -> int:
    """Write a manifest (format from the suffix unless given) with the images under `<dir>/<images_dir>/`."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in ("jsonl", "csv", "tsv", "parquet"):
        raise DataError(f"{path}: manifest format must be jsonl, csv, tsv or parquet")
    rows = []
    for r in records:
        data, ext = image_bytes(r, Path(r.file_name).suffix.lower())
        rel = Path(images_dir) / Path(r.file_name).with_suffix(ext)
        atomic_write_bytes(path.parent / rel, data)
        rows.append({"key": r.key, "image": rel.as_posix(), "caption": r.caption if r.caption is not None else ""})
    if fmt == "jsonl":
        atomic_write_bytes(path, jsonl_bytes(rows))
    elif fmt in ("csv", "tsv"):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["key", "image", "caption"], delimiter="\t" if fmt == "tsv" else ",",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("image", pa.string()),
                                                                     ("caption", pa.string())])), tmp)
        tmp.replace(path)
    return len(rows)


__all__ = ["ManifestDataset", "write_manifest"]
