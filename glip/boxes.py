"""Box geometry shared by GLIP inference, training, evaluation and the explanations: the one home of
anchors, the box coder, areas, IoU, NMS and box rescaling.

Two IoU conventions, each where the official code uses it:

* **+1 (inclusive pixels)**, the maskrcnn_benchmark convention GLIP inherited: a box's width is
  ``x2 - x1 + 1``. Used by the box coder, ``box_area``/``box_iou`` (``plus_one=True``, the default),
  ``clip_boxes`` and NMS (official ``boxlist_iou`` / ``ml_nms``), hence by ATSS target assignment and
  post-processing. Getting it wrong shifts every decoded box by half a pixel and changes NMS decisions.
* **no +1 (continuous coordinates)**: the GIoU training loss (``generalized_box_iou``, as official), and
  comparisons of boxes as geometry — matching two predictions, or a prediction with a drawn ground-truth
  box (``box_iou_numpy``, the rule ``supervision.match_detections`` and COCO's ``maskUtils.iou`` apply;
  ``iou`` for two single boxes, e.g. while placing objects). ``box_iou(..., plus_one=False)`` is the same
  rule in torch.

Pure PyTorch: the official ``ml_nms`` is a CUDA-only compiled op (spec §5).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import ANCHOR_SIZES as DEFAULT_ANCHOR_SIZES
from .config import FPN_STRIDES as DEFAULT_STRIDES

__all__ = [
    "BoxCoder",
    "batched_nms",
    "box_area",
    "box_iou",
    "box_iou_numpy",
    "cell_anchor",
    "clip_boxes",
    "generalized_box_iou",
    "grid_anchors",
    "iou",
    "nms",
    "scale_boxes",
]

# dw/dh are clamped so exp() cannot blow up a box beyond 1000/16 x its anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


# --------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------

def cell_anchor(size: float, stride: float | None = None) -> Tensor:
    """The single (ratio 1, one scale) cell anchor of a level, shape (1, 4).

    The official generator centres the anchor on the first ``stride x stride``
    pixel block, i.e. at ``(stride - 1) / 2``; GLIP uses size = 8 * stride, so
    ``stride`` defaults to ``size / 8``. Size 64 gives [-28, -28, 35, 35].
    """
    if stride is None:
        stride = size / 8.0
    ctr = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    return torch.tensor([[ctr - half, ctr - half, ctr + half, ctr + half]], dtype=torch.float32)


def grid_anchors(
    sizes_hw: list[tuple[int, int]],
    strides=DEFAULT_STRIDES,
    anchor_sizes=DEFAULT_ANCHOR_SIZES,
    device=None,
    dtype=torch.float32,
) -> list[Tensor]:
    """Anchors for each FPN level, (H*W, 4) per level, row-major (y outer).

    Computed in float32 like the official generator, then cast, so the values
    are bit-identical to the checkpoint's buffers whatever ``dtype`` is.
    """
    if not (len(sizes_hw) == len(strides) == len(anchor_sizes)):
        raise ValueError(
            f"need one stride and anchor size per level: got {len(sizes_hw)} levels, "
            f"{len(strides)} strides, {len(anchor_sizes)} anchor sizes"
        )
    out = []
    for (h, w), stride, size in zip(sizes_hw, strides, anchor_sizes):
        base = cell_anchor(size, stride).to(device)
        xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
        ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)
        out.append((shifts + base).to(dtype))
    return out


# --------------------------------------------------------------------------
# Box coder
# --------------------------------------------------------------------------

class BoxCoder:
    """GLIP's ATSS box coder: (dx, dy, dw, dh) deltas relative to an anchor.

    Centres are ``(x1 + x2) / 2`` while sizes carry the +1, exactly as in the
    official ``vldyhead.BoxCoder``; decode clamps dw/dh before ``exp``.
    """

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    @staticmethod
    def _ctr_size(boxes: Tensor):
        x1, y1, x2, y2 = boxes.unbind(-1)
        return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1 + 1, y2 - y1 + 1

    def encode(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """Deltas that take ``anchors`` to ``gt`` (used for training targets)."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._ctr_size(anchors.to(gt.dtype))
        gx, gy, gw, gh = self._ctr_size(gt)
        dx = wx * (gx - ax) / aw
        dy = wy * (gy - ay) / ah
        dw = ww * torch.log(gw / aw)
        dh = wh * torch.log(gh / ah)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """xyxy boxes from deltas; (N, 4) and (N, 4) -> (N, 4)."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._ctr_size(anchors.to(deltas.dtype))
        dx, dy, dw, dh = deltas.unbind(-1)
        dx, dy = dx / wx, dy / wy
        dw = torch.clamp(dw / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(dh / wh, max=self.bbox_xform_clip)
        cx = dx * aw + ax
        cy = dy * ah + ay
        pw = torch.exp(dw) * aw
        ph = torch.exp(dh) * ah
        return torch.stack(
            (cx - 0.5 * (pw - 1), cy - 0.5 * (ph - 1), cx + 0.5 * (pw - 1), cy + 0.5 * (ph - 1)),
            dim=-1,
        )


# --------------------------------------------------------------------------
# Areas, IoU, clipping
# --------------------------------------------------------------------------

def box_area(b: Tensor, plus_one: bool = True) -> Tensor:
    """Area of xyxy boxes; +1 counts the inclusive end pixel (official)."""
    one = 1.0 if plus_one else 0.0
    return (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)


def box_iou(a: Tensor, b: Tensor, plus_one: bool = True) -> Tensor:
    """Pairwise IoU, (N, 4) x (M, 4) -> (N, M), as ``boxlist_iou``."""
    one = 1.0 if plus_one else 0.0
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a, plus_one)[:, None] + box_area(b, plus_one)[None, :] - inter
    return inter / union


def box_iou_numpy(a, b) -> np.ndarray:
    """Pairwise IoU without +1, (N, 4) x (M, 4) -> (N, M) float64; degenerate boxes have area 0."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def iou(a, b) -> float:
    """IoU of two single xyxy boxes without +1 (plain floats: fast in loops over few boxes)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def scale_boxes(boxes, from_size: tuple[float, float], to_size: tuple[float, float]):
    """xyxy boxes of an image of (W, H) `from_size` → the same places in that image at (W, H) `to_size`
    (x by the width ratio, y by the height ratio; the model's resized frame ↔ the original image's).
    Torch tensors stay tensors (dtype and device kept); anything else becomes a float32 numpy array."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    if isinstance(boxes, Tensor):
        return boxes * boxes.new_tensor([sx, sy, sx, sy])
    return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)


