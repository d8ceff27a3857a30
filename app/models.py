"""Which models the app offers and how they are loaded (bounded cache, fallback, download + convert)."""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from glip import GLIP, get_preset
from glip.checkpoint import CheckpointError, shipped_models

STUDENT, TEACHER = "toy-student", "toy-teacher"
OFFICIAL = {
    "GLIP-T (O365+GoldG, download)": "GLIPModel/GLIP/glip_tiny_model_o365_goldg.pth",
    "GLIP-L (download)": "GLIPModel/GLIP/glip_large_model.pth",
}
FALLBACK_NOTE = ("**Demo mode:** the shipped toy models (`assets/{names}`) are not there yet, so this app runs a "
                 "*randomly initialised* toy GLIP (with a pretrained MiniLM text encoder). Every view works and shows "
                 "the real mechanics, but the boxes and scores are meaningless until the trained models ship.")


def cache_dir() -> Path:
    return Path(os.environ.get("GLIP_CACHE", Path.home() / ".cache" / "glip-explorer"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelManager:
    """Loads models on demand and keeps at most `max_models` of them (LRU); thread-safe."""

    def __init__(self, local: str | None = None, max_models: int = 3):
        self.local = local or os.environ.get("GLIP_MODEL") or None
        self.max_models = max_models
        self.models: OrderedDict[str, GLIP] = OrderedDict()
        self.fallback: set[str] = set()
        self.lock = threading.Lock()

    # --- what can be chosen --------------------------------------------------------------------------
    @property
    def local_label(self) -> str | None:
        return f"local: {Path(self.local).name}" if self.local else None

    def choices(self) -> list[str]:
        out = [STUDENT, TEACHER]
        if self.local:
            out.insert(0, self.local_label)
        return out + list(OFFICIAL)

    def default(self) -> str:
        return self.local_label or STUDENT

    def missing_shipped(self) -> list[str]:
        have = shipped_models()
        return [n for n in (STUDENT, TEACHER) if n not in have]

    def banner(self) -> str:
        missing = self.missing_shipped()
        return FALLBACK_NOTE.format(names=", ".join(missing)) if missing else ""

    # --- loading -------------------------------------------------------------------------------------
    def get(self, name: str) -> GLIP:
        """The model for a choice label; raises CheckpointError with a user-facing message."""
        if not name:
            name = self.default()
        with self.lock:
            if name in self.models:
                self.models.move_to_end(name)
                return self.models[name]
            model = self._load(name)
            self.models[name] = model
            while len(self.models) > self.max_models:
                self.models.popitem(last=False)
            return model

    def _load(self, name: str) -> GLIP:
        dev = device()
        if name == self.local_label:
            return GLIP.from_pretrained(self.local, device=dev)
        if name in (STUDENT, TEACHER):
            if name in shipped_models():
                return GLIP.from_pretrained(name, device=dev)
            self.fallback.add(name)
            return random_toy(seed=0 if name == STUDENT else 1).to(dev)
        if name in OFFICIAL:
            return self._official(OFFICIAL[name], dev)
        raise CheckpointError(f"Unknown model {name!r}; choose one of {self.choices()}")

    def _official(self, spec: str, dev) -> GLIP:
        """Download (online only), convert once into our format, then load the converted copy."""
        slug = re.sub(r"[^\w.-]+", "_", spec)
        folder = cache_dir() / slug
        if (folder / "model.safetensors").is_file():
            return GLIP.from_pretrained(str(folder), device=dev)
        model = GLIP.from_pretrained(spec)          # raises CheckpointError offline, with a clear message
        try:
            model.save_pretrained(folder)
        except OSError:
            pass                                    # read-only disk: keep the model in memory only
        return model.to(dev)

    def is_fallback(self, name: str) -> bool:
        return name in self.fallback or (name in (STUDENT, TEACHER) and name in self.missing_shipped())


def random_toy(seed: int = 0) -> GLIP:
    """A random-weights toy GLIP with the pretrained MiniLM text encoder (the app's stand-in)."""
    from glip.language import load_pretrained_text_encoder

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GLIP(get_preset("toy"))
    finally:
        torch.random.set_rng_state(state)
    load_pretrained_text_encoder(model.language_backbone, "all-MiniLM-L6-v2")
    # Random heads score every box at about the 0.01 prior, under the 0.05 pre-filter: let them through so
    # that the views have boxes to show (at a low score threshold) until the trained models ship.
    model.config = model.config.replace(inference_th=0.0, pre_nms_top_n=100)  # (and keep NMS cheap)
    return model.eval()
