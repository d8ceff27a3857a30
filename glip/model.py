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

import torch
from torch import nn

from .backbone import Backbone
from .boxes import BoxCoder, grid_anchors
from .config import GLIPConfig
from .head import HeadOutput, VLDyHead
from .language import LanguageBackbone, TextFeatures


@dataclass
class GLIPOutput:
    features: list[torch.Tensor]   # FPN P3..P7, (B, C, H, W)
    text: TextFeatures
    head: HeadOutput
    anchors: list[torch.Tensor]    # per level (H·W, 4), shared by the batch


class GLIP(nn.Module):
    def __init__(self, config: GLIPConfig | None = None):
        super().__init__()
        self.config = config = config or GLIPConfig()
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

    # --- conveniences (implemented in checkpoint.py / predictor.py) ---------------------------------
    @classmethod
    def from_pretrained(cls, src, config=None, device="auto", dtype=None) -> "GLIP":
        """Official .pth, preset name, shipped model name, our safetensors folder, or HF 'owner/repo/file.pth'.
        device "auto" picks CUDA when available; predictions then run there (fp16/bf16 via predict(precision=))."""
        from .checkpoint import load_model

        return load_model(src, config=config, device=device, dtype=dtype)

    def save_pretrained(self, out_dir, fp16: bool = False, exclude_text_encoder: bool = False) -> None:
        from .checkpoint import save_model

        save_model(self, out_dir, fp16=fp16, exclude_text_encoder=exclude_text_encoder)

    @property
    def predictor(self):
        if self._predictor is None:
            from .predictor import Predictor

            self._predictor = Predictor(self)
        return self._predictor

    def predict(self, image, prompt, **kw):
        """See `glip.predictor.Predictor.predict`."""
        return self.predictor.predict(image, prompt, **kw)
