"""`coco:ANN.json[:IMAGES]` — COCO instances JSON + an image folder (gold detection).

One record per image (file order) with one region per annotation: xyxy box, `category_id`, the
category's name as `phrase`, `iscrowd` and `area` kept for pycocotools. The dataset's categories
(sorted by id) are the detection vocabulary; as a prompt their names are cleaned as the official
evaluation does (`glip.prompts.clean_category_name`: "(...)" dropped, "_" → " ").
A malformed annotation marks its image's record with an `error` naming the file and annotation.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from glip.errors import DataError, DataWarning

from .records import Category, Dataset, Record, Region
from .writers import atomic_write_bytes, atomic_write_text, image_bytes


def load_json(path: Path) -> object:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 JSON") from None


def _box(bbox, where: str) -> tuple[tuple[float, float, float, float] | None, str | None]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return None, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}"
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return None, f"{where}: bbox has a negative size {bbox!r}"
    return (x, y, round(x + w, 9), round(y + h, 9)), None  # see `xywh`


def xywh(box) -> list[float]:
    """xyxy → COCO's [x, y, w, h]. Rounded to 1e-9 px so that xywh → xyxy → xywh gives back the same
    numbers (a float sum and difference can move the last bit; no file holds more decimals than that)."""
    x1, y1, x2, y2 = box
    return [round(x1, 9), round(y1, 9), round(x2 - x1, 9), round(y2 - y1, 9)]


def coco_tables(path: Path) -> tuple[list, dict[object, list[tuple[int, dict]]], list]:
    """(images, annotations by image id as (index, annotation) pairs, categories) of a COCO-layout JSON file
    (COCO instances and MDETR grounding files alike)."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    anns, cats = data.get("annotations", []), data.get("categories", [])
    if not isinstance(anns, list) or not isinstance(cats, list):
        raise DataError(f"{path}: 'annotations' and 'categories' must be lists")
    by_image: dict[object, list[tuple[int, dict]]] = {}
    for k, a in enumerate(anns):
        by_image.setdefault(a.get("image_id") if isinstance(a, dict) else None, []).append((k, a))
    ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    orphans = [(k, a) for key, pairs in by_image.items() if key is None or key not in ids for k, a in pairs]
    if orphans:  # pycocotools ignores them as well; saying so keeps a mismatched file from passing unnoticed
        k, a = min(orphans, key=lambda p: p[0])
        first = (f"annotation {a.get('id', k)} with image_id {a.get('image_id')!r}" if isinstance(a, dict)
                 else f"annotation {k}, not an object")
        warnings.warn(f"{path}: {len(orphans)} of {len(anns)} annotations belong to no image in 'images' and are "
                      f"ignored (the first: {first})", DataWarning, stacklevel=2)
    return data["images"], by_image, cats


class CocoDataset(Dataset):
    task = "detection"

    def __init__(self, ann_file: str | Path, images: str | Path | None = None, spec: str = ""):
        super().__init__(spec or f"coco:{ann_file}")
        self.path = Path(ann_file)
        self.image_root = Path(images) if images else self.path.parent
        self.images, self.by_image, cats = coco_tables(self.path)
        if self.by_image and not cats:  # without annotations (images to label), no categories are needed
            raise DataError(f"{self.path}: no 'categories' list, or an empty one: a COCO detection file names "
                            f"the categories of its annotations there")
        try:
            self.categories = tuple(sorted((Category(int(c["id"]), str(c["name"])) for c in cats), key=lambda c: c.id))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.path}: every category needs an integer 'id' and a 'name'") from None
        if len({c.id for c in self.categories}) != len(self.categories):
            raise DataError(f"{self.path}: duplicate category ids")

    def __len__(self) -> int:
        return len(self.images)

    def _records(self) -> Iterator[Record]:
        names = self.category_names()
        for k, im in enumerate(self.images):
            if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
                yield Record(key=f"#{k}", file_name="", error=f"{self.path}: image {k} needs 'id' and 'file_name'")
                continue
            regions, error = [], None
            for j, a in self.by_image.get(im["id"], []):
                where = f"{self.path}: annotation {a.get('id', j)}"
                box, err = _box(a.get("bbox"), where)
                cid = a.get("category_id")
                if err is None and cid not in names:
                    err = f"{where}: unknown category_id {cid!r}"
                if err is not None:
                    error = error or err
                    continue
                regions.append(Region(box=box, phrase=names[cid], category_id=int(cid), iscrowd=bool(a.get("iscrowd", 0)),
                                      area=float(a["area"]) if isinstance(a.get("area"), (int, float)) else None))
            caption = im.get("caption") if isinstance(im.get("caption"), str) else None
            yield Record(key=str(im["id"]), file_name=str(im["file_name"]), image=self.image_root / str(im["file_name"]),
                         caption=caption, regions=tuple(regions), width=im.get("width"), height=im.get("height"),
                         error=error, meta={"image_id": im["id"]})


def coco_dict(records: Iterable[Record], categories: Sequence[Category], with_images: bool = True) -> dict:
    """The COCO instances dict of detection records. Image ids are the records' `image_id` (kept from a
    COCO source) or 1, 2, ... in order; sizes are read from the image when the record does not carry them."""
    images, anns = [], []
    ids = set()
    for n, r in enumerate(records, 1):
        img_id = r.meta.get("image_id", n)
        if img_id in ids:
            img_id = n
        ids.add(img_id)
        w, h = r.width, r.height
        if (w is None or h is None) and with_images:
            w, h = r.load_image().size
        entry = {"id": img_id, "file_name": r.file_name, "width": w, "height": h}
        if r.caption is not None:
            entry["caption"] = r.caption
        images.append(entry)
        for g in r.regions or ():
            bbox = xywh(g.box)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": g.category_id, "bbox": bbox,
                         "area": g.area if g.area is not None else bbox[2] * bbox[3], "iscrowd": int(g.iscrowd)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c.id, "name": c.name} for c in categories]}


def write_coco(records: Iterable[Record], categories: Sequence[Category], path: str | Path,
               images_dir: str | Path | None = None) -> dict:
    """Write the COCO JSON to `path`; with `images_dir`, also each record's image there (files copied as
    they are, decoded images as PNG — the file name's extension follows)."""
    records = list(records)
    if images_dir is not None:
        out = []
        for r in records:
            data, ext = image_bytes(r, Path(r.file_name).suffix.lower())
            name = str(Path(r.file_name).with_suffix(ext))
            atomic_write_bytes(Path(images_dir) / name, data)
            out.append(Record(**{**r.__dict__, "file_name": name}))
        records = out
    d = coco_dict(records, categories)
    atomic_write_text(path, json.dumps(d))
    return d


__all__ = ["CocoDataset", "coco_dict", "load_json", "write_coco", "xywh"]
