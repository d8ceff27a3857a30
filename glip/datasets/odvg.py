"""`odvg:FILE.jsonl[:IMAGES]` — ODVG lines, the format Open-GroundingDino and mmdetection train from.
FILE may also be the output folder of `glip label` (its shards are read in order) or a folder of .jsonl.

Grounding line (gold, or pseudo-labels with a `score` per region):
    {"filename": str, "height": int, "width": int,
     "grounding": {"caption": str, "regions": [{"bbox": [x1, y1, x2, y2], "phrase": str,
                                                "tokens_positive": [[begin, end], ...], "score": float?}]}}
Detection line, with a label map {"<label>": "<name>"} (`?labelmap=FILE`, or the `category` of each
instance when there is none):
    {"filename": str, "height": int, "width": int,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": int, "category": str}]}}

Boxes are xyxy in pixels. A phrase that refers to several boxes has one region per box (same spans).
A malformed line is yielded as a record with an `error` naming the file and line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from glip.errors import DataError

from .records import Category, Dataset, Record, Region
from .writers import atomic_write_bytes, jsonl_bytes


def _number_list(v, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                for x in v)


def check_odvg(rec: object, where: str = "ODVG record") -> None:
    """DataError (one line, naming `where`) unless `rec` is a well-formed ODVG line: boxes xyxy with
    positive size, spans inside the caption, scores in [0, 1]."""
    if not isinstance(rec, dict) or "filename" not in rec:
        raise DataError(f"{where}: not an ODVG record (no 'filename')")
    if "grounding" in rec:
        g = rec["grounding"]
        if not isinstance(g, dict) or not isinstance(g.get("caption"), str) or not isinstance(g.get("regions", []), list):
            raise DataError(f"{where}: 'grounding' needs a 'caption' string and a 'regions' list")
        n = len(g["caption"])
        for k, r in enumerate(g.get("regions", [])):
            if not isinstance(r, dict) or not _number_list(r.get("bbox"), 4):
                raise DataError(f"{where}: region {k}: bbox must be 4 numbers [x1, y1, x2, y2]")
            x1, y1, x2, y2 = r["bbox"]
            if not (x2 > x1 and y2 > y1):
                raise DataError(f"{where}: region {k}: empty box {r['bbox']}")
            spans = r.get("tokens_positive", [])
            if not isinstance(spans, list) or not all(_number_list(s, 2) for s in spans):
                raise DataError(f"{where}: region {k}: tokens_positive must be [[begin, end], ...]")
            for b, e in spans:
                if not 0 <= b < e <= n:
                    raise DataError(f"{where}: region {k}: span [{b}, {e}] outside the caption (length {n})")
            if "score" in r and not (isinstance(r["score"], (int, float)) and 0.0 <= r["score"] <= 1.0):
                raise DataError(f"{where}: region {k}: score must be in [0, 1]")
    elif "detection" in rec:
        d = rec["detection"]
        if not isinstance(d, dict) or not isinstance(d.get("instances", []), list):
            raise DataError(f"{where}: 'detection' needs an 'instances' list")
        for k, inst in enumerate(d.get("instances", [])):
            if not isinstance(inst, dict) or not _number_list(inst.get("bbox"), 4):
                raise DataError(f"{where}: instance {k}: bbox must be 4 numbers [x1, y1, x2, y2]")
            if not isinstance(inst.get("label"), int):
                raise DataError(f"{where}: instance {k}: label must be an integer")
    else:
        raise DataError(f"{where}: neither 'grounding' nor 'detection'")


def record_from_odvg(rec: dict, image_root: Path | None, key: str, names: dict[int, str] | None = None) -> Record:
    fn = str(rec["filename"])
    common = dict(key=str(rec.get("key", key)), file_name=fn, image=(image_root / fn) if image_root else Path(fn),
                  width=rec.get("width"), height=rec.get("height"))
    if "grounding" in rec:
        g = rec["grounding"]
        cap = g["caption"]
        regions = tuple(Region(box=tuple(float(v) for v in r["bbox"]),
                               phrase=r.get("phrase") or (cap[r["tokens_positive"][0][0]:r["tokens_positive"][0][1]]
                                                          if r.get("tokens_positive") else ""),
                               spans=tuple((int(b), int(e)) for b, e in r.get("tokens_positive", [])),
                               score=float(r["score"]) if "score" in r else None)
                        for r in g.get("regions", []))
        return Record(caption=cap, regions=regions, **common)
    names = names or {}
    regions = tuple(Region(box=tuple(float(v) for v in i["bbox"]), category_id=int(i["label"]),
                           phrase=str(i.get("category") or names.get(int(i["label"]), "")))
                    for i in rec["detection"].get("instances", []))
    return Record(regions=regions, **common)


def odvg_from_record(r: Record, detection: bool | None = None) -> dict:
    """The ODVG line of a record: a detection line when `detection` (default: when it has no caption),
    a grounding line otherwise."""
    out = {"filename": r.file_name, "height": r.height, "width": r.width}
    if detection is None:
        detection = r.caption is None
    if not detection:
        regions = []
        for g in r.regions or ():
            d = {"bbox": list(g.box), "phrase": g.phrase, "tokens_positive": [list(s) for s in g.spans]}
            if g.score is not None:
                d["score"] = g.score
            regions.append(d)
        out["grounding"] = {"caption": r.caption, "regions": regions}
    else:
        out["detection"] = {"instances": [{"bbox": list(g.box), "label": g.category_id, "category": g.phrase}
                                          for g in r.regions or ()]}
    return out


def odvg_files(path: str | Path) -> list[Path]:
    """The ODVG files a path names: a file; the output folder of `glip label` (its shards, in the order of
    its manifests); or a folder of .jsonl files (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"ODVG file not found: {p}")
    manifests = sorted(p.glob("manifest*.json"))
    if manifests:
        entries = []
        for m in manifests:
            try:
                entries += json.loads(m.read_text())["shards"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{m}: not a labelling manifest") from None
        return [p / e["file"] for e in sorted(entries, key=lambda e: e["index"])]
    files = sorted(p.glob("*.jsonl"))
    if not files:
        raise DataError(f"{p}: no .jsonl file and no labelling manifest")
    return files


def read_odvg_lines(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, error) for each non-empty line, validated (a folder: every file of
    `odvg_files` in turn, line numbers counted per file)."""
    if Path(path).is_dir():
        for f in odvg_files(path):
            yield from read_odvg_lines(f)
        return
    path = Path(path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(raw)
                check_odvg(rec, where)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield line_no, None, f"{where}: invalid JSON"
                continue
            except DataError as e:
                yield line_no, None, str(e)
                continue
            yield line_no, rec, None


class OdvgDataset(Dataset):
    def __init__(self, path: str | Path, images: str | Path | None = None, labelmap: str | Path | None = None,
                 spec: str = ""):
        super().__init__(spec or f"odvg:{path}")
        self.path = Path(path)
        self.image_root = Path(images) if images else (self.path if self.path.is_dir() else self.path.parent)
        first = next((rec for _, rec, _ in read_odvg_lines(self.path) if rec is not None), None)
        self.task = "detection" if first is not None and "detection" in first else "grounding"
        self.names: dict[int, str] = {}
        if labelmap is not None:
            try:
                self.names = {int(k): str(v) for k, v in json.loads(Path(labelmap).read_text()).items()}
            except (json.JSONDecodeError, ValueError, AttributeError, UnicodeDecodeError):
                raise DataError(f"{labelmap}: a label map is a JSON object {{\"<label>\": \"<name>\"}}") from None
        elif self.task == "detection":
            for _, rec, _ in read_odvg_lines(self.path):
                for inst in (rec or {}).get("detection", {}).get("instances", []):
                    self.names.setdefault(int(inst["label"]), str(inst.get("category", inst["label"])))
        if self.task == "detection":
            self.categories = tuple(Category(k, v) for k, v in sorted(self.names.items()))

    def __len__(self) -> int:
        n = 0
        for p in odvg_files(self.path):
            with p.open("rb") as f:
                n += sum(1 for line in f if line.strip())
        return n

    def _records(self) -> Iterator[Record]:
        for i, (line_no, rec, error) in enumerate(read_odvg_lines(self.path)):
            key = f"{i:09d}"
            if error is not None:
                yield Record(key=key, file_name="", error=error)
            else:
                yield record_from_odvg(rec, self.image_root, key, self.names)


def write_odvg(records: Iterable[Record | dict], path: str | Path, categories=None) -> list[dict]:
    """Write ODVG lines atomically (records or ready ODVG dicts, each validated). With `categories` (a
    detection dataset): detection lines and the label map `<path stem>_label_map.json`. Returns the lines."""
    lines = [r if isinstance(r, dict) else odvg_from_record(r, detection=bool(categories)) for r in records]
    for k, line in enumerate(lines):
        check_odvg(line, f"{path}: record {k}")
    atomic_write_bytes(path, jsonl_bytes(lines))
    if categories:
        p = Path(path)
        atomic_write_bytes(p.with_name(p.stem + "_label_map.json"),
                           json.dumps({str(c.id): c.name for c in categories}).encode())
    return lines


__all__ = ["OdvgDataset", "check_odvg", "odvg_files", "odvg_from_record", "read_odvg_lines", "record_from_odvg", "write_odvg"]