def clip_boxes(boxes: Tensor, h: int, w: int) -> Tensor:
    """Clamp x to [0, w-1] and y to [0, h-1] (``clip_to_image``, +1 frame)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, w - 1), y1.clamp(0, h - 1), x2.clamp(0, w - 1), y2.clamp(0, h - 1)), dim=-1
    )


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Elementwise GIoU of matched boxes (N, 4), (N, 4) -> (N,), no +1.

    Matches the official GIoU loss: intersection is zero unless both sides
    are strictly positive, and ``eps`` guards union and enclosing areas.
    """
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    iw = torch.min(ax2, bx2) - torch.max(ax1, bx1)
    ih = torch.min(ay2, by2) - torch.max(ay1, by1)
    inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    enclosing = (torch.max(ax2, bx2) - torch.min(ax1, bx1)) * (torch.max(ay2, by2) - torch.min(ay1, by1)) + eps
    union = area_a + area_b - inter + eps
    iou = inter / union
    return iou - (enclosing - union) / enclosing


# --------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------

def _score_order(scores: Tensor) -> Tensor:
    """Descending score; ties keep the lower original index (stable)."""
    return torch.sort(scores, descending=True, stable=True).indices


# Above this many boxes the N x N suppression matrix (N^2 bools) is skipped.
MATRIX_NMS_MAX_BOXES = 4096
# Fixed-point sweeps before falling back to the per-box loop (long chains).
MATRIX_NMS_MAX_SWEEPS = 32


