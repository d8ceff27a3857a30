"""The synthetic grounding world: seeded scenes of coloured shapes + captions.

Splits (see `make_sample`):
  gold_det     gold vocabulary; caption = GLIP detection prompt ("red circle. blue star.")
  gold_ground  gold vocabulary; captions with 1-3 grounded phrases and relations
  web          captions that attach NOVEL words to known ones ("a turquoise circle",
               "a red crescent"); boxes exist only as hidden truth for evaluation
  test_det, test_ground   held-out scenes, gold vocabulary
  test_novel   one novel-word target among same-shape / same-colour distractors,
               so only knowing the novel word picks the right box

Sample i of a split is a pure function of (split, i, seed, cfg): its RNG is
seeded from SeedSequence([seed, split_id, i]), so any sample can be rebuilt alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..boxes import iou
from .captions import caption_for, describable, detection_prompt
from .draw import BACKGROUNDS, make_background, object_mask, poly_box, polygon_mask, render, shape_polygon
from .schema import (
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
    STYLES,
    Obj,
    Phrase,
    Sample,
    category_name,
)

__all__ = [
    "ALL_CATEGORIES", "ALL_COLORS", "ALL_SHAPES", "GOLD_CATEGORIES", "GOLD_COLORS", "GOLD_SHAPES",
    "GOLD_SPLITS", "HIDDEN_BOX_SPLITS", "NOVEL_COLORS", "NOVEL_SHAPES", "NOVEL_WORDS", "PALETTE",
    "SPLITS", "STYLES", "Obj", "Phrase", "Sample", "WorldConfig", "category_name", "make_sample",
    "make_split", "render", "object_mask", "make_background",
]

SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

# Gold values most easily confused with each novel word: test_novel distractors
# are drawn from these first.
CONFUSABLE = {
    "turquoise": ("blue", "green"), "pink": ("red", "purple"),
    "crescent": ("circle", "heart"), "cross": ("star", "square"), "diamond": ("square", "triangle"),
}


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 320  # 256..320
    min_objects: int = 2
    max_objects: int = 6
    small_side: tuple[float, float] = (0.10, 0.15)  # box's longer side / image size
    big_side: tuple[float, float] = (0.21, 0.29)  # gap between ranges keeps size words honest
    big_prob: float = 0.5
    max_rotation: float = 12.0  # degrees; small, so a square never turns into a diamond
    style_probs: tuple[float, float, float] = (0.7, 0.15, 0.15)  # solid, striped, outlined
    color_jitter: int = 12  # +- per RGB channel
    max_occlusion: float = 0.3  # at most this fraction of a shape's pixels covered
    max_iou: float = 0.4  # between any two boxes (keeps NMS-style decoding sane)
    cluster_prob: float = 0.35  # place next to an existing object -> crowding
    margin: float = 0.02  # keep boxes this far (fraction of size) from the border
    place_tries: int = 60
    supersample: int = 2
    pixel_noise: float = 3.0  # std of final per-pixel noise
    det_negatives: tuple[int, int] = (2, 8)  # absent categories per gold_det prompt
    size_word_prob: float = 0.25  # add "small"/"big" even when not needed
    relation_margin: float = 0.08  # min centre gap (fraction of size) for a relation
    max_phrases: int = 3
    web_max_novel: int = 2  # novel-word objects per web image
    web_easy_prob: float = 0.8  # no other object shares the novel object's known word
    web_extra_phrase_prob: float = 0.5  # mention an extra gold object in a web caption
    novel_distractors: int = 2  # same known word, other gold value
    novel_hard_prob: float = 0.5  # also add a same-known-word object with the other novel value

    def __post_init__(self):
        assert 256 <= self.image_size <= 320, "the world is tuned for 256..320 px"
        assert 1 <= self.min_objects <= self.max_objects


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _gold_spec(rng) -> tuple[str, str]:
    return _pick(rng, GOLD_COLORS), _pick(rng, GOLD_SHAPES)


def _novel_spec(rng) -> tuple[str, str]:
    """A novel word attached to a known one: novel colour + gold shape, or gold colour + novel shape."""
    if rng.random() < 0.5:
        return _pick(rng, NOVEL_COLORS), _pick(rng, GOLD_SHAPES)
    return _pick(rng, GOLD_COLORS), _pick(rng, NOVEL_SHAPES)


def _known(spec) -> tuple[int, str]:
    """(attribute index, value) of the known word of a novel spec: 0=colour, 1=shape."""
    return (1, spec[1]) if spec[0] in NOVEL_COLORS else (0, spec[0])


def plan(split: str, rng: np.random.Generator, cfg: WorldConfig) -> list[tuple[str, str, str]]:
    """What to draw: (colour, shape, role), role in target/novel/distractor/extra."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if split in GOLD_SPLITS:
        return [(*_gold_spec(rng), "extra") for _ in range(n)]
    if split == "web":
        novel, k = [], int(rng.integers(1, cfg.web_max_novel + 1))
        while len(novel) < k:
            s = _novel_spec(rng)
            if s not in novel:
                novel.append(s)
        easy = rng.random() < cfg.web_easy_prob
        extras = []
        for _ in range(max(n, len(novel) + 1) - len(novel)):
            for _ in range(50):
                s = _gold_spec(rng)
                if not easy or all(s[a] != v for a, v in map(_known, novel)):
                    break
            extras.append(s)
        if easy and len(novel) == 2 and _known(novel[0]) == _known(novel[1]):
            novel = novel[:1]
        return [(*s, "novel") for s in novel] + [(*s, "extra") for s in extras]
    if split == "test_novel":
        target = _novel_spec(rng)
        attr, value = _known(target)
        novel_word = target[1 - attr]
        gold_vals = GOLD_SHAPES if attr == 0 else GOLD_COLORS
        first = [v for v in CONFUSABLE[novel_word] if v in gold_vals]
        rest = [v for v in gold_vals if v not in first]
        order = [first[i] for i in rng.permutation(len(first))] + [rest[i] for i in rng.permutation(len(rest))]

        def with_other(v):  # target's known word kept, the other attribute set to v
            return (value, v) if attr == 0 else (v, value)

        specs = [(*target, "target")]
        specs += [(*with_other(v), "distractor") for v in order[:cfg.novel_distractors]]
        if rng.random() < cfg.novel_hard_prob:
            others = [w for w in (NOVEL_SHAPES if attr == 0 else NOVEL_COLORS) if w != novel_word]
            specs.append((*with_other(_pick(rng, others)), "distractor"))
        specs += [(*_gold_spec(rng), "extra") for _ in range(n - len(specs))]
        return specs
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def _grow(b, d: float):
    return b[0] - d, b[1] - d, b[2] + d, b[3] + d


