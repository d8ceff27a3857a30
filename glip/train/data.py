"""Training data over the synthetic world.

Three sources, one item format:

* ``GoldDetection``  — gold_det scenes as grounding: the prompt lists the categories present plus
  sampled absent ones (negatives), shuffled, joined with ". " (eval style, no trailing separator),
  exactly as the world's `detection_prompt` lays it out (GLIP's `od_to_grounding`).
* ``GoldGrounding``  — gold_ground scenes: caption + phrase char spans → boxes.
* ``PseudoGrounding`` — web scenes re-rendered from (split, index, seed) encoded in the ODVG
  ``filename`` that `glip.pseudo` writes; regions (boxes, spans, scores) come ONLY from that file,
  never from the sample's hidden boxes.

Each item is a dict: ``image`` (3, h, w) normalised BGR tensor at the model's input size (official
preprocessing, `glip.image.to_tensor`), ``caption``, ``positive_map`` (G, T) binary (from the char
spans through `glip.prompts.positive_map`), ``boxes`` (G, 4) xyxy in the resized frame. `collate`
pads the images with `batch_images` (bottom/right zeros, multiple of 32) and tokenises the batch.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glip.boxes import scale_boxes
from glip.data import GOLD_CATEGORIES, GOLD_COLORS, GOLD_SHAPES, from_odvg, make_sample
from glip.data.captions import detection_prompt
from glip.data.schema import SIZES
from glip.preprocess import Preprocessor
from glip.prompts import Prompt, PromptError, from_caption

_SPATIAL = re.compile(r"\b(left|right)\b")
_WORD = re.compile(r"[a-z]+")
# Words that name one intrinsic property of an object (the annotators' vocabulary: gold only, so no
# novel word's role is given away). See `share_attribute_words`.
ATTRIBUTE_WORDS = frozenset(GOLD_COLORS + GOLD_SHAPES + SIZES)
_FILENAME = re.compile(r"^(?P<split>[a-z_]+)_s(?P<seed>\d+)_(?P<index>\d+)\.png$")


def parse_filename(name: str) -> tuple[str, int, int]:
    """`web_s0_000012.png` → ("web", 0, 12): the world rebuilds any sample from these three."""
    m = _FILENAME.match(Path(name).name)
    if not m:
        raise ValueError(f"not a synthetic-world file name: {name!r}")
    return m["split"], int(m["seed"]), int(m["index"])


InputSpec = Preprocessor  # what the model's preprocessing needs, built from a GLIPConfig


def share_attribute_words(caption: str, spans: list[list[tuple[int, int]]],
                          words: frozenset[str] = ATTRIBUTE_WORDS) -> list[list[tuple[int, int]]]:
    """Add to each region every other occurrence in the caption of an attribute word of its own phrase.

    Why: GLIP's positive map is span-level, so for a red circle in "red circle. red square. blue circle"
    the "red" of "red square" and the "circle" of "blue circle" are focal-loss negatives although that
    region *is* red and *is* a circle. In a compositional world every colour token is then as often
    negative as positive for the same colour; the measured result (README, `glip.train.diagnose`) is
    that training erases colour from the features S_ground scores. With the shared words positive, each
    token keeps one meaning; the phrase score (mean over its tokens) still ranks the full match first."""
    lower = caption.lower()
    out = []
    for region in spans:
        own = set()
        for a, b in region:
            own |= {m.group() for m in _WORD.finditer(lower[a:b]) if m.group() in words}
        extra = [(m.start(), m.end()) for m in _WORD.finditer(lower) if m.group() in own
                 and not any(a <= m.start() and m.end() <= b for a, b in region)]
        out.append(list(region) + extra)
    return out


def attribute_prompt(objs, rng: np.random.Generator) -> tuple[str, list, list]:
    """The same gold boxes, prompted with one attribute's vocabulary: "blue. red. orange. ..." (all gold
    colours, shuffled) or the gold shapes; each box is grounded to its own word.

    Why: in category prompts every colour word is followed by a shape word, and shape alone already
    lowers the loss a lot; measured (README), training then drops colour from the features S_ground
    scores and never finds it again. A prompt whose only content is colour gives a direct gradient for it.
    """
    attr = "color" if rng.random() < 0.5 else "shape"
    words = list(GOLD_COLORS if attr == "color" else GOLD_SHAPES)
    rng.shuffle(words)
    caption = ". ".join(words)
    starts, pos = {}, 0
    for w in words:
        starts[w] = pos
        pos += len(w) + 2
    spans, boxes = [], []
    for o in objs:
        w = getattr(o, attr)
        spans.append([(starts[w], starts[w] + len(w))])
        boxes.append(o.box)
    return caption, spans, boxes


def make_item(image: Image.Image, caption: str, spans: list[list[tuple[int, int]]], boxes: list,
              spec: InputSpec, flip: bool = False, share_words: bool = False,
              ignore_spans: list[tuple[int, int]] | None = None) -> dict:
    """One training item from a PIL image, a caption and G grounded regions (spans + xyxy box each).
    `share_words`: see `share_attribute_words`. `ignore_spans`: char spans whose tokens carry no loss
    (`loss_mask` 0), for phrases the caption names but no region grounds (see `unlabelled_phrase_spans`)."""
    loss_mask = torch.ones(spec.max_len)
    if ignore_spans:
        ignored = Prompt(caption, [caption[b:e] for b, e in ignore_spans], [[tuple(s)] for s in ignore_spans])
        loss_mask = 1.0 - (spec.positive_map(ignored) > 0).any(0).float()
    if share_words:
        spans = share_attribute_words(caption, spans)
    W, H = image.size
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes_t = torch.stack([W - boxes_t[:, 2], boxes_t[:, 1], W - boxes_t[:, 0], boxes_t[:, 3]], dim=1)
    x = spec.image(image)
    h, w = x.shape[1:]
    boxes_t = scale_boxes(boxes_t, (W, H), (w, h))
    if spans:
        prompt = Prompt(caption, [caption[s[0][0]:s[0][1]] for s in spans], spans)
        pmap = (spec.positive_map(prompt) > 0).float()
    else:
        pmap = torch.zeros(0, spec.max_len)
    return {"image": x, "caption": caption, "positive_map": pmap, "boxes": boxes_t, "loss_mask": loss_mask}


def unlabelled_phrase_spans(caption: str, regions: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Char spans of the caption's noun phrases (`glip.prompts.from_caption`, the extraction the teacher
    grounded) that no region's span overlaps: the phrases whose box the teacher's score screened out.

    Why: those objects are still in the image, and a caption token counts as a negative at every anchor
    that is not its region's. Unmasked, "a turquoise circle" screened out at 0.45 teaches the student
    that the turquoise circle is *not* turquoise — the opposite of self-training, and the novel words are
    exactly the ones the teacher scores low. With their tokens masked the student learns nothing about
    them from that image instead of the wrong thing."""
    try:
        prompt = from_caption(caption)
    except PromptError:
        return []
    kept = [s for region in regions for s in region]
    return [(b, e) for entity in prompt.spans for b, e in entity
            if not any(b < ke and kb < e for kb, ke in kept)]


