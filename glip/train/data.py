"""Training data: sources of records → training items → the batch of each step.

A *training source* (`TrainingSource`) is a sized, indexable collection of records of two kinds:

* ``GroundingRecord``: an image (loaded lazily), a caption and its regions, each a box (xyxy, in the image's
  pixels) grounded on character spans of the caption, with an optional score (pseudo-labels) and optional
  spans whose tokens carry no loss (``ignore_spans``).
* ``DetectionRecord``: an image, boxes and one category name per box. It becomes a grounding prompt as GLIP's
  ``od_to_grounding`` does (`detection_prompt`): the categories present plus sampled absent ones from the
  source's ``categories``, shuffled, joined with ". "; negatives are screened to fit the query, and a list
  of present categories longer than the query is chunked (one chunk per draw, its boxes only).

A source may also carry ``vocabularies`` (word position → words of its compositional category names, for
`attribute_prompt`) and ``shared_words`` (a dataset's vocabulary, for `share_attribute_words`, applied with the
union of every source's words so that pseudo-labels share the gold words too); sources without them train the
official way. `DatasetSource` makes any `glip.datasets` dataset (COCO, ODVG incl. `glip label` output, MDETR,
the synthetic world...) such a source.

``--data SPEC[:weight] ...`` gives any number of sources (`parse_data_arg`, `open_source`); `StepBatches` builds
the global batch of step s as a pure function of (seed, s): each slot draws a source in proportion to its weight,
a record uniformly, and its own randomness (flip, negatives) from (seed, s, slot). A rank of a data-parallel run
builds only its slots of that batch, so any number of ranks (and accumulation steps) see the same items.

Each item is a dict: ``image`` (3, h, w) normalised BGR tensor at the model's input size (official preprocessing,
`glip.image.to_tensor`), ``caption``, ``positive_map`` (G, T) binary (from the char spans through
`glip.prompts.positive_map`), ``boxes`` (G, 4) xyxy in the resized frame, ``loss_mask`` (T,). `Collate` pads the
images with `batch_images` (bottom/right zeros, multiple of 32) and tokenises the batch.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from glip.boxes import scale_boxes
from glip.errors import DataError, GLIPError, ImageError
from glip.image import batch_images
from glip.preprocess import Preprocessor
from glip.prompts import Prompt, PromptError, from_caption, get_tokenizer, pick_negatives, tokenize

Span = tuple[int, int]
Box = tuple[float, float, float, float]
_SPATIAL = re.compile(r"\b(left|right)\b")
_WORD = re.compile(r"[a-z]+")
# the official od_to_grounding: RANDOM_SAMPLE_NEG 85, CONTROL_PROB (0, 0, 0.5, 0)
OFFICIAL_NEGATIVES = 85
OFFICIAL_ALL_NEGATIVES_PROB = 0.5


# --------------------------------------------------------------------------------------------------
# records and sources
# --------------------------------------------------------------------------------------------------
@dataclass
class Region:
    box: Box                                # xyxy in the image's pixels
    spans: list[Span]                       # character spans of the caption naming it
    score: float | None = None              # a pseudo-label's confidence; None for gold


@dataclass
class GroundingRecord:
    key: str
    image: Callable[[], Image.Image]        # loads the image when called
    caption: str
    regions: list[Region]
    ignore_spans: list[Span] = field(default_factory=list)  # tokens without loss (phrases named, not boxed)


@dataclass
class DetectionRecord:
    key: str
    image: Callable[[], Image.Image]
    boxes: list[Box]
    labels: list[str]                       # category name per box


@runtime_checkable
class TrainingSource(Protocol):
    """What the trainer reads. Optional attributes: ``categories`` (detection sources: the negatives' pool),
    ``vocabularies`` and ``shared_words`` (see the module docstring)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> GroundingRecord | DetectionRecord: ...


# --------------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------------
def parse_data_arg(text: str) -> tuple[str, float]:
    """"SPEC[:weight]" → (spec, weight), SPEC a dataset spec (`glip.datasets.spec`). A trailing number is a
    weight when the spec is complete without it and not with it: `world:gold_det:0:50000:0.5` (weight 0.5),
    `world:gold_det:0:50000` (N = 50000, weight 1), `odvg:labels:images/:2` (weight 2)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            w = float(tail)
        except ValueError:
            w = None
        if w is not None and _spec_complete(head) and not _spec_complete(text):
            if not (w > 0 and np.isfinite(w)):
                raise DataError(f"--data {text!r}: the weight must be a positive number, not {tail}")
            return head, w
    return text, 1.0


def _spec_complete(text: str) -> bool:
    """Whether `text` reads as a whole dataset spec (syntax, and the paths it names exist)."""
    from glip.datasets import parse_spec

    try:
        s = parse_spec(text)
    except DataError:
        return False
    if s.scheme == "world":
        return all(p.isdigit() for p in s.parts[1:])
    if s.scheme in ("coco", "odvg", "mdetr"):
        return Path(s.parts[0]).exists() and (len(s.parts) == 1 or Path(s.parts[1]).is_dir())
    return Path(s.parts[0]).exists() or any(c in s.parts[0] for c in "{*?")


def open_source(spec: str) -> "DatasetSource":
    """A training source from a dataset spec: detection or grounding data (image–caption pairs have no boxes:
    pseudo-label them with `python -m glip label` and train on its output, `odvg:OUT_DIR:IMAGES`)."""
    from glip.datasets import open_dataset

    ds = open_dataset(spec)
    if ds.task == "captions":
        raise DataError(f"{spec}: image-caption pairs without boxes; label them first (python -m glip label) "
                        "and train on the labels (odvg:LABEL_DIR[:IMAGES])")
    return DatasetSource(ds)


def open_sources(data: Sequence[str]) -> tuple[list[TrainingSource], np.ndarray]:
    if not data:
        raise DataError("no training data: give one or more --data SPEC[:weight]")
    sources, weights = [], []
    for text in data:
        spec, w = parse_data_arg(text)
        src = open_source(spec)
        if len(src) == 0:
            raise DataError(f"{spec}: no usable record")
        sources.append(src)
        weights.append(w)
    p = np.asarray(weights, dtype=np.float64)
    return sources, p / p.sum()


# --------------------------------------------------------------------------------------------------
# detection records → grounding prompts
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=65536)
def _name_tokens(name: str) -> int:
    return len(get_tokenizer()(name, add_special_tokens=False)["input_ids"])


def prompt_tokens(names: Sequence[str]) -> int:
    """Tokens of the prompt "a. b. c" without [CLS]/[SEP]: WordPiece splits on punctuation and spaces, so the
    names' tokens plus one '.' between each two."""
    return sum(_name_tokens(n) for n in names) + max(len(names) - 1, 0)


def chunk_categories(names: Sequence[str], budget: int) -> list[list[str]]:
    """Consecutive runs of `names` whose prompt fits `budget` tokens (a name longer than the budget alone)."""
    chunks, cur, used = [], [], 0
    for n in names:
        t = _name_tokens(n) + (1 if cur else 0)
        if cur and used + t > budget:
            chunks.append(cur)
            cur, used, t = [], 0, _name_tokens(n)
        cur.append(n)
        used += t
    if cur:
        chunks.append(cur)
    return chunks


def sample_negatives(present: Sequence[str], categories: Sequence[str], rng: np.random.Generator,
                     negatives: tuple[int, int] | None, hard_weight: float = 1.0) -> list[str]:
    """Absent categories for a prompt. negatives None: the official rule (85 sampled; half the time all of them,
    else a uniform 1..85); (a, b): uniform in [a, b]. hard_weight > 1 draws the absent categories that share a
    word with a present one (a confusable "red square" next to a red circle) that much more often."""
    have = set(present)
    absent = [c for c in categories if c not in have]
    if not absent:
        return []
    if negatives is None:
        k = min(OFFICIAL_NEGATIVES, len(absent))
        if rng.random() >= OFFICIAL_ALL_NEGATIVES_PROB:
            k = int(rng.integers(1, k + 1))
    else:
        k = min(int(rng.integers(negatives[0], negatives[1] + 1)), len(absent))
    return pick_negatives(present, absent, k, rng, hard_weight)


def detection_prompt(labels: Sequence[str], categories: Sequence[str], rng: np.random.Generator, max_tokens: int,
                     negatives: tuple[int, int] | None = None, hard_weight: float = 1.0
                     ) -> tuple[str, dict[str, Span]]:
    """GLIP's od_to_grounding: (caption, span of each category named in it). Present categories are all kept
    unless they alone overflow the query (then one chunk of them, drawn by rng); negatives are added while they
    fit; the order is shuffled so that position carries no signal."""
    budget = max_tokens - 2                                     # [CLS] and [SEP]
    present = list(dict.fromkeys(labels))
    if prompt_tokens(present) > budget:
        order = [present[j] for j in rng.permutation(len(present))]
        chunks = chunk_categories(order, budget)
        present = chunks[int(rng.integers(len(chunks)))]
    names, used = list(present), prompt_tokens(present)
    for neg in sample_negatives(present, categories, rng, negatives, hard_weight):
        t = _name_tokens(neg) + (1 if names else 0)
        if used + t <= budget:
            names.append(neg)
            used += t
    names = [names[j] for j in rng.permutation(len(names))]
    caption, spans = "", {}
    for name in names:
        if caption:
            caption += ". "
        spans[name] = (len(caption), len(caption) + len(name))
        caption += name
    return caption, spans


def attribute_prompt(record: DetectionRecord, vocabularies: dict[str, Sequence[str]], rng: np.random.Generator
                     ) -> tuple[str, list[Region]]:
    """The same boxes, prompted with one word position's vocabulary of the category names ("blue. red. orange.
    ..." for "colour shape" names: all its words, shuffled); each box is grounded to its own word.

    Why: in category prompts every colour word is followed by a shape word, and shape alone already lowers the
    loss a lot; measured on the synthetic world (README), training then drops colour from the features S_ground
    scores and never finds it again. A prompt whose only content is colour gives a direct gradient for it."""
    keys = sorted(vocabularies)
    j = int(rng.integers(len(keys)))
    words = list(vocabularies[keys[j]])
    rng.shuffle(words)
    caption = ". ".join(words)
    starts, pos = {}, 0
    for w in words:
        starts[w] = pos
        pos += len(w) + 2
    regions = []
    for box, label in zip(record.boxes, record.labels):
        parts = label.split()
        w = parts[j] if j < len(parts) else None
        if w in starts:
            regions.append(Region(tuple(box), [(starts[w], starts[w] + len(w))]))
    return caption, regions


def share_attribute_words(caption: str, spans: list[list[Span]], words: frozenset[str]) -> list[list[Span]]:
    """Add to each region every other occurrence in the caption of an attribute word of its own phrase.

    Why: GLIP's positive map is span-level, so for a red circle in "red circle. red square. blue circle"
    the "red" of "red square" and the "circle" of "blue circle" are focal-loss negatives although that
    region *is* red and *is* a circle. In a compositional world every colour token is then as often
    negative as positive for the same colour; the measured result (README, `glip.train.diagnose`) is
    that training erases colour from the features S_ground scores. With the shared words positive, each
    token keeps one meaning; the phrase score (mean over its tokens) still ranks the full match first."""
    lower = caption.lower()
    out = []
    for region in spans:
        own = set()
        for a, b in region:
            own |= {m.group() for m in _WORD.finditer(lower[a:b]) if m.group() in words}
        extra = [(m.start(), m.end()) for m in _WORD.finditer(lower) if m.group() in own
                 and not any(a <= m.start() and m.end() <= b for a, b in region)]
        out.append(list(region) + extra)
    return out


def unlabelled_phrase_spans(caption: str, regions: list[list[Span]]) -> list[Span]:
    """Char spans of the caption's noun phrases (`glip.prompts.from_caption`, the extraction the teacher
    grounded) that no region's span overlaps: the phrases whose box the teacher's score screened out.

    Why: those objects are still in the image, and a caption token counts as a negative at every anchor
    that is not its region's. Unmasked, "a turquoise circle" screened out at 0.45 teaches the student
    that the turquoise circle is *not* turquoise — the opposite of self-training, and the novel words are
    exactly the ones the teacher scores low. With their tokens masked the student learns nothing about
    them from that image instead of the wrong thing."""
    try:
        prompt = from_caption(caption)
    except PromptError:
        return []
    kept = [s for region in regions for s in region]
    return [(b, e) for entity in prompt.spans for b, e in entity
            if not any(b < ke and kb < e for kb, ke in kept)]


def can_flip(caption: str) -> bool:
    """A horizontal flip would make "left"/"right" lie: such captions are not flipped."""
    return not _SPATIAL.search(caption)


# --------------------------------------------------------------------------------------------------
# records → items
# --------------------------------------------------------------------------------------------------
InputSpec = Preprocessor  # what the model's preprocessing needs, built from a GLIPConfig


@dataclass
class ItemOptions:
    """The parts of a TrainConfig that turn records into items."""

    flip_prob: float = 0.5
    negatives: tuple[int, int] | None = None
    hard_negative_weight: float = 1.0
    attribute_prompt_prob: float = 0.0
    share_attribute_words: bool = False
    min_score: float = 0.0
    mask_unlabelled: bool = True

    @classmethod
    def from_config(cls, tc) -> "ItemOptions":
        return cls(tc.flip_prob, tc.det_negatives and tuple(tc.det_negatives), tc.hard_negative_weight,
                   tc.attribute_prompt_prob, tc.share_attribute_words, tc.min_score, tc.mask_unlabelled)


def make_item(image: Image.Image, caption: str, spans: list[list[Span]], boxes: list, spec: InputSpec,
              flip: bool = False, share_words: frozenset[str] | None = None,
              ignore_spans: list[Span] | None = None) -> dict:
    """One training item from a PIL image, a caption and G grounded regions (spans + xyxy box each).
    `share_words`: see `share_attribute_words`. `ignore_spans`: char spans whose tokens carry no loss
    (`loss_mask` 0), for phrases the caption names but no region grounds (see `unlabelled_phrase_spans`)."""
    loss_mask = torch.ones(spec.max_len)
    if ignore_spans:
        ignored = Prompt(caption, [caption[b:e] for b, e in ignore_spans], [[tuple(s)] for s in ignore_spans])
        loss_mask = 1.0 - (spec.positive_map(ignored) > 0).any(0).float()
    if share_words:
        spans = share_attribute_words(caption, spans, share_words)
    W, H = image.size
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes_t = torch.stack([W - boxes_t[:, 2], boxes_t[:, 1], W - boxes_t[:, 0], boxes_t[:, 3]], dim=1)
    x = spec.image(image)
    h, w = x.shape[1:]
    boxes_t = scale_boxes(boxes_t, (W, H), (w, h))
    if spans:
        prompt = Prompt(caption, [caption[s[0][0]:s[0][1]] for s in spans], spans)
        pmap = (spec.positive_map(prompt) > 0).float()
    else:
        pmap = torch.zeros(0, spec.max_len)
    return {"image": x, "caption": caption, "positive_map": pmap, "boxes": boxes_t, "loss_mask": loss_mask}


def grounding_of(record, source, rng: np.random.Generator, opts: ItemOptions, max_len: int
                 ) -> tuple[str, list[Region], list[Span]] | None:
    """(caption, regions, ignore spans) a record trains with, or None when no region survives screening."""
    if isinstance(record, DetectionRecord):
        vocab = getattr(source, "vocabularies", None)
        if opts.attribute_prompt_prob > 0 and vocab and rng.random() < opts.attribute_prompt_prob:
            caption, regions = attribute_prompt(record, vocab, rng)
        else:
            caption, spans = detection_prompt(record.labels, getattr(source, "categories", ()) or (), rng, max_len,
                                              opts.negatives, opts.hard_negative_weight)
            regions = [Region(tuple(b), [spans[lab]]) for b, lab in zip(record.boxes, record.labels) if lab in spans]
        return (caption, regions, []) if regions else None
    regions = [r for r in record.regions if r.score is None or r.score >= opts.min_score]
    if not regions:
        return None  # official CAPTION_MIN_BOX 1: such a record is re-drawn
    ignore = list(record.ignore_spans)
    if opts.mask_unlabelled and any(r.score is not None for r in record.regions):
        ignore += unlabelled_phrase_spans(record.caption, [r.spans for r in regions])
    return record.caption, regions, ignore


def build_item(record, source, rng: np.random.Generator, opts: ItemOptions, spec: InputSpec,
               shared_words: frozenset[str] | None = None) -> dict | None:
    """The training item of one draw of `record` (None when no region survives screening). `shared_words`:
    the vocabulary of `share_attribute_words` (every source's, so pseudo-labels share the gold words too)."""
    g = grounding_of(record, source, rng, opts, spec.max_len)
    if g is None:
        return None
    caption, regions, ignore = g
    flip = opts.flip_prob > 0 and can_flip(caption) and bool(rng.random() < opts.flip_prob)
    try:
        image = record.image().convert("RGB")
    except GLIPError:
        raise
    except Exception as e:
        raise ImageError(f"{record.key}: cannot read its image ({e.__class__.__name__}: {e})") from None
    return make_item(image, caption, [r.spans for r in regions], [r.box for r in regions], spec, flip,
                     shared_words if opts.share_attribute_words else None, ignore)


# --------------------------------------------------------------------------------------------------
# the batch of each step
# --------------------------------------------------------------------------------------------------
MAX_REDRAWS = 100


class StepBatches(torch.utils.data.Dataset):
    """Item s = this rank's share of the global batch of step s, as `grad_accum` collated micro-batches.

    The global batch (`batch_size` slots) is a pure function of (seed, s); slot j of it goes to micro-batch
    j // micro of the rank (j // micro) % world, so every (world size, accumulation) split sees the same items.
    A DataLoader with batch_size=None over range(start, steps) prefetches them in workers."""

    def __init__(self, sources: list[TrainingSource], weights: np.ndarray, spec: InputSpec, opts: ItemOptions,
                 batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, grad_accum: int = 1,
                 collate: "Collate | None" = None):
        if batch_size % (world * grad_accum):
            raise DataError(f"batch_size {batch_size} does not split into {world} ranks x {grad_accum} micro-batches")
        self.sources, self.p, self.spec, self.opts = sources, np.asarray(weights, np.float64), spec, opts
        self.batch_size, self.seed, self.rank, self.world, self.accum = batch_size, seed, rank, world, grad_accum
        self.micro = batch_size // (world * grad_accum)
        self.collate = collate
        self.shared_words = frozenset().union(*(getattr(s, "shared_words", None) or () for s in sources))

    def __len__(self) -> int:
        return 1 << 30

    def draws(self, step: int) -> list[tuple[int, int]]:
        """(source, record index) of every slot of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, 4242, step])
        src = rng.choice(len(self.sources), size=self.batch_size, p=self.p)
        return [(int(k), int(rng.integers(len(self.sources[k])))) for k in src]

    def slots(self, step: int) -> list[list[int]]:
        """This rank's slots of the global batch, one list per micro-batch."""
        m, W = self.micro, self.world
        return [list(range((a * W + self.rank) * m, (a * W + self.rank + 1) * m)) for a in range(self.accum)]

    def item(self, step: int, slot: int, draw: tuple[int, int]) -> dict:
        k, i = draw
        src = self.sources[k]
        rng = np.random.default_rng([self.seed, 7919, step, slot])
        why = f"no region above min_score {self.opts.min_score}"
        for _ in range(MAX_REDRAWS):
            try:
                it = build_item(src[i], src, rng, self.opts, self.spec, self.shared_words)
            except ImageError as e:  # one unreadable image does not stop a run: that draw is re-drawn
                it, why = None, str(e)
            if it is not None:
                return it
            i = int(rng.integers(len(src)))
        raise DataError(f"{getattr(src, 'spec', f'source {k}')}: {MAX_REDRAWS} records drawn in a row were unusable "
                        f"(last: {why})")

    def __getitem__(self, step: int) -> list:
        draws = self.draws(step)
        out = []
        for slots in self.slots(step):
            items = [self.item(step, j, draws[j]) for j in slots]
            out.append(self.collate(items) if self.collate is not None else items)
        return out


class Collate:
    """Pad images (`batch_images`), tokenise captions at `max_len`, then cut every text tensor to the
    longest caption of the batch. That cut is exact: padded tokens are masked in BERT, in the image→text
    softmax and in the fusion BERT layers, and carry no loss."""

    def __init__(self, cfg):
        self.max_len, self.divisibility = cfg.max_query_len, cfg.size_divisibility

    def __call__(self, items: list[dict]) -> dict:
        images, sizes = batch_images([it["image"] for it in items], self.divisibility)
        enc = tokenize([it["caption"] for it in items], max_len=self.max_len)
        T = max(int(enc["attention_mask"].sum(1).max()), 1)
        targets = [{"boxes": it["boxes"], "positive_map": it["positive_map"][:, :T]} for it in items]
        attention = enc["attention_mask"][:, :T]
        loss_mask = torch.stack([it["loss_mask"][:T] for it in items]).to(attention.dtype)
        return {"images": images, "sizes": sizes, "input_ids": enc["input_ids"][:, :T],
                "attention_mask": attention, "loss_mask": attention * loss_mask, "targets": targets,
                "captions": [it["caption"] for it in items]}


def training_prompts(sources: list[TrainingSource], weights: np.ndarray, n: int, max_len: int, seed: int = 0,
                     opts: ItemOptions | None = None) -> list[str]:
    """n prompts as training draws them (detection prompts with their negatives, captions), images untouched.
    Attribute-vocabulary prompts are left out: a few fixed word lists, they would only reweight."""
    opts = ItemOptions(**{**(opts or ItemOptions()).__dict__, "attribute_prompt_prob": 0.0})
    rng = np.random.default_rng([seed, 2718])
    out = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        k = int(rng.choice(len(sources), p=weights))
        src = sources[k]
        g = grounding_of(src[int(rng.integers(len(src)))], src, rng, opts, max_len)
        if g is not None:
            out.append(g[0])
    return out


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
class DatasetSource:
    """A `glip.datasets` dataset as a training source: its records indexed (kept in memory, images lazy;
    records a reader could not parse are dropped and counted in `skipped`), detection records with the
    dataset's cleaned category names, grounding records with their spans and scores, crowd boxes left out
    (as official training does). `shared_words` is the dataset's vocabulary; `vocabularies` are its categories'
    word positions when every category name has the same number of words (colour + shape, say)."""

    def __init__(self, dataset):
        from glip.prompts import clean_category_name

        self.dataset, self.spec = dataset, dataset.spec
        self.detection = dataset.task == "detection"
        self.names = {c.id: clean_category_name(c.name).strip() for c in dataset.categories or ()}
        self.categories = tuple(dict.fromkeys(self.names.values()))
        self.shared_words = frozenset(dataset.vocabulary) if dataset.vocabulary else None
        self.vocabularies = positional_vocabularies(self.categories) if self.detection else None
        self._get, self._n, self.skipped = _random_access(dataset)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> GroundingRecord | DetectionRecord:
        r = self._get(i)
        if r.error:
            raise DataError(r.error)
        regions = [g for g in r.regions or () if not g.iscrowd]
        if self.detection:
            labels = [self.names.get(g.category_id) or g.phrase for g in regions]
            return DetectionRecord(r.key, r.load_image, [tuple(g.box) for g in regions], labels)
        return GroundingRecord(r.key, r.load_image, r.caption or "",
                               [Region(tuple(g.box), [tuple(sp) for sp in g.spans], g.score) for g in regions if g.spans])


def _random_access(dataset):
    """(record(i), n, skipped). The synthetic world builds any record from its index; every other dataset is
    read once into memory (its records hold image paths or loaders, not pixels), unreadable records dropped."""
    from glip.datasets.world import WorldDataset, world_record

    if isinstance(dataset, WorldDataset):
        return (lambda i: world_record(dataset.split, i, dataset.seed, dataset.cfg)), len(dataset), 0
    records, skipped = [], 0
    for r in dataset:
        if r.error:
            skipped += 1
        else:
            records.append(r)
    return records.__getitem__, len(records), skipped


def positional_vocabularies(categories: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    """{"word 1": (...), "word 2": (...)}: the words at each position of the category names, when every name
    has the same number (≥ 2) of words and each position holds several (compositional names, "red circle")."""
    split = [c.split() for c in categories]
    if len(split) < 2 or len({len(w) for w in split}) != 1 or len(split[0]) < 2:
        return None
    vocab = {f"word {j + 1}": tuple(dict.fromkeys(w[j] for w in split)) for j in range(len(split[0]))}
    return vocab if all(len(v) > 1 for v in vocab.values()) else None


__all__ = ["Region", "GroundingRecord", "DetectionRecord", "TrainingSource", "parse_data_arg", "open_source",
           "open_sources", "detection_prompt", "sample_negatives", "chunk_categories", "prompt_tokens",
           "attribute_prompt", "share_attribute_words", "unlabelled_phrase_spans", "can_flip", "InputSpec",
           "ItemOptions", "make_item", "grounding_of", "build_item", "StepBatches", "Collate", "training_prompts",
           "DatasetSource", "positional_vocabularies"]
