"""The grounding head (official `rpn.head`, VLDyHead): the DyHead tower of N blocks
[X-MHA fusion → BERT layer → DyConv], then per level

  S_ground = O·Pᵀ / exp(log_scale) + (P̂·bias_lang + bias0)      (paper Eq. 2, official §1.7)

where O are the tower's visual features (no projection), P̂ the L2-normalised token features and
P = Linear(P̂ / 2); plus box regression (× a learned per-level scale) and centerness logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLAMP, GLIPConfig
from .dyhead import DyConv
from .fusion import FusionAttention, VLFuse
from .gemm import Linear
from .language import BertFusionLayer, TextFeatures


class Scale(nn.Module):
    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x):
        return x * self.scale


@dataclass
class HeadOutput:
    token_logits: list[torch.Tensor]      # per level (B, H·W, T): S_ground, row-major locations
    bbox_reg: list[torch.Tensor]          # per level (B, 4, H, W)
    centerness: list[torch.Tensor]        # per level (B, 1, H, W)
    visual: list[torch.Tensor]            # tower output per level (B, C, H, W)
    text: torch.Tensor                    # (B, T, D) token features used for S_ground
    attentions: list[FusionAttention] = field(default_factory=list)  # one per X-MHA layer, on request


class VLDyHead(nn.Module):
    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        C, D = cfg.channels, cfg.lang_dim
        self.early_fusion, self.fused_dot_product = cfg.early_fusion, cfg.fused_dot_product
        tower: list[nn.Module] = []
        for _ in range(cfg.num_dyhead_blocks):
            if cfg.early_fusion:
                tower.append(VLFuse(C, D, cfg.fusion_embed_dim, cfg.fusion_num_heads, 1.0 / cfg.num_dyhead_blocks))
                tower.append(BertFusionLayer(cfg.bert))
            tower.append(DyConv(C, cfg.gn_groups))
        self.dyhead_tower = nn.ModuleList(tower)  # same keys as the official nn.Sequential
        self.cls_logits = nn.Conv2d(C, cfg.num_classes - 1, 1)  # unused by GLIP; kept so checkpoints map 1:1
        self.bbox_pred = nn.Conv2d(C, 4, 1)
        self.centerness = nn.Conv2d(C, 1, 1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(5))
        self.dot_product_projection_text = Linear(D, C)
        bias_value = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        self.log_scale = nn.Parameter(torch.tensor([cfg.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(D))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        for m in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)

    @property
    def fusion_layers(self) -> list[VLFuse]:
        return [m for m in self.dyhead_tower if isinstance(m, VLFuse)]

    def forward(self, visual: list[torch.Tensor], text: TextFeatures, output_attentions: bool = False) -> HeadOutput:
        hidden, masks = text.hidden, text.masks
        attentions = []
        for block in self.dyhead_tower:
            if isinstance(block, VLFuse):
                visual, hidden, att = block(visual, hidden, masks, keep_attention=output_attentions)
                if att is not None:
                    attentions.append(att)
            elif isinstance(block, BertFusionLayer):
                hidden = block(hidden, masks)
            else:
                visual = block(visual)
        tokens = hidden if self.fused_dot_product else text.embedded
        logits, boxes, ctr = self.ground(visual, tokens)
        return HeadOutput(logits, boxes, ctr, visual, tokens, attentions)

    def ground(self, visual: list[torch.Tensor], tokens: torch.Tensor):
        """S_ground per level, plus box deltas and centerness."""
        t = F.normalize(tokens, p=2, dim=-1)
        proj = self.dot_product_projection_text(t / 2.0)           # (B, T, C)
        tok_bias = t @ self.bias_lang + self.bias0                 # (B, T)
        temp = self.log_scale.exp()
        logits, boxes, ctr = [], [], []
        for l, f in enumerate(visual):
            q = f.flatten(2).transpose(1, 2)                        # (B, H·W, C), identity image projection
            s = (q @ proj.transpose(-1, -2)) / temp + tok_bias[:, None, :]
            logits.append(s.clamp(-CLAMP, CLAMP))
            boxes.append(self.scales[l](self.bbox_pred(f)))
            ctr.append(self.centerness(f))
        return logits, boxes, ctr
