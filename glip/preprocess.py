"""The model's input preprocessing, built once from a GLIPConfig: images → padded normalised batches,
captions → BERT token ids, prompts → positive maps and chunks of at most `max_len` tokens.

Every caller that feeds the network (prediction, training data, parity, diagnostics) goes through this
object, so the four image settings and the query length are read from the config in one place.
"""
from __future__ import annotations

import torch

from .image import MAX_SIDE, LoadedImage, batch_images, batch_pixels, open_image, resize_pixels, resized_hw, to_tensor
from .prompts import Prompt, chunk, positive_map, tokenize


class Preprocessor:
    """What the network's inputs depend on: the test-time resize (`min_size`, `max_size`), the pixel
    normalisation (`mean`, `std`, BGR 0..255), the batch padding (`divisibility`) and the query length
    (`max_len`). `min_size` / `max_size` override the config's (a prediction at another input size)."""

    def __init__(self, config, min_size: int | None = None, max_size: int | None = None):
        self.min_size = int(min_size or config.min_size_test)
        self.max_size = int(max_size or config.max_size_test)
        self.mean, self.std = tuple(config.pixel_mean), tuple(config.pixel_std)
        self.divisibility = int(config.size_divisibility)
        self.max_len = int(config.max_query_len)

    def __repr__(self) -> str:
        return (f"Preprocessor(min_size={self.min_size}, max_size={self.max_size}, divisibility={self.divisibility}, "
                f"max_len={self.max_len})")

    # --- images ---------------------------------------------------------------------------------------
    @property
    def working_side(self) -> int:
        """The longest side of the pixels kept for the model: twice its input size (so the final resize is
        still a proper antialiased downscale), at most MAX_SIDE. Smaller images are used untouched."""
        return min(MAX_SIDE, 2 * self.max_size)

    def load(self, image) -> LoadedImage:
        """Any image input → LoadedImage with pixels of at most `working_side` and the original size."""
        return open_image(image, max_side=self.working_side)

    def resized_hw(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the model sees for an original image of (W, H) `size`."""
        W, H = size
        return resized_hw(H, W, self.min_size, self.max_size)

    def image(self, image) -> torch.Tensor:
        """RGB PIL image or LoadedImage → (3, h, w) normalised BGR tensor at the resized size."""
        return to_tensor(image, self.min_size, self.max_size, self.mean, self.std)

    def pixels(self, image) -> torch.Tensor:
        """RGB PIL image or LoadedImage → (3, h, w) uint8 RGB at the resized size (the CPU half of `image`)."""
        return resize_pixels(image, self.min_size, self.max_size)

    def batch_pixels(self, pixels: list[torch.Tensor], device="cpu") -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """`pixels` outputs → the padded normalised batch on `device` (equal to `batch` of `image` outputs)."""
        return batch_pixels(pixels, self.mean, self.std, self.divisibility, device)

    def batch(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Zero-pad to one (B, 3, H, W) batch; returns it and each image's unpadded (h, w)."""
        return batch_images(tensors, self.divisibility)

    def images(self, images: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return self.batch([self.image(im) for im in images])

    # --- text -----------------------------------------------------------------------------------------
    def tokenize(self, captions: list[str] | str):
        """BERT input ids and attention mask, padded to `max_len` positions."""
        return tokenize(captions, max_len=self.max_len)

    def positive_map(self, prompt: Prompt, normalize: bool = True) -> torch.Tensor:
        """(n_phrases, max_len) phrase → token map (official `create_positive_map`)."""
        return positive_map(prompt, max_len=self.max_len, normalize=normalize)

    def chunk(self, prompt: Prompt) -> list[tuple[Prompt, list[int]]]:
        """The prompt split into sub-prompts of at most `max_len` tokens, with their phrase indices."""
        return chunk(prompt, max_len=self.max_len)


__all__ = ["LoadedImage", "Preprocessor"]
