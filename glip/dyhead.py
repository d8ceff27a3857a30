"""DyHead's visual block (`DyConv`): scale-aware attention over three modulated deformable convs
(the level itself, the finer level at stride 2, the coarser level upsampled), then DyReLU.

The modulated deformable convolution (DCNv2) is written in PyTorch as a bilinear im2col by gather
and one GEMM: every (output position, tap) reads 4 corner rows of the channels-last feature map,
weighted by bilinear × modulation weights (one fused `embedding_bag`; a corner outside the map
reads an all-zero row, the DCNv2 kernel's rule, which also makes 1-pixel maps exact), in chunks
of positions whose columns stay in cache. When torchvision's `deform_conv2d` imports it is used
instead (same offset/mask layout).

On the CPU the plain 3×3 conv that predicts the offsets reads the same zero-bordered table: one GEMM
gives every pixel's contribution to all 9 taps, and 9 shifted slices of it are summed (a 27-channel conv
is a narrow GEMM, slow in im2col form). A level's table is shared by the coarser branch of the level
below, the level's own offset conv and its own DCN. Off the CPU (`runtime.host_tiled`) the offset conv is
a plain conv and the gather runs over the whole batch in one chunk: fewer, larger kernels.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, runtime
from .gemm import Linear

try:  # optional fast path; torchvision cannot be installed beside the CPU torch used here
    from torchvision.ops import deform_conv2d as _tv_deform_conv2d
except Exception:  # pragma: no cover - depends on the environment
    _tv_deform_conv2d = None

# Gathered rows (positions × taps) per GEMM chunk: 8 MB of fp32 columns at 256 channels, which
# stay in cache between the gather and the GEMM (whole-map columns are 155 MB at 800×1333).
CHUNK_ROWS = 8192
# Off the CPU (`runtime.host_tiled`): gathered columns per chunk, in bytes; at batch 1 every level of an
# 800×1333 image is one chunk.
DEVICE_CHUNK_BYTES = 1 << 30
# fp32 CPU inference: the GEMM's weight packed once per call (`gemm.pack`) when a call has at least this many
# full chunks to amortise the packing.
PACK_MIN_CHUNKS = 4
BAND_BYTES = 4 << 20  # inference: DyReLU's second line is formed a band of rows of about this size at a time


def sample_table(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, (H+3)·(W+3), C): the map's pixels as channels-last rows inside a zero
    border (1 before, 2 after, in both directions), so that every corner of a sample point clamped
    to [-1, H] × [-1, W] is a row of the table, and the rows outside the map are zeros."""
    B, C, H, W = x.shape
    t = x.new_empty(B, H + 3, W + 3, C)
    t[:, 1:H + 1, 1:W + 1] = x.permute(0, 2, 3, 1)
    for border in (t[:, :1], t[:, H + 1:], t[:, 1:H + 1, :1], t[:, 1:H + 1, W + 1:]):  # only the border is zeroed
        border.zero_()
    return t.view(B, (H + 3) * (W + 3), C)


