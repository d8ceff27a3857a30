"""Geometry and pixels: shape polygons, backgrounds, rendering.

Every shape is a polygon, so its tight box is exact (min/max of the vertices)
and the same polygon gives the drawing, the occlusion mask and the box.
Objects are drawn at `supersample`x and box-filtered down for anti-aliasing.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .schema import PALETTE, Obj


def _ring(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.48) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart(n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], 1) / 16  # image y points down


def _crescent(n: int = 48, d: float = 0.5, r2: float = 0.85) -> np.ndarray:
    """Unit disc minus a disc of radius r2 shifted right by d (thick, opens right)."""
    xi = (d * d + 1 - r2 * r2) / (2 * d)  # x of the two circle intersections
    yi = math.sqrt(1 - xi * xi)
    a = math.atan2(yi, xi)  # on the outer circle
    b = math.atan2(yi, xi - d)  # on the inner circle
    outer = np.linspace(a, 2 * math.pi - a, n)
    inner = np.linspace(2 * math.pi - b, b, n)[1:-1]
    return np.concatenate([
        np.stack([np.cos(outer), np.sin(outer)], 1),
        np.stack([d + r2 * np.cos(inner), r2 * np.sin(inner)], 1),
    ])


def _cross(w: float = 0.34) -> np.ndarray:
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
                     (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


# Unit polygons (roughly within [-1, 1]^2). The diamond is a tall rhombus so it
# cannot be mistaken for a slightly rotated square.
UNIT_SHAPES = {
    "circle": _ring(64),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
    "triangle": _ring(3, phase=-math.pi / 2),
    "star": _star(),
    "heart": _heart(),
    "hexagon": _ring(6),
    "crescent": _crescent(),
    "cross": _cross(),
    "diamond": np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], dtype=float),
}


def shape_polygon(shape: str, side: float, angle_deg: float) -> np.ndarray:
    """Polygon of `shape`, rotated, scaled so its box's longer side is `side`,
    with its box's top-left corner at the origin."""
    p = UNIT_SHAPES[shape]
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    p = p @ rot
    p = p - p.min(0)
    return p * (side / p.max())


def poly_box(poly) -> tuple[float, float, float, float]:
    p = np.asarray(poly, dtype=float)
    x1, y1 = p.min(0)
    x2, y2 = p.max(0)
    return float(x1), float(y1), float(x2), float(y2)


def _pixel_points(poly, scale: int, offset=(0.0, 0.0)) -> list[tuple[float, float]]:
    """Polygon in canvas pixels, ready for ImageDraw. PIL truncates vertex
    coordinates and fills inclusively, which widens a shape by ~1 px; pulling
    it in by half a pixel per side keeps the drawn extent on the true box."""
    p = np.asarray(poly, dtype=float) * scale
    lo, hi = p.min(0), p.max(0)
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-6)
    p = centre + (p - centre) * np.maximum(half - 0.5, 0) / half - np.asarray(offset, dtype=float)
    return [tuple(q) for q in p.tolist()]


def polygon_mask(poly, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a polygon at image resolution."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(_pixel_points(poly, 1), fill=255)
    return np.asarray(m) > 0


def object_mask(obj: Obj, size: int) -> np.ndarray:
    return polygon_mask(obj.poly, size)


# ---------------------------------------------------------------- backgrounds
BACKGROUNDS = ("flat", "noise", "gradient", "stripes")


def _dull_color(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation colour: backgrounds never look like a named colour."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.45, 0.85)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def make_background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    img = np.broadcast_to(_dull_color(rng), (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / (t.max() - t.min())
        img = img + t[..., None] * (_dull_color(rng) - img[0, 0])
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.03, 0.08)
        wave = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        img = img + rng.uniform(4, 9) * np.sign(wave)[..., None]
    elif kind == "noise":
        # brightness blobs + grey grain: no colour, so no patch looks like a named colour
        blobs = rng.normal(0, 1, (6, 6)).astype(np.float32)
        up = np.asarray(Image.fromarray(blobs, "F").resize((size, size), Image.BICUBIC))
        img = img + 14 * up[..., None] + rng.normal(0, 6, (size, size, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------ rendering
def _draw_object(canvas: Image.Image, obj: Obj, ss: int) -> None:
    rgb = tuple(obj.rgb or PALETTE[obj.color])
    if obj.style == "solid":
        ImageDraw.Draw(canvas).polygon(_pixel_points(obj.poly, ss), fill=rgb)
        return
    # Non-solid styles work on a crop: a fill mask, then a pattern inside it.
    x1, y1, x2, y2 = obj.box
    ox, oy = math.floor(x1 * ss) - 2, math.floor(y1 * ss) - 2
    w, h = math.ceil(x2 * ss) + 3 - ox, math.ceil(y2 * ss) + 3 - oy
    pts = _pixel_points(obj.poly, ss, (ox, oy))
    fill = Image.new("L", (w, h), 0)
    ImageDraw.Draw(fill).polygon(pts, fill=255)
    side = max(x2 - x1, y2 - y1) * ss
    pattern = Image.new("L", (w, h), 0)
    pd = ImageDraw.Draw(pattern)
    if obj.style == "outlined":  # hollow: only an inner border is painted
        pd.line(pts + pts[:1], fill=255, width=max(4, round(0.28 * side)), joint="curve")
        canvas.paste(rgb, (ox, oy), ImageChops.multiply(fill, pattern))
    elif obj.style == "striped":  # filled, with darker diagonal stripes
        period = max(6, round(0.22 * side))
        for k in range(-h, w + h, period):
            pd.line([(k, 0), (k + h, h)], fill=255, width=max(2, period // 3))
        canvas.paste(rgb, (ox, oy), fill)
        dark = tuple(int(c * 0.7) for c in rgb)
        canvas.paste(dark, (ox, oy), ImageChops.multiply(fill, pattern))
    else:
        raise ValueError(f"unknown style {obj.style!r}")


def render(objs: list[Obj], background: Image.Image, supersample: int = 2) -> Image.Image:
    """Draw objs in order (later ones on top) over background."""
    size = background.size
    canvas = background.convert("RGB").resize(
        (size[0] * supersample, size[1] * supersample), Image.NEAREST)
    for obj in objs:
        _draw_object(canvas, obj, supersample)
    return canvas.reduce(supersample) if supersample > 1 else canvas
