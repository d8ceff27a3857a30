"""X-MHA: GLIP's deep fusion (paper Eq. 3-5), the bi-directional image↔text cross-attention
inside every DyHead block (official `VLFuse` / `BiMultiHeadAttention`, type "MHA-B").

All five pyramid levels are flattened into ONE image sequence. Image queries attend over the
prompt tokens (padding masked); text queries attend over every image position (padding
included, no mask). The residual is added to the LayerNormed inputs, scaled by γ (layer scale).
`FusionAttention` holds the two probability maps when the caller asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLAMP


@dataclass
class FusionAttention:
    """Probabilities of one X-MHA layer, per head.

    image_to_text: (B, heads, N_img, T) — softmax over tokens (each image position's view of the prompt)
    text_to_image: (B, heads, T, N_img) — softmax over all image positions, P3..P7 flattened row-major
    """
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    level_shapes: list[tuple[int, int]]


class BiMultiHeadAttention(nn.Module):
    def __init__(self, v_dim: int, l_dim: int, embed_dim: int = 2048, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.scale = self.head_dim ** -0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, H, N, hd)
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, N, hd) -> (B, N, E)
        B, H, N, hd = x.shape
        return x.transpose(1, 2).reshape(B, N, H * hd)

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor, keep_attention: bool = False):
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        vv = self._heads(self.values_v_proj(v))
        vl = self._heads(self.values_l_proj(l))
        # A = q·kᵀ, shared by both directions; the official clamps bound it for fp16.
        inplace = not torch.is_grad_enabled()  # in-place saves two (B·H·N_img·T) passes at inference
        A = q @ k.transpose(-1, -2)  # (B, H, N_img, T)
        A = A.clamp_(-CLAMP, CLAMP) if inplace else A.clamp(-CLAMP, CLAMP)
        # text → image: softmax over image positions (the official max-subtraction and second clamp
        # only shift / cut values whose exp is already 0, so they are folded into softmax here).
        p_l = A.softmax(dim=2)
        # image → text: mask padded tokens (-9e15, as official; fp16's floor -65504 in half precision,
        # below the ±CLAMP logits, so the same zeros after softmax) and softmax over tokens.
        pad = (mask_l == 0)[:, None, None, :]
        fill = max(-9e15, torch.finfo(A.dtype).min)
        p_v = (A.masked_fill_(pad, fill) if inplace else A.masked_fill(pad, fill)).softmax(dim=-1)
        attn = None
        if keep_attention:
            attn = (p_v, p_l.transpose(-1, -2))
        p_v = F.dropout(p_v, self.dropout, self.training)
        p_l = F.dropout(p_l, self.dropout, self.training)
        dv = self.out_v_proj(self._merge(p_v @ vl))
        dl = self.out_l_proj(self._merge(p_l.transpose(-1, -2) @ vv))
        return dv, dl, attn


class VLFuse(nn.Module):
    """`dyhead_tower.{3i}`: one X-MHA fusion block (`b_attn`)."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_gamma: float):
        super().__init__()
        self.b_attn = nn.Module()
        self.b_attn.layer_norm_v = nn.LayerNorm(v_dim)
        self.b_attn.layer_norm_l = nn.LayerNorm(l_dim)
        self.b_attn.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads)
        self.b_attn.gamma_v = nn.Parameter(torch.full((v_dim,), init_gamma))
        self.b_attn.gamma_l = nn.Parameter(torch.full((l_dim,), init_gamma))
        self.enabled = True  # ablation switch (the app's "fusion off" view): γ treated as 0

    def forward(self, visual: list[torch.Tensor], hidden: torch.Tensor, masks: torch.Tensor,
                keep_attention: bool = False):
        shapes = [tuple(x.shape[-2:]) for x in visual]
        B, C = visual[0].shape[:2]
        v = torch.cat([x.flatten(2).transpose(1, 2) for x in visual], dim=1)  # (B, ΣHW, C)
        ba = self.b_attn
        v, l = ba.layer_norm_v(v), ba.layer_norm_l(hidden)
        dv, dl, attn = ba.attn(v, l, masks, keep_attention)
        if self.enabled:
            v = v + ba.gamma_v * dv
            l = l + ba.gamma_l * dl
        out, start = [], 0
        for h, w in shapes:
            out.append(v[:, start:start + h * w].transpose(1, 2).reshape(B, C, h, w))
            start += h * w
        fa = FusionAttention(attn[0], attn[1], shapes) if attn is not None else None
        return out, l, fa
