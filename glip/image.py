"""Pixels in: robust image loading and the official evaluation preprocessing (§3.1).

Resize the shorter side to `min_size` unless the longer side would exceed `max_size`
(`int(round(...))` then `int(...)` truncation, exactly as the official `Resize`), PIL bilinear,
ToTensor, RGB→BGR ×255, (x - mean) / std, then zero-pad bottom/right to a multiple of 32 — for a
batch, to the largest image of the batch (that padding changes results, as officially).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 64_000_000        # refuse decompression bombs with a clear message
MAX_SIDE = 4096                # larger inputs are downscaled first (the model sees ≤1333 px anyway)




def load_image(image) -> Image.Image:
    """PIL image, numpy array (HxW, HxWx3/4; uint8, uint16 or float in [0,1]), path or bytes → RGB PIL.

    EXIF orientation is applied, alpha is composited on white, 16-bit is scaled to 8-bit.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"Image file not found: {path}")
        image = path.read_bytes()
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"Image is too large ({im.width}×{im.height} pixels; limit {MAX_PIXELS:,}).")
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ImageError(f"Could not read the image: it is corrupt or not an image ({e.__class__.__name__}).") from e
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise ImageError(f"Unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a path.")
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(f"Image is too large ({image.width}×{image.height} pixels; limit {MAX_PIXELS:,}).")
    if image.width < 1 or image.height < 1:
        raise ImageError("Image is empty.")
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
    return image


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"Unsupported array shape {a.shape}; expected HxW, HxWx3 or HxWx4.")
    if a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)  # 65535 → 255, same rule as 16-bit PIL images
    elif a.dtype.kind == "f":
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.int64)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray(np.clip(a if a.max(initial=0) > 1 else a * 255, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The official evaluation `Resize.get_size` rule."""
    size = min_size
    short, long = float(min(w, h)), float(max(w, h))
    if max_size and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def to_tensor(image: Image.Image, min_size: int, max_size: int, mean, std) -> torch.Tensor:
    """RGB PIL → normalised BGR float tensor (3, h, w) at the resized size."""
    h, w = resized_hw(image.height, image.width, min_size, max_size)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    x = x[[2, 1, 0]] * 255
    mean = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    std = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def batch_images(tensors: list[torch.Tensor], divisibility: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad to the batch's largest size rounded up to `divisibility` (official `to_image_list`)."""
    H = max(t.shape[1] for t in tensors)
    W = max(t.shape[2] for t in tensors)
    if divisibility > 0:
        H, W = -(-H // divisibility) * divisibility, -(-W // divisibility) * divisibility
    out = tensors[0].new_zeros(len(tensors), 3, H, W)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out, [(t.shape[1], t.shape[2]) for t in tensors]
