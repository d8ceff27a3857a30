"""`world:SPLIT:SEED[:N]` — the synthetic world (`glip.data`) as one dataset among the others.

Scene i of the split is rendered when its image is asked for (`make_sample` is a pure function of
split, index and seed), so N can be large. The records carry what a file of the split would hold:
detection splits (gold_det, test_det) boxes with category ids and the split's categories (the 36
gold ones, numbered as `glip.data.ALL_CATEGORIES`); grounding splits (gold_ground, test_ground,
test_novel) captions with grounded spans; `web` image–caption pairs only — its boxes are hidden truth
and never leave the world (`glip.data.judge` reads them for reporting).
"""
from __future__ import annotations

from typing import Iterator

from glip.data import ALL_CATEGORIES, GOLD_CATEGORIES, SPLITS, WorldConfig, make_sample
from glip.data.schema import KNOWN_WORDS
from glip.errors import DataError

from .records import Category, Dataset, Record, Region, Shard

DETECTION_SPLITS = ("gold_det", "test_det")
CAPTION_SPLITS = ("web",)
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(ALL_CATEGORIES)}


def world_record(split: str, index: int, seed: int, cfg: WorldConfig = WorldConfig()) -> Record:
    s = make_sample(split, index, seed, cfg, render_image=False)
    regions = None
    if split not in CAPTION_SPLITS:
        regions = tuple(Region(box=tuple(s.objs[b].box), phrase=p.text, spans=(tuple(p.span),),
                               category_id=CATEGORY_IDS[p.text] if split in DETECTION_SPLITS else None)
                        for p in s.phrases for b in p.box_ids)
    return Record(key=s.file_name.rsplit(".", 1)[0], file_name=s.file_name,
                  image=lambda: make_sample(split, index, seed, cfg).image, caption=s.caption, regions=regions,
                  width=cfg.image_size, height=cfg.image_size, meta={"split": split, "index": index, "seed": seed})


class WorldDataset(Dataset):
    vocabulary = KNOWN_WORDS

    def __init__(self, split: str, seed: int = 0, n: int = 200, cfg: WorldConfig = WorldConfig(), spec: str = ""):
        super().__init__(spec or f"world:{split}:{seed}:{n}")
        if split not in SPLITS:
            raise DataError(f"{self.spec}: unknown world split {split!r}; choose from {', '.join(SPLITS)}")
        if n < 0:
            raise DataError(f"{self.spec}: N must be >= 0")
        self.split, self.seed, self.n, self.cfg = split, seed, n, cfg
        self.task = "detection" if split in DETECTION_SPLITS else "captions" if split in CAPTION_SPLITS else "grounding"
        if self.task == "detection":
            self.categories = tuple(Category(CATEGORY_IDS[c], c) for c in GOLD_CATEGORIES)

    def __len__(self) -> int:
        return self.n

    def _records(self) -> Iterator[Record]:
        for i in range(self.n):
            yield world_record(self.split, i, self.seed, self.cfg)

    def shards(self, records_per_shard: int = 1000) -> Iterator[Shard]:
        if records_per_shard < 1:
            raise DataError(f"records per shard must be >= 1, got {records_per_shard}")
        for k, start in enumerate(range(0, self.n, records_per_shard)):
            stop = min(start + records_per_shard, self.n)
            yield Shard(f"{k:05d}", k, lambda a=start, b=stop: (world_record(self.split, i, self.seed, self.cfg)
                                                                  for i in range(a, b)), self.spec)


__all__ = ["WorldDataset", "world_record"]
