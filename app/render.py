"""Server-side rendering for the app: images with boxes, heat-map overlays, highlighted prompts, charts.

One style per phrase everywhere (`glip.draw.phrase_styles`): the boxes, the highlighted prompt, the legend,
the token bars and the tables all use it. Charts wrap long prompts over several rows instead of shrinking.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from glip.draw import PhraseStyle, draw_boxes, draw_result, font, phrase_styles, readable_text  # noqa: E402

NOVEL_LABEL = "novel word"
NOVEL_COLOR = "#ffd400"
GRAY = "#9e9e9e"
MAX_SHOWN_BOXES = 100  # the detections table and the image never show more
TOKENS_PER_ROW = 22    # token charts wrap after this many tokens
CSS_DASH = {"solid": "solid", "dashed": "dashed", "dotted": "dotted"}


# --- labels and colours ------------------------------------------------------------------------------
def phrase_labels(phrases: list[str]) -> list[str]:
    """Unique display label per phrase (a repeated phrase gets '#j')."""
    seen, out = {}, []
    for j, p in enumerate(phrases):
        label = p if p not in seen else f"{p} #{j + 1}"
        seen[p] = True
        out.append(label)
    return out


def color_map(phrases: list[str], styles: list[PhraseStyle] | None = None) -> dict[str, str]:
    styles = styles or phrase_styles(phrases)
    return {label: styles[j].color for j, label in enumerate(phrase_labels(phrases))}


def highlighted_prompt(prompt, novel_words=()) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """The caption as (segment, label) pairs for gr.HighlightedText, phrases labelled (coloured) by their
    phrase style, plus the color_map. `novel_words`: words highlighted with their own label: "<phrase> · novel
    word" in a darker shade of the phrase's colour inside a phrase, "novel word" in yellow outside any."""
    caption = prompt.caption
    labels = phrase_labels(prompt.phrases)
    owner = [None] * len(caption)
    for j, spans in enumerate(prompt.spans):
        for b, e in spans:
            for k in range(b, min(e, len(caption))):
                owner[k] = labels[j]
    cmap = color_map(prompt.phrases)
    if novel_words:  # inside a phrase: the phrase's colour, darker (the phrase stays one colour family)
        pat = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(novel_words, key=len, reverse=True)) + r")\b", re.I)
        for m in pat.finditer(caption):
            phrase = owner[m.start()]
            label = NOVEL_LABEL if phrase is None else f"{phrase} · {NOVEL_LABEL}"
            cmap[label] = NOVEL_COLOR if phrase is None else darker(cmap[phrase])
            for k in range(m.start(), m.end()):
                owner[k] = label
    segs: list[tuple[str, str | None]] = []
    for k, ch in enumerate(caption):
        if segs and segs[-1][1] == owner[k]:
            segs[-1] = (segs[-1][0] + ch, owner[k])
        else:
            segs.append((ch, owner[k]))
    return segs, cmap


def darker(color: str, amount: float = 0.35) -> str:
    """A "#rrggbb" colour moved `amount` of the way to black."""
    r, g, b = (int(color[k:k + 2], 16) for k in (1, 3, 5))
    return "#" + "".join(f"{round(v * (1 - amount)):02x}" for v in (r, g, b))


def legend_html(phrases: list[str], counts: list[int] | None = None) -> str:
    styles = phrase_styles(phrases)
    items = []
    for j, label in enumerate(phrase_labels(phrases)):
        st = styles[j]
        n = f" ({counts[j]})" if counts is not None else ""
        items.append(f'<span class="glip-chip" style="border: 3px {CSS_DASH[st.dash]} {st.color}">'
                     f'<i style="background:{st.color}"></i>{esc(label)}{n}</span>')
    return '<div class="glip-legend">' + "".join(items) + "</div>"


def cell_css(color: str) -> str:
    """A table cell painted in a phrase colour with readable text."""
    return f"background-color: {color}; color: {readable_text(color)}"


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- images ------------------------------------------------------------------------------------------
def first(result, n: int):
    """The n best boxes of a result (boxes are sorted by score)."""
    if len(result) <= n:
        return result
    r = copy.copy(result)
    r.boxes, r.scores, r.phrase_ids, r.token_scores = (result.boxes[:n], result.scores[:n], result.phrase_ids[:n],
                                                       result.token_scores[:n])
    return r