def can_flip(caption: str) -> bool:
    """A horizontal flip would make "left"/"right" lie: such captions are not flipped."""
    return not _SPATIAL.search(caption)


class _WorldDataset(Dataset):
    split = ""

    def __init__(self, cfg, n: int, seed: int = 0, flip_prob: float = 0.5, offset: int = 0,
                 share_words: bool = False):
        self.spec, self.n, self.seed, self.flip_prob, self.offset = InputSpec(cfg), n, seed, flip_prob, offset
        self.share_words = share_words

    def __len__(self) -> int:
        return self.n

    def _flip(self, index: int, caption: str) -> bool:
        if self.flip_prob <= 0 or not can_flip(caption):
            return False
        rng = np.random.default_rng([self.seed, 7919, index])
        return bool(rng.random() < self.flip_prob)


class GoldDetection(_WorldDataset):
    """gold_det as grounding. Only phrases with boxes become regions; the negatives stay in the prompt
    (their tokens are focal-loss negatives for every anchor)."""

    split = "gold_det"

    def __init__(self, cfg, n: int, seed: int = 0, flip_prob: float = 0.5, offset: int = 0,
                 negatives: tuple[int, int] | None = None, hard_weight: float = 1.0, share_words: bool = False,
                 attribute_prob: float = 0.0):
        super().__init__(cfg, n, seed, flip_prob, offset, share_words)
        self.attribute_prob = attribute_prob  # P(the prompt lists one attribute's words instead of categories)
        self.negatives = negatives  # None: the world's own sampling (2..8 absent categories)
        self.hard_weight = hard_weight  # > 1: confusable absent categories (shared word) sampled more often

    def category_prompt(self, objs, idx: int):
        """Scene idx's category-list prompt with `negatives` absent categories: (caption, phrases)."""
        rng = np.random.default_rng([self.seed, 104729, idx])
        k = int(rng.integers(self.negatives[0], self.negatives[1] + 1))
        return detection_prompt(objs, GOLD_CATEGORIES, rng, k, self.hard_weight)

    def __getitem__(self, i: int) -> dict:
        idx = i + self.offset
        s = make_sample(self.split, idx, self.seed)
        caption, phrases = s.caption, s.phrases
        if self.attribute_prob > 0:
            rng = np.random.default_rng([self.seed, 15485863, idx])
            if rng.random() < self.attribute_prob:
                caption, spans, boxes = attribute_prompt(s.objs, rng)
                return make_item(s.image, caption, spans, boxes, self.spec, self._flip(idx, caption))
        if self.negatives is not None:
            caption, phrases = self.category_prompt(s.objs, idx)
        spans, boxes = [], []
        for p in phrases:
            for b in p.box_ids:
                spans.append([p.span])
                boxes.append(s.objs[b].box)
        return make_item(s.image, caption, spans, boxes, self.spec, self._flip(idx, caption), self.share_words)


