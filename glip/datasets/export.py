"""Write any dataset in any format: `write_dataset("world:test_det:1:200", "coco", "out/")`.

Each format has a fixed layout under the output folder, and the result names the spec that reads it
back, so an export can be fed straight to `glip label`, `glip eval` or training:

    webdataset   OUT/00000.tar ...                         webdataset:OUT
    folder       OUT/<file_name> + same-stem .txt          folder:OUT
    jsonl csv tsv parquet   OUT/manifest.<ext> + OUT/images/   jsonl:OUT/manifest.jsonl
    coco         OUT/annotations.json + OUT/images/        coco:OUT/annotations.json:OUT/images
    odvg         OUT/odvg.jsonl + OUT/images/              odvg:OUT/odvg.jsonl:OUT/images
    mdetr        OUT/mdetr.json + OUT/images/              mdetr:OUT/mdetr.json:OUT/images
    yolo         OUT/images/ OUT/labels/ OUT/data.yaml     (supervision's YOLO layout)
"""
from __future__ import annotations

from pathlib import Path

from glip.errors import DataError

from .records import Dataset, Record, strict
from .spec import open_dataset

FORMATS = ("webdataset", "folder", "jsonl", "csv", "tsv", "parquet", "coco", "odvg", "mdetr", "yolo")


def _with_images(records, images_dir: Path):
    """Write each record's image under `images_dir` and yield the record renamed to the written file."""
    from .writers import atomic_write_bytes, image_bytes

    for r in records:
        data, ext = image_bytes(r, Path(r.file_name).suffix.lower())
        name = str(Path(r.file_name).with_suffix(ext))
        atomic_write_bytes(images_dir / name, data)
        yield Record(**{**r.__dict__, "file_name": name, "image": images_dir / name})


def write_dataset(data: str | Dataset, fmt: str, out_dir: str | Path, shard_size: int = 1000) -> dict:
    """Export `data` (a spec or Dataset) as `fmt` under `out_dir`. Returns {format, dir, spec, n}."""
    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    ds = open_dataset(data)
    out = Path(out_dir)
    if fmt in ("coco", "yolo") and ds.categories is None:
        raise DataError(f"{ds.spec}: {fmt} needs a detection dataset (with categories), this one is {ds.task}")
    if fmt == "mdetr" and ds.task != "grounding":
        raise DataError(f"{ds.spec}: mdetr needs grounding records (captions with boxes), this one is {ds.task}")
    records = list(strict(ds))
    if fmt == "webdataset":
        from .webdataset import write_webdataset

        write_webdataset(records, out, shard_size)
        spec = f"webdataset:{out}"
    elif fmt == "folder":
        from .folder import write_folder

        write_folder(records, out)
        spec = f"folder:{out}"
    elif fmt in ("jsonl", "csv", "tsv", "parquet"):
        from .manifest import write_manifest

        write_manifest(records, out / f"manifest.{fmt}", fmt)
        spec = f"{fmt}:{out / f'manifest.{fmt}'}"
    elif fmt == "coco":
        from .coco import write_coco

        write_coco(_with_images(records, out / "images"), ds.categories, out / "annotations.json")
        spec = f"coco:{out / 'annotations.json'}:{out / 'images'}"
    elif fmt == "odvg":
        from .odvg import write_odvg

        write_odvg(_with_images(records, out / "images"), out / "odvg.jsonl", ds.categories)
        spec = f"odvg:{out / 'odvg.jsonl'}:{out / 'images'}"
        if ds.categories:
            spec += f"?labelmap={out / 'odvg_label_map.json'}"
    elif fmt == "mdetr":
        from .mdetr import write_mdetr

        write_mdetr(_with_images(records, out / "images"), out / "mdetr.json")
        spec = f"mdetr:{out / 'mdetr.json'}:{out / 'images'}"
    else:
        from .yolo import write_yolo

        write_yolo(records, ds.categories, out)
        spec = ""
    return {"format": fmt, "dir": str(out), "spec": spec, "n": len(records)}


__all__ = ["FORMATS", "write_dataset"]
