"""Language side: noun phrases, spatial relations, captions with char spans.

Captions are built from small templates. A template field "{A}" becomes
"a red circle" with the phrase span on "red circle" (the article is not part
of the phrase); "{the A}" uses "the"; "{rel}" is a spatial relation that
holds between A and B; "{bg}" names the background.
"""
from __future__ import annotations

from string import Formatter

import numpy as np

from ..prompts import pick_negatives
from .schema import Obj, Phrase

RELATIONS = ("to the left of", "to the right of", "above", "below")

GROUND_TEMPLATES = {
    1: ["{A}.", "there is {A}.", "{A} in the picture.", "find {the A}.", "{the A}."],
    2: ["{A} and {B}.", "there are {A} and {B}.", "{A}, {B}."],
    3: ["{A}, {B} and {C}.", "there are {A}, {B} and {C}."],
}
GROUND_REL_TEMPLATES = {
    2: ["{A} {rel} {B}.", "{the A} is {rel} {the B}.", "{A} placed {rel} {B}."],
    3: ["{A} {rel} {B}, and {C}.", "{the A} is {rel} {the B}; there is also {C}."],
}
WEB_TEMPLATES = {
    1: ["a photo of {A}.", "{A} on a {bg} background.", "my drawing of {A}!",
        "look at {the A}.", "{A}"],
    2: ["{A} and {B}.", "{A} with {B} on a {bg} background.", "photo: {A} and {B}.",
        "picture of {A} next to {B}."],
    3: ["{A}, {B} and {C}.", "clip art with {A}, {B} and {C}."],
}
WEB_REL_TEMPLATES = {
    2: ["image of {A} {rel} {B}.", "{A} {rel} {B}"],
    3: ["{A} {rel} {B}, plus {C}."],
}
BG_WORDS = {"flat": "plain", "noise": "noisy", "gradient": "smooth", "stripes": "striped"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describable(i: int, objs: list[Obj]) -> bool:
    o = objs[i]
    same = [p for p in objs if p.color == o.color and p.shape == o.shape]
    return len(same) == 1 or sum(p.size == o.size for p in same) == 1


def describe(i: int, objs: list[Obj], rng: np.random.Generator, size_prob: float) -> str | None:
    """Shortest unambiguous phrase for objs[i] (size added when needed, or at
    random with size_prob); None if no phrase singles it out."""
    o = objs[i]
    same = [p for p in objs if p.color == o.color and p.shape == o.shape]
    if len(same) == 1:
        words = [o.color, o.shape]
        return " ".join([o.size] + words if rng.random() < size_prob else words)
    if sum(p.size == o.size for p in same) == 1:
        return f"{o.size} {o.color} {o.shape}"
    return None


def relations(a: Obj, b: Obj, margin: float) -> list[str]:
    """Relations "a REL b" that clearly hold (dominant axis, centre gap > margin px)."""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    dx, dy = bx - ax, by - ay
    if abs(dx) > abs(dy) and abs(dx) > margin:
        return [RELATIONS[0] if dx > 0 else RELATIONS[1]]
    if abs(dy) > abs(dx) and abs(dy) > margin:
        return [RELATIONS[2] if dy > 0 else RELATIONS[3]]
    return []


def fill_template(template: str, nps: dict[str, tuple[str, list[int]]],
                  rel: str = "", bg: str = "") -> tuple[str, list[Phrase]]:
    """Fill a template; nps maps "A"/"B"/"C" to (phrase text, box_ids)."""
    out, phrases = "", []
    for literal, name, _, _ in Formatter().parse(template):
        out += literal
        if name is None:
            continue
        if name in ("rel", "bg"):
            out += rel if name == "rel" else bg
            continue
        det, _, key = name.rpartition(" ")
        text, box_ids = nps[key]
        out += (det or article(text)) + " "
        phrases.append(Phrase(text, (len(out), len(out) + len(text)), list(box_ids)))
        out += text
    return out, phrases


def caption_for(targets: list[int], objs: list[Obj], rng: np.random.Generator,
                size_prob: float, margin: float, web: bool = False, bg: str = "") -> tuple[str, list[Phrase]]:
    """Caption mentioning objs[targets] (1-3 of them, each describable), with a
    spatial relation between the first two when one holds and a coin says so."""
    nps = {}
    for key, i in zip("ABC", targets):
        nps[key] = (describe(i, objs, rng, size_prob), [i])
    assert all(t for t, _ in nps.values()), "targets must be describable"
    n = len(targets)
    rels = relations(objs[targets[0]], objs[targets[1]], margin) if n > 1 else []
    plain, with_rel = (WEB_TEMPLATES, WEB_REL_TEMPLATES) if web else (GROUND_TEMPLATES, GROUND_REL_TEMPLATES)
    if rels and rng.random() < 0.6:
        template, rel = _pick(rng, with_rel[n]), rels[0]
    else:
        template, rel = _pick(rng, plain[n]), ""
    return fill_template(template, nps, rel=rel, bg=BG_WORDS.get(bg, "plain"))


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def detection_prompt(objs: list[Obj], categories: tuple[str, ...],
                     rng: np.random.Generator | None = None,
                     num_negatives: int = 0, hard_weight: float = 1.0) -> tuple[str, list[Phrase]]:
    """Detection as grounding, the GLIP way: the prompt is a list of category
    names joined by ". " with no trailing separator ("red circle. blue star.
    green square", the layout of glip.prompts.from_categories(style="eval")),
    holding every category present in the image plus `num_negatives` sampled
    absent ones, shuffled so position carries no signal. With rng=None the
    prompt is all `categories` in their given order (deterministic, for eval).
    hard_weight > 1 samples absent categories that share a colour or shape word with a present one
    ("red square" next to a red circle) that many times more often: the contrasts a category-list
    prompt asks the model to make."""
    present = list(dict.fromkeys(o.category for o in objs))
    if rng is None:
        names = list(categories)
    else:
        absent = [c for c in categories if c not in present]
        names = present + pick_negatives(present, absent, min(num_negatives, len(absent)), rng, hard_weight)
        names = [names[j] for j in rng.permutation(len(names))]
    caption, phrases = "", []
    for name in names:
        if caption:
            caption += ". "
        ids = [i for i, o in enumerate(objs) if o.category == name]
        phrases.append(Phrase(name, (len(caption), len(caption) + len(name)), ids))
        caption += name
    return caption, phrases
