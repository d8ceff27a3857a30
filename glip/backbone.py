"""Image backbone: Swin transformer (v1, detection variant) + FPN with P6/P7 → (P3..P7).

Module and parameter names follow the official checkpoint (`backbone.body.*`, `backbone.fpn.*`)
so official weights load key for key. Behaviour that matters for parity (glip-official.md §1.3,
§1.4): zero padding to the window size *after* norm1 and without masking the padded tokens,
the -100 shift mask built on the padded grid, PatchMerging's x0,x1,x2,x3 concat order, no norm
on C2, nearest top-down upsampling, P6 from P5 and P7 from ReLU(P6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, runtime
from .config import GLIPConfig
from .gemm import Linear


class DropPath(nn.Module):
    """Stochastic depth (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# Inference runs each block's two residual branches over slices of tokens, adding each slice's result into
# the residual stream in place; a slice's widest intermediate (the 4×-wide MLP hidden layer, the window qkv)
# is about this many bytes. At 800×1333 stage 1 has 67,200 tokens: the hidden layer in one piece is 103 MB,
# and every whole-map intermediate (the normed map, its padded, rolled and window-ordered copies) is 26 MB.
CHUNK_BYTES = 4 << 20


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(gemm.linear_gelu(x, self.fc1.weight, self.fc1.bias))  # fc1 → exact GELU → fc2


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, ws*ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, -1)


