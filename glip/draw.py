"""One colour per phrase, shared by the boxes on the image and the highlighted prompt text."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .boxes import scale_boxes
from .image import load_image

# Tableau-like palette: distinct, readable on light and dark images, colour-blind friendlier than HSV cycling.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#800000", "#808000", "#000075", "#bfef45", "#fabed4", "#ffd8b1", "#dcbeff"]


def phrase_color(i: int) -> str:
    return PALETTE[int(i) % len(PALETTE)]


def hex_to_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_result(result, image, width: int | None = None, show_scores: bool = True, highlight: int | None = None) -> Image.Image:
    """Boxes coloured by phrase, labelled "phrase score". `highlight`: index of a box to emphasise.
    Drawn on `load_image(image)` (shrunk if over MAX_SIDE): the boxes are scaled from the original frame."""
    im = load_image(image).copy()
    W, H = im.size
    boxes = scale_boxes(result.boxes, result.image_size, im.size)
    lw = width or max(2, round(max(W, H) / 250))
    font = _font(max(11, round(max(W, H) / 45)))
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    order = list(range(len(result)))[::-1]  # draw the best box last (on top)
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        col = hex_to_rgb(phrase_color(result.phrase_ids[i]))
        alpha = 255 if highlight is None or highlight == i else 90
        d.rectangle([x1, y1, x2, y2], outline=col + (alpha,), width=lw + (2 if highlight == i else 0))
        label = f"{result.phrases[i]} {result.scores[i]:.2f}" if show_scores else result.phrases[i]
        tb = d.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1 + lw
        d.rectangle([x1, ty, x1 + tw + 6, ty + th + 4], fill=col + (min(alpha, 220),))
        d.text((x1 + 3, ty + 1 - tb[1]), label, fill=(255, 255, 255, alpha), font=font)
    return Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB")