def place(specs, rng: np.random.Generator, cfg: WorldConfig):
    """Sample size, pose, style and position for each spec (drawn in list
    order, later on top) under the occlusion and overlap limits. Returns
    (objs, roles), or None when a required object does not fit."""
    S, m = cfg.image_size, cfg.margin * cfg.image_size
    objs, roles, masks, visible = [], [], [], []
    for k in rng.permutation(len(specs)):
        color, shape, role = specs[k]
        for attempt in range(cfg.place_tries):
            big = rng.random() < cfg.big_prob and attempt < cfg.place_tries // 2  # shrink when crowded
            side = rng.uniform(*(cfg.big_side if big else cfg.small_side)) * S
            angle = rng.uniform(0, 360) if shape == "crescent" else rng.uniform(-1, 1) * cfg.max_rotation
            poly = shape_polygon(shape, side, angle)
            w, h = poly.max(0)
            if objs and rng.random() < cfg.cluster_prob:  # next to an existing object
                a = objs[int(rng.integers(len(objs)))].box
                d = rng.uniform(0.5, 0.9) * (max(a[2] - a[0], a[3] - a[1]) + side) / 2
                t = rng.uniform(0, 2 * np.pi)
                x = (a[0] + a[2]) / 2 + d * np.cos(t) - w / 2
                y = (a[1] + a[3]) / 2 + d * np.sin(t) - h / 2
            else:
                x, y = rng.uniform(m, S - m - w), rng.uniform(m, S - m - h)
            poly = poly + (np.clip(x, m, S - m - w), np.clip(y, m, S - m - h))
            box = poly_box(poly)
            if any(iou(box, o.box) > cfg.max_iou or (o.color == color and iou(_grow(box, 3), o.box) > 0)
                   for o in objs):  # same-colour objects must not touch, or they merge into one blob
                continue
            mask = polygon_mask(poly, S)
            if all((v & ~mask).sum() >= (1 - cfg.max_occlusion) * mk.sum() for v, mk in zip(visible, masks)):
                break
        else:
            if role != "extra":
                return None
            continue
        for v in visible:
            v &= ~mask
        masks.append(mask)
        visible.append(mask.copy())
        jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3)
        rgb = tuple(int(c) for c in np.clip(np.array(PALETTE[color]) + jitter, 0, 255))
        style = STYLES[int(rng.choice(len(STYLES), p=cfg.style_probs))]
        objs.append(Obj(box=tuple(round(v, 2) for v in box), shape=shape, color=color,
                        size="big" if big else "small", novel=color in NOVEL_WORDS or shape in NOVEL_WORDS,
                        style=style, rgb=rgb, poly=tuple(map(tuple, poly.round(3).tolist()))))
        roles.append(role)
    if len(objs) < cfg.min_objects:
        return None
    for o, v, mk in zip(objs, visible, masks):
        o.visible = round(float(v.sum() / max(mk.sum(), 1)), 3)
    return objs, roles