class GoldGrounding(_WorldDataset):
    split = "gold_ground"

    def __getitem__(self, i: int) -> dict:
        idx = i + self.offset
        s = make_sample(self.split, idx, self.seed)
        spans, boxes = [], []
        for p in s.phrases:
            for b in p.box_ids:
                spans.append([p.span])
                boxes.append(s.objs[b].box)
        return make_item(s.image, s.caption, spans, boxes, self.spec, self._flip(idx, s.caption), self.share_words)


class PseudoGrounding(Dataset):
    """Pseudo-labelled web pairs from an ODVG file: the image is re-rendered from its file name (or read
    from `image_dir` when given); regions — and only they — supervise. Records without a region are
    dropped (official CAPTION_MIN_BOX 1); regions below `min_score` are dropped (FURTHER_SCREEN)."""

    def __init__(self, cfg, odvg_path: str | Path, min_score: float = 0.0, flip_prob: float = 0.5,
                 image_dir: str | Path | None = None, share_words: bool = False, mask_unlabelled: bool = False):
        self.spec, self.flip_prob, self.share_words = InputSpec(cfg), flip_prob, share_words
        self.mask_unlabelled = mask_unlabelled  # tokens of screened-out phrases carry no loss (`unlabelled_phrase_spans`)
        self.image_dir = Path(image_dir) if image_dir else None
        self.records = []
        for r in from_odvg(odvg_path):
            regions = [g for g in r["grounding"]["regions"] if g.get("score", 1.0) >= min_score]
            if regions:
                self.records.append({**r, "grounding": {**r["grounding"], "regions": regions}})

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, filename: str) -> Image.Image:
        if self.image_dir is not None and (self.image_dir / filename).is_file():
            return Image.open(self.image_dir / filename).convert("RGB")
        split, seed, index = parse_filename(filename)
        return make_sample(split, index, seed).image  # pixels only; the hidden objs are not read

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        caption = r["grounding"]["caption"]
        spans = [[tuple(sp) for sp in g["tokens_positive"]] for g in r["grounding"]["regions"]]
        boxes = [g["bbox"] for g in r["grounding"]["regions"]]
        flip = False
        if self.flip_prob > 0 and can_flip(caption):
            flip = bool(np.random.default_rng([i, 31337]).random() < self.flip_prob)
        ignore = unlabelled_phrase_spans(caption, spans) if self.mask_unlabelled else None
        return make_item(self._image(r["filename"]), caption, spans, boxes, self.spec, flip, self.share_words, ignore)


class Collate:
    """Pad images (`batch_images`), tokenise captions at `max_len`, then cut every text tensor to the
    longest caption of the batch. That cut is exact: padded tokens are masked in BERT, in the image→text
    softmax and in the fusion BERT layers, and carry no loss."""

    def __init__(self, cfg):
        self.spec = Preprocessor(cfg)

    def __call__(self, items: list[dict]) -> dict:
        images, sizes = self.spec.batch([it["image"] for it in items])
        enc = self.spec.tokenize([it["caption"] for it in items])
        T = max(int(enc["attention_mask"].sum(1).max()), 1)
        targets = [{"boxes": it["boxes"], "positive_map": it["positive_map"][:, :T]} for it in items]
        attention = enc["attention_mask"][:, :T]
        loss_mask = torch.stack([it["loss_mask"][:T] for it in items]).to(attention.dtype)
        return {"images": images, "sizes": sizes, "input_ids": enc["input_ids"][:, :T],
                "attention_mask": attention, "loss_mask": attention * loss_mask, "targets": targets,
                "captions": [it["caption"] for it in items]}


__all__ = ["GoldDetection", "GoldGrounding", "PseudoGrounding", "Collate", "make_item", "parse_filename",
           "can_flip", "InputSpec", "share_attribute_words", "ATTRIBUTE_WORDS", "attribute_prompt",
           "unlabelled_phrase_spans"]