def annotate(result, image, highlight: int | None = None, max_boxes: int = MAX_SHOWN_BOXES) -> Image.Image:
    """Boxes of a result on `image` (the predicted image or a display copy of it)."""
    return draw_result(first(result, max_boxes), image, highlight=highlight)


def plain_boxes(image, boxes, labels: list[str], styles: list[PhraseStyle], source_size=None) -> Image.Image:
    """Boxes with labels in given styles (ground truth, the box picked in the fusion tab)."""
    return draw_boxes(image, boxes, labels, styles, source_size=source_size)


def heat_overlay(image: Image.Image, heat, alpha: float = 0.6, cmap: str = "inferno", normalize: bool = True,
                 box=None, scale: tuple[float, float] | None = None) -> Image.Image:
    """A (H, W) map as a colour overlay on the image (resized to the image if needed). `scale` (lo, hi): the
    values drawn as the colour map's ends, shared by maps shown side by side; else `normalize` stretches this map
    alone to its own min..max."""
    im = image.convert("RGB")
    h = np.asarray(heat, dtype=np.float32)
    if h.shape != (im.height, im.width):
        h = np.asarray(Image.fromarray(h).resize(im.size, Image.BILINEAR))
    if scale is not None or normalize:
        lo, hi = scale if scale is not None else (float(np.nanmin(h)), float(np.nanmax(h)))
        h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    rgba = colormaps[cmap](np.clip(np.nan_to_num(h), 0, 1))[..., :3]
    base = np.asarray(im, dtype=np.float32) / 255.0
    weight = alpha * (0.35 + 0.65 * np.clip(h, 0, 1))[..., None]
    out = Image.fromarray((255 * ((1 - weight) * base * 0.85 + weight * rgba)).clip(0, 255).astype(np.uint8))
    if box is not None:
        d = ImageDraw.Draw(out)
        d.rectangle([float(v) for v in box], outline=(255, 255, 255), width=2)
    return out


def tile(items: list[tuple[Image.Image, str]], tile_size: int = 240, pad: int = 8) -> Image.Image:
    """Captioned tiles side by side in one image (the layer strip); captions wrap under their tile."""
    fnt = font(15)
    ims = []
    for im, _ in items:
        im = im.copy()
        im.thumbnail((tile_size, tile_size))
        ims.append(im)
    line = 19
    caps = [_wrap(cap, fnt, max(im.width, 120)) for im, (_, cap) in zip(ims, items)]
    H = max(im.height for im in ims) + line * max(len(c) for c in caps) + 2 * pad
    W = sum(max(im.width, 120) for im in ims) + pad * (len(ims) + 1)
    out = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = pad
    for im, cap in zip(ims, caps):
        out.paste(im, (x, pad))
        for k, text in enumerate(cap):
            d.text((x, pad + im.height + 3 + k * line), text, fill=(20, 20, 20), font=fnt)
        x += max(im.width, 120) + pad
    return out