def _language(split, objs, roles, rng, cfg, bg) -> tuple[str, list[Phrase]] | None:
    margin = cfg.relation_margin * cfg.image_size
    if split == "gold_det":
        k = int(rng.integers(cfg.det_negatives[0], cfg.det_negatives[1] + 1))
        return detection_prompt(objs, GOLD_CATEGORIES, rng, k)
    if split == "test_det":
        return detection_prompt(objs, GOLD_CATEGORIES)
    if split in ("gold_ground", "test_ground"):
        ok = [i for i in range(len(objs)) if describable(i, objs)]
        if not ok:
            return None
        k = int(rng.integers(1, min(cfg.max_phrases, len(ok)) + 1))
        targets = [ok[j] for j in rng.choice(len(ok), k, replace=False)]
        return caption_for(targets, objs, rng, cfg.size_word_prob, margin)
    if split == "web":
        targets = [i for i, r in enumerate(roles) if r == "novel"]
        extra = [i for i, r in enumerate(roles) if r == "extra" and describable(i, objs)]
        for j in rng.permutation(len(extra)):
            if len(targets) < cfg.max_phrases and rng.random() < cfg.web_extra_phrase_prob:
                targets.append(extra[j])
        targets = [targets[j] for j in rng.permutation(len(targets))]
        return caption_for(targets, objs, rng, cfg.size_word_prob, margin, web=True, bg=bg)
    if split == "test_novel":  # no size word: the novel word must do the work
        return caption_for([roles.index("target")], objs, rng, 0.0, margin)
    raise ValueError(split)


def make_sample(split: str, index: int, seed: int = 0, cfg: WorldConfig = WorldConfig(), render_image: bool = True
                ) -> Sample:
    """Scene `index` of `split` under world `seed`. render_image=False leaves `image` None: the annotations are
    drawn from the RNG before the pixels, so they are the same, ~8x faster (web scenes: 1.6 vs 12 ms; judging
    pseudo-labels reads only the hidden boxes)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    for _ in range(50):
        placed = place(plan(split, rng, cfg), rng, cfg)
        if placed is None:
            continue
        objs, roles = placed
        bg = _pick(rng, BACKGROUNDS)
        language = _language(split, objs, roles, rng, cfg, bg)
        if language is not None:
            break
    else:
        raise RuntimeError(f"could not generate {split}[{index}] (seed {seed}); loosen WorldConfig")
    caption, phrases = language
    if not render_image:
        return Sample(image=None, objs=objs, caption=caption, phrases=phrases, split=split, index=index, seed=seed)
    image = render(objs, make_background(rng, cfg.image_size, bg), cfg.supersample)
    if cfg.pixel_noise > 0:
        noisy = np.asarray(image, np.float32) + rng.normal(0, cfg.pixel_noise, (cfg.image_size, cfg.image_size, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")
    return Sample(image=image, objs=objs, caption=caption, phrases=phrases, split=split, index=index, seed=seed)


def make_split(split: str, n: int, seed: int = 0, cfg: WorldConfig = WorldConfig()) -> list[Sample]:
    return [make_sample(split, i, seed, cfg) for i in range(n)]
