"""Self-training, step 2 (paper §7.1): the teacher pseudo-labels web image-text pairs.

For each web pair only the image and the caption are used: the caption's noun phrases are extracted
offline (`glip.prompts.from_caption`, the official NP grammar on a bundled tagger), grounded by the
teacher in one padded batch per `batch_size` pairs (`model.predict(list_of_images, list_of_prompts)`),
and the boxes scoring above `threshold` (paper: 0.5) are written as ODVG JSON lines with their scores
(`glip.data.formats.to_odvg`). `max_per_phrase` keeps at most that many boxes per phrase (the web
captions name single objects; None keeps all, as the paper). Records without a box are written too
(the student's loader drops them, as the official CAPTION_MIN_BOX 1). Deviation: a phrase's score may
average only some of its words (`score_words`, `known_word_prompt`); the region written keeps the whole
phrase. The same function runs a later self-training round with a student as the labeller.

The web split's hidden boxes are never written: `pseudo_label_precision` reads them afterwards only to
report how often a pseudo box is right (IoU >= 0.5 with the object of the caption phrase it overlaps).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from glip.boxes import box_iou
from glip.data import NOVEL_WORDS, make_sample, to_odvg
from glip.prompts import Prompt, PromptError, from_caption

_WORD = re.compile(r"[A-Za-z]+")
ARTICLES = frozenset({"a", "an", "the"})


def known_word_prompt(prompt: Prompt, known: frozenset[str] | None, exclude: frozenset[str] = frozenset()) -> Prompt:
    """The same caption and entities, each entity's spans narrowed to its words in `known` (the vocabulary
    the labelling model was trained to ground; None = any word) and not in `exclude`; an entity with no such
    word keeps its spans.

    Why: a phrase's score is the mean of its tokens' scores. The teacher was trained with "a"/"the"
    outside every phrase (negatives everywhere) and has never seen the novel word, so both pull a correct
    box down (0.40 for "a big turquoise star" in web_s0_000000), while the known words that pick the
    object score high.
    Scored by its known words, the phrase keeps the boxes the teacher can actually vouch for; the region
    written to the file still spans the whole noun phrase, so the student is taught the novel word too.
    A student that has learned the novel words labels with `known=None, exclude=ARTICLES` ("content")."""
    spans = []
    for entity in prompt.spans:
        narrowed = [(b + m.start(), b + m.end()) for b, e in entity for m in _WORD.finditer(prompt.caption[b:e])
                    if (known is None or m.group().lower() in known) and m.group().lower() not in exclude]
        spans.append(narrowed or list(entity))
    return Prompt(prompt.caption, prompt.phrases, spans, prompt.style)


def _region(box, phrase: str, spans, score: float) -> dict:
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return {"bbox": [x1, y1, x2, y2], "phrase": phrase, "tokens_positive": [list(s) for s in spans],
            "score": round(float(score), 4)}


@torch.no_grad()
def pseudo_label(model, n: int = 2000, seed: int = 0, threshold: float = 0.5, batch_size: int = 8,
                 max_per_phrase: int | None = 1, out: str | Path | None = None, progress: bool = True,
                 start: int = 0, score_words: str | frozenset[str] = "all") -> tuple[list[dict], dict]:
    """Label web[start : start + n] (world seed `seed`). Returns (ODVG records, stats). `score_words`: which
    words of a phrase its score averages (`known_word_prompt`): "all" its tokens (the paper), "content"
    (all but articles), or a vocabulary (a set of words, e.g. the gold `ATTRIBUTE_WORDS` for the teacher)."""
    if isinstance(score_words, str) and score_words not in ("all", "content"):
        raise ValueError(f"score_words must be 'all', 'content' or a set of words, not {score_words!r}")
    from tqdm import tqdm

    model.eval()
    records, n_boxes = [], 0
    t0 = time.time()
    bar = tqdm(total=n, disable=not progress, desc="pseudo-label", dynamic_ncols=True)
    for b0 in range(start, start + n, batch_size):
        idx = list(range(b0, min(b0 + batch_size, start + n)))
        samples = [make_sample("web", i, seed) for i in idx]
        prompts = []
        for s in samples:
            try:
                prompts.append(from_caption(s.caption))  # automatic noun phrases (spans = every occurrence)
            except PromptError:
                prompts.append(None)
        keep = [j for j, p in enumerate(prompts) if p is not None]
        scoring = [prompts[j] if score_words == "all" else
                   known_word_prompt(prompts[j], None, ARTICLES) if score_words == "content" else
                   known_word_prompt(prompts[j], score_words) for j in keep]
        results = model.predict([samples[j].image for j in keep], scoring, threshold=threshold) if keep else []
        by_sample = dict(zip(keep, results))
        for j, s in enumerate(samples):
            w, h = s.image.size
            regions = []
            r = by_sample.get(j)
            if r is not None:
                counts: dict[int, int] = {}
                for box, score, pid in zip(r.boxes, r.scores, r.phrase_ids):  # sorted by score
                    pid = int(pid)
                    if max_per_phrase is not None and counts.get(pid, 0) >= max_per_phrase:
                        continue
                    x1, y1, x2, y2 = (float(v) for v in box)
                    if x2 - x1 < 1 or y2 - y1 < 1:
                        continue
                    counts[pid] = counts.get(pid, 0) + 1
                    regions.append(_region(box, prompts[j].phrases[pid], prompts[j].spans[pid], score))
            n_boxes += len(regions)
            records.append({"filename": s.file_name, "height": h, "width": w,
                            "grounding": {"caption": s.caption, "regions": regions}})
        bar.update(len(idx))
    bar.close()
    if out is not None:
        to_odvg(records, out)
    stats = {"n_images": len(records), "n_boxes": n_boxes,
             "n_images_with_boxes": sum(bool(r["grounding"]["regions"]) for r in records),
             "threshold": threshold, "max_per_phrase": max_per_phrase,
             "score_words": score_words if isinstance(score_words, str) else sorted(score_words), "seconds": round(time.time() - t0, 1)}
    return records, stats


def judge_regions(records: list[dict], iou: float = 0.5) -> tuple[list[dict], int]:
    """Each region's (score, correct, novel, word) against the web split's hidden truth, and the number of
    world phrases (reporting only: this is the one place that reads hidden boxes). `word` is the novel
    word the region's own phrase text names ("" when none): what the student could learn from it."""
    from glip.train.data import parse_filename

    judged, n_phrases = [], 0
    for ri, r in enumerate(records):
        caption = r["grounding"]["caption"].lower()
        split, s_seed, index = parse_filename(r["filename"])
        s = make_sample(split, index, s_seed, render_image=False)
        n_phrases += len(s.phrases)
        for g in r["grounding"]["regions"]:
            box = torch.tensor([g["bbox"]], dtype=torch.float32)
            hit, novel = None, False
            for k, p in enumerate(s.phrases):
                if not any(b < p.span[1] and p.span[0] < e for b, e in g["tokens_positive"]):
                    continue
                gt = torch.tensor([s.objs[i].box for i in p.box_ids], dtype=torch.float32).reshape(-1, 4)
                if len(gt) and bool((box_iou(box, gt) >= iou).any()):
                    hit, novel = (ri, k), any(s.objs[i].novel for i in p.box_ids)
                    break
            said = {w for b, e in g["tokens_positive"] for w in caption[b:e].split()}
            word = next((w for w in sorted(NOVEL_WORDS) if w in said), "")
            judged.append({"score": g.get("score", 1.0), "correct": hit is not None, "phrase": hit, "novel": novel,
                           "word": word})
    return judged, n_phrases


