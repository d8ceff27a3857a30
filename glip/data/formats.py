"""Export to the formats grounding code expects: COCO detection JSON and
ODVG / MDETR-style grounding JSON lines.

ODVG record (one JSON object per line):
  {"filename": str, "height": int, "width": int,
   "grounding": {"caption": str,
                 "regions": [{"bbox": [x1, y1, x2, y2], "phrase": str,
                              "tokens_positive": [[begin, end]], "score": float?}]}}
A phrase that refers to several boxes gives one region per box. "score" is
optional: gold data has none, pseudo-labels carry the teacher's confidence.

These are the world's own exports (its truth, attributes included). The generic readers and writers
of every format live in `glip.datasets`; `python -m glip.data export` goes through them.
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


def to_odvg(items: list[Sample | dict], path: str | Path) -> list[dict]:
    """Write ODVG JSON lines (atomically). items are Samples (their truth, as `odvg_record`) or ready
    records (e.g. pseudo-labels with scores); each is validated (`glip.datasets.odvg.check_odvg`).
    Returns the records written."""
    from glip.datasets.odvg import write_odvg

    return write_odvg([odvg_record(x) if isinstance(x, Sample) else x for x in items], path)


def from_odvg(path: str | Path) -> list[dict]:
    """Every ODVG line of a file or of a `glip label` output folder (its shards in order); DataError naming
    the file and line at the first malformed one."""
    from glip.datasets.odvg import read_odvg_lines
    from glip.errors import DataError

    out = []
    for _, rec, error in read_odvg_lines(path):
        if error is not None:
            raise DataError(error)
        out.append(rec)
    return out


def export_split(split: str, n: int, seed: int, out_dir: str | Path, cfg=None) -> dict:
    """Generate a split and write <out_dir>/<split>/{*.png, coco.json, odvg.jsonl}: every object with its
    attributes, web's hidden boxes included (analysis and evaluation only; `python -m glip.data export`
    writes what a real dataset of the split would hold)."""
    from .world import WorldConfig, make_split

    samples = make_split(split, n, seed, cfg or WorldConfig())
    d = Path(out_dir) / split
    to_coco(samples, d)
    to_odvg(samples, d / "odvg.jsonl")
    return {"dir": str(d), "coco": str(d / "coco.json"), "odvg": str(d / "odvg.jsonl"), "n": n}
