"""YOLO export of detection records, through supervision's `DetectionDataset.as_yolo`.

    OUT/images/<name>   OUT/labels/<stem>.txt   OUT/data.yaml

YOLO numbers classes 0..K-1 in the order of `categories` and stores boxes normalised to the image
size, so a round trip keeps boxes only to the precision of those normalised numbers (supervision's
`from_yolo` reads them back). Image names are flattened (YOLO has one image folder): they must be
unique by base name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from glip.errors import DataError

from .records import Category, Record
from .writers import atomic_write_bytes, image_bytes


def write_yolo(records: Iterable[Record], categories: Sequence[Category], out_dir: str | Path) -> Path:
    import supervision as sv

    out = Path(out_dir)
    index = {c.id: k for k, c in enumerate(categories)}
    paths, annotations = [], {}
    for r in records:
        data, ext = image_bytes(r, Path(r.file_name).suffix.lower())
        path = out / "images" / (Path(r.file_name).stem + ext)
        if str(path) in annotations:
            raise DataError(f"YOLO export: two images named {path.name} (YOLO needs unique base names)")
        atomic_write_bytes(path, data)
        regions = [g for g in r.regions or () if g.category_id in index]
        xyxy = np.array([g.box for g in regions], dtype=np.float32).reshape(-1, 4)
        annotations[str(path)] = sv.Detections(xyxy=xyxy, class_id=np.array([index[g.category_id] for g in regions],
                                                                            dtype=int))
        paths.append(str(path))
    ds = sv.DetectionDataset(classes=[c.name for c in categories], images=paths, annotations=annotations)
    ds.as_yolo(annotations_directory_path=str(out / "labels"), data_yaml_path=str(out / "data.yaml"))
    return out


def read_yolo(out_dir: str | Path):
    """supervision's `DetectionDataset.from_yolo` on a folder written by `write_yolo`."""
    import supervision as sv

    out = Path(out_dir)
    return sv.DetectionDataset.from_yolo(images_directory_path=str(out / "images"),
                                         annotations_directory_path=str(out / "labels"),
                                         data_yaml_path=str(out / "data.yaml"))


__all__ = ["read_yolo", "write_yolo"]