def conv3x3_from_table(table: torch.Tensor, H: int, W: int, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """3×3 conv, stride 1, zero padding 1, of the map held by `sample_table` (B, (H+3)·(W+3), C).
    Y = table · [W_tap]ᵀ for all 9 taps at once; the output at (i, j) sums tap (a, b) of the table row of
    pixel (i + a - 1, j + b - 1), i.e. table position (i + a, j + b). Returns (B, O, H, W), channels-last."""
    B, _, C = table.shape
    O = weight.shape[0]
    Y = gemm.linear(table, weight.permute(2, 3, 0, 1).reshape(9 * O, C)).view(B, H + 3, W + 3, 3, 3, O)
    out = Y[:, :H, :W, 0, 0] + (bias if bias is not None else 0)
    for a in range(3):
        for b in range(3):
            if a or b:
                tap = Y[:, a:a + H, b:b + W, a, b]
                out = out.add_(tap) if not torch.is_grad_enabled() else out + tap
    return out.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def _tap_grid(Ho: int, Wo: int, W: int, kh: int, kw: int, stride: int, padding: int, dilation: int,
              device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every call at one shape shares, formed on the device once: the zero-offset sample rows (Ho, 1, K)
    and columns (Wo, K) of every tap in table coordinates (+1, the zero border), and the table-row offsets
    0, 1, W + 3, W + 4 of a point's four corners."""
    with torch.no_grad():
        ki = (torch.arange(kh, device=device, dtype=dtype) * dilation).repeat_interleave(kw)  # tap rows
        kj = (torch.arange(kw, device=device, dtype=dtype) * dilation).repeat(kh)             # tap cols
        gy = (torch.arange(Ho, device=device, dtype=dtype) * stride + (1 - padding))[:, None, None] + ki
        gx = (torch.arange(Wo, device=device, dtype=dtype) * stride + (1 - padding))[:, None] + kj
        c = torch.arange(4, device=device)
        return gy, gx, c // 2 * (W + 3) + c % 2


def bilinear_taps(offset: torch.Tensor, mask: torch.Tensor, H: int, W: int, kh: int, kw: int,
                  stride: int = 1, padding: int = 1, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `sample_table` (its batch flattened: (B·(H+3)·(W+3), C)) and weights of the 4 corners of
    every (position, tap), in (B·Ho·Wo·K, 4) image-major, position-major order; weights are bilinear ×
    modulation.

    The DCNv2 kernel reads 0 for a corner outside the map, and nothing for a point outside
    (-1, H) × (-1, W). Clamping the point to [-1, H] × [-1, W] keeps that: a point beyond the map
    then has its corners on the zero border, or weight 0 on the one corner inside."""
    B, _, Ho, Wo = offset.shape
    K = kh * kw
    dev = offset.device
    infer = not torch.is_grad_enabled()
    dt = torch.float32 if offset.dtype in (torch.float16, torch.bfloat16) else offset.dtype  # positions need fp32
    gy, gx, corner = _tap_grid(Ho, Wo, W, kh, kw, stride, padding, dilation, dev, dt)
    # position-major views (B, Ho, Wo, K, (dy, dx)) and (B, Ho, Wo, K): no copy of channels-last offsets
    off = offset.to(dt).permute(0, 2, 3, 1).reshape(B, Ho, Wo, K, 2)
    m = mask.to(dt).permute(0, 2, 3, 1)
    # positions in table coordinates (+1: the border), clamped to [0, H + 1] × [0, W + 1]
    py, px = off[..., 0] + gy, off[..., 1] + gx
    py, px = (py.clamp_(0, H + 1), px.clamp_(0, W + 1)) if infer else (py.clamp(0, H + 1), px.clamp(0, W + 1))
    y0, x0 = py.floor(), px.floor()
    with torch.no_grad():  # the table row of the top-left corner (exact in fp32: tables have < 2^24 rows)
        top_left = torch.add(x0, y0, alpha=W + 3).long()
    ly, lx = (py.sub_(y0), px.sub_(x0)) if infer else (py - y0, px - x0)
    my, hx = (m * (1 - ly), m * ly), 1 - lx  # modulation × the row weight of the top / bottom corners
    corners = ((my[0], hx), (my[0], lx), (my[1], hx), (my[1], lx))  # top-left, top-right, bottom-left, bottom-right
    if infer:  # written straight into the (…, 4) layout
        wts = torch.empty(B, Ho, Wo, K, 4, device=dev, dtype=dt)
        for c, (a, b) in enumerate(corners):
            torch.mul(a, b, out=wts[..., c])
    else:
        wts = torch.stack([a * b for a, b in corners], -1)
    if B > 1:  # rows of the batch's tables stacked into one: image b's rows start at b·(H+3)·(W+3)
        top_left.add_((torch.arange(B, device=dev) * ((H + 3) * (W + 3))).view(B, 1, 1, 1))
    rows = top_left[..., None] + corner
    return rows.reshape(B * Ho * Wo * K, 4), wts.reshape(B * Ho * Wo * K, 4)


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, kh, kw) → (O, kh·kw·C): the conv weight with its columns in (tap, channel) order, as gathered."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def chunk_positions(x: torch.Tensor, K: int) -> int:
    """Output positions per gather + GEMM chunk of a DCN over `x` with K taps."""
    C = x.shape[1]
    return max(1, (CHUNK_ROWS if runtime.host_tiled(x) else DEVICE_CHUNK_BYTES // (C * x.element_size())) // K)


def deform_chunks(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                  bias: torch.Tensor | None, kh: int, kw: int, stride: int = 1, padding: int = 1, dilation: int = 1,
                  table: torch.Tensor | None = None, packed: gemm.PackedLinear | None = None):
    """The modulated deformable conv as gather + GEMM, a chunk of output positions at a time: yields (s, e, y)
    with y (e - s, O) the rows s … e of the (B·Ho·Wo, O) channels-last output. `w`: `gemm_weight(weight)`;
    `packed`: that weight packed for the chunks' row count, or None."""
    B, C, H, W = x.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    rows, wts = bilinear_taps(offset, mask, H, W, kh, kw, stride, padding, dilation)
    table = (sample_table(x) if table is None else table).flatten(0, 1)  # the batch's tables as one
    wts = wts.to(table.dtype)
    P = B * Ho * Wo  # output positions of the whole batch, chunked alike
    step = chunk_positions(x, K)
    for s in range(0, P, step):
        e = min(P, s + step)
        cols = F.embedding_bag(rows[s * K:e * K], table, per_sample_weights=wts[s * K:e * K], mode="sum")
        cols = cols.view(e - s, K * C)
        yield s, e, (packed(cols, bias) if packed is not None else gemm.linear(cols, w, bias))


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride: int = 1, padding: int = 1, dilation: int = 1,
                  use_torchvision: bool | None = None, table: torch.Tensor | None = None,
                  prepared: tuple[torch.Tensor, gemm.PackedLinear | None] | None = None) -> torch.Tensor:
    """Modulated deformable conv. offset (B, 2K, Ho, Wo) with (dy, dx) per tap k = i*kw + j,
    mask (B, K, Ho, Wo). Sample (h*s - p + i*d + dy, w*s - p + j*d + dx); corners outside the
    map read 0 (the DCNv2 im2col kernel's rule). Returns (B, O, Ho, Wo) in channels-last memory.
    `table`: `sample_table(x)` when the caller already has it; `prepared`: (`gemm_weight(weight)`, its packed
    form or None) when the caller keeps them (`ModulatedDeformConv`), else formed here."""
    if use_torchvision is None:
        use_torchvision = _tv_deform_conv2d is not None
    if use_torchvision:
        if _tv_deform_conv2d is None:
            raise RuntimeError("torchvision.ops.deform_conv2d is not available")
        return _tv_deform_conv2d(x, offset, weight, bias, (stride, stride), (padding, padding),
                                 (dilation, dilation), mask)
    B = x.shape[0]
    O, _, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    P = B * Ho * Wo
    if prepared is None:
        w = gemm_weight(weight)
        step = chunk_positions(x, kh * kw)
        prepared = w, (gemm.pack(w, step, like=x) if P // step >= PACK_MIN_CHUNKS else None)
    w, packed = prepared
    keep = torch.is_grad_enabled()  # autograd: keep the chunks and concatenate; inference: write in place
    out, pieces = None, []
    for s, e, y in deform_chunks(x, offset, mask, w, bias, kh, kw, stride, padding, dilation, table, packed):
        if keep or e - s == P:  # autograd, or the whole batch in one chunk: y is the output
            pieces.append(y)
            continue
        if out is None:
            out = y.new_empty(P, O)
        out[s:e] = y
    if pieces:
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out.view(B, Ho, Wo, O).permute(0, 3, 1, 2)


class ModulatedDeformConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        stdv = 1.0 / math.sqrt(cin * kernel * kernel)
        nn.init.uniform_(self.weight, -stdv, stdv)
        self._gemm = None  # inference: (key, the weight in GEMM form, packed or None), see `prepared`

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        k = self.weight.shape[-1]
        return ((h + 2 * self.padding - k) // self.stride + 1, (w + 2 * self.padding - k) // self.stride + 1)

    def prepared(self, x: torch.Tensor, positions: int) -> tuple[torch.Tensor, gemm.PackedLinear | None] | None:
        """Inference: the weight in GEMM form and, for a call of many chunks, packed; kept between calls while
        the weight is the same tensor at the same version (an optimizer step or a load bumps it). Packed, the
        GEMM form itself is not kept. None with autograd on, or for a weight without a version (inference mode)."""
        if torch.is_grad_enabled():
            return None
        wt = self.weight
        try:
            version = wt._version
        except RuntimeError:  # an inference tensor
            return None
        step = chunk_positions(x, wt.shape[-1] * wt.shape[-2])
        want_pack = positions // step >= PACK_MIN_CHUNKS
        key = (version, wt.data_ptr(), wt.dtype, wt.device, x.dtype, step, gemm.library())
        c = self._gemm
        if c is None or c[0] != key or (want_pack and c[2] is None):
            w = gemm_weight(wt)
            packed = gemm.pack(w, step, like=x) if want_pack else None
            self._gemm = c = (key, None if packed is not None and packed.library == "onednn" else w, packed)
        return c[1], c[2]

    def forward(self, x, offset, mask, table=None):
        Ho, Wo = self.out_size(*x.shape[-2:])
        offset, mask = reinterpret(offset, Ho, Wo), reinterpret(mask, Ho, Wo)
        return deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding, table=table,
                             prepared=self.prepared(x, x.shape[0] * Ho * Wo))

    def chunks(self, x, offset, mask, table=None):
        """Inference without the torchvision kernel: `deform_chunks` of this conv, the output's rows a chunk at a
        time (the caller consumes them in place of the assembled map)."""
        Ho, Wo = self.out_size(*x.shape[-2:])
        offset, mask = reinterpret(offset, Ho, Wo), reinterpret(mask, Ho, Wo)
        w, packed = self.prepared(x, x.shape[0] * Ho * Wo) or (gemm_weight(self.weight), None)
        k = self.weight.shape[-1]
        return deform_chunks(x, offset, mask, w, self.bias, k, k, self.stride, self.padding, table=table,
                             packed=packed), (Ho, Wo)


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

    def forward(self, x, offset, mask, table=None):
        return self.bn(self.conv(x, offset, mask, table))


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
        self.fc = nn.Sequential(Linear(channels, squeeze), nn.ReLU(inplace=True), Linear(squeeze, 4 * channels))

    def coefficients(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """context (B, C), the map's mean → a1, b1, a2, b2 (B, C, 1, 1) of the two lines x·a + b."""
        B, C = context.shape
        y = h_sigmoid(self.fc(context)).view(B, 4 * C, 1, 1)
        a1, b1, a2, b2 = torch.split(y, C, dim=1)
        return (a1 - 0.5) * 2.0 + 1.0, b1 - 0.5, (a2 - 0.5) * 2.0, b2 - 0.5

    def forward(self, x):
        a1, b1, a2, b2 = self.coefficients(x.mean(dim=(2, 3)))
        y = torch.addcmul(b1, x, a1)  # x·a + b, one pass each
        if torch.is_grad_enabled():
            return torch.maximum(y, torch.addcmul(b2, x, a2))
        if not runtime.host_tiled(x):
            return torch.maximum(y, torch.addcmul(b2, x, a2), out=y)
        # CPU inference: the second line a band of rows at a time, its maximum written into the first
        for r, band in self._bands(x):
            yb = y[:, :, r:r + band]
            torch.maximum(yb, torch.addcmul(b2, x[:, :, r:r + band], a2), out=yb)
        return y

    def forward_affine_(self, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        context: torch.Tensor) -> torch.Tensor:
        """CPU inference: DyReLU(z·scale + shift) written into z, a band of rows at a time; scale, shift (B, C)
        and `context`, the mean of z·scale + shift, known to the caller. The affine is folded into both lines."""
        a1, b1, a2, b2 = self.coefficients(context)
        scale, shift = scale[..., None, None], shift[..., None, None]
        a1, b1, a2, b2 = a1 * scale, torch.addcmul(b1, a1, shift), a2 * scale, torch.addcmul(b2, a2, shift)
        for r, band in self._bands(z):
            zb = z[:, :, r:r + band]
            torch.maximum(torch.addcmul(b1, zb, a1), torch.addcmul(b2, zb, a2), out=zb)
        return z

    @staticmethod
    def _bands(x: torch.Tensor):
        step = max(1, BAND_BYTES // (x.element_size() * x.shape[0] * x.shape[1] * x.shape[-1]))
        return ((r, step) for r in range(0, x.shape[-2], step))


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
        if (not torch.is_grad_enabled() and _tv_deform_conv2d is None and runtime.host_tiled(feats[0])
                and not torch.is_autocast_enabled(feats[0].device.type)):
            return self._forward_folded(feats)
        return self._forward_maps(feats)

    def _forward_maps(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every branch formed as a map, normed, weighted and summed: autograd, autocast, torchvision's kernel,
        other devices (at inference the sums in place)."""
        infer = not torch.is_grad_enabled()
        tv = _tv_deform_conv2d is not None  # torchvision's kernel reads the map itself
        # A level's zero-bordered table is built for the coarser branch of the level below and kept for the
        # level's own offset conv and DCN, then dropped (the finer branch of the next level rebuilds it: a
        # copy, cheaper than holding the largest table through the rest of the level).
        nxt = None
        out = []
        for l, x in enumerate(feats):
            t = None if tv else (nxt if nxt is not None else sample_table(x))
            nxt = None
            # (off the CPU a plain conv: one kernel instead of a GEMM and nine shifted sums)
            om = (self.offset(x) if tv or not runtime.host_tiled(x)
                  else conv3x3_from_table(t, *x.shape[-2:], self.offset.weight, self.offset.bias))
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            # mean over branches of branch × its scale attention, accumulated one branch at a time
            fea = self._attend_scale(self.DyConv[1](x, offset, mask, t), None, infer)
            del t
            n = 1
            if l > 0:
                fea = self._attend_scale(self.DyConv[2](feats[l - 1], offset, mask), fea, infer)
                n += 1
            if l < len(feats) - 1:
                nxt = None if tv else sample_table(feats[l + 1])
                b = F.interpolate(self.DyConv[0](feats[l + 1], offset, mask, nxt), size=x.shape[-2:],
                                  mode="bilinear", align_corners=True)
                fea = self._attend_scale(b, fea, infer)
                n += 1
                del b
            fea = fea.div_(n) if infer else fea / n
            out.append(self.relu(fea))
            del fea
        return out

    def _attend_scale(self, b: torch.Tensor, fea: torch.Tensor | None, infer: bool) -> torch.Tensor:
        """fea + b × h_sigmoid(AttnConv(b)) (b itself when fea is None); at inference in place."""
        a = h_sigmoid(self.AttnConv(b))
        term = b.mul_(a) if infer else b * a
        if fea is None:
            return term
        return fea.add_(term) if infer else fea + term

    def _forward_folded(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """CPU inference, the same values with the maps read and written fewer times. Every per-channel step after a
        DCN is an affine map of its output y: GroupNorm is y·s + t once y's channel means and variances are known
        (taken from the GEMM's chunks while they are in cache), bilinear upsampling commutes with it (its weights
        sum to 1), the scale attention reads only the branch's channel means, and the branch mean and DyReLU's
        context are sums of those. So a level is Σ_i z_i·k_i (z_i a DCN output, upsampled for the coarser branch)
        accumulated chunk by chunk into one map, plus a per-channel constant, and DyReLU, with the constant and the
        1/n of the mean folded into its two lines, is applied to that map in place."""
        if feats[0].shape[0] > 1:  # every statistic is per image
            per_image = [self._forward_folded([f[b:b + 1] for f in feats]) for b in range(feats[0].shape[0])]
            return [torch.cat(level) for level in zip(*per_image)]
        nxt = None
        out = []
        for l, x in enumerate(feats):
            H, W = x.shape[-2:]
            t = nxt if nxt is not None else sample_table(x)
            om = conv3x3_from_table(t, H, W, self.offset.weight, self.offset.bias)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            acc = x.new_empty(1, H, W, x.shape[1]).permute(0, 3, 1, 2)  # channels-last, like the DCN's output
            shift, mean = self._fold_branch(self.DyConv[1], x, offset, mask, t, acc, first=True)
            del t
            n = 1
            if l > 0:
                c, m = self._fold_branch(self.DyConv[2], feats[l - 1], offset, mask, None, acc)
                shift, mean, n = shift + c, mean + m, n + 1
            nxt = None
            if l < len(feats) - 1:
                nxt = sample_table(feats[l + 1])
                c, m = self._fold_branch(self.DyConv[0], feats[l + 1], offset, mask, nxt, acc, size=(H, W))
                shift, mean, n = shift + c, mean + m, n + 1
            scale = acc.new_full((1, acc.shape[1]), 1.0 / n)
            out.append(self.relu.forward_affine_(acc, scale, (shift / n)[None], ((mean + shift) / n)[None]))
            del acc
        return out

    def _fold_branch(self, branch: "Conv3x3Norm", src: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                     table: torch.Tensor | None, acc: torch.Tensor, first: bool = False,
                     size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds z·k into `acc` (written, when `first`), z the branch's DCN output (upsampled to `size`), k its
        GroupNorm scale × its scale attention a; returns a·t (t the GroupNorm shift) and the mean of z·k, per channel."""
        chunks, (Ho, Wo) = branch.conv.chunks(src, offset, mask, table)
        pieces, stats = [], []
        for s, e, y in chunks:
            pieces.append((s, e, y))
            stats.append(_moments(y))
        var, mean = _merge_moments(stats, [e - s for s, e, _ in pieces])
        scale, shift = group_norm_affine(branch.bn, mean, var)
        if size is not None:  # the coarser level: its map upsampled
            y = pieces[0][2] if len(pieces) == 1 else torch.cat([p for _, _, p in pieces])
            z = F.interpolate(y.view(1, Ho, Wo, -1).permute(0, 3, 1, 2), size=size, mode="bilinear",
                              align_corners=True)
            del y, pieces
            mean = z.mean(dim=(2, 3))[0]
        attn = self.AttnConv[1]
        a = h_sigmoid(F.relu(gemm.linear((mean * scale + shift)[None], attn.weight.flatten(1), attn.bias)))[0]
        k = scale * a
        if size is not None:
            acc.addcmul_(z, k[:, None, None])
        else:
            rows = acc.permute(0, 2, 3, 1).view(-1, acc.shape[1])
            for s, e, y in pieces:
                torch.mul(y, k, out=rows[s:e]) if first else rows[s:e].addcmul_(y, k)
        return a * shift, mean * k


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) of each column of a chunk, in two passes while it is in cache (the stable order;
    `torch.var_mean` over rows is an order of magnitude slower on the CPU)."""
    mean = y.mean(0)
    d = y - mean
    return d.mul_(d).mean(0), mean


def _merge_moments(stats: list[tuple[torch.Tensor, torch.Tensor]], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (variance, mean) of rows given per chunk by `_moments`: the chunks' means weighted by their
    row counts, and the law of total variance (no sum of squares, which cancels in fp32)."""
    if len(stats) == 1:
        return stats[0]
    var, mean = (torch.stack(v) for v in zip(*stats))
    n = torch.tensor(counts, dtype=mean.dtype, device=mean.device)[:, None]
    m = (mean * n).sum(0) / n.sum()
    return ((var + (mean - m).square()) * n).sum(0) / n.sum(), m


def group_norm_affine(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of a map whose per-channel mean and (biased) variance are given, as the per-channel affine
    x·scale + shift it applies: a group's mean is its channels' mean, its variance their mean variance plus the
    spread of their means."""
    G = norm.num_groups
    m = mean.view(G, -1)
    mg = m.mean(1, keepdim=True)
    inv = torch.rsqrt((var.view(G, -1) + (m - mg).square()).mean(1, keepdim=True) + norm.eps)
    gamma = norm.weight.view(G, -1) if norm.affine else torch.ones_like(m)
    beta = norm.bias.view(G, -1) if norm.affine else torch.zeros_like(m)
    scale = gamma * inv
    return scale.flatten(), (beta - mg * scale).flatten()