def _wrap(text: str, fnt, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        nxt = f"{cur} {w}".strip()
        if cur and fnt.getlength(nxt) > width:
            lines.append(cur)
            cur = w
        else:
            cur = nxt
    return lines + ([cur] if cur else [])


def mark_point(image: Image.Image, xy, color=(255, 255, 255)) -> Image.Image:
    im = image.copy()
    d = ImageDraw.Draw(im)
    x, y = xy
    r = max(9, round(max(im.size) / 40))  # the image is shown scaled down: a ring and tick marks that stay visible
    for col, w in (((0, 0, 0), 6), (color, 3)):
        d.ellipse([x - r, y - r, x + r, y + r], outline=col, width=w)
        d.line([x - 2 * r, y, x - r, y], fill=col, width=w)
        d.line([x + r, y, x + 2 * r, y], fill=col, width=w)
    return im


# --- charts ------------------------------------------------------------------------------------------
def token_colors(tokens, prompt) -> list[str]:
    """Colour of each token: its phrase's colour, grey when it belongs to no phrase."""
    styles = phrase_styles(prompt.phrases)
    out = []
    for t in tokens:
        col = GRAY
        for j, spans in enumerate(prompt.spans):
            if t.end > t.start and any(b <= t.start < e for b, e in spans):
                col = styles[j].color
                break
        out.append(col)
    return out


def _rows(n: int, per_row: int = TOKENS_PER_ROW) -> list[range]:
    k = max(1, -(-n // per_row))
    size = -(-n // k)  # balanced rows
    return [range(i, min(n, i + size)) for i in range(0, n, size)] or [range(0)]


def token_bars(tokens, values, colors, title: str, ylabel: str = "score", ylim=(0, 1), mark: list[int] | None = None):
    """Bar chart over the prompt tokens (special tokens hatched), wrapped over rows of at most
    TOKENS_PER_ROW tokens so that every label stays readable at any prompt length."""
    n = len(tokens)
    v = np.nan_to_num(np.asarray(values, dtype=np.float32))
    rows = _rows(n)
    fig, axes = plt.subplots(len(rows), 1, figsize=(10.0, 0.6 + 2.3 * len(rows)), dpi=100, squeeze=False)
    top = float(np.nanmax(v)) if len(v) else 0.0
    zoom = ylim == (0, 1) and top < 0.2   # very low scores (untrained weights): zoom in, and say so
    lim = (0, max(0.01, 1.15 * top)) if zoom or ylim is None else ylim
    for ax, idx in zip(axes[:, 0], rows):
        idx = list(idx)
        bars = ax.bar(range(len(idx)), v[idx], color=[colors[i] for i in idx], edgecolor="#333333", linewidth=0.5)
        for b, i in zip(bars, idx):
            if tokens[i].special:
                b.set_hatch("//")
                b.set_alpha(0.5)
            if mark and i in mark:
                b.set_edgecolor("black")
                b.set_linewidth(2.2)
        ax.set_xticks(range(len(idx)))
        ax.set_xticklabels([tokens[i].text for i in idx], rotation=45, ha="right", fontsize=10)
        ax.set_xlim(-0.6, max(len(idx), TOKENS_PER_ROW // 2) - 0.4)
        ax.set_ylim(*lim)
        ax.set_ylabel(ylabel + (" (zoomed)" if zoom else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(title, fontsize=11)
    fig.tight_layout()
    plt.close(fig)
    return fig


def layer_token_matrix(tokens, matrix, title: str, row_labels: list[str]):
    """Rows (layers) × tokens heat map (image → text attention through depth), wrapped like token_bars."""
    m = np.asarray(matrix, dtype=np.float32)
    rows = _rows(len(tokens))
    fig, axes = plt.subplots(len(rows), 1, figsize=(10.0, (0.42 * len(row_labels) + 1.3) * len(rows) + 0.4), dpi=100,
                             squeeze=False)
    vmax = float(np.nanmax(m)) if m.size else 1.0
    for ax, idx in zip(axes[:, 0], rows):
        idx = list(idx)
        im = ax.imshow(m[:, idx], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(row_labels)))
        ax.set_yticklabels(row_labels, fontsize=9)
        ax.set_xticks(range(len(idx)))
        ax.set_xticklabels([tokens[i].text for i in idx], rotation=45, ha="right", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    axes[0, 0].set_title(title, fontsize=11)
    fig.tight_layout()
    plt.close(fig)
    return fig


def sharpness_plot(values: list[float], labels: list[str], title: str):
    fig, ax = plt.subplots(figsize=(8.0, 3.2), dpi=100)
    ax.plot(range(len(values)), values, marker="o", color="#4363d8", linewidth=2)
    for x, y in enumerate(values):
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=10)
    ax.set_ylim(0, max(0.05, max(values) * 1.3) if values else 1)
    ax.set_ylabel("sharpness (1 − H/Hmax)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def phrase_compare_plot(names: list[str], a: list[float], b: list[float], label_a: str, label_b: str, title: str,
                        colors: list[str] | None = None, colors_b: list[str] | None = None):
    """Paired bars per name: `a` plain, `b` hatched; `colors` (default: by name) colour the a bars and, unless
    `colors_b` is given (two prompts, each with its own phrase colours), the b bars too."""
    n = len(names)
    colors = colors or [s.color for s in phrase_styles(names)]
    colors_b = colors_b or colors
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.9 * n + 3)), 3.4), dpi=100)
    x = np.arange(n)
    ax.bar(x - 0.2, a, width=0.4, label=label_a, color=colors, alpha=0.55, edgecolor="#333")
    ax.bar(x + 0.2, b, width=0.4, label=label_b, color=colors_b, edgecolor="#333", hatch="..")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=9, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("best box score")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=9)
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
    fig, ax = plt.subplots(figsize=(8.0, 3.4), dpi=100)
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
