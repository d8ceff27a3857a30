"""Pixels in: robust image loading and the official evaluation preprocessing (§3.1).

Loading (`open_image`) checks the pixel count in the file's header before any pixel is decoded, decodes
JPEGs directly at a reduced scale when they are larger than the model could use (`Image.draft`), and
keeps the original (W, H) beside the pixels: boxes are always reported in the original image's frame,
whatever size the pixels were shrunk to.

Preprocessing: resize the shorter side to `min_size` unless the longer side would exceed `max_size`
(`int(round(...))` then `int(...)` truncation, exactly as the official `Resize`), PIL bilinear,
ToTensor, RGB→BGR ×255, (x - mean) / std, then zero-pad bottom/right to a multiple of 32 — for a
batch, to the largest image of the batch (that padding changes results, as officially). The resized
size is computed from the ORIGINAL size, so a shrunk copy reaches the model at the size the original would.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 64_000_000        # refused before decoding: a small file can claim a huge canvas
MAX_SIDE = 4096                # longer inputs are shrunk at load (the model sees ≤1333 px by default)

_ORIENTATION = 0x0112          # the EXIF tag
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
# Modes PIL resizes directly: shrinking them before the RGB conversion keeps the conversion's copy small.
_RESIZABLE = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr"}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An image ready for the model: RGB `pixels` (long side ≤ the loader's max_side) and `size`, the (W, H)
    of the original after EXIF orientation — the frame of every box, mask and size the library reports."""
    pixels: Image.Image
    size: tuple[int, int]

    @property
    def downscaled(self) -> bool:
        return self.pixels.size != self.size


def fit_size(size: tuple[int, int], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(W, H) shrunk, aspect kept, so that the long side is at most `max_side` (unchanged if it already is)."""
    W, H = size
    if max(W, H) <= max_side:
        return W, H
    s = max_side / max(W, H)
    return max(1, round(W * s)), max(1, round(H * s))


def check_pixels(size: tuple[int, int]) -> None:
    W, H = size
    if W < 1 or H < 1:
        raise ImageError("Image is empty.")
    if W * H > MAX_PIXELS:
        raise ImageError(f"Image is too large ({W}×{H} pixels; limit {MAX_PIXELS:,}).")


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _open_file(src) -> Image.Image:
    """A lazily opened image (header read, no pixel decoded): path, bytes or binary file object."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"Image file not found: {path}")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    try:
        with warnings.catch_warnings():  # PIL warns about large canvases; we refuse them with our own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(src)
    except Image.DecompressionBombError:
        raise ImageError(f"Image is too large (more than {MAX_PIXELS:,} pixels).") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"Could not read the image: it is corrupt or not an image ({e.__class__.__name__}).") from e


def _is_file(src) -> bool:
    return isinstance(src, (str, Path, bytes, bytearray, memoryview)) or hasattr(src, "read")


def probe_size(image) -> tuple[int, int]:
    """The (W, H) an image will have once loaded (EXIF orientation applied), read from the file's header
    without decoding its pixels; raises ImageError for a file that is not an image or is over MAX_PIXELS.

    Accepts what `open_image` accepts (path, bytes, binary file, PIL image, numpy array, LoadedImage): call it on
    an upload before handing the bytes to anything that decodes them."""
    if isinstance(image, LoadedImage):
        return image.size
    if isinstance(image, np.ndarray):
        size = (int(image.shape[1]), int(image.shape[0])) if image.ndim >= 2 else (0, 0)
        check_pixels(size)
        return size
    if isinstance(image, Image.Image):
        check_pixels(image.size)
        return _oriented(image.size, _orientation(image, decode=False))
    if not _is_file(image):
        raise ImageError(f"Unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a path.")
    with _open_file(image) as im:
        check_pixels(im.size)
        return _oriented(im.size, _orientation(im, decode=False))


def _orientation(im: Image.Image, decode: bool = True) -> int:
    """The EXIF orientation (1 = as stored). PNG keeps EXIF after the pixels; reading it there needs a decode,
    so a header-only probe reports a PNG's stored size."""
    if not decode and im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a readable image unusable
        return 1
    return int(value) if value in _TRANSPOSE else 1


def open_image(image, max_side: int = MAX_SIDE) -> LoadedImage:
    """PIL image, numpy array (HxW, HxWx3/4; uint8, uint16 or float in [0,1]), path, bytes or binary file →
    LoadedImage (RGB pixels with the long side ≤ `max_side`, and the original size).

    The pixel count is checked from the header before decoding; a JPEG larger than `max_side` is decoded at a
    1/2, 1/4 or 1/8 scale that still covers it; other formats are shrunk right after decoding, before any other
    copy. EXIF orientation is applied, alpha is composited on white, 16-bit is scaled to 8-bit."""
    if isinstance(image, LoadedImage):
        if max(image.pixels.size) <= max_side:
            return image
        return LoadedImage(_shrink(image.pixels, fit_size(image.pixels.size, max_side)), image.size)
    if _is_file(image):
        with _open_file(image) as im:
            stored = im.size
            check_pixels(stored)
            if max(stored) > max_side:
                im.draft(None, fit_size(stored, max_side))  # JPEG only (a no-op elsewhere): decode at a scale ≥ that
            try:
                im.load()
            except Image.DecompressionBombError:
                raise ImageError(f"Image is too large (more than {MAX_PIXELS:,} pixels).") from None
            except _DECODE_ERRORS as e:
                raise ImageError(f"Could not read the image: it is corrupt or not an image ({e.__class__.__name__}).") from e
            return _finish(im, _orientation(im), stored, max_side, detach=True)
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise ImageError(f"Unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a path.")
    check_pixels(image.size)
    return _finish(image, _orientation(image), image.size, max_side, detach=False)