def _suppression_matrix(boxes: Tensor, labels: Tensor | None, iou_threshold: float,
                        plus_one: bool, chunk: int = 512) -> Tensor:
    """S[i, j]: box i (higher score) would suppress box j; rows built in chunks."""
    n = boxes.shape[0]
    rows = []
    for start in range(0, n, chunk):
        s = box_iou(boxes[start:start + chunk], boxes, plus_one) > iou_threshold
        if labels is not None:
            s &= labels[start:start + chunk, None] == labels[None, :]
        rows.append(s)
    return torch.triu(torch.cat(rows, dim=0), diagonal=1)


def _matrix_nms(sup: Tensor) -> Tensor | None:
    """Exact greedy NMS as a fixed point, or None if it needs too many sweeps.

    Greedy keeps j iff no *kept* earlier box suppresses it. Iterating
    ``keep = ~any_i(keep[i] & S[i, j])`` from all-True fixes at least one more
    leading box per sweep, and since S is strictly upper triangular the fixed
    point is unique, i.e. it is the greedy answer (cf. Cluster-NMS).
    """
    keep = torch.ones(sup.shape[0], dtype=torch.bool, device=sup.device)
    for _ in range(MATRIX_NMS_MAX_SWEEPS):
        new = ~(sup & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            return keep
        keep = new
    return None


def _loop_nms(boxes: Tensor, labels: Tensor | None, iou_threshold: float, plus_one: bool) -> Tensor:
    """Greedy NMS on score-sorted boxes; the python loop runs once per kept box.

    Memory stays O(N), for inputs too large for the suppression matrix.
    """
    remaining = torch.arange(boxes.shape[0], device=boxes.device)
    kept = []
    while remaining.numel() > 0:
        i = remaining[0]
        kept.append(i)
        rest = remaining[1:]
        if rest.numel() == 0:
            break
        suppress = box_iou(boxes[i][None], boxes[rest], plus_one)[0] > iou_threshold
        if labels is not None:
            suppress &= labels[rest] == labels[i]
        remaining = rest[~suppress]
    return torch.stack(kept)


def _greedy_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None, iou_threshold: float,
                plus_one: bool) -> Tensor:
    """Greedy NMS (per label when ``labels`` is given) -> kept original indices.

    Boxes are visited by descending score, ties by lower index; a box is
    dropped when a kept box of the same label has IoU > threshold with it.
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = _score_order(scores)
    boxes = boxes[order]
    labels = labels[order] if labels is not None else None
    if boxes.shape[0] <= MATRIX_NMS_MAX_BOXES:
        keep = _matrix_nms(_suppression_matrix(boxes, labels, iou_threshold, plus_one))
        if keep is not None:
            return order[keep]
    return order[_loop_nms(boxes, labels, iou_threshold, plus_one)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, plus_one: bool = True) -> Tensor:
    """Indices kept by greedy NMS (suppress when IoU > thr), by descending score."""
    return _greedy_nms(boxes, scores, None, iou_threshold, plus_one)


try:  # Optional fast path; torchvision is not installable beside torch here.
    from torchvision.ops import batched_nms as _tv_batched_nms
except Exception:  # pragma: no cover - depends on the environment
    _tv_batched_nms = None


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
                plus_one: bool = True) -> Tensor:
    """Per-label NMS (replacement for the CUDA ``ml_nms``), by descending score.

    With torchvision, ``boxes + [0, 0, 1, 1]`` turns its no-+1 IoU into the
    official +1 IoU (spec §3.6). Otherwise the pure-torch greedy loop only
    compares boxes of the same label, which is exact with no offset trick.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if _tv_batched_nms is not None:
        b = boxes + boxes.new_tensor([0, 0, 1, 1]) if plus_one else boxes
        keep = _tv_batched_nms(b, scores, labels, iou_threshold)
        return keep[_score_order(scores[keep])]
    if labels.unique().numel() == 1:
        return _greedy_nms(boxes, scores, None, iou_threshold, plus_one)
    # One greedy pass per label: the cost is the sum of squares of the group sizes, not the square of the sum.
    groups = [(labels == lab).nonzero().flatten() for lab in labels.unique()]
    keep = torch.cat([idx[_greedy_nms(boxes[idx], scores[idx], None, iou_threshold, plus_one)] for idx in groups])
    keep = keep.sort().values  # ties in score keep the lower original index
    return keep[_score_order(scores[keep])]
