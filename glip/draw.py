"""Drawing grounded boxes: one style per phrase, shared by the boxes, the highlighted prompt and the tables.

Colours must not lie. A phrase that names a colour ("blue square") is drawn in that colour; a phrase that
names none is drawn in a colour that no phrase of the same prompt names, so a green box never reads as
"green". Phrases that would share a colour ("red circle . red star") keep it and differ by line style
(solid, dashed, dotted) and then by shade. Label text is black or white, whichever contrasts more with
its fill (WCAG ratio ≥ 4.5 on every fill). Colour words are matched per family: "grey" and "silver" are
gray, "cyan" and "teal" are turquoise.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .boxes import scale_boxes
from .image import load_image

# Colour families: one swatch each, chosen far apart in CIELAB (every pair ΔE76 > 20), and the words that
# name them. The swatches are also the palette for phrases that name no colour (in PALETTE_ORDER).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "red": ("#e6194b", ("red", "crimson", "scarlet", "maroon")),
    "orange": ("#f58231", ("orange",)),
    "yellow": ("#ffe119", ("yellow", "gold", "golden")),
    "green": ("#3cb44b", ("green", "lime", "olive")),
    "turquoise": ("#22c4c4", ("turquoise", "cyan", "teal", "aqua")),
    "blue": ("#4363d8", ("blue", "navy", "azure")),
    "purple": ("#911eb4", ("purple", "violet", "lavender")),
    "pink": ("#f26dc4", ("pink", "magenta")),
    "brown": ("#8b5a2b", ("brown", "tan", "beige")),
    "gray": ("#8c8c8c", ("gray", "grey", "silver")),
    "black": ("#111111", ("black",)),
    "white": ("#f4f4f4", ("white",)),
}
COLOR_WORDS: dict[str, str] = {w: fam for fam, (_, words) in FAMILIES.items() for w in words}
# Phrases without a colour word take the first families nobody in the prompt names, most distinct first.
PALETTE_ORDER = ("blue", "orange", "green", "purple", "red", "turquoise", "pink", "yellow", "brown", "gray",
                 "black", "white")
DASHES = ("solid", "dashed", "dotted")
SHADES = (1.0, 0.72, 1.25)         # same family, darker then lighter (kept only while still that family)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class PhraseStyle:
    color: str   # '#rrggbb': box outline and label fill
    dash: str    # 'solid' | 'dashed' | 'dotted'
    text: str    # '#000000' or '#ffffff', readable on `color`


# --- colour arithmetic -----------------------------------------------------------------------------------
def hex_to_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def rgb_to_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(v))):02x}" for v in rgb)


def _linear(c: float) -> float:
    c /= 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (0 black … 1 white)."""
    r, g, b = (_linear(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a, b) -> float:
    """WCAG contrast ratio of two sRGB colours (1 … 21)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def readable_text(fill: str) -> str:
    """Black or white, whichever contrasts more with `fill` (always ≥ 4.58: the two ratios multiply to 21)."""
    rgb = hex_to_rgb(fill)
    return "#000000" if contrast_ratio(rgb, (0, 0, 0)) >= contrast_ratio(rgb, (255, 255, 255)) else "#ffffff"


def _lab(rgb) -> tuple[float, float, float]:
    r, g, b = (_linear(v) for v in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def delta_e(a, b) -> float:
    """CIE76 colour difference of two sRGB colours."""
    return math.dist(_lab(a), _lab(b))


def color_family(color: str) -> str:
    """The colour family whose swatch is nearest (CIELAB) to `color`: what a reader would call it."""
    rgb = hex_to_rgb(color)
    return min(FAMILIES, key=lambda fam: delta_e(rgb, hex_to_rgb(FAMILIES[fam][0])))


def named_families(phrase: str) -> list[str]:
    """The colour families a phrase names, in order of first mention ("a red and white bus" → red, white)."""
    out = []
    for w in _WORD.findall(phrase.lower()):
        fam = COLOR_WORDS.get(w)
        if fam and fam not in out:
            out.append(fam)
    return out


def _shade(color: str, factor: float) -> str:
    r, g, b = hex_to_rgb(color)
    if factor <= 1:
        return rgb_to_hex((r * factor, g * factor, b * factor))
    t = factor - 1  # towards white
    return rgb_to_hex((r + (255 - r) * t, g + (255 - g) * t, b + (255 - b) * t))


@functools.lru_cache(maxsize=None)
def _variants(family: str) -> tuple[tuple[str, str], ...]:
    """(colour, dash) variants of a family: every dash of the swatch, then of each shade still in the family."""
    base = FAMILIES[family][0]
    shades: list[str] = []
    for s in SHADES:
        col = _shade(base, s)
        # a shade must still read as the family and be visibly different from the shades before it
        if color_family(col) == family and all(delta_e(hex_to_rgb(col), hex_to_rgb(c)) > 8 for c in shades):
            shades.append(col)
    return tuple((col, d) for col in shades for d in DASHES)


# --- the rule --------------------------------------------------------------------------------------------
def phrase_styles(phrases: Sequence[str]) -> list[PhraseStyle]:
    """One style per phrase (see the module docstring). Styles are distinct across phrases as long as the
    prompt has fewer phrases than (colour, dash) variants are left for them; then they repeat in order."""
    named = [named_families(p) for p in phrases]
    taken = {fam for fams in named for fam in fams}
    free = [fam for fam in PALETTE_ORDER if fam not in taken] or list(PALETTE_ORDER)
    # phrases without a colour word cycle over the free families, then over their line styles and shades
    free_variants = [_variants(fam)[k] for k in range(len(DASHES) * len(SHADES)) for fam in free
                     if k < len(_variants(fam))]
    used: dict[str, int] = {}
    k_free = 0
    out = []
    for fams in named:
        if fams:
            fam = fams[0]
            variants = _variants(fam)
            color, dash = variants[used.get(fam, 0) % len(variants)]
            used[fam] = used.get(fam, 0) + 1
        else:
            color, dash = free_variants[k_free % len(free_variants)]
            k_free += 1
        out.append(PhraseStyle(color, dash, readable_text(color)))
    return out


# --- drawing ---------------------------------------------------------------------------------------------
def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _segments(x1, y1, x2, y2, dash: str, width: int):
    """Line segments of a rectangle outline in a dash style."""
    edges = [((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))]
    if dash == "solid":
        yield from edges
        return
    on, off = (4 * width, 2.5 * width) if dash == "dashed" else (1.2 * width, 1.6 * width)
    for (a, b), (c, d) in edges:
        length = math.hypot(c - a, d - b)
        t = 0.0
        while t < length:
            t1 = min(length, t + on)
            yield (a + (c - a) * t / length, b + (d - b) * t / length), (a + (c - a) * t1 / length, b + (d - b) * t1 / length)
            t = t1 + off


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _place_label(box, tw, th, W, H, lw, placed):
    """Label rectangle for a box: above its top-left corner, else inside the top, else below the bottom,
    shifted into the image (never clipped at an edge) and away from labels already placed."""
    x1, y1, x2, y2 = box
    w, h = tw + 6, th + 4
    x = min(max(0.0, x1), max(0.0, W - w))
    cands = [y1 - h, y1 + lw, y2 + 1, y2 - h - lw]
    best, best_cost = None, None
    for y in cands:
        y = min(max(0.0, y), max(0.0, H - h))
        rect = (x, y, x + w, y + h)
        cost = sum(_overlap(rect, r) for r in placed)
        if best_cost is None or cost < best_cost:
            best, best_cost = rect, cost
        if cost == 0:
            break
    return best


def draw_boxes(image, boxes, labels: Sequence[str], styles: Sequence[PhraseStyle], width: int | None = None,
               highlight: int | None = None, source_size: tuple[int, int] | None = None) -> Image.Image:
    """Boxes (xyxy) with labels, each in its style, over a copy of `image`; the first box is drawn last (on top).

    Every line has a dark halo so that it reads on any background. `source_size` (W, H): the frame the
    boxes are in, when `image` is a resized copy of that frame (a display thumbnail). `highlight`: the
    index of a box to emphasise (the others are faded)."""
    im = load_image(image).convert("RGB")
    W, H = im.size
    boxes = scale_boxes(boxes, source_size, im.size) if source_size else boxes
    lw = width or max(2, round(max(W, H) / 300))
    fnt = font(max(13, round(max(W, H) / 40)))
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    placed: list[tuple[float, float, float, float]] = []
    order = list(range(len(boxes)))
    rects = {}
    for i in order:  # labels are placed best box first, so the best keep their preferred spot
        b = tuple(float(v) for v in boxes[i])
        if labels[i]:
            tb = d.textbbox((0, 0), labels[i], font=fnt)
            rects[i] = (_place_label(b, tb[2] - tb[0], tb[3] - tb[1], W, H, lw, placed), tb)
            placed.append(rects[i][0])
    for i in order[::-1]:
        b = tuple(float(v) for v in boxes[i])
        st = styles[i]
        col = hex_to_rgb(st.color)
        alpha = 255 if highlight is None or highlight == i else 80
        w = lw + (2 if highlight == i else 0)
        for seg in _segments(*b, st.dash, w):
            d.line(seg, fill=(0, 0, 0, min(alpha, 150)), width=w + 2)
        for seg in _segments(*b, st.dash, w):
            d.line(seg, fill=col + (alpha,), width=w)
    for i in order[::-1]:  # labels over every outline, the best box's last
        if i in rects:
            st, alpha = styles[i], 255 if highlight is None or highlight == i else 80
            (rx1, ry1, rx2, ry2), tb = rects[i]
            d.rectangle([rx1, ry1, rx2, ry2], fill=hex_to_rgb(st.color) + (min(alpha, 235),))
            d.text((rx1 + 3, ry1 + 2 - tb[1]), labels[i], fill=hex_to_rgb(st.text) + (alpha,), font=fnt)
    return Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB")


def draw_result(result, image, width: int | None = None, show_scores: bool = True, highlight: int | None = None,
                styles: Sequence[PhraseStyle] | None = None) -> Image.Image:
    """A GroundingResult's boxes on `image` (the predicted image, or a resized copy of it), labelled
    "phrase score" and styled by `phrase_styles` of the prompt's phrases."""
    styles = list(styles or phrase_styles(result.prompt.phrases))
    ids = [int(j) for j in result.phrase_ids]
    labels = [f"{result.prompt.phrases[j]} {result.scores[i]:.2f}" if show_scores else result.prompt.phrases[j]
              for i, j in enumerate(ids)]
    return draw_boxes(image, result.boxes, labels, [styles[j] for j in ids], width=width, highlight=highlight,
                      source_size=tuple(result.image_size))


__all__ = ["FAMILIES", "COLOR_WORDS", "PhraseStyle", "phrase_styles", "named_families", "color_family",
           "readable_text", "contrast_ratio", "delta_e", "hex_to_rgb", "rgb_to_hex", "draw_boxes", "draw_result", "font"]
