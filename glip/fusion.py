"""X-MHA: GLIP's deep fusion (paper Eq. 3-5), the bi-directional image↔text cross-attention
inside every DyHead block (official `VLFuse` / `BiMultiHeadAttention`, type "MHA-B").

All five pyramid levels are flattened into ONE image sequence. Image queries attend over the
prompt tokens (padding masked); text queries attend over every image position (padding
included, no mask). The residual is added to the LayerNormed inputs, scaled by γ (layer scale).
`FusionAttention` holds the two probability maps when the caller asks for them.

With a short prompt the products are re-associated so that only the few text vectors go through
the 2048-wide projections (see `BiMultiHeadAttention`): the same values, a fraction of the work.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, runtime
from .config import CLAMP
from .gemm import Linear

NORM_BAND_BYTES = 4 << 20  # inference normalises the flattened pyramid in bands of about this size
LOGIT_BAND_BYTES = 4 << 20  # CPU inference: image positions per band of logits (B · band · heads·T values)


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
    """Official `BiMultiHeadAttention`. Two exact evaluation orders of the same products:

    direct: project every image position to the 2048-wide q / value spaces, as official.
    re-associated: with few text tokens T, fold the T text vectors through the visual weights instead
      (per head h, Wq_h / Wv_h: (hd, C) rows of the projections, Wo_h: (C, hd) columns of out_v_proj):
        logits       s·(v Wq_hᵀ + bq_h) k_hᵀ      = v (s·k_h Wq_h)ᵀ + s·k_h bq_h
        image→text   Σ_h (p_v,h vl_h) Wo_hᵀ + bo  = Σ_h p_v,h (vl_h Wo_hᵀ) + bo
        text→image   p_l,hᵀ (v Wv_hᵀ + bv_h)      = (p_l,hᵀ v) Wv_hᵀ + (Σ_n p_l,h) bv_h
      so no (N_img × 2048) tensor exists; the logits A (N_img × heads·T), their clamp, the padding fill
      and both softmaxes are the same values in the same places.
    fp32 CPU inference runs the re-associated order in bands of image positions (`_bands`): the
    same products, with no pyramid-sized logits unless the maps are captured.
    `path` = "auto" takes the cheaper order by multiply-add count, except in training with dropout: the
    dropout masks are drawn over the (B, heads, N, T) layout of the direct order, which keeps training
    runs' random streams as they were.
    """

    path = "auto"  # "auto" | "direct" | "reassociated" (per instance or for the class)

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int = 2048, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.scale = self.head_dim ** -0.5
        self.v_proj = Linear(v_dim, embed_dim)
        self.l_proj = Linear(l_dim, embed_dim)
        self.values_v_proj = Linear(v_dim, embed_dim)
        self.values_l_proj = Linear(l_dim, embed_dim)
        self.out_v_proj = Linear(embed_dim, v_dim)
        self.out_l_proj = Linear(embed_dim, l_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def macs(self, n_img: int, n_tok: int, reassociated: bool) -> int:
        """Multiply-adds of the image-side products per image (the text projections are common to both)."""
        C, E, H = self.v_proj.in_features, self.v_proj.out_features, self.num_heads
        if reassociated:  # fold the text through 3 visual weights (+ the query bias), then 3 products over (N, heads·T, C)
            return 3 * n_tok * E * C + n_tok * E + 3 * n_img * H * n_tok * C
        return 3 * n_img * C * E + 3 * n_img * n_tok * E  # 3 projections over N, then 3 products over (N, T, E)

    def reassociates(self, n_img: int, n_tok: int) -> bool:
        if self.path != "auto":
            return self.path == "reassociated"
        if self.training and self.dropout > 0:
            return False
        return self.macs(n_img, n_tok, True) < self.macs(n_img, n_tok, False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, H, N, hd)
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, N, hd) -> (B, N, E)
        B, H, N, hd = x.shape
        return x.transpose(1, 2).reshape(B, N, H * hd)

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor, keep_attention: bool = False):
        if self.reassociates(v.shape[1], l.shape[1]):
            if self._banded(v):
                dv = torch.empty_like(v)
                dl, attn = self._bands([(v, dv)], l, mask_l, keep_attention)
                return dv, dl, attn
            return self._forward_reassociated(v, l, mask_l, keep_attention)
        return self._forward_direct(v, l, mask_l, keep_attention)

    def _forward_direct(self, v, l, mask_l, keep_attention):
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
        if not inplace:
            A = A.masked_fill(pad, _fill(A))
        elif _has_padding(pad):
            A.masked_fill_(pad, _fill(A))
        p_v = A.softmax(dim=-1)
        attn = None
        if keep_attention:
            attn = (p_v, p_l.transpose(-1, -2))
        p_v = F.dropout(p_v, self.dropout, self.training)
        p_l = F.dropout(p_l, self.dropout, self.training)
        dv = self.out_v_proj(self._merge(p_v @ vl))
        dl = self.out_l_proj(self._merge(p_l.transpose(-1, -2) @ vv))
        return dv, dl, attn

    def _forward_reassociated(self, v, l, mask_l, keep_attention):
        B, N, C = v.shape
        T, H = l.shape[1], self.num_heads
        kq, bias, vo = self._fold_text(l)
        # Logits laid out (B, N_img, heads, T): both softmaxes and all three products are then plain GEMMs.
        A = torch.baddbmm(bias, v, kq.transpose(1, 2)).view(B, N, H, T)
        inplace = not torch.is_grad_enabled()
        A = A.clamp_(-CLAMP, CLAMP) if inplace else A.clamp(-CLAMP, CLAMP)
        p_l = A.softmax(dim=1)  # text → image, over image positions (as in the direct order)
        pad = (mask_l == 0)[:, None, None, :]
        if inplace:  # A is not needed after this: fill and normalise it in place
            if _has_padding(pad):
                A.masked_fill_(pad, _fill(A))
            p_v = torch.softmax(A, dim=-1, out=A)
        else:
            p_v = A.masked_fill(pad, _fill(A)).softmax(dim=-1)
        attn = (p_v.permute(0, 2, 1, 3), p_l.permute(0, 2, 3, 1)) if keep_attention else None
        if self.training and self.dropout > 0:  # only when forced (path="reassociated"): masks over this layout
            p_v = F.dropout(p_v, self.dropout, True)
            p_l = F.dropout(p_l, self.dropout, True)
        # text → image: pool the image first (heads·T × C), then through values_v_proj per head. Done before the
        # image side so that p_l is freed before dv, the other image-sized result, is allocated.
        pooled = (p_l.reshape(B, N, H * T).transpose(1, 2) @ v).view(B, H, T, C)
        dl = self._text_output(pooled, p_l.sum(dim=1).transpose(1, 2))
        del p_l
        # image → text: the text values went through out_v_proj first (T × C per head), summed over heads by the GEMM.
        dv = torch.baddbmm(self.out_v_proj.bias.to(vo.dtype), p_v.reshape(B, N, H * T), vo)
        return dv, dl, attn

    def _banded(self, v: torch.Tensor) -> bool:
        """CPU inference in fp32 / fp64 (the online sums stay in the input's precision; under autocast the
        whole-pyramid order keeps its one-GEMM sums)."""
        return (not torch.is_grad_enabled() and runtime.host_tiled(v) and v.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and not (self.training and self.dropout > 0))

    def uses_bands(self, v: torch.Tensor, n_img: int, n_tok: int) -> bool:
        """Whether a call with n_img positions of v's kind and n_tok tokens runs in bands."""
        return self.reassociates(n_img, n_tok) and self._banded(v)

    def _bands(self, segments, l, mask_l, keep_attention=False, norm=None, gamma=None):
        """The re-associated order, a band of image positions at a time, so that the logits never exist
        for the whole pyramid and each band's clamp, fill and softmaxes run in cache. The band's logits are
        laid out (B, heads·T, band): both softmaxes then run along contiguous or long strides. Image → text
        is local to a position (softmax over its tokens). Text → image (softmax over all positions) is
        accumulated online: a running max m, sum s and pooled image Σ_n exp(A_n - m) v_n, rescaled by
        exp(m_old - m_new) when the max grows and divided by s at the end, i.e. softmax(A)ᵀ v exactly;
        its Σ_n p_l = 1 multiplies bv. Capturing the maps keeps every band's probabilities (image → text)
        and clamped logits (text → image, normalised by the final m and s), so the outputs do not depend on
        whether the maps are captured.

        segments: (source, sink) pairs, (B, n, C) each, together the image positions in order. Without
        `norm`, a sink receives the image-side output dv of its source's positions. With `norm` (the block's
        input LayerNorm, applied to each band as it is read), a sink receives norm(source) + gamma·dv, the
        fused block's residual (norm(source) alone when gamma is None): the pyramid is then never gathered,
        normalised or added to as a whole. Returns the text-side output and the maps (or None)."""
        B, _, C = segments[0][0].shape
        N = sum(src.shape[1] for src, _ in segments)
        T, H = l.shape[1], self.num_heads
        kq, bias, vo = self._fold_text(l)
        bias_t = bias.transpose(1, 2)  # (B, heads·T, 1)
        pad = (mask_l == 0)[:, None, :, None]  # over (B, heads, T, band)
        fill = _has_padding(pad)
        bo = self.out_v_proj.bias.to(vo.dtype)
        step = max(1, LOGIT_BAND_BYTES // (segments[0][0].element_size() * B * H * T))
        m = s = pooled = None
        maps = None
        starts = itertools.accumulate((src.shape[1] for src, _ in segments), initial=0)
        bands = [(src, sink, a, base + a) for (src, sink), base in zip(segments, starts)
                 for a in range(0, src.shape[1], step)]
        for src, sink, a, p in bands:  # band of positions p … p + band of the whole pyramid
            vb = src[:, a:a + step] if norm is None else norm(src[:, a:a + step])
            A = gemm.baddbmm(bias_t, kq, vb.transpose(1, 2)).clamp_(-CLAMP, CLAMP)  # (B, heads·T, band)
            if keep_attention:
                if maps is None:
                    maps = A.new_empty(B, H * T, N), A.new_empty(B, H, T, N)  # text→image logits, image→text probs
                maps[0][..., p:p + A.shape[-1]] = A
            m_new = A.amax(dim=-1) if m is None else torch.maximum(m, A.amax(dim=-1))
            E = (A - m_new[..., None]).exp_()
            if m is None:
                s, pooled = E.sum(dim=-1), gemm.baddbmm(None, E, vb)
            else:
                rescale = (m - m_new).exp_()
                s = s.mul_(rescale).add_(E.sum(dim=-1))
                pooled = gemm.baddbmm(pooled.mul_(rescale[..., None]), E, vb)
            m = m_new
            del E
            A4 = A.view(B, H, T, -1)
            if fill:
                A4.masked_fill_(pad, _fill(A))
            torch.softmax(A4, dim=2, out=A4)
            if keep_attention:
                maps[1][..., p:p + A.shape[-1]] = A4
            out = gemm.baddbmm(bo, A.transpose(1, 2), vo)  # (B, band, C)
            dst = sink[:, a:a + step]
            if norm is None:
                dst.copy_(out)
            elif gamma is None:
                dst.copy_(vb)
            else:
                torch.addcmul(vb, out, gamma, out=dst)
        pooled = (pooled / s[..., None]).view(B, H, T, C)
        attn = None
        if keep_attention:
            p_l = maps[0].sub_(m[..., None]).exp_().div_(s[..., None]).view(B, H, T, N)
            attn = (maps[1].transpose(-1, -2), p_l)
        return self._text_output(pooled, None), attn

    def _fold_text(self, l):
        """The prompt folded through the visual weights: keys in v-space (B, heads·T, C) with their query
        bias (B, 1, heads·T), both scaled, and the text values through out_v_proj (B, heads·T, C)."""
        B, T = l.shape[:2]
        H, hd, C = self.num_heads, self.head_dim, self.v_proj.in_features
        k = self.l_proj(l).view(B, T, H, hd)
        vl = self.values_l_proj(l).view(B, T, H, hd)
        Wq, bq = self.v_proj.weight.view(H, hd, C), self.v_proj.bias.view(H, hd)
        kq = torch.einsum("bthd,hdc->bhtc", k, Wq).reshape(B, H * T, C) * self.scale
        bias = torch.einsum("bthd,hd->bht", k, bq).reshape(B, 1, H * T) * self.scale
        Wo = self.out_v_proj.weight.view(C, H, hd)
        vo = torch.einsum("bthd,chd->bhtc", vl, Wo).reshape(B, H * T, C)
        return kq, bias, vo

    def _text_output(self, pooled, mass):
        """Text → image output from the image pooled per head and token, (B, heads, T, C), through
        values_v_proj per head; `mass` (B, T, heads) = Σ_n p_l multiplies the value bias (None: 1)."""
        B, H, T, C = pooled.shape
        Wv, bv = self.values_v_proj.weight.view(H, self.head_dim, C), self.values_v_proj.bias.view(H, self.head_dim)
        ol = torch.einsum("bhtc,hdc->bthd", pooled, Wv)
        ol = ol + bv if mass is None else ol + mass[..., None] * bv
        return self.out_l_proj(ol.reshape(B, T, H * self.head_dim))


def _fill(A: torch.Tensor) -> float:
    return max(-9e15, torch.finfo(A.dtype).min)


def _has_padding(pad: torch.Tensor) -> bool:
    """Whether an in-place fill has anything to do (a prompt cropped to its tokens has no padding); on an
    accelerator the fill runs regardless, rather than wait for the answer."""
    return not runtime.host_tiled(pad) or bool(pad.any())


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
        ba = self.b_attn
        if ba.attn.uses_bands(visual[0], sum(h * w for h, w in shapes), hidden.shape[1]):
            return self._forward_bands(visual, hidden, masks, keep_attention, shapes)
        v = torch.cat([x.flatten(2).transpose(1, 2) for x in visual], dim=1)  # (B, ΣHW, C)
        if torch.is_grad_enabled() or not runtime.host_tiled(v):
            v = ba.layer_norm_v(v)
        else:  # CPU inference: normed in place, a band of positions at a time (no second image-sized buffer)
            step = max(1, NORM_BAND_BYTES // (v.element_size() * C))
            for s in range(0, v.shape[1], step):
                v[:, s:s + step] = ba.layer_norm_v(v[:, s:s + step])
        l = ba.layer_norm_l(hidden)
        dv, dl, attn = ba.attn(v, l, masks, keep_attention)
        if self.enabled and not torch.is_grad_enabled():  # inference: the residual into the fresh LN output
            v = v.addcmul_(dv, ba.gamma_v)
            l = l + ba.gamma_l * dl
        elif self.enabled:
            v = v + ba.gamma_v * dv
            l = l + ba.gamma_l * dl
        out, start = [], 0
        for h, w in shapes:
            out.append(v[:, start:start + h * w].transpose(1, 2).reshape(B, C, h, w))
            start += h * w
        fa = FusionAttention(attn[0], attn[1], shapes) if attn is not None else None
        return out, l, fa

    def _forward_bands(self, visual, hidden, masks, keep_attention, shapes):
        """CPU inference: the levels are read and the block's outputs written a band of positions at a time
        (norm, attention, residual), each level into a fresh channels-last map; no pyramid-sized buffer."""
        ba = self.b_attn
        B, C = visual[0].shape[:2]
        out = [torch.empty(B, C, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
               for x, (h, w) in zip(visual, shapes)]
        segments = [(x.permute(0, 2, 3, 1).reshape(B, -1, C), o.permute(0, 2, 3, 1).view(B, -1, C))
                    for x, o in zip(visual, out)]  # (B, H·W, C) row-major positions; views of channels-last maps
        l = ba.layer_norm_l(hidden)
        dl, attn = ba.attn._bands(segments, l, masks, keep_attention, ba.layer_norm_v,
                                  ba.gamma_v if self.enabled else None)
        if self.enabled:
            l = l + ba.gamma_l * dl
        fa = FusionAttention(attn[0], attn[1], shapes) if attn is not None else None
        return out, l, fa
