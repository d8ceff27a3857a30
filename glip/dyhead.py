"""DyHead's visual block (`DyConv`): scale-aware attention over three modulated deformable convs
(the level itself, the finer level at stride 2, the coarser level upsampled), then DyReLU.

The modulated deformable convolution (DCNv2) is written in PyTorch: bilinear sampling with
`grid_sample` (align_corners=False with the exact pixel→grid mapping, so 1-pixel feature maps
work too — align_corners=True divides by W-1), modulation by the mask, then one GEMM. When
torchvision's `deform_conv2d` imports it is used instead (same offset/mask layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional fast path; torchvision cannot be installed beside the CPU torch used here
    from torchvision.ops import deform_conv2d as _tv_deform_conv2d
except Exception:  # pragma: no cover - depends on the environment
    _tv_deform_conv2d = None


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride: int = 1, padding: int = 1, dilation: int = 1,
                  use_torchvision: bool | None = None) -> torch.Tensor:
    """Modulated deformable conv. offset (B, 2K, Ho, Wo) with (dy, dx) per tap k = i*kw + j,
    mask (B, K, Ho, Wo). Sample (h*s - p + i*d + dy, w*s - p + j*d + dx); corners outside the
    map read 0 (the DCNv2 im2col kernel's rule)."""
    if use_torchvision is None:
        use_torchvision = _tv_deform_conv2d is not None
    if use_torchvision:
        if _tv_deform_conv2d is None:
            raise RuntimeError("torchvision.ops.deform_conv2d is not available")
        return _tv_deform_conv2d(x, offset, weight, bias, (stride, stride), (padding, padding),
                                 (dilation, dilation), mask)
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    dev, dt = x.device, x.dtype
    ki = (torch.arange(kh, device=dev, dtype=dt) * dilation).repeat_interleave(kw)  # tap rows
    kj = (torch.arange(kw, device=dev, dtype=dt) * dilation).repeat(kh)             # tap cols
    base_y = (torch.arange(Ho, device=dev, dtype=dt) * stride - padding)[None, :, None] + ki[:, None, None]
    base_x = (torch.arange(Wo, device=dev, dtype=dt) * stride - padding)[None, None, :] + kj[:, None, None]
    off = offset.view(B, K, 2, Ho, Wo)
    py = base_y + off[:, :, 0]  # (B, K, Ho, Wo)
    px = base_x + off[:, :, 1]
    grid = torch.stack(((2 * px + 1) / W - 1, (2 * py + 1) / H - 1), dim=-1).view(B, K * Ho, Wo, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols, m = cols.view(B, C, K, Ho * Wo), mask.reshape(B, 1, K, Ho * Wo)
    cols = cols * m if torch.is_grad_enabled() else cols.mul_(m)  # in place at inference: one less (C·K·HW) tensor
    out = weight.reshape(O, C * K) @ cols.view(B, C * K, Ho * Wo)
    if bias is not None:
        out = out + bias.view(1, O, 1)
    return out.view(B, O, Ho, Wo)


class ModulatedDeformConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        stdv = 1.0 / math.sqrt(cin * kernel * kernel)
        nn.init.uniform_(self.weight, -stdv, stdv)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        k = self.weight.shape[-1]
        return ((h + 2 * self.padding - k) // self.stride + 1, (w + 2 * self.padding - k) // self.stride + 1)

    def forward(self, x, offset, mask):
        Ho, Wo = self.out_size(*x.shape[-2:])
        offset, mask = reinterpret(offset, Ho, Wo), reinterpret(mask, Ho, Wo)
        return deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding)


def reinterpret(t: torch.Tensor, Ho: int, Wo: int) -> torch.Tensor:
    """The official CUDA kernel reads offset[b] / mask[b] as contiguous (c, Ho, Wo) arrays with no
    shape check. When the offsets come from a larger level (the coarser-level branch), that is a
    memory re-interpretation of the first c·Ho·Wo values — not a crop, not a resize."""
    B, c, H, W = t.shape
    if (H, W) == (Ho, Wo):
        return t
    return t.reshape(B, c * H * W)[:, : c * Ho * Wo].reshape(B, c, Ho, Wo)


class Conv3x3Norm(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.conv = ModulatedDeformConv(cin, cout, 3, stride, 1)
        self.bn = nn.GroupNorm(groups, cout)

    def forward(self, x, offset, mask):
        return self.bn(self.conv(x, offset, mask))


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


def make_divisible(v: float, divisor: int = 4) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class DyReLU(nn.Module):
    """Task-aware activation: max(x·a1 + b1, x·a2 + b2) with a, b from a global context MLP."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        squeeze = make_divisible(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(channels, squeeze), nn.ReLU(inplace=True), nn.Linear(squeeze, 4 * channels))

    def forward(self, x):
        B, C = x.shape[:2]
        y = h_sigmoid(self.fc(x.mean(dim=(2, 3)))).view(B, 4 * C, 1, 1)
        a1, b1, a2, b2 = torch.split(y, C, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5)


class DyConv(nn.Module):
    """`dyhead_tower.{3i+2}`: scale-aware (AttnConv) + spatial-aware (DCN) + task-aware (DyReLU)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, channels, 1, groups),   # coarser level l+1
                                     Conv3x3Norm(channels, channels, 1, groups),   # level l
                                     Conv3x3Norm(channels, channels, 2, groups)])  # finer level l-1
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True))
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for l, x in enumerate(feats):
            om = self.offset(x)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            branches = [self.DyConv[1](x, offset, mask)]
            if l > 0:
                branches.append(self.DyConv[2](feats[l - 1], offset, mask))
            if l < len(feats) - 1:
                up = self.DyConv[0](feats[l + 1], offset, mask)
                branches.append(F.interpolate(up, size=x.shape[-2:], mode="bilinear", align_corners=True))
            fea = torch.stack(branches)
            attn = h_sigmoid(torch.stack([self.AttnConv(b) for b in branches]))
            out.append(self.relu((fea * attn).mean(dim=0)))
        return out
