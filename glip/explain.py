"""Visualisation math for GLIP's mechanics (no UI code here: the Gradio app renders what this computes).

Deep fusion (X-MHA) attention, see `glip.fusion.FusionAttention`:
  image_to_text (1, heads, N_img, T)  each image position's softmax over the prompt tokens
  text_to_image (1, heads, T, N_img)  each token's softmax over ALL image positions of all levels
N_img is P3..P7 flattened row-major and concatenated over the *padded* feature maps; the part of
level l that sees the image (not the zero padding) is ceil(h/stride_l) × ceil(w/stride_l), where
(h, w) is the resized, unpadded input size (`result.states[0].hw`).

Functions:
  valid_shapes / split_levels     the visual axis → one 2-D map per level, padding cropped away
  text_to_image                   a token (or phrase) → where it looks, per level and combined
  image_to_text_at / _in_box      a point or a box → its distribution over the prompt tokens
  upsample / combine_levels       level maps → one map over the image (any (W, H), e.g. the original's)
  token_to_image_per_layer        a token's text→image distribution in every fusion layer
  sharpness                       how concentrated a distribution is (how attention sharpens with depth)
  aggregate                       mean or rollout over layers
  phrase_tokens                   which token indices belong to a phrase
  best_phrase_scores              the best box score of each phrase
  match / agreement               teacher vs student (vs ground truth) matching per phrase (IoU without +1)
  text_stage_similarity           cosine similarity of chosen tokens after each head stage (does
                                  fusion keep "red" and "blue" apart?)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import box_iou_numpy, scale_boxes
from .config import FPN_STRIDES as STRIDES
from .prompts import tokens_in_spans

_iou = box_iou_numpy  # also importable from here (callers import it under this name)


# --- the visual axis ---------------------------------------------------------------------------------
def valid_shapes(level_shapes: Sequence[tuple[int, int]], hw: tuple[int, int],
                 strides: Sequence[int] = STRIDES) -> list[tuple[int, int]]:
    """Unpadded (rows, cols) of each level: ceil(h / stride) × ceil(w / stride), within the padded shape."""
    h, w = hw
    return [(max(1, min(H, math.ceil(h / s))), max(1, min(W, math.ceil(w / s))))
            for (H, W), s in zip(level_shapes, strides)]


def level_offsets(level_shapes: Sequence[tuple[int, int]]) -> list[int]:
    out, start = [], 0
    for H, W in level_shapes:
        out.append(start)
        start += H * W
    return out


def split_levels(vec: torch.Tensor, level_shapes, hw, strides=STRIDES) -> list[torch.Tensor]:
    """(..., N_img) → per level (..., rows_l, cols_l), padding cropped."""
    vec = torch.as_tensor(vec)
    n = sum(H * W for H, W in level_shapes)
    if vec.shape[-1] != n:
        raise ValueError(f"the visual axis has {vec.shape[-1]} positions but the level shapes give {n}")
    out = []
    for (H, W), off, (vh, vw) in zip(level_shapes, level_offsets(level_shapes), valid_shapes(level_shapes, hw, strides)):
        m = vec[..., off:off + H * W].reshape(*vec.shape[:-1], H, W)
        out.append(m[..., :vh, :vw])
    return out


def _heads(t: torch.Tensor, head: int | None) -> torch.Tensor:
    """(1, heads, A, B) → (A, B): one head, or the mean over heads (head=None)."""
    t = t[0].float()
    if head is None:
        return t.mean(0)
    if not 0 <= head < t.shape[0]:
        raise ValueError(f"head must be in 0..{t.shape[0] - 1}, got {head}")
    return t[head]


def _token_ids(token_ids, n_tokens: int) -> list[int]:
    ids = [int(i) for i in ([token_ids] if isinstance(token_ids, int) else token_ids)]
    if not ids:
        raise ValueError("No tokens selected")
    bad = [i for i in ids if not 0 <= i < n_tokens]
    if bad:
        raise ValueError(f"token indices {bad} are outside the prompt's {n_tokens} tokens")
    return ids


# --- text → image ------------------------------------------------------------------------------------
def text_to_image(att, token_ids, hw, head: int | None = None, strides=STRIDES) -> list[torch.Tensor]:
    """Where the selected tokens look: per level (rows_l, cols_l) maps of attention probability
    (mean over the tokens; one head or the head mean). Values are probabilities over ALL positions of
    all levels, so the levels are directly comparable."""
    p = _heads(att.text_to_image, head)                       # (T, N_img)
    ids = _token_ids(token_ids, p.shape[0])
    return split_levels(p[ids].mean(0), att.level_shapes, hw, strides)


def upsample(level_map: torch.Tensor, stride: int, hw: tuple[int, int], image_size: tuple[int, int],
             mode: str = "bilinear") -> torch.Tensor:
    """One level's (rows, cols) map → (H, W) over the original image: each cell covers stride×stride
    pixels of the resized input (the last row/column reaches into the padding, which is cropped).
    mode="nearest" keeps the cells visible (shows each level's resolution)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', not {mode!r}")
    h, w = hw
    W, H = image_size
    m = torch.as_tensor(level_map).float()[None, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    m = F.interpolate(m, size=(m.shape[-2] * stride, m.shape[-1] * stride), mode=mode, **kw)
    m = m[..., :h, :w]
    return F.interpolate(m, size=(H, W), mode=mode, **kw)[0, 0]


def combine_levels(levels: Sequence[torch.Tensor], hw, image_size, strides=STRIDES, how: str = "density") -> torch.Tensor:
    """All levels → one (H, W) map over the original image.

    how="density": attention mass per input pixel, summed over levels (a cell of level l spreads its
    probability over stride_l² pixels) — the natural way to add maps of different resolutions.
    how="max": each level scaled to [0, 1], then the pixel-wise max (what each level finds, equally weighted).
    """
    if how not in ("density", "max"):
        raise ValueError(f"how must be 'density' or 'max', not {how!r}")
    ups = []
    for m, s in zip(levels, strides):
        m = torch.as_tensor(m).float()
        if how == "density":
            m = m / float(s * s)
        else:
            m = m / m.max().clamp_min(1e-12)
        ups.append(upsample(m, s, hw, image_size))
    st = torch.stack(ups)
    return st.sum(0) if how == "density" else st.max(0).values


# --- image → text ------------------------------------------------------------------------------------
def _positions(att, box_resized, hw, strides, point: bool) -> list[list[int]]:
    """Flat visual indices per level covered by a box (or holding a point) in resized coordinates."""
    out = []
    for (H, W), off, (vh, vw), s in zip(att.level_shapes, level_offsets(att.level_shapes),
                                        valid_shapes(att.level_shapes, hw, strides), strides):
        x1, y1, x2, y2 = box_resized
        if point:
            rows = [min(vh - 1, max(0, int(y1 // s)))]
            cols = [min(vw - 1, max(0, int(x1 // s)))]
        else:
            cy = (np.arange(vh) + 0.5) * s
            cx = (np.arange(vw) + 0.5) * s
            rows = np.nonzero((cy >= y1) & (cy <= y2))[0].tolist()
            cols = np.nonzero((cx >= x1) & (cx <= x2))[0].tolist()
            if not rows or not cols:  # box smaller than a cell: the cell holding its centre
                rows = [min(vh - 1, max(0, int((y1 + y2) / 2 // s)))]
                cols = [min(vw - 1, max(0, int((x1 + x2) / 2 // s)))]
        out.append([off + r * W + c for r in rows for c in cols])
    return out


def _to_resized(box, hw, image_size):
    h, w = hw
    return scale_boxes(box, image_size, (w, h))[0].tolist()


def image_to_text_in_box(att, box, hw, image_size, head: int | None = None, strides=STRIDES):
    """How the image positions inside `box` (xyxy, original pixels) distribute their attention over the
    prompt tokens: (per_level (L, T), mean over levels (T,)). Each row is a probability distribution."""
    p = _heads(att.image_to_text, head)                       # (N_img, T)
    pos = _positions(att, _to_resized(box, hw, image_size), hw, strides, point=False)
    per_level = torch.stack([p[idx].mean(0) for idx in pos])
    return per_level, per_level.mean(0)


def image_to_text_at(att, xy, hw, image_size, head: int | None = None, strides=STRIDES):
    """Like `image_to_text_in_box` for the cell under one point (x, y) in original pixels, per level."""
    x, y = xy
    W, H = image_size
    if not (0 <= x <= W and 0 <= y <= H):
        raise ValueError(f"point ({x}, {y}) is outside the {W}×{H} image")
    p = _heads(att.image_to_text, head)
    pos = _positions(att, _to_resized([x, y, x, y], hw, image_size), hw, strides, point=True)
    per_level = torch.stack([p[idx].mean(0) for idx in pos])
    return per_level, per_level.mean(0)


# --- across layers -----------------------------------------------------------------------------------
def sharpness(p: torch.Tensor) -> float:
    """1 − normalised entropy of a distribution: 0 = uniform, 1 = all mass on one position."""
    p = torch.as_tensor(p).float().flatten()
    p = p / p.sum().clamp_min(1e-12)
    n = p.numel()
    if n <= 1:
        return 1.0
    ent = -(p * p.clamp_min(1e-12).log()).sum()
    return float(1.0 - ent / math.log(n))


def token_to_image_per_layer(attentions, token_ids, head: int | None = None) -> list[torch.Tensor]:
    """The selected tokens' text→image distribution (N_img,) in every fusion layer."""
    out = []
    for att in attentions:
        p = _heads(att.text_to_image, head)
        out.append(p[_token_ids(token_ids, p.shape[0])].mean(0))
    return out


def aggregate(dists: Sequence[torch.Tensor], how: str = "rollout", residual: float = 0.5) -> torch.Tensor:
    """Combine one distribution per layer (same support) into one.

    how="mean": the plain average over layers.
    how="rollout": attention rollout adapted to cross-attention — every layer's map is mixed with the
    uniform distribution to account for the residual path (weight `residual`, as rollout adds the
    identity for self-attention) and the layers are multiplied and renormalised, so what survives is
    what the fusion attends to consistently through depth.
    """
    if not dists:
        raise ValueError("no layers to aggregate")
    st = torch.stack([torch.as_tensor(d).float() for d in dists])
    st = st / st.sum(-1, keepdim=True).clamp_min(1e-12)
    if how == "mean":
        return st.mean(0)
    if how != "rollout":
        raise ValueError(f"how must be 'mean' or 'rollout', not {how!r}")
    if not 0.0 <= residual < 1.0:
        raise ValueError("residual must be in [0, 1)")
    n = st.shape[-1]
    log_r = torch.zeros(n)
    for d in st:  # in log space: products of many small probabilities underflow
        log_r = log_r + ((1 - residual) * d + residual / n).log()
    return torch.softmax(log_r, dim=-1)


# --- prompts and comparisons -------------------------------------------------------------------------
def phrase_tokens(prompt, tokens, j: int) -> list[int]:
    """Indices of the (non-special) tokens that start inside any span of phrase j."""
    return tokens_in_spans(tokens, prompt.spans[j])


def best_phrase_scores(result) -> np.ndarray:
    """Highest box score of each phrase of the prompt (0 when no box was kept)."""
    out = np.zeros(len(result.prompt.phrases), dtype=np.float32)
    for s, j in zip(result.scores, result.phrase_ids):
        out[int(j)] = max(out[int(j)], float(s))
    return out


def match(boxes_a, labels_a, boxes_b, labels_b, iou_threshold: float = 0.5):
    """One-to-one, class-aware, greedy highest-IoU-first matching → (pairs (M, 2), unmatched_a, unmatched_b).
    Uses `supervision.match_detections` when available (same rule), else the equivalent NumPy code."""
    boxes_a, boxes_b = np.asarray(boxes_a, np.float32).reshape(-1, 4), np.asarray(boxes_b, np.float32).reshape(-1, 4)
    labels_a, labels_b = np.asarray(labels_a, int).reshape(-1), np.asarray(labels_b, int).reshape(-1)
    try:
        import supervision as sv

        if hasattr(sv, "match_detections"):
            pairs, ua, ub = sv.match_detections(sv.Detections(xyxy=boxes_a, class_id=labels_a),
                                                sv.Detections(xyxy=boxes_b, class_id=labels_b), iou_threshold=iou_threshold)
            return np.asarray(pairs, int).reshape(-1, 2), np.asarray(ua, int), np.asarray(ub, int)
    except ImportError:
        pass
    iou = box_iou_numpy(boxes_a, boxes_b) if len(boxes_a) and len(boxes_b) else np.zeros((len(boxes_a), len(boxes_b)))
    iou = np.where(labels_a[:, None] == labels_b[None, :], iou, -1.0)
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), max(1, len(boxes_b)))
        if iou[i, j] < iou_threshold:
            break
        if i in used_a or j in used_b:
            continue
        pairs.append((i, j))
        used_a.add(i)
        used_b.add(j)
    ua = np.array([i for i in range(len(boxes_a)) if i not in used_a], int)
    ub = np.array([j for j in range(len(boxes_b)) if j not in used_b], int)
    return np.array(pairs, int).reshape(-1, 2), ua, ub


def agreement(phrases: Sequence[str], a, b, iou_threshold: float = 0.5) -> list[dict]:
    """Per-phrase agreement of two box sets over the same phrases. `a`, `b`: (boxes, phrase_ids).
    Returns one row per phrase: n_a, n_b, matched, only_a, only_b."""
    pairs, ua, ub = match(a[0], a[1], b[0], b[1], iou_threshold)
    la, lb = np.asarray(a[1], int).reshape(-1), np.asarray(b[1], int).reshape(-1)
    rows = []
    for j, name in enumerate(phrases):
        rows.append({"phrase": name, "n_a": int((la == j).sum()), "n_b": int((lb == j).sum()),
                     "matched": int(sum(la[i] == j for i, _ in pairs)),
                     "only_a": int(sum(la[i] == j for i in ua)), "only_b": int(sum(lb[i] == j for i in ub))})
    return rows


# --- text features through the head --------------------------------------------------------------------
@torch.no_grad()
def text_stage_similarity(model, image, caption: str, token_ids: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """[(stage, K×K cosine matrix)] for the tokens `token_ids` of `caption`: the text encoder's output,
    after every X-MHA and fusion BERT layer of the head, and after S_ground's text projection of the
    features S_ground actually uses. Near-1 off-diagonals mean the head can no longer tell those
    tokens apart, whatever the image shows."""
    from glip.fusion import VLFuse
    from glip.language import BertFusionLayer
    from glip.preprocess import Preprocessor

    pre = Preprocessor(model.config)
    was_training = model.training
    model.eval()
    x = pre.image(pre.load(image))[None]
    enc = pre.tokenize([caption])
    ids = list(token_ids)

    def cos(h: torch.Tensor) -> np.ndarray:
        v = F.normalize(h[0, ids].float(), dim=-1)
        return (v @ v.T).numpy()

    head = model.rpn.head
    stages, hooks = [], []
    n_fuse = n_bert = 0
    for block in head.dyhead_tower:
        if isinstance(block, VLFuse):
            n_fuse += 1
            name = f"after X-MHA {n_fuse}"
            hooks.append(block.register_forward_hook(lambda m, i, o, name=name: stages.append((name, cos(o[1])))))
        elif isinstance(block, BertFusionLayer):
            n_bert += 1
            name = f"after fusion BERT layer {n_bert}"
            hooks.append(block.register_forward_hook(lambda m, i, o, name=name: stages.append((name, cos(o)))))
    hooks.append(head.dot_product_projection_text.register_forward_hook(
        lambda m, i, o: stages.append(("S_ground text projection", cos(o)))))
    try:
        text = model.encode_text(enc["input_ids"], enc["attention_mask"])
        model.ground(model.encode_image(x), text)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [("text encoder", cos(text.hidden))] + stages


__all__ = ["STRIDES", "valid_shapes", "level_offsets", "split_levels", "text_to_image", "upsample", "combine_levels",
           "image_to_text_in_box", "image_to_text_at", "sharpness", "token_to_image_per_layer", "aggregate",
           "phrase_tokens", "best_phrase_scores", "match", "agreement", "text_stage_similarity"]
