"""`python -m glip bench`: where the time goes, stage by stage, and what the caches save.

Random weights (timing does not depend on them), a synthetic 800×1333 image, a 10-name prompt.
Prints min / median over `runs` repetitions; compare versions within one run, never across machines.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .config import get_preset
from .model import GLIP
from .postprocess import atss_postprocess
from .prompts import from_categories, positive_map, tokenize

NAMES = ["person", "bicycle", "car", "dog", "cat", "traffic light", "chair", "cup", "bottle", "potted plant"]


def _time(fn, runs: int, sync) -> tuple[float, float]:
    ts = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def run_bench(preset: str = "glip-t", height: int = 800, width: int = 1333, runs: int = 3, device: str | None = None,
              precision: str = "fp32", model: GLIP | None = None) -> list[tuple[str, float, float]]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = (model or GLIP(get_preset(preset))).eval().to(dev)
    cfg = model.config
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    prompt = from_categories(NAMES)
    enc = tokenize(prompt.caption, max_len=cfg.max_query_len)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    pmap = positive_map(prompt, max_len=cfg.max_query_len)
    pred = model.predictor
    entry = pred.prepare_image(image, min_size=min(height, width), max_size=max(height, width))
    x = entry.tensor[None].to(dev)
    x = torch.nn.functional.pad(x, (0, -x.shape[-1] % 32, 0, -x.shape[-2] % 32))
    rows = []
    amp = torch.autocast(dev.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16) \
        if precision != "fp32" else torch.autocast(dev.type, enabled=False)
    with torch.no_grad(), amp:
        feats = model.encode_image(x)
        text = model.encode_text(ids, mask)
        head = model.ground(feats, text)
        anchors = model.anchors(feats)
        rows.append(("backbone (Swin + FPN)", *_time(lambda: model.encode_image(x), runs, sync)))
        n = int(mask.sum())
        text_c = model.encode_text(ids[:, :n], mask[:, :n])
        rows.append((f"language (BERT, {ids.shape[1]} tokens)", *_time(lambda: model.encode_text(ids, mask), runs, sync)))
        rows.append((f"head (DyHead + S_ground, {ids.shape[1]} tokens)", *_time(lambda: model.ground(feats, text), runs, sync)))
        rows.append((f"head, text cropped to the prompt ({n} tokens)", *_time(lambda: model.ground(feats, text_c), runs, sync)))
        post = lambda: atss_postprocess([t[0] for t in head.token_logits], [t[0] for t in head.bbox_reg],  # noqa: E731
                                        [t[0] for t in head.centerness], anchors, pmap, entry.hw, model.box_coder)
        rows.append(("post-processing (ATSS + NMS)", *_time(post, runs, sync)))
    kw = dict(min_size=min(height, width), max_size=max(height, width), precision=precision)
    names2 = NAMES[::-1]

    def fresh():
        pred.clear_cache()
        pred.predict(image, NAMES, **kw)
    rows.append(("predict, nothing cached", *_time(fresh, runs, sync)))
    pred.predict(image, NAMES, **kw)

    def new_prompt():
        pred.clear_cache(image=False)  # keep the image features
        pred.predict(image, names2, **kw)
    rows.append(("predict, same image / new prompt", *_time(new_prompt, runs, sync)))
    image2 = image[::-1].copy()

    def new_image():
        pred.clear_cache(text=False)  # keep the text features
        pred.predict(image2, NAMES, **kw)
    rows.append(("predict, same prompt / new image", *_time(new_image, runs, sync)))
    pred.predict(image, NAMES, **kw)
    rows.append(("predict, re-threshold (cached head)", *_time(lambda: pred.predict(image, NAMES, threshold=0.3, **kw), runs, sync)))
    return rows


def format_rows(rows, title: str) -> str:
    out = [title, f"{'stage':40s} {'min s':>9s} {'median s':>9s}"]
    out += [f"{name:40s} {mn:9.3f} {md:9.3f}" for name, mn, md in rows]
    return "\n".join(out)
