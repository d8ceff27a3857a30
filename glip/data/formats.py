"""Export to the formats grounding code expects: COCO detection JSON and
ODVG / MDETR-style grounding JSON lines.

ODVG record (one JSON object per line):
  {"filename": str, "height": int, "width": int,
   "grounding": {"caption": str,
                 "regions": [{"bbox": [x1, y1, x2, y2], "phrase": str,
                              "tokens_positive": [[begin, end]], "score": float?}]}}
A phrase that refers to several boxes gives one region per box. "score" is
optional: gold data has none, pseudo-labels carry the teacher's confidence.

CLI:  python -m glip.data SPLIT N OUT_DIR [--seed S]   (see __main__.py)
"""
from __future__ import annotations

import json
from pathlib import Path

from .schema import ALL_CATEGORIES, ALL_SHAPES, Sample


def _category_of(obj, by: str) -> str:
    return obj.category if by == "category" else obj.shape


def to_coco(samples: list[Sample], out: str | Path | None = None, by: str = "category") -> dict:
    """COCO detection dict. Category ids are stable across splits (1-based
    positions in ALL_CATEGORIES, or ALL_SHAPES with by="shape").

    out=None: only return the dict; out="x.json": also write it there;
    out=<dir>: write the images as PNG into <dir> and the JSON to <dir>/coco.json.
    Web samples are exported with their hidden boxes (for evaluation only).
    """
    if by not in ("category", "shape"):
        raise ValueError("by must be 'category' or 'shape'")
    names = ALL_CATEGORIES if by == "category" else ALL_SHAPES
    cat_id = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for img_id, s in enumerate(samples, 1):
        w, h = s.image.size
        images.append({"id": img_id, "file_name": s.file_name, "width": w, "height": h, "caption": s.caption})
        for o in s.objs:
            x1, y1, x2, y2 = o.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "category_id": cat_id[_category_of(o, by)],
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                "attributes": {"shape": o.shape, "color": o.color, "size": o.size,
                               "style": o.style, "novel": o.novel, "visible": o.visible},
            })
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_id.items()]}
    if out is not None:
        out = Path(out)
        if out.suffix == ".json":
            json_path = out
        else:
            out.mkdir(parents=True, exist_ok=True)
            for s in samples:
                s.image.save(out / s.file_name)
            json_path = out / "coco.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(coco))
    return coco


def odvg_record(sample: Sample, scores: list[float] | None = None) -> dict:
    """ODVG grounding record of one sample; scores (one per region) optional."""
    regions = []
    for p in sample.phrases:
        for i in p.box_ids:
            regions.append({"bbox": list(sample.objs[i].box), "phrase": p.text,
                            "tokens_positive": [list(p.span)]})
    if scores is not None:
        assert len(scores) == len(regions), "one score per region"
        for r, sc in zip(regions, scores):
            r["score"] = float(sc)
    w, h = sample.image.size
    return {"filename": sample.file_name, "height": h, "width": w,
            "grounding": {"caption": sample.caption, "regions": regions}}


def check_odvg(rec: dict) -> None:
    """Raise if a record is malformed (span text must equal the phrase)."""
    cap = rec["grounding"]["caption"]
    for r in rec["grounding"]["regions"]:
        x1, y1, x2, y2 = r["bbox"]
        assert x2 > x1 and y2 > y1, f"empty box {r['bbox']}"
        for b, e in r["tokens_positive"]:
            assert cap[b:e] == r["phrase"], f"span {b, e} is {cap[b:e]!r}, not {r['phrase']!r}"
        if "score" in r:
            assert 0.0 <= r["score"] <= 1.0


def to_odvg(items: list[Sample | dict], path: str | Path) -> list[dict]:
    """Write ODVG JSON lines. items are Samples or ready records (e.g.
    pseudo-labels with scores). Returns the records written."""
    records = [odvg_record(x) if isinstance(x, Sample) else x for x in items]
    for r in records:
        check_odvg(r)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def from_odvg(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        check_odvg(r)
    return records


def export_split(split: str, n: int, seed: int, out_dir: str | Path, cfg=None) -> dict:
    """Generate a split and write <out_dir>/<split>/{*.png, coco.json, odvg.jsonl}."""
    from .world import WorldConfig, make_split

    samples = make_split(split, n, seed, cfg or WorldConfig())
    d = Path(out_dir) / split
    to_coco(samples, d)
    to_odvg(samples, d / "odvg.jsonl")
    return {"dir": str(d), "coco": str(d / "coco.json"), "odvg": str(d / "odvg.jsonl"), "n": n}
