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

from .boxes import scale_boxes
from .errors import ConfigError
from .fusion import FusionAttention
from .head import HeadOutput
from .image import MAX_SIDE, ImageError, LoadedImage, fit_size, normalize
from .language import TextFeatures
from .postprocess import atss_postprocess
from .preprocess import Preprocessor
from .prompts import Prompt, PromptError, from_categories, parse_prompt, prompt_tokens, tokens_in_spans
from .results import GroundingResult
from .runtime import autocast, fix_heap_threshold

_autocast = autocast  # also importable from here (callers import it under this name)


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
class PreparedImage:
    """An image decoded, keyed for the caches and resized for one input size (`Predictor.prepare_image`):
    what `predict` does to an image before the network, done ahead (in a worker thread, say) and then passed
    to `predict` in place of the image."""
    key: str
    loaded: LoadedImage           # pixels (possibly shrunk) + the original size
    pre: Preprocessor

    @property
    def size(self) -> tuple[int, int]:  # original (W, H): the frame of the returned boxes
        return self.loaded.size

    @property
    def hw(self) -> tuple[int, int]:  # resized (h, w), unpadded: the official resize of the original size
        return self.pre.resized_hw(self.loaded.size)

    @cached_property
    def pixels(self) -> torch.Tensor:
        """(3, h, w) uint8 RGB at the model's input size; only built when the image features are not cached."""
        return self.pre.pixels(self.loaded)

    @property
    def tensor(self) -> torch.Tensor:
        """(3, h, w) normalised, on the CPU."""
        return normalize(self.pixels, self.pre.mean, self.pre.std)


@dataclass
class GroundingState:
    """Everything post-processing needs for one image and one prompt chunk (what the head cache holds)."""
    head: HeadOutput               # batch of 1, on the model's device
    anchors: list[torch.Tensor]
    hw: tuple[int, int]
    prompt: Prompt                 # the chunk's prompt
    phrase_index: list[int]        # chunk phrase j → phrase index in the full prompt
    n_tokens: int                  # valid tokens of the chunk ([CLS] … [SEP])


