"""Vocabulary and record types of the synthetic grounding world.

The vocabulary is split in two on purpose: GOLD words are the only ones that
ever appear in human-annotated ("gold") splits; NOVEL words appear only in
web captions and in the novel-concept test. That is what lets us measure
whether self-training (teacher pseudo-labels web data, student learns from
them) teaches concepts the teacher never saw.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from PIL import Image

GOLD_SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon")
NOVEL_SHAPES = ("crescent", "cross", "diamond")
ALL_SHAPES = GOLD_SHAPES + NOVEL_SHAPES

# Saturated, well separated hues; the novel colours sit between gold ones
# (turquoise between green and blue, pink between red and purple) but are
# clearly distinct, so only the word tells them apart from their neighbours.
PALETTE = {
    "red": (215, 35, 40),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 35),
    "purple": (130, 50, 175),
    "orange": (245, 135, 25),
    "turquoise": (55, 220, 205),
    "pink": (255, 125, 195),
}
GOLD_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
NOVEL_COLORS = ("turquoise", "pink")
ALL_COLORS = GOLD_COLORS + NOVEL_COLORS

NOVEL_WORDS = frozenset(NOVEL_SHAPES + NOVEL_COLORS)
SIZES = ("small", "big")
STYLES = ("solid", "striped", "outlined")
# The words that name an object's properties in gold data: what a model trained on gold splits only
# (the teacher) can be expected to ground. Exported as `known_words.txt` with every split; labelling
# scores a teacher's phrases by them (`glip label --score-words known_words.txt`).
KNOWN_WORDS = frozenset(GOLD_COLORS + GOLD_SHAPES + SIZES)


def category_name(color: str, shape: str) -> str:
    """Detection category = "colour shape", e.g. "red circle"."""
    return f"{color} {shape}"


GOLD_CATEGORIES = tuple(category_name(c, s) for c in GOLD_COLORS for s in GOLD_SHAPES)
# Stable order (gold first) so category ids agree across splits and exports.
ALL_CATEGORIES = GOLD_CATEGORIES + tuple(
    category_name(c, s)
    for c in ALL_COLORS
    for s in ALL_SHAPES
    if c in NOVEL_COLORS or s in NOVEL_SHAPES
)

SPLITS = ("gold_det", "gold_ground", "web", "test_det", "test_ground", "test_novel")
GOLD_SPLITS = ("gold_det", "gold_ground", "test_det", "test_ground")
# Web pairs come without boxes: objs / box_ids are hidden truth for evaluation
# only and must not be fed to training.
HIDDEN_BOX_SPLITS = ("web",)


@dataclass
class Obj:
    """One drawn object. box is xyxy in pixels (continuous coordinates, pixel
    i spans [i, i+1)), tight around the full (amodal) shape."""

    box: tuple[float, float, float, float]
    shape: str
    color: str
    size: str
    novel: bool
    style: str = "solid"
    rgb: tuple[int, int, int] | None = None  # jittered fill colour; None = palette
    poly: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    visible: float = 1.0  # fraction of the shape's pixels not occluded

    @property
    def category(self) -> str:
        return category_name(self.color, self.shape)


@dataclass
class Phrase:
    text: str
    span: tuple[int, int]  # caption[span[0]:span[1]] == text
    box_ids: list[int]  # indices into Sample.objs; empty for prompt negatives


@dataclass
class Sample:
    """A scene. For gold_det/test_det the caption is the detection prompt and
    there is one phrase per category in it (negatives have empty box_ids)."""

    image: Image.Image | None  # None: made with render_image=False (annotations only)
    objs: list[Obj]
    caption: str
    phrases: list[Phrase]
    split: str
    index: int
    seed: int

    @property
    def boxes_hidden(self) -> bool:
        return self.split in HIDDEN_BOX_SPLITS

    @property
    def file_name(self) -> str:
        return f"{self.split}_s{self.seed}_{self.index:06d}.png"


_FILE_NAME = re.compile(r"^(?P<split>[a-z_]+)_s(?P<seed>\d+)_(?P<index>\d+)(\.png)?$")


def parse_file_name(name: str) -> tuple[str, int, int]:
    """`web_s0_000012.png` (or a path ending in it) → ("web", 0, 12): the inverse of `Sample.file_name`."""
    m = _FILE_NAME.match(name.replace("\\", "/").rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"not a synthetic-world file name: {name!r}")
    return m["split"], int(m["seed"]), int(m["index"])
