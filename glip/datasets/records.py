"""The typed records every reader yields and every writer, labeller and evaluator takes.

A `Record` is one image with what is known about it: a caption (image–caption corpora, grounding
data), regions (boxes with the phrase or category they show), or both. The image is loaded only when
asked for (`Record.load_image`), so a reader can stream a corpus that does not fit in memory and a
labeller can skip finished shards without decoding them. A sample a reader could not parse is still
yielded, with `error` saying why (file and line or member): one bad sample never stops a run, and
strict consumers (evaluation) turn it into a `DataError`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from glip.errors import DataError, ImageError
from glip.image import MAX_PIXELS, _to_rgb

# path on disk | encoded bytes (a tar member) | decoded image | a callable producing one of those
ImageSource = Union[str, Path, bytes, Image.Image, Callable[[], object], None]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Category:
    """A detection category: its id in the dataset's files and its name as written there."""

    id: int
    name: str


@dataclass(frozen=True)
class Region:
    """One box and what it shows. `box` is xyxy in the pixels of the (EXIF-transposed) image.

    Grounding data: `phrase` is the grounded text and `spans` its character spans in the record's
    caption (ODVG/MDETR `tokens_positive`); several regions with the same spans are one phrase with
    several boxes. Detection data: `category_id` (and `phrase` = the category's name). Pseudo-labels
    carry the labeller's `score`."""

    box: tuple[float, float, float, float]
    phrase: str = ""
    spans: tuple[tuple[int, int], ...] = ()
    category_id: int | None = None
    score: float | None = None
    iscrowd: bool = False
    area: float | None = None          # COCO's area (of the mask, for real COCO); None: the box's


@dataclass(frozen=True)
class Phrase:
    """A grounded phrase of a caption: its text, spans and every box it refers to."""

    text: str
    spans: tuple[tuple[int, int], ...]
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass
class Record:
    key: str                                # stable and unique within its dataset
    file_name: str                          # the image's name relative to the dataset's image root
    image: ImageSource = None
    caption: str | None = None
    regions: tuple[Region, ...] | None = None  # None: not annotated (an image–caption pair)
    width: int | None = None                # as the dataset's metadata says (None: read from the image)
    height: int | None = None
    error: str | None = None                # why the sample cannot be used (malformed line, member...)
    meta: dict = field(default_factory=dict, repr=False)

    def load_image(self) -> Image.Image:
        """The RGB image at full resolution, EXIF orientation applied. ImageError when unreadable."""
        return decode_image(self.image, self.file_name)

    def phrases(self) -> list[Phrase]:
        """The grounded phrases: regions with spans grouped by their spans, in order of first appearance."""
        groups: dict[tuple, list[Region]] = {}
        for r in self.regions or ():
            if r.spans:
                groups.setdefault(tuple(r.spans), []).append(r)
        return [Phrase(rs[0].phrase, spans, tuple(r.box for r in rs)) for spans, rs in groups.items()]


def decode_image(src: ImageSource, name: str = "image") -> Image.Image:
    """Decode an `ImageSource` into an RGB PIL image at full resolution (EXIF orientation applied,
    16-bit and alpha handled as `glip.image.load_image`, which also downscales sides over 4096 px: the
    caller keeps this full-size image to map boxes back), refusing images over `MAX_PIXELS`."""
    if callable(src) and not isinstance(src, Image.Image):
        src = src()
    if src is None:
        raise ImageError(f"{name}: no image")
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise ImageError(f"{name}: image file not found ({p})")
        src = p.read_bytes()
    if isinstance(src, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(src)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{name}: image too large ({im.width}×{im.height} pixels; limit {MAX_PIXELS:,})")
                im.load()
                src = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError:  # PIL's own size guard fires in `open`, before the check above
            raise ImageError(f"{name}: image too large (more than {MAX_PIXELS:,} pixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"{name}: corrupt or not an image ({e.__class__.__name__})") from e
    if not isinstance(src, Image.Image):
        raise ImageError(f"{name}: unsupported image type {type(src).__name__}")
    if src.width * src.height > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({src.width}×{src.height} pixels; limit {MAX_PIXELS:,})")
    if src.width < 1 or src.height < 1:
        raise ImageError(f"{name}: empty image")
    return _to_rgb(ImageOps.exif_transpose(src))


class Shard:
    """A unit of work: a named, ordered group of records (a tar file, or a fixed number of records of an
    unsharded dataset). Iterating it yields its records; `records` may be built only then (lazily)."""

    def __init__(self, name: str, index: int, records: Callable[[], Iterator[Record]] | list[Record],
                 source: str = ""):
        self.name, self.index, self.source = name, index, source
        self._records = records

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records() if callable(self._records) else self._records)

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, {self.source!r})"


class Dataset:
    """A readable dataset. Subclasses implement `_records` (streamed, in a fixed order) or `shards`.

    `task`: "captions" (image–caption pairs), "detection" (boxes with category ids) or "grounding"
    (captions with grounded spans). `categories`: the detection vocabulary (None otherwise).
    `vocabulary`: the words a model trained on this data can be expected to ground (None: unknown)."""

    task = "captions"
    categories: tuple[Category, ...] | None = None
    vocabulary: frozenset[str] | None = None

    def __init__(self, spec: str):
        self.spec = spec

    def __len__(self) -> int:  # only where the size is known without reading the data
        raise TypeError(f"{self.spec}: size unknown before reading")

    @property
    def size(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def _records(self) -> Iterator[Record]:
        raise NotImplementedError

    def shards(self, records_per_shard: int = 1000) -> Iterator[Shard]:
        """Deterministic shards. Unsharded datasets are cut into groups of `records_per_shard` records."""
        yield from chunked_shards(self._records(), records_per_shard, self.spec)

    def __iter__(self) -> Iterator[Record]:
        for shard in self.shards():
            yield from shard

    def category_names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.categories or ()}


def chunked_shards(records: Iterator[Record], size: int, source: str = "") -> Iterator[Shard]:
    if size < 1:
        raise DataError(f"records per shard must be >= 1, got {size}")
    batch: list[Record] = []
    index = 0
    for r in records:
        batch.append(r)
        if len(batch) == size:
            yield Shard(f"{index:05d}", index, batch, source)
            batch, index = [], index + 1
    if batch:
        yield Shard(f"{index:05d}", index, batch, source)


def strict(records, what: str = "dataset"):
    """Yield the records, raising the first reader error as a DataError (evaluation cannot skip GT)."""
    for r in records:
        if r.error:
            raise DataError(r.error)
        yield r


__all__ = ["Category", "Dataset", "IMAGE_EXTENSIONS", "ImageSource", "Phrase", "Record", "Region", "Shard",
           "chunked_shards", "decode_image", "strict"]