def _aggregate(judged: list[dict], n_phrases: int, min_score: float) -> dict:
    kept = [j for j in judged if j["score"] >= min_score]
    tp = sum(j["correct"] for j in kept)
    return {"min_score": min_score, "n_regions": len(kept), "precision": tp / max(len(kept), 1),
            "phrase_recall": len({j["phrase"] for j in kept if j["correct"]}) / max(n_phrases, 1),
            "n_correct_novel": sum(j["correct"] and j["novel"] for j in kept)}


def pseudo_label_precision(records: list[dict], iou: float = 0.5, min_score: float = 0.0) -> dict:
    """Precision of pseudo boxes against the web split's hidden truth (reporting only).

    A region is correct when its box has IoU >= `iou` with an object named by a caption phrase whose span
    overlaps the region's span (a noun phrase "a red diamond" overlaps the world's phrase "red diamond").
    Also: recall of the world's phrases (a correct region for it) and how many correct regions are novel.
    """
    return _aggregate(*judge_regions(records, iou), min_score)


def by_word(judged: list[dict], min_score: float) -> dict[str, dict]:
    """Regions at >= min_score grouped by the novel word their phrase names ("(none)": no novel word):
    count and precision, i.e. what each novel word gives the student to learn from."""
    out: dict[str, list[int]] = {}
    for j in judged:
        if j["score"] >= min_score:
            e = out.setdefault(j["word"] or "(none)", [0, 0])
            e[0] += 1
            e[1] += j["correct"]
    return {w: {"boxes": n, "precision": round(c / n, 3)} for w, (n, c) in sorted(out.items())}


def sweep(records: list[dict], thresholds=(0.3, 0.4, 0.5, 0.6, 0.7), iou: float = 0.5,
          word_screen: float | None = None) -> list[dict] | tuple[list[dict], dict]:
    """Precision / count of the same records screened at several score thresholds (one pass over the truth);
    with `word_screen`, also `by_word` at that screen from the same pass: (sweep, by_word)."""
    judged, n = judge_regions(records, iou)
    rows = [_aggregate(judged, n, t) for t in thresholds]
    return rows if word_screen is None else (rows, by_word(judged, word_screen))


__all__ = ["pseudo_label", "known_word_prompt", "ARTICLES", "pseudo_label_precision", "sweep", "by_word"]
