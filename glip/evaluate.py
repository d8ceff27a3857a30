"""Evaluation on any detection or grounding dataset — COCO files, MDETR/ODVG grounding files, the
synthetic world — through one code path (`python -m glip eval --data SPEC`).

Detection (`evaluate_detection`, COCO bbox AP/AP50/AP75/APs/APm/APl with pycocotools): the prompt is
the dataset's categories, sorted by id, names cleaned and joined with ". " without a trailing
separator (the official evaluation layout, `from_categories(style="eval")`). When the names do not fit
the text encoder's query (256 tokens for GLIP-T), they are split into prompts that do — greedily by
token count, or `chunk_size` categories each as the official chunked LVIS evaluation
(TEST.CHUNKED_EVALUATION 40) — and each prompt's detections (candidates above the model's
`inference_th`, official 0.05; at most `detections_per_img` each) are concatenated, as officially.

Grounding (`evaluate_grounding`, Recall@1/5/10): each caption is prompted with its grounded phrases'
spans; for each phrase, the model's boxes for it ranked by score; Recall@k counts a phrase as found
when one of its k best boxes has IoU >= 0.5 with one of the phrase's ground-truth boxes. This is the
"any-box" protocol that MDETR's Flickr30k Entities evaluator implements and GLIP reports
(its DATASETS.FLICKR_GT_TYPE "separate" → merge_boxes False); `protocol="merged"` scores against the
union box of the phrase's boxes instead (MDETR's "merged-boxes" protocol). IoU without the +1
convention, as that evaluator. Candidates are kept from score 0.01 (`EVAL_INFERENCE_TH`) so that a
phrase whose anchors all score under 0.05 still gets ranked boxes for R@5/R@10.

World shorthand: `data="test_det"` with `n` and `seed` means `world:test_det:SEED:N` (what the training
loop's quick evaluation and `evaluate(model, "all")` use).
"""
from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch

from glip.boxes import box_iou
from glip.datasets import Dataset, open_dataset, strict
from glip.datasets.coco import coco_dict
from glip.datasets.records import Category, Phrase, Record
from glip.errors import ConfigError, DataError
from glip.prompts import Prompt, chunk, from_categories

WORLD_SPLITS = ("test_det", "test_ground", "test_novel", "gold_det", "gold_ground")
GROUNDING_SPLITS = ("test_ground", "test_novel")
SPLIT_CHOICES = ("test_det",) + GROUNDING_SPLITS + ("all",)
EVAL_INFERENCE_TH = 0.01
PROTOCOLS = ("any-box", "merged")




def _bar(total, progress, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, unit="img", dynamic_ncols=True)


def resolve(data, n: int = 200, seed: int = 1) -> Dataset:
    """A Dataset for `data`: a spec, a Dataset, or a bare world split name (→ world:SPLIT:SEED:N)."""
    if isinstance(data, str) and data in WORLD_SPLITS:
        data = f"world:{data}:{seed}:{n}"
    return open_dataset(data)


def _batches(records, size):
    batch = []
    for r in records:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def category_prompts(categories: list[Category], chunk_size: int | None = None, max_len: int = 256
                     ) -> list[tuple[Prompt, list[int]]]:
    """(prompt, category id of each of its phrases) for the evaluation prompts of `categories` (sorted
    by id): one prompt when the names fit `max_len` tokens, else chunks (see the module docstring)."""
    cats = sorted(categories, key=lambda c: c.id)
    if not cats:
        raise DataError("the dataset has no categories to prompt with")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1 category, got {chunk_size}")
    groups = [cats[i:i + chunk_size] for i in range(0, len(cats), chunk_size)] if chunk_size else [cats]
    out = []
    for g in groups:
        full = from_categories([c.name for c in g], style="eval")
        for p, idx in chunk(full, max_len=max_len):
            out.append((p, [g[i].id for i in idx]))
    return out


