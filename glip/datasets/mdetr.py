"""`mdetr:FILE.json[:IMAGES]` — MDETR-style COCO with a caption per image and `tokens_positive` per box,
the format of MDETR's Flickr30k Entities files (`final_flickr_separateGT_val.json`), GoldG and RefCOCO.

Each image entry is one (image, caption) pair: `caption`, optionally `tokens_positive_eval` (the
phrases to evaluate, one span list each); each annotation is one box (`bbox` xywh) with the
`tokens_positive` char spans of its phrase. Boxes whose spans are equal belong to one phrase (the
"separateGT" files list every box of a phrase; "mergedGT" files one union box per phrase).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from glip.errors import DataError

from .coco import _box, coco_tables, xywh
from .records import Dataset, Record, Region
from .writers import atomic_write_bytes, atomic_write_text, image_bytes


def _spans(v, caption: str, where: str) -> tuple[tuple[tuple[int, int], ...] | None, str | None]:
    if not isinstance(v, list) or not v or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in v):
        return None, f"{where}: tokens_positive must be [[begin, end], ...], got {v!r}"
    spans = tuple((int(b), int(e)) for b, e in v)
    if any(not 0 <= b < e <= len(caption) for b, e in spans):
        return None, f"{where}: tokens_positive {v} outside the caption (length {len(caption)})"
    return spans, None


class MdetrDataset(Dataset):
    task = "grounding"

    def __init__(self, ann_file: str | Path, images: str | Path | None = None, spec: str = ""):
        super().__init__(spec or f"mdetr:{ann_file}")
        self.path = Path(ann_file)
        self.image_root = Path(images) if images else self.path.parent
        self.images, self.by_image, _ = coco_tables(self.path)

    def __len__(self) -> int:
        return len(self.images)

    def _records(self) -> Iterator[Record]:
        for k, im in enumerate(self.images):
            if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
                yield Record(key=f"#{k}", file_name="", error=f"{self.path}: image {k} needs 'id' and 'file_name'")
                continue
            caption = im.get("caption")
            if not isinstance(caption, str):
                yield Record(key=str(im["id"]), file_name=str(im["file_name"]),
                             error=f"{self.path}: image {im['id']} has no caption (not an MDETR grounding file)")
                continue
            regions, error = [], None
            for j, a in self.by_image.get(im["id"], []):
                where = f"{self.path}: annotation {a.get('id', j)}"
                box, err = _box(a.get("bbox"), where)
                spans, err2 = _spans(a.get("tokens_positive"), caption, where) if err is None else (None, None)
                err = err or err2
                if err is not None:
                    error = error or err
                    continue
                regions.append(Region(box=box, phrase=caption[spans[0][0]:spans[0][1]], spans=spans,
                                      iscrowd=bool(a.get("iscrowd", 0))))
            meta = {key: im[key] for key in ("sentence_id", "original_img_id", "tokens_positive_eval") if key in im}
            meta["image_id"] = im["id"]
            yield Record(key=str(im["id"]), file_name=str(im["file_name"]), image=self.image_root / str(im["file_name"]),
                         caption=caption, regions=tuple(regions), width=im.get("width"), height=im.get("height"),
                         error=error, meta=meta)


def write_mdetr(records: Iterable[Record], path: str | Path, images_dir: str | Path | None = None) -> dict:
    """Write grounding records as an MDETR-style COCO JSON (one image entry per caption, one annotation
    per box, `tokens_positive_eval` listing each phrase's spans); with `images_dir`, also the images."""
    images, anns = [], []
    for n, r in enumerate(records, 1):
        name = r.file_name
        if images_dir is not None:
            data, ext = image_bytes(r, Path(name).suffix.lower())
            name = str(Path(name).with_suffix(ext))
            atomic_write_bytes(Path(images_dir) / name, data)
        w, h = (r.width, r.height) if r.width and r.height else r.load_image().size
        img_id = r.meta.get("image_id", n)
        phrases = r.phrases()
        entry = {"id": img_id, "file_name": name, "height": h, "width": w, "caption": r.caption,
                 "tokens_positive_eval": [[list(s) for s in p.spans] for p in phrases]}
        entry.update({k: r.meta[k] for k in ("sentence_id", "original_img_id") if k in r.meta})
        images.append(entry)
        phrase_ids = {p.spans: i for i, p in enumerate(phrases)}
        for g in r.regions or ():
            if not g.spans:
                raise DataError(f"{r.key}: an MDETR region needs its caption spans")
            bbox = xywh(g.box)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": int(g.iscrowd),
                         "tokens_positive": [list(s) for s in g.spans], "phrase_ids": phrase_ids[tuple(g.spans)]})
    d = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    atomic_write_text(path, json.dumps(d))
    return d


__all__ = ["MdetrDataset", "write_mdetr"]
