"""GLIP's training objective (spec §4, official ``ATSSLossComputation``).

Three terms, summed:

* ``token``: sigmoid focal loss between every anchor's grounding logits
  ``S_ground`` and its token targets (the positive-map row of its ATSS-matched
  phrase), over tokens where ``text_mask`` is 1, divided by ``max(num_pos, 1)``.
* ``reg``: GIoU loss of decoded boxes, weighted by the centerness targets and
  divided by their sum, times ``reg_weight`` (2.0).
* ``centerness``: BCE-with-logits (sum) against the centerness targets,
  divided by ``max(num_pos, 1)``.

Data-parallel runs pass a ``normalizer`` that averages these counts over the
ranks (the official per-GPU averaging), which makes them exact (see `glip_loss`).

Deviation, on purpose: the official code gives negative anchors a token row
with only index 255 ("NoObj") set. That index is masked out by ``text_mask``
unless the caption fills all 256 tokens, so here negatives get an all-zero
row; the two agree whenever index 255 is padding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from glip.boxes import BoxCoder, box_iou, generalized_box_iou

__all__ = [
    "GLIPLossOutput",
    "atss_assign",
    "centerness_targets",
    "giou_loss",
    "glip_loss",
    "token_sigmoid_focal_loss",
]

# An anchor centre must be this far inside a gt box to be a positive.
INSIDE_EPS = 0.01


def _centres(boxes: Tensor) -> Tensor:
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), dim=1)


# --------------------------------------------------------------------------
# ATSS assignment
# --------------------------------------------------------------------------

@torch.no_grad()
def atss_assign(anchors_per_level: list[Tensor], gt_boxes: Tensor, topk: int = 9) -> tuple[Tensor, Tensor]:
    """Adaptive Training Sample Selection for one image.

    Returns ``(matched, matched_iou)`` over the concatenated levels:
    ``matched[a]`` is the gt index of anchor ``a`` or -1 for a negative, and
    ``matched_iou[a]`` its (+1 convention) IoU with that gt, 0 for negatives.

    Why adaptive: the IoU threshold per gt is ``mean + std`` (unbiased) of the
    IoUs of its candidates, the ``topk`` anchors per level nearest its centre,
    so small and large objects both get a handful of positives. A candidate is
    positive iff IoU >= threshold and its centre lies inside the gt; an anchor
    positive for several gts goes to the one with the highest IoU (the first
    such gt on exact ties).
    """
    anchors = torch.cat(list(anchors_per_level), dim=0)
    num_anchors = anchors.shape[0]
    gt = gt_boxes.to(anchors.dtype).reshape(-1, 4)
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    matched_iou = anchors.new_zeros(num_anchors)
    if gt.shape[0] == 0 or num_anchors == 0:
        return matched, matched_iou

    ious = box_iou(anchors, gt)                                   # (A, G)
    anchor_ctr = _centres(anchors)
    dist = (anchor_ctr[:, None, :] - _centres(gt)[None, :, :]).pow(2).sum(-1).sqrt()

    candidates, start = [], 0
    for level in anchors_per_level:
        n = level.shape[0]
        k = min(topk, n)
        if k > 0:
            candidates.append(dist[start:start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    cand = torch.cat(candidates, dim=0)                           # (C, G)

    cand_iou = ious.gather(0, cand)
    if cand.shape[0] > 1:
        thr = cand_iou.mean(0) + cand_iou.std(0)
    else:  # unbiased std of one value is NaN upstream, so nothing passes
        thr = torch.full_like(cand_iou[0], float("inf"))
    is_pos = cand_iou >= thr[None, :]

    cx, cy = anchor_ctr[cand, 0], anchor_ctr[cand, 1]             # (C, G)
    ltrb = torch.stack((cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy), dim=0)
    is_pos &= ltrb.min(dim=0).values > INSIDE_EPS

    neg_inf = torch.tensor(float("-inf"), dtype=ious.dtype, device=ious.device)
    pos_iou = torch.full_like(ious, float("-inf"))
    pos_iou.scatter_(0, cand, torch.where(is_pos, cand_iou, neg_inf))
    best_iou, best_gt = pos_iou.max(dim=1)
    pos = best_iou > float("-inf")
    matched[pos] = best_gt[pos]
    matched_iou[pos] = best_iou[pos]
    return matched, matched_iou


# --------------------------------------------------------------------------
# Individual loss terms
# --------------------------------------------------------------------------

def token_sigmoid_focal_loss(logits: Tensor, targets: Tensor, text_mask: Tensor | None = None,
                             alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed binary focal loss over valid (anchor, token) pairs.

    ``logits`` and ``targets`` are (B, N, T); ``text_mask`` (B, T) is the
    tokenizer attention mask, broadcast over anchors. Padding tokens would
    otherwise add a flood of easy negatives, so they contribute exactly 0.
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if text_mask is not None:
        valid = (text_mask > 0)[:, None, :].expand_as(loss)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum()


def centerness_targets(anchors: Tensor, gt_boxes_matched: Tensor) -> Tensor:
    """FCOS centerness of each anchor centre inside its matched gt box.

    ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``: 1 at the box centre,
    falling towards 0 at the edges, used to down-weight off-centre positives.
    """
    cx, cy = _centres(anchors).unbind(1)
    l = cx - gt_boxes_matched[:, 0]
    t = cy - gt_boxes_matched[:, 1]
    r = gt_boxes_matched[:, 2] - cx
    b = gt_boxes_matched[:, 3] - cy
    lr = torch.min(l, r) / torch.max(l, r)
    tb = torch.min(t, b) / torch.max(t, b)
    return torch.sqrt(lr * tb)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weight: Tensor | None = None) -> Tensor:
    """Sum of ``(1 - GIoU) * weight`` (no +1 inside GIoU, as official).

    Predicted x2/y2 are lifted to at least x1/y1 so an inverted prediction
    has zero area instead of a negative one.
    """
    x1, y1, x2, y2 = pred_boxes.unbind(-1)
    pred = torch.stack((x1, y1, torch.max(x1, x2), torch.max(y1, y2)), dim=-1)
    losses = 1 - generalized_box_iou(pred, target_boxes)
    if weight is not None and weight.sum() > 0:
        return (losses * weight).sum()
    return losses.sum()


# --------------------------------------------------------------------------
# Full objective
# --------------------------------------------------------------------------

@dataclass
class GLIPLossOutput:
    """The summed objective and its terms (each already weighted)."""

    total: Tensor
    token: Tensor
    reg: Tensor
    centerness: Tensor
    num_pos: int
    contrastive: Tensor | None = None  # the optional token-softmax term (already in total when set)

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {
            "loss": float(self.total.detach()),
            "loss_token": float(self.token.detach()),
            "loss_reg": float(self.reg.detach()),
            "loss_centerness": float(self.centerness.detach()),
            "num_pos": self.num_pos,
        } | ({"loss_contrastive": float(self.contrastive.detach())} if self.contrastive is not None else {})


def _flatten_maps(maps: list[Tensor], channels: int) -> Tensor:
    """(B, C, H, W) per level -> (B, sum H*W, C), row-major like the anchors."""
    b = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, channels) for m in maps], dim=1)


def glip_loss(
    token_logits: list[Tensor],
    bbox_reg: list[Tensor],
    centerness: list[Tensor],
    anchors: list[Tensor],
    targets: list[dict],
    text_mask: Tensor,
    box_coder: BoxCoder,
    reg_weight: float = 2.0,
    topk: int = 9,
    contrastive_weight: float = 0.0,
    normalizer: Callable[[Tensor], Tensor] | None = None,
) -> GLIPLossOutput:
    """GLIP loss for a batch.

    ``token_logits[l]`` is (B, H_l*W_l, T); ``bbox_reg[l]`` (B, 4, H_l, W_l);
    ``centerness[l]`` (B, 1, H_l, W_l); ``anchors[l]`` (H_l*W_l, 4), shared by
    the batch. Each target holds ``boxes`` (G, 4) xyxy in the padded-image
    pixel frame and ``positive_map`` (G, T), binarised here.

    ``normalizer`` maps this process's counts (positives, centerness-target sum,
    contrastive anchors; float64) to their mean over the data-parallel ranks, as
    the official code all-reduces them (``total_pos / num_gpus``). Each rank's
    loss is then its sums over these means, and the ranks' averaged gradients
    are those of one process holding the whole batch. Every rank calls it once.
    """
    logits = torch.cat(list(token_logits), dim=1)                # (B, A, T)
    reg = _flatten_maps(list(bbox_reg), 4)                       # (B, A, 4)
    ctr = _flatten_maps(list(centerness), 1).squeeze(-1)         # (B, A)
    all_anchors = torch.cat(list(anchors), dim=0).to(reg.dtype)  # (A, 4)
    batch, num_anchors, num_tokens = logits.shape
    if reg.shape[1] != num_anchors or all_anchors.shape[0] != num_anchors:
        raise ValueError(
            f"anchor count mismatch: logits {num_anchors}, bbox_reg {reg.shape[1]}, anchors {all_anchors.shape[0]}"
        )

    token_targets = logits.new_zeros(batch, num_anchors, num_tokens)
    pos_img, pos_anchor, pos_gt_boxes = [], [], []
    for i, tgt in enumerate(targets):
        boxes = tgt["boxes"].to(all_anchors.device, all_anchors.dtype).reshape(-1, 4)
        matched, _ = atss_assign(anchors, boxes, topk)
        pos = torch.nonzero(matched >= 0).squeeze(1)
        if pos.numel() == 0:
            continue
        pmap = (tgt["positive_map"] > 0).to(logits.device, logits.dtype)
        token_targets[i, pos] = pmap[matched[pos]]
        pos_img.append(torch.full_like(pos, i))
        pos_anchor.append(pos)
        pos_gt_boxes.append(boxes[matched[pos]])

    num_pos = int(sum(p.numel() for p in pos_anchor))
    token_sum = token_sigmoid_focal_loss(logits, token_targets, text_mask)
    stats = torch.zeros(3, dtype=torch.float64, device=logits.device)
    stats[0] = num_pos
    if num_pos:
        img, idx = torch.cat(pos_img), torch.cat(pos_anchor)
        pos_anchors = all_anchors[idx]
        # Official round trip: targets are encoded then decoded, so the dw/dh clamp applies to them too.
        gt_boxes = box_coder.decode(box_coder.encode(torch.cat(pos_gt_boxes), pos_anchors), pos_anchors)
        ctr_targets = centerness_targets(pos_anchors, gt_boxes)
        stats[1] = ctr_targets.sum().double()
        if contrastive_weight > 0:
            con_sum, con_n = _token_softmax_terms(logits[img, idx], token_targets[img, idx], text_mask[img])
            stats[2] = con_n
    if normalizer is not None:
        stats = normalizer(stats)
    pos_norm, ctr_norm, con_norm = (float(v) for v in stats.cpu())
    token = token_sum / max(pos_norm, 1.0)

    if num_pos == 0:  # keep the graph connected so every parameter gets a (zero) grad
        zero_reg, zero_ctr = reg.sum() * 0, ctr.sum() * 0
        contrastive = logits.sum() * 0 if contrastive_weight > 0 else None
        total = token + zero_reg + zero_ctr + (contrastive if contrastive is not None else 0)
        return GLIPLossOutput(total, token, zero_reg, zero_ctr, 0, contrastive)

    pred_boxes = box_coder.decode(reg[img, idx], pos_anchors)
    reg_loss = reg_weight * giou_loss(pred_boxes, gt_boxes, weight=ctr_targets) / max(ctr_norm, 1e-12)
    ctr_loss = F.binary_cross_entropy_with_logits(ctr[img, idx], ctr_targets, reduction="sum") / max(pos_norm, 1.0)
    total = token + reg_loss + ctr_loss
    contrastive = None
    if contrastive_weight > 0:
        contrastive = contrastive_weight * con_sum / max(con_norm, 1.0)
        total = total + contrastive
    return GLIPLossOutput(total, token, reg_loss, ctr_loss, num_pos, contrastive)


def _token_softmax_terms(logits: Tensor, targets: Tensor, text_mask: Tensor) -> tuple[Tensor, int]:
    """(sum over the positive anchors that name a valid token of the softmax cross-entropy, their count)."""
    masked = logits.float().masked_fill(text_mask == 0, float("-inf"))
    logp = F.log_softmax(masked, dim=-1).masked_fill(text_mask == 0, 0.0)
    tgt = targets.float() * (text_mask > 0)
    tgt = tgt / tgt.sum(-1, keepdim=True).clamp(min=1e-6)
    keep = tgt.sum(-1) > 0
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0, 0
    return -(tgt * logp).sum(-1)[keep].sum(), n


def token_softmax_loss(logits: Tensor, targets: Tensor, text_mask: Tensor) -> Tensor:
    """Cross-entropy between a softmax over each positive anchor's valid tokens and its (normalised)
    positive tokens: MDETR's contrastive alignment, an option of the GLIP code base (off in GLIP-T).

    Why: the sigmoid focal loss is minimised first by one "objectness" direction that raises every
    token at every object; a softmax over the prompt cancels that direction, so only what tells the
    prompt's words apart (colour against colour, shape against shape) lowers this term.
    logits/targets (P, T), text_mask (P, T). Mean over the anchors with a valid positive token."""
    total, n = _token_softmax_terms(logits, targets, text_mask)
    return total / max(n, 1)
