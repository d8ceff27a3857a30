"""GLIP: detection as phrase grounding.

    image ─► Swin ─► FPN (P3..P7) ─┐
                                   ├─► VLDyHead [X-MHA → BERT layer → DyConv] × N ─► S_ground, boxes, centerness
    prompt ─► BERT (256 tokens) ───┘

Submodule names mirror the official checkpoint (`backbone.*`, `language_backbone.*`, `rpn.head.*`)
so official weights load key for key. The two encoders are separate methods so that callers
(the predictor's caches) can reuse one side when only the other changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbone import Backbone
from .boxes import BoxCoder, grid_anchors
from .checkpoint import check_shapes, load_state, read_pretrained, save_model
from .config import GLIPConfig
from .head import HeadOutput, VLDyHead
from .language import LanguageBackbone, TextFeatures
from .runtime import resolve_device

if TYPE_CHECKING:
    from .results import GroundingResult


@dataclass
class GLIPOutput:
    features: list[torch.Tensor]   # FPN P3..P7, (B, C, H, W)
    text: TextFeatures
    head: HeadOutput
    anchors: list[torch.Tensor]    # per level (H·W, 4), shared by the batch


class GLIP(nn.Module):
    def __init__(self, config: GLIPConfig | None = None):
        super().__init__()
        self.config = config = (config or GLIPConfig()).validate()  # before anything is allocated
        self.backbone = Backbone(config)
        self.language_backbone = LanguageBackbone(config.bert)
        self.rpn = nn.Module()  # official name of the grounding head's container
        self.rpn.head = VLDyHead(config)
        self.box_coder = BoxCoder()
        self.tunable_linear = None  # prompt tuning: a `glip.prompt_tuning.PromptEmbedding`, added to the text features
        self._predictor = None

    # --- the three stages -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised, padded BGR batch (B, 3, H, W) → FPN features P3..P7."""
        return self.backbone(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        return self.add_prompt(self.language_backbone(input_ids, attention_mask))

    def add_prompt(self, text: TextFeatures) -> TextFeatures:
        """The tuned prompt embedding added to both text features (official `language_prompt_v2`), when attached."""
        return text if self.tunable_linear is None else self.tunable_linear(text)

    def ground(self, features: list[torch.Tensor], text: TextFeatures, output_attentions: bool = False) -> HeadOutput:
        return self.rpn.head(features, text, output_attentions=output_attentions)

    def anchors(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        return grid_anchors([tuple(f.shape[-2:]) for f in features], strides=c.anchor_strides,
                            anchor_sizes=c.anchor_sizes, device=features[0].device)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                output_attentions: bool = False) -> GLIPOutput:
        features = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        head = self.ground(features, text, output_attentions)
        return GLIPOutput(features, text, head, self.anchors(features))

    @property
    def has_fusion(self) -> bool:
        return bool(self.rpn.head.fusion_layers)

    # --- files ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, src, config=None, device="auto", dtype=None) -> "GLIP":
        """Load a model: an official .pth, a preset name (random weights), a shipped model name
        ("toy-student"), our folder (model.safetensors + config.json) or a Hugging Face 'owner/repo/file.pth'.

        config: what the tensors cannot tell (thresholds, input size, BERT head count): a GLIPConfig, a preset
        name, our JSON, an official yaml or keys JSON. device: "auto" (CUDA when available), "cpu", "cuda[:N]"
        or None (stay on the CPU); predictions run there (fp16/bf16 via predict(precision=)).

        Nothing is allocated before the source is checked: the config's ranges, the config against the
        tensor shapes, then every key and shape against this architecture built on the meta device. When the file
        holds every tensor, the model is not randomly initialised first, and an official .pth's memory-mapped
        tensors become the model's own (read from disk as a forward first uses them)."""
        from .prompt_tuning import is_prompt_folder, load_prompt, prompt_base

        if is_prompt_folder(src):  # a tuned prompt on top of the base model its card names
            return load_prompt(cls.from_pretrained(prompt_base(src), config, device, dtype), src)
        dev = resolve_device(device) if device is not None else None
        pre = read_pretrained(src, config)
        if pre.shapes is None:  # a preset: random weights
            model = cls(pre.config)
        else:
            with torch.device("meta"):
                model = cls(pre.config)
            own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            check_shapes(own, pre.shapes, pre.source, pre.config.name)
            sd = pre.tensors()
            if own.keys() <= sd.keys():  # every tensor comes from the file: no random init to compute and discard
                model = model.to_empty(device="cpu")
            else:  # the file leaves some (ignorable) tensors at their initial values
                model = cls(pre.config)
            load_state(model, sd, pre.source)
            del sd
        model.eval()
        if dev is not None or dtype is not None:
            model.to(device=dev, dtype=dtype)
        return model

    def save_pretrained(self, out_dir, fp16: bool = False, exclude_text_encoder: bool = False) -> None:
        """model.safetensors + config.json in `out_dir` (fp16: half-precision storage; exclude_text_encoder:
        leave out a stock text encoder that ships in a pip package, refilled on load)."""
        save_model(self, out_dir, fp16=fp16, exclude_text_encoder=exclude_text_encoder)

    # --- prediction (glip.predictor) ---------------------------------------------------------------
    @property
    def predictor(self):
        """The cached predictor of this model (image / text / head caches)."""
        if self._predictor is None:
            from .predictor import Predictor

            self._predictor = Predictor(self)
        return self._predictor

    def prepare_image(self, image, min_size: int | None = None, max_size: int | None = None):
        """Everything `predict` does to an image before the network (decode, cache key, resize to the model's
        input size) → a `PreparedImage` that `predict` takes in place of the image. Safe to call in a worker
        thread while this model predicts, so a loader can keep the CPU work off the device's critical path."""
        return self.predictor.prepare_image(image, min_size, max_size, resize=True)

    def predict(self, image, prompt, spans=None, phrases=None, threshold: float = 0.5, nms_iou: float | None = None,
                max_dets: int = 100, min_size: int | None = None, max_size: int | None = None, mode: str = "auto",
                output_attentions: bool = False, precision: str = "fp32", fusion: bool = True,
                candidate_threshold: float | None = None, progress=None) -> "GroundingResult | list[GroundingResult]":
        """Ground `prompt` in `image` → GroundingResult (boxes xyxy in the original image's pixels, scores,
        phrase of each box, token scores); a list of images with a list of prompts runs as one padded batch.

        image: PIL image, numpy array, path, bytes, LoadedImage or PreparedImage (`prepare_image`). Images over `glip.image.MAX_PIXELS` are refused
          from their header; large ones are shrunk before the model sees them, boxes still come back in the
          original's frame (`result.image_size`).
        prompt: a caption ("a dog on a sofa"), a category list ("person . dog" or ["person", "dog"]) or a Prompt;
          `phrases` (strings found in the caption) or `spans` (char spans per phrase) ground explicit phrases.
          Prompts longer than the model's query (`config.max_query_len` tokens) are split and merged.
        mode: "auto" | "categories" | "caption": how a string prompt is read.
        threshold: keep boxes scoring above it (the official demo keeps > 0.5).
        nms_iou: per-phrase NMS IoU (default `config.nms_th`); max_dets: at most this many boxes (1..1000).
        candidate_threshold: ATSS pre-NMS candidate score (default `config.inference_th`, officially 0.05); lower
          it to rank more boxes (evaluation at AP), without touching the model's config.
        min_size / max_size: the test-time resize (default `config.min_size_test` / `max_size_test`).
        output_attentions: keep the X-MHA attention maps (`result.attentions`).
        precision: "fp32", "bf16" or "fp16" (CUDA) autocast. fusion=False: deep fusion switched off (ablation).
        progress: called as progress(done, total) after each of a single image's prompt chunks (a long prompt
          runs the head once per chunk).
        """
        return self.predictor.predict(image, prompt, spans=spans, phrases=phrases, threshold=threshold,
                                      nms_iou=nms_iou, max_dets=max_dets, min_size=min_size, max_size=max_size,
                                      mode=mode, output_attentions=output_attentions, precision=precision,
                                      fusion=fusion, candidate_threshold=candidate_threshold, progress=progress)