class WindowAttention(nn.Module):
    """W-MSA with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=True)
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N): the learned relative position bias of every query / key pair of a window."""
        N = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1)

    def windows_per_slice(self) -> int:
        return max(1, CHUNK_BYTES // (4 * self.window_size ** 2 * self.qkv.out_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self._attend(x, self.position_bias(), mask, 0)

    def _attend(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, first: int) -> torch.Tensor:
        """Windows first … first + len(x) of the batch (window i has shift mask i mod nW)."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if mask is not None:  # (nW, N, N) -> add per window
            idx = torch.arange(first, first + Bw, device=x.device) % mask.shape[0]
            attn_bias = (bias[None] + mask[idx][:, None]).to(q.dtype)  # (Bw, heads, N, N)
        else:
            attn_bias = bias[None].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shift, mlp_ratio, drop_path):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W, shift_mask):
        if not torch.is_grad_enabled() and not self.training and runtime.host_tiled(x):
            return self._forward_in_place(x, H, W, shift_mask)
        B, L, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # padded tokens take part in attention, unmasked (official)
        Hp, Wp = H + pad_b, W + pad_r
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, ws), shift_mask if self.shift else None), ws, Hp, Wp)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, H * W, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_in_place(self, x, H, W, shift_mask):
        """Inference: the same block, a slice of windows (then of tokens) at a time, added into `x` in place.
        A window slice gathers its tokens' residual rows by index (what pad → roll → partition would lay out),
        norms them, zeroes the padding slots (official pads the normed map with zeros), attends, and adds each
        slot's output back to its token's row; no token is in two windows, so the slices never overlap."""
        B, L, C = x.shape
        N = self.window_size ** 2
        rows = x.view(B * L, C)
        slots = window_slots(B, H, W, self.window_size, self.shift, x.device)
        bias, mask = self.attn.position_bias(), shift_mask if self.shift else None
        step = self.attn.windows_per_slice()
        for s in range(0, len(slots), step):
            idx = slots[s:s + step].reshape(-1)
            pad = idx < 0
            if bool(pad.any()):
                t = self.norm1(rows.index_select(0, idx.clamp(min=0)))
                t[pad] = 0
                out = self.attn._attend(t.view(-1, N, C), bias, mask, s).view(-1, C)
                keep = ~pad
                rows.index_add_(0, idx[keep], out[keep].to(rows.dtype))
            else:
                out = self.attn._attend(self.norm1(rows.index_select(0, idx)).view(-1, N, C), bias, mask, s)
                rows.index_add_(0, idx, out.view(-1, C).to(rows.dtype))  # (index_add_ needs one dtype)
        step = max(1, CHUNK_BYTES // (4 * self.mlp.fc1.out_features))
        for s in range(0, B * L, step):
            r = rows[s:s + step]
            r.add_(self.mlp(self.norm2(r)))
        return x


def window_slots(B: int, H: int, W: int, ws: int, shift: int, device) -> torch.Tensor:
    """(B·nW, ws²): for every slot of every window, the row of its token in the (B·H·W, C) residual stream, or
    -1 for a padding slot; the order F.pad → roll(−shift) → window_partition gives (roll: out[i] = in[i + shift])."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    i = (torch.arange(Hp, device=device) + shift) % Hp
    j = (torch.arange(Wp, device=device) + shift) % Wp
    tok = torch.where((i[:, None] < H) & (j[None, :] < W), i[:, None] * W + j[None, :], -1)
    win = window_partition(tok.view(1, Hp, Wp, 1), ws).view(1, -1, ws * ws)
    first = (torch.arange(B, device=device) * (H * W)).view(B, 1, 1)
    return torch.where(win >= 0, win + first, -1).view(-1, ws * ws)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if not torch.is_grad_enabled() and runtime.host_tiled(x):  # a band of output rows at a time (no whole-map 4C-wide copies)
            H2, W2 = (H + 1) // 2, (W + 1) // 2
            out = x.new_empty(B, H2, W2, self.reduction.out_features)
            step = max(1, CHUNK_BYTES // (4 * 4 * C * W2))
            for r in range(0, H2, step):
                out[:, r:r + step] = self._merge(x[:, 2 * r:2 * (r + step)], W)
            return out.view(B, H2 * W2, -1)
        return self._merge(x, W).view(B, -1, self.reduction.out_features)

    def _merge(self, x, W):
        """(B, h, W, C) rows → (B, ⌈h/2⌉, ⌈W/2⌉, 2C): each 2×2 neighbourhood (zero-padded at an odd edge)
        concatenated (official order), normed and reduced."""
        x = F.pad(x, (0, 0, 0, W % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


def shift_window_mask(Hp: int, Wp: int, ws: int, shift: int, device) -> torch.Tensor:
    """The 9-region mask of shifted windows on the padded grid: 0 inside a region, -100 across. Regions are
    numbered 3·(row band) + (column band), the bands being [0, n - ws), [n - ws, n - shift), [n - shift, n)."""
    def band(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - ws).float() + (i >= n - shift).float()
    img = (band(Hp)[:, None] * 3 + band(Wp)[None, :]).view(1, Hp, Wp, 1)
    mw = window_partition(img, ws).squeeze(-1)
    diff = mw[:, None, :] - mw[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop_paths, downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, H, W):
        ws = self.window_size
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        mask = shift_window_mask(Hp, Wp, ws, ws // 2, x.device)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        if self.downsample is None:
            return x, x, H, W
        return x, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % 4 or W % 4:
            x = F.pad(x, (0, (4 - W % 4) % 4, 0, (4 - H % 4) % 4))
        x = self.proj(x)
        return x  # (B, C, Wh, Ww); the norm is applied after flattening


class SwinTransformer(nn.Module):
    """Returns the stage outputs C2..C5 (NCHW), each after its output LayerNorm (none on C2)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        d = cfg.swin_embed_dim
        self.patch_embed = PatchEmbed(d)
        n = sum(cfg.swin_depths)
        dpr = [cfg.swin_drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # plain floats: works on the meta device
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.swin_depths):
            s = sum(cfg.swin_depths[:i])
            self.layers.append(SwinStage(d * 2 ** i, depth, cfg.swin_num_heads[i], cfg.swin_window_size,
                                         cfg.swin_mlp_ratio, dpr[s:s + depth], i < len(cfg.swin_depths) - 1))
        # norm0 is Identity in the official RETINANET variant (no parameters, so no key).
        for i in range(1, len(cfg.swin_depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(d * 2 ** i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C), channels strided
        if torch.is_grad_enabled() or not runtime.host_tiled(x):
            x = self.patch_embed.norm(x)
        else:  # CPU inference: normed a band of tokens at a time into one buffer (no whole-map transposed copy)
            out = x.new_empty(x.shape)
            step = max(1, CHUNK_BYTES // (4 * C))
            for s in range(0, H * W, step):
                out[:, s:s + step] = self.patch_embed.norm(x[:, s:s + step])
            x = out
        outs = []
        for i, stage in enumerate(self.layers):
            out, x, Hn, Wn = stage(x, H, W)
            norm = getattr(self, f"norm{i}") if i > 0 else None
            out = norm(out) if norm is not None else out
            outs.append(out.view(B, H, W, -1).permute(0, 3, 1, 2))  # NCHW shape, channels-last memory: no copy
            H, W = Hn, Wn
        return outs


class FPN(nn.Module):
    """Top-down FPN on C3..C5 plus P6 (from P5) and P7 (from ReLU(P6)); plain convs with bias."""

    def __init__(self, in_channels: tuple[int, int, int], out: int):
        super().__init__()
        for i, c in enumerate(in_channels, start=2):  # official names are 1-based over [C2(dropped), C3, C4, C5]
            self.add_module(f"fpn_inner{i}", nn.Conv2d(c, out, 1))
            self.add_module(f"fpn_layer{i}", nn.Conv2d(out, out, 3, padding=1))
        self.top_blocks = nn.Module()
        self.top_blocks.p6 = nn.Conv2d(out, out, 3, 2, 1)
        self.top_blocks.p7 = nn.Conv2d(out, out, 3, 2, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = feats
        last = self.fpn_inner4(c5)
        outs = [self.fpn_layer4(last)]
        for c, inner, layer in ((c4, self.fpn_inner3, self.fpn_layer3), (c3, self.fpn_inner2, self.fpn_layer2)):
            lateral = inner(c)
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, layer(last))
        p6 = self.top_blocks.p6(outs[-1])
        p7 = self.top_blocks.p7(F.relu(p6))
        return outs + [p6, p7]


class Backbone(nn.Module):
    """`backbone.body` (Swin) + `backbone.fpn`: image → (P3, P4, P5, P6, P7)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.body = SwinTransformer(cfg)
        self.fpn = FPN(cfg.swin_out_channels[1:], cfg.channels)

    def forward(self, images: torch.Tensor, return_stages: bool = False):
        c = self.body(images)
        if return_stages:
            return self.fpn(c[1:]), c
        c.pop(0)  # C2 is no FPN input: freed before the FPN runs
        return self.fpn(c)
