"""Evaluation on the synthetic world's held-out splits (issue 3).

* Detection (test_det): the prompt lists all 36 gold categories (eval layout, 121 tokens); every box
  scored by the model for a category phrase is a detection of that category; COCO AP and AP50 with
  pycocotools (`coco_metrics`).
* Grounding (test_ground, test_novel): each phrase of the caption with a box is grounded with the
  caption's explicit spans; Recall@k = a box among the phrase's k best has IoU >= 0.5 with one of its
  ground-truth boxes (Flickr30k-entities style). test_novel asks for a novel-word object among
  distractors sharing its known word, so only a model that learned the novel word can pick it.

Fresh scenes: `seed` picks the world seed (training uses seed 0; anything else is unseen).
CLI: `python -m glip eval --model toy-student --split all --seed 1 --n 200 --json`.
"""
from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch

from glip.boxes import box_iou
from glip.data import ALL_CATEGORIES, make_sample
from glip.prompts import Prompt

GROUNDING_SPLITS = ("test_ground", "test_novel")
SPLIT_CHOICES = ("test_det",) + GROUNDING_SPLITS + ("all",)
# Candidate threshold while evaluating recall: a phrase whose best anchor stays under the default 0.05
# would otherwise yield no box at all and R@5 would undercount.
EVAL_INFERENCE_TH = 0.01


@contextlib.contextmanager
def _inference_th(model, value: float | None):
    if value is None:
        yield
        return
    before = model.config.inference_th
    model.config.inference_th = value
    try:
        yield
    finally:
        model.config.inference_th = before


