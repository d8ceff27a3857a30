"""`webdataset:PATTERN` — tar shards as img2dataset writes them: `00000.tar` holding `KEY.jpg|png|webp`,
`KEY.txt` (the caption) and `KEY.json` (metadata), members of one sample next to each other.

Each tar is read member by member as a stream (nothing is unpacked, a shard is never held in memory
whole), so CC3M/SBU-scale corpora work from local disk or a network mount. Each tar is one shard of
work. A truncated or corrupt tar yields one error record and reading goes on with the next shard; a
sample without an image or with a non-UTF-8 caption is yielded with its `error`.

`file_name` of a record is `<tar stem>/<member>`: the path the image has after `tar xf` of each shard
into a folder of its own name.
"""
from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from glip.errors import DataError

from .folder import read_text
from .records import IMAGE_EXTENSIONS, Dataset, Record, Shard
from .writers import image_bytes

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00003}.tar` → 4 names (zero padding kept); `{x,y}` → alternatives. Nested left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    out = []
    for o in options:
        out += expand_braces(pattern[:m.start()] + o + pattern[m.end():])
    return out


def expand_shards(pattern: str, spec: str = "") -> list[Path]:
    """The tar files a pattern names: a file, a folder (its *.tar, sorted), a brace pattern or a glob."""
    spec = spec or f"webdataset:{pattern}"
    p = Path(pattern).expanduser()
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
        if not paths:
            raise DataError(f"{spec}: no .tar file in {p}")
        return paths
    paths = []
    for name in expand_braces(pattern):
        if any(ch in name for ch in "*?["):
            found = sorted(glob.glob(str(Path(name).expanduser())))
            if not found:
                raise DataError(f"{spec}: no file matches {name}")
            paths += [Path(f) for f in found]
        else:
            paths.append(Path(name).expanduser())
    missing = [q for q in paths if not q.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{spec}: shard not found: {missing[0]}{more}")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the last component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, {ext: bytes}, error) per sample, streaming the tar."""
    current, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                if key != current and current is not None:
                    yield current, members, None
                    members = {}
                current = key
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        if current is not None:
            yield current, members, None
        yield f"{path.name}#error", None, f"{path}: truncated or corrupt tar ({e.__class__.__name__}) after member {current!r}"
        return
    if current is not None:
        yield current, members, None


def read_tar(path: Path) -> Iterator[Record]:
    stem = path.name[:-4] if path.name.endswith(".tar") else path.stem
    for key, members, error in _samples(path):
        if error is not None:
            yield Record(key=f"{stem}/{key}", file_name="", error=error)
            continue
        image_ext = next((e for e in members if "." + e in IMAGE_EXTENSIONS), None)
        meta, err = {}, None
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                err = f"{path}: {key}.json is not valid JSON"
            meta = meta if isinstance(meta, dict) else {}
        caption = None
        if "txt" in members:
            caption, cap_err = read_text(members["txt"], f"{path}: {key}.txt")
            err = err or cap_err
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
        if image_ext is None:
            err = err or f"{path}: sample {key!r} has no image member (.jpg, .png, .webp...)"
        yield Record(key=f"{stem}/{key}", file_name=f"{stem}/{key}.{image_ext or 'jpg'}",
                     image=members.get(image_ext), caption=caption, error=err, meta=meta,
                     width=meta.get("width") if isinstance(meta.get("width"), int) else None,
                     height=meta.get("height") if isinstance(meta.get("height"), int) else None)


class WebDataset(Dataset):
    def __init__(self, paths: list[Path], spec: str = ""):
        super().__init__(spec or "webdataset:" + ",".join(map(str, paths)))
        self.paths = list(paths)

    def shards(self, records_per_shard: int = 1000) -> Iterator[Shard]:  # one shard per tar, whatever its size
        for i, p in enumerate(self.paths):
            yield Shard(p.name[:-4] if p.name.endswith(".tar") else p.stem, i, lambda p=p: read_tar(p), str(p))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(records: Iterable[Record], out_dir: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write `out_dir/00000.tar, 00001.tar, ...` with `shard_size` samples each (image, .txt, .json per
    sample; byte-identical for the same input). Each tar is written under a temporary name first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tar, tmp, n = None, None, 0

    def close():
        if tar is not None:
            tar.close()
            final = tmp.with_name(tmp.name[:-4])
            tmp.replace(final)
            written.append(final)

    for r in records:
        if n % shard_size == 0:
            close()
            tmp = out / f"{n // shard_size:05d}.tar.tmp"
            tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        key = r.key.replace(".", "_")
        data, ext = image_bytes(r, Path(r.file_name).suffix.lower() or ".jpg")
        _add(tar, key + ext, data)
        if r.caption is not None:
            _add(tar, key + ".txt", r.caption.encode("utf-8"))
        meta = {"key": r.key, "caption": r.caption, **({"width": r.width, "height": r.height} if r.width else {}),
                **{k: v for k, v in r.meta.items() if k not in ("key", "caption", "width", "height")}}
        _add(tar, key + ".json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        n += 1
    close()
    return written


__all__ = ["WebDataset", "expand_braces", "expand_shards", "read_tar", "write_webdataset"]
