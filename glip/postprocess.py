"""ATSS post-processing for grounding (official `ATSSPostProcessor`, §3.6):

per level: phrase score = mean σ(S_ground) over the phrase's tokens; candidates = score > 0.05
(before centerness); top-k (1000) of score·σ(centerness); decode; score = sqrt; clip to the
unpadded resized image. Then per-phrase NMS (IoU with +1 widths, suppress when > 0.6) over all
levels and the top-100 cut by kthvalue (ties may keep more, as official).

Unlike the official demo there is no 80-phrase cap: the score matrix has one column per phrase.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import BoxCoder, batched_nms, clip_boxes
from .prompts import phrase_scores


@dataclass
class RawDetections:
    """Detections of one image in the resized-image frame, before the display threshold."""
    boxes: torch.Tensor    # (N, 4) xyxy, resized-image pixels (clipped to w-1, h-1)
    scores: torch.Tensor   # (N,) sqrt(phrase prob · σ(centerness))
    labels: torch.Tensor   # (N,) 0-based phrase index
    level: torch.Tensor    # (N,) pyramid level of the anchor (0 = P3)
    loc: torch.Tensor      # (N,) location index inside that level (row-major)
    n_pre_nms: int = 0
    n_after_nms: int = 0
    candidates_per_level: tuple[int, ...] = ()


def atss_postprocess(token_logits: list[torch.Tensor], bbox_reg: list[torch.Tensor], centerness: list[torch.Tensor],
                     anchors: list[torch.Tensor], pmap: torch.Tensor, image_hw: tuple[int, int],
                     box_coder: BoxCoder | None = None, inference_th: float = 0.05, pre_nms_top_n: int = 1000,
                     nms_th: float = 0.6, detections_per_img: int = 100) -> RawDetections:
    """One image. token_logits[l]: (H·W, T); bbox_reg[l]: (4, H, W); centerness[l]: (1, H, W)."""
    coder = box_coder or BoxCoder()
    h, w = image_hw
    pmap = pmap.to(token_logits[0].device)  # prompts are built on the CPU; the head may run on CUDA
    all_boxes, all_scores, all_labels, all_level, all_loc, cands = [], [], [], [], [], []
    for lvl, (logit, reg, ctr, anc) in enumerate(zip(token_logits, bbox_reg, centerness, anchors)):
        prob = phrase_scores(logit.float(), pmap)                     # (HW, P)
        reg = reg.float().permute(1, 2, 0).reshape(-1, 4)
        ctr = ctr.float().reshape(-1).sigmoid()
        nz = (prob > inference_th).nonzero()  # (n, 2) row-major: the one read-back of the level
        n = len(nz)
        cands.append(n)
        k = min(n, pre_nms_top_n)
        if k == 0:
            continue
        s = prob[nz[:, 0], nz[:, 1]] * ctr[nz[:, 0]]
        s, idx = s.topk(k, sorted=True)
        nz = nz[idx]
        loc, label = nz[:, 0], nz[:, 1]
        boxes = clip_boxes(coder.decode(reg[loc], anc[loc]), h, w)
        all_boxes.append(boxes)
        all_scores.append(s.sqrt())
        all_labels.append(label)
        all_level.append(torch.full_like(loc, lvl))
        all_loc.append(loc)
    if not all_boxes:
        z = torch.zeros(0, dtype=torch.long)
        return RawDetections(torch.zeros(0, 4), torch.zeros(0), z, z, z, 0, 0, tuple(cands))
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    level, loc = torch.cat(all_level), torch.cat(all_loc)
    n_pre = len(boxes)
    keep = batched_nms(boxes, scores, labels, nms_th)
    n_after = len(keep)
    if n_after > detections_per_img > 0:
        kth = torch.kthvalue(scores[keep].cpu(), n_after - detections_per_img + 1).values.item()
        keep = keep[scores[keep] >= kth]
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    return RawDetections(boxes[keep], scores[keep], labels[keep], level[keep], loc[keep], n_pre, n_after, tuple(cands))