def _batches(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _bar(total, progress, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def coco_metrics(samples, predictions: list[dict]) -> dict:
    """COCO bbox AP / AP50 / AP75 with pycocotools.

    predictions: one dict per sample with `boxes` (N, 4) xyxy in image pixels, `scores` (N,) and
    `category_ids` (N,) (1-based ids of `glip.data.ALL_CATEGORIES`, as `glip.data.to_coco` numbers them).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from glip.data import to_coco

    gt = to_coco(samples, by="category")
    dets = []
    for img_id, p in enumerate(predictions, 1):
        for b, s, c in zip(np.asarray(p["boxes"], dtype=float).reshape(-1, 4), np.asarray(p["scores"]).ravel(),
                           np.asarray(p["category_ids"]).ravel()):
            dets.append({"image_id": img_id, "category_id": int(c), "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    out = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "n_images": len(samples), "n_detections": len(dets)}
    if not dets:
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        present = sorted({a["category_id"] for a in gt["annotations"]})
        ev.params.catIds = present  # categories absent from the split would count as -1 (ignored) anyway
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out.update(AP=float(max(ev.stats[0], 0.0)), AP50=float(max(ev.stats[1], 0.0)), AP75=float(max(ev.stats[2], 0.0)))
    return out


def sample_prompt(sample, only_grounded: bool = False) -> tuple[Prompt, list]:
    """The sample's caption as a Prompt (its phrases with their spans) and the phrases used."""
    phrases = [p for p in sample.phrases if p.box_ids or not only_grounded]
    return Prompt(sample.caption, [p.text for p in phrases], [[tuple(p.span)] for p in phrases]), phrases


@torch.no_grad()
def evaluate_detection(model, n: int = 200, seed: int = 1, batch_size: int = 8, progress: bool = True,
                       samples=None) -> dict:
    samples = samples if samples is not None else [make_sample("test_det", i, seed) for i in range(n)]
    cat_id = {name: i + 1 for i, name in enumerate(ALL_CATEGORIES)}
    preds = []
    t0 = time.time()
    bar = _bar(len(samples), progress, "test_det")
    for chunk in _batches(samples, batch_size):
        prompts = [sample_prompt(s)[0] for s in chunk]
        results = model.predict([s.image for s in chunk], prompts, threshold=0.0)
        for s, r in zip(chunk, results):
            cats = np.array([cat_id[s.phrases[j].text] for j in r.phrase_ids], dtype=np.int64)
            preds.append({"boxes": r.boxes, "scores": r.scores, "category_ids": cats})
        bar.update(len(chunk))
    bar.close()
    out = coco_metrics(samples, preds)
    out["seconds"] = round(time.time() - t0, 1)
    return out


# --------------------------------------------------------------------------------------------------
# grounding
# --------------------------------------------------------------------------------------------------
def recall_at_k(results, samples, ks=(1, 5), iou: float = 0.5) -> dict:
    """Recall@k over every grounded phrase. results[i] is a GroundingResult whose prompt lists
    samples[i]'s grounded phrases in order (as `sample_prompt(only_grounded=True)` builds it)."""
    hits = {k: 0 for k in ks}
    total = 0
    for r, s in zip(results, samples):
        _, phrases = sample_prompt(s, only_grounded=True)
        for j, p in enumerate(phrases):
            total += 1
            gt = torch.tensor([s.objs[b].box for b in p.box_ids], dtype=torch.float32)
            mine = np.nonzero(np.asarray(r.phrase_ids) == j)[0]
            if len(mine) == 0:
                continue
            order = mine[np.argsort(-np.asarray(r.scores)[mine], kind="stable")]
            boxes = torch.as_tensor(np.asarray(r.boxes)[order], dtype=torch.float32).reshape(-1, 4)
            ok = (box_iou(boxes, gt) >= iou).any(1)  # per ranked box: overlaps a gt box
            for k in ks:
                hits[k] += bool(ok[:k].any())
    out = {f"R@{k}": hits[k] / max(total, 1) for k in ks}
    out["n_phrases"] = total
    return out


@torch.no_grad()
def evaluate_grounding(model, split: str = "test_ground", n: int = 200, seed: int = 1, batch_size: int = 8,
                       progress: bool = True, samples=None, ks=(1, 5)) -> dict:
    if split not in GROUNDING_SPLITS:
        raise ValueError(f"grounding split must be one of {GROUNDING_SPLITS}, not {split!r}")
    samples = samples if samples is not None else [make_sample(split, i, seed) for i in range(n)]
    results = []
    t0 = time.time()
    bar = _bar(len(samples), progress, split)
    with _inference_th(model, EVAL_INFERENCE_TH):
        model.predictor.clear_cache()
        for chunk in _batches(samples, batch_size):
            prompts = [sample_prompt(s, only_grounded=True)[0] for s in chunk]
            results.extend(model.predict([s.image for s in chunk], prompts, threshold=0.0))
            bar.update(len(chunk))
        model.predictor.clear_cache()
    bar.close()
    out = recall_at_k(results, samples, ks)
    out["n_images"] = len(samples)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def evaluate(model, split: str = "all", n: int = 200, seed: int = 1, batch_size: int = 8,
             progress: bool = True) -> dict:
    """{split: metrics} for test_det / test_ground / test_novel (or all three)."""
    splits = ("test_det",) + GROUNDING_SPLITS if split == "all" else (split,)
    out = {}
    for sp in splits:
        if sp == "test_det":
            out[sp] = evaluate_detection(model, n, seed, batch_size, progress)
        else:
            out[sp] = evaluate_grounding(model, sp, n, seed, batch_size, progress)
    return out


def format_table(metrics: dict) -> str:
    rows = []
    for sp, m in metrics.items():
        keys = ("AP", "AP50") if sp == "test_det" else ("R@1", "R@5")
        rows.append(f"{sp:12s} " + "  ".join(f"{k}={m[k]:.3f}" for k in keys)
                    + f"  (n={m.get('n_images')}, {m.get('seconds')} s)")
    return "\n".join(rows)


__all__ = ["coco_metrics", "evaluate", "evaluate_detection", "evaluate_grounding", "recall_at_k", "sample_prompt",
           "format_table"]