def load_image(image, max_side: int = MAX_SIDE) -> Image.Image:
    """The RGB pixels `open_image` gives (shrunk to `max_side` if larger; the original size is
    `open_image(image).size`, which is the frame of the boxes a prediction returns)."""
    return open_image(image, max_side).pixels


def _finish(im: Image.Image, orientation: int, stored: tuple[int, int], max_side: int, detach: bool) -> LoadedImage:
    """Shrink (first, where the mode allows: the smallest copies), convert to RGB, orient."""
    original = _oriented(stored, orientation)
    target = _oriented(fit_size(original, max_side), orientation)  # in the stored orientation
    if im.mode in _RESIZABLE:
        out = _to_rgb(_shrink(im, target))
    else:
        out = _shrink(_to_rgb(im), target)
    if orientation != 1:
        out = out.transpose(_TRANSPOSE[orientation])
    if detach and out is im:  # the caller closes the file
        out = im.copy()
    return LoadedImage(out, original)


def _shrink(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == tuple(size):
        return im
    # reducing_gap: an integer box reduction first when shrinking a lot (what PIL's thumbnail does)
    return im.resize(tuple(size), Image.BILINEAR, reducing_gap=2.0)


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"Unsupported array shape {a.shape}; expected HxW, HxWx3 or HxWx4.")
    check_pixels((a.shape[1], a.shape[0]))
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
    """The official evaluation `Resize.get_size` rule. An image so thin that the rule leaves it a short side of
    one pixel or less (an aspect ratio of several hundred to one, where the official code fails on a 0-pixel
    side or skips the resize) is fed at 1 × `max_size`."""
    size = min_size
    short, long = float(min(w, h)), float(max(w, h))
    if max_size and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        out = h, w
    elif w < h:
        out = int(size * h / w), size
    else:
        out = size, int(size * w / h)
    if max_size and min(out) <= 1 and (min(out) < 1 or max(out) > max_size):
        out = (max_size, 1) if h > w else (1, max_size)
    return out


def resize_pixels(image, min_size: int, max_size: int) -> torch.Tensor:
    """RGB PIL image (or LoadedImage) → uint8 RGB tensor (3, h, w) at the official resize of the ORIGINAL size
    (for a LoadedImage, its `size`; the pixels may be a shrunk copy). The part of the preprocessing that needs
    the CPU: it can run ahead in a worker, and the batch travels to the device as bytes."""
    if isinstance(image, LoadedImage):
        (W, H), image = image.size, image.pixels
    else:
        W, H = image.size
    h, w = resized_hw(H, W, min_size, max_size)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 RGB (..., 3, h, w) → float BGR on the 0..255 scale, minus `mean`, over `std` (official
    `ToTensor` → ×255 BGR → `Normalize`), on the tensor's own device."""
    mean, std = _channel_constants(tuple(mean), tuple(std), pixels.device)
    x = pixels[..., [2, 1, 0], :, :].float()  # the channel swap on the bytes: a permutation, exact
    return x.div_(255).mul_(255).sub_(mean).div_(std)  # the official ops in their order, in place


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std on `device`, uploaded once rather than with every image."""
    return (torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None],
            torch.tensor(std, dtype=torch.float32, device=device)[:, None, None])


def to_tensor(image, min_size: int, max_size: int, mean, std) -> torch.Tensor:
    """RGB PIL image (or LoadedImage) → normalised BGR float tensor (3, h, w): `resize_pixels`, then `normalize`."""
    return normalize(resize_pixels(image, min_size, max_size), mean, std)


def batch_pixels(pixels: list[torch.Tensor], mean, std, divisibility: int = 32,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`batch_images` of the normalised images, built on `device` from uint8 `resize_pixels` outputs: the
    bytes are copied over and normalised there (the same values as normalising first, then padding)."""
    return batch_images([normalize(p.to(device), mean, std) for p in pixels], divisibility)


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


__all__ = ["MAX_PIXELS", "MAX_SIDE", "ImageError", "LoadedImage", "batch_images", "batch_pixels", "check_pixels", "fit_size",
           "load_image", "normalize", "open_image", "probe_size", "resize_pixels", "resized_hw", "to_tensor"]
