"""How right a labeller's pseudo-labels of the world's web split are (reporting only).

Web pairs come without boxes; the world keeps each scene's objects as hidden truth. This module is the
one place that reads them, to report the precision of a label file written by `glip label` on
`world:web:...`: a region is correct when its box has IoU >= 0.5 with an object named by a world
phrase whose span overlaps the region's span. Nothing in labelling, evaluation or training calls it.
"""
from __future__ import annotations

import torch

from glip.boxes import box_iou

from .schema import NOVEL_WORDS, parse_file_name
from .world import make_sample


def judge_regions(records: list[dict], iou: float = 0.5) -> tuple[list[dict], int]:
    """Each region's (score, correct, novel, word) against the web split's hidden truth, and the number of
    world phrases (reporting only: this is the one place that reads hidden boxes). `word` is the novel
    word the region's own phrase text names ("" when none): what the student could learn from it."""
    judged, n_phrases = [], 0
    for ri, r in enumerate(records):
        caption = r["grounding"]["caption"].lower()
        split, s_seed, index = parse_file_name(r["filename"])
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


__all__ = ["by_word", "judge_regions", "pseudo_label_precision", "sweep"]
