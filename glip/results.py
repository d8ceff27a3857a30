"""Typed prediction results and their exports (supervision, JSON API, COCO)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .prompts import Prompt, Token


@dataclass
class GroundingResult:
    boxes: np.ndarray          # (N, 4) xyxy in original image pixels, sorted by descending score
    scores: np.ndarray         # (N,)
    phrase_ids: np.ndarray     # (N,) index into prompt.phrases
    prompt: Prompt
    tokens: list[Token]        # the prompt's tokens ([CLS] … [SEP])
    token_scores: np.ndarray   # (N, len(tokens)) σ(S_ground) of each box's anchor per token (NaN: not scored)
    image_size: tuple[int, int]  # (W, H) of the original image (EXIF-oriented): the frame of `boxes`
    threshold: float = 0.0
    states: list = field(default_factory=list, repr=False)  # cached head outputs (for heat maps / attention)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def phrases(self) -> list[str]:
        """The phrase of each box."""
        return [self.prompt.phrases[i] for i in self.phrase_ids]

    def spans(self, i: int) -> list[tuple[int, int]]:
        return list(self.prompt.spans[int(self.phrase_ids[i])])

    @property
    def attentions(self):
        """X-MHA probabilities per fusion layer (only when predicted with output_attentions=True)."""
        return self.states[0].head.attentions if self.states else []

    def best_per_phrase(self, k: int = 1) -> "GroundingResult":
        """The k highest-scoring boxes of each phrase, in score order: what pseudo-labelling keeps
        (`max_per_phrase`), and the readable view of a caption whose phrases name one object each
        (per-phrase NMS at IoU 0.6 leaves looser duplicates)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        seen: dict[int, int] = {}
        keep = []
        for i, pid in enumerate(self.phrase_ids.tolist()):  # boxes are sorted by descending score
            if seen.get(pid, 0) < k:
                seen[pid] = seen.get(pid, 0) + 1
                keep.append(i)
        idx = np.asarray(keep, dtype=np.int64)
        return dataclasses.replace(self, boxes=self.boxes[idx], scores=self.scores[idx],
                                   phrase_ids=self.phrase_ids[idx], token_scores=self.token_scores[idx])

    def to_supervision(self):
        """→ `sv.Detections` (class_id = phrase index; names in data['class_name'])."""
        import supervision as sv

        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(-1, 4), confidence=self.scores.astype(np.float32),
            class_id=self.phrase_ids.astype(int),
            data={"class_name": np.array(self.phrases, dtype=str)},
        )

    def to_json(self) -> list[dict]:
        """The public API format: [{"box": [x1,y1,x2,y2], "score", "phrase", "span": [start, end]}]; `span` indexes
        `prompt.caption`, the prompt as the model read it (a category list laid out as the official demo does)."""
        out = []
        for i in range(len(self)):
            b, e = self.spans(i)[0]
            out.append({"box": [round(float(v), 2) for v in self.boxes[i]], "score": round(float(self.scores[i]), 4),
                        "phrase": self.phrases[i], "span": [int(b), int(e)]})
        return out

    def to_coco(self, image_id: int = 1, file_name: str = "image.png") -> dict:
        """COCO-style detection results plus the categories (one per phrase) and the image entry."""
        W, H = self.image_size
        anns = []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            anns.append({"id": i + 1, "image_id": image_id, "category_id": int(self.phrase_ids[i]) + 1,
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                         "area": round((x2 - x1) * (y2 - y1), 2), "score": round(float(self.scores[i]), 4), "iscrowd": 0})
        cats = [{"id": j + 1, "name": p, "spans": [list(s) for s in self.prompt.spans[j]]} for j, p in enumerate(self.prompt.phrases)]
        return {"images": [{"id": image_id, "file_name": file_name, "width": W, "height": H}],
                "annotations": anns, "categories": cats, "caption": self.prompt.caption}
