"""predict(): image + prompt → grounded boxes, with caches so that only what changed is recomputed.

Three bounded LRU caches: image features (Swin + FPN), text features (BERT), and the head output
for an (image, prompt) pair. Re-thresholding (score, NMS IoU, max boxes) only re-runs the cheap
post-processing; a new prompt on the same image skips the backbone; a new image with the same
prompt skips BERT. A list of images runs as ONE padded batch, exactly as the official model does.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .fusion import FusionAttention
from .head import HeadOutput
from .image import ImageError, batch_images, load_image, resized_hw, to_tensor
from .language import TextFeatures
from .postprocess import atss_postprocess
from .prompts import Prompt, PromptError, chunk, get_tokenizer, parse_prompt, positive_map, tokenize
from .results import GroundingResult, Token


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass
class _ImageEntry:
    key: str
    image: Image.Image
    min_size: int
    max_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> tuple[int, int]:  # original (W, H)
        return self.image.size

    @property
    def hw(self) -> tuple[int, int]:  # resized (h, w), unpadded
        return resized_hw(self.image.height, self.image.width, self.min_size, self.max_size)

    @cached_property
    def tensor(self) -> torch.Tensor:
        """(3, h, w) normalised; only built when the image features are not cached."""
        return to_tensor(self.image, self.min_size, self.max_size, self.mean, self.std)


@dataclass
class GroundingState:
    """Everything post-processing needs for one image and one prompt chunk (what the head cache holds)."""
    head: HeadOutput               # batch of 1, on the model's device
    anchors: list[torch.Tensor]
    hw: tuple[int, int]
    prompt: Prompt                 # the chunk's prompt
    phrase_index: list[int]        # chunk phrase j → phrase index in the full prompt
    n_tokens: int                  # valid tokens of the chunk ([CLS] … [SEP])


def _autocast(device: torch.device, precision: str):
    if precision in ("fp32", "float32", None):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
    if device.type != "cuda" and dtype == torch.float16:
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=dtype)


class Predictor:
    def __init__(self, model, image_cache: int = 4, text_cache: int = 64, head_cache: int = 8, crop_text: bool = True):
        self.model = model
        # BERT and the head run on the longest prompt of the batch instead of all 256 positions. Padded positions
        # are masked wherever they could reach a real token (BERT and fusion-layer self-attention, image→text
        # softmax), so every real token's result is unchanged; X-MHA cost scales with the token count.
        self.crop_text = crop_text
        self.images, self.texts, self.heads = LRU(image_cache), LRU(text_cache), LRU(head_cache)
        self.stats = {"image_runs": 0, "text_runs": 0, "head_runs": 0}
        self.lock = threading.RLock()  # caches and the fusion switch are shared: one request at a time

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self, image: bool = True, text: bool = True, head: bool = True) -> None:
        for flag, cache in ((image, self.images), (text, self.texts), (head, self.heads)):
            if flag:
                cache.clear()

    # --- inputs ------------------------------------------------------------------------------------
    def prepare_image(self, image, min_size: int | None = None, max_size: int | None = None) -> _ImageEntry:
        cfg = self.model.config
        min_size, max_size = min_size or cfg.min_size_test, max_size or cfg.max_size_test
        if not 32 <= min_size <= 4096 or not min_size <= max_size <= 8192:
            raise ValueError(f"Input size out of range: min {min_size} (32–4096), max {max_size} (≥ min, ≤ 8192)")
        pil = load_image(image)
        digest = hashlib.sha1(pil.tobytes()).hexdigest()[:16]
        return _ImageEntry(f"{digest}:{pil.size}:{min_size}:{max_size}", pil, min_size, max_size,
                           cfg.pixel_mean, cfg.pixel_std)

    def prepare_prompt(self, prompt, phrases=None, spans=None, mode: str = "auto") -> Prompt:
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, (list, tuple)):
            from .prompts import from_categories

            if not prompt:
                raise PromptError("The prompt is empty: give a caption or category names.")
            return from_categories([str(p) for p in prompt])
        if not isinstance(prompt, str):
            raise PromptError(f"A prompt must be a string, a list of names or a Prompt, not {type(prompt).__name__}")
        return parse_prompt(prompt, phrases=phrases, spans=spans, mode=mode)

    # --- the network, with caches ----------------------------------------------------------------
    def _features(self, entries: list[_ImageEntry], precision: str) -> list[torch.Tensor]:
        key = (tuple(e.key for e in entries), precision)
        feats = self.images.get(key)
        if feats is None:
            batch, _ = batch_images([e.tensor for e in entries], self.model.config.size_divisibility)
            feats = self.model.encode_image(batch.to(self.device))
            self.stats["image_runs"] += 1
            self.images.put(key, feats)
        return feats

    def _text(self, captions: list[str], precision: str) -> TextFeatures:
        key = (tuple(captions), precision)
        text = self.texts.get(key)
        if text is None:
            enc = tokenize(captions, max_len=self.model.config.max_query_len)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if self.crop_text:
                n = int(mask.sum(1).max())
                ids, mask = ids[:, :n], mask[:, :n]
            text = self.model.encode_text(ids.to(self.device), mask.to(self.device))
            self.stats["text_runs"] += 1
            self.texts.put(key, text)
        return text

    @contextlib.contextmanager
    def _fusion(self, enabled: bool):
        layers = self.model.rpn.head.fusion_layers
        before = [f.enabled for f in layers]
        for f in layers:
            f.enabled = enabled
        try:
            yield
        finally:
            for f, b in zip(layers, before):
                f.enabled = b

    @torch.no_grad()
    def run(self, entries: list[_ImageEntry], chunks: list[tuple[Prompt, list[int]]], output_attentions: bool = False,
            precision: str = "fp32", fusion: bool = True) -> list[GroundingState]:
        """Head outputs for a batch of images, one prompt chunk per image (cached per batch).
        fusion=False switches the X-MHA residuals off for this call (the deep-fusion ablation)."""
        with self.lock, self._fusion(fusion):
            return self._run(entries, chunks, output_attentions, precision, fusion)

    def _run(self, entries, chunks, output_attentions, precision, fusion) -> list[GroundingState]:
        key = (tuple(e.key for e in entries), tuple(c[0].caption for c in chunks), fusion, precision)
        cached = self.heads.get(key)
        if cached is not None and (not output_attentions or cached[0].head.attentions or not self.model.has_fusion):
            return cached
        with _autocast(self.device, precision):
            feats = self._features(entries, precision)
            text = self._text([c[0].caption for c in chunks], precision)
            head = self.model.ground(feats, text, output_attentions=output_attentions)
        self.stats["head_runs"] += 1
        anchors = self.model.anchors(feats)
        states = []
        for b, (e, (p, idx)) in enumerate(zip(entries, chunks)):
            n_tok = int(text.masks[b].sum())
            one = HeadOutput(
                [t[b:b + 1].float() for t in head.token_logits], [t[b:b + 1].float() for t in head.bbox_reg],
                [t[b:b + 1].float() for t in head.centerness], [t[b:b + 1].float() for t in head.visual],
                head.text[b:b + 1].float(),
                [FusionAttention(a.image_to_text[b:b + 1, :, :, :n_tok].float(), a.text_to_image[b:b + 1, :, :n_tok].float(),
                                 a.level_shapes) for a in head.attentions],
            )
            states.append(GroundingState(one, anchors, e.hw, p, idx, n_tok))
        self.heads.put(key, states)
        return states

    # --- public API ----------------------------------------------------------------------------------
    def predict(self, image, prompt, spans=None, phrases=None, threshold: float = 0.5, nms_iou: float | None = None,
                max_dets: int = 100, min_size: int | None = None, max_size: int | None = None, mode: str = "auto",
                output_attentions: bool = False, precision: str = "fp32", fusion: bool = True):
        """Ground `prompt` in `image`.

        image: PIL image, RGB numpy array, path or bytes — or a list of them with a list of prompts (one per
        image), run as ONE padded batch (the pseudo-labelling path; batch padding changes results, as official).
        prompt: a caption ("a dog on a sofa"), a category list ("person . dog" or ["person", "dog"]) or a Prompt;
        `phrases` / `spans` ground explicit phrases of a caption. Prompts over 256 tokens are split and merged.
        threshold: keep boxes scoring above it (the official demo keeps > 0.5). fusion=False: the same prediction
        with deep fusion switched off (ablation). Returns a GroundingResult (a list of them for a batch).
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        nms_iou = self.model.config.nms_th if nms_iou is None else nms_iou
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"NMS IoU must be in (0, 1], got {nms_iou}")
        if not 1 <= int(max_dets) <= 1000:
            raise ValueError(f"max_dets must be in 1..1000, got {max_dets}")
        if isinstance(image, (list, tuple)):
            if not isinstance(prompt, (list, tuple)) or len(prompt) != len(image):
                raise ValueError("A batch of images needs a list with one prompt per image")
            with self.lock:
                return self._predict_batch(image, prompt, threshold, nms_iou, max_dets, min_size, max_size, mode,
                                           precision, fusion)
        entry = self.prepare_image(image, min_size, max_size)
        full = self.prepare_prompt(prompt, phrases, spans, mode)
        with self.lock:
            states = [self.run([entry], [c], output_attentions, precision, fusion)[0]
                      for c in chunk(full, max_len=self.model.config.max_query_len)]
            return self._result(entry, full, states, threshold, nms_iou, max_dets)

    def _predict_batch(self, images, prompts, threshold, nms_iou, max_dets, min_size, max_size, mode, precision, fusion):
        entries = [self.prepare_image(im, min_size, max_size) for im in images]
        fulls = [self.prepare_prompt(p, mode=mode) for p in prompts]
        chunked = [chunk(p, max_len=self.model.config.max_query_len) for p in fulls]
        n_rounds = max(len(c) for c in chunked)
        per_image: list[list[GroundingState]] = [[] for _ in entries]
        for r in range(n_rounds):  # one padded batch per chunk round (usually one round)
            idx = [i for i, c in enumerate(chunked) if r < len(c)]
            states = self.run([entries[i] for i in idx], [chunked[i][r] for i in idx], False, precision, fusion)
            for i, s in zip(idx, states):
                per_image[i].append(s)
        return [self._result(e, p, s, threshold, nms_iou, max_dets) for e, p, s in zip(entries, fulls, per_image)]

    def _result(self, entry: _ImageEntry, full: Prompt, states: list[GroundingState], threshold, nms_iou, max_dets):
        cfg = self.model.config
        boxes, scores, labels, tok_scores = [], [], [], []
        tokens = prompt_tokens(full, cfg.max_query_len)
        for st in states:
            pmap = positive_map(st.prompt, max_len=cfg.max_query_len)[:, : st.head.text.shape[1]]
            det = atss_postprocess([t[0] for t in st.head.token_logits], [t[0] for t in st.head.bbox_reg],
                                   [t[0] for t in st.head.centerness], st.anchors, pmap, st.hw, self.model.box_coder,
                                   cfg.inference_th, cfg.pre_nms_top_n, nms_iou, max_dets)
            keep = det.scores > threshold
            if not keep.any():
                continue
            W, H = entry.size
            h, w = st.hw
            scale = torch.tensor([W / w, H / h, W / w, H / h])
            boxes.append(det.boxes[keep].cpu() * scale)
            scores.append(det.scores[keep].cpu())
            labels.append(torch.tensor(st.phrase_index)[det.labels[keep].cpu()])
            tok_scores.append(self._token_scores(st, det.level[keep], det.loc[keep], full, tokens))
        if boxes:
            b, s, l, t = torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(tok_scores)
            order = s.argsort(descending=True, stable=True)[:max_dets]
            b, s, l, t = b[order], s[order], l[order], t[order]
        else:
            b, s, l, t = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, len(tokens))
        return GroundingResult(boxes=b.numpy().astype(np.float32), scores=s.numpy().astype(np.float32),
                               phrase_ids=l.numpy().astype(np.int64), prompt=full, tokens=tokens,
                               token_scores=t.numpy().astype(np.float32), image_size=entry.size,
                               states=states, threshold=threshold)

    @staticmethod
    def _token_scores(st: GroundingState, level, loc, full: Prompt, tokens: list[Token]) -> torch.Tensor:
        """σ(S_ground) of each kept box's anchor over the full prompt's tokens (chunk tokens mapped by position)."""
        rows = torch.stack([st.head.token_logits[int(lv)][0, int(lc)] for lv, lc in zip(level, loc)]).sigmoid().cpu()
        if len(full.caption) == len(st.prompt.caption) and full.caption == st.prompt.caption:
            return rows[:, : len(tokens)]
        out = torch.full((len(rows), len(tokens)), float("nan"))
        chunk_tokens = prompt_tokens(st.prompt, len(st.head.text[0]))
        by_span = {}
        for j, orig in enumerate(st.phrase_index):  # phrase j of the chunk ↔ phrase `orig` of the full prompt
            ct = [t.index for t in chunk_tokens if any(b <= t.start < e for b, e in st.prompt.spans[j])]
            ot = [t.index for t in tokens if any(b <= t.start < e for b, e in full.spans[orig])]
            by_span.update(zip(ot, ct))
        for o, c in by_span.items():
            out[:, o] = rows[:, c]
        return out

    # --- dense maps for visualisation -------------------------------------------------------------------
    def token_heatmaps(self, result: GroundingResult, token_ids: list[int] | None = None, phrase: int | None = None):
        """Dense σ(S_ground) maps for a phrase (mean over its tokens) or explicit token indices of the first chunk:
        per level (h_l, w_l) over the unpadded image, and combined (max over levels) at original resolution."""
        st = result.states[0]
        if phrase is not None:
            for s in result.states:
                if phrase in s.phrase_index:
                    st = s
                    j = s.phrase_index.index(phrase)
                    pm = positive_map(s.prompt, max_len=self.model.config.max_query_len)[j] > 0
                    token_ids = pm.nonzero().flatten().tolist()
                    break
        if not token_ids:
            raise ValueError("No tokens selected")
        h, w = st.hw
        stride = self.model.config.anchor_strides
        levels = []
        for l, logits in enumerate(st.head.token_logits):
            fh, fw = st.head.visual[l].shape[-2:]
            m = logits[0, :, token_ids].sigmoid().mean(-1).view(fh, fw)
            levels.append(m[: max(1, -(-h // stride[l])), : max(1, -(-w // stride[l]))].cpu())
        W, H = result.image_size
        up = [F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0] for m in levels]
        return levels, torch.stack(up).max(0).values


def prompt_tokens(prompt: Prompt, max_len: int = 256) -> list[Token]:
    """The prompt's tokens as BERT sees them ([CLS] … [SEP], truncated at max_len) with char offsets."""
    tok = get_tokenizer()
    enc = tok(prompt.caption, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    return [Token(i, tok.convert_ids_to_tokens(t), int(b), int(e)) for i, (t, (b, e)) in enumerate(zip(ids, offs))]


__all__ = ["Predictor", "GroundingState", "prompt_tokens", "ImageError", "PromptError"]
