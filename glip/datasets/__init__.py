"""Datasets in the formats GLIP-family code uses, behind one spec string (`glip.datasets.spec`).

    from glip.datasets import open_dataset
    for record in open_dataset("webdataset:shards/{00000..00127}.tar"):
        record.key, record.caption, record.load_image()

Readers stream typed `Record`s (image loaded lazily, caption, optional regions, stable key) and never
stop on one bad sample (the record carries an `error`). Writers: `write_dataset` (any format),
`write_odvg`, `write_coco`, `write_mdetr`, `write_webdataset`, `write_folder`, `write_manifest`,
`write_yolo`. See docs/real-data.md.
"""
from glip.errors import DataError

from .export import FORMATS, write_dataset
from .records import Category, Dataset, Phrase, Record, Region, Shard, decode_image, strict
from .spec import SCHEMES, open_dataset, parse_spec

__all__ = ["Category", "DataError", "Dataset", "FORMATS", "Phrase", "Record", "Region", "SCHEMES", "Shard",
           "decode_image", "open_dataset", "parse_spec", "strict", "write_dataset"]
