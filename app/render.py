"""Server-side rendering for the app: images with boxes, heat-map overlays, highlighted prompts, charts.

One colour per phrase everywhere (`glip.draw.phrase_color(i)`): the boxes, the highlighted prompt, the
legend, the token bars and the tables all use it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from glip.draw import draw_result, hex_to_rgb, phrase_color  # noqa: E402

NOVEL_LABEL = "novel word"
NOVEL_COLOR = "#ffd400"
GRAY = "#9e9e9e"
MAX_SHOWN_BOXES = 100  # the detections table and the image never show more


# --- labels and colours ------------------------------------------------------------------------------
def phrase_labels(phrases: list[str]) -> list[str]:
    """Unique display label per phrase (a repeated phrase gets '#j')."""
    seen, out = {}, []
    for j, p in enumerate(phrases):
        label = p if p not in seen else f"{p} #{j + 1}"
        seen[p] = True
        out.append(label)
    return out


def color_map(phrases: list[str]) -> dict[str, str]:
    return {label: phrase_color(j) for j, label in enumerate(phrase_labels(phrases))}


def highlighted_prompt(prompt, novel_words=()) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """The caption as (segment, label) pairs for gr.HighlightedText, phrases labelled (coloured) by the
    shared phrase colour, plus the color_map. `novel_words`: words highlighted with their own label."""
    import re

    caption = prompt.caption
    labels = phrase_labels(prompt.phrases)
    owner = [None] * len(caption)
    for j, spans in enumerate(prompt.spans):
        for b, e in spans:
            for k in range(b, min(e, len(caption))):
                owner[k] = labels[j]
    cmap = color_map(prompt.phrases)
    if novel_words:
        pat = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(novel_words, key=len, reverse=True)) + r")\b", re.I)
        for m in pat.finditer(caption):
            for k in range(m.start(), m.end()):
                owner[k] = NOVEL_LABEL
            cmap[NOVEL_LABEL] = NOVEL_COLOR
    segs: list[tuple[str, str | None]] = []
    for k, ch in enumerate(caption):
        if segs and segs[-1][1] == owner[k]:
            segs[-1] = (segs[-1][0] + ch, owner[k])
        else:
            segs.append((ch, owner[k]))
    return segs, cmap


def legend_html(phrases: list[str], counts: list[int] | None = None) -> str:
    items = []
    for j, label in enumerate(phrase_labels(phrases)):
        n = f" ({counts[j]})" if counts is not None else ""
        items.append(f'<span class="glip-chip" style="border-color:{phrase_color(j)}">'
                     f'<i style="background:{phrase_color(j)}"></i>{_esc(label)}{n}</span>')
    return '<div class="glip-legend">' + "".join(items) + "</div>"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- images ------------------------------------------------------------------------------------------
def annotate(result, image, highlight: int | None = None, max_boxes: int = MAX_SHOWN_BOXES) -> Image.Image:
    if len(result) > max_boxes:
        result = _first(result, max_boxes)
    return draw_result(result, image, highlight=highlight)


def _first(result, n):
    import copy

    r = copy.copy(result)
    r.boxes, r.scores, r.phrase_ids, r.token_scores = (result.boxes[:n], result.scores[:n], result.phrase_ids[:n],
                                                       result.token_scores[:n])
    return r


def draw_boxes(image: Image.Image, boxes, labels: list[str], colors: list[str], width: int = 3,
               dashed: bool = False) -> Image.Image:
    """Plain boxes with labels (ground truth, teacher/student views)."""
    from glip.draw import _font

    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    font = _font(max(11, round(max(im.size) / 40)))
    for b, lab, col in zip(boxes, labels, colors):
        x1, y1, x2, y2 = (float(v) for v in b)
        rgb = hex_to_rgb(col)
        if dashed:
            _dashed_rect(d, (x1, y1, x2, y2), rgb, width)
        else:
            d.rectangle([x1, y1, x2, y2], outline=rgb, width=width)
        if lab:
            tb = d.textbbox((0, 0), lab, font=font)
            tw, th = tb[2] - tb[0], tb[3] - tb[1]
            ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1 + width
            d.rectangle([x1, ty, x1 + tw + 6, ty + th + 4], fill=rgb)
            d.text((x1 + 3, ty + 1 - tb[1]), lab, fill=(255, 255, 255), font=font)
    return im


def _dashed_rect(d, box, rgb, width, dash=8):
    x1, y1, x2, y2 = box
    for (a, b), (c, e) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        n = max(1, int(math.hypot(c - a, e - b) // dash))
        for k in range(0, n, 2):
            t0, t1 = k / n, min(1.0, (k + 1) / n)
            d.line([(a + (c - a) * t0, b + (e - b) * t0), (a + (c - a) * t1, b + (e - b) * t1)], fill=rgb, width=width)


def heat_overlay(image: Image.Image, heat, alpha: float = 0.6, cmap: str = "inferno", normalize: bool = True,
                 box=None) -> Image.Image:
    """A (H, W) map as a colour overlay on the image (resized to the image if needed)."""
    im = image.convert("RGB")
    h = np.asarray(heat, dtype=np.float32)
    if h.shape != (im.height, im.width):
        h = np.asarray(Image.fromarray(h).resize(im.size, Image.BILINEAR))
    if normalize:
        lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
        h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    rgba = colormaps[cmap](np.clip(np.nan_to_num(h), 0, 1))[..., :3]
    base = np.asarray(im, dtype=np.float32) / 255.0
    weight = alpha * (0.35 + 0.65 * np.clip(h, 0, 1))[..., None]
    out = Image.fromarray((255 * ((1 - weight) * base * 0.85 + weight * rgba)).clip(0, 255).astype(np.uint8))
    if box is not None:
        d = ImageDraw.Draw(out)
        d.rectangle([float(v) for v in box], outline=(255, 255, 255), width=2)
    return out


def tile(items: list[tuple[Image.Image, str]], tile_size: int = 220, pad: int = 6) -> Image.Image:
    """Captioned tiles side by side in one image (the layer strip)."""
    from glip.draw import _font

    font = _font(13)
    th = 20
    ims = []
    for im, _ in items:
        im = im.copy()
        im.thumbnail((tile_size, tile_size))
        ims.append(im)
    H = max(im.height for im in ims) + th + 2 * pad
    W = sum(im.width for im in ims) + pad * (len(ims) + 1)
    out = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = pad
    for im, (_, cap) in zip(ims, items):
        out.paste(im, (x, pad))
        d.text((x, pad + im.height + 3), cap, fill=(30, 30, 30), font=font)
        x += im.width + pad
    return out


def mark_point(image: Image.Image, xy, color=(255, 255, 255)) -> Image.Image:
    im = image.copy()
    d = ImageDraw.Draw(im)
    x, y = xy
    r = max(4, round(max(im.size) / 80))
    d.ellipse([x - r, y - r, x + r, y + r], outline=color, width=2)
    d.line([x - 2 * r, y, x - r, y], fill=color, width=2)
    d.line([x + r, y, x + 2 * r, y], fill=color, width=2)
    return im


# --- charts ------------------------------------------------------------------------------------------
def token_colors(tokens, prompt) -> list[str]:
    """Colour of each token: its phrase's colour, grey when it belongs to no phrase."""
    out = []
    for t in tokens:
        col = GRAY
        for j, spans in enumerate(prompt.spans):
            if t.end > t.start and any(b <= t.start < e for b, e in spans):
                col = phrase_color(j)
                break
        out.append(col)
    return out