def coco_metrics(gt: dict, detections: list[dict]) -> dict:
    """COCO bbox metrics with pycocotools: AP, AP50, AP75, APs, APm, APl, AR100 and each category's AP
    (averaged over IoU 0.5:0.95, all areas, 100 detections). A metric without ground truth to score
    against — APs when no box is small, a category that no box has — is None, not 0.
    `gt`: a COCO instances dict; `detections`: [{image_id, category_id, bbox (xywh), score}]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes cannot take an empty list; no detections still scores 0 where there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {}
    for k, key in zip((0, 1, 2, 3, 4, 5, 8), ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")):
        out[key] = float(ev.stats[k]) if ev.stats[k] >= 0 else None  # pycocotools' -1: no ground truth there
    out.update(n_images=len(gt["images"]), n_detections=len(detections),
               per_category={n: None for n in names.values()})
    precision = ev.eval["precision"]  # (iou, recall, category, area, max dets)
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        out["per_category"][names[cid]] = float(p[p > -1].mean()) if (p > -1).any() else None
    return out


@torch.no_grad()
def evaluate_detection(model, data="test_det", *, n: int = 200, seed: int = 1, batch_size: int = 8,
                       progress: bool = True, chunk_size: int | None = None, precision: str = "fp32") -> dict:
    """COCO metrics of `model` on a detection dataset (spec, Dataset or world split name)."""
    ds = resolve(data, n, seed)
    if not ds.categories and ds.task != "detection":
        raise DataError(f"{ds.spec}: detection evaluation needs a dataset with categories (COCO, ODVG detection, "
                        f"world detection splits); this one is {ds.task}")
    records = list(strict(ds))
    if not any(r.regions for r in records):  # every AP would be pycocotools' "no ground truth", not a score
        raise DataError(f"{ds.spec}: no annotations to evaluate against")
    prompts = category_prompts(list(ds.categories), chunk_size, model.config.max_query_len)
    gt = coco_dict(records, ds.categories)
    dets = []
    t0 = time.time()
    bar = _bar(len(records), progress, f"eval {ds.spec}")
    max_dets = model.config.detections_per_img
    start = 0
    for batch in _batches(records, batch_size):
        images = [r.load_image() for r in batch]
        for prompt, cat_ids in prompts:  # official: each chunk's detections, concatenated
            results = model.predict(images, [prompt] * len(images), threshold=0.0, max_dets=max_dets,
                                    precision=precision)
            for j, res in enumerate(results):
                img_id = gt["images"][start + j]["id"]
                for b, s, pid in zip(res.boxes, res.scores, res.phrase_ids):
                    dets.append({"image_id": img_id, "category_id": cat_ids[int(pid)], "score": float(s),
                                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    out = coco_metrics(gt, dets)
    out.update(n_categories=len(ds.categories), n_prompts=len(prompts), seconds=round(time.time() - t0, 1))
    return out


# --------------------------------------------------------------------------------------------------
# grounding
# --------------------------------------------------------------------------------------------------
def grounding_prompt(record: Record) -> tuple[Prompt, list[Phrase]]:
    """The record's caption prompted with its grounded phrases (their spans), and those phrases."""
    phrases = record.phrases()
    return Prompt(record.caption, [p.text for p in phrases], [list(p.spans) for p in phrases]), phrases


def _merged(boxes) -> list:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return [[b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]]


