"""Synthetic grounding world: data for training and evaluating the small GLIP."""
from .captions import detection_prompt
from .formats import export_split, from_odvg, odvg_record, to_coco, to_odvg
from .schema import KNOWN_WORDS, parse_file_name
from .world import (
                    ALL_CATEGORIES,
                    ALL_COLORS,
                    ALL_SHAPES,
                    GOLD_CATEGORIES,
                    GOLD_COLORS,
                    GOLD_SHAPES,
                    GOLD_SPLITS,
                    HIDDEN_BOX_SPLITS,
                    NOVEL_COLORS,
                    NOVEL_SHAPES,
                    NOVEL_WORDS,
                    PALETTE,
                    SPLITS,
                    Obj,
                    Phrase,
                    Sample,
                    WorldConfig,
                    category_name,
                    make_background,
                    make_sample,
                    make_split,
                    object_mask,
                    render,
)

__all__ = [
    "ALL_CATEGORIES", "ALL_COLORS", "ALL_SHAPES", "GOLD_CATEGORIES", "GOLD_COLORS", "GOLD_SHAPES",
    "GOLD_SPLITS", "HIDDEN_BOX_SPLITS", "KNOWN_WORDS", "NOVEL_COLORS", "NOVEL_SHAPES", "NOVEL_WORDS", "PALETTE", "SPLITS",
    "Obj", "Phrase", "Sample", "WorldConfig", "category_name", "detection_prompt", "export_split",
    "from_odvg", "make_background", "make_sample", "make_split", "object_mask", "odvg_record", "parse_file_name",
    "render", "to_coco", "to_odvg",
]