def token_bars(tokens, values, colors, title: str, ylabel: str = "score", ylim=(0, 1), mark: list[int] | None = None):
    """Bar chart over the prompt tokens (special tokens hatched)."""
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.32 * n + 2)), 3.0), dpi=90)
    v = np.nan_to_num(np.asarray(values, dtype=np.float32))
    bars = ax.bar(range(n), v, color=colors, edgecolor="#333333", linewidth=0.4)
    for t, b in zip(tokens, bars):
        if t.special:
            b.set_hatch("//")
            b.set_alpha(0.5)
    for i in mark or []:
        if 0 <= i < n:
            bars[i].set_edgecolor("black")
            bars[i].set_linewidth(2.0)
    ax.set_xticks(range(n))
    ax.set_xticklabels([t.text for t in tokens], rotation=70, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        top = float(np.nanmax(v)) if len(v) else 0.0
        if ylim == (0, 1) and top < 0.2:  # very low scores (e.g. untrained weights): zoom in, and say so
            ylim = (0, max(0.01, 1.15 * top))
            ylabel += " (zoomed)"
            ax.set_ylabel(ylabel)
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def layer_token_matrix(tokens, matrix, title: str, row_labels: list[str]):
    """Rows (layers) × tokens heat map (image → text attention through depth)."""
    m = np.asarray(matrix, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.32 * len(tokens) + 2)), 0.45 * len(row_labels) + 1.6), dpi=90)
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([t.text for t in tokens], rotation=70, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    plt.close(fig)
    return fig


def sharpness_plot(values: list[float], labels: list[str], title: str):
    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=90)
    ax.plot(range(len(values)), values, marker="o", color="#4363d8")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, max(0.05, max(values) * 1.2) if values else 1)
    ax.set_ylabel("sharpness (1 − H/Hmax)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def phrase_compare_plot(names: list[str], a: list[float], b: list[float], label_a: str, label_b: str, title: str):
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 0.9 * n + 2)), 3.0), dpi=90)
    x = np.arange(n)
    ax.bar(x - 0.2, a, width=0.4, label=label_a, color=[phrase_color(j) for j in range(n)], alpha=0.55, edgecolor="#333")
    ax.bar(x + 0.2, b, width=0.4, label=label_b, color=[phrase_color(j) for j in range(n)], edgecolor="#333", hatch="..")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=8, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("best box score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


# --- measured metrics (assets/metrics.json, written by `python -m glip.train.report`) ---------------------------
METRIC_BARS = [("test_det", "AP50", "known: detection AP50"), ("test_ground", "R@1", "known: grounding R@1"),
           ("test_ground", "R@5", "known: grounding R@5"), ("test_novel", "R@1", "novel: grounding R@1"),
           ("test_novel", "R@5", "novel: grounding R@5")]


def metrics_plot(path: Path):
    """(figure or None, markdown note): teacher vs student on known and novel concepts."""
    if not path.is_file():
        return None, f"No measured metrics yet (`{path.name}` is produced by `python -m glip.train.report`)."
    try:
        data = json.loads(path.read_text())
        vals = {m: [float(data[m]["metrics"][split][key]) for split, key, _ in METRIC_BARS] for m in ("teacher", "student")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"Could not read `{path.name}` ({e.__class__.__name__}: {e})."
    names = [label for _, _, label in METRIC_BARS]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=90)
    x = np.arange(len(names))
    for k, (m, col) in enumerate(zip(("teacher", "student"), ("#f58231", "#4363d8"))):
        bars = ax.bar(x + (k - 0.5) * 0.4, vals[m], width=0.4, label=m, color=col)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axvspan(2.5, 4.5, color="#ffd8b1", alpha=0.3, lw=0)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("Measured on fresh-seed scenes: teacher vs student (shaded: novel words)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    ev = data.get("eval", {})
    return fig, (f"From `{path.name}`: seed {ev.get('seed', '?')}, {ev.get('n', '?')} scenes per split, IoU "
                 f"{ev.get('iou', 0.5)}. {targets_note(vals)} See the README for why.")


def targets_note(vals: dict[str, list[float]]) -> str:
    """The issue's targets, read off the measured bars (order of METRIC_BARS): which are met, which are not."""
    t, s = vals["teacher"], vals["student"]
    checks = [
        ("detection AP50 ≥ 0.90", f"{t[0]:.2f} / {s[0]:.2f}", min(t[0], s[0]) >= 0.90),
        ("grounding R@1 ≥ 0.90", f"{t[1]:.2f} / {s[1]:.2f}", min(t[1], s[1]) >= 0.90),
        ("student novel R@1 ≥ 0.80", f"{s[3]:.2f}", s[3] >= 0.80),
        ("novel gain ≥ +0.30", f"{s[3] - t[3]:+.2f}", s[3] - t[3] >= 0.30),
    ]
    met = [f"{name} ({v})" for name, v, ok in checks if ok]
    missed = [f"{name} ({v})" for name, v, ok in checks if not ok]
    return (f"Targets met (teacher / student): {', '.join(met) or 'none'}. "
            f"Missed: {', '.join(missed) or 'none'}.")