def _anchor_rows(token_logits: list[torch.Tensor], level: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """(N, T) rows `token_logits[level[i]][0, loc[i]]`, gathered level by level on the tensors' device, without
    reading `level` or `loc` back to the host."""
    rows = token_logits[0].new_zeros(len(level), token_logits[0].shape[-1])
    for lvl, logits in enumerate(token_logits):
        here = level == lvl
        picked = logits[0].index_select(0, torch.where(here, loc, 0))
        rows = torch.where(here[:, None], picked, rows)
    return rows


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
    def preprocessor(self, min_size: int | None = None, max_size: int | None = None) -> Preprocessor:
        pre = Preprocessor(self.model.config, min_size, max_size)
        if not 32 <= pre.min_size <= 4096 or not pre.min_size <= pre.max_size <= 8192:
            raise ConfigError(f"Input size out of range: min {pre.min_size} (32–4096), max {pre.max_size} (≥ min, ≤ 8192)")
        return pre

    def prepare_image(self, image, min_size: int | None = None, max_size: int | None = None,
                      resize: bool = False) -> PreparedImage:
        """Load (header checked before decoding) and key an image for the caches. The pixels kept are at most
        twice the model's input size (JPEGs are decoded at a reduced scale when that suffices); the original
        size is kept for the boxes. Images up to that size reach the model exactly as officially preprocessed.
        `resize` also makes the model-size pixels now (in this thread) rather than when the network needs them.
        Touches no cache, so a worker thread may call it while another predicts."""
        pre = self.preprocessor(min_size, max_size)
        if isinstance(image, PreparedImage) and vars(image.pre) == vars(pre):
            entry = image
        else:
            loaded = pre.load(image.loaded if isinstance(image, PreparedImage) else image)
            digest = hashlib.sha1(loaded.pixels.tobytes()).hexdigest()[:16]
            entry = PreparedImage(f"{digest}:{loaded.pixels.size}:{loaded.size}:{pre.min_size}:{pre.max_size}",
                                  loaded, pre)
        if resize:
            entry.pixels  # noqa: B018 (cached_property: built here)
        return entry

    def prepare_prompt(self, prompt, phrases=None, spans=None, mode: str = "auto") -> Prompt:
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise PromptError("The prompt is empty: give a caption or category names.")
            return from_categories([str(p) for p in prompt])
        if not isinstance(prompt, str):
            raise PromptError(f"A prompt must be a string, a list of names or a Prompt, not {type(prompt).__name__}")
        return parse_prompt(prompt, phrases=phrases, spans=spans, mode=mode)

    # --- the network, with caches ----------------------------------------------------------------
    def _features(self, entries: list[PreparedImage], precision: str) -> list[torch.Tensor]:
        key = (tuple(e.key for e in entries), precision)
        feats = self.images.get(key)
        if feats is None:
            batch, _ = entries[0].pre.batch_pixels([e.pixels for e in entries], self.device)
            feats = self.model.encode_image(batch)
            self.stats["image_runs"] += 1
            self.images.put(key, feats)
        return feats

    def _text(self, captions: list[str], precision: str) -> TextFeatures:
        key = (tuple(captions), precision)
        text = self.texts.get(key)
        if text is None:
            enc = Preprocessor(self.model.config).tokenize(captions)
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
    def run(self, entries: list[PreparedImage], chunks: list[tuple[Prompt, list[int]]], output_attentions: bool = False,
            precision: str = "fp32", fusion: bool = True) -> list[GroundingState]:
        """Head outputs for a batch of images, one prompt chunk per image (cached per batch).
        fusion=False switches the X-MHA residuals off for this call (the deep-fusion ablation)."""
        fix_heap_threshold()
        with self.lock, self._fusion(fusion):
            return self._run(entries, chunks, output_attentions, precision, fusion)

    def _run(self, entries, chunks, output_attentions, precision, fusion) -> list[GroundingState]:
        key = (tuple(e.key for e in entries), tuple(c[0].caption for c in chunks), fusion, precision)
        cached = self.heads.get(key)
        if cached is not None and (not output_attentions or cached[0].head.attentions or not self.model.has_fusion):
            return cached
        with autocast(self.device, precision):
            feats = self._features(entries, precision)
            text = self._text([c[0].caption for c in chunks], precision)
            head = self.model.ground(feats, text, output_attentions=output_attentions)
        self.stats["head_runs"] += 1
        anchors = self.model.anchors(feats)
        states = []
        n_tokens = text.masks.sum(1).tolist()
        for b, (e, (p, idx)) in enumerate(zip(entries, chunks)):
            n_tok = int(n_tokens[b])
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
                output_attentions: bool = False, precision: str = "fp32", fusion: bool = True,
                candidate_threshold: float | None = None, progress=None):
        """Ground `prompt` in `image`; the arguments are documented at `glip.GLIP.predict`.

        A list of images with a list of prompts (one per image) runs as ONE padded batch (the pseudo-labelling
        path; batch padding changes results, as official). Returns a GroundingResult (a list for a batch)."""
        self._check_settings(threshold, nms_iou, max_dets, candidate_threshold)
        nms_iou = self.model.config.nms_th if nms_iou is None else nms_iou
        post = (threshold, nms_iou, int(max_dets), candidate_threshold)
        if isinstance(image, (list, tuple)):
            if not isinstance(prompt, (list, tuple)) or len(prompt) != len(image):
                raise ConfigError("A batch of images needs a list with one prompt per image")
            with self.lock:
                return self._predict_batch(image, prompt, post, min_size, max_size, mode, precision, fusion)
        entry = self.prepare_image(image, min_size, max_size)
        full = self.prepare_prompt(prompt, phrases, spans, mode)
        with self.lock:
            chunks = entry.pre.chunk(full)
            states = []
            for c in chunks:
                states.append(self.run([entry], [c], output_attentions, precision, fusion)[0])
                if progress is not None:
                    progress(len(states), len(chunks))
            return self._result(entry, full, states, *post)

    @staticmethod
    def _check_settings(threshold, nms_iou, max_dets, candidate_threshold) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and np.isfinite(v)

        if not number(threshold) or not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
        if nms_iou is not None and (not number(nms_iou) or not 0.0 < nms_iou <= 1.0):
            raise ConfigError(f"NMS IoU must be in (0, 1], got {nms_iou!r}")
        if not number(max_dets) or int(max_dets) != max_dets or not 1 <= int(max_dets) <= 1000:
            raise ConfigError(f"max_dets must be an integer in 1..1000, got {max_dets!r}")
        if candidate_threshold is not None and (not number(candidate_threshold) or not 0.0 <= candidate_threshold < 1.0):
            raise ConfigError(f"candidate_threshold must be in [0, 1), got {candidate_threshold!r}")

    def _predict_batch(self, images, prompts, post, min_size, max_size, mode, precision, fusion):
        entries = [self.prepare_image(im, min_size, max_size) for im in images]
        fulls = [self.prepare_prompt(p, mode=mode) for p in prompts]
        chunked = [e.pre.chunk(p) for e, p in zip(entries, fulls)]
        n_rounds = max(len(c) for c in chunked)
        per_image: list[list[GroundingState]] = [[] for _ in entries]
        for r in range(n_rounds):  # one padded batch per chunk round (usually one round)
            idx = [i for i, c in enumerate(chunked) if r < len(c)]
            states = self.run([entries[i] for i in idx], [chunked[i][r] for i in idx], False, precision, fusion)
            for i, s in zip(idx, states):
                per_image[i].append(s)
        return [self._result(e, p, s, *post) for e, p, s in zip(entries, fulls, per_image)]

    def _result(self, entry: PreparedImage, full: Prompt, states: list[GroundingState], threshold, nms_iou, max_dets,
                candidate_threshold=None):
        cfg = self.model.config
        cand_th = cfg.inference_th if candidate_threshold is None else candidate_threshold
        boxes, scores, labels, tok_scores = [], [], [], []
        tokens = prompt_tokens(full, cfg.max_query_len)
        for st in states:
            pmap = entry.pre.positive_map(st.prompt)[:, : st.head.text.shape[1]]
            det = atss_postprocess([t[0] for t in st.head.token_logits], [t[0] for t in st.head.bbox_reg],
                                   [t[0] for t in st.head.centerness], st.anchors, pmap, st.hw, self.model.box_coder,
                                   cand_th, cfg.pre_nms_top_n, nms_iou, max_dets)
            keep = det.scores > threshold
            if not keep.any():
                continue
            h, w = st.hw
            boxes.append(scale_boxes(det.boxes[keep].cpu(), (w, h), entry.size))  # resized → original pixels
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
    def _token_scores(st: GroundingState, level, loc, full: Prompt, tokens) -> torch.Tensor:
        """σ(S_ground) of each kept box's anchor over the full prompt's tokens (chunk tokens mapped by position)."""
        rows = _anchor_rows(st.head.token_logits, level, loc).sigmoid().cpu()
        if len(full.caption) == len(st.prompt.caption) and full.caption == st.prompt.caption:
            return rows[:, : len(tokens)]
        out = torch.full((len(rows), len(tokens)), float("nan"))
        chunk_tokens = prompt_tokens(st.prompt, len(st.head.text[0]))
        by_span = {}
        for j, orig in enumerate(st.phrase_index):  # phrase j of the chunk ↔ phrase `orig` of the full prompt
            ct = tokens_in_spans(chunk_tokens, st.prompt.spans[j])
            ot = tokens_in_spans(tokens, full.spans[orig])
            by_span.update(zip(ot, ct))
        for o, c in by_span.items():
            out[:, o] = rows[:, c]
        return out

    # --- dense maps for visualisation -------------------------------------------------------------------
    def token_heatmaps(self, result: GroundingResult, token_ids: list[int] | None = None, phrase: int | None = None,
                       size: tuple[int, int] | None = None):
        """Dense σ(S_ground) maps for a phrase (mean over its tokens) or explicit token indices of the first chunk:
        per level (h_l, w_l) over the unpadded image, and combined (max over levels) at (W, H) `size` — by default
        the size `glip.image.load_image` gives the image (the original, shrunk to MAX_SIDE if larger)."""
        st = result.states[0]
        if phrase is not None:
            for s in result.states:
                if phrase in s.phrase_index:
                    st = s
                    j = s.phrase_index.index(phrase)
                    pm = Preprocessor(self.model.config).positive_map(s.prompt)[j] > 0
                    token_ids = pm.nonzero().flatten().tolist()
                    break
        if not token_ids:
            raise PromptError("No tokens selected")
        h, w = st.hw
        stride = self.model.config.anchor_strides
        levels = []
        for l, logits in enumerate(st.head.token_logits):
            fh, fw = st.head.visual[l].shape[-2:]
            m = logits[0, :, token_ids].sigmoid().mean(-1).view(fh, fw)
            levels.append(m[: max(1, -(-h // stride[l])), : max(1, -(-w // stride[l]))].cpu())
        W, H = size or fit_size(result.image_size, MAX_SIDE)
        up = [F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0] for m in levels]
        return levels, torch.stack(up).max(0).values


__all__ = ["Predictor", "PreparedImage", "GroundingState", "prompt_tokens", "ImageError", "PromptError"]
