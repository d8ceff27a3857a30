"""What every tab shares: the model manager, the scratch folder, the pixel budget, predicting for a request,
display copies of images, the honest-framing note, error handling and named outputs.

No model math here: predictions come from `GLIP.predict`, everything drawn from `app.render`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
import traceback
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from glip.errors import GLIPError
from glip.image import load_image
from glip.label import known_vocabulary

from .limits import PixelBudget, check_prompt, probe_size
from .models import STUDENT, ModelManager, Resolved
from .scratch import Scratch
from .state import GroundRequest

log = logging.getLogger("glip.app")
DISPLAY_SIDE = 1280          # images are drawn on copies at most this large (boxes stay in original pixels)
CPU_SIZE = 512               # shorter input side of a real GLIP on a CPU, unless set (GLIP_CPU_SIZE, 0: the model's)
DISPLAY_MIN = 640            # and at least this large: labels on a small image would cover it


# --- error handling and outputs --------------------------------------------------------------------------------
def _spaces_gpu():
    """`spaces.GPU` when the `spaces` package imports (ZeroGPU Spaces), else the identity."""
    try:
        import spaces

        return spaces.GPU
    except Exception:  # noqa: BLE001 - not on Spaces
        return lambda fn: fn


gpu = _spaces_gpu()


def friendly(fn):
    """User mistakes → gr.Error with the library's message; anything else → a short gr.Error (the traceback goes
    to the server log only). The app keeps serving either way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except GLIPError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("Out of memory: try a smaller input size or fewer phrases.", print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            log.error("callback %s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(f"Something went wrong ({e.__class__.__name__}); the app is still running — try again "
                           "or with other inputs.", print_exception=False) from None

    return wrapper


def named(fn, comps: dict):
    """A callback returning a view dataclass → gradio's {component: value} outputs, by field name. Fields left at
    None are not sent (the component keeps its value)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        view = fn(*args, **kwargs)
        return {comps[f.name]: getattr(view, f.name) for f in fields(view) if getattr(view, f.name) is not None}

    return wrapper


def outputs(view_cls, comps: dict) -> list:
    return components(comps, *(f.name for f in fields(view_cls)))


def components(comps: dict, *names: str) -> list:
    """The components of a tab named `names`: the outputs of an event that writes only those (an event that
    fails marks its outputs with an error badge, which must never cover an input the user still needs)."""
    return [comps[k] for k in names]


def chunk_progress(progress):
    """`predict`'s (done, total) per prompt chunk → a gr.Progress bar, shown only for a prompt of several chunks."""
    def report(done: int, total: int) -> None:
        if total > 1:
            progress((done, total), desc="prompt chunks", unit="chunk")
    return report


def user_error(msg: str) -> gr.Error:
    return gr.Error(plain(msg), print_exception=False)


def warn(msg: str) -> None:
    """A toast: Gradio shows its text as typed, so the Markdown that notes on the page use is taken out."""
    gr.Warning(plain(msg))


def plain(md: str) -> str:
    """Markdown emphasis and code marks removed (`code` → code, **bold** → bold), for text shown verbatim."""
    return re.sub(r"(\*\*|__|`)(.+?)\1", r"\2", md).replace("*", "")


# --- the shared services -------------------------------------------------------------------------------------------
class Core:
    def __init__(self, manager: ModelManager | None = None):
        self.manager = manager or ModelManager()
        self.scratch = Scratch()
        self.budget = PixelBudget()
        self.cuda = torch.cuda.is_available()
        self.cpu_size = int(os.environ.get("GLIP_CPU_SIZE", CPU_SIZE))
        self.samples: set[str] = set()       # digests of the images the app generated (synthetic scenes)
        self._display: OrderedDict[str, Image.Image] = OrderedDict()
        self._display_lock = threading.Lock()
        self.examples = self.make_examples(self.scratch.root / "examples")

    # --- images -------------------------------------------------------------------------------------------------
    @staticmethod
    def digest(path: str) -> str:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()

    def remember_sample(self, path: str) -> str:
        d = self.digest(path)
        self.samples.add(d)
        return d

    def is_sample(self, path: str | None) -> bool:
        try:
            return bool(path) and self.digest(path) in self.samples
        except OSError:
            return False

    def make_examples(self, folder: Path) -> list[list[str]]:
        """Synthetic scenes for the examples gallery: [image path, prompt]."""
        from glip.data import make_sample

        folder.mkdir(parents=True, exist_ok=True)
        picks = [("gold_det", 0), ("gold_ground", 1), ("web", 2), ("test_novel", 3), ("gold_det", 4), ("gold_ground", 5)]
        out = []
        for split, i in picks:
            s = make_sample(split, i, 0)
            p = folder / f"{split}_{i}.png"
            s.image.save(p)
            self.remember_sample(str(p))
            out.append([str(p), s.caption.strip()])
        return out

    def image_size(self, path: str) -> tuple[int, int]:
        return probe_size(path)

    def display(self, path: str) -> Image.Image:
        """A copy of the image between DISPLAY_MIN and DISPLAY_SIDE px (EXIF-rotated, RGB) to draw on, cached for the
        next views."""
        with self._display_lock:
            if path in self._display:
                self._display.move_to_end(path)
                return self._display[path]
        w, h = probe_size(path)
        with self.budget.hold(w * h):
            im = load_image(path, max_side=DISPLAY_SIDE)  # a large JPEG is decoded at a reduced scale
            if max(im.size) < DISPLAY_MIN:
                k = DISPLAY_MIN / max(im.size)
                # a few-pixel image is shown as its pixels, not smoothed into a gradient
                im = im.resize((round(im.width * k), round(im.height * k)), Image.NEAREST if k >= 4 else Image.BICUBIC)
        with self._display_lock:
            self._display[path] = im
            while len(self._display) > 8:
                self._display.popitem(last=False)
        return im

    # --- models and predictions -------------------------------------------------------------------------------------
    def resolve(self, name: str | None, fallback: str | None = None) -> Resolved:
        return self.manager.resolve(name or self.manager.default(), fallback or STUDENT)

    def request(self, image, prompt, mode="auto", phrases=None, model="", threshold=0.3, nms_iou=0.6, max_dets=100,
                min_size=None, precision="fp32", best_only=False) -> GroundRequest:
        """A checked request: an image and a prompt within the app's limits."""
        if image is None:
            raise user_error("Add an image first (upload, paste, or pick an example).")
        if not prompt or not str(prompt).strip():
            raise user_error("The prompt is empty: type a caption ('a red circle next to a star') or categories "
                             "('circle . star').")
        if isinstance(phrases, str):
            phrases = [p.strip() for p in phrases.replace("\n", ";").split(";") if p.strip()] or None
        check_prompt(str(prompt), phrases=phrases, mode=mode)
        if not 0.0 <= float(threshold) <= 1.0:
            raise user_error(f"Score threshold must be in [0, 1], got {threshold}.")
        return GroundRequest(image=str(image), image_size=self.image_size(str(image)), prompt=str(prompt), mode=mode,
                             phrases=tuple(phrases) if phrases else None, model=model or self.manager.default(),
                             ran=model or self.manager.default(), threshold=float(threshold),
                             nms_iou=None if nms_iou is None else float(nms_iou), max_dets=int(max_dets),
                             min_size=int(min_size) or None if min_size else None,
                             precision=precision if self.cuda else "fp32", best_only=bool(best_only))

    def input_size(self, model, asked: int | None) -> tuple[int | None, int | None]:
        """(min_size, max_size) for a prediction: what the user asked for, else the model's own, capped at
        `cpu_size` on a CPU (GLIP-T's 800 px takes several times longer there: see docs/app.md)."""
        if asked:
            return asked, max(asked, 1333)
        own = model.config.min_size_test
        if not self.cuda and self.cpu_size and own > self.cpu_size:
            return self.cpu_size, self.cpu_size * model.config.max_size_test // own
        return None, None

    def predict(self, req: GroundRequest, output_attentions: bool = False, fusion: bool = True, threshold=None,
                max_dets=None, model=None, progress=None):
        """(model, GroundingResult) for a request, on the model that ran it (`req.ran`). `progress`: a gr.Progress,
        told of each prompt chunk when the prompt is longer than one query."""
        model = model or self.manager.get(req.ran)
        size, max_size = self.input_size(model, req.min_size)
        w, h = req.image_size
        with self.budget.hold(w * h):
            res = model.predict(
                req.image, req.prompt, phrases=list(req.phrases) if req.phrases else None, mode=req.mode,
                threshold=req.threshold if threshold is None else threshold, nms_iou=req.nms_iou,
                max_dets=max_dets or req.max_dets, min_size=size, max_size=max_size,
                precision=req.precision, output_attentions=output_attentions, fusion=fusion,
                candidate_threshold=0.0 if self.manager.is_fallback(req.ran) else None,
                progress=None if progress is None else chunk_progress(progress))
        if req.best_only and threshold is None and max_dets is None:
            res = res.best_per_phrase(1)
        return model, res

    def vocabulary(self, name: str) -> frozenset[str] | None:
        """The words a model was trained to ground (its `vocabulary.txt`, read by the library), or None for an open
        vocabulary (a released GLIP)."""
        c = self.manager.menu.get(name)
        if c is None or c.kind == "release":
            return None
        try:
            return known_vocabulary(c.path if c.kind == "local" else name)
        except GLIPError:
            return None

    # --- honest framing -------------------------------------------------------------------------------------------
    def framing(self, name: str, image: str | None = None) -> str:
        """What a toy model knows, and that photos need a real GLIP: prominent for an image the app did not
        generate, one quiet line otherwise. Empty for a real GLIP."""
        if not self.manager.is_toy(name):
            return ""
        words = self.vocabulary(name)
        knows = (f"It was trained to ground only these words: {', '.join(sorted(words))}." if words else
                 "It knows only the synthetic world's coloured shapes (the example scenes).")
        real = [n for n, c in self.manager.menu.items() if c.kind == "release"]
        how = (f"For photos pick a real GLIP in the model menu ({', '.join(real)}: downloaded once, then cached), "
               "or start the app with a checkpoint you have: `python app.py --model PATH`.")
        if image and not self.is_sample(image):
            return (f"**Note: {name} is a toy model trained on a synthetic world, not on photos.** {knows} "
                    f"On a photo its boxes and scores mean nothing. {how}")
        return f"*{name} is a toy model.* {knows} {how}"