def phrase_hits(boxes, scores, phrase_ids, phrases: list[Phrase], ks=(1, 5, 10), iou: float = 0.5,
                protocol: str = "any-box") -> list[dict[int, bool]]:
    """For each phrase: {k: one of its k best boxes has IoU >= iou with its ground truth}."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores, phrase_ids = np.asarray(scores).ravel(), np.asarray(phrase_ids).ravel()
    out = []
    for j, p in enumerate(phrases):
        gt_boxes = _merged(p.boxes) if protocol == "merged" else list(p.boxes)
        gt = torch.tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4)
        mine = np.nonzero(phrase_ids == j)[0]
        if len(mine) == 0:
            out.append({k: False for k in ks})
            continue
        order = mine[np.argsort(-scores[mine], kind="stable")]
        ranked = torch.as_tensor(boxes[order], dtype=torch.float64)
        ok = (box_iou(ranked, gt, plus_one=False) >= iou).any(1)  # per ranked box: overlaps a gt box
        out.append({k: bool(ok[:k].any()) for k in ks})
    return out


def recall_at_k(results, phrases_per_image: list[list[Phrase]], ks=(1, 5, 10), iou: float = 0.5,
                protocol: str = "any-box") -> dict:
    """Recall@k over every grounded phrase. results[i] is the GroundingResult of image i, prompted with
    phrases_per_image[i] in order (as `grounding_prompt` builds it)."""
    hits = {k: 0 for k in ks}
    total = 0
    for r, phrases in zip(results, phrases_per_image):
        for h in phrase_hits(r.boxes, r.scores, r.phrase_ids, phrases, ks, iou, protocol):
            total += 1
            for k in ks:
                hits[k] += h[k]
    out = {f"R@{k}": hits[k] / max(total, 1) for k in ks}
    out["n_phrases"] = total
    return out


@torch.no_grad()
def evaluate_grounding(model, data="test_ground", *, n: int = 200, seed: int = 1, batch_size: int = 8,
                       progress: bool = True, ks=(1, 5, 10), protocol: str = "any-box",
                       precision: str = "fp32") -> dict:
    """Recall@k of `model` on a grounding dataset (spec, Dataset or world split name)."""
    ds = resolve(data, n, seed)
    if ds.task != "grounding":
        raise DataError(f"{ds.spec}: grounding evaluation needs captions with grounded boxes (MDETR, ODVG "
                        f"grounding, world test_ground/test_novel); this one is {ds.task}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    records = [r for r in strict(ds) if r.caption and r.phrases()]
    hits = {k: 0 for k in ks}
    total = 0
    t0 = time.time()
    bar = _bar(len(records), progress, f"eval {ds.spec}")
    model.predictor.clear_cache()
    for batch in _batches(records, batch_size):
        targets = [grounding_prompt(r) for r in batch]
        images = [r.load_image() for r in batch]
        results = model.predict(images, [t[0] for t in targets], threshold=0.0, precision=precision,
                                    candidate_threshold=EVAL_INFERENCE_TH)
        for res, (_, phrases) in zip(results, targets):
            for h in phrase_hits(res.boxes, res.scores, res.phrase_ids, phrases, ks,
                                 protocol=protocol):
                total += 1
                for k in ks:
                    hits[k] += h[k]
        bar.update(len(batch))
    model.predictor.clear_cache()
    bar.close()
    out = {f"R@{k}": hits[k] / max(total, 1) for k in ks}
    out.update(n_phrases=total, n_images=len(records), protocol=protocol, seconds=round(time.time() - t0, 1))
    return out


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def evaluate_dataset(model, data, task: str = "auto", **kw) -> dict:
    """Detection or grounding metrics, chosen from the dataset (`task="auto"`) or forced."""
    ds = open_dataset(data)
    task = ("detection" if ds.categories or ds.task == "detection" else "grounding") if task == "auto" else task
    if task == "detection":
        kw.pop("ks", None), kw.pop("protocol", None)
        return {"task": "detection", **evaluate_detection(model, ds, **kw)}
    if task == "grounding":
        kw.pop("chunk_size", None)
        return {"task": "grounding", **evaluate_grounding(model, ds, **kw)}
    raise ConfigError(f"task must be auto, detection or grounding, not {task!r}")


def evaluate(model, split: str = "all", n: int = 200, seed: int = 1, batch_size: int = 8,
             progress: bool = True) -> dict:
    """{split: metrics} on the world's test splits (test_det / test_ground / test_novel, or all three)."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split must be one of {SPLIT_CHOICES}, not {split!r}")
    splits = ("test_det",) + GROUNDING_SPLITS if split == "all" else (split,)
    out = {}
    for sp in splits:
        if sp == "test_det":
            out[sp] = evaluate_detection(model, sp, n=n, seed=seed, batch_size=batch_size, progress=progress)
        else:
            out[sp] = evaluate_grounding(model, sp, n=n, seed=seed, batch_size=batch_size, progress=progress)
    return out


def format_table(metrics: dict) -> str:
    """One line per evaluated dataset; "n/a" for a metric without ground truth (see `coco_metrics`)."""
    rows = []
    for name, m in metrics.items():
        if "AP" in m:
            keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        else:
            keys = tuple(k for k in m if k.startswith("R@"))
        rows.append(f"{name:12s} " + "  ".join(f"{k}={'n/a' if m[k] is None else f'{m[k]:.3f}'}" for k in keys)
                    + f"  (n={m.get('n_images')}, {m.get('seconds')} s)")
    return "\n".join(rows)


__all__ = ["EVAL_INFERENCE_TH", "PROTOCOLS", "category_prompts", "coco_metrics", "evaluate", "evaluate_dataset",
           "evaluate_detection", "evaluate_grounding", "format_table", "grounding_prompt", "phrase_hits",
           "recall_at_k", "resolve"]
