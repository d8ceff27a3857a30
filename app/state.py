"""Per-user state kept in gr.State between events: typed, so every view reads the same fields."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GroundRequest:
    """The Ground tab's last request: every other view of the same image and prompt re-asks the predictor
    with it (its caches make a repeat cost post-processing only)."""
    image: str                      # path of the image (gradio's upload cache or the app's scratch folder)
    image_size: tuple[int, int]     # (W, H) from the image header
    prompt: str
    mode: str = "auto"              # auto | caption | categories
    phrases: tuple[str, ...] | None = None
    model: str = ""                 # the model picked
    ran: str = ""                   # the model that ran (differs while the pick is downloading or failed)
    threshold: float = 0.3
    nms_iou: float | None = 0.6
    max_dets: int = 100
    min_size: int | None = None
    precision: str = "fp32"
    best_only: bool = False

    def replace(self, **kw) -> GroundRequest:
        return replace(self, **kw)


@dataclass(frozen=True)
class WebSample:
    """A synthetic web sample shown in the Teacher vs student tab (its hidden truth can be rebuilt)."""
    split: str
    index: int
    seed: int
    caption: str
    digest: str                     # of the image file: an edited image or caption has no truth
